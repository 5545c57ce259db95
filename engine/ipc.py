"""Framed messages between qrelay's processes (receivers → spool writer,
scheduler → delivery workers): one framing, one set of limits, one error.

A frame is a body preceded by its length (u32, big-endian). A body is a
sequence of fields written with `Body` and read back with `Fields`: fixed
integers, and length-prefixed byte strings or texts (utf-8 with
surrogateescape, because addresses are bytes on the wire). Fields are
versioned by position: a later version only appends.

Every reader has a bound (`max_frame`): a frame announced over it cannot be
skipped safely (the stream cannot be resynchronised), so it is a FrameError
and the connection ends.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading

U8 = struct.Struct(">B")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
LEN = U32


class FrameError(ValueError):
    """A frame that does not follow the protocol."""


_CREDS = struct.Struct("3i")


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket
    (SO_PEERCRED: the kernel's word, not the peer's)."""
    return _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))


def enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Body:
    """Builds one frame body field by field."""

    __slots__ = ("parts",)

    def __init__(self, head: bytes = b"") -> None:
        self.parts = [head] if head else []

    def u8(self, n: int) -> Body:
        self.parts.append(U8.pack(n))
        return self

    def u32(self, n: int) -> Body:
        self.parts.append(U32.pack(n))
        return self

    def u64(self, n: int) -> Body:
        self.parts.append(U64.pack(n))
        return self

    def raw(self, data: bytes) -> Body:
        """A length-prefixed byte string."""
        self.parts += [U32.pack(len(data)), data]
        return self

    def text(self, text: str) -> Body:
        return self.raw(enc(text))

    def texts(self, texts) -> Body:
        """A count, then that many texts."""
        texts = list(texts)
        self.u32(len(texts))
        for t in texts:
            self.text(t)
        return self

    def rest(self, data: bytes) -> Body:
        """Unprefixed bytes that run to the end of the frame (last field only)."""
        self.parts.append(data)
        return self

    def frame(self, max_frame: int) -> bytes:
        # One join with the length in front: a body holding a message is
        # copied once, not joined and then copied again behind its length.
        n = sum(map(len, self.parts))
        if n > max_frame:
            raise FrameError(f"frame of {n} bytes is over the {max_frame} byte limit")
        return b"".join((LEN.pack(n), *self.parts))


def frame(body: bytes, max_frame: int) -> bytes:
    """The frame for body; FrameError if it is over max_frame."""
    if len(body) > max_frame:
        raise FrameError(f"frame of {len(body)} bytes is over the {max_frame} byte limit")
    return LEN.pack(len(body)) + body


class Fields:
    """Sequential reader of the fields of one frame body."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes, pos: int = 0) -> None:
        self.body = body
        self.pos = pos

    def _fixed(self, st: struct.Struct) -> int:
        try:
            (n,) = st.unpack_from(self.body, self.pos)
        except struct.error:
            raise FrameError("frame ends inside a field") from None
        self.pos += st.size
        return n

    def u8(self) -> int:
        return self._fixed(U8)

    def u32(self) -> int:
        return self._fixed(U32)

    def u64(self) -> int:
        return self._fixed(U64)

    def raw(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.body):
            raise FrameError("field runs past the frame")
        data = self.body[self.pos:self.pos + n]
        self.pos += n
        return data

    def text(self) -> str:
        return dec(self.raw())

    def count(self) -> int:
        """A count of fields that follow; each takes at least 4 bytes, so a count
        that cannot fit is refused before anything is allocated for it."""
        n = self.u32()
        if n * LEN.size > len(self.body) - self.pos:
            raise FrameError(f"count {n} cannot fit in the frame")
        return n

    def texts(self) -> list[str]:
        return [self.text() for _ in range(self.count())]

    def rest(self) -> bytes:
        data = self.body[self.pos:]
        self.pos = len(self.body)
        return data

    def end(self) -> None:
        if self.pos != len(self.body):
            raise FrameError(f"{len(self.body) - self.pos} stray bytes after the last field")


async def read_frame(reader: asyncio.StreamReader, max_frame: int) -> bytes | None:
    """The next frame body; None at a clean end of stream. FrameError if the
    stream ends inside a frame or announces one over max_frame."""
    n = await read_frame_length(reader, max_frame)
    return None if n is None else await read_frame_body(reader, n)


async def read_frame_length(reader: asyncio.StreamReader, max_frame: int) -> int | None:
    """The next frame's announced length (read_frame's first half, for a
    reader that must make room before the body comes)."""
    try:
        head = await reader.readexactly(LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("stream ends inside a frame length") from None
        return None
    (n,) = LEN.unpack(head)
    if n > max_frame:
        raise FrameError(f"frame of {n} bytes announced, over the {max_frame} byte limit")
    return n


async def read_frame_body(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise FrameError("stream ends inside a frame") from None


class FrameSender:
    """Frames queued during one event-loop turn leave in one write: one send
    syscall, and one wake-up of the reader, for a burst of jobs or results
    instead of one each. `send` from the loop's thread, `send_threadsafe` from
    any other; frames queued once the writer is closing are dropped (the
    peer's end fails what it was waiting for)."""

    __slots__ = ("writer", "loop", "_frames", "_lock")

    def __init__(self, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
        self.writer = writer
        self.loop = loop
        self._frames: list[bytes] = []
        self._lock = threading.Lock()

    def send(self, frame: bytes) -> None:
        if self._queue(frame):
            self.loop.call_soon(self._flush)

    def send_threadsafe(self, frame: bytes) -> None:
        """RuntimeError if the loop is closed."""
        if self._queue(frame):
            self.loop.call_soon_threadsafe(self._flush)

    def _queue(self, frame: bytes) -> bool:
        """True for the first frame since the last flush (which schedules one)."""
        with self._lock:
            self._frames.append(frame)
            return len(self._frames) == 1

    def _flush(self) -> None:
        with self._lock:
            frames, self._frames = self._frames, []
        if frames and not self.writer.is_closing():
            self.writer.write(frames[0] if len(frames) == 1 else b"".join(frames))


class FrameBuffer:
    """Frames out of a byte stream read in arbitrary chunks (blocking sockets)."""

    __slots__ = ("buf", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.buf = bytearray()
        self.max_frame = max_frame

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete frame bodies now available, in order."""
        self.buf += chunk
        out = []
        while len(self.buf) >= LEN.size:
            (n,) = LEN.unpack_from(self.buf)
            if n > self.max_frame:
                raise FrameError(f"frame of {n} bytes announced, over the {self.max_frame} byte limit")
            if len(self.buf) < LEN.size + n:
                break
            out.append(bytes(self.buf[LEN.size:LEN.size + n]))
            del self.buf[:LEN.size + n]
        return out
