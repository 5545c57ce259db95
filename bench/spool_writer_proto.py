"""Several receiver processes enqueueing: LMDB's cross-process writer lock vs
a single writer process fed over a unix socket (prototype for issue #3 §4).

    .venv/bin/python bench/spool_writer_proto.py [PROCS] [THREADS] [SECONDS]

lmdb:   each of PROCS processes opens the spool itself and runs THREADS
        producers calling enqueue (its own group commit; LMDB serialises the
        processes' write transactions, their segment fdatasyncs overlap).
socket: one writer process (engine.queue.writer.run_writer) owns the spool;
        PROCS processes × THREADS producers enqueue through SpoolClient over
        a unix socket (the writer group-commits every process's messages).

Figures and the choice (the single writer) are in engine/queue/__init__.py.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spool_bench_lib import enqueue_rate  # noqa: E402

from engine.queue import Spool  # noqa: E402

def lmdb_producer(path: str, threads: int, seconds: float, out: mp.Queue) -> None:
    spool = Spool(path)
    try:
        out.put(enqueue_rate(spool, threads, seconds))
    finally:
        spool.close()


def writer_process(path: str, sock_path: str, ready: mp.Event, stop: mp.Event) -> None:
    from engine.queue.writer import run_writer
    run_writer(path, sock_path, on_ready=ready.set)


def socket_producer(sock_path: str, threads: int, seconds: float, out: mp.Queue) -> None:
    from engine.queue.writer import SpoolClient
    client = SpoolClient(sock_path)
    try:
        out.put(enqueue_rate(client, threads, seconds))  # the client enqueues like a Spool
    finally:
        client.close()


def run_producers(target, args: tuple, procs: int) -> float:
    """Messages/s of `procs` processes running target(*args, out), summed."""
    out: mp.Queue = mp.Queue()
    ps = [mp.Process(target=target, args=(*args, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    total = sum(out.get(timeout=120) for _ in ps)
    for p in ps:
        p.join()
    return total


def run_lmdb(path: str, procs: int, threads: int, seconds: float) -> float:
    return run_producers(lmdb_producer, (path, threads, seconds), procs)


def run_socket(path: str, procs: int, threads: int, seconds: float) -> float:
    sock_path = os.path.join(tempfile.mkdtemp(), "spool.sock")
    ready, stop = mp.Event(), mp.Event()
    w = mp.Process(target=writer_process, args=(path, sock_path, ready, stop))
    w.start()
    try:
        ready.wait(30)
        total = run_producers(socket_producer, (sock_path, threads, seconds), procs)
    finally:
        os.kill(w.pid, signal.SIGTERM)
        w.join(30)
        if w.is_alive():
            w.kill()
            w.join()
    return total


def compare(procs: int = 4, threads: int = 8, seconds: float = 2.0,
            rounds: int = 2) -> dict[str, float]:
    base = Path(tempfile.mkdtemp())
    lm, so = [], []
    for i in range(rounds):
        lm.append(run_lmdb(str(base / f"lmdb{i}"), procs, threads, seconds))
        so.append(run_socket(str(base / f"sock{i}"), procs, threads, seconds))
    lm.sort()
    so.sort()
    return {"lmdb_lock": lm[len(lm) // 2], "single_writer": so[len(so) // 2]}


if __name__ == "__main__":
    mp.set_start_method("fork")
    a = [int(sys.argv[1]) if len(sys.argv) > 1 else 4, int(sys.argv[2]) if len(sys.argv) > 2
         else 8, float(sys.argv[3]) if len(sys.argv) > 3 else 2.0]
    r = compare(*a)
    print(f"procs={a[0]} threads={a[1]}: LMDB writer lock {r['lmdb_lock']:.0f} msg/s, "
          f"single writer over unix socket {r['single_writer']:.0f} msg/s, "
          f"ratio {r['lmdb_lock'] / r['single_writer']:.2f}")
