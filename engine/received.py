"""The two Received lines qmail puts on top of every message (spec §1.7).

`received_line` is qmail-smtpd's (received.c), `queue_received_line`
qmail-queue's; stored as queue_received_line + received_line + message.
Both are byte-exact with qmail except for the line ends, which are CRLF
(the spool keeps wire form):

    Received: (qmail 29203 invoked from network); 27 Nov 2026 02:20:28 -0000
    Received: from unknown (HELO client.test) (127.0.0.1)
      by bench.local with SMTP; 27 Nov 2026 02:20:28 -0000

Every byte of an inserted value outside `A-Z a-z 0-9 . @ % + / = : - [ ]`
becomes `?` (notqmail's safeput; `[ ]` are notqmail's addition), so a
client can never inject a header line. Where qmail's C string stops at a
NUL byte, qrelay writes `?` and goes on.

Called once per message: the date text is cached per second.
"""
from __future__ import annotations

import time
from functools import lru_cache

from engine.config.domains import ascii_lower

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.@%+/=:-[]")
_SAFE_TABLE = bytes(c if c in _SAFE else 0x3F for c in range(256))
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def safe_bytes(value: str) -> bytes:
    """value as qmail's safeput writes it: unsafe bytes (per UTF-8 byte) → `?`."""
    return value.encode("utf-8", "surrogateescape").translate(_SAFE_TABLE)


@lru_cache(maxsize=4)
def _date822(second: int) -> bytes:
    # Pure function of the second; the tiny cache makes a burst of messages
    # in the same second share one formatting.
    t = time.gmtime(second)
    return (f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000").encode("ascii")


def date822(when: float) -> bytes:
    """qmail's date822fmt: `5 Jan 2024 09:03:07 -0000` (UTC, day not padded)."""
    return _date822(int(when))


def received_line(*, remotehost: str, helo: str | None, remoteip: str, remoteinfo: str | None,
                  local: str, when: float, protocol: str = "SMTP") -> bytes:
    """qmail-smtpd's two-line Received header, CRLF line ends.

    `(HELO x)` only when a HELO/EHLO was given (even empty) and differs
    ASCII-case-insensitively from remotehost; `info@` only with remoteinfo.
    `protocol` is `SMTP` for stock qmail (`ESMTPA`/`ESMTPS` with the patches).
    """
    parts = [b"Received: from ", safe_bytes(remotehost)]
    if helo is not None and ascii_lower(helo) != ascii_lower(remotehost):
        parts += [b" (HELO ", safe_bytes(helo), b")"]
    parts.append(b" (")
    if remoteinfo is not None:
        parts += [safe_bytes(remoteinfo), b"@"]
    parts += [safe_bytes(remoteip), b")\r\n  by ", safe_bytes(local),
              b" with ", protocol.encode("ascii", "replace"), b"; ", _date822(int(when)), b"\r\n"]
    return b"".join(parts)


def queue_received_line(*, pid: int, origin: str, uid: int, when: float) -> bytes:
    """qmail-queue's top line: `Received: (qmail <pid> invoked ...); <date>`, CRLF.

    origin "network" → `invoked from network`, "bounce" → `invoked for bounce`,
    "alias" → `invoked by alias`, anything else → `invoked by uid <uid>`.
    """
    if origin == "network":
        how = b"invoked from network"
    elif origin == "bounce":
        how = b"invoked for bounce"
    elif origin == "alias":
        how = b"invoked by alias"
    else:
        how = b"invoked by uid %d" % uid
    return b"Received: (qmail %d %s); %s\r\n" % (pid, how, _date822(int(when)))
