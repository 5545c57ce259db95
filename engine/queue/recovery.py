"""Checking and repairing the spool: quarantine, recovery scan, orphan cleanup.

`SpoolRecovery` is mixed into `Spool` and works on its index and segment
directory (it owns no state of its own). It never stops the engine for bad
data: a corrupt message is copied to queue/quarantine/ and dropped from the
index with a log line. See engine/queue/__init__.py for the crash-state table.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import lmdb

from engine.queue import records as R
from engine.queue.records import (EnvelopeRecord, MessageRecord, RecipientRecord, RecordError,
                                  SegmentRecord)
from engine.queue.segments import (ENV_MAGIC, SegmentError, parse_segment_name, record_size,
                                   scan, segment_name)
from engine.queue.values import RecoveryReport

log = logging.getLogger("qrelay.queue")


class SpoolRecovery:
    """Quarantine and recovery methods of Spool (see engine.queue.spool)."""

    # ---------------------------------------------------------------- quarantine & recovery

    def _quarantine_after_error(self, msgid: int, exc: BaseException) -> None:
        if self.readonly:
            log.warning("warning: trouble with #%d: %s", msgid, exc)
            return
        try:
            with self.env.begin(write=True) as txn:
                unlink: list[int] = []
                self._quarantine(txn, msgid, str(exc), unlink)
            self._unlink_segments(unlink)
        except (lmdb.Error, OSError) as err:
            log.warning("warning: cannot quarantine #%d: %s", msgid, err)

    def _quarantine(self, txn: lmdb.Transaction, msgid: int, reason: str,
                    unlink: list[int]) -> None:
        """Copy what is left of a corrupt message into quarantine/ and drop it
        from the index (inside txn). Never raises for bad data."""
        dbs = self._dbs
        key = R.u64(msgid)
        raw_msg = txn.get(key, db=dbs[b"messages"])
        parts = [f"reason: {reason}\n".encode()]
        rec = None
        if raw_msg is not None:
            parts.append(b"message-record: " + bytes(raw_msg).hex().encode() + b"\n")
            try:
                rec = MessageRecord.decode(raw_msg)
            except RecordError:
                rec = None
        rkeys = []
        cur = txn.cursor(db=dbs[b"recipients"])
        if cur.set_range(key):
            for rkey, rval in cur:
                if bytes(rkey[:8]) != key:
                    break
                rkeys.append(bytes(rkey))
                parts.append(b"recipient-record: " + bytes(rval).hex().encode() + b"\n")
                try:
                    r = RecipientRecord.decode(rval)
                    if r.state in (R.PENDING, R.DEFERRED):
                        txn.delete(R.due_key(r.channel, r.next_try, msgid,
                                             R.split_rcpt_key(rkey)[1]), db=dbs[b"due"])
                except RecordError:
                    pass
        body = b""
        if rec is not None:
            body = self._reader.raw(rec.segid, rec.offset, rec.length)
        self._quarantine_dir.mkdir(mode=0o700, exist_ok=True)
        name = f"{msgid}.{int(self._clock())}"
        with open(self._quarantine_dir / (name + ".info"), "wb") as f:
            f.write(b"".join(parts))
        if body:
            with open(self._quarantine_dir / (name + ".seg"), "wb") as f:
                f.write(body)
        for rkey in rkeys:
            txn.delete(rkey, db=dbs[b"recipients"])
        txn.delete(key, db=dbs[b"messages"])
        txn.delete(key, db=dbs[b"todo"])
        txn.delete(key, db=dbs[b"bounces"])
        if rec is not None:
            self._release_segment(txn, rec.segid, unlink)
        log.warning("warning: quarantined #%d to %s: %s", msgid,
                    self._quarantine_dir / name, reason)

    def quarantined(self) -> list[str]:
        """Names of quarantined items (one .info file per message)."""
        try:
            return sorted(p.name for p in self._quarantine_dir.iterdir()
                          if p.suffix == ".info")
        except FileNotFoundError:
            return []

    def recover(self, verify_bytes: bool = False, now: float | None = None) -> RecoveryReport:
        """Check the whole index (and with verify_bytes every message's bytes),
        quarantine what is corrupt, drop dangling entries, rebuild segment live
        counts, remove orphan segment files. Run by the scheduler at start;
        O(messages). Safe while receivers enqueue."""
        self._check_process()
        now = self._clock() if now is None else now
        report = RecoveryReport()
        dbs = self._dbs
        bad: dict[int, str] = {}
        live: dict[int, int] = {}
        good: list[tuple[int, MessageRecord]] = []
        with self.env.begin() as txn:
            for key, value in txn.cursor(db=dbs[b"messages"]):
                msgid = R.read_u64(key)
                report.messages += 1
                try:
                    rec = MessageRecord.decode(value)
                    rcpts = self._recipients(txn, msgid, rec.nrcpt)
                    done = sum(r.state in R.FINISHED_STATES for r in rcpts)
                    if rec.nrcpt - done != rec.remaining:
                        raise RecordError("remaining count disagrees with recipients")
                except RecordError as exc:
                    bad[msgid] = str(exc)
                    continue
                good.append((msgid, rec))
            if verify_bytes:
                for msgid, rec in good:
                    try:
                        self._reader.read(rec.segid, rec.offset, msgid, rec.length)
                    except (SegmentError, OSError) as exc:
                        bad[msgid] = str(exc)
            for msgid, rec in good:
                if msgid not in bad:
                    live[rec.segid] = live.get(rec.segid, 0) + 1
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
            segs = {R.read_u64(k): bytes(v) for k, v in txn.cursor(db=dbs[b"segments"])}
        unlink: list[int] = []
        with self.env.begin(write=True) as txn:
            for msgid, reason in bad.items():
                self._quarantine(txn, msgid, reason, unlink)
                report.quarantined.append(msgid)
            for name, key in dangling:
                if txn.delete(key, db=dbs[name]):
                    report.dangling_removed += 1
            own = self._writer.segid if self._writer is not None else None
            for segid, raw in segs.items():
                try:
                    seg = SegmentRecord.decode(raw)
                except RecordError:
                    seg = SegmentRecord(-1, False, 0, now)
                # Re-read: messages committed since our snapshot count too.
                cur = txn.get(R.u64(segid), db=dbs[b"segments"])
                if cur is not None and cur != raw:
                    continue
                want = live.get(segid, 0)
                gone = not seg.sealed and segid != own and self._writer_gone(seg)
                if gone:  # what it answered but never indexed goes in first (C9)
                    n = self._adopt_tail_now(txn, segid, seg)
                    if n:
                        seg = SegmentRecord.decode(txn.get(R.u64(segid), db=dbs[b"segments"]))
                        want += n
                sealed = seg.sealed or gone
                if want == 0 and sealed:
                    txn.delete(R.u64(segid), db=dbs[b"segments"])
                    unlink.append(segid)
                    report.segments_fixed += 1
                elif seg.live != want or sealed != seg.sealed:
                    if seg.live != want and segid != own and seg.pid != self._pid \
                            and _pid_alive(seg.pid):
                        continue  # a live writer may have committed since our snapshot
                    txn.put(R.u64(segid),
                            dataclasses.replace(seg, live=want, sealed=sealed).encode(),
                            db=dbs[b"segments"])
                    report.segments_fixed += 1
        self._unlink_segments(unlink)
        report.orphan_segments_removed = self.cleanup(now)
        return report

    def adopt_tails(self) -> int:
        """Index what writers that are gone left unindexed (C2); the scheduler
        calls it every few seconds, so a receiver that died while the rest
        ran on does not leave its answered messages waiting for a restart.
        Cheap when there is nothing to do: no write transaction then."""
        self._check_process()
        with self.env.begin() as txn:
            segs = [(R.read_u64(k), bytes(v)) for k, v in txn.cursor(db=self._dbs[b"segments"])]
        for segid, raw in segs:
            try:
                seg = SegmentRecord.decode(raw)
            except RecordError:
                continue
            if seg.sealed or seg.end < 0 or not self._writer_gone(seg):
                continue
            try:
                size = (self._seg_dir / segment_name(segid)).stat().st_size
            except OSError:
                continue
            if size > seg.end:
                return self._adopt_tails()
        return 0

    def _adopt_tails(self, after_reboot: bool = False) -> int:
        """Index what writers that are gone left past the indexed end of their
        unsealed segments (C2, C12); run at every writable open. Returns how
        many messages were put back.

        A caller hears of its message once its segment sync is done; the
        index commit follows. A writer that died in between (or a machine
        crash that undid the index's last commit, whose meta page is synced
        lazily) leaves whole records past the end the index knows, with each
        message's envelope beside its bytes. Sealed segments hold no such
        tail (a segment is sealed only after all its batches were indexed),
        and the segments of live writers are theirs to index. After a machine
        restart every writer is gone, and ids move past every id and segment
        file on disk (the id counter's last commit may be undone too)."""
        try:
            return self._adopt_tails_txn(after_reboot)
        except lmdb.Error as exc:  # e.g. a full map: the bytes wait for the next try
            log.warning("warning: cannot index what a stopped writer left: %s", exc)
            return 0

    def _adopt_tails_txn(self, after_reboot: bool) -> int:
        dbs = self._dbs
        meta = dbs[b"meta"]
        restored = 0
        with self.env.begin(write=True) as txn:
            if after_reboot:
                boot = txn.get(b"boot_id", db=meta)
                after_reboot = boot is None or bytes(boot) != self._boot_id.encode()
            next_id = R.read_u64(txn.get(b"next_id", db=meta))
            if after_reboot:
                cur = txn.cursor(db=dbs[b"messages"])
                if cur.last():
                    next_id = max(next_id, R.read_u64(cur.key()) + 1)
                try:
                    names = os.listdir(self._seg_dir)
                except FileNotFoundError:
                    names = []
                for name in names:
                    segid = parse_segment_name(name)
                    if segid is not None:
                        next_id = max(next_id, segid + 1)
                txn.put(b"next_id", R.u64(next_id), db=meta)
            for key, raw in list(txn.cursor(db=dbs[b"segments"])):
                try:
                    seg = SegmentRecord.decode(raw)
                except RecordError:
                    continue  # recover() rebuilds it
                if seg.sealed or seg.end < 0 or not (after_reboot or self._writer_gone(seg)):
                    continue
                restored += self._adopt_tail_now(txn, R.read_u64(key), seg)
            if after_reboot:
                txn.put(b"boot_id", self._boot_id.encode(), db=meta)
        return restored

    def _writer_gone(self, seg: SegmentRecord) -> bool:
        """Whether the process that wrote into `seg` is gone (so nothing of it
        is still on its way to the index)."""
        if seg.pid == self._pid:
            # This process (maybe through another Spool of it, whose index
            # stage may be about to take that very tail): never adopted here.
            return False
        if not _pid_alive(seg.pid):
            return True
        now = process_start(seg.pid) if seg.started else 0
        return now != 0 and now != seg.started   # another process has its pid now

    def _adopt_tail_now(self, txn: lmdb.Transaction, segid: int, seg: SegmentRecord) -> int:
        """_adopt_tail, with the id counter moved past what it found and a log
        line; returns how many messages it indexed."""
        n, last = self._adopt_tail(txn, segid, seg)
        meta = self._dbs[b"meta"]
        if last >= R.read_u64(txn.get(b"next_id", db=meta)):
            txn.put(b"next_id", R.u64(last + 1), db=meta)
        if n:
            log.warning("warning: indexed %d message(s) that a writer which stopped left "
                        "unindexed in segment %s", n, segid)
        return n

    def _adopt_tail(self, txn: lmdb.Transaction, segid: int,
                    seg: SegmentRecord) -> tuple[int, int]:
        """Index (inside txn) every whole QENV+QMSG pair of segment `segid`
        past its indexed end; a torn or unmatched record ends the tail (it is
        what a crash cut short: no caller heard of it). Returns how many were
        indexed and the highest id seen."""
        dbs = self._dbs
        path = self._seg_dir / segment_name(segid)
        envelope, live, end, restored, last = None, seg.live, seg.end, 0, 0
        try:
            for magic, msgid, offset, body in scan(path, seg.end):
                if magic == ENV_MAGIC:
                    envelope = (msgid, EnvelopeRecord.decode(body))
                    continue
                if envelope is None or envelope[0] != msgid:
                    break
                env, envelope = envelope[1], None
                end = offset + record_size(len(body))
                last = max(last, msgid)
                if txn.get(R.u64(msgid), db=dbs[b"messages"]) is not None:
                    continue
                self._index_message(txn, msgid, env, body, segid, offset, env.birth)
                live += 1
                restored += 1
        except RecordError:
            pass  # an envelope that does not decode ends the tail like a torn record
        except OSError as exc:
            log.warning("warning: cannot read segment %s: %s", segid, exc)
        if end != seg.end:
            txn.put(R.u64(segid), dataclasses.replace(seg, live=live, end=end).encode(),
                    db=dbs[b"segments"])
        return restored, last

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove segment files that no index record knows about and that are
        older than orphan_grace (bytes of enqueues that never committed), and
        abandoned empty segments of dead writers. Returns the names removed."""
        self._check_process()
        now = self._clock() if now is None else now
        grace = self.settings.orphan_grace
        own = self._writer.segid if self._writer is not None else None
        removed = []
        try:
            names = os.listdir(self._seg_dir)
        except FileNotFoundError:
            return removed
        with self.env.begin() as txn:
            known = {R.read_u64(k): bytes(v) for k, v in txn.cursor(db=self._dbs[b"segments"])}
        for name in names:
            segid = parse_segment_name(name)
            if segid is None or segid == own:
                continue
            path = self._seg_dir / name
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            raw = known.get(segid)
            if raw is not None:
                try:
                    seg = SegmentRecord.decode(raw)
                except RecordError:
                    continue
                # An empty, unsealed segment whose writer is gone (or idle past
                # orphan_grace, longer than segment_max_age, so it will rotate
                # rather than append again).
                if seg.live > 0 or seg.sealed or (_pid_alive(seg.pid) and age < grace):
                    continue
                with self.env.begin(write=True) as txn:
                    cur = txn.get(R.u64(segid), db=self._dbs[b"segments"])
                    if cur != raw:
                        continue
                    if 0 <= seg.end < path.stat().st_size:  # bytes past the indexed end
                        if not self._writer_gone(seg):
                            continue
                        if self._adopt_tail_now(txn, segid, seg):
                            continue  # it holds answered messages after all
                    txn.delete(R.u64(segid), db=self._dbs[b"segments"])
            elif age < grace:
                continue
            self._unlink_segments([segid])
            removed.append(name)
            log.info("removed orphan segment %s", name)
        return removed


def process_start(pid: int) -> int:
    """When process `pid` started, in clock ticks since boot (0 if unknown):
    with the pid, it names one process (pids are reused, start times not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _pid_alive(pid: int) -> bool:
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

