#!/usr/bin/env python3
"""flood.py: an SMTP load generator for relays (ours or anyone's).

    python bench/flood.py 127.0.0.1:2525 -s 20 -m 20000 -l 1024
    python bench/flood.py mx.test:25 -s 50 --duration 30 --pipelining -d \\
        --to 'u{n}@{domain}' --domain a.test:3 --domain b.test:1 --json out.json

Like Postfix's smtp-source (same defaults: one message per connection, no
pipelining), but it reports the truth: outcomes by reply code and text,
connection errors, and connect / MAIL…end-of-DATA latency percentiles.
`--procs N` runs N worker processes (uvloop each) and merges their results.

Exit status: 0 after a run (whatever the server answered), 2 for bad
arguments or a target no connection could be made to (one line on stderr).
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.connection
import resource
import signal
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtpload.cli import (OneLineParser, UsageError, check_writable, fail,  # noqa: E402
                          install_uvloop, nonneg_float, nonneg_int, parse_hostport,
                          positive_int, run_main, write_json_atomic)
from smtpload.client import FloodConfig, FloodRun, FloodStats, validate_templates  # noqa: E402
from smtpload.message import MessageError, load_eml_dir, synthetic  # noqa: E402

PROG = "flood.py"
# How often workers report progress to the parent and the line is redrawn.
PROGRESS_INTERVAL = 0.25
# --eml: files read at most (all are kept in memory, pre-encoded).
MAX_EML_FILES = 10000
# Descriptors a process needs besides one per session (stdio, the event
# loop's own, the pipes to worker processes).
FD_MARGIN = 64


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="SMTP load generator (see the module docstring).")
    p.add_argument("target", help="HOST:PORT of the SMTP server")
    p.add_argument("-s", "--sessions", type=positive_int, default=10,
                   help="concurrent SMTP sessions (default 10)")
    p.add_argument("-m", "--messages", type=nonneg_int, default=None,
                   help="messages to send (default 1000; unlimited with --duration)")
    p.add_argument("--duration", type=nonneg_float, default=0.0,
                   help="stop starting messages after SEC seconds")
    p.add_argument("-l", "--size", type=nonneg_int, default=1024,
                   help="message payload bytes, headers not counted (default 1024)")
    p.add_argument("--eml", metavar="DIR", help="send the .eml files of DIR in turn instead")
    p.add_argument("-r", "--rcpts", type=positive_int, default=1,
                   help="recipients per message (default 1)")
    p.add_argument("-f", "--from", dest="sender", default="flood@bench.test",
                   help="sender template (default flood@bench.test)")
    p.add_argument("-t", "--to", dest="recipient", default="user{i}@{domain}",
                   help="recipient template: {n} message no., {i} recipient no., "
                        "{domain}, {rand}, {session} (default user{i}@{domain})")
    p.add_argument("--rand-range", type=positive_int, default=1_000_000, metavar="N",
                   help="{rand} is drawn from 0..N-1 (default 1000000): --to 'u{rand}@{domain}' "
                        "--rand-range 100 spreads over u0..u99 of each domain")
    p.add_argument("--domain", action="append", metavar="NAME[:WEIGHT]",
                   help="domain mix for {domain} (repeatable; default sink.test)")
    p.add_argument("--rate", type=nonneg_float, default=0.0,
                   help="cap on messages started per second, all processes (0 = none)")
    p.add_argument("--pipelining", action="store_true",
                   help="send MAIL+RCPT+DATA in one write when the server offers PIPELINING")
    p.add_argument("--per-conn", type=nonneg_int, default=1,
                   help="messages per connection (default 1, as smtp-source; 0 = unlimited)")
    p.add_argument("-d", "--reuse", action="store_true",
                   help="keep connections for any number of messages (= --per-conn 0)")
    p.add_argument("--noop", action="store_true",
                   help="protocol only: MAIL, RCPT, RSET — no DATA")
    p.add_argument("--procs", type=positive_int, default=1,
                   help="worker processes (default 1)")
    p.add_argument("--starttls", action="store_true",
                   help="STARTTLS on every connection, then EHLO again (the server's "
                        "certificate is not verified: a load tool)")
    p.add_argument("--tls-resume", action="store_true",
                   help="with --starttls: offer every new connection the TLS session the server "
                        "last gave (kept while the server resumes it), as mail clients do when "
                        "they reconnect")
    p.add_argument("--auth", metavar="USER:PASSWORD", default="",
                   help="AUTH PLAIN on every connection before the first MAIL")
    p.add_argument("--helo", default="flood.bench.test", help="EHLO/HELO name")
    p.add_argument("--hello", choices=("auto", "ehlo", "helo"), default="auto",
                   help="greeting command: auto = EHLO with --pipelining, else HELO "
                        "(as smtp-source does)")
    p.add_argument("--timeout", type=nonneg_float, default=30.0,
                   help="seconds to wait for a connect or a reply (default 30)")
    p.add_argument("--drain", type=nonneg_float, default=2.0,
                   help="after --duration, seconds in-flight messages may finish (default 2)")
    p.add_argument("--seed", type=int, default=None, help="random seed (domain mix)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.add_argument("--no-summary", action="store_true", help="no summary tables on stdout")
    return p


def parse_domains(specs: list[str] | None) -> tuple[tuple[str, float], ...]:
    if not specs:
        return (("sink.test", 1.0),)
    out = []
    for spec in specs:
        name, sep, weight = spec.partition(":")
        if not name or any(c in name for c in "<>@ \r\n\0"):
            raise UsageError(f"--domain: bad domain in {spec!r}")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise UsageError(f"--domain: bad weight in {spec!r}") from None
        if not w > 0 or w == float("inf"):
            raise UsageError(f"--domain: weight must be > 0 in {spec!r}")
        out.append((name, w))
    return tuple(out)


def config_from_args(args) -> tuple[FloodConfig, dict]:
    """Validated FloodConfig for the whole run, and the settings echoed in --json."""
    host, port = parse_hostport(args.target)
    if port == 0:
        raise UsageError(f"port 0 is not a target: {args.target!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"cannot resolve {host!r}: {getattr(exc, 'strerror', exc)}") from None
    # Resolve once: no resolver call per connection, every worker hits one address.
    numeric = infos[0][4][0]
    messages = args.messages
    if messages is None:
        messages = 0 if args.duration else 1000
    if messages == 0 and not args.duration:
        raise UsageError("-m 0 (unlimited) needs --duration")
    if args.eml and args.size != 1024:
        raise UsageError("use either -l/--size or --eml, not both")
    per_conn = 0 if args.reuse else args.per_conn
    if args.pipelining and args.hello == "helo":
        raise UsageError("--pipelining needs EHLO (not --hello helo)")
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    if (args.starttls or args.auth) and args.hello == "helo":
        raise UsageError("--starttls and --auth need EHLO (not --hello helo)")
    if args.tls_resume and not args.starttls:
        raise UsageError("--tls-resume needs --starttls")
    if args.auth and ":" not in args.auth:
        raise UsageError("--auth: expected USER:PASSWORD")
    if args.json:
        check_writable("--json", args.json)
    if args.eml:
        bodies = tuple(load_eml_dir(args.eml, MAX_EML_FILES))
        unique = b"X-Flood-Id"
    else:
        bodies = (synthetic(args.size),)
        unique = b"Message-ID"
    if any(c in args.helo for c in " <>\r\n\0") or not args.helo:
        raise UsageError(f"--helo: bad name {args.helo!r}")
    cfg = FloodConfig(
        host=numeric, port=port, sessions=args.sessions, messages=messages,
        duration=args.duration, per_conn=per_conn, rcpts=args.rcpts,
        pipelining=args.pipelining, noop=args.noop, rate=args.rate, helo=args.helo,
        ehlo=args.hello == "ehlo" or (args.hello == "auto" and (args.pipelining or args.starttls
                                                                 or bool(args.auth))),
        starttls=args.starttls, auth=args.auth, tls_resume=args.tls_resume,
        sender=args.sender, recipient=args.recipient, domains=parse_domains(args.domain),
        bodies=bodies, unique_header=unique, timeout=args.timeout, drain=args.drain,
        seed=args.seed, rand_range=args.rand_range)
    try:
        validate_templates(cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = {
        "sessions": cfg.sessions, "messages": messages, "duration": cfg.duration,
        "size": None if args.eml else args.size, "eml": args.eml, "eml_files": len(bodies)
        if args.eml else 0, "rcpts": cfg.rcpts, "per_conn": per_conn,
        "pipelining": cfg.pipelining, "noop": cfg.noop, "rate": cfg.rate,
        "hello": "EHLO" if cfg.ehlo else "HELO",
        "starttls": cfg.starttls, "tls_resume": cfg.tls_resume, "auth": bool(cfg.auth),
        "procs": args.procs, "from": cfg.sender, "to": cfg.recipient,
        "rand_range": cfg.rand_range,
        "domains": [list(d) for d in cfg.domains], "timeout": cfg.timeout,
    }
    return cfg, settings


def ensure_open_files(sessions: int, per_process: int) -> None:
    """Room for `per_process` connections in this process and the workers it
    forks: the soft RLIMIT_NOFILE is raised as far as needed when the hard
    limit allows, else UsageError (every connect past it would fail with
    EMFILE, counted as if the server had refused it)."""
    need = per_process + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise UsageError(f"-s {sessions} needs {need} open files per process, and the hard "
                         f"limit (ulimit -Hn) is {hard}: fewer sessions, or more --procs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def split_config(cfg: FloodConfig, procs: int) -> list[FloodConfig]:
    """Each worker's share: sessions, messages and rate divided as evenly as possible."""
    if cfg.messages:
        procs = min(procs, cfg.messages)
    procs = max(1, min(procs, cfg.sessions))
    shares = []
    for k in range(procs):
        sessions = cfg.sessions // procs + (k < cfg.sessions % procs)
        messages = cfg.messages // procs + (k < cfg.messages % procs) if cfg.messages else 0
        seed = None if cfg.seed is None else cfg.seed + k
        shares.append(replace(cfg, sessions=sessions, messages=messages,
                              rate=cfg.rate / procs, seed=seed, seq_start=k, seq_step=procs))
    return shares


# --- one process --------------------------------------------------------------
def run_inline(cfg: FloodConfig, progress) -> tuple[FloodStats, str | None]:
    loop = install_uvloop()
    try:
        asyncio.set_event_loop(loop)
        run = FloodRun(cfg, loop)
        interrupted = []

        def on_sigint() -> None:
            if interrupted:
                run._cut()
            interrupted.append(1)
            run.stop()

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_sigint)
        except (RuntimeError, ValueError):
            pass  # not the main thread (a test calling main()): no Ctrl-C handling

        def tick() -> None:
            progress.update(run.stats.progress(), len(run.clients))
            timer[0] = loop.call_later(PROGRESS_INTERVAL, tick)

        async def go() -> None:
            run.start()
            await run.done

        timer = [loop.call_later(PROGRESS_INTERVAL, tick)]
        loop.run_until_complete(go())
        timer[0].cancel()
        progress.update(run.stats.progress(), 0)
        _settle(loop)
        return run.stats, run.unreachable
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (RuntimeError, ValueError, NotImplementedError):
                pass
        asyncio.set_event_loop(None)
        loop.close()


def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Let closing transports and finished tasks be reaped before the loop closes."""
    for _ in range(3):
        loop.run_until_complete(asyncio.sleep(0))
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


# --- N processes ---------------------------------------------------------------
def _worker(cfg: FloodConfig, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    loop = install_uvloop()
    asyncio.set_event_loop(loop)
    run = FloodRun(cfg, loop)

    def from_parent() -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            msg = "stop"
        if msg == "stop":
            run.stop()
        elif msg == "cut":
            run._cut()

    def tick() -> None:
        conn.send(("tick", run.stats.progress(), len(run.clients)))
        loop.call_later(PROGRESS_INTERVAL, tick)

    if conn.recv() != "go":
        return
    loop.add_reader(conn.fileno(), from_parent)

    async def go() -> None:
        run.start()
        await run.done

    loop.call_later(PROGRESS_INTERVAL, tick)
    loop.run_until_complete(go())
    loop.remove_reader(conn.fileno())
    _settle(loop)
    conn.send(("done", run.stats.to_state(), run.unreachable))
    conn.close()
    loop.close()


def run_procs(shares: list[FloodConfig], progress) -> tuple[FloodStats, str | None]:
    ctx = multiprocessing.get_context("fork")
    workers = []
    for share in shares:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(share, child_end), daemon=True)
        proc.start()
        child_end.close()
        workers.append((proc, parent_end))
    merged = FloodStats()
    snaps: dict[int, tuple[dict, int]] = {}
    unreachable = None
    live = {w[1]: i for i, w in enumerate(workers)}
    interrupts = [0]
    sent = [0]
    # SIGINT (even when inherited as ignored, as in a background job) and
    # SIGTERM: first one drains, second one cuts.
    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, lambda *_: interrupts.__setitem__(0, interrupts[0] + 1))
               for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for _, c in workers:
            c.send("go")
        while live:
            if interrupts[0] > sent[0]:
                sent[0] = interrupts[0]
                for c in live:
                    try:
                        c.send("stop" if sent[0] == 1 else "cut")
                    except OSError:
                        pass
            ready = multiprocessing.connection.wait(list(live), timeout=PROGRESS_INTERVAL)
            for c in ready:
                i = live[c]
                try:
                    msg = c.recv()
                except (EOFError, OSError):
                    del live[c]
                    merged.conn_error("worker process died")
                    continue
                if msg[0] == "tick":
                    snaps[i] = (msg[1], msg[2])
                elif msg[0] == "done":
                    merged.merge_state(msg[1])
                    unreachable = unreachable or msg[2]
                    snaps.pop(i, None)
                    del live[c]
            total = {"attempted": merged.attempted, "accepted": merged.accepted,
                     "errors": 0, "tempfailed": merged.tempfailed,
                     "permfailed": merged.permfailed, "conn_failed": merged.conn_failed}
            conns = 0
            for snap, n in snaps.values():
                for k in total:
                    total[k] += snap[k]
                conns += n
            total["errors"] = total["tempfailed"] + total["permfailed"] + total["conn_failed"]
            progress.update(total, conns)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for proc, c in workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            c.close()
    if merged.connections:
        unreachable = None
    return merged, unreachable


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, settings = config_from_args(args)
    except (UsageError, MessageError) as exc:
        fail(PROG, str(exc))
    from smtpload.report import ProgressLine, build_report, print_summary

    shares = split_config(cfg, args.procs)
    settings["procs"] = len(shares)
    try:
        ensure_open_files(cfg.sessions, max(share.sessions for share in shares))
    except UsageError as exc:
        fail(PROG, str(exc))
    progress = ProgressLine(args.target, cfg.messages, args.quiet)
    try:
        if len(shares) == 1:
            stats, unreachable = run_inline(shares[0], progress)
        else:
            stats, unreachable = run_procs(shares, progress)
    finally:
        progress.close()
    if not unreachable and stats.connections == 0 and stats.conn_failed:
        # Fewer messages than sessions (-m 1): the run ends before the early
        # check (every session failed) can fire, but nothing ever connected.
        unreachable = max(stats.conn_errors, key=stats.conn_errors.get, default="no connection")
    if unreachable:
        fail(PROG, f"cannot connect to {args.target}: {unreachable}")
    report = build_report(stats, args.target, settings, cfg.messages)
    if args.json:
        try:
            write_json_atomic(args.json, json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            fail(PROG, f"--json {args.json}: {exc.strerror}")
    if not args.no_summary:
        print_summary(report)
    return 0


if __name__ == "__main__":
    run_main(main)
