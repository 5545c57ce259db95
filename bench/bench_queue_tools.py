#!/usr/bin/env python3
"""Queue tools on big queues (issue #14 item 7): qshape, delete --domain, import-qmail.

    python bench/bench_queue_tools.py                       # all three, full size
    python bench/bench_queue_tools.py --only qshape --messages 50000
    python bench/bench_queue_tools.py --only import --import-messages 5000

1. qshape: `qrelay qshape ROOT` on a queue of --messages (250,000) messages,
   --big (100,000) of them for big.test and the rest over --domains (1,000)
   others, births spread over two days; the wall time of each run in a fresh
   process (median of --runs), beside `qrelay qstat` (process start-up and
   spool open, O(1) work). Target < 2 s.
2. delete --domain: on that queue, `qrelay run` (scheduler off, so what comes
   in stays) takes a flood.py load (--sessions, 1 KB, one message per
   connection) the whole time; `qrelay delete ROOT --domain big.test` runs in
   the middle. Ingest is measured from the spool's count of new (not yet
   preprocessed) messages over equal windows: before the delete, during it,
   after it. Targets: the delete < 10 s; ingest during it >= 0.8 x the mean of
   the windows before and after. Each window's CPU per process (share of one
   core) is printed too: on a shared machine the figure that says where the
   time went. --queue-cache DIR keeps the built queue for the next run.
3. import-qmail: a qmail queue of --import-messages (25,000) built in qmail's
   format (tests/qmail_queue.py: 90 % preprocessed with one or two remote
   recipients, some done, 10 % in todo/), moved by `qrelay import-qmail`;
   messages per second of the whole command. Target >= 2,000 msg/s.

Figures are printed; nothing here passes or fails.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from engine.home import init_home  # noqa: E402
from engine.queue import ImportedMessage, ImportedRecipient, Spool  # noqa: E402

MESSAGE = (b"Received: from bench\r\nSubject: queue tools bench\r\n\r\n" + b"x" * 512)[:512]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def cli(*args: str) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child, its result): on a shared
    machine the CPU time is the figure that does not depend on the others."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=REPO)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


def build_queue(root: Path, messages: int, big: int, domains: int, batch: int = 5000) -> float:
    """ROOT/queue with `big` messages for big.test, the rest over `domains`
    others; preprocessed, two thirds deferred; births over two days (the
    import path, which keeps a message's birth). Returns seconds taken."""
    t0 = time.perf_counter()
    now = time.time()
    with Spool(root / "queue") as spool:
        done = 0
        while done < messages:
            n = min(batch, messages - done)
            items = []
            for i in range(done, done + n):
                dom = ("big.test" if (i * big) // messages != ((i + 1) * big) // messages
                       else f"d{i % domains}.test")
                state = "deferred" if i % 3 else "pending"
                items.append(ImportedMessage(
                    b"bench:%d" % i, "bench@example.com",
                    (ImportedRecipient(f"u{i}@{dom}", "remote", state, now + 3600),),
                    MESSAGE, now - (i % 2880) * 60))
            spool.import_messages(items)
            spool.forget_imported([m.key for m in items])
            done += n
    return time.perf_counter() - t0


def count_big(root: Path) -> int:
    from engine.queue.surgery import Selection
    with Spool(root / "queue", readonly=True) as s:
        return len(s.select(Selection(domain="big.test"))[0])


def bench_qshape(root: Path, runs: int) -> dict:
    walls, cpus, base, base_cpu = [], [], [], []
    for _ in range(runs):
        w, c, p = cli("qshape", str(root), "--top", "10")
        if p.returncode:
            raise RuntimeError(p.stderr.strip())
        walls.append(w)
        cpus.append(c)
        w, c, _ = cli("qstat", str(root))
        base.append(w)
        base_cpu.append(c)
    print(p.stdout, end="")
    print(f"qshape: wall {', '.join(f'{w:.2f}' for w in walls)} s, CPU "
          f"{', '.join(f'{c:.2f}' for c in cpus)} s (median {statistics.median(walls):.2f} / "
          f"{statistics.median(cpus):.2f} s; target < 2 s); qstat, same start-up: "
          f"{statistics.median(base):.2f} / {statistics.median(base_cpu):.2f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    return {"qshape_s": walls, "qshape_cpu_s": cpus, "qstat_s": base, "qstat_cpu_s": base_cpu}


def process_cpu(supervisor: int, flood: int) -> dict[str, float]:
    """CPU seconds so far of `qrelay run`'s processes by title (each
    receiver summed under one name) and of flood.py with its workers, from /proc."""
    from qrelay_process import cpu_by_title, cpu_seconds, descendants
    out = cpu_by_title(descendants(supervisor))
    out["flood.py"] = cpu_seconds(descendants(flood))
    return out


def cpu_line(label: str, a: dict[str, float], b: dict[str, float], seconds: float) -> str:
    """Each process's share of one core between snapshots `a` and `b`."""
    parts = [f"{name} {100 * (b[name] - a.get(name, 0.0)) / seconds:.0f} %"
             for name in sorted(b)]
    return f"  CPU {label} ({seconds:.1f} s): " + ", ".join(parts)


def not_preprocessed(root: Path) -> int:
    with Spool(root / "queue", readonly=True) as s:
        return s.stats().not_preprocessed


def bench_delete(root: Path, work: Path, sessions: int, window: float,
                 spool: list[str]) -> dict:
    from qrelay_process import QrelayProcess
    (root / "qrelay.toml").write_text("[scheduler]\nenabled = false\n[spool]\n"
                                      + "".join(f"{kv}\n" for kv in spool))
    big = count_big(root)
    q = QrelayProcess(root, os.cpu_count() or 1, log=work / "qrelay.log")
    flood = None
    try:
        total = 3600                         # stopped below, when the windows are done
        flood = subprocess.Popen(
            [sys.executable, str(BENCH / "flood.py"), f"127.0.0.1:{q.port}", "-s", str(sessions),
             "--duration", str(total), "-l", "1024", "-q", "--no-summary",
             "--json", str(work / "flood.json")], env=ENV, cwd=REPO)
        time.sleep(2.0)                      # sessions connected, rate steady

        lines = []

        def rate_over(label: str, seconds: float | None) -> tuple[float, tuple]:
            """Ingest per second over `seconds` (None: the delete command)."""
            a, c0, t0 = not_preprocessed(root), process_cpu(q.pid, flood.pid), time.perf_counter()
            ran = time.sleep(seconds) if seconds is not None else \
                cli("delete", str(root), "--domain", "big.test")
            took = time.perf_counter() - t0
            lines.append(cpu_line(label, c0, process_cpu(q.pid, flood.pid), took))
            return (not_preprocessed(root) - a) / took, ran
        before, _ = rate_over("before", window)
        during, (wall, cpu, p) = rate_over("during the delete", None)
        after, _ = rate_over("after", window)
    finally:
        if flood is not None:
            flood.terminate()
            flood.wait(30)
        q.stop(20)
    if p.returncode:
        raise RuntimeError(p.stderr.strip())
    base = (before + after) / 2
    print(f"delete --domain big.test: {p.stdout.strip()} ({big} selected) in {wall:.2f} s "
          f"({big / wall:,.0f} msg/s; target < 10 s), {cpu:.2f} s of CPU")
    print(f"ingest: {before:,.0f} msg/s before, {during:,.0f} during, {after:,.0f} after: "
          f"during / mean(before, after) = {during / base:.2f} (target >= 0.8); "
          f"load average {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))
    return {"delete_s": wall, "delete_cpu_s": cpu, "deleted": big, "ingest_before": before, "ingest_during": during,
            "ingest_after": after, "ratio": during / base}


def bench_import(work: Path, messages: int) -> dict:
    from tests.qmail_queue import add_message, make_queue
    qdir = make_queue(work / "qmail" / "queue")
    root = init_home(work / "import-root", me="bench.local")
    now = time.time()
    t0 = time.perf_counter()
    for i in range(messages):
        body = b"Subject: qmail %d\n\n" % i + b"x" * 400 + b"\n"
        if i % 10 == 9:
            add_message(qdir, body, "s@src.test", birth=now - 5, todo=[f"t{i}@far{i % 50}.test"])
        else:
            add_message(qdir, body, "s@src.test", birth=now - (i % 1440) * 60,
                        next_try=now + 600,
                        remote=[(f"a{i}@far{i % 50}.test", i % 4 == 1),
                                (f"b{i}@far{i % 50}.test", False)][: 1 + i % 2])
    built = time.perf_counter() - t0
    wall, cpu, p = cli("import-qmail", str(root), str(qdir))
    if p.returncode:
        raise RuntimeError((p.stderr or p.stdout).strip())
    print(f"import-qmail: {p.stdout.strip()}")
    print(f"import-qmail: {messages} messages in {wall:.2f} s = {messages / wall:,.0f} msg/s "
          f"(target >= 2,000), {cpu:.2f} s of CPU = {messages / cpu:,.0f} msg/s of CPU; "
          f"the qmail queue took {built:.1f} s to build; load average {os.getloadavg()[0]:.1f}")
    return {"import_s": wall, "import_cpu_s": cpu, "import_msgs": messages,
            "import_rate": messages / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("qshape", "delete", "import"), action="append")
    p.add_argument("--messages", type=int, default=250_000)
    p.add_argument("--big", type=int, default=100_000)
    p.add_argument("--domains", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--window", type=float, default=5.0,
                   help="seconds of each ingest window before/after the delete")
    p.add_argument("--spool", action="append", default=[], metavar="KEY=VALUE",
                   help="a [spool] setting for the delete, e.g. surgery_pause=0.05")
    p.add_argument("--queue-cache", help="keep the built queue in this directory and copy it "
                   "from there on the next run (the same sizes)")
    p.add_argument("--import-messages", type=int, default=25_000)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()
    only = set(args.only or ("qshape", "delete", "import"))
    figures: dict = {}
    work = Path(tempfile.mkdtemp(prefix="bench-qtools-"))
    work.chmod(0o755)      # as root, `qrelay run` serves as its run user, which must reach ROOT
    try:
        if only & {"qshape", "delete"}:
            root = init_home(work / "root", me="bench.local")
            cached = None
            if args.queue_cache:
                cached = Path(args.queue_cache) / f"{args.messages}-{args.big}-{args.domains}"
            if cached is not None and cached.is_dir():
                shutil.copytree(cached, root / "queue", dirs_exist_ok=True)
                print(f"queue: {args.messages} messages ({count_big(root)} for big.test) "
                      f"copied from {cached}")
            else:
                took = build_queue(root, args.messages, args.big, args.domains)
                print(f"queue: {args.messages} messages ({count_big(root)} for big.test) "
                      f"built in {took:.1f} s")
                if cached is not None:
                    shutil.copytree(root / "queue", cached)
            if "qshape" in only:
                figures.update(bench_qshape(root, args.runs))
            if "delete" in only:
                figures.update(bench_delete(root, work, args.sessions, args.window,
                                            args.spool))
        if "import" in only:
            figures.update(bench_import(work, args.import_messages))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
