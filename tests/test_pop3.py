"""POP3 sessions (engine.pop3) against Maildirs written by local delivery, over
real loopback sockets: qmail-popup's and qmail-pop3d's exact replies, APOP,
the mailbox lock, a dropped connection, the throttle and the relay grant."""
from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from engine.accounts.admin import add_domain, add_user
from engine.accounts.vpasswd import NO_POP, NO_RELAY
from engine.delivery.local import LocalDelivery
from engine.home import init_home
from engine.pop3.session import CLOSED
from tests.smtp_harness import InProcessServer, RawClient
from tests.test_delivery_e2e import wait_for

OWNER = os.getuid() or 65534
RUN_AS_OWNER = '[run]\nuser = "nobody"\n' if os.getuid() == 0 else ""
T0 = 1_700_000_000


def deliver(root: Path, rcpt: str, message: bytes) -> Path:
    """Local delivery of one message; returns the file it wrote in new/."""
    courier = LocalDelivery.for_root(root, max_threads=1)
    try:
        # as the scheduler hands it over: after control/virtualdomains
        result = courier.deliver_sync("s@sender.example", f"{rcpt.split('@')[1]}-{rcpt}", message)
    finally:
        courier.close()
    assert result.status == "K", result
    local, _, domain = rcpt.partition("@")
    new = root / "domains" / domain / local / "Maildir" / "new"
    path = max(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    # Delivered in this (root) process: the file is the owner's, as a real
    # delivery (as the mailbox owner) leaves it for receivers running as him.
    os.chown(path, OWNER, OWNER)
    return path


def age(path: Path, mtime: int) -> None:
    os.utime(path, (mtime, mtime))


def make_root(tmp_path: Path, toml: str = "[auth]\nfailure_delay = 0\n") -> Path:
    root = tmp_path / "root"
    init_home(root, me="pop.example.net")
    # A `qrelay run` as root runs its receivers as the mailboxes' owner, so
    # they can read vpasswd and the Maildirs (engine/privilege.py).
    (root / "qrelay.toml").write_text(toml + RUN_AS_OWNER)
    add_domain(root, "example.com", uid=OWNER, gid=OWNER)
    add_user(root, "joe@example.com", "secret")
    return root


class Client(RawClient):
    """RawClient speaking POP3: one-line and multi-line answers, a login
    (closed by the test's end)."""

    opened: list["Client"] = []

    def __init__(self, port: int, source: str | None = None) -> None:
        super().__init__(port, timeout=10, source=source)
        self.opened.append(self)

    def cmd(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()

    def multi(self, text: str) -> list[bytes]:
        """A command with a multi-line answer: its lines without CRLF, up to '.'."""
        first = self.cmd(text)
        assert first.startswith(b"+OK"), first
        lines = []
        while True:
            ln = self.line()
            assert ln, "connection closed in a multi-line reply"
            if ln == b".\r\n":
                return lines
            lines.append(ln[:-2])

    def login(self, user: str = "joe@example.com", password: str = "secret") -> bytes:
        greeting = self.line()
        assert greeting.startswith(b"+OK <")
        assert self.cmd(f"USER {user}") == b"+OK \r\n"
        return self.cmd(f"PASS {password}")



@pytest.fixture(autouse=True)
def _close_clients(monkeypatch):
    opened: list[Client] = []
    monkeypatch.setattr(Client, "opened", opened)
    yield
    for c in opened:
        c.close()


@pytest.fixture
def spec_root(tmp_path):
    """The Maildir of the spec's observed session (§1.7), written by local delivery
    (which adds Return-Path and Delivered-To) plus the spec's hand-made cur/ file."""
    root = make_root(tmp_path)
    maildir = root / "domains" / "example.com" / "joe" / "Maildir"
    m1 = deliver(root, "joe@example.com", b"Subject: one\n\nline1\n.dotline\n..two dots\nlast\n")
    age(m1, T0)
    m2 = maildir / "cur" / "1700000100.222.host:2,S"
    m2.write_bytes(b"Subject: two\n\nbody2 no final newline")
    age(m2, T0 + 100)
    m3 = deliver(root, "joe@example.com", b"Subject: three\n\nb1\nb2\nb3\n")
    age(m3, T0 + 200)
    return root, maildir, (m1, m2, m3)


@pytest.fixture
def server(request):
    servers = []

    def start(root: Path, scheme: str = "pop3", **attrs) -> InProcessServer:
        srv = InProcessServer(root, scheme=scheme)
        for name, value in attrs.items():
            setattr(srv.receiver, name, value)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_observed_session(spec_root, server):
    root, maildir, (m1, m2, m3) = spec_root
    srv = server(root)
    c = Client(srv.port)
    assert c.login() == b"+OK \r\n"
    s1, s3 = m1.stat().st_size, m3.stat().st_size
    total = s1 + 36 + s3
    assert c.cmd("STAT") == f"+OK 3 {total}\r\n".encode()
    assert c.multi("LIST") == [f"1 {s1}".encode(), b"2 36", f"3 {s3}".encode()]
    uidl = c.multi("UIDL")
    assert uidl[1:] == [b"2 1700000100.222.host", b"3 " + m3.name.split(":")[0].encode()]
    assert uidl[0] == b"1 " + m1.name.encode()
    retr1 = c.multi("RETR 1")
    assert retr1[:2] == [b"Return-Path: <s@sender.example>", b"Delivered-To: joe@example.com"]
    assert retr1[2:] == [b"Subject: one", b"", b"line1", b"..dotline", b"...two dots", b"last", b""]
    assert c.multi("RETR 2") == [b"Subject: two", b"", b"body2 no final newline", b""]
    top0 = c.multi("TOP 3 0")
    assert top0[-3:] == [b"Subject: three", b"", b""]
    assert c.multi("TOP 3 1")[-4:] == [b"Subject: three", b"", b"b1", b""]
    assert c.multi("RETR 3 1")[-4:] == [b"Subject: three", b"", b"b1", b""]
    assert c.multi("TOP 3")[-6:] == [b"Subject: three", b"", b"b1", b"b2", b"b3", b""]
    assert c.cmd("DELE 2") == b"+OK \r\n"
    assert c.cmd("DELE 2") == b"-ERR already deleted\r\n"
    assert c.cmd("STAT") == f"+OK 3 {s1 + s3}\r\n".encode()
    assert c.cmd("LIST 2") == b"-ERR already deleted\r\n"
    assert c.cmd("LIST 3") == f"+OK 3 {s3}\r\n".encode()
    assert c.cmd("UIDL 2") == b"-ERR already deleted\r\n"
    assert c.cmd("LAST") == b"+OK 2\r\n"
    assert c.cmd("RSET") == b"+OK \r\n"
    assert c.cmd("LAST") == b"+OK 0\r\n"
    assert c.cmd("DELE 1") == b"+OK \r\n"
    assert c.cmd("USER x") == b"-ERR unimplemented\r\n"
    assert c.cmd("") == b"-ERR unimplemented\r\n"
    assert c.cmd("NOOP") == b"+OK \r\n"
    assert c.cmd("QUIT") == b"+OK \r\n"
    assert c.closed()
    # msg 1 unlinked, 3 moved to cur/NAME:2, , 2 untouched
    wait_for(lambda: not m1.exists(), what="the unlink")
    assert sorted(p.name for p in (maildir / "cur").iterdir()) == sorted([m2.name, m3.name + ":2,"])
    assert list((maildir / "new").iterdir()) == []


def test_message_numbers(spec_root, server):
    root, _, _ = spec_root
    c = Client(server(root).port)
    c.login()
    for arg, reply in (("x", b"-ERR syntax error"), ("-1", b"-ERR syntax error"),
                       ("+1", b"-ERR syntax error"), ("", b"-ERR syntax error"),
                       ("0", b"-ERR messages are counted from 1"),
                       ("4", b"-ERR not that many messages"),
                       ("99999999999999999999999", b"-ERR not that many messages")):
        assert c.cmd(f"DELE {arg}".rstrip()) == reply + b"\r\n", arg
    assert c.cmd("LIST 1x").startswith(b"+OK 1 ")     # trailing garbage ignored
    assert c.cmd("stat").startswith(b"+OK 3 ")        # verbs are case-insensitive
    assert c.cmd("CAPA") == b"+OK capability list follows\r\n"
    caps = []
    while (ln := c.line()) != b".\r\n":
        caps.append(ln)
    assert b"UIDL\r\n" in caps and b"USER\r\n" not in caps
    c.close()


def test_numbers_longer_than_python_converts(spec_root, server):
    # int() refuses more than 4300 digits; a line may hold more when
    # max_line_length allows it. Such a number is just too big.
    root, _, _ = spec_root
    (root / "qrelay.toml").write_text("[auth]\nfailure_delay = 0\n[pop3]\nmax_line_length = 10000\n")
    c = Client(server(root).port)
    c.login()
    assert c.cmd("DELE " + "9" * 5000) == b"-ERR not that many messages\r\n"
    assert c.cmd("LIST " + "0" * 5000 + "2") == b"+OK 2 36\r\n"
    assert c.multi("TOP 2 " + "9" * 5000) == [b"Subject: two", b"", b"body2 no final newline", b""]
    assert c.cmd("NOOP") == b"+OK \r\n"


def test_authorization_replies(spec_root, server):
    root, _, _ = spec_root
    c = Client(server(root).port)
    assert c.line().startswith(b"+OK <")
    assert c.cmd("STAT") == b"-ERR authorization first\r\n"
    assert c.cmd("") == b"-ERR authorization first\r\n"
    assert c.cmd("PASS secret") == b"-ERR USER first\r\n"
    assert c.cmd("USER") == b"-ERR syntax error\r\n"
    assert c.cmd("USER nobody") == b"+OK \r\n"
    assert c.cmd("USER joe@example.com") == b"+OK \r\n"     # repeatable, last wins
    assert c.cmd("PASS") == b"-ERR syntax error\r\n"
    assert c.cmd("APOP joe@example.com") == b"-ERR syntax error\r\n"
    assert c.cmd("NOOP") == b"+OK \r\n"
    c.send(b"CAPA\r\n")
    caps = [c.line() for _ in range(8)]
    assert caps[0] == b"+OK capability list follows\r\n" and b"USER\r\n" in caps
    assert caps[-1] == b".\r\n" and b"STLS\r\n" not in caps   # no control/servercert.pem
    assert c.cmd("QUIT") == b"+OK \r\n"
    assert c.closed()


@pytest.mark.parametrize("login", ["joe%example.com", "JOE@Example.COM", "joe/example.com"])
def test_login_forms(spec_root, server, login):
    root, _, _ = spec_root
    c = Client(server(root).port)
    assert c.login(login) == b"+OK \r\n"
    assert c.cmd("STAT").startswith(b"+OK 3 ")
    c.close()


@pytest.mark.parametrize("user,password", [("joe@example.com", "wrong"), ("nobody@example.com", "secret"),
                                           ("joe", "secret"), ("joe@nowhere.example", "secret")])
def test_wrong_login_closes_after_the_delay(tmp_path, server, user, password):
    root = make_root(tmp_path, "[auth]\nfailure_delay = 0.3\n")
    srv = server(root)
    c = Client(srv.port)
    start = time.monotonic()
    assert c.login(user, password) == b"-ERR authorization failed\r\n"
    assert time.monotonic() - start >= 0.3
    assert c.closed()


def test_pipelining(spec_root, server):
    root, _, _ = spec_root
    c = Client(server(root).port)
    c.line()
    c.send(b"USER joe@example.com\r\nPASS secret\r\nSTAT\r\nTOP 3 0\r\nLAST\r\nQUIT\r\n")
    got = [c.line() for _ in range(12)]
    assert got[:2] == [b"+OK \r\n", b"+OK \r\n"]      # qmail-popup would lose what follows PASS
    assert got[2].startswith(b"+OK 3 ")
    assert got[3] == b"+OK \r\n" and got[4].startswith(b"Return-Path: ")
    assert got[6:10] == [b"Subject: three\r\n", b"\r\n", b"\r\n", b".\r\n"]
    assert got[10:] == [b"+OK 0\r\n", b"+OK \r\n"]
    assert c.closed()


def test_a_client_that_half_closes_after_its_commands_gets_every_answer(spec_root, server):
    # `printf 'USER …\r\nPASS …\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n' | nc` shuts its
    # side down once sent: qmail-pop3d answers everything it read before the
    # EOF. Closing at the EOF lost even USER's +OK, and QUIT's deletions.
    root, maildir, (m1, _, _) = spec_root
    srv = server(root)
    c = Client(srv.port)
    c.line()
    c.send(b"USER joe@example.com\r\nPASS secret\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    got = bytearray(c.buf)
    while chunk := c.sock.recv(65536):
        got += chunk
    assert got.startswith(b"+OK \r\n+OK \r\n+OK \r\nReturn-Path: ")
    assert got.endswith(b"...two dots\r\nlast\r\n\r\n.\r\n+OK \r\n+OK \r\n")
    wait_for(lambda: not m1.exists(), what="QUIT's unlink")
    c = Client(srv.port)             # without QUIT, nothing changes: the EOF is the end
    c.line()
    c.send(b"USER joe@example.com\r\nPASS secret\r\nDELE 1\r\nSTAT")
    c.sock.shutdown(socket.SHUT_WR)
    assert c.line() == b"+OK \r\n" and c.line() == b"+OK \r\n" and c.line() == b"+OK \r\n"
    assert c.line() == b""         # STAT without its LF is never read, as by qmail
    assert len(list((maildir / "cur").iterdir())) == 2


def set_flag(root: Path, bit: int) -> None:
    """Every user of example.com gets the vpasswd gid flag `bit` (vmoduser -x)."""
    import dataclasses
    from engine.accounts.admin import find_domain, read_users, write_users
    ref = find_domain(root, "example.com")
    write_users(ref, [dataclasses.replace(u, gid=u.gid | bit) for u in read_users(ref.directory)])


# Another host, for the server (127.0.0.1 is the box itself: vchkpw's webmail).
ELSEWHERE = "127.0.0.2"
CLEAR_OK = "[auth]\nfailure_delay = 0\n[pop3]\nallow_plaintext = true\n"


def test_no_pop_flag_refused(tmp_path, server):
    root = make_root(tmp_path, CLEAR_OK)
    set_flag(root, NO_POP)
    c = Client(server(root).port, source=ELSEWHERE)
    assert c.login() == b"-ERR authorization failed\r\n"
    assert c.closed()


def test_a_login_from_the_box_itself_is_a_webmails(tmp_path, server):
    # vchkpw: POP from 127.0.0.1 is WEBMAIL, so NO_POP ("webmail only") does
    # not refuse it and NO_WEBMAIL does.
    from engine.accounts.vpasswd import NO_WEBMAIL
    root = make_root(tmp_path, CLEAR_OK)
    set_flag(root, NO_POP)
    srv = server(root)
    c = Client(srv.port)
    assert c.login() == b"+OK \r\n"
    c.close()
    set_flag(root, NO_WEBMAIL)

    def refused() -> bool:          # once the server's accounts see the new vpasswd (≤ 1 s)
        c = Client(srv.port)
        no = c.login() == b"-ERR authorization failed\r\n"
        c.close()
        return no
    wait_for(refused, what="NO_WEBMAIL refusing a login from 127.0.0.1")


def test_domain_limits_disable_pop_refused_unless_v_override(tmp_path, server):
    # vpopmail's vlimits_setflags: qmailadmin's .qmailadmin-limits disables POP
    # for every user of the domain, but a user with V_OVERRIDE.
    from engine.accounts.vpasswd import V_OVERRIDE
    root = make_root(tmp_path, CLEAR_OK)
    (root / "domains" / "example.com" / ".qmailadmin-limits").write_text(
        "maxpopaccounts: -1\ndefault_quota: 0\ndisable_pop\n")
    srv = server(root)
    c = Client(srv.port, source=ELSEWHERE)
    assert c.login() == b"-ERR authorization failed\r\n"
    assert c.closed()
    set_flag(root, V_OVERRIDE)

    def logs_in() -> bool:         # once the server's accounts see the new vpasswd (≤ 1 s)
        c = Client(srv.port, source=ELSEWHERE)
        ok = c.login() == b"+OK \r\n"
        c.close()
        return ok
    wait_for(logs_in, what="a login with V_OVERRIDE")


def test_a_login_is_recorded_in_lastauth(tmp_path, server):
    root = make_root(tmp_path)
    user_dir = root / "domains" / "example.com" / "joe"
    srv = server(root)
    c = Client(srv.port)
    assert c.login("joe@example.com", "wrong") == b"-ERR authorization failed\r\n"
    assert not (user_dir / "lastauth").exists()                    # only a login that passes
    c = Client(srv.port)
    assert c.login() == b"+OK \r\n"
    assert (user_dir / "lastauth").read_text() == "127.0.0.1"


def test_a_login_without_its_domain_is_in_the_default_domain(tmp_path, server):
    # vchkpw's default domain: `joe` logs in as joe@example.com ([accounts]
    # default_domain, else ~vpopmail/etc/defaultdomain).
    root = make_root(tmp_path, '[auth]\nfailure_delay = 0\n[accounts]\ndefault_domain = "example.com"\n')
    srv = server(root)
    for login in ("joe", "JOE", "joe%example.com", "joe/example.com"):
        c = Client(srv.port)
        assert c.login(login) == b"+OK \r\n", login
        c.close()
    c = Client(srv.port)
    assert c.login("joe@") == b"-ERR authorization failed\r\n"


def test_a_default_domain_set_in_qrelay_toml_counts_after_a_reload(tmp_path, server):
    # HUP rereads qrelay.toml for new connections: [accounts] default_domain too.
    root = make_root(tmp_path, '[auth]\nfailure_delay = 0\n')
    srv = server(root)
    c = Client(srv.port)
    assert c.login("joe") == b"-ERR authorization failed\r\n"
    c.close()
    (root / "qrelay.toml").write_text('[auth]\nfailure_delay = 0\n[accounts]\ndefault_domain = "example.com"\n')
    assert srv.reload()
    c = Client(srv.port)
    assert c.login("joe") == b"+OK \r\n"


def test_apop(tmp_path, server):
    root = make_root(tmp_path)           # joe: no cleartext kept
    (root / "qrelay.toml").write_text("[accounts]\nkeep_cleartext = true\n[auth]\nfailure_delay = 0\n")
    add_user(root, "ann@example.com", "s3cret")
    srv = server(root)
    c = Client(srv.port)
    greeting = c.line()
    stamp = greeting[4:-2].decode()
    assert stamp.startswith("<") and stamp.endswith("@pop.example.net>")
    digest = hashlib.md5((stamp + "s3cret").encode()).hexdigest()
    assert c.cmd(f"APOP ann@example.com {digest}") == b"+OK \r\n"
    assert c.cmd("STAT") == b"+OK 0 0\r\n"
    c.close()
    # another connection's timestamp differs: the same digest is refused
    c = Client(srv.port)
    assert c.line()[4:-2].decode() != stamp
    assert c.cmd(f"APOP ann@example.com {digest}") == b"-ERR authorization failed\r\n"
    assert c.closed()
    # joe was added before keep_cleartext: no cleartext, so APOP never matches
    c = Client(srv.port)
    stamp = c.line()[4:-2].decode()
    digest = hashlib.md5((stamp + "secret").encode()).hexdigest()
    assert c.cmd(f"APOP joe@example.com {digest}") == b"-ERR authorization failed\r\n"
    c.close()


def test_apop_refused_for_an_empty_cleartext_field(tmp_path, server):
    # vadduser -e (a hash given, no password) with CLEAR_PASS writes an empty
    # eighth field: no cleartext is kept, so APOP must never match — the digest
    # of the timestamp alone is not a password.
    import dataclasses
    from engine.accounts.admin import find_domain, read_users, write_users
    root = make_root(tmp_path)
    ref = find_domain(root, "example.com")
    write_users(ref, [dataclasses.replace(u, clear="") for u in read_users(ref.directory)])
    c = Client(server(root).port)
    stamp = c.line()[4:-2].decode()
    digest = hashlib.md5(stamp.encode()).hexdigest()
    assert c.cmd(f"APOP joe@example.com {digest}") == b"-ERR authorization failed\r\n"
    assert c.closed()


def test_uidl_of_a_file_name_that_is_not_utf8(tmp_path, server):
    # Another MDA's name with a Latin-1 byte: the UIDL is the name's bytes as
    # on disk (a crash here closed the connection).
    root = make_root(tmp_path)
    cur = bytes(root / "domains" / "example.com" / "joe" / "Maildir" / "cur")
    path = os.path.join(cur, b"1700000000.1.h\xe9st:2,S")
    Path(os.fsdecode(path)).write_bytes(b"Subject: x\n\nbody\n")
    os.utime(path, (T0, T0))
    c = Client(server(root).port)
    assert c.login() == b"+OK \r\n"
    assert c.cmd("UIDL 1") == b"+OK 1 1700000000.1.h\xe9st\r\n"
    assert c.multi("UIDL") == [b"1 1700000000.1.h\xe9st"]
    assert c.multi("RETR 1") == [b"Subject: x", b"", b"body", b""]


def test_deletions_lower_the_maildirsize_quota_usage(tmp_path, server):
    # Maildir++: QUIT's unlinks are appended to maildirsize as "-bytes -count".
    # Without them, vdelivermail's freshly rebuilt "over" line kept bouncing
    # mail for 15 minutes after the customer had emptied the mailbox.
    from engine.accounts.admin import set_quota
    root = make_root(tmp_path)
    set_quota(root, "joe@example.com", "2C")
    maildir = root / "domains" / "example.com" / "joe" / "Maildir"
    for n in (1, 2):
        age(deliver(root, "joe@example.com", f"Subject: {n}\n\nx\n".encode()), T0 + n)
    courier = LocalDelivery.for_root(root, max_threads=1)
    try:
        over = courier.deliver_sync("s@sender.example", "example.com-joe@example.com", b"Subject: 3\n\nx\n")
        assert over.status != "K"                          # over quota: maildirsize rebuilt, "over"
        c = Client(server(root).port)
        assert c.login() == b"+OK \r\n"
        assert c.cmd("DELE 1") == b"+OK \r\n" and c.cmd("DELE 2") == b"+OK \r\n"
        assert c.cmd("QUIT") == b"+OK \r\n"
        assert c.closed()
        assert (maildir / "maildirsize").read_text().endswith(" -2\n")
        again = courier.deliver_sync("s@sender.example", "example.com-joe@example.com", b"Subject: 4\n\nx\n")
        assert again.status == "K", again
    finally:
        courier.close()


def test_mailbox_lock(spec_root, server):
    root, maildir, (m1, _, _) = spec_root
    srv = server(root)
    first = Client(srv.port)
    assert first.login() == b"+OK \r\n"
    assert first.cmd("DELE 1") == b"+OK \r\n"
    second = Client(srv.port)
    assert second.login() == b"-ERR [IN-USE] this mailbox is in use by another session\r\n"
    assert second.closed()
    assert first.cmd("QUIT") == b"+OK \r\n"
    assert first.closed()
    third = Client(srv.port)
    assert third.login() == b"+OK \r\n"
    assert third.cmd("STAT").startswith(b"+OK 2 ")
    third.close()


def test_dropped_connection_changes_nothing(spec_root, server):
    root, maildir, (m1, m2, m3) = spec_root
    srv = server(root)
    c = Client(srv.port)
    c.login()
    assert c.cmd("DELE 1") == b"+OK \r\n"
    assert c.multi("RETR 3")
    c.close()     # no QUIT
    wait_for(lambda: not srv.receiver.sessions, what="the session to end")
    assert m1.exists() and m3.exists() and m2.exists()
    c = Client(srv.port)        # the lock went with the connection
    assert c.login() == b"+OK \r\n"
    assert c.cmd("STAT").startswith(b"+OK 3 ")
    c.close()


def test_new_and_future_files_are_not_listed(tmp_path, server):
    root = make_root(tmp_path)
    maildir = root / "domains" / "example.com" / "joe" / "Maildir"
    now = deliver(root, "joe@example.com", b"Subject: now\n\nx\n")
    future = maildir / "cur" / "9999999999.1.host:2,"
    future.write_bytes(b"x\n")
    age(future, int(time.time()) + 3600)
    (maildir / "new" / ".hidden").write_bytes(b"x\n")
    age(maildir / "new" / ".hidden", T0)
    old_tmp = maildir / "tmp" / "1.2.host"
    old_tmp.write_bytes(b"abandoned")
    os.utime(old_tmp, (time.time() - 129601, time.time() - 129601))
    fresh_tmp = maildir / "tmp" / "3.4.host"
    fresh_tmp.write_bytes(b"in progress")
    os.utime(now, (time.time() + 5, time.time() + 5))
    c = Client(server(root).port)
    c.login()
    assert c.cmd("STAT") == b"+OK 0 0\r\n"
    assert not old_tmp.exists() and fresh_tmp.exists()
    c.close()


def test_line_length_limit_and_garbage(spec_root, server):
    root, _, _ = spec_root
    c = Client(server(root).port)
    c.line()
    assert c.cmd("X" * 2000) == b"-ERR line too long\r\n"
    assert c.cmd("\x00\xff garbage") == b"-ERR authorization first\r\n"
    assert c.cmd("NOOP") == b"+OK \r\n"
    c.send(b"Y" * (64 * 1024 + 100))
    assert c.line() == b"-ERR line too long\r\n"
    assert c.closed()


def test_idle_timeout(spec_root, server):
    root, _, _ = spec_root
    (root / "qrelay.toml").write_text("[pop3]\ntimeout = 1\n")
    c = Client(server(root).port)
    c.line()
    start = time.monotonic()
    assert c.closed(timeout=5)
    assert time.monotonic() - start < 4.5


class FakeThrottle:
    """engine.relay.throttle.LoginThrottle's interface, recording what it is told."""

    def __init__(self, lock_after: int = 2, delay: float = 0.0) -> None:
        self.failures: dict[str, int] = {}
        self.successes: list[str] = []
        self.lock_after = lock_after
        self.delay = delay

    async def attempt(self, ip: str) -> int | None:
        if self.failures.get(ip, 0) >= self.lock_after:
            return None
        self.failures[ip] = self.failures.get(ip, 0) + 1
        return self.failures[ip]

    async def failed(self, ip: str, n: int) -> float:
        return float("inf") if n >= self.lock_after else self.delay

    async def success(self, ip: str) -> None:
        self.successes.append(ip)
        self.failures.pop(ip, None)


class FakeRelay:
    def __init__(self) -> None:
        self.granted: list[str] = []

    async def grant(self, ip: str) -> None:
        self.granted.append(ip)


def test_throttle_and_relay_grant(spec_root, server):
    root, _, _ = spec_root
    throttle, relay = FakeThrottle(lock_after=2, delay=0.2), FakeRelay()
    srv = server(root, throttle=throttle, relay=relay)
    c = Client(srv.port)
    start = time.monotonic()
    assert c.login(password="guess1") == b"-ERR authorization failed\r\n"
    assert time.monotonic() - start >= 0.2          # the throttle's delay
    c = Client(srv.port)
    assert c.login(password="guess2") == b"-ERR authorization failed\r\n"
    assert throttle.failures == {"127.0.0.1": 2}
    # locked out: even the right password is refused, without being checked
    c = Client(srv.port)
    assert c.login() == b"-ERR authorization failed\r\n"
    assert throttle.failures == {"127.0.0.1": 2} and relay.granted == []
    throttle.failures.clear()
    c = Client(srv.port)
    assert c.login() == b"+OK \r\n"
    assert throttle.successes == ["127.0.0.1"] and relay.granted == ["127.0.0.1"]
    c.close()


def test_no_relay_flag_gets_no_grant(tmp_path, server):
    root = make_root(tmp_path)
    set_flag(root, NO_RELAY)
    relay = FakeRelay()
    c = Client(server(root, relay=relay).port)
    assert c.login() == b"+OK \r\n"
    assert relay.granted == []
    c.close()


class Lines(list):
    """The receiver's log (log/smtpd), kept in memory."""

    def line(self, text: str) -> None:
        self.append(text)


def test_missing_maildir(tmp_path, server):
    root = make_root(tmp_path)
    import shutil
    shutil.rmtree(root / "domains" / "example.com" / "joe" / "Maildir")
    log = Lines()
    c = Client(server(root, log=log).port)
    assert c.login() == b"-ERR this user has no $HOME/Maildir\r\n"
    assert c.closed()
    [line] = log
    assert line.startswith("pop3d: joe@example.com:127.0.0.1: -ERR this user has no $HOME/Maildir (")


@pytest.mark.parametrize("directory", ["", "joe"])
def test_a_user_without_an_absolute_directory_has_no_maildir(tmp_path, server, monkeypatch, directory):
    # An empty (or relative) vpasswd directory field named the Maildir in the
    # receiver's working directory: the login opened whatever mailbox is there.
    import dataclasses
    from engine.accounts.admin import find_domain, read_users, write_users
    root = make_root(tmp_path)
    ref = find_domain(root, "example.com")
    write_users(ref, [dataclasses.replace(u, directory=directory) for u in read_users(ref.directory)])
    cwd = tmp_path / "cwd"
    for sub in ("joe/Maildir/new", "joe/Maildir/cur", "joe/Maildir/tmp",
                "Maildir/new", "Maildir/cur", "Maildir/tmp"):
        (cwd / sub).mkdir(parents=True)
    (cwd / "Maildir" / "new" / "1.2.host").write_bytes(b"Subject: not joe's\n\n")
    age(cwd / "Maildir" / "new" / "1.2.host", T0)
    monkeypatch.chdir(cwd)
    log = Lines()
    c = Client(server(root, log=log).port)
    assert c.login() == b"-ERR this user has no $HOME/Maildir\r\n"
    assert c.closed()
    [line] = log
    assert line.startswith("pop3d: joe@example.com:127.0.0.1: -ERR this user has no $HOME/Maildir (")
    assert not (cwd / "lastauth").exists() and not (cwd / "joe" / "lastauth").exists()


def test_a_message_that_cannot_be_opened_is_logged_with_the_reason(spec_root, server):
    # README: RETR's "-ERR unable to open that message" has its reason in
    # log/smtpd (EACCES: the receivers do not run as the mailbox owner); it had none.
    root, _, (m1, _, _) = spec_root
    log = Lines()
    c = Client(server(root, log=log).port)
    assert c.login() == b"+OK \r\n"
    m1.unlink()                      # another program's doing
    assert c.cmd("TOP 1 0") == b"-ERR unable to open that message\r\n"
    assert c.cmd("NOOP") == b"+OK \r\n"
    [line] = log
    assert line == (f"pop3d: joe@example.com:127.0.0.1: -ERR unable to open that message "
                    f"(new/{m1.name}: No such file or directory; this receiver runs as uid {os.getuid()})")


def test_deletions_quit_cannot_unlink_are_logged_with_the_reason(spec_root, server):
    # qmail-pop3d's "-ERR unable to unlink all deleted messages" says neither
    # which nor why; log/smtpd does (a Maildir the receivers may not write
    # in: the customer's mail never goes).
    root, _, (m1, m2, _) = spec_root
    log = Lines()
    c = Client(server(root, log=log).port)
    assert c.login() == b"+OK \r\n"
    assert c.cmd("DELE 1") == b"+OK \r\n" and c.cmd("DELE 2") == b"+OK \r\n"
    m1.unlink()
    assert c.cmd("QUIT") == b"-ERR unable to unlink all deleted messages\r\n"
    assert c.line() == b"+OK \r\n"
    assert not m2.exists()
    assert log == [f"pop3d: joe@example.com:127.0.0.1: -ERR unable to unlink all deleted messages "
                   f"(1 of 2: new/{m1.name}: No such file or directory; "
                   f"this receiver runs as uid {os.getuid()})"]


def test_login_failures_are_logged_in_vchkpws_words(tmp_path, server):
    root = make_root(tmp_path, CLEAR_OK)
    log = Lines()
    srv = server(root, log=log)
    for user, password, source in (("joe@example.com", "wrong", ELSEWHERE),
                                   ("No One%x@example.com", "secret", ELSEWHERE),
                                   ("joe@example.com", "wrong", None),
                                   ("Joe%Example.com", "wrong", ELSEWHERE)):
        c = Client(srv.port, source=source)
        assert c.login(user, password) == b"-ERR authorization failed\r\n"
        assert c.closed()
    # Spaces between the words; the client's name as qmail's logsafe makes it;
    # a login from 127.0.0.1 is a webmail's, in vchkpw's name for it.
    assert log == ["vchkpw-pop3: password fail joe@example.com:127.0.0.2",
                   "vchkpw-pop3: vpopmail user not found no_one_x@example.com:127.0.0.2",
                   "vchkpw-webmail: password fail joe@example.com:127.0.0.1",
                   # the name as vchkpw logs it: user@domain, whichever form was typed
                   "vchkpw-pop3: password fail joe@example.com:127.0.0.2"]


def test_webmail_addresses_setting(tmp_path):
    from engine.config.settings import load_settings
    assert "127.0.0.1" in load_settings(tmp_path).pop3.webmail_addresses
    (tmp_path / "qrelay.toml").write_text('[pop3]\nwebmail_addresses = ["192.0.2.80"]\n')
    assert load_settings(tmp_path).pop3.webmail_addresses == ("192.0.2.80",)


def test_pop3_settings_ranges(tmp_path):
    from engine.config.settings import SettingsError, load_settings
    (tmp_path / "qrelay.toml").write_text("[pop3]\nmax_line_length = 100\n")
    with pytest.raises(SettingsError, match=r"\[pop3\] max_line_length = 100 is out of range"):
        load_settings(tmp_path)
    (tmp_path / "qrelay.toml").write_text("[pop3]\nchunk_bytes = 1024\n")
    with pytest.raises(SettingsError, match="chunk_bytes"):
        load_settings(tmp_path)


def test_shutdown_closes_sessions_without_changes(spec_root, server):
    root, maildir, (m1, _, _) = spec_root
    srv = server(root)
    c = Client(srv.port)
    c.login()
    assert c.cmd("DELE 1") == b"+OK \r\n"
    srv.shutdown(1.0)
    assert c.closed()
    assert m1.exists()


def test_pipelined_commands_wait_while_the_client_does_not_read(tmp_path, server):
    # 6 bytes of "UIDL" ask for a 20 KB listing: commands a client sends
    # without reading the answers must wait for it (flow control), not pile
    # megabytes up in the receiver's write buffer.
    root = make_root(tmp_path)
    cur = root / "domains" / "example.com" / "joe" / "Maildir" / "cur"
    for i in range(500):
        path = cur / f"{T0 + i}.M{i}P1.host.example.net:2,S"
        path.write_bytes(b"x\n")
        age(path, T0 + i)
    srv = server(root)
    c = Client(srv.port)
    assert c.login() == b"+OK \r\n"
    c.send(b"UIDL\r\n" * 1000 + b"QUIT\r\n")          # 20 MB of answers, more than the socket buffers
    wait_for(lambda: any(s.gate.paused for s in list(srv.receiver.sessions)), what="a full write buffer")
    time.sleep(0.5)
    [session] = srv.receiver.sessions
    buffered = session.transport.get_write_buffer_size()
    if buffered >= 1 << 20:
        c.close()      # the reset ends the session (a transport holding MBs hangs the loop's close)
    assert buffered < 1 << 20, buffered
    got = bytearray(c.buf)                # reading, the client gets every answer, then QUIT's
    while chunk := c.sock.recv(1 << 20):
        got += chunk
    listing = bytes(got[:got.index(b"\r\n.\r\n") + 5])
    assert listing.count(b"\r\n") == 502
    assert got == listing * 1000 + b"+OK \r\n"


def test_a_client_that_stops_reading_is_dropped_after_the_timeout(tmp_path, server):
    root = make_root(tmp_path)
    (root / "qrelay.toml").write_text("[auth]\nfailure_delay = 0\n[pop3]\ntimeout = 1\n")
    path = deliver(root, "joe@example.com", b"Subject: big\n\n" +
                   (b"z" * 99 + b"\n") * 200_000)
    age(path, T0)
    srv = server(root)
    c = Client(srv.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert c.login() == b"+OK \r\n"
    c.send(b"RETR 1\r\n")          # 20 MB, never read: the server's writes stall
    wait_for(lambda: any(s.gate.paused for s in list(srv.receiver.sessions)), what="a full write buffer")
    wait_for(lambda: not srv.receiver.sessions, timeout=8, what="the stalled session to be dropped")
    c = Client(srv.port)           # and its mailbox lock went with it
    assert c.login() == b"+OK \r\n"


def test_a_closed_connection_whose_client_does_not_read_is_dropped(tmp_path, server):
    # QUIT answered behind replies the client never reads: close() waits for
    # them to drain, and must not wait (holding a max_connections slot) for ever.
    root = make_root(tmp_path)
    (root / "qrelay.toml").write_text("[auth]\nfailure_delay = 0\n[pop3]\ntimeout = 1\n")
    srv = server(root)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5.0)
    s.connect(("127.0.0.1", srv.port))
    try:
        assert s.recv(100).startswith(b"+OK ")
        (session,) = srv.receiver.sessions

        def small_buffers() -> None:
            session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        srv.call(small_buffers)
        # Replies below the transport's high-water mark, past what the sockets hold.
        s.sendall(b"CAPA\r\n" * 500 + b"QUIT\r\n")
        wait_for(lambda: srv.call(lambda: session.state) == CLOSED, 5, "QUIT")
        wait_for(lambda: not srv.receiver.sessions and srv.receiver.pop3_counter.total() == 0, 8,
                 "the connection dropped and its slot released")
    finally:
        s.close()


def test_connection_caps(tmp_path, server):
    # [pop3] max_connections (qmail-popup's tcpserver -c), counted apart from
    # SMTP's, and the receiver's open-files room (engine.openfiles).
    root = make_root(tmp_path, "[pop3]\nmax_connections = 2\n")
    log = Lines()
    srv = server(root, log=log)
    a, b = Client(srv.port), Client(srv.port)
    assert a.line().startswith(b"+OK <") and b.line().startswith(b"+OK <")
    c = Client(srv.port)
    assert c.line() == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
    assert c.closed()
    assert log == ["pop3: connection from 127.0.0.1 refused: too many connections (2/2 connections)"]
    assert a.cmd("QUIT").startswith(b"+OK")
    wait_for(lambda: srv.receiver.pop3_counter.total() == 1, what="the count to drop")
    d = Client(srv.port)
    assert d.line().startswith(b"+OK <")
    srv.receiver.room = 2
    e = Client(srv.port)
    assert e.line() == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
    assert log[-1] == ("pop3: connection from 127.0.0.1 refused: too many connections "
                       "(2 sessions in this receiver: open files limit)")


def test_guesses_sent_at_once_are_checked_at_most_max_failures_times(tmp_path, server):
    from engine.config.settings import load_settings
    from engine.relay import open_relay_table
    from engine.relay.throttle import LoginThrottle
    root = make_root(tmp_path, CLEAR_OK + "[login]\nfailure_delay = 0\nmax_failures = 3\n")
    settings = load_settings(root)
    log = Lines()
    srv = server(root, log=log,
                 throttle=LoginThrottle(open_relay_table(root, settings), settings))
    clients = [Client(srv.port, source=ELSEWHERE) for _ in range(8)]
    for c in clients:
        assert c.line().startswith(b"+OK <")
    for c in clients:        # all sent before any answer is read
        c.send(b"USER joe@example.com\r\nPASS guess\r\n")
    for c in clients:
        assert c.line() == b"+OK \r\n" and c.line() == b"-ERR authorization failed\r\n"
    outcomes = sorted(line.split(": ")[1].split(" joe")[0] for line in log)
    assert outcomes == ["locked out"] * 5 + ["password fail"] * 3


def test_an_unknown_or_locked_user_costs_a_hash_of_the_scheme_in_use(tmp_path, monkeypatch):
    """vpopmail 5.4 wrote $1$ hashes (0.1 ms to check): a $6$ dummy (1.4 ms)
    for unknown users, or none at all for a hash no password matches, told
    them from real accounts by the time of the -ERR."""
    import dataclasses
    from passlib.hash import md5_crypt
    from engine.accounts import admin, passwords
    from engine.accounts.store import Accounts
    from engine.pop3 import login as logins
    root = make_root(tmp_path)
    add_user(root, "locked@example.com", "secret")
    ref = admin.find_domain(root, "example.com")
    admin.write_users(ref, [
        dataclasses.replace(u, crypted=md5_crypt.hash("secret")) if u.name == "joe"
        else dataclasses.replace(u, crypted="!" + md5_crypt.hash("secret"))
        for u in admin.read_users(ref.directory)])
    dummy = [passwords.hash_password("x")]
    hashed: list[str] = []
    real_verify = passwords.verify

    def verify(secret: str, crypted: str) -> bool:
        hashed.append(crypted)
        return real_verify(secret, crypted)
    monkeypatch.setattr(passwords, "verify", verify)
    accounts = Accounts(root, recheck_seconds=0)

    def check(login: str, secret: str) -> str:
        return logins.check_login(accounts, login, secret, apop_timestamp=None, max_messages=100,
                                  dummy_hash=lambda: dummy[0],
                                  hash_seen=lambda c: dummy.__setitem__(0, c)).outcome
    assert check("joe@example.com", "guess") == logins.BAD_PASSWORD
    assert check("who@example.com", "guess") == logins.NOT_FOUND
    assert check("locked@example.com", "secret") == logins.BAD_PASSWORD
    assert len(hashed) == 3 and all(h.startswith("$1$") for h in hashed), hashed


def test_a_password_over_max_password_bytes_is_wrong_and_never_hashed(tmp_path, monkeypatch):
    from engine.accounts import passwords
    from engine.accounts.store import Accounts
    from engine.pop3 import login as logins
    root = make_root(tmp_path)
    hashed: list[str] = []
    real_verify = passwords.verify
    monkeypatch.setattr(passwords, "verify", lambda s, c: hashed.append(c) or real_verify(s, c))
    accounts = Accounts(root, recheck_seconds=0)

    def check(login: str, secret: str) -> str:
        return logins.check_login(accounts, login, secret, apop_timestamp=None, max_messages=100,
                                  dummy_hash=lambda: passwords.hash_password("x"),
                                  max_password_bytes=16).outcome
    assert check("joe@example.com", "s" * 17) == logins.BAD_PASSWORD
    assert check("who@example.com", "s" * 17) == logins.NOT_FOUND
    assert hashed == []
    assert check("joe@example.com", "secret") == logins.OK
