"""Bounce and double-bounce messages (spec §6.4), as RFC 3464 delivery status notifications.

Owns the *text* of a bounce: given the original envelope sender, the
recipients that failed with their qmail-style reports, and the stored
message, it decides whether to bounce, double-bounce or discard, and builds
the bytes to enqueue. It never touches the spool or the network itself.

Format chosen (documented here because it is qrelay's, not qmail's):

- Headers as qmail-send writes them (`Date`, `From: MAILER-DAEMON@bouncehost`,
  `To`, `Subject: failure notice`, no Message-ID), plus `MIME-Version` and
  `Content-Type: multipart/report; report-type=delivery-status`.
- Part 1, `text/plain`: qmail's QSBMF text byte for byte (the `Hi. This is the
  qmail-send program at ...` paragraph, one `<address>:` paragraph per failed
  recipient, and the `--- Below this line is a copy of the message.` break
  paragraph), so QSBMF parsers that read the first text part still work.
- Part 2, `message/delivery-status`: Reporting-MTA, Arrival-Date, and per
  recipient Final-Recipient, Action: failed, Status (the `#x.y.z` code of the
  report, else the remote's enhanced code, else from its reply code, always
  as 5.x.x since the delivery has failed; 5.4.7 for queuelifetime expiry) and
  Diagnostic-Code when the remote host said something.
- Part 3: the original, prefixed `Return-Path: <sender>` as qmail does, as
  `message/rfc822` when it is at most `max_copy_bytes`, else only its header
  as `text/rfc822-headers` (a bounce of a 50 MB message must not cost 50 MB).
- The whole bounce gets qmail-queue's `Received: (qmail <qp> invoked for
  bounce)` line on top, since it does not pass through the SMTP receiver.

Double bounces: qmail gives them the envelope sender `#@[]`; qrelay keeps that
marker *in the spool* (so a failure of a double bounce is recognised and
discarded with qmail's `triple bounce: discarding bounce/N`); a local
delivery gets it as qmail-local does (`Return-Path: <#@[]>`, and forwards
keep it), and remote delivery sends it as the null sender `<>` (see
`wire_sender`), since `MAIL FROM:<#@[]>` is refused by many servers.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config.control import read_line
from engine import received

DOUBLE_BOUNCE_SENDER = "#@[]"

_DSN_CODE = re.compile(r"\(#([245])\.(\d{1,3})\.(\d{1,3})\)")
_REMOTE_SAID = re.compile(r"Remote host said: (\d{3})(?:[ -]([245])\.(\d{1,3})\.(\d{1,3}))?([^\n]*)")
_NEWLINE_AFTER_NEWLINE = re.compile(r"(?<=\n)\n")
# RFC 5322 specials that force a quoted local part (qmail quote.c's idea).
_NEEDS_QUOTE = re.compile(r'[\x00-\x20()<>@,;:\\".\[\]\x7f-\U0010ffff]')
# A local part that is already a quoted string: the receiver keeps `"a b"@c`
# as sent (engine.smtp.policy.plain_address), so it is never quoted again.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"\Z', re.S)
# An address shown in the bounce is one line: qmail-send's `\n` -> `_`, for
# CR and NUL too (a sender imported from a qmail queue may hold any of them).
_ONE_LINE = str.maketrans("\r\n\0", "___")
# A report is LF-separated lines: CR dropped (as qmail-remote drops it from a
# reply), NUL shown as `?` (qmail-remote's outsmtptext).
_REPORT_TEXT = str.maketrans({"\r": None, "\0": "?"})


@dataclass(slots=True, frozen=True)
class BounceConfig:
    """qmail-send's bounce controls (spec §2), read once at start."""

    bouncefrom: str = "MAILER-DAEMON"
    bouncehost: str = "bouncehost"
    doublebounceto: str = "postmaster"
    doublebouncehost: str = "doublebouncehost"
    # Larger originals are returned as their header only (text/rfc822-headers).
    max_copy_bytes: int = 1024 * 1024


def load_bounce_config(root: Path | str, max_copy_bytes: int = 1024 * 1024) -> BounceConfig:
    """Read bouncefrom, bouncehost, doublebounceto, doublebouncehost with qmail's defaults."""
    control = Path(root) / "control"
    me = read_line(control / "me")
    return BounceConfig(
        bouncefrom=read_line(control / "bouncefrom", "MAILER-DAEMON") or "",
        bouncehost=read_line(control / "bouncehost", me or "bouncehost") or "",
        doublebounceto=read_line(control / "doublebounceto", "postmaster") or "",
        doublebouncehost=read_line(control / "doublebouncehost", me or "doublebouncehost") or "",
        max_copy_bytes=max_copy_bytes,
    )


@dataclass(slots=True, frozen=True)
class Failure:
    """One recipient that failed permanently, with its qmail-style report."""

    recipient: str
    text: str


@dataclass(slots=True, frozen=True)
class Bounce:
    """A bounce ready to enqueue: the spool envelope sender, its one recipient, its bytes."""

    sender: str          # "" for a bounce, DOUBLE_BOUNCE_SENDER for a double bounce
    recipient: str
    message: bytes       # CRLF line ends, Received line included
    double: bool


def wire_sender(spool_sender: str) -> str:
    """The MAIL FROM address to send for a stored envelope sender."""
    return "" if spool_sender == DOUBLE_BOUNCE_SENDER else spool_sender


def is_verp(sender: str) -> bool:
    """A sender `pre@host-@[]`: one of its own for each recipient (verp_sender)."""
    return sender.endswith("-@[]")


def verp_sender(sender: str, recipient: str) -> str:
    """qmail-send's VERP: a sender `pre@host-@[]` is sent as `pre<rbox>=<rhost>@host`
    to recipient `rbox@rhost` (the recipient's last `@` made `=`), so a list
    manager (ezmlm, or a .qmail -owner-default) learns from the bounce which
    address failed. Any other sender is sent as it is."""
    if not is_verp(sender):
        return sender
    base = sender[:-4]
    at = base.rfind("@")
    if at < 0:
        at = len(base)
    box, sep, host = recipient.rpartition("@")
    return base[:at] + (f"{box}={host}" if sep else recipient) + base[at:]


def bounce_kind(sender: str, config: BounceConfig) -> str:
    """"bounce", "double", or a discard reason: "triple" / "double-discard"."""
    if sender == DOUBLE_BOUNCE_SENDER:
        return "triple"
    if sender == "":
        return "double" if config.doublebounceto else "double-discard"
    return "bounce"


def date822(t: float) -> str:
    """qmail's date822fmt: `5 Jan 2024 09:03:07 -0000` (UTC)."""
    return received.date822(t).decode("ascii")


def quote_address(addr: str) -> str:
    """Quote the local part when it needs it, as qmail's quote2 does."""
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    if not _QUOTED.match(local) and (
            local == "" or _NEEDS_QUOTE.search(local.replace(".", "a")) or local.startswith(".")
            or local.endswith(".") or ".." in local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}" if at else local


def _report_paragraph(f: Failure) -> str:
    """qmail-send's addbounce: `<addr>:\\n<report>` (`\\n`, CR, NUL in addr as
    `_`; CR dropped from the report, NUL as `?`; a
    `\\n` added unless the report ends in one or is empty), every `\\n` that
    follows a `\\n` made `/` but in the last byte, then `\\n`."""
    report = f.text.translate(_REPORT_TEXT)
    text = f"<{f.recipient.translate(_ONE_LINE)}>:\n{report}"
    if report and not report.endswith("\n"):
        text += "\n"
    return _NEWLINE_AFTER_NEWLINE.sub("/", text[:-1]) + text[-1] + "\n"


def dsn_status(text: str) -> str:
    """RFC 3463 status for a failed recipient, from its qmail report."""
    if "this message has been in the queue too long" in text:
        return "5.4.7"
    m = None
    for m in _DSN_CODE.finditer(text):
        pass
    if m:
        return f"5.{m.group(2)}.{m.group(3)}"
    said = _REMOTE_SAID.search(text)
    if said:
        if said.group(2):
            return f"5.{said.group(3)}.{said.group(4)}"
        return "5.0.0"
    return "5.0.0"


def diagnostic_code(text: str) -> str | None:
    said = _REMOTE_SAID.search(text)
    if not said:
        return None
    line = text[said.start() + len("Remote host said: "):].split("\n", 1)[0]
    return "smtp; " + "".join(c if 32 <= ord(c) < 127 else "?" for c in line)


def _crlf(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape").replace(b"\n", b"\r\n")


def _header_block(first: bytes, message: bytes, limit: int) -> bytes:
    """`first` (the Return-Path line, kept whatever the limit) and the header
    of `message`, at most `limit` bytes in all: cut after its last whole line
    when longer (a message without a blank line is all header). Only the
    header is copied: `message` may be tens of megabytes."""
    room = max(limit - len(first), 0)
    if message.startswith(b"\r\n"):
        return first
    end = message.find(b"\r\n\r\n", 0, room + 2)
    if end >= 0:
        return first + message[:end + 2]
    cut = message.rfind(b"\r\n", 0, room)
    return first + message[:cut + 2] if cut >= 0 else first


def build_bounce(config: BounceConfig, *, sender: str, failures: Sequence[Failure],
                 original: bytes, now: float, qp: int | None = None,
                 arrival: float | None = None, boundary: str | None = None) -> Bounce | None:
    """The bounce (or double bounce) for a finished message; None = discard (triple bounce).

    sender: the original message's envelope sender as stored in the spool.
    original: the stored message bytes (CRLF wire form).
    """
    kind = bounce_kind(sender, config)
    if kind not in ("bounce", "double") or not failures:
        return None
    double = kind == "double"
    qp = os.getpid() if qp is None else qp
    if double:
        recipient = f"{config.doublebounceto}@{config.doublebouncehost}"
        env_sender = DOUBLE_BOUNCE_SENDER
    else:
        # A VERP sender `pre@host-@[]` is answered at `pre@host`.
        recipient = sender[:-4] if is_verp(sender) else sender
        env_sender = ""
    boundary = boundary or f"qrelay-{int(now)}-{os.urandom(8).hex()}"

    qsbmf = [f"Hi. This is the qmail-send program at {config.bouncehost}.\n"]
    if double:
        qsbmf.append("I tried to deliver a bounce message to this address, but the bounce bounced!\n\n")
    else:
        qsbmf.append("I'm afraid I wasn't able to deliver your message to the following addresses.\n"
                     "This is a permanent error; I've given up. Sorry it didn't work out.\n\n")
    qsbmf.extend(_report_paragraph(f) for f in failures)
    qsbmf.append("--- Below this line is the original bounce.\n" if double
                 else "--- Below this line is a copy of the message.\n")

    dsn = [f"Reporting-MTA: dns; {config.bouncehost}\n"]
    if arrival is not None:
        dsn.append(f"Arrival-Date: {date822(arrival)}\n")
    for f in failures:
        dsn.append("\n")
        dsn.append(f"Final-Recipient: rfc822; {f.recipient.translate(_ONE_LINE)}\n")
        dsn.append("Action: failed\n")
        dsn.append(f"Status: {dsn_status(f.text)}\n")
        diag = diagnostic_code(f.text)
        if diag:
            dsn.append(f"Diagnostic-Code: {diag}\n")

    # The sender as qmail-send has it by now (a VERP sender already
    # stripped), quoted as in To: (qmail's quote2).
    shown = "" if double else quote_address(recipient).translate(_ONE_LINE)
    return_path = _crlf(f"Return-Path: <{shown}>\n")
    if len(return_path) + len(original) <= config.max_copy_bytes:
        copy_type = "message/rfc822"
        copy = return_path + original
    else:
        copy_type = "text/rfc822-headers"
        copy = _header_block(return_path, original, config.max_copy_bytes)
    if not copy.endswith(b"\r\n"):
        copy += b"\r\n"
    # 8-bit bytes are labelled 8bit (RFC 2046 5.2.1, RFC 2045 6.4): unlabelled
    # is 7bit, which a gateway downgrading for a next hop would trust.
    eight_bit = "" if copy.isascii() else "Content-Transfer-Encoding: 8bit\n"
    texts_8bit = not all(text.isascii() for text in (*qsbmf, *dsn))
    top_8bit = "Content-Transfer-Encoding: 8bit\n" if eight_bit or texts_8bit else ""

    head = (f"Date: {date822(now)}\n"
            f"From: {quote_address(config.bouncefrom + '@' + config.bouncehost)}\n"
            f"To: {quote_address(recipient).translate(_ONE_LINE)}\n"
            "Subject: failure notice\n"
            "MIME-Version: 1.0\n"
            f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
            f"{top_8bit}"
            "\n"
            "This is a MIME-encapsulated message.\n"
            "\n")

    parts = [
        # qmail-queue's line, as qmail-send hands the bounce to qmail-queue.
        received.queue_received_line(pid=qp, origin="bounce", uid=0, when=now),
        _crlf(head),
        _crlf(f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n"
              "Content-Transfer-Encoding: 8bit\nContent-Description: Notification\n\n"),
        _crlf("".join(qsbmf)),
        _crlf(f"\n--{boundary}\nContent-Type: message/delivery-status\n"
              "Content-Description: Delivery report\n\n"),
        _crlf("".join(dsn)),
        _crlf(f"\n--{boundary}\nContent-Type: {copy_type}\n{eight_bit}"
              "Content-Description: Undelivered message\n\n"),
        copy,
        _crlf(f"\n--{boundary}--\n"),
    ]
    return Bounce(sender=env_sender, recipient=recipient, message=b"".join(parts), double=double)
