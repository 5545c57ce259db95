#!/usr/bin/env python3
"""bench_relay_e2e.py: qrelay as a relay, end to end, against same-run baselines.

    python bench/bench_relay_e2e.py                      # issue #5 item 8 figures
    python bench/bench_relay_e2e.py -m 5000 --queue 6000 --ingest 2000   # quicker

Phases (every figure is a ratio to a baseline measured in the same run,
because the machine is shared and noisy):

Each comparison alternates its two sides for `--rounds` rounds and keeps the
best of each side (other load on the machine only ever slows a round down).

  A  direct   flood.py -> sink.py                          rate_direct (flood's accepted/s)
  B  relay    flood.py -> qrelay run -> sink.py (smtproutes)
              rate_e2e = M / (time from flood start to the sink's last message)
              target: rate_e2e >= 0.20 x rate_direct
  C  sink down (smtproutes to a closed port): `--queue` messages are queued
     and wait deferred in one root; each round ingests `--ingest` messages
     into a fresh root (empty queue but for `--warmup` messages) rate_ingest_empty
     and into the loaded root                                 rate_ingest_loaded
              target: rate_ingest_loaded >= 0.9 x rate_ingest_empty
  D  start the sink on that port, `qrelay flush ROOT` of the loaded root:
              rate_drain = queued / (time from flush to the sink's last message)
              target: rate_drain >= 0.8 x rate_e2e

`--slow-sync-ms MS` runs every qrelay process with each sync MS ms slower
(LD_PRELOAD shim, as bench_ingest.py), `--spool-setting NAME=VALUE` adds a
[spool] setting (e.g. single_writer=false to compare direct commits).

Every process started here is stopped by its pid (qrelay by its process
group, which it leads). Exit status 0 if all targets are met, 1 if not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from sink import SinkProcess  # noqa: E402
from smtpload.process import stop_group, terminate  # noqa: E402

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FixedPortSink:
    """bench/sink.py on a given port (SinkProcess always picks port 0)."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.json_file = workdir / f"sink-{port}.json"
        self.log = open(workdir / f"sink-{port}.log", "wb")
        self.proc = subprocess.Popen(
            [PY, str(BENCH / "sink.py"), "--listen", f"127.0.0.1:{port}", "--json", str(self.json_file)],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.port = port
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("sink did not start")

    def stats(self) -> dict:
        try:
            return json.loads(self.json_file.read_text())
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        terminate(self.proc, 10)
        self.log.close()


def wait_sink(stats, n: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = stats()
        if st.get("messages", 0) >= n:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"sink has {st.get('messages', 0)} of {n} messages after {timeout:.0f} s")
        time.sleep(0.1)


def flood(port: int, messages: int, sessions: int, size: int, workdir: Path, tag: str) -> dict:
    out = workdir / f"flood-{tag}.json"
    r = subprocess.run([PY, str(BENCH / "flood.py"), f"127.0.0.1:{port}", "-s", str(sessions),
                        "-m", str(messages), "-l", str(size), "-q", "--no-summary", "--json", str(out),
                        "--to", "u{n}@sink.test", "-f", "a@src.test"],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"flood failed: {r.stderr.strip()}")
    data = json.loads(out.read_text())
    if data["messages"]["accepted"] != messages:
        raise RuntimeError(f"flood: only {data['messages']['accepted']} of {messages} accepted: {data['messages']}")
    return data


class Qrelay:
    # set from the command line: extra qrelay.toml text, extra environment
    toml = ""
    env: dict[str, str] = {}

    def __init__(self, root: Path, sink_port: int, procs: int) -> None:
        subprocess.run([PY, "-m", "engine.cli", "init", str(root), "--me", "mx.bench.test"],
                       check=True, capture_output=True, cwd=REPO)
        (root / "control" / "smtproutes").write_text(f"sink.test:127.0.0.1:{sink_port}\n")
        (root / "control" / "rcpthosts").write_text("sink.test\n")
        # a resolver that is never asked (every route is an IP); the log big
        # enough to count every line of the run.
        (root / "qrelay.toml").write_text(
            '[delivery]\ndns_servers = ["127.0.0.1:9"]\n[log]\nmax_bytes = 16000000\nmax_files = 50\n'
            + self.toml)
        port_file = root.parent / (root.name + ".port")
        self.root = root
        self.out = open(root.parent / (root.name + ".out"), "wb")
        self.proc = subprocess.Popen(
            [PY, "-m", "engine.cli", "run", str(root), "--listen", "127.0.0.1:0", "--procs", str(procs),
             "--port-file", str(port_file)],
            cwd=REPO, env={**os.environ, **self.env}, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("qrelay run did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        # Measure only once the scheduler runs too (it competes for the CPU).
        current = root / "log" / "current"
        while not ((root / "log" / "scheduler.pid").exists() and current.exists()
                   and b"status: local" in current.read_bytes()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("qrelay's scheduler did not start")
            time.sleep(0.05)
        time.sleep(0.5)

    def count(self, word: str) -> int:
        total = 0
        for p in (self.root / "log").iterdir():
            if p.name == "current" or p.name.startswith("@"):
                with open(p, "rb") as f:
                    total += f.read().count(word.encode())
        return total

    def stop(self) -> None:
        stop_group(self.proc, 20)
        self.out.close()


def wait_deferred(q: Qrelay, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while q.count(": deferral: ") < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {q.count(': deferral: ')} of {n} deferrals after {timeout:.0f} s")
        time.sleep(0.25)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--messages", type=int, default=20000)
    ap.add_argument("-s", "--sessions", type=int, default=20)
    ap.add_argument("-l", "--size", type=int, default=1024)
    ap.add_argument("--queue", type=int, default=25000, help="messages waiting deferred in phase C")
    ap.add_argument("--ingest", type=int, default=5000, help="messages per ingest measurement")
    ap.add_argument("--procs", type=int, default=2, help="receiver processes of qrelay run")
    ap.add_argument("--warmup", type=int, default=200,
                    help="messages sent to each fresh root before its measured ingest")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds per comparison; the best of each side counts")
    ap.add_argument("--slow-sync-ms", type=int, default=0,
                    help="make every sync of qrelay's processes this many ms slower")
    ap.add_argument("--spool-setting", action="append", default=[], metavar="NAME=VALUE",
                    help="a [spool] setting of qrelay.toml, as TOML (repeatable)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (roots, logs)")
    a = ap.parse_args()
    if a.ingest >= a.queue:
        ap.error("--ingest must be smaller than --queue")

    work = Path(tempfile.mkdtemp(prefix="qrelay-bench-e2e-"))
    if a.spool_setting:
        Qrelay.toml = "[spool]\n" + "".join(f"{x}\n" for x in a.spool_setting)
    if a.slow_sync_ms:
        from spool_bench_lib import slowsync_env
        Qrelay.env = slowsync_env(work, a.slow_sync_ms)
    fig: dict = {"messages": a.messages, "sessions": a.sessions, "size": a.size,
                 "queue": a.queue, "ingest": a.ingest, "rounds": a.rounds,
                 "slow_sync_ms": a.slow_sync_ms, "spool_settings": a.spool_setting}
    started: list = []

    def stop(p) -> None:
        p.stop()
        started.remove(p)

    try:
        # A and B alternate, best of `rounds` each: the machine is shared.
        sink = SinkProcess(work / "a")
        started.append(sink)
        q = Qrelay(work / "relay", sink.port, a.procs)
        started.append(q)
        direct, e2e, ingest = [], [], []
        received = 0
        for r in range(a.rounds):
            direct.append(flood(sink.port, a.messages, a.sessions, a.size, work, f"direct{r}")["rate"]["accepted_per_s"])
            received = wait_sink(sink.stats, received + a.messages, 60)["messages"]
            t0 = time.time()
            ing = flood(q.port, a.messages, a.sessions, a.size, work, f"relay{r}")
            st = wait_sink(sink.stats, received + a.messages, 600)
            received = st["messages"]
            e2e.append(a.messages / (st["last_message"] - t0))
            ingest.append(ing["rate"]["accepted_per_s"])
            print(f"  round {r}: direct {direct[-1]:.0f}/s, relay end to end {e2e[-1]:.0f}/s "
                  f"(ingest {ingest[-1]:.0f}/s)", flush=True)
        fig.update(rate_direct=max(direct), rate_e2e=max(e2e), rate_relay_ingest=max(ingest),
                   rounds_direct=direct, rounds_e2e=e2e)
        fig["ratio_e2e_direct"] = fig["rate_e2e"] / fig["rate_direct"]
        print(f"A direct flood -> sink: {fig['rate_direct']:.0f} msg/s", flush=True)
        print(f"B relay end to end: {fig['rate_e2e']:.0f} msg/s (ingest {fig['rate_relay_ingest']:.0f}/s) "
              f"= {fig['ratio_e2e_direct']:.2f} x direct (target >= 0.20)", flush=True)
        stop(q)
        stop(sink)

        # C: sink down. `loaded` gets `queue` messages deferred; each round then
        # ingests `ingest` into a fresh empty root and into `loaded`, alternately.
        dead = free_port()
        loaded = Qrelay(work / "down", dead, a.procs)
        started.append(loaded)
        flood(loaded.port, a.queue, a.sessions, a.size, work, "fill")
        wait_deferred(loaded, a.queue, 900)
        empty_rates, loaded_rates = [], []
        waiting = a.queue
        for r in range(a.rounds):
            fresh = Qrelay(work / f"empty{r}", dead, a.procs)
            started.append(fresh)
            # Warm the fresh processes up (first segment, code paths) so the
            # comparison is about the queue, not a cold start: the queue then
            # holds only these few messages.
            flood(fresh.port, a.warmup, a.sessions, a.size, work, f"warmup{r}")
            wait_deferred(fresh, a.warmup, 120)
            empty_rates.append(flood(fresh.port, a.ingest, a.sessions, a.size, work, f"empty{r}")["rate"]["accepted_per_s"])
            stop(fresh)
            loaded_rates.append(flood(loaded.port, a.ingest, a.sessions, a.size, work, f"loaded{r}")["rate"]["accepted_per_s"])
            print(f"  round {r}: ingest into an empty queue {empty_rates[-1]:.0f}/s, "
                  f"with {waiting} deferred {loaded_rates[-1]:.0f}/s", flush=True)
            waiting += a.ingest
            wait_deferred(loaded, waiting, 900)
        fig.update(rate_ingest_empty=max(empty_rates), rate_ingest_loaded=max(loaded_rates),
                   rounds_ingest_empty=empty_rates, rounds_ingest_loaded=loaded_rates)
        fig["ratio_ingest_loaded_empty"] = fig["rate_ingest_loaded"] / fig["rate_ingest_empty"]
        print(f"C ingest into empty queue {fig['rate_ingest_empty']:.0f} msg/s, with >= {a.queue} deferred "
              f"{fig['rate_ingest_loaded']:.0f} msg/s = {fig['ratio_ingest_loaded_empty']:.2f} (target >= 0.9)",
              flush=True)

        # D: sink back, flush, drain everything that waits
        sink2 = FixedPortSink(work, dead)
        started.append(sink2)
        t0 = time.time()
        r = subprocess.run([PY, "-m", "engine.cli", "flush", str(loaded.root)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"flush failed: {r.stderr.strip()}")
        st = wait_sink(sink2.stats, waiting, 900)
        fig["drained"] = waiting
        fig["rate_drain"] = waiting / (st["last_message"] - t0)
        fig["ratio_drain_e2e"] = fig["rate_drain"] / fig["rate_e2e"]
        print(f"D drain of {waiting} after flush: {fig['rate_drain']:.0f} msg/s = {fig['ratio_drain_e2e']:.2f} x "
              f"end-to-end (target >= 0.8)  [{r.stdout.strip()}]", flush=True)
    finally:
        for p in reversed(started):
            p.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = (fig["ratio_e2e_direct"] >= 0.2 and fig["ratio_ingest_loaded_empty"] >= 0.9
          and fig["ratio_drain_e2e"] >= 0.8)
    fig["targets_met"] = ok
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2) + "\n")
    print(json.dumps(fig))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
