#!/usr/bin/env python3
"""bench_remote_tls.py: remote delivery to a STARTTLS sink against a plain one.

    python bench/bench_remote_tls.py                  # 5,000 x 1 KB, 20 at once, 3 rounds
    python bench/bench_remote_tls.py -m 2000 --no-reuse   # one message per connection

RemoteDelivery (engine/delivery/remote.py, uvloop, in this process) delivers
`-m` messages, `-c` at a time, through smtproutes to bench/sink.py on
127.0.0.1 — once to a sink without TLS, once to `sink.py --tls-cert` (a trustme
certificate; qrelay's default opportunistic policy: STARTTLS, no
verification) — alternating for `--rounds` rounds and keeping the best of
each side. It prints both rates and TLS ÷ plain. With the pool (default, up
to 100 messages per connection) a handshake is paid once per connection;
`--no-reuse` pays one per message. A figure only, no target: exit 0 once
measured, 2 (one line) if the run could not be made.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from sink import SinkProcess  # noqa: E402

from engine.delivery.remote import RemoteConfig, RemoteDelivery  # noqa: E402
from engine.delivery.routes import SmtpRoutes  # noqa: E402

MESSAGE = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 12


async def deliver_all(port: int, messages: int, concurrency: int,
                      per_connection: int) -> tuple[float, int, int, list[str]]:
    """Seconds for `messages` deliveries; how many were K, how many said TLS,
    the first texts of those that were not."""
    config = RemoteConfig(helohost="bench.test",
                          routes=SmtpRoutes.from_text(f"tls.bench:127.0.0.1:{port}\n"),
                          timeoutconnect=10, timeoutremote=30,
                          max_messages_per_connection=per_connection,
                          max_connections_per_host=concurrency, idle_timeout=5.0)
    rd = RemoteDelivery(config)
    left = list(range(messages))
    ok = tls = 0
    failures: list[str] = []

    async def worker() -> None:
        nonlocal ok, tls
        while left:
            left.pop()
            (result,) = await rd.deliver("tls.bench", "a@src.test", ["u@tls.bench"], MESSAGE)
            if result.status != "K" and len(failures) < 5:
                failures.append(result.text)
            if result.status == "K":
                ok += 1
                tls += "TLS transmitted" in result.text
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, ok, tls, failures
    finally:
        await rd.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--messages", type=int, default=5000)
    p.add_argument("-c", "--concurrency", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-reuse", action="store_true", help="one message per connection")
    args = p.parse_args()
    if args.messages < 1 or args.concurrency < 1 or args.rounds < 1:
        print("bench_remote_tls.py: error: -m, -c and --rounds must be positive", file=sys.stderr)
        return 2
    import trustme
    import uvloop
    per_connection = 1 if args.no_reuse else 100
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        pem = Path(tmp) / "servercert.pem"
        trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        try:
            sinks = {"plain": SinkProcess(Path(tmp) / "plain", "--quiet"),
                     "tls": SinkProcess(Path(tmp) / "tls", "--quiet", "--tls-cert", str(pem))}
        except RuntimeError as exc:
            print(f"bench_remote_tls.py: error: {exc}", file=sys.stderr)
            return 2
        best = {"plain": 0.0, "tls": 0.0}
        try:
            for r in range(args.rounds):
                for side in ("plain", "tls"):
                    secs, ok, tls, failures = uvloop.run(deliver_all(
                        sinks[side].port, args.messages, args.concurrency, per_connection))
                    want_tls = args.messages if side == "tls" else 0
                    if ok != args.messages or tls != want_tls:
                        print(f"bench_remote_tls.py: error: {side}: {ok} delivered, {tls} with TLS"
                              f" of {args.messages}; {failures[:1]}", file=sys.stderr)
                        return 2
                    rate = args.messages / secs
                    best[side] = max(best[side], rate)
                    print(f"round {r + 1} {side:5}: {rate:8,.0f} msg/s", flush=True)
            stats = sinks["tls"].stats()
        finally:
            for s in sinks.values():
                s.stop()
    mode = "one message per connection" if args.no_reuse else "pooled, up to 100 per connection"
    print(f"remote delivery, {args.messages:,} x 1 KB, {args.concurrency} at once, {mode}:")
    print(f"  plain sink {best['plain']:,.0f} msg/s, STARTTLS sink {best['tls']:,.0f} msg/s"
          f" ({stats.get('starttls', 0):,} handshakes in all rounds), TLS / plain ="
          f" {best['tls'] / best['plain']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
