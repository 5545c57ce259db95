"""The Spool: message bytes in segment files, all state in an LMDB index.

This module owns every file under ROOT/queue/ and every transaction on the
index. Nothing else may read or write them. See the package docstring
(engine/queue/__init__.py) for the crash-state table and the scheduler API.
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import os
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Container, Iterable, Iterator, Sequence

import lmdb

from engine.config.settings import SpoolSettings
from engine.queue import records as R
from engine.queue.committer import CommitRequest, GroupCommitter
from engine.queue.records import (SPOOL_FORMAT, EnvelopeRecord, MessageRecord, RecipientRecord,
                                  RecordError, SegmentRecord)
from engine.queue.recovery import SpoolRecovery, process_start
from engine.queue.segments import (ENV_MAGIC, FILE_HEADER, SegmentError, SegmentIO,
                                   SegmentReader, SegmentWriter, encode_record, segment_name)
from engine.queue.values import (  # noqa: F401 - re-exported for engine.queue
    Deferred, Delivered, Envelope, Failed, Finished, Job, MessageNotFound, MessageQuarantined,
    QueuedMessage, RecipientView, RecoveryReport, Result, SpoolError, SpoolStats,
    SpoolVersionError, SpoolWriteError)

log = logging.getLogger("qrelay.queue")

INDEX_DIR = "index"
SEGMENT_DIR = "segments"
QUARANTINE_DIR = "quarantine"
_DB_NAMES = (b"meta", b"messages", b"recipients", b"due", b"todo", b"bounces", b"segments")


@dataclass(slots=True)
class _PreparedBatch:
    """A batch written to a segment, on its way through sync and index."""
    items: list[tuple[Envelope, bytes]]
    ids: list[int]
    writer: SegmentWriter     # the segment it is in
    offsets: list[int]        # of each message's QMSG record
    end: int                  # segment offset after the batch
    now: float
    seal: list[int]           # segments to seal when this batch is committed
    failed: bool = False      # its sync failed: index none of it


def current_boot_id() -> str:
    """This boot of the machine ("" where the kernel does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- the spool

class Spool(SpoolRecovery):
    """Open (or create) the spool at `queue_dir`. One per process, after fork.

    Writers (receivers) use `enqueue` / `submit`; the scheduler uses the
    methods under "scheduler API"; tools use `stats` / `iter_messages`
    with `readonly=True`, which works whether or not `qrelay run` is running.
    """

    def __init__(self, queue_dir: Path | str, settings: SpoolSettings | None = None, *,
                 readonly: bool = False, io: SegmentIO | None = None,
                 clock: Callable[[], float] = time.time, boot_id: str | None = None):
        self.path = Path(queue_dir)
        settings = settings or SpoolSettings()
        if settings.segment_max_age >= settings.orphan_grace:
            # cleanup() relies on a writer rotating an idle segment before
            # the orphan grace period could declare it abandoned.
            settings = dataclasses.replace(settings,
                                           segment_max_age=settings.orphan_grace // 2)
        self.settings = settings
        self.readonly = readonly
        self._clock = clock
        self._io = io or SegmentIO()
        self._pid = os.getpid()
        self._started = process_start(self._pid)
        self._sync_depth = min(64, max(1, settings.sync_depth))
        # Which boot of the machine this is: the index's last commit can only
        # be lost across a machine crash, so its tail is re-indexed once per boot.
        self._boot_id = current_boot_id() if boot_id is None else boot_id
        self._index_dir = self.path / INDEX_DIR
        self._seg_dir = self.path / SEGMENT_DIR
        self._quarantine_dir = self.path / QUARANTINE_DIR
        self._committer: GroupCommitter | None = None
        self._committer_lock = threading.Lock()
        self._writer: SegmentWriter | None = None
        # Segments the write stage rotated away from, to seal with the next
        # batch it hands on (indexed in order, so after all their batches).
        self._seal_after_write: list[int] = []
        self._next_id = 0
        self._id_limit = 0
        self._closed = False
        self.env = self._open_env()
        self._dbs = {name: self.env.open_db(name, create=not readonly) for name in _DB_NAMES}
        self._reader = SegmentReader(self._seg_dir, self.settings.max_open_segments)
        self._check_format()

    # ---------------------------------------------------------------- opening

    def _open_env(self) -> lmdb.Environment:
        if self.readonly:
            if not (self._index_dir / "data.mdb").is_file():
                raise SpoolError(f"{self.path}: no spool here")
            # With a lock file we can read consistently beside a running
            # writer; without write access to it, read lock-free (a snapshot
            # that may be torn by a concurrent writer, good enough for a tool).
            lock = os.access(self._index_dir / "lock.mdb", os.W_OK)
            try:
                return lmdb.open(str(self._index_dir), readonly=True, lock=lock,
                                 max_dbs=len(_DB_NAMES), readahead=False, subdir=True,
                                 map_size=self.settings.index_map_bytes)
            except lmdb.Error as exc:
                raise SpoolError(f"{self.path}: cannot open spool index: {exc}") from None
        try:
            for d in (self.path, self._index_dir, self._seg_dir, self._quarantine_dir):
                d.mkdir(mode=0o700, parents=(d == self.path), exist_ok=True)
            # metasync off: one sync per commit instead of two. LMDB stays
            # consistent, but a machine crash may undo its last commit;
            # _adopt_tails() puts those messages back from their
            # segments. Without a boot id that cannot be told, so sync both.
            metasync = self.settings.index_metasync or not self._boot_id
            return lmdb.open(str(self._index_dir), map_size=self.settings.index_map_bytes,
                             max_dbs=len(_DB_NAMES), sync=True, metasync=metasync,
                             readahead=False, subdir=True, max_readers=256)
        except (OSError, lmdb.Error) as exc:
            raise SpoolError(f"{self.path}: cannot open spool: {exc}") from None

    def _check_format(self) -> None:
        meta = self._dbs[b"meta"]
        with self.env.begin(write=not self.readonly) as txn:
            raw = txn.get(b"format", db=meta)
            if raw is None:
                if self.readonly:
                    raise SpoolError(f"{self.path}: spool index has no format record")
                txn.put(b"format", R.u32(SPOOL_FORMAT), db=meta)
                txn.put(b"next_id", R.u64(1), db=meta)
                raw = R.u32(SPOOL_FORMAT)
            version = R.read_u32(raw)
            if version < SPOOL_FORMAT and not self.readonly:
                txn.put(b"format", R.u32(SPOOL_FORMAT), db=meta)  # upgraded in place
            boot = txn.get(b"boot_id", db=meta)
        if version > SPOOL_FORMAT:
            self.env.close()
            raise SpoolVersionError(
                f"{self.path}: spool format version {version} was written by a newer "
                f"qrelay; this one understands up to {SPOOL_FORMAT}")
        if not self.readonly:
            self._adopt_tails(after_reboot=bool(self._boot_id) and (
                boot is None or bytes(boot) != self._boot_id.encode()))

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
            indexed = self._committer.close() if self._committer is not None else True
            seal = self._seal_after_write
            if self._writer is not None:
                seal.append(self._writer.segid)
                self._writer.close()
                self._writer = None
            # Answered messages the index could not take stay in unsealed
            # segments, where the next open finds them (C2).
            if seal and indexed:
                try:
                    with self.env.begin(write=True) as txn:
                        unlink = self._seal_segments(txn, seal)
                    self._unlink_segments(unlink)
                except lmdb.Error as exc:
                    log.warning("warning: cannot seal segments on close: %s", exc)
        self._closed = True
        self._reader.close()
        self.env.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- enqueue

    def _get_committer(self) -> GroupCommitter:
        self._check_process()
        committer = self._committer
        if committer is not None:
            return committer
        with self._committer_lock:  # threads racing to the first enqueue
            if self._committer is None:
                self._committer = GroupCommitter(
                    self._prepare_requests, self._sync_batch, self._index_batches,
                    self.settings.max_batch_messages, self.settings.max_batch_bytes,
                    sync_depth=self._sync_depth,
                    ack_after_index=self.settings.ack_after_index)
            return self._committer

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
        try:
            return self._get_committer().put(envelope, bytes(message), loop, wait_index)
        except RuntimeError:  # closed by another thread meanwhile
            raise SpoolError("spool is closed") from None

    def _take_ids(self, n: int) -> int:
        """First of n consecutive fresh ids (ids come from the index counter in blocks)."""
        if self._next_id + n > self._id_limit:
            block = max(n, self.settings.id_block)
            meta = self._dbs[b"meta"]
            try:
                with self.env.begin(write=True) as txn:
                    first = R.read_u64(txn.get(b"next_id", db=meta))
                    txn.put(b"next_id", R.u64(first + block), db=meta)
            except lmdb.Error as exc:
                raise SpoolWriteError(f"cannot allocate message ids: {exc}") from None
            self._next_id, self._id_limit = first, first + block
        first = self._next_id
        self._next_id += n
        return first

    def _writer_for(self, nbytes: int, now: float) -> SegmentWriter:
        w = self._writer
        if w is not None and not w.broken and (
                w.size + nbytes <= self.settings.segment_bytes or w.size <= 64) \
                and now - w.created < self.settings.segment_max_age:
            return w
        if w is not None:
            self._seal_after_write.append(w.segid)
            w.close()
            self._writer = None
        segid = self._take_ids(1)
        try:
            writer = SegmentWriter(self._seg_dir, segid, self._io, now, self._sync_depth)
        except OSError as exc:
            raise SpoolWriteError(f"cannot create spool segment: {exc.strerror or exc}") from None
        # Known to the index, durably (meta page too), before anything in it
        # is acknowledged: only known, unsealed segments have their tails
        # indexed after a crash.
        try:
            with self.env.begin(write=True) as txn:
                txn.put(R.u64(segid), SegmentRecord(0, False, self._pid, now, FILE_HEADER.size,
                                                    self._started).encode(),
                        db=self._dbs[b"segments"])
            self.env.sync(True)
        except lmdb.Error as exc:
            writer.close()
            self._unlink_segments([segid])
            raise SpoolWriteError(f"cannot register spool segment: {exc}") from None
        self._writer = writer
        return writer

    def _prepare_requests(self, batch: Sequence[CommitRequest]) -> tuple[list[int],
                                                                          "_PreparedBatch"]:
        prepared = self._prepare_batch([(r.envelope, r.message) for r in batch])
        return prepared.ids, prepared

    def _write_batch(self, items: Sequence[tuple[Envelope, bytes]]) -> list[int]:
        """Every commit stage in the caller's thread: a bulk path for loaders and
        benchmarks. Must not run concurrently with enqueue/submit."""
        prepared = self._prepare_batch(items)
        self._sync_batch(prepared)
        self._index_batches([prepared])
        return prepared.ids

    def _prepare_batch(self, items: Sequence[tuple[Envelope, bytes]]) -> "_PreparedBatch":
        """Write stage: ids, one pwrite of all records (synced by _sync_batch)."""
        now = self._clock()
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
        return _PreparedBatch(list(items), ids, writer, offsets, offset, now, seal)

    def _drop_broken_writer(self) -> None:
        w = self._writer
        if w is not None and w.broken:  # the next batch starts a new segment
            self._seal_after_write.append(w.segid)
            w.close()
            self._writer = None

    def _sync_batch(self, batch: "_PreparedBatch") -> None:
        """Sync stage (one of the committer's sync threads): one fdatasync
        makes the batch's records durable. A failed batch is still handed to
        the index stage, which then indexes none of it; the write stage
        starts a new segment (the writer is broken)."""
        try:
            batch.writer.sync()
        except OSError as exc:
            batch.failed = True
            raise SpoolWriteError(f"cannot sync spool segment: {exc.strerror or exc}") from None

    def _index_batches(self, batches: Sequence["_PreparedBatch"]) -> None:
        """Index stage: ONE LMDB transaction for the batches written since
        the last one, in order (a failed one only passes on its seals)."""
        seal = list(dict.fromkeys(segid for b in batches for segid in b.seal))
        try:
            with self.env.begin(write=True) as txn:
                dbs = self._dbs
                for b in batches:
                    if b.failed:
                        continue
                    for msgid, (envelope, message), offset in zip(b.ids, b.items, b.offsets):
                        self._index_message(txn, msgid, envelope, message, b.writer.segid,
                                            offset, b.now)
                    segkey = R.u64(b.writer.segid)
                    raw = txn.get(segkey, db=dbs[b"segments"])
                    seg = SegmentRecord.decode(raw) if raw is not None else \
                        SegmentRecord(0, False, self._pid, b.writer.created, -1, self._started)
                    txn.put(segkey, dataclasses.replace(seg, live=seg.live + len(b.ids),
                                                        end=max(seg.end, b.end)).encode(),
                            db=dbs[b"segments"])
                unlink = self._seal_segments(txn, seal)
        except (lmdb.Error, RecordError) as exc:
            raise SpoolWriteError(f"cannot commit to spool index: {exc}") from None
        self._unlink_segments(unlink)

    def _index_message(self, txn: lmdb.Transaction, msgid: int,
                       envelope: Envelope | EnvelopeRecord, message: bytes, segid: int,
                       offset: int, birth: float) -> None:
        """A new message's records: queued, recipients not yet classified (todo)."""
        dbs = self._dbs
        nrcpt = len(envelope.recipients)
        key = R.u64(msgid)
        txn.put(key, MessageRecord(birth, segid, offset, len(message), zlib.crc32(message),
                                   envelope.pid, envelope.uid, envelope.origin, nrcpt, nrcpt,
                                   0, envelope.sender).encode(), db=dbs[b"messages"])
        for i, addr in enumerate(envelope.recipients):
            txn.put(R.rcpt_key(msgid, i),
                    RecipientRecord(R.TODO, R.NO_CHANNEL, 0, 0.0, addr).encode(),
                    db=dbs[b"recipients"])
        txn.put(key, b"", db=dbs[b"todo"])

    # ---------------------------------------------------------------- segments

    def _seal_segments(self, txn: lmdb.Transaction, segids: Iterable[int]) -> list[int]:
        """Mark segments this process moved away from as sealed (inside txn).
        Returns those now empty, to unlink after the commit."""
        unlink = []
        segdb = self._dbs[b"segments"]
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

    def _unlink_segments(self, segids: Iterable[int]) -> None:
        segids = list(segids)
        if segids and not self.readonly:
            # The commit that let them go must be on disk first (the meta
            # page is synced lazily): else a machine crash could bring back
            # index records pointing into a deleted file.
            try:
                self.env.sync(True)
            except lmdb.Error as exc:
                log.warning("warning: cannot sync spool index, segments kept: %s", exc)
                return
        for segid in segids:
            self._reader.forget(segid)
            try:
                os.unlink(self._seg_dir / segment_name(segid))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("warning: cannot remove segment %s: %s", segid, exc)

    def _release_segment(self, txn: lmdb.Transaction, segid: int, unlink: list[int]) -> None:
        segdb = self._dbs[b"segments"]
        key = R.u64(segid)
        raw = txn.get(key, db=segdb)
        if raw is None:
            return
        try:
            seg = SegmentRecord.decode(raw)
        except RecordError:
            return  # recover() rebuilds segment records from the message records
        live = max(0, seg.live - 1)
        if live == 0 and seg.sealed:
            txn.delete(key, db=segdb)
            unlink.append(segid)
        else:
            txn.put(key, dataclasses.replace(seg, live=live).encode(), db=segdb)

    # ---------------------------------------------------------------- counts & reading

    def stats(self) -> SpoolStats:
        """(messages in queue, not yet preprocessed) — O(1), for qstat."""
        with self.env.begin() as txn:
            return SpoolStats(txn.stat(self._dbs[b"messages"])["entries"],
                              txn.stat(self._dbs[b"todo"])["entries"])

    def _message(self, txn: lmdb.Transaction, msgid: int) -> MessageRecord:
        raw = txn.get(R.u64(msgid), db=self._dbs[b"messages"])
        if raw is None:
            raise MessageNotFound(msgid)
        return MessageRecord.decode(raw)

    def _recipients(self, txn: lmdb.Transaction, msgid: int,
                    nrcpt: int) -> list[RecipientRecord]:
        rdb = self._dbs[b"recipients"]
        out = []
        for i in range(nrcpt):
            raw = txn.get(R.rcpt_key(msgid, i), db=rdb)
            if raw is None:
                raise RecordError(f"recipient {i} of #{msgid} is missing")
            out.append(RecipientRecord.decode(raw))
        return out

    def read_message(self, msgid: int) -> bytes:
        """The message bytes. MessageNotFound if gone; MessageQuarantined if corrupt."""
        try:
            with self.env.begin() as txn:
                rec = self._message(txn, msgid)
            return self._reader.read(rec.segid, rec.offset, msgid, rec.length)
        except (RecordError, SegmentError, OSError) as exc:
            self._quarantine_after_error(msgid, exc)
            raise MessageQuarantined(f"#{msgid}: {exc}") from None

    def iter_messages(self, chunk: int = 1000) -> Iterator[QueuedMessage]:
        """Every queued message in id order (for qread); corrupt ones are skipped
        with a warning (read-only: quarantining is left to the scheduler)."""
        mdb = self._dbs[b"messages"]
        start = b""
        while True:
            batch: list[QueuedMessage] = []
            with self.env.begin() as txn:
                cur = txn.cursor(db=mdb)
                if not cur.set_range(start):
                    return
                for key, value in cur:
                    msgid = R.read_u64(key)
                    try:
                        batch.append(self._view(txn, msgid, value))
                    except RecordError as exc:
                        log.warning("warning: trouble with #%d: %s", msgid, exc)
                    if len(batch) >= chunk:
                        break
                start = R.u64(msgid + 1)
                more = len(batch) >= chunk
            yield from batch
            if not more:
                return

    def _view(self, txn: lmdb.Transaction, msgid: int, value: bytes) -> QueuedMessage:
        rec = MessageRecord.decode(value)
        rcpts = self._recipients(txn, msgid, rec.nrcpt)
        preprocessed = txn.get(R.u64(msgid), db=self._dbs[b"todo"]) is None
        views = tuple(RecipientView(r.address, R.CHANNEL_NAMES[r.channel], R.STATE_NAMES[r.state],
                                    r.state in R.FINISHED_STATES, r.attempts, r.next_try, r.text)
                      for r in rcpts)
        return QueuedMessage(msgid, rec.birth, rec.length, rec.sender, rec.origin, rec.pid,
                             rec.uid, preprocessed, rec.nfailed > 0, views)

    def message_info(self, msgid: int) -> QueuedMessage:
        """One message's envelope and recipient states."""
        with self.env.begin() as txn:
            raw = txn.get(R.u64(msgid), db=self._dbs[b"messages"])
            if raw is None:
                raise MessageNotFound(msgid)
            try:
                return self._view(txn, msgid, raw)
            except RecordError as exc:
                err = exc
        self._quarantine_after_error(msgid, err)
        raise MessageQuarantined(f"#{msgid}: {err}")

    # ---------------------------------------------------------------- scheduler API

    def todo(self, limit: int = 100) -> list[int]:
        """Ids of messages queued but not yet preprocessed, oldest first."""
        out = []
        with self.env.begin() as txn:
            for key in txn.cursor(db=self._dbs[b"todo"]).iternext(values=False):
                out.append(R.read_u64(key))
                if len(out) >= limit:
                    break
        return out

    def envelope(self, msgid: int) -> Envelope:
        """The envelope as queued (recipients as rewritten by preprocess, if any)."""
        info = self.message_info(msgid)
        return Envelope(info.sender, tuple(r.address for r in info.recipients), info.pid,
                        info.uid, info.origin)

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
        return self.preprocess_many([(msgid, channels, addresses)], now, strict=True)[0]

    def preprocess_many(self, items: Sequence[tuple], now: float | None = None,
                        strict: bool = False) -> list[Finished | None]:
        """preprocess() for many messages in ONE durable transaction.

        items: (msgid, channels) or (msgid, channels, addresses). Unless
        `strict`, a message that is gone or already preprocessed is skipped
        (None), so a scheduler can replay a batch after a crash.
        """
        now = self._clock() if now is None else now
        unlink: list[int] = []
        out: list[Finished | None] = []
        corrupt: dict[int, RecordError] = {}
        try:
            with self.env.begin(write=True) as txn:
                for item in items:
                    msgid, channels = item[0], item[1]
                    addresses = item[2] if len(item) > 2 else None
                    try:
                        out.append(self._preprocess_one(txn, msgid, channels, addresses, now,
                                                        unlink))
                    except RecordError as exc:
                        if strict:
                            raise
                        corrupt[msgid] = exc
                        out.append(None)
                    except SpoolError:
                        if strict:
                            raise
                        out.append(None)
        except RecordError as exc:
            self._quarantine_after_error(items[0][0], exc)
            raise MessageQuarantined(f"#{items[0][0]}: {exc}") from None
        except lmdb.Error as exc:
            raise SpoolError(f"cannot update spool index: {exc}") from None
        self._unlink_segments(unlink)
        for msgid, exc in corrupt.items():
            self._quarantine_after_error(msgid, exc)
        return out

    def _preprocess_one(self, txn: lmdb.Transaction, msgid: int, channels: Sequence[str],
                        addresses: Sequence[str] | None, now: float,
                        unlink: list[int]) -> Finished | None:
        dbs = self._dbs
        key = R.u64(msgid)
        if txn.get(key, db=dbs[b"todo"]) is None:
            if txn.get(key, db=dbs[b"messages"]) is None:
                raise MessageNotFound(msgid)
            raise SpoolError(f"#{msgid} is already preprocessed")
        rec = self._message(txn, msgid)
        rcpts = self._recipients(txn, msgid, rec.nrcpt)
        if len(channels) != rec.nrcpt or (addresses is not None
                                          and len(addresses) != rec.nrcpt):
            raise SpoolError(f"#{msgid} has {rec.nrcpt} recipients, "
                             f"got {len(channels)} channels")
        codes = []
        for ch in channels:
            code = R.CHANNEL_CODES.get(ch)
            if code is None:
                raise SpoolError(f"unknown channel {ch!r}")
            codes.append(code)
        for i, r in enumerate(rcpts):
            addr = addresses[i] if addresses is not None else r.address
            txn.put(R.rcpt_key(msgid, i),
                    RecipientRecord(R.PENDING, codes[i], 0, now, addr).encode(),
                    db=dbs[b"recipients"])
            txn.put(R.due_key(codes[i], now, msgid, i), b"", db=dbs[b"due"])
        txn.delete(key, db=dbs[b"todo"])
        if rec.nrcpt == 0:
            return self._finish(txn, msgid, rec, [], unlink)
        return None

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
        now = self._clock() if now is None else now
        codes = [R.LOCAL, R.REMOTE] if channel is None else [R.CHANNEL_CODES[channel]]
        per_channel: list[list[Job]] = []
        corrupt: set[int] = set()
        dangling: list[bytes] = []
        with self.env.begin() as txn:
            msg_cache: dict[int, MessageRecord] = {}
            for code in codes:
                jobs: list[Job] = []
                cur = txn.cursor(db=self._dbs[b"due"])
                upper = R.due_upper(code, now)
                start = R.due_prefix(code) if after is None else R.due_key(code, *after)
                if not cur.set_range(start):
                    per_channel.append(jobs)
                    continue
                for key in cur.iternext(values=False):
                    if key >= upper:
                        break
                    if after is not None and key == start:
                        continue
                    _c, _t, msgid, idx = R.split_due_key(key)
                    if (msgid, idx) in exclude or msgid in corrupt:
                        continue
                    job = self._due_job(txn, msgid, idx, key, msg_cache, corrupt, dangling)
                    if job is not None:
                        jobs.append(job)
                        if len(jobs) >= limit:
                            break
                per_channel.append(jobs)
        self._after_due_read(corrupt, dangling)
        if len(per_channel) == 1:
            return per_channel[0]
        merged = heapq.merge(*per_channel, key=lambda j: (j.next_try, j.msgid, j.index))
        return [j for _, j in zip(range(limit), merged)]

    def jobs(self, keys: Iterable[tuple[int, int]], now: float | None = None,
             channel: str | None = None) -> list[Job]:
        """The jobs of these (msgid, index) pairs that are still due at `now`
        (on `channel`, if given), in the order given: O(log n) per key. For a
        caller handing back work it had set aside, without reading the due
        table again."""
        now = self._clock() if now is None else now
        codes = (R.LOCAL, R.REMOTE) if channel is None else (R.CHANNEL_CODES[channel],)
        upper_ms = R.time_ms(now)
        out: list[Job] = []
        corrupt: set[int] = set()
        dangling: list[bytes] = []
        rdb = self._dbs[b"recipients"]
        with self.env.begin() as txn:
            msg_cache: dict[int, MessageRecord] = {}
            for msgid, idx in keys:
                if msgid in corrupt:
                    continue
                raw = txn.get(R.rcpt_key(msgid, idx), db=rdb)
                if raw is None:
                    continue  # finished and released meanwhile
                try:
                    r = RecipientRecord.decode(raw)
                except RecordError:
                    corrupt.add(msgid)
                    continue
                if r.state not in (R.PENDING, R.DEFERRED) or r.channel not in codes \
                        or R.time_ms(r.next_try) > upper_ms:
                    continue
                key = R.due_key(r.channel, r.next_try, msgid, idx)
                job = self._due_job(txn, msgid, idx, key, msg_cache, corrupt, dangling)
                if job is not None:
                    out.append(job)
        self._after_due_read(corrupt, dangling)
        return out

    def _due_job(self, txn: lmdb.Transaction, msgid: int, idx: int, key: bytes,
                 msg_cache: dict[int, MessageRecord], corrupt: set[int],
                 dangling: list[bytes]) -> Job | None:
        """The Job for due entry `key`, or None (noting a dangling entry or a
        corrupt message for _after_due_read)."""
        try:
            rec = msg_cache.get(msgid)
            if rec is None:
                rec = msg_cache[msgid] = self._message(txn, msgid)
            raw = txn.get(R.rcpt_key(msgid, idx), db=self._dbs[b"recipients"])
            if raw is None:
                raise RecordError(f"recipient {idx} missing")
            r = RecipientRecord.decode(raw)
        except MessageNotFound:
            dangling.append(bytes(key))
            return None
        except RecordError:
            corrupt.add(msgid)
            return None
        if r.state not in (R.PENDING, R.DEFERRED) or \
                R.due_key(r.channel, r.next_try, msgid, idx) != key:
            dangling.append(bytes(key))
            return None
        return Job(msgid, idx, r.address, R.CHANNEL_NAMES[r.channel], r.attempts,
                   r.next_try, rec.birth, rec.sender, rec.length, rec.origin, r.text)

    def _after_due_read(self, corrupt: set[int], dangling: list[bytes]) -> None:
        if dangling:
            self._drop_due(dangling)
        for msgid in corrupt:
            self._quarantine_after_error(msgid, RecordError("corrupt record found by due()"))

    def next_due(self, channel: str | None = None) -> float | None:
        """Time of the earliest due recipient (to know how long to sleep), or None."""
        codes = [R.LOCAL, R.REMOTE] if channel is None else [R.CHANNEL_CODES[channel]]
        best = None
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._dbs[b"due"])
            for code in codes:
                if cur.set_range(R.due_prefix(code)) and cur.key()[0] == code:
                    t = R.split_due_key(cur.key())[1] / 1000
                    best = t if best is None else min(best, t)
        return best

    def _drop_due(self, keys: list[bytes]) -> None:
        try:
            with self.env.begin(write=True) as txn:
                for key in keys:
                    txn.delete(key, db=self._dbs[b"due"])
        except lmdb.Error as exc:
            log.warning("warning: cannot drop stale due entries: %s", exc)

    def mark_delivered(self, msgid: int, index: int) -> Finished | None:
        return self.apply([Delivered(msgid, index)])[0]

    def mark_deferred(self, msgid: int, index: int, next_try: float, error: str = "") -> None:
        self.apply([Deferred(msgid, index, next_try, error)])

    def mark_failed(self, msgid: int, index: int, reason: str = "") -> Finished | None:
        return self.apply([Failed(msgid, index, reason)])[0]

    def apply(self, results: Sequence[Result]) -> list[Finished | None]:
        """Record many delivery results in ONE durable transaction.

        Returns, per result, the Finished record if that result finished
        its message, else None. A result for a recipient that is already
        finished, or a message that is gone, is ignored (None): marks are
        idempotent, so a scheduler may replay them after a crash.
        """
        out: list[Finished | None] = []
        unlink: list[int] = []
        corrupt: dict[int, RecordError] = {}
        try:
            with self.env.begin(write=True) as txn:
                for res in results:
                    try:
                        out.append(self._apply_one(txn, res, unlink))
                    except RecordError as exc:
                        corrupt[res.msgid] = exc
                        out.append(None)
        except lmdb.Error as exc:
            raise SpoolError(f"cannot update spool index: {exc}") from None
        self._unlink_segments(unlink)
        for msgid, exc in corrupt.items():
            self._quarantine_after_error(msgid, exc)
        return out

    def _apply_one(self, txn: lmdb.Transaction, res: Result,
                   unlink: list[int]) -> Finished | None:
        dbs = self._dbs
        try:
            rec = self._message(txn, res.msgid)
        except MessageNotFound:
            return None
        if not 0 <= res.index < rec.nrcpt:
            raise SpoolError(f"#{res.msgid} has no recipient {res.index}")
        rkey = R.rcpt_key(res.msgid, res.index)
        raw = txn.get(rkey, db=dbs[b"recipients"])
        if raw is None:
            raise RecordError(f"recipient {res.index} missing")
        r = RecipientRecord.decode(raw)
        if r.state not in (R.PENDING, R.DEFERRED):
            return None
        txn.delete(R.due_key(r.channel, r.next_try, res.msgid, res.index), db=dbs[b"due"])
        if isinstance(res, Deferred):
            nr = RecipientRecord(R.DEFERRED, r.channel, r.attempts + 1, res.next_try,
                                 r.address, res.error)
            txn.put(rkey, nr.encode(), db=dbs[b"recipients"])
            txn.put(R.due_key(r.channel, res.next_try, res.msgid, res.index), b"",
                    db=dbs[b"due"])
            return None
        failed = isinstance(res, Failed)
        nr = RecipientRecord(R.FAILED if failed else R.DELIVERED, r.channel, r.attempts + 1,
                             0.0, r.address, res.reason if failed else "")
        txn.put(rkey, nr.encode(), db=dbs[b"recipients"])
        rec = MessageRecord(rec.birth, rec.segid, rec.offset, rec.length, rec.crc, rec.pid,
                            rec.uid, rec.origin, rec.nrcpt, rec.remaining - 1,
                            rec.nfailed + int(failed), rec.sender)
        if rec.remaining > 0:
            txn.put(R.u64(res.msgid), rec.encode(), db=dbs[b"messages"])
            return None
        rcpts = self._recipients(txn, res.msgid, rec.nrcpt)
        return self._finish(txn, res.msgid, rec, rcpts, unlink)

    def _finish(self, txn: lmdb.Transaction, msgid: int, rec: MessageRecord,
                rcpts: list[RecipientRecord], unlink: list[int]) -> Finished:
        failed = tuple((r.address, r.text) for r in rcpts if r.state == R.FAILED)
        delivered = tuple(r.address for r in rcpts if r.state == R.DELIVERED)
        key = R.u64(msgid)
        if failed:
            # Keep the message (and its bytes) until the bounce is queued:
            # a crash before release() makes the scheduler bounce again.
            txn.put(key, rec.encode(), db=self._dbs[b"messages"])
            txn.put(key, b"", db=self._dbs[b"bounces"])
        else:
            self._delete_message(txn, msgid, rec, unlink)
        return Finished(msgid, rec.sender, failed, delivered, rec.length, rec.birth,
                        rec.origin, released=not failed)

    def _delete_message(self, txn: lmdb.Transaction, msgid: int, rec: MessageRecord,
                        unlink: list[int]) -> None:
        dbs = self._dbs
        key = R.u64(msgid)
        txn.delete(key, db=dbs[b"messages"])
        txn.delete(key, db=dbs[b"todo"])
        txn.delete(key, db=dbs[b"bounces"])
        for i in range(rec.nrcpt):
            rkey = R.rcpt_key(msgid, i)
            raw = txn.get(rkey, db=dbs[b"recipients"])
            if raw is not None:
                try:
                    r = RecipientRecord.decode(raw)
                    if r.state in (R.PENDING, R.DEFERRED):
                        txn.delete(R.due_key(r.channel, r.next_try, msgid, i), db=dbs[b"due"])
                except RecordError:
                    pass  # its due entry, if any, is dropped lazily as dangling
                txn.delete(rkey, db=dbs[b"recipients"])
        self._release_segment(txn, rec.segid, unlink)

    def bouncing(self, limit: int = 100) -> list[Finished]:
        """Finished messages with failures whose bounce is not yet released
        (after a restart the scheduler queues their bounce again)."""
        out = []
        with self.env.begin() as txn:
            for key in txn.cursor(db=self._dbs[b"bounces"]).iternext(values=False):
                msgid = R.read_u64(key)
                try:
                    rec = self._message(txn, msgid)
                    rcpts = self._recipients(txn, msgid, rec.nrcpt)
                except (MessageNotFound, RecordError):
                    continue
                out.append(Finished(msgid, rec.sender,
                                    tuple((r.address, r.text) for r in rcpts
                                          if r.state == R.FAILED),
                                    tuple(r.address for r in rcpts if r.state == R.DELIVERED),
                                    rec.length, rec.birth, rec.origin, released=False))
                if len(out) >= limit:
                    break
        return out

    def release(self, msgid: int) -> None:
        """Remove a finished message (call after its bounce is queued)."""
        unlink: list[int] = []
        try:
            with self.env.begin(write=True) as txn:
                rec = self._message(txn, msgid)
                if rec.remaining > 0:
                    raise SpoolError(f"#{msgid} still has {rec.remaining} recipients to do")
                self._delete_message(txn, msgid, rec, unlink)
        except MessageNotFound:
            return
        except RecordError as exc:
            self._quarantine_after_error(msgid, exc)
            return
        except lmdb.Error as exc:
            raise SpoolError(f"cannot update spool index: {exc}") from None
        self._unlink_segments(unlink)

    def reschedule_all(self, now: float | None = None) -> int:
        """Make every deferred recipient due `now` (qmail's ALRM / flush).
        Returns how many were moved. One transaction, O(number deferred)."""
        now = self._clock() if now is None else now
        moved = 0
        with self.env.begin(write=True) as txn:
            dbs = self._dbs
            for code in (R.LOCAL, R.REMOTE):
                cur = txn.cursor(db=dbs[b"due"])
                start = R.due_upper(code, now)
                keys = []
                if cur.set_range(start):
                    for key in cur.iternext(values=False):
                        if key[0] != code:
                            break
                        keys.append(bytes(key))
                for key in keys:
                    _c, _t, msgid, idx = R.split_due_key(key)
                    rkey = R.rcpt_key(msgid, idx)
                    raw = txn.get(rkey, db=dbs[b"recipients"])
                    txn.delete(key, db=dbs[b"due"])
                    if raw is None:
                        continue
                    try:
                        r = RecipientRecord.decode(raw)
                    except RecordError:
                        continue
                    if r.state not in (R.PENDING, R.DEFERRED):
                        continue
                    txn.put(rkey, RecipientRecord(r.state, r.channel, r.attempts, now,
                                                  r.address, r.text).encode(),
                            db=dbs[b"recipients"])
                    txn.put(R.due_key(code, now, msgid, idx), b"", db=dbs[b"due"])
                    moved += 1
        return moved
