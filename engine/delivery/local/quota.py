"""Maildir++ quota as vpopmail's vdelivermail applies it (maildirquota.c,
vpopmail spec §2.6, §3.5).

`maildirsize`: line 1 the quota (`10485760S,1000C`), then `<bytes> <count>`
lines whose sum is the usage. Rebuilt (a scan of new/ and cur/ of the Maildir
and of every `.`-folder but `.Trash`) when missing, when it is 5120 bytes or
more, when older than 15 minutes, or when it says "over" unless it holds one
data line and is younger than 15 minutes — vpopmail's rules, not the
courier spec's — and, as Courier does, when its sums are below zero. A
rebuild is written to tmp/ and renamed over the old file. If a new/ or cur/
changed during the scan the answer is "not over" (EAGAIN in maildirquota.c).

This module never deletes messages; it only reads names and sizes and
writes maildirsize and its tmp file.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass

REBUILD_SIZE = 5120
REBUILD_AGE = 15 * 60
WARN_PERCENT = 90


@dataclass(slots=True, frozen=True)
class Quota:
    bytes: int = 0          # 0 = no limit
    count: int = 0

    @property
    def unlimited(self) -> bool:
        return self.bytes <= 0 and self.count <= 0

    def line(self) -> str:
        parts = []
        if self.bytes > 0:
            parts.append(f"{self.bytes}S")
        if self.count > 0:
            parts.append(f"{self.count}C")
        return ",".join(parts)


_PART = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_quota(text: str | None) -> Quota | None:
    """vpasswd field 7 / maildirsize line 1 → Quota; None = no quota (empty or `NO…`).
    Accepts `1048576`, `1M`, `1MB`, `1024K`, `1048576S`, `1000C`, `1mbs,1000C`."""
    if text is None:
        return None
    text = text.strip()
    if not text or text[:2].upper() == "NO":
        return None
    size = count = 0
    for part in text.split(","):
        m = _PART.match(part)
        if not m:
            continue
        value, suffix = int(m.group(1)), m.group(2).upper()
        if "C" in suffix:
            count = value
        else:
            mult = 1
            if "K" in suffix:
                mult = 1024
            elif "M" in suffix:
                mult = 1024 * 1024
            elif "G" in suffix:
                mult = 1024 * 1024 * 1024
            size = value * mult
    q = Quota(size, count)
    return None if q.unlimited else q


@dataclass(slots=True, frozen=True)
class Usage:
    bytes: int
    count: int
    lines: int          # data lines in maildirsize (after a rebuild: 1)

    def over(self, quota: Quota, msgsize: int) -> bool:
        if quota.bytes > 0 and self.bytes + msgsize > quota.bytes:
            return True
        return quota.count > 0 and self.count + 1 > quota.count

    def percent(self, quota: Quota) -> int:
        p = 0
        if quota.bytes > 0:
            p = max(p, self.bytes * 100 // quota.bytes)
        if quota.count > 0:
            p = max(p, self.count * 100 // quota.count)
        return p


def _read(path: str) -> tuple[str, Usage, os.stat_result] | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None
    lines = data.decode("ascii", "replace").split("\n")
    total_b = total_c = n = 0
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < 2:
            continue
        try:
            total_b += int(fields[0])
            total_c += int(fields[1])
        except ValueError:
            continue
        n += 1
    return lines[0].strip(), Usage(total_b, total_c, n), st


_TRASHED = re.compile(r":2,[A-Za-z]*T")
_SIZE = re.compile(r",S=(\d+)")


def counted(name: str) -> bool:
    """Whether Maildir++ counts the message file `name`: not one flagged
    trashed (`:2,…T`, deleted by an IMAP client, not yet expunged)."""
    return not _TRASHED.search(name)


def name_size(name: str) -> int | None:
    """The `,S=` size in a message file's name, if it has one."""
    m = _SIZE.search(name)
    return int(m.group(1)) if m else None


def _scan_dir(path: str) -> tuple[int, int, float]:
    total = count = 0
    try:
        newest = os.stat(path).st_mtime
        names = os.listdir(path)
    except FileNotFoundError:
        return 0, 0, 0.0
    for name in names:
        if name.startswith(".") or not counted(name):
            continue
        size = name_size(name)
        if size is None:
            try:
                size = os.stat(os.path.join(path, name)).st_size
            except OSError:
                continue
        total += size
        count += 1
    return total, count, newest


def scan(maildir: str) -> tuple[Usage, bool]:
    """(usage, stable): stable False if a new/ or cur/ changed during the scan."""
    folders = [maildir]
    try:
        folders += [os.path.join(maildir, d) for d in os.listdir(maildir)
                    if d.startswith(".") and d not in (".", "..", ".Trash")
                    and os.path.isdir(os.path.join(maildir, d))]
    except FileNotFoundError:
        pass
    total = count = 0
    stamps = []
    for folder in folders:
        for sub in ("new", "cur"):
            b, c, newest = _scan_dir(os.path.join(folder, sub))
            total += b
            count += c
            stamps.append((os.path.join(folder, sub), newest))
    stable = True
    for path, before in stamps:
        try:
            if os.stat(path).st_mtime != before:
                stable = False
        except FileNotFoundError:
            pass
    return Usage(total, count, 1), stable


def rebuild(maildir: str, quota: Quota, clock=time.time) -> tuple[Usage, bool]:
    usage, stable = scan(maildir)
    # Courier's TIME.PID_NeWmAiLdIrSiZe.HOST, plus the thread: deliveries are
    # threads of one process, and two rebuilding in the same second must not
    # share a tmp file (one would rename the other's away and fail).
    tmp = os.path.join(maildir, "tmp", f"{int(clock())}.{os.getpid()}_{threading.get_ident()}"
                                       f"_NeWmAiLdIrSiZe.{socket.gethostname()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{quota.line()}\n{usage.bytes} {usage.count}\n".encode())
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(maildir, "maildirsize"))
    return usage, stable


def maildirsize_quota(maildir: str) -> Quota | None:
    """Line 1 of MAILDIR/maildirsize, for Maildir lines delivered without a vpasswd quota."""
    got = _read(os.path.join(maildir, "maildirsize"))
    return parse_quota(got[0]) if got else None


def check(maildir: str, quota: Quota, msgsize: int, clock=time.time) -> tuple[bool, Usage]:
    """(over?, usage) for a delivery of msgsize bytes (queue size, no added headers)."""
    path = os.path.join(maildir, "maildirsize")
    got = _read(path)
    now = clock()
    if got is not None:
        line1, usage, st = got
        old = now - st.st_mtime > REBUILD_AGE
        negative = usage.bytes < 0 or usage.count < 0     # Courier recalculates too
        if line1 == quota.line() and st.st_size < REBUILD_SIZE and not old and not negative:
            if not usage.over(quota, msgsize):
                return False, usage
            if usage.lines == 1:
                return True, usage
    usage, stable = rebuild(maildir, quota, clock)
    if not stable:
        return False, usage
    return usage.over(quota, msgsize), usage


def add(maildir: str, size: int, count: int = 1) -> None:
    """Append `<size> <count>` after a delivery (O_APPEND: one small write)."""
    path = os.path.join(maildir, "maildirsize")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return          # rebuilt (with this message) at the next check
    try:
        os.write(fd, f"{size} {count}\n".encode())
    finally:
        os.close(fd)
