"""POP-before-SMTP in the SMTP session (engine/smtp/session.py with
engine.relay): a client tcp.smtp does not let relay, whose IP the relay table
allows, relays as with RELAYCLIENT="" (and RBLSMTPD=""); a denied IP stays
denied; a table that must be waited for holds the greeting, bounded."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.config.settings import Settings
from engine.relay import RelayTable, open_relay_table
from tests.smtp_harness import InProcessServer, RawClient

REFUSED = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"


@pytest.fixture
def make_server(root: Path):
    servers: list[InProcessServer] = []

    def make(tcp_smtp: str, table: RelayTable | None) -> InProcessServer:
        (root / "control" / "tcp.smtp").write_text(tcp_smtp)
        srv = InProcessServer(root)
        srv.receiver.relay = table
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()
        if srv.receiver.relay is not None:
            asyncio.run(srv.receiver.relay.close())


def relays(port: int) -> bytes:
    c = RawClient(port)
    try:
        assert c.line().startswith(b"220 ")
        assert c.cmd(b"HELO client").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<a@example.org>") == b"250 ok\r\n"
        return c.cmd(b"RCPT TO:<someone@elsewhere.example>")
    finally:
        c.close()


def test_a_granted_ip_relays(root: Path, make_server) -> None:
    table = open_relay_table(root, Settings())
    srv = make_server(":allow\n", table)
    assert relays(srv.port) == REFUSED
    asyncio.run(table.grant("127.0.0.1", ttl=60))       # as another process would
    assert relays(srv.port) == b"250 ok\r\n"
    asyncio.run(table.revoke("127.0.0.1"))
    assert relays(srv.port) == REFUSED


def test_a_grant_skips_rblsmtpd_as_open_smtp_does(root: Path, make_server) -> None:
    table = open_relay_table(root, Settings())
    asyncio.run(table.grant("127.0.0.1", ttl=60))
    srv = make_server(':allow,RBLSMTPD="-listed"\n', table)
    assert relays(srv.port) == b"250 ok\r\n"


def test_a_denied_ip_stays_denied(root: Path, make_server) -> None:
    table = open_relay_table(root, Settings())
    asyncio.run(table.grant("127.0.0.1", ttl=60))
    srv = make_server("127.0.0.1:deny\n", table)
    c = RawClient(srv.port)
    try:
        assert c.closed()
    finally:
        c.close()


def test_a_rule_s_own_relayclient_wins(root: Path, make_server) -> None:
    table = open_relay_table(root, Settings())
    asyncio.run(table.grant("127.0.0.1", ttl=60))
    srv = make_server('127.:allow,RELAYCLIENT="@relay.example"\n', table)
    # RELAYCLIENT="@relay.example" appends its text to the recipient (qmail): the
    # rule is used as it is, not replaced by RELAYCLIENT="".
    assert relays(srv.port) == b"250 ok\r\n"
    assert srv.receiver.relay is table


class SlowTable(RelayTable):
    """A store that must be awaited (like Redis): answers after `delay`."""

    def __init__(self, answer: bool, delay: float) -> None:
        super().__init__(60, lambda: 0.0)
        self.answer, self.delay, self.asked = answer, delay, 0

    async def allows(self, ip: str) -> bool:
        self.asked += 1
        await asyncio.sleep(self.delay)
        return self.answer

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("answer", [True, False])
def test_an_awaited_store_holds_the_greeting(root: Path, make_server, answer: bool) -> None:
    table = SlowTable(answer, 0.2)
    srv = make_server(":allow\n", table)
    c = RawClient(srv.port)
    try:
        # Pipelined before the greeting: nothing is read until the answer came.
        c.send(b"HELO client\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        assert c.line().startswith(b"220 ")
        assert c.reply().startswith(b"250")
        assert c.reply() == b"250 ok\r\n"
        assert c.reply() == (b"250 ok\r\n" if answer else REFUSED)
    finally:
        c.close()
    assert table.asked == 1


def test_a_client_leaving_during_the_check_is_harmless(root: Path, make_server) -> None:
    table = SlowTable(True, 0.3)
    srv = make_server(":allow\n", table)
    c = RawClient(srv.port)
    c.close()
    assert relays(srv.port) == b"250 ok\r\n"       # the receiver still serves


def test_relayclients_add_beside_a_running_qrelay(root: Path) -> None:
    """The Dovecot post-login hook's way: `relayclients add` while `qrelay run`
    serves with two receivers; every receiver honours it at once."""
    from tests.conftest import run_cli
    from tests.smtp_harness import RunningQrelay
    (root / "control" / "tcp.smtp").write_text(":allow\n")
    q = RunningQrelay(root, procs=2)
    try:
        assert relays(q.port) == REFUSED
        assert run_cli("relayclients", "add", str(root), "127.0.0.1", "--ttl", "60").returncode == 0
        # Several connections: the kernel spreads them over both receivers.
        assert [relays(q.port) for _ in range(6)] == [b"250 ok\r\n"] * 6
        assert run_cli("relayclients", "del", str(root), "127.0.0.1").returncode == 0
        assert relays(q.port) == REFUSED
    finally:
        q.stop()
