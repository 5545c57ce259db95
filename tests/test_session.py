"""qmail-smtpd's dialogue over real sockets (in-process receiver, in-memory spool)."""
from __future__ import annotations

import os
import re
import socket
import smtplib
import time
from pathlib import Path

import pytest

from engine import metrics
from engine.queue import SpoolWriteError
from engine.smtp.session import CLOSED
from tests.smtp_harness import FakeSpool, InProcessServer, RawClient
from tests.test_delivery_e2e import wait_for

ME = "mx.example.com"
OK_RE = re.compile(rb"^250 ok (\d+) qp (\d+)\r\n$")


def write_control(root: Path, name: str, text: str) -> None:
    (root / "control" / name).write_text(text)


@pytest.fixture
def make_server(root: Path):
    servers: list[InProcessServer] = []

    def make(spool=None, scheme: str = "smtp", host: str = "127.0.0.1", **controls: str
             ) -> InProcessServer:
        for name, text in controls.items():
            if name == "qrelay_toml":
                (root / "qrelay.toml").write_text(text)
            else:
                write_control(root, name.replace("_", "."), text)
        srv = InProcessServer(root, spool, scheme=scheme, host=host)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def connect():
    """RawClient factory; every client is closed at teardown."""
    made: list[RawClient] = []

    def make(port: int, **kw) -> RawClient:
        c = RawClient(port, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def server(make_server) -> InProcessServer:
    """127.0.0.1 may relay (the default tcp.smtp of `qrelay init`)."""
    return make_server()


@pytest.fixture
def client(server, connect):
    c = connect(server.port)
    assert c.line() == f"220 {ME} ESMTP\r\n".encode()
    yield c
    c.close()


def transaction(c: RawClient, body: bytes = b"Subject: t\r\n\r\nhello\r\n", rcpt: bytes = b"x@sink.test") -> bytes:
    assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<" + rcpt + b">") == b"250 ok\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    c.send(body + b".\r\n")
    return c.reply()


def test_greeting_and_simple_replies(client):
    assert client.cmd(b"EHLO client.test") == (
        f"250-{ME}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-AUTH CRAM-MD5\r\n250-AUTH=CRAM-MD5\r\n"
        f"250 SIZE 67108864\r\n".encode())
    assert client.cmd(b"HELO client.test") == f"250 {ME}\r\n".encode()
    assert client.cmd(b"NOOP") == b"250 ok\r\n"
    assert client.cmd(b"noop with args") == b"250 ok\r\n"
    assert client.cmd(b"VRFY x@sink.test") == b"252 send some mail, i'll try my best\r\n"
    assert client.cmd(b"HELP").startswith(b"214 ")
    for verb in (b"FOO bar", b"EXPN x", b"ETRN x", b""):
        assert client.cmd(verb) == b"502 unimplemented (#5.5.1)\r\n"
    # AUTH and STARTTLS: tests/test_smtp_auth.py (here: no TLS, no certificate).
    assert client.cmd(b"AUTH LOGIN") == b"504 auth type not available (#5.5.1)\r\n"
    assert client.cmd(b"STARTTLS").startswith(b"454 TLS missing certificate")
    assert client.cmd(b"RCPT TO:<x@sink.test>") == b"503 MAIL first (#5.5.1)\r\n"
    assert client.cmd(b"DATA") == b"503 MAIL first (#5.5.1)\r\n"
    assert client.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert client.cmd(b"DATA") == b"503 RCPT first (#5.5.1)\r\n"
    assert client.cmd(b"RSET") == b"250 flushed\r\n"
    assert client.cmd(b"RCPT TO:<x@sink.test>") == b"503 MAIL first (#5.5.1)\r\n"
    assert client.cmd(b"QUIT") == f"221 {ME}\r\n".encode()
    assert client.closed()


def test_bare_lf_commands_and_lower_case_verbs(client):
    client.send(b"ehlo c\nmail from:<a@b>\nrcpt to:<x@sink.test>\n")
    assert client.reply().startswith(b"250-")
    assert client.reply() == b"250 ok\r\n"
    assert client.reply() == b"250 ok\r\n"


def test_helo_ends_transaction(client):
    assert client.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    client.cmd(b"HELO again")
    assert client.cmd(b"RCPT TO:<x@sink.test>") == b"503 MAIL first (#5.5.1)\r\n"


def test_smtpgreeting_and_databytes_in_ehlo(make_server, connect):
    srv = make_server(smtpgreeting="mx.example.com NO UCE\n", databytes="10000\n")
    c = connect(srv.port)
    assert c.line() == b"220 mx.example.com NO UCE ESMTP\r\n"
    assert c.cmd(b"EHLO x") == (
        b"250-mx.example.com NO UCE\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
        b"250-AUTH CRAM-MD5\r\n250-AUTH=CRAM-MD5\r\n250 SIZE 10000\r\n")
    assert c.cmd(b"QUIT") == b"221 mx.example.com NO UCE\r\n"
    c.close()


def test_smtpgreeting_that_is_not_utf8_is_sent_as_it_is(root, make_server, connect):
    """qmail-smtpd sends the file's bytes; a Latin-1 greeting made every
    connection hang without a greeting (a traceback in the receiver)."""
    (root / "control" / "smtpgreeting").write_bytes(b"mx.example.com bei M\xfcller\n")
    srv = make_server()
    c = connect(srv.port)
    assert c.line() == b"220 mx.example.com bei M\xfcller ESMTP\r\n"
    assert c.cmd(b"EHLO x").startswith(b"250-mx.example.com bei M\xfcller\r\n250-PIPELINING\r\n")
    assert c.cmd(b"HELO x") == b"250 mx.example.com bei M\xfcller\r\n"
    assert c.cmd(b"QUIT") == b"221 mx.example.com bei M\xfcller\r\n"


def test_message_is_queued_with_qmail_received_lines(server, client):
    client.cmd(b"EHLO client.test")
    body = b"Subject: t\r\n\r\nhello\r\n..leading dot\r\n.x\r\n"
    before = int(time.time())
    reply = transaction(client, body)
    m = OK_RE.match(reply)
    assert m, reply
    assert before <= int(m.group(1)) <= time.time() + 1
    assert len(server.spool.messages) == 1
    env, msg = server.spool.messages[0]
    assert int(m.group(2)) == server.spool.next_id  # qp = the spool's message id
    assert env.sender == "a@example.org"
    assert env.recipients == ("x@sink.test",)
    assert env.origin == "network"
    lines = msg.split(b"\r\n")
    assert re.fullmatch(rb"Received: \(qmail \d+ invoked from network\); \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d -0000", lines[0]), lines[0]
    assert lines[1] == b"Received: from unknown (HELO client.test) (127.0.0.1)"
    assert re.fullmatch(rb"  by mx\.example\.com with SMTP; \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d -0000", lines[2]), lines[2]
    assert msg.endswith(b"\r\nSubject: t\r\n\r\nhello\r\n.leading dot\r\nx\r\n")


def test_no_helo_received_line_and_empty_message(server, client):
    reply = transaction(client, b"")
    assert OK_RE.match(reply)
    msg = server.spool.messages[0][1]
    assert msg.split(b"\r\n")[1] == b"Received: from unknown (127.0.0.1)"


def test_relayclient_value_is_appended(make_server, root, connect):
    srv = make_server(tcp_smtp='127.:allow,RELAYCLIENT="@fixme"\n')
    c = connect(srv.port)
    c.line()
    assert OK_RE.match(transaction(c, rcpt=b"joe"))
    assert srv.spool.messages[0][0].recipients == ("joe@fixme",)
    c.close()


def test_mailbox_check_is_on_the_address_with_relayclient_appended(make_server, root, connect):
    # `nobody` is queued as nobody@example.com: that is the address local
    # delivery would bounce, not `nobody` (qualified with envnoathost).
    from engine.accounts.admin import add_domain, add_user
    add_domain(root, "example.com", uid=12345, gid=12345)
    add_user(root, "joe@example.com", "secret")
    srv = make_server(tcp_smtp='127.:allow,RELAYCLIENT="@example.com"\n')
    c = connect(srv.port)
    c.line()
    assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<nobody>") == b"550 sorry, no mailbox here by that name. (#5.1.1)\r\n"
    assert c.cmd(b"RCPT TO:<joe>") == b"250 ok\r\n"


def test_whole_transaction_pipelined_in_one_write(server, connect):
    c = connect(server.port)
    c.line()
    c.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@sink.test>\r\nRCPT TO:<y@sink.test>\r\n"
           b"DATA\r\nSubject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<z@sink.test>\r\n"
           b"DATA\r\nSubject: q\r\n\r\nbody2\r\n.\r\nQUIT\r\n")
    # Replies to the commands before the first end marker come back in one write.
    first = c.sock.recv(65536)
    assert first.startswith(f"250-{ME}\r\n".encode()) and first.count(b"\r\n") >= 7, first
    c.buf = first
    assert c.reply().startswith(b"250-")
    assert [c.reply() for _ in range(4)] == [b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"]
    assert OK_RE.match(c.reply())
    assert [c.reply() for _ in range(3)] == [b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"]
    assert OK_RE.match(c.reply())
    assert c.reply() == f"221 {ME}\r\n".encode()
    assert c.closed()
    msgs = server.spool.messages
    assert [m[0].recipients for m in msgs] == [("x@sink.test", "y@sink.test"), ("z@sink.test",)]
    assert msgs[0][1].endswith(b"Subject: p\r\n\r\nbody\r\n") and msgs[1][1].endswith(b"Subject: q\r\n\r\nbody2\r\n")


def test_data_split_into_single_bytes(server, client):
    assert client.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert client.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
    client.send(b"DA")
    client.send(b"TA\r\n")
    assert client.reply() == b"354 go ahead\r\n"
    for b in b"Subject: s\r\n\r\n.. x\r\n.\r\n":
        client.send(bytes([b]))
    assert OK_RE.match(client.reply())
    assert server.spool.messages[0][1].endswith(b"Subject: s\r\n\r\n. x\r\n")


def test_smtplib_sendmail(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as s:
        code, text = s.ehlo("client.test")
        assert code == 250 and b"PIPELINING" in text
        assert s.has_extn("size")
        s.sendmail("a@example.org", ["x@sink.test", "y@sink.test"], b"Subject: hi\r\n\r\nhello\r\n")
    assert server.spool.messages[0][0].recipients == ("x@sink.test", "y@sink.test")


def test_mail_syntax_error_and_null_sender(client):
    assert client.cmd(b"MAIL FROM:<" + b"a" * 901 + b">") == b"555 syntax error (#5.5.4)\r\n"
    assert client.cmd(b"MAIL FROM:<>") == b"250 ok\r\n"
    assert client.cmd(b"RCPT TO:<" + b"b" * 901 + b">") == b"555 syntax error (#5.5.4)\r\n"
    assert client.cmd(b"MAIL FROM x") == b"250 ok\r\n"  # qmail: no '<' or ':' = null sender
    assert client.cmd(b"MAIL FROM:<a@b> SIZE=1234 BODY=8BITMIME") == b"250 ok\r\n"
    # databytes 0: the max_message_bytes cap is the advertised and enforced limit.
    assert client.cmd(b"MAIL FROM:<a@b> SIZE=67108865") == (
        b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n")


def test_size_over_databytes_refused_at_mail(make_server, connect):
    srv = make_server(databytes="1000\n")
    c = connect(srv.port)
    c.line()
    assert c.cmd(b"MAIL FROM:<a@b> SIZE=1001") == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
    assert c.cmd(b"RCPT TO:<x@sink.test>") == b"503 MAIL first (#5.5.1)\r\n"
    assert c.cmd(b"MAIL FROM:<a@b> SIZE=1000") == b"250 ok\r\n"
    c.close()


def test_size_of_any_number_of_digits_is_answered(make_server, connect):
    """int() refuses 4300+ digits: a SIZE= that long (a command line may be
    longer than the default 4096) must get its 552, not kill the session."""
    srv = make_server(databytes="1000\n", qrelay_toml="[smtp]\nmax_line_length = 10000\n")
    c = connect(srv.port)
    c.line()
    assert c.cmd(b"MAIL FROM:<a@b> SIZE=" + b"9" * 5000) == (
        b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n")
    assert c.cmd(b"MAIL FROM:<a@b> SIZE=" + b"0" * 5000 + b"1000") == b"250 ok\r\n"
    c.close()


def test_a_refused_mail_ends_the_open_transaction(server, client):
    """A pipelining client whose new MAIL is refused gets 503 for the RCPT and
    DATA sent with it: they never join the transaction it left open (that
    message was queued from the old sender to the old and new recipients)."""
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@sink.test>\r\n")
    assert [client.reply() for _ in range(2)] == [b"250 ok\r\n", b"250 ok\r\n"]
    for mail in (b"MAIL FROM:<b@example.org> SIZE=67108865", b"MAIL FROM:<" + b"b" * 901 + b">"):
        client.send(mail + b"\r\nRCPT TO:<y@sink.test>\r\nDATA\r\n")
        assert client.reply().startswith((b"552 ", b"555 "))
        assert client.reply() == b"503 MAIL first (#5.5.1)\r\n"
        assert client.reply() == b"503 MAIL first (#5.5.1)\r\n"
    assert OK_RE.match(transaction(client))
    assert [env.recipients for env, _ in server.spool.messages] == [("x@sink.test",)]


def test_databytes_exceeded_in_body_then_session_usable(make_server, connect):
    srv = make_server(databytes="1000\n")
    c = connect(srv.port)
    c.line()
    reply = transaction(c, b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 20)
    assert reply == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
    assert OK_RE.match(transaction(c, b"small\r\n"))
    assert len(srv.spool.messages) == 1
    c.close()


def test_databytes_counts_crlf_as_one(make_server, connect):
    srv = make_server(databytes="20\n")
    c = connect(srv.port)
    c.line()
    assert OK_RE.match(transaction(c, b"123456789\r\n123456789\r\n"))  # 20 bytes as qmail counts
    assert transaction(c, b"123456789\r\n1234567890\r\n").startswith(b"552 ")
    c.close()


def test_body_sent_with_data_keeps_a_line_longer_than_a_command(server, client):
    """A client that does not wait for the 354 (qmail reads such a body as it
    comes): a long first line of the body in the same write as DATA, or in the
    write after the previous end marker, is queued whole (it lost all but
    max_line_length + 2 bytes of that line, and got 250)."""
    long_line = b"A" * 10000
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@sink.test>\r\nDATA\r\nSubject: x\r\n\r\n" + long_line)
    assert client.reply() == b"250 ok\r\n" and client.reply() == b"250 ok\r\n"
    assert client.reply() == b"354 go ahead\r\n"
    client.send(b"B\r\n.\r\n")
    assert OK_RE.match(client.reply())
    assert server.spool.messages[-1][1].endswith(b"\r\n\r\n" + long_line + b"B\r\n")
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@sink.test>\r\nDATA\r\nSubject: y\r\n\r\n")
    assert [client.reply() for _ in range(3)] == [b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"]
    client.send(b"one\r\n.\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@sink.test>\r\nDATA\r\n" + long_line)
    assert OK_RE.match(client.reply())
    assert [client.reply() for _ in range(3)] == [b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"]
    client.send(b"\r\n.\r\n")
    assert OK_RE.match(client.reply())
    assert server.spool.messages[-1][1].endswith(b"\r\n" + long_line + b"\r\n")


def test_bare_lf_in_data_gets_451_and_close(server, client):
    assert client.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert client.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
    assert client.cmd(b"DATA") == b"354 go ahead\r\n"
    client.send(b"Subject: bare lf\r\n\r\nline one with bare LF\nline two\r\n.\r\n")
    assert client.reply() == b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
    assert client.closed()
    time.sleep(0.1)
    assert server.spool.messages == []


def test_nul_in_data_and_in_command(server, client):
    assert client.cmd(b"MAIL FROM:<a@exa\0mple.org>") == b"555 syntax error (#5.5.4)\r\n"
    assert client.cmd(b"MAIL FROM:<a@exa\rmple.org>") == b"555 syntax error (#5.5.4)\r\n"
    assert client.cmd(b"NOOP \0") == b"501 sorry, NUL bytes are not allowed in commands (#5.5.2)\r\n"
    assert transaction(client, b"Subject: nul\r\n\r\na\0b\r\n") == b"554 sorry, message contains NUL bytes (#5.6.0)\r\n"
    assert server.spool.messages == []
    assert OK_RE.match(transaction(client))


def test_hop_count(server, client):
    looping = b"".join(b"Received: from x by y; date\r\n" for _ in range(60)) + \
        b"".join(b"Delivered-To: z@y\r\n" for _ in range(41)) + b"\r\nbody\r\n"
    assert transaction(client, looping) == b"554 too many hops, this message is looping (#5.4.6)\r\n"
    hundred = b"".join(b"Received: x\r\n" for _ in range(100)) + b"\r\nbody\r\nReceived: in body\r\n"
    # qmail-smtpd's MAXHOPS: 100 refused (the default max_hops), 99 accepted
    assert transaction(client, hundred) == b"554 too many hops, this message is looping (#5.4.6)\r\n"
    assert OK_RE.match(transaction(client, hundred.replace(b"Received: x\r\n", b"", 1)))
    assert len(server.spool.messages) == 1


def test_long_command_line(client):
    client.send(b"NOOP " + b"x" * 100_000 + b"\r\n")
    assert client.reply() == b"500 sorry, that command line is too long (#5.5.2)\r\n"
    assert client.cmd(b"NOOP") == b"250 ok\r\n"


def test_long_command_line_is_answered_before_its_lf(make_server, connect):
    # Issue #15: the 500 comes once the line is provably past the limit, not
    # when (if ever) its LF arrives; the LF then gets no second 500.
    srv = make_server(qrelay_toml="[smtp]\nmax_line_length = 512\n")
    c = connect(srv.port)
    c.line()
    c.send(b"NOOP " + b"x" * 508)         # 513 bytes: a CR may still come, no reply yet
    c.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        c.sock.recv(1)
    c.sock.settimeout(5)
    c.send(b"y")                          # 514 bytes without LF: too long whatever follows
    assert c.reply() == b"500 sorry, that command line is too long (#5.5.2)\r\n"
    c.send(b"z" * 5000 + b"\r\n")
    assert c.cmd(b"NOOP") == b"250 ok\r\n"  # the next reply is NOOP's, not a second 500
    assert c.cmd(b"NOOP " + b"a" * 507) == b"250 ok\r\n"   # exactly 512 + CRLF is fine


def test_line_without_end_is_dropped_after_64_times_the_limit(make_server, connect):
    srv = make_server(qrelay_toml="[smtp]\nmax_line_length = 512\n")
    c = connect(srv.port)
    c.line()
    c.send(b"x" * 1000)
    assert c.reply() == b"500 sorry, that command line is too long (#5.5.2)\r\n"
    try:
        for _ in range(100):              # 100 x 512 bytes > 64 x 512: closed meanwhile
            c.send(b"x" * 512)
            time.sleep(0.002)
    except OSError:
        pass                              # reset by the server: it closed already
    try:
        assert c.line() == b""            # closed without a further reply
    except ConnectionResetError:
        pass
    assert srv.call(lambda: len(srv.receiver.sessions)) == 0


def test_too_many_recipients(make_server, connect):
    srv = make_server(qrelay_toml="[smtp]\nmax_recipients = 3\n")
    c = connect(srv.port)
    c.line()
    assert c.cmd(b"MAIL FROM:<a@b>") == b"250 ok\r\n"
    for i in range(3):
        assert c.cmd(b"RCPT TO:<r%d@sink.test>" % i) == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<r4@sink.test>") == b"452 sorry, too many recipients (#4.5.3)\r\n"
    c.close()


def test_badmailfrom_reported_at_rcpt_even_for_relay_clients(make_server, connect):
    srv = make_server(badmailfrom="spammer@example.org\n@spam.test\n")
    c = connect(srv.port)
    c.line()
    assert c.cmd(b"MAIL FROM:<Spammer@Example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x@sink.test>") == b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
    assert c.cmd(b"MAIL FROM:<joe@spam.test>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x@sink.test>").startswith(b"553 sorry, your envelope sender")
    assert c.cmd(b"MAIL FROM:<>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
    c.close()


def test_spool_write_error_gives_451_and_receiver_keeps_serving(make_server, connect):
    spool = FakeSpool()
    spool.fail = SpoolWriteError("No space left on device")
    srv = make_server(spool)
    c = connect(srv.port)
    c.line()
    assert transaction(c) == b"451 qq write error or disk full (#4.3.0)\r\n"
    spool.fail = None
    assert OK_RE.match(transaction(c))
    c2 = connect(srv.port)
    assert c2.line().startswith(b"220 ")
    assert len(spool.messages) == 1
    c.close()
    c2.close()


def test_disconnect_mid_data_queues_nothing(server, connect):
    c = connect(server.port)
    c.line()
    c.cmd(b"MAIL FROM:<a@example.org>")
    c.cmd(b"RCPT TO:<x@sink.test>")
    c.cmd(b"DATA")
    c.send(b"Subject: cut\r\n\r\nhalf a message\r\n.")
    c.close()
    time.sleep(0.2)
    assert server.spool.messages == []
    c = connect(server.port)
    assert c.line().startswith(b"220 ")
    c.close()


def test_timeout(make_server, connect):
    srv = make_server(timeoutsmtpd="1\n")
    c = connect(srv.port)
    c.line()
    start = time.monotonic()
    assert c.reply() == b"451 timeout (#4.4.2)\r\n"
    assert 0.9 <= time.monotonic() - start < 3.5
    assert c.closed()


def test_concurrencyincoming_caps_connections(make_server, connect):
    srv = make_server(concurrencyincoming="2\n")
    a, b = connect(srv.port), connect(srv.port)
    assert a.line().startswith(b"220") and b.line().startswith(b"220")
    c = connect(srv.port)
    assert c.line() == f"421 {ME} too many connections, try again later\r\n".encode()
    assert c.closed()
    a.cmd(b"QUIT")
    a.closed()
    wait_for(lambda: len(srv.receiver.sessions) == 1 or None, timeout=10,
             what="the closed session's slot given back")
    d = connect(srv.port)
    assert d.line().startswith(b"220")
    for x in (b, c, d):
        x.close()


def test_per_ip_cap(make_server, connect):
    srv = make_server(qrelay_toml="[smtp]\nmax_connections_per_ip = 1\n")
    a = connect(srv.port)
    assert a.line().startswith(b"220")
    b = connect(srv.port)
    assert b.line() == f"421 {ME} too many connections from your address, try again later\r\n".encode()
    a.close()
    b.close()


def test_denied_client_is_closed_without_greeting(make_server, connect, monkeypatch):
    refused = []
    monkeypatch.setattr(metrics, "session_refused", lambda why, protocol: refused.append(why))
    srv = make_server(tcp_smtp="127.0.0.1:deny\n")
    c = connect(srv.port)
    assert c.line() == b""
    c.close()
    assert refused == ["denied"]            # qrelay_sessions_total{result="denied"}


def test_rblsmtpd_temporary_and_permanent(make_server, root, connect, monkeypatch):
    refused = []
    monkeypatch.setattr(metrics, "session_refused", lambda why, protocol: refused.append(why))
    srv = make_server(tcp_smtp='127.0.0.1:allow,RBLSMTPD="listed at example \\001 rbl"\n')
    c = connect(srv.port)
    assert c.line() == b"220 rblsmtpd.local\r\n"
    assert refused == ["rbl"]               # qrelay_sessions_total{result="rbl"}
    assert c.cmd(b"EHLO x") == b"250 rblsmtpd.local\r\n"
    assert c.cmd(b"MAIL FROM:<a@b>") == b"250 rblsmtpd.local\r\n"
    assert c.cmd(b"RCPT TO:<x@sink.test>") == b"451 listed at example \\001 rbl\r\n"
    assert c.cmd(b"DATA") == b"451 listed at example \\001 rbl\r\n"
    assert c.cmd(b"QUIT") == b"221 rblsmtpd.local\r\n"
    c.close()
    write_control(root, "tcp.smtp", '127.0.0.1:allow,RBLSMTPD="-go away"\n')
    assert srv.reload()
    c = connect(srv.port)
    assert c.line() == b"220 rblsmtpd.local\r\n"
    assert c.cmd(b"RCPT TO:<x@sink.test>") == b"553 go away\r\n"
    c.close()
    write_control(root, "tcp.smtp", '127.0.0.1:allow,RBLSMTPD=""\n')
    assert srv.reload()
    c = connect(srv.port)
    assert c.line() == f"220 {ME} ESMTP\r\n".encode()  # empty RBLSMTPD = not blocked
    c.close()


def test_reload_new_connections_get_new_snapshot(server, root, connect):
    old = connect(server.port)
    assert old.line() == f"220 {ME} ESMTP\r\n".encode()
    write_control(root, "smtpgreeting", "changed.example\n")
    assert server.reload()
    new = connect(server.port)
    assert new.line() == b"220 changed.example ESMTP\r\n"
    assert old.cmd(b"HELO x") == f"250 {ME}\r\n".encode()
    (root / "control" / "me").unlink()
    assert not server.reload()  # broken config: the old snapshot stays
    c = connect(server.port)
    assert c.line() == b"220 changed.example ESMTP\r\n"
    for x in (old, new, c):
        x.close()


def test_localiphost_literal_is_rewritten(make_server, connect):
    srv = make_server(tcp_smtp="127.0.0.1:allow\n", localiphost="mx.example.com\n")
    c = connect(srv.port)
    c.line()
    assert OK_RE.match(transaction(c, rcpt=b"postmaster@[127.0.0.1]"))
    assert srv.spool.messages[0][0].recipients == ("postmaster@mx.example.com",)
    c.close()


def test_localiphost_ipv6_literal_is_rewritten(make_server, connect):
    # A client on ::1, not a relay client: postmaster@[IPv6:::1] is this host.
    srv = make_server(host="::1", tcp_smtp="::1:allow\n", localiphost="mx.example.com\n")
    c = connect(srv.port, host="::1")
    c.line()
    assert OK_RE.match(transaction(c, rcpt=b"postmaster@[IPv6:::1]"))
    envelope, message = srv.spool.messages[0]
    assert envelope.recipients == ("postmaster@mx.example.com",)
    assert b"Received: from unknown (::1)\r\n" in message
    c.close()


def test_graceful_shutdown_finishes_the_message_in_flight(make_server, connect):
    spool = FakeSpool()
    spool.delay = 0.5
    srv = make_server(spool)
    busy, idle = connect(srv.port), connect(srv.port)
    busy.line()
    idle.line()
    busy.cmd(b"MAIL FROM:<a@example.org>")
    busy.cmd(b"RCPT TO:<x@sink.test>")
    busy.cmd(b"DATA")
    busy.send(b"Subject: late\r\n\r\nbody\r\n.\r\n")
    wait_for(lambda: spool.submitting or None, timeout=10, what="the commit in flight")
    start = time.monotonic()
    srv.shutdown(grace=3.0)
    assert time.monotonic() - start < 2.5
    assert OK_RE.match(busy.reply())
    assert busy.reply() == f"421 {ME} service shutting down, try again later (#4.3.2)\r\n".encode()
    assert idle.reply().startswith(b"421 ")
    assert len(spool.messages) == 1
    with pytest.raises(OSError):  # no longer accepting
        connect(srv.port, timeout=1)
    busy.close()
    idle.close()


class FakePtrResolver:
    """aiodns-like: query_dns(name, "PTR") answers from a dict, else raises;
    an A query for one of its names answers the IPv4 address it names
    (forward-confirmed, unless `forward` says otherwise for that name)."""

    def __init__(self, names: dict[str, str], delay: float = 0.0,
                 forward: dict[str, str] | None = None) -> None:
        self.names = names
        self.delay = delay
        self.forward = forward or {}
        self.asked: list[str] = []

    async def query_dns(self, name: str, qtype: str):
        from types import SimpleNamespace
        import asyncio
        if qtype == "A":
            found = {host: ".".join(reversed(key.split(".")[:4]))
                     for key, host in self.names.items()} | self.forward
            if name not in found:
                raise OSError("NXDOMAIN")
            return SimpleNamespace(answer=[SimpleNamespace(type=1, ttl=60, data=SimpleNamespace(
                addr=found[name]))])
        self.asked.append(name)
        if self.delay:
            await asyncio.sleep(self.delay)
        if name not in self.names:
            raise OSError("NXDOMAIN")
        rec = SimpleNamespace(type=12, ttl=60, data=SimpleNamespace(dname=self.names[name] + "."))
        return SimpleNamespace(answer=[rec])


def test_no_reverse_lookup_by_default(server, connect):
    from engine.smtp.remotehost import RemoteHostResolver
    fake = FakePtrResolver({})
    server.receiver.host_resolver = RemoteHostResolver(resolver=fake)
    c = connect(server.port)
    assert c.line().startswith(b"220 ")
    assert OK_RE.match(transaction(c))
    assert fake.asked == []
    assert server.spool.messages[0][1].split(b"\r\n")[1] == b"Received: from unknown (127.0.0.1)"


def test_reverse_dns_names_the_client_and_matches_host_rules(make_server, connect):
    from engine.smtp.remotehost import RemoteHostResolver
    srv = make_server(qrelay_toml="[smtp]\nreverse_dns = true\n",
                      tcp_smtp='=.example.net:allow,RELAYCLIENT="@vianame"\n:allow\n')
    fake = FakePtrResolver({"1.0.0.127.in-addr.arpa": "client.example.net"})
    srv.receiver.host_resolver = RemoteHostResolver(resolver=fake, timeout=1.0)
    c = connect(srv.port)
    assert c.line() == f"220 {ME} ESMTP\r\n".encode()
    c.cmd(b"HELO client.example.net")
    assert OK_RE.match(transaction(c, rcpt=b"joe"))
    env, msg = srv.spool.messages[0]
    assert env.recipients == ("joe@vianame",)  # the =.example.net rule applied
    assert msg.split(b"\r\n")[1] == b"Received: from client.example.net (127.0.0.1)"  # HELO = name: not repeated
    # No name (or a lookup that times out): `unknown`, and =host rules do not match.
    fake.names.clear()
    fake.delay = 2.0
    c2 = connect(srv.port)
    start = time.monotonic()
    assert c2.line() == f"220 {ME} ESMTP\r\n".encode()
    assert 0.9 <= time.monotonic() - start < 1.9
    assert c2.cmd(b"MAIL FROM:<a@b>") == b"250 ok\r\n"
    assert c2.cmd(b"RCPT TO:<joe>") == b"250 ok\r\n"
    assert c2.cmd(b"RCPT TO:<joe@far.test>").startswith(b"553 ")
    # A PTR name whose own addresses do not include the client's (anyone may
    # write any PTR for their address): not believed, the =host rule does not apply.
    fake.delay = 0.0
    fake.names["1.0.0.127.in-addr.arpa"] = "client.example.net"
    fake.forward["client.example.net"] = "192.0.2.9"
    c3 = connect(srv.port)
    assert c3.line() == f"220 {ME} ESMTP\r\n".encode()
    assert c3.cmd(b"MAIL FROM:<a@b>") == b"250 ok\r\n"
    assert c3.cmd(b"RCPT TO:<joe@far.test>").startswith(b"553 ")


def test_reverse_dns_settings_changed_by_a_reload_apply_to_new_connections(make_server, connect,
                                                                           root):
    """The PTR resolver was made once, from the settings of the first lookup:
    turning [smtp] reverse_dns_paranoid on by a reload left a PTR anyone may
    write for their own address matching =host rules (and relaying)."""
    srv = make_server(qrelay_toml="[smtp]\nreverse_dns = true\nreverse_dns_paranoid = false\n",
                      tcp_smtp='=.example.net:allow,RELAYCLIENT=""\n:allow\n')
    fake = FakePtrResolver({"1.0.0.127.in-addr.arpa": "client.example.net"},
                           forward={"client.example.net": "192.0.2.9"})   # not the client's

    def relays() -> bool:
        srv.receiver.remote_hosts()._resolver = fake     # the resolver of the moment, faked
        c = connect(srv.port)
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
        assert c.cmd(b"MAIL FROM:<a@b>") == b"250 ok\r\n"
        return c.cmd(b"RCPT TO:<joe@far.test>") == b"250 ok\r\n"
    assert relays()
    (root / "qrelay.toml").write_text("[smtp]\nreverse_dns = true\nreverse_dns_paranoid = true\n")
    assert srv.reload()
    assert not relays()


def test_commands_sent_before_a_delayed_greeting_are_answered_after_it(make_server, connect):
    # uvloop may hand over bytes read before pause_reading took effect: they
    # wait for the greeting instead of being dropped.
    from engine.smtp.remotehost import RemoteHostResolver
    srv = make_server(qrelay_toml="[smtp]\nreverse_dns = true\n")
    fake = FakePtrResolver({"1.0.0.127.in-addr.arpa": "client.example.net"}, delay=0.3)
    srv.receiver.host_resolver = RemoteHostResolver(resolver=fake, timeout=2.0)
    c = connect(srv.port)
    c.send(b"HELO client.example.net\r\nNOOP\r\n")
    assert c.line() == f"220 {ME} ESMTP\r\n".encode()
    assert c.reply() == f"250 {ME}\r\n".encode()
    assert c.reply() == b"250 ok\r\n"


def test_half_close_after_end_marker_still_gets_the_replies(make_server, connect):
    spool = FakeSpool()
    spool.delay = 0.3
    srv = make_server(spool)
    c = connect(srv.port)
    c.line()
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@sink.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
           b"MAIL FROM:<b@example.org>\r\nRCPT TO:<y@sink.test>\r\nDATA\r\nbody2\r\n.\r\n")
    c.sock.shutdown(socket.SHUT_WR)  # no QUIT: EOF right after the second end marker
    replies = [c.reply() for _ in range(8)]
    assert replies[:3] == [b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"]
    assert OK_RE.match(replies[3]) and OK_RE.match(replies[7])
    assert c.reply() == b""  # then the server closes
    assert len(spool.messages) == 2


def test_real_spool_disk_full_gives_451_then_recovers(root, connect):
    """The real Spool with its write path failing (ENOSPC): 451, nothing committed,
    and the next message is queued once the disk has room again."""
    import errno

    from engine.queue import Spool
    from engine.queue.segments import SegmentIO

    full = [True]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)

    io = SegmentIO()
    io.pwrite = pwrite
    spool = Spool(root / "queue", io=io)
    srv = InProcessServer(root, spool)
    try:
        c = connect(srv.port)
        c.line()
        assert transaction(c) == b"451 qq write error or disk full (#4.3.0)\r\n"
        full[0] = False
        reply = transaction(c)
        assert OK_RE.match(reply)
    finally:
        srv.stop()
        spool.close()
    with Spool(root / "queue", readonly=True) as ro:
        msgs = list(ro.iter_messages())
    assert [m.msgid for m in msgs] == [int(OK_RE.match(reply).group(2))]


def test_client_that_never_reads_is_throttled(server, connect):
    """Replies pile up only to the transport's high-water mark: then the session
    stops reading, so the client's writes block instead of our memory growing."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(2.0)
    s.connect(("127.0.0.1", server.port))
    chunk = b"HELP\r\n" * 10000
    sent = 0
    try:
        with pytest.raises((socket.timeout, TimeoutError)):
            for _ in range(400):  # 24 MB at most
                s.sendall(chunk)
                sent += len(chunk)
        assert sent < 24_000_000
        other = connect(server.port)
        assert other.line().startswith(b"220 ")  # the receiver still serves others
        assert other.cmd(b"NOOP") == b"250 ok\r\n"
    finally:
        s.close()


def test_client_that_never_reads_is_dropped_after_the_timeout(make_server):
    """Its 451 cannot be written either: the connection must not wait for
    ever for its replies to drain (qmail-smtpd's write timeout ends it), or
    each such client would keep a concurrencyincoming slot for good."""
    srv = make_server(timeoutsmtpd="1\n")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5.0)
    s.connect(("127.0.0.1", srv.port))
    try:
        assert s.recv(100).startswith(b"220 ")
        (session,) = srv.receiver.sessions

        def small_buffers() -> None:
            session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            session.transport.set_write_buffer_limits(high=1024)
        srv.call(small_buffers)
        s.sendall(b"NOOP\r\n" * 20_000 + b"QUIT\r\n")     # never read
        wait_for(lambda: srv.call(lambda: session.state) == CLOSED, 8, "the timeout")
        wait_for(lambda: not srv.receiver.sessions and srv.table.total() == 0, 8,
                 "the connection dropped and its slot released")
    finally:
        s.close()


def test_replies_to_one_read_stay_bounded_when_the_client_never_reads(server):
    """An empty line is 1 byte and its 502 is 28: the commands of one read
    must not all be answered into the transport's buffer (megabytes for a
    client that never reads). Past the high-water mark the rest wait in the
    line reader, and every one is answered once the client reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5.0)
    s.connect(("127.0.0.1", server.port))
    f = s.makefile("rb")
    try:
        assert f.readline().startswith(b"220 ")
        (session,) = server.receiver.sessions

        def small_buffers() -> None:
            session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            session.transport.set_write_buffer_limits(high=1024)
            session.transport.pause_reading()
        server.call(small_buffers)
        count = 60_000
        s.sendall(b"\n" * count)            # waits in the kernel: one read once resumed
        server.call(session.transport.resume_reading)
        deadline = time.monotonic() + 5
        while not server.call(lambda: session.paused_for_write) and time.monotonic() < deadline:
            time.sleep(0.01)
        held = server.call(lambda: session.transport.get_write_buffer_size() + sum(map(len, session.out)))
        assert held < 64 * 1024, held
        for _ in range(count):
            assert f.readline() == b"502 unimplemented (#5.5.1)\r\n"
        s.sendall(b"NOOP\r\n")
        assert f.readline() == b"250 ok\r\n"
    finally:
        f.close()
        s.close()


def _replies_back_up(srv, port: int, commands: bytes, count: int):
    """A client that sends `commands` (`count` replies) in one write without
    reading: the session's writes back up past a small high-water mark (it
    pauses reading), then the client reads every reply (it resumes)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(3.0)
    s.connect(("127.0.0.1", port))
    f = s.makefile("rb")
    assert f.readline().startswith(b"220 ")
    (session,) = srv.receiver.sessions

    def small_buffers() -> None:
        session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        session.transport.set_write_buffer_limits(high=1024)
    srv.call(small_buffers)
    s.sendall(commands)
    for _ in range(count):
        assert f.readline()
    return s, f


def test_reading_resumes_after_backed_up_replies_in_an_auth_exchange(server):
    """The replies drained while an AUTH exchange waits for its next line:
    the session reads that line (it hung until the timeout)."""
    s, f = _replies_back_up(server, server.port, b"NOOP\r\n" * 20000 + b"AUTH CRAM-MD5\r\n", 20001)
    try:
        s.sendall(b"*\r\n")
        assert f.readline() == b"501 auth exchange cancelled (#5.0.0)\r\n"
    finally:
        s.close()


def test_reading_resumes_after_backed_up_replies_under_rblsmtpd(make_server):
    srv = make_server(tcp_smtp='127.0.0.1:allow,RBLSMTPD="listed"\n')
    s, f = _replies_back_up(srv, srv.port, b"NOOP\r\n" * 20000, 20000)
    try:
        s.sendall(b"QUIT\r\n")
        assert f.readline() == b"221 rblsmtpd.local\r\n"
    finally:
        s.close()


def test_rule_environment_databytes_localhost_remoteinfo(make_server, connect):
    srv = make_server(tcp_smtp='127.0.0.1:allow,RELAYCLIENT="",DATABYTES="50",'
                      'TCPLOCALHOST="relay.example.com",TCPREMOTEINFO="alice"\n', databytes="0\n")
    c = connect(srv.port)
    c.line()
    assert c.cmd(b"EHLO c").endswith(b"250 SIZE 50\r\n")
    assert transaction(c, b"x" * 60 + b"\r\n").startswith(b"552 ")
    assert OK_RE.match(transaction(c, b"small\r\n"))
    lines = srv.spool.messages[0][1].split(b"\r\n")
    assert lines[1] == b"Received: from unknown (HELO c) (alice@127.0.0.1)"
    assert lines[2].startswith(b"  by relay.example.com with SMTP; ")


@pytest.mark.parametrize("value", ["\u00b2", "9" * 30, "9" * 5000])
def test_rule_databytes_that_is_no_usable_number_is_the_cap(make_server, connect, value):
    # qmail's scan_ulong reads ASCII digits only; str.isdigit() also took "²"
    # (int() then raised), and 20+ digits overflowed the C scanner: every
    # connection from the rule's clients died with a traceback.
    srv = make_server(tcp_smtp=f'127.0.0.1:allow,DATABYTES="{value}"\n', databytes="0\n")
    c = connect(srv.port)
    assert c.line() == f"220 {ME} ESMTP\r\n".encode()
    cap = srv.receiver.config.settings.smtp.max_message_bytes
    assert c.cmd(b"EHLO c").endswith(f"250 SIZE {cap}\r\n".encode())


def test_message_memory_is_bounded_per_receiver(make_server, connect):
    # [smtp] max_buffered_bytes: the messages all sessions hold at once. Past it a
    # message is read to its end and answered 452 (try again), unless it is the
    # only one held; what a session held is given back when its message ends.
    srv = make_server(qrelay_toml=f"[smtp]\nmax_buffered_bytes = {1 << 20}\n")
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 700     # 700 KB
    a, b = connect(srv.port), connect(srv.port)
    for c in (a, b):
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
        assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
        assert c.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
        assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    a.send(big)                                                       # held, not ended
    wait_for(lambda: srv.receiver.buffered >= len(big), what="a's bytes held")
    b.send(big + b".\r\n")
    assert b.line() == b"452 sorry, insufficient system storage, try again later (#4.3.1)\r\n"
    a.send(b".\r\n")
    assert a.line().startswith(b"250 ok ")
    wait_for(lambda: srv.receiver.buffered == 0, what="the memory given back")
    assert transaction(b, big).startswith(b"250 ok ")                 # alone: through
    c = connect(srv.port)
    assert c.line().startswith(b"220")
    assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    c.send(big + big)                                                 # over it, but alone
    c.close()                                                         # dropped mid-DATA
    wait_for(lambda: srv.receiver.buffered == 0, what="a dropped client's bytes given back")
    assert len(srv.spool.messages) == 2


def test_the_end_of_data_copies_the_message_once(server, client):
    # The scanner's buffer (not traced: C's malloc) becomes the one message
    # handed to the spool, Received lines in front: it was copied out as
    # bytes, then joined behind those lines, three copies at once.
    import tracemalloc
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8000     # 8 MB
    assert client.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert client.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
    assert client.cmd(b"DATA") == b"354 go ahead\r\n"
    client.send(big)
    wait_for(lambda: server.receiver.buffered >= len(big), what="the message held")
    tracemalloc.start()
    try:
        client.send(b".\r\n")
        assert client.line().startswith(b"250 ok ")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ((_env, message),) = server.spool.messages
    assert message.endswith(big) and message.startswith(b"Received: ")
    assert peak < 1.5 * len(big), peak


@pytest.mark.parametrize("bad, reply", [
    (b"a\0b\r\n", b"554 sorry, message contains NUL bytes (#5.6.0)\r\n"),
    (b"a\rb\r\n", b"554 sorry, message contains a bare CR, which is not allowed (#5.6.0)\r\n"),
])
def test_a_message_refused_at_its_end_is_not_held_until_then(server, client, bad, reply):
    # A NUL or a bare CR gets the message refused whatever follows: the rest
    # was held all the same (up to databytes, twice that stored), spending
    # the receiver's max_buffered_bytes that other sessions' mail needs.
    part = (b"x" * 998 + b"\r\n") * 500
    assert client.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert client.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
    assert client.cmd(b"DATA") == b"354 go ahead\r\n"
    client.send(b"Subject: t\r\n\r\n" + part)
    wait_for(lambda: server.receiver.buffered >= len(part), what="the message held")
    client.send(bad + part)
    wait_for(lambda: server.receiver.buffered == 0, what="the refused message let go")
    client.send(part + b".\r\n")
    assert client.line() == reply
    assert transaction(client).startswith(b"250 ok ") and len(server.spool.messages) == 1


def test_a_looping_message_is_not_held_until_its_end(server, client):
    # Past max_hops Received/Delivered-To lines the message is refused at its
    # end (554 too many hops) whatever its body: nothing of it is held.
    part = (b"x" * 998 + b"\r\n") * 500
    assert client.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
    assert client.cmd(b"RCPT TO:<x@sink.test>") == b"250 ok\r\n"
    assert client.cmd(b"DATA") == b"354 go ahead\r\n"
    client.send(b"Received: x\r\n" * 101 + b"\r\n" + part)
    wait_for(lambda: any(s.scanner.size >= len(part) for s in server.receiver.sessions),
             what="the message read")
    assert server.receiver.buffered == 0
    client.send(b".\r\n")
    assert client.line() == b"554 too many hops, this message is looping (#5.4.6)\r\n"


def test_mail_gets_452_while_the_spool_filesystem_is_below_min_free(make_server, connect,
                                                                  monkeypatch):
    """Postfix's queue_minfree: below [spool] min_free_bytes (and below 1.5 x a
    SIZE= on top) MAIL is refused with 452 before the client sends its message,
    so deliveries, which free space, can still be recorded."""
    import os as oslib
    from types import SimpleNamespace
    free = {"bytes": 1_100_000_000}
    real = oslib.statvfs

    def statvfs(path):
        if str(path).endswith("queue"):
            return SimpleNamespace(f_bavail=free["bytes"] // 4096, f_frsize=4096)
        return real(path)
    monkeypatch.setattr("os.statvfs", statvfs)
    srv = make_server(qrelay_toml="[spool]\nmin_free_bytes = 1048576000\n")
    c = connect(srv.port)
    c.line()
    assert c.cmd(b"MAIL FROM:<a@example.org> SIZE=5000") == b"250 ok\r\n"
    # 1.1 GB free: 60 MB more (x 1.5) would go below the 1000 MiB kept free.
    assert c.cmd(b"MAIL FROM:<a@example.org> SIZE=60000000").startswith(b"452 ")
    free["bytes"] = 500 << 20
    srv.receiver._space_at = 0            # as a second later
    assert c.cmd(b"MAIL FROM:<a@example.org>") == (
        b"452 sorry, not enough free space in the queue here; try again later (#4.3.1)\r\n")
    free["bytes"] = 1_100_000_000
    srv.receiver._space_at = 0
    assert OK_RE.match(transaction(c))
