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
from typing import Callable, Iterable, Sequence

import lmdb

from engine.config.settings import SpoolSettings
from engine.queue import records as R
from engine.queue.committer import CommitRequest, GroupCommitter
from engine.queue.core import SpoolCore
from engine.queue.records import EnvelopeRecord, RecordError, SegmentRecord
from engine.queue.segments import (ENV_MAGIC, FILE_HEADER, SegmentIO, SegmentWriter, encode_record,
                                   record_parts, record_size)
from engine.queue.values import (AddressTooLong, Envelope, ImportedMessage, SpoolError,
                                  SpoolWriteError)

# `imported` table values: the spool's id, then R (reserved: ids taken, segment
# maybe written, not yet indexed by the import), A (adopted: indexed from its
# segment by Repair, states not set) or D (indexed with its states).
_RESERVED, _DONE = R.IMPORT_RESERVED, R.IMPORT_DONE
_STATE_CODES = {name: code for code, name in R.STATE_NAMES.items()}


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
    births: list[float] | None = None   # per message (imports), else `now` for all


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
        """Hand a message to the group commit; the future says its id.
        AddressTooLong for an address the index cannot hold (a local user's
        `qrelay inject` of one would otherwise stop every commit after it)."""
        if why := R.oversized_address((envelope.sender, *envelope.recipients)):
            raise AddressTooLong(why)
        committer = self._get_committer()
        try:
            return committer.put(envelope, bytes(message), loop, wait_index)
        except RuntimeError:  # closed by another thread meanwhile
            raise SpoolError("spool is closed") from None

    def _get_committer(self) -> GroupCommitter:
        committer = self._committer
        if committer is not None:
            return committer
        with self._committer_lock:  # threads racing to the first enqueue
            if self._committer is None:
                try:
                    self._committer = GroupCommitter(
                        self._prepare_requests, self.sync_stage, self.index_stage,
                        self._settings.max_batch_messages, self._settings.max_batch_bytes,
                        sync_depth=self._sync_depth,
                        ack_after_index=self._settings.ack_after_index)
                except RuntimeError as exc:   # tried again with the next message
                    raise SpoolWriteError(f"cannot start the spool's commit threads: {exc}"
                                          ) from None
            return self._committer

    def write_batch(self, items: Sequence[tuple[Envelope, bytes]]) -> list[int]:
        """Every commit stage in the caller's thread: a bulk path for loaders and
        benchmarks. Must not run concurrently with put."""
        prepared = self.write_stage(items)
        self.sync_stage(prepared)
        self.index_stage([prepared])
        return prepared.ids

    # ---------------------------------------------------------------- imports

    def import_batch(self, items: Sequence[ImportedMessage],
                     forget: Iterable[bytes] = ()) -> list[int]:
        """Messages moved in from another queue, each with its birth and its
        recipients' states; returns their ids. A message whose `key` was
        imported before (a second run after a crash) is not written again:
        its id is returned. The order of writes makes that hold at every
        crash point: ids are reserved under the keys (one commit), the
        segment is written and synced, and ONE index transaction adds the
        messages, sets their states and marks the keys done. A crash after
        the sync leaves the messages for Repair.reindex or a scheduler's
        adopt_tails (as queued, todo), which mark their keys adopted: the
        next run sets the states of one still in todo, and keeps one a
        scheduler preprocessed or even delivered meanwhile (never writes it
        again). A key still reserved with no message: the write never made it.
        `forget`: keys of an earlier batch whose source is gone, dropped in
        the first transaction (three syncs a batch in all: look-up and
        reservation, segment, index)."""
        dbs = self._index.dbs
        out: list[int] = [0] * len(items)
        fresh: list[int] = []
        first = self._take_ids(len(items))   # those of keys seen before: a gap (ids may have)
        with self._index.write("look up imported messages", SpoolWriteError) as txn:
            for k in forget:
                txn.delete(k, db=dbs[b"imported"])
            for n, m in enumerate(items):
                raw = txn.get(m.key, db=dbs[b"imported"])
                if raw is None:
                    fresh.append(n)
                    continue
                msgid, flag = R.read_u64(raw[:8]), bytes(raw[8:9])
                if flag == _RESERVED and txn.get(R.u64(msgid), db=dbs[b"messages"]) is None:
                    txn.delete(R.reserved_import_key(msgid), db=dbs[b"imported"])
                    fresh.append(n)       # its segment write never made it
                    continue
                if flag != _DONE:         # indexed from its segment by a repair
                    if txn.get(R.u64(msgid), db=dbs[b"todo"]) is not None:
                        self._set_imported_states(txn, msgid, m)
                    txn.put(m.key, R.u64(msgid) + _DONE, db=dbs[b"imported"])
                out[n] = msgid
            ids = list(range(first, first + len(fresh)))
            for n, msgid in zip(fresh, ids):
                txn.put(items[n].key, R.u64(msgid) + _RESERVED, db=dbs[b"imported"])
                txn.put(R.reserved_import_key(msgid), items[n].key, db=dbs[b"imported"])
        if not fresh:
            return out
        batch = [items[n] for n in fresh]
        prepared = self.write_stage(
            [(Envelope(m.sender, tuple(r.address for r in m.recipients), m.pid, m.uid), m.data)
             for m in batch], births=[m.birth for m in batch], ids=ids)
        self.sync_stage(prepared)

        def states(txn: lmdb.Transaction) -> None:
            for msgid, m in zip(ids, batch):
                self._set_imported_states(txn, msgid, m)
                txn.put(m.key, R.u64(msgid) + _DONE, db=dbs[b"imported"])
                txn.delete(R.reserved_import_key(msgid), db=dbs[b"imported"])
        self.index_stage([prepared], also=states)
        for n, msgid in zip(fresh, ids):
            out[n] = msgid
        return out

    def _set_imported_states(self, txn: lmdb.Transaction, msgid: int,
                             m: ImportedMessage) -> None:
        """Give a just-indexed (todo) message its recipients' states. All
        "todo": left to the scheduler to preprocess. Otherwise classified:
        due entries for the unfinished, and with none left but failures
        the message waits for its bounce (the `bounces` table, C8)."""
        dbs = self._index.dbs
        if all(r.state == "todo" for r in m.recipients):
            return
        rec = self._index.message(txn, msgid)
        remaining = nfailed = 0
        for i, r in enumerate(m.recipients):
            state = _STATE_CODES.get(r.state)
            channel = R.CHANNEL_CODES.get(r.channel)
            if state is None or state == R.TODO or channel is None:
                raise SpoolError(f"imported recipient {r.address!r}: state {r.state!r} "
                                 f"on channel {r.channel!r}")
            unfinished = state in (R.PENDING, R.DEFERRED)
            txn.put(R.rcpt_key(msgid, i),
                    R.RecipientRecord(state, channel, int(state != R.PENDING),
                                      r.next_try if unfinished else 0.0, r.address,
                                      r.text).encode(), db=dbs[b"recipients"])
            if unfinished:
                txn.put(R.due_key(channel, r.next_try, msgid, i), b"", db=dbs[b"due"])
                remaining += 1
            nfailed += state == R.FAILED
        key = R.u64(msgid)
        txn.delete(key, db=dbs[b"todo"])
        if remaining == 0 and not nfailed:
            # Nothing left to do (the source had finished it): gone, as at
            # completion; its segment is unsealed, so nothing to unlink.
            self._index.drop_message(txn, msgid, rec.segid, [])
            return
        txn.put(key, R.MessageRecord(rec.birth, rec.segid, rec.offset, rec.length, rec.crc,
                                     rec.pid, rec.uid, rec.origin, rec.nrcpt, remaining,
                                     nfailed, rec.sender).encode(), db=dbs[b"messages"])
        if remaining == 0:
            txn.put(key, b"", db=dbs[b"bounces"])   # its bounce is queued next (C8)

    def imported(self, keys: Iterable[bytes]) -> dict[bytes, int]:
        """key -> spool id of every key an import has reserved or finished."""
        db = self._index.dbs.get(b"imported")
        if db is None:
            return {}
        with self._index.env.begin() as txn:
            found = {k: txn.get(k, db=db) for k in keys}
        return {k: R.read_u64(v[:8]) for k, v in found.items() if v is not None}

    def forget_imported(self, keys: Iterable[bytes]) -> None:
        """Drop keys whose source files are gone (the map need not grow)."""
        with self._index.write("forget imported keys", SpoolWriteError) as txn:
            for k in keys:
                txn.delete(k, db=self._index.dbs[b"imported"])

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

    def write_stage(self, items: Sequence[tuple[Envelope, bytes]],
                    births: list[float] | None = None,
                    ids: list[int] | None = None) -> PreparedBatch:
        """Step 1: ids (unless given, taken by _take_ids), one pwrite of all
        records (synced by sync_stage). `births`: per message, for imports."""
        now = self._core.clock()
        for env, _msg in items:
            if env.origin not in R.ORIGIN_CODES:
                raise SpoolError(f"unknown origin {env.origin!r}")
        if ids is None:
            first = self._take_ids(len(items))
            ids = list(range(first, first + len(items)))
        # Per message: its envelope record, then its bytes (the index points
        # at the second; the first is for re-indexing, see segments.scan).
        # The message records are joined from their parts: each message is
        # copied once, into `data`, not first into a record of its own.
        envs, parts = [], []
        for n, (msgid, (e, msg)) in enumerate(zip(ids, items)):
            birth = births[n] if births is not None else now
            envs.append(encode_record(msgid, EnvelopeRecord(birth, e.pid, e.uid, e.origin,
                                                            e.sender, tuple(e.recipients)).encode(),
                                      ENV_MAGIC))
            parts.append(envs[-1])
            parts.extend(record_parts(msgid, msg))
        data = b"".join(parts)
        writer = self._writer_for(len(data), now)
        try:
            base = writer.write(data)
        except OSError as exc:
            self._drop_broken_writer()
            raise SpoolWriteError(f"cannot write to spool: {exc.strerror or exc}") from None
        offsets = []
        offset = base
        for env_rec, (_e, msg) in zip(envs, items):
            offsets.append(offset + len(env_rec))
            offset += len(env_rec) + record_size(len(msg))
        # Segments this stage moved away from are sealed by the index
        # transaction that commits this batch: by then every batch written
        # to them has been indexed (batches are indexed in order).
        seal, self._seal_after_write = self._seal_after_write, []
        return PreparedBatch(list(items), ids, writer, offsets, offset, now, seal,
                             births=births)

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

    def index_stage(self, batches: Sequence[PreparedBatch],
                    also: Callable[[lmdb.Transaction], None] | None = None) -> None:
        """Step 4: ONE index transaction for the batches written since the
        last one, in order (a failed one only passes on its seals). `also`
        runs inside that transaction after them (imports set states there)."""
        seal = list(dict.fromkeys(segid for b in batches for segid in b.seal))
        dbs = self._index.dbs
        try:
            with self._index.write("commit to spool index", SpoolWriteError) as txn:
                for b in batches:
                    if b.failed:
                        continue
                    births = b.births or [b.now] * len(b.ids)
                    for msgid, (envelope, message), offset, birth in zip(b.ids, b.items,
                                                                         b.offsets, births):
                        self._index.add_message(txn, msgid, envelope, message, b.writer.segid,
                                                offset, birth)
                    segkey = R.u64(b.writer.segid)
                    raw = txn.get(segkey, db=dbs[b"segments"])
                    seg = SegmentRecord.decode(raw) if raw is not None else SegmentRecord(
                        0, False, self._core.pid, b.writer.created, -1, self._started)
                    txn.put(segkey, dataclasses.replace(seg, live=seg.live + len(b.ids),
                                                        end=max(seg.end, b.end)).encode(),
                            db=dbs[b"segments"])
                unlink = self._seal_segments(txn, seal)
                if also is not None:
                    also(txn)
        except RecordError as exc:  # a record too large to encode, a corrupt segment record
            raise SpoolWriteError(f"cannot commit to spool index: {exc}") from None
        self._core.files.remove(unlink)
