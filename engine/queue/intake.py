"""Intake: taking new messages in — enqueue/submit, group commit, the
commit point.

`Intake` is the part of a Spool (engine.queue.spool) that adds messages: it
owns this process's current segment writer, the message id block and the
GroupCommitter (engine.queue.committer) whose three stages are its
`write_stage`, `sync_stage` and `index_stage` (steps 1–4 and crash states
C1–C4, C9, C11 of engine/queue/__init__.py). Every failure reaches the
caller as SpoolWriteError (a 451 for SMTP): the segment I/O's own, and the
index's through SpoolIndex.write(error=SpoolWriteError). It never changes
a message once indexed (engine.queue.ledger does).
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterable, Sequence

import lmdb

from engine.config.settings import SpoolSettings
from engine.queue import records as R
from engine.queue.committer import CommitRequest, GroupCommitter
from engine.queue.core import SpoolCore
from engine.queue.records import EnvelopeRecord, RecordError, SegmentRecord
from engine.queue.segments import ENV_MAGIC, FILE_HEADER, SegmentIO, SegmentWriter, encode_record
from engine.queue.values import Envelope, SpoolError, SpoolWriteError


@dataclass(slots=True)
class PreparedBatch:
    """A batch written to a segment, on its way through sync and index."""
    items: list[tuple[Envelope, bytes]]
    ids: list[int]
    writer: SegmentWriter     # the segment it is in
    offsets: list[int]        # of each message's QMSG record
    end: int                  # segment offset after the batch
    now: float
    seal: list[int]           # segments to seal when this batch is committed
    failed: bool = False      # its sync failed: index none of it


class Intake:
    """New messages into one open spool. `started`: when this process
    (core.pid) started, in clock ticks since boot; the pair names this
    writer in the segment records it registers."""

    def __init__(self, core: SpoolCore, settings: SpoolSettings, io: SegmentIO, started: int):
        self._core = core
        self._index = core.index
        self._settings = settings
        self._io = io
        self._started = started
        self._sync_depth = min(64, max(1, settings.sync_depth))
        self._committer: GroupCommitter | None = None
        self._committer_lock = threading.Lock()
        self._writer: SegmentWriter | None = None
        # Segments the write stage rotated away from, to seal with the next
        # batch it hands on (indexed in order, so after all their batches).
        self._seal_after_write: list[int] = []
        self._next_id = 0
        self._id_limit = 0

    @property
    def segment(self) -> int | None:
        """The segment this process writes to now, if any."""
        w = self._writer
        return w.segid if w is not None else None

    def close(self) -> None:
        """Commit what was submitted, seal this process's segments."""
        indexed = self._committer.close() if self._committer is not None else True
        seal = self._seal_after_write
        if self._writer is not None:
            seal.append(self._writer.segid)
            self._writer.close()
            self._writer = None
        # Answered messages the index could not take stay in unsealed
        # segments, where the next open finds them (C2).
        if not (seal and indexed):
            return
        try:
            with self._index.write("seal segments on close") as txn:
                unlink = self._seal_segments(txn, seal)
        except SpoolError as exc:
            self._core.warn(f"warning: {exc}")
            return
        self._core.files.remove(unlink)

    # ---------------------------------------------------------------- taking requests

    def put(self, envelope: Envelope, message: bytes,
            loop: asyncio.AbstractEventLoop | None = None,
            wait_index: bool = False) -> "Future[int] | asyncio.Future[int]":
        """Hand a message to the group commit; the future says its id."""
        try:
            return self._get_committer().put(envelope, bytes(message), loop, wait_index)
        except RuntimeError:  # closed by another thread meanwhile
            raise SpoolError("spool is closed") from None

    def _get_committer(self) -> GroupCommitter:
        committer = self._committer
        if committer is not None:
            return committer
        with self._committer_lock:  # threads racing to the first enqueue
            if self._committer is None:
                self._committer = GroupCommitter(
                    self._prepare_requests, self.sync_stage, self.index_stage,
                    self._settings.max_batch_messages, self._settings.max_batch_bytes,
                    sync_depth=self._sync_depth,
                    ack_after_index=self._settings.ack_after_index)
            return self._committer

    def write_batch(self, items: Sequence[tuple[Envelope, bytes]]) -> list[int]:
        """Every commit stage in the caller's thread: a bulk path for loaders and
        benchmarks. Must not run concurrently with put."""
        prepared = self.write_stage(items)
        self.sync_stage(prepared)
        self.index_stage([prepared])
        return prepared.ids

    # ---------------------------------------------------------------- ids and segments

    def _take_ids(self, n: int) -> int:
        """First of n consecutive fresh ids (ids come from the index counter in blocks)."""
        if self._next_id + n > self._id_limit:
            block = max(n, self._settings.id_block)
            meta = self._index.dbs[b"meta"]
            with self._index.write("allocate message ids", SpoolWriteError) as txn:
                first = R.read_u64(txn.get(b"next_id", db=meta))
                txn.put(b"next_id", R.u64(first + block), db=meta)
            self._next_id, self._id_limit = first, first + block
        first = self._next_id
        self._next_id += n
        return first

    def _writer_for(self, nbytes: int, now: float) -> SegmentWriter:
        w = self._writer
        if w is not None and not w.broken and (
                w.size + nbytes <= self._settings.segment_bytes or w.size <= 64) \
                and now - w.created < self._settings.segment_max_age:
            return w
        if w is not None:
            self._seal_after_write.append(w.segid)
            w.close()
            self._writer = None
        segid = self._take_ids(1)
        try:
            writer = SegmentWriter(self._core.files.directory, segid, self._io, now,
                                   self._sync_depth)
        except OSError as exc:
            raise SpoolWriteError(f"cannot create spool segment: {exc.strerror or exc}") from None
        # Known to the index, durably (meta page too), before anything in it
        # is acknowledged: only known, unsealed segments have their tails
        # indexed after a crash.
        try:
            with self._index.write("register a spool segment", SpoolWriteError) as txn:
                record = SegmentRecord(0, False, self._core.pid, now, FILE_HEADER.size,
                                       self._started)
                txn.put(R.u64(segid), record.encode(), db=self._index.dbs[b"segments"])
            self._index.sync("register a spool segment", SpoolWriteError)
        except SpoolWriteError:
            writer.close()
            self._core.files.remove([segid])
            raise
        self._writer = writer
        return writer

    def _seal_segments(self, txn: lmdb.Transaction, segids: Iterable[int]) -> list[int]:
        """Mark segments this process moved away from as sealed (inside txn).
        Returns those now empty, to remove after the commit."""
        unlink = []
        segdb = self._index.dbs[b"segments"]
        for segid in segids:
            key = R.u64(segid)
            raw = txn.get(key, db=segdb)
            try:
                seg = SegmentRecord.decode(raw) if raw is not None else None
            except RecordError:
                seg = None
            if seg is None or seg.live <= 0:
                txn.delete(key, db=segdb)
                unlink.append(segid)
            else:
                txn.put(key, dataclasses.replace(seg, sealed=True).encode(), db=segdb)
        return unlink

    # ---------------------------------------------------------------- the three stages

    def _prepare_requests(self, batch: Sequence[CommitRequest]) -> tuple[list[int],
                                                                          PreparedBatch]:
        prepared = self.write_stage([(r.envelope, r.message) for r in batch])
        return prepared.ids, prepared

    def write_stage(self, items: Sequence[tuple[Envelope, bytes]]) -> PreparedBatch:
        """Step 1: ids, one pwrite of all records (synced by sync_stage)."""
        now = self._core.clock()
        for env, _msg in items:
            if env.origin not in R.ORIGIN_CODES:
                raise SpoolError(f"unknown origin {env.origin!r}")
        first = self._take_ids(len(items))
        ids = list(range(first, first + len(items)))
        # Per message: its envelope record, then its bytes (the index points
        # at the second; the first is for re-indexing, see segments.scan).
        envs, msgs = [], []
        for msgid, (e, msg) in zip(ids, items):
            envs.append(encode_record(msgid, EnvelopeRecord(now, e.pid, e.uid, e.origin, e.sender,
                                                            tuple(e.recipients)).encode(),
                                      ENV_MAGIC))
            msgs.append(encode_record(msgid, msg))
        data = b"".join(part for pair in zip(envs, msgs) for part in pair)
        writer = self._writer_for(len(data), now)
        try:
            base = writer.write(data)
        except OSError as exc:
            self._drop_broken_writer()
            raise SpoolWriteError(f"cannot write to spool: {exc.strerror or exc}") from None
        offsets = []
        offset = base
        for env_rec, msg_rec in zip(envs, msgs):
            offsets.append(offset + len(env_rec))
            offset += len(env_rec) + len(msg_rec)
        # Segments this stage moved away from are sealed by the index
        # transaction that commits this batch: by then every batch written
        # to them has been indexed (batches are indexed in order).
        seal, self._seal_after_write = self._seal_after_write, []
        return PreparedBatch(list(items), ids, writer, offsets, offset, now, seal)

    def _drop_broken_writer(self) -> None:
        w = self._writer
        if w is not None and w.broken:  # the next batch starts a new segment
            self._seal_after_write.append(w.segid)
            w.close()
            self._writer = None

    def sync_stage(self, batch: PreparedBatch) -> None:
        """Steps 2–3 (one of the committer's sync threads): one fdatasync
        makes the batch's records durable — the commit point. A failed batch
        is still handed to the index stage, which then indexes none of it;
        the write stage starts a new segment (the writer is broken)."""
        try:
            batch.writer.sync()
        except OSError as exc:
            batch.failed = True
            raise SpoolWriteError(f"cannot sync spool segment: {exc.strerror or exc}") from None

    def index_stage(self, batches: Sequence[PreparedBatch]) -> None:
        """Step 4: ONE index transaction for the batches written since the
        last one, in order (a failed one only passes on its seals)."""
        seal = list(dict.fromkeys(segid for b in batches for segid in b.seal))
        dbs = self._index.dbs
        try:
            with self._index.write("commit to spool index", SpoolWriteError) as txn:
                for b in batches:
                    if b.failed:
                        continue
                    for msgid, (envelope, message), offset in zip(b.ids, b.items, b.offsets):
                        self._index.add_message(txn, msgid, envelope, message, b.writer.segid,
                                                offset, b.now)
                    segkey = R.u64(b.writer.segid)
                    raw = txn.get(segkey, db=dbs[b"segments"])
                    seg = SegmentRecord.decode(raw) if raw is not None else SegmentRecord(
                        0, False, self._core.pid, b.writer.created, -1, self._started)
                    txn.put(segkey, dataclasses.replace(seg, live=seg.live + len(b.ids),
                                                        end=max(seg.end, b.end)).encode(),
                            db=dbs[b"segments"])
                unlink = self._seal_segments(txn, seal)
        except RecordError as exc:  # a record too large to encode, a corrupt segment record
            raise SpoolWriteError(f"cannot commit to spool index: {exc}") from None
        self._core.files.remove(unlink)
