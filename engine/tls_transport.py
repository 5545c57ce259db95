"""A server-side TLS upgrade whose handshake crypto runs off the event loop.

`start_tls(transport, protocol, context, pool=..., timeout=...)` does what
`loop.start_tls(..., server_side=True)` does for STARTTLS, and returns a
`TlsTransport` the protocol uses from then on. The difference: every step
of the handshake runs in `pool`, threads in which OpenSSL runs without the
GIL: the answer to the ClientHello (key share and the certificate's
signature: an RSA-2048 signature is a millisecond of CPU, more under load)
and the step after the client's Finished (the session tickets: random bytes,
a session encoded and encrypted, a third of the loop's time in a STARTTLS
password-guessing flood when it ran there). A burst of handshakes (password
guessers doing STARTTLS first) no longer holds every other session's
greeting and replies behind it on the loop, which only moves bytes.

Owns: the SSLObject and its two memory BIOs, and the protocol the plain
transport talks to from the upgrade on (`_TlsProtocol`). Thread rule: while
a step runs in the pool, the loop thread touches neither the SSLObject nor
its BIOs (bytes that arrive meanwhile wait in a list).

What a caller relies on (as with loop.start_tls): the application protocol's
connection_made is not called again; bytes that reach the plain transport
after the upgrade starts are handshake input, never application data
(plaintext pipelined behind STARTTLS breaks the handshake: CVE-2011-0411);
on failure start_tls raises, the plain transport is aborted and the
protocol's connection_lost follows (it was connection_made on that transport).
`begin_tls` is the same without awaiting, for a connection that starts with
TLS (engine.tls.ImplicitTls): its protocol is connection_made only once
encrypted, and hears nothing of a failed handshake.
Once encrypted, the application's reading starts paused: decrypted bytes
reach it only after it calls resume_reading() (after it has switched its
own state to the encrypted session), never before.
"""
from __future__ import annotations

import asyncio
import ssl
from concurrent.futures import Executor
from typing import Any

# SSL_read returns at most one record: 16 KiB of plaintext.
RECORD_BYTES = 16384


class TlsTransport(asyncio.Transport):
    """The application's side of an encrypted connection over a plain transport."""

    def __init__(self, tls: "_TlsProtocol") -> None:
        super().__init__()
        self._tls = tls
        self._closing = False

    # --- writing --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        tls = self._tls
        if self._closing or tls.done or not data:
            return          # as a closed plain transport: nothing goes out
        try:
            tls.sslobj.write(data)
        except ssl.SSLError as exc:
            tls.fatal(exc)
            return
        tls.flush()

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self._tls.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.raw.set_write_buffer_limits(high, low)

    # --- reading --------------------------------------------------------------------

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def is_reading(self) -> bool:
        return not self._tls.app_paused and not self._closing

    # --- closing --------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._tls.raw.is_closing()

    def close(self) -> None:
        """close_notify after the data already written, then close."""
        if self._closing:
            return
        self._closing = True
        tls = self._tls
        if tls.done:
            return          # the connection is gone already
        try:
            tls.sslobj.unwrap()
        except ssl.SSLError:
            pass                    # SSLWantReadError: the peer's close_notify is not awaited
        tls.flush()
        tls.raw.close()

    def abort(self) -> None:
        self._closing = True
        self._tls.raw.abort()

    # --- the rest -------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self._tls.sslobj
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return sslobj.context
        if name == "cipher":
            return sslobj.cipher()
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "compression":
            return sslobj.compression()
        return self._tls.raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.app


class _TlsProtocol(asyncio.Protocol):
    """What the plain transport talks to once the upgrade has started."""

    def __init__(self, raw: asyncio.Transport, app: Any, sslobj: ssl.SSLObject,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, pool: Executor,
                 connected: bool) -> None:
        self.raw = raw
        self.app = app
        self.connected = connected   # app.connection_made was called: tell it connection_lost
        self.sslobj = sslobj
        self.incoming = incoming
        self.outgoing = outgoing
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future = self.loop.create_future()
        self.transport: TlsTransport | None = None   # set once encrypted
        self.stepping = False        # a handshake step runs in the pool
        self.early: list[bytes] = []
        self.app_paused = True
        self.done = False            # failed or lost: nothing more is delivered

    # --- the handshake ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.transport is not None:
            self.incoming.write(data)
            if self.app_paused:
                self.raw.pause_reading()     # bounded: kept until the application reads
            else:
                self._read()
            return
        if self.stepping:
            # Bounded: no more reading until the step is done.
            self.early.append(data)
            self.raw.pause_reading()
            return
        self.incoming.write(data)
        self._step()

    def _step(self) -> None:
        try:
            step = self.loop.run_in_executor(self.pool, _handshake_step, self)
        except RuntimeError as exc:     # the pool is shut down: the receiver is stopping
            self.fail(exc)
            return
        self.stepping = True
        step.add_done_callback(self._stepped)

    def _stepped(self, step: asyncio.Future) -> None:
        self.stepping = False
        if self.done:
            return
        exc = step.exception() if not step.cancelled() else ConnectionAbortedError("cancelled")
        if exc is not None:          # ssl.SSLError: a bad or hostile peer
            self.fail(exc)
            return
        finished = step.result()
        self.flush()
        more = bool(self.early)
        if more:
            # Bytes that came while the step ran: the BIO is the loop's again.
            self.incoming.write(b"".join(self.early))
            self.early.clear()
        if not finished:
            if more:
                self.raw.resume_reading()
                self._step()
            return
        self.transport = TlsTransport(self)
        if not self.waiter.done():
            self.waiter.set_result(self.transport)

    def fail(self, exc: BaseException) -> None:
        if self.done:
            return
        self.done = True
        if not self.waiter.done():
            self.waiter.set_exception(exc)
        self.raw.abort()

    def timed_out(self) -> None:
        if self.transport is None:
            self.fail(asyncio.TimeoutError("TLS handshake timed out"))

    # --- encrypted --------------------------------------------------------------------

    def flush(self) -> None:
        if self.outgoing.pending:
            self.raw.write(self.outgoing.read())

    def _read(self) -> None:
        """Decrypt what the incoming BIO holds and hand it over in one call."""
        chunks = []
        eof = False
        sslobj = self.sslobj
        incoming = self.incoming
        while True:
            try:
                chunk = sslobj.read(RECORD_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as exc:
                self.fatal(exc)
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
            if not incoming.pending and not sslobj.pending():
                break     # all read: no SSLWantReadError to make (6 us each, every command)
        self.flush()              # post-handshake messages may want an answer
        if chunks:
            self.app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof and not self.done:
            self._eof()

    def _eof(self) -> None:
        if not self.app.eof_received():
            self.transport.close()

    def fatal(self, exc: BaseException) -> None:
        """A TLS error once encrypted: the connection goes (connection_lost follows)."""
        self.raw.abort()

    def pause_reading(self) -> None:
        self.app_paused = True
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        if not self.app_paused or self.done:
            return
        self.app_paused = False
        self.raw.resume_reading()
        if self.incoming.pending:
            # Records that came with the handshake's end, or while paused.
            self.loop.call_soon(self._read_if_reading)

    def _read_if_reading(self) -> None:
        if not self.app_paused and not self.done:
            self._read()

    # --- the plain transport's other calls ------------------------------------------

    def eof_received(self) -> bool | None:
        if self.transport is None:
            self.fail(ConnectionResetError("the client closed during the TLS handshake"))
            return None
        if self.done:
            return None
        # Like a plain connection: the application may keep it to send its last replies.
        return self.app.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            self.fail(exc or ConnectionResetError("the client left during the TLS handshake"))
        self.done = True
        if self.connected:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.app.resume_writing()


def _handshake_step(tls: _TlsProtocol) -> bool:
    """One do_handshake: True when finished, False when it needs more input.
    Nothing for a connection dropped while the step waited for a thread (its
    handshake timed out in a flood): signing for it would only lengthen the
    wait of the handshakes queued behind it."""
    if tls.done:
        return False
    try:
        tls.sslobj.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def begin_tls(raw: asyncio.Transport, protocol: Any, context: ssl.SSLContext, *,
              pool: Executor, timeout: float, connected: bool = True) -> "_TlsProtocol":
    """Start the server side of a TLS handshake on `raw`: from now on its bytes
    are handshake input. `.waiter` gets the encrypted transport (reading
    paused), or the exception (`raw` aborted by then)."""
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_side=True)
    tls = _TlsProtocol(raw, protocol, sslobj, incoming, outgoing, pool, connected)
    raw.set_protocol(tls)
    raw.resume_reading()
    timer = loop.call_later(timeout, tls.timed_out)
    tls.waiter.add_done_callback(lambda _: timer.cancel())
    return tls


async def start_tls(raw: asyncio.Transport, protocol: Any, context: ssl.SSLContext, *,
                    pool: Executor, timeout: float) -> TlsTransport:
    """The server side of a TLS handshake on `raw` (paused by the caller after
    its `220`); the encrypted transport for `protocol`, its reading paused.
    Raises on failure (ssl.SSLError, a reset, asyncio.TimeoutError)."""
    tls = begin_tls(raw, protocol, context, pool=pool, timeout=timeout)
    try:
        return await tls.waiter
    except asyncio.CancelledError:
        tls.fail(ConnectionAbortedError("cancelled"))
        raise
