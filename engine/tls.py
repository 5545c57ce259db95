"""The server side of TLS: qmail-tls's control/servercert.pem as an SSLContext.

Owns building the server `ssl.SSLContext` every TLS listener uses (STARTTLS
on smtp/submission, STLS on pop3, implicit TLS on submissions and pop3s) and
keeping it current, and the threads its handshakes run in. It never reads the certificate on the hot path: a
session asks `ServerTls.context()` for the context of the moment, and a new
certificate is loaded only on `reload()` (SIGHUP; the supervisor also sends
HUP when the file's mtime changes) or when a stat, at most once per
RECHECK_SECONDS, shows the file changed.

Files (qmail-tls, spec vpopmail-pop3-auth §6.1):

    control/servercert.pem     certificate (+ chain) and its private key in one
                               PEM file; its existence enables STARTTLS
    control/tlsserverciphers   optional cipher string (lines joined with `:`);
                               `[tls] ciphers` wins when set

Settings (`[tls]` in qrelay.toml): `min_version` ("TLSv1.2" or "TLSv1.3"),
`ciphers` (OpenSSL cipher string for TLS 1.2; empty = the ssl module's
secure default). The context starts from `ssl.create_default_context`
(no SSLv2/3, no compression, secure TLS 1.2 ciphers); TLS 1.0/1.1 are never
allowed.

Reload swaps the context whole: sessions already encrypted keep the one
they were made with (nothing is dropped), new handshakes get the new one
(STARTTLS and an implicit-TLS connection ask for it when they start).
A certificate that cannot be loaded is refused with a one-line reason naming
the file, and the previous context stays in use.

Handshakes (`ServerTls.handshake` for STARTTLS/STLS, `ServerTls.implicit`
for a listener that starts with TLS) run in this process's pool of
`[tls] handshake_threads` threads, niced like the password hashing, not on
the event loop (engine.tls_transport): a flood of handshakes does not hold
other sessions' greetings and replies.

Session tickets: with `[tls] ticket_key_seconds` > 0 every context is given
the run's current shared key (engine.tls_tickets: made by the supervisor,
the same in every receiver, kept across certificate reloads), so a client
resumes its session on any receiver; a new epoch's key comes in a new
context, swapped whole like a reload.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine import metrics
from engine.smtp.auth import HASH_NICE, lower_priority
from engine.smtp.listeners import IMPLICIT_TLS_SCHEMES
from engine.tls_tickets import TicketKeyError, TicketKeys, install
from engine.tls_transport import TlsTransport, begin_tls, start_tls

log = logging.getLogger("qrelay.tls")

CERT_FILE = "control/servercert.pem"
CIPHERS_FILE = "control/tlsserverciphers"
# A session's context() stats the files at most this often.
RECHECK_SECONDS = 1.0
MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """The certificate or a TLS setting cannot be used (one line naming the file)."""


@dataclass(slots=True, frozen=True)
class TlsSnapshot:
    """What a context was built from: the files' (inode, size, mtime) and the settings."""
    stamp: tuple
    settings: Any


def _stamp(root: Path) -> tuple:
    out = []
    for name in (CERT_FILE, CIPHERS_FILE):
        try:
            st = os.stat(root / name)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason for `exc` without the ssl module's source location:
    `PEM lib`, not `[SSL] PEM lib (_ssl.c:3874)`."""
    text = exc.reason or (exc.args[1] if len(exc.args) > 1 else str(exc))
    text = str(text)
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    head, sep, tail = text.rpartition(" (_ssl.c:")
    return head if sep and tail.endswith(")") else text


def build_context(root: Path | str, settings: Any) -> ssl.SSLContext:
    """The server context from ROOT/control/servercert.pem and `settings` (a
    TlsSettings); raises TlsError with one line naming what is wrong."""
    root = Path(root)
    path = root / CERT_FILE
    if settings.min_version not in MIN_VERSIONS:
        raise TlsError(f"[tls] min_version = {settings.min_version!r}: "
                       f"expected one of {', '.join(MIN_VERSIONS)}")
    if not path.exists():
        raise TlsError(f"{CERT_FILE} is missing (the certificate and its key, PEM, in one file)")
    ciphers = settings.ciphers
    if not ciphers:
        try:
            lines = (root / CIPHERS_FILE).read_text("ascii").split()
        except FileNotFoundError:
            lines = []
        except (OSError, UnicodeDecodeError) as exc:
            raise TlsError(f"{CIPHERS_FILE}: {exc}") from None
        ciphers = ":".join(lines)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = MIN_VERSIONS[settings.min_version]
    # Clients renegotiating is an old DoS lever; nothing here needs it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if ciphers:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            where = "[tls] ciphers" if settings.ciphers else CIPHERS_FILE
            raise TlsError(f"{where}: no cipher matches {ciphers!r}") from None
    load_certificate(ctx, path, CERT_FILE)
    return ctx


def load_certificate(ctx: ssl.SSLContext, path: Path, name: str) -> None:
    """ctx.load_cert_chain(path), never asking for a passphrase; TlsError
    naming the file (`name`) in one line."""
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        # Without a callback OpenSSL prompts on the terminal (or reads stdin)
        # and waits: a receiver would hang on its event loop.
        asked.append(True)
        return b""
    try:
        ctx.load_cert_chain(path, password=no_passphrase)
    except ssl.SSLError as exc:
        if asked:
            raise TlsError(f"{name}: the private key is encrypted; qmail-tls reads it "
                           f"without a passphrase (store it unencrypted, mode 640)") from None
        raise TlsError(f"{name}: cannot load the certificate and key: "
                       f"{ssl_reason(exc)}") from None
    except OSError as exc:
        raise TlsError(f"{name}: {exc.strerror}") from None


class ServerTls:
    """The current server context of one process (see the module docstring)."""

    def __init__(self, root: Path | str, settings: Any,
                 clock: Any = time.monotonic, tickets: TicketKeys | None = None) -> None:
        self.root = Path(root)
        self.settings = settings
        self._clock = clock
        # The run's shared session-ticket keys (made by the supervisor from the
        # settings at start), used while [tls] ticket_key_seconds > 0.
        self.tickets = tickets
        self._context: ssl.SSLContext | None = None
        self._stamp: tuple | None = None
        self._epoch: int | None = None
        self._checked = 0.0
        self.error: str | None = None   # why there is no (new) context, for the log
        # A listener that starts with TLS is served: a removed file keeps the context.
        self.required = False
        self._pool: ThreadPoolExecutor | None = None
        self._load()

    def _load(self) -> bool:
        stamp = _stamp(self.root)
        self._checked = self._clock()
        tickets = self._shared()
        epoch = tickets.epoch() if tickets is not None else None
        if stamp == self._stamp:
            if epoch != self._epoch and self._context is not None:
                self._rotate()
            return False
        self._stamp = stamp
        if stamp[0] is None:
            # The file is gone: STARTTLS is no longer offered (qmail-tls). An
            # implicit-TLS listener, which `qrelay run` does not start without
            # one, keeps the last certificate, as for a broken file.
            self.error = f"{CERT_FILE} is missing"
            if self._context is None:
                return False
            if self.required:
                log.warning("%s; keeping the previous certificate", self.error)
                return False
            log.warning("%s: STARTTLS is no longer offered", self.error)
            self._context = None
            return True
        try:
            context = self._build()
        except TlsError as exc:
            # Keep the previous context (a half-written file must not stop TLS).
            self.error = str(exc)
            log.warning("%s%s", exc, "; keeping the previous certificate" if self._context else "")
            return False
        self._context, self.error = context, None
        return True

    def _shared(self) -> TicketKeys | None:
        return self.tickets if self.settings.ticket_key_seconds > 0 else None

    def _build(self) -> ssl.SSLContext:
        context = build_context(self.root, self.settings)
        tickets = self._shared()
        self._epoch = tickets.epoch() if tickets is not None else None
        if tickets is not None:
            try:
                install(context, tickets.key())
            except TicketKeyError as exc:
                # Still TLS, still tickets: only resumption on another receiver is lost.
                log.warning("session tickets not shared between receivers: %s", exc)
                self.tickets, self._epoch = None, None
        return context

    def _rotate(self) -> None:
        """A new ticket-key epoch: the same certificate in a new context with
        the new key (OpenSSL copies keys without a lock: a context in use by
        the handshake threads is never changed)."""
        self._epoch = self.tickets.epoch() if self.tickets is not None else None  # tried once
        try:
            self._context = self._build()
        except TlsError as exc:
            log.warning("%s; keeping the previous certificate and ticket key", exc)

    def context(self) -> ssl.SSLContext | None:
        """The context for a new handshake, None when there is no usable certificate."""
        if self._clock() - self._checked >= RECHECK_SECONDS:
            if self._load() and self._context is not None:
                log.info("%s reloaded", CERT_FILE)
        return self._context

    def pool(self) -> ThreadPoolExecutor:
        """The handshake threads (made on first use)."""
        if self._pool is None:
            # Niced like the hashing threads: a flood of handshakes yields the
            # CPU to the loop thread, which keeps greeting and answering.
            self._pool = ThreadPoolExecutor(
                max_workers=self.settings.handshake_threads, thread_name_prefix="tls-handshake",
                initializer=lower_priority, initargs=(HASH_NICE,))
        return self._pool

    async def handshake(self, transport: Any, protocol: Any, context: ssl.SSLContext,
                        timeout: float) -> TlsTransport:
        """STARTTLS's server handshake on `transport` (paused after the 220);
        the encrypted transport, whose reading starts paused. Raises on
        failure (engine.tls_transport)."""
        return await start_tls(transport, protocol, context, pool=self.pool(), timeout=timeout)

    def implicit(self, factory: Callable[[], Any], scheme: str,
                 admit: Callable[[str, str], Callable[[], None] | None] | None = None
                 ) -> Callable[[], asyncio.Protocol]:
        """The protocol factory of a listener that starts with TLS (RFC 8314
        submissions, pop3s): each connection's handshake with the certificate
        of the moment, in the handshake threads; then `factory()`'s protocol
        is connection_made with the encrypted transport. `admit(scheme, ip)`
        counts a connection during its handshake and returns its release, or
        None to refuse it (closed, no handshake)."""
        label = "pop3" if scheme == "pop3s" else scheme     # as its sessions count theirs
        return lambda: ImplicitTls(self, factory(), label, admit)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def reload(self, settings: Any | None = None) -> None:
        """HUP: re-read the files now (and take new settings)."""
        if settings is not None and settings != self.settings:
            self.settings = settings
            self._stamp = None          # settings changed: rebuild even if the files did not
        self._load()


class ImplicitTls(asyncio.Protocol):
    """A connection of an implicit-TLS listener until its handshake is done
    (engine.tls_transport.begin_tls takes its bytes from the first one)."""

    def __init__(self, tls: ServerTls, app: Any, scheme: str,
                 admit: Callable[[str, str], Callable[[], None] | None] | None = None) -> None:
        self.tls = tls
        self.app = app
        self.scheme = scheme
        self.handshake: Any = None
        self.admit = admit
        self.release: Callable[[], None] | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        context = self.tls.context()
        if context is None:           # the certificate went away: nothing to serve with
            transport.abort()
            return
        if self.admit is not None:
            # Counted while the handshake runs (up to handshake_timeout), as its
            # session will be: else connections that never finish one would
            # hold descriptors and memory past every connection cap.
            peer = transport.get_extra_info("peername")
            self.release = self.admit(self.scheme, peer[0] if peer else "unknown")
            if self.release is None:
                transport.abort()
                return
        self.handshake = begin_tls(transport, self.app, context, pool=self.tls.pool(),
                                   timeout=self.tls.settings.handshake_timeout, connected=False)
        self.handshake.waiter.add_done_callback(self._done)

    def _done(self, waiter: asyncio.Future) -> None:
        if self.release is not None:
            # The session counts itself from here on (no await in between).
            self.release()
            self.release = None
        if waiter.cancelled() or waiter.exception() is not None:
            metrics.tls_result("failed", self.scheme)
            return
        encrypted = waiter.result()
        self.handshake.connected = True
        # Reading on before the session starts: it may pause it (a PTR lookup).
        encrypted.resume_reading()
        self.app.connection_made(encrypted)


def check_certificate(root: Path | str, settings: Any, schemes: set[str] | frozenset[str]) -> None:
    """Start check for `qrelay run`: a listener of a TLS scheme needs a loadable
    certificate, and a certificate that exists must load. Raises TlsError."""
    root = Path(root)
    if settings.min_version not in MIN_VERSIONS:
        raise TlsError(f"[tls] min_version = {settings.min_version!r}: "
                       f"expected one of {', '.join(MIN_VERSIONS)}")
    tls_schemes = sorted(s for s in schemes if s in IMPLICIT_TLS_SCHEMES)
    if not (root / CERT_FILE).exists():
        if tls_schemes:
            raise TlsError(f"{CERT_FILE} is missing: the {', '.join(tls_schemes)} listener "
                           f"needs a certificate and its key (PEM, in one file)")
        return
    build_context(root, settings)


def session_cipher(transport: Any) -> str:
    """`ECDHE-RSA-AES256-GCM-SHA384`-style name of an encrypted transport's cipher."""
    cipher = transport.get_extra_info("cipher")
    return cipher[0] if cipher else "unknown"
