"""No SMTP smuggling: only CRLF.CRLF ends DATA, and nothing after a fake end marker
is ever run as a command or queued as a second message."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.smtp_harness import InProcessServer, RawClient

BARE_LF = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
BARE_CR = b"554 sorry, message contains a bare CR, which is not allowed (#5.6.0)\r\n"

SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@sink.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled body\r\n")

# Fake end markers that some servers honour; the ones with a bare LF must get
# qmail's 451 and a closed connection, the ones with only a bare CR a 554.
LF_ENDS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r\n\n.\r\n", b"\n..\n"]
CR_ENDS = [b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"]


@pytest.fixture
def server(root: Path):
    srv = InProcessServer(root)
    yield srv
    srv.stop()


def start_data(c: RawClient) -> None:
    c.line()
    assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"


@pytest.mark.parametrize("fake_end", LF_ENDS, ids=repr)
@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "two-writes"])
def test_bare_lf_fake_end_is_refused_and_closes(server, fake_end, one_write):
    c = RawClient(server.port)
    try:
        start_data(c)
        first = b"Subject: a\r\n\r\nbody" + fake_end
        rest = SMUGGLED + b".\r\nQUIT\r\n"
        if one_write:
            c.send(first + rest)
        else:
            c.send(first)
        assert c.reply() == BARE_LF
        assert c.closed()
    finally:
        c.close()
    assert server.spool.messages == []


@pytest.mark.parametrize("fake_end", CR_ENDS, ids=repr)
def test_bare_cr_fake_end_is_refused_and_nothing_runs(server, fake_end):
    c = RawClient(server.port)
    try:
        start_data(c)
        c.send(b"Subject: a\r\n\r\nbody" + fake_end + SMUGGLED + b".\r\nNOOP\r\n")
        assert c.reply() == BARE_CR  # one reply for the whole thing: no smuggled MAIL ran
        assert c.reply() == b"250 ok\r\n"  # the NOOP after the real end
        assert c.cmd(b"RCPT TO:<y@sink.test>") == b"503 MAIL first (#5.5.1)\r\n"
    finally:
        c.close()
    assert server.spool.messages == []


def test_bare_cr_accepted_as_one_message_when_allowed(root: Path):
    (root / "qrelay.toml").write_text("[smtp]\nrefuse_bare_cr = false\n")
    srv = InProcessServer(root)
    try:
        c = RawClient(srv.port)
        start_data(c)
        c.send(b"Subject: a\r\n\r\nbody\r.\r" + SMUGGLED + b".\r\n")
        reply = c.reply()
        assert reply.startswith(b"250 ok "), reply
        c.close()
        assert len(srv.spool.messages) == 1
        env, msg = srv.spool.messages[0]
        assert env.sender == "a@example.org" and env.recipients == ("x@sink.test",)
        assert msg.endswith(b"body\r.\r" + SMUGGLED)  # kept as data, byte for byte
    finally:
        srv.stop()


def test_dot_stuffed_end_lookalike_is_data(server):
    c = RawClient(server.port)
    try:
        start_data(c)
        c.send(b"Subject: a\r\n\r\n..\r\n" + SMUGGLED + b".\r\n")
        assert c.reply().startswith(b"250 ok ")
    finally:
        c.close()
    (env, msg), = server.spool.messages
    assert env.sender == "a@example.org"
    assert msg.endswith(b"\r\n.\r\n" + SMUGGLED)


def test_nul_after_dot_is_not_an_end(server):
    c = RawClient(server.port)
    try:
        start_data(c)
        c.send(b"Subject: a\r\n\r\nbody\r\n.\0\r\n" + SMUGGLED + b".\r\n")
        assert c.reply() == b"554 sorry, message contains NUL bytes (#5.6.0)\r\n"
        assert c.cmd(b"NOOP") == b"250 ok\r\n"
    finally:
        c.close()
    assert server.spool.messages == []
