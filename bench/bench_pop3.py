"""Figures for engine/pop3 (prints numbers, not pass/fail).

Targets (issue 13 item 5):
- POP3 logins per second (USER, PASS, QUIT; with the POP-before-SMTP grant
  when the receiver has a relay table) with `$1$` and with `$6$` hashes;
- logins scale across receiver processes: `qrelay run --procs 2` ≥ 1.6× `--procs 1`
  (each receiver with one hashing thread, `[auth] hash_threads = 1`);
- RETR of a 10 MB message ≥ 0.5× the rate of sending the same bytes over a
  plain loopback socket (a child process that sendall()s them), same run, same
  reading client.

    .venv/bin/python bench/bench_pop3.py [--users 64] [--logins 3000] [--concurrency 32] [--clients 2]
                                          [--procs 1,2] [--retr-mb 10] [--rounds 3] [--retr-pairs 5]
                                          [--client c|python] [--no-relay-grant]

The load clients run on the receivers' CPUs (2 here), so their CPU per login
is taken from what the receivers can use: --client c (bench/pop3_logins.c,
built with cc; the default) does the asyncio client's dialogue (greeting;
USER, PASS, QUIT in one write; three replies; close) on the same number of
connections for a fraction of its CPU.

Beside each login rate: the receivers' CPU per login, split into their event
loops (main threads) and their other threads (the hashing thread, the relay
table's writer thread; the smtpd log's is idle here), the share of the
logins' CPU each receiver took (how evenly the shared listening socket spread
them), and the load clients' CPU per login — they run on the same CPUs.
--no-relay-grant flags the users NO_RELAY: logins without the POP-before-SMTP
grant (the throttle's bookkeeping stays), to see what the grant costs.

With `$1$` one receiver is not one CPU's worth of logins: its loop and its
hashing thread each do about half of the work, in parallel (crypt runs without
the GIL), so `--procs 1` already keeps about 1.5 of 2 CPUs busy and a second
receiver can add the rest only. `$6$` logins are mostly the hash: there one
receiver is about one CPU.

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
DOMAIN = "bench.example"


def md5_crypt(password: str) -> str:
    from passlib.hash import md5_crypt as handler
    return handler.hash(password)


def make_root(base: Path, users: int, no_relay: bool = False) -> Path:
    """u0.. with `$6$` hashes (what `qrelay user add` writes), m0.. with `$1$`
    (vpopmail 5.4's), and one 10 MB-ish message for big@."""
    root = init_home(base / "root", me="pop.bench.example")
    # One hashing thread per receiver: then a receiver is one CPU's worth of
    # logins and --procs shows how they scale (the default, 2 threads, lets
    # one receiver hash on two CPUs already).
    # As root, the receivers run as the mailboxes' owner, as they must on a
    # vpopmail box to read vpasswd and the Maildirs.
    (root / "qrelay.toml").write_text("[scheduler]\nenabled = false\n[auth]\nhash_threads = 1\n"
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


def _client(port: int, pools: list[list[str]], per: int, start: float, out) -> None:
    import uvloop
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


def logins_per_second(port: int, prefix: str, args) -> float:
    """--logins USER/PASS/QUIT sessions from --clients processes, --concurrency
    connections in all; worker w owns users w, w+concurrency, ...: never two
    sessions on one mailbox."""
    if args.c_client is not None:
        return _c_logins_per_second(port, prefix, args)
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    per = args.logins // args.concurrency
    pools = [[f"{prefix}{u}" for u in range(w, args.users, args.concurrency)] for w in range(args.concurrency)]
    out = ctx.Queue()
    start = time.time() + 0.2
    procs = [ctx.Process(target=_client, args=(port, pools[c::args.clients], per, start, out))
             for c in range(args.clients)]
    for p in procs:
        p.start()
    failures = [f for _ in procs for f in out.get()]
    elapsed = time.time() - start
    for p in procs:
        p.join()
    if failures:
        print(f"  {len(failures)} failed logins, e.g. {failures[0]!r}")
    return per * args.concurrency / elapsed


def _c_logins_per_second(port: int, prefix: str, args) -> float:
    per = args.logins // args.concurrency
    start = time.time()
    procs = [subprocess.Popen([str(args.c_client), str(port), prefix, DOMAIN, PASSWORD, str(args.users),
                               str(args.concurrency), str(args.clients), str(c), str(per)],
                              stdout=subprocess.PIPE, text=True) for c in range(args.clients)]
    outs = [p.communicate()[0].split("\n", 1) for p in procs]
    elapsed = time.time() - start
    failed = sum(int(n) for n, _ in outs)
    if failed or any(p.returncode for p in procs):
        print(f"  {failed} failed logins, e.g. {next((w.strip() for _, w in outs if w.strip()), '?')!r}")
    return per * args.concurrency / elapsed


def thread_cpu(pids: list[int]) -> dict[int, tuple[float, float]]:
    """pid -> (main thread's, other threads') on-CPU seconds."""
    out = {}
    for pid in pids:
        threads = thread_seconds(pid)
        main = threads.pop(pid, 0.0)
        out[pid] = (main, sum(threads.values()))
    return out


@dataclasses.dataclass
class LoginRun:
    rate: float
    loops_ms: float          # receivers' main threads, CPU ms per login
    threads_ms: float        # their other threads (hashing, relay writer)
    clients_ms: float
    shares: list[float]      # each receiver's part of the receivers' CPU

    def describe(self) -> str:
        split = "/".join(f"{100 * s:.0f}" for s in self.shares)
        return (f"logins/s {self.rate:7.0f}   receiver CPU {self.loops_ms + self.threads_ms:.2f} ms/login "
                f"(loops {self.loops_ms:.2f}, threads {self.threads_ms:.2f}; split {split}%), "
                f"clients {self.clients_ms:.2f} ms/login")


def measure_logins(port: int, prefix: str, receivers: list[int], args) -> LoginRun:
    logins = args.logins // args.concurrency * args.concurrency
    before, c0 = thread_cpu(receivers), children_cpu()
    rate = logins_per_second(port, prefix, args)
    after, c1 = thread_cpu(receivers), children_cpu()
    used = {p: (after[p][0] - before[p][0], after[p][1] - before[p][1]) for p in receivers}
    total = sum(m + o for m, o in used.values()) or 1.0
    return LoginRun(rate, sum(m for m, _ in used.values()) * 1000 / logins,
                    sum(o for _, o in used.values()) * 1000 / logins, (c1 - c0) * 1000 / logins,
                    [sum(used[p]) / total for p in receivers])


def wait_receivers(q: QrelayProcess, n: int, timeout: float = 20.0) -> list[int]:
    """The n receiver pids (a receiver sets its title just after the fork: one
    read of /proc right after the start may miss one)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = service_pids(q.pid, b"receiver")
        if len(pids) >= n or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def pin_receivers(receivers: list[int]) -> None:
    """--pin: receiver k (every thread it has; later ones inherit) on CPU k only,
    so `--procs 1` is one CPU's worth of logins and `--procs 2` shows what a
    second process adds, not what one process's GIL-free hashing thread already
    took of the second CPU. The load clients are not pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    for k, pid in enumerate(sorted(receivers)):
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpus[k % len(cpus)]})


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
    ap.add_argument("--logins", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--clients", type=int, default=2, help="load client processes")
    ap.add_argument("--retr-mb", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--retr-pairs", type=int, default=5, help="RETR / plain-socket pairs per round")
    ap.add_argument("--client", choices=("c", "python"), default="c",
                    help="load client: bench/pop3_logins.c (default) or asyncio")
    ap.add_argument("--pin", action="store_true",
                    help="receiver k runs on CPU k only (process scaling without the threads' head start)")
    ap.add_argument("--no-relay-grant", action="store_true",
                    help="users flagged NO_RELAY: logins without the POP-before-SMTP grant")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    with work_dir("bench-pop3-") as work:
        print(f"setting up {2 * args.users + 1} mailboxes ...", flush=True)
        root = make_root(work, args.users, args.no_relay_grant)
        args.c_client = build_c_client(work) if args.client == "c" else None
        wire = add_big_message(root, args.retr_mb)
        (work / "wire").write_bytes(wire)
        results: dict[tuple[int, str], list[LoginRun]] = {}
        retr: list[float] = []
        plain: list[float] = []
        sender = subprocess.Popen([sys.executable, "-c", SENDER, str(work / "wire")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            sender_port = int(sender.stdout.readline())
            for r in range(args.rounds):
                # Every other round in reverse order: a change in the machine's
                # load during the run does not fall on one --procs value only.
                for n in (procs if r % 2 == 0 else procs[::-1]):
                    q, port = start_qrelay(root, n, work)
                    try:
                        receivers = wait_receivers(q, n)
                        if args.pin:
                            pin_receivers(receivers)
                        for label, prefix in (("$1$", "m"), ("$6$", "u")):
                            run = measure_logins(port, prefix, receivers, args)
                            results.setdefault((n, label), []).append(run)
                            print(f"round {r + 1}  --procs {n}  {label} {run.describe()}  "
                                  f"load {os.getloadavg()[0]:.1f}", flush=True)
                        if n == procs[0]:
                            # pairs, alternating: the machine's load hits both alike
                            for _ in range(args.retr_pairs):
                                plain.append(time_plain(sender_port, len(wire)))
                                retr.append(time_retr(port, len(wire)))
                            print(f"round {r + 1}  RETR {args.retr_mb} MB {statistics.median(retr[-args.retr_pairs:]) / 1e6:7.0f} MB/s   "
                                  f"plain socket {statistics.median(plain[-args.retr_pairs:]) / 1e6:7.0f} MB/s", flush=True)
                    finally:
                        q.stop()
        finally:
            sender.kill()
            sender.wait()
        # Login rates: the best round of each --procs value. Other work on the
        # machine only ever slows a round down, so the best one is the closest
        # to what the receivers can do; scaling = best / best, with the range
        # of the ratios within a round beside it. CPU figures: medians.
        print(f"\nlogins: best of {args.rounds} rounds (scaling: best / best; within a round)")
        for label in ("$1$", "$6$"):
            rates = {n: max(run.rate for run in results[(n, label)]) for n in procs}
            line = "  ".join(f"--procs {n}: {rates[n]:7.0f}/s" for n in procs)
            scale = ""
            if len(procs) > 1:
                within = [b.rate / a.rate for a, b in zip(results[(procs[0], label)], results[(procs[-1], label)])]
                scale = (f"  scaling {rates[procs[-1]] / rates[procs[0]]:.2f}x "
                         f"({min(within):.2f}-{max(within):.2f})")
            cpu = "  ".join(
                f"--procs {n}: receiver {statistics.median(x.loops_ms + x.threads_ms for x in results[(n, label)]):.2f} "
                f"(loops {statistics.median(x.loops_ms for x in results[(n, label)]):.2f}), "
                f"clients {statistics.median(x.clients_ms for x in results[(n, label)]):.2f}" for n in procs)
            print(f"logins {label}  {line}{scale}   CPU ms/login {cpu}")
        ratios = [r / p for r, p in zip(retr, plain)]     # per pair
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"RETR {args.retr_mb} MB: median {statistics.median(retr) / 1e6:.0f} MB/s, plain socket "
              f"{statistics.median(plain) / 1e6:.0f} MB/s, ratio median of the pairs "
              f"{statistics.median(ratios):.2f} (quartiles {q[0]:.2f}-{q[2]:.2f}; target >= 0.5)")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
