"""Segment files: where the spool keeps message bytes.

This module owns the byte layout of `queue/segments/<segid>.seg` and the
low-level writes to it. It never touches the LMDB index: whether a record in a
segment is live is decided only by the index (the commit point is the index
transaction, see engine.queue).

A segment file is

    file header   b"QRSPOOL\\0" | format version u32 | reserved u32      (16 bytes)
    record*       magic | version u16 | flags u16 | msgid u64 | length u64 | crc32 u32
                  | bytes | b"QEND" | msgid u64

Each message is two records, written together: b"QENV" (its envelope,
engine.queue.records.EnvelopeRecord) then b"QMSG" (its bytes; the index
points at this one). The envelope copy is what lets `scan` index a
segment's tail again when the index lost its last commit in a machine crash.

Each writer process appends whole batches to its own segment with one
positional write, then makes them durable with one fdatasync per batch (a few
at once, each on its own descriptor). A record torn by a crash is recognised
by its END marker and crc (Postfix's `REC_TYPE_END` idea): no index record
points at it (the index only takes synced batches), and `scan` stops there.
"""
from __future__ import annotations

import errno
import os
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from engine.queue.records import FORMAT_VERSION

FILE_MAGIC = b"QRSPOOL\0"
FILE_HEADER = struct.Struct(">8sII")
REC_HEAD = struct.Struct(">4sHHQQI")
REC_TAIL = struct.Struct(">4sQ")
REC_MAGIC = b"QMSG"
ENV_MAGIC = b"QENV"
END_MAGIC = b"QEND"
SUFFIX = ".seg"


class SegmentError(ValueError):
    """A segment record is torn, corrupt or not the one the index points at."""


@dataclass(slots=True)
class SegmentIO:
    """The system calls a segment writer makes; tests replace them to inject
    faults (a full disk) and benchmarks to emulate a slow disk."""
    pwrite: Callable[[int, bytes, int], int] = os.pwrite
    fdatasync: Callable[[int], None] = os.fdatasync
    fsync_dir: Callable[[int], None] = os.fsync


def segment_name(segid: int) -> str:
    return f"{segid}{SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    if not name.endswith(SUFFIX):
        return None
    stem = name[:-len(SUFFIX)]
    return int(stem) if stem.isdigit() else None


def record_parts(msgid: int, message: bytes, magic: bytes = REC_MAGIC) -> tuple[bytes, bytes, bytes]:
    """A record as (header, message, END marker): for a writer that joins
    several records into one write without first copying each message."""
    return (REC_HEAD.pack(magic, FORMAT_VERSION, 0, msgid, len(message), zlib.crc32(message)),
            message, REC_TAIL.pack(END_MAGIC, msgid))


def encode_record(msgid: int, message: bytes, magic: bytes = REC_MAGIC) -> bytes:
    return b"".join(record_parts(msgid, message, magic))


def scan(path: Path, start: int) -> Iterator[tuple[bytes, int, int, bytes]]:
    """(magic, msgid, offset, body) of each whole, intact record from `start`
    on, stopping at the end of the file or at the first torn or corrupt one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = max(start, FILE_HEADER.size)
        while offset + REC_HEAD.size <= size:
            f.seek(offset)
            head = f.read(REC_HEAD.size)
            magic, version, _flags, msgid, length, crc = REC_HEAD.unpack(head)
            end = offset + record_size(length)
            if magic not in (REC_MAGIC, ENV_MAGIC) or version != FORMAT_VERSION or end > size:
                return
            try:
                body = _checked_body(head + f.read(length + REC_TAIL.size), msgid, length, crc,
                                     str(path))
            except SegmentError:
                return
            yield magic, msgid, offset, body
            offset = end


def _checked_body(raw: bytes, msgid: int, length: int, crc: int, where: str) -> bytes:
    """The bytes of a whole record (header already checked), once its END
    marker and crc match."""
    body = raw[REC_HEAD.size:REC_HEAD.size + length]
    tmagic, tid = REC_TAIL.unpack_from(raw, REC_HEAD.size + length)
    if tmagic != END_MAGIC or tid != msgid:
        raise SegmentError(f"{where}: record #{msgid} has no END marker")
    if zlib.crc32(body) != crc:
        raise SegmentError(f"{where}: record #{msgid} checksum mismatch")
    return body


def record_size(length: int) -> int:
    return REC_HEAD.size + length + REC_TAIL.size


class SegmentWriter:
    """One open segment being appended to by this process.

    `write` appends a batch at the current end, `sync` makes it durable; a
    failed write is truncated back so no partial batch stays behind (and if
    even that fails the writer is marked broken and must be replaced).
    """

    def __init__(self, directory: Path, segid: int, io: SegmentIO, now: float,
                 sync_depth: int = 1):
        self.segid = segid
        self.path = directory / segment_name(segid)
        self.created = now
        self.broken = False
        self._io = io
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            header = FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0)
            self._write_all(header, 0)
            io.fdatasync(self.fd)
            # The file's directory entry must be durable before any index
            # record can point into it.
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                io.fsync_dir(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(self.fd)
            try:
                os.unlink(self.path)
            except OSError:
                pass
            raise
        self.size = FILE_HEADER.size
        # One descriptor per concurrent sync, opened before anything is written:
        # the kernel reports a writeback error once per open file, so syncs
        # sharing one descriptor could let one of them miss it and answer 250
        # for lost bytes; each of these sees every error since it was opened.
        self._lock = threading.Lock()
        self._sync_fds: list[int] = []
        self._unsynced = 0      # writes whose sync has not finished
        self._closing = False
        try:
            for _ in range(max(1, sync_depth)):
                self._sync_fds.append(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            self.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
            raise

    def _write_all(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = self._io.pwrite(self.fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write to segment")
            view = view[n:]
            offset += n

    def write(self, data: bytes) -> int:
        """Write `data` at the end (not yet durable: see sync); returns its offset.
        On failure the file is truncated back to where the write began."""
        offset = self.size
        try:
            self._write_all(data, offset)
        except OSError:
            try:
                os.ftruncate(self.fd, offset)
            except OSError:
                self.broken = True
            raise
        self.size = offset + len(data)
        with self._lock:
            self._unsynced += 1
        return offset

    def sync(self) -> None:
        """Make everything written so far durable; called once per `write`,
        from up to `sync_depth` threads at once, each on its own descriptor.
        After a failed sync the kernel may have dropped the pages, so nothing
        more is appended here: the writer is marked broken and replaced. A
        sync that returns after another one failed fails too (its bytes may
        share the lost pages)."""
        with self._lock:
            if not self._sync_fds:  # more syncs at once than sync_depth: a bug
                self._unsynced -= 1
                raise OSError(errno.EBADF, "segment writer has no free sync descriptor")
            fd = self._sync_fds.pop()
        try:
            self._io.fdatasync(fd)
            if self.broken:
                raise OSError(errno.EIO, "an earlier sync of this segment failed")
        except OSError:
            self.broken = True
            raise
        finally:
            with self._lock:
                self._sync_fds.append(fd)
                self._unsynced -= 1
                if self._closing and self._unsynced <= 0:
                    self._close_fds()

    def close(self) -> None:
        """Close the file for writing; the sync descriptors stay open until
        every write has been synced (the write stage moves on to a new
        segment without waiting for them)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with self._lock:
            self._closing = True
            if self._unsynced <= 0:
                self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._sync_fds:
            os.close(fd)
        self._sync_fds.clear()


# Bytes read at a time by SegmentReader.read_head past the head it keeps.
HEAD_CHUNK = 1 << 20


def _checked_head(raw: bytes, want: int, segid: int, offset: int, msgid: int, length: int) -> int:
    """The crc of the record `raw` (`want` bytes read from `offset`) begins,
    once its header says it is `msgid`'s of `length` bytes; else SegmentError."""
    if len(raw) != want:
        raise SegmentError(f"segment {segid}: record at {offset} is truncated")
    magic, version, _flags, rid, rlen, crc = REC_HEAD.unpack_from(raw)
    if magic != REC_MAGIC or version != FORMAT_VERSION:
        raise SegmentError(f"segment {segid}: no record header at {offset}")
    if rid != msgid or rlen != length:
        raise SegmentError(f"segment {segid}: record at {offset} is #{rid}, not #{msgid}")
    return crc


class SegmentReader:
    """Reads message bytes back, keeping a few segment files open (LRU)."""

    def __init__(self, directory: Path, max_open: int = 32):
        self.directory = directory
        self.max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        # The index stage forgets (closes) segments it unlinks while another
        # thread may be reading: an fd must never be closed under a pread.
        self._lock = threading.Lock()

    def _fd(self, segid: int) -> int:
        # Another process (the scheduler, the spool writer, `qrelay delete`)
        # removes a segment once its last message is finished; a descriptor
        # kept here would keep its space in use for as long as this process
        # lives (a delivery worker: for ever). So a removed file is let go
        # when it is asked for, and all of them whenever another is opened.
        fd = self._fds.get(segid)
        if fd is not None:
            if os.fstat(fd).st_nlink:
                self._fds.move_to_end(segid)
                return fd
            del self._fds[segid]
            os.close(fd)
        self._close_removed()
        fd = os.open(self.directory / segment_name(segid), os.O_RDONLY | os.O_CLOEXEC)
        self._fds[segid] = fd
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _close_removed(self) -> None:
        for segid, fd in list(self._fds.items()):
            if not os.fstat(fd).st_nlink:
                del self._fds[segid]
                os.close(fd)

    def forget(self, segid: int) -> None:
        with self._lock:
            fd = self._fds.pop(segid, None)
            if fd is not None:
                os.close(fd)

    def read(self, segid: int, offset: int, msgid: int, length: int) -> bytes:
        """The message bytes of `msgid`, checked against header, crc and END marker."""
        total = record_size(length)
        with self._lock:
            try:
                fd = self._fd(segid)
            except FileNotFoundError:
                raise SegmentError(f"segment {segid} is missing") from None
            raw = os.pread(fd, total, offset)
        crc = _checked_head(raw, total, segid, offset, msgid, length)
        return _checked_body(raw, msgid, length, crc, f"segment {segid}")

    def read_head(self, segid: int, offset: int, msgid: int, length: int, keep: int) -> bytes:
        """The first `keep` bytes of `msgid`'s message, the whole record
        checked as `read` checks it, but read HEAD_CHUNK bytes at a time: a
        caller that needs only the head (a bounce returning a big message's
        header) never holds all of it."""
        if length <= keep:
            return self.read(segid, offset, msgid, length)
        with self._lock:        # a descriptor of our own: forget() may close the shared one
            try:
                fd = os.dup(self._fd(segid))
            except FileNotFoundError:
                raise SegmentError(f"segment {segid} is missing") from None
        try:
            head = os.pread(fd, REC_HEAD.size + keep, offset)
            crc = _checked_head(head, REC_HEAD.size + keep, segid, offset, msgid, length)
            head = head[REC_HEAD.size:]
            check = zlib.crc32(head)
            pos, end = offset + REC_HEAD.size + keep, offset + REC_HEAD.size + length
            while pos < end:
                chunk = os.pread(fd, min(HEAD_CHUNK, end - pos), pos)
                if not chunk:
                    raise SegmentError(f"segment {segid}: record at {offset} is truncated")
                check = zlib.crc32(chunk, check)
                pos += len(chunk)
            tail = os.pread(fd, REC_TAIL.size, end)
        finally:
            os.close(fd)
        if len(tail) != REC_TAIL.size or REC_TAIL.unpack(tail) != (END_MAGIC, msgid):
            raise SegmentError(f"segment {segid}: record #{msgid} has no END marker")
        if check != crc:
            raise SegmentError(f"segment {segid}: record #{msgid} checksum mismatch")
        return head

    def raw(self, segid: int, offset: int, length: int) -> bytes:
        """Whatever bytes are at the place a record should be (for quarantine)."""
        with self._lock:
            try:
                return os.pread(self._fd(segid), record_size(length), offset)
            except OSError:
                return b""

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
