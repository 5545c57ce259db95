"""The relay table in Redis (engine/relay/shared.py) against a real
redis-server: grants with Redis's own expiry, counters, fail closed and
recovery; two `qrelay run` roots sharing one Redis."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from pathlib import Path

import pytest

from engine.config.settings import LoginSettings, RelaySettings, Settings
from engine.relay import RelayStoreError, open_relay_table
from engine.relay.shared import RedisRelayTable
from engine.relay.throttle import LoginThrottle
from tests.test_relay_throttle import failure
from tests.conftest import run_cli
from tests.test_delivery_e2e import wait_for
from tests.smtp_harness import RunningQrelay
from tests.test_relay_smtp import REFUSED, relays


def settings_for(url: str, **relay) -> Settings:
    return dataclasses.replace(Settings(), relay=RelaySettings(store=url, **relay))


async def await_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_grant_allows_revoke_entries(redis_server, tmp_path: Path) -> None:
    async def scenario() -> None:
        table = open_relay_table(tmp_path, settings_for(redis_server.url(3)))
        other = open_relay_table(tmp_path / "elsewhere", settings_for(redis_server.url(3)))
        assert isinstance(table, RedisRelayTable)
        try:
            assert table.allows_nowait("192.0.2.1") is None     # must be awaited
            until = await table.grant("192.0.2.1", ttl=60)
            assert until == pytest.approx(time.time() + 60, abs=2)
            assert await other.allows("192.0.2.1")              # another node's table
            assert not await other.allows("192.0.2.2")
            await table.grant("::ffff:192.0.2.2")
            entries = await other.entries()
            assert [ip for ip, _ in entries] == ["192.0.2.1", "192.0.2.2"]
            assert entries[1][1] == pytest.approx(time.time() + 10800, abs=2)
            assert await other.revoke("192.0.2.1") is True
            assert not await table.allows("192.0.2.1")
            assert await other.revoke("192.0.2.1") is False
            assert not await table.allows("not an ip")
            with pytest.raises(ValueError):      # past Redis's PX: no outage either
                await table.grant("192.0.2.2", ttl=1e300)
            assert await table.allows("192.0.2.2")
        finally:
            await table.close()
            await other.close()

    asyncio.run(scenario())


def test_redis_expires_grants_by_itself(redis_server, tmp_path: Path) -> None:
    async def scenario() -> None:
        table = open_relay_table(tmp_path, settings_for(redis_server.url()))
        try:
            await table.grant("192.0.2.1", ttl=0.3)
            assert await table.allows("192.0.2.1")

            async def gone() -> bool:
                return not await table.allows("192.0.2.1")
            await await_for(gone, what="the grant to expire")
            assert await table.entries() == []
        finally:
            await table.close()

    asyncio.run(scenario())


def test_key_prefix_separates_clusters(redis_server, tmp_path: Path) -> None:
    async def scenario() -> None:
        a = open_relay_table(tmp_path, settings_for(redis_server.url(), key_prefix="a:"))
        b = open_relay_table(tmp_path, settings_for(redis_server.url(), key_prefix="b:"))
        try:
            await a.grant("192.0.2.1", ttl=60)
            assert await a.allows("192.0.2.1") and not await b.allows("192.0.2.1")
            assert await b.entries() == []
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_prefix_with_glob_characters_lists_its_own_keys(redis_server, tmp_path: Path) -> None:
    """entries() SCANs with MATCH PREFIXrelay:*: the prefix is matched as written."""
    async def scenario() -> None:
        a = open_relay_table(tmp_path, settings_for(redis_server.url(), key_prefix="mx[1]*:"))
        b = open_relay_table(tmp_path, settings_for(redis_server.url(), key_prefix="mx1-b:"))
        try:
            await a.grant("192.0.2.1", ttl=60)
            await b.grant("192.0.2.2", ttl=60)
            assert [ip for ip, _ in await a.entries()] == ["192.0.2.1"]
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_throttle_counts_across_nodes(redis_server, tmp_path: Path) -> None:
    login = LoginSettings(failure_delay=1.0, max_delay=3.0, max_failures=4, window=60,
                          lockout_seconds=1)
    settings = dataclasses.replace(settings_for(redis_server.url()), login=login)

    async def scenario() -> None:
        node_a, node_b = open_relay_table(tmp_path, settings), open_relay_table(tmp_path, settings)
        a, b = LoginThrottle(node_a, settings), LoginThrottle(node_b, settings)
        try:
            assert [await failure(a, "192.0.2.1"), await failure(b, "192.0.2.1"),
                    await failure(a, "192.0.2.1")] == [1.0, 2.0, 3.0]
            assert await failure(b, "192.0.2.1") == math.inf
            assert await a.locked("192.0.2.1") and await b.locked("192.0.2.1")

            async def unlocked() -> bool:
                return not await a.locked("192.0.2.1")
            await await_for(unlocked, what="the lockout to end")      # Redis expires it
            assert await failure(b, "192.0.2.1") == 1.0
            await a.success("192.0.2.1")
            assert await failure(b, "192.0.2.1") == 1.0
        finally:
            await node_a.close()
            await node_b.close()

    asyncio.run(scenario())


def test_a_lock_value_that_is_no_number_never_raises(redis_server, tmp_path: Path) -> None:
    """A lock key someone set by hand (redis-cli SET qrelay:lock:IP yes):
    locked_until and the throttle still answer, as when the store fails."""
    import redis as redis_py
    settings = settings_for(redis_server.url())
    with redis_py.Redis.from_url(redis_server.url()) as r:
        r.set("qrelay:lock:192.0.2.1", "yes", ex=60)

    async def scenario() -> None:
        table = open_relay_table(tmp_path, settings)
        try:
            assert await table.locked_until("192.0.2.1") == 0
            assert await LoginThrottle(table, settings).attempt("192.0.2.1") == 1
        finally:
            await table.close()

    asyncio.run(scenario())


def test_unreachable_redis_fails_closed_logs_once_and_recovers(
        redis_server, tmp_path: Path, caplog) -> None:
    settings = settings_for(redis_server.url(), retry_seconds=0.1)

    async def scenario() -> None:
        table = open_relay_table(tmp_path, settings)
        try:
            await table.grant("192.0.2.1", ttl=600)
            assert await table.allows("192.0.2.1")
            redis_server.stop()
            started = time.monotonic()
            answers = []
            for _ in range(20):
                answers.append(await table.allows("192.0.2.1"))
                await asyncio.sleep(0.02)     # several retry windows
            assert answers == [False] * 20
            assert time.monotonic() - started < 20 * 0.02 + 2 * settings.relay.timeout + 1
            with pytest.raises(RelayStoreError):
                await table.grant("192.0.2.2")
            assert await table.count_failure("192.0.2.1", 60) is None
            assert await table.locked_until("192.0.2.1") == 0
            down = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(down) == 1, [r.getMessage() for r in down]
            redis_server.start()             # persisted: the grant is back with it

            async def back() -> bool:
                return await table.allows("192.0.2.1")
            await await_for(back, what="recovery")
            assert any("answers again" in r.getMessage() for r in caplog.records)
        finally:
            await table.close()

    with caplog.at_level(logging.WARNING, logger="qrelay.relay"):
        asyncio.run(scenario())


def test_a_silent_redis_costs_at_most_the_timeout(tmp_path: Path) -> None:
    """A server that accepts and never answers (a hung Redis): bounded by [relay] timeout."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    settings = settings_for(f"redis://127.0.0.1:{port}/0", timeout=0.2)

    async def scenario() -> float:
        table = open_relay_table(tmp_path, settings)
        try:
            started = time.monotonic()
            assert not await table.allows("192.0.2.1")
            assert not await table.allows("192.0.2.1")     # within retry_seconds: at once
            return time.monotonic() - started
        finally:
            await table.close()

    try:
        assert asyncio.run(scenario()) < 0.2 + 0.5
    finally:
        listener.close()


def make_root(tmp_path: Path, name: str, url: str) -> Path:
    from engine.home import init_home
    root = init_home(tmp_path / name, me=f"{name}.example.com")
    (root / "control" / "tcp.smtp").write_text(":allow\n")     # nobody relays by IP
    (root / "qrelay.toml").write_text(f'[relay]\nstore = "{url}"\nretry_seconds = 0.1\n')
    return root


def test_two_nodes_share_one_redis(redis_server, tmp_path: Path) -> None:
    """`relayclients add` on node A lets the client relay through node B at
    once; Redis stopped: B refuses relay (553) at once; Redis back: it works
    again, nothing restarted."""
    url = redis_server.url(1)
    root_a, root_b = make_root(tmp_path, "a", url), make_root(tmp_path, "b", url)
    node_a = RunningQrelay(root_a, procs=1)
    node_b = RunningQrelay(root_b, procs=2)
    smtpd_log = root_b / "log" / "smtpd" / "current"
    try:
        assert relays(node_b.port) == REFUSED
        done = run_cli("relayclients", "add", str(root_a), "127.0.0.1", "--ttl", "600")
        assert done.returncode == 0, done.stderr
        assert [relays(node_b.port) for _ in range(4)] == [b"250 ok\r\n"] * 4
        assert relays(node_a.port) == b"250 ok\r\n"
        listed = run_cli("relayclients", str(root_b))
        assert listed.stdout.startswith("127.0.0.1\tuntil ")

        redis_server.stop()
        started = time.monotonic()
        assert [relays(node_b.port) for _ in range(4)] == [REFUSED] * 4
        assert time.monotonic() - started < 4 * 0.25 + 3.0      # no session waits long
        down = run_cli("relayclients", str(root_b))
        assert down.returncode == 1 and "unreachable" in down.stderr and "Traceback" not in down.stderr

        redis_server.start()
        wait_for(lambda: relays(node_b.port) == b"250 ok\r\n", what="node B to relay again")
        wait_for(lambda: all(relays(node_b.port) == b"250 ok\r\n" for _ in range(4)),
                   what="every receiver of node B to relay again")
        # A receiver says it is back at its first answer from Redis; which
        # receiver takes a session is the kernel's choice, so sessions go on
        # until each one that logged the outage has logged its end.
        def every_receiver_back() -> bool:
            assert relays(node_b.port) == b"250 ok\r\n"
            log = smtpd_log.read_text()
            return log.count("answers again") == log.count("unreachable")
        wait_for(every_receiver_back, what="each receiver that was cut off to log its recovery")
    finally:
        node_a.stop()
        node_b.stop()
    log = smtpd_log.read_text()
    outage = [ln for ln in log.splitlines() if "unreachable" in ln]
    assert 1 <= len(outage) <= 2, outage          # one line per receiver per outage
    assert log.count("answers again") == len(outage)


def test_grant_many_pipelines(redis_server, tmp_path: Path) -> None:
    async def scenario() -> None:
        table = open_relay_table(tmp_path, settings_for(redis_server.url()))
        try:
            ips = [f"10.0.{i // 256}.{i % 256}" for i in range(2500)]
            assert await table.grant_many([(ip, 60.0) for ip in ips]) == 2500
            assert len(await table.entries()) == 2500
            assert await table.allows("10.0.9.195")
        finally:
            await table.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("url", ["redis://:hunter2@127.0.0.1:{port}/0",
                                 "redis://app:hunter2@127.0.0.1:{port}/0",
                                 "redis://127.0.0.1:{port}/0?password=hunter2",
                                 "unix:///nonexistent/redis.sock?db=1&password=hunter2"])
def test_the_password_is_never_logged(tmp_path: Path, caplog, url: str) -> None:
    """redis-py takes the password in the address or as ?password=: neither
    reaches the log or a CLI's error line."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # closed once the block ends: refused
    url = url.format(port=port)

    async def scenario() -> str:
        table = open_relay_table(tmp_path, settings_for(url))
        try:
            with pytest.raises(RelayStoreError) as raised:
                await table.grant("192.0.2.1")
            return str(raised.value)
        finally:
            await table.close()

    with caplog.at_level(logging.WARNING, logger="qrelay.relay"):
        error = asyncio.run(scenario())
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "unreachable" in logged and "unreachable" in error
    assert "hunter2" not in logged and "hunter2" not in error
    assert "***" in error


def test_a_test_redis_is_not_mistaken_for_another_server_on_its_port(tmp_path: Path) -> None:
    # bench/redis_process.py picks a free port, then redis-server binds it: a
    # server another test run took the port with meanwhile answers PING too.
    import socket
    import sys
    import threading
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from redis_process import RedisServer

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def foreign() -> None:         # answers whatever it is sent with +PONG
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    if conn.recv(1024):
                        conn.sendall(b"+PONG\r\n")
                except OSError:
                    pass
    t = threading.Thread(target=foreign)
    t.start()
    try:
        with pytest.raises(RuntimeError, match="redis-server exited"):
            server = RedisServer(tmp_path / "redis", port=listener.getsockname()[1])
            server.stop()
    finally:
        stop.set()
        t.join(5)
        listener.close()
