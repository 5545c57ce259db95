"""Group commit: many concurrent enqueues share each fsync.

This module owns the batching only, as a two-stage pipeline of threads:

    requests ──▶ [write stage]  takes every request that arrived while it was
                                busy, as one batch: `prepare(batch)` appends it
                                to the segment and fdatasyncs it (one sync)
             ──▶ [index stage]  takes every prepared batch that is ready and
                                commits them all with `index(prepared)` (one
                                LMDB transaction = the commit point), then
                                resolves the callers' futures

So at most one segment sync and one index commit are in flight per process,
and the two overlap: while batch N is being committed to the index, batch
N+1 is already being written and synced. A slower disk makes batches bigger
instead of making messages wait a whole extra commit cycle. Batches are
indexed in the order they were prepared.

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
    """A batch written and synced by the write stage, waiting for the index."""
    __slots__ = ("requests", "ids", "token")

    def __init__(self, requests: Sequence[CommitRequest], ids: Sequence[int], token: Any):
        self.requests = requests
        self.ids = ids
        self.token = token


# prepare(batch) -> (ids, token); index([token, ...]) -> None. Either raises to
# fail its batch(es): every caller of a failed batch gets the exception.
PrepareFunction = Callable[[Sequence[CommitRequest]], tuple[Sequence[int], Any]]
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


class GroupCommitter:
    """Two threads: the write stage and the index stage (see module doc)."""

    def __init__(self, prepare: PrepareFunction, index: IndexFunction,
                 max_messages: int, max_bytes: int, pipeline: bool = True):
        self._prepare = prepare
        self._index = index
        self._max_messages = max(1, max_messages)
        self._max_bytes = max(1, max_bytes)
        self._requests: queue.SimpleQueue[CommitRequest | None] = queue.SimpleQueue()
        self._prepared: queue.SimpleQueue[Prepared | None] = queue.SimpleQueue()
        self._closed = False
        self._pipeline = pipeline
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._run_write, name="spool-write", daemon=True)
        self._indexer = threading.Thread(target=self._run_index, name="spool-index",
                                         daemon=True)
        self._writer.start()
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
        self._indexer.join()

    def _run_write(self) -> None:
        stop = False
        while not stop:
            first = self._requests.get()
            if first is None:
                break
            batch = [first]
            size = len(first.message)
            while len(batch) < self._max_messages and size < self._max_bytes:
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
                size += len(more.message)
            try:
                ids, token = self._prepare(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                _fail(batch, exc)
                continue
            if self._pipeline:
                self._prepared.put(Prepared(batch, ids, token))
            else:  # one stage: this thread indexes too (for measurement)
                self._index_ready([Prepared(batch, ids, token)])
        self._prepared.put(None)

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
        try:
            self._index([p.token for p in ready])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            for p in ready:
                _fail(p.requests, exc)
            return
        if len(ready) == 1:
            _settle(ready[0].requests, ready[0].ids, None)
        else:
            _settle([r for p in ready for r in p.requests],
                     [msgid for p in ready for msgid in p.ids], None)
