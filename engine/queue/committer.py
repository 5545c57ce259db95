"""Group commit: many concurrent enqueues share each fsync.

This module owns the batching only, as a pipeline of two threads:

    requests ──▶ [write stage]  takes every request that arrived while it was
                                busy, as one batch: `prepare(batch)` appends it
                                to the segment, `sync(token)` fdatasyncs it
             ──▶ [index stage]  takes every written batch that is ready and
                                commits them all with `index(tokens)` (one
                                LMDB transaction), then the callers' futures
                                are resolved

Two orders (`parallel`):
- serial: a batch goes to the index stage only after its sync, so the index
  never points at bytes that are not durable; a caller waits for the segment
  sync plus the index commit, one after the other.
- parallel (default): a batch goes to the index stage as soon as it is
  written, and the segment sync runs while the index commits it. A caller is
  answered when BOTH are done, so it waits for the slower of the two syncs,
  not their sum (on a disk with slow syncs, half the latency). If the sync
  fails after the index committed, `unindex(token)` takes the batch out
  again before its callers hear of the error.

Either way at most one segment sync and one index commit are in flight per
process, the stages overlap across batches (while batch N is indexed, batch
N+1 is written), and batches are indexed in the order they were written. A
slower disk makes batches bigger instead of making messages wait a whole
extra commit cycle.

Blocking callers wait on a `concurrent.futures.Future`. asyncio callers get
an asyncio future of their own loop; the futures of one batch are settled
with ONE `call_soon_threadsafe` per loop (not one wake-up per message), so
the event loop keeps serving and pays one wake-up per commit.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence


class CommitRequest:
    __slots__ = ("envelope", "message", "future", "loop")

    def __init__(self, envelope: Any, message: bytes,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.envelope = envelope
        self.message = message
        self.loop = loop
        # an asyncio future (settled on its loop) or a thread-safe one
        self.future: Future[int] | asyncio.Future[int] = \
            loop.create_future() if loop is not None else Future()


class Prepared:
    """A batch written by the write stage, on its way through sync and index.

    In parallel order the two stages finish it in either order; the one that
    finishes second settles its callers (under `lock`)."""
    __slots__ = ("requests", "ids", "token", "lock", "stages_left", "sync_error",
                 "index_error")

    def __init__(self, requests: Sequence[CommitRequest], ids: Sequence[int], token: Any,
                 stages_left: int):
        self.requests = requests
        self.ids = ids
        self.token = token
        self.lock = threading.Lock()
        self.stages_left = stages_left
        self.sync_error: BaseException | None = None
        self.index_error: BaseException | None = None


# prepare(batch) -> (ids, token) writes the batch; sync(token) makes it
# durable; index([token, ...]) commits batches to the index; unindex(token)
# takes a committed batch out again. prepare/sync/index raise to fail their
# batch(es): every caller of a failed batch gets the exception.
PrepareFunction = Callable[[Sequence[CommitRequest]], tuple[Sequence[int], Any]]
SyncFunction = Callable[[Any], None]
IndexFunction = Callable[[Sequence[Any]], None]
UnindexFunction = Callable[[Any], None]


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


class GroupCommitter:
    """Two threads: the write stage and the index stage (see module doc)."""

    def __init__(self, prepare: PrepareFunction, sync: SyncFunction, index: IndexFunction,
                 unindex: UnindexFunction, max_messages: int, max_bytes: int,
                 pipeline: bool = True, parallel: bool = True):
        self._prepare = prepare
        self._sync = sync
        self._index = index
        self._unindex = unindex
        self._max_messages = max(1, max_messages)
        self._max_bytes = max(1, max_bytes)
        self._requests: queue.SimpleQueue[CommitRequest | None] = queue.SimpleQueue()
        self._prepared: queue.SimpleQueue[Prepared | None] = queue.SimpleQueue()
        self._closed = False
        self._pipeline = pipeline
        self._parallel = pipeline and parallel
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._run_write, name="spool-write", daemon=True)
        self._writer.start()
        self._indexer = None
        if pipeline:
            self._indexer = threading.Thread(target=self._run_index, name="spool-index",
                                             daemon=True)
            self._indexer.start()

    def put(self, envelope: Any, message: bytes,
            loop: asyncio.AbstractEventLoop | None = None) -> Future[int] | asyncio.Future[int]:
        """Queue a request; with `loop` (the caller's running loop) the
        returned future is an asyncio future of that loop."""
        request = CommitRequest(envelope, message, loop)
        with self._lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            self._requests.put(request)
        return request.future

    def close(self) -> None:
        """Commit everything already submitted, then stop both threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._requests.put(None)
        self._writer.join()
        if self._indexer is not None:
            self._indexer.join()

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
            batch, stop = self._next_batch()
            if not batch:
                break
            try:
                ids, token = self._prepare(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                _fail(batch, exc)
                continue
            # the stages that must finish before its callers hear
            p = Prepared(batch, ids, token, 2 if self._parallel else 1)
            if self._parallel:
                self._prepared.put(p)  # indexed while we sync
                self._stage_done(p, "sync", self._call(self._sync, token))
                continue
            exc = self._call(self._sync, token)
            if exc is not None:
                _fail(batch, exc)
            elif self._pipeline:
                self._prepared.put(p)
            else:  # one stage: this thread indexes too (for measurement)
                self._index_ready([p])
        if self._indexer is not None:
            self._prepared.put(None)

    @staticmethod
    def _call(fn: Callable[[Any], None], arg: Any) -> BaseException | None:
        try:
            fn(arg)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            return exc
        return None

    def _run_index(self) -> None:
        stop = False
        while not stop:
            first = self._prepared.get()
            if first is None:
                return
            ready = [first]
            while True:
                try:
                    more = self._prepared.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                ready.append(more)
            self._index_ready(ready)

    def _index_ready(self, ready: Sequence[Prepared]) -> None:
        exc = self._call(self._index, [p.token for p in ready])
        settle = [p for p in ready if self._stage_done(p, "index", exc)]
        if len(settle) > 1:  # one wake-up per event loop for all of them
            _settle([r for p in settle for r in p.requests],
                    [msgid for p in settle for msgid in p.ids], None)
        elif settle:
            _settle(settle[0].requests, settle[0].ids, None)

    def _stage_done(self, p: Prepared, stage: str, exc: BaseException | None) -> bool:
        """Record one stage's outcome. When it is the last stage of `p`:
        fail the callers if a stage failed (taking an indexed batch out of
        the index first) and return False; return True if they are to be
        settled with their ids. In parallel order the sync stage settles a
        successful batch itself (the index stage finished first)."""
        with p.lock:
            if stage == "sync":
                p.sync_error = exc
            else:
                p.index_error = exc
            p.stages_left -= 1
            if p.stages_left > 0:
                return False
        if p.index_error is not None:
            _fail(p.requests, p.index_error)
            return False
        if p.sync_error is not None:
            self._call(self._unindex, p.token)  # logs its own failure
            _fail(p.requests, p.sync_error)
            return False
        if stage == "sync":
            _settle(p.requests, p.ids, None)
            return False
        return True
