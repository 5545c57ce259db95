"""LoginThrottle (engine/relay/throttle.py): delays, lockout, its end, and a
store that fails (over the embedded table, with an injected clock)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from engine.config.settings import LoginSettings, Settings
from engine.relay import open_relay_table
from engine.relay.throttle import LoginThrottle
from tests.test_relay import T0, Clock, clock, run  # noqa: F401  (clock: a fixture)

IP = "192.0.2.5"
LOGIN = LoginSettings(failure_delay=1.5, max_delay=4.0, max_failures=5, window=60,
                      lockout_seconds=300)


async def failure(throttle: LoginThrottle, ip: str) -> float:
    """One wrong password as a session has it: the attempt, then its failure."""
    count = await throttle.attempt(ip)
    return math.inf if count is None else await throttle.failed(ip, count)


@pytest.fixture
def throttle(tmp_path: Path, clock: Clock):
    settings = dataclasses.replace(Settings(), login=LOGIN)
    table = open_relay_table(tmp_path, settings, clock=clock)
    yield LoginThrottle(table, settings)
    run(table.close())


def test_each_failure_costs_more_up_to_max_delay(throttle) -> None:
    assert [run(failure(throttle, IP)) for _ in range(4)] == [1.5, 3.0, 4.0, 4.0]
    assert not run(throttle.locked(IP))
    assert run(failure(throttle, "192.0.2.6")) == 1.5      # per IP


def test_max_failures_locks_out_until_lockout_ends(throttle, clock: Clock) -> None:
    for _ in range(LOGIN.max_failures - 1):
        assert math.isfinite(run(failure(throttle, IP)))
    assert run(failure(throttle, IP)) == math.inf
    assert run(throttle.locked(IP))
    assert run(failure(throttle, IP)) == math.inf           # still locked: nothing more to count
    clock.now = T0 + LOGIN.lockout_seconds - 1
    assert run(throttle.locked(IP))
    clock.now = T0 + LOGIN.lockout_seconds
    assert not run(throttle.locked(IP))
    assert run(failure(throttle, IP)) == 1.5               # starts again from zero


def test_failures_outside_the_window_are_forgotten(throttle, clock: Clock) -> None:
    for _ in range(LOGIN.max_failures - 1):
        run(failure(throttle, IP))
    clock.now = T0 + LOGIN.window
    assert run(failure(throttle, IP)) == 1.5
    assert not run(throttle.locked(IP))


def test_success_forgets_the_failures(throttle) -> None:
    for _ in range(3):
        run(failure(throttle, IP))
    run(throttle.success(IP))
    assert run(failure(throttle, IP)) == 1.5


def test_failing_store_gives_a_fixed_delay(tmp_path: Path) -> None:
    (tmp_path / "relay").write_text("not a directory")
    settings = dataclasses.replace(Settings(), login=LOGIN)
    table = open_relay_table(tmp_path, settings)
    throttle = LoginThrottle(table, settings)
    assert run(failure(throttle, IP)) == LOGIN.max_delay
    assert not run(throttle.locked(IP))
    run(throttle.success(IP))     # never raises
    run(table.close())


def test_an_ipv6_host_cannot_dodge_the_lockout_by_changing_address(throttle) -> None:
    # A host holds a whole /64 (SLAAC, privacy addresses) and picks any address
    # in it: its failures count together, whichever address each came from.
    for n in range(1, LOGIN.max_failures):
        assert math.isfinite(run(failure(throttle, f"2001:db8:1:2::{n:x}")))
    assert run(failure(throttle, "2001:db8:1:2:ffff:ffff:ffff:ffff")) == math.inf
    assert run(throttle.locked("2001:db8:1:2::abcd"))
    assert run(throttle.locked("2001:DB8:1:2:0:0:0:1"))
    assert not run(throttle.locked("2001:db8:1:3::1"))     # the next /64: another host
    assert run(failure(throttle, "2001:db8:1:3::1")) == 1.5



def test_attempts_made_at_once_are_counted_before_their_checks(throttle) -> None:
    # Twenty logins at once over twenty connections: only max_failures of them
    # get their password checked; the others are refused unchecked.
    import asyncio

    async def burst():
        return await asyncio.gather(*(throttle.attempt(IP) for _ in range(20)))
    numbers = run(burst())
    assert sorted(n for n in numbers if n is not None) == [1, 2, 3, 4, 5]
    assert numbers.count(None) == 15
    assert run(throttle.failed(IP, 5)) == math.inf and run(throttle.locked(IP))
    assert run(throttle.attempt(IP)) is None
