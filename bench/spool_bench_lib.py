"""Measurement helpers for bench_spool.py (also run as a worker subprocess).

    python bench/spool_bench_lib.py rate DIR PRODUCERS SECONDS   -> "rate <msgs/s>"
    python bench/spool_bench_lib.py probe DIR                     -> JSON timings + peak RSS

Producers are threads calling the blocking `Spool.enqueue` (each waits for
its message to be durable before sending the next, like an SMTP session
waiting for its 250), so the rate is what concurrent receivers would see.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config.settings import SpoolSettings  # noqa: E402
from engine.queue import Envelope, Spool  # noqa: E402

def preload_shim(workdir: Path, name: str) -> str:
    """bench/NAME.c built into `workdir` once, as a library for LD_PRELOAD."""
    import subprocess
    so = Path(workdir) / f"{name}.so"
    if not so.exists():
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(so),
                        str(Path(__file__).resolve().parent / f"{name}.c"), "-ldl"],
                       check=True)
    return str(so)


def slowsync_env(workdir: Path, ms: int) -> dict[str, str]:
    """Environment that makes every sync of a process `ms` ms slower: the
    LD_PRELOAD shim spool_slowsync.c."""
    return {"LD_PRELOAD": preload_shim(workdir, "spool_slowsync"), "SLOWSYNC_MS": str(ms)}


MESSAGE = (b"Received: from bench\r\nSubject: spool bench\r\n\r\n" + b"x" * 1024)[:1024]
ENVELOPE = Envelope("bench@example.com", ("rcpt@example.net",), pid=1, uid=1)


def enqueue_rate(spool: Spool, producers: int, seconds: float) -> float:
    """Messages/s made durable by `producers` threads in about `seconds`."""
    counts = [0] * producers
    stop = time.monotonic() + seconds
    start = threading.Barrier(producers + 1)

    def produce(k: int) -> None:
        start.wait()
        n = 0
        while time.monotonic() < stop:
            spool.enqueue(ENVELOPE, MESSAGE)
            n += 1
        counts[k] = n
    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    start.wait()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def submit_rate(spool: Spool, tasks: int, seconds: float) -> float:
    """Like enqueue_rate with asyncio tasks calling `submit` (as receivers do)."""
    import asyncio

    async def run() -> float:
        stop = time.monotonic() + seconds
        counts = [0] * tasks

        async def produce(k: int) -> None:
            while time.monotonic() < stop:
                await spool.submit(ENVELOPE, MESSAGE)
                counts[k] += 1
        t0 = time.monotonic()
        await asyncio.gather(*(produce(k) for k in range(tasks)))
        return sum(counts) / (time.monotonic() - t0)
    return asyncio.run(run())


def fsync_per_file_rate(directory: Path, count: int) -> float:
    """The naive spool: one fsync'd 1 KB file create per message."""
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for i in range(count):
        fd = os.open(directory / f"m{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, MESSAGE)
        os.fsync(fd)
        os.close(fd)
    return count / (time.monotonic() - t0)


def fill(spool: Spool, count: int, batch: int = 5000, preprocessed_share: float = 0.9,
         now: float | None = None) -> None:
    """Queue `count` 1 KB messages quickly (one commit per `batch`); most of
    them preprocessed and deferred into the future, the rest in todo."""
    now = time.time() if now is None else now
    done = 0
    while done < count:
        n = min(batch, count - done)
        ids = spool._write_batch([(ENVELOPE, MESSAGE)] * n)  # bench-only bulk path
        cut = int(n * preprocessed_share)
        spool.preprocess_many([(m, ["remote"]) for m in ids[:cut]],
                              now=now + 3600 + done)  # due later: the head is the todo
        done += n


def probe(directory: str) -> dict:
    """Open a big spool in this fresh process; time qstat and the first due
    batch; enqueue a little; report peak RSS."""
    t0 = time.perf_counter()
    spool = Spool(directory)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = spool.stats()
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    jobs = spool.due(time.time() + 10 ** 6, limit=100)
    t_due = time.perf_counter() - t0
    t0 = time.perf_counter()
    todo = spool.todo(100)
    t_todo = time.perf_counter() - t0
    rate = enqueue_rate(spool, 32, 1.0)
    spool.close()
    return {"open_s": t_open, "stats_s": t_stats, "due_s": t_due, "todo_s": t_todo,
            "messages": stats.messages, "not_preprocessed": stats.not_preprocessed,
            "due_jobs": len(jobs), "todo_ids": len(todo), "rate_32": rate,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def median(values: list[float]) -> float:
    return statistics.median(values)


def settings_from(text: str) -> SpoolSettings:
    """SpoolSettings from "name=value,name=value" (booleans as 0/1)."""
    fields = {f.name: f.type for f in dataclasses.fields(SpoolSettings)}
    values = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"SPOOL_SETTINGS: unknown setting {name!r}")
        values[name] = value == "1" if fields[name] in (bool, "bool") else int(value)
    return SpoolSettings(**values)


def main(argv: list[str]) -> None:
    if argv[0] in ("rate", "arate"):
        spool = Spool(argv[1], settings_from(os.environ.get("SPOOL_SETTINGS", "")))
        measure = enqueue_rate if argv[0] == "rate" else submit_rate
        try:
            measure(spool, int(argv[2]), 0.2)  # warm up
            print(f"rate {measure(spool, int(argv[2]), float(argv[3])):.1f}", flush=True)
        finally:
            spool.close()
    elif argv[0] == "probe":
        print(json.dumps(probe(argv[1])), flush=True)
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
