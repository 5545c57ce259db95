"""Disk space and inodes on the spool's filesystem: a full disk is a 451
(`qq write error or disk full`) for every client, and a stalled log."""
from __future__ import annotations

import os

from engine.doctor import Context, Report


def check(ctx: Context, report: Report) -> None:
    where = ctx.root / "queue"
    if not where.is_dir():
        where = ctx.root
    try:
        vfs = os.statvfs(where)
    except OSError as exc:
        report.problem("disk", f"{where}: {exc.strerror}", "free space is unknown",
                       f"df -h {ctx.arg(where)}")
        return
    total = vfs.f_blocks * vfs.f_frsize
    free = vfs.f_bavail * vfs.f_frsize
    percent = 100.0 * free / total if total else 100.0
    limits = ctx.doctor
    report.note("disk", f"{where}: {_size(free)} free of {_size(total)} ({percent:.0f} %)",
                free_bytes=free, total_bytes=total)
    floor = ctx.settings.spool.min_free_bytes
    if 0 < floor and free < floor:
        report.problem("disk", f"only {_size(free)} free on the spool's filesystem ({where}), "
                       f"below [spool] min_free_bytes ({_size(floor)})",
                       "every MAIL is refused with 452 (not enough free space in the queue) "
                       "until there is room again", f"du -sh {ctx.arg(ctx.root)}/* | sort -h")
    elif percent < limits.disk_min_free_percent or free < limits.disk_min_free_bytes:
        report.problem("disk", f"only {_size(free)} ({percent:.1f} %) free on the spool's "
                       f"filesystem ({where})",
                       "when it is full every message is refused with 451 (qq write error or "
                       "disk full) and the logs stop", f"du -sh {ctx.arg(ctx.root)}/* | sort -h")
    if vfs.f_files and vfs.f_favail * 100 < vfs.f_files * limits.disk_min_free_percent:
        report.problem("disk", f"only {vfs.f_favail} inodes free on {where}",
                       "Maildir deliveries (one file per message) fail when none are left",
                       f"df -i {ctx.arg(where)}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
