"""The spool's LMDB index: its environment, its tables, and the one way to write to it.

Owns queue/index/ (data.mdb, lock.mdb) and the records more than one part
of the spool touches: a message's record and recipients, a new message's
records, a message's removal, a segment's live count.

Every write transaction in engine.queue is `SpoolIndex.write()` (and every
forced sync `SpoolIndex.sync()`): an LMDB error — a full map, a full disk,
anything LMDB reports — or an OSError inside it aborts the transaction and
becomes ONE SpoolError (or the subclass its caller names: SpoolWriteError
on intake's paths) whose text is one line, "cannot <what>: <why>". No other
module catches lmdb.Error around a write. This module never decides what a
failure means for mail (451, retry, warn and go on): its callers do.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lmdb

from engine.config.settings import SpoolSettings
from engine.queue import records as R
from engine.queue.records import (SPOOL_FORMAT, EnvelopeRecord, MessageRecord, RecipientRecord,
                                  RecordError, SegmentRecord)
from engine.queue.values import (Envelope, MessageNotFound, SpoolError, SpoolVersionError)

# A recipient record's state, channel (next byte) and next_try (at +4), read
# in place by drop_message: after the 5-byte version+crc head (records.py).
_RCPT_STATE = 5
_NEXT_TRY = struct.Struct(">d")
_RCPT_DUE_END = _RCPT_STATE + 4 + 8
_DUE_MS = struct.Struct(">Q")
_DUE_STATES = (R.PENDING, R.DEFERRED)
# A message record's segment id (records.MessageRecord: birth f64, then segid u64).
_MSG_SEGID = struct.Struct(">Q")
_MSG_SEGID_AT = 5 + 8
_SEAL = struct.Struct(">BI")

TABLES = (b"meta", b"messages", b"recipients", b"due", b"todo", b"bounces", b"segments",
          b"held", b"imported")
# Added after the first release: a spool no writable open has upgraded yet
# lacks them, and a read-only open cannot create them (readers use .get()).
LATER_TABLES = (b"held", b"imported")
# Reader slots in lock.mdb (LMDB: one per thread with a read transaction open).
_MAX_READERS = 256
# meta key: a counter every queue-surgery transaction (hold, release, delete,
# requeue) increments, so a running scheduler knows its in-memory view is stale.
SURGERY_KEY = b"surgery"


def failure_text(what: str, exc: BaseException, map_bytes: int) -> str:
    """One line saying what could not be written to the index, and why."""
    if isinstance(exc, lmdb.MapFullError):
        why = (f"the spool index is full (its map of {map_bytes} bytes is used up; "
               f"raise [spool] index_map_bytes)")
    elif getattr(exc, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(exc):
        why = "the disk holding the spool index is full"
    else:
        why = str(exc)
    return " ".join(f"cannot {what}: {why}".split())


class SpoolIndex:
    """The LMDB environment at `index_dir`, opened (created if writable) and
    checked against SPOOL_FORMAT. `env` and `dbs` (table name -> handle) are
    for the spool's parts; `where` names the spool in error texts."""

    def __init__(self, index_dir: Path, settings: SpoolSettings, *, readonly: bool,
                 metasync: bool, where: Path):
        self.readonly = readonly
        self._where = where
        self.env = self._open(index_dir, settings, metasync)
        try:
            self._check_size(index_dir / "data.mdb")
            self.free_dead_readers()     # e.g. of the process this one replaces
            self.dbs = {}
            if readonly:
                for name in TABLES:
                    try:
                        self.dbs[name] = self.env.open_db(name, create=False)
                    except lmdb.NotFoundError:
                        if name not in LATER_TABLES:
                            raise
            else:
                # In a write transaction of our own: begun, it waits for LMDB's
                # writer mutex without the GIL. open_db's own waits holding it:
                # behind a spool writer stopped mid-commit, every other thread
                # of the process opening the spool stopped too.
                with self.env.begin(write=True) as txn:
                    for name in TABLES:
                        self.dbs[name] = self.env.open_db(name, txn=txn, create=True)
            self._check_format()
        except lmdb.Error as exc:
            self.env.close()
            raise SpoolError(f"{where}: cannot open spool index: {exc}") from None
        except SpoolError:
            self.env.close()
            raise

    def _open(self, index_dir: Path, settings: SpoolSettings, metasync: bool) -> lmdb.Environment:
        try:
            if not self.readonly:
                from engine.lmdbfile import reserve_lock_file
                reserve_lock_file(index_dir, _MAX_READERS)
                return lmdb.open(str(index_dir), map_size=settings.index_map_bytes,
                                 max_dbs=len(TABLES), sync=True, metasync=metasync,
                                 readahead=False, subdir=True, max_readers=_MAX_READERS)
            if not (index_dir / "data.mdb").is_file():
                raise SpoolError(f"{self._where}: no spool here")
            # With a lock file we can read consistently beside a running
            # writer; without write access to it, read lock-free (a snapshot
            # that may be torn by a concurrent writer, good enough for a tool).
            lock = os.access(index_dir / "lock.mdb", os.W_OK, effective_ids=True)
            return lmdb.open(str(index_dir), readonly=True, lock=lock, max_dbs=len(TABLES),
                             readahead=False, subdir=True, map_size=settings.index_map_bytes)
        except (OSError, lmdb.Error) as exc:
            raise SpoolError(f"{self._where}: cannot open spool index: {exc}") from None

    def _check_size(self, data: Path) -> None:
        """Refuse a data.mdb shorter than the pages its meta page names
        (engine.lmdbfile: reading past its end would be SIGBUS in every
        process that opens the spool)."""
        from engine.lmdbfile import truncation
        try:
            why = truncation(self.env, data)
        except OSError as exc:
            raise SpoolError(f"{self._where}: cannot open spool index: {exc}") from None
        if why is not None:
            raise SpoolError(f"{self._where}: cannot open spool index: {why}")

    def _check_format(self) -> None:
        meta = self.dbs[b"meta"]
        if self.readonly:
            with self.env.begin() as txn:
                raw = txn.get(b"format", db=meta)
            if raw is None:
                raise SpoolError(f"{self._where}: spool index has no format record")
            version = R.read_u32(raw)
        else:
            with self.write("initialise the spool index") as txn:
                raw = txn.get(b"format", db=meta)
                if raw is None:
                    txn.put(b"format", R.u32(SPOOL_FORMAT), db=meta)
                    txn.put(b"next_id", R.u64(1), db=meta)
                    raw = R.u32(SPOOL_FORMAT)
                version = R.read_u32(raw)
                if version < SPOOL_FORMAT:
                    txn.put(b"format", R.u32(SPOOL_FORMAT), db=meta)  # upgraded in place
        if version > SPOOL_FORMAT:
            raise SpoolVersionError(
                f"{self._where}: spool format version {version} was written by a newer "
                f"qrelay; this one understands up to {SPOOL_FORMAT}")

    def close(self) -> None:
        self.env.close()

    def free_dead_readers(self) -> int:
        """Free the reader slots of processes that died inside a read
        transaction (kill -9): while one stays, LMDB reuses no page freed
        after its snapshot, and the index file grows with every commit."""
        try:
            return self.env.reader_check()
        except lmdb.Error:
            return 0

    def usage(self) -> tuple[int, int]:
        """(bytes the pages of every table take, bytes of the map): how full
        the index is. Not the file's size, a high-water mark that never
        shrinks while LMDB reuses the pages freed below it."""
        def pages(st: dict) -> int:
            return st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        main = self.env.stat()
        with self.env.begin() as txn:
            used = pages(main) + sum(pages(txn.stat(db)) for db in self.dbs.values())
        return used * main["psize"], self.env.info()["map_size"]

    # ---------------------------------------------------------------- the one way to write

    @contextmanager
    def _failing_as(self, what: str, error: type[SpoolError]) -> Iterator[None]:
        try:
            yield
        except (lmdb.Error, OSError) as exc:
            raise error(failure_text(what, exc, self.env.info()["map_size"])) from None

    @contextmanager
    def write(self, what: str,
              error: type[SpoolError] = SpoolError) -> Iterator[lmdb.Transaction]:
        """ONE write transaction: committed when the block ends, aborted if
        it raises. An LMDB error or OSError raises `error("cannot <what>:
        …")`; anything else the block raises passes through unchanged."""
        with self._failing_as(what, error), self.env.begin(write=True) as txn:
            yield txn

    def sync(self, what: str, error: type[SpoolError] = SpoolError) -> None:
        """Force the last commit to disk, meta page too (it is synced lazily)."""
        with self._failing_as(what, error):
            self.env.sync(True)

    # ---------------------------------------------------------------- shared records

    def message(self, txn: lmdb.Transaction, msgid: int) -> MessageRecord:
        raw = txn.get(R.u64(msgid), db=self.dbs[b"messages"])
        if raw is None:
            raise MessageNotFound(msgid)
        return MessageRecord.decode(raw)

    def recipients(self, txn: lmdb.Transaction, msgid: int,
                   nrcpt: int) -> list[RecipientRecord]:
        rdb = self.dbs[b"recipients"]
        out = []
        for i in range(nrcpt):
            raw = txn.get(R.rcpt_key(msgid, i), db=rdb)
            if raw is None:
                raise RecordError(f"recipient {i} of #{msgid} is missing")
            out.append(RecipientRecord.decode(raw))
        return out

    def recipient_items(self, txn: lmdb.Transaction, msgid: int) -> list[tuple[bytes, bytes]]:
        """Every (key, raw record) of `msgid`'s recipients, whatever its
        message record says (for removing a message, even a corrupt one)."""
        prefix = R.u64(msgid)
        out = []
        cur = txn.cursor(db=self.dbs[b"recipients"])
        if cur.set_range(prefix):
            for key, value in cur:
                if bytes(key[:8]) != prefix:
                    break
                out.append((bytes(key), bytes(value)))
        return out

    def is_held(self, txn: lmdb.Transaction, msgid: int) -> bool:
        """Is `msgid` on hold (queue surgery: no due entries, never delivered)?"""
        held = self.dbs.get(b"held")
        return held is not None and txn.get(R.u64(msgid), db=held) is not None

    def surgery_generation(self) -> int:
        """The counter queue surgery increments (0 if never)."""
        with self.env.begin() as txn:
            raw = txn.get(SURGERY_KEY, db=self.dbs[b"meta"])
        return R.read_u64(raw) if raw is not None else 0

    def bump_surgery(self, txn: lmdb.Transaction) -> None:
        raw = txn.get(SURGERY_KEY, db=self.dbs[b"meta"])
        txn.put(SURGERY_KEY, R.u64((R.read_u64(raw) if raw is not None else 0) + 1),
                db=self.dbs[b"meta"])

    def segments(self, txn: lmdb.Transaction) -> dict[int, bytes]:
        """segment id -> its raw record, for every segment the index knows."""
        return {R.read_u64(k): bytes(v) for k, v in txn.cursor(db=self.dbs[b"segments"])}

    def add_message(self, txn: lmdb.Transaction, msgid: int,
                    envelope: Envelope | EnvelopeRecord, message: bytes, segid: int,
                    offset: int, birth: float) -> None:
        """A new message's records: queued, recipients not yet classified (todo)."""
        dbs = self.dbs
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

    def drop_message(self, txn: lmdb.Transaction, msgid: int, segid: int | None,
                     unlink: list[int]) -> None:
        """Every record of `msgid` (message, recipients and their due
        entries, todo and bounce entries) deleted, and one live message less
        in segment `segid` (appended to `unlink` if that empties it)."""
        dbs = self.dbs
        for rkey, raw in self.recipient_items(txn, msgid):
            # State, channel and next try read in place (no crc check: the
            # key built from them can only name this recipient's own due
            # entry, and a torn one's entry is dropped lazily as dangling).
            if len(raw) >= _RCPT_DUE_END and raw[_RCPT_STATE] in (R.PENDING, R.DEFERRED):
                txn.delete(R.due_key(raw[_RCPT_STATE + 1],
                                     _NEXT_TRY.unpack_from(raw, _RCPT_STATE + 4)[0], msgid,
                                     R.split_rcpt_key(rkey)[1]), db=dbs[b"due"])
            txn.delete(rkey, db=dbs[b"recipients"])
        key = R.u64(msgid)
        for name in (b"messages", b"todo", b"bounces", b"held"):
            txn.delete(key, db=dbs[name])
        if segid is not None:
            self.release_segment(txn, segid, unlink)

    def drop_messages(self, txn: lmdb.Transaction, keys: list[bytes],
                      unlink: list[int], dropped: list[int] | None = None) -> int:
        """drop_message for many messages at once (queue surgery's delete):
        `keys` (8-byte message keys) in ascending order. Walks the tables
        with one cursor each instead of a lookup per key and table, reads
        only the segment id of each message record (its crc checked: a
        segment's live count must not be lowered for a torn record), and
        lowers each segment's live count once. Returns how many of the
        messages existed (their ids appended to `dropped`, if given)."""
        if not keys:
            return 0
        dbs = self.dbs
        mcur = txn.cursor(db=dbs[b"messages"])
        rcur = txn.cursor(db=dbs[b"recipients"])
        due = dbs[b"due"]
        tdelete = txn.delete
        crc32 = zlib.crc32
        released: dict[int, int] = {}
        gone = 0
        for key in keys:
            raw = mcur.pop(key)
            if raw is None:
                continue
            gone += 1
            if dropped is not None:
                dropped.append(int.from_bytes(key, "big"))
            if len(raw) >= _MSG_SEGID_AT + 8 and raw[0] == R.FORMAT_VERSION and \
                    crc32(raw[5:]) == _SEAL.unpack_from(raw)[1]:
                segid = _MSG_SEGID.unpack_from(raw, _MSG_SEGID_AT)[0]
                released[segid] = released.get(segid, 0) + 1
            # else: recover() rebuilds the live counts
            if not rcur.set_range(key):
                continue
            rkey, raw = rcur.item()
            while rkey[:8] == key:
                # As in drop_message: the due key built from fields read in place.
                if len(raw) >= _RCPT_DUE_END and raw[_RCPT_STATE] in _DUE_STATES:
                    ms = int(_NEXT_TRY.unpack_from(raw, _RCPT_STATE + 4)[0] * 1000)
                    tdelete(raw[_RCPT_STATE + 1:_RCPT_STATE + 2] + _DUE_MS.pack(max(0, ms))
                            + rkey, db=due)
                rcur.delete()
                rkey, raw = rcur.item()
        # todo, bounces and held hold few of them (usually none): one walk of
        # each over the keys' range, not a delete per key and table.
        wanted = set(keys)
        last = keys[-1]
        for name in (b"todo", b"bounces", b"held"):
            if name not in dbs:
                continue
            cur = txn.cursor(db=dbs[name])
            if not cur.set_range(keys[0]):
                continue
            k = cur.key()
            while k and k <= last:
                if k in wanted:
                    cur.delete()
                    k = cur.key()
                elif cur.next():
                    k = cur.key()
                else:
                    break
        for segid, n in released.items():
            self.release_segment(txn, segid, unlink, n)
        return gone

    def release_segment(self, txn: lmdb.Transaction, segid: int, unlink: list[int],
                        n: int = 1) -> None:
        """`n` live messages less in `segid`; an empty sealed segment goes."""
        segdb = self.dbs[b"segments"]
        key = R.u64(segid)
        raw = txn.get(key, db=segdb)
        if raw is None:
            return
        try:
            seg = SegmentRecord.decode(raw)
        except RecordError:
            return  # recover() rebuilds segment records from the message records
        live = max(0, seg.live - n)
        if live == 0 and seg.sealed:
            txn.delete(key, db=segdb)
            unlink.append(segid)
        else:
            txn.put(key, dataclasses.replace(seg, live=live).encode(), db=segdb)
