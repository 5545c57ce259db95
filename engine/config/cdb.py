"""Constant databases (D. J. Bernstein's cdb), as qmail and tcpserver use them.

Owns reading and writing the on-disk format (spec Appendix A) used by
`control/morercpthosts.cdb`, `control/tcp.smtp.cdb` and `users/cdb`:

    header   256 x (table_pos: u32le, table_slots: u32le)      2048 bytes
    records  (klen: u32le, dlen: u32le, key, data) ...
    tables   table_slots x (hash: u32le, record_pos: u32le)    per table

`CdbFile` reads a whole file into memory once (a snapshot: a file replaced by
rename later does not change it) and answers lookups without touching the
disk again. `write_cdb` is the equivalent of qmail-newmrh / tcprules / qmail-newu
output: write to a new temporary file, fsync, rename, so a reader sees either
the old or the new database, never half of one.

A corrupt file raises CdbError when it is opened or when a lookup walks into
the damage; it never raises IndexError/struct.error.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

HEADER_SIZE = 2048
_PAIR = struct.Struct("<II")
_U32 = 0xFFFFFFFF


class CdbError(Exception):
    """A cdb file is unreadable, truncated or inconsistent."""


def cdb_hash(key: bytes) -> int:
    """cdb's hash: h = 5381; h = ((h << 5) + h) ^ c, modulo 2**32."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) & _U32) ^ c
    return h


class CdbFile:
    """An in-memory, read-only cdb."""

    __slots__ = ("_data", "_header", "_end_of_records", "name")

    def __init__(self, data: bytes, name: str = "cdb") -> None:
        self.name = name
        if len(data) < HEADER_SIZE:
            raise CdbError(f"{name}: truncated cdb (shorter than its 2048-byte header)")
        self._data = data
        header = []
        end_of_records = len(data)
        for i in range(256):
            pos, slots = _PAIR.unpack_from(data, i * 8)
            if slots:
                if pos < HEADER_SIZE or pos + slots * 8 > len(data):
                    raise CdbError(f"{name}: corrupt cdb (hash table {i} out of bounds)")
                end_of_records = min(end_of_records, pos)
            header.append((pos, slots))
        self._header = tuple(header)
        self._end_of_records = end_of_records

    @classmethod
    def open(cls, path: os.PathLike | str) -> CdbFile:
        """Read a cdb file; FileNotFoundError passes through, other OS errors are CdbError."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise CdbError(f"unable to read {path}: {exc.strerror}") from exc
        return cls(data, name=str(path))

    def check(self) -> CdbFile:
        """Read every record a lookup can reach: CdbError now, at load, for a
        file whose damage a lookup would otherwise meet later. Returns self."""
        data = self._data
        for tpos, slots in self._header:
            for slot in range(slots):
                _, rpos = _PAIR.unpack_from(data, tpos + slot * 8)
                if rpos:
                    self._record(rpos)
        return self

    def _record(self, pos: int) -> tuple[bytes, bytes, int]:
        data = self._data
        if pos + 8 > len(data):
            raise CdbError(f"{self.name}: corrupt cdb (record header out of bounds)")
        klen, dlen = _PAIR.unpack_from(data, pos)
        start = pos + 8
        end = start + klen + dlen
        if end > len(data):
            raise CdbError(f"{self.name}: corrupt cdb (record out of bounds)")
        return data[start:start + klen], data[start + klen:end], end

    def find_all(self, key: bytes) -> Iterator[bytes]:
        """Every value stored under key, in the order they were added."""
        h = cdb_hash(key)
        tpos, slots = self._header[h & 255]
        if not slots:
            return
        data = self._data
        slot = (h >> 8) % slots
        for _ in range(slots):
            shash, rpos = _PAIR.unpack_from(data, tpos + slot * 8)
            if rpos == 0:
                return
            if shash == h:
                rkey, value, _ = self._record(rpos)
                if rkey == key:
                    yield value
            slot += 1
            if slot == slots:
                slot = 0

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        """The first value stored under key (as cdb_seek returns), or default."""
        for value in self.find_all(key):
            return value
        return default

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) record in file order (duplicates included)."""
        pos = HEADER_SIZE
        while pos < self._end_of_records:
            key, value, pos = self._record(pos)
            yield key, value


def build_cdb(records: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The bytes of a cdb holding records (in order; duplicate keys allowed)."""
    body = bytearray()
    entries: list[list[tuple[int, int]]] = [[] for _ in range(256)]
    pos = HEADER_SIZE
    for key, value in records:
        h = cdb_hash(key)
        entries[h & 255].append((h, pos))
        body += _PAIR.pack(len(key), len(value))
        body += key
        body += value
        pos += 8 + len(key) + len(value)
        if pos > _U32:
            raise CdbError("cdb would exceed 4 GB")
    header = bytearray()
    tables = bytearray()
    for bucket in entries:
        slots = len(bucket) * 2
        header += _PAIR.pack(pos + len(tables), slots)
        table = [(0, 0)] * slots
        for h, rpos in bucket:
            slot = (h >> 8) % slots
            while table[slot][1] != 0:
                slot = (slot + 1) % slots
            table[slot] = (h, rpos)
        for h, rpos in table:
            tables += _PAIR.pack(h, rpos)
    if pos + len(tables) > _U32:
        raise CdbError("cdb would exceed 4 GB")
    return bytes(header) + bytes(body) + bytes(tables)


def write_cdb(path: os.PathLike | str, records: Iterable[tuple[bytes, bytes]]) -> None:
    """Atomically replace path with a cdb of records (a new temp file, fsync,
    rename, fsync of the directory), mode 0644 whatever the umask: the
    receivers that read it run unprivileged (qmail-newmrh sets umask 033)."""
    # Imported here: engine.accounts imports this module.
    from engine.accounts.files import atomic_write

    atomic_write(path, build_cdb(records), mode=0o644)


def newmrh(control_dir: os.PathLike | str) -> int:
    """qmail-newmrh: compile control/morercpthosts into morercpthosts.cdb.

    Lines are read as a qmail list file and lower-cased (ASCII only, as qmail),
    each stored with empty data. Returns the number of keys written.
    """
    from engine.config.control import read_list

    control_dir = Path(control_dir)
    lines = read_list(control_dir / "morercpthosts", []) or []
    keys = [ascii_lower_bytes(line.encode("utf-8", "surrogateescape")) for line in lines]
    write_cdb(control_dir / "morercpthosts.cdb", ((k, b"") for k in keys))
    return len(keys)


_ASCII_LOWER_TABLE = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def ascii_lower_bytes(raw: bytes) -> bytes:
    """Lower-case A-Z only, as qmail's case_lowerb does."""
    return raw.translate(_ASCII_LOWER_TABLE)
