"""Never an open relay: address tricks from a client without RELAYCLIENT get 553,
end to end over a socket (in-process receiver, and one round through `qrelay run`)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.smtp_harness import InProcessServer, RawClient, RunningQrelay

REFUSED = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"

TRICKS = [
    b"user%foreign.test@mx.example.com",
    b"user%foreign.test@MX.example.com",
    b"foreign.test!user@mx.example.com",
    b'"user@foreign.test"@mx.example.com',
    b"user\\@foreign.test@mx.example.com",
    b"@mx.example.com:user@foreign.test",
    b"@mx.example.com,@other.test:user@foreign.test",
    b"user@foreign.test@mx.example.com",
    b"user@[1.2.3.4]",
    b"user@[127.0.0.2]",
    b"user@foreign.test.",
    b"user@mx.example.com.",
    b"user@mx.example.com..",
    b"user@FOREIGN.test",
    b"user@foreign.test",
    b"user@mx.example.com.foreign.test",
    b"user@evil-example.net",
    b"user@foreign.test%mx.example.com",
    b'"user@foreign.test"',
    b"foreign.test!user",
    b"user%foreign.test",
    b"user@",
    b"",
]

ACCEPTED = [
    b"user@mx.example.com",
    b"User@MX.Example.COM",
    b"user@sub.example.net",
    b"postmaster",
]


@pytest.fixture
def norelay(root: Path):
    (root / "control" / "tcp.smtp").write_text("127.0.0.1:allow\n")
    (root / "control" / "rcpthosts").write_text("mx.example.com\n.example.net\n")
    srv = InProcessServer(root)
    yield srv
    srv.stop()


@pytest.mark.parametrize("rcpt", TRICKS, ids=lambda b: b.decode("latin-1") or "empty")
def test_trick_is_refused(norelay, rcpt):
    c = RawClient(norelay.port)
    try:
        c.line()
        assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
        assert c.cmd(b"RCPT TO:<" + rcpt + b">") == REFUSED
        assert c.cmd(b"DATA") == b"503 RCPT first (#5.5.1)\r\n"
    finally:
        c.close()
    assert norelay.spool.messages == []


@pytest.mark.parametrize("rcpt", ACCEPTED, ids=lambda b: b.decode())
def test_own_domains_are_accepted(norelay, rcpt):
    c = RawClient(norelay.port)
    try:
        c.line()
        assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
        assert c.cmd(b"RCPT TO:<" + rcpt + b">") == b"250 ok\r\n"
    finally:
        c.close()


def test_unbracketed_and_spaced_forms(norelay):
    c = RawClient(norelay.port)
    try:
        c.line()
        c.cmd(b"MAIL FROM:<a@example.org>")
        assert c.cmd(b"RCPT TO:user@foreign.test") == REFUSED
        assert c.cmd(b"RCPT TO: user@foreign.test") == REFUSED
        assert c.cmd(b"rcpt to:<user@foreign.test> NOTIFY=NEVER") == REFUSED
        assert c.cmd(b"RCPT TO:<user@mx.example.com") == b"250 ok\r\n"  # missing '>' is fine (qmail)
        assert c.cmd(b"RCPT TO:<user@foreign.test\0>") == b"555 syntax error (#5.5.4)\r\n"
    finally:
        c.close()


def test_tricks_refused_through_qrelay_run(root):
    (root / "control" / "tcp.smtp").write_text("127.0.0.1:allow\n")
    q = RunningQrelay(root, procs=1)
    try:
        c = RawClient(q.port)
        c.line()
        c.cmd(b"MAIL FROM:<a@example.org>")
        for rcpt in TRICKS[:10]:
            assert c.cmd(b"RCPT TO:<" + rcpt + b">") == REFUSED, rcpt
        assert c.cmd(b"RCPT TO:<ok@mx.example.com>") == b"250 ok\r\n"
        c.close()
    finally:
        assert q.stop() == 0


def test_relay_client_may_relay(root):
    srv = InProcessServer(root)  # default tcp.smtp: 127. has RELAYCLIENT=""
    try:
        c = RawClient(srv.port)
        c.line()
        c.cmd(b"MAIL FROM:<a@example.org>")
        assert c.cmd(b"RCPT TO:<user@foreign.test>") == b"250 ok\r\n"
        c.close()
    finally:
        srv.stop()
