"""The ledger: every queued message and the state of each of its recipients.

`Ledger` is the part of a Spool (engine.queue.spool) the scheduler and the
tools talk to: what is queued (todo, stats, message views, the bytes), what
is due (due, jobs, next_due), and every change of a recipient's state —
preprocess, delivery results (apply), bouncing/release, reschedule_all —
each in ONE durable transaction (crash states C4–C8 of the table in
engine/queue/__init__.py). It writes only through SpoolIndex.write(), so a
full index is a SpoolError to its caller, never an lmdb.Error. It never
adds a message (engine.queue.intake does) and never repairs one: what it
finds corrupt it hands to `quarantine` (engine.queue.repair).
"""
from __future__ import annotations

import heapq
from typing import Callable, Container, Iterable, Iterator, Mapping, Sequence

import lmdb

from engine.queue import records as R
from engine.queue.core import SpoolCore
from engine.queue.records import MessageRecord, RecipientRecord, RecordError
from engine.queue.segments import SegmentError
from engine.queue.values import (Deferred, Envelope, Failed, Finished, Job, MessageNotFound,
                                 MessageQuarantined, MessageUnreadable, QueuedMessage,
                                 RecipientView, Result, SpoolError, SpoolStats)

# reschedule_all (a flush) moves the deferred entries this many at a time:
# what it holds in memory does not grow with the queue.
RESCHEDULE_CHUNK = 1000


class Ledger:
    """Reading and changing the recipients' states of one open spool.

    `quarantine(msgid, error)` takes away a message found corrupt."""

    def __init__(self, core: SpoolCore, quarantine: Callable[[int, BaseException], None]):
        self._core = core
        self._index = core.index
        self._dbs = core.index.dbs
        self._quarantine = quarantine

    def _tidy(self, unlink: Iterable[int], corrupt: Mapping[int, BaseException]) -> None:
        """After a transaction: remove the segments it emptied, quarantine
        the messages it found corrupt."""
        self._core.files.remove(unlink)
        for msgid, exc in corrupt.items():
            self._quarantine(msgid, exc)

    # ---------------------------------------------------------------- counts & reading

    def stats(self) -> SpoolStats:
        """(messages in queue, not yet preprocessed) — O(1), for qstat."""
        with self._index.env.begin() as txn:
            return SpoolStats(txn.stat(self._dbs[b"messages"])["entries"],
                              txn.stat(self._dbs[b"todo"])["entries"])

    def read_message(self, msgid: int, limit: int = 0) -> bytes:
        """The message bytes (with `limit`, only its first `limit` bytes; the
        whole message is checked all the same). MessageNotFound if gone;
        MessageQuarantined if corrupt; MessageUnreadable when the system
        would not let us read it (a permission, a disk error, no descriptor
        left): quarantining then would drop a message that is whole, and
        copy nothing of it."""
        try:
            with self._index.env.begin() as txn:
                rec = self._index.message(txn, msgid)
            reader = self._core.files.reader
            if limit:
                return reader.read_head(rec.segid, rec.offset, msgid, rec.length, limit)
            return reader.read(rec.segid, rec.offset, msgid, rec.length)
        except (RecordError, SegmentError) as exc:
            self._quarantine(msgid, exc)
            raise MessageQuarantined(f"#{msgid}: {exc}") from None
        except OSError as exc:
            raise MessageUnreadable(f"#{msgid}: {exc.strerror or exc}") from None

    def iter_messages(self, chunk: int = 1000) -> Iterator[QueuedMessage]:
        """Every queued message in id order (for qread); corrupt ones are skipped
        with a warning (read-only: quarantining is left to the scheduler)."""
        mdb = self._dbs[b"messages"]
        start = b""
        while True:
            batch: list[QueuedMessage] = []
            with self._index.env.begin() as txn:
                cur = txn.cursor(db=mdb)
                if not cur.set_range(start):
                    return
                for key, value in cur:
                    msgid = R.read_u64(key)
                    try:
                        batch.append(self._view(txn, msgid, value))
                    except RecordError as exc:
                        self._core.warn(f"warning: trouble with #{msgid}: {exc}")
                    if len(batch) >= chunk:
                        break
                start = R.u64(msgid + 1)
                more = len(batch) >= chunk
            yield from batch
            if not more:
                return

    def _view(self, txn: lmdb.Transaction, msgid: int, value: bytes) -> QueuedMessage:
        rec = MessageRecord.decode(value)
        rcpts = self._index.recipients(txn, msgid, rec.nrcpt)
        preprocessed = txn.get(R.u64(msgid), db=self._dbs[b"todo"]) is None
        views = tuple(RecipientView(r.address, R.CHANNEL_NAMES[r.channel], R.STATE_NAMES[r.state],
                                    r.state in R.FINISHED_STATES, r.attempts, r.next_try, r.text)
                      for r in rcpts)
        return QueuedMessage(msgid, rec.birth, rec.length, rec.sender, rec.origin, rec.pid,
                             rec.uid, preprocessed, rec.nfailed > 0, views,
                             self._index.is_held(txn, msgid))

    def message_info(self, msgid: int) -> QueuedMessage:
        """One message's envelope and recipient states."""
        with self._index.env.begin() as txn:
            raw = txn.get(R.u64(msgid), db=self._dbs[b"messages"])
            if raw is None:
                raise MessageNotFound(msgid)
            try:
                return self._view(txn, msgid, raw)
            except RecordError as exc:
                err = exc
        self._quarantine(msgid, err)
        raise MessageQuarantined(f"#{msgid}: {err}")

    def todo(self, limit: int = 100) -> list[int]:
        """Ids of messages queued but not yet preprocessed, oldest first."""
        out = []
        with self._index.env.begin() as txn:
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

    # ---------------------------------------------------------------- preprocess (C4 -> C5)

    def preprocess_many(self, items: Sequence[tuple], now: float | None = None,
                        strict: bool = False) -> list[Finished | None]:
        """preprocess() for many messages in ONE durable transaction.

        items: (msgid, channels) or (msgid, channels, addresses). Unless
        `strict`, a message that is gone or already preprocessed is skipped
        (None), so a scheduler can replay a batch after a crash.
        """
        now = self._core.clock() if now is None else now
        unlink: list[int] = []
        corrupt: dict[int, BaseException] = {}
        try:
            with self._index.write("preprocess messages") as txn:
                out = self._preprocess_in(txn, items, now, strict, unlink, corrupt)
        except RecordError as exc:
            self._quarantine(items[0][0], exc)
            raise MessageQuarantined(f"#{items[0][0]}: {exc}") from None
        self._tidy(unlink, corrupt)
        return out

    def _preprocess_in(self, txn: lmdb.Transaction, items: Sequence[tuple], now: float,
                       strict: bool, unlink: list[int],
                       corrupt: dict[int, BaseException]) -> list[Finished | None]:
        out: list[Finished | None] = []
        for item in items:
            msgid, channels = item[0], item[1]
            addresses = item[2] if len(item) > 2 else None
            try:
                out.append(self._preprocess_one(txn, msgid, channels, addresses, now, unlink))
            except RecordError as exc:
                if strict:
                    raise
                corrupt[msgid] = exc
                out.append(None)
            except SpoolError:
                if strict:
                    raise
                out.append(None)
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
        rec = self._index.message(txn, msgid)
        rcpts = self._index.recipients(txn, msgid, rec.nrcpt)
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
        held = self._index.is_held(txn, msgid)   # classified, but not due until released
        for i, r in enumerate(rcpts):
            addr = addresses[i] if addresses is not None else r.address
            txn.put(R.rcpt_key(msgid, i),
                    RecipientRecord(R.PENDING, codes[i], 0, now, addr).encode(),
                    db=dbs[b"recipients"])
            if not held:
                txn.put(R.due_key(codes[i], now, msgid, i), b"", db=dbs[b"due"])
        txn.delete(key, db=dbs[b"todo"])
        if rec.nrcpt == 0:
            return self._finish(txn, msgid, rec, [], unlink)
        return None

    # ---------------------------------------------------------------- what is due (C5, C6)

    def due(self, now: float | None = None, limit: int = 100, channel: str | None = None,
            exclude: Container[tuple[int, int]] = (),
            after: tuple[float, int, int] | None = None) -> list[Job]:
        """Up to `limit` jobs due at or before `now`, earliest first (see
        Spool.due). Cost: O(log n + limit + len(skipped))."""
        now = self._core.clock() if now is None else now
        codes = [R.LOCAL, R.REMOTE] if channel is None else [R.CHANNEL_CODES[channel]]
        per_channel: list[list[Job]] = []
        corrupt: dict[int, BaseException] = {}
        dangling: list[bytes] = []
        with self._index.env.begin() as txn:
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
        (on `channel`, if given), in the order given: O(log n) per key."""
        now = self._core.clock() if now is None else now
        codes = (R.LOCAL, R.REMOTE) if channel is None else (R.CHANNEL_CODES[channel],)
        upper_ms = R.time_ms(now)
        out: list[Job] = []
        corrupt: dict[int, BaseException] = {}
        dangling: list[bytes] = []
        rdb = self._dbs[b"recipients"]
        with self._index.env.begin() as txn:
            msg_cache: dict[int, MessageRecord] = {}
            for msgid, idx in keys:
                if msgid in corrupt or self._index.is_held(txn, msgid):
                    continue
                raw = txn.get(R.rcpt_key(msgid, idx), db=rdb)
                if raw is None:
                    continue  # finished and released meanwhile
                try:
                    r = RecipientRecord.decode(raw)
                except RecordError as exc:
                    corrupt[msgid] = exc
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
                 msg_cache: dict[int, MessageRecord], corrupt: dict[int, BaseException],
                 dangling: list[bytes]) -> Job | None:
        """The Job for due entry `key`, or None (noting a dangling entry or a
        corrupt message for _after_due_read)."""
        try:
            rec = msg_cache.get(msgid)
            if rec is None:
                rec = msg_cache[msgid] = self._index.message(txn, msgid)
            raw = txn.get(R.rcpt_key(msgid, idx), db=self._dbs[b"recipients"])
            if raw is None:
                raise RecordError(f"recipient {idx} missing")
            r = RecipientRecord.decode(raw)
        except MessageNotFound:
            dangling.append(bytes(key))
            return None
        except RecordError as exc:
            corrupt[msgid] = exc
            return None
        if r.state not in (R.PENDING, R.DEFERRED) or \
                R.due_key(r.channel, r.next_try, msgid, idx) != key:
            dangling.append(bytes(key))
            return None
        return Job(msgid, idx, r.address, R.CHANNEL_NAMES[r.channel], r.attempts,
                   r.next_try, rec.birth, rec.sender, rec.length, rec.origin, r.text)

    def _after_due_read(self, corrupt: Mapping[int, BaseException],
                        dangling: list[bytes]) -> None:
        if dangling:
            try:
                with self._index.write("drop stale due entries") as txn:
                    for key in dangling:
                        txn.delete(key, db=self._dbs[b"due"])
            except SpoolError as exc:
                self._core.warn(f"warning: {exc}")
        self._tidy((), corrupt)

    def next_due(self, channel: str | None = None) -> float | None:
        """Time of the earliest due recipient (to know how long to sleep), or None."""
        codes = [R.LOCAL, R.REMOTE] if channel is None else [R.CHANNEL_CODES[channel]]
        best = None
        with self._index.env.begin() as txn:
            cur = txn.cursor(db=self._dbs[b"due"])
            for code in codes:
                if cur.set_range(R.due_prefix(code)) and cur.key()[0] == code:
                    t = R.split_due_key(cur.key())[1] / 1000
                    best = t if best is None else min(best, t)
        return best

    # ---------------------------------------------------------------- results (C5 -> C7/C8)

    def apply(self, results: Sequence[Result]) -> list[Finished | None]:
        """Record many delivery results in ONE durable transaction (see Spool.apply)."""
        return self.commit(results)[0]

    def commit(self, results: Sequence[Result] = (), preprocess: Sequence[tuple] = (),
               now: float | None = None, reschedule: bool = False,
               releases: Sequence[int] = ()
               ) -> tuple[list[Finished | None], list[Finished | None], int]:
        """The scheduler's group commit: apply(results), then (with
        `reschedule`) reschedule_all(now), then preprocess_many(preprocess,
        now), then release() of each of `releases` (one gone or not finished
        is passed over), in ONE durable transaction, so all of them share
        its sync. Returns (apply's list, preprocess_many's list, number
        rescheduled); an index failure raises one SpoolError and changes
        nothing."""
        now = self._core.clock() if now is None else now
        applied: list[Finished | None] = []
        unlink: list[int] = []
        corrupt: dict[int, BaseException] = {}
        with self._index.write("record delivery results" if results or not preprocess
                               else "preprocess messages") as txn:
            for res in results:
                try:
                    applied.append(self._apply_one(txn, res, unlink))
                except RecordError as exc:
                    corrupt[res.msgid] = exc
                    applied.append(None)
            moved = self._reschedule_in(txn, now) if reschedule else 0
            preprocessed = self._preprocess_in(txn, preprocess, now, False, unlink, corrupt)
            for msgid in releases:
                try:
                    self._release_in(txn, msgid, unlink)
                except RecordError as exc:
                    corrupt[msgid] = exc
                except SpoolError:
                    pass        # gone (deleted meanwhile), or not finished
        self._tidy(unlink, corrupt)
        return applied, preprocessed, moved

    def _apply_one(self, txn: lmdb.Transaction, res: Result,
                   unlink: list[int]) -> Finished | None:
        dbs = self._dbs
        try:
            rec = self._index.message(txn, res.msgid)
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
            nr = RecipientRecord(R.DEFERRED, r.channel, r.attempts + res.attempted,
                                 res.next_try, r.address, res.error)
            txn.put(rkey, nr.encode(), db=dbs[b"recipients"])
            if not self._index.is_held(txn, res.msgid):  # held meanwhile: due once released
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
        rcpts = self._index.recipients(txn, res.msgid, rec.nrcpt)
        return self._finish(txn, res.msgid, rec, rcpts, unlink)

    def _finish(self, txn: lmdb.Transaction, msgid: int, rec: MessageRecord,
                rcpts: list[RecipientRecord], unlink: list[int]) -> Finished | None:
        failed = tuple((r.address, r.text) for r in rcpts if r.state == R.FAILED)
        delivered = tuple(r.address for r in rcpts if r.state == R.DELIVERED)
        key = R.u64(msgid)
        if failed:
            # Keep the message (and its bytes) until the bounce is queued:
            # a crash before release() makes the scheduler bounce again.
            txn.put(key, rec.encode(), db=self._dbs[b"messages"])
            txn.put(key, b"", db=self._dbs[b"bounces"])
            if self._index.is_held(txn, msgid):
                return None   # its bounce waits too: bouncing() lists it once released
        else:
            self._index.drop_message(txn, msgid, rec.segid, unlink)
        return Finished(msgid, rec.sender, failed, delivered, rec.length, rec.birth,
                        rec.origin, released=not failed)

    def bouncing(self, limit: int = 100) -> list[Finished]:
        """Finished messages with failures whose bounce is not yet released
        (after a restart the scheduler queues their bounce again), except
        those on hold."""
        out = []
        with self._index.env.begin() as txn:
            for key in txn.cursor(db=self._dbs[b"bounces"]).iternext(values=False):
                msgid = R.read_u64(key)
                if self._index.is_held(txn, msgid):
                    continue   # on hold: no bounce either until released
                try:
                    rec = self._index.message(txn, msgid)
                    rcpts = self._index.recipients(txn, msgid, rec.nrcpt)
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
            with self._index.write(f"release #{msgid}") as txn:
                self._release_in(txn, msgid, unlink)
        except MessageNotFound:
            return
        except RecordError as exc:
            self._tidy((), {msgid: exc})
            return
        self._tidy(unlink, {})

    def _release_in(self, txn: lmdb.Transaction, msgid: int, unlink: list[int]) -> None:
        rec = self._index.message(txn, msgid)
        if rec.remaining > 0:
            raise SpoolError(f"#{msgid} still has {rec.remaining} recipients to do")
        self._index.drop_message(txn, msgid, rec.segid, unlink)

    def reschedule_all(self, now: float | None = None) -> int:
        """Make every deferred recipient due `now` (qmail's ALRM / flush).
        Returns how many were moved. One transaction, O(number deferred)."""
        now = self._core.clock() if now is None else now
        with self._index.write("reschedule deferred recipients") as txn:
            return self._reschedule_in(txn, now)

    def _reschedule_in(self, txn: lmdb.Transaction, now: float) -> int:
        moved = 0
        for code in (R.LOCAL, R.REMOTE):
            start = R.due_upper(code, now)
            while True:
                # RESCHEDULE_CHUNK keys at a time, not every deferred one in a
                # list: each key read is deleted, and the entry it makes sorts
                # before `start`, so the next read from `start` finds the rest.
                cur = txn.cursor(db=self._dbs[b"due"])
                keys = []
                if cur.set_range(start):
                    for key in cur.iternext(values=False):
                        if key[0] != code or len(keys) >= RESCHEDULE_CHUNK:
                            break
                        keys.append(bytes(key))
                if not keys:
                    break
                moved += self._reschedule_keys(txn, keys, code, now)
        return moved

    def _reschedule_keys(self, txn: lmdb.Transaction, keys: list[bytes], code: int,
                         now: float) -> int:
        moved = 0
        dbs = self._dbs
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
