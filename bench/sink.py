#!/usr/bin/env python3
"""sink.py: a fast SMTP sink that can misbehave on purpose.

    python bench/sink.py --listen 127.0.0.1:2525
    python bench/sink.py --listen 127.0.0.1:0 --port-file /tmp/p --json /tmp/s.json \\
        --tempfail 5 --permfail 1 --fail-at rcpt --greet-fail 2 --delay 10

Counts connections and messages, optionally stores them (--maildir DIR or
--store-dir DIR, one file per message), and injects failures: --tempfail PCT
(451) and --permfail PCT (550 at RCPT / 554 at end of DATA), --greet-fail PCT
(421 and close), --delay MS before every reply. Prints the bound address on
start, a per-second rate while busy and a final count on SIGTERM/SIGINT or
after --max-messages. --json FILE is rewritten every second and at exit, so
a benchmark can poll it to learn how much the sink has received.
--tls-cert PEM (certificate and key in one file, like qmail-tls's
servercert.pem) offers STARTTLS; what was pipelined after it in clear is
dropped, and the session starts over inside TLS.

As a library (for other benches): `SinkProcess` starts it as a subprocess on
port 0 and learns the port from --port-file; `.stats()` reads the JSON,
`.stop()` ends it by pid.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtpload.cli import (OneLineParser, UsageError, check_writable, fail,  # noqa: E402
                          install_uvloop, nonneg_float, nonneg_int, parse_hostport, percent,
                          positive_int, run_main, write_json_atomic)
from smtpload.server import MAX_STORED_MESSAGE, SinkConfig, SinkServer, SinkStats  # noqa: E402
from smtpload.process import terminate, wait_port_file  # noqa: E402

PROG = "sink.py"
BACKLOG = 1024
# Worker → parent stats reports and --max-messages checks.
TICK = 0.1


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Fast SMTP sink (see the module docstring).")
    p.add_argument("--listen", default="127.0.0.1:2525", help="HOST:PORT (port 0 = any)")
    p.add_argument("--port-file", help="write the bound port number to this file")
    p.add_argument("--procs", type=positive_int, default=1,
                   help="processes accepting on the port (SO_REUSEPORT; default 1)")
    p.add_argument("--tempfail", type=percent, default=0.0, help="percent answered 451")
    p.add_argument("--permfail", type=percent, default=0.0, help="percent answered 5xx")
    p.add_argument("--fail-at", choices=("rcpt", "data"), default="data",
                   help="where --tempfail/--permfail strike (default: end of DATA)")
    p.add_argument("--greet-fail", type=percent, default=0.0,
                   help="percent of connections answered 421 and closed")
    p.add_argument("--delay", type=nonneg_float, default=0.0, help="milliseconds before each reply")
    p.add_argument("--no-pipelining", action="store_true", help="do not announce PIPELINING")
    p.add_argument("--maildir", help="store messages in this Maildir")
    p.add_argument("--store-dir", help="store each message as one .eml file here")
    p.add_argument("--max-store-bytes", type=positive_int, default=MAX_STORED_MESSAGE,
                   help="when storing, refuse (552) messages larger than this (default 64 MiB)")
    p.add_argument("--hostname", default="sink.bench.test", help="name in greeting/EHLO")
    p.add_argument("--tls-cert", metavar="PEM",
                   help="certificate and key in one PEM file (as servercert.pem): offer STARTTLS")
    p.add_argument("--max-messages", type=nonneg_int, default=0,
                   help="exit after accepting this many messages (0 = run until signalled)")
    p.add_argument("--seed", type=int, default=None, help="random seed for injected failures")
    p.add_argument("--json", metavar="FILE", help="write counts as JSON (every second and at exit)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-second lines")
    return p


def config_from_args(args) -> tuple[SinkConfig, str, int]:
    host, port = parse_hostport(args.listen)
    if args.tempfail + args.permfail > 100:
        raise UsageError("--tempfail + --permfail must not exceed 100")
    if args.maildir and args.store_dir:
        raise UsageError("use either --maildir or --store-dir, not both")
    if any(c in args.hostname for c in " \r\n\0") or not args.hostname:
        raise UsageError(f"--hostname: bad name {args.hostname!r}")
    if args.json:
        check_writable("--json", args.json)
    if args.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.tls_cert)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--tls-cert {args.tls_cert}: {getattr(exc, 'strerror', None) or exc}")
    cfg = SinkConfig(hostname=args.hostname, tempfail=args.tempfail, permfail=args.permfail,
                     fail_at=args.fail_at, greet_fail=args.greet_fail,
                     delay=args.delay / 1000.0, pipelining=not args.no_pipelining,
                     maildir=args.maildir, store_dir=args.store_dir, seed=args.seed,
                     max_store=args.max_store_bytes, tls_cert=args.tls_cert)
    return cfg, host, port


def raise_open_files() -> None:
    """The soft open-files limit up to the hard one: past it the event loop
    accepts and at once closes connections (libuv's EMFILE handling), which
    no count or line would show."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # an unlimited hard limit beyond the kernel's nr_open: keep the soft one


def bind_socket(host: str, port: int, reuseport: bool, listen: bool) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    if listen:
        sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


class Reporter:
    """Per-second rate lines, the periodic/final --json, the final count."""

    def __init__(self, args, listen: str, procs: int):
        self.args = args
        self.listen = listen
        self.procs = procs
        self.t0 = time.monotonic()
        self.last_print = self.t0
        self.last_messages = 0
        self.last_json = 0.0
        self.last_written: dict | None = None

    def report(self, stats: SinkStats, running: bool) -> dict:
        d = stats.to_dict()
        span = stats.last_message - stats.first_message
        return {"tool": "sink.py", "listen": self.listen, "procs": self.procs,
                "running": running, "elapsed_s": round(time.monotonic() - self.t0, 3),
                "rate_per_s": round(stats.messages / span, 1) if span > 0 else 0.0, **d}

    def tick(self, stats: SinkStats) -> None:
        now = time.monotonic()
        if now - self.last_print >= 1.0:
            dt = now - self.last_print
            delta = stats.messages - self.last_messages
            if not self.args.quiet and (delta or stats.open):
                print(f"sink: {delta / dt:,.0f} msg/s  total {stats.messages:,} msgs  "
                      f"{stats.connections:,} conns ({stats.open} open)  "
                      f"4xx {stats.tempfailed + stats.rcpt_tempfailed:,}  "
                      f"5xx {stats.permfailed + stats.rcpt_permfailed:,}  "
                      f"421 {stats.greet_failed:,}", flush=True)
            self.last_print = now
            self.last_messages = stats.messages
        if self.args.json and now - self.last_json >= 1.0:
            self.last_json = now
            self.write_json(stats, running=True)

    def write_json(self, stats: SinkStats, running: bool) -> None:
        d = stats.to_dict()
        if running and d == self.last_written:
            return
        self.last_written = d
        try:
            write_json_atomic(self.args.json, json.dumps(self.report(stats, running), indent=2))
        except OSError as exc:
            print(f"{PROG}: cannot write {self.args.json}: {exc.strerror}", file=sys.stderr)

    def final(self, stats: SinkStats) -> None:
        if self.args.json:
            self.write_json(stats, running=False)
        print(f"sink: final: {stats.messages:,} messages accepted, "
              f"{stats.tempfailed:,} 4xx / {stats.permfailed:,} 5xx at end of DATA, "
              f"{stats.rcpts:,} recipients ({stats.rcpt_tempfailed:,} 4xx / "
              f"{stats.rcpt_permfailed:,} 5xx), {stats.connections:,} connections "
              f"({stats.greet_failed:,} refused with 421), {stats.bytes:,} bytes", flush=True)


def serve_forever(cfg: SinkConfig, sock: socket.socket, on_tick, max_messages: int) -> SinkStats:
    """Run one sink process on a listening socket until SIGTERM/SIGINT or max_messages."""
    loop = install_uvloop()
    asyncio.set_event_loop(loop)
    srv = SinkServer(cfg, loop)
    stop = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    def tick() -> None:
        on_tick(srv.stats)
        if max_messages and srv.stats.messages >= max_messages:
            request_stop()
        else:
            loop.call_later(TICK, tick)

    async def main() -> None:
        # From inside the running loop: uvloop drops a signal that arrives
        # between add_signal_handler and the loop's start.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
        server = await loop.create_server(srv.protocol, sock=sock, backlog=BACKLOG)
        loop.call_later(TICK, tick)
        await stop
        server.close()
        srv.close_all()
        await server.wait_closed()

    try:
        loop.run_until_complete(main())
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        loop.close()
    return srv.stats


def _worker(cfg: SinkConfig, host: str, port: int, conn) -> None:
    try:
        sock = bind_socket(host, port, reuseport=True, listen=True)
    except OSError as exc:
        conn.send(("error", str(exc.strerror or exc)))
        return
    conn.send(("ready", None))
    last = [0.0]

    def on_tick(stats: SinkStats) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25:
            last[0] = now
            conn.send(("tick", stats.to_dict()))

    stats = serve_forever(cfg, sock, on_tick, 0)
    conn.send(("done", stats.to_dict()))
    conn.close()


def start_workers(cfg: SinkConfig, host: str, port: int, procs: int) -> list:
    """Fork the workers and wait until each listens (so the port file never lies)."""
    ctx = multiprocessing.get_context("fork")
    workers = []
    for _ in range(procs):
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(cfg, host, port, child_end), daemon=True)
        proc.start()
        child_end.close()
        workers.append((proc, parent_end))
    for proc, c in workers:
        try:
            kind, detail = c.recv() if c.poll(30) else ("error", "worker did not start")
        except (EOFError, OSError):
            kind, detail = "error", "worker died"
        if kind != "ready":
            for p, _ in workers:
                p.kill()
                p.join()
            raise OSError(detail)
    return workers


def run_procs(workers: list, reporter: Reporter, max_messages: int,
              reserve: socket.socket) -> SinkStats:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    latest: dict[int, dict] = {}
    final = SinkStats()
    live = {c: i for i, (_, c) in enumerate(workers)}
    sent_stop = False
    while live:
        if (stopping or (max_messages and _sum(latest, final).messages >= max_messages)) \
                and not sent_stop:
            sent_stop = True
            for proc, _ in workers:
                if proc.pid and proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)
        for c in multiprocessing.connection.wait(list(live), timeout=TICK):
            i = live[c]
            try:
                kind, data = c.recv()
            except (EOFError, OSError):
                del live[c]
                latest.pop(i, None)
                continue
            if kind == "tick":
                latest[i] = data
            else:
                final.add(data)
                latest.pop(i, None)
                del live[c]
        reporter.tick(_sum(latest, final))
    for proc, c in workers:
        proc.join(timeout=5)
        c.close()
    reserve.close()
    return final


def _sum(latest: dict[int, dict], base: SinkStats) -> SinkStats:
    total = SinkStats()
    total.add(base.to_dict())
    for d in latest.values():
        total.add(d)
    return total


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, host, port = config_from_args(args)
        raise_open_files()
        for option, d in (("--maildir", args.maildir), ("--store-dir", args.store_dir)):
            if d:
                try:
                    os.makedirs(d, exist_ok=True)
                except OSError as exc:
                    raise UsageError(f"{option} {d}: {exc.strerror or exc}") from None
        # In --procs mode this socket only reserves the port (bound, never listening:
        # the kernel hands connections to the workers' listening sockets).
        sock = bind_socket(host, port, reuseport=args.procs > 1, listen=args.procs == 1)
        workers = start_workers(cfg, host, sock.getsockname()[1], args.procs) \
            if args.procs > 1 else []
    except UsageError as exc:
        fail(PROG, str(exc))
    except OSError as exc:
        fail(PROG, f"cannot listen on {args.listen}: {exc.strerror or exc}")
    bound = sock.getsockname()
    listen = f"{bound[0]}:{bound[1]}" if sock.family == socket.AF_INET else f"[{bound[0]}]:{bound[1]}"
    if args.port_file:
        try:
            write_json_atomic(args.port_file, f"{bound[1]}\n")
        except OSError as exc:
            fail(PROG, f"--port-file {args.port_file}: {exc.strerror}")
    print(f"sink: listening on {listen} ({args.procs} proc{'s' if args.procs > 1 else ''})",
          flush=True)
    reporter = Reporter(args, listen, args.procs)
    if args.json:
        reporter.write_json(SinkStats(), running=True)
    if args.procs == 1:
        stats = serve_forever(cfg, sock, reporter.tick, args.max_messages)
    else:
        stats = run_procs(workers, reporter, args.max_messages, sock)
    reporter.final(stats)
    return 0


class SinkProcess:
    """bench/sink.py as a subprocess, for tests and other benches: on a free
    port unless `port` is given; ready once its port file names the port.

        with SinkProcess(tmp_dir, "--tempfail", "10") as sink:
            ...  # connect to sink.port
            sink.wait_messages(1000, timeout=30)
    """

    def __init__(self, workdir: str | os.PathLike, *extra: str, host: str = "127.0.0.1",
                 port: int = 0, python: str | None = None, startup_timeout: float = 15.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port_file = self.workdir / f"sink-{os.getpid()}-{id(self)}.port"
        self.json_file = self.workdir / f"sink-{os.getpid()}-{id(self)}.json"
        self.host = host
        self.log = open(self.workdir / f"sink-{os.getpid()}-{id(self)}.log", "wb")
        cmd = [python or sys.executable, str(Path(__file__).resolve()),
               "--listen", f"{host}:{port}", "--port-file", str(self.port_file),
               "--json", str(self.json_file), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = wait_port_file(self.proc, self.port_file, time.monotonic() + startup_timeout) or 0
        if not self.port:
            self.stop()
            raise RuntimeError(f"sink did not start: {self.output()}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stats(self) -> dict:
        try:
            return json.loads(self.json_file.read_text())
        except (OSError, ValueError):
            return {}

    def wait_messages(self, n: int, timeout: float, idle: float | None = None) -> dict:
        """Poll the JSON until `messages` >= n, or `timeout` seconds pass, or
        (with `idle`) the count has not grown for `idle` seconds; returns the
        last stats, so the caller tells done from given up by the count."""
        now = time.monotonic()
        deadline, last, changed = now + timeout, -1, now
        while True:
            st = self.stats()
            got = st.get("messages", 0)
            now = time.monotonic()
            if got != last:
                last, changed = got, now
            if got >= n or now > deadline or (idle is not None and now - changed > idle):
                return st
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> dict:
        """SIGTERM by pid, wait, return the final stats."""
        terminate(self.proc, timeout)
        if not self.log.closed:
            self.log.close()
        return self.stats()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        try:
            return Path(self.log.name).read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "SinkProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    run_main(main)
