"""flood's client-side TLS session cache (--tls-resume).

`SessionCache` is the client SSLContext: every new connection offers the
session in `.session` (set by the client from a connection the server did
not resume), as a mail client's session cache for one server does.

Offering a session through the ssl module costs what a whole resumed
handshake does: CPython 3.11 copies the session by encoding and decoding it
(a workaround for an OpenSSL 1.1.0 bug), and decoding a session decodes the
server's certificate, slow in OpenSSL 3.0 (~0.4 ms of flood's CPU per
connection, on the CPUs the server under test shares). So `wrap_bio` hands
the session to OpenSSL itself, SSL_set_session through ctypes (OpenSSL takes
its own reference), after checking that the pointers it read from the ssl
module's objects are the ones it means (they point back at this context);
when anything does not check out it falls back to the ssl module's way.
Never used by the server (engine/): a load generator's shortcut.
"""
from __future__ import annotations

import _ssl
import ctypes
import functools
import ssl
from typing import Any

_VOID = ctypes.c_void_p


@functools.cache
def _libssl() -> Any:
    """libssl's calls used here, or None when they cannot be found."""
    try:
        lib = ctypes.CDLL(_ssl.__file__)        # dlsym through _ssl's own dependencies
        lib.SSL_set_session.argtypes, lib.SSL_set_session.restype = [_VOID, _VOID], ctypes.c_int
        lib.SSL_get_SSL_CTX.argtypes, lib.SSL_get_SSL_CTX.restype = [_VOID], _VOID
        lib.SSL_is_server.argtypes, lib.SSL_is_server.restype = [_VOID], ctypes.c_int
        lib.SSL_SESSION_get_time.argtypes, lib.SSL_SESSION_get_time.restype = [_VOID], ctypes.c_long
        lib.SSL_CTX_get_options.argtypes, lib.SSL_CTX_get_options.restype = [_VOID], ctypes.c_uint64
    except (OSError, AttributeError):
        return None
    return lib


def _field(obj: object, index: int) -> int:
    """The index-th pointer after the object header of a C object of _ssl
    (_SSLContext: SSL_CTX *ctx; _SSLSocket: PyObject *Socket, SSL *ssl,
    PySSLContext *ctx; SSLSession: SSL_SESSION *session, PySSLContext *ctx)."""
    return ctypes.c_void_p.from_address(id(obj) + object.__basicsize__ + 8 * index).value or 0


class SessionCache(ssl.SSLContext):
    """A client context that offers every new connection `.session`."""

    session: ssl.SSLSession | None = None
    _ctx = 0          # this context's SSL_CTX*, once checked (reading .options makes an enum)

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | None = None, session: ssl.SSLSession | None = None
                 ) -> ssl.SSLObject:
        # The event loop's start_tls calls this without a session argument.
        session = session or self.session
        if session is None or server_side:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        sslobj = super().wrap_bio(incoming, outgoing, server_side, server_hostname)
        if not self._offer(sslobj, session):
            sslobj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        return sslobj

    def _offer(self, sslobj: ssl.SSLObject, session: ssl.SSLSession) -> bool:
        """SSL_set_session on the new connection, if every pointer checks out."""
        lib = _libssl()
        if lib is None or ctypes.sizeof(ctypes.c_void_p) != 8:
            return False
        ctx = self._ctx
        if not ctx:
            ctx = _field(self, 0)
            if not ctx or lib.SSL_CTX_get_options(ctx) != int(self.options):
                return False
            self._ctx = ctx
        inner = sslobj._sslobj                          # the _ssl._SSLSocket
        ssl_ptr = _field(inner, 1)
        sess_ptr = _field(session, 0)
        if not (ssl_ptr and sess_ptr
                and _field(inner, 2) == id(self) and _field(session, 1) == id(self)
                and lib.SSL_get_SSL_CTX(ssl_ptr) == ctx and not lib.SSL_is_server(ssl_ptr)
                and lib.SSL_SESSION_get_time(sess_ptr) == session.time):
            return False
        # Shared, not copied: a connection freed without close_notify makes
        # OpenSSL mark it not resumable; the next connection is then not
        # resumed and the client takes the new session it gets.
        return lib.SSL_set_session(ssl_ptr, sess_ptr) == 1
