"""engine.queue.segments: record layout, torn/corrupt detection, fault handling."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from engine.queue.segments import (FILE_HEADER, SegmentError, SegmentIO, SegmentReader,
                                   SegmentWriter, encode_record, parse_segment_name,
                                   segment_name)


def append(w: SegmentWriter, data: bytes) -> int:
    offset = w.write(data)
    w.sync()
    return offset


def test_append_and_read_back(tmp_path: Path):
    w = SegmentWriter(tmp_path, 7, SegmentIO(), 0.0)
    a = append(w, encode_record(1, b"one") + encode_record(2, b""))
    b = append(w, encode_record(3, b"three" * 100))
    w.close()
    assert a == FILE_HEADER.size
    r = SegmentReader(tmp_path)
    assert r.read(7, a, 1, 3) == b"one"
    assert r.read(7, a + len(encode_record(1, b"one")), 2, 0) == b""
    assert r.read(7, b, 3, 500) == b"three" * 100
    with pytest.raises(SegmentError, match="not #9"):
        r.read(7, a, 9, 3)
    with pytest.raises(SegmentError, match="missing"):
        r.read(8, a, 1, 3)
    r.close()


def test_names():
    assert segment_name(12) == "12.seg"
    assert parse_segment_name("12.seg") == 12
    assert parse_segment_name("x.seg") is None and parse_segment_name("12.tmp") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "end"])
def test_damage_is_detected(tmp_path: Path, damage: str):
    w = SegmentWriter(tmp_path, 1, SegmentIO(), 0.0)
    off = append(w, encode_record(5, b"payload" * 10))
    w.close()
    path = tmp_path / "1.seg"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[off + 40] ^= 1
    elif damage == "truncate":
        del data[-3:]
    else:
        data[-12:-8] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(SegmentError):
        SegmentReader(tmp_path).read(1, off, 5, 70)


def test_failed_write_is_truncated_back(tmp_path: Path):
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:                      # header, first batch ok; then half a batch
            os.pwrite(fd, bytes(data)[:10], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)
    w = SegmentWriter(tmp_path, 1, SegmentIO(pwrite=pwrite), 0.0)
    append(w, encode_record(1, b"a"))
    size = w.size
    with pytest.raises(OSError):
        append(w, encode_record(2, b"b" * 100))
    assert not w.broken and w.size == size
    assert (tmp_path / "1.seg").stat().st_size == size
    w.close()


def test_failed_sync_marks_the_writer_broken(tmp_path: Path):
    fail = {"on": False}

    def fdatasync(fd):
        if fail["on"]:
            raise OSError(errno.EIO, "I/O error")
        os.fdatasync(fd)
    w = SegmentWriter(tmp_path, 1, SegmentIO(fdatasync=fdatasync), 0.0)
    append(w, encode_record(1, b"a"))
    fail["on"] = True
    w.write(encode_record(2, b"b"))
    with pytest.raises(OSError):
        w.sync()
    assert w.broken                      # pages may be gone: nothing more goes here
    w.close()


def test_a_sync_that_returns_after_another_failed_fails_too(tmp_path: Path):
    import itertools
    import threading
    calls = itertools.count()
    second_in, first_failed = threading.Event(), threading.Event()

    def fdatasync(fd):
        n = next(calls)
        if n == 1:                          # batch 1: fails while batch 2 syncs
            second_in.wait(5)
            first_failed.set()
            raise OSError(errno.EIO, "I/O error")
        if n == 2:                          # batch 2: succeeds, but returns after that
            second_in.set()
            first_failed.wait(5)
    w = SegmentWriter(tmp_path, 1, SegmentIO(fdatasync=fdatasync), 0.0, sync_depth=2)
    errors = []

    def sync():
        try:
            w.sync()
        except OSError as exc:
            errors.append(exc)
    w.write(encode_record(1, b"a"))
    w.write(encode_record(2, b"b"))
    t = threading.Thread(target=sync)
    t.start()
    time.sleep(0.05)
    sync()
    t.join(5)
    assert len(errors) == 2 and w.broken
    w.close()


def test_close_keeps_what_unsynced_writes_need_to_sync(tmp_path: Path):
    w = SegmentWriter(tmp_path, 1, SegmentIO(), 0.0, sync_depth=2)
    w.write(encode_record(1, b"a"))
    w.close()                               # the write stage moved on
    assert len(w._sync_fds) == 2
    w.sync()                                # the batch's sync still runs...
    assert w._sync_fds == []                # ...and the last one closes the descriptors


def test_segment_file_creation_failure_leaves_nothing(tmp_path: Path):
    def fdatasync(fd):
        raise OSError(errno.EIO, "I/O error")
    with pytest.raises(OSError):
        SegmentWriter(tmp_path, 1, SegmentIO(fdatasync=fdatasync), 0.0)
    assert list(tmp_path.iterdir()) == []


def test_reader_keeps_a_bounded_number_of_files_open(tmp_path: Path):
    offs = {}
    for segid in range(5):
        w = SegmentWriter(tmp_path, segid, SegmentIO(), 0.0)
        offs[segid] = append(w, encode_record(segid, b"x"))
        w.close()
    r = SegmentReader(tmp_path, max_open=2)
    for segid in range(5):
        assert r.read(segid, offs[segid], segid, 1) == b"x"
    assert len(r._fds) == 2
    r.close()


def test_reader_lets_go_of_segments_another_process_removed(tmp_path: Path):
    # A delivery worker's read-only spool reads a segment; the scheduler or
    # the spool writer removes it once its messages are finished. The
    # reader's descriptor must not keep the file's space in use.
    offs = {}
    for segid in range(3):
        w = SegmentWriter(tmp_path, segid, SegmentIO(), 0.0)
        offs[segid] = append(w, encode_record(segid, b"x"))
        w.close()
    r = SegmentReader(tmp_path, max_open=8)
    for segid in (0, 1):
        assert r.read(segid, offs[segid], segid, 1) == b"x"

    def removed_but_open() -> list[str]:
        return [t for t in (os.readlink(f"/proc/self/fd/{fd}") for fd in r._fds.values())
                if t.endswith(" (deleted)")]
    os.unlink(tmp_path / segment_name(0))
    os.unlink(tmp_path / segment_name(1))
    with pytest.raises(SegmentError, match="missing"):
        r.read(0, offs[0], 0, 1)
    assert r.read(2, offs[2], 2, 1) == b"x"      # another segment: 1 is let go too
    assert removed_but_open() == []
    r.close()


def test_scan_yields_whole_records_and_stops_at_a_torn_one(tmp_path: Path):
    from engine.queue.segments import ENV_MAGIC, REC_MAGIC, scan
    w = SegmentWriter(tmp_path, 3, SegmentIO(), 0.0)
    first = append(w, encode_record(1, b"env", ENV_MAGIC) + encode_record(1, b"one"))
    second = append(w, encode_record(2, b"two" * 50))
    append(w, encode_record(3, b"three")[:-4])           # torn
    w.close()
    got = list(scan(tmp_path / "3.seg", 0))
    assert [(m, i, b) for m, i, _o, b in got] == [(ENV_MAGIC, 1, b"env"), (REC_MAGIC, 1, b"one"),
                                                   (REC_MAGIC, 2, b"two" * 50)]
    assert got[0][2] == first and got[2][2] == second
    assert [r[1] for r in scan(tmp_path / "3.seg", second)] == [2]
    with open(tmp_path / "3.seg", "r+b") as f:            # a flipped byte ends the scan too
        f.seek(second + 40)
        f.write(b"\xff")
    assert [r[1] for r in scan(tmp_path / "3.seg", 0)] == [1, 1]
