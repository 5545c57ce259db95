"""engine.queue — the spool: crash-safe, group-committed, O(log n) per operation.

What it owns: every file under ROOT/queue/ —

    queue/index/        LMDB environment (data.mdb, lock.mdb): the truth about
                        every message (envelope, per-recipient state, due times)
    queue/segments/     <segid>.seg: message bytes, appended in batches by each
                        writer process to its own segment (engine.queue.segments)
    queue/quarantine/   <msgid>.<time>.info/.seg: what was left of corrupt messages

Nothing else may read or write these; other parts go through `Spool`.

Layout: `Spool` (engine.queue.spool) is a thin front; each job is a part
it holds (composition), and every call goes to the part that owns it:

    engine.queue.index     SpoolIndex: the LMDB environment, its tables, the
                           records the parts share, and the ONE write-
                           transaction helper, SpoolIndex.write() (see Faults)
    engine.queue.segfiles  SegmentFiles: reading segment bytes back, removing
                           segment files only after the index sync
    engine.queue.intake    Intake: enqueue/submit, ids, this process's segment,
                           the three commit stages (steps 1-4 below)
    engine.queue.ledger    Ledger: per-recipient state — todo, preprocess, due,
                           jobs, apply, bouncing/release, reschedule_all, views
    engine.queue.repair    Repair: quarantine, recover, re-indexing the tails
                           stopped writers left (adopt_tails), orphan cleanup
    engine.queue.surgery   Surgery: selection, qshape, hold/release/requeue/
                           delete (queue surgery beside a running scheduler)
    engine.queue.core      SpoolCore: what the three parts share (index, files,
                           clock, warn, pid)
with engine.queue.committer (the group-commit pipeline), segments (segment
file format, writer, reader), records (index record formats), values
(public values and errors) and writer (the single writer process).

Receiver API (contract B)
-------------------------
    spool = Spool(queue_dir)                       # open or create; one per process, after fork
    # or, with the single writer (see below): same enqueue/submit/close
    spool = open_spool_writer(queue_dir, settings.spool)   # from engine.queue.writer
    msgid = spool.enqueue(Envelope(...), data)     # blocking; durable and indexed on return
    msgid = await spool.submit(Envelope(...), data)  # asyncio; group commit; durable on return
    spool.close()
SpoolWriteError (disk full, write/sync/commit error) means the caller must not
count on the message (SMTP: 451; it may still be delivered: at least once).

Write path and commit point
---------------------------
Group commit per process (engine.queue.committer, driven by
engine.queue.intake), a pipeline of threads:
  1. write stage: waits for a free sync slot, then takes every request that
     arrived meanwhile and appends the batch to this process's segment with
     ONE pwrite: per message an envelope record (QENV) and a bytes record
     (QMSG), each with magic, format version, msgid, length, crc32 and END
     marker + msgid;
  2. sync slots: ONE fdatasync per batch, started as soon as the batch is
     written; up to `spool.sync_depth` (8) run at once, each on its own
     descriptor of the segment (so each sees any writeback error);
  3. **commit point: the batch's sync is done** — the message and its
     envelope are durable in the segment, and submit() returns (the 250
     after DATA);
  4. index stage: every synced batch, in the order they were written, goes
     into ONE LMDB write transaction: message records, recipient records,
     todo entries, segment live counts and indexed end. LMDB syncs its data
     pages at the commit; its meta page by the next commit (metasync off,
     `spool.index_metasync`). enqueue() (tools, tests) returns only now, so
     its caller can read what it wrote; `spool.ack_after_index = true` makes
     submit() wait for it too.
A message waits for one sync: not for a sync that began before it was
written (slots overlap) nor for the index. A failed sync fails its batch
(SpoolWriteError, 451) and the segment is abandoned; a later sync of the
same segment that returns after it fails too. A failed index commit with
answered messages in it is retried (0.5 s doubling to 10 s) while new
requests fail at once (451) — the answered messages are durable in their
segment, and at worst the next open indexes them. Message ids come from an
index counter, reserved in blocks (setting id_block) so allocation costs one
commit per block; ids are unique, increasing per process, with gaps. A new
segment is registered in the index, durably, before anything in it is
answered.

Between the commit point and the index commit a message exists only in its
segment. What makes that safe: the index knows, for each segment, the end of
what it has indexed, and a segment is sealed only after all its batches are
indexed. Every writable open (a restarted writer, `qrelay run`, a tool that
writes) runs Repair.reindex() (engine.queue.repair), which indexes the
whole QENV+QMSG pairs past that end in each unsealed
segment whose writer is gone (its pid is not running, or was reused by a
process started after the segment) and moves the id counter past every id
it finds (C2). The same scan covers a machine crash that undid the index's
last commit (C12): after a restart (the boot id differs from the one in the
index) every writer is gone, and ids move past every segment file too.
Segment files are unlinked only after an explicit index sync, so an undone
commit never points into a deleted file.

Crash states and recovery (cf. qmail, spec §5.4)
------------------------------------------------
| # | segment bytes | index record | meaning | recovery |
|---|---|---|---|---|
| C1 | torn tail (partial record) | none | crash during step 1 or 2 | ignored: the scan of C2 stops at it; the next batch of a new writer uses a new segment; the bytes go when the segment is deleted. Caller never got an id (SMTP client got no 250, retries). |
| C2 | complete + fdatasync'd | none | crash between step 3 and 4 (or between step 1 and 3: the bytes survive a process crash in the page cache), or the index commit failed | the next writable open finds them past the indexed end of the writer's unsealed segment and indexes them as queued (todo), logging `warning: indexed N message(s) that a writer which stopped left unindexed`. Answered messages are never lost; one whose client got no 250 may be delivered too (at least once, as qmail). |
| C3 | new segment file, no `segments` entry | none | crash before its registration committed | orphan: nothing in it was answered; cleanup()/recover() remove it once older than orphan_grace (36 h). |
| C4 | complete | committed, todo entry | normal, or crash after step 4 | queued ("not yet preprocessed"). |
| C5 | complete | preprocessed, due entries | normal | due() finds it; deliveries retried after restart. |
| C6 | complete | delivered remotely but mark not committed | crash during delivery | redelivered (at least once, as qmail's T→D). |
| C7 | complete | last recipient marked, no failures | message records deleted and segment live count decremented in the same txn | segment file unlinked after commit when live = 0 and sealed; a crash before the unlink leaves a segment with no entry: removed after orphan_grace. |
| C8 | complete | finished with failures: `bounces` entry | waiting for the bounce to be queued | bouncing() lists it again after restart; release() after the bounce is queued (a crash in between = the bounce is queued twice at worst). |
| C9 | unsealed segment, writer died | `segments` entry, sealed = 0 | writer killed | its tail is indexed first (C2), then recover() or the scheduler's periodic adopt_tails() seals it (same transaction); it is deleted when its last message finishes (at once if none is left). |
| C10 | any | record with bad crc / unknown version / inconsistent fields, or bytes whose header, crc or END marker do not match | disk corruption, bug | the message is copied to quarantine/ and dropped from the index with a `warning: quarantined #N` log line; the engine goes on. Found lazily by due()/read_message()/apply(), or all at once by recover(verify_bytes=True). The index never points at bytes whose sync had not finished, so a torn record is never indexed. |
| C11 | any of the above | any of the above | the single writer process dies | its Spool is in one of C1–C8; every request in flight fails with SpoolWriteError in the receivers (451; the client resends, so a message committed just before the crash may be queued twice — at least once); receivers commit directly until a writer answers again, and the restarted writer indexes the dead one's tail (C2). |
| C12 | whole records past the indexed end of an unsealed segment | the commit that indexed them undone by a machine crash (meta page not yet synced) | power loss / kernel crash | as C2, at the first writable open after the restart; ids move past every id and segment file on disk, since the id counter's last commit may be undone too. Sealed segments are not scanned: sealing commits after all their batches are indexed. |
LMDB itself is copy-on-write with a double meta page: a crash leaves the index
at a committed transaction (the last, or after a machine crash possibly the
one before it: C12), never torn.

Who handles each state: C1, C3 and a C7 crash's leftover segment —
Repair.cleanup (also run by recover); C2, C9, C12 — Repair.reindex at
every writable open and Repair.adopt_tails from the scheduler, C9's seal
in Repair.recover; C4-C8 — the Ledger's transactions; C10 —
Repair.quarantine_after_error, called by the Ledger when a read finds a
corrupt record or bytes, and Repair.recover; C11 — Intake in each receiver
(direct commits) and engine.queue.writer.

Faults: an OSError while writing the segment truncates it back to the batch
start (else the segment is abandoned) and raises SpoolWriteError; a failed
sync abandons the segment and raises SpoolWriteError for its batch. Every
write transaction (and forced index sync) goes through ONE helper,
SpoolIndex.write() (engine.queue.index): an LMDB error — MapFullError, a
full disk (ENOSPC), anything else — or an OSError inside it aborts the
transaction and raises SpoolError with one line, "cannot <what>: <why>"
(a full map: "... the spool index is full (its map of N bytes is used up;
raise [spool] index_map_bytes)"). On intake's paths it is SpoolWriteError:
enqueue() callers get it, answered batches are retried and new requests get
it until the index takes them. The scheduler's calls (preprocess, apply,
release, reschedule_all, recover, cleanup) raise SpoolError, the failed
transaction having changed nothing; `qrelay flush` prints it as one line. Writes nobody waits for —
quarantining what a reader found corrupt, re-indexing a stopped writer's
tail, dropping stale due entries, sealing segments at close, the index sync
before a segment file is removed — give a warning and are tried again later.
Opening a spool whose meta/format is newer than FORMAT_VERSION raises
SpoolVersionError.

Warnings ("warning: quarantined #N to …", "warning: indexed N message(s)
that a writer which stopped left …", "warning: cannot …") go to
`Spool(…, warn=callable)`, one line per call; the default logs them to the
`qrelay.queue` logger, as before; a hook that raises falls back to it. (The
group committer's own warnings about a failing index commit still go to
that logger.)

Scheduler API (all in Spool, handed to its Ledger and Repair; durable on
return; O(log n) each)
--------------------------------------------------------------
    todo(limit) -> [msgid]                 # queued, not preprocessed (oldest first)
    envelope(msgid) -> Envelope
    preprocess(msgid, channels, addresses=None, now=None) -> Finished | None
        # channels[i] in {"local","remote"}; addresses[i] optionally rewritten;
        # every recipient becomes due `now`; leaves todo in the same txn
    due(now, limit, channel=None, exclude=()) -> [Job]   # earliest first
        # Job: msgid, index, address, channel, attempts, next_try, birth,
        #      sender, size, origin, last_error. Due entries stay until marked:
        #      pass in-flight (msgid, index) pairs as `exclude`.
    next_due(channel=None) -> float | None  # earliest due time, for sleeping
    read_message(msgid, limit=0) -> bytes   # MessageQuarantined if corrupt, MessageUnreadable (later)
    preprocess_many([(msgid, channels[, addresses])], now) -> [Finished | None]
    jobs([(msgid, index)], now, channel) -> [Job]  # those still due, in order
    apply([Delivered(m,i) | Deferred(m,i,next_try,error) | Failed(m,i,reason)])
        -> [Finished | None]                # many results, ONE durable txn
    mark_delivered(m,i) / mark_failed(m,i,reason) -> Finished | None
    mark_deferred(m,i,next_try,error)
    bouncing(limit) -> [Finished]           # finished with failures, not released nor held
    release(msgid)                          # after the bounce is queued
    reschedule_all(now) -> int              # ALRM / flush: all deferred due now
    commit(results, preprocess, now, reschedule, releases) -> (applied, preprocessed, moved)
        # apply + reschedule_all + preprocess_many + release of each bounced
        # message in ONE durable txn (the scheduler's group commit, run in
        # its commit thread)
    recover(verify_bytes=False) -> RecoveryReport   # at scheduler start
    adopt_tails() -> int                    # stopped writers' tails (every few s)
    cleanup(now) -> [names]                 # orphan segments (also in recover)
Finished(msgid, sender, failed=((addr, reason),...), delivered, size, birth,
origin, released). When a message finishes with no failures its records and
bytes are released at once (released=True). With failures it stays (qread
shows "bouncing") until release(): this deviates from "released at once" so a
crash between the last mark and queueing the bounce cannot lose the bounce —
qmail likewise keeps info/N until the bounce is injected.

Queue surgery (engine.queue.surgery) and imports: select(Selection) and
shape() read; hold, release_held, requeue and delete change messages in
short transactions that bump a counter (surgery_generation) the scheduler
checks before starting deliveries. import_messages(ImportedMessage...) adds
messages with their birth and recipients' states (qrelay import-qmail; the
crash-safe order is in Intake.import_batch); engine.queue.qmailqueue reads
qmail's queue for it.

Counts and tools: stats() -> SpoolStats(messages, not_preprocessed) reads the
entry counts of the `messages` and `todo` tables (O(1)). "Not yet
preprocessed" = in `todo`: enqueued, recipients not yet classified local /
remote by the scheduler (qmail's todo/). iter_messages() yields
QueuedMessage for qread; Spool(path, readonly=True) is for tools.

Several processes: LMDB's writer lock vs a single writer process
----------------------------------------------------------------
Chosen: **a single writer process** (engine.queue.writer). Receivers enqueue
through `open_spool_writer(queue_dir, settings)` — a SpoolClient talking to
`run_writer(queue_dir)` over QUEUE/writer.sock — and the writer's Spool
group-commits the messages of all receivers together. The alternative is
every receiver opening the spool and taking LMDB's cross-process writer
lock: then each process commits its own smaller batches, each commit holding
the lock through its sync, so on a slow disk the processes queue for it; the
single writer makes one batch of everyone's messages. The price — one more
hop through a socket and one process every receiver depends on — is small
and covered: if the writer is unreachable a receiver commits directly (the
LMDB lock makes that safe beside a running writer) and retries the writer
every second; requests in flight when the writer dies fail with
SpoolWriteError (451) and the client resends. The scheduler, qstat and qread
keep opening the spool directly (reads and marks), which LMDB's lock
serialises with the writer. `spool.single_writer = false` makes
open_spool_writer return a direct Spool. The measurements behind the choice
(bench/spool_writer_proto.py, bench/bench_ingest.py, bench/bench_relay_e2e.py)
are in the README's Development section.
"""
from engine.queue.records import FORMAT_VERSION
from engine.queue.spool import (Deferred, Delivered, Envelope, Failed, Finished,
                                ImportedMessage, ImportedRecipient, Job,
                                MessageNotFound, MessageQuarantined, MessageTooBig,
                                MessageUnreadable,
                                QueuedMessage,
                                RecipientView, RecoveryReport, Result, Spool, SpoolError,
                                SpoolStats, SpoolVersionError, SpoolWriteError)
from engine.queue.values import AddressTooLong

__all__ = ["FORMAT_VERSION", "Deferred", "Delivered", "Envelope", "Failed", "Finished",
           "ImportedMessage", "ImportedRecipient", "Job",
           "AddressTooLong", "MessageNotFound", "MessageQuarantined", "MessageTooBig",
           "MessageUnreadable",
           "QueuedMessage",
           "RecipientView",
           "RecoveryReport", "Result", "Spool", "SpoolError", "SpoolStats",
           "SpoolVersionError", "SpoolWriteError"]
