"""The receiver's smtpd log (ROOT/log/smtpd): tcpserver -v's connection lines
and one line per refusal, buffered and flushed by one timer (issue #15 item 5).
In-process receiver and real sockets; the log is a real SmtpdLog in tmp_path."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from engine.log import SmtpdLog
from engine.smtp.receiver import LOG_FLUSH_SECONDS
from tests.smtp_harness import InProcessServer, RawClient

ME = "mx.example.com"
STAMP = re.compile(r"^@[0-9a-f]{24} ")


class CountingLog(SmtpdLog):
    """An SmtpdLog that counts the flushes that had lines to write."""

    writes = 0

    def flush(self) -> None:
        if self._lines:
            self.writes += 1
        super().flush()


@pytest.fixture
def make_server(root: Path):
    servers: list[InProcessServer] = []

    def make(**controls: str) -> tuple[InProcessServer, CountingLog]:
        for name, text in controls.items():
            (root / "control" / name.replace("_", ".")).write_text(text)
        srv = InProcessServer(root)
        smtpd_log = CountingLog(root / "log" / "smtpd")
        srv.call(srv.receiver.attach_log, smtpd_log)
        servers.append(srv)
        return srv, smtpd_log

    yield make
    for srv in servers:
        srv.stop()


def lines(root: Path, until: str | None = None, timeout: float = 5.0) -> list[str]:
    """Texts of log/smtpd/current (stamps checked and cut); with `until`, wait
    until a line contains it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = (root / "log" / "smtpd" / "current").read_text().splitlines()
        except FileNotFoundError:
            raw = []
        assert all(STAMP.match(x) for x in raw), raw
        texts = [x[26:] for x in raw]
        if until is None or any(until in t for t in texts) or time.monotonic() > deadline:
            return texts
        time.sleep(0.02)


def greet(port: int) -> RawClient:
    c = RawClient(port)
    assert c.line().startswith(b"220 ")
    return c


def test_a_connection_logs_tcpservers_five_lines(make_server, root):
    srv, _ = make_server(concurrencyincoming="7\n")
    c = greet(srv.port)
    cport = c.sock.getsockname()[1]
    assert c.cmd(b"QUIT") == f"221 {ME}\r\n".encode()
    c.close()
    got = lines(root, until="status: 0/7")
    n = re.match(r"tcpserver: pid (\d+) from 127\.0\.0\.1$", got[1]).group(1)
    assert got == [
        "tcpserver: status: 1/7",
        f"tcpserver: pid {n} from 127.0.0.1",
        f"tcpserver: ok {n} {ME}:127.0.0.1:{srv.port} :127.0.0.1::{cport}",
        f"tcpserver: end {n} status 0",
        "tcpserver: status: 0/7",
    ]


def test_connection_numbers_are_unique_and_a_dropped_client_ends_with_256(make_server, root):
    srv, _ = make_server()
    for _ in range(3):
        greet(srv.port).close()     # no QUIT: qmail-smtpd would exit 1 (status 256)
    got = lines(root, until=None)
    deadline = time.monotonic() + 5
    while sum(t.startswith("tcpserver: end ") for t in got) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
        got = lines(root)
    pids = [t.split()[2] for t in got if t.startswith("tcpserver: pid ")]
    assert len(set(pids)) == 3
    assert sorted(t for t in got if t.startswith("tcpserver: end ")) == sorted(
        f"tcpserver: end {n} status 256" for n in pids)


def test_deny_rule_is_logged_like_tcpserver(make_server, root):
    srv, _ = make_server(tcp_smtp="127.0.0.1:deny\n")
    c = RawClient(srv.port)
    assert c.line() == b""
    got = lines(root, until="status 25600")
    n = got[1].split()[2]
    assert got[2].startswith(f"tcpserver: deny {n} {ME}:127.0.0.1:{srv.port} :127.0.0.1::")
    assert f"tcpserver: end {n} status 25600" in got
    c.close()


def test_rblsmtpd_line(make_server, root):
    srv, _ = make_server(tcp_smtp='127.0.0.1:allow,RBLSMTPD="-listed at rbl.test"\n')
    c = RawClient(srv.port)
    assert c.line() == b"220 rblsmtpd.local\r\n"
    got = lines(root, until="rblsmtpd:")
    n = got[1].split()[2]
    assert f"rblsmtpd: 127.0.0.1 pid {n}: 553 listed at rbl.test" in got
    c.close()


def test_a_blocked_client_that_leaves_ends_with_status_0(make_server, root):
    # rblsmtpd exits 0 however its dialogue ends (QUIT, EOF, its -t timeout):
    # tcpserver's end line says status 0, not qmail-smtpd's 256 for an EOF.
    srv, _ = make_server(tcp_smtp='127.0.0.1:allow,RBLSMTPD="listed"\n')
    c = RawClient(srv.port)
    assert c.line() == b"220 rblsmtpd.local\r\n"
    assert c.cmd(b"RCPT TO:<x@y>") == b"451 listed\r\n"
    c.close()
    got = lines(root, until="tcpserver: end")
    n = got[1].split()[2]
    assert f"tcpserver: end {n} status 0" in got, got


def test_relay_refused_names_the_address(make_server, root):
    srv, _ = make_server(tcp_smtp="127.0.0.1:allow\n")   # no RELAYCLIENT
    c = greet(srv.port)
    assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<victim@far.example>")[:4] == b"553 "
    got = lines(root, until="RCPT")
    n = got[1].split()[2]
    assert (f"smtpd: pid {n} from 127.0.0.1: RCPT <victim@far.example>: 553 sorry, "
            "that domain isn't in my list of allowed rcpthosts (#5.7.1)") in got
    c.close()


def test_unknown_mailbox_550_is_logged(make_server, root):
    from engine.accounts.admin import add_domain
    add_domain(root, "example.com", uid=12345, gid=12345)
    srv, _ = make_server()
    c = greet(srv.port)
    assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<nobody@example.com>")[:4] == b"550 "
    got = lines(root, until="nobody")
    assert any(t.endswith(": RCPT <nobody@example.com>: 550 sorry, no mailbox here by that name. (#5.1.1)")
               for t in got), got
    c.close()


def test_an_unreadable_mailbox_list_451_is_logged_with_its_cause(make_server, root):
    # The client is told only "can't read the mailbox list"; the log says why.
    from engine.accounts.admin import add_domain
    add_domain(root, "example.com", uid=12345, gid=12345)
    (root / "users" / "cdb").write_bytes(b"not a cdb")
    srv, _ = make_server()
    c = greet(srv.port)
    assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<joe@example.com>") == \
        b"451 sorry, I can't read the mailbox list right now (#4.3.0)\r\n"
    got = lines(root, until="joe")
    [line] = [t for t in got if "RCPT <joe@example.com>" in t]
    assert line.endswith(": RCPT <joe@example.com>: 451 sorry, I can't read the mailbox list "
                         f"right now (#4.3.0) (trouble reading users/cdb: {root}/users/cdb: "
                         "truncated cdb (shorter than its 2048-byte header))"), line
    c.close()


def test_too_many_connections_is_one_line(make_server, root):
    srv, _ = make_server(concurrencyincoming="1\n")
    held = greet(srv.port)
    c = RawClient(srv.port)
    assert c.line() == f"421 {ME} too many connections, try again later\r\n".encode()
    got = lines(root, until=": 421 ")
    [line] = [t for t in got if ": 421 " in t]   # not a port number with 421 in it
    assert re.fullmatch(rf"smtpd: pid \d+ from 127\.0\.0\.1: 421 {ME} too many connections, "
                        r"try again later \(status: 1/1\)", line)
    held.close()
    c.close()


def test_over_long_line_is_logged_once(make_server, root):
    srv, _ = make_server()
    c = greet(srv.port)
    c.send(b"NOOP " + b"x" * 10_000)
    assert c.reply() == b"500 sorry, that command line is too long (#5.5.2)\r\n"
    c.send(b"\r\n")
    assert c.cmd(b"NOOP") == b"250 ok\r\n"
    got = lines(root, until="500 sorry")
    assert sum("500 sorry, that command line is too long" in t for t in got) == 1
    c.close()


def test_nul_in_a_command_is_a_logged_refusal(make_server, root):
    """A sender or recipient refused for a NUL gets its log line like any
    other 555 (the NUL itself never reaches the log)."""
    srv, _ = make_server()
    c = greet(srv.port)
    assert c.cmd(b"MAIL FROM:<a\0@example.org>") == b"555 syntax error (#5.5.4)\r\n"
    assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x\0@sink.test>") == b"555 syntax error (#5.5.4)\r\n"
    assert c.cmd(b"NOOP \0") == b"501 sorry, NUL bytes are not allowed in commands (#5.5.2)\r\n"
    c.close()
    got = lines(root, until="501 sorry")
    n = got[1].split()[2]
    assert [t for t in got if t.startswith("smtpd: ")] == [
        f"smtpd: pid {n} from 127.0.0.1: MAIL: 555 syntax error (#5.5.4)",
        f"smtpd: pid {n} from 127.0.0.1: RCPT: 555 syntax error (#5.5.4)",
        f"smtpd: pid {n} from 127.0.0.1: 501 sorry, NUL bytes are not allowed in commands (#5.5.2)",
    ]


def test_lines_are_written_by_one_timer_not_one_write_each(make_server, root):
    srv, smtpd_log = make_server()
    start = time.monotonic()
    clients = [greet(srv.port) for _ in range(40)]
    for c in clients:
        c.close()
    got = lines(root)
    deadline = time.monotonic() + 5
    while sum(t.startswith("tcpserver: end ") for t in got) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
        got = lines(root)
    elapsed = time.monotonic() - start
    assert len(got) == 200
    # 200 lines; one write per timer tick at most (plus one), never one per line.
    assert smtpd_log.writes <= elapsed / LOG_FLUSH_SECONDS + 2, (smtpd_log.writes, elapsed)
    assert smtpd_log.writes < 50


def test_a_receiver_near_its_open_files_limit_refuses_with_a_reply(make_server, root):
    # Receiver.room: the sessions its descriptors allow (engine.openfiles); past
    # it libuv would accept and close connections without a word.
    srv, _ = make_server()
    srv.receiver.room = 1
    held = greet(srv.port)
    c = RawClient(srv.port)
    assert c.line() == f"421 {ME} too many connections, try again later\r\n".encode()
    got = lines(root, until=": 421 ")
    [line] = [t for t in got if ": 421 " in t]   # not a port number with 421 in it
    assert line.endswith("try again later (1 sessions in this receiver: open files limit)")
    held.close()
    c.close()


def test_a_quoted_local_part_that_needs_no_quotes_is_the_mailbox(make_server, root):
    # qmail's addrparse drops the quotes: "joe"@example.com is joe's (RFC 5321 4.1.2).
    from engine.accounts.admin import add_domain, add_user
    add_domain(root, "example.com", uid=12345, gid=12345)
    add_user(root, "joe@example.com", "pw")
    srv, _ = make_server()
    c = greet(srv.port)
    assert c.cmd(b'MAIL FROM:<"a"@example.org>') == b"250 ok\r\n"
    assert c.cmd(b'RCPT TO:<"joe"@example.com>') == b"250 ok\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    c.send(b"Subject: q\r\n\r\nhi\r\n.\r\n")
    assert c.line().startswith(b"250 ok")
    [(envelope, _)] = srv.spool.messages
    assert (envelope.sender, envelope.recipients) == ("a@example.org", ("joe@example.com",))
    c.close()


def test_the_log_is_written_when_its_thread_cannot_start(make_server, root, monkeypatch):
    """At the run user's process limit (ulimit -u counts threads) the log's
    writer thread cannot start: the flush's RuntimeError left the receiver
    believing a write in flight, and its smtpd log stayed silent for the rest
    of its life. The lines are written by the loop itself meanwhile."""
    import threading
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("smtpd-log"):
            raise RuntimeError("can't start new thread")
        real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    srv, _ = make_server(concurrencyincoming="7\n")
    for n in (1, 2):            # and not only once
        c = greet(srv.port)
        assert c.cmd(b"QUIT") == f"221 {ME}\r\n".encode()
        c.close()
        deadline = time.monotonic() + 5
        while lines(root).count("tcpserver: status: 0/7") < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lines(root).count("tcpserver: status: 0/7") == n
