"""POP-before-SMTP: the client IPs allowed to relay for a while, and the
login-failure counters, in one store every receiver process shares.

vpopmail wrote each POP3 login into `open-smtp`, rebuilt `tcp.smtp.cdb` under
one lock file, and left removal to a cron job (`clearopensmtp`). Here a login
is one `grant(ip)` with an expiry; a check is one key lookup; an expired entry
is never honoured and is removed by later writes (embedded) or by Redis's own
key expiry. Two stores, one API:

    table = open_relay_table(root, settings)   # sync; opens lazily
    await table.grant(ip, ttl=None)            # -> expiry (unix time)
    await table.allows(ip)                     # never raises; False on failure
    await table.revoke(ip); await table.entries(); await table.close()

- `[relay] store = ""` (the default): an LMDB environment in ROOT/relay/
  (engine/relay/embedded.py), shared by every process of the box, the
  `qrelay relayclients` commands included. Readers never wait for anyone.
- `[relay] store = "redis://HOST:PORT/DB"`: keys in Redis
  (engine/relay/shared.py), shared by every node using it. Unreachable, the
  table answers "not allowed" at once (fail closed) and retries by itself.

The failure counters of engine/relay/throttle.py (LoginThrottle) are kept in
the same store through `count_failure`, `lock_out`, `locked_until` and
`clear_failures`, which never raise either.

This package never decides what a relay client may do (the SMTP session does)
and never blocks an event loop longer than `[relay] timeout`.
"""
from __future__ import annotations

import ipaddress
import time
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config.settings import Settings

__all__ = ["RelayStoreError", "RelayTable", "address_order", "normalize_ip", "open_relay_table",
           "packed_ip"]

# Directory of the embedded table under ROOT.
RELAY_DIR = "relay"
# Longest grant, in seconds (a century): its expiry in ms fits Redis's PX and
# the embedded table's 8-byte expiry keys.
MAX_TTL = 100 * 365 * 86400


class RelayStoreError(Exception):
    """The store cannot be written or read (grant, revoke, entries); one line."""


def packed_ip(ip: str) -> bytes:
    """An address's bytes: 4 for IPv4 (an IPv4-mapped IPv6 address too), 16
    for IPv6. ValueError if it is none. (socket's parsers: a tenth of
    ipaddress's cost, and this runs for every SMTP connection.)"""
    try:
        if ":" not in ip:
            return inet_pton(AF_INET, ip.strip())
        packed = inet_pton(AF_INET6, ip.strip())
    except (OSError, TypeError):
        raise ValueError(f"{ip!r} is not an IP address") from None
    return packed[12:] if packed[:12] == _V4_MAPPED else packed


def normalize_ip(ip: str) -> str:
    """The one spelling of an address used as a key: dotted quad, IPv6 as
    inet_ntop writes it (compressed), an IPv4-mapped IPv6 address as its IPv4
    form. ValueError if it is none."""
    return ip_text(packed_ip(ip))


def ip_text(packed: bytes) -> str:
    """packed_ip's bytes as normalize_ip spells them."""
    return inet_ntop(AF_INET if len(packed) == 4 else AF_INET6, packed)


_V4_MAPPED = bytes(10) + b"\xff\xff"


def address_order(entry: tuple[str, float]) -> tuple[int, int]:
    """Sort key of an (ip, expiry) entry: IPv4 before IPv6, numerically."""
    addr = ipaddress.ip_address(entry[0])
    return addr.version, int(addr)


class RelayTable:
    """The API both stores implement (see the module docstring)."""

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.default_ttl = ttl
        self.clock = clock

    def _ttl(self, ttl: float | None) -> float:
        ttl = self.default_ttl if ttl is None else ttl
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be above 0 and at most {MAX_TTL} seconds, not {ttl:g}")
        return ttl

    async def grant(self, ip: str, ttl: float | None = None) -> float:
        """Let `ip` relay for `ttl` seconds (default [relay] pop_before_smtp_ttl)
        from now, replacing any earlier expiry; returns the expiry (unix time).
        ValueError for a bad address, RelayStoreError if the store fails."""
        raise NotImplementedError

    async def grant_many(self, grants: list[tuple[str, float]]) -> int:
        """grant(ip, ttl) for each (ip, ttl), in a few writes or round trips
        (an import); how many. ValueError (before anything is written) for a
        bad address or ttl, RelayStoreError if the store fails."""
        raise NotImplementedError

    def allows_nowait(self, ip: str) -> bool | None:
        """The answer of `allows` when the store gives it without waiting
        (embedded, once open in this process), else None: the caller then awaits `allows`."""
        return None

    async def allows(self, ip: str) -> bool:
        """True if `ip` holds an unexpired grant. Never raises: False when the
        store is unreachable, after at most [relay] timeout seconds."""
        raise NotImplementedError

    async def revoke(self, ip: str) -> bool:
        """Remove `ip`'s grant; True if there was an unexpired one."""
        raise NotImplementedError

    async def entries(self) -> list[tuple[str, float]]:
        """Every unexpired grant as (ip, expiry), sorted by address."""
        raise NotImplementedError

    # --- the login-failure counters (engine.relay.throttle) ----------------------------

    async def count_failure(self, ip: str, window: float) -> int | None:
        """Add a failure for `ip`; the failures in its current window (the
        window starts at the first one). None if the store failed."""
        raise NotImplementedError

    async def lock_out(self, ip: str, seconds: float) -> float | None:
        """Lock `ip` out until now + seconds (its failure count restarts);
        the end (unix time), or None if the store failed."""
        raise NotImplementedError

    async def locked_until(self, ip: str) -> float:
        """End of `ip`'s lockout (unix time), 0 if none or the store failed."""
        raise NotImplementedError

    async def clear_failures(self, ip: str) -> None:
        """Forget `ip`'s failures (not a lockout in force). Never raises."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def open_relay_table(root: Path | str, settings: "Settings", *,
                     clock: Callable[[], float] = time.time) -> RelayTable:
    """The table `settings.relay.store` names (nothing is opened or connected
    until first use, so this may be called before a fork). `clock` gives unix
    time (tests inject one)."""
    relay = settings.relay
    if relay.store:
        from engine.relay.shared import RedisRelayTable
        return RedisRelayTable(relay, clock)
    from engine.relay.embedded import EmbeddedRelayTable
    return EmbeddedRelayTable(Path(root) / RELAY_DIR, relay, clock)
