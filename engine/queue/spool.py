"""The Spool: message bytes in segment files, all state in an LMDB index.

`Spool` is the one front the rest of qrelay uses. It opens the spool's
directory tree and its parts, each with one job, and hands every call to
the part that owns it:

    SpoolIndex    engine.queue.index     the LMDB environment; the ONE write
                                         transaction helper (lmdb errors ->
                                         SpoolError with a one-line text)
    SegmentFiles  engine.queue.segfiles  reading segment bytes; removing files
    Intake        engine.queue.intake    enqueue/submit: group commit, commit point
    Ledger        engine.queue.ledger    per-recipient state: preprocess, due,
                                         apply, bouncing/release, reschedule_all
    Repair        engine.queue.repair    quarantine, recover, adopt_tails, cleanup
    Surgery       engine.queue.surgery   select, qshape, hold/release/requeue/delete
    SpoolCore     engine.queue.core      what Intake, Ledger and Repair share

It holds no spool logic of its own beyond the process rules (one Spool per
process, after fork; read-only refuses writes). See the package docstring
(engine/queue/__init__.py) for the crash-state table and the scheduler API.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Container, Iterable, Iterator, Sequence

from engine.config.settings import SpoolSettings
from engine.queue.core import SpoolCore
from engine.queue.index import SpoolIndex
from engine.queue.intake import Intake
from engine.queue.ledger import Ledger
from engine.queue.repair import Repair, process_start
from engine.queue.segfiles import SegmentFiles
from engine.queue.segments import SegmentIO
from engine.queue.surgery import Progress, Selection, Shape, Surgery
from engine.queue.values import (  # noqa: F401 - re-exported for engine.queue
    Deferred, Delivered, Envelope, Failed, Finished, ImportedMessage, ImportedRecipient, Job,
    MessageNotFound, MessageQuarantined, MessageTooBig, MessageUnreadable,
    QueuedMessage, RecipientView, RecoveryReport, Result, SpoolError, SpoolStats,
    SpoolVersionError, SpoolWriteError)

log = logging.getLogger("qrelay.queue")

INDEX_DIR = "index"
SEGMENT_DIR = "segments"
QUARANTINE_DIR = "quarantine"


def current_boot_id() -> str:
    """This boot of the machine ("" where the kernel does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def log_warning(text: str) -> None:
    """The default `warn` of a Spool: a warning of the `qrelay.queue` logger.
    The texts are worded for qmail-send's log (`warning: quarantined #N …`); the
    logger's line says `warning: queue:` itself."""
    log.warning(text.removeprefix("warning: "))


def _never_raising(warn: Callable[[str], None]) -> Callable[[str], None]:
    # A warning must not fail what it reports on (an index commit, a close).
    def guarded(text: str) -> None:
        try:
            warn(text)
        except Exception:  # noqa: BLE001
            log.warning(text)
    return guarded


class Spool:
    """Open (or create) the spool at `queue_dir`. One per process, after fork.

    Writers (receivers) use `enqueue` / `submit`; the scheduler uses the
    methods under "scheduler API"; tools use `stats` / `iter_messages`
    with `readonly=True`, which works whether or not `qrelay run` is running.
    `warn(text)` hears each warning ("warning: quarantined #N …", a full
    index on a path that goes on without it…), one line each; by default
    they go to the `qrelay.queue` logger.
    """

    def __init__(self, queue_dir: Path | str, settings: SpoolSettings | None = None, *,
                 readonly: bool = False, io: SegmentIO | None = None,
                 clock: Callable[[], float] = time.time, boot_id: str | None = None,
                 warn: Callable[[str], None] = log_warning):
        self.path = Path(queue_dir)
        settings = settings or SpoolSettings()
        if settings.segment_max_age >= settings.orphan_grace:
            # cleanup() relies on a writer rotating an idle segment before
            # the orphan grace period could declare it abandoned.
            settings = dataclasses.replace(settings,
                                           segment_max_age=settings.orphan_grace // 2)
        self.settings = settings
        self.readonly = readonly
        self._pid = os.getpid()
        self._closed = False
        warn = _never_raising(warn)
        # Which boot of the machine this is: the index's last commit can only
        # be lost across a machine crash, so its tail is re-indexed once per boot.
        boot_id = current_boot_id() if boot_id is None else boot_id
        dirs = [self.path / d for d in (INDEX_DIR, SEGMENT_DIR, QUARANTINE_DIR)]
        if not readonly:
            try:
                for d in [self.path] + dirs:
                    d.mkdir(mode=0o700, parents=(d == self.path), exist_ok=True)
            except OSError as exc:
                raise SpoolError(f"{self.path}: cannot open spool: {exc}") from None
        # metasync off: one sync per commit instead of two. LMDB stays
        # consistent, but a machine crash may undo its last commit;
        # Repair.reindex() puts those messages back from their segments.
        # Without a boot id that cannot be told, so sync both.
        self.index = SpoolIndex(dirs[0], settings, readonly=readonly,
                                metasync=settings.index_metasync or not boot_id,
                                where=self.path)
        self.env = self.index.env
        self.files = SegmentFiles(dirs[1], self.index, settings.max_open_segments, warn)
        self._clock = clock
        core = SpoolCore(self.index, self.files, clock, warn, self._pid)
        self.repair = Repair(core, dirs[2], settings.orphan_grace, boot_id)
        self.ledger = Ledger(core, self.repair.quarantine_after_error)
        self.intake = Intake(core, settings, io or SegmentIO(), process_start(self._pid))
        self.surgery = Surgery(core, settings.surgery_batch, settings.surgery_pause)
        if not readonly:
            self.repair.reindex(after_reboot=True)

    def _check_process(self) -> None:
        if self._closed:
            raise SpoolError("spool is closed")
        if os.getpid() != self._pid:
            raise SpoolError("spool was opened in another process; open it after fork")
        if self.readonly:
            raise SpoolError("spool is open read-only")

    def close(self) -> None:
        """Commit what was submitted, seal this process's segment, close files."""
        if self._closed:
            return
        if os.getpid() == self._pid and not self.readonly:
            self.intake.close()
        self._closed = True
        self.files.close()
        self.index.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- enqueue (Intake)

    def enqueue(self, envelope: Envelope, message: bytes, indexed: bool = True) -> int:
        """Queue a message; returns its id once it is durable and (with
        `indexed`) in the index, so every reader sees it.

        Blocking; concurrent callers (threads) share fsyncs. Raises
        SpoolWriteError when nothing could be committed.
        """
        return self._put(envelope, message, wait_index=indexed).result()

    async def submit(self, envelope: Envelope, message: bytes, indexed: bool = False) -> int:
        """asyncio form of enqueue, the receivers' path: group commit with
        every concurrent submit. Returns once the message is durable in its
        segment, with its envelope (the 250 after DATA); the index has it a
        moment later, or after a crash at the next open (C2). `indexed` (or
        `[spool] ack_after_index`) waits for the index too."""
        return await self._put(envelope, message, asyncio.get_running_loop(), indexed)

    def _put(self, envelope: Envelope, message: bytes,
             loop: asyncio.AbstractEventLoop | None = None,
             wait_index: bool = False) -> "Future[int] | asyncio.Future[int]":
        self._check_process()
        return self.intake.put(envelope, message, loop, wait_index)

    def _write_batch(self, items: Sequence[tuple[Envelope, bytes]]) -> list[int]:
        """Every commit stage in the caller's thread: a bulk path for loaders and
        benchmarks. Must not run concurrently with enqueue/submit."""
        return self.intake.write_batch(items)

    def import_messages(self, items: Sequence[ImportedMessage],
                        forget: Iterable[bytes] = ()) -> list[int]:
        """Messages moved in from another queue with their birth and their
        recipients' states (qrelay import-qmail); a key imported before is
        not written twice. Returns their ids. `forget`: keys of an earlier
        batch whose source is gone. See Intake.import_batch."""
        self._check_process()
        return self.intake.import_batch(items, forget)

    def imported(self, keys: Iterable[bytes]) -> dict[bytes, int]:
        """key -> spool id, for the keys import_messages has seen."""
        return self.intake.imported(keys)

    def forget_imported(self, keys: Iterable[bytes]) -> None:
        """Forget keys whose source is gone."""
        self._check_process()
        self.intake.forget_imported(keys)

    # ---------------------------------------------------------------- counts & reading (Ledger)

    def stats(self) -> SpoolStats:
        """(messages in queue, not yet preprocessed) — O(1), for qstat."""
        return self.ledger.stats()

    def read_message(self, msgid: int, limit: int = 0) -> bytes:
        """The message bytes (only the first `limit` if given, all checked).
        MessageNotFound if gone; MessageQuarantined if corrupt;
        MessageUnreadable if the system refused the read (try later)."""
        return self.ledger.read_message(msgid, limit)

    def iter_messages(self, chunk: int = 1000) -> Iterator[QueuedMessage]:
        """Every queued message in id order (for qread); corrupt ones are skipped
        with a warning (read-only: quarantining is left to the scheduler)."""
        return self.ledger.iter_messages(chunk)

    def message_info(self, msgid: int) -> QueuedMessage:
        """One message's envelope and recipient states."""
        return self.ledger.message_info(msgid)

    # ---------------------------------------------------------------- scheduler API (Ledger)

    def todo(self, limit: int = 100) -> list[int]:
        """Ids of messages queued but not yet preprocessed, oldest first."""
        return self.ledger.todo(limit)

    def envelope(self, msgid: int) -> Envelope:
        """The envelope as queued (recipients as rewritten by preprocess, if any)."""
        return self.ledger.envelope(msgid)

    def preprocess(self, msgid: int, channels: Sequence[str],
                   addresses: Sequence[str] | None = None,
                   now: float | None = None) -> Finished | None:
        """Classify each recipient 'local' or 'remote' and make it due `now`.

        `channels[i]` is recipient i's channel; `addresses[i]`, if given,
        replaces its address (qmail rewrites at this step: virtualdomains…).
        Removes the message from todo in the same transaction. A message
        with no recipients finishes here (returns its Finished record).
        Raises MessageNotFound, SpoolError (already preprocessed, wrong
        number of channels, unknown channel) or MessageQuarantined.
        """
        return self.ledger.preprocess_many([(msgid, channels, addresses)], now, strict=True)[0]

    def preprocess_many(self, items: Sequence[tuple], now: float | None = None,
                        strict: bool = False) -> list[Finished | None]:
        """preprocess() for many messages in ONE durable transaction.

        items: (msgid, channels) or (msgid, channels, addresses). Unless
        `strict`, a message that is gone or already preprocessed is skipped
        (None), so a scheduler can replay a batch after a crash.
        """
        return self.ledger.preprocess_many(items, now, strict)

    def due(self, now: float | None = None, limit: int = 100, channel: str | None = None,
            exclude: Container[tuple[int, int]] = (),
            after: tuple[float, int, int] | None = None) -> list[Job]:
        """Up to `limit` jobs due at or before `now`, earliest first.

        `channel` restricts to 'local' or 'remote'. `exclude` holds
        (msgid, index) pairs the caller already has in flight: they are
        skipped without counting toward the limit. `after` = (next_try,
        msgid, index) of a job the caller has already seen: reading resumes
        strictly after it, so a caller that holds many due jobs in memory
        need not pass over them again (see Scheduler's scan watermark).
        Due work stays in the index until marked, so a crash mid-delivery
        means a retry.
        Cost: O(log n + limit + len(skipped)).
        """
        return self.ledger.due(now, limit, channel, exclude, after)

    def jobs(self, keys: Iterable[tuple[int, int]], now: float | None = None,
             channel: str | None = None) -> list[Job]:
        """The jobs of these (msgid, index) pairs that are still due at `now`
        (on `channel`, if given), in the order given: O(log n) per key. For a
        caller handing back work it had set aside, without reading the due
        table again."""
        return self.ledger.jobs(keys, now, channel)

    def next_due(self, channel: str | None = None) -> float | None:
        """Time of the earliest due recipient (to know how long to sleep), or None."""
        return self.ledger.next_due(channel)

    def mark_delivered(self, msgid: int, index: int) -> Finished | None:
        return self.ledger.apply([Delivered(msgid, index)])[0]

    def mark_deferred(self, msgid: int, index: int, next_try: float, error: str = "") -> None:
        self.ledger.apply([Deferred(msgid, index, next_try, error)])

    def mark_failed(self, msgid: int, index: int, reason: str = "") -> Finished | None:
        return self.ledger.apply([Failed(msgid, index, reason)])[0]

    def apply(self, results: Sequence[Result]) -> list[Finished | None]:
        """Record many delivery results in ONE durable transaction.

        Returns, per result, the Finished record if that result finished
        its message, else None (also for a held message finishing with
        failures: bouncing() lists it once it is released). A result for a recipient that is already
        finished, or a message that is gone, is ignored (None): marks are
        idempotent, so a scheduler may replay them after a crash.
        """
        return self.ledger.apply(results)

    def commit(self, results: Sequence[Result] = (), preprocess: Sequence[tuple] = (),
               now: float | None = None, reschedule: bool = False,
               releases: Sequence[int] = ()
               ) -> tuple[list[Finished | None], list[Finished | None], int]:
        """apply(results), then reschedule_all(now) if `reschedule`, then
        preprocess_many(preprocess, now), then release(m) for each of
        `releases` (bounced messages) in ONE durable transaction: the
        scheduler's group commit, one sync for all of them. Returns (apply's
        list, preprocess_many's list, number rescheduled). Safe to call from
        one thread other than the loop reading the spool (LMDB's write lock
        serialises it with every other writer)."""
        return self.ledger.commit(results, preprocess, now, reschedule, releases)

    def bouncing(self, limit: int = 100) -> list[Finished]:
        """Finished messages with failures whose bounce is not yet released
        (after a restart the scheduler queues their bounce again), except
        those on hold."""
        return self.ledger.bouncing(limit)

    def release(self, msgid: int) -> None:
        """Remove a finished message (call after its bounce is queued)."""
        self.ledger.release(msgid)

    def reschedule_all(self, now: float | None = None) -> int:
        """Make every deferred recipient due `now` (qmail's ALRM / flush).
        Returns how many were moved. One transaction, O(number deferred);
        SpoolError (not lmdb.Error) if the index cannot take it."""
        return self.ledger.reschedule_all(now)

    # ---------------------------------------------------------------- repair (Repair)

    def recover(self, verify_bytes: bool = False, now: float | None = None) -> RecoveryReport:
        """Check the whole index (and with verify_bytes every message's bytes),
        quarantine what is corrupt, drop dangling entries, rebuild segment live
        counts, remove orphan segment files. Run by the scheduler at start;
        O(messages). Safe while receivers enqueue."""
        self._check_process()
        return self.repair.recover(verify_bytes, now, self.intake.segment)

    def adopt_tails(self) -> int:
        """Index what writers that are gone left unindexed (C2); the scheduler
        calls it every few seconds, so a receiver that died while the rest
        ran on does not leave its answered messages waiting for a restart.
        Cheap when there is nothing to do: no write transaction then."""
        self._check_process()
        return self.repair.adopt_tails()

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove segment files that no index record knows about and that are
        older than orphan_grace (bytes of enqueues that never committed), and
        abandoned empty segments of dead writers. Returns the names removed."""
        self._check_process()
        return self.repair.cleanup(now, self.intake.segment)

    # ---------------------------------------------------------------- queue surgery (Surgery)

    def select(self, selection: Selection, now: float | None = None
               ) -> tuple[list[int], list[int]]:
        """(ids selected, ids asked for that are not queued). Read-only."""
        return self.surgery.select(selection, self._clock() if now is None else now)

    def shape(self, now: float | None = None, top: int = 0, held: bool = False) -> Shape:
        """qshape's destinations x age table. Read-only, one pass over the index."""
        return self.surgery.shape(self._clock() if now is None else now, top, held)

    def hold(self, ids: Iterable[int], now: float | None = None,
             progress: Progress | None = None) -> int:
        """Never deliver these messages until released (see engine.queue.surgery)."""
        self._check_process()
        return self.surgery.hold(ids, self._clock() if now is None else now, progress=progress)

    def release_held(self, ids: Iterable[int], now: float | None = None,
                     progress: Progress | None = None) -> int:
        """Take messages off hold: each recipient due at its own retry time."""
        self._check_process()
        return self.surgery.release(ids, self._clock() if now is None else now, progress=progress)

    def requeue(self, ids: Iterable[int], now: float | None = None,
                progress: Progress | None = None) -> int:
        """Every unfinished recipient of these messages due now (released if held)."""
        self._check_process()
        return self.surgery.release(ids, self._clock() if now is None else now, requeue=True,
                                    progress=progress)

    def delete(self, ids: Iterable[int], deleted: list[int] | None = None,
               progress: Progress | None = None) -> int:
        """Remove these messages, no bounce; space freed as at completion
        (the ids of those removed appended to `deleted`, if given)."""
        self._check_process()
        return self.surgery.delete(ids, deleted, progress)

    def surgery_generation(self) -> int:
        """Incremented by every hold/release/requeue/delete transaction: a
        scheduler holding due work in memory re-reads the spool when it moves."""
        return self.index.surgery_generation()

    def quarantined(self) -> list[str]:
        """Names of quarantined items (one .info file per message)."""
        return self.repair.quarantined()


@contextmanager
def owners_spool(queue_dir: Path | str, settings: SpoolSettings | None = None, *,
                 readonly: bool = False) -> Iterator[Spool]:
    """The spool at `queue_dir`, opened, used and closed as the directory's
    owner (engine.privilege.acting_as_owner): a root tool (qstat, hold, doctor)
    never opens, as root, a file the run user could have swapped for a link
    (LMDB writes lock.mdb). Opening raises as Spool() does."""
    from engine.privilege import acting_as_owner
    with acting_as_owner(queue_dir):
        spool = Spool(queue_dir, settings, readonly=readonly)
        try:
            yield spool
        finally:
            spool.close()
