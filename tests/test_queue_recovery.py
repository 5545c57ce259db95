"""engine.queue.repair: quarantine of corrupt records and bytes, recovery scan,
orphan and abandoned segments, the warn hook."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from engine.config.settings import SpoolSettings
from engine.queue import (Delivered, Envelope, MessageNotFound, MessageQuarantined, Spool,
                          SpoolError)
from engine.queue import records as R


def env(*rcpts: str, sender: str = "joe@example.com") -> Envelope:
    return Envelope(sender, tuple(rcpts), pid=4242, uid=89)


def _corrupt(path: Path, dbname: bytes, key: bytes, mutate) -> None:
    e = lmdb.open(str(path / "index"), max_dbs=8)
    db = e.open_db(dbname)
    with e.begin(write=True) as txn:
        txn.put(key, mutate(bytes(txn.get(key, db=db))), db=db)
    e.close()


def _flip_last(v: bytes) -> bytes:
    return v[:-1] + bytes([v[-1] ^ 0x55])


def test_corrupt_message_record_is_quarantined_by_recover(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q) as s:
        good = s.enqueue(env("a@b"), b"good")
        bad = s.enqueue(env("c@d"), b"bad")
    _corrupt(q, b"messages", R.u64(bad), _flip_last)
    with Spool(q) as s:
        report = s.recover()
        assert report.quarantined == [bad]
        assert s.stats() == (1, 1)
        assert s.read_message(good) == b"good"
        assert len(s.quarantined()) == 1
        info = (q / "quarantine" / s.quarantined()[0]).read_text()
        assert "checksum" in info
        assert s.recover(verify_bytes=True).quarantined == []


def test_warnings_go_to_the_warn_hook_instead_of_the_log(tmp_path: Path, caplog):
    q = tmp_path / "q"
    with Spool(q) as s:
        bad = s.enqueue(env("c@d"), b"bad")
    _corrupt(q, b"messages", R.u64(bad), _flip_last)
    lines: list[str] = []
    with caplog.at_level("WARNING", logger="qrelay.queue"):
        with Spool(q, warn=lines.append) as s:
            assert s.recover().quarantined == [bad]
    assert len(lines) == 1 and lines[0].startswith(f"warning: quarantined #{bad} to ")
    assert "checksum" in lines[0]
    assert caplog.records == []


def test_a_warn_hook_that_raises_falls_back_to_the_log(tmp_path: Path, caplog):
    q = tmp_path / "q"
    with Spool(q) as s:
        bad = s.enqueue(env("c@d"), b"bad")
    _corrupt(q, b"messages", R.u64(bad), _flip_last)

    def broken(text: str) -> None:
        raise OSError("log disk full")
    with caplog.at_level("WARNING", logger="qrelay.queue"):
        with Spool(q, warn=broken) as s:
            assert s.recover().quarantined == [bad]          # the hook did not stop it
    (record,) = caplog.records
    assert record.getMessage().startswith(f"warning: quarantined #{bad} to ")


def test_unknown_record_version_is_quarantined(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q) as s:
        m = s.enqueue(env("a@b"), b"x")
        s.preprocess(m, ["remote"])
    _corrupt(q, b"recipients", R.rcpt_key(m, 0), lambda v: bytes([99]) + v[1:])
    with Spool(q) as s:
        assert s.due(limit=10) == []           # found lazily, quarantined, skipped
        assert s.stats().messages == 0
        assert len(s.quarantined()) == 1
        assert s.recover().quarantined == [] and s.due(limit=10) == []


def test_corrupt_message_bytes_quarantined_on_read(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q) as s:
        keep = s.enqueue(env("a@b"), b"A" * 100)
        m = s.enqueue(env("a@b"), b"B" * 100)
    seg = next((q / "segments").iterdir())
    data = bytearray(seg.read_bytes())
    pos = data.index(b"B" * 100)
    data[pos + 50] ^= 0xFF
    seg.write_bytes(bytes(data))
    with Spool(q) as s:
        with pytest.raises(MessageQuarantined, match="checksum"):
            s.read_message(m)
        with pytest.raises(MessageNotFound):
            s.read_message(m)
        assert s.read_message(keep) == b"A" * 100
        assert any(p.suffix == ".seg" for p in (q / "quarantine").iterdir())


def test_a_head_read_checks_the_whole_message_and_holds_only_its_head(tmp_path: Path):
    # read_message(limit=): a bounce needs a big message's header only; what
    # it does not return is still checked (a flipped byte past the head is
    # quarantined), and is read a chunk at a time, never held whole.
    import tracemalloc
    from engine.queue.segments import HEAD_CHUNK
    q = tmp_path / "q"
    body = b"Subject: s\r\n\r\n" + b"B" * (8 * HEAD_CHUNK)
    with Spool(q) as s:
        good = s.enqueue(env("a@b"), body)
        bad = s.enqueue(env("a@b"), body.replace(b"B", b"C"))
        assert s.read_message(good, limit=10 ** 9) == body
        tracemalloc.start()
        try:
            assert s.read_message(good, limit=100) == body[:100]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2 * HEAD_CHUNK + 100_000, peak
    seg = next((q / "segments").iterdir())
    data = bytearray(seg.read_bytes())
    data[data.rindex(b"C" * 100) + 50] ^= 0xFF
    seg.write_bytes(bytes(data))
    with Spool(q) as s:
        with pytest.raises(MessageQuarantined, match="checksum"):
            s.read_message(bad, limit=100)
        with pytest.raises(MessageNotFound):
            s.read_message(bad)
        assert s.read_message(good, limit=100) == body[:100]


def test_a_segment_that_cannot_be_read_now_costs_a_retry_not_the_message(tmp_path: Path):
    # An OSError is no proof of corruption, for recover(verify_bytes) either:
    # here a directory stands where the segment was (pread says EISDIR).
    from engine.queue import MessageUnreadable
    q = tmp_path / "q"
    with Spool(q) as s:
        m = s.enqueue(env("a@b"), b"A" * 100)
    seg = next((q / "segments").iterdir())
    seg.rename(tmp_path / "aside")
    seg.mkdir()
    with Spool(q) as s:
        with pytest.raises(MessageUnreadable, match=f"#{m}: "):
            s.read_message(m)
        assert s.recover(verify_bytes=True).quarantined == []
        assert s.stats().messages == 1
    seg.rmdir()
    (tmp_path / "aside").rename(seg)
    with Spool(q) as s:
        assert s.read_message(m) == b"A" * 100
    assert not (q / "quarantine").exists() or list((q / "quarantine").iterdir()) == []


def test_torn_segment_tail_found_by_verify(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q) as s:
        ids = [s.enqueue(env("a@b"), b"%d" % i * 50) for i in range(3)]
    seg = next((q / "segments").iterdir())
    os.truncate(seg, seg.stat().st_size - 5)      # cut the last END marker
    with Spool(q) as s:
        assert s.recover(verify_bytes=True).quarantined == [ids[-1]]
        assert [s.read_message(i) for i in ids[:2]] == [b"0" * 50, b"1" * 50]


def test_orphan_segment_removed_after_grace(tmp_path: Path):
    q = tmp_path / "q"
    now = [1_000_000.0]
    with Spool(q, SpoolSettings(orphan_grace=100), clock=lambda: now[0]) as s:
        s.enqueue(env("a@b"), b"x")
        orphan = q / "segments" / "999999999.seg"
        orphan.write_bytes(b"QRSPOOL\0junk")
        os.utime(orphan, (now[0] - 50, now[0] - 50))
        assert s.cleanup(now[0]) == []
        os.utime(orphan, (now[0] - 150, now[0] - 150))
        assert s.cleanup(now[0]) == ["999999999.seg"]
        assert not orphan.exists()
        assert s.stats().messages == 1




def test_recover_drops_entries_of_a_vanished_message(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q) as s:
        m = s.enqueue(env("a@b", "c@d"), b"x")
        keep = s.enqueue(env("e@f"), b"y")
        s.preprocess(m, ["remote", "local"])
    e = lmdb.open(str(q / "index"), max_dbs=8)
    with e.begin(write=True) as txn:
        txn.delete(R.u64(m), db=e.open_db(b"messages", txn=txn))
    e.close()
    with Spool(q) as s:
        report = s.recover()
        assert report.dangling_removed == 4      # 2 recipients + 2 due entries
        assert s.due(limit=10) == [] and s.stats() == (1, 1)
        assert s.read_message(keep) == b"y"
        assert s.recover().dangling_removed == 0


def test_segment_of_a_killed_writer_is_sealed_then_removed(tmp_path: Path):
    q = tmp_path / "q"
    pid = os.fork()
    if pid == 0:
        try:
            child = Spool(q)
            child.enqueue(env("a@b"), b"from a writer that dies")
        finally:
            os._exit(0)          # no close(): the segment stays unsealed
    os.waitpid(pid, 0)
    with Spool(q) as s:
        (m,) = s.todo()
        assert s.recover().segments_fixed == 1   # writer gone: sealed
        s.preprocess(m, ["local"])
        s.mark_delivered(m, 0)
        assert list((q / "segments").iterdir()) == []


# ------------------------------------------------- index commit lost in a machine crash (C12)

_LOSE_LAST_COMMITS = r"""
import os, sys
from engine.queue import Envelope, Spool
q, snapshot = sys.argv[1], sys.argv[2]
s = Spool(q, boot_id="boot-A")
before = [s.enqueue(Envelope("a@x", ("b@y", "c@z")), b"before %d" % i) for i in range(3)]
s.env.copy(snapshot)          # the index as a machine crash would leave it
after = [s.enqueue(Envelope("d@x", ("e@y",), 77, 88, "local"), b"after %d" % i) for i in range(4)]
print(" ".join(map(str, before)), "|", " ".join(map(str, after)), flush=True)
os._exit(0)                   # no close: the segment stays unsealed, as in a crash
"""


def _lose_last_commits(q: Path, tmp_path: Path) -> tuple[list, list]:
    """A writer enqueues 3 + 4 messages; the index is then put back to its
    state after the first 3 (what an undone last commit looks like)."""
    snap = tmp_path / "snapshot"
    snap.mkdir()
    out = subprocess.run([sys.executable, "-c", _LOSE_LAST_COMMITS, str(q), str(snap)],
                         capture_output=True, text=True, timeout=60, check=True)
    before, after = (list(map(int, part.split())) for part in out.stdout.split("|"))
    os.replace(snap / "data.mdb", q / "index" / "data.mdb")
    (q / "index" / "lock.mdb").unlink()
    return before, after


def test_messages_of_a_lost_index_commit_are_indexed_again_once(tmp_path: Path):
    q = tmp_path / "q"
    before, after = _lose_last_commits(q, tmp_path)
    with Spool(q, boot_id="boot-B") as s:     # the machine restarted
        assert s.stats() == (7, 7)
        assert s.todo(10) == before + after
        for i, msgid in enumerate(after):
            assert s.read_message(msgid) == b"after %d" % i
            assert s.envelope(msgid) == Envelope("d@x", ("e@y",), 77, 88, "local")
        for i, msgid in enumerate(before):
            assert s.read_message(msgid) == b"before %d" % i
        fresh = s.enqueue(env("f@g"), b"new")
        assert fresh > max(after)
        assert s.recover(verify_bytes=True).quarantined == []
    with Spool(q, boot_id="boot-B") as s:     # never twice
        assert s.stats().messages == 8
    with Spool(q, boot_id="boot-C") as s:
        assert s.stats().messages == 8


def test_a_gone_writers_tail_is_indexed_without_a_reboot_too(tmp_path: Path):
    q = tmp_path / "q"
    before, after = _lose_last_commits(q, tmp_path)
    with Spool(q, boot_id="boot-A") as s:     # same boot, the writer's process is gone
        assert s.todo(10) == before + after


# ------------------------------------------- answered at the sync, crash before the index (C2)

_DIE_BEFORE_THE_INDEX = r"""
import asyncio, os, sys, threading
from engine.queue import Envelope, Spool
s = Spool(sys.argv[1])
s.intake.index_stage = lambda batches: threading.Event().wait()   # the index never commits
async def main():
    return await asyncio.gather(*(s.submit(Envelope("a@x", ("b@y",)), b"message %d" % i)
                                  for i in range(int(sys.argv[2]))))
print(" ".join(map(str, asyncio.run(main()))), flush=True)
os._exit(0)                   # killed: the answered messages are only in the segment
"""


def _die_before_the_index(q: Path, n: int) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _DIE_BEFORE_THE_INDEX, str(q), str(n)],
                         capture_output=True, text=True, timeout=60, check=True)
    return list(map(int, out.stdout.split()))


def test_messages_answered_before_their_index_commit_survive_their_writer(tmp_path: Path):
    q = tmp_path / "q"
    ids = _die_before_the_index(q, 50)
    assert len(ids) == 50
    with Spool(q) as s:
        assert s.todo(100) == sorted(ids)
        for i, msgid in enumerate(ids):
            assert s.read_message(msgid) == b"message %d" % i
        assert s.recover(verify_bytes=True).quarantined == []
        assert s.enqueue(env("a@b"), b"next") > max(ids)


def test_a_live_writers_tail_is_left_to_it_but_not_a_reused_pid(tmp_path: Path):
    import dataclasses

    from engine.queue.records import SegmentRecord
    from engine.queue.repair import process_start
    q = tmp_path / "q"
    ids = _die_before_the_index(q, 3)

    def owner(pid: int, started: int) -> None:
        e = lmdb.open(str(q / "index"), max_dbs=8)
        db = e.open_db(b"segments")
        with e.begin(write=True) as txn:
            for key, raw in list(txn.cursor(db=db)):
                seg = SegmentRecord.decode(raw)
                txn.put(key, dataclasses.replace(seg, pid=pid, started=started).encode(), db=db)
        e.close()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_start(other.pid)
        assert started > 0
        owner(other.pid, started)             # that very process, still running
        with Spool(q) as s:
            assert s.todo(10) == []
        owner(other.pid, started - 1)         # its pid belonged to another process then
        with Spool(q) as s:
            assert s.todo(10) == ids
    finally:
        other.kill()
        other.wait()


def test_reindex_stops_at_a_torn_record(tmp_path: Path):
    q = tmp_path / "q"
    before, after = _lose_last_commits(q, tmp_path)
    seg = next((q / "segments").iterdir())
    with open(seg, "r+b") as f:               # the last message's bytes never made it
        f.truncate(seg.stat().st_size - 5)
    with Spool(q, boot_id="boot-B") as s:
        assert s.todo(10) == before + after[:-1]
        assert s.recover(verify_bytes=True).quarantined == []


def test_sealed_segment_tails_are_not_reindexed(tmp_path: Path):
    """A sealed segment's tail past the indexed end only ever holds batches
    whose callers got no id (C2): they stay garbage, reboot or not."""
    from engine.queue.records import EnvelopeRecord
    from engine.queue.segments import ENV_MAGIC, encode_record
    q = tmp_path / "q"
    with Spool(q, boot_id="boot-A") as s:
        ids = [s.enqueue(env("a@b"), b"x%d" % i) for i in range(3)]
    seg = next((q / "segments").iterdir())
    stray = ids[-1] + 1
    with open(seg, "ab") as f:                # written, never indexed
        f.write(encode_record(stray, EnvelopeRecord(0.0, 1, 1, "network", "s@t",
                                                    ("r@u",)).encode(), ENV_MAGIC))
        f.write(encode_record(stray, b"never acknowledged"))
    with Spool(q, boot_id="boot-B") as s:
        assert s.todo(10) == ids


def test_ids_start_past_every_segment_on_disk_after_a_reboot(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q, boot_id="boot-A") as s:
        s.enqueue(env("a@b"), b"x")
    # an unregistered segment file (its id block's commit was lost)
    from engine.queue.segments import SegmentIO, SegmentWriter
    SegmentWriter(q / "segments", 10**6, SegmentIO(), 0.0).close()
    with Spool(q, boot_id="boot-B") as s:
        assert s.enqueue(env("a@b"), b"y") > 10**6


def test_adopt_tails_picks_up_a_writer_that_died_while_the_spool_stayed_open(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q) as s:
        last = s.env.info()["last_txnid"]
        assert s.adopt_tails() == 0
        assert s.env.info()["last_txnid"] == last      # nothing to do: no write
        ids = _die_before_the_index(q, 5)              # another writer answers, then dies
        assert s.todo(10) == []
        assert s.adopt_tails() == 5
        assert s.todo(10) == ids


def test_a_writer_that_died_while_the_spool_stayed_open_leaves_no_segment_behind(tmp_path: Path):
    # Its segment was sealed only by recover(), at the scheduler's start: once
    # its messages were delivered the file stayed until the next restart.
    q = tmp_path / "q"
    with Spool(q) as s:
        ids = _die_before_the_index(q, 3)
        assert s.adopt_tails() == 3
        s.preprocess_many([(m, ["local"]) for m in ids])
        s.apply([Delivered(j.msgid, j.index) for j in s.due(limit=10)])
        assert s.stats().messages == 0
        assert list((q / "segments").iterdir()) == []
        last = s.env.info()["last_txnid"]
        assert s.adopt_tails() == 0
        assert s.env.info()["last_txnid"] == last      # sealed once: no write again


def test_a_killed_but_unreaped_writer_counts_as_gone():
    from engine.queue.repair import pid_alive
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pid_alive(pid)                     # a zombie until we reap it
        assert os.path.exists(f"/proc/{pid}")
    finally:
        os.waitpid(pid, 0)
    assert pid_alive(os.getpid())


def test_recover_indexes_a_dead_writers_tail_before_sealing_its_segment(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q) as s:                                # open before the writer dies
        ids = _die_before_the_index(q, 4)
        report = s.recover(verify_bytes=True)
        assert report.quarantined == [] and report.segments_fixed == 1   # sealed
        assert s.todo(10) == ids
        assert s.enqueue(env("a@b"), b"next") > max(ids)


def test_cleanup_never_removes_a_dead_writers_segment_with_answered_messages(tmp_path: Path):
    q = tmp_path / "q"
    with Spool(q) as s:
        ids = _die_before_the_index(q, 3)              # index: the segment is empty
        assert s.cleanup(now=time.time() + 10**6) == []
        assert s.todo(10) == ids
        assert [s.read_message(m) for m in ids] == [b"message %d" % i for i in range(3)]


def test_a_read_the_system_refuses_keeps_the_message(tmp_path: Path, monkeypatch):
    """EACCES (a segment root created 0600 for the run user), EIO, EMFILE:
    nothing says the bytes are corrupt, so the message stays queued for the
    next try; quarantining it dropped it and copied nothing (the raw read
    fails too)."""
    import errno
    from engine.queue import MessageUnreadable
    from engine.queue.segments import SegmentReader
    q = tmp_path / "q"
    with Spool(q) as s:
        m = s.enqueue(env("a@b"), b"B" * 100)
    real = SegmentReader._fd

    def refused(self, segid):
        raise PermissionError(errno.EACCES, "Permission denied")
    with Spool(q) as s:
        monkeypatch.setattr(SegmentReader, "_fd", refused)
        with pytest.raises(MessageUnreadable, match="Permission denied"):
            s.read_message(m)
        monkeypatch.setattr(SegmentReader, "_fd", real)
        assert s.read_message(m) == b"B" * 100
        assert not (q / "quarantine").exists() or not list((q / "quarantine").iterdir())


def test_a_truncated_index_is_refused_in_one_line_not_a_bus_error(tmp_path: Path):
    # LMDB reads pages through a map: one past the end of a cut data.mdb is
    # SIGBUS, which killed every process opening the spool (the spool writer
    # in a restart loop, qstat with "Bus error"). Opened in subprocesses.
    q = tmp_path / "queue"
    with Spool(q) as s:
        for n in range(50):
            s.enqueue(env("a@b"), b"x" * 3000 + b"%d" % n)
    data = q / "index" / "data.mdb"
    os.truncate(data, 8192)            # the two meta pages, nothing they point at
    for readonly in (False, True):
        code = (f"from engine.queue import Spool, SpoolError\n"
                f"try:\n    Spool({str(q)!r}, readonly={readonly})\n"
                f"except SpoolError as exc:\n    print(exc)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent.parent, timeout=30)
        assert p.returncode == 0, (readonly, p.returncode, p.stderr)
        assert p.stdout.startswith(f"{q}: cannot open spool index: {data} is truncated "
                                   "(8192 bytes; its pages need "), p.stdout


def test_a_tail_whose_index_commit_fails_is_not_said_to_be_indexed(tmp_path: Path):
    # The "indexed N message(s)" line was said inside the transaction: with a
    # full map (or disk) every try logged it, then "cannot index ...".
    q = tmp_path / "queue"
    code = ("import os, sys\n"
            "from engine.config.settings import SpoolSettings\n"
            "from engine.queue import Envelope, Spool, SpoolWriteError\n"
            f"s = Spool({str(q)!r}, SpoolSettings(index_map_bytes=512 * 1024))\n"
            "try:\n"
            "    while True:\n"
            "        s.enqueue(Envelope('a@b', ('c@d',)), b'x' * 100)\n"
            "except SpoolWriteError:\n"
            "    os._exit(0)      # a writer that died, its last batch answered, not indexed\n")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                   check=True, timeout=120)
    lines: list[str] = []
    with Spool(q, SpoolSettings(index_map_bytes=512 * 1024), warn=lines.append) as s:
        assert s.adopt_tails() == 0
    assert lines and all(line.startswith("warning: cannot index what a stopped writer left: "
                                         "the spool index is full") for line in lines), lines
    lines.clear()
    with Spool(q, warn=lines.append) as s:                  # room again
        assert s.stats().messages > 0
    assert len(lines) == 1 and re.match(r"warning: indexed \d+ message\(s\) that a writer which"
                                        r" stopped left unindexed in segment \d+$", lines[0]), lines


def test_adopt_tails_frees_the_reader_slot_of_a_process_killed_mid_read(tmp_path: Path):
    # A scheduler or delivery worker killed inside a read transaction left its
    # slot: LMDB reused no page freed since, and the index grew by every commit
    # (1.1 GB after 57,000 messages in a `qrelay run` whose scheduler was killed).
    q = tmp_path / "q"
    s = Spool(q)
    s.enqueue(env("a@b"), b"x")
    code = ("import os, signal\n"
            "from engine.queue import Spool\n"
            f"s = Spool({str(q)!r}, readonly=True)\n"
            "txn = s.index.env.begin()\n"
            "txn.get(b'x')\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                       timeout=60)
    assert p.returncode == -9
    try:
        s.adopt_tails()
        for _ in range(10):
            ids = [s.enqueue(env("a@b"), b"y" * 2000) for _ in range(100)]
            s.preprocess_many([(m, ["remote"]) for m in ids], time.time())
            s.apply([Delivered(m, 0) for m in ids])
        assert (q / "index" / "data.mdb").stat().st_size < 4 * 1024 * 1024
    finally:
        s.close()


def test_recover_keeps_no_record_per_message_in_memory(tmp_path: Path):
    """The start-up check streams the index: its memory does not grow with
    the queue (250,000 queued messages once cost 100 MB of records)."""
    import tracemalloc
    q = tmp_path / "q"
    with Spool(q) as s:
        for _ in range(4):
            s._write_batch([(env("r@far.test"), b"x" * 100)] * 1000)   # bulk path
        tracemalloc.start()
        try:
            report = s.recover(verify_bytes=True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert report.messages == 4000 and report.quarantined == []
    assert peak < 100 * 4000, f"recover() held {peak} bytes for 4000 messages"
