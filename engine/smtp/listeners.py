"""Listening sockets for `qrelay run --listen [SCHEME://]HOST:PORT`.

The supervisor binds them once, before forking, so port 0 works (every receiver
shares the one real port) and a bind error is reported before anything starts.
Each listener carries its scheme: what the receivers serve on it (SCHEMES).
"""
from __future__ import annotations

import socket
from typing import Any, Callable
from dataclasses import dataclass


class ListenError(Exception):
    """A --listen value is malformed or cannot be bound."""


# scheme -> what is served on it: by a receiver (engine.smtp.receiver picks
# the protocol), except `http`, the status service's (engine.status). `smtp`
# is the default: port 25's dialogue.
SCHEMES: dict[str, str] = {
    "smtp": "SMTP, port 25's dialogue",
    "submission": "SMTP for mail clients (587): AUTH before MAIL, STARTTLS",
    "submissions": "submission over implicit TLS (465, RFC 8314)",
    "pop3": "POP3 (qmail-popup + qmail-pop3d), STLS when control/servercert.pem exists",
    "pop3s": "POP3 in TLS from the first byte (port 995)",
    "http": "/metrics and the status page (loopback only unless [status] allow_remote)",
}

# Schemes whose connections start with a TLS handshake (engine.tls): a
# listener of one needs control/servercert.pem before `qrelay run` starts.
IMPLICIT_TLS_SCHEMES = frozenset({"submissions", "pop3s"})


@dataclass(slots=True, frozen=True)
class ListenAddress:
    host: str
    port: int
    scheme: str = "smtp"

    def __str__(self) -> str:
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return where if self.scheme == "smtp" else f"{self.scheme}://{where}"


@dataclass(slots=True, frozen=True)
class Listener:
    """A bound, listening socket and the scheme served on it."""
    scheme: str
    sock: socket.socket


def parse_listen(text: str) -> ListenAddress:
    """`[SCHEME://]HOST:PORT`, `[IPv6]:PORT`, or `:PORT` (all IPv4 addresses)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "smtp", text
    if scheme not in SCHEMES:
        raise ListenError(f"--listen {text!r}: unknown scheme {scheme!r} "
                          f"(one of {', '.join(SCHEMES)})")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ListenError(f"--listen {text!r}: expected [SCHEME://]HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return ListenAddress(host or "0.0.0.0", int(port), scheme)


def _listening_socket(family: int, sockaddr: tuple, backlog: int, reuse_port: bool,
                      where: str) -> socket.socket:
    """One bound, listening, non-blocking socket; ListenError saying `where` if
    the address cannot be bound."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise ListenError(f"cannot listen on {where}: {exc.strerror}") from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _all_or_none(items: list, make: Callable[[Any], socket.socket]) -> list[socket.socket]:
    """make(item) for every item; on any failure the sockets made so far are closed."""
    sockets: list[socket.socket] = []
    try:
        for item in items:
            sockets.append(make(item))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_listeners(addresses: list[ListenAddress], backlog: int = 1024,
                   reuse_port: bool = False) -> list[Listener]:
    """Bind and listen on every address (non-blocking, inheritable by forked
    children); with `reuse_port`, so that `more_listeners` can add sockets
    on the same address."""
    def bind(addr: ListenAddress) -> socket.socket:
        try:
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
        except socket.gaierror:
            # Names are not resolved here: a listener must not depend on DNS.
            raise ListenError(f"--listen {addr}: the host must be a numeric IP address") from None
        family, _, _, _, sockaddr = infos[0]
        return _listening_socket(family, sockaddr, backlog, reuse_port, str(addr))
    sockets = _all_or_none(addresses, bind)
    return [Listener(addr.scheme, sock) for addr, sock in zip(addresses, sockets)]


def bound_address(listener: Listener) -> ListenAddress:
    name = listener.sock.getsockname()
    return ListenAddress(name[0], name[1], listener.scheme)


def more_listeners(listeners: list[Listener], backlog: int = 1024) -> list[Listener]:
    """Another socket on each listener's bound address (same scheme), sharing
    its port through SO_REUSEPORT: the kernel gives each new connection to
    one socket of the group. The listeners must come from
    bind_listeners(..., reuse_port=True)."""
    more = _all_or_none(listeners, lambda listener: _listening_socket(
        listener.sock.family, listener.sock.getsockname(), backlog, True,
        f"{bound_address(listener)} a second time"))
    return [Listener(listener.scheme, sock) for listener, sock in zip(listeners, more)]
