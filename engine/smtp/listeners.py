"""Listening sockets for `qrelay run --listen HOST:PORT`.

The supervisor binds them once, before forking, so port 0 works (every receiver
shares the one real port) and a bind error is reported before anything starts.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass


class ListenError(Exception):
    """A --listen value is malformed or cannot be bound."""


@dataclass(slots=True, frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """`HOST:PORT`, `[IPv6]:PORT`, or `:PORT` (all IPv4 addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ListenError(f"--listen {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return ListenAddress(host or "0.0.0.0", int(port))


def bind_listeners(addresses: list[ListenAddress], backlog: int = 1024) -> list[socket.socket]:
    """Bind and listen on every address (non-blocking, inheritable by forked children)."""
    sockets: list[socket.socket] = []
    try:
        for addr in addresses:
            try:
                infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
            except socket.gaierror:
                # Names are not resolved here: a listener must not depend on DNS.
                raise ListenError(f"--listen {addr}: the host must be a numeric IP address") from None
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise ListenError(f"cannot listen on {addr}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bound_address(sock: socket.socket) -> ListenAddress:
    name = sock.getsockname()
    return ListenAddress(name[0], name[1])
