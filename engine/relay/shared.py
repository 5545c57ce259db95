"""The relay table in Redis (`[relay] store = "redis://HOST:PORT/DB"`), shared
by every node that names the same Redis.

Keys (all under `[relay] key_prefix`, Redis's own expiry removes them):

    PREFIX relay:IP   expiry (unix time, text)      SET ... PX ttl
    PREFIX fail:IP    failures in the window        SET 0 PX window NX; INCR
    PREFIX lock:IP    lockout end (unix time)       SET ... PX seconds

Every call is bounded by `[relay] timeout`. When Redis does not answer (down,
refused, too slow), the call fails closed — `allows` is False, no lockout is
known, a failure is not counted — one warning is logged for the whole outage,
and Redis is not asked again for `[relay] retry_seconds`, so while it is down
a check costs nothing and no session waits for it; the first call after that
tries again, and the first success logs the recovery. Nothing to restart.
The connection is made on first use (after the receiver's fork).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine.relay import RelayStoreError, RelayTable, address_order, normalize_ip

if TYPE_CHECKING:
    from engine.config.settings import RelaySettings

log = logging.getLogger("qrelay.relay")

T = TypeVar("T")

# Seconds `entries` (a listing) or one batch of grant_many (an import) may
# take: no login waits for them.
LIST_TIMEOUT = 30.0
# Grants sent in one pipeline by grant_many.
GRANT_BATCH = 1000


def _redacted(url: str) -> str:
    """The store's address without a password (in it or as redis-py's
    `?password=`), for the log."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
    if query:
        query = "?" + "&".join("password=***" if item.partition("=")[0] == "password" else item
                               for item in query.split("&"))
    # (Not urlunsplit: it writes unix:///path as unix:/path.)
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


class RedisRelayTable(RelayTable):
    """The Redis store (see the module docstring)."""

    def __init__(self, settings: "RelaySettings", clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings.pop_before_smtp_ttl, clock)
        self.settings = settings
        self.url = settings.store
        self.name = _redacted(settings.store)
        self.timeout = settings.timeout
        self.prefix = settings.key_prefix
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down_until = 0.0       # monotonic; 0 = believed up
        self._down = False
        self._why = ""               # the outage's reason, for the errors raised during it

    def _redis(self) -> Any:
        # A client belongs to one event loop (a CLI command runs its own).
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = redis.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
            self._loop = loop
        return self._client

    def _key(self, kind: str, ip: str) -> str:
        return f"{self.prefix}{kind}:{normalize_ip(ip)}"

    async def _call(self, op: Callable[[Any], Awaitable[T]], *, what: str,
                    timeout: float | None = None) -> T:
        """op(client) within the timeout; RelayStoreError (fast) while Redis is down."""
        if self._down and time.monotonic() < self._down_until:
            raise RelayStoreError(f"relay store {self.name} unreachable ({self._why})")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                result = await op(self._redis())
        except Exception as exc:   # redis errors, OSError, the timeout
            self._down_until = time.monotonic() + self.settings.retry_seconds
            self._why = "no answer within %gs" % self.timeout if isinstance(
                exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
            if not self._down:
                self._down = True
                log.warning("relay store %s unreachable (%s): no relay from the shared table "
                            "until it answers", self.name, self._why)
            raise RelayStoreError(f"relay store {self.name} unreachable "
                                  f"({what}: {self._why})") from None
        if self._down:
            self._down = False
            log.warning("relay store %s answers again", self.name)
        return result

    # --- grants ----------------------------------------------------------------------

    async def grant(self, ip: str, ttl: float | None = None) -> float:
        key = self._key("relay", ip)
        ttl = self._ttl(ttl)
        until = self.clock() + ttl
        await self._call(lambda r: r.set(key, repr(until), px=max(1, round(ttl * 1000))),
                         what="grant")
        return until

    async def grant_many(self, grants: list[tuple[str, float]]) -> int:
        todo = [(self._key("relay", ip), self._ttl(ttl)) for ip, ttl in grants]
        for i in range(0, len(todo), GRANT_BATCH):
            now = self.clock()

            async def send(r: Any, batch=todo[i:i + GRANT_BATCH]) -> None:
                async with r.pipeline(transaction=False) as pipe:
                    for key, ttl in batch:
                        pipe.set(key, repr(now + ttl), px=max(1, round(ttl * 1000)))
                    await pipe.execute()

            await self._call(send, what="grant", timeout=max(self.timeout, LIST_TIMEOUT))
        return len(todo)

    async def allows(self, ip: str) -> bool:
        try:
            key = self._key("relay", ip)
            return bool(await self._call(lambda r: r.exists(key), what="check"))
        except (RelayStoreError, ValueError):
            return False

    async def revoke(self, ip: str) -> bool:
        key = self._key("relay", ip)
        return bool(await self._call(lambda r: r.delete(key), what="revoke"))

    async def entries(self) -> list[tuple[str, float]]:
        # The prefix as written, not as a pattern: `mx[1]*:` matches no other cluster's keys.
        match = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "relay:*"
        start = len(self.prefix) + len("relay:")

        async def scan(r: Any) -> list[tuple[str, float]]:
            keys = [k async for k in r.scan_iter(match=match, count=1000)]
            found = []
            for i in range(0, len(keys), 1000):
                batch = keys[i:i + 1000]
                for key, value in zip(batch, await r.mget(batch)):
                    if value is not None:
                        found.append((key.decode()[start:], float(value)))
            return found

        # A listing is no login path: the whole of it may take longer than one check.
        found = await self._call(scan, what="list", timeout=max(self.timeout, LIST_TIMEOUT))
        return sorted(found, key=address_order)

    # --- failure counters -----------------------------------------------------------

    async def count_failure(self, ip: str, window: float) -> int | None:
        try:
            key = self._key("fail", ip)

            async def incr(r: Any) -> int:
                async with r.pipeline(transaction=True) as pipe:
                    # The window starts at the first failure: the key gets its
                    # expiry only when created, INCR keeps it.
                    pipe.set(key, 0, px=max(1, round(window * 1000)), nx=True)
                    pipe.incr(key)
                    return (await pipe.execute())[1]

            return int(await self._call(incr, what="count failure"))
        except (RelayStoreError, ValueError):
            return None

    async def lock_out(self, ip: str, seconds: float) -> float | None:
        try:
            lock, fail = self._key("lock", ip), self._key("fail", ip)
            until = self.clock() + seconds

            async def lock_it(r: Any) -> None:
                async with r.pipeline(transaction=True) as pipe:
                    pipe.set(lock, repr(until), px=max(1, round(seconds * 1000)))
                    pipe.delete(fail)
                    await pipe.execute()

            await self._call(lock_it, what="lock out")
            return until
        except (RelayStoreError, ValueError):
            return None

    async def locked_until(self, ip: str) -> float:
        try:
            key = self._key("lock", ip)
            value = await self._call(lambda r: r.get(key), what="lockout check")
            # (A value set by hand that is no number: as if the store failed.)
            return float(value) if value is not None else 0.0
        except (RelayStoreError, ValueError):
            return 0.0

    async def clear_failures(self, ip: str) -> None:
        try:
            key = self._key("fail", ip)
            await self._call(lambda r: r.delete(key), what="clear failures")
        except (RelayStoreError, ValueError):
            pass

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:   # closing a connection to a dead server: nothing to do
                pass
