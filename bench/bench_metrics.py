#!/usr/bin/env python3
"""bench_metrics.py: what serving /metrics every second costs ingest (issue #14 item 7).

    python bench/bench_metrics.py                 # 20 sessions, 10,000 x 1 KB per flood, 2 rounds
    python bench/bench_metrics.py --page          # the scraper also polls /status.json, as the page does

One `qrelay run` (scheduler off, as in bench_ingest.py: only ingest is
measured, so the queue grows and every scan of it gets bigger) with an SMTP
and an http listener. bench/flood.py drives it with and without a scraper
thread that GETs /metrics once a second, in ABBA order per round (without,
with, with, without), so drift and the growing queue weigh on both sides
alike. Prints each flood's rate, the scrapes' latency, and the ratio
with ÷ without (target: ingest costs < 5 %, i.e. ratio > 0.95).

It also times the calls the hot paths make (engine.metrics) against a bare
prometheus_client counter in multiprocess mode, per call, in this process.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

TARGET = 0.95


class Scraper(threading.Thread):
    """GET each path once a second until stopped; records each request's seconds."""

    def __init__(self, port: int, paths: list[str]) -> None:
        super().__init__(daemon=True)
        self.port, self.paths = port, paths
        self.stopped = threading.Event()
        self.seconds: list[float] = []
        self.errors = 0
        self.bytes = 0

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopped.is_set():
            for path in self.paths:
                started = time.monotonic()
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                    conn.request("GET", path)
                    response = conn.getresponse()
                    self.bytes += len(response.read())
                    conn.close()
                    if response.status != 200:
                        self.errors += 1
                except OSError:
                    self.errors += 1
                self.seconds.append(time.monotonic() - started)
            next_at += 1.0
            self.stopped.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self.stopped.set()
        self.join(15)


def flood(port: int, args: argparse.Namespace, out: Path) -> float:
    cmd = [sys.executable, str(BENCH / "flood.py"), f"127.0.0.1:{port}", "-s", str(args.sessions),
           "-m", str(args.messages), "-l", str(args.size), "-q", "--no-summary", "--json", str(out),
           "--procs", str(args.flood_procs)]
    subprocess.run(cmd, check=True, timeout=args.timeout)
    return json.loads(out.read_text())["rate"]["accepted_per_s"]


def call_costs(work: Path, n: int = 200_000) -> dict[str, float]:
    """µs per call of the hot paths' metrics calls, in multiprocess mode."""
    from engine import metrics
    metrics.enable(work / "metrics-calls")
    from prometheus_client import Counter
    bare = Counter("bench_bare", "a bare counter", ("a",), registry=None).labels("x")

    def noop() -> None:
        pass

    calls = {
        "empty function call": noop,
        "prometheus_client Counter.inc (mmap write)": bare.inc,
        "metrics.message_received()": metrics.message_received,
        "metrics.session_opened()+closed()": lambda: (metrics.session_opened(), metrics.session_closed()),
        "metrics.delivery_result(K) (counter + histogram)": lambda: metrics.delivery_result("remote", "K", 1.5),
    }
    out: dict[str, float] = {}

    async def measure() -> None:   # on a running loop, as in the receivers and the scheduler
        for name, fn in calls.items():
            fn()
            # the best of many short runs: the machine is shared
            out[name] = min(timeit.repeat(fn, number=n // 20, repeat=20)) / (n // 20) * 1e6
        metrics.flush()
    asyncio.run(measure())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="ingest with and without a 1 Hz /metrics scraper")
    p.add_argument("-s", "--sessions", type=int, default=20)
    p.add_argument("-m", "--messages", type=int, default=10000, help="messages per flood")
    p.add_argument("-l", "--size", type=int, default=1024)
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="qrelay receiver processes")
    p.add_argument("--flood-procs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds")
    p.add_argument("--page", action="store_true", help="the scraper also GETs /status.json each second")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()

    from engine.home import init_home
    from qrelay_process import QrelayProcess, cpu_seconds, service_pids

    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        work = Path(tmp)
        work.chmod(0o711)                 # as root, the run user must reach ROOT
        costs = call_costs(work)
        root = init_home(work / "qrelay", me="bench.local")
        (root / "qrelay.toml").write_text("[scheduler]\nenabled = false\n")
        port_file = work / "ports"
        q = QrelayProcess(root, args.procs, ("--listen", "http://127.0.0.1:0", "--port-file", str(port_file)),
                          log=work / "qrelay.log")
        http_port = int(port_file.read_text().split()[1])
        paths = ["/metrics"] + (["/status.json"] if args.page else [])
        without: list[float] = []
        with_: list[float] = []
        latencies: list[float] = []
        errors = 0
        deadline = time.monotonic() + 20
        while not (status := service_pids(q.pid, b"qrelay: status")) and time.monotonic() < deadline:
            time.sleep(0.1)    # the supervisor forks its children after it announces
        scrape_cpu = 0.0
        scraped_seconds = 0.0
        n = 0
        try:
            for _ in range(args.rounds):
                for scraped in (False, True, True, False):
                    n += 1
                    scraper = Scraper(http_port, paths) if scraped else None
                    cpu0, t0 = cpu_seconds(status), time.monotonic()
                    if scraper:
                        scraper.start()
                    try:
                        rate = flood(q.port, args, work / f"flood{n}.json")
                    finally:
                        if scraper:
                            scraper.stop()
                    if scraper:
                        scrape_cpu += cpu_seconds(status) - cpu0
                        scraped_seconds += time.monotonic() - t0
                    if scraper:
                        with_.append(rate)
                        latencies += scraper.seconds
                        errors += scraper.errors
                    else:
                        without.append(rate)
                    print(f"flood {n:2d} {'with' if scraped else 'without'} scraper: {rate:8.1f} msg/s"
                          + (f" ({len(scraper.seconds)} GETs, {scraper.bytes // max(1, len(scraper.seconds))}"
                             f" bytes each)" if scraper else ""), flush=True)
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
            conn.request("GET", "/status.json")
            doc = json.loads(conn.getresponse().read())
            conn.close()
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"bench_metrics: error: {exc}", file=sys.stderr)
            return 2
        finally:
            q.stop(20)

    ratio = statistics.median(with_) / statistics.median(without)
    print()
    print("metrics calls, µs per call (best of 20 runs, this process, multiprocess mode):")
    for name, us in costs.items():
        print(f"  {name:52s} {us:7.3f}")
    print(f"scrapes of {' + '.join(paths)}: {len(latencies)}, median {statistics.median(latencies) * 1000:.1f} ms,"
          f" max {max(latencies) * 1000:.1f} ms, errors {errors}; queue at the end:"
          f" {doc['queue']['messages']} messages (last scan {doc['queue']['summary_seconds']:.2f} s)")
    print(f"status service CPU while scraped: {scrape_cpu:.2f} s over {scraped_seconds:.0f} s"
          f" = {100 * scrape_cpu / max(scraped_seconds, 1e-9):.1f} % of one core,"
          f" {1000 * scrape_cpu / max(1, len(latencies)):.1f} ms per GET")
    print(f"ingest without scraper: {', '.join(f'{r:.0f}' for r in without)} msg/s")
    print(f"ingest with scraper   : {', '.join(f'{r:.0f}' for r in with_)} msg/s")
    print(f"with ÷ without (medians): {ratio:.3f}  (target > {TARGET}: costs < 5 %)"
          f" -> {'met' if ratio > TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
