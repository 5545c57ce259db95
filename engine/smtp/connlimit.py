"""Connection counts shared by the receiver processes (tcpserver -c, and a per-IP cap).

The supervisor creates one `ConnectionTable` in shared memory before it forks the
receivers; each receiver writes only its own row per service (one total and a
fixed number of per-IP buckets; SMTP and POP3 are counted apart, as qmail's
two tcpservers each have their own -c), and a check sums the service's rows. Single-writer rows need no lock, and
when a receiver dies the supervisor zeroes its row before restarting it, so a
kill -9 cannot leak connection slots.

A check and the increment that follows are not atomic across processes: at most
one connection per receiver process can slip over a cap in a race, which bounds
the overshoot by the process count. Per-IP counts share buckets by CRC-32 of the
address; a collision can only make a cap stricter, never looser.

Each connection also gets a number for the smtpd log (where tcpserver logs the
pid of the child it forks): slot + 1 + k * rows for the k-th connection of a
receiver slot, so numbers are unique across receivers without a lock. The k of
each slot lives in shared memory too and survives a receiver's restart (it is
not cleared with the row), so a number is never reused during one `qrelay run`.

This module owns no policy text: the session turns a refusal into the 421 reply.
"""
from __future__ import annotations

import zlib
from multiprocessing.sharedctypes import RawArray
from typing import Any

# Buckets per receiver row for per-IP counts: 4096 * 8 bytes = 32 KiB per row.
IP_BUCKETS = 4096
_ROW = 1 + IP_BUCKETS


class ConnectionTable:
    """Shared-memory counters: one row per receiver slot and service."""

    __slots__ = ("rows", "services", "_array", "_serials")

    def __init__(self, rows: int, services: tuple[str, ...] = ("smtp",)) -> None:
        self.rows = rows
        self.services = services
        self._array: Any = RawArray("q", len(services) * rows * _ROW)
        self._serials: Any = RawArray("q", rows)   # connections numbered per slot

    def _first(self, service: str) -> int:
        """Where the service's rows start (a service's rows are contiguous)."""
        return self.services.index(service) * self.rows * _ROW

    def clear_row(self, slot: int) -> None:
        """Forget every connection of a receiver that died (called by the supervisor)."""
        a = self._array
        for service in self.services:
            base = self._first(service) + slot * _ROW
            for i in range(base, base + _ROW):
                a[i] = 0

    def total(self, service: str = "smtp") -> int:
        a = self._array
        first = self._first(service)
        return sum(a[first + r * _ROW] for r in range(self.rows))

    def counter(self, slot: int, service: str = "smtp") -> "ConnectionCounter":
        return ConnectionCounter(self, slot, service)


class ConnectionCounter:
    """One receiver's view: admits or refuses a new connection and counts it."""

    __slots__ = ("_array", "_rows", "_first", "_base", "_serials", "slot")

    def __init__(self, table: ConnectionTable, slot: int, service: str = "smtp") -> None:
        if not 0 <= slot < table.rows:
            raise ValueError(f"slot {slot} out of range 0..{table.rows - 1}")
        self._array = table._array
        self._rows = table.rows
        self._first = table._first(service)
        self._base = self._first + slot * _ROW
        self._serials = table._serials
        self.slot = slot

    def next_number(self) -> int:
        """The next connection number of this slot (see the module docstring)."""
        k = self._serials[self.slot]
        self._serials[self.slot] = k + 1
        return self.slot + 1 + k * self._rows

    def total(self) -> int:
        """Connections counted by every receiver (tcpserver's `status: N/limit`)."""
        a = self._array
        first = self._first
        return sum(a[first + r * _ROW] for r in range(self._rows))

    @staticmethod
    def _bucket(ip: str) -> int:
        return 1 + zlib.crc32(ip.encode("ascii", "replace")) % IP_BUCKETS

    def admit(self, ip: str, max_total: int, max_per_ip: int) -> str | None:
        """Count the connection and return None, or return why it is refused
        ("total" or "ip") without counting it. A cap of 0 means no cap."""
        a = self._array
        first = self._first
        bucket = self._bucket(ip)
        if max_total > 0:
            total = 0
            for r in range(self._rows):
                total += a[first + r * _ROW]
            if total >= max_total:
                return "total"
        if max_per_ip > 0:
            n = 0
            for r in range(self._rows):
                n += a[first + r * _ROW + bucket]
            if n >= max_per_ip:
                return "ip"
        a[self._base] += 1
        a[self._base + bucket] += 1
        return None

    def release(self, ip: str) -> None:
        a = self._array
        bucket = self._base + self._bucket(ip)
        if a[self._base] > 0:
            a[self._base] -= 1
        if a[bucket] > 0:
            a[bucket] -= 1

    def mine(self) -> int:
        """Connections counted by this receiver."""
        return int(self._array[self._base])
