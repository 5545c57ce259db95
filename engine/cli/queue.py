"""`qrelay qstat`, `qread`, `flush`: look at and prod the spool (qmail-qstat, qmail-qread, ALRM)."""
from __future__ import annotations

import click

from engine.cli.base import ROOT, cli, spool_started


def _open_spool_readonly(root: str):
    """The spool of ROOT opened read-only, or a one-line CLI error."""
    from pathlib import Path

    from engine.config.settings import SettingsError, load_settings
    from engine.queue import Spool, SpoolError
    base = Path(root)
    if not base.is_dir():
        raise click.ClickException(f"{root}: no such qrelay root")
    if not (base / "queue").is_dir():
        raise click.ClickException(f"{root}: not a qrelay root (no queue/ directory)")
    if not spool_started(base):
        return None  # nothing was ever queued here
    try:
        settings = load_settings(base)
        return Spool(base / "queue", settings.spool, readonly=True)
    except (SpoolError, SettingsError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@ROOT
def qstat(root: str) -> None:
    """Count queued messages (qmail-qstat's two lines).

    Reads ROOT/queue (read-only: safe beside a running `qrelay run`); writes nothing.
    """
    from engine.queue.tools import format_qstat
    from engine.queue import SpoolStats
    spool = _open_spool_readonly(root)
    if spool is None:
        click.echo(format_qstat(SpoolStats(0, 0)), nl=False)
        return
    try:
        click.echo(format_qstat(spool.stats()), nl=False)
    finally:
        spool.close()


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
    spool = _open_spool_readonly(root)
    if spool is None:
        return
    try:
        if as_json:
            for msg in spool.iter_messages():
                click.echo(json.dumps(message_json(msg)))
            return
        for block in format_qread(spool.iter_messages()):
            click.echo(block, nl=False)
    finally:
        spool.close()



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

    from engine.config.settings import SettingsError, load_settings
    from engine.delivery.service import signal_running_scheduler
    from engine.queue import Spool, SpoolError
    base = Path(root)
    if not (base / "queue").is_dir():
        raise click.ClickException(f"{root}: not a qrelay root (no queue/ directory)")
    moved = 0
    if spool_started(base):
        try:
            spool = Spool(base / "queue", load_settings(base).spool)
            try:
                moved = spool.reschedule_all()
            finally:
                spool.close()
        except (SpoolError, SettingsError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    # The running instance is the holder of the root's lock (never a pid file):
    # its supervisor gets ALRM and forwards it to the scheduler.
    pid = signal_running_scheduler(base)
    woke = f"; woke the scheduler (qrelay run pid {pid})" if pid else "; no scheduler running"
    click.echo(f"qrelay: {moved} deferred recipients due now{woke}")
