"""cdb reader/writer: format per spec Appendix A, round trips, corruption."""
from __future__ import annotations

import struct

import pytest

from engine.config.cdb import CdbError, CdbFile, build_cdb, cdb_hash, newmrh, write_cdb


def test_hash_known_values():
    assert cdb_hash(b"") == 5381
    # h = ((5381 << 5) + 5381) ^ ord('a') = 177573 ^ 97
    assert cdb_hash(b"a") == (5381 * 33) ^ 97
    # wraps modulo 2**32
    assert 0 <= cdb_hash(b"x" * 100) < 2**32


def hand_built_cdb(key: bytes, value: bytes) -> bytes:
    """One record written directly from the format description, not by build_cdb."""
    h = cdb_hash(key)
    record_pos = 2048
    record = struct.pack("<II", len(key), len(value)) + key + value
    table_pos = record_pos + len(record)
    header = bytearray()
    for i in range(256):
        # cdbmake writes tables 0..255 in order: empty ones before ours point
        # at our table's start, later ones just past it.
        if i == h & 255:
            header += struct.pack("<II", table_pos, 2)
        else:
            header += struct.pack("<II", table_pos if i < h & 255 else table_pos + 16, 0)
    slots = [(0, 0), (0, 0)]
    slots[(h >> 8) % 2] = (h, record_pos)
    table = b"".join(struct.pack("<II", a, b) for a, b in slots)
    return bytes(header) + record + table


def test_reads_hand_built_file(tmp_path):
    path = tmp_path / "one.cdb"
    path.write_bytes(hand_built_cdb(b"example.com", b"data"))
    cdb = CdbFile.open(path)
    assert cdb.get(b"example.com") == b"data"
    assert cdb.get(b"example.org") is None
    assert b"example.com" in cdb
    assert list(cdb.items()) == [(b"example.com", b"data")]


def test_writer_output_matches_hand_built():
    assert build_cdb([(b"example.com", b"data")]) == hand_built_cdb(b"example.com", b"data")


def test_round_trip_many_keys_and_duplicates(tmp_path):
    records = [(f"host{i}.example".encode(), str(i).encode()) for i in range(3000)]
    records += [(b"dup", b"first"), (b"dup", b"second"), (b"", b"empty-key"), (b"k", b"")]
    path = tmp_path / "many.cdb"
    write_cdb(path, records)
    assert not (tmp_path / "many.cdb.tmp").exists()
    cdb = CdbFile.open(path)
    for key, value in records[:3000]:
        assert cdb.get(key) == value
    assert cdb.get(b"dup") == b"first"
    assert list(cdb.find_all(b"dup")) == [b"first", b"second"]
    assert cdb.get(b"") == b"empty-key"
    assert cdb.get(b"k") == b""
    assert b"k" in cdb
    assert b"host3000.example" not in cdb
    assert list(cdb.items()) == records


def test_empty_cdb():
    cdb = CdbFile(build_cdb([]))
    assert len(build_cdb([])) == 2048
    assert cdb.get(b"x") is None
    assert list(cdb.items()) == []


def test_write_replaces_atomically(tmp_path):
    path = tmp_path / "x.cdb"
    write_cdb(path, [(b"a", b"1")])
    old = CdbFile.open(path)
    write_cdb(path, [(b"b", b"2")])
    # a snapshot keeps answering from what it read
    assert old.get(b"a") == b"1"
    new = CdbFile.open(path)
    assert new.get(b"a") is None and new.get(b"b") == b"2"


def test_write_is_world_readable_whatever_the_umask_and_follows_no_link(tmp_path):
    # tcp.smtp.cdb and morercpthosts.cdb are read by the receivers, which run
    # as the unprivileged user: under root's umask 077 they came out 0600 and
    # every reload failed with "Permission denied" (qmail-newmrh sets umask 033).
    import os
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    path = tmp_path / "tcp.smtp.cdb"
    (tmp_path / "tcp.smtp.cdb.tmp").symlink_to(target)
    old = os.umask(0o077)
    try:
        write_cdb(path, [(b"127.", b"")])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert CdbFile.open(path).get(b"127.") == b""
    assert target.read_bytes() == b"keep"


def test_truncated_and_corrupt_files(tmp_path):
    with pytest.raises(CdbError, match="truncated"):
        CdbFile(b"\0" * 100)
    data = bytearray(build_cdb([(b"a", b"1")]))
    bad_table = bytearray(data)
    h = cdb_hash(b"a") & 255
    struct.pack_into("<II", bad_table, h * 8, 10**6, 2)
    with pytest.raises(CdbError, match="out of bounds"):
        CdbFile(bytes(bad_table))
    # record length pointing past the end
    bad_record = bytearray(data)
    struct.pack_into("<II", bad_record, 2048, 1, 10**6)
    cdb = CdbFile(bytes(bad_record))
    with pytest.raises(CdbError):
        cdb.get(b"a")


def test_missing_file_is_filenotfound(tmp_path):
    with pytest.raises(FileNotFoundError):
        CdbFile.open(tmp_path / "nope.cdb")


def test_unreadable_file_is_cdberror(tmp_path):
    (tmp_path / "dir.cdb").mkdir()
    with pytest.raises(CdbError, match="unable to read"):
        CdbFile.open(tmp_path / "dir.cdb")


def test_newmrh_lowercases_and_skips_comments(tmp_path):
    (tmp_path / "morercpthosts").write_text("# comment\nExample.COM\n\n.Sub.Example.NET  \n")
    assert newmrh(tmp_path) == 2
    cdb = CdbFile.open(tmp_path / "morercpthosts.cdb")
    assert cdb.get(b"example.com") == b""
    assert cdb.get(b".sub.example.net") == b""
    assert cdb.get(b"Example.COM") is None
