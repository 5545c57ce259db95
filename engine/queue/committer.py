"""Group commit: many concurrent enqueues share each fsync.

This module owns the batching only, as a pipeline of threads:

    requests ──▶ [write stage]   waits for a free sync slot, then takes every
                                 request that arrived meanwhile as one batch:
                                 `prepare(batch)` appends it to the segment
             ──▶ [sync slots]    `sync(token)` fdatasyncs it; up to
                                 `sync_depth` syncs run at once, each started
                                 as soon as its batch is written
             ──▶ [index stage]   takes every synced batch, in the order they
                                 were written, and commits them all with
                                 `index(tokens)` (one LMDB transaction)

When a caller hears (`ack_after_index`):
- False (default): as soon as its batch's sync is done. The segment then
  holds the message and its envelope, durably, and the index follows; a
  crash before the index commit leaves the message in an unsealed segment
  past the end the index knows, where the spool's next open finds it (see
  engine.queue, C2). A caller waits for one sync, never for a sync that
  started before its message was written nor for the index.
- True: after the index commit too (one more sync on its path).

The index never points at bytes whose sync has not finished, and batches
are indexed in order, so the index knows a prefix of each segment.

If an index commit fails, the callers still waiting for it (`ack_after_index`,
or `put(wait_index=True)`) get the error, as callers of a failed prepare or
sync do. Batches with callers already answered must not lose their message:
they are kept and retried (`retry_seconds`, doubling to 10 s), and meanwhile
new requests fail at once (the receiver answers 451) instead of piling up.
Batches nobody was answered for are dropped (their bytes stay unindexed).

Blocking callers wait on a `concurrent.futures.Future`. asyncio callers get
an asyncio future of their own loop; the futures of one batch are settled
with ONE `call_soon_threadsafe` per loop (not one wake-up per message), so
the event loop keeps serving and pays one wake-up per commit.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

log = logging.getLogger("qrelay.queue")

RETRY_MAX = 10.0


class CommitRequest:
    __slots__ = ("envelope", "message", "future", "loop", "after_index")

    def __init__(self, envelope: Any, message: bytes,
                 loop: asyncio.AbstractEventLoop | None = None, after_index: bool = False):
        self.envelope = envelope
        self.message = message
        self.loop = loop
        self.after_index = after_index  # answered after the index commit
        # an asyncio future (settled on its loop) or a thread-safe one
        self.future: Future[int] | asyncio.Future[int] = \
            loop.create_future() if loop is not None else Future()


class Prepared:
    """A batch written by the write stage, on its way through sync and index."""
    __slots__ = ("seq", "requests", "ids", "token", "synced")

    def __init__(self, seq: int, requests: Sequence[CommitRequest], ids: Sequence[int],
                 token: Any):
        self.seq = seq
        self.requests = requests
        self.ids = ids
        self.token = token
        self.synced = False


# prepare(batch) -> (ids, token) writes the batch; sync(token) makes it
# durable (called from up to sync_depth threads at once); index([token, ...])
# gets every written batch in order, synced or not (a token must tell which:
# a failed batch's messages are not indexed, but what else it carries, e.g.
# segments to seal, still counts). Each raises to fail its batch(es).
PrepareFunction = Callable[[Sequence[CommitRequest]], tuple[Sequence[int], Any]]
SyncFunction = Callable[[Any], None]
IndexFunction = Callable[[Sequence[Any]], None]


def _settle_on_loop(outcomes: list[tuple[asyncio.Future, int | None,
                                         BaseException | None]]) -> None:
    # runs in the event loop thread
    for future, result, exc in outcomes:
        if future.done():  # the awaiting task was cancelled
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


def _settle(requests: Sequence[CommitRequest], results: Sequence[int] | None,
            exc: BaseException | None) -> None:
    """Resolve every request: results[i] for request i, or exc for all."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for i, r in enumerate(requests):
        result = results[i] if results is not None else None
        if r.loop is not None:
            by_loop.setdefault(r.loop, []).append((r.future, result, exc))
        elif not r.future.done():
            if exc is not None:
                r.future.set_exception(exc)
            else:
                r.future.set_result(result)
    for loop, outcomes in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_on_loop, outcomes)
        except RuntimeError:
            pass  # that loop is closed: nobody is waiting any more


def _fail(requests: Sequence[CommitRequest], exc: BaseException) -> None:
    _settle(requests, None, exc)


def _settle_some(p: Prepared, which: Callable[[CommitRequest], bool],
                 exc: BaseException | None = None) -> None:
    """Answer the requests of `p` that `which` picks: their ids, or exc."""
    picked = [i for i, r in enumerate(p.requests) if which(r)]
    if len(picked) == len(p.requests):
        _settle(p.requests, None if exc else p.ids, exc)
    elif picked:
        _settle([p.requests[i] for i in picked], None if exc else [p.ids[i] for i in picked],
                exc)


class GroupCommitter:
    """The write stage, `sync_depth` sync threads and the index stage (see module doc)."""

    def __init__(self, prepare: PrepareFunction, sync: SyncFunction, index: IndexFunction,
                 max_messages: int, max_bytes: int, *, sync_depth: int = 4,
                 ack_after_index: bool = False, retry_seconds: float = 0.5):
        self._prepare = prepare
        self._sync = sync
        self._index = index
        self._max_messages = max(1, max_messages)
        self._max_bytes = max(1, max_bytes)
        self._ack_after_index = ack_after_index
        self._retry = max(0.01, retry_seconds)
        self._requests: queue.SimpleQueue[CommitRequest | None] = queue.SimpleQueue()
        self._to_sync: queue.SimpleQueue[Prepared | None] = queue.SimpleQueue()
        self._slots = threading.Semaphore(max(1, sync_depth))
        # synced (or failed) batches by sequence number, for the index stage
        self._done: dict[int, Prepared] = {}
        self._done_cond = threading.Condition()
        self._written = 0           # batches handed to the sync slots
        self._index_error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run_write, name="spool-write",
                                          daemon=True),
                         threading.Thread(target=self._run_index, name="spool-index",
                                          daemon=True)]
        self._syncers = [threading.Thread(target=self._run_sync, name=f"spool-sync-{i}",
                                          daemon=True) for i in range(max(1, sync_depth))]
        try:
            for t in self._threads + self._syncers:
                t.start()
        except RuntimeError:
            # No thread to be had (the user's process limit counts threads):
            # the ones started end instead of waiting for ever, then it is raised.
            self._closed = True
            self._requests.put(None)
            for _ in self._syncers:
                self._to_sync.put(None)
            raise

    def put(self, envelope: Any, message: bytes, loop: asyncio.AbstractEventLoop | None = None,
            wait_index: bool = False) -> Future[int] | asyncio.Future[int]:
        """Queue a request; with `loop` (the caller's running loop) the
        returned future is an asyncio future of that loop. `wait_index`:
        answer after the index commit even if `ack_after_index` is off."""
        request = CommitRequest(envelope, message, loop, wait_index or self._ack_after_index)
        with self._lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            self._requests.put(request)
        return request.future

    def close(self) -> bool:
        """Commit everything already submitted, then stop every thread.
        False if some answered batches could not be indexed (they stay in
        their segment, for the next open to index)."""
        with self._lock:
            if self._closed:
                return self._index_error is None
            self._closed = True
            self._requests.put(None)
        self._threads[0].join()
        for _ in self._syncers:
            self._to_sync.put(None)
        for t in self._syncers:
            t.join()
        with self._done_cond:
            self._done_cond.notify_all()
        self._threads[1].join()
        return self._index_error is None

    def _next_batch(self) -> tuple[list[CommitRequest], bool]:
        """Every request that arrived while the stage was busy (within the
        limits), and whether close() was asked for."""
        first = self._requests.get()
        if first is None:
            return [], True
        batch = [first]
        size = len(first.message)
        while len(batch) < self._max_messages and size < self._max_bytes:
            try:
                more = self._requests.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.append(more)
            size += len(more.message)
        return batch, False

    def _run_write(self) -> None:
        stop = False
        while not stop:
            # The last batch is not kept (its messages) while the next is awaited.
            batch = token = p = None
            # A free slot first: while every slot syncs, requests pile up
            # into the next batch instead of each waiting for a slot.
            self._slots.acquire()
            batch, stop = self._next_batch()
            if not batch:
                self._slots.release()
                break
            exc = self._index_error
            if exc is not None:  # refused until answered batches are indexed
                self._slots.release()
                _fail(batch, exc)
                continue
            try:
                ids, token = self._prepare(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                self._slots.release()
                _fail(batch, exc)
                continue
            p = Prepared(self._written, batch, ids, token)
            self._written += 1
            self._to_sync.put(p)

    def _run_sync(self) -> None:
        while True:
            p = self._to_sync.get()
            if p is None:
                return
            try:
                self._sync(p.token)
                p.synced = True
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                _fail(p.requests, exc)
            finally:
                self._slots.release()
            if p.synced:
                _settle_some(p, lambda r: not r.after_index)
            with self._done_cond:
                self._done[p.seq] = p
                self._done_cond.notify()
            del p       # the index stage has it: not kept while the next is awaited

    def _run_index(self) -> None:
        next_seq = 0
        pending: list[Prepared] = []   # synced, in order, not yet indexed
        delay = self._retry
        while True:
            waiting = synced = None     # requests of batches done with: not kept while waiting
            with self._done_cond:
                while next_seq not in self._done and not pending:
                    if self._closed and not self._threads[0].is_alive() \
                            and next_seq >= self._written:
                        return
                    self._done_cond.wait(0.5)
                while next_seq in self._done:
                    pending.append(self._done.pop(next_seq))
                    next_seq += 1
            try:
                self._index([p.token for p in pending])
            except BaseException as exc:  # noqa: BLE001 - retried or handed to waiters
                synced = [p for p in pending if p.synced]
                for p in synced:
                    _settle_some(p, lambda r: r.after_index, exc)
                if not any(not r.after_index for p in synced for r in p.requests):
                    pending = []  # nobody heard of these: they are garbage (C2)
                    continue
                if self._index_error is None:
                    log.warning("warning: cannot commit to spool index, refusing new mail "
                                "until it works again: %s", exc)
                self._index_error = exc
                if self._closed and not self._threads[0].is_alive():
                    log.warning("warning: %d message(s) left unindexed at close; the next "
                                "start indexes them from their segment",
                                sum(len(p.ids) for p in synced))
                    return
                with self._done_cond:
                    self._done_cond.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            if self._index_error is not None:
                log.warning("warning: spool index works again")
                self._index_error = None
            delay = self._retry
            # the callers waiting for the index: one wake-up per event loop for all
            waiting = [(r, msgid) for p in pending if p.synced
                       for r, msgid in zip(p.requests, p.ids) if r.after_index]
            if waiting:
                _settle([r for r, _ in waiting], [msgid for _, msgid in waiting], None)
            pending = []
