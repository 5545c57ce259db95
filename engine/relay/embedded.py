"""The embedded relay table: an LMDB environment in ROOT/relay/ that every
process of the box opens (receivers, the POP3 server, `qrelay relayclients`).

Tables (LMDB named databases):

    grants4   IPv4 address as a native unsigned int (LMDB's INTEGERKEY) -> expiry
    grants6   IPv6 address, 16 bytes -> expiry (float, unix time)
    failures  IP (text) -> (failures, window end, lockout end)
    expiry    expiry in ms (big-endian, so sorted by time) + kind + key -> ""
    changes   id of a write transaction (8 bytes, big-endian) -> the grants
              keys it changed (kind + key, concatenated); under 8 zero bytes,
              the id up to which the log has been trimmed

A check is one read transaction and, in the process's copy of the grants
(engine/relay/mirror.py: one flat array slot, not a B+tree walk, so 100,000
entries cost what 10 do), one lookup; when the transaction's id moved since
the copy was made, the `changes` logged since are replayed into it first, so
a grant made by any process is honoured by the next check of every other.
LMDB readers take no lock: checks never wait for a grant or for each other. A write (grant, revoke, failure)
holds LMDB's writer mutex for microseconds and, in the same transaction,
removes at most `[relay] sweep_batch` expired entries found at the front of
the `expiry` index: the table cleans itself as it is used, without a cron
job, and a check never honours an expired entry even before it is removed.

Writes run in one thread per process (engine/relay/writer.py), those that
arrive together in one transaction; the event loop only awaits them.
Durability (writer.py says why): commits without fsync (LMDB's NOSYNC), the
file synced by that thread at most `[relay] sync_seconds` after a write; a
crash of any process loses nothing, a crash of the machine at most the last
second of grants (the client logs in again) — and a table that may have been
torn by it is set aside at the next open (ROOT/relay.unsynced-TIME), as is a
file found corrupt (ROOT/relay.broken-TIME): grants are soft state, a
damaged table is never read. This module never raises from `allows` and
never syncs or takes the writer mutex on an event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import math
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_ntop
from typing import TYPE_CHECKING, Any

import lmdb

from engine.relay import RelayStoreError, RelayTable, address_order, normalize_ip, packed_ip
from engine.relay.mirror import GrantMirror
from engine.relay.writer import TxnWriter, unsynced_from_earlier_boot

if TYPE_CHECKING:
    from engine.config.settings import RelaySettings

log = logging.getLogger("qrelay.relay")

_GRANT = struct.Struct("<d")
_FAILURE = struct.Struct("<Idd")
_MS = struct.Struct(">Q")
_TXN = struct.Struct(">Q")
_TRIMMED = bytes(8)         # key of the `changes` log's trim mark
# Write transactions whose changes stay logged: a process whose copy is older
# rebuilds it from the grants tables (reads them all) at its next check.
CHANGE_LOG_TXNS = 16384
# A copy of more grants than this is built in a thread (0.18 s of CPU for
# 100,000, not to stop an event loop), and so is one that would replay more
# logged changes than this; meanwhile checks read the B+tree.
INLINE_BUILD = 20_000
# Reader slots in lock.mdb (LMDB: one per thread with a read transaction open).
_MAX_READERS = 512
# Kinds of entry in the expiry index.
KIND_GRANT4, KIND_GRANT6, KIND_FAILURE = b"4", b"6", b"f"
_LITTLE = sys.byteorder == "little"
# Taken (flock) while a process opens the table.
LOCK = "open.lock"
# Opening is rare; a child gets a fresh lock (a thread of the parent may
# have held it at the fork).
_OPEN_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().__setitem__("_OPEN_LOCK", threading.Lock()))
# What says the file itself is damaged (it is then set aside, see _open).
_UNREADABLE = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError,
               lmdb.VersionMismatchError, lmdb.IncompatibleError)
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


def _packed(kind: bytes, key: bytes) -> bytes:
    """packed_ip's bytes of a grants key."""
    return key[::-1] if kind == KIND_GRANT4 and _LITTLE else key


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
        self._changes: Any = None
        self._mirror = GrantMirror()
        self._built: GrantMirror | None = None      # a copy built by _builder, not yet adopted
        self._builder: threading.Thread | None = None
        self._writer = TxnWriter(self.path, settings.sync_seconds, self._transact,
                                 lambda: self._env if self._pid == os.getpid() else None)
        self._failing = False
        self._stuck: int | None = None     # the writer's batch count when a write timed out
        self._opening: tuple[int, concurrent.futures.Future] | None = None   # (pid, its open)
        self._open_late = False

    # --- the environment -----------------------------------------------------------

    def _open(self) -> lmdb.Environment:
        pid = os.getpid()
        if self._env is not None and self._pid == pid:
            return self._env
        # The checking thread and the writer thread may both get here first.
        with _OPEN_LOCK:
            if self._env is not None and self._pid == pid:
                return self._env
            return self._open_locked(pid)

    def _open_locked(self, pid: int) -> lmdb.Environment:
        # Opened in a parent before a fork: LMDB forbids using it here; a fresh one.
        self._env = None
        self.path.mkdir(parents=True, exist_ok=True)
        # Processes starting together decide once whether the table is set aside.
        # (Read-only, in the directory the run user owns: a root CLI may have made it.)
        lock = os.open(self.path / LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if unsynced_from_earlier_boot(self.path):
                self._set_aside("unsynced", "the machine stopped before its last writes "
                                "reached the disk")
            try:
                env = self._open_env()
            except _UNREADABLE as exc:
                # Only a damaged file is set aside: a plain lmdb.Error ("already
                # open in this process", after a fork from a parent that used the
                # table) must not throw every grant away; it fails closed instead.
                self._set_aside("broken", f"unreadable ({exc})")
                env = self._open_env()
        finally:
            os.close(lock)
        # In a write transaction of our own: begun, it waits for LMDB's writer
        # mutex without the GIL. (open_db's own waited holding it: another
        # process holding the mutex froze every thread of this one.)
        with env.begin(write=True) as txn:
            self._grants = {KIND_GRANT4: env.open_db(b"grants4", txn=txn, integerkey=True),
                            KIND_GRANT6: env.open_db(b"grants6", txn=txn)}
            self._failures = env.open_db(b"failures", txn=txn)
            self._expiry = env.open_db(b"expiry", txn=txn)
            self._changes = env.open_db(b"changes", txn=txn)
        self._mirror, self._built, self._builder = GrantMirror(), None, None
        # Reader slots of processes that died (a killed receiver) are freed here,
        # so they never pin old pages and let the file grow.
        env.reader_check()
        self._env, self._pid = env, pid
        return env

    async def _open_off_loop(self) -> bool:
        """Open the table in a thread, the event loop waiting at most [relay]
        write_timeout: opening takes LMDB's writer mutex, which a process that
        does not let go (stopped, stuck on the disk) would make the loop wait
        for. True when the open is over (done, or failed: the caller's _open
        says why); False while it waits (one line logged for the wait; once
        it is late, at once)."""
        if self._env is not None and self._pid == os.getpid():
            return True
        opening = self._opening
        if opening is None or opening[0] != os.getpid():
            future: concurrent.futures.Future = concurrent.futures.Future()

            def open_it() -> None:
                try:
                    self._open()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(None)

            self._opening = opening = (os.getpid(), future)
            threading.Thread(target=open_it, name="relay-open", daemon=True).start()
        timeout = self.settings.write_timeout
        if not (self._open_late and not opening[1].done()):     # known late: no wait
            await asyncio.wait([asyncio.wrap_future(opening[1])], timeout=timeout)
        if not opening[1].done():
            if not self._open_late:
                self._open_late = True
                log.warning("relay table %s: not opened within %gs, its writer lock is held "
                            "(a process stopped or stuck on the disk): no relay from it until "
                            "it opens", self.path, timeout)
            return False
        if self._open_late:
            self._open_late = False
            log.warning("relay table %s: opened", self.path)
        return True

    def _set_aside(self, why: str, what: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.{why}-{int(time.time())}")
        log.warning("relay table %s %s: moved to %s, starting empty", self.path, what, aside)
        owner = os.stat(self.path)
        os.replace(self.path, aside)
        self.path.mkdir()
        if os.geteuid() == 0:
            # A root tool (doctor, relayclients) may be first after a reboot: the
            # receivers, running as the run user, must still write the new one.
            os.chown(self.path, owner.st_uid, owner.st_gid)

    def _open_env(self) -> lmdb.Environment:
        from engine.lmdbfile import reserve_lock_file, truncation
        reserve_lock_file(self.path, _MAX_READERS)
        env = lmdb.open(str(self.path), map_size=self.settings.map_bytes, max_dbs=5,
                        sync=False, readahead=False, max_readers=_MAX_READERS)
        try:
            why = truncation(env, self.path / "data.mdb")
        except OSError:
            why = None          # lmdb.open made it: there is one
        if why is not None:
            # Read, its missing pages would be SIGBUS in every receiver: set aside.
            env.close()
            raise lmdb.CorruptedError(why)
        return env

    async def _write(self, work: Callable[[lmdb.Transaction, float, list[bytes]], object],
                     bounded: bool = True) -> object:
        """Run `work(txn, now, changed)` in the writer thread's next write
        transaction (shared with the writes that arrive meanwhile); the grants
        keys it changed (kind + key, appended to `changed`) are logged for the
        other processes' copies. RelayStoreError if the store fails, or
        (`bounded`) if the write is not done within [relay] write_timeout:
        LMDB's writer lock is held by a process that does not let go. Until
        the writer thread gets through, later writes fail at once (nothing
        piles up behind it); one line is logged for the whole of it."""
        writer = self._writer
        if not bounded:
            return await writer.run(work)
        if self._stuck is not None:
            if writer.batches == self._stuck:
                raise RelayStoreError(f"relay table {self.path}: waiting for its writer lock")
            self._stuck = None
            log.warning("relay table %s: writes go through again", self.path)
        timeout = self.settings.write_timeout
        try:
            async with asyncio.timeout(timeout):
                return await writer.run(work)
        except TimeoutError:
            if self._stuck is None:
                self._stuck = writer.batches
                log.warning("relay table %s: no write done within %gs, its writer lock is held "
                            "(a process stopped or stuck on the disk): no grants, logins not "
                            "counted until it is free", self.path, timeout)
            raise RelayStoreError(f"relay table {self.path}: no write within {timeout:g}s "
                                  "(its writer lock is held)") from None

    def _transact(self, works: list) -> list[tuple[BaseException | None, object]]:
        """The writer thread's batch: one write transaction, each work in a
        nested one (one failing undoes only itself), one sweep, one commit."""
        try:
            env = self._open()
            now = self.clock()
            outcomes: list[tuple[BaseException | None, object]] = []
            with env.begin(write=True) as txn:
                self._writer.mark_unsynced()
                changed: list[bytes] = []
                if len(works) == 1:
                    outcomes.append((None, works[0](txn, now, changed)))
                else:
                    for work in works:
                        mine: list[bytes] = []
                        try:
                            with env.begin(write=True, parent=txn) as child:
                                result = work(child, now, mine)
                        except lmdb.Error as exc:
                            outcomes.append((RelayStoreError(f"relay table {self.path}: {exc}"), None))
                            continue
                        except Exception as exc:
                            outcomes.append((exc, None))
                            continue
                        changed += mine
                        outcomes.append((None, result))
                self._sweep(txn, now, changed)
                if changed:
                    self._log_changes(txn, changed)
        except lmdb.Error as exc:
            raise RelayStoreError(f"relay table {self.path}: {exc}") from None
        except OSError as exc:
            raise RelayStoreError(f"relay table {self.path}: {exc.strerror or exc}") from None
        return outcomes

    def _log_changes(self, txn: lmdb.Transaction, changed: list[bytes]) -> None:
        txnid = txn.id()
        txn.put(_TXN.pack(txnid), b"".join(changed), db=self._changes)
        # Trim what is older than CHANGE_LOG_TXNS transactions (one entry per
        # write at most, in the steady state), and say how far.
        limit = _TXN.pack(max(0, txnid - CHANGE_LOG_TXNS))
        cursor = txn.cursor(db=self._changes)
        trimmed = None
        if cursor.set_range(_TRIMMED + b"\0"):     # the oldest entry
            while cursor.key() and cursor.key() <= limit:
                trimmed = cursor.key()
                if not cursor.delete():
                    break
        if trimmed is not None:
            txn.put(_TRIMMED, trimmed, db=self._changes)

    def _sweep(self, txn: lmdb.Transaction, now: float, changed: list[bytes]) -> int:
        limit = _MS.pack(int(now * 1000))
        cursor = txn.cursor(db=self._expiry)
        removed = 0
        if not cursor.first():
            return 0
        while removed < self.settings.sweep_batch:
            key = cursor.key()
            if not key or key[:8] >= limit:
                break
            kind = key[8:9]
            txn.delete(key[9:], db=self._grants.get(kind, self._failures))
            if kind != KIND_FAILURE:
                changed.append(key[8:])
            removed += 1
            if not cursor.delete():
                break
        return removed

    async def sweep(self) -> int:
        """Remove expired entries now (at most sweep_batch); how many went."""
        return await self._write(lambda txn, now, changed: 0) or 0   # _transact sweeps

    # --- grants ----------------------------------------------------------------------

    async def grant(self, ip: str, ttl: float | None = None) -> float:
        kind, key = grant_key(ip)
        ttl = self._ttl(ttl)
        return await self._write(  # type: ignore[return-value]
            lambda txn, now, changed: self._put_grant(txn, kind, key, now + ttl, changed))

    async def grant_many(self, grants: list[tuple[str, float]]) -> int:
        todo = [(*grant_key(ip), self._ttl(ttl)) for ip, ttl in grants]
        for i in range(0, len(todo), GRANT_BATCH):
            batch = todo[i:i + GRANT_BATCH]

            def work(txn: lmdb.Transaction, now: float, changed: list[bytes]) -> None:
                for kind, key, ttl in batch:
                    self._put_grant(txn, kind, key, now + ttl, changed)

            await self._write(work, bounded=False)      # an import: as long as it takes
        return len(todo)

    def _put_grant(self, txn: lmdb.Transaction, kind: bytes, key: bytes, until: float,
                   changed: list[bytes]) -> float:
        grants = self._grants[kind]
        old = txn.get(key, db=grants)
        if old is not None:
            txn.delete(_expiry_key(_GRANT.unpack(old)[0], kind, key), db=self._expiry)
        txn.put(key, _GRANT.pack(until), db=grants)
        txn.put(_expiry_key(until, kind, key), b"", db=self._expiry)
        changed.append(kind + key)
        return until

    def allows_nowait(self, ip: str) -> bool | None:
        if self._env is None or self._pid != os.getpid():
            return None         # opened first, off the loop (allows)
        return self._check(ip)

    def _check(self, ip: str) -> bool:
        try:
            packed = packed_ip(ip)
        except ValueError:
            return False
        try:
            env = self._open()
            with env.begin() as txn:
                mirror: GrantMirror | None = self._mirror
                if txn.id() != mirror.txnid:
                    mirror = self._catch_up(txn)
                if mirror is None:          # a copy being built: the tree
                    value = self._exact(txn, ip)
                else:
                    lower = mirror.lower_bound(packed)
                    if lower is None:
                        value = False
                    else:                   # within its last second: the exact expiry
                        now = self.clock()
                        value = lower > now or (lower + 1 > now and self._exact(txn, ip))
        except (lmdb.Error, OSError) as exc:
            if not self._failing:
                self._failing = True
                log.warning("relay table %s unreadable, no relay from it: %s", self.path, exc)
            return False
        if self._failing:
            self._failing = False
            log.warning("relay table %s readable again", self.path)
        return bool(value)

    def _exact(self, txn: lmdb.Transaction, ip: str) -> bool:
        kind, key = grant_key(ip)
        value = txn.get(key, db=self._grants[kind])
        return value is not None and _GRANT.unpack(value)[0] > self.clock()

    def _catch_up(self, txn: lmdb.Transaction) -> GrantMirror | None:
        """The process's copy of the grants brought to `txn`'s snapshot (the
        logged changes replayed), or None while a new copy is being built
        in a thread (the caller then reads the tree: exact, a little slower)."""
        built = self._built
        if built is not None:           # a copy built in a thread: adopted, then replayed
            self._built = None
            self._mirror = built
        elif self._builder is not None and self._builder.is_alive():
            return None                 # one is being built: the tree meanwhile
        mirror = self._mirror
        txnid = txn.id()
        if mirror.txnid > txnid:        # built from a newer snapshot than this check's
            return mirror
        changes = self._changes
        trimmed = txn.get(_TRIMMED, db=changes)
        if mirror.txnid < 0 or (trimmed is not None and mirror.txnid < _TXN.unpack(trimmed)[0]):
            grants4, grants6 = self._grants[KIND_GRANT4], self._grants[KIND_GRANT6]
            if txn.stat(grants4)["entries"] + txn.stat(grants6)["entries"] > INLINE_BUILD:
                self._build_in_thread()
                return None
            self._load(mirror, txn)
            return mirror
        logged: list[bytes] = []
        cursor = txn.cursor(db=changes)
        if cursor.set_range(_TXN.pack(mirror.txnid + 1)):
            logged = [keys for _, keys in cursor]
        if sum(map(len, logged)) > 5 * INLINE_BUILD:      # 5 bytes an IPv4 change
            # More changes than a copy built inline holds (an import by another
            # process): replayed here they would stop the event loop as long
            # (0.2 s for 100,000): a new copy, in a thread.
            self._build_in_thread()
            return None
        changed: set[bytes] = set()
        for keys in logged:
            i = 0
            while i < len(keys):
                size = 5 if keys[i:i + 1] == KIND_GRANT4 else 17
                changed.add(keys[i:i + size])
                i += size
        for item in changed:
            kind, key = item[:1], item[1:]
            value = txn.get(key, db=self._grants[kind])
            if value is None:
                mirror.delete(_packed(kind, key))
            else:
                mirror.put(_packed(kind, key), _GRANT.unpack(value)[0])
        mirror.txnid = txnid
        return mirror

    def _load(self, mirror: GrantMirror, txn: lmdb.Transaction) -> None:
        grants4, grants6 = self._grants[KIND_GRANT4], self._grants[KIND_GRANT6]
        unpack, order = _GRANT.unpack, sys.byteorder
        mirror.load(((int.from_bytes(k, order), unpack(v)[0]) for k, v in txn.cursor(db=grants4)),
                    ((k, unpack(v)[0]) for k, v in txn.cursor(db=grants6)),
                    txn.stat(grants4)["entries"], txn.id())

    def _build_in_thread(self) -> None:
        if self._builder is not None and self._builder.is_alive():
            return
        env = self._env

        def build() -> None:
            try:
                mirror = GrantMirror()
                with env.begin() as txn:
                    self._load(mirror, txn)
                self._built = mirror
            except Exception as exc:      # the table closed meanwhile, unreadable: next check retries
                log.warning("relay table %s: copy of the grants not built: %s", self.path, exc)

        self._builder = threading.Thread(target=build, name="relay-copy", daemon=True)
        self._builder.start()

    async def allows(self, ip: str) -> bool:
        return await self._open_off_loop() and self._check(ip)

    async def revoke(self, ip: str) -> bool:
        kind, key = grant_key(ip)

        def work(txn: lmdb.Transaction, now: float, changed: list[bytes]) -> bool:
            grants = self._grants[kind]
            old = txn.get(key, db=grants)
            if old is None:
                return False
            until = _GRANT.unpack(old)[0]
            txn.delete(key, db=grants)
            txn.delete(_expiry_key(until, kind, key), db=self._expiry)
            changed.append(kind + key)
            return until > now

        return bool(await self._write(work))

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

    async def _failure_update(self, ip: str, change: Callable[[int, float, float, float],
                                                        tuple[int, float, float] | None]):
        """Replace ip's failure record by change(count, window_end, locked, now)
        (None = delete it); returns the new record or None."""
        key = normalize_ip(ip).encode()

        def work(txn: lmdb.Transaction, now: float, changed: list[bytes]):
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

        return await self._write(work)

    async def count_failure(self, ip: str, window: float) -> int | None:
        def change(count: int, wend: float, locked: float, now: float):
            if wend <= now:
                count, wend = 0, now + window
            return count + 1, wend, locked

        try:
            return (await self._failure_update(ip, change))[0]
        except (RelayStoreError, ValueError) as exc:
            log.warning("login failure not counted for %s: %s", ip, exc)
            return None

    async def lock_out(self, ip: str, seconds: float) -> float | None:
        try:
            return (await self._failure_update(ip, lambda c, w, l, now: (0, now, now + seconds)))[2]
        except (RelayStoreError, ValueError) as exc:
            log.warning("lockout of %s not recorded: %s", ip, exc)
            return None

    def _failure_record(self, ip: str) -> tuple[int, float, float] | None:
        """ip's (failures, window end, lockout end), None if none or unreadable."""
        try:
            key = normalize_ip(ip).encode()
            env = self._open()
            with env.begin(db=self._failures) as txn:
                value = txn.get(key)
        except (lmdb.Error, OSError, ValueError):
            return None
        return _FAILURE.unpack(value) if value is not None else None

    async def locked_until(self, ip: str) -> float:
        if not await self._open_off_loop():
            return 0.0
        record = self._failure_record(ip)
        if record is None:
            return 0.0
        locked = record[2]
        return locked if locked > self.clock() else 0.0

    async def clear_failures(self, ip: str) -> None:
        def change(count: int, wend: float, locked: float, now: float):
            return (0, now, locked) if locked > now else None

        # Every login succeeds through here: most IPs have nothing to forget,
        # and a read costs no write transaction (nor the writer mutex).
        if not await self._open_off_loop():
            return
        record = self._failure_record(ip)
        if record is None or (record[0] == 0 and record[2] > self.clock()):
            return
        try:
            await self._failure_update(ip, change)
        except (RelayStoreError, ValueError) as exc:
            log.warning("login failures of %s not cleared: %s", ip, exc)

    # --- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.stop)    # the last batch and sync, off the loop
        self.close_now()

    def close_now(self) -> None:
        """Finish the writes, sync and close (blocks; the CLI, a test's teardown)."""
        self._writer.stop()
        if self._builder is not None and self._pid == os.getpid():
            self._builder.join()
        if self._env is not None and self._pid == os.getpid():
            self._env.sync(True)
            self._env.close()
        self._env = None
