"""The embedded relay table's writes, off the event loop, and when they reach
the disk.

One thread per process takes every write of the table (a POP3 login's grant,
revokes, the login-failure counters, imports): what was submitted while it
was busy goes into ONE LMDB write transaction and one commit, so logins that
arrive together share LMDB's writer mutex (one for every process of the box)
instead of queueing on it one by one, and the event loop only queues and
awaits — it never waits for the mutex, the commit's writes or a sync.

Durability — what a POP-before-SMTP grant needs. vpopmail's open-smtp and
relay-ctrl's files were never fsync'd: a grant lost to a power cut only means
the customer's client logs in again. So commits do not fsync (MDB_NOSYNC) and
a second thread syncs the file (env.sync, outside the writer mutex) at most
`[relay] sync_seconds` after a write — a thread of its own, so that a slow
disk delays the sync, never the grants committed meanwhile. A process crash
loses nothing (the commit is in the page cache). A machine crash may lose the
last second of grants, and — LMDB's own warning for NOSYNC — the file may
then be torn (a meta page on disk pointing at pages that are not). A torn
table must never be read, so:

  - before the first write after a sync, the file `unsynced` (the boot id) is
    made durable, under the writer mutex;
  - a sync that saw no commit meanwhile removes it (under the mutex too);
  - at open, an `unsynced` written during an earlier boot means the machine
    stopped with writes not on disk: the table is set aside and starts empty
    (`unsynced_from_earlier_boot`).

That costs one small fsync'd file per sync period, instead of an fdatasync
per commit inside the mutex every process shares (LMDB's NOMETASYNC, which
keeps integrity by itself: 0.5 ms median, 4 ms p90 on this VM's disk).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

from engine.accounts.files import atomic_write

log = logging.getLogger("qrelay.relay")

MARKER = "unsynced"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id (Linux); "" where there is none."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def unsynced_from_earlier_boot(path: Path) -> bool:
    """True if the table in `path` had writes not yet on disk when the machine
    last stopped (see the module docstring): it must not be read."""
    try:
        written = (path / MARKER).read_text().strip()
    except OSError:     # none (or unreadable: no evidence of a crash either)
        return False
    return written != boot_id()


def _settle(future: Any, outcome: tuple[BaseException | None, Any]) -> None:
    if future.done():         # the caller was cancelled meanwhile
        return
    if outcome[0] is not None:
        future.set_exception(outcome[0])
    else:
        future.set_result(outcome[1])


def _settle_all(settled: list) -> None:
    for future, outcome in settled:
        _settle(future, outcome)


class TxnWriter:
    """The writer thread of one table in one process.

    `transact(works)` (the table's) runs in the thread: it gets the batch of
    work functions, runs them in one write transaction and returns one
    (exception or None, result) per work. `env()` gives the process's
    environment (for the sync)."""

    def __init__(self, path: Path, sync_seconds: float,
                 transact: Callable[[list[Any]], list[tuple[BaseException | None, Any]]],
                 env: Callable[[], lmdb.Environment | None]) -> None:
        self.path = Path(path)
        self._marker = str(self.path / MARKER)
        self.sync_seconds = sync_seconds
        self._transact = transact
        self._env = env
        self._pid = 0
        self._thread: threading.Thread | None = None
        self.last_sync = 0.0            # monotonic time of the last sync done
        self.batches = 0                # write transactions run (tests, figures)

    # --- the loop's side -------------------------------------------------------------

    async def run(self, work: Any) -> Any:
        """Run `work` in the next write transaction; its result or exception."""
        future = asyncio.get_running_loop().create_future()
        self._enqueue(work, future)
        return await future

    def submit(self, work: Any) -> concurrent.futures.Future:
        """`run` without an event loop."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._enqueue(work, future)
        return future

    def _enqueue(self, work: Any, future: Any) -> None:
        self._started()
        with self._cond:
            self._queue.append((work, future))
            self._cond.notify()

    def _started(self) -> None:
        pid = os.getpid()
        if self._pid != pid:
            # First use, or a child forked from a parent that used the table:
            # the parent's threads, queue and locks (perhaps held) are not ours.
            self._pid = pid
            self._cond = threading.Condition()
            self._queue: list[tuple[Any, Any]] = []
            self._stopping = False
            self._sync_cond = threading.Condition()
            self._sync_due: float | None = None     # when the syncer syncs next (None: clean)
            self._sync_stopping = False
            self._thread = None
            self._syncer: threading.Thread | None = None
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._main, name="relay-writer", daemon=True)
            self._thread.start()
        if self._syncer is None or not self._syncer.is_alive():
            self._sync_stopping = False
            self._syncer = threading.Thread(target=self._sync_main, name="relay-sync", daemon=True)
            self._syncer.start()

    def stop(self) -> None:
        """Finish what was submitted, sync, and end the threads (blocks)."""
        if self._pid != os.getpid() or self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._thread = None
        if self._syncer is not None:
            with self._sync_cond:
                self._sync_stopping = True
                self._sync_cond.notify()
            self._syncer.join()
            self._syncer = None

    # --- the threads -------------------------------------------------------------------

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                stopping = self._stopping
            if batch:
                self._run(batch)
                with self._sync_cond:
                    if self._sync_due is None:
                        self._sync_due = time.monotonic() + self.sync_seconds
                        self._sync_cond.notify()
            if stopping and not batch:
                return

    def _sync_main(self) -> None:
        """Sync `sync_seconds` after the first write since the last sync; at
        stop, once more if anything was written since."""
        while True:
            with self._sync_cond:
                while not self._sync_stopping:
                    if self._sync_due is not None:
                        wait = self._sync_due - time.monotonic()
                        if wait <= 0:
                            break
                        self._sync_cond.wait(wait)
                    else:
                        self._sync_cond.wait()
                due, stopping = self._sync_due, self._sync_stopping
                self._sync_due = None
            if due is not None:
                self._sync()
            if stopping:
                return

    def _run(self, batch: list[tuple[Any, Any]]) -> None:
        try:
            outcomes = self._transact([work for work, _ in batch])
        except BaseException as exc:     # the whole transaction failed; every caller hears it
            outcomes = [(exc, None)] * len(batch)
        self.batches += 1
        # One wake-up per event loop for the whole batch (not one per login).
        by_loop: dict[Any, list] = {}
        for (_, future), outcome in zip(batch, outcomes):
            if isinstance(future, concurrent.futures.Future):
                _settle(future, outcome)
            else:
                by_loop.setdefault(future.get_loop(), []).append((future, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, settled)
            except RuntimeError:     # that loop has closed: nobody waits any more
                pass

    def _sync(self) -> None:
        env = self._env()
        if env is None:
            return
        try:
            with env.begin() as txn:
                before = txn.id()
            env.sync(True)
            self.last_sync = time.monotonic()
            # No commit since `before`: all is on disk, the marker may go.
            # Under the writer mutex, so no writer is between its check of
            # the marker and its first page.
            txn = env.begin(write=True)
            try:
                if txn.id() == before + 1:
                    (self.path / MARKER).unlink(missing_ok=True)
            finally:
                txn.abort()
        except (lmdb.Error, OSError) as exc:
            log.warning("relay table %s: sync failed (%s); trying again in %g s",
                        self.path, exc, self.sync_seconds)
            with self._sync_cond:
                if self._sync_due is None and not self._sync_stopping:
                    self._sync_due = time.monotonic() + self.sync_seconds

    def mark_unsynced(self) -> None:
        """Make `unsynced` durable if it is not there (called by `transact`
        under the writer mutex, before the transaction writes a page)."""
        try:
            os.stat(self._marker)     # a str: pathlib's `/` and exists() cost 15 us here
            return
        except FileNotFoundError:
            pass
        # 0644: the run user's processes read it at open, a root CLI may write it.
        atomic_write(self.path / MARKER, (boot_id() + "\n").encode(), mode=0o644)
