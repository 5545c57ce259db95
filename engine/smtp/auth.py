"""SMTP AUTH (RFC 4954) as the qmail smtp-auth patches answer it: LOGIN, PLAIN, CRAM-MD5.

Owns the exchange of one AUTH command (`AuthExchange`: the 334 prompts,
base64, `*`, the credentials it yields) and the check of credentials against
the vpopmail accounts (`PasswordChecker`, one per receiver process). The
session (engine.smtp.session) owns when AUTH is allowed, the throttle calls
and what a success changes (relaying, the Received line, the log).

Texts are the jms1 combined patch's (Dabrowski lineage), whose EHLO lines
(`250-AUTH LOGIN CRAM-MD5 PLAIN`, `250-AUTH=LOGIN CRAM-MD5 PLAIN`) the
reference box shows (spec vpopmail-pop3-auth §5.1). Before TLS only
CRAM-MD5 is offered and accepted, unless `[auth] allow_plaintext`.

The login name is the full address (vpopmail); CRAM-MD5 works only for an
account whose cleartext is kept (vpasswd's eighth field); an account with
the NO_SMTP flag is refused whatever its password.

Never on the event loop: a password hash (`$6$` costs milliseconds, bcrypt
far more) runs in this process's bounded pool of `[auth] hash_threads`
threads, niced (Linux nice is per thread), so under a flood of guesses the
loop thread still wins the CPU and other sessions keep their latency; checks
beyond the pool wait their turn. An unknown login is hashed too (against a
dummy hash: the stored hash last checked, so of the scheme and cost the
box's accounts use, engine.accounts.passwords.DummyHash) so the time to
answer does not tell which addresses exist.

Verified logins are remembered for `[auth] cache_seconds` (Dovecot's auth
cache): a mail client that logs in for every message costs one hash per
period, not one per message. Only successes are kept, as an HMAC of the
password under a random key of this process, keyed by the stored hash, so a
changed password or account misses at once; guesses are always hashed.
"""
from __future__ import annotations

import asyncio
import binascii
import hmac
import os
import secrets
import time
from base64 import b64decode
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.accounts.passwords import DummyHash, scheme, verify
from engine.config.domains import ascii_lower

R_AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
R_AUTH_FAILED = b"535 authorization failed (#5.7.0)\r\n"
R_AUTH_CANCELLED = b"501 auth exchange cancelled (#5.0.0)\r\n"
R_AUTH_MALFORMED = b"501 malformed auth input (#5.5.4)\r\n"
R_AUTH_ALREADY = b"503 you're already authenticated (#5.5.0)\r\n"
R_AUTH_IN_MAIL = b"503 no auth during mail transaction (#5.5.0)\r\n"
R_AUTH_TYPE = b"504 auth type not available (#5.5.1)\r\n"
R_AUTH_REQUIRED = b"530 Authorization required (#5.7.1)\r\n"
R_AUTH_TEMP = b"454 oops, problem with the accounts and I can't auth (#4.3.0)\r\n"
R_USERNAME = b"334 VXNlcm5hbWU6\r\n"     # "Username:"
R_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"     # "Password:"
R_PLAIN = b"334 \r\n"

ALL_MECHANISMS = ("LOGIN", "CRAM-MD5", "PLAIN")
SAFE_MECHANISMS = ("CRAM-MD5",)          # no password on the wire: allowed before TLS


def ehlo_lines(mechanisms: tuple[str, ...]) -> str:
    """The two EHLO lines (the second for pre-RFC Outlook), CRLF-ended."""
    names = " ".join(mechanisms)
    return f"250-AUTH {names}\r\n250-AUTH={names}\r\n"


@dataclass(slots=True, frozen=True)
class Credentials:
    mechanism: str
    login: str
    secret: str            # the password; for CRAM-MD5 the client's hex digest
    challenge: str = ""    # CRAM-MD5's challenge


def _b64(line: bytes) -> bytes | None:
    """Strict base64 of a whole line; None when malformed (or empty)."""
    if not line:
        return None
    try:
        return b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class AuthExchange:
    """One AUTH command's dialogue. `start`/`line` return bytes (a reply: a
    334 prompt keeps the exchange going, anything else ends it) or the
    Credentials to check."""

    __slots__ = ("mechanism", "login", "challenge")

    def __init__(self, mechanism: str, local: str) -> None:
        self.mechanism = mechanism
        self.login: str | None = None
        self.challenge = ""
        if mechanism == "CRAM-MD5":
            # The patches' <pid.time@host>; a random number instead of the pid,
            # so no two challenges repeat.
            self.challenge = f"<{secrets.randbelow(10**12)}.{int(time.time())}@{local}>"

    def start(self, initial: bytes) -> bytes | Credentials:
        mech = self.mechanism
        if mech == "LOGIN":
            if not initial:
                return R_USERNAME
            return self._login_user(initial)
        if mech == "PLAIN":
            if not initial:
                return R_PLAIN
            return self._plain(initial)
        # CRAM-MD5 takes no initial response.
        # Its host part may hold any byte (a Latin-1 tcp.smtp's TCPLOCALHOST).
        return b"334 " + _b64encode(self.challenge.encode("utf-8", "surrogateescape")) + b"\r\n"

    def line(self, line: bytes) -> bytes | Credentials:
        if line == b"*":
            return R_AUTH_CANCELLED
        mech = self.mechanism
        if mech == "LOGIN":
            if self.login is None:
                return self._login_user(line)
            password = _b64(line)
            if not password:
                return R_AUTH_MALFORMED
            return Credentials(mech, self.login, _text(password))
        if mech == "PLAIN":
            return self._plain(line)
        answer = _b64(line)
        if not answer:
            return R_AUTH_MALFORMED
        # `user digest`, split at the last space (Hoffmann; a name may hold spaces).
        user, sep, digest = _text(answer).rpartition(" ")
        if not sep or not user or not digest:
            return R_AUTH_MALFORMED
        return Credentials(mech, user, digest, self.challenge)

    def _login_user(self, line: bytes) -> bytes:
        user = _b64(line)
        if not user:
            return R_AUTH_MALFORMED
        self.login = _text(user)
        return R_PASSWORD

    def _plain(self, line: bytes) -> bytes | Credentials:
        raw = _b64(line)
        if raw is None:
            return R_AUTH_MALFORMED
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return R_AUTH_MALFORMED
        # authzid (parts[0]) is ignored, as by the patches.
        return Credentials("PLAIN", _text(parts[1]), _text(parts[2]))


# Nice value of the hashing threads (relative to the process's): the event
# loop thread keeps the CPU when both want it.
HASH_NICE = 10


def lower_priority(nice: int) -> None:
    """A pool thread's initializer: this thread `nice` steps below the process."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except (OSError, AttributeError):   # not Linux, or not allowed: same priority
        pass


def _b64encode(raw: bytes) -> bytes:
    return binascii.b2a_base64(raw, newline=False)


class AuthUnavailable(Exception):
    """The accounts cannot be read now (a 454, not a 535)."""


class PasswordChecker:
    """Checks Credentials against the accounts under ROOT (one per process)."""

    def __init__(self, accounts: Any, threads: int, *, nice: int = HASH_NICE,
                 cache_seconds: float = 0.0, cache_entries: int = 10000,
                 max_password_bytes: int = 128, clock: Any = time.monotonic) -> None:
        self.accounts = accounts
        self.max_password_bytes = max_password_bytes
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="auth-hash",
                                       initializer=lower_priority, initargs=(nice,))
        self.dummy = DummyHash()
        self.cache_seconds = cache_seconds
        self.cache_entries = cache_entries
        self._clock = clock
        self._key = secrets.token_bytes(32)
        # (login, stored hash) -> (HMAC of the password, expiry); insertion order = age.
        self._verified: dict[tuple[str, str], tuple[bytes, float]] = {}

    def _remembered(self, login: str, crypted: str, password: str) -> bool:
        entry = self._verified.get((login, crypted))
        if entry is None:
            return False
        mac, expiry = entry
        if expiry <= self._clock():
            del self._verified[(login, crypted)]
            return False
        return hmac.compare_digest(mac, self._mac(password))

    def _remember(self, login: str, crypted: str, password: str) -> None:
        if self.cache_seconds <= 0:
            return
        cache = self._verified
        cache.pop((login, crypted), None)
        while len(cache) >= self.cache_entries:
            del cache[next(iter(cache))]      # the oldest
        cache[(login, crypted)] = (self._mac(password), self._clock() + self.cache_seconds)

    def _mac(self, password: str) -> bytes:
        return hmac.digest(self._key, password.encode("utf-8", "surrogateescape"), "sha256")

    async def _verify(self, password: str, crypted: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, verify, password, crypted)

    async def _dummy_hash(self) -> str:
        # DummyHash.get hashes the first time: never on the event loop.
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.dummy.get)

    async def check(self, creds: Credentials, remoteip: str = "") -> tuple[bool, str]:
        """(accepted, why) — `why` is for the log only, never for the client. An
        accepted login is recorded in USERDIR/lastauth (`remoteip`), as vchkpw does."""
        from engine.accounts.store import AccountsError
        login = creds.login
        try:
            _, user = self.accounts.login(login)     # vchkpw: `joe` is in the default domain
        except AccountsError as exc:
            raise AuthUnavailable(str(exc)) from None
        if creds.mechanism == "CRAM-MD5":
            clear = user.clear if user is not None else None
            if not clear:
                return False, "no such user" if user is None else "no cleartext kept for CRAM-MD5"
            expected = hmac.new(clear.encode("utf-8", "surrogateescape"),
                                creds.challenge.encode("utf-8", "surrogateescape"), "md5").hexdigest()
            # As bytes: compare_digest refuses str with non-ASCII characters,
            # and the client's answer may hold any.
            answer = ascii_lower(creds.secret).encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(expected.encode(), answer):
                return False, "wrong password"
        else:
            if len(creds.secret.encode("utf-8", "surrogateescape")) > self.max_password_bytes:
                # Never hashed: its cost grows with its length ([auth] max_password_bytes).
                return False, "password longer than max_password_bytes"
            if user is None or scheme(user.crypted) is None:
                await self._verify(creds.secret, await self._dummy_hash())   # same time as a real check
                return False, "no such user" if user is None else "no password"
            self.dummy.seen(user.crypted)      # the dummy follows the hashes in use
            key = ascii_lower(login)
            if not self._remembered(key, user.crypted, creds.secret):
                if not await self._verify(creds.secret, user.crypted):
                    return False, "wrong password"
                self._remember(key, user.crypted, creds.secret)
        if user.no_smtp:
            return False, "account may not use SMTP"
        if remoteip:
            from engine.accounts import lastauth
            await asyncio.get_running_loop().run_in_executor(
                self.pool, lastauth.record, user.directory, remoteip)
        return True, ""

    def sender_allowed(self, login: str, sender: str) -> bool:
        """`[auth] sender_must_match`: the login's own address (in its domain or
        an alias domain of it, vaddaliasdomain), or an alias of
        its domain (valias's DOMDIR/.qmail-LOCAL) with a line delivering to it
        (`&login`, `login`, or the user's directory)."""
        from engine.accounts.store import AccountsError, safe_ext
        try:
            login = self.accounts.login(login)[0]     # `joe` -> joe@the default domain
            if ascii_lower(sender) == login:
                return True
            routed = self.accounts.route(sender)
            mailbox = self.accounts.mailbox(login)
        except AccountsError:
            return False
        if routed is None or mailbox is None:
            return False
        assignment = routed[1]
        if assignment.home != mailbox.assignment.home or not assignment.ext:
            return False
        if ascii_lower(assignment.ext) == ascii_lower(mailbox.assignment.ext):
            return True     # the user's own name in another name of the domain (an alias domain)
        path = os.path.join(assignment.home, f".qmail{assignment.dash}{safe_ext(assignment.ext)}")
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read(65536).splitlines()
        except OSError:
            return False
        me = ascii_lower(login)
        userdir = mailbox.user.directory.rstrip("/")
        for line in lines:
            line = line.strip()
            if ascii_lower(line.lstrip("&")) == me:
                return True
            if userdir and (line.rstrip("/") == userdir or line.startswith(userdir + "/")):
                return True
        return False

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
