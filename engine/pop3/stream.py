"""Sending a message file for RETR and TOP, in bounded memory.

Owns the loop: read a chunk of the file into one reused buffer, turn it into
POP3's wire form with the Cython core (engine._smtpcore.MessageEncoder: LF →
CRLF, a leading "." doubled, TOP's line count — state kept across chunks) in
a second reused buffer, write it, and wait while the transport is above its
high-water mark (pause_writing/resume_writing). Held per connection at any
moment: the two buffers (the chunk and twice the chunk) and the transport's
buffer — whatever the size of the message. Every YIELD_BYTES the loop
yields, so one fast reader cannot starve the other sessions of its event loop.

A read error mid-message closes the connection without the terminator, as
qmail-pop3d does (its process dies): the client sees a truncated reply, never
a message that looks complete.
"""
from __future__ import annotations

import asyncio
import os
import stat
from typing import Any

from engine._smtpcore import MessageEncoder

# A reader that keeps up gets this much before the loop serves the other
# sessions (about a millisecond of work), not one chunk: each turn of the
# loop cost the sender as much as encoding 40 KB.
YIELD_BYTES = 1 << 20


class WriteGate:
    """The transport's flow control, as something a sender can await."""

    __slots__ = ("paused", "_waiter")

    def __init__(self) -> None:
        self.paused = False
        self._waiter: asyncio.Future | None = None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        if self.paused:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


async def send_file(transport: Any, gate: WriteGate, path: str, first: bytes,
                    body_lines: int, chunk_bytes: int, fd: int = -1) -> str | None:
    """Write `first` (the +OK line), then the message at `path` and its
    terminator; None once done. When the file cannot be opened or is not a
    regular file, nothing is written and the reason is returned, for the log.
    `fd`: the connection's socket when it is plain TCP (see _write), else -1."""
    # Opened on the event loop: O_NONBLOCK, so a FIFO (or a device) left in a
    # Maildir cannot block the open, and with it every session of the loop.
    try:
        file_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return exc.strerror or str(exc)
    f = open(file_fd, "rb", buffering=0)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        f.close()
        return "not a regular file"
    with f:
        transport.write(first)
        encoder = MessageEncoder(body_lines)
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        out = memoryview(bytearray(2 * chunk_bytes + 2))
        unyielded = 0
        while True:
            if gate.paused:
                await gate.wait()
                unyielded = 0
            if transport.is_closing():
                return None
            n = f.readinto(buf)
            if not n:
                break
            size = encoder.feed_into(view[:n], out)
            if size:
                _write(transport, fd, out[:size])
            if encoder.done:
                break
            unyielded += n
            if unyielded >= YIELD_BYTES and not gate.paused:
                await asyncio.sleep(0)
                unyielded = 0
        transport.write(encoder.finish())
    return None


def _write(transport: Any, fd: int, data: memoryview) -> None:
    """transport.write(bytes(data)) — but while nothing waits in the transport,
    straight to the socket first: the kernel copies from the encoder's buffer,
    and only what it did not take is copied into the bytes object the
    transport keeps (it keeps what it is given; the buffer is reused for the
    next chunk). One copy of the message less: 10 MB cost 8.4-9.6 ms of
    receiver CPU, a tenth of it that copy. Never under TLS (fd -1): the bytes
    must go through the transport's encryption."""
    if fd >= 0 and not transport.get_write_buffer_size():
        try:
            sent = os.write(fd, data)
        except OSError:    # EAGAIN: the transport queues it; an error: its write reports it
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(bytes(data))
