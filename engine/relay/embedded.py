"""The embedded relay table: an LMDB environment in ROOT/relay/ that every
process of the box opens (receivers, the POP3 server, `qrelay relayclients`).

Tables (LMDB named databases):

    grants4   IPv4 address as a native unsigned int (LMDB's INTEGERKEY) -> expiry
    grants6   IPv6 address, 16 bytes -> expiry (float, unix time)
    failures  IP (text) -> (failures, window end, lockout end)
    expiry    expiry in ms (big-endian, so sorted by time) + kind + key -> ""

A check is one read transaction and one key lookup (O(log n) in a B+tree;
integer keys keep the tree's pages dense and its comparisons cheap, which is
what keeps 100,000 entries close to 10); LMDB readers take no lock, so checks
never wait for a grant or for each other. A write (grant, revoke, failure)
holds LMDB's writer mutex for microseconds and, in the same transaction,
removes at most `[relay] sweep_batch` expired entries found at the front of
the `expiry` index: the table cleans itself as it is used, without a cron
job, and a check never honours an expired entry even before it is removed.

Durability: transactions are committed without fsync (LMDB's NOSYNC) and the
environment is synced in a thread at most `[relay] sync_seconds` after a
write, so a login never waits for the disk; a crash of any process loses
nothing, a crash of the machine at most the last second of grants (the
client logs in again). If the file is found corrupt at open, it is set aside
(ROOT/relay.broken-TIME) and a fresh table is made: grants are soft state.
This module never raises from `allows` and never syncs on the login path.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_ntop
from typing import TYPE_CHECKING, Any

import lmdb

from engine.relay import RelayStoreError, RelayTable, address_order, normalize_ip, packed_ip

if TYPE_CHECKING:
    from engine.config.settings import RelaySettings

log = logging.getLogger("qrelay.relay")

_GRANT = struct.Struct("<d")
_FAILURE = struct.Struct("<Idd")
_MS = struct.Struct(">Q")
# Kinds of entry in the expiry index.
KIND_GRANT4, KIND_GRANT6, KIND_FAILURE = b"4", b"6", b"f"
_LITTLE = sys.byteorder == "little"
# Grants of one write transaction in grant_many: the writer lock is held for
# milliseconds at most, so a login's grant never waits long behind an import.
GRANT_BATCH = 1000


def grant_key(ip: str) -> tuple[bytes, bytes]:
    """(kind, key) of an address in the grants tables: IPv4 as LMDB's native
    unsigned int, IPv6 as its 16 bytes. ValueError if `ip` is no address."""
    packed = packed_ip(ip)
    if len(packed) == 4:
        return KIND_GRANT4, packed[::-1] if _LITTLE else packed
    return KIND_GRANT6, packed


def grant_ip(kind: bytes, key: bytes) -> str:
    """The address of a grants key (grant_key's inverse, normalize_ip's spelling)."""
    if kind == KIND_GRANT4:
        return inet_ntop(AF_INET, key[::-1] if _LITTLE else key)
    return inet_ntop(AF_INET6, key)


def _expiry_key(expiry: float, kind: bytes, key: bytes) -> bytes:
    # Rounded up: the entry is swept only once its expiry has passed.
    return _MS.pack(max(0, math.ceil(expiry * 1000))) + kind + key


class EmbeddedRelayTable(RelayTable):
    """The LMDB store (see the module docstring)."""

    def __init__(self, path: Path, settings: "RelaySettings",
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings.pop_before_smtp_ttl, clock)
        self.path = Path(path)
        self.settings = settings
        self._env: lmdb.Environment | None = None
        self._pid = 0
        self._grants: dict[bytes, Any] = {}     # kind -> grants4 / grants6
        self._failures: Any = None
        self._expiry: Any = None
        self._sync_timer: asyncio.TimerHandle | None = None
        self._syncing: asyncio.Future | None = None
        self._sync_loop: asyncio.AbstractEventLoop | None = None
        self._last_sync = 0.0
        self._failing = False

    # --- the environment -----------------------------------------------------------

    def _open(self) -> lmdb.Environment:
        pid = os.getpid()
        if self._env is not None and self._pid == pid:
            return self._env
        # Opened in a parent before a fork: LMDB forbids using it here; a fresh one.
        self._env = None
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            env = self._open_env()
        except lmdb.Error as exc:
            aside = self.path.with_name(f"{self.path.name}.broken-{int(time.time())}")
            log.warning("relay table %s unreadable (%s): moved to %s, starting empty",
                        self.path, exc, aside)
            os.replace(self.path, aside)
            self.path.mkdir()
            env = self._open_env()
        self._grants = {KIND_GRANT4: env.open_db(b"grants4", integerkey=True),
                        KIND_GRANT6: env.open_db(b"grants6")}
        self._failures = env.open_db(b"failures")
        self._expiry = env.open_db(b"expiry")
        # Reader slots of processes that died (a killed receiver) are freed here,
        # so they never pin old pages and let the file grow.
        env.reader_check()
        self._env, self._pid = env, pid
        return env

    def _open_env(self) -> lmdb.Environment:
        return lmdb.open(str(self.path), map_size=self.settings.map_bytes, max_dbs=4,
                         sync=False, readahead=False, max_readers=512)

    def _wrote(self) -> None:
        """Have the environment synced within sync_seconds (in a thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._sync_now()
            return
        if self._sync_loop is not loop:
            # A loop that ended (a CLI's asyncio.run) never fires its timer.
            self._sync_timer = self._syncing = None
            self._sync_loop = loop
        if self._sync_timer is not None or self._syncing is not None:
            return
        delay = max(0.0, self._last_sync + self.settings.sync_seconds - time.monotonic())
        self._sync_timer = loop.call_later(delay, self._start_sync, loop)

    def _start_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sync_timer = None
        if self._env is None:
            return
        self._syncing = loop.run_in_executor(None, self._sync_now)
        self._syncing.add_done_callback(self._synced)

    def _synced(self, done: asyncio.Future) -> None:
        self._syncing = None
        if not done.cancelled() and done.exception() is not None:
            log.warning("relay table %s: sync failed: %s", self.path, done.exception())

    def _sync_now(self) -> None:
        self._last_sync = time.monotonic()
        if self._env is not None:
            self._env.sync(True)

    def _write(self, work: Callable[[lmdb.Transaction, float], object]) -> object:
        """Run `work(txn, now)` in one write transaction, sweeping expired entries."""
        try:
            env = self._open()
            now = self.clock()
            with env.begin(write=True) as txn:
                result = work(txn, now)
                self._sweep(txn, now)
        except lmdb.Error as exc:
            raise RelayStoreError(f"relay table {self.path}: {exc}") from None
        except OSError as exc:
            raise RelayStoreError(f"relay table {self.path}: {exc.strerror or exc}") from None
        self._wrote()
        return result

    def _sweep(self, txn: lmdb.Transaction, now: float) -> int:
        limit = _MS.pack(int(now * 1000))
        cursor = txn.cursor(db=self._expiry)
        removed = 0
        if not cursor.first():
            return 0
        while removed < self.settings.sweep_batch:
            key = cursor.key()
            if not key or key[:8] >= limit:
                break
            txn.delete(key[9:], db=self._grants.get(key[8:9], self._failures))
            removed += 1
            if not cursor.delete():
                break
        return removed

    async def sweep(self) -> int:
        """Remove expired entries now (at most sweep_batch); how many went."""
        return self._write(lambda txn, now: 0) or 0   # _write sweeps

    # --- grants ----------------------------------------------------------------------

    async def grant(self, ip: str, ttl: float | None = None) -> float:
        kind, key = grant_key(ip)
        ttl = self._ttl(ttl)
        return self._write(lambda txn, now: self._put_grant(txn, kind, key, now + ttl))  # type: ignore[return-value]

    async def grant_many(self, grants: list[tuple[str, float]]) -> int:
        todo = [(*grant_key(ip), self._ttl(ttl)) for ip, ttl in grants]
        for i in range(0, len(todo), GRANT_BATCH):
            batch = todo[i:i + GRANT_BATCH]

            def work(txn: lmdb.Transaction, now: float) -> None:
                for kind, key, ttl in batch:
                    self._put_grant(txn, kind, key, now + ttl)

            self._write(work)
        return len(todo)

    def _put_grant(self, txn: lmdb.Transaction, kind: bytes, key: bytes, until: float) -> float:
        grants = self._grants[kind]
        old = txn.get(key, db=grants)
        if old is not None:
            txn.delete(_expiry_key(_GRANT.unpack(old)[0], kind, key), db=self._expiry)
        txn.put(key, _GRANT.pack(until), db=grants)
        txn.put(_expiry_key(until, kind, key), b"", db=self._expiry)
        return until

    def allows_nowait(self, ip: str) -> bool | None:
        try:
            kind, key = grant_key(ip)
        except ValueError:
            return False
        try:
            env = self._open()
            with env.begin(db=self._grants[kind]) as txn:
                value = txn.get(key)
        except (lmdb.Error, OSError) as exc:
            if not self._failing:
                self._failing = True
                log.warning("relay table %s unreadable, no relay from it: %s", self.path, exc)
            return False
        if self._failing:
            self._failing = False
            log.warning("relay table %s readable again", self.path)
        return value is not None and _GRANT.unpack(value)[0] > self.clock()

    async def allows(self, ip: str) -> bool:
        return bool(self.allows_nowait(ip))

    async def revoke(self, ip: str) -> bool:
        kind, key = grant_key(ip)

        def work(txn: lmdb.Transaction, now: float) -> bool:
            grants = self._grants[kind]
            old = txn.get(key, db=grants)
            if old is None:
                return False
            until = _GRANT.unpack(old)[0]
            txn.delete(key, db=grants)
            txn.delete(_expiry_key(until, kind, key), db=self._expiry)
            return until > now

        return bool(self._write(work))

    async def entries(self) -> list[tuple[str, float]]:
        try:
            env = self._open()
            now = self.clock()
            with env.begin() as txn:
                found = [(grant_ip(kind, k), _GRANT.unpack(v)[0])
                         for kind, db in self._grants.items() for k, v in txn.cursor(db=db)]
        except lmdb.Error as exc:
            raise RelayStoreError(f"relay table {self.path}: {exc}") from None
        return sorted(((ip, until) for ip, until in found if until > now), key=address_order)

    # --- failure counters -----------------------------------------------------------

    def _failure_update(self, ip: str, change: Callable[[int, float, float, float],
                                                        tuple[int, float, float] | None]):
        """Replace ip's failure record by change(count, window_end, locked, now)
        (None = delete it); returns the new record or None."""
        key = normalize_ip(ip).encode()

        def work(txn: lmdb.Transaction, now: float):
            failures, expiry = self._failures, self._expiry
            old = txn.get(key, db=failures)
            count, wend, locked = _FAILURE.unpack(old) if old is not None else (0, 0.0, 0.0)
            if old is not None:
                txn.delete(_expiry_key(max(wend, locked), KIND_FAILURE, key), db=expiry)
            new = change(count, wend, locked, now)
            if new is None:
                if old is not None:
                    txn.delete(key, db=failures)
                return None
            txn.put(key, _FAILURE.pack(*new), db=failures)
            txn.put(_expiry_key(max(new[1], new[2]), KIND_FAILURE, key), b"", db=expiry)
            return new

        return self._write(work)

    async def count_failure(self, ip: str, window: float) -> int | None:
        def change(count: int, wend: float, locked: float, now: float):
            if wend <= now:
                count, wend = 0, now + window
            return count + 1, wend, locked

        try:
            return self._failure_update(ip, change)[0]
        except (RelayStoreError, ValueError) as exc:
            log.warning("login failure not counted for %s: %s", ip, exc)
            return None

    async def lock_out(self, ip: str, seconds: float) -> float | None:
        try:
            return self._failure_update(ip, lambda c, w, l, now: (0, now, now + seconds))[2]
        except (RelayStoreError, ValueError) as exc:
            log.warning("lockout of %s not recorded: %s", ip, exc)
            return None

    async def locked_until(self, ip: str) -> float:
        try:
            key = normalize_ip(ip).encode()
            env = self._open()
            with env.begin(db=self._failures) as txn:
                value = txn.get(key)
        except (lmdb.Error, OSError, ValueError):
            return 0.0
        if value is None:
            return 0.0
        locked = _FAILURE.unpack(value)[2]
        return locked if locked > self.clock() else 0.0

    async def clear_failures(self, ip: str) -> None:
        def change(count: int, wend: float, locked: float, now: float):
            return (0, now, locked) if locked > now else None

        try:
            self._failure_update(ip, change)
        except (RelayStoreError, ValueError) as exc:
            log.warning("login failures of %s not cleared: %s", ip, exc)

    # --- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._syncing is not None and self._sync_loop is asyncio.get_running_loop():
            await asyncio.wait([self._syncing])
        self._syncing = None
        self.close_now()

    def close_now(self) -> None:
        """Sync and close, without a loop (the CLI, a test's teardown)."""
        if self._env is not None and self._pid == os.getpid():
            self._env.sync(True)
            self._env.close()
        self._env = None
