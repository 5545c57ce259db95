"""engine.smtp.listeners: --listen parsing and binding."""
from __future__ import annotations

import socket
import time

import pytest

from engine.smtp.listeners import (ListenAddress, ListenError, bind_listeners, bound_address, more_listeners,
                                   parse_listen)


def test_parse_forms():
    assert parse_listen("127.0.0.1:2525") == ListenAddress("127.0.0.1", 2525)
    assert parse_listen(":25") == ListenAddress("0.0.0.0", 25)
    assert parse_listen("[::1]:0") == ListenAddress("::1", 0)
    assert str(ListenAddress("::1", 25)) == "[::1]:25"
    assert parse_listen("smtp://127.0.0.1:25") == ListenAddress("127.0.0.1", 25, "smtp")
    assert str(ListenAddress("127.0.0.1", 25, "smtp")) == "127.0.0.1:25"
    for bad in ("127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", "", "host:", "smtp://", "x://:25"):
        with pytest.raises(ListenError):
            parse_listen(bad)


def test_unknown_scheme_names_the_known_ones():
    with pytest.raises(ListenError, match="unknown scheme 'gopher'.*smtp"):
        parse_listen("gopher://127.0.0.1:70")


def test_bind_port_zero_reports_the_real_port_and_keeps_the_scheme():
    listeners = bind_listeners([ListenAddress("127.0.0.1", 0), ListenAddress("127.0.0.1", 0)])
    try:
        bound = [bound_address(listener) for listener in listeners]
        ports = [b.port for b in bound]
        assert all(p > 0 for p in ports) and ports[0] != ports[1]
        assert [b.scheme for b in bound] == ["smtp", "smtp"]
        c = socket.create_connection(("127.0.0.1", ports[0]), timeout=2)
        c.close()
    finally:
        for listener in listeners:
            listener.sock.close()


def test_names_are_not_resolved_and_busy_ports_are_errors():
    with pytest.raises(ListenError, match="numeric"):
        bind_listeners([ListenAddress("localhost", 0)])
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(ListenError, match="cannot listen"):
            bind_listeners([ListenAddress("127.0.0.1", 0), ListenAddress("127.0.0.1", busy.getsockname()[1])])
    finally:
        busy.close()


def _accept_all(listeners, expected: int, timeout: float = 10.0) -> list[int]:
    """Accept (and close) until `expected` connections came, waiting on the
    sockets; how many each listener got."""
    import select
    counts = [0] * len(listeners)
    deadline = time.monotonic() + timeout
    while sum(counts) < expected and time.monotonic() < deadline:
        ready, _, _ = select.select([listener.sock for listener in listeners], [], [], 0.5)
        for i, listener in enumerate(listeners):
            if listener.sock in ready:
                try:
                    conn, _ = listener.sock.accept()
                except BlockingIOError:
                    continue
                conn.close()
                counts[i] += 1
    return counts


def test_more_listeners_share_the_port_and_each_gets_connections():
    [first] = bind_listeners([ListenAddress("127.0.0.1", 0, "pop3")], reuse_port=True)
    [second] = more_listeners([first])
    try:
        assert second.scheme == "pop3"
        assert second.sock.getsockname() == first.sock.getsockname()
        clients = [socket.create_connection(first.sock.getsockname(), timeout=2) for _ in range(64)]
        for c in clients:
            c.close()
        counts = _accept_all([first, second], 64)
        # The kernel picks by address hash: 64 source ports never all land on one.
        assert sum(counts) == 64 and min(counts) > 0
    finally:
        first.sock.close()
        second.sock.close()


def test_more_listeners_needs_reuse_port_on_the_first():
    [first] = bind_listeners([ListenAddress("127.0.0.1", 0)])
    try:
        with pytest.raises(ListenError, match="a second time"):
            more_listeners([first])
    finally:
        first.sock.close()
