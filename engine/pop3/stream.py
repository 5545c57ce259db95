"""Sending a message file for RETR and TOP, in bounded memory.

Owns the loop: read a chunk of the file into one reused buffer, turn it into
POP3's wire form with the Cython core (engine._smtpcore.MessageEncoder: LF →
CRLF, a leading "." doubled, TOP's line count — state kept across chunks),
write it, and wait while the transport is above its high-water mark
(pause_writing/resume_writing). Held per connection at any moment: the read
buffer, one encoded chunk (at most twice its size) and the transport's buffer
— whatever the size of the message. Between chunks the loop yields, so one
fast reader cannot starve the other sessions of its event loop.

A read error mid-message closes the connection without the terminator, as
qmail-pop3d does (its process dies): the client sees a truncated reply, never
a message that looks complete.
"""
from __future__ import annotations

import asyncio
from typing import Any

from engine._smtpcore import MessageEncoder


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
                    body_lines: int, chunk_bytes: int) -> bool:
    """Write `first` (the +OK line), then the message at `path` and its
    terminator. False when the file could not be opened (nothing written)."""
    try:
        f = open(path, "rb", buffering=0)
    except OSError:
        return False
    with f:
        transport.write(first)
        encoder = MessageEncoder(body_lines)
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        while True:
            await gate.wait()
            if transport.is_closing():
                return True
            n = f.readinto(buf)
            if not n:
                break
            out = encoder.feed(view[:n])
            if out:
                transport.write(out)
            if encoder.done:
                break
            if not gate.paused:
                await asyncio.sleep(0)
        transport.write(encoder.finish())
    return True
