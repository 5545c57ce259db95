"""`qrelay import-qmail ROOT QMAILQUEUE`: move a stopped qmail's queue into the spool."""
from __future__ import annotations

import os
import time
from pathlib import Path

import click

from engine.cli.base import ROOT, BadInput, Progress, cli, spool_started


@cli.command(name="import-qmail")
@ROOT
@click.argument("qmailqueue", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="count what would be moved; change nothing")
def import_qmail(root: str, qmailqueue: str, dry_run: bool) -> None:
    """Move qmail's queue (QMAILQUEUE, e.g. /var/qmail/queue) into ROOT's spool.

    qmail-send must be stopped: its lock/sendmutex is taken for the run (held:
    refused). Each message keeps its birth time, so retries and queuelifetime
    carry over; recipients keep done/not done; a bouncing message still bounces;
    messages not yet preprocessed (todo/) are preprocessed by qrelay's scheduler.
    Moved messages' files are removed from QMAILQUEUE, message by message after
    the spool commit that holds them; a malformed entry is reported and left in
    place (exit 1). Interrupted, run it again: nothing is lost or moved twice.
    Reads QMAILQUEUE and writes it (removals) and ROOT/queue; safe beside a
    running `qrelay run` on ROOT. `--dry-run` reads only.
    """
    from engine.config.settings import SettingsError, load_settings
    from engine.privilege import acting_as_owner
    from engine.queue import Spool, SpoolError
    from engine.queue.qmailqueue import (QmailQueue, QmailQueueError, import_queue,
                                         remove_empty_dirs, lock_queue)
    base = Path(root)
    if not (base / "queue").is_dir():
        raise BadInput(f"{root}: not a qrelay root (no queue/ directory)")
    qdir = Path(qmailqueue)
    if not qdir.is_dir():
        raise BadInput(f"{qmailqueue}: no such directory")
    try:
        queue = QmailQueue(qdir)
        settings = load_settings(base)
    except (QmailQueueError, SettingsError) as exc:
        raise BadInput(str(exc)) from None
    lock = None
    spool = None
    try:
        if not dry_run:
            lock = lock_queue(qdir)
            queue.check_removable()
        if not dry_run or spool_started(base):
            with acting_as_owner(base / "queue"):
                spool = _AsOwner(Spool(base / "queue", settings.spool, readonly=dry_run),
                                 base / "queue")
        got = import_queue(queue, spool, dry_run=dry_run, batch=settings.spool.import_batch,
                           batch_bytes=settings.spool.max_batch_bytes,
                           now=time.time(), unlink_threads=settings.spool.import_unlink_threads,
                           report=lambda line: click.echo(f"qrelay: import-qmail: {line}",
                                                          err=True),
                           progress=Progress("import-qmail"))
    except QmailQueueError as exc:
        raise BadInput(str(exc)) from None
    except (SpoolError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if spool is not None:
            spool.close()
        if lock is not None:
            os.close(lock)
    if not dry_run and not got.malformed and qdir.resolve() == (base / "queue").resolve():
        remove_empty_dirs(qdir)     # else `qrelay run` on ROOT refuses the qmail queue
    verb = "would move" if dry_run else "moved"
    click.echo(f"qrelay: {verb} {got.moved} messages ({got.to_deliver} recipients to deliver, "
               f"{got.done} done; {got.todo} not yet preprocessed, {got.bouncing} bouncing); "
               f"{got.finished} finished (nothing to deliver), {got.already} moved by an "
               f"earlier run, {len(got.malformed)} malformed left in place")
    if got.malformed:
        raise SystemExit(1)


class _AsOwner:
    """A spool whose every call runs as the owner of `where` (engine.privilege.
    acting_as_owner): root reads and removes qmail's files, and writes the run
    user's spool as the run user, so the segments are theirs (a scheduler
    beside it reads them) and root never follows a link put there."""

    def __init__(self, spool, where: Path) -> None:
        self._spool, self._where = spool, where

    def __getattr__(self, name: str):
        from engine.privilege import acting_as_owner
        attr = getattr(self._spool, name)
        if not callable(attr):
            return attr

        def as_owner(*args, **kwargs):
            with acting_as_owner(self._where):
                return attr(*args, **kwargs)
        return as_owner
