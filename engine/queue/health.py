"""The queue's health at a glance, for `qrelay doctor`: one read pass over the index.

`queue_health(spool)` answers what an operator asks first about a queue:
how many messages, how old the oldest, how many not yet preprocessed (and
since when), how many recipients wait on a retry, and which destinations
hold them with the last error each one gave. It reads in ONE read
transaction (any number of readers run beside `qrelay run`) and never
writes; a read-only Spool is enough.

Cost: O(messages + recipients) with no record fully decoded except one per
destination (its last error): 250,000 messages in well under a second. Only
the first bytes of each record are read (the layouts of engine.queue.records:
a message's birth, a recipient's state and address); a torn record is
counted as `unreadable`, never raised — quarantining is the scheduler's job.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from engine.queue import records as R
from engine.queue.records import RecipientRecord, RecordError

_HEAD = 5                          # version byte + crc32 before every record payload
_BIRTH = struct.Struct(">d")       # MessageRecord's first field
_RCPT = struct.Struct(">BBHdH")    # RecipientRecord: state, channel, attempts, next_try, alen


@dataclass(slots=True, frozen=True)
class Destination:
    """Deferred recipients of one domain, and the error of the one retried last."""
    domain: str
    deferred: int
    last_error: str
    next_try: float                # the latest retry time among them


@dataclass(slots=True, frozen=True)
class QueueHealth:
    messages: int
    not_preprocessed: int
    oldest_birth: float | None         # None: empty queue
    oldest_todo_birth: float | None    # oldest message not yet preprocessed
    pending: int                       # recipients classified, not yet tried
    deferred: int                      # recipients waiting for a retry
    bouncing: int                      # finished messages whose bounce is not yet queued
    destinations: tuple[Destination, ...]   # most deferred first, at most `top`
    destination_count: int             # domains with deferred recipients in all
    unreadable: int                    # records that did not parse
    held: int = 0                      # messages on hold (qrelay hold)


def queue_health(spool, top: int = 10, domain: str | None = None) -> QueueHealth:
    """Read `spool` (an engine.queue.Spool, read-only is enough) once.
    `domain`: listed in `destinations` too (after the top ones), if it has
    deferred recipients."""
    index = spool.index
    dbs = index.dbs
    pending = deferred = unreadable = 0
    counts: dict[bytes, int] = {}
    latest: dict[bytes, tuple[float, bytes]] = {}    # domain -> (next_try, rcpt key)
    oldest = oldest_todo = None
    with index.env.begin() as txn:
        messages = 0
        unpack_birth = _BIRTH.unpack_from
        for value in txn.cursor(db=dbs[b"messages"]).iternext(keys=False, values=True):
            messages += 1
            if len(value) >= _HEAD + 8:
                birth = unpack_birth(value, _HEAD)[0]
                if oldest is None or birth < oldest:
                    oldest = birth
            else:
                unreadable += 1
        todo = txn.cursor(db=dbs[b"todo"])
        if todo.first():
            raw = txn.get(todo.key(), db=dbs[b"messages"])
            if raw is not None and len(raw) >= _HEAD + 8:
                oldest_todo = unpack_birth(raw, _HEAD)[0]
        not_preprocessed = txn.stat(dbs[b"todo"])["entries"]
        bouncing = txn.stat(dbs[b"bounces"])["entries"]
        held_db = dbs.get(b"held")
        held = txn.stat(held_db)["entries"] if held_db is not None else 0
        unpack = _RCPT.unpack_from
        start = _HEAD + _RCPT.size
        for key, value in txn.cursor(db=dbs[b"recipients"]).iternext():
            if len(value) <= _HEAD:
                unreadable += 1
                continue
            state = value[_HEAD]
            if state == R.PENDING:
                pending += 1
            elif state == R.DEFERRED:
                deferred += 1
                try:
                    _, _, _, next_try, alen = unpack(value, _HEAD)
                except struct.error:
                    unreadable += 1
                    continue
                address = value[start:start + alen]
                dest = address[address.rfind(b"@") + 1:].lower()
                counts[dest] = counts.get(dest, 0) + 1
                seen = latest.get(dest)
                if seen is None or next_try > seen[0]:
                    latest[dest] = (next_try, key)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max(top, 0)]
        wanted = domain.lower().encode("utf-8", "surrogateescape") if domain else None
        if wanted in counts and all(d != wanted for d, _ in ranked):
            ranked.append((wanted, counts[wanted]))
        destinations = []
        for dest, count in ranked:
            next_try, key = latest[dest]
            try:
                text = RecipientRecord.decode(txn.get(key, db=dbs[b"recipients"])).text
            except (RecordError, TypeError):
                text = ""
            destinations.append(Destination(R.decode_text(dest), count, text, next_try))
    return QueueHealth(messages, not_preprocessed, oldest, oldest_todo, pending, deferred,
                       bouncing, tuple(destinations), len(counts), unreadable, held)
