"""Group commit: many concurrent enqueues share one fsync.

This module owns the batching only. A single committer thread per process
takes every request that arrived while the previous batch was syncing and
hands them, as one batch, to a commit function (the spool's segment write +
fdatasync + one LMDB transaction). So at most one sync is in flight per
process and the batch grows exactly as fast as the disk is slow: a slower
fsync means bigger batches, not fewer messages per second.

Blocking callers wait on a `concurrent.futures.Future`; asyncio callers wrap
the same future (`asyncio.wrap_future`), so the event loop keeps serving
while the thread syncs.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence


class CommitRequest:
    __slots__ = ("envelope", "message", "future")

    def __init__(self, envelope: Any, message: bytes):
        self.envelope = envelope
        self.message = message
        self.future: Future[int] = Future()


CommitFunction = Callable[[Sequence[CommitRequest]], None]


class GroupCommitter:
    """Collects requests into batches for `commit`, one batch at a time.

    `commit(batch)` must resolve every request's future (result or exception).
    If it raises instead, every unresolved future of the batch gets that
    exception, so no caller ever waits forever.
    """

    def __init__(self, commit: CommitFunction, max_messages: int, max_bytes: int,
                 on_error: Callable[[BaseException], None] | None = None):
        self._commit = commit
        self._max_messages = max(1, max_messages)
        self._max_bytes = max(1, max_bytes)
        self._on_error = on_error
        self._requests: queue.SimpleQueue[CommitRequest | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="spool-committer", daemon=True)
        self._thread.start()

    def put(self, envelope: Any, message: bytes) -> Future[int]:
        request = CommitRequest(envelope, message)
        with self._lock:
            if self._closed:
                raise RuntimeError("spool is closed")
            self._requests.put(request)
        return request.future

    def close(self) -> None:
        """Commit everything already submitted, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._requests.get()
            if first is None:
                return
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
                self._commit(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                if self._on_error is not None:
                    self._on_error(exc)
