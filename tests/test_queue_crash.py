"""Crash safety: kill -9 a process that is enqueuing, at random moments.

Every id the child printed (= enqueue or submit had returned) must be in the
reopened spool with intact bytes, and recovery must find nothing corrupt.
Threads use `enqueue` (answered once indexed); asyncio tasks use `submit`,
the receivers' path (answered at the segment sync, indexed just after), so
kills also land between a 250 and its index commit.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.queue import Spool

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, hashlib, os, sys, threading
from engine.config.settings import SpoolSettings
from engine.queue import Envelope, Spool
# small segments so crashes also hit segment rotation
spool = Spool(sys.argv[1], SpoolSettings(segment_bytes=64 * 1024))
lock = threading.Lock()
def body(seed):
    n = (len(seed) * 7919) % 5000 + 1
    return hashlib.sha256(seed.encode()).digest() * (n // 32 + 1)
def worker(k):
    i = 0
    while True:
        seed = f"{os.getpid()}-{k}-{i}"
        i += 1
        msgid = spool.enqueue(Envelope("s@x", (f"r{k}@y",)), body(seed))
        with lock:
            os.write(1, f"{msgid} {seed}\n".encode())
async def task(k):
    i = 0
    while True:
        seed = f"{os.getpid()}-{k}-{i}"
        i += 1
        msgid = await spool.submit(Envelope("s@x", (f"r{k}@y",)), body(seed))
        os.write(1, f"{msgid} {seed}\n".encode())
async def tasks(n):
    await asyncio.gather(*(task(k) for k in range(n)))
os.write(1, b"ready\n")
if sys.argv[3] == "asyncio":
    asyncio.run(tasks(int(sys.argv[2])))
for k in range(int(sys.argv[2])):
    threading.Thread(target=worker, args=(k,), daemon=True).start()
threading.Event().wait()
"""


def child_body(seed: str) -> bytes:
    """The bytes CHILD enqueues for `seed` (same formula)."""
    n = (len(seed) * 7919) % 5000 + 1
    return hashlib.sha256(seed.encode()).digest() * (n // 32 + 1)


def test_kill9_during_enqueue_loses_nothing_acknowledged(tmp_path: Path):
    q = tmp_path / "queue"
    rng = random.Random(1234)
    acknowledged: dict[int, str] = {}
    rounds = 22
    for rnd in range(rounds):
        mode = ("threads", "asyncio")[rnd % 2]
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(q), str(rng.choice([1, 4, 16])),
                                 mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert proc.stdout.readline() == b"ready\n", proc.stderr.read()
            time.sleep(rng.uniform(0.01, 0.25))
            os.kill(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, err
        lines = out.split(b"\n")
        for line in lines[:-1]:           # the last piece may be a torn line
            msgid, seed = line.decode().split()
            acknowledged[int(msgid)] = seed
        # Reopen after every crash, as `qrelay run` would, and check everything so far.
        with Spool(q) as s:
            report = s.recover(verify_bytes=True)
            assert report.quarantined == [], report
            for msgid, seed in acknowledged.items():
                assert s.read_message(msgid) == child_body(seed), (rnd, msgid)
            assert s.stats().messages >= len(acknowledged)
            assert s.recover(verify_bytes=True).quarantined == []
    assert len(acknowledged) > 100, "the child should have enqueued something"
