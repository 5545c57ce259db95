"""Build qmail queues in qmail's real on-disk format (spec §5.1, §5.2) for
tests and benchmarks: message numbers are inode numbers, files are made the
way qmail-queue (pid/ -> link mess/S/N; intd/N -> link todo/N) and
qmail-send (info/S/N, local/S/N, remote/S/N with T/D records, mtimes as
birth and next retry time, bounce/N) make them."""
from __future__ import annotations

import os
from pathlib import Path

SPLIT = 23


def make_queue(qdir: Path, split: int = SPLIT) -> Path:
    for name in ("mess", "info", "local", "remote"):
        for s in range(split):
            (qdir / name / str(s)).mkdir(parents=True, exist_ok=True)
    for name in ("todo", "intd", "bounce", "pid", "lock"):
        (qdir / name).mkdir(parents=True, exist_ok=True)
    (qdir / "lock" / "sendmutex").touch()
    return qdir


def add_message(qdir: Path, body: bytes, sender: str, *, birth: float,
                local: list[tuple[str, bool]] = (), remote: list[tuple[str, bool]] = (),
                next_try: float | None = None, bounce: str | None = None,
                todo: list[str] | None = None, split: int = SPLIT,
                uid: int = 89, pid: int = 4242) -> int:
    """One message; returns its number. `local`/`remote`: (address, done).
    `todo`: recipients of a message not yet preprocessed (todo/N, no info)."""
    tmp = qdir / "pid" / f"{os.getpid()}.{birth}.1"
    tmp.write_bytes(b"Received: (qmail 4242 invoked by uid 89); 5 Jan 2024 09:03:07 -0000\n"
                    + body)
    n = tmp.stat().st_ino
    s = str(n % split)
    os.link(tmp, qdir / "mess" / s / str(n))
    tmp.unlink()
    if todo is not None:
        env = b"u%d\0p%d\0F%s\0" % (uid, pid, sender.encode()) + b"".join(
            b"T" + a.encode() + b"\0" for a in todo) + b"\0"
        (qdir / "intd" / str(n)).write_bytes(env)
        os.link(qdir / "intd" / str(n), qdir / "todo" / str(n))
        os.utime(qdir / "todo" / str(n), (birth, birth))
        return n
    info = qdir / "info" / s / str(n)
    info.write_bytes(b"F" + sender.encode() + b"\0")
    os.utime(info, (birth, birth))
    for channel, rcpts in (("local", local), ("remote", remote)):
        if rcpts:
            p = qdir / channel / s / str(n)
            p.write_bytes(b"".join((b"D" if done else b"T") + a.encode() + b"\0"
                                   for a, done in rcpts))
            t = next_try if next_try is not None else birth
            os.utime(p, (t, t))
    if bounce is not None:
        (qdir / "bounce" / str(n)).write_text(bounce)
    return n
