"""Repair: checking the spool and putting it right — quarantine, the
recovery scan, re-indexing what stopped writers left, orphan cleanup.

`Repair` is the part of a Spool (engine.queue.spool) that handles the crash
states C2, C3, C9, C10 and C12 of the table in engine/queue/__init__.py. It
never stops the engine for bad data: a corrupt message is copied to
queue/quarantine/ and dropped from the index with a warning, and a write it
cannot make (a full index) is a warning too, tried again later — except in
recover() and cleanup(), whose caller hears of it as a SpoolError.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import lmdb

from engine.queue import records as R
from engine.queue.core import SpoolCore
from engine.queue.records import EnvelopeRecord, MessageRecord, RecipientRecord, RecordError, \
    SegmentRecord
from engine.queue.segments import ENV_MAGIC, SegmentError, record_size, scan, segment_name
from engine.queue.values import RecoveryReport, SpoolError

log = logging.getLogger("qrelay.queue")


class Repair:
    """Quarantine, recover, adopt_tails and cleanup for one open spool.

    `boot_id` is this boot of the machine ("" if unknown); a segment
    written by this process (core.pid) is never adopted here."""

    def __init__(self, core: SpoolCore, quarantine_dir: Path, orphan_grace: float,
                 boot_id: str):
        self._core = core
        self._index = core.index
        self._quarantine_dir = quarantine_dir
        self._grace = orphan_grace
        self._boot_id = boot_id

    # ---------------------------------------------------------------- quarantine (C10)

    def quarantine_after_error(self, msgid: int, exc: BaseException) -> None:
        """Quarantine `msgid`, found corrupt (`exc` says how), in a
        transaction of its own; read-only, only say so."""
        if self._index.readonly:
            self._core.warn(f"warning: trouble with #{msgid}: {exc}")
            return
        unlink: list[int] = []
        try:
            with self._index.write(f"quarantine #{msgid}") as txn:
                if txn.get(R.u64(msgid), db=self._index.dbs[b"messages"]) is None and \
                        not self._index.recipient_items(txn, msgid):
                    # Gone since it was read (`qrelay delete` unlinked its
                    # segment, or it finished): nothing corrupt to keep.
                    return
                line = self._quarantine(txn, msgid, str(exc), unlink)
        except SpoolError as err:
            self._core.warn(f"warning: {err}")
            return
        self._core.warn(line)
        self._core.files.remove(unlink)

    def _quarantine(self, txn: lmdb.Transaction, msgid: int, reason: str,
                    unlink: list[int]) -> str:
        """Copy what is left of a corrupt message into quarantine/ and drop it
        from the index (inside txn); returns the warning to give once that
        is committed. Never raises for bad data."""
        raw_msg = txn.get(R.u64(msgid), db=self._index.dbs[b"messages"])
        parts = [f"reason: {reason}\n".encode()]
        rec = None
        if raw_msg is not None:
            parts.append(b"message-record: " + bytes(raw_msg).hex().encode() + b"\n")
            try:
                rec = MessageRecord.decode(raw_msg)
            except RecordError:
                rec = None
        for _rkey, rval in self._index.recipient_items(txn, msgid):
            parts.append(b"recipient-record: " + rval.hex().encode() + b"\n")
        body = b""
        if rec is not None:
            body = self._core.files.reader.raw(rec.segid, rec.offset, rec.length)
        self._quarantine_dir.mkdir(mode=0o700, exist_ok=True)
        name = f"{msgid}.{int(self._core.clock())}"
        with open(self._quarantine_dir / (name + ".info"), "wb") as f:
            f.write(b"".join(parts))
        if body:
            with open(self._quarantine_dir / (name + ".seg"), "wb") as f:
                f.write(body)
        self._index.drop_message(txn, msgid, rec.segid if rec is not None else None, unlink)
        return f"warning: quarantined #{msgid} to {self._quarantine_dir / name}: {reason}"

    def quarantined(self) -> list[str]:
        """Names of quarantined items (one .info file per message)."""
        try:
            return sorted(p.name for p in self._quarantine_dir.iterdir()
                          if p.suffix == ".info")
        except FileNotFoundError:
            return []

    # ---------------------------------------------------------------- the recovery scan

    def recover(self, verify_bytes: bool, now: float | None,
                own: int | None) -> RecoveryReport:
        """Check the whole index (and with verify_bytes every message's bytes),
        quarantine what is corrupt, drop dangling entries, rebuild segment live
        counts, remove orphan segment files. `own`: this process's current
        segment. O(messages). Safe while receivers enqueue."""
        now = self._core.clock() if now is None else now
        report = RecoveryReport()
        dbs = self._index.dbs
        bad: dict[int, str] = {}
        live: dict[int, int] = {}
        with self._index.env.begin() as txn:
            # One message at a time: only the live count per segment and the
            # bad ones are kept, never a record per queued message.
            for key, value in txn.cursor(db=dbs[b"messages"]):
                msgid = R.read_u64(key)
                report.messages += 1
                try:
                    rec = MessageRecord.decode(value)
                    rcpts = self._index.recipients(txn, msgid, rec.nrcpt)
                    done = sum(r.state in R.FINISHED_STATES for r in rcpts)
                    if rec.nrcpt - done != rec.remaining:
                        raise RecordError("remaining count disagrees with recipients")
                except RecordError as exc:
                    bad[msgid] = str(exc)
                    continue
                if verify_bytes:
                    try:
                        self._core.files.reader.read(rec.segid, rec.offset, msgid, rec.length)
                    except SegmentError as exc:
                        bad[msgid] = str(exc)
                        continue
                    except OSError as exc:   # no proof of corruption: left queued
                        self._core.warn(f"warning: cannot read #{msgid} in segment "
                                        f"{rec.segid}: {exc.strerror or exc}")
                live[rec.segid] = live.get(rec.segid, 0) + 1
            dangling = _dangling_entries(txn, dbs)
            segs = self._index.segments(txn)
        unlink: list[int] = []
        lines: list[str] = []
        with self._index.write("repair the spool index") as txn:
            for msgid, reason in bad.items():
                lines.append(self._quarantine(txn, msgid, reason, unlink))
                report.quarantined.append(msgid)
            for name, key in dangling:
                if txn.delete(key, db=dbs[name]):
                    report.dangling_removed += 1
            for segid, raw in segs.items():
                report.segments_fixed += self._fix_segment(txn, segid, raw,
                                                           live.get(segid, 0), own, now,
                                                           unlink, lines)
        for line in lines:
            self._core.warn(line)
        self._core.files.remove(unlink)
        report.orphan_segments_removed = self.cleanup(now, own)
        return report

    def _fix_segment(self, txn: lmdb.Transaction, segid: int, raw: bytes, want: int,
                     own: int | None, now: float, unlink: list[int], lines: list[str]) -> int:
        """Make segment `segid`'s record say what recover() counted (`want`
        live messages), sealing it if its writer is gone (C9) and letting it
        go if it is empty and sealed. Returns 1 if it changed, else 0."""
        segdb = self._index.dbs[b"segments"]
        try:
            seg = SegmentRecord.decode(raw)
        except RecordError:
            seg = SegmentRecord(-1, False, 0, now)
        # Re-read: messages committed since the snapshot count too.
        cur = txn.get(R.u64(segid), db=segdb)
        if cur is not None and cur != raw:
            return 0
        gone = not seg.sealed and segid != own and self._writer_gone(seg)
        if gone:  # what it answered but never indexed goes in first (C9)
            n = self._adopt_tail_now(txn, segid, seg, lines)
            if n:
                seg = SegmentRecord.decode(txn.get(R.u64(segid), db=segdb))
                want += n
        sealed = seg.sealed or gone
        if want == 0 and sealed:
            txn.delete(R.u64(segid), db=segdb)
            unlink.append(segid)
            return 1
        if seg.live == want and sealed == seg.sealed:
            return 0
        if seg.live != want and segid != own and seg.pid != self._core.pid and pid_alive(seg.pid):
            return 0  # a live writer may have committed since the snapshot
        txn.put(R.u64(segid), dataclasses.replace(seg, live=want, sealed=sealed).encode(),
                db=segdb)
        return 1

    # ---------------------------------------------------------------- tails (C2, C9, C12)

    def adopt_tails(self) -> int:
        """Index what writers that are gone left unindexed (C2) and seal their
        segments (C9, as recover() does), so one goes as soon as its last
        message is finished instead of at the scheduler's next start. The
        scheduler calls it every few seconds, so a receiver or spool writer
        that died while the rest ran on does not leave its answered messages
        waiting for a restart. Cheap when there is nothing to do: no write
        transaction then. The reader slots dead processes left go too
        (SpoolIndex.free_dead_readers)."""
        self._index.free_dead_readers()
        with self._index.env.begin() as txn:
            segs = self._index.segments(txn)
        gone = []
        for segid, raw in segs.items():
            try:
                seg = SegmentRecord.decode(raw)
            except RecordError:
                continue
            if not seg.sealed and self._writer_gone(seg):
                gone.append(segid)
        if not gone:
            return 0
        segdb = self._index.dbs[b"segments"]
        lines: list[str] = []
        unlink: list[int] = []
        restored = 0
        try:
            with self._index.write("index what a stopped writer left") as txn:
                for segid in gone:
                    key = R.u64(segid)
                    raw = txn.get(key, db=segdb)
                    try:
                        seg = SegmentRecord.decode(raw) if raw is not None else None
                    except RecordError:
                        continue
                    if seg is None or seg.sealed:
                        continue
                    n = self._adopt_tail_now(txn, segid, seg, lines)
                    if n:
                        seg = SegmentRecord.decode(txn.get(key, db=segdb))
                    restored += n
                    if seg.live <= 0:
                        txn.delete(key, db=segdb)
                        unlink.append(segid)
                    else:
                        txn.put(key, dataclasses.replace(seg, sealed=True).encode(), db=segdb)
        except SpoolError as exc:  # e.g. a full map: the bytes wait for the next try
            self._core.warn(f"warning: {exc}")
            return 0
        for line in lines:
            self._core.warn(line)
        self._core.files.remove(unlink)
        return restored

    def reindex(self, after_reboot: bool) -> int:
        """Index what writers that are gone left past the indexed end of their
        unsealed segments (C2, C12); run at every writable open (with
        `after_reboot` if this boot of the machine may not have been seen
        yet). Returns how many messages were put back.

        A caller hears of its message once its segment sync is done; the
        index commit follows. A writer that died in between (or a machine
        crash that undid the index's last commit, whose meta page is synced
        lazily) leaves whole records past the end the index knows, with each
        message's envelope beside its bytes. Sealed segments hold no such
        tail (a segment is sealed only after all its batches were indexed),
        and the segments of live writers are theirs to index. After a machine
        restart every writer is gone, and ids move past every id and segment
        file on disk (the id counter's last commit may be undone too)."""
        lines: list[str] = []
        try:
            with self._index.write("index what a stopped writer left") as txn:
                restored = self._reindex(txn, after_reboot and bool(self._boot_id), lines)
        except SpoolError as exc:  # e.g. a full map: the bytes wait for the next try
            self._core.warn(f"warning: {exc}")
            return 0
        for line in lines:
            self._core.warn(line)
        return restored

    def _reindex(self, txn: lmdb.Transaction, after_reboot: bool, lines: list[str]) -> int:
        dbs = self._index.dbs
        meta = dbs[b"meta"]
        if after_reboot:
            boot = txn.get(b"boot_id", db=meta)
            after_reboot = boot is None or bytes(boot) != self._boot_id.encode()
        if after_reboot:
            next_id = R.read_u64(txn.get(b"next_id", db=meta))
            cur = txn.cursor(db=dbs[b"messages"])
            if cur.last():
                next_id = max(next_id, R.read_u64(cur.key()) + 1)
            next_id = max([next_id] + [segid + 1 for segid in self._core.files.ids()])
            txn.put(b"next_id", R.u64(next_id), db=meta)
        restored = 0
        for key, raw in list(txn.cursor(db=dbs[b"segments"])):
            try:
                seg = SegmentRecord.decode(raw)
            except RecordError:
                continue  # recover() rebuilds it
            if seg.sealed or seg.end < 0 or not (after_reboot or self._writer_gone(seg)):
                continue
            restored += self._adopt_tail_now(txn, R.read_u64(key), seg, lines)
        if after_reboot:
            txn.put(b"boot_id", self._boot_id.encode(), db=meta)
        return restored

    def _writer_gone(self, seg: SegmentRecord) -> bool:
        """Whether the process that wrote into `seg` is gone (so nothing of it
        is still on its way to the index)."""
        if seg.pid == self._core.pid:
            # This process (maybe through another Spool of it, whose index
            # stage may be about to take that very tail): never adopted here.
            return False
        if not pid_alive(seg.pid):
            return True
        now = process_start(seg.pid) if seg.started else 0
        return now != 0 and now != seg.started   # another process has its pid now

    def _adopt_tail_now(self, txn: lmdb.Transaction, segid: int, seg: SegmentRecord,
                        lines: list[str]) -> int:
        """_adopt_tail, with the id counter moved past what it found and a
        warning added to `lines` (the caller's to say once txn is committed);
        returns how many messages it indexed."""
        n, last = self._adopt_tail(txn, segid, seg)
        meta = self._index.dbs[b"meta"]
        if last >= R.read_u64(txn.get(b"next_id", db=meta)):
            txn.put(b"next_id", R.u64(last + 1), db=meta)
        if n:
            lines.append(f"warning: indexed {n} message(s) that a writer which stopped left "
                         f"unindexed in segment {segid}")
        return n

    def _adopt_tail(self, txn: lmdb.Transaction, segid: int,
                    seg: SegmentRecord) -> tuple[int, int]:
        """Index (inside txn) every whole QENV+QMSG pair of segment `segid`
        past its indexed end; a torn or unmatched record ends the tail (it is
        what a crash cut short: no caller heard of it). Returns how many were
        indexed and the highest id seen."""
        messages = self._index.dbs[b"messages"]
        envelope, live, end, restored, last = None, seg.live, seg.end, 0, 0
        try:
            for magic, msgid, offset, body in scan(self._core.files.path(segid), seg.end):
                if magic == ENV_MAGIC:
                    envelope = (msgid, EnvelopeRecord.decode(body))
                    continue
                if envelope is None or envelope[0] != msgid:
                    break
                env, envelope = envelope[1], None
                end = offset + record_size(len(body))
                last = max(last, msgid)
                if txn.get(R.u64(msgid), db=messages) is not None:
                    continue
                self._index.add_message(txn, msgid, env, body, segid, offset, env.birth)
                self._adopted_import(txn, msgid)
                live += 1
                restored += 1
        except RecordError:
            pass  # an envelope that does not decode ends the tail like a torn record
        except OSError as exc:
            self._core.warn(f"warning: cannot read segment {segid}: {exc}")
        if end != seg.end:
            txn.put(R.u64(segid), dataclasses.replace(seg, live=live, end=end).encode(),
                    db=self._index.dbs[b"segments"])
        return restored, last

    def _adopted_import(self, txn: lmdb.Transaction, msgid: int) -> None:
        """`msgid`, just indexed from its segment, may be an import's whose
        index commit never came (the import was killed): its key is marked
        adopted, so the next run of the import neither writes it again (a
        scheduler may deliver it meanwhile) nor forgets its states
        (Intake.import_batch)."""
        db = self._index.dbs.get(b"imported")
        if db is None:
            return
        reverse = R.reserved_import_key(msgid)
        key = txn.get(reverse, db=db)
        if key is not None:
            txn.delete(reverse, db=db)
            txn.put(bytes(key), R.u64(msgid) + R.IMPORT_ADOPTED, db=db)

    # ---------------------------------------------------------------- orphans (C3, C7)

    def cleanup(self, now: float | None, own: int | None) -> list[str]:
        """Remove segment files that no index record knows about and that are
        older than orphan_grace (bytes of enqueues that never committed), and
        abandoned empty segments of dead writers. `own`: this process's
        current segment. Returns the names removed."""
        now = self._core.clock() if now is None else now
        removed: list[str] = []
        ids = self._core.files.ids()
        if not ids:
            return removed
        with self._index.env.begin() as txn:
            known = self._index.segments(txn)
        for segid in ids:
            if segid == own:
                continue
            path = self._core.files.path(segid)
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            raw = known.get(segid)
            if raw is not None:
                if not self._forget_empty_segment(segid, raw, path, age):
                    continue
            elif age < self._grace:
                continue
            self._core.files.remove([segid])
            removed.append(segment_name(segid))
            log.info("removed orphan segment %s", segment_name(segid))
        return removed

    def _forget_empty_segment(self, segid: int, raw: bytes, path: Path, age: float) -> bool:
        """Drop the record of a known segment that holds nothing any more: an
        empty, unsealed segment whose writer is gone (or idle past
        orphan_grace, longer than segment_max_age, so it will rotate rather
        than append again). True if its file may go."""
        try:
            seg = SegmentRecord.decode(raw)
        except RecordError:
            return False
        if seg.live > 0 or seg.sealed or (pid_alive(seg.pid) and age < self._grace):
            return False
        segdb = self._index.dbs[b"segments"]
        lines: list[str] = []
        with self._index.write(f"forget empty segment {segid}") as txn:
            if txn.get(R.u64(segid), db=segdb) != raw:
                return False
            adopted = False
            if 0 <= seg.end < path.stat().st_size:  # bytes past the indexed end
                if not self._writer_gone(seg):
                    return False
                # it holds answered messages after all: it stays
                adopted = self._adopt_tail_now(txn, segid, seg, lines) > 0
            if not adopted:
                txn.delete(R.u64(segid), db=segdb)
        for line in lines:
            self._core.warn(line)
        return not adopted


def _dangling_entries(txn: lmdb.Transaction, dbs: dict) -> list[tuple[bytes, bytes]]:
    """(table, key) of every todo, bounce, due and recipient entry whose
    message (or, for a due entry, whose recipient state) is gone."""
    dangling = []
    for name in (b"todo", b"bounces"):
        for key in txn.cursor(db=dbs[name]).iternext(values=False):
            if txn.get(key, db=dbs[b"messages"]) is None:
                dangling.append((name, bytes(key)))
    for key in txn.cursor(db=dbs[b"due"]).iternext(values=False):
        _c, _t, msgid, idx = R.split_due_key(key)
        raw = txn.get(R.rcpt_key(msgid, idx), db=dbs[b"recipients"])
        ok = False
        if raw is not None and txn.get(R.u64(msgid), db=dbs[b"messages"]) is not None:
            try:
                r = RecipientRecord.decode(raw)
                ok = r.state in (R.PENDING, R.DEFERRED) and \
                    R.due_key(r.channel, r.next_try, msgid, idx) == key
            except RecordError:
                ok = False
        if not ok:
            dangling.append((b"due", bytes(key)))
    # Recipient records whose message record is gone.
    prev, orphaned = None, False
    for key in txn.cursor(db=dbs[b"recipients"]).iternext(values=False):
        msgid = R.split_rcpt_key(key)[0]
        if msgid != prev:
            prev = msgid
            orphaned = txn.get(R.u64(msgid), db=dbs[b"messages"]) is None
        if orphaned:
            dangling.append((b"recipients", bytes(key)))
    return dangling


def process_start(pid: int) -> int:
    """When process `pid` started, in clock ticks since boot (0 if unknown):
    with the pid, it names one process (pids are reused, start times not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def pid_alive(pid: int) -> bool:
    """Running: a zombie (killed, not yet reaped, e.g. an orphan waiting
    for init) is dead for this purpose."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
