"""POP3 with TLS (STLS, RFC 2595; pop3s) on trustme certificates, and the real
relay table (engine.relay) and login throttle behind a POP3 login."""
from __future__ import annotations

import asyncio
import contextlib
import poplib
import socket

import pytest

from engine.config.settings import Settings
from engine.relay import open_relay_table
from engine.relay.throttle import LoginThrottle
from tests.smtp_harness import InProcessServer, RunningQrelay, client_context, install_certificate
from tests.test_pop3 import Client, Lines, make_root

NAME = "127.0.0.1"     # poplib checks the certificate against the host it connects to


@pytest.fixture
def server():
    servers: list[InProcessServer] = []

    def start(root, scheme: str = "pop3") -> InProcessServer:
        srv = InProcessServer(root, scheme=scheme)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        if srv.receiver.relay is not None:
            asyncio.run_coroutine_threadsafe(srv.receiver.relay.close(), srv.loop).result(5)
        srv.stop()


def capabilities(c: Client) -> list[bytes]:
    return c.multi("CAPA")


def log_in(pop: poplib.POP3) -> None:
    """USER and PASS of make_root's account, whose mailbox is empty."""
    pop.user("joe@example.com")
    pop.pass_("secret")
    assert pop.stat() == (0, 0)


def test_stls(tmp_path, server):
    root = make_root(tmp_path)
    ca = install_certificate(root, NAME)
    srv = server(root)
    pop = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    try:
        assert "STLS" in pop.capa()
        pop.stls(context=client_context(ca))
        assert "STLS" not in pop.capa()                       # not offered twice
        assert pop.sock.version() in ("TLSv1.2", "TLSv1.3")
        with pytest.raises(poplib.error_proto, match="TLS already active"):
            pop._shortcmd("STLS")
        log_in(pop)
        with pytest.raises(poplib.error_proto, match="unimplemented"):
            pop._shortcmd("STLS")                            # TRANSACTION: qmail-pop3d's answer
        pop.quit()
    finally:
        pop.close()


def test_stls_without_certificate(tmp_path, server):
    root = make_root(tmp_path)
    c = Client(server(root).port)
    c.line()
    assert b"STLS" not in capabilities(c)
    assert c.cmd("STLS") == b"-ERR authorization first\r\n"


class FromElsewhere(poplib.POP3):
    """A POP3 client whose connection does not come from the server's own
    address (127.0.0.2 → 127.0.0.1): not this host talking to itself."""

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=("127.0.0.2", 0))


def test_no_password_in_clear_before_stls(tmp_path, server):
    root = make_root(tmp_path)
    ca = install_certificate(root, NAME)
    srv = server(root)
    srv.receiver.log = Lines()
    pop = FromElsewhere(NAME, srv.port, timeout=10)
    try:
        caps = pop.capa()
        assert "STLS" in caps and "USER" not in caps
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] no password in clear: "
                                                     r"STLS first, or port 995'$"):
            pop.user("joe@example.com")
        with pytest.raises(poplib.error_proto, match="USER first"):
            pop.pass_("secret")                              # never taken
        assert srv.receiver.log == ["pop3: USER before TLS from 127.0.0.2 refused: no password "
                                    "in clear ([pop3] allow_plaintext)"]
        pop.stls(context=client_context(ca))
        assert "USER" in pop.capa()
        log_in(pop)
        pop.quit()
    finally:
        pop.close()


def test_plaintext_allowed_by_the_setting_or_from_this_host(tmp_path, server):
    root = make_root(tmp_path)                              # no certificate: no STLS to offer
    srv = server(root)
    pop = FromElsewhere(NAME, srv.port, timeout=10)
    with pytest.raises(poplib.error_proto, match="no password in clear"):
        pop.user("joe@example.com")
    pop.close()
    local = poplib.POP3(NAME, srv.port, timeout=10)      # 127.0.0.1 → 127.0.0.1: this host
    assert "USER" in local.capa()
    log_in(local)
    local.quit()
    root2 = make_root(tmp_path / "2", "[auth]\nfailure_delay = 0\n[pop3]\nallow_plaintext = true\n")
    pop = FromElsewhere(NAME, server(root2).port, timeout=10)
    assert "USER" in pop.capa()
    log_in(pop)                                           # qmail-popup's way
    pop.quit()


@contextlib.contextmanager
def stls_answered(port: int, pipelined: bytes = b""):
    """A plain connection whose STLS (sent with `pipelined` in one write) got
    `+OK begin TLS negotiation`: (socket, its reader)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"+OK <")
        raw.sendall(b"STLS\r\n" + pipelined)
        assert f.readline() == b"+OK begin TLS negotiation\r\n"
        yield raw, f
    finally:
        raw.close()


def test_stls_discards_pipelined_plaintext(tmp_path, server):
    """A command injected behind STLS in the same packet (CVE-2011-0411's
    pattern) is never read: after the handshake only what came encrypted counts."""
    root = make_root(tmp_path)
    ca = install_certificate(root, NAME)
    srv = server(root)
    with stls_answered(srv.port, b"USER joe@example.com\r\n") as (raw, _):
        tls = client_context(ca).wrap_socket(raw, server_hostname=NAME)
        tf = tls.makefile("rb")
        tls.sendall(b"PASS secret\r\n")
        assert tf.readline() == b"-ERR USER first\r\n"      # the plaintext USER was dropped
        tls.sendall(b"QUIT\r\n")
        assert tf.readline() == b"+OK \r\n"
        tls.close()


def test_a_failed_stls_handshake_closes_and_forgets_the_session(tmp_path, server):
    from tests.test_delivery_e2e import wait_for
    root = make_root(tmp_path)
    install_certificate(root, NAME)
    srv = server(root)
    with stls_answered(srv.port) as (raw, f):
        raw.sendall(b"this is not a TLS client hello\r\n" * 4)
        assert f.read() == b""
        wait_for(lambda: not srv.receiver.sessions)


def test_pop3s_with_qrelay_run(tmp_path):
    root = make_root(tmp_path)
    ca = install_certificate(root, NAME)
    q = RunningQrelay(root, procs=1, extra=("--listen", "pop3s://127.0.0.1:0"))
    try:
        port = int(q.port_file.read_text().split()[1])
        pop = poplib.POP3_SSL("127.0.0.1", port, context=client_context(ca), timeout=10)
        try:
            assert pop.getwelcome().startswith(b"+OK <")
            assert "STLS" not in pop.capa()
            log_in(pop)
            pop.quit()
        finally:
            pop.close()
    finally:
        q.stop()
    assert "Traceback" not in q.stderr_text


def test_pop3s_counts_its_handshakes_ok_and_failed(tmp_path, server, monkeypatch):
    """qrelay_tls_total counts a pop3s handshake that works, not only one
    that fails (both, like its sessions, under protocol="pop3")."""
    from engine import metrics
    from tests.test_delivery_e2e import wait_for
    got: list[tuple[str, str]] = []
    monkeypatch.setattr(metrics, "tls_result", lambda outcome, protocol="smtp":
                        got.append(("tls", outcome, protocol)))
    monkeypatch.setattr(metrics, "session_opened", lambda protocol="smtp":
                        got.append(("session", protocol)))
    root = make_root(tmp_path)
    ca = install_certificate(root, NAME)
    srv = server(root, scheme="pop3s")
    pop = poplib.POP3_SSL("127.0.0.1", srv.port, context=client_context(ca), timeout=10)
    try:
        log_in(pop)
        pop.quit()
    finally:
        pop.close()
    assert got == [("tls", "ok", "pop3"), ("session", "pop3")]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
        raw.sendall(b"this is not a TLS client hello\r\n" * 4)
        wait_for(lambda: len(got) == 3, what="the failed handshake counted")
    assert got[2] == ("tls", "failed", "pop3")


def test_pop3s_counts_connections_in_their_handshake(tmp_path, server):
    """A pop3s connection counts against [pop3] max_connections from its
    first byte, not only once its handshake is done: connections that never
    finish one cannot pile up past the cap."""
    from tests.test_delivery_e2e import wait_for
    root = make_root(tmp_path, "[auth]\nfailure_delay = 0\n[pop3]\nmax_connections = 1\n")
    ca = install_certificate(root, NAME)
    srv = server(root, scheme="pop3s")
    counter = srv.receiver.pop3_counter
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10):
        wait_for(lambda: counter.total() == 1, 5, "the handshake counted")
        with pytest.raises((OSError, poplib.error_proto)):
            poplib.POP3_SSL("127.0.0.1", srv.port, context=client_context(ca), timeout=10)
    wait_for(lambda: counter.total() == 0, 5, "its count released")
    pop = poplib.POP3_SSL("127.0.0.1", srv.port, context=client_context(ca), timeout=10)
    try:
        log_in(pop)
        assert counter.total() == 1
        pop.quit()
    finally:
        pop.close()


def test_pop3s_needs_a_certificate_at_start(tmp_path):
    from qrelay_process import QrelayStartError    # bench/, on the path through smtp_harness
    root = make_root(tmp_path)
    with pytest.raises(QrelayStartError, match="servercert.pem is missing"):
        RunningQrelay(root, procs=1, extra=("--listen", "pop3s://127.0.0.1:0"))


def test_login_grants_relay_in_the_real_table(tmp_path, server):
    root = make_root(tmp_path)
    srv = server(root)
    table = open_relay_table(root, Settings())
    srv.receiver.relay = table
    srv.receiver.throttle = LoginThrottle(table, Settings())

    def allows() -> bool:
        return asyncio.run_coroutine_threadsafe(table.allows("127.0.0.1"), srv.loop).result(5)

    assert not allows()
    c = Client(srv.port)
    assert c.login() == b"+OK \r\n"
    assert allows()
    assert c.cmd("QUIT") == b"+OK \r\n"


def test_real_throttle_locks_out(tmp_path, server):
    root = make_root(tmp_path)
    (root / "qrelay.toml").write_text("[login]\nfailure_delay = 0.01\nmax_failures = 2\n")
    srv = server(root)
    settings = srv.receiver.config.settings
    table = open_relay_table(root, settings)
    srv.receiver.relay = table
    srv.receiver.throttle = LoginThrottle(table, settings)
    for _ in range(2):
        c = Client(srv.port)
        assert c.login(password="guess") == b"-ERR authorization failed\r\n"
        assert c.closed()
    c = Client(srv.port)            # locked out: the right password is not even checked
    assert c.login() == b"-ERR authorization failed\r\n"
    assert not asyncio.run_coroutine_threadsafe(table.allows("127.0.0.1"), srv.loop).result(5)


def test_retr_over_tls_streams_the_whole_message(tmp_path, server):
    """RETR through the TLS transport's flow control (a message far above its buffer)."""
    import os
    import time
    from tests.test_pop3 import deliver
    root = make_root(tmp_path)
    ca = install_certificate(root, NAME)
    body = b"Subject: big\n\n" + b"".join(b".%07d line of the body\n" % i for i in range(100_000))
    path = deliver(root, "joe@example.com", body)
    os.utime(path, (time.time() - 10, time.time() - 10))
    srv = server(root, scheme="pop3s")
    pop = poplib.POP3_SSL("127.0.0.1", srv.port, context=client_context(ca), timeout=10)
    try:
        pop.user("joe@example.com")
        pop.pass_("secret")
        _, lines, octets = pop.retr(1)
        assert lines[-1] == b"" and lines[-2] == b".0099999 line of the body"   # poplib un-stuffs
        assert len(lines) == 100_000 + 2 + 2 + 1 and octets > len(body)
        pop.quit()
    finally:
        pop.close()
