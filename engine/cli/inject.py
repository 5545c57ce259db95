"""`qrelay inject`: qmail-inject (engine/inject.py does the work)."""
from __future__ import annotations

import click

from engine.cli.base import cli, discard_output, os_error_line
from engine.home import default_root


class _InjectFailure(click.ClickException):
    """One line `Error: ...`, with qmail-inject's exit status (100 or 111)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status


class _InjectCommand(click.Command):
    # qmail-inject's usage errors are permanent (100) and one line.
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _InjectFailure(f"usage: {exc.format_message()}", 100) from None


def _split_root(words: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """[ROOT] RECIPIENT...: the first word is ROOT when it is a path (has a `/`
    and no `@`) or a directory with control/; else ROOT is $QRELAY_ROOT or /var/qrelay."""
    import os

    if words:
        first = words[0]
        if ("/" in first and "@" not in first) or os.path.isdir(os.path.join(first, "control")):
            return first, words[1:]
    return default_root(), words


# qmail-inject's -h is "the header's recipients only": help is --help alone here,
# so a script written for qmail-inject never gets the help and exit 0 instead.
@cli.command(cls=_InjectCommand, context_settings={"help_option_names": ["--help"]})
@click.argument("words", nargs=-1, metavar="[ROOT] [RECIPIENT]...")
@click.option("-f", "sender", metavar="SENDER", help="envelope sender ('' or '<>' = null sender)")
@click.option("-A", "recipients_from", flag_value="A", default=True,
              help="the arguments, else the header's To/Cc/Bcc (the default)")
@click.option("-a", "recipients_from", flag_value="a", help="the arguments only")
@click.option("-h", "recipients_from", flag_value="h", help="the header's To/Cc/Bcc only")
@click.option("-H", "-t", "recipients_from", flag_value="H",
              help="the arguments and the header's To/Cc/Bcc; Bcc is removed in every case")
@click.option("-n", "print_only", is_flag=True,
              help="print the envelope sender and the message instead of queueing it")
def inject(words: tuple[str, ...], sender: str | None, recipients_from: str,
           print_only: bool) -> None:
    """Queue the message on stdin (qmail-inject).

    Recipients (qmail-inject's -A, -a, -h, -H; -t = -H): the RECIPIENT
    arguments, else the header's To/Cc/Bcc. Added when
    missing: Date, Message-ID, From (QMAILUSER/USER/LOGNAME @ control/defaulthost),
    and addresses are qualified with defaulthost/defaultdomain. Envelope sender:
    -f, else QMAILSUSER or the user @ defaulthost. Reads ROOT/control, writes
    through the spool writer (ROOT/queue/writer.sock) or the spool directly.
    ROOT: a path first argument, else $QRELAY_ROOT, else /var/qrelay. Exit 0 once
    the message is durable; 100 permanent error; 111 temporary (try again).
    """
    import sys
    from pathlib import Path

    from engine.inject import (TEMPORARY, InjectError, inject as inject_message,
                               load_spool_settings, read_message)
    root, recipients = _split_root(words)
    base = Path(root)
    try:
        limit = 0
        if (base / "control").is_dir():
            limit = load_spool_settings(base).smtp.max_message_bytes
        data = read_message(getattr(sys.stdin, "buffer", None), limit)
        prepared, _ = inject_message(base, data, sender=sender,
                                     arguments=() if recipients_from == "h" else recipients,
                                     header_recipients={"A": None, "a": False}.get(
                                         recipients_from, True),
                                     queue=not print_only)
    except InjectError as exc:
        raise _InjectFailure(str(exc), exc.status) from None
    except OSError as exc:      # e.g. a ROOT this user may not reach
        raise _InjectFailure(os_error_line(exc), TEMPORARY) from None
    if print_only:
        _print_prepared(prepared)


def _print_prepared(prepared) -> None:
    """-n: the envelope and the message on stdout; a stdout closed (>&-) or
    whose reader is gone is qmail-inject's write error, 111."""
    import sys

    from engine.inject import TEMPORARY
    out = getattr(sys.stdout, "buffer", None)
    try:
        if out is None:
            raise OSError("standard output is closed")
        out.write(b"Return-Path: <" + prepared.sender.encode("utf-8", "surrogateescape") + b">\n")
        for rcpt in prepared.recipients:
            out.write(b"Recipient: " + rcpt.encode("utf-8", "surrogateescape") + b"\n")
        out.write(prepared.message.replace(b"\r\n", b"\n"))
        out.flush()
    except OSError as exc:
        if out is not None:
            discard_output(out)
        raise _InjectFailure(f"write error: {exc.strerror or exc}", TEMPORARY) from None
