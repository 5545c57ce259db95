"""STARTTLS, SMTP AUTH and the submission listeners, over real sockets
(in-process uvloop receiver, trustme certificates, real vpopmail accounts)."""
from __future__ import annotations

import base64
import dataclasses
import hmac
import math
import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from engine.accounts import admin
from engine.accounts.vpasswd import NO_SMTP
from tests.smtp_harness import RawClient, client_context, install_certificate
from tests.test_delivery_e2e import wait_for
from tests.test_session import connect, make_server  # noqa: F401  (fixtures)

ME = "mx.example.com"
USER, PASSWORD = "joe@example.org", "Secret-pw-1"
CLEAR_USER, CLEAR_PASSWORD = "ann@example.org", "Ann-pw-22"
EHLO_TLS = (f"250-{ME}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-AUTH LOGIN CRAM-MD5 PLAIN\r\n"
            f"250-AUTH=LOGIN CRAM-MD5 PLAIN\r\n250 SIZE 67108864\r\n").encode()
EHLO_PLAIN = (f"250-{ME}\r\n250-STARTTLS\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-AUTH CRAM-MD5\r\n"
              f"250-AUTH=CRAM-MD5\r\n250 SIZE 67108864\r\n").encode()


def b64(text: str | bytes) -> bytes:
    return base64.b64encode(text.encode() if isinstance(text, str) else text)


def plain(user: str = USER, password: str = PASSWORD) -> bytes:
    return b64(f"\0{user}\0{password}")


@pytest.fixture
def accounts(root: Path) -> Path:
    """example.org with joe (hash only), ann (cleartext kept, for CRAM-MD5) and
    nosmtp (NO_SMTP flag); 127.0.0.1 may NOT relay, so AUTH is what grants it."""
    admin.add_domain(root, "example.org", uid=65534, gid=65534)
    admin.add_user(root, USER, PASSWORD)
    admin.add_user(root, "nosmtp@example.org", PASSWORD)
    (root / "qrelay.toml").write_text("[accounts]\nkeep_cleartext = true\n")
    admin.add_user(root, CLEAR_USER, CLEAR_PASSWORD)
    ref = admin.find_domain(root, "example.org")
    users = [dataclasses.replace(u, gid=u.gid | NO_SMTP) if u.name == "nosmtp" else u
             for u in admin.read_users(ref.directory)]
    admin.write_users(ref, users)
    (root / "control" / "tcp.smtp").write_text(":allow\n")
    # A `qrelay run` as root runs its receivers as the domain's owner (nobody),
    # who can read its vpasswd (engine/privilege.py).
    (root / "qrelay.toml").write_text('[auth]\nfailure_delay = 0\n[run]\nuser = "nobody"\n')
    return root


@pytest.fixture
def ca(accounts: Path):
    return install_certificate(accounts, ME)


@pytest.fixture
def greeted(connect):
    """A RawClient that has read the greeting (test_session's factory closes it)."""
    def make(port: int) -> RawClient:
        c = connect(port)
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
        return c
    return make


def starttls(c: RawClient, ca) -> None:
    assert c.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    c.starttls(client_context(ca))


def smtpd_log(root: Path) -> str:
    path = root / "log" / "smtpd" / "current"
    return path.read_text() if path.exists() else ""


# --- STARTTLS ------------------------------------------------------------------------

def test_starttls_offered_only_with_a_certificate_and_only_before_tls(accounts, make_server, greeted):
    srv = make_server()
    c = greeted(srv.port)
    assert b"STARTTLS" not in c.cmd(b"EHLO client.test")
    assert c.cmd(b"STARTTLS") == b"454 TLS missing certificate: control/servercert.pem (#4.3.0)\r\n"
    ca = install_certificate(accounts, ME)
    srv.reload()
    c = greeted(srv.port)
    assert c.cmd(b"EHLO client.test") == EHLO_PLAIN
    assert c.cmd(b"STARTTLS now") == b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
    starttls(c, ca)
    assert c.cmd(b"EHLO client.test") == EHLO_TLS
    assert c.cmd(b"STARTTLS") == b"502 unimplemented (#5.5.1)\r\n"
    assert c.cmd(b"QUIT") == f"221 {ME}\r\n".encode()


def test_plaintext_pipelined_after_starttls_is_never_executed(ca, make_server, greeted):
    """CVE-2011-0411: `STARTTLS\\r\\nRSET\\r\\n` in one write; the RSET is dropped."""
    srv = make_server()
    c = greeted(srv.port)
    c.cmd(b"EHLO client.test")
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n")
    assert c.line() == b"220 ready for tls\r\n"
    c.starttls(client_context(ca))
    # The first reply in TLS is the NOOP's: nothing of the plaintext was answered.
    assert c.cmd(b"NOOP") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<x@example.org>") == b"503 MAIL first (#5.5.1)\r\n"


def test_session_starts_over_after_tls(ca, make_server, greeted):
    srv = make_server()
    c = greeted(srv.port)
    c.cmd(b"EHLO client.test")
    assert c.cmd(b"MAIL FROM:<a@example.com>") == b"250 ok\r\n"
    starttls(c, ca)
    assert c.cmd(b"RCPT TO:<joe@example.org>") == b"503 MAIL first (#5.5.1)\r\n"
    assert c.cmd(b"EHLO again.test") == EHLO_TLS
    assert c.cmd(b"MAIL FROM:<a@example.com>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<joe@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
    assert c.reply().startswith(b"250 ok ")
    message = srv.spool.messages[-1][1]
    assert re.search(rb"Received: from unknown \(HELO again.test\) \(127.0.0.1\)\r\n"
                     rb"  by mx.example.com with ESMTPS \([A-Z0-9_-]+ encrypted\); ", message), message


def test_auth_before_starttls_is_forgotten(ca, make_server, greeted):
    srv = make_server()
    c = greeted(srv.port)
    c.cmd(b"EHLO client.test")
    assert c.cmd(b"AUTH CRAM-MD5").startswith(b"334 ")
    c.send(b"*\r\n")
    assert c.reply() == b"501 auth exchange cancelled (#5.0.0)\r\n"
    starttls(c, ca)
    c.cmd(b"EHLO client.test")
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"235 ok, go ahead (#2.0.0)\r\n"
    starttls_again = c.cmd(b"STARTTLS")
    assert starttls_again == b"502 unimplemented (#5.5.1)\r\n"


def test_failed_handshake_closes_and_frees_the_slot(ca, make_server, greeted):
    srv = make_server()
    c = greeted(srv.port)
    assert c.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    c.send(b"this is not a TLS client hello\r\n" * 4)
    assert c.closed()
    wait_for(lambda: srv.receiver.counter.total() == 0)
    wait_for(lambda: "TLS connection failed" in smtpd_log(srv.root) or srv.receiver.log is None)


def test_certificate_reload_keeps_sessions(accounts, make_server, greeted):
    first_ca = install_certificate(accounts, ME)
    srv = make_server()
    old = greeted(srv.port)
    starttls(old, first_ca)
    second_ca = install_certificate(accounts, ME)
    assert srv.reload()                 # what SIGHUP (or the supervisor's mtime poll) does
    new = greeted(srv.port)
    starttls(new, second_ca)
    assert new.cmd(b"EHLO n") == EHLO_TLS
    assert old.cmd(b"EHLO o") == EHLO_TLS   # the session made with the old certificate goes on
    stale = greeted(srv.port)
    assert stale.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    with pytest.raises(ssl.SSLError):
        stale.starttls(client_context(first_ca))


class BioClient:
    """TLS over a RawClient's socket with memory BIOs: the test decides what
    goes out in which write (the ssl module's sockets do not let it)."""

    def __init__(self, raw: RawClient, ca) -> None:
        assert raw.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
        self.sock = raw.sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(ca).wrap_bio(self.incoming, self.outgoing, server_hostname=ME)
        while True:
            try:
                self.tls.do_handshake()
                return             # our Finished waits in self.outgoing
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self._recv()

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the server closed"
        self.incoming.write(data)

    def send(self, data: bytes) -> None:
        """`data` encrypted, in one write with whatever TLS output is pending."""
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def reply(self, last: bytes) -> bytes:
        out = b""
        while not out.endswith(last):
            try:
                out += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._recv()
        return out


def test_the_handshake_signs_off_the_event_loop(ca, make_server, greeted):
    """The ClientHello's answer (the certificate's signature) runs in a niced
    handshake thread: a flood of handshakes does not hold the loop."""
    import os
    srv = make_server()
    seen: list[tuple[str, int]] = []
    context = srv.call(srv.receiver.tls.context)
    context.sni_callback = lambda *_: seen.append(
        (threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, 0)))
    c = greeted(srv.port)
    starttls(c, ca)
    assert c.cmd(b"EHLO client.test") == EHLO_TLS
    (name, nice), = seen
    assert name.startswith("tls-handshake")
    assert nice > os.getpriority(os.PRIO_PROCESS, 0) or nice == 19


def test_a_command_sent_with_the_clients_finished_is_answered(ca, make_server, greeted):
    """TLS 1.3: the client may send its first command in the same segment as its
    Finished; the session gets it once it is in its encrypted state."""
    srv = make_server()
    c = greeted(srv.port)
    c.cmd(b"EHLO client.test")
    tls = BioClient(c, ca)
    tls.send(b"EHLO client.test\r\n")
    assert tls.reply(b"250 SIZE 67108864\r\n") == EHLO_TLS
    tls.send(b"NOOP\r\n")
    assert tls.reply(b"\r\n") == b"250 ok\r\n"


def test_eof_after_the_end_marker_over_tls_still_gets_the_250(ca, make_server, greeted):
    """As in clear: a client that half-closes right after its message gets its
    reply once the commit is done."""
    srv = make_server()
    srv.spool.delay = 0.3
    c = greeted(srv.port)
    tls = BioClient(c, ca)
    tls.send(b"EHLO client.test\r\n")
    tls.reply(b"250 SIZE 67108864\r\n")
    assert tls.send(b"AUTH PLAIN " + plain() + b"\r\n") is None
    assert tls.reply(b"\r\n") == b"235 ok, go ahead (#2.0.0)\r\n"
    tls.send(b"MAIL FROM:<joe@example.org>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\n")
    assert tls.reply(b"354 go ahead\r\n") == b"250 ok\r\n250 ok\r\n354 go ahead\r\n"
    tls.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    assert tls.reply(b"\r\n").startswith(b"250 ok ")
    assert len(srv.spool.messages) == 1


def test_a_stalled_handshake_times_out_and_frees_the_slot(accounts, make_server, greeted):
    install_certificate(accounts, ME)
    toml = accounts / "qrelay.toml"
    toml.write_text(toml.read_text() + "[tls]\nhandshake_timeout = 0.5\n")
    srv = make_server()
    c = greeted(srv.port)
    assert c.cmd(b"STARTTLS") == b"220 ready for tls\r\n"
    assert c.closed(timeout=5)
    wait_for(lambda: srv.receiver.counter.total() == 0)


# --- AUTH ----------------------------------------------------------------------------

@pytest.fixture
def tls_client(ca, make_server, greeted):
    srv = make_server()
    c = greeted(srv.port)
    starttls(c, ca)
    assert c.cmd(b"EHLO client.test") == EHLO_TLS
    c.server = srv
    return c


def test_plain_with_and_without_initial_response(tls_client, accounts):
    c = tls_client
    lastauth = accounts / "domains" / "example.org" / "joe" / "lastauth"
    assert c.cmd(b"AUTH PLAIN") == b"334 \r\n"
    assert c.cmd(plain(password="wrong")) == b"535 authorization failed (#5.7.0)\r\n"
    assert not lastauth.exists()
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"235 ok, go ahead (#2.0.0)\r\n"
    assert lastauth.read_text() == "127.0.0.1"          # vchkpw's record of the login
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"503 you're already authenticated (#5.5.0)\r\n"


def test_login_both_ways(tls_client):
    c = tls_client
    assert c.cmd(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert c.cmd(b64(USER)) == b"334 UGFzc3dvcmQ6\r\n"
    assert c.cmd(b64("nope")) == b"535 authorization failed (#5.7.0)\r\n"
    assert c.cmd(b"AUTH LOGIN " + b64(USER)) == b"334 UGFzc3dvcmQ6\r\n"
    assert c.cmd(b64(PASSWORD)) == b"235 ok, go ahead (#2.0.0)\r\n"


def cram_answer(c: RawClient, user: str, secret: str) -> bytes:
    reply = c.cmd(b"AUTH CRAM-MD5")
    assert reply.startswith(b"334 ") and reply.endswith(b"\r\n")
    challenge = base64.b64decode(reply[4:-2])
    assert re.fullmatch(rb"<\d+\.\d+@mx\.example\.com>", challenge), challenge
    digest = hmac.new(secret.encode(), challenge, "md5").hexdigest()
    return c.cmd(b64(f"{user} {digest}"))


def test_cram_md5_needs_the_cleartext_and_works_before_tls(accounts, make_server, greeted):
    srv = make_server()
    c = greeted(srv.port)
    c.cmd(b"EHLO client.test")
    assert cram_answer(c, CLEAR_USER, "wrong") == b"535 authorization failed (#5.7.0)\r\n"
    assert cram_answer(c, USER, PASSWORD) == b"535 authorization failed (#5.7.0)\r\n"  # no cleartext kept
    assert cram_answer(c, CLEAR_USER, CLEAR_PASSWORD) == b"235 ok, go ahead (#2.0.0)\r\n"


def test_cram_md5_challenge_names_a_tcplocalhost_that_is_not_utf8(accounts, make_server, greeted):
    """A tcp.smtp written in Latin-1: its TCPLOCALHOST byte goes into the challenge
    as it is (the connection was dropped with a traceback)."""
    (accounts / "control" / "tcp.smtp").write_bytes(b':allow,TCPLOCALHOST="h\xe9.test"\n')
    srv = make_server()
    c = greeted(srv.port)
    c.cmd(b"EHLO client.test")
    reply = c.cmd(b"AUTH CRAM-MD5")
    assert reply.startswith(b"334 ") and reply.endswith(b"\r\n")
    challenge = base64.b64decode(reply[4:-2])
    assert re.fullmatch(rb"<\d+\.\d+@h\xe9\.test>", challenge), challenge
    digest = hmac.new(CLEAR_PASSWORD.encode(), challenge, "md5").hexdigest()
    assert c.cmd(b64(f"{CLEAR_USER} {digest}")) == b"235 ok, go ahead (#2.0.0)\r\n"


def test_a_cram_md5_answer_that_is_not_hex_is_a_wrong_password(accounts, make_server, greeted):
    """Not a 454 (that told which users exist and keep a cleartext)."""
    srv = make_server()
    c = greeted(srv.port)
    c.cmd(b"EHLO client.test")
    for user in (CLEAR_USER, "who@example.org"):
        for answer in ("\u00e9t\u00e9", "0123\udcff"):
            assert c.cmd(b"AUTH CRAM-MD5").startswith(b"334 ")
            assert c.cmd(b64(f"{user} {answer}".encode("utf-8", "surrogateescape"))) == (
                b"535 authorization failed (#5.7.0)\r\n"), (user, answer)


def test_malformed_cancelled_unknown_and_out_of_place(tls_client):
    c = tls_client
    assert c.cmd(b"AUTH PLAIN !!notbase64") == b"501 malformed auth input (#5.5.4)\r\n"
    assert c.cmd(b"AUTH PLAIN " + b64("only-one-part")) == b"501 malformed auth input (#5.5.4)\r\n"
    assert c.cmd(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert c.cmd(b"") == b"501 malformed auth input (#5.5.4)\r\n"
    assert c.cmd(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert c.cmd(b"*") == b"501 auth exchange cancelled (#5.0.0)\r\n"
    assert c.cmd(b"AUTH DIGEST-MD5") == b"504 auth type not available (#5.5.1)\r\n"
    assert c.cmd(b"AUTH") == b"504 auth type not available (#5.5.1)\r\n"
    assert c.cmd(b"MAIL FROM:<a@example.com>") == b"250 ok\r\n"
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"503 no auth during mail transaction (#5.5.0)\r\n"


def test_no_smtp_flag_and_unknown_user_refused(tls_client):
    c = tls_client
    assert c.cmd(b"AUTH PLAIN " + plain("nosmtp@example.org")) == b"535 authorization failed (#5.7.0)\r\n"
    assert c.cmd(b"AUTH PLAIN " + plain("who@example.org")) == b"535 authorization failed (#5.7.0)\r\n"
    assert c.cmd(b"AUTH PLAIN " + plain("joe")) == b"535 authorization failed (#5.7.0)\r\n"  # login = full address


def test_a_login_without_its_domain_is_in_the_default_domain(accounts, ca, make_server, greeted):
    toml = accounts / "qrelay.toml"
    toml.write_text(toml.read_text() + '[accounts]\ndefault_domain = "example.org"\n')
    srv = make_server()
    for login in ("joe", "joe%example.org"):
        c = greeted(srv.port)
        starttls(c, ca)
        assert c.cmd(b"EHLO client.test") == EHLO_TLS
        assert c.cmd(b"AUTH PLAIN " + plain(login)) == b"235 ok, go ahead (#2.0.0)\r\n", login
        c.close()


def test_a_default_domain_set_later_counts_after_a_reload(accounts, ca, make_server, greeted):
    # HUP rereads qrelay.toml: a session after it logs `joe` in to the new default domain.
    toml = accounts / "qrelay.toml"
    srv = make_server()

    def login() -> bytes:
        c = greeted(srv.port)
        starttls(c, ca)
        assert c.cmd(b"EHLO client.test") == EHLO_TLS
        try:
            return c.cmd(b"AUTH PLAIN " + plain("joe"))
        finally:
            c.close()

    assert login() == b"535 authorization failed (#5.7.0)\r\n"
    toml.write_text(toml.read_text() + '[accounts]\ndefault_domain = "example.org"\n')
    assert srv.reload()
    assert login() == b"235 ok, go ahead (#2.0.0)\r\n"


def test_plain_and_login_refused_before_tls_unless_allowed(accounts, make_server, greeted):
    srv = make_server()
    c = greeted(srv.port)
    c.cmd(b"EHLO client.test")
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"504 auth type not available (#5.5.1)\r\n"
    assert c.cmd(b"AUTH LOGIN") == b"504 auth type not available (#5.5.1)\r\n"
    srv2 = make_server(qrelay_toml="[auth]\nallow_plaintext = true\nfailure_delay = 0\n")
    c = greeted(srv2.port)
    assert c.cmd(b"EHLO client.test") == (
        f"250-{ME}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-AUTH LOGIN CRAM-MD5 PLAIN\r\n"
        f"250-AUTH=LOGIN CRAM-MD5 PLAIN\r\n250 SIZE 67108864\r\n").encode()
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"235 ok, go ahead (#2.0.0)\r\n"


def test_auth_grants_relaying_and_names_the_user(tls_client):
    c = tls_client
    assert c.cmd(b"MAIL FROM:<joe@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<far@remote.test>").startswith(b"553 ")
    assert c.cmd(b"RSET") == b"250 flushed\r\n"
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"235 ok, go ahead (#2.0.0)\r\n"
    assert c.cmd(b"MAIL FROM:<joe@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"RCPT TO:<far@remote.test>") == b"250 ok\r\n"
    assert c.cmd(b"DATA") == b"354 go ahead\r\n"
    c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
    assert c.reply().startswith(b"250 ok ")
    env, message = c.server.spool.messages[-1]
    assert env.recipients == ("far@remote.test",)
    assert re.search(rb"Received: from unknown \(HELO client.test\) \(joe@example.org@127.0.0.1\)\r\n"
                     rb"  by mx.example.com with ESMTPSA \([A-Z0-9_-]+ encrypted\); ", message), message
    wait_for(lambda: f"AUTH successful [127.0.0.1] {USER} (PLAIN)" in smtpd_log(c.server.root)
             or c.server.receiver.log is None)


def test_sender_must_match(accounts, ca, make_server, greeted):
    admin.add_alias(accounts, "joe.alias@example.org", [USER])
    srv = make_server(qrelay_toml="[auth]\nsender_must_match = true\nfailure_delay = 0\n")
    c = greeted(srv.port)
    starttls(c, ca)
    c.cmd(b"EHLO client.test")
    assert c.cmd(b"MAIL FROM:<ann@example.org>") == b"250 ok\r\n"   # not authenticated: not checked
    assert c.cmd(b"RSET") == b"250 flushed\r\n"
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"235 ok, go ahead (#2.0.0)\r\n"
    assert c.cmd(b"MAIL FROM:<JOE@example.org>") == b"250 ok\r\n"
    assert c.cmd(b"MAIL FROM:<joe.alias@example.org>") == b"250 ok\r\n"
    for other in (b"ann@example.org", b"joe@other.test", b"nobody@example.org"):
        assert c.cmd(b"MAIL FROM:<" + other + b">") == b"553 sorry, that sender address is not yours (#5.7.1)\r\n"


def test_sender_must_match_takes_the_users_address_in_an_alias_domain(accounts, ca, make_server,
                                                                       greeted):
    # vaddaliasdomain: joe@example.net is joe@example.org, the same mailbox,
    # whichever of the two names he logs in with.
    admin.add_alias_domain(accounts, "example.net", "example.org")
    srv = make_server(qrelay_toml="[auth]\nsender_must_match = true\nfailure_delay = 0\n")
    for login in (USER, "joe@example.net"):
        c = greeted(srv.port)
        starttls(c, ca)
        c.cmd(b"EHLO client.test")
        assert c.cmd(b"AUTH PLAIN " + plain(login)) == b"235 ok, go ahead (#2.0.0)\r\n"
        for mine in (b"joe@example.org", b"Joe@Example.NET"):
            assert c.cmd(b"MAIL FROM:<" + mine + b">") == b"250 ok\r\n", (login, mine)
            assert c.cmd(b"RSET") == b"250 flushed\r\n"
        assert c.cmd(b"MAIL FROM:<ann@example.net>") == \
            b"553 sorry, that sender address is not yours (#5.7.1)\r\n"
        c.close()


def test_submission_needs_auth_before_mail(ca, make_server, greeted):
    srv = make_server(scheme="submission")
    c = greeted(srv.port)
    assert c.cmd(b"EHLO client.test") == EHLO_PLAIN
    assert c.cmd(b"MAIL FROM:<joe@example.org>") == b"530 Authorization required (#5.7.1)\r\n"
    starttls(c, ca)
    c.cmd(b"EHLO client.test")
    assert c.cmd(b"MAIL FROM:<joe@example.org>") == b"530 Authorization required (#5.7.1)\r\n"
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"235 ok, go ahead (#2.0.0)\r\n"
    assert c.cmd(b"MAIL FROM:<joe@example.org>") == b"250 ok\r\n"


def test_submissions_is_implicit_tls(ca, make_server):
    srv = make_server(scheme="submissions")
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    c = RawClient.__new__(RawClient)
    c.sock, c.buf = raw, b""
    try:
        c.starttls(client_context(ca))
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
        assert c.cmd(b"EHLO client.test") == EHLO_TLS
        assert c.cmd(b"MAIL FROM:<joe@example.org>") == b"530 Authorization required (#5.7.1)\r\n"
        assert c.cmd(b"AUTH PLAIN " + plain()) == b"235 ok, go ahead (#2.0.0)\r\n"
        assert c.cmd(b"MAIL FROM:<joe@example.org>") == b"250 ok\r\n"
    finally:
        c.close()
    # A plaintext client on the TLS port gets no greeting, just a close.
    plain_client = RawClient(srv.port)
    try:
        plain_client.send(b"EHLO x\r\n")
        assert plain_client.closed()
    finally:
        plain_client.close()


def test_submissions_counts_connections_in_their_handshake(ca, make_server, connect):
    # A connection that never finishes its handshake holds a descriptor and
    # memory for handshake_timeout: it counts against concurrencyincoming as
    # a session does, or a flood of them passes every connection cap.
    srv = make_server(scheme="submissions", concurrencyincoming="2")
    idle = [connect(srv.port), connect(srv.port)]
    wait_for(lambda: srv.table.total() == 2, 5, "both handshakes counted")
    refused = RawClient.__new__(RawClient)
    refused.sock, refused.buf = socket.create_connection(("127.0.0.1", srv.port), timeout=5), b""
    try:
        with pytest.raises((ssl.SSLError, OSError)):
            refused.starttls(client_context(ca))
    finally:
        refused.close()
    idle[0].close()
    wait_for(lambda: srv.table.total() == 1, 5, "a closed handshake released")
    c = RawClient.__new__(RawClient)
    c.sock, c.buf = socket.create_connection(("127.0.0.1", srv.port), timeout=5), b""
    try:
        c.starttls(client_context(ca))
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
        assert srv.table.total() == 2       # the session, counted once
    finally:
        c.close()
    idle[1].close()
    wait_for(lambda: srv.table.total() == 0, 5, "every count released")


def test_submissions_handshakes_off_the_loop_with_the_certificate_of_the_moment(accounts, make_server):
    first_ca = install_certificate(accounts, ME)
    srv = make_server(scheme="submissions")
    seen: list[str] = []

    def connect_tls(ca) -> RawClient:
        context = srv.call(srv.receiver.tls.context)
        context.sni_callback = lambda *_: seen.append(threading.current_thread().name)
        c = RawClient.__new__(RawClient)
        c.sock, c.buf = socket.create_connection(("127.0.0.1", srv.port), timeout=5), b""
        c.starttls(client_context(ca))
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
        return c

    old = connect_tls(first_ca)
    second_ca = install_certificate(accounts, ME)
    assert srv.reload()
    new = connect_tls(second_ca)
    assert new.cmd(b"EHLO n") == EHLO_TLS
    assert old.cmd(b"EHLO o") == EHLO_TLS      # made with the old certificate, still served
    assert len(seen) == 2 and all(name.startswith("tls-handshake") for name in seen)
    for c in (old, new):
        c.close()
    wait_for(lambda: srv.receiver.counter.total() == 0)


# --- throttle and hashing off the loop -------------------------------------------------

class FakeThrottle:
    """engine.relay.throttle.LoginThrottle's interface: locked after `limit` failures."""

    def __init__(self, limit: int, delay: float = 0.0) -> None:
        self.limit, self.delay = limit, delay
        self.failures: dict[str, int] = {}
        self.successes = 0

    async def attempt(self, ip: str) -> int | None:
        if self.failures.get(ip, 0) >= self.limit:
            return None
        n = self.failures[ip] = self.failures.get(ip, 0) + 1
        return n

    async def failed(self, ip: str, n: int) -> float:
        return math.inf if n >= self.limit else self.delay

    async def success(self, ip: str) -> None:
        self.successes += 1
        self.failures.pop(ip, None)


def test_throttle_delays_then_locks_out(tls_client, ca, greeted):
    c = tls_client
    throttle = FakeThrottle(limit=3, delay=0.3)
    c.server.receiver.throttle = throttle
    assert c.cmd(b"AUTH PLAIN " + plain()) == b"235 ok, go ahead (#2.0.0)\r\n"
    assert throttle.successes == 1
    c2 = greeted(c.server.port)
    starttls(c2, ca)
    started = time.monotonic()
    assert c2.cmd(b"AUTH PLAIN " + plain(password="x")) == b"535 authorization failed (#5.7.0)\r\n"
    assert time.monotonic() - started >= 0.3
    assert c2.cmd(b"AUTH PLAIN " + plain(password="y")) == b"535 authorization failed (#5.7.0)\r\n"
    assert c2.cmd(b"AUTH PLAIN " + plain(password="z")) == (
        f"421 {ME} too many failed logins from your address, try again later (#4.7.0)\r\n".encode())
    assert c2.closed()
    # Locked: even the right password gets the 421 (and is not checked).
    c3 = greeted(c.server.port)
    starttls(c3, ca)
    assert c3.cmd(b"AUTH PLAIN " + plain()).startswith(b"421 ")
    assert c3.closed()


def test_the_relay_tables_login_throttle(tls_client, ca, greeted, accounts):
    """engine.relay's LoginThrottle as receivers use it: [login] settings, counts in ROOT/relay."""
    from engine.config.settings import load_settings
    from engine.relay import open_relay_table
    from engine.relay.throttle import LoginThrottle

    (accounts / "qrelay.toml").write_text(
        "[login]\nfailure_delay = 0.2\nmax_delay = 0.2\nmax_failures = 2\nlockout_seconds = 60\n")
    settings = load_settings(accounts)
    srv = tls_client.server
    srv.receiver.throttle = LoginThrottle(open_relay_table(accounts, settings), settings)
    c = tls_client
    started = time.monotonic()
    assert c.cmd(b"AUTH PLAIN " + plain(password="bad")) == b"535 authorization failed (#5.7.0)\r\n"
    assert time.monotonic() - started >= 0.2
    assert c.cmd(b"AUTH PLAIN " + plain(password="bad")).startswith(b"421 ")
    assert c.closed()
    c2 = greeted(srv.port)
    starttls(c2, ca)
    assert c2.cmd(b"AUTH PLAIN " + plain()).startswith(b"421 ")


def test_guesses_sent_at_once_are_checked_at_most_max_failures_times(tls_client, ca, greeted,
                                                                     accounts):
    from engine.config.settings import load_settings
    from engine.relay import open_relay_table
    from engine.relay.throttle import LoginThrottle

    (accounts / "qrelay.toml").write_text(
        "[login]\nfailure_delay = 0\nmax_failures = 3\nlockout_seconds = 60\n")
    settings = load_settings(accounts)
    srv = tls_client.server
    srv.receiver.throttle = LoginThrottle(open_relay_table(accounts, settings), settings)
    checker = srv.receiver.passwords()
    checked = []
    real = checker.check

    async def counting(creds, ip):
        checked.append(creds.secret)
        return await real(creds, ip)
    checker.check = counting
    clients = []
    for _ in range(12):
        c = greeted(srv.port)
        starttls(c, ca)
        clients.append(c)
    for c in clients:        # all sent before any answer is read
        c.send(b"AUTH PLAIN " + plain(password="guess") + b"\r\n")
    replies = [c.line() for c in clients]
    assert len(checked) == 3
    assert sorted(r[:3] for r in replies) == [b"421"] * 10 + [b"535"] * 2


def test_hashing_never_blocks_other_sessions(tls_client, ca, greeted):
    """Clients flooding wrong $6$ passwords; another client's greeting stays fast."""
    port = tls_client.server.port
    stop = threading.Event()
    errors: list[BaseException] = []
    attempts = [0]

    def guess() -> None:
        try:
            c = RawClient(port)
            c.line()
            starttls(c, ca)
            while not stop.is_set():
                assert c.cmd(b"AUTH PLAIN " + plain(password="wrong")).startswith(b"535 ")
                attempts[0] += 1
            c.close()
        except BaseException as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=guess, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: attempts[0] >= 20, timeout=20)
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            c = RawClient(port)
            assert c.line() == f"220 {ME} ESMTP\r\n".encode()
            worst = max(worst, time.monotonic() - t0)
            c.close()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert worst < 0.5, f"greeting took {worst:.3f}s under a password flood"


# --- qrelay run ------------------------------------------------------------------------

def test_qrelay_run_submissions_needs_the_certificate_then_serves_it(accounts, qrelay_cli):
    from tests.smtp_harness import RunningQrelay, disable_scheduler

    disable_scheduler(accounts)
    done = qrelay_cli("run", str(accounts), "--listen", "submissions://127.0.0.1:0", timeout=30)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "control/servercert.pem is missing" in last and "submissions" in last, done.stderr
    assert "Traceback" not in done.stderr

    ca = install_certificate(accounts, ME)
    q = RunningQrelay(accounts, procs=1, extra=("--listen", "submissions://127.0.0.1:0"))
    try:
        port = int(q.port_file.read_text().split()[1])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        c = RawClient.__new__(RawClient)
        c.sock, c.buf = raw, b""
        c.starttls(client_context(ca))           # uvloop's TLS in a real receiver process
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
        assert c.cmd(b"EHLO client.test") == EHLO_TLS
        assert c.cmd(b"AUTH LOGIN " + b64(USER)) == b"334 UGFzc3dvcmQ6\r\n"
        assert c.cmd(b64(PASSWORD)) == b"235 ok, go ahead (#2.0.0)\r\n"
        assert c.cmd(b"MAIL FROM:<joe@example.org>") == b"250 ok\r\n"
        assert c.cmd(b"RCPT TO:<far@remote.test>") == b"250 ok\r\n"
        assert c.cmd(b"DATA") == b"354 go ahead\r\n"
        c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        assert c.reply().startswith(b"250 ok ")
        assert c.cmd(b"QUIT") == f"221 {ME}\r\n".encode()
        c.close()
        log = wait_for(lambda: (lambda t: t if f"AUTH successful [127.0.0.1] {USER} (LOGIN)" in t else "")(
            smtpd_log(accounts)), timeout=10)
        assert re.search(r"TLS: TLSv1\.[23] \S+ encrypted", log), log
    finally:
        q.stop()


# --- PasswordChecker: the cache of verified logins, the niced threads --------------------

class CountingChecker:
    """A PasswordChecker whose hashing is counted."""

    def __init__(self, root: Path, **kw) -> None:
        from engine.accounts.store import Accounts
        from engine.smtp.auth import PasswordChecker

        self.clock = [1000.0]
        self.checker = PasswordChecker(Accounts(root), 1, clock=lambda: self.clock[0], **kw)
        self.hashes = 0
        real = self.checker._verify

        async def counted(password: str, crypted: str) -> bool:
            self.hashes += 1
            return await real(password, crypted)
        self.checker._verify = counted

    def check(self, user: str, password: str) -> bool:
        import asyncio
        from engine.smtp.auth import Credentials
        return asyncio.run(self.checker.check(Credentials("PLAIN", user, password)))[0]


def test_verified_logins_are_remembered_not_guesses(accounts):
    c = CountingChecker(accounts, cache_seconds=300, cache_entries=2)
    assert c.check(USER, PASSWORD) and c.hashes == 1
    assert c.check(USER.upper(), PASSWORD) and c.hashes == 1       # remembered
    assert not c.check(USER, "guess") and c.hashes == 2            # a guess is always hashed
    assert not c.check(USER, "guess") and c.hashes == 3
    c.clock[0] += 301
    assert c.check(USER, PASSWORD) and c.hashes == 4               # expired
    admin.set_password(accounts, USER, "New-pw-333")
    c.checker.accounts.forget()
    assert not c.check(USER, PASSWORD) and c.hashes == 5           # the old one is not kept
    assert c.check(USER, "New-pw-333")
    c.checker.close()
    off = CountingChecker(accounts, cache_seconds=0)
    assert off.check(USER, "New-pw-333") and off.check(USER, "New-pw-333") and off.hashes == 2
    off.checker.close()


def test_an_unknown_login_costs_a_hash_of_the_scheme_in_use(accounts):
    """vpopmail 5.4 wrote $1$ hashes (0.1 ms to check); a $6$ dummy (1.4 ms)
    for unknown logins, or for an account whose hash no password matches,
    told them from real accounts by the time of the 535."""
    from passlib.hash import md5_crypt
    ref = admin.find_domain(accounts, "example.org")
    admin.add_user(accounts, "locked@example.org", PASSWORD)
    admin.write_users(ref, [
        dataclasses.replace(u, crypted=md5_crypt.hash(PASSWORD)) if u.name == "joe"
        else dataclasses.replace(u, crypted="!" + md5_crypt.hash(PASSWORD)) if u.name == "locked"
        else u for u in admin.read_users(ref.directory)])
    c = CountingChecker(accounts)
    hashed: list[str] = []
    counted = c.checker._verify

    async def recorded(password: str, crypted: str) -> bool:
        hashed.append(crypted)
        return await counted(password, crypted)
    c.checker._verify = recorded
    assert not c.check(USER, "guess")
    assert not c.check("who@example.org", "guess")
    assert not c.check("locked@example.org", PASSWORD)
    assert c.hashes == 3 and all(h.startswith("$1$") for h in hashed), hashed
    c.checker.close()


def test_hash_threads_run_below_the_loop(accounts):
    import os
    c = CountingChecker(accounts)
    nice = c.checker.pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result(5)
    assert nice > os.getpriority(os.PRIO_PROCESS, 0) or nice == 19
    c.checker.close()


def test_handshakes_that_timed_out_waiting_for_a_thread_cost_no_signature(accounts, make_server):
    """A flood queues ClientHellos for the handshake threads: one whose client
    was dropped (handshake_timeout) while it waited is skipped, not signed for
    nothing, so the backlog cannot grow past the timeout and starve every
    later handshake."""
    ca = install_certificate(accounts, ME)
    toml = accounts / "qrelay.toml"
    toml.write_text(toml.read_text() + "[tls]\nhandshake_timeout = 0.5\n")
    srv = make_server(scheme="submissions")
    signed: list[str] = []
    context = srv.call(srv.receiver.tls.context)
    context.sni_callback = lambda *_: signed.append(threading.current_thread().name)
    gate = threading.Event()
    srv.call(srv.receiver.tls.pool).submit(gate.wait, 10)    # every handshake thread busy
    flood = []
    try:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            hello = client_context(ca).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                server_hostname=ME)
            with pytest.raises(ssl.SSLWantReadError):
                hello.do_handshake()
            sock.sendall(out.read())
            flood.append(sock)
        for sock in flood:
            c = RawClient.__new__(RawClient)
            c.sock, c.buf = sock, b""
            assert c.closed(timeout=5)
    finally:
        gate.set()
        for sock in flood:
            sock.close()
    c = RawClient.__new__(RawClient)
    c.sock, c.buf = socket.create_connection(("127.0.0.1", srv.port), timeout=5), b""
    try:
        c.starttls(client_context(ca))
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
    finally:
        c.close()
    assert len(signed) == 1


def test_a_password_over_max_password_bytes_is_wrong_and_never_hashed(accounts):
    """A $6$ check costs time in proportion to the password (48 ms for 3,000
    bytes): 400 addresses sending such guesses kept a real login waiting 10 s
    for the hashing thread. Over the limit is a wrong password, unhashed, for
    a user or not alike."""
    c = CountingChecker(accounts, max_password_bytes=16)
    assert not c.check(USER, "x" * 17) and not c.check("who@example.org", "x" * 17)
    assert c.hashes == 0
    assert not c.check(USER, "x" * 16) and c.hashes == 1
    assert c.check(USER, PASSWORD) and c.hashes == 2
    c.checker.close()
