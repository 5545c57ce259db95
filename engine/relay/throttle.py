"""Password guessing, slowed down and then shut out, per client IP.

    throttle = LoginThrottle(table, settings)
    n = await throttle.attempt(ip)             # before the password is checked
    if n is None: ...                          # 421 (SMTP) / -ERR (POP3), close
    delay = await throttle.failed(ip, n)       # a wrong one: wait `delay` before
                                               # the reply; math.inf = locked out now
    await throttle.success(ip)                 # a right one

The counts live in the relay table's store (engine.relay), so with Redis
every node sees every node's failures. A client is an IPv4 address or the
/64 of an IPv6 one: a host holds a whole /64 (SLAAC, privacy addresses)
and may use a new address for every guess. Rule (`[login]` settings): the n-th
failure in a window of `window` seconds (starting at the first) costs
min(n x failure_delay, max_delay) seconds; the max_failures-th locks the IP
out for lockout_seconds, after which it starts again from zero. A success
forgets the failures (not a lockout in force). Each attempt is counted
before its password is checked, as a failure until it proves right: logins
sent at once over many connections are counted at once, so however many
come in parallel no more than max_failures passwords are checked per
lockout (counted after the check, twenty at once were all checked).

When the store fails (Redis down), nothing is counted: each failure then
costs max_delay, and no lockout is known — the throttle degrades to a fixed
delay, never to refusing everyone. The caller does the waiting (asyncio.sleep),
so a delayed client holds no lock and no thread.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from engine.relay import ip_text, packed_ip

if TYPE_CHECKING:
    from engine.config.settings import Settings
    from engine.relay import RelayTable


def client_key(ip: str) -> str:
    """The address whose failures `ip`'s count with: itself for IPv4 (mapped
    or not), its /64 for IPv6 (the network a host picks its addresses from).
    Not an address: `ip` as given (the store then counts nothing, as for any
    bad address)."""
    try:
        packed = packed_ip(ip)
    except ValueError:
        return ip
    # ::ffff:192.0.2.7 is 192.0.2.7 (packed_ip), an IPv6 address its /64
    return ip_text(packed if len(packed) == 4 else packed[:8] + bytes(8))


class LoginThrottle:
    """The failure rule above over a RelayTable's counters."""

    def __init__(self, table: "RelayTable", settings: "Settings") -> None:
        self.table = table
        self.settings = settings.login

    async def locked(self, ip: str) -> bool:
        """True while `ip` is locked out (never raises)."""
        return await self.table.locked_until(client_key(ip)) > 0

    async def attempt(self, ip: str) -> int | None:
        """Count a login attempt before its password is checked. Returns its
        number in the window (0: the store is unreachable, nothing counted),
        or None when the client is locked out, or this attempt is past the
        max_failures-th while the others are still being checked: refuse it
        unchecked."""
        if await self.locked(ip):
            return None
        count = await self.table.count_failure(client_key(ip), self.settings.window)
        if count is None:
            return 0
        return None if count > self.settings.max_failures else count

    async def failed(self, ip: str, count: int) -> float:
        """Attempt number `count` (attempt()) had a wrong password: seconds
        to wait before replying, math.inf when it locked the client out."""
        s = self.settings
        if count == 0:
            return s.max_delay
        if count >= s.max_failures:
            await self.table.lock_out(client_key(ip), s.lockout_seconds)
            return math.inf
        return min(count * s.failure_delay, s.max_delay)

    async def success(self, ip: str) -> None:
        await self.table.clear_failures(client_key(ip))
