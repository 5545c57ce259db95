"""Delivery worker processes (engine.delivery.spawner): frames, and `qrelay run`
with `[delivery] worker_procs = 2` end to end to loopback sinks.

Routes go through control/smtproutes to 127.0.0.1 and the resolver is a fake
DNS server (never the machine's). Every process started here is stopped by
its pid (RunningQrelay kills its own process group at the end).
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from engine import ipc
from engine.delivery.channels import UNREADABLE_TEXT, Forward, Group, RecipientResult
from engine.delivery.spawner import (BAD_JOB, MAX_FRAME, OK, Spawner, WorkerServer, decode_job,
                                     decode_result, encode_error, encode_job, encode_results)
from tests.conftest import run_cli
from tests.smtp_harness import RunningQrelay, children_of, process_title, route_to_loopback
from tests.test_delivery_e2e import ThreadSink, send, texts, wait_for

GROUP = Group("remote", 12345, "dom.test", "a@src.test", ("x@dom.test", "\udcff@dom.test"))


# --- frames (in process) -------------------------------------------------------------

def test_job_and_result_frames_round_trip():
    frame = encode_job(7, 12345, GROUP, None)
    body = frame[4:]
    assert int.from_bytes(frame[:4], "big") == len(body)
    assert decode_job(body) == (7, GROUP, None)
    assert decode_job(encode_job(8, 12345, GROUP, b"inline\r\n")[4:]) == (8, GROUP, b"inline\r\n")
    fwd = (Forward("a@src.test", ("f@o.test", "g@o.test"), b"Delivered-To: x\r\n", 89, True),
           Forward("", ("h@o.test",), b"", 0xFFFFFFFE, False))
    res = encode_results(7, [RecipientResult("x", "K", "ok\n", fwd), RecipientResult("y", "D", "no\n")])
    assert decode_result(res[4:], ("x", "y")) == (7, OK, [
        RecipientResult("x", "K", "ok\n", fwd), RecipientResult("y", "D", "no\n")])
    assert decode_result(encode_error(9, BAD_JOB, "bad")[4:]) == (9, BAD_JOB, "bad")


@pytest.mark.parametrize("body", [b"", b"\0" * 15, encode_job(1, 2, GROUP, None)[4:-1],
                                  encode_job(1, 2, GROUP, None)[4:] + b"x",
                                  b"\0" * 16 + b"\xff\xff\xff\xff"])
def test_malformed_job_frames_are_a_frame_error(body):
    with pytest.raises(ipc.FrameError):
        decode_job(body)


def test_oversized_frames_are_refused_both_ways():
    big = Group("remote", 2, "d", "s", ("r" * 1000,) * (MAX_FRAME // 1000 + 1))
    with pytest.raises(ipc.FrameError, match="limit"):
        encode_job(1, 2, big, None)

    async def read(data: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await ipc.read_frame(reader, MAX_FRAME)
    with pytest.raises(ipc.FrameError, match="over"):
        asyncio.run(read((MAX_FRAME + 1).to_bytes(4, "big") + b"x"))
    with pytest.raises(ipc.FrameError, match="inside a frame"):
        asyncio.run(read((10).to_bytes(4, "big") + b"x"))
    assert asyncio.run(read(b"")) is None


class FakeSpool:
    def read_message(self, msgid: int) -> bytes:
        if msgid == 404:
            raise KeyError("#404 is gone")
        return b"Subject: x\r\n\r\nbody\r\n"


class FakeRemote:
    def __init__(self) -> None:
        self.calls = []

    async def deliver(self, domain, sender, rcpts, message):
        self.calls.append((domain, sender, list(rcpts), message))
        await asyncio.sleep(0.01)
        return [RecipientResult(r, "K", f"ok {r}\n") for r in rcpts]


def test_worker_server_answers_jobs_bad_frames_and_stops_on_an_oversized_one(capfd):
    async def main():
        a, b = socket.socketpair()
        remote = FakeRemote()
        reader, writer = await asyncio.open_unix_connection(sock=a)
        server = WorkerServer(FakeSpool(), remote, reader, writer)
        serving = asyncio.ensure_future(server.serve())
        creader, cwriter = await asyncio.open_unix_connection(sock=b)
        two = Group("remote", 7, "d.test", "a@s.test", ("x@d.test", "y@d.test"))
        gone = Group("remote", 404, "d.test", "a@s.test", ("x@d.test",))
        bad = encode_job(3, 1, gone, None)
        cwriter.write(encode_job(1, 7, two, None))
        cwriter.write(encode_job(2, 404, gone, None))
        cwriter.write(bad[:3] + bytes([bad[3] + 1]) + bad[4:] + b"!")   # stray byte
        cwriter.write(encode_job(4, 404, gone, b"Subject: inline\r\n\r\n"))
        answers = {}
        for _ in range(4):
            jobid, status, payload = decode_result(await ipc.read_frame(creader, MAX_FRAME))
            answers[jobid] = (status, payload)
        assert answers[1] == (OK, [RecipientResult("", "K", "ok x@d.test\n"),
                                   RecipientResult("", "K", "ok y@d.test\n")])
        assert answers[2] == (OK, [RecipientResult("", "Z", UNREADABLE_TEXT)])
        assert answers[3][0] == BAD_JOB and "stray" in answers[3][1]
        assert answers[4][0] == OK and answers[4][1][0].status == "K"
        assert sorted(remote.calls) == [
            ("d.test", "a@s.test", ["x@d.test"], b"Subject: inline\r\n\r\n"),
            ("d.test", "a@s.test", ["x@d.test", "y@d.test"], b"Subject: x\r\n\r\nbody\r\n")]
        cwriter.write((MAX_FRAME + 1).to_bytes(4, "big"))
        await asyncio.wait_for(serving, 5)          # returns, no exception
        writer.close()
        cwriter.close()
    asyncio.run(main())
    assert "over the" in capfd.readouterr().err


class FakeBlocking:
    """A deliverer with deliver_blocking (the local channel's shape): jobs must
    run in the server's threads, never through the async deliver()."""
    threads = 3

    def __init__(self) -> None:
        import threading
        self.calls = []
        self.threads_seen = set()
        self.lock = threading.Lock()
        self.running = self.most = 0

    async def deliver(self, domain, sender, rcpts, message):
        raise AssertionError("the async path was taken")

    def deliver_blocking(self, domain, sender, rcpts, message, waiting=None):
        import threading
        self.threads_seen.add(threading.current_thread().name)
        if domain == "bug.test":
            raise RuntimeError("deliverer bug")
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.1)
        with self.lock:
            self.running -= 1
            self.calls.append((domain, sender, list(rcpts), message))
        return [RecipientResult(r, "K", f"ok {r}\n") for r in rcpts]


def serve_jobs(deliverer, frames: list[bytes]) -> dict:
    """Serve job `frames` through a WorkerServer over a socketpair, until the
    scheduler's end closes (the server must then return); answers by job id."""
    async def main():
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=a)
        server = WorkerServer(FakeSpool(), deliverer, reader, writer)
        serving = asyncio.ensure_future(server.serve())
        creader, cwriter = await asyncio.open_unix_connection(sock=b)
        for frame in frames:
            cwriter.write(frame)
        answers = {}
        for _ in frames:
            jobid, status, payload = decode_result(await ipc.read_frame(creader, MAX_FRAME))
            answers[jobid] = (status, payload)
        cwriter.close()
        await asyncio.wait_for(serving, 5)          # the scheduler closed: returns
        writer.close()
        return answers
    return asyncio.run(main())


class CountingSpool(FakeSpool):
    def __init__(self) -> None:
        self.reads = 0

    def read_message(self, msgid: int) -> bytes:
        self.reads += 1
        return super().read_message(msgid)


@pytest.mark.parametrize("deliverer", [FakeRemote, FakeBlocking])
def test_a_workers_jobs_of_one_message_at_once_share_one_read_of_it(deliverer):
    # One job per domain (or mailbox owner) of a message, run at once: each
    # read the message, a copy per job (ten of a 64 MB message...). A job
    # after they are done reads it again (nothing is kept).
    spool = CountingSpool()

    async def main():
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=a)
        server = WorkerServer(spool, deliverer(), reader, writer)
        serving = asyncio.ensure_future(server.serve())
        creader, cwriter = await asyncio.open_unix_connection(sock=b)
        reads = []
        for batch in (range(1, 4), range(4, 5)):
            for i in batch:
                cwriter.write(encode_job(i, 7, Group(GROUP.channel, 7, f"d{i}.test", "a@s.test",
                                                     (f"x@d{i}.test",)), None))
            for _ in batch:
                _, status, _ = decode_result(await ipc.read_frame(creader, MAX_FRAME))
                assert status == OK
            reads.append(spool.reads)
        cwriter.close()
        await asyncio.wait_for(serving, 5)
        writer.close()
        return reads
    assert asyncio.run(main()) == [1, 2]


def test_a_remote_worker_forgets_its_connect_timeouts_on_alrm():
    # Spawner.forget_timeouts (`qrelay flush`) sends ALRM to each worker; one
    # whose deliverer keeps a connect-timeout table takes it for that, and
    # goes on. (The handler is called here, not signalled: pytest-timeout
    # owns this process's ALRM.)
    from engine.delivery.spawner import _worker_serve

    class Forgetful(FakeRemote):
        forgot = 0

        def forget_timeouts(self) -> None:
            self.forgot += 1

        async def close(self) -> None:
            pass

    async def main():
        loop = asyncio.get_running_loop()
        handlers = {}
        loop.add_signal_handler = lambda sig, callback, *args: handlers.__setitem__(sig, callback)
        a, b = socket.socketpair()
        remote = Forgetful()
        serving = asyncio.ensure_future(_worker_serve(a, None, remote, MAX_FRAME))
        creader, cwriter = await asyncio.open_unix_connection(sock=b)
        cwriter.write(encode_job(1, 7, GROUP, b"Subject: x\r\n\r\nbody\r\n"))
        got = decode_result(await ipc.read_frame(creader, MAX_FRAME))
        handlers[signal.SIGALRM]()
        cwriter.close()
        await cwriter.wait_closed()
        assert await asyncio.wait_for(serving, 5) == 0
        return remote.forgot, got
    forgot, (jobid, status, results) = asyncio.run(main())
    assert forgot == 1
    assert (jobid, status, [r.status for r in results]) == (1, OK, ["K", "K"])


def test_worker_server_runs_a_blocking_deliverers_jobs_in_its_threads():
    deliverer = FakeBlocking()
    frames = [encode_job(i, 7, Group("local", 7, "d.test", "a@s.test", (f"u{i}@d.test",)), None)
              for i in range(1, 7)]
    frames.append(encode_job(7, 404, Group("local", 404, "d.test", "a@s.test", ("x@d.test",)), None))
    frames.append(encode_job(8, 1, Group("local", 1, "bug.test", "a@s.test", ("x@bug.test",)),
                             b"inline\r\n"))
    answers = serve_jobs(deliverer, frames)
    for i in range(1, 7):
        assert answers[i] == (OK, [RecipientResult("", "K", f"ok u{i}@d.test\n")])
    assert answers[7] == (OK, [RecipientResult("", "Z", UNREADABLE_TEXT)])
    assert answers[8][0] == BAD_JOB and "deliverer bug" in answers[8][1]
    assert len(deliverer.calls) == 6 and 2 <= len(deliverer.threads_seen) <= 3
    assert deliverer.most >= 2      # jobs overlapped, at most `threads` at once
    assert all(name.startswith("qrelay-job") for name in deliverer.threads_seen)


class ActiveBlocking(FakeBlocking):
    """FakeBlocking that runs at most `active` jobs at once; a job for
    wait.test steps out until a later job has run."""
    threads = 4
    active = 1

    def __init__(self) -> None:
        import threading
        super().__init__()
        self.released = threading.Event()

    def deliver_blocking(self, domain, sender, rcpts, message, waiting=None):
        if domain == "wait.test":
            with waiting.stepped_out():
                ok = self.released.wait(10)
            return [RecipientResult(r, "K" if ok else "Z", f"released {ok}\n") for r in rcpts]
        got = super().deliver_blocking(domain, sender, rcpts, message, waiting)
        self.released.set()
        return got


def run_jobs(deliverer, jobs):
    """serve_jobs for `jobs` ((domain, recipient) each), messages inline."""
    return serve_jobs(deliverer, [
        encode_job(i, 1, Group("local", 1, domain, "a@s.test", (rcpt,)), b"m\r\n")
        for i, (domain, rcpt) in enumerate(jobs, 1)])


def test_jobs_over_active_wait_in_the_backlog_and_all_run():
    deliverer = ActiveBlocking()
    deliverer.active = 2
    answers = run_jobs(deliverer, [("d.test", f"u{i}@d.test") for i in range(7)])
    assert sorted(answers) == list(range(1, 8))
    assert all(a == (OK, [RecipientResult("", "K", f"ok u{i - 1}@d.test\n")])
               for i, a in answers.items())
    assert deliverer.most == 2          # never more than `active` at once


def test_a_job_that_only_waits_lets_a_backlog_job_run():
    """active = 1: the first job steps out (a |program's run) until the second
    has run; without stepping out the second would wait behind it."""
    deliverer = ActiveBlocking()
    answers = run_jobs(deliverer, [("wait.test", "w@wait.test"), ("d.test", "u@d.test")])
    assert answers[1] == (OK, [RecipientResult("", "K", "released True\n")])
    assert answers[2] == (OK, [RecipientResult("", "K", "ok u@d.test\n")])


def test_frames_queued_in_one_turn_leave_in_one_write():
    """ipc.FrameSender: a burst of frames (from the loop or from threads) is
    one write; the reader still gets every frame, in order; once the writer
    closes, queued frames are dropped, not raised."""
    import threading

    async def main():
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=a)
        creader, cwriter = await asyncio.open_unix_connection(sock=b)
        writes = []
        real_write = writer.write
        writer.write = lambda data: (writes.append(data), real_write(data))
        out = ipc.FrameSender(writer, asyncio.get_running_loop())
        for i in range(5):
            out.send(ipc.frame(b"loop %d" % i, 64))
        threads = [threading.Thread(target=out.send_threadsafe, args=(ipc.frame(b"thread %d" % i, 64),))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = [await ipc.read_frame(creader, 64) for _ in range(8)]
        assert got[:5] == [b"loop %d" % i for i in range(5)]
        assert sorted(got[5:]) == [b"thread %d" % i for i in range(3)]
        assert len(writes) <= 2             # not one write per frame
        writer.close()
        out.send(ipc.frame(b"late", 64))    # dropped once closing
        await asyncio.sleep(0)
        assert len(writes) <= 2
        cwriter.close()
    asyncio.run(main())


def test_one_domain_always_maps_to_one_worker():
    pool = Spawner("/nonexistent", 3, "remote")
    slots = {pool.worker_for(f"d{i}.test") for i in range(50)}
    assert slots == {0, 1, 2}
    assert all(pool.worker_for("Dom.Test") == pool.worker_for("dom.test") for _ in range(3))


# --- qrelay run with worker_procs = 2 --------------------------------------------------

@pytest.fixture
def sinks():
    s = ThreadSink()
    yield s
    for sink in s.sinks:       # ThreadSink.close() stops only the current one
        s._call(sink.stop())
    s.close()


@pytest.fixture
def relay(root: Path, dns):
    started: list[RunningQrelay] = []

    def start(routes: dict[str, int], delivery: str = "", scheduler: str = ""):
        route_to_loopback(root, routes,
                          f'[delivery]\ndns_servers = ["{dns.address}"]\nworker_procs = 2\n{delivery}'
                          f"[scheduler]\npoll_interval = 0.02\nstop_grace = 3\n{scheduler}")
        q = RunningQrelay(root, procs=1)
        started.append(q)
        return q

    yield start
    for q in started:
        q.stop()




def is_worker(pid: int) -> bool:
    return process_title(pid).startswith("qrelay: delivery worker")


def scheduler_pid(root: Path) -> int:
    return wait_for(lambda: (root / "log" / "scheduler.pid").exists()
                    and int((root / "log" / "scheduler.pid").read_text()), what="scheduler pid")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def workers_of(root: Path) -> list[int]:
    """The scheduler's worker processes: its children, or (qrelay run as root,
    engine/privilege.py) the children of the root local spawner beside it."""
    scheduler = scheduler_pid(root)
    parents = [scheduler] + [p for p in children_of(parent_of(scheduler))
                             if process_title(p) == "qrelay: lspawn"]
    return [p for parent in parents for p in children_of(parent) if is_worker(p)]


def successes(root: Path) -> int:
    return sum(bool(re.match(r"delivery \d+: success: ", t)) for t in texts(root))


def test_many_domains_through_two_workers_with_connection_reuse(relay, sinks, root):
    port_a = sinks.start()
    sink_a = sinks.current
    port_b = sinks.start()
    sink_b = sinks.current
    routes = {f"a{i}.test": port_a for i in range(3)} | {f"b{i}.test": port_b for i in range(3)}
    # One delivery at a time per domain and long-lived idle connections: if
    # every job of a domain goes to the same worker, one connection carries them all.
    q = relay(routes, delivery="idle_timeout = 10\n",
              scheduler="per_destination_concurrency = 1\n")
    assert len(wait_for(lambda: len(workers_of(root)) == 2 and workers_of(root),
                        what="2 workers")) == 2
    send(q.port, ["x@a0.test"], n=8, tag="a")
    send(q.port, ["y@b0.test"], n=8, tag="b")
    send(q.port, [f"z@{d}" for d in routes], n=2, tag="all")   # 6 domains, both sinks
    wait_for(lambda: successes(root) == 8 + 8 + 12, what="28 successes")
    msgs = sinks.messages()
    assert len(msgs) == 8 + 8 + 12
    for sink, only in ((sink_a, "a0.test"), (sink_b, "b0.test")):
        conns = [c for c in sink.connections
                 if any(f"@{only}>".encode() in r for t in c.transactions for r in t.rcpts)]
        assert len(conns) == 1, f"{only} used {len(conns)} connections"
    assert not any("worker died" in t for t in texts(root))
    assert q.stop() == 0


def test_kill9_of_a_worker_defers_its_jobs_restarts_it_and_flush_delivers(relay, sinks, root):
    port = sinks.start(delay=0.8)
    domains = ["a0.test", "a1.test", "a2.test", "a3.test"]
    q = relay({d: port for d in domains})
    before = wait_for(lambda: len(workers_of(root)) == 2 and workers_of(root), what="2 workers")
    for d in domains:
        send(q.port, [f"x@{d}"], n=3, tag=d)
    # Deliveries are running (the sink holds each message 0.8 s) on both workers.
    wait_for(lambda: sum(t.startswith("starting delivery") for t in texts(root)) >= 12,
             what="12 deliveries started")
    time.sleep(0.3)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: any("worker died. Possible duplicate!" in t.replace("_", " ")
                         for t in texts(root)), what="deferrals for the dead worker")
    wait_for(lambda: any(re.match(r"warning: delivery worker \d pid %d exited \(signal 9\) with [1-9]"
                                  % victim, t.replace("_", " "))
                         for t in texts(root)), what="the warning about the dead worker")
    after = wait_for(lambda: len(workers_of(root)) == 2 and workers_of(root), what="restarted worker")
    assert victim not in after and before[1] in after
    wait_for(lambda: successes(root) + sum("deferral:" in t for t in texts(root)) >= 12,
             what="every first attempt recorded")
    sinks.current.delay = 0.0
    assert run_cli("flush", str(root)).returncode == 0
    wait_for(lambda: {re.search(rb"Subject: (\S+)", m.content).group(1) for m in sinks.messages()}
             >= {f"{d}{i}".encode() for d in domains for i in range(3)},
             timeout=15, what="every message delivered after flush")
    # The flush's ALRM reached the workers too (their connect timeouts): none died of it.
    assert sorted(workers_of(root)) == sorted(after)
    assert q.stop() == 0


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-delivery"])
def test_term_stops_scheduler_and_workers_cleanly(relay, sinks, root, busy):
    port = sinks.start(delay=0.7 if busy else 0.0)
    q = relay({"a.test": port, "b.test": port})
    workers = wait_for(lambda: len(workers_of(root)) == 2 and workers_of(root), what="2 workers")
    sched = scheduler_pid(root)
    send(q.port, ["x@a.test", "y@b.test"], n=3)
    if busy:   # TERM while the sink holds messages: they finish (stop_grace), then all exit
        wait_for(lambda: sum(t.startswith("starting delivery") for t in texts(root)) >= 6,
                 what="deliveries running")
    else:
        wait_for(lambda: successes(root) == 6, what="6 successes")
    os.kill(q.pid, signal.SIGTERM)
    assert q.proc.wait(15) == 0
    if busy:
        assert successes(root) == 6
    # Checked before RunningQrelay.stop() SIGKILLs the process group.
    stray = [p for p in [sched, *workers] if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert stray == []
    q.stop()
    assert "Traceback" not in q.stderr_text
    assert texts(root)[-1] == "status: exiting"


def test_pool_close_answers_callers_waiting_for_a_worker():
    async def main():
        pool = Spawner("/nonexistent", 2, "remote", stop_grace=0.1)   # never started: no worker up
        group = Group("remote", 1, "d.test", "s@x", ("r@d.test",))
        waiting = asyncio.ensure_future(pool.deliver(group))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await pool.close()
        got = await asyncio.wait_for(waiting, 2)
        assert [(r.status, "shutting down" in r.text) for r in got] == [("Z", True)]
        assert await pool.deliver(group) == [
            RecipientResult("r@d.test", "Z", got[0].text)]
    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="a worker drops to another user only as root")
def test_a_worker_started_as_root_imports_nothing_from_its_working_directory(
        root, tmp_path, monkeypatch):
    """A worker is exec'd as root and drops to the mailbox owner (or the run
    user) only once it has loaded itself. `python -m` puts the working
    directory first on sys.path: a `qrelay run` started in a directory a
    lesser user writes (/tmp, ROOT/queue) would import that user's uvloop.py
    as root. The worker's interpreter does not (-P)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "ran-as"
    # The planted module says who imported it, then steps aside for the real one.
    (cwd / "uvloop.py").write_text(
        "import os, sys\n"
        f"open({str(marker)!r}, 'w').write(str(os.geteuid()))\n"
        "here = os.path.dirname(os.path.abspath(__file__))\n"
        "sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]\n"
        "del sys.modules[__name__]\n"
        "import uvloop as real\n"
        "sys.modules[__name__] = real\n")
    monkeypatch.chdir(cwd)

    async def main():
        spawner = Spawner(root, 1, "local", user=(65534, 65534), max_message=1 << 20)
        await spawner.start()
        try:
            return await spawner.deliver(
                Group("local", 1, "mx.example.com", "a@src.test", ("nosuchuser@mx.example.com",)),
                b"Subject: x\r\n\r\nbody\r\n")
        finally:
            await spawner.close()
    [got] = asyncio.run(main())
    assert got.status in ("Z", "D") and got.text != "", got   # the worker answered the job
    assert not marker.exists(), marker.read_text()
