"""Checking and making the crypt(3) strings stored in vpasswd's second field.

`verify(password, crypted)` accepts every scheme found in real vpasswd files
(spec vpopmail §2.5): traditional DES (13 characters), `$1$` (MD5-crypt, what
vpopmail 5.4 writes), `$5$`, `$6$` (SHA-crypt, what 5.6 writes) and bcrypt
`$2a$`/`$2b$`/`$2y$`. An empty or unknown field never matches (vchkpw refuses
an empty hash too). `hash_password(password)` makes `$6$<16 salt chars>$…`.

Two backends, same answers:
- libxcrypt (the C library behind crypt(3) on every current Linux, called
  through ctypes with the re-entrant crypt_rn, so it is thread-safe and
  releases the GIL) — used when it loads and passes a known-answer self-test.
  It also knows `$y$` (yescrypt), which newer systems write.
- libpass (the maintained passlib fork) in pure Python otherwise: about 2.6x
  slower for SHA-512-crypt, and it holds the GIL while it hashes.
Python's own `crypt` module is not used (deprecated; removed in 3.13).
Results are compared with hmac.compare_digest (constant time).

Rounds: hashes are written with crypt(3)'s default of 5000 rounds for `$6$`
(no `rounds=` field), exactly what vpopmail's mkpasswd3 writes. libpass's own
default (656,000) is ~130x slower and would make a 10,000-user import take
most of an hour; any `rounds=` already stored in a hash is honoured on verify.

Both functions are CPU-heavy (1–10 ms each, bcrypt much more): callers on an
event loop must run them in an executor (loop.run_in_executor /
asyncio.to_thread), never inline.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import secrets
import threading
from functools import lru_cache

_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SALT_LENGTH = 16
# bcrypt looks at the first 72 bytes only (crypt(3) truncates silently; the
# bcrypt package raises instead, so we truncate first).
_BCRYPT_MAX = 72
# Known answer for the self-test (crypt(3), glibc and libxcrypt agree).
_SELFTEST = (b"secret", b"$6$abcdefgh$",
             b"$6$abcdefgh$ltjgWl6579NluT/Vi1nwEvcil.G5Nbc4NiXZaNGStk8PSwGfQv72N2CKPPrVA"
             b"CtLtip/cZ/1GM/O6IND4WQhG.")
# libxcrypt's struct crypt_data is 32,768 + a few hundred bytes; crypt_rn
# checks the size we pass, so a larger buffer is always safe.
_CRYPT_DATA_SIZE = 65536


class _LibXcrypt:
    """crypt_rn(3) from libcrypt.so.1 through ctypes."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
        lib = ctypes.CDLL(name)
        fn = lib.crypt_rn
        fn.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)
        fn.restype = ctypes.c_char_p
        self._fn = fn

    def crypt(self, phrase: bytes, setting: bytes) -> bytes | None:
        buf = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
        out = self._fn(phrase, setting, buf, _CRYPT_DATA_SIZE)
        if not out or out.startswith(b"*"):
            return None  # unknown or malformed setting (libxcrypt's failure tokens start with '*')
        return out


@lru_cache(maxsize=1)
def _xcrypt() -> _LibXcrypt | None:
    try:
        lib = _LibXcrypt()
        phrase, setting, expected = _SELFTEST
        if lib.crypt(phrase, setting) != expected:
            return None
        return lib
    except (OSError, AttributeError):
        return None


def backend() -> str:
    """"libxcrypt" or "libpass": which one verify and hash_password use here."""
    return "libxcrypt" if _xcrypt() is not None else "libpass"


def scheme(crypted: str) -> str | None:
    """The scheme name of a stored hash, or None when we would never match it."""
    if crypted.startswith("$1$"):
        return "md5_crypt"
    if crypted.startswith("$5$"):
        return "sha256_crypt"
    if crypted.startswith("$6$"):
        return "sha512_crypt"
    if crypted[:4] in ("$2a$", "$2b$", "$2y$"):
        return "bcrypt"
    if crypted.startswith("$y$"):
        return "yescrypt"
    if len(crypted) == 13 and all(c in _SALT_CHARS for c in crypted):
        return "des_crypt"
    return None


def _phrase(password: str, kind: str) -> bytes | None:
    raw = password.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        return None  # crypt(3) would stop at the NUL: never a match
    if kind == "bcrypt":
        raw = raw[:_BCRYPT_MAX]
    return raw


def verify(password: str, crypted: str) -> bool:
    """True when password matches the stored crypt string (constant-time compare)."""
    kind = scheme(crypted)
    if kind is None:
        return False
    phrase = _phrase(password, kind)
    if phrase is None:
        return False
    lib = _xcrypt()
    if lib is not None:
        stored = crypted.encode("ascii", "replace")
        out = lib.crypt(phrase, stored)
        if out is not None:
            return hmac.compare_digest(out, stored)
        if kind == "yescrypt":
            return False
    return _verify_libpass(phrase, crypted, kind)


def _verify_libpass(phrase: bytes, crypted: str, kind: str) -> bool:
    from passlib import hash as handlers
    handler = getattr(handlers, kind, None)
    if handler is None:
        return False
    try:
        return bool(handler.verify(phrase, crypted))  # libpass compares in constant time
    except (ValueError, TypeError):  # libpass's hash errors subclass these
        return False  # malformed hash (bad salt, rounds out of range, ...)


def new_salt() -> str:
    return "".join(secrets.choice(_SALT_CHARS) for _ in range(SALT_LENGTH))


def hash_password(password: str) -> str:
    """A `$6$` SHA-512-crypt string (5000 rounds, 16 random salt characters)."""
    phrase = _phrase(password, "sha512_crypt")
    if phrase is None:
        raise ValueError("a password cannot contain a NUL character")
    salt = new_salt()
    lib = _xcrypt()
    if lib is not None:
        out = lib.crypt(phrase, f"$6${salt}$".encode("ascii"))
        if out is not None:
            return out.decode("ascii")
    return _hash_libpass(phrase, salt)


class DummyHash:
    """What a login for a user that does not exist (or whose hash no password
    matches) is checked against, so that it costs what a real check costs: the
    stored hash last checked (`seen`), so of the scheme and cost the box's
    accounts use (on a box of vpopmail 5.4's `$1$` hashes, 0.1 ms, a fixed
    `$6$` one, 1.4 ms, told unknown logins apart). Until one is seen, a `$6$`
    hash of a random password, made at the first `get` (which hashes: call it
    off the event loop). Shared by SMTP AUTH and POP3."""

    def __init__(self) -> None:
        self._hash: str | None = None
        self._lock = threading.Lock()

    def get(self) -> str:
        with self._lock:
            if self._hash is None:
                self._hash = hash_password(secrets.token_hex(8))
            return self._hash

    def seen(self, crypted: str) -> None:
        self._hash = crypted


def _hash_libpass(phrase: bytes, salt: str) -> str:
    from passlib.hash import sha512_crypt
    return sha512_crypt.using(rounds=5000, salt=salt).hash(phrase)
