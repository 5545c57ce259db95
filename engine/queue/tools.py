"""qmail-qstat and qmail-qread output for the spool (spec §8).

Owns only formatting; reading goes through a read-only Spool, so the tools
work while `qrelay run` holds the spool and never change it.

qread differences from qmail, on purpose:
- messages not yet preprocessed (qmail's todo/, which qmail-qread does not
  show at all) are listed, their recipients with the channel `todo`:
  `\ttodo\t<addr>` — an operator wants to see mail that is stuck there;
- messages are listed in id order (qmail: directory order);
- a message on hold (`qrelay hold`) says ` held` after the sender, as a
  bouncing one says ` bouncing` (Postfix's mailq marks it with `!`).
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

from engine.queue.spool import QueuedMessage, SpoolStats

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def safe(text: str) -> str:
    """qmail-qread's rule: bytes outside 32..126 print as `_` (per byte)."""
    raw = text.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if 32 <= b <= 126 else "_" for b in raw)


def format_qstat(stats: SpoolStats) -> str:
    return (f"messages in queue: {stats.messages}\n"
            f"messages in queue but not yet preprocessed: {stats.not_preprocessed}\n")


def format_date(t: float) -> str:
    tm = time.gmtime(t)
    return (f"{tm.tm_mday} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} GMT")


def format_message(msg: QueuedMessage) -> str:
    head = f"{format_date(msg.birth)}  #{msg.msgid}  {msg.size}  <{safe(msg.sender)}> "
    if msg.bouncing:
        head += " bouncing"
    if msg.held:
        head += " held"
    lines = [head]
    order = {"local": 0, "remote": 1, "todo": 2}
    for r in sorted(msg.recipients, key=lambda r: order.get(r.channel, 3)):
        lines.append(f"{'  done' if r.done else ''}\t{r.channel}\t{safe(r.address)}")
    return "\n".join(lines) + "\n"


def format_qread(messages: Iterable[QueuedMessage]) -> Iterator[str]:
    for msg in messages:
        yield format_message(msg)
