#!/usr/bin/env python3
"""bench_relay_e2e.py: qrelay as a relay, end to end, against same-run baselines.

    python bench/bench_relay_e2e.py                      # issue #5 item 8 figures
    python bench/bench_relay_e2e.py -m 5000 --queue 6000 --ingest 2000   # quicker
    python bench/bench_relay_e2e.py -m 20000 --queue 0 --target other-mta:25
    python bench/bench_relay_e2e.py -m 20000 --queue 0 --delivery-procs 0,2 --domains 8

Phases (every figure is a ratio to a baseline measured in the same run,
because the machine is shared and noisy):

Each comparison alternates its sides for `--rounds` rounds and keeps the
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
`--queue 0` runs A and B only.

Beside A and B, in the same rounds:
  `--target HOST:PORT`  flood another MTA (set up to relay to a sink of its
     own) with the same load: its accept rate (this bench cannot see that
     sink), as a ratio to rate_direct. With `--no-qrelay` only A and the
     target run.
  `--delivery-procs A,B,...`  one root per `[delivery] worker_procs` value;
     the first is the qrelay of B, C and D, each other one is flooded end to
     end in turn (rate_e2e_worker_procs), as a ratio to the first. Use it with
     `--domains N` (recipients spread over d0.test .. dN-1.test): one domain
     always goes to the same worker.

`--slow-sync-ms MS` runs every qrelay process with each sync MS ms slower
(LD_PRELOAD shim, as bench_ingest.py), and phase B then also floods a root
on the plain disk in the same rounds (`relay_fast`): the slow disk's end to
end as a ratio to it, target >= 0.95 (issue #15 item 8). `--spool-setting
NAME=VALUE` adds a [spool] setting (e.g. single_writer=false to compare
direct commits).

Every process started here is stopped by its pid (qrelay by its process
group, which it leads). Exit status 0 if all targets are met, 1 if not, 2
(one line) if the run could not be made: bad arguments, a process that does
not start, mail that stops reaching the sink for `--idle` seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from qrelay_process import QrelayProcess, QrelayStartError  # noqa: E402
from sink import SinkProcess  # noqa: E402
from smtpload.cli import (OneLineParser, UsageError, fail, nonneg_float, nonneg_int,  # noqa: E402
                          parse_hostport, positive_int, run_main)
from smtpload.process import free_port  # noqa: E402

PROG = "bench_relay_e2e.py"
PY = sys.executable
# Longest wait for one root's scheduler to log that it runs.
SCHEDULER_START_TIMEOUT = 20.0
# Bound on one wait for the sink or for deferrals; --idle ends a stalled one sooner.
LONGEST_WAIT = 3600.0


def procs_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"need distinct integers >= 0: {text!r}")
    return values


def build_parser() -> OneLineParser:
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--messages", type=positive_int, default=20000)
    ap.add_argument("-s", "--sessions", type=positive_int, default=20)
    ap.add_argument("-l", "--size", type=nonneg_int, default=1024)
    ap.add_argument("--queue", type=nonneg_int, default=25000,
                    help="messages waiting deferred in phase C (0: no phases C and D)")
    ap.add_argument("--ingest", type=positive_int, default=5000, help="messages per ingest measurement")
    ap.add_argument("--procs", type=positive_int, default=2, help="receiver processes of qrelay run")
    ap.add_argument("--warmup", type=positive_int, default=200,
                    help="messages sent to each fresh root before its measured ingest")
    ap.add_argument("--rounds", type=positive_int, default=3,
                    help="alternating rounds per comparison; the best of each side counts")
    ap.add_argument("--target", metavar="HOST:PORT",
                    help="also flood this server (any MTA) with the same load in phase A/B")
    ap.add_argument("--no-qrelay", action="store_true", help="with --target: phase A and the target only")
    ap.add_argument("--delivery-procs", type=procs_list, default=None, metavar="N[,N...]",
                    help="[delivery] worker_procs; several = compared end to end in the same rounds")
    ap.add_argument("--domains", type=positive_int, default=1,
                    help="recipient domains d0.test.. (default 1: sink.test)")
    ap.add_argument("--sink-procs", type=positive_int, default=1, help="sink.py --procs")
    ap.add_argument("--flood-arg", action="append", default=[], metavar="ARG",
                    help="extra flood.py argument, as --flood-arg=--pipelining (repeatable)")
    ap.add_argument("--idle", type=nonneg_float, default=30.0,
                    help="no progress at the sink (or in deferrals) for this long = the run failed (s)")
    ap.add_argument("--slow-sync-ms", type=nonneg_int, default=0,
                    help="make every sync of qrelay's processes this many ms slower")
    ap.add_argument("--spool-setting", action="append", default=[], metavar="NAME=VALUE",
                    help="a [spool] setting of qrelay.toml, as TOML (repeatable)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (roots, logs)")
    return ap


class BenchError(Exception):
    """The run could not be made (one line, exit 2)."""


@dataclass(frozen=True, slots=True)
class Load:
    """What every flood sends, and how every root is set up."""
    sessions: int
    size: int
    domains: tuple[str, ...]
    flood_args: tuple[str, ...]
    procs: int
    toml: str                 # extra qrelay.toml text ([spool] settings)
    env: dict[str, str]       # extra environment of qrelay (the slow-sync shim)
    idle: float
    to: tuple[str, ...] = ("--to", "u{n}@{domain}")   # flood's recipients (bench_mx: its mailboxes)


def wait_sink(sink: SinkProcess, n: int, load: Load, what: str) -> dict:
    """The sink's stats once it has `n` messages; BenchError if its count stalls."""
    st = sink.wait_messages(n, LONGEST_WAIT, idle=load.idle)
    if st.get("messages", 0) < n:
        raise BenchError(f"{what}: the sink has {st.get('messages', 0)} of {n} messages, "
                         f"none more for {load.idle:g} s")
    return st


def flood(address: str, messages: int, load: Load, workdir: Path, tag: str, strict: bool = True) -> dict:
    """flood.py's JSON report; with `strict`, every message must be accepted."""
    out = workdir / f"flood-{tag}.json"
    cmd = [PY, str(BENCH / "flood.py"), address, "-s", str(load.sessions), "-m", str(messages),
           "-l", str(load.size), "-q", "--no-summary", "--json", str(out),
           *load.to, "-f", "a@src.test", *load.flood_args]
    for domain in load.domains:
        cmd += ["--domain", domain]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=LONGEST_WAIT)
    if r.returncode != 0:
        raise BenchError(f"flood.py -> {address} ({tag}) failed: "
                         f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    data = json.loads(out.read_text())
    if strict and data["messages"]["accepted"] != messages:
        raise BenchError(f"flood ({tag}): only {data['messages']['accepted']} of {messages} accepted: "
                         f"{data['replies'][:3]}")
    return data


def qrelay_cli(*args: str, stdin: str | None = None, what: str = "") -> str:
    """Run `qrelay ARGS` (the real CLI, as an operator would); its stdout, or BenchError."""
    r = subprocess.run([PY, "-m", "engine.cli", *args], input=stdin, capture_output=True,
                       text=True, cwd=REPO)
    if r.returncode != 0:
        raise BenchError(f"qrelay {what or ' '.join(args[:2])} failed: "
                         f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return r.stdout


class RelayRoot:
    """A fresh qrelay root whose smtproutes send the load's domains to
    127.0.0.1:`port`, and its `qrelay run`, measured only once the scheduler
    runs too (it competes for the CPU).

    `port=None`: no smtproutes nor rcpthosts for the load's domains; then
    `prepare(root)`, called before the start, makes them local (bench_mx.py);
    `delivery_toml`: more [delivery] lines of its qrelay.toml."""

    def __init__(self, root: Path, port: int | None, load: Load, worker_procs: int | None = None,
                 *, prepare: Callable[[Path], None] | None = None, delivery_toml: str = "") -> None:
        qrelay_cli("init", str(root), "--me", "mx.bench.test", what=f"init {root.name}")
        if port is not None:
            (root / "control" / "smtproutes").write_text(
                "".join(f"{d}:127.0.0.1:{port}\n" for d in load.domains))
            (root / "control" / "rcpthosts").write_text("".join(f"{d}\n" for d in load.domains))
        if prepare is not None:
            prepare(root)
        # a resolver that is never asked (every route is an IP); the log big
        # enough to count every line of the run.
        workers = f"worker_procs = {worker_procs}\n" if worker_procs is not None else ""
        (root / "qrelay.toml").write_text(
            f'[delivery]\ndns_servers = ["127.0.0.1:9"]\n{workers}{delivery_toml}'
            '[log]\nmax_bytes = 16000000\nmax_files = 50\n'
            + load.toml)
        self.root = root
        try:
            self.run = QrelayProcess(root, load.procs, env=load.env,
                                     log=root.parent / (root.name + ".out"))
        except QrelayStartError as exc:
            raise BenchError(f"{root.name}: {exc}") from None
        self.port = self.run.port
        current = root / "log" / "current"
        deadline = time.monotonic() + SCHEDULER_START_TIMEOUT
        while not ((root / "log" / "scheduler.pid").exists() and current.exists()
                   and b"status: local" in current.read_bytes()):
            if time.monotonic() > deadline or self.run.proc.poll() is not None:
                self.stop()
                raise BenchError(f"{root.name}: qrelay's scheduler did not start (see {root.name}.out)")
            time.sleep(0.05)

    def count(self, word: str) -> int:
        total = 0
        for p in (self.root / "log").iterdir():
            if p.name == "current" or p.name.startswith("@"):
                with open(p, "rb") as f:
                    total += f.read().count(word.encode())
        return total

    def wait_deferred(self, n: int, idle: float) -> None:
        """Until the log counts `n` deferrals; BenchError if the count stalls."""
        last, changed = -1, time.monotonic()
        while (got := self.count(": deferral: ")) < n:
            now = time.monotonic()
            if got != last:
                last, changed = got, now
            elif now - changed > idle:
                raise BenchError(f"{self.root.name}: only {got} of {n} deferrals, none more for {idle:g} s")
            time.sleep(0.25)

    def stop(self) -> None:
        self.run.stop(20)


# With --slow-sync-ms: the end to end on the slow disk / on the plain disk.
SLOW_TARGET = 0.95


def e2e_kinds(a) -> list[tuple[str, int | None]]:
    """(name, worker_procs) of each root of phase B: `relay` first, then each
    other --delivery-procs value, then `relay_fast` (--slow-sync-ms)."""
    if a.no_qrelay:
        return []
    dprocs = a.delivery_procs or [None]
    fast = [("relay_fast", dprocs[0])] if a.slow_sync_ms else []
    return [("relay", dprocs[0])] + [(f"relay_dp{n}", n) for n in dprocs[1:]] + fast


def phase_ab(a, load: Load, work: Path, started: list, fig: dict) -> None:
    """Direct, relay end to end (each --delivery-procs root), target: in turn, every round."""
    sink = SinkProcess(work / "a", "--procs", str(a.sink_procs))
    started.append(sink)
    roots = {}
    for kind, dprocs in e2e_kinds(a):
        # relay_fast: the same root on the plain disk (no slow-sync shim)
        roots[kind] = RelayRoot(work / kind, sink.port,
                                dataclasses.replace(load, env={}) if kind == "relay_fast" else load,
                                dprocs)
        started.append(roots[kind])
    direct: list[float] = []
    e2e: dict[str, list[float]] = {k: [] for k in roots}
    ingest: dict[str, list[float]] = {k: [] for k in roots}
    target: list[float] = []
    accepted_target = 0
    received = 0
    for r in range(a.rounds):
        direct.append(flood(sink.address, a.messages, load, work, f"direct{r}")["rate"]["accepted_per_s"])
        received = wait_sink(sink, received + a.messages, load, "direct")["messages"]
        line = f"  round {r}: direct {direct[-1]:.0f}/s"
        for kind, q in roots.items():
            t0 = time.time()
            ing = flood(f"127.0.0.1:{q.port}", a.messages, load, work, f"{kind}{r}")
            st = wait_sink(sink, received + a.messages, load, f"{kind} end to end")
            received = st["messages"]
            e2e[kind].append(a.messages / (st["last_message"] - t0))
            ingest[kind].append(ing["rate"]["accepted_per_s"])
            name = {"relay": "relay", "relay_fast": "plain disk"}.get(
                kind, f"worker_procs={kind[len('relay_dp'):]}")
            line += f", {name} end to end {e2e[kind][-1]:.0f}/s (ingest {ingest[kind][-1]:.0f}/s)"
        if a.target:
            rep = flood(a.target, a.messages, load, work, f"target{r}", strict=False)
            target.append(rep["rate"]["accepted_per_s"])
            accepted_target = rep["messages"]["accepted"]
            line += f", target {target[-1]:.0f}/s"
        print(line, flush=True)
    fig.update(rate_direct=max(direct), rounds_direct=direct)
    print(f"A direct flood -> sink: {fig['rate_direct']:.0f} msg/s", flush=True)
    if "relay" in roots:
        fig.update(rate_e2e=max(e2e["relay"]), rate_relay_ingest=max(ingest["relay"]),
                   rounds_e2e=e2e["relay"])
        fig["ratio_e2e_direct"] = fig["rate_e2e"] / fig["rate_direct"]
        if "relay_fast" in e2e:
            fig["ratio_slow_fast_rounds"] = [round(s / f, 2) for s, f in zip(e2e["relay"], e2e["relay_fast"])]
        first = "" if a.delivery_procs is None else f" (worker_procs = {a.delivery_procs[0]})"
        print(f"B relay end to end{first}: {fig['rate_e2e']:.0f} msg/s (ingest {fig['rate_relay_ingest']:.0f}/s) "
              f"= {fig['ratio_e2e_direct']:.2f} x direct (target >= 0.20)", flush=True)
    if "relay_fast" in roots:
        fig.update(rate_e2e_fast=max(e2e["relay_fast"]), rounds_e2e_fast=e2e["relay_fast"])
        fig["ratio_slow_fast"] = fig["rate_e2e"] / fig["rate_e2e_fast"]
        print(f"B relay end to end, every sync +{a.slow_sync_ms} ms: {fig['rate_e2e']:.0f} msg/s = "
              f"{fig['ratio_slow_fast']:.2f} x plain disk ({fig['rate_e2e_fast']:.0f} msg/s; "
              f"target >= {SLOW_TARGET}; rounds {fig['ratio_slow_fast_rounds']})", flush=True)
    for kind in [k for k in roots if k.startswith("relay_dp")]:
        n = int(kind[len("relay_dp"):])
        one = {"rate_e2e": max(e2e[kind]), "rate_ingest": max(ingest[kind]), "rounds_e2e": e2e[kind]}
        one["ratio_e2e_first"] = one["rate_e2e"] / fig["rate_e2e"]
        fig.setdefault("worker_procs", {"first": a.delivery_procs[0]})[str(n)] = one
        print(f"B relay end to end, worker_procs = {n}: {one['rate_e2e']:.0f} msg/s "
              f"(ingest {one['rate_ingest']:.0f}/s) = {one['ratio_e2e_first']:.2f} x worker_procs = "
              f"{a.delivery_procs[0]}", flush=True)
    if a.target:
        fig["target"] = {"address": a.target, "rate": max(target), "rounds": target,
                         "accepted": accepted_target, "ratio_direct": max(target) / fig["rate_direct"]}
        short = "" if accepted_target == a.messages else f" ({accepted_target} of {a.messages} accepted)"
        print(f"T flood -> {a.target} (--target): {max(target):.0f} msg/s{short} "
              f"= {fig['target']['ratio_direct']:.2f} x direct", flush=True)
    for q in roots.values():
        q.stop()
        started.remove(q)
    sink.stop()
    started.remove(sink)


def phase_cd(a, load: Load, work: Path, started: list, fig: dict) -> None:
    """Ingest with a deferred queue against an empty one; then the drain after a flush."""
    dprocs = a.delivery_procs[0] if a.delivery_procs else None
    # C: sink down. `loaded` gets `queue` messages deferred; each round then
    # ingests `ingest` into a fresh empty root and into `loaded`, alternately.
    dead = free_port()
    loaded = RelayRoot(work / "down", dead, load, dprocs)
    started.append(loaded)
    flood(f"127.0.0.1:{loaded.port}", a.queue, load, work, "fill")
    loaded.wait_deferred(a.queue, load.idle)
    empty_rates, loaded_rates = [], []
    waiting = a.queue
    for r in range(a.rounds):
        fresh = RelayRoot(work / f"empty{r}", dead, load, dprocs)
        started.append(fresh)
        # Warm the fresh processes up (first segment, code paths) so the
        # comparison is about the queue, not a cold start: the queue then
        # holds only these few messages.
        flood(f"127.0.0.1:{fresh.port}", a.warmup, load, work, f"warmup{r}")
        fresh.wait_deferred(a.warmup, load.idle)
        empty_rates.append(flood(f"127.0.0.1:{fresh.port}", a.ingest, load, work,
                                 f"empty{r}")["rate"]["accepted_per_s"])
        fresh.stop()
        started.remove(fresh)
        loaded_rates.append(flood(f"127.0.0.1:{loaded.port}", a.ingest, load, work,
                                  f"loaded{r}")["rate"]["accepted_per_s"])
        print(f"  round {r}: ingest into an empty queue {empty_rates[-1]:.0f}/s, "
              f"with {waiting} deferred {loaded_rates[-1]:.0f}/s", flush=True)
        waiting += a.ingest
        loaded.wait_deferred(waiting, load.idle)
    fig.update(rate_ingest_empty=max(empty_rates), rate_ingest_loaded=max(loaded_rates),
               rounds_ingest_empty=empty_rates, rounds_ingest_loaded=loaded_rates)
    fig["ratio_ingest_loaded_empty"] = fig["rate_ingest_loaded"] / fig["rate_ingest_empty"]
    print(f"C ingest into empty queue {fig['rate_ingest_empty']:.0f} msg/s, with >= {a.queue} deferred "
          f"{fig['rate_ingest_loaded']:.0f} msg/s = {fig['ratio_ingest_loaded_empty']:.2f} (target >= 0.9)",
          flush=True)

    # D: sink back, flush, drain everything that waits
    sink2 = SinkProcess(work / "d", "--procs", str(a.sink_procs), port=dead)
    started.append(sink2)
    t0 = time.time()
    r = subprocess.run([PY, "-m", "engine.cli", "flush", str(loaded.root)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"flush failed: {r.stderr.strip()}")
    st = wait_sink(sink2, waiting, load, "drain")
    fig["drained"] = waiting
    fig["rate_drain"] = waiting / (st["last_message"] - t0)
    fig["ratio_drain_e2e"] = fig["rate_drain"] / fig["rate_e2e"]
    print(f"D drain of {waiting} after flush: {fig['rate_drain']:.0f} msg/s = {fig['ratio_drain_e2e']:.2f} x "
          f"end-to-end (target >= 0.8)  [{r.stdout.strip()}]", flush=True)


def targets_met(fig: dict) -> bool:
    """Every target of the phases that ran."""
    ok = True
    for ratio, least in (("ratio_e2e_direct", 0.2), ("ratio_ingest_loaded_empty", 0.9),
                         ("ratio_drain_e2e", 0.8), ("ratio_slow_fast", SLOW_TARGET)):
        if ratio in fig:
            ok = ok and fig[ratio] >= least
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.no_qrelay and not a.target:
        ap.error("--no-qrelay needs --target")
    if a.target:
        try:
            parse_hostport(a.target)
        except UsageError as exc:
            ap.error(str(exc))
    if a.queue and a.ingest >= a.queue:
        ap.error("--ingest must be smaller than --queue")

    work = Path(tempfile.mkdtemp(prefix="qrelay-bench-e2e-"))
    # As root, qrelay's children run as the qrelay user: it must reach the roots.
    work.chmod(0o711)
    env: dict[str, str] = {}
    if a.slow_sync_ms:
        from spool_bench_lib import slowsync_env
        env = slowsync_env(work, a.slow_sync_ms)
    domains = ("sink.test",) if a.domains == 1 else tuple(f"d{i}.test" for i in range(a.domains))
    load = Load(sessions=a.sessions, size=a.size, domains=domains, flood_args=tuple(a.flood_arg),
                procs=a.procs, toml=("[spool]\n" + "".join(f"{x}\n" for x in a.spool_setting)
                                     if a.spool_setting else ""), env=env, idle=a.idle)
    fig: dict = {"messages": a.messages, "sessions": a.sessions, "size": a.size,
                 "queue": a.queue, "ingest": a.ingest, "rounds": a.rounds,
                 "slow_sync_ms": a.slow_sync_ms, "spool_settings": a.spool_setting,
                 "domains": a.domains, "delivery_procs": a.delivery_procs, "flood_args": a.flood_arg}
    started: list = []
    try:
        phase_ab(a, load, work, started, fig)
        if a.queue and not a.no_qrelay:
            phase_cd(a, load, work, started, fig)
    except BenchError as exc:
        fail(PROG, str(exc))
    finally:
        for p in reversed(started):
            p.stop()
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ok = targets_met(fig)
    fig["targets_met"] = ok
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2) + "\n")
    print(json.dumps(fig))
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
