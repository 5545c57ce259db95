"""TLS session-ticket keys shared by every receiver process of one `qrelay run`.

A mail client (Thunderbird, Outlook, Apple Mail) that reconnects offers the
session ticket of its last connection and skips the certificate and the
server's signature (an RSA-2048 signature is the largest single cost of a
STARTTLS). OpenSSL gives every SSL_CTX random ticket keys of its own, so with
several receiver processes a client landing on another receiver than last
time (the kernel picks) got a full handshake, and so did every client after a
certificate reload (a new context, new keys).

Owns: the ticket-key ratchet and putting its key into a server SSLContext.
The supervisor makes a `TicketKeys` at start (32 random bytes); receivers
are forked from it and so start from the same state. The state is advanced
every `period` seconds counted from that start (epochs of the wall clock, so
processes that never talk agree): state' = SHA-256(label, state), the old
state dropped. Every process advances its own copy (the supervisor in its
reload poll, so a restarted receiver is forked from a current one); no
process can compute an earlier epoch's key from what it holds: a ticket is
readable for one period at most, then clients fall back to a full handshake.
The 80-byte key of an epoch (OpenSSL's name, HMAC and AES keys) is HMACs of
the state; its 16-byte name changes with it, so an old ticket is recognised
as unknown, not mis-decrypted.

The ssl module has no call for SSL_CTX_set_tlsext_ticket_keys, so
`install` calls SSL_CTX_ctrl through ctypes on the SSL_CTX of the context,
after checking the pointer it read is that context's (its options agree),
and reads the keys back. It must only be used on a context no handshake uses
yet (engine.tls builds a new context for a new key): OpenSSL copies the keys
without a lock. Python's bytes are not wiped when dropped: the ratchet bounds
which keys exist, not what freed memory may still hold.
"""
from __future__ import annotations

import _ssl
import ctypes
import functools
import hashlib
import hmac
import os
import ssl
import time
from typing import Callable

KEY_BYTES = 80                            # 16 name + 32 HMAC + 32 AES (OpenSSL 1.1+)
_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_RATCHET = b"qrelay ticket key ratchet"


class TicketKeyError(Exception):
    """The key cannot be put into this SSLContext (one line saying why)."""


class TicketKeys:
    """The ratchet of one `qrelay run` (see the module docstring)."""

    def __init__(self, period: float, clock: Callable[[], float] = time.time,
                 secret: bytes | None = None) -> None:
        if period <= 0:
            raise ValueError("period must be > 0")
        self.period = period
        self._clock = clock
        self._origin = clock()
        self._epoch = 0
        self._state = secret if secret is not None else os.urandom(32)

    def epoch(self) -> int:
        """The current epoch, the state advanced to it (never backwards: a clock
        set back keeps the key of the moment)."""
        now = int((self._clock() - self._origin) // self.period)
        while self._epoch < now:
            self._state = hashlib.sha256(_RATCHET + self._state).digest()
            self._epoch += 1
        return self._epoch

    def key(self) -> bytes:
        """The current epoch's 80 bytes for SSL_CTX_set_tlsext_ticket_keys."""
        self.epoch()
        state = self._state

        def part(label: bytes) -> bytes:
            return hmac.new(state, label, hashlib.sha256).digest()
        return part(b"name")[:16] + part(b"hmac") + part(b"aes")


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl the ssl module uses (dlsym through _ssl's own dependencies)."""
    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    return lib


def _ssl_ctx(context: ssl.SSLContext, lib: ctypes.CDLL) -> int:
    """The SSL_CTX* of `context`: CPython's PySSLContext holds it right after
    the object header. Checked against the context's options before use."""
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(context.options):
        raise TicketKeyError("cannot find the SSL_CTX of this ssl.SSLContext")
    return pointer


def install(context: ssl.SSLContext, key: bytes) -> None:
    """Make `context` (a server context no handshake uses yet) encrypt and
    accept session tickets with `key`. Raises TicketKeyError."""
    if len(key) != KEY_BYTES:
        raise TicketKeyError(f"a ticket key is {KEY_BYTES} bytes, not {len(key)}")
    try:
        lib = _libssl()
    except (OSError, AttributeError) as exc:
        raise TicketKeyError(f"libssl: {exc}") from None
    pointer = _ssl_ctx(context, lib)
    given = ctypes.create_string_buffer(key, KEY_BYTES)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, KEY_BYTES, given) != 1:
        raise TicketKeyError("OpenSSL refused the session-ticket key")
    back = ctypes.create_string_buffer(KEY_BYTES)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, KEY_BYTES, back) != 1 \
            or back.raw != key:
        raise TicketKeyError("OpenSSL did not keep the session-ticket key")
