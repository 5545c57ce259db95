"""`qrelay qshape | hold | release | requeue | delete | why`: queue surgery
(Postfix's qshape and postsuper; qmail has none).

Each works beside a running `qrelay run`: reads are LMDB read transactions,
changes go through the spool's index in short transactions, and the running
scheduler notices every change before it starts its next deliveries
(engine.queue.surgery). Bad input — a missing root, an unknown id, a
selection that matches nothing — is one line and exit status 2.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click

from engine.cli.base import ROOT, BadInput, Progress, cli, spool_of
from engine.home import default_root
from engine.log import json_safe

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ID = re.compile(r"^#?(\d+)$")
_MAX_ID = (1 << 64) - 1      # ids are u64 keys in the spool index


def parse_age(text: str) -> float:
    """`90`, `90s`, `30m`, `12h`, `3d`, `1w` -> seconds."""
    m = _AGE.match(text.strip().lower())
    if not m:
        raise BadInput(f"--older-than {text!r}: not an age (e.g. 90s, 30m, 12h, 3d)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_ids(words: tuple[str, ...]) -> tuple[int, ...]:
    out = []
    for w in words:
        m = _ID.match(w.strip())
        if not m or int(m.group(1)) > _MAX_ID:
            raise BadInput(f"{w!r}: not a message id (qread shows them as #<id>)")
        out.append(int(m.group(1)))
    return tuple(out)


def open_spool(root: str, readonly: bool, settings=None):
    """with open_spool(ROOT, readonly) as spool: the spool of ROOT (cli.base.spool_of),
    or a one-line error, exit 2."""
    return spool_of(root, readonly=readonly, error=BadInput, settings=settings,
                    empty=f"{root}: the queue is empty (nothing was ever queued here)")


def _root_and_ids(root: str, ids: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    # `qrelay hold 123` with ROOT left out: the base command takes 123 for ROOT.
    if _ID.match(root) and not Path(root).is_dir():
        return default_root(), (root, *ids)
    return root, ids


def _selection_options(f):
    for opt in reversed([
        click.option("--domain", help="messages with a recipient not yet done at DOMAIN "
                                       "(or failed there, its bounce not yet sent)"),
        click.option("--sender", help="messages from SENDER ('<>' or '' = the null sender)"),
        click.option("--older-than", "older_than",
                     help="messages queued longer ago than AGE (90s, 30m, 12h, 3d)"),
    ]):
        f = opt(f)
    return f


def _select(spool, ids: tuple[str, ...], domain: str | None, sender: str | None,
            older_than: str | None) -> list[int]:
    from engine.queue.surgery import Selection
    if sender is not None and sender.strip() in ("<>", ""):
        sender = ""
    sel = Selection(parse_ids(ids), domain, sender.strip("<>") if sender else sender,
                    parse_age(older_than) if older_than is not None else None)
    if not sel.ids and not sel.by_filter():
        raise BadInput("say which messages: IDs, --domain, --sender or --older-than")
    found, missing = spool.select(sel)
    if missing and not sel.by_filter():
        raise BadInput(f"no message #{missing[0]} in the queue"
                       + (f" (and {len(missing) - 1} more ids)" if len(missing) > 1 else ""))
    if not found:
        raise BadInput("no queued message matches")
    return found


def _surgery_command(name: str, verb: str, doc: str):
    @cli.command(name=name, help=doc)
    @ROOT
    @click.argument("ids", nargs=-1)
    @_selection_options
    def command(root: str, ids: tuple[str, ...], domain: str | None, sender: str | None,
                older_than: str | None) -> None:
        from engine.config.settings import SettingsError, load_settings
        from engine.queue import SpoolError
        root, ids = _root_and_ids(root, ids)
        deleted: list[int] = []
        try:
            # Read here, as root: qrelay.toml may be root's alone, and below
            # this command acts as the queue's owner. (Unreadable: open_spool
            # says why, after its own checks of ROOT.)
            settings = load_settings(Path(root))
        except SettingsError:
            settings = None
        with open_spool(root, readonly=False, settings=settings) as spool:
            try:
                chosen = _select(spool, ids, domain, sender, older_than)
                if name == "delete":
                    n = spool.delete(chosen, deleted, progress=Progress(name))
                else:
                    n = {"hold": spool.hold, "release": spool.release_held,
                         "requeue": spool.requeue}[name](chosen, progress=Progress(name))
            except SpoolError as exc:
                raise click.ClickException(str(exc)) from None
            said = f"{verb}: {n} message{'' if n == 1 else 's'}"
            # Still as the queue's owner (open_spool): the log's files are its.
            _log_surgery(root, (settings or load_settings(Path(root))).log, name, said, deleted)
        click.echo(f"qrelay: {said}")
    return command


def _log_surgery(root: str, settings, name: str, said: str, deleted: list[int]) -> None:
    """What a surgery command did, and who did it, in ROOT/log/current beside
    qmail-send's lines; each deleted message gets its `end msg`, so a log
    analyser (qmailanalog's matchup) sees it leave the queue."""
    import os

    from engine.log import QmailSendLog
    try:
        log = QmailSendLog(Path(root) / "log", max_bytes=settings.max_bytes,
                           max_files=settings.max_files, fmt=settings.format)
    except OSError as exc:
        click.echo(f"qrelay: note: not logged in {Path(root) / 'log'}: {exc}", err=True)
        return
    log.line(f"info: qrelay {name} (uid {os.getuid()}): {said}")
    for msgid in deleted:
        log.end_msg(msgid)
    log.close()


_WHAT = ("\n\nSelect by message IDs (as qread shows them, `#` optional) and/or --domain,"
         " --sender, --older-than (all given must hold; `--older-than 0` = every message)."
         " Reads and writes ROOT/queue; safe beside a running `qrelay run`, whose scheduler"
         " sees the change before it starts its next deliveries. Nothing matching: exit 2.")
_surgery_command("hold", "Placed on hold",
                 "Put messages on hold: nothing of them is delivered, flush included, until"
                 " `qrelay release` (postsuper -h)." + _WHAT)
_surgery_command("release", "Released from hold",
                 "Take held messages off hold; each recipient is due at its own retry time"
                 " (postsuper -H)." + _WHAT)
_surgery_command("requeue", "Requeued",
                 "Make every recipient not yet done of the messages due now, releasing held"
                 " ones (postsuper -r)." + _WHAT)
_surgery_command("delete", "Deleted",
                 "Delete messages from the queue: no bounce is sent, their space is freed"
                 " (postsuper -d)." + _WHAT)


def format_shape(shape) -> str:
    """Postfix qshape's table: destination, total T, one column per age bucket
    (minutes; the last is `N+`), a TOTAL line first. A domain's bytes outside
    32..126 print as `_`, as qread prints an address (a sender wrote it)."""
    from engine.queue.tools import safe
    heads = ["T", *(str(b) for b in shape.buckets), f"{shape.buckets[-1]}+"]
    lines = [("TOTAL", sum(shape.total), shape.total)] + [
        (safe(dom), tot, counts) for dom, tot, counts in shape.rows]
    dom_w = max([5] + [len(d) for d, _, _ in lines])
    widths = [max(len(h), *(len(str(([t] + list(c))[i])) for _, t, c in lines))
              for i, h in enumerate(heads)]
    out = [" ".join([" " * dom_w] + [h.rjust(w) for h, w in zip(heads, widths)])]
    for dom, tot, counts in lines:
        out.append(" ".join([dom.rjust(dom_w)] + [str(v).rjust(w) for v, w in
                                                 zip([tot, *counts], widths)]))
    return "\n".join(out) + "\n"


@cli.command()
@ROOT
@click.option("--top", default=20, show_default=True, type=click.IntRange(0),
              help="destinations shown, most messages first (0 = all)")
@click.option("--held", is_flag=True, help="the held messages (else all the others)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of the table")
def qshape(root: str, top: int, held: bool, as_json: bool) -> None:
    """Queued messages per destination by age (Postfix's qshape).

    Each message counts once for every domain it still has recipients at; the
    columns are ages in minutes since the message was queued. Reads ROOT/queue
    (read-only, beside a running `qrelay run`); writes nothing.
    """
    with open_spool(root, readonly=True) as spool:
        shape = spool.shape(time.time(), top, held)
    if as_json:
        click.echo(json.dumps({"buckets_minutes": list(shape.buckets),
                               "total": sum(shape.total), "total_by_bucket": list(shape.total),
                               "destinations": shape.domains,
                               "rows": [{"domain": json_safe(d), "total": t, "by_bucket": list(c)}
                                        for d, t, c in shape.rows]}))
        return
    click.echo(format_shape(shape), nl=False)


def message_json(msg) -> dict:
    """A message for `--json`: addresses and texts a client or a remote server
    wrote keep their bytes that are not UTF-8 as U+FFFD (json_safe), as the
    log does: a strict JSON parser refuses the lone surrogates they are here."""
    from engine.queue.tools import format_date
    return {"id": msg.msgid, "birth": msg.birth, "date": format_date(msg.birth),
            "size": msg.size, "sender": json_safe(msg.sender), "origin": msg.origin,
            "preprocessed": msg.preprocessed, "bouncing": msg.bouncing, "held": msg.held,
            "recipients": [{"address": json_safe(r.address), "channel": r.channel,
                            "state": r.state, "done": r.done, "attempts": r.attempts,
                            "next_try": r.next_try if r.state in ("pending", "deferred")
                            else None, "last_result": json_safe(r.text)}
                           for r in msg.recipients]}


def format_why(msg, now: float) -> str:
    """One line for the message, then one block per recipient: its state,
    attempts, next retry time and the last result text."""
    from engine.queue.tools import format_date, safe
    flags = "".join(f"  {f}" for f, on in (("held", msg.held), ("bouncing", msg.bouncing),
                                          ("not yet preprocessed", not msg.preprocessed)) if on)
    out = [f"#{msg.msgid}  {format_date(msg.birth)}  {msg.size}  <{safe(msg.sender)}>{flags}"]
    for r in msg.recipients:
        line = f"\t{r.channel}\t{safe(r.address)}\t{r.state}\tattempts {r.attempts}"
        if msg.held and not r.done:
            line += "\tnext try: when released"
        elif r.state in ("pending", "deferred"):
            wait = r.next_try - now
            line += (f"\tnext try {format_date(r.next_try)}"
                     + (f" (in {int(wait)} s)" if wait > 0 else " (due now)"))
        out.append(line)
        if r.text:
            out.append("\t\tlast result: " + safe(r.text.rstrip("\n").replace("\n", "/")))
    return "\n".join(out) + "\n"


@cli.command()
@ROOT
@click.argument("msgid")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of text")
def why(root: str, msgid: str, as_json: bool) -> None:
    """Why a message is still queued: each recipient's state, attempts, next
    retry time and last result text.

    Reads ROOT/queue (read-only, beside a running `qrelay run`); writes nothing.
    """
    from engine.queue import MessageNotFound, SpoolError
    (n,) = parse_ids((msgid,))
    with open_spool(root, readonly=True) as spool:
        try:
            msg = spool.message_info(n)
        except MessageNotFound:
            raise BadInput(f"no message #{n} in the queue") from None
        except SpoolError as exc:
            raise BadInput(str(exc)) from None
    if as_json:
        click.echo(json.dumps(message_json(msg)))
    else:
        click.echo(format_why(msg, time.time()), nl=False)
