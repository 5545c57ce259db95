#!/usr/bin/env python3
"""bench_mx.py: qrelay as an MX, SMTP -> Maildir end to end, against the remote
end-to-end rate of the same run (issue #11 item 6).

    python bench/bench_mx.py             # 20 sessions, 1 KB, 1,000 mailboxes over 10 domains, 20,000 messages
    python bench/bench_mx.py -m 2000 --users 10 --rounds 1      # quicker

Runs as root (as an MX does): local delivery runs as the mailboxes' owner
(`--owner`; default: `qrelay domain add`'s, the `[run] user` qrelay), never as root.

Two qrelay roots take the same load: `-s` sessions of flood.py, `-l` bytes,
one recipient per message, `u{rand}@d{k}.test` with rand < `--users` and k <
`--domains` (the same `--domains` x `--users` addresses on both sides):

  remote  flood.py -> qrelay run -> sink.py (smtproutes send every domain there)
          rate_remote = M / (time from flood start to the sink's last message)
  local   flood.py -> qrelay run -> Maildirs: each domain made with `qrelay domain
          add --uid OWNER --gid OWNER`, its mailboxes with `qrelay user import`
          rate_local = M / (time from flood start to the last message linked
          into a new/: the newest ctime there, read once all M are in)
          target: rate_local >= 0.8 x rate_remote

Both roots run with qrelay's defaults; `--local-active N` sets the local
root's `[delivery] local_active` (deliveries at once in its worker).
`--no-worker-sync` is an experiment, not a figure: the local root's delivery
worker skips its fsyncs (LD_PRELOAD shim worker_nosync.c), so the run shows
what the two syncs of each Maildir delivery cost on this machine.

They alternate for `--rounds` rounds (the first side alternating too), each
side starting once the other's queue is empty; the best of each side counts
(other load on the machine only ever slows a round down). Every process
started here is stopped by its pid (qrelay by its process group). Exit
status 0 if the target is met, 1 if not, 2 (one line) if the run could not be
made: bad arguments, not root, a process that does not start, mail that stops
arriving for `--idle` seconds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_relay_e2e import (PY, REPO, BenchError, Load, RelayRoot, flood, qrelay_cli,  # noqa: E402
                             wait_sink)
from qrelay_process import children_cpu, cpu_by_title, descendants  # noqa: E402
from sink import SinkProcess  # noqa: E402
from spool_bench_lib import preload_shim  # noqa: E402
from smtpload.cli import OneLineParser, fail, nonneg_float, nonneg_int, positive_int, run_main  # noqa: E402

PROG = "bench_mx.py"
TARGET = 0.8
# How often the Maildirs are counted while a round runs (the figure comes from
# the files' ctimes, not from this poll).
COUNT_POLL = 0.5
# [delivery] local_active for the local root: qrelay's default, no limit
# (1 to 6 cost the worker the same CPU per job since its small reads keep
# the GIL; the README's figures).
LOCAL_ACTIVE = 0
# Longest wait for a root's queue to empty between two measurements.
EMPTY_TIMEOUT = 600.0


def build_parser() -> OneLineParser:
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--messages", type=positive_int, default=20000)
    ap.add_argument("-s", "--sessions", type=positive_int, default=20)
    ap.add_argument("-l", "--size", type=positive_int, default=1024)
    ap.add_argument("--domains", type=positive_int, default=10, help="domains d0.test ..")
    ap.add_argument("--users", type=positive_int, default=100, help="mailboxes per domain, u0 ..")
    ap.add_argument("--rounds", type=positive_int, default=3,
                    help="alternating rounds; the best of each side counts")
    ap.add_argument("--procs", type=positive_int, default=2, help="receiver processes of qrelay run")
    ap.add_argument("--owner", default=None, metavar="UID:GID",
                    help="owner of the mailboxes (qrelay domain add --uid --gid; not root); "
                         "default: domain add's, i.e. [run] user (qrelay) as root, so the "
                         "receivers can read the domains' vpasswd")
    ap.add_argument("--concurrency-local", type=positive_int, default=None, metavar="N",
                    help="control/concurrencylocal of the local root (default: none, qmail's 10)")
    ap.add_argument("--local-active", type=nonneg_int, default=LOCAL_ACTIVE, metavar="N",
                    help="[delivery] local_active of the local root: deliveries running at once "
                         "in its worker (default 0, qrelay's: no limit)")
    ap.add_argument("--flood-arg", action="append", default=[], metavar="ARG",
                    help="extra flood.py argument, as --flood-arg=--pipelining (repeatable)")
    ap.add_argument("--idle", type=nonneg_float, default=30.0,
                    help="no new message at the sink or in the Maildirs for this long = the run failed (s)")
    ap.add_argument("--no-worker-sync", action="store_true",
                    help="experiment, not durable: the local delivery worker skips its fsyncs")
    ap.add_argument("--cpu", action="store_true",
                    help="also print each side's CPU per message, by process title")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (roots, logs)")
    return ap


def owner_ids(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    try:
        ids = int(uid), int(gid if sep else uid)
    except ValueError:
        raise ValueError(f"--owner: not UID:GID: {text!r}") from None
    if ids[0] <= 0 or ids[1] < 0:
        raise ValueError(f"--owner: mail is never delivered as root: {text!r}")
    return ids


def make_mailboxes(domains: tuple[str, ...], users: int, owner: tuple[int, int] | None):
    """prepare() for RelayRoot: the domains and their mailboxes, with the admin CLI."""
    ids = ["--uid", str(owner[0]), "--gid", str(owner[1])] if owner else []

    def prepare(root: Path) -> None:
        for d in domains:
            qrelay_cli("domain", "add", str(root), d, *ids)
        lines = "".join(f"u{k}@{d}:bench-{k}\n" for d in domains for k in range(users))
        qrelay_cli("user", "import", str(root), "-", stdin=lines)
    return prepare


class Maildirs:
    """Every mailbox's new/ in a root: counted while mail arrives, then the
    newest time one was moved in (ctime: the rename, or link and unlink, sets it)."""

    def __init__(self, root: Path, expect: int) -> None:
        self.dirs = [Path(d) for d, _, _ in os.walk(root / "domains")
                     if d.endswith("/Maildir/new")]
        if len(self.dirs) != expect:
            raise BenchError(f"{root.name}: {len(self.dirs)} Maildirs, expected {expect}")

    def count(self) -> int:
        return sum(len(os.listdir(d)) for d in self.dirs)

    def newest(self) -> float:
        latest = 0.0
        for d in self.dirs:
            with os.scandir(d) as it:
                for e in it:
                    latest = max(latest, e.stat(follow_symlinks=False).st_ctime)
        return latest

    def wait(self, n: int, idle: float) -> float:
        """Until `n` files are in the new/ dirs; their newest ctime. BenchError if
        the count stalls for `idle` seconds."""
        last, changed = -1, time.monotonic()
        while (got := self.count()) < n:
            now = time.monotonic()
            if got != last:
                last, changed = got, now
            elif now - changed > idle:
                raise BenchError(f"Maildirs: {got} of {n} messages, none more for {idle:g} s")
            time.sleep(COUNT_POLL)
        if got > n:
            raise BenchError(f"Maildirs: {got} messages, expected {n} (duplicates?)")
        return self.newest()


def wait_empty(q: RelayRoot, timeout: float = EMPTY_TIMEOUT) -> None:
    """Until `qrelay qstat` counts no message in q's queue (results recorded,
    messages released), so the next measurement has the machine to itself."""
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run([PY, "-m", "engine.cli", "qstat", str(q.root)], capture_output=True,
                           text=True, cwd=REPO)
        first = r.stdout.split("\n", 1)[0]
        if r.returncode == 0 and first.startswith("messages in queue: ") and first.endswith(": 0"):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{q.root.name}: queue not empty after {timeout:g} s: {first or r.stderr}")
        time.sleep(0.5)


def side_cpu(q: RelayRoot, sink: SinkProcess | None) -> dict[str, float]:
    """CPU seconds so far of every process of q's `qrelay run` (and the sink's)."""
    pids = descendants(q.run.pid) + ([sink.proc.pid] if sink is not None else [])
    got = cpu_by_title(pids)
    got["flood.py (this bench's children)"] = children_cpu()
    return got


def print_cpu(side: str, before: dict[str, float], after: dict[str, float], messages: int) -> None:
    spent = {t: after[t] - before.get(t, 0.0) for t in after}
    total = sum(spent.values())
    print(f"    {side} CPU per message: {total / messages * 1000:.2f} ms", flush=True)
    for title, sec in sorted(spent.items(), key=lambda kv: -kv[1]):
        if sec > 0:
            print(f"      {sec / messages * 1000:6.2f} ms  {title}", flush=True)


def run(a, owner: tuple[int, int] | None, work: Path, started: list, fig: dict) -> None:
    domains = tuple(f"d{i}.test" for i in range(a.domains))
    load = Load(sessions=a.sessions, size=a.size, domains=domains, flood_args=tuple(a.flood_arg),
                procs=a.procs, toml="", env={}, idle=a.idle,
                to=("--to", "u{rand}@{domain}", "--rand-range", str(a.users)))
    sink = SinkProcess(work / "sink")
    started.append(sink)
    remote = RelayRoot(work / "remote", sink.port, load)
    started.append(remote)
    prepare = make_mailboxes(domains, a.users, owner)
    if a.concurrency_local is not None:
        def prepare(root: Path, _mailboxes=prepare) -> None:
            _mailboxes(root)
            (root / "control" / "concurrencylocal").write_text(f"{a.concurrency_local}\n")
    if a.no_worker_sync:
        load_local = dataclasses.replace(load, env={"LD_PRELOAD": preload_shim(work, "worker_nosync")})
    else:
        load_local = load
    local = RelayRoot(work / "local", None, load_local, prepare=prepare,
                      delivery_toml=f"local_active = {a.local_active}\n")
    started.append(local)
    boxes = Maildirs(local.root, a.domains * a.users)

    rates: dict[str, list[float]] = {"remote": [], "local": []}
    ingest: dict[str, list[float]] = {"remote": [], "local": []}
    received = delivered = 0
    for r in range(a.rounds):
        line = f"  round {r}:"
        for side in (("remote", "local") if r % 2 == 0 else ("local", "remote")):
            q = remote if side == "remote" else local
            cpu0 = side_cpu(q, sink if side == "remote" else None) if a.cpu else None
            t0 = time.time()
            rep = flood(f"127.0.0.1:{q.port}", a.messages, load, work, f"{side}{r}")
            if side == "remote":
                st = wait_sink(sink, received + a.messages, load, "remote end to end")
                received, last = st["messages"], st["last_message"]
            else:
                last = boxes.wait(delivered + a.messages, a.idle)
                delivered += a.messages
            rates[side].append(a.messages / (last - t0))
            ingest[side].append(rep["rate"]["accepted_per_s"])
            line += f" {side} {rates[side][-1]:.0f}/s (ingest {ingest[side][-1]:.0f}/s)"
            wait_empty(q)
            if cpu0 is not None:
                print_cpu(side, cpu0, side_cpu(q, sink if side == "remote" else None), a.messages)
        line += f", local/remote {rates['local'][-1] / rates['remote'][-1]:.2f}"
        print(line, flush=True)
    best = {side: max(v) for side, v in rates.items()}
    fig.update(rate_remote=best["remote"], rate_local=best["local"],
               ratio_local_remote=best["local"] / best["remote"],
               rounds_remote=rates["remote"], rounds_local=rates["local"],
               ingest_remote=ingest["remote"], ingest_local=ingest["local"],
               ratio_rounds=[lo / re for lo, re in zip(rates["local"], rates["remote"])])
    print(f"remote end to end (flood -> qrelay -> sink): {best['remote']:.0f} msg/s", flush=True)
    print(f"local end to end (flood -> qrelay -> {a.domains * a.users} Maildirs): {best['local']:.0f} msg/s "
          f"= {fig['ratio_local_remote']:.2f} x remote "
          f"{'(experiment: the worker did not sync)' if a.no_worker_sync else f'(target >= {TARGET})'}",
          flush=True)
    # The best of each side is the figure; the rounds' own ratios show how
    # far the host moved it (a slow remote round alone can lift the best).
    ratios = fig["ratio_rounds"]
    fig["ratio_rounds_median"] = statistics.median(ratios)
    print(f"each round's local/remote: {' '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {fig['ratio_rounds_median']:.2f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        owner = owner_ids(a.owner) if a.owner else None
    except ValueError as exc:
        ap.error(str(exc))
    if os.geteuid() != 0:
        fail(PROG, "run it as root: local delivery switches to the mailboxes' owner")
    work = Path(tempfile.mkdtemp(prefix="qrelay-bench-mx-"))
    # The owner must reach its Maildirs through the work directory (mkdtemp: 0700).
    os.chmod(work, 0o711)
    fig: dict = {"messages": a.messages, "sessions": a.sessions, "size": a.size,
                 "domains": a.domains, "users": a.users, "rounds": a.rounds, "procs": a.procs,
                 "concurrency_local": a.concurrency_local, "local_active": a.local_active,
                 "no_worker_sync": a.no_worker_sync,
                 "flood_args": a.flood_arg}
    started: list = []
    try:
        run(a, owner, work, started, fig)
    except BenchError as exc:
        fail(PROG, str(exc))
    finally:
        for p in reversed(started):
            p.stop()
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    # An experiment's ratio is no figure: its deliveries were not durable.
    ok = fig["ratio_local_remote"] >= TARGET and not a.no_worker_sync
    fig["targets_met"] = ok
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2) + "\n")
    print(json.dumps(fig))
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
