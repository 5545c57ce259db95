"""Relay-table check rate (engine/relay): 100,000 entries against 10, same run
(prints numbers, not pass/fail).

Target (issue 13): the POP-before-SMTP check with 100,000 entries runs at
>= 0.9x the rate with 10, for the embedded table (LMDB) and for Redis.

    .venv/bin/python bench/bench_relay_table.py [--big 100000] [--checks 10000] [--rounds 3]
                                                [--logins 2000] [--parallel 32] [--no-redis]

Each check asks for a random address, half of them granted. The embedded
table is timed on the session's path (`allows_nowait`, no await) and through
`await allows`, in CPU seconds of this process; Redis through `await allows`,
one check at a time (a round trip each) and 32 at once, in wall seconds. The
small and big tables take turns every 500 checks and the best of the rounds
is kept, so a busy machine's noise hits both alike. Redis:
a redis-server started here on a free loopback port (bench/redis_process.py).
The embedded tables are timed once each process's copy of the grants is made
(engine/relay/mirror.py); making it, once per process, is timed and printed
before.

Then what a POP3 login costs the table (throttle.success + grant, into the
big table, random granted addresses): one login at a time and --parallel at
once, in CPU per login of the event loop's thread (what the receiver's
loop pays) and of the whole process (the embedded writer thread included),
and for the embedded table the logins per commit (writes that arrive
together share one transaction).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from engine.config.settings import RelaySettings, Settings  # noqa: E402
from engine.relay import RelayTable, open_relay_table  # noqa: E402
from engine.relay.throttle import LoginThrottle  # noqa: E402


def addresses(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            for _ in range(n)]


async def fill(table: RelayTable, ips: list[str]) -> None:
    await table.grant_many([(ip, 3600.0) for ip in ips])


def probes(granted: list[str], checks: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    strangers = addresses(checks, seed + 1)
    return [rng.choice(granted) if i % 2 else strangers[i] for i in range(checks)]


CHUNK = 500     # checks timed at a stretch; small and big tables take turns


def time_nowait(table: RelayTable, ips: list[str], clock) -> float:
    allows = table.allows_nowait
    started = clock()
    for ip in ips:
        allows(ip)
    return clock() - started


async def time_await(table: RelayTable, ips: list[str], parallel: int, clock) -> float:
    started = clock()
    if parallel == 1:
        for ip in ips:
            await table.allows(ip)
    else:
        for i in range(0, len(ips), parallel):
            await asyncio.gather(*(table.allows(ip) for ip in ips[i:i + parallel]))
    return clock() - started


async def measure(name: str, small: RelayTable, big: RelayTable, small_ips: list[str],
                  big_ips: list[str], args: argparse.Namespace, embedded: bool) -> None:
    # Embedded checks are this process's CPU work: timed in CPU seconds, so other
    # processes on a busy machine do not count. Redis checks wait for the server:
    # wall time.
    clock = time.process_time if embedded else time.perf_counter
    unit = "checks/CPU-s" if embedded else "checks/s"
    kinds = [("allows_nowait", None)] if embedded else []
    kinds += [("await allows", 1)] + ([] if embedded else [("32 at once", 32)])
    for kind, parallel in kinds:
        best = {"small": math.inf, "big": math.inf}
        for r in range(args.rounds):
            spent = {"small": 0.0, "big": 0.0}
            probe = {"small": probes(small_ips, args.checks, seed=r),
                     "big": probes(big_ips, args.checks, seed=r)}
            for i in range(0, args.checks, CHUNK):
                for label, table in (("small", small), ("big", big)):
                    ips = probe[label][i:i + CHUNK]
                    if parallel is None:
                        spent[label] += time_nowait(table, ips, clock)
                    else:
                        spent[label] += await time_await(table, ips, parallel, clock)
            for label in best:
                best[label] = min(best[label], spent[label])
        rate = {label: args.checks / best[label] for label in best}
        print(f"{name:9s} {kind:14s} {args.small:>7,} entries: {rate['small']:>10,.0f} {unit}   "
              f"{args.big:>7,} entries: {rate['big']:>10,.0f} {unit}   "
              f"ratio {rate['big'] / rate['small']:.2f}", flush=True)


async def measure_logins(name: str, table: RelayTable, granted: list[str],
                         args: argparse.Namespace) -> None:
    throttle = LoginThrottle(table, Settings())
    rng = random.Random(7)

    async def login(ip: str) -> None:
        await throttle.success(ip)
        await table.grant(ip)

    await login(granted[0])         # the writer thread started, the table open
    writer = getattr(table, "_writer", None)
    for parallel in (1, args.parallel):
        best = (math.inf, math.inf, 0.0)
        for _ in range(args.rounds):
            ips = [rng.choice(granted) for _ in range(args.logins)]
            commits = writer.batches if writer is not None else 0
            loop0, proc0 = time.thread_time(), time.process_time()
            for i in range(0, len(ips), parallel):
                await asyncio.gather(*(login(ip) for ip in ips[i:i + parallel]))
            loop, proc = time.thread_time() - loop0, time.process_time() - proc0
            per_commit = (len(ips) / max(1, writer.batches - commits)) if writer is not None else 0.0
            best = min(best, (loop, proc, per_commit))
        loop, proc, per_commit = best
        n = args.logins
        extra = f"   {per_commit:4.1f} logins/commit" if writer is not None else ""
        print(f"{name:9s} login grant, {parallel:2d} at once: loop {1e6 * loop / n:6.1f} us CPU/login   "
              f"process {1e6 * proc / n:6.1f} us CPU/login{extra}", flush=True)


async def run_store(name: str, make, args: argparse.Namespace) -> None:
    small, big = make("small"), make("big")
    try:
        small_ips, big_ips = addresses(args.small, 1), addresses(args.big, 2)
        started = time.perf_counter()
        await fill(small, small_ips)
        await fill(big, big_ips)
        print(f"{name:9s} filled {args.big:,} grants in {time.perf_counter() - started:.1f} s",
              flush=True)
        if name == "embedded":
            # A process's first check starts its copy of the grants (built in a
            # thread past INLINE_BUILD entries; checks read the tree meanwhile):
            # a start-up cost, timed here, not mixed into the steady-state rates.
            for table, count in ((small, args.small), (big, args.big)):
                started, cpu = time.perf_counter(), time.process_time()
                table.allows_nowait(big_ips[0])
                if table._builder is not None:
                    table._builder.join()
                table.allows_nowait(big_ips[0])
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                print(f"{name:9s} first check and copy of {count:,} grants: {wall:.3f} s, "
                      f"{cpu:.3f} s CPU", flush=True)
        await measure(name, small, big, small_ips, big_ips, args, embedded=name == "embedded")
        if args.logins:
            await measure_logins(name, big, big_ips, args)
    finally:
        await small.close()
        await big.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--checks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logins", type=int, default=2000, help="logins timed per round (0: none)")
    parser.add_argument("--parallel", type=int, default=32, help="logins at once, second figure")
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        work = Path(tmp)
        asyncio.run(run_store(
            "embedded", lambda label: open_relay_table(work / label, Settings()), args))
        if args.no_redis:
            return
        from redis_process import RedisServer
        server = RedisServer(work / "redis")
        try:
            def make(label: str) -> RelayTable:
                relay = RelaySettings(store=server.url(), key_prefix=f"{label}:", timeout=5.0)
                return open_relay_table(work, dataclasses.replace(Settings(), relay=relay))
            asyncio.run(run_store("redis", make, args))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
