#!/usr/bin/env python3
"""`qrelay doctor ROOT` (no argument) on a big queue: issue #14's target is
< 2 s for 250,000 messages, the whole command as an operator runs it.

    python bench/bench_doctor.py                     # 250,000 messages
    python bench/bench_doctor.py --messages 20000 --runs 1
    python bench/bench_doctor.py --dir /tmp/q --keep # reuse the root next time

The queue is built with the spool API directly (engine.queue.Spool's bulk
path, as bench/spool_bench_lib.py does): one recipient per message, spread
over `--domains` destinations; 10 % left not yet preprocessed, 60 % deferred
with a remote error text, the rest pending. Then `python -m engine.cli doctor
ROOT --json` runs `--runs` times in a fresh process; the figure printed is
the wall time of each run (the median last), beside `qrelay qstat` (a
baseline: the same process start-up and spool open, O(1) work).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from engine.home import init_home  # noqa: E402
from engine.queue import Deferred, Envelope, Spool  # noqa: E402
from bench_queue_tools import cli  # noqa: E402  (wall and CPU seconds of one command)

MESSAGE = (b"Received: from bench\r\nSubject: doctor bench\r\n\r\n" + b"x" * 512)[:512]


def build_queue(root: Path, messages: int, domains: int, batch: int = 5000) -> float:
    """Fill ROOT/queue; returns the seconds it took."""
    t0 = time.perf_counter()
    now = time.time()
    spool = Spool(root / "queue")
    try:
        done = 0
        while done < messages:
            n = min(batch, messages - done)
            items = [(Envelope("bench@example.com", (f"u{done + i}@d{(done + i) % domains}.test",),
                               pid=1, uid=1), MESSAGE) for i in range(n)]
            ids = spool._write_batch(items)  # bench-only bulk path
            keep_todo = n // 10
            ready = ids[keep_todo:]
            spool.preprocess_many([(m, ["remote"]) for m in ready], now=now + 3600)
            deferred = ready[:len(ready) * 2 // 3]
            spool.apply([Deferred(m, 0, now + 7200, "Sorry, I wasn't able to establish an "
                                  "SMTP connection. (#4.4.1)") for m in deferred])
            done += n
    finally:
        spool.close()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=250_000)
    p.add_argument("--domains", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", help="where the root goes (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the root (and reuse it if present)")
    args = p.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-doctor-"))
    root = base / "root"
    try:
        if not (root / "queue" / "index" / "data.mdb").exists():
            init_home(root, me="mx.bench.test", force=True)
            took = build_queue(root, args.messages, args.domains)
            print(f"queue: {args.messages} messages over {args.domains} destinations "
                  f"built in {took:.1f} s")
        base_s, base_cpu, proc = cli("qstat", str(root))
        print(f"qstat (baseline): {base_s:.2f} s wall, {base_cpu:.2f} s CPU  "
              f"{' / '.join(proc.stdout.splitlines())}")
        times, cpus = [], []
        for _ in range(args.runs):
            took, cpu, proc = cli("doctor", str(root), "--json")
            if proc.returncode not in (0, 1):
                print(proc.stdout, proc.stderr, file=sys.stderr)
                return 1
            times.append(took)
            cpus.append(cpu)
        report = json.loads(proc.stdout)
        facts = [n["text"] for n in report["notes"] if n["check"] == "queue"][:2]
        print(f"doctor ROOT: wall {', '.join(f'{t:.2f}' for t in times)} s, median "
              f"{statistics.median(times):.2f} s (target < 2 s); CPU median "
              f"{statistics.median(cpus):.2f} s; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs; {len(report['findings'])} findings")
        for text in facts:
            print(f"  {text}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
