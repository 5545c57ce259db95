"""Queue surgery: choosing messages and holding, releasing, deleting or
requeueing them (Postfix's postsuper and qshape; qmail has none).

`Surgery` is the part of a Spool (engine.queue.spool) the operator's tools
talk to. It reads with plain read transactions (beside a running `qrelay
run`: LMDB has any number of readers) and writes through
SpoolIndex.write(), at most `spool.surgery_batch` messages per transaction,
`spool.surgery_pause` seconds apart, so the spool writer and the scheduler
never wait long for LMDB's lock (which is not fair: a loop that took it
straight back would keep them waiting).

What each change means for the index (crash states C5-C8 of
engine/queue/__init__.py stay as they are):

    hold     a `held` entry; the due entries of its recipients removed, so
             neither due(), jobs(), reschedule_all() (flush) nor a result
             recorded later (apply) makes it due again; preprocess
             classifies a held todo message without making it due; one
             finished with failures is not bounced (bouncing() passes over
             it, apply returns no Finished for it) until released
    release  the `held` entry removed, each unfinished recipient due again
             at the time it had (a time past is due now)
    requeue  released, and each unfinished recipient due now (its attempts
             and last error kept)
    delete   every record gone and the segment's live count decremented, as
             normal completion does (SpoolIndex.drop_messages: the batch's
             messages in one walk of each table); an emptied segment file is
             unlinked after the sync — no bounce

Every such transaction increments the meta counter `surgery`: a running
scheduler compares it before starting deliveries and throws its in-memory
view of due work away when it moved (engine.delivery.scheduler), so a held
or deleted message is never started afterwards. A delivery already under
way when the command commits finishes (as with postsuper); its result for
a deleted message is ignored, for a held one recorded without a due entry;
a requeued one that defers is tried again at once, as after a flush.
"""
from __future__ import annotations

import bisect
import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import lmdb

from engine.queue import records as R
from engine.queue.core import SpoolCore
from engine.queue.records import MessageRecord, RecipientRecord, RecordError

_BIRTH = struct.Struct(">d")
_U16 = struct.Struct(">H")
_HEAD = 5                     # version byte + crc32 in front of every record payload
_ADDR = _HEAD + struct.calcsize(">BBHdH")   # a recipient record's address starts here
UNFINISHED = (R.TODO, R.PENDING, R.DEFERRED)

# qshape's age buckets: the first is `bucket_minutes` wide, each next one twice
# the previous (Postfix: -t 5 -b 10 -> 5 10 20 40 ... 1280 1280+).
SHAPE_BUCKET_MINUTES = 5
SHAPE_BUCKETS = 10

# progress(what, done, total) after each surgery transaction (a long
# command's operator sees how far it is: engine.cli.base.Progress).
Progress = Callable[[str, int, int], None]


@dataclass(slots=True, frozen=True)
class Selection:
    """Which messages: `ids`, or every message whose sender is `sender`
    ("" = <>), older than `older_than` seconds and with an unfinished
    recipient at `domain`, or a failure there not yet bounced (each given
    criterion must hold)."""
    ids: tuple[int, ...] = ()
    domain: str | None = None
    sender: str | None = None
    older_than: float | None = None

    def by_filter(self) -> bool:
        return self.domain is not None or self.sender is not None or self.older_than is not None


@dataclass(slots=True, frozen=True)
class Shape:
    """qshape's table: `buckets` upper bounds in minutes (the last one open),
    `total` per bucket, and (domain, total, per bucket) rows, largest first."""
    buckets: tuple[int, ...]
    total: tuple[int, ...]
    rows: tuple[tuple[str, int, tuple[int, ...]], ...]
    domains: int               # destinations in all (rows may be the top N only)


def bucket_bounds(minutes: int = SHAPE_BUCKET_MINUTES, count: int = SHAPE_BUCKETS) -> list[int]:
    """Upper bounds of the `count` - 1 closed buckets (the last bucket is open)."""
    return [minutes * (1 << i) for i in range(count - 1)]


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Surgery:
    """Selecting and changing messages of one open spool (see module docstring)."""

    def __init__(self, core: SpoolCore, batch: int, pause: float = 0.0):
        self._core = core
        self._index = core.index
        self._dbs = core.index.dbs
        self._batch = max(1, batch)
        self._pause = max(0.0, pause)

    # ---------------------------------------------------------------- reading

    def _keys(self, txn: lmdb.Transaction, domain: bytes | None) -> Iterator[bytes]:
        """Keys of the messages with recipients, in id order; with `domain`
        (lower case), those with a recipient not yet done at it, or failed
        there in a message whose bounce is not yet queued (one held as its
        last attempt failed waits for its release: found by the domain it
        was held by). One pass over the recipients table reading the fields
        in place (the crc is checked only where a record is used to change
        state), the domain compared as the address's tail: no decoding, no
        set per message."""
        cursor = txn.cursor(db=self._dbs[b"recipients"])
        last = None
        if domain is None:
            for key in cursor.iternext(values=False):
                if key[:8] != last:
                    last = key[:8]
                    yield last
            return
        tail = b"@" + domain
        n = len(tail)
        unpack = _U16.unpack_from
        bounces = self._dbs[b"bounces"]
        for key, raw in cursor.iternext():
            if len(raw) < _ADDR or (raw[_HEAD] not in UNFINISHED and raw[_HEAD] != R.FAILED):
                continue
            end = _ADDR + unpack(raw, _ADDR - 2)[0]
            # The part after the last "@" (the domain holds none), or an
            # address without one that is the domain itself.
            if (end - n >= _ADDR and raw[end - n:end].lower() == tail) or \
                    (end - _ADDR == n - 1 and raw[_ADDR:end].lower() == domain):
                if raw[_HEAD] == R.FAILED and txn.get(key[:8], db=bounces) is None:
                    continue
                if key[:8] != last:
                    last = key[:8]
                    yield last

    def select(self, sel: Selection, now: float) -> tuple[list[int], list[int]]:
        """(ids of the messages selected, ids asked for that are not queued)."""
        dbs = self._dbs
        with self._index.env.begin() as txn:
            asked = list(dict.fromkeys(sel.ids))     # each id once, in the order given
            if not sel.by_filter():
                found = [m for m in asked
                         if txn.get(R.u64(m), db=dbs[b"messages"]) is not None]
                chosen = set(found)
                return found, [m for m in asked if m not in chosen]
            wanted = set(asked)
            sender = sel.sender.lower() if sel.sender is not None else None
            domain = sel.domain.lower().rstrip(".") if sel.domain is not None else None
            domain_b = domain.encode("utf-8", "surrogateescape") if domain is not None else None
            messages = txn.cursor(db=dbs[b"messages"])
            read = sel.older_than is not None or sender is not None
            out = []
            for mk in self._keys(txn, domain_b):
                msgid = R.read_u64(mk)
                if wanted and msgid not in wanted:
                    continue
                if not read:
                    if messages.set_key(mk):     # no copy of the record: only whether it is there
                        out.append(msgid)
                    continue
                mval = messages.get(mk)
                if mval is None:
                    continue
                if sel.older_than is not None and \
                        now - _BIRTH.unpack_from(mval, _HEAD)[0] < sel.older_than:
                    continue
                if sender is not None:
                    try:
                        if MessageRecord.decode(mval).sender.lower() != sender:
                            continue
                    except RecordError:
                        continue
                out.append(msgid)
            chosen = set(out)
            return out, [m for m in asked if m not in chosen]

    def shape(self, now: float, top: int = 0, held: bool = False,
              bucket_minutes: int = SHAPE_BUCKET_MINUTES,
              buckets: int = SHAPE_BUCKETS) -> Shape:
        """qshape: messages per destination (each message once per domain of
        its unfinished recipients) by age since birth. `held`: the held
        messages only (Postfix's hold queue), else every other one."""
        bounds = bucket_bounds(bucket_minutes, buckets)
        limits = [b * 60 for b in bounds]
        nb = len(bounds) + 1
        total = [0] * nb
        held_db = self._dbs.get(b"held")
        counts: dict[bytes, list[int]] = {}
        with self._index.env.begin() as txn:
            # One pass over the recipients table with the messages and held
            # tables read in step beside it (all in id order): no lookup per
            # message, and nothing kept per message.
            held_keys = (txn.cursor(db=held_db).iternext(values=False)
                         if held_db is not None else iter(()))
            hkey = next(held_keys, None)
            messages = txn.cursor(db=self._dbs[b"messages"]).iternext()
            mkey, mval = next(messages, (None, None))
            last = None
            skip = True
            b = 0
            seen: set[bytes] = set()
            for key, raw in txn.cursor(db=self._dbs[b"recipients"]).iternext():
                mk = key[:8]
                if mk != last:
                    last = mk
                    while mkey is not None and mkey < mk:
                        mkey, mval = next(messages, (None, None))
                    while hkey is not None and hkey < mk:
                        hkey = next(held_keys, None)
                    skip = mkey != mk or (hkey == mk) != held
                    if not skip:
                        b = bisect.bisect_right(limits,
                                                now - _BIRTH.unpack_from(mval, _HEAD)[0])
                        seen = set()
                if skip or len(raw) < _ADDR or raw[_HEAD] not in UNFINISHED:
                    continue
                addr = raw[_ADDR:_ADDR + _U16.unpack_from(raw, _ADDR - 2)[0]]
                d = addr[addr.rfind(b"@") + 1:].lower()
                if not seen:
                    total[b] += 1
                elif d in seen:
                    continue
                seen.add(d)
                row = counts.get(d)
                if row is None:
                    row = counts[d] = [0] * nb
                row[b] += 1
        rows = sorted(((d.decode("utf-8", "surrogateescape"), sum(r), tuple(r))
                       for d, r in counts.items()),
                      key=lambda x: (-x[1], x[0]))
        return Shape(tuple(bounds), tuple(total), tuple(rows[:top] if top > 0 else rows),
                     len(rows))

    # ---------------------------------------------------------------- changing

    def _chunks(self, ids: Iterable[int]) -> Iterator[list[int]]:
        chunk: list[int] = []
        for msgid in ids:
            chunk.append(msgid)
            if len(chunk) >= self._batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _unfinished(self, txn: lmdb.Transaction, msgid: int
                    ) -> list[tuple[bytes, RecipientRecord]] | None:
        """(key, record) of each recipient still to deliver, or None if the
        message is gone or its records are corrupt (left to the scheduler,
        which quarantines what it finds corrupt)."""
        if txn.get(R.u64(msgid), db=self._dbs[b"messages"]) is None:
            return None
        out = []
        try:
            for key, raw in self._index.recipient_items(txn, msgid):
                r = RecipientRecord.decode(raw)
                if r.state in (R.PENDING, R.DEFERRED):
                    out.append((key, r))
        except RecordError:
            return None
        return out

    def _change(self, ids: Iterable[int], what: str,
                batch: Callable[[lmdb.Transaction, list[int]], int],
                after: Callable[[], None] = lambda: None,
                progress: Progress | None = None) -> int:
        """`batch(txn, chunk)` for each `surgery_batch` of the ids, one
        transaction each (bumping the counter the scheduler watches), `after()`
        once each has committed, then `progress("messages", done, len(ids))`.
        Returns the sum of what `batch` returned (how many messages it
        changed)."""
        ids = list(ids)
        n = done = 0
        for k, chunk in enumerate(self._chunks(ids)):
            if k and self._pause:
                time.sleep(self._pause)   # let a waiting writer have LMDB's lock
            with self._index.write(what) as txn:
                n += batch(txn, chunk)
                self._index.bump_surgery(txn)
            after()
            done += len(chunk)
            if progress is not None:
                progress("messages", done, len(ids))
        return n

    @staticmethod
    def _each(one: Callable[[lmdb.Transaction, int], bool]
              ) -> Callable[[lmdb.Transaction, list[int]], int]:
        """A batch that calls `one(txn, msgid)` for each message of it."""
        return lambda txn, chunk: sum(one(txn, msgid) for msgid in chunk)

    def hold(self, ids: Iterable[int], now: float, progress: Progress | None = None) -> int:
        """Put messages on hold; returns how many were not held before."""
        dbs = self._dbs

        def one(txn: lmdb.Transaction, msgid: int) -> bool:
            if self._index.is_held(txn, msgid):
                return False
            rcpts = self._unfinished(txn, msgid)
            if rcpts is None:
                return False
            for key, r in rcpts:
                _m, idx = R.split_rcpt_key(key)
                txn.delete(R.due_key(r.channel, r.next_try, msgid, idx), db=dbs[b"due"])
            txn.put(R.u64(msgid), _BIRTH.pack(now), db=dbs[b"held"])
            return True
        return self._change(ids, "hold messages", self._each(one), progress=progress)

    def release(self, ids: Iterable[int], now: float, requeue: bool = False,
                progress: Progress | None = None) -> int:
        """Take messages off hold (each recipient due at its own time), or
        with `requeue` make every unfinished recipient due now, held or not.
        Returns how many messages changed."""
        dbs = self._dbs

        def one(txn: lmdb.Transaction, msgid: int) -> bool:
            held = self._index.is_held(txn, msgid)
            if not requeue and not held:
                return False
            rcpts = self._unfinished(txn, msgid)
            if rcpts is None or not (rcpts or held):
                return False        # gone, or only its bounce left and nothing to release
            for key, r in rcpts:
                _m, idx = R.split_rcpt_key(key)
                if requeue:
                    txn.delete(R.due_key(r.channel, r.next_try, msgid, idx), db=dbs[b"due"])
                    r = RecipientRecord(r.state, r.channel, r.attempts, now, r.address, r.text)
                    txn.put(key, r.encode(), db=dbs[b"recipients"])
                txn.put(R.due_key(r.channel, r.next_try, msgid, idx), b"", db=dbs[b"due"])
            txn.delete(R.u64(msgid), db=dbs[b"held"])
            return True
        return self._change(ids, "requeue messages" if requeue else "release messages",
                            self._each(one), progress=progress)

    def delete(self, ids: Iterable[int], deleted: list[int] | None = None,
               progress: Progress | None = None) -> int:
        """Remove messages outright (no bounce); their space is freed as a
        completed message's is. Returns how many were deleted (their ids
        appended to `deleted`, if given, once committed)."""
        unlink: list[int] = []
        dropped: list[int] = []

        def drop(txn: lmdb.Transaction, chunk: list[int]) -> int:
            dropped.clear()
            return self._index.drop_messages(txn, [R.u64(m) for m in chunk], unlink, dropped)

        def remove() -> None:
            self._core.files.remove(unlink)   # after the commit that let them go is synced
            unlink.clear()
            if deleted is not None:
                deleted.extend(dropped)
        # In id order: drop_messages walks each table forward.
        return self._change(sorted(set(ids)), "delete messages", drop, remove, progress)
