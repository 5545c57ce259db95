"""The embedded relay table (engine/relay/embedded.py): grants, expiry with an
injected clock, restart, other processes, self-cleaning, failure counters;
and the open-smtp format (engine/relay/opensmtp.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import pytest

from engine.config.settings import RelaySettings, Settings, SettingsError, load_settings
from engine.relay import RelayStoreError, normalize_ip, open_relay_table
from engine.relay.embedded import EmbeddedRelayTable
from engine.relay.opensmtp import RULE, format_open_smtp, parse_open_smtp
from engine.relay.writer import boot_id
from tests.conftest import run_cli

T0 = 1_800_000_000.0


class Clock:
    """Unix time that moves only when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(tmp_path: Path, clock: Clock):
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    yield t
    run(t.close())


def test_default_store_is_embedded_under_root(tmp_path: Path, table) -> None:
    assert isinstance(table, EmbeddedRelayTable)
    assert not (tmp_path / "relay").exists()        # opened lazily
    run(table.grant("192.0.2.1"))
    assert (tmp_path / "relay" / "data.mdb").exists()


def test_the_lock_file_has_its_disk_blocks_before_lmdb_maps_it(tmp_path: Path, table) -> None:
    # engine.lmdbfile.reserve_lock_file: a hole written through a map on a
    # full disk is SIGBUS in every receiver.
    run(table.grant("192.0.2.1"))
    st = (tmp_path / "relay" / "lock.mdb").stat()
    assert st.st_size > 0 and st.st_blocks * 512 >= st.st_size


def test_grant_allows_until_expiry(table, clock: Clock) -> None:
    until = run(table.grant("192.0.2.1", ttl=30))
    assert until == T0 + 30
    assert run(table.allows("192.0.2.1"))
    assert table.allows_nowait("192.0.2.1") is True
    assert not run(table.allows("192.0.2.2"))
    clock.now = T0 + 29.9
    assert run(table.allows("192.0.2.1"))
    clock.now = T0 + 30          # expired entries are never honoured
    assert not run(table.allows("192.0.2.1"))
    assert run(table.entries()) == []


def test_default_ttl_is_pop_before_smtp_ttl(table) -> None:
    assert run(table.grant("192.0.2.1")) == T0 + 10800
    assert RelaySettings().pop_before_smtp_ttl == 10800


def test_grant_again_replaces_expiry(table, clock: Clock) -> None:
    run(table.grant("192.0.2.1", ttl=10))
    run(table.grant("192.0.2.1", ttl=100))
    clock.now = T0 + 50
    assert run(table.allows("192.0.2.1"))
    run(table.grant("192.0.2.1", ttl=5))      # shorter: the newest grant wins
    clock.now = T0 + 56
    assert not run(table.allows("192.0.2.1"))


def test_revoke(table) -> None:
    run(table.grant("192.0.2.1", ttl=10))
    assert run(table.revoke("192.0.2.1")) is True
    assert not run(table.allows("192.0.2.1"))
    assert run(table.revoke("192.0.2.1")) is False


def test_addresses_have_one_spelling(table) -> None:
    run(table.grant("::ffff:192.0.2.7", ttl=10))
    assert run(table.allows("192.0.2.7"))
    run(table.grant("2001:DB8:0::1", ttl=10))
    assert run(table.allows("2001:db8::1"))
    assert normalize_ip(" 2001:0db8::0001 ") == "2001:db8::1"
    with pytest.raises(ValueError):
        run(table.grant("not-an-ip"))
    assert run(table.allows("not-an-ip")) is False     # never raises
    with pytest.raises(ValueError):
        run(table.grant("192.0.2.1", ttl=0))
    with pytest.raises(ValueError):
        run(table.grant("192.0.2.1", ttl=1e300))
    with pytest.raises(ValueError):
        run(table.grant_many([("192.0.2.1", 1e300)]))


def test_entries_sorted_unexpired_only(table, clock: Clock) -> None:
    run(table.grant("10.0.0.2", ttl=20))
    run(table.grant("9.0.0.1", ttl=5))
    run(table.grant("2001:db8::1", ttl=20))
    run(table.grant("10.0.0.10", ttl=20))
    assert [ip for ip, _ in run(table.entries())] == ["9.0.0.1", "10.0.0.2", "10.0.0.10", "2001:db8::1"]
    clock.now = T0 + 6
    assert run(table.entries()) == [("10.0.0.2", T0 + 20), ("10.0.0.10", T0 + 20),
                                    ("2001:db8::1", T0 + 20)]


def test_expired_entries_are_removed_by_later_writes(tmp_path: Path, clock: Clock) -> None:
    settings = dataclasses.replace(Settings(), relay=RelaySettings(sweep_batch=3))
    t = open_relay_table(tmp_path, settings, clock=clock)
    try:
        for i in range(7):
            run(t.grant(f"192.0.2.{i}", ttl=10))
        run(t.grant("198.51.100.1", ttl=1000))
        clock.now = T0 + 11

        def stored() -> int:
            with t._open().begin() as txn:
                return txn.stat(t._grants[b"4"])["entries"]

        assert stored() == 8
        run(t.grant("198.51.100.2", ttl=1000))      # each write removes at most 3
        assert stored() == 9 - 3
        run(t.sweep())
        run(t.sweep())
        assert stored() == 2
        with t._open().begin() as txn:    # the expiry index too
            assert txn.stat(t._expiry)["entries"] == 2
    finally:
        run(t.close())


def test_entries_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    run(t.grant("192.0.2.1", ttl=60))
    run(t.close())
    again = open_relay_table(tmp_path, Settings(), clock=clock)
    try:
        assert run(again.allows("192.0.2.1"))
        assert run(again.entries()) == [("192.0.2.1", T0 + 60)]
    finally:
        run(again.close())


def test_writes_are_synced_soon_not_on_the_grant(tmp_path: Path) -> None:
    """A grant commits without fsync; the sync thread syncs within
    sync_seconds and only then drops the `unsynced` mark (engine/relay/writer.py)."""
    settings = dataclasses.replace(Settings(), relay=RelaySettings(sync_seconds=0.5))
    marker = tmp_path / "relay" / "unsynced"

    async def scenario() -> None:
        t = open_relay_table(tmp_path, settings)
        await t.grant("192.0.2.1", ttl=60)
        assert t._writer.last_sync == 0 and marker.exists()     # not synced by the grant
        deadline = time.monotonic() + 10
        while marker.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert t._writer.last_sync > 0 and not marker.exists()
        await t.close()

    run(scenario())


def test_a_slow_sync_never_holds_up_grants(tmp_path: Path) -> None:
    """The sync runs in a thread of its own: while it is stuck on the disk,
    grants still commit; the mark stays until a sync saw no commit."""
    settings = dataclasses.replace(Settings(), relay=RelaySettings(sync_seconds=0.05))
    marker = tmp_path / "relay" / "unsynced"
    syncing, release = threading.Event(), threading.Event()

    async def scenario() -> None:
        t = open_relay_table(tmp_path, settings)
        writer = t._writer
        real_sync = writer._sync

        def stuck_sync() -> None:
            syncing.set()
            release.wait(30)
            real_sync()
        writer._sync = stuck_sync
        try:
            await t.grant("192.0.2.1", ttl=60)
            assert await asyncio.to_thread(syncing.wait, 10)
            await asyncio.wait_for(t.grant("192.0.2.2", ttl=60), 10)   # while the sync is stuck
            assert await t.allows("192.0.2.2") and writer.last_sync == 0 and marker.exists()
        finally:
            release.set()
        writer._sync = real_sync
        await t.close()                                 # syncs what came since
        assert writer.last_sync > 0 and not marker.exists()

    run(scenario())


def test_a_table_perhaps_torn_by_a_machine_crash_is_set_aside(tmp_path: Path, clock: Clock) -> None:
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    run(t.grant("192.0.2.1", ttl=60))
    run(t.close())
    marker = tmp_path / "relay" / "unsynced"
    assert not marker.exists()                    # closed: synced
    marker.write_text(boot_id() + "\n")           # a process of this boot was writing
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    assert run(t.allows("192.0.2.1"))
    run(t.close())
    marker.write_text("an-earlier-boot\n")         # the machine stopped before a sync
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    try:
        assert not run(t.allows("192.0.2.1")) and run(t.entries()) == []
        assert [p.name.startswith("relay.unsynced-") for p in tmp_path.iterdir()].count(True) == 1
        run(t.grant("192.0.2.2", ttl=60))
        assert run(t.allows("192.0.2.2"))
    finally:
        run(t.close())


def _blocked(t) -> threading.Event:
    """Hold the writer thread inside a transaction until the event is set."""
    inside, release = threading.Event(), threading.Event()

    def block(txn, now, changed) -> None:
        inside.set()
        release.wait(30)

    t._writer.submit(block)
    assert inside.wait(30)
    return release


def test_writes_that_arrive_together_share_one_transaction(table) -> None:
    async def scenario() -> None:
        release = _blocked(table)
        ips = [f"192.0.2.{i}" for i in range(50)]
        grants = asyncio.gather(*(table.grant(ip, ttl=60) for ip in ips),
                                table.count_failure("198.51.100.1", 60))
        await asyncio.sleep(0)
        before = table._writer.batches
        release.set()
        assert await grants == [T0 + 60] * 50 + [1]
        assert table._writer.batches == before + 2          # the blocker's, then one
        assert all(table.allows_nowait(ip) for ip in ips)

    run(scenario())


def test_a_failing_write_fails_alone_in_its_batch(table) -> None:
    def broken(txn, now, changed):
        txn.put(b"\x01\x02\x03\x04", b"x" * 8, db=table._grants[b"4"])
        raise RuntimeError("a bug")

    async def scenario() -> None:
        release = _blocked(table)
        bad = asyncio.wrap_future(table._writer.submit(broken))
        good = asyncio.ensure_future(table.grant("192.0.2.1", ttl=60))
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(RuntimeError, match="a bug"):
            await bad
        assert await good == T0 + 60
        assert not table.allows_nowait("4.3.2.1")      # its put was undone
        assert table.allows_nowait("192.0.2.1")

    run(scenario())


def test_a_login_with_nothing_to_forget_writes_nothing(table) -> None:
    run(table.grant("192.0.2.1", ttl=60))
    before = table._writer.batches
    run(table.clear_failures("192.0.2.1"))
    assert table._writer.batches == before
    run(table.count_failure("192.0.2.1", 60))
    run(table.clear_failures("192.0.2.1"))
    assert table._writer.batches == before + 2
    assert run(table.count_failure("192.0.2.1", 60)) == 1


def _hold_writer_mutex(root: Path, conn) -> None:
    t = open_relay_table(root, Settings())
    env = t._open()
    conn.send("opened")
    conn.recv()
    txn = env.begin(write=True)
    conn.send("held")
    conn.recv()
    txn.abort()
    t.close_now()


def test_the_event_loop_never_waits_for_the_writer_mutex(tmp_path: Path, table) -> None:
    """Another process holds LMDB's writer mutex: a grant waits for it, the
    event loop does not (it keeps running callbacks and checks)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")     # before this process opens the table
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_hold_writer_mutex, args=(tmp_path, child))
    proc.start()
    try:
        assert parent.poll(30) and parent.recv() == "opened"
        table._open()
        parent.send("hold")
        assert parent.poll(30) and parent.recv() == "held"

        async def scenario() -> None:
            grant = asyncio.ensure_future(table.grant("192.0.2.1", ttl=60))
            for _ in range(20):                   # the loop turns while the grant waits
                await asyncio.sleep(0.005)
                assert not table.allows_nowait("192.0.2.1")
            assert not grant.done()
            parent.send("release")
            assert await grant == T0 + 60
            assert table.allows_nowait("192.0.2.1")

        run(scenario())
    finally:
        parent.send("release")
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def test_a_writer_mutex_never_let_go_bounds_every_login_write(tmp_path: Path, clock: Clock,
                                                             caplog) -> None:
    """Another process holds LMDB's writer mutex and does not let go (stopped,
    stuck on a dying disk): a login's writes give up after [relay]
    write_timeout as with Redis down (not counted, no grant), later ones at
    once, one line for the whole of it; then they go through again. (They
    waited for ever: every POP3 login and SMTP AUTH of the box hung.)"""
    import logging
    import multiprocessing
    ctx = multiprocessing.get_context("fork")     # before this process opens the table
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_hold_writer_mutex, args=(tmp_path, child))
    proc.start()
    settings = dataclasses.replace(Settings(), relay=RelaySettings(write_timeout=0.2))
    table = open_relay_table(tmp_path, settings, clock=clock)
    try:
        assert parent.poll(30) and parent.recv() == "opened"
        table._open()
        parent.send("hold")
        assert parent.poll(30) and parent.recv() == "held"

        async def scenario() -> None:
            started = time.monotonic()
            assert await table.count_failure("192.0.2.1", 60) is None
            assert time.monotonic() - started >= 0.2
            started = time.monotonic()
            with pytest.raises(RelayStoreError, match="writer lock"):
                await table.grant("192.0.2.1", ttl=60)
            assert await table.lock_out("192.0.2.1", 60) is None
            assert time.monotonic() - started < 0.2          # known stuck: at once
            parent.send("release")

            async def written() -> bool:
                try:
                    await table.grant("192.0.2.1", ttl=60)
                except RelayStoreError:
                    await asyncio.sleep(0.05)
                    return False
                return True
            deadline = time.monotonic() + 30
            while not await written():
                assert time.monotonic() < deadline, "writes never went through again"
            assert table.allows_nowait("192.0.2.1")

        with caplog.at_level(logging.WARNING, logger="qrelay.relay"):
            run(scenario())
    finally:
        parent.send("release")
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        run(table.close())
    assert proc.exitcode == 0
    stuck = [r.getMessage() for r in caplog.records if "no write done within 0.2s" in r.getMessage()]
    assert len(stuck) == 1, stuck
    assert any("writes go through again" in r.getMessage() for r in caplog.records)


def test_a_first_open_never_freezes_the_process_behind_the_writer_mutex(
        tmp_path: Path, clock: Clock) -> None:
    """Opening the table takes LMDB's writer mutex (its databases are opened
    in a write transaction): while another process holds it and does not let
    go, a receiver's first check or login froze the whole process (open_db
    waited holding the GIL, on the event loop). Now the open runs in a thread
    that lets the loop turn; a check or a login's lookup answers no within
    [relay] write_timeout, and the table is used once the mutex is free."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_hold_writer_mutex, args=(tmp_path, child))
    proc.start()
    settings = dataclasses.replace(Settings(), relay=RelaySettings(write_timeout=0.2))
    opener = open_relay_table(tmp_path, Settings(), clock=clock)
    opener.close_now()      # the databases exist, as in any table used before
    table = open_relay_table(tmp_path, settings, clock=clock)
    ticks: list[float] = []
    try:
        assert parent.poll(30) and parent.recv() == "opened"
        parent.send("hold")
        assert parent.poll(30) and parent.recv() == "held"

        async def ticking() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        async def scenario() -> None:
            clock_task = asyncio.ensure_future(ticking())
            await asyncio.sleep(0)
            started = time.monotonic()
            assert table.allows_nowait("192.0.2.1") is None      # not open: awaited
            assert await table.allows("192.0.2.1") is False
            assert time.monotonic() - started < 5
            started = time.monotonic()
            assert await table.locked_until("192.0.2.1") == 0
            assert await table.allows("192.0.2.1") is False
            assert time.monotonic() - started < 0.2              # known late: at once
            assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.15
            parent.send("release")
            deadline = time.monotonic() + 30
            while table.allows_nowait("192.0.2.1") is None:
                assert time.monotonic() < deadline, "never opened"
                await asyncio.sleep(0.02)
            await table.grant("192.0.2.1", ttl=60)
            assert await table.allows("192.0.2.1")
            clock_task.cancel()

        run(asyncio.wait_for(scenario(), 60))
    finally:
        parent.send("release")
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        run(table.close())
    assert proc.exitcode == 0


def test_another_process_sees_a_grant_at_once(tmp_path: Path, table) -> None:
    """The table is open here (as in a receiver); a grant by another process
    (the CLI) is seen by the next check without reopening, and back."""
    from engine.home import init_home
    root = init_home(tmp_path / "q", me="mx.example.com")
    here = open_relay_table(root, Settings())
    try:
        assert not run(here.allows("192.0.2.9"))
        done = run_cli("relayclients", "add", str(root), "192.0.2.9", "--ttl", "300")
        assert done.returncode == 0, done.stderr
        assert run(here.allows("192.0.2.9"))
        run(here.grant("192.0.2.10", ttl=300))
        listed = run_cli("relayclients", str(root))
        assert "192.0.2.10\tuntil" in listed.stdout and "192.0.2.9\tuntil" in listed.stdout
        assert run_cli("relayclients", "del", str(root), "192.0.2.9").returncode == 0
        assert not run(here.allows("192.0.2.9"))
    finally:
        run(here.close())


def test_a_corrupt_table_is_set_aside(tmp_path: Path, clock: Clock) -> None:
    relay = tmp_path / "relay"
    relay.mkdir()
    (relay / "data.mdb").write_bytes(b"this is not an LMDB file" * 400)
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    try:
        assert not run(t.allows("192.0.2.1"))
        run(t.grant("192.0.2.1", ttl=5))
        assert run(t.allows("192.0.2.1"))
        assert [p.name.startswith("relay.broken-") for p in tmp_path.iterdir()].count(True) == 1
    finally:
        run(t.close())


def test_a_truncated_table_is_set_aside_not_read_past_its_end(tmp_path: Path) -> None:
    """A data.mdb cut short (a restore stopped half way): LMDB opens it, and a
    read of a page past its end is SIGBUS, in every receiver and at each
    restart. It is set aside like a corrupt one. In a subprocess (SIGBUS)."""
    import subprocess
    import sys
    code = f"""
import asyncio, os, sys
from engine.config.settings import Settings
from engine.relay import open_relay_table
root = {str(tmp_path)!r}
async def fill():
    t = open_relay_table(root, Settings())
    for i in range(3000):
        await t.grant(f"10.0.{{i // 250}}.{{i % 250}}", ttl=600)
    await t.close()
if sys.argv[1] == "fill":
    asyncio.run(fill())
    os.truncate(os.path.join(root, "relay", "data.mdb"), 8192)
else:
    async def check():
        t = open_relay_table(root, Settings())
        print(await t.allows("10.0.11.249"))
        await t.close()
    asyncio.run(check())
"""
    repo = Path(__file__).resolve().parent.parent
    for step in ("fill", "check"):
        done = subprocess.run([sys.executable, "-c", code, step], capture_output=True,
                              text=True, cwd=repo, timeout=60)
        assert done.returncode == 0, (step, done.returncode, done.stderr)
    assert done.stdout == "False\n"            # the grants went with the cut file
    assert [p.name.startswith("relay.broken-") for p in tmp_path.iterdir()].count(True) == 1


def test_unwritable_store_fails_closed(tmp_path: Path, clock: Clock) -> None:
    (tmp_path / "relay").write_text("a file where the directory should be")
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    assert t.allows_nowait("192.0.2.1") is None          # not open: awaited
    assert run(t.allows("192.0.2.1")) is False
    with pytest.raises(RelayStoreError):
        run(t.grant("192.0.2.1"))
    assert run(t.count_failure("192.0.2.1", 60)) is None
    assert run(t.locked_until("192.0.2.1")) == 0
    run(t.close())


def test_failure_counters(table, clock: Clock) -> None:
    assert [run(table.count_failure("192.0.2.1", 60)) for _ in range(3)] == [1, 2, 3]
    assert run(table.count_failure("192.0.2.2", 60)) == 1
    clock.now = T0 + 61                       # the window (from the first failure) ended
    assert run(table.count_failure("192.0.2.1", 60)) == 1
    until = run(table.lock_out("192.0.2.1", 100))
    assert until == T0 + 161 and run(table.locked_until("192.0.2.1")) == until
    run(table.clear_failures("192.0.2.1"))     # a lockout in force stays
    assert run(table.locked_until("192.0.2.1")) == until
    assert run(table.count_failure("192.0.2.1", 60)) == 1   # the count restarted
    clock.now = until
    assert run(table.locked_until("192.0.2.1")) == 0
    run(table.clear_failures("192.0.2.2"))
    assert run(table.count_failure("192.0.2.2", 60)) == 1


def test_relay_settings_are_checked(tmp_path: Path) -> None:
    (tmp_path / "qrelay.toml").write_text('[relay]\nstore = "memcached://x"\n')
    with pytest.raises(SettingsError, match=r"\[relay\] store"):
        load_settings(tmp_path)
    (tmp_path / "qrelay.toml").write_text('[relay]\ntimeout = 60\n')
    with pytest.raises(SettingsError, match="out of range"):
        load_settings(tmp_path)
    (tmp_path / "qrelay.toml").write_text('[relay]\npop_before_smtp_ttl = 100000000000000000\n')
    with pytest.raises(SettingsError, match="out of range"):
        load_settings(tmp_path)
    (tmp_path / "qrelay.toml").write_text('[login]\nmax_failures = 0\n')
    with pytest.raises(SettingsError, match="out of range"):
        load_settings(tmp_path)
    (tmp_path / "qrelay.toml").write_text(
        '[relay]\nstore = "redis://127.0.0.1:6379/2"\npop_before_smtp_ttl = 60\n'
        '[login]\nlockout_seconds = 60\n')
    s = load_settings(tmp_path)
    assert s.relay.store == "redis://127.0.0.1:6379/2" and s.relay.pop_before_smtp_ttl == 60
    assert s.login.lockout_seconds == 60



@pytest.mark.parametrize("store", ["redis://:pw@h:abc/0", "redis://127.0.0.1:abc/0",
                                   "redis://127.0.0.1:6379/1x", "redis://127.0.0.1/0?db=abc",
                                   "unix://", "unix://?db=1"])
def test_a_malformed_redis_address_is_refused_at_load(tmp_path: Path, store: str) -> None:
    """Not at the receivers' first check (a traceback and a restart loop for
    a bad port with a password; "unreachable" for ever, or db 0 for /1x)."""
    (tmp_path / "qrelay.toml").write_text(f'[relay]\nstore = "{store}"\n')
    with pytest.raises(SettingsError, match=r"\[relay\] store") as raised:
        load_settings(tmp_path)
    assert "\n" not in str(raised.value) and ":pw@" not in str(raised.value)
    for good in ("redis://127.0.0.1:6379", "redis://:pw@[::1]:6379/15", "rediss://h/2?password=x",
                 "unix:///run/redis/redis.sock?db=3"):
        (tmp_path / "qrelay.toml").write_text(f'[relay]\nstore = "{good}"\n')
        assert load_settings(tmp_path).relay.store == good

# --- open-smtp -----------------------------------------------------------------------

def test_parse_open_smtp() -> None:
    text = (f"192.0.2.1:{RULE}\t1700000000\n"
            "\n# a comment\n"
            "192.0.2.2:allow,RELAYCLIENT=\"\" 1700000100\n"      # a space instead of TAB
            "2001:db8::1:allow,RELAYCLIENT=\"\"\t1700000200\n"
            f"192.0.2.3:{RULE}\n"                                  # no timestamp
            "192.0.2.4:deny\t1700000000\n"
            "192.0.2.300:allow\t1700000000\n"
            "garbage\t12\n")
    lines, bad = parse_open_smtp(text)
    assert [(ln.number, ln.ip, ln.login_time) for ln in lines] == [
        (1, "192.0.2.1", 1700000000.0), (4, "192.0.2.2", 1700000100.0),
        (5, "2001:db8::1", 1700000200.0)]
    assert [n for n, _ in bad] == [6, 7, 8, 9]
    assert "not an allow rule" in bad[1][1] and "not an IP address" in bad[2][1]


def test_format_open_smtp_round_trip() -> None:
    text = format_open_smtp([("192.0.2.1", 1700010800.0), ("2001:db8::1", 1700000060.5)], 10800)
    assert text == (f"192.0.2.1:{RULE}\t1700000000\n"
                    f"2001:db8::1:{RULE}\t1699989260\n")
    lines, bad = parse_open_smtp(text)
    assert not bad and [(ln.ip, ln.login_time) for ln in lines] == [
        ("192.0.2.1", 1700000000.0), ("2001:db8::1", 1699989260.0)]



def test_grant_many_in_batches(table, clock: Clock) -> None:
    from engine.relay.embedded import GRANT_BATCH
    ips = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(GRANT_BATCH + 5)]
    assert run(table.grant_many([(ip, 30.0) for ip in ips] + [("10.0.0.1", 90.0)])) == len(ips) + 1
    assert len(run(table.entries())) == len(ips)
    clock.now = T0 + 31
    assert [ip for ip, _ in run(table.entries())] == ["10.0.0.1"]     # the later grant won
    with pytest.raises(ValueError):
        run(table.grant_many([("10.9.9.9", 5.0), ("bad", 5.0)]))
    assert not run(table.allows("10.9.9.9"))      # nothing written


def _writer(root: Path, steps, conn) -> None:
    """Another process's table: run each step (a coroutine factory) when told."""
    clock = Clock()
    t = open_relay_table(root, Settings(), clock=clock)
    for step in steps:
        conn.recv()
        run(step(t, clock))
        conn.send("done")
    run(t.close())


def test_checks_follow_another_process_writes(tmp_path: Path, table, clock: Clock,
                                               monkeypatch) -> None:
    """This process's copy of the grants (engine/relay/mirror.py) follows the
    grants, revokes and sweeps of another process, and is rebuilt when that
    process wrote more than the change log keeps."""
    import multiprocessing

    import engine.relay.embedded as embedded

    monkeypatch.setattr(embedded, "CHANGE_LOG_TXNS", 3)    # the child inherits it (fork)

    async def grant(t, c):
        await t.grant("192.0.2.1", ttl=10)
        await t.grant("2001:db8::5", ttl=100)

    async def revoke_one_sweep_other(t, c):
        await t.revoke("2001:db8::5")
        c.now = T0 + 11           # the child's clock only: 192.0.2.1 expired there
        await t.sweep()

    async def many_writes(t, c):
        await t.grant("192.0.2.2", ttl=100)
        for i in range(6):        # past the log: the reader rebuilds
            await t.grant(f"198.51.100.{i}", ttl=100)
        await t.revoke("198.51.100.0")

    ctx = multiprocessing.get_context("fork")     # before this process opens the table
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_writer,
                       args=(tmp_path, [grant, revoke_one_sweep_other, many_writes], child))
    proc.start()
    try:
        assert not run(table.allows("192.0.2.1"))        # opened here

        def step() -> None:
            parent.send("go")
            assert parent.poll(30) and parent.recv() == "done"

        step()
        assert table.allows_nowait("192.0.2.1") and table.allows_nowait("2001:db8::5")
        step()
        # Still unexpired by this process's clock, but gone from the table.
        assert not table.allows_nowait("192.0.2.1") and not table.allows_nowait("2001:db8::5")
        mirrored = table._mirror.txnid
        step()
        assert table.allows_nowait("192.0.2.2") and table.allows_nowait("198.51.100.5")
        assert not table.allows_nowait("198.51.100.0")
        assert table._mirror.txnid > mirrored + 3 and table._mirror.count == 6
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def test_a_large_copy_is_built_in_a_thread(table, clock: Clock, monkeypatch) -> None:
    """Past INLINE_BUILD grants the process's copy is built in a thread; the
    checks meanwhile read the tree, and a grant made since is replayed."""
    import engine.relay.embedded as embedded
    monkeypatch.setattr(embedded, "INLINE_BUILD", 2)
    ips = [f"10.0.0.{i}" for i in range(1, 6)]
    run(table.grant_many([(ip, 60.0) for ip in ips]))
    assert table.allows_nowait("10.0.0.1") and not table.allows_nowait("10.0.0.9")
    table._builder.join(30)
    run(table.grant("10.0.0.9", ttl=60))
    run(table.revoke("10.0.0.2"))
    assert table.allows_nowait("10.0.0.9") and not table.allows_nowait("10.0.0.2")
    assert table._built is None and table._mirror.count == 5      # adopted, then replayed
    clock.now = T0 + 60
    assert not table.allows_nowait("10.0.0.1")


def test_a_large_catch_up_is_built_in_a_thread(table, clock: Clock, monkeypatch) -> None:
    """More changes since the copy than INLINE_BUILD (an import of 100,000
    grants by `qrelay relayclients import`) are not replayed by the check,
    which would stop the receiver's event loop for 0.2 s: a new copy is built
    in a thread, and the checks read the tree meanwhile."""
    import engine.relay.embedded as embedded
    monkeypatch.setattr(embedded, "INLINE_BUILD", 3)
    run(table.grant("10.0.0.1", ttl=60))
    assert table.allows_nowait("10.0.0.1") and table._builder is None
    run(table.grant("10.0.0.2", ttl=60))
    assert table.allows_nowait("10.0.0.2") and table._builder is None     # a few: replayed
    mirror = table._mirror
    replayed: list = []
    monkeypatch.setattr(mirror, "put", lambda *args: replayed.append(args))
    building = threading.Event()
    real_load = table._load

    def slow_load(into, txn) -> None:
        building.wait(30)
        real_load(into, txn)

    monkeypatch.setattr(table, "_load", slow_load)
    builds: list = []
    real_build = table._build_in_thread
    monkeypatch.setattr(table, "_build_in_thread", lambda: builds.append(1) or real_build())
    run(table.grant_many([(f"10.0.1.{i}", 60.0) for i in range(5)]))
    assert table.allows_nowait("10.0.1.4") and not table.allows_nowait("10.0.1.9")
    assert replayed == [] and builds == [1] and table._builder.is_alive()
    # While the copy is built, checks read the tree without walking the log again.
    run(table.grant("10.0.2.1", ttl=60))
    assert table.allows_nowait("10.0.2.1") and builds == [1]
    building.set()
    table._builder.join(30)
    assert table.allows_nowait("10.0.1.0") and table.allows_nowait("10.0.2.1")
    assert table._mirror is not mirror and table._mirror.count == 8


def test_a_table_set_aside_by_root_stays_the_run_users(tmp_path: Path, clock: Clock) -> None:
    import os
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    run(t.grant("192.0.2.1", ttl=60))
    run(t.close())
    relay = tmp_path / "relay"
    os.chown(relay, 65534, 65534)                 # as `qrelay run` leaves it (give_tree)
    (relay / "unsynced").write_text("an-earlier-boot\n")
    t = open_relay_table(tmp_path, Settings(), clock=clock)
    try:
        assert not run(t.allows("192.0.2.1"))     # set aside
        st = relay.stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    finally:
        run(t.close())


def test_parse_open_smtp_reports_a_non_ascii_digit_time_as_malformed() -> None:
    # str.isdigit() is true for '²' and '١', which int() refuses or reads:
    # a malformed line, never a traceback or a time nobody wrote.
    lines, bad = parse_open_smtp(f"192.0.2.1:{RULE}\t\u00b2\n192.0.2.2:{RULE}\t\u0661\u0662\n")
    assert lines == [] and [n for n, _ in bad] == [1, 2]
