"""engine.queue — the spool: crash-safe, group-committed, O(log n) per operation.

What it owns: every file under ROOT/queue/ —

    queue/index/        LMDB environment (data.mdb, lock.mdb): the truth about
                        every message (envelope, per-recipient state, due times)
    queue/segments/     <segid>.seg: message bytes, appended in batches by each
                        writer process to its own segment (engine.queue.segments)
    queue/quarantine/   <msgid>.<time>.info/.seg: what was left of corrupt messages

Nothing else may read or write these; other parts go through `Spool`.

Receiver API (contract B)
-------------------------
    spool = Spool(queue_dir)                       # open or create; one per process, after fork
    # or, with the single writer (see below): same enqueue/submit/close
    spool = open_spool_writer(queue_dir, settings.spool)   # from engine.queue.writer
    msgid = spool.enqueue(Envelope(...), data)     # blocking; durable on return
    msgid = await spool.submit(Envelope(...), data)  # asyncio; group commit
    spool.close()
SpoolWriteError (disk full, write/commit error) means nothing was committed.

Write path and commit point
---------------------------
Two commit threads per process (engine.queue.committer), a pipeline:
  1. write stage: takes every request that arrived while it was busy and
     appends the batch to this process's segment with ONE pwrite: per
     message an envelope record (QENV) and a bytes record (QMSG), each with
     magic, format version, msgid, length, crc32 and END marker + msgid;
  2. the batch goes to the index stage at once, and the write stage makes
     it durable with ONE fdatasync meanwhile (`spool.parallel_sync`);
  3. index stage: commits every written batch that is ready in ONE LMDB
     write transaction: message records, recipient records, todo entries,
     segment live counts and indexed end. LMDB syncs its data pages at the
     commit; its meta page is synced by the next commit (metasync off,
     `spool.index_metasync`), so the commit costs one sync, not two;
  4. only when BOTH the segment sync and the index commit are done are the
     callers' futures resolved: enqueue/submit return (250 after DATA).
**Commit point: the segment fdatasync and the index commit, both done.**
A caller waits for the slower of the two syncs, not their sum; while batch N
is indexed, batch N+1 is written. A sync that fails after the index
committed takes the batch out of the index again before its callers hear
(SpoolWriteError). `spool.parallel_sync = false` indexes a batch only after
its sync; `spool.pipelined_commit = false` runs everything in one thread.
Message ids come from an index counter, reserved in blocks (setting id_block)
so allocation costs one commit per block; ids are unique, increasing per
process, with gaps. A new segment is registered in the index before
anything is written to it.

What a machine crash (not a process crash: the page cache survives those)
can undo, and why nothing acknowledged is lost: the index's LAST commit (its
meta page may not have reached the disk). Every message of that commit lies,
whole and fdatasync'd, in an unsealed segment past the end the index knows,
with its envelope beside it; the first writable open after the machine
restarted (the boot id differs from the one in the index) indexes those
messages again and moves the id counter past every id and segment on disk
(C12). Segment files are unlinked only after an explicit index sync, so an
undone commit never points into a deleted file.

Crash states and recovery (cf. qmail, spec §5.4)
------------------------------------------------
| # | segment bytes | index record | meaning | recovery |
|---|---|---|---|---|
| C1 | torn tail (partial record) | none | crash during step 1 | ignored: no record points at it; the next batch of a new writer uses a new segment; the bytes go when the segment is deleted. Caller never got an id (SMTP client got no 250, retries). |
| C2 | complete + fdatasync'd | none | crash between step 1 and 3, or the commit failed | garbage, as C1 (also truncated back on a write error); after a machine restart an unsealed segment's tail is re-indexed (C12), so such a message may be delivered although its client got no 250 — at least once. |
| C3 | new segment file, no `segments` entry | none | crash before the first commit into it | orphan: cleanup()/recover() remove it once older than orphan_grace (36 h). |
| C4 | complete | committed, todo entry | crash after step 3, before the caller heard | queued ("not yet preprocessed"); a client that got no 250 may resend: at-least-once, as qmail. |
| C5 | complete | preprocessed, due entries | normal | due() finds it; deliveries retried after restart. |
| C6 | complete | delivered remotely but mark not committed | crash during delivery | redelivered (at least once, as qmail's T→D). |
| C7 | complete | last recipient marked, no failures | message records deleted and segment live count decremented in the same txn | segment file unlinked after commit when live = 0 and sealed; a crash before the unlink leaves a segment with no entry: removed after orphan_grace. |
| C8 | complete | finished with failures: `bounces` entry | waiting for the bounce to be queued | bouncing() lists it again after restart; release() after the bounce is queued (a crash in between = the bounce is queued twice at worst). |
| C9 | unsealed segment, writer died | `segments` entry, sealed = 0 | writer killed | recover() seals it (pid gone); it is deleted when its last message finishes. |
| C10 | any | record with bad crc / unknown version / inconsistent fields, or bytes whose header, crc or END marker do not match | disk corruption, bug | the message is copied to quarantine/ and dropped from the index with a `warning: quarantined #N` log line; the engine goes on. Found lazily by due()/read_message()/apply(), or all at once by recover(verify_bytes=True). |
| C12 | whole records past the indexed end of an unsealed segment | the commit that indexed them undone by a machine crash (meta page not yet synced) | power loss / kernel crash after the callers got their ids | first writable open after the restart (boot id changed): re-indexed from their QENV+QMSG records as queued (todo), `warning: re-indexed N message(s)` logged; scan stops at the first torn record. Sealed segments and segments never registered are not scanned: their tails only hold batches whose callers got no id (C1–C3). |
| C13 | torn: the sync never finished | committed (parallel order: the index committed while the segment synced) | machine crash between the two | the callers got no id. Only the last batch indexed into a segment can be in this state (the next batch is written after this one's sync); its first id is in the segment's record, so the first writable open after the restart checks that batch's bytes and quarantines what is torn, with the reason `torn by a machine crash before its segment sync finished, so its client got no 250`. |
| C11 | any of the above | any of the above | the single writer process dies | its Spool is in one of C1–C8; every request in flight fails with SpoolWriteError in the receivers (451; the client resends, so a message committed just before the crash may be queued twice — at least once); receivers commit directly until a writer answers again. |
LMDB itself is copy-on-write with a double meta page: a crash leaves the index
at a committed transaction (the last, or after a machine crash possibly the
one before it: C12), never torn.

Faults: an OSError while writing/syncing the segment truncates it back to the
batch start (else the segment is abandoned) and raises SpoolWriteError; an
LMDB error (e.g. MapFullError) aborts the transaction and raises
SpoolWriteError. Opening a spool whose meta/format is newer than
FORMAT_VERSION raises SpoolVersionError.

Scheduler API (all in Spool; durable on return; O(log n) each)
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
    read_message(msgid) -> bytes            # MessageQuarantined if corrupt
    apply([Delivered(m,i) | Deferred(m,i,next_try,error) | Failed(m,i,reason)])
        -> [Finished | None]                # many results, ONE durable txn
    mark_delivered(m,i) / mark_failed(m,i,reason) -> Finished | None
    mark_deferred(m,i,next_try,error)
    bouncing(limit) -> [Finished]           # finished with failures, not released
    release(msgid)                          # after the bounce is queued
    reschedule_all(now) -> int              # ALRM / flush: all deferred due now
    recover(verify_bytes=False) -> RecoveryReport   # at scheduler start
    cleanup(now) -> [names]                 # orphan segments (also in recover)
Finished(msgid, sender, failed=((addr, reason),...), delivered, size, birth,
origin, released). When a message finishes with no failures its records and
bytes are released at once (released=True). With failures it stays (qread
shows "bouncing") until release(): this deviates from "released at once" so a
crash between the last mark and queueing the bounce cannot lose the bounce —
qmail likewise keeps info/N until the bounce is injected.

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
group-commits the messages of all receivers together. The alternative, every
receiver opening the spool and taking LMDB's cross-process writer lock, was
measured against it with bench/spool_writer_proto.py (4 receiver processes ×
8 producer threads, 1 KB, 2 s rounds, shared 2-core box; measured before the
commit became one sync per path, when segment sync and index commit ran one
after the other and LMDB synced its meta page too):

| disk | LMDB writer lock | single writer (SpoolClient) | writer ÷ lock |
|---|---|---|---|
| plain | 9,126 / 4,999 msg/s | 12,355 / 7,568 msg/s | 1.35 / 1.51 |
| every sync +5 ms (LD_PRELOAD shim) | 352 / 335 msg/s | 1,194 / 1,070 msg/s | 3.4 / 3.2 |

Why: with the lock, each process commits its own (smaller) batches and each
commit holds the lock through LMDB's syncs, so the processes queue for
it; the single writer makes one batch of everyone's messages, so a slow disk
costs each message one commit's latency, not N. The price — one more hop
through a socket and one process every receiver depends on — is small and
covered: if the writer is unreachable a receiver commits directly (the LMDB
lock makes that safe beside a running writer) and retries the writer every
second; requests in flight when the writer dies fail with SpoolWriteError
(451) and the client resends. The scheduler, qstat and qread keep opening
the spool directly (reads and marks), which LMDB's lock serialises with
the writer.
Setting `spool.single_writer = false` makes open_spool_writer return a direct
Spool (the measured alternative).

Measured again through `qrelay run` (bench/bench_ingest.py, 2 receivers, 20
SMTP sessions, 1 KB, quiet machine): plain disk, writer 3,940-3,990 msg/s vs
direct 4,620-4,630 msg/s (the extra hop costs ~15 % of CPU on 2 cores); every
sync +5 ms (`--slow-sync-ms 5`), writer 700 msg/s vs direct 476 msg/s (1.47x).
With the one-sync commit (32 sessions, 8,000 messages, two rounds): plain,
writer 3,660-4,830 vs direct 5,300-5,760 msg/s; sync +5 ms, writer
2,510-2,600 vs direct 1,440-1,460 msg/s (1.75x).
The writer stays the default because a slow disk is what this spool is for.
"""
from engine.queue.records import FORMAT_VERSION
from engine.queue.spool import (Deferred, Delivered, Envelope, Failed, Finished, Job,
                                MessageNotFound, MessageQuarantined, QueuedMessage,
                                RecipientView, RecoveryReport, Result, Spool, SpoolError,
                                SpoolStats, SpoolVersionError, SpoolWriteError)

__all__ = ["FORMAT_VERSION", "Deferred", "Delivered", "Envelope", "Failed", "Finished", "Job",
           "MessageNotFound", "MessageQuarantined", "QueuedMessage", "RecipientView",
           "RecoveryReport", "Result", "Spool", "SpoolError", "SpoolStats",
           "SpoolVersionError", "SpoolWriteError"]
