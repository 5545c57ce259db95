"""Password guessing, slowed down and then shut out, per client IP.

    throttle = LoginThrottle(table, settings)
    if await throttle.locked(ip): ...          # 421 (SMTP) / -ERR (POP3), close
    delay = await throttle.failure(ip)         # wait `delay` before the reply;
                                               # math.inf = locked out now
    await throttle.success(ip)

The counts live in the relay table's store (engine.relay), so with Redis
every node sees every node's failures. A client is an IPv4 address or the
/64 of an IPv6 one: a host holds a whole /64 (SLAAC, privacy addresses)
and may use a new address for every guess. Rule (`[login]` settings): the n-th
failure in a window of `window` seconds (starting at the first) costs
min(n x failure_delay, max_delay) seconds; the max_failures-th locks the IP
out for lockout_seconds, after which it starts again from zero. A success
forgets the failures (not a lockout in force).

When the store fails (Redis down), nothing is counted: each failure then
costs max_delay, and no lockout is known — the throttle degrades to a fixed
delay, never to refusing everyone. The caller does the waiting (asyncio.sleep),
so a delayed client holds no lock and no thread.
"""
from __future__ import annotations

import math
from socket import AF_INET6, inet_ntop
from typing import TYPE_CHECKING

from engine.relay import packed_ip

if TYPE_CHECKING:
    from engine.config.settings import Settings
    from engine.relay import RelayTable


def client_key(ip: str) -> str:
    """The address whose failures `ip`'s count with: itself for IPv4, its /64
    for IPv6 (the network a host picks its addresses from). Not an address:
    `ip` as given (the store then counts nothing, as for any bad address)."""
    try:
        packed = packed_ip(ip)
    except ValueError:
        return ip
    return ip if len(packed) == 4 else inet_ntop(AF_INET6, packed[:8] + bytes(8))


class LoginThrottle:
    """The failure rule above over a RelayTable's counters."""

    def __init__(self, table: "RelayTable", settings: "Settings") -> None:
        self.table = table
        self.settings = settings.login

    async def locked(self, ip: str) -> bool:
        """True while `ip` is locked out (never raises)."""
        return await self.table.locked_until(client_key(ip)) > 0

    async def failure(self, ip: str) -> float:
        """Record a failed login; seconds to wait before replying, math.inf
        when this failure locked the IP out."""
        s = self.settings
        ip = client_key(ip)
        if await self.locked(ip):     # locked out meanwhile (another session, node)
            return math.inf
        count = await self.table.count_failure(ip, s.window)
        if count is None:
            return s.max_delay
        if count >= s.max_failures:
            await self.table.lock_out(ip, s.lockout_seconds)
            return math.inf
        return min(count * s.failure_delay, s.max_delay)

    async def success(self, ip: str) -> None:
        await self.table.clear_failures(client_key(ip))
