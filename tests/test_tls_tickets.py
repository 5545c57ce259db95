"""Session-ticket keys shared by the receivers (engine.tls_tickets, engine.tls)."""
from __future__ import annotations

import multiprocessing
import os
import socket
import ssl
from pathlib import Path

import pytest

from engine.config.settings import TlsSettings
from engine.tls import ServerTls
from engine.tls_tickets import KEY_BYTES, TicketKeyError, TicketKeys, install
from tests.smtp_harness import client_context, install_certificate

NAME = "mx.example.com"
SECRET = bytes(range(32))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def connect(server: ssl.SSLContext, client: ssl.SSLContext,
            session: ssl.SSLSession | None = None) -> tuple[bool, ssl.SSLSession]:
    """A handshake between the two contexts over memory BIOs, then one record
    from the server (a TLS 1.3 client gets its tickets with it); (resumed?,
    the client's session)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=NAME, session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done: set[int] = set()
    for _ in range(10):                       # a TLS 1.3 handshake takes 2 rounds here
        if len(done) == 2:
            break
        for n, side in enumerate((c, s)):
            try:
                side.do_handshake()
                done.add(n)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert len(done) == 2
    s.write(b"220")
    c_in.write(s_out.read())
    assert c.read(3) == b"220"
    return c.session_reused, c.session


def test_the_ratchet_moves_with_the_clock_and_never_back() -> None:
    clock = Clock()
    keys, twin = TicketKeys(60, clock, SECRET), TicketKeys(60, clock, SECRET)
    first = keys.key()
    assert len(first) == KEY_BYTES and keys.epoch() == 0
    clock.now += 59
    assert keys.key() == first
    clock.now += 1
    second = keys.key()
    assert keys.epoch() == 1 and second != first and second[:16] != first[:16]   # a new name too
    clock.now -= 120                          # a clock set back keeps the current key
    assert keys.key() == second
    clock.now += 240                          # a process that slept: epochs 2 and 3 at once
    assert twin.key() == keys.key() and keys.epoch() == 3
    assert TicketKeys(60, clock).key() != TicketKeys(60, clock).key()   # random secrets


def test_a_session_resumes_on_another_receivers_context_only_with_the_shared_key(root: Path) -> None:
    ca = install_certificate(root, NAME)
    client = client_context(ca)
    keys = TicketKeys(3600, secret=SECRET)
    a = ServerTls(root, TlsSettings(), tickets=keys).context()
    b = ServerTls(root, TlsSettings(), tickets=keys).context()
    alone = ServerTls(root, TlsSettings()).context()            # OpenSSL's own random keys
    off = ServerTls(root, TlsSettings(ticket_key_seconds=0), tickets=keys).context()
    resumed, session = connect(a, client)
    assert not resumed and session.has_ticket
    assert connect(b, client, session)[0]
    assert not connect(alone, client, session)[0]
    assert not connect(off, client, session)[0]


def test_the_key_survives_a_certificate_reload_and_changes_with_the_epoch(root: Path) -> None:
    ca = install_certificate(root, NAME)
    client = client_context(ca)
    clock = Clock()
    keys = TicketKeys(3600, clock, SECRET)
    tls = ServerTls(root, TlsSettings(), clock=clock, tickets=keys)
    first = tls.context()
    _, session = connect(first, client)
    install_certificate(root, NAME, ca)       # renewed by the same CA
    tls.reload()
    renewed = tls.context()
    assert renewed is not first and connect(renewed, client, session)[0]

    clock.now += 3600                         # the next epoch: a new context with the new key
    rotated = tls.context()
    assert rotated is not renewed
    assert not connect(rotated, client, session)[0]
    assert connect(rotated, client, connect(rotated, client)[1])[0]
    assert tls.context() is rotated           # nothing more until the next epoch


def test_install_refuses_a_key_of_the_wrong_size(root: Path) -> None:
    install_certificate(root, NAME)
    context = ServerTls(root, TlsSettings()).context()
    with pytest.raises(TicketKeyError):
        install(context, b"x" * 48)


def _receiver(root: Path, keys: TicketKeys, listener: socket.socket) -> None:
    """A forked 'receiver': its own ServerTls from the inherited keys, one client."""
    context = ServerTls(root, TlsSettings(), tickets=keys).context()
    conn, _ = listener.accept()
    with context.wrap_socket(conn, server_side=True) as tls:
        tls.sendall(b"220")
        tls.recv(1)
    os._exit(0)


def test_a_session_from_receiver_a_resumes_on_receiver_b(root: Path) -> None:
    """As `qrelay run` does: the keys are made before the receivers are forked."""
    ca = install_certificate(root, NAME)
    client = client_context(ca)
    keys = TicketKeys(3600)
    fork = multiprocessing.get_context("fork")
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    procs = [fork.Process(target=_receiver, args=(root, keys, sock)) for sock in listeners]
    for proc in procs:
        proc.start()
    try:
        resumed = []
        session = None
        for sock in listeners:
            with socket.create_connection(sock.getsockname(), timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname=NAME, session=session) as tls:
                    assert tls.recv(3) == b"220"      # the tickets came before it
                    resumed.append(tls.session_reused)
                    session = tls.session
                    tls.sendall(b"x")
        assert resumed == [False, True]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for sock in listeners:
            sock.close()


def test_pop3s_clients_resume_on_either_receiver_of_qrelay_run(tmp_path: Path) -> None:
    """The supervisor's key reaches both receivers: a session from one resumes
    on the other (the pid in the greeting says which receiver answered)."""
    from tests.smtp_harness import RunningQrelay
    from tests.test_pop3 import make_root

    root = make_root(tmp_path)
    ca = install_certificate(root, "127.0.0.1")
    client = client_context(ca)
    q = RunningQrelay(root, procs=2, extra=("--listen", "pop3s://127.0.0.1:0"))
    try:
        port = int(q.port_file.read_text().split()[1])
        pids, resumed, session = [], [], None
        while len(set(pids)) < 2 and len(pids) < 300:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
                    greeting = tls.recv(200)              # the tickets came before it
                    pids.append(greeting.split(b"<", 1)[1].split(b".", 1)[0])
                    resumed.append(tls.session_reused)
                    session = session or tls.session
                    tls.sendall(b"QUIT\r\n")
                    tls.recv(100)
        assert len(set(pids)) == 2 and resumed == [False] + [True] * (len(pids) - 1)
    finally:
        q.stop()
    assert "Traceback" not in q.stderr_text
