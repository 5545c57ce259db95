"""Figures for engine/pop3 (prints numbers, not pass/fail).

Targets (issue 13 item 5):
- POP3 logins per second (USER, PASS, QUIT; with the POP-before-SMTP grant
  when the receiver has a relay table) with `$1$` and with `$6$` hashes;
- logins scale across receiver processes: `qrelay run --procs 2` ≥ 1.6× `--procs 1`
  (each receiver with one hashing thread, `[auth] hash_threads = 1`);
- RETR of a 10 MB message ≥ 0.5× the rate of sending the same bytes over a
  plain loopback socket (a child process that sendall()s them), same run, same
  reading client.

    .venv/bin/python bench/bench_pop3.py [--users 64] [--seconds 5] [--concurrency 32] [--clients 2]
                                          [--procs 1,2] [--rounds 3] [--pairs 3] [--pin cpus|receivers|off]
                                          [--retr-mb 10] [--retr-pairs 5] [--client c|python]
                                          [--accept own|shared] [--no-relay-grant]

The load clients run on the receivers' CPUs (2 here), so their CPU per login
is taken from what the receivers can use: --client c (bench/pop3_logins.c,
built with cc; the default) does the asyncio client's dialogue (greeting;
USER, PASS, QUIT in one write; three replies; close) on the same number of
connections for a fraction of its CPU.

Where things run (--pin, default `cpus`: CPU k runs receiver k, every thread
of it, and load client c when c mod --procs = k). The ratio is meant to show
what a second receiver process adds, so each CPU carries the same mix in both
runs: `--procs 1` is one CPU serving logins and making them, `--procs 2` two
such CPUs. The other placements measure something else on 2 CPUs:
- `off`: one receiver's loop and its hashing thread already run in parallel
  on both CPUs (crypt runs without the GIL): with `$1$` `--procs 1` keeps ~1.5
  CPUs busy, and the ratio is the threads' head start, not the second process.
- `receivers` (the clients float): `--procs 1` gets the clients' CPU (0.1-0.2
  ms per login, plus their half of the loopback TCP) from the CPU it does not
  use, `--procs 2` pays it out of its two; and the receiver whose CPU the
  clients sit on loses the race to accept (both loops are woken; the one on an
  idle CPU accepts first and takes every connection waiting), so it idles:
  seen at 22/78 % with its CPU 68 % idle.
Accepting (--accept, default `own`: `[smtp] reuse_port = true`, each receiver
on a socket of its own, the kernel spreading connections by address hash).
With one shared socket (`shared`, the server's default) every receiver's loop
is woken by a new connection and the first to run takes it, and every other
waiting one: on this VM a receiver whose CPU is busy wakes sooner than one
whose CPU sleeps, so the busy one wins and the other idles — logins split
4/96 and 11/89 with that CPU 40-83 % idle, at load 2.5, with nothing else to
blame. Own sockets: 47/53 to 56/44, no CPU idle above 4 %.

Every --procs value runs at once (idle but for its turn) and their turns
alternate every run (--seconds 5, the rate counted after the first second:
neither the start, every connection at once, nor the ragged end of a fixed
count, whose last workers run alone and leave a receiver idle), `--pairs`
times per hash and round, so a change in the machine's load falls on both
within seconds.

Beside each login rate: the receivers' CPU per login, split into their event
loops (main threads), their hashing threads (each receiver's busiest other
thread) and the rest (the relay table's writer thread; the smtpd log's is
idle here), the share of the logins' CPU each receiver took (how evenly the
connections were spread), the load clients' CPU per login, the CPU busy on
neither ("others": other processes, kernel threads, softirq not charged to a
thread — the softirq and irq part beside it; with --pin cpus counted on the
run's own CPUs only), and each CPU's idle part. On a shared machine the
"others" column says whether a run measured the receivers or someone else's
work: the summary gives the pair ratios over all pairs and over the quiet ones
(others below 10 % of the CPU used, in both runs).
--no-relay-grant flags the users NO_RELAY: logins without the POP-before-SMTP
grant (the throttle's bookkeeping stays), to see what the grant costs.

Each login uses its own mailbox at the time (one session per mailbox), so
`--users` should be at least `--concurrency`.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from engine.accounts import admin  # noqa: E402
from engine.accounts.vpasswd import NO_RELAY  # noqa: E402
from engine.delivery.local import LocalDelivery  # noqa: E402
from engine.home import init_home  # noqa: E402
from qrelay_process import (ACCOUNTS_OWNER, ACCOUNTS_RUN_TOML, QrelayProcess,  # noqa: E402
                             children_cpu, service_pids, thread_seconds, work_dir)

PASSWORD = "bench-password"
# Seconds of each --seconds run before its logins count (the C client).
WARMUP = 1.0
DOMAIN = "bench.example"


def md5_crypt(password: str) -> str:
    from passlib.hash import md5_crypt as handler
    return handler.hash(password)


def make_root(base: Path, users: int, no_relay: bool = False, reuse_port: bool = True) -> Path:
    """u0.. with `$6$` hashes (what `qrelay user add` writes), m0.. with `$1$`
    (vpopmail 5.4's), and one 10 MB-ish message for big@."""
    root = init_home(base / "root", me="pop.bench.example")
    # One hashing thread per receiver: then a receiver is one CPU's worth of
    # logins and --procs shows how they scale (the default, 2 threads, lets
    # one receiver hash on two CPUs already).
    # As root, the receivers run as the mailboxes' owner, as they must on a
    # vpopmail box to read vpasswd and the Maildirs.
    # Each receiver on its own socket ([smtp] reuse_port, --accept own): one
    # shared socket lets the busy receiver win every accept (see --accept).
    (root / "qrelay.toml").write_text("[scheduler]\nenabled = false\n[auth]\nhash_threads = 1\n"
                                      f"[smtp]\nreuse_port = {'true' if reuse_port else 'false'}\n"
                                      + ACCOUNTS_RUN_TOML)
    admin.add_domain(root, DOMAIN, uid=ACCOUNTS_OWNER, gid=ACCOUNTS_OWNER)
    names = [f"u{i}" for i in range(users)] + [f"m{i}" for i in range(users)] + ["big"]
    for name in names:
        admin.add_user(root, f"{name}@{DOMAIN}", PASSWORD)
    ref = admin.find_domain(root, DOMAIN)
    md5 = md5_crypt(PASSWORD)
    users_now = [dataclasses.replace(u, crypted=md5) if u.name.startswith("m") else u
                 for u in admin.read_users(ref.directory)]
    if no_relay:
        users_now = [dataclasses.replace(u, gid=u.gid | NO_RELAY) for u in users_now]
    admin.write_users(ref, users_now)
    return root


def add_big_message(root: Path, megabytes: int) -> bytes:
    """Deliver a message of `megabytes` MB to big@; returns its wire form (what RETR sends)."""
    from engine._smtpcore import MessageEncoder
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\n"
    body = b"Subject: big\n\n" + line * (megabytes * 1024 * 1024 // len(line))
    courier = LocalDelivery.for_root(root, max_threads=1)
    try:
        r = courier.deliver_sync("s@sender.example", f"{DOMAIN}-big@{DOMAIN}", body)
    finally:
        courier.close()
    assert r.status == "K", r
    ref = admin.find_domain(root, DOMAIN)
    [big] = [u for u in admin.read_users(ref.directory) if u.name == "big"]
    new = Path(big.maildir) / "new"         # past 99 users vpopmail hashes the directories
    [path] = new.iterdir()
    past = time.time() - 60
    os.utime(path, (past, past))      # qmail-pop3d lists only files older than this second
    os.chown(path, ACCOUNTS_OWNER, ACCOUNTS_OWNER)   # delivered here, as root
    enc = MessageEncoder()
    return b"+OK \r\n" + enc.feed(path.read_bytes()) + enc.finish()


# --- logins -------------------------------------------------------------------------------

class _Login(asyncio.Protocol):
    """One USER/PASS/QUIT session driven by callbacks. The load clients share
    the receivers' two CPUs: with asyncio streams they cost 0.2-0.3 ms of CPU
    per login, as much as the receiver's own work besides the hash, and that
    capped --procs 2 more than the receivers did."""

    def __init__(self, request: bytes, done: asyncio.Future) -> None:
        self.request = request
        self.done = done
        self.buf = b""
        self.greeted = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.greeted:
            end = buf.find(b"\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"+OK"):
                self._finish(buf[:end].decode(errors="replace"))
                return
            self.greeted = True
            self.transport.write(self.request)      # USER, PASS, QUIT in one write
            buf = buf[end + 2:]
        if buf.count(b"\r\n") < 3:
            self.buf = buf
            return
        second = buf.split(b"\r\n", 2)[1]          # PASS's reply
        self._finish(None if second == b"+OK " else second.decode(errors="replace"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("closed before the replies")

    def _finish(self, failure: str | None) -> None:
        if not self.done.done():
            self.done.set_result(failure)
            self.transport.close()


async def _login_worker(port: int, names: list[str], count: int, failures: list[str]) -> None:
    loop = asyncio.get_running_loop()
    requests = [f"USER {name}@{DOMAIN}\r\nPASS {PASSWORD}\r\nQUIT\r\n".encode() for name in names]
    for i in range(count):
        done = loop.create_future()
        request = requests[i % len(requests)]
        await loop.create_connection(lambda: _Login(request, done), "127.0.0.1", port)
        failure = await done
        if failure is not None:
            failures.append(failure)


async def _logins(port: int, pools: list[list[str]], per: int) -> list[str]:
    failures: list[str] = []
    await asyncio.gather(*(_login_worker(port, pool, per, failures) for pool in pools))
    return failures


def _pinned(cpus: list[int] | None, c: int):
    """A preexec_fn putting load client c on its CPU (--pin cpus), or None."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, {cpus[c % len(cpus)]})


def _client(port: int, pools: list[list[str]], per: int, start: float, out, pin) -> None:
    import uvloop
    if pin is not None:
        pin()
    while time.time() < start:          # every client process starts together
        time.sleep(0.001)
    out.put(uvloop.run(_logins(port, pools, per)))


def build_c_client(work: Path) -> Path | None:
    """bench/pop3_logins.c built into `work`; None without a C compiler."""
    exe = work / "pop3_logins"
    try:
        subprocess.run(["cc", "-O2", "-o", str(exe), str(BENCH / "pop3_logins.c")], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no C load client ({exc}): the Python one", flush=True)
        return None
    return exe


def logins_per_second(port: int, prefix: str, args) -> tuple[float, int]:
    """USER/PASS/QUIT sessions from --clients processes, --concurrency
    connections in all; worker w owns users w, w+concurrency, ...: never two
    sessions on one mailbox. (logins per second, logins done)."""
    if args.c_client is not None:
        return _c_logins_per_second(port, prefix, args)
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    per = args.logins // args.concurrency
    pools = [[f"{prefix}{u}" for u in range(w, args.users, args.concurrency)] for w in range(args.concurrency)]
    out = ctx.Queue()
    start = time.time() + 0.2
    procs = [ctx.Process(target=_client, args=(port, pools[c::args.clients], per, start, out,
                                                          _pinned(args.client_cpus, c)))
             for c in range(args.clients)]
    for p in procs:
        p.start()
    failures = [f for _ in procs for f in out.get()]
    elapsed = time.time() - start
    for p in procs:
        p.join()
    if failures:
        print(f"  {len(failures)} failed logins, e.g. {failures[0]!r}")
    return per * args.concurrency / elapsed, per * args.concurrency


def _c_logins_per_second(port: int, prefix: str, args) -> tuple[float, int]:
    """--seconds: every client logs in for that long, and the rate counts the
    logins that ended from WARMUP on (the start, every connection at once,
    left out), up to the end: the end of a fixed count is ragged, its last
    workers alone, some receiver idle — it cost --procs 2 more than 1.
    --seconds 0: --logins logins, timed from start to end."""
    per = args.logins // args.concurrency
    window = [str(WARMUP * 1000), str(args.seconds * 1000)] if args.seconds else []
    start = time.time()
    procs = [subprocess.Popen([str(args.c_client), str(port), prefix, DOMAIN, PASSWORD, str(args.users),
                               str(args.concurrency), str(args.clients), str(c), str(per), *window],
                              stdout=subprocess.PIPE, text=True, preexec_fn=_pinned(args.client_cpus, c))
             for c in range(args.clients)]
    outs = [p.communicate()[0].split("\n", 1) for p in procs]
    elapsed = time.time() - start
    counts = [[int(x) for x in head.split()] for head, _ in outs]
    failed = sum(c[0] for c in counts)
    if failed or any(p.returncode for p in procs):
        print(f"  {failed} failed logins, e.g. {next((w.strip() for _, w in outs if w.strip()), '?')!r}")
    done = sum(c[1] for c in counts)
    if args.seconds:
        return sum(c[2] for c in counts) / (args.seconds - WARMUP), done
    return done / elapsed, done


def thread_cpu(pids: list[int]) -> dict[int, dict[int, float]]:
    """pid -> {tid: on-CPU seconds} of each receiver."""
    return {pid: thread_seconds(pid) for pid in pids}


def cpu_times() -> list[tuple[float, float, float, float]]:
    """Per CPU (from /proc/stat, seconds): (busy, idle, softirq + irq, iowait).
    Busy counts user, nice, system, irq and softirq; idle counts iowait too."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) / tick for v in fields[:8])
            out.append((user + nice + system + irq + softirq, idle + iowait, irq + softirq, iowait))
    return out


@dataclasses.dataclass
class LoginRun:
    rate: float
    loops_ms: float          # receivers' main threads, CPU ms per login
    hashing_ms: float        # each receiver's busiest other thread: the hashing thread
    rest_ms: float           # its other threads (the relay writer, the log)
    clients_ms: float
    others_ms: float         # CPU busy on neither (other processes, kernel threads, the bench),
                             # on the run's CPUs with --pin cpus
    softirq_ms: float        # softirq and irq time (mostly loopback TCP), those CPUs too
    idle: list[float]        # each CPU's idle part of the run
    iowait: list[float]      # the part of it with a disk wait pending (a relay table sync)
    shares: list[float]      # each receiver's part of the receivers' CPU

    @property
    def receivers_ms(self) -> float:
        return self.loops_ms + self.hashing_ms + self.rest_ms

    @property
    def quiet(self) -> bool:
        """Other work took under 10 % of the CPU used during the run."""
        return self.others_ms < 0.1 * (self.receivers_ms + self.clients_ms + self.others_ms)

    def describe(self) -> str:
        split = "/".join(f"{100 * s:.0f}" for s in self.shares)
        idle = "/".join(f"{100 * s:.0f}" for s in self.idle)
        iowait = "/".join(f"{100 * s:.0f}" for s in self.iowait)
        return (f"logins/s {self.rate:7.0f}   receiver CPU {self.receivers_ms:.2f} ms/login "
                f"(loops {self.loops_ms:.2f}, hashing {self.hashing_ms:.2f}, writer+rest {self.rest_ms:.2f}; "
                f"split {split}%), clients {self.clients_ms:.2f}, others {self.others_ms:.2f} "
                f"(softirq {self.softirq_ms:.2f}) ms/login, CPUs idle {idle}% (iowait {iowait}%)")


def measure_logins(port: int, prefix: str, receivers: list[int], args,
                   cpus: list[int] | None = None) -> LoginRun:
    before, c0, s0, t0 = thread_cpu(receivers), children_cpu(), cpu_times(), time.monotonic()
    rate, logins = logins_per_second(port, prefix, args)
    after, c1, s1, t1 = thread_cpu(receivers), children_cpu(), cpu_times(), time.monotonic()
    loops = hashing = rest = 0.0
    used = {}
    for pid in receivers:
        spent = {tid: s - before[pid].get(tid, 0.0) for tid, s in after[pid].items()}
        main = spent.pop(pid, 0.0)
        busiest = max(spent.values(), default=0.0)
        loops, hashing, rest = loops + main, hashing + busiest, rest + sum(spent.values()) - busiest
        used[pid] = main + sum(spent.values())
    total = sum(used.values()) or 1.0
    clients = c1 - c0
    # With --pin cpus every receiver and client runs on `cpus`: other work
    # counts where it takes from them (on the CPU a --procs 1 run leaves
    # free it takes nothing).
    mine = range(len(s0)) if not cpus else sorted(set(cpus))
    busy = sum(s1[k][0] - s0[k][0] for k in mine)
    softirq = sum(s1[k][2] - s0[k][2] for k in mine)
    ms = 1000 / logins
    return LoginRun(rate, loops * ms, hashing * ms, rest * ms, clients * ms,
                    max(0.0, busy - total - clients) * ms, softirq * ms,
                    [(b[1] - a[1]) / (t1 - t0) for a, b in zip(s0, s1)],
                    [(b[3] - a[3]) / (t1 - t0) for a, b in zip(s0, s1)],
                    [used[p] / total for p in receivers])


def wait_receivers(q: QrelayProcess, n: int, timeout: float = 20.0) -> list[int]:
    """The n receiver pids (a receiver sets its title just after the fork: one
    read of /proc right after the start may miss one)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = service_pids(q.pid, b"receiver")
        if len(pids) >= n or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def pin_receivers(receivers: list[int]) -> list[int]:
    """Receiver k (every thread it has; later ones inherit) on CPU k only;
    returns the CPUs, receiver by receiver (see --pin in the docstring)."""
    cpus = sorted(os.sched_getaffinity(0))
    used = []
    for k, pid in enumerate(sorted(receivers)):
        used.append(cpus[k % len(cpus)])
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {used[-1]})
    return used


# --- RETR vs a plain socket ---------------------------------------------------------------

SENDER = r"""
import socket, sys
data = open(sys.argv[1], "rb").read()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.recv(64)
        conn.sendall(data)
"""


def read_until_terminator(sock: socket.socket, expected: int) -> int:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    tail = b""
    while True:
        n = sock.recv_into(view)
        if not n:
            raise RuntimeError(f"closed after {got} of {expected} bytes")
        got += n
        tail = (tail + bytes(view[max(0, n - 5):n]))[-5:]
        if got >= expected and tail == b"\r\n.\r\n":
            return got


def time_plain(port: int, size: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(b"go\r\n")
        read_until_terminator(s, size)
        return size / (time.perf_counter() - start)


def time_retr(port: int, size: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb", buffering=0)
        s.recv(512)                                       # greeting
        s.sendall(f"USER big@{DOMAIN}\r\nPASS {PASSWORD}\r\n".encode())
        got = b""
        while got.count(b"\r\n") < 2:
            got += s.recv(512)
        start = time.perf_counter()
        s.sendall(b"RETR 1\r\n")
        read_until_terminator(s, size)
        elapsed = time.perf_counter() - start
        s.sendall(b"QUIT\r\n")
        while s.recv(512):      # its +OK, then the close: the mailbox is free again
            pass
        f.close()
        return size / elapsed


def start_qrelay(root: Path, procs: int, work: Path) -> tuple[QrelayProcess, int]:
    port_file = work / f"ports-{procs}"
    q = QrelayProcess(root, procs=procs, extra=("--listen", "pop3://127.0.0.1:0", "--port-file", str(port_file)),
                      log=work / "qrelay.log")
    return q, int(port_file.read_text().split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0,
                    help="seconds per run, logins counted after the first (C client); 0: --logins per run")
    ap.add_argument("--logins", type=int, default=1500, help="logins per run (--seconds 0, Python client)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--clients", type=int, default=2, help="load client processes")
    ap.add_argument("--retr-mb", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3,
                    help="back-to-back login runs of each --procs value per hash and round")
    ap.add_argument("--retr-pairs", type=int, default=5, help="RETR / plain-socket pairs per round")
    ap.add_argument("--client", choices=("c", "python"), default="c",
                    help="load client: bench/pop3_logins.c (default) or asyncio")
    ap.add_argument("--pin", nargs="?", choices=("off", "receivers", "cpus"), default="cpus", const="cpus",
                    help="receivers: receiver k runs on CPU k only; cpus: and load client c on CPU c mod --procs")
    ap.add_argument("--accept", choices=("own", "shared"), default="own",
                    help="own: each receiver accepts on its own socket ([smtp] reuse_port); shared: one socket")
    ap.add_argument("--no-relay-grant", action="store_true",
                    help="users flagged NO_RELAY: logins without the POP-before-SMTP grant")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    labels = (("$1$", "m"), ("$6$", "u"))
    with work_dir("bench-pop3-") as work:
        print(f"setting up {len(procs)} x {2 * args.users + 1} mailboxes ...", flush=True)
        roots = {}
        for n in procs:     # one root per instance: each `qrelay run` locks its own
            (work / f"procs{n}").mkdir()
            roots[n] = make_root(work / f"procs{n}", args.users, args.no_relay_grant, args.accept == "own")
        args.c_client = build_c_client(work) if args.client == "c" else None
        wire = add_big_message(roots[procs[0]], args.retr_mb)
        (work / "wire").write_bytes(wire)
        results: dict[tuple[int, str], list[LoginRun]] = {}
        pair_ratios: dict[str, list[tuple[float, bool]]] = {label: [] for label, _ in labels}
        retr: list[float] = []
        plain: list[float] = []
        sender = subprocess.Popen([sys.executable, "-c", SENDER, str(work / "wire")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            sender_port = int(sender.stdout.readline())
            for r in range(args.rounds):
                # Every --procs value runs at once (idle but for its turn), and
                # their turns alternate every run: a change in the
                # machine's load falls on both alike, within seconds.
                instances: dict[int, tuple[QrelayProcess, int, list[int], list[int] | None]] = {}
                try:
                    for n in procs:
                        q, port = start_qrelay(roots[n], n, work)
                        instances[n] = (q, port, [], None)
                        receivers = wait_receivers(q, n)
                        cpus = pin_receivers(receivers) if args.pin != "off" else None
                        instances[n] = (q, port, receivers, cpus if args.pin == "cpus" else None)
                    for label, prefix in labels:
                        for i in range(args.pairs):
                            runs = {}
                            for n in (procs if (r + i) % 2 == 0 else procs[::-1]):
                                _, port, receivers, args.client_cpus = instances[n]
                                runs[n] = run = measure_logins(port, prefix, receivers, args, args.client_cpus)
                                results.setdefault((n, label), []).append(run)
                                print(f"round {r + 1}.{i + 1}  --procs {n}  {label} {run.describe()}  "
                                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                            if len(procs) > 1:
                                pair_ratios[label].append((runs[procs[-1]].rate / runs[procs[0]].rate,
                                                           all(run.quiet for run in runs.values())))
                    port = instances[procs[0]][1]
                    # pairs, alternating: the machine's load hits both alike
                    for _ in range(args.retr_pairs):
                        plain.append(time_plain(sender_port, len(wire)))
                        retr.append(time_retr(port, len(wire)))
                    if args.retr_pairs:
                        print(f"round {r + 1}  RETR {args.retr_mb} MB {statistics.median(retr[-args.retr_pairs:]) / 1e6:7.0f} MB/s   "
                              f"plain socket {statistics.median(plain[-args.retr_pairs:]) / 1e6:7.0f} MB/s", flush=True)
                finally:
                    for q, *_ in instances.values():
                        q.stop()
        finally:
            sender.kill()
            sender.wait()
        # Login rates: the best run of each --procs value. Other work on the
        # machine only ever slows a run down, so the best one is the closest
        # to what the receivers can do. Scaling: best / best, and the ratios
        # of the back-to-back pairs (median, range). CPU figures: medians.
        print(f"\nlogins: best of {args.rounds} x {args.pairs} runs (scaling: best / best; "
              f"pairs back to back: median, range)")
        for label, _ in labels:
            rates = {n: max(run.rate for run in results[(n, label)]) for n in procs}
            line = "  ".join(f"--procs {n}: {rates[n]:7.0f}/s" for n in procs)
            scale = ""
            if len(procs) > 1:
                scale = f"  scaling {rates[procs[-1]] / rates[procs[0]]:.2f}x"
                for which, within in (("pairs", [x for x, _ in pair_ratios[label]]),
                                      ("quiet pairs", [x for x, quiet in pair_ratios[label] if quiet])):
                    scale += (f" ({which} {statistics.median(within):.2f}, {min(within):.2f}-{max(within):.2f}"
                              f", {len(within)})" if within else f" (no {which})")
            cpu = "  ".join(
                f"--procs {n}: receiver {statistics.median(x.receivers_ms for x in results[(n, label)]):.2f} "
                f"(loops {statistics.median(x.loops_ms for x in results[(n, label)]):.2f}), "
                f"clients {statistics.median(x.clients_ms for x in results[(n, label)]):.2f}, "
                f"others {statistics.median(x.others_ms for x in results[(n, label)]):.2f}" for n in procs)
            print(f"logins {label}  {line}{scale}   CPU ms/login {cpu}")
        if retr:
            ratios = [r / p for r, p in zip(retr, plain)]     # per pair
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"RETR {args.retr_mb} MB: median {statistics.median(retr) / 1e6:.0f} MB/s, plain socket "
                  f"{statistics.median(plain) / 1e6:.0f} MB/s, ratio median of the pairs "
                  f"{statistics.median(ratios):.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}; target >= 0.5)")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
