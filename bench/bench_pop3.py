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
from engine.delivery.local import LocalDelivery  # noqa: E402
from engine.home import init_home  # noqa: E402
from qrelay_process import (ACCOUNTS_OWNER, ACCOUNTS_RUN_TOML, QrelayProcess, cpu_seconds,  # noqa: E402
                             service_pids, work_dir)

PASSWORD = "bench-password"
DOMAIN = "bench.example"


def md5_crypt(password: str) -> str:
    from passlib.hash import md5_crypt as handler
    return handler.hash(password)


def make_root(base: Path, users: int) -> Path:
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
    admin.write_users(ref, [dataclasses.replace(u, crypted=md5) if u.name.startswith("m") else u
                            for u in admin.read_users(ref.directory)])
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

async def _login_worker(port: int, names: list[str], count: int, failures: list[str]) -> None:
    for i in range(count):
        name = names[i % len(names)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            greeting = await reader.readline()
            writer.write(f"USER {name}@{DOMAIN}\r\nPASS {PASSWORD}\r\nQUIT\r\n".encode())
            replies = [await reader.readline() for _ in range(3)]
            if not greeting.startswith(b"+OK") or replies[1] != b"+OK \r\n":
                failures.append(replies[1].decode(errors="replace").strip())
        finally:
            writer.close()


async def _logins(port: int, pools: list[list[str]], per: int) -> list[str]:
    failures: list[str] = []
    await asyncio.gather(*(_login_worker(port, pool, per, failures) for pool in pools))
    return failures


def _client(port: int, pools: list[list[str]], per: int, start: float, out) -> None:
    import uvloop
    while time.time() < start:          # every client process starts together
        time.sleep(0.001)
    out.put(uvloop.run(_logins(port, pools, per)))


def logins_per_second(port: int, prefix: str, args) -> float:
    """--logins USER/PASS/QUIT sessions from --clients processes, --concurrency
    connections in all; worker w owns users w, w+concurrency, ...: never two
    sessions on one mailbox."""
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
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    with work_dir("bench-pop3-") as work:
        print(f"setting up {2 * args.users + 1} mailboxes ...", flush=True)
        root = make_root(work, args.users)
        wire = add_big_message(root, args.retr_mb)
        (work / "wire").write_bytes(wire)
        results: dict[tuple[int, str], list[float]] = {}
        retr: list[float] = []
        cpu_per_login: dict[str, list[float]] = {}
        plain: list[float] = []
        sender = subprocess.Popen([sys.executable, "-c", SENDER, str(work / "wire")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            sender_port = int(sender.stdout.readline())
            for r in range(args.rounds):
                for n in procs:
                    q, port = start_qrelay(root, n, work)
                    try:
                        receivers = service_pids(q.pid, b"receiver")
                        for label, prefix in (("$1$", "m"), ("$6$", "u")):
                            cpu = cpu_seconds(receivers)
                            rate = logins_per_second(port, prefix, args)
                            cpu_ms = (cpu_seconds(receivers) - cpu) * 1000 / (args.logins // args.concurrency * args.concurrency)
                            results.setdefault((n, label), []).append(rate)
                            cpu_per_login.setdefault(label, []).append(cpu_ms)
                            print(f"round {r + 1}  --procs {n}  {label} logins/s {rate:8.0f}   "
                                  f"receiver CPU {cpu_ms:.2f} ms per login", flush=True)
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
        print("\nmedians")
        for label in ("$1$", "$6$"):
            rates = {n: statistics.median(results[(n, label)]) for n in procs}
            line = "  ".join(f"--procs {n}: {rates[n]:7.0f}/s" for n in procs)
            scale = f"  scaling {rates[procs[-1]] / rates[procs[0]]:.2f}x" if len(procs) > 1 else ""
            print(f"logins {label}  {line}{scale}   receiver CPU {statistics.median(cpu_per_login[label]):.2f} ms/login")
        ratio = statistics.median(r / p for r, p in zip(retr, plain))     # per pair
        print(f"RETR {args.retr_mb} MB: {statistics.median(retr) / 1e6:.0f} MB/s, plain socket "
              f"{statistics.median(plain) / 1e6:.0f} MB/s, ratio {ratio:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
