"""mbox delivery, as qmail-local's mailfile() (spec §3.5).

Append under an exclusive flock (given up after 30 s with qmail's text): the
`From ` line, Return-Path, Delivered-To, the message with `>From ` quoting
(any line that is `From ` after zero or more `>`), a missing final LF added,
then one empty line; fsync. On a write error the file is truncated back to
where this delivery started, so a mailbox never holds half a message.

It never touches a file other than the one named.
"""
from __future__ import annotations

import fcntl
import os
import re
import time

from engine.delivery.local.dotqmail import LocalTemporary, error_str

TEXT_SLOW_LOCK = "File has been locked for 30 seconds straight. (#4.3.0)\n"
_FROM = re.compile(rb"^(>*From )", re.M)
# Bytes quoted at a time: a substitution holds a piece per match until it
# joins them (tens of bytes each), so a body of millions of `From ` lines
# is quoted a piece of whole lines at a time.
_QUOTE_CHUNK = 1 << 16


def quote_from(body: bytes) -> bytes:
    """`>` before every line matching qmail's gfrom(); ensures a final LF."""
    parts = []
    start = 0
    while start < len(body):
        end = body.find(b"\n", start + _QUOTE_CHUNK - 1)
        end = len(body) if end < 0 else end + 1
        parts.append(_FROM.sub(rb">\1", body[start:end]))
        start = end
    out = b"".join(parts)
    if out and not out.endswith(b"\n"):
        out += b"\n"
    return out


def _lock(fd: int, timeout: float, clock=time.monotonic) -> bool:
    """flock with a deadline. True if locked; False if flock is not possible
    here (qmail then writes unlocked); raises on the deadline."""
    deadline = clock() + timeout
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError:
            return False
        if clock() >= deadline:
            raise LocalTemporary(TEXT_SLOW_LOCK)
        time.sleep(pause)           # another process holds it: poll, backing off
        pause = min(pause * 2, 0.05)


def append(path: str, display: str, header: bytes, body: bytes, *,
           lock_timeout: float = 30.0) -> None:
    """Deliver one message to the mbox `path` (`display` = the name as written
    in .qmail, for texts). Raises LocalTemporary with qmail's text."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LocalTemporary(
            f"Unable to open {display}: {error_str(exc.errno)}. (#4.2.1)\n") from None
    try:
        locked = _lock(fd, lock_timeout)
        pos = os.lseek(fd, 0, os.SEEK_END)
        data = header + quote_from(body) + b"\n"
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError as exc:
            if locked:
                try:
                    os.ftruncate(fd, pos)
                except OSError:
                    pass
            raise LocalTemporary(
                f"Unable to write {display}: {error_str(exc.errno)}. (#4.3.0)\n") from None
    finally:
        os.close(fd)
