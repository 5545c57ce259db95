#!/usr/bin/env python3
"""relay.py: the end-to-end benchmark — flood → qrelay → sink, against
flood → sink directly, measured in the same run.

    python bench/relay.py                          # 20 sessions, 1 KB, 5000 msgs
    python bench/relay.py -s 50 -m 20000 --procs 2 --pipelining -d --json r.json
    python bench/relay.py --target 127.0.0.1:25    # also the same load against another server
    python bench/relay.py --rounds 5               # alternating rounds, medians
    python bench/relay.py --delivery-procs 0,2 --domains 8   # worker_procs 0 vs 2, same run

Steps: start bench/sink.py; flood it directly (the baseline); `qrelay init` a
temporary root whose control/smtproutes sends everything to the sink; start
`qrelay run ROOT --listen 127.0.0.1:0`; flood it (ingest rate); wait, with a
bound, until the sink has every accepted message (end-to-end rate). If the
sink's count stops growing for --idle seconds, delivery is not happening and
only ingest is reported (detected, never waited out). With --target, the same
flood runs against that server too, for side-by-side numbers. Every process
started is stopped by its pid. Exit 2 (one line) if the set-up cannot run.
With --delivery-procs A,B,... one root per value (`[delivery] worker_procs`)
runs side by side and each is flooded in turn in every round; the first is
the `qrelay` figure, the others are reported with their ratio to it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from smtpload.cli import (OneLineParser, UsageError, fail, nonneg_float, nonneg_int,  # noqa: E402
                          parse_hostport, positive_int, write_json_atomic)
from sink import SinkProcess  # noqa: E402
from smtpload.process import terminate  # noqa: E402

PROG = "relay.py"
# Seconds to wait for `qrelay run` to write its port file.
QRELAY_START_TIMEOUT = 30.0


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="end-to-end relay benchmark (see the docstring)")
    p.add_argument("-s", "--sessions", type=positive_int, default=20)
    p.add_argument("-m", "--messages", type=positive_int, default=5000)
    p.add_argument("-l", "--size", type=nonneg_int, default=1024)
    p.add_argument("-r", "--rcpts", type=positive_int, default=1)
    p.add_argument("--pipelining", action="store_true", help="flood.py --pipelining")
    p.add_argument("-d", "--reuse", action="store_true", help="flood.py -d (reuse connections)")
    p.add_argument("--flood-procs", type=positive_int, default=1, help="flood.py --procs")
    p.add_argument("--procs", type=positive_int, default=1, help="qrelay run --procs")
    p.add_argument("--sink-procs", type=positive_int, default=1, help="sink.py --procs")
    p.add_argument("--delivery-procs", type=procs_list, default=None, metavar="N[,N...]",
                   help="[delivery] worker_procs of qrelay; several = compared in the same run")
    p.add_argument("--domains", type=positive_int, default=1,
                   help="recipient domains d0.test.. (default 1: flood's sink.test)")
    p.add_argument("--target", metavar="HOST:PORT",
                   help="also flood this server (any MTA) with the same load")
    p.add_argument("--no-qrelay", action="store_true", help="skip qrelay (with --target)")
    p.add_argument("--e2e-timeout", type=nonneg_float, default=120.0,
                   help="longest wait for the sink to receive everything (s)")
    p.add_argument("--idle", type=nonneg_float, default=5.0,
                   help="no delivery progress for this long = no delivery (s)")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="alternating rounds; medians are reported (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary root and logs")
    p.add_argument("--json", metavar="FILE")
    return p


def procs_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"need distinct integers >= 0: {text!r}")
    return values


def qrelay_kinds(a) -> list[str]:
    """`qrelay` (the first --delivery-procs value), then `qrelay_dpN` for the others."""
    extra = (a.delivery_procs or [])[1:]
    return ["qrelay"] + [f"qrelay_dp{n}" for n in extra]


def flood(target: str, a, tmp: Path, tag: str) -> dict:
    out = tmp / f"flood-{tag}.json"
    cmd = [sys.executable, str(HERE / "flood.py"), target, "-s", str(a.sessions),
           "-m", str(a.messages), "-l", str(a.size), "-r", str(a.rcpts), "-q",
           "--no-summary", "--json", str(out), "--procs", str(a.flood_procs)]
    if a.pipelining:
        cmd.append("--pipelining")
    if a.reuse:
        cmd.append("-d")
    if a.domains > 1:
        for i in range(a.domains):
            cmd += ["--domain", f"d{i}.test"]
    started = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise UsageError(f"flood.py → {target} ({tag}) failed: "
                         f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
    rep = json.loads(out.read_text())
    rep["_started_wall"] = started
    return rep


def qrelay_available() -> str | None:
    """None if `qrelay run` exists in this checkout, else why not."""
    res = subprocess.run([sys.executable, "-m", "engine.cli", "run", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        return "`qrelay run` is unavailable in this checkout (the SMTP receiver has not landed)"
    return None


class QrelayProcess:
    """`qrelay run ROOT --listen 127.0.0.1:0` as a subprocess, stopped by pid."""

    def __init__(self, root: Path, procs: int, log: Path):
        self.port_file = root.parent / "qrelay.port"
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", str(root), "--listen", "127.0.0.1:0",
             "--procs", str(procs), "--port-file", str(self.port_file)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        self.port = 0
        deadline = time.monotonic() + QRELAY_START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.port_file.exists() and self.port_file.read_text().strip():
                self.port = int(self.port_file.read_text().split()[0])
                return
            time.sleep(0.05)
        self.stop()
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"qrelay run did not start: {tail[0]}")

    def stop(self) -> None:
        terminate(self.proc, 20)
        self.log.close()


def wait_delivery(sink: SinkProcess, want: int, a) -> tuple[dict, bool]:
    """Poll the sink until it has `want` messages; give up after --idle without
    progress or --e2e-timeout in all. Returns (last stats, complete?)."""
    deadline = time.monotonic() + a.e2e_timeout
    last_count, last_change = -1, time.monotonic()
    while True:
        st = sink.stats()
        n = st.get("messages", 0)
        if n >= want:
            return st, True
        now = time.monotonic()
        if n != last_count:
            last_count, last_change = n, now
        if now - last_change > a.idle or now > deadline:
            return st, False
        time.sleep(0.1)


def summarize(rep: dict) -> dict:
    return {"accepted": rep["messages"]["accepted"],
            "failed": rep["messages"]["tempfailed"] + rep["messages"]["permfailed"]
            + rep["messages"]["conn_failed"],
            "rate": rep["rate"]["accepted_per_s"], "elapsed_s": rep["elapsed_s"],
            "p99_txn_ms": rep["latency_ms"]["transaction"]["p99"],
            "replies": rep["replies"][:5]}


def run_kind(kind: str, sink: SinkProcess, qrelay, a, tmp: Path, r: int) -> dict:
    """One flood of one kind; for qrelay also the wait for delivery (end to end)."""
    if kind == "direct":
        base = sink.stats().get("messages", 0)
        rep = flood(sink.address, a, tmp, f"direct{r}")
        sink.wait_messages(base + rep["messages"]["accepted"], timeout=10)
        return summarize(rep)
    if kind == "target":
        return summarize(flood(a.target, a, tmp, f"target{r}"))
    base = sink.stats().get("messages", 0)
    rep = flood(f"127.0.0.1:{qrelay[kind].port}", a, tmp, f"{kind}{r}")
    out = summarize(rep)
    accepted = rep["messages"]["accepted"]
    st, complete = wait_delivery(sink, base + accepted, a)
    delivered = st.get("messages", 0) - base
    out["e2e"] = None
    if delivered > 0 and st.get("last_message"):
        span = st["last_message"] - rep["_started_wall"]
        out["e2e"] = {"delivered": delivered, "accepted": accepted, "complete": complete,
                      "rate": round(delivered / span, 1) if span > 0 else 0.0,
                      "span_s": round(span, 3)}
    return out


def combine(rounds: list[dict], a) -> dict:
    """Medians over the rounds, and the ratios to flood → sink directly."""
    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 1) if values else None

    direct = med(r["direct"]["rate"] for r in rounds)
    out: dict = {"direct": {"rate": direct, "accepted": rounds[-1]["direct"]["accepted"]}}
    if "qrelay" in rounds[0]:
        ingest = med(r["qrelay"]["rate"] for r in rounds)
        out["ingest"] = {"rate": ingest, "accepted": rounds[-1]["qrelay"]["accepted"],
                         "failed": sum(r["qrelay"]["failed"] for r in rounds)}
        out["ratio_ingest_vs_direct"] = round(ingest / direct, 3) if direct else None
        e2es = [r["qrelay"]["e2e"] for r in rounds if r["qrelay"]["e2e"]]
        if e2es:
            rate = med(e["rate"] for e in e2es)
            out["end_to_end"] = {"rate": rate, "complete": all(e["complete"] for e in e2es),
                                 "delivered": sum(e["delivered"] for e in e2es),
                                 "accepted": sum(r["qrelay"]["accepted"] for r in rounds),
                                 "ratio_vs_direct": round(rate / direct, 3) if direct else None}
        else:
            out["end_to_end"] = None
    for kind in qrelay_kinds(a)[1:]:
        e2es = [r[kind]["e2e"] for r in rounds if r[kind]["e2e"]]
        rate = med(e["rate"] for e in e2es) if e2es else None
        base = (out.get("end_to_end") or {}).get("rate")
        out.setdefault("compare", {})[kind] = {
            "worker_procs": int(kind[len("qrelay_dp"):]),
            "ingest_rate": med(r[kind]["rate"] for r in rounds),
            "e2e_rate": rate, "complete": bool(e2es) and all(e["complete"] for e in e2es),
            "ratio_e2e_vs_qrelay": round(rate / base, 3) if rate and base else None}
    if "target" in rounds[0]:
        rate = med(r["target"]["rate"] for r in rounds)
        out["target"] = {"address": a.target, "rate": rate,
                         "accepted": rounds[-1]["target"]["accepted"],
                         "ratio_vs_direct": round(rate / direct, 3) if direct else None}
    return out


def report(result: dict, a) -> None:
    n = f" (median of {a.rounds})" if a.rounds > 1 else ""
    print(f"flood → sink.py directly{n}:  {result['direct']['rate']:>9,.0f} msg/s")
    if "ingest" in result:
        print(f"flood → qrelay (ingest):   {result['ingest']['rate']:>9,.0f} msg/s  "
              f"ratio to direct {result['ratio_ingest_vs_direct']:.3f}")
        e2e = result["end_to_end"]
        if e2e:
            print(f"flood → qrelay → sink:     {e2e['rate']:>9,.0f} msg/s  ({e2e['delivered']:,}/"
                  f"{e2e['accepted']:,} delivered{'' if e2e['complete'] else ', INCOMPLETE'})  "
                  f"ratio to direct {e2e['ratio_vs_direct']:.3f}")
        else:
            print(f"end to end: nothing reached the sink within {a.idle:g}s of idle — "
                  f"delivery is not running in this build; ingest only")
    for kind, c in result.get("compare", {}).items():
        e2e = f"{c['e2e_rate']:>9,.0f}" if c["e2e_rate"] is not None else "     none"
        ratio = f"{c['ratio_e2e_vs_qrelay']:.3f}" if c["ratio_e2e_vs_qrelay"] else "-"
        print(f"  with worker_procs = {c['worker_procs']}: e2e {e2e} msg/s"
              f"{'' if c['complete'] else ' INCOMPLETE'}  ratio to the first {ratio}")
    if "target" in result:
        t = result["target"]
        print(f"flood → {t['address']} (--target): {t['rate']:>9,.0f} msg/s  "
              f"ratio to direct {t['ratio_vs_direct']:.3f}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.no_qrelay and not a.target:
        fail(PROG, "--no-qrelay needs --target")
    if a.target:
        try:
            parse_hostport(a.target)
        except UsageError as exc:
            fail(PROG, str(exc))
    if not a.no_qrelay:
        why = qrelay_available()
        if why:
            fail(PROG, why)
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    result: dict = {"load": {"sessions": a.sessions, "messages": a.messages, "size": a.size,
                             "rcpts": a.rcpts, "pipelining": a.pipelining, "reuse": a.reuse,
                             "flood_procs": a.flood_procs, "qrelay_procs": a.procs,
                             "sink_procs": a.sink_procs, "domains": a.domains,
                             "delivery_procs": a.delivery_procs}}
    sink = None
    qrelay: dict[str, QrelayProcess] = {}
    rounds: list[dict] = []
    try:
        sink = SinkProcess(tmp / "sink", "--quiet", "--procs", str(a.sink_procs))
        qkinds = [] if a.no_qrelay else qrelay_kinds(a)
        for kind, dprocs in zip(qkinds, a.delivery_procs or [None]):
            root = tmp / ("root" if kind == "qrelay" else f"root_{kind}")
            res = subprocess.run([sys.executable, "-m", "engine.cli", "init", str(root),
                                  "--me", "relay.bench.test"], cwd=REPO, capture_output=True,
                                 text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
            if res.returncode != 0:
                raise UsageError(f"qrelay init failed: {res.stderr.strip()}")
            (root / "control" / "smtproutes").write_text(f":127.0.0.1:{sink.port}\n")
            if dprocs is not None:
                toml = root / "qrelay.toml"
                text = toml.read_text() if toml.exists() else ""
                if "[delivery]" in text:
                    raise UsageError(f"{toml} already has a [delivery] table")
                toml.write_text(text + f"\n[delivery]\nworker_procs = {dprocs}\n")
            log_name = "qrelay.log" if kind == "qrelay" else f"{kind}.log"
            qrelay[kind] = QrelayProcess(root, a.procs, tmp / log_name)
        kinds = ["direct"] + qkinds + (["target"] if a.target else [])
        for r in range(a.rounds):
            # Alternate the order between rounds: the machine's load drifts.
            order = kinds if r % 2 == 0 else kinds[::-1]
            one: dict = {}
            for kind in order:
                one[kind] = run_kind(kind, sink, qrelay, a, tmp, r)
            rounds.append(one)
            print(f"round {r + 1}/{a.rounds}: " + "  ".join(
                f"{k} {one[k]['rate']:,.0f}/s" + (f" (e2e {one[k]['e2e']['rate']:,.0f}/s)"
                                                   if one[k].get("e2e") else "")
                for k in order), flush=True)
        result.update(combine(rounds, a))
        report(result, a)
        result["rounds"] = rounds
    except UsageError as exc:
        fail(PROG, str(exc))
    finally:
        for q in qrelay.values():
            q.stop()
        if sink is not None:
            sink.stop()
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        write_json_atomic(a.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
