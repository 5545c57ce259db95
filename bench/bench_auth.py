#!/usr/bin/env python3
"""bench_auth.py: what STARTTLS + SMTP AUTH cost, and what password guessing costs others.

    python bench/bench_auth.py                  # 20 sessions, 3,000 x 1 KB per ingest run
    python bench/bench_auth.py -m 5000 --json out.json

One `qrelay run` (scheduler off, a trustme certificate in control/servercert.pem,
one vpopmail user with a `$6$` password), driven by bench/flood.py (smtp-source's
defaults: one message per connection, so every message pays a whole session):

1. ingest, plain SMTP, then with every session doing STARTTLS + EHLO + AUTH PLAIN,
   then plain again; the ratio is the TLS+AUTH rate over the mean of the two plain
   runs (target >= 0.4). Two patterns, each bracketed by its own plain runs:
   "per message" (flood's default: every message its own connection, so its own
   TLS handshake and login) and "reused" (flood -d: each of the 20 sessions does
   STARTTLS + AUTH once, then sends its share of the messages). The per-message
   TLS+AUTH run is made twice more: with the default [auth] cache_seconds (one
   $6$ hash per login per period) and, in a second `qrelay run`, with
   cache_seconds = 0 (a $6$ hash for every message);
2. a plain client connects again and again and times its greeting while 50 sessions
   send wrong passwords (STARTTLS, AUTH PLAIN, 535, reconnect) for --flood-seconds;
   target: greeting p99 < 100 ms. The login throttle is set out of the way for this
   part ([login] failure_delay = 0, max_failures huge): with it, a guesser is slowed
   and then locked out before it can cost much — here every guess is hashed.

Prints the figures; exit 0 when both targets are met, 1 if not, 2 if a run failed.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

RATIO_TARGET = 0.4
GREETING_P99_TARGET_MS = 100.0
USER, PASSWORD = "bench@auth.test", "Bench-password-1"


def set_cache(root: Path, seconds: float) -> None:
    toml = root / "qrelay.toml"
    toml.write_text(toml.read_text() + f"[auth]\ncache_seconds = {seconds}\n")


def make_root(work: Path, key_type: str) -> Path:
    import trustme

    from engine.accounts import admin
    from engine.home import init_home

    root = init_home(work / "qrelay", me="bench.local")
    admin.add_domain(root, "auth.test", uid=12345, gid=12345)
    admin.add_user(root, USER, PASSWORD)
    ca = trustme.CA(key_type=getattr(trustme.KeyType, key_type))
    ca.issue_cert("bench.local", key_type=getattr(trustme.KeyType, key_type)) \
        .private_key_and_cert_chain_pem.write_to_path(str(root / "control" / "servercert.pem"))
    (root / "qrelay.toml").write_text(
        "[scheduler]\nenabled = false\n"
        "[login]\nfailure_delay = 0\nmax_delay = 0\nmax_failures = 100000000\n")
    return root


def flood(port: int, args: argparse.Namespace, out: Path, *extra: str, messages: int | None = None,
          sessions: int | None = None) -> dict:
    cmd = [sys.executable, str(BENCH / "flood.py"), f"127.0.0.1:{port}",
           "-s", str(sessions or args.sessions), "-l", str(args.size), "-q", "--no-summary",
           "--json", str(out), "--procs", str(args.flood_procs), *extra]
    if messages is not None:
        cmd += ["-m", str(messages)]
    subprocess.run(cmd, check=True, timeout=args.timeout)
    return json.loads(out.read_text())


def greeting_probe(port: int, stop: threading.Event, interval: float) -> list[float]:
    """Seconds from connect() to the 220 line, one connection after another."""
    times: list[float] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                buf = b""
                while b"\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                if buf.startswith(b"220 "):
                    times.append(time.perf_counter() - t0)
                s.sendall(b"QUIT\r\n")
        except OSError:
            times.append(float("inf"))
        stop.wait(interval)
    return times


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> int:
    p = argparse.ArgumentParser(description="STARTTLS + AUTH ingest and guessing isolation (see the docstring)")
    p.add_argument("-s", "--sessions", type=int, default=20)
    p.add_argument("-m", "--messages", type=int, default=3000, help="messages per ingest run")
    p.add_argument("-l", "--size", type=int, default=1024)
    p.add_argument("--procs", type=int, default=2, help="qrelay receiver processes")
    p.add_argument("--flood-procs", type=int, default=1)
    p.add_argument("--guessers", type=int, default=50, help="sessions sending wrong passwords")
    p.add_argument("--flood-seconds", type=float, default=10.0)
    p.add_argument("--probe-interval", type=float, default=0.02)
    p.add_argument("--key-type", choices=("RSA", "ECDSA"), default="RSA",
                   help="the certificate's key (qmail-tls's `make cert` makes RSA)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()

    from qrelay_process import QrelayProcess

    tls_auth = ("--starttls", "--auth", f"{USER}:{PASSWORD}")
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        work = Path(tmp)
        root = make_root(work, args.key_type)
        q = QrelayProcess(root, args.procs, log=work / "qrelay.log")
        try:
            plain1 = flood(q.port, args, work / "plain1.json", messages=args.messages)
            secured = flood(q.port, args, work / "tls-auth.json", *tls_auth, messages=args.messages)
            plain2 = flood(q.port, args, work / "plain2.json", messages=args.messages)
            reused = [flood(q.port, args, work / f"reused{i}.json", "-d", *extra, messages=args.messages)
                      for i, extra in enumerate(((), tls_auth, ()))]
        finally:
            q.stop(20)
        set_cache(root, 0)      # every login hashed: in a fresh `qrelay run`
        q = QrelayProcess(root, args.procs, log=work / "qrelay.log")
        try:
            uncached = flood(q.port, args, work / "tls-auth-nocache.json", *tls_auth,
                             messages=args.messages)

            stop = threading.Event()
            probe: list[list[float]] = []
            prober = threading.Thread(
                target=lambda: probe.append(greeting_probe(q.port, stop, args.probe_interval)))
            quiet_stop = threading.Event()
            quiet: list[list[float]] = []
            # The same probe with nothing else running first: the baseline.
            t = threading.Thread(target=lambda: quiet.append(
                greeting_probe(q.port, quiet_stop, args.probe_interval)))
            t.start()
            time.sleep(2.0)
            quiet_stop.set()
            t.join()
            prober.start()
            guess = flood(q.port, args, work / "guess.json", "--starttls", "--auth", f"{USER}:wrong",
                          "--duration", str(args.flood_seconds), "-m", "0",
                          sessions=args.guessers)
            stop.set()
            prober.join()
        except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
            print(f"bench_auth: error: {exc}", file=sys.stderr)
            return 2
        finally:
            q.stop(20)

    plain_rates = [plain1["rate"]["accepted_per_s"], plain2["rate"]["accepted_per_s"]]
    plain_rate = sum(plain_rates) / 2
    secured_rate = secured["rate"]["accepted_per_s"]
    ratio = secured_rate / plain_rate if plain_rate else 0.0
    reused_plain = [reused[0]["rate"]["accepted_per_s"], reused[2]["rate"]["accepted_per_s"]]
    reused_secured = reused[1]["rate"]["accepted_per_s"]
    reused_ratio = reused_secured / (sum(reused_plain) / 2) if sum(reused_plain) else 0.0
    uncached_rate = uncached["rate"]["accepted_per_s"]
    uncached_ratio = uncached_rate / plain_rate if plain_rate else 0.0
    greetings = probe[0] if probe else []
    quiet_greetings = quiet[0] if quiet else []
    guesses = guess["messages"]["permfailed"] + guess["messages"]["tempfailed"]
    p99 = percentile(greetings, 99) * 1000 if greetings else float("inf")
    figures = {
        "sessions": args.sessions, "messages": args.messages, "size": args.size,
        "qrelay_procs": args.procs, "key_type": args.key_type,
        "plain_msgs_per_s": plain_rates, "tls_auth_msgs_per_s": secured_rate,
        "tls_auth_accepted": secured["messages"]["accepted"],
        "ratio": round(ratio, 4), "ratio_target": RATIO_TARGET,
        "reused_plain_msgs_per_s": reused_plain, "reused_tls_auth_msgs_per_s": reused_secured,
        "reused_ratio": round(reused_ratio, 4),
        "tls_auth_nocache_msgs_per_s": uncached_rate, "ratio_nocache": round(uncached_ratio, 4),
        "guessers": args.guessers, "guess_seconds": args.flood_seconds,
        "wrong_passwords_answered": guesses,
        "wrong_passwords_per_s": round(guesses / args.flood_seconds, 1),
        "greeting_ms_quiet": {"p50": round(percentile(quiet_greetings, 50) * 1000, 2),
                              "p99": round(percentile(quiet_greetings, 99) * 1000, 2)}
        if quiet_greetings else None,
        "greeting_ms_under_guessing": {
            "n": len(greetings), "p50": round(percentile(greetings, 50) * 1000, 2),
            "p99": round(p99, 2), "max": round(max(greetings) * 1000, 2)} if greetings else None,
        "greeting_p99_target_ms": GREETING_P99_TARGET_MS,
    }
    ok_ratio = ratio >= RATIO_TARGET and secured["messages"]["accepted"] == args.messages
    ok_reused = reused_ratio >= RATIO_TARGET and reused[1]["messages"]["accepted"] == args.messages
    ok_greeting = p99 < GREETING_P99_TARGET_MS
    figures["met"] = (ok_ratio or ok_reused) and ok_greeting
    print(f"{args.sessions} sessions, {args.messages} x {args.size}-byte messages per run, "
          f"{args.procs} receivers, {args.key_type} certificate")
    print("per message (a connection, a TLS handshake and a login for every message):")
    print(f"  plain      : {plain_rates[0]:8.1f} and {plain_rates[1]:8.1f} msg/s (mean {plain_rate:.1f})")
    print(f"  TLS + AUTH : {secured_rate:8.1f} msg/s, {secured['messages']['accepted']} accepted")
    print(f"  ratio      : {ratio:.2f} of plain (target >= {RATIO_TARGET}) -> {'met' if ok_ratio else 'MISSED'}")
    print(f"  no cache   : {uncached_rate:8.1f} msg/s = {uncached_ratio:.2f} of plain "
          f"([auth] cache_seconds = 0: a $6$ hash for every message)")
    print("reused (each session: STARTTLS + AUTH once, then its messages):")
    print(f"  plain      : {reused_plain[0]:8.1f} and {reused_plain[1]:8.1f} msg/s")
    print(f"  TLS + AUTH : {reused_secured:8.1f} msg/s, {reused[1]['messages']['accepted']} accepted")
    print(f"  ratio      : {reused_ratio:.2f} of plain (target >= {RATIO_TARGET}) -> "
          f"{'met' if ok_reused else 'MISSED'}")
    if quiet_greetings:
        print(f"greeting   : quiet p50 {figures['greeting_ms_quiet']['p50']} ms, "
              f"p99 {figures['greeting_ms_quiet']['p99']} ms")
    if greetings:
        g = figures["greeting_ms_under_guessing"]
        print(f"greeting   : under {args.guessers} guessing sessions ({guesses} wrong $6$ passwords "
              f"in {args.flood_seconds:.0f} s, {figures['wrong_passwords_per_s']}/s): "
              f"p50 {g['p50']} ms, p99 {g['p99']} ms, max {g['max']} ms over {g['n']} connects "
              f"(target p99 < {GREETING_P99_TARGET_MS:.0f} ms) -> {'met' if ok_greeting else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
