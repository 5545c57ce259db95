"""`qrelay qstat`, `qread`, `flush`: look at and prod the spool (qmail-qstat, qmail-qread, ALRM)."""
from __future__ import annotations

import click

from engine.cli.base import ROOT, cli, spool_of


@cli.command()
@ROOT
def qstat(root: str) -> None:
    """Count queued messages (qmail-qstat's two lines).

    Reads ROOT/queue (read-only: safe beside a running `qrelay run`); writes nothing.
    """
    from engine.queue.tools import format_qstat
    from engine.queue import SpoolStats
    with spool_of(root, readonly=True) as spool:
        stats = spool.stats() if spool is not None else SpoolStats(0, 0)
    click.echo(format_qstat(stats), nl=False)


@cli.command()
@ROOT
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object per message and line (every recipient's state, "
                   "attempts, next try and last result)")
def qread(root: str, as_json: bool) -> None:
    """List queued messages and recipients (qmail-qread's format).

    Reads ROOT/queue (read-only: safe beside a running `qrelay run`); writes nothing.
    """
    import json

    from engine.cli.surgery import message_json
    from engine.queue.tools import format_qread
    with spool_of(root, readonly=True) as spool:
        if spool is None:
            return
        if as_json:
            for msg in spool.iter_messages():
                click.echo(json.dumps(message_json(msg)))
            return
        for block in format_qread(spool.iter_messages()):
            click.echo(block, nl=False)


@cli.command()
@ROOT
def flush(root: str) -> None:
    """Retry every deferred recipient now (qmail's `kill -ALRM qmail-send`).

    Writes ROOT/queue (every deferred recipient marked due; works with nothing
    running), then sends ALRM to the `qrelay run` holding ROOT's queue lock so
    its scheduler starts at once.
    """
    # The spool is marked first, so a flush works with nothing running; then a
    # running scheduler is woken by SIGALRM. (engine/delivery owns this command.)
    from pathlib import Path

    from engine.delivery.service import signal_running_scheduler
    from engine.queue import SpoolError
    with spool_of(root, readonly=False) as spool:
        try:
            moved = spool.reschedule_all() if spool is not None else 0
        except SpoolError as exc:
            raise click.ClickException(str(exc)) from None
    # The running instance is the holder of the root's lock (never a pid file):
    # its supervisor gets ALRM and forwards it to the scheduler.
    pid = signal_running_scheduler(Path(root))
    woke = f"; woke the scheduler (qrelay run pid {pid})" if pid else "; no scheduler running"
    click.echo(f"qrelay: {moved} deferred recipients due now{woke}")
