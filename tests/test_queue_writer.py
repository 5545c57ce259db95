"""engine.queue.writer: the single writer process and its clients."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import ipc
from engine.queue import Envelope, Spool, SpoolWriteError
from engine.queue.writer import (FrameError, SpoolClient, decode_request, decode_response,
                                 encode_request)

REPO = Path(__file__).resolve().parent.parent

WRITER = r"""
import os, sys
from engine.config.settings import SpoolSettings
from engine.queue.writer import run_writer
settings = SpoolSettings(index_map_bytes=int(sys.argv[3]))
run_writer(sys.argv[1], sys.argv[2], settings, on_ready=lambda: os.write(1, b"ready\n"))
"""

text = st.text(max_size=50)


@given(text, st.lists(text, max_size=5), st.binary(max_size=500),
       st.sampled_from(["network", "bounce", "local"]), st.integers(0, 2**32 - 1))
def test_request_frames_round_trip(sender, rcpts, message, origin, pid):
    env = Envelope(sender, tuple(rcpts), pid, 7, origin)
    frame = encode_request(42, env, message)
    assert decode_request(frame[4:]) == (42, env, message)


def test_a_request_frame_copies_its_message_once():
    # The receiver holds the message while its frame is built: the frame is
    # the one copy (it was built whole, then copied again behind its length).
    import tracemalloc
    message = b"x" * (20 * 1024 * 1024)
    tracemalloc.start()
    try:
        frame = encode_request(1, Envelope("a@b", ("c@d",)), message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decode_request(frame[4:])[2] == message
    assert peak < 1.5 * len(message), peak


@pytest.mark.parametrize("body", [b"", b"\x00" * 5, encode_request(1, Envelope("a", ("b",)),
                                                                     b"m")[4:20]])
def test_bad_frames_raise(body):
    with pytest.raises(FrameError):
        decode_request(body)


class Writer:
    def __init__(self, tmp: Path, map_bytes: int = 1 << 30):
        self.queue = tmp / "queue"
        self.sock = tmp / "writer.sock"
        self.map_bytes = map_bytes
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(self.queue), str(self.sock), str(self.map_bytes)],
            stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout.readline() == b"ready\n"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        if self.proc is not None:
            self.proc.communicate(timeout=30)
            self.proc = None


@pytest.fixture
def writer(tmp_path: Path):
    w = Writer(tmp_path)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def test_clients_in_threads_and_asyncio_share_the_writer(writer: Writer):
    client = SpoolClient(writer.sock)
    got: dict[int, bytes] = {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(25):
            data = b"thread %d %d" % (k, i)
            msgid = client.enqueue(Envelope("s@x", ("r@y",), origin="local"), data)
            with lock:
                got[msgid] = data
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()

    async def tasks():
        datas = [b"task %d" % i for i in range(50)]
        ids = await asyncio.gather(*(client.submit(Envelope("", ("a@b", "c@d")), d)
                                     for d in datas))
        return dict(zip(ids, datas))
    got.update(asyncio.run(tasks()))
    for t in threads:
        t.join()
    client.close()
    writer.stop()
    assert len(got) == 150
    with Spool(writer.queue) as s:
        assert s.stats().messages == 150
        assert all(s.read_message(m) == d for m, d in got.items())
        assert s.envelope(min(got)).origin in ("local", "network")


def test_writer_gone_means_write_error_then_reconnect(writer: Writer):
    client = SpoolClient(writer.sock)
    first = client.enqueue(Envelope("a", ("b",)), b"one")
    writer.stop(signal.SIGKILL)
    with pytest.raises(SpoolWriteError):
        client.enqueue(Envelope("a", ("b",)), b"lost")
    writer.start()
    second = client.enqueue(Envelope("a", ("b",)), b"two")
    client.close()
    writer.stop()
    with Spool(writer.queue) as s:
        assert s.read_message(first) == b"one" and s.read_message(second) == b"two"


def test_writer_side_write_error_reaches_the_client(tmp_path: Path):
    w = Writer(tmp_path, map_bytes=256 * 1024)
    w.start()
    client = SpoolClient(w.sock)
    try:
        with pytest.raises(SpoolWriteError):
            for _ in range(5000):
                client.enqueue(Envelope("someone@example.com" * 3, ("x@y",)), b"x")
    finally:
        client.close()
        w.stop()


def test_no_writer_is_a_write_error(tmp_path: Path):
    with pytest.raises(SpoolWriteError, match="unreachable"):
        SpoolClient(tmp_path / "nobody.sock").enqueue(Envelope("a", ("b",)), b"x")


def test_a_writer_that_stops_reading_never_stops_the_event_loop(tmp_path: Path):
    """A writer stuck in the kernel (a dying disk) or SIGSTOPped reads
    nothing: the rest of a message the socket cannot take goes from a thread,
    so the receiver's loop goes on serving other sessions (it froze in
    sendall: no greeting, no TERM), and the client is answered 451 after
    reply_timeout instead of waiting for its own timeout."""
    import socket as socketlib
    import time
    path = tmp_path / "stuck.sock"
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    client = SpoolClient(path, reply_timeout=0.5)
    ticks: list[float] = []

    async def other_sessions() -> None:
        for _ in range(20):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def main() -> float:
        others = asyncio.get_running_loop().create_task(other_sessions())
        start = time.monotonic()
        with pytest.raises(SpoolWriteError, match="did not answer in 0.5 s"):
            await client.submit(Envelope("a@b", ("c@d",)), b"x" * (8 << 20))
        await others
        return time.monotonic() - start
    try:
        conn = None
        waited = asyncio.run(main())
        conn, _ = listener.accept()          # it connected; nothing was ever read
        assert 0.5 <= waited < 5
        assert len(ticks) == 20 and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.3
    finally:
        client.close()
        if conn is not None:
            conn.close()
        listener.close()


def test_open_spool_writer_falls_back_to_direct_then_uses_the_writer(tmp_path: Path):
    from engine.queue.writer import WRITER_SOCKET, open_spool_writer
    q = tmp_path / "queue"
    client = open_spool_writer(q)
    client._retry_seconds = 0.0        # try the writer again on every request
    a = client.enqueue(Envelope("a", ("b",)), b"direct")   # no writer yet: committed directly
    assert not client.using_writer
    w = Writer(tmp_path)
    w.sock = q / WRITER_SOCKET
    w.start()
    try:
        b = client.enqueue(Envelope("a", ("b",)), b"via writer")
        assert client.using_writer
        client.close()
    finally:
        w.stop()
    with Spool(q) as s:
        assert s.read_message(a) == b"direct" and s.read_message(b) == b"via writer"


def test_single_writer_off_gives_a_direct_spool(tmp_path: Path):
    from engine.config.settings import SpoolSettings
    from engine.queue.writer import open_spool_writer
    s = open_spool_writer(tmp_path / "q", SpoolSettings(single_writer=False))
    try:
        assert isinstance(s, Spool)
    finally:
        s.close()


def test_kill9_writer_loses_nothing_acknowledged(tmp_path: Path):
    import random
    import time
    rng = random.Random(5)
    w = Writer(tmp_path)
    acked: dict[int, bytes] = {}
    lock = threading.Lock()
    try:
        for rnd in range(6):
            w.start()
            client = SpoolClient(w.sock)
            stop = threading.Event()

            def produce(k: int) -> None:
                i = 0
                while not stop.is_set():
                    data = b"%d-%d-%d" % (rnd, k, i) * (i % 50 + 1)
                    i += 1
                    try:
                        msgid = client.enqueue(Envelope("a", ("b",)), data)
                    except SpoolWriteError:
                        return
                    with lock:
                        acked[msgid] = data
            threads = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.3))
            w.stop(signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join(10)
            client.close()
        with Spool(w.queue) as s:
            assert s.recover(verify_bytes=True).quarantined == []
            assert all(s.read_message(m) == d for m, d in acked.items())
    finally:
        w.stop()
    assert len(acked) > 50


def test_injection_socket_refuses_envelopes_qmail_inject_would_never_make(writer: Writer):
    """Any local user may write to inject.sock with a client of their own: an
    address with CR, LF or NUL (which SMTP refuses at RCPT, and remote delivery
    would only bounce) or no recipient at all is refused, and nothing of it is
    queued."""
    from engine.queue import SpoolError
    client = SpoolClient(writer.queue / "inject.sock")
    bad = [Envelope("x@example.com", ("a@example.net>\r\nRSET\r\nRCPT TO:<c@example.org",)),
           Envelope("x@example.com", ("a@example.net\n",)),
           Envelope("x@exa\0mple.com", ("a@example.net",)),
           Envelope("x@example.com\r\nDATA", ("a@example.net",)),
           Envelope("x@example.com", ())]
    try:
        for envelope in bad:
            with pytest.raises(SpoolError) as exc:
                client.enqueue(envelope, b"Subject: x\r\n\r\nhi\r\n")
            assert not isinstance(exc.value, SpoolWriteError), envelope
        good = client.enqueue(Envelope("x@example.com", ("a@example.net",)), b"\r\nhi\r\n")
    finally:
        client.close()
    writer.stop()
    with Spool(writer.queue, readonly=True) as spool:
        assert [m.msgid for m in spool.iter_messages()] == [good]


def test_injection_socket_holds_at_most_its_byte_budget(tmp_path: Path):
    """[spool] inject_buffered_bytes: requests read and not yet answered, over
    all the injection socket's connections. A frame past it waits, unread,
    until an answer makes room (one alone always fits)."""
    from engine.config.settings import SpoolSettings
    from engine.queue.writer import SpoolWriterServer

    async def go():
        spool = Spool(tmp_path / "queue", SpoolSettings(inject_buffered_bytes=1 << 20))
        server = SpoolWriterServer(spool, tmp_path / "inject.sock", local_users=True)
        await server.start()
        gate = asyncio.Event()
        real = spool.submit

        async def held_submit(envelope, message):
            await gate.wait()
            return await real(envelope, message)
        spool.submit = held_submit
        frame = encode_request(1, Envelope("x@example.com", ("a@example.net",)), b"x" * 600_000)
        conns = [await asyncio.open_unix_connection(str(tmp_path / "inject.sock")) for _ in range(2)]
        try:
            conns[0][1].write(frame * 2)            # pipelined on one connection
            conns[1][1].write(frame)
            for _ in range(1000):                   # both others wait for room
                if len(server.budget._waiters) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(server.budget._waiters) == 2
            assert server.budget.used == len(frame) - 4   # one request in, unanswered
            gate.set()
            answers = [await conns[0][0].readexactly(4), await conns[1][0].readexactly(4)]
            assert len(answers) == 2
            for _ in range(500):
                if not server.budget.used and spool.stats().messages == 3:
                    break
                await asyncio.sleep(0.01)
            assert server.budget.used == 0 and spool.stats().messages == 3
        finally:
            for _, w in conns:
                w.close()
            await server.close()
            spool.close()
    asyncio.run(asyncio.wait_for(go(), 30))


def test_a_message_over_the_frame_limit_fails_alone(writer: Writer):
    """databytes counts a CRLF as one byte (qmail's count), the spool stores
    both: a message within the limit can be over [spool] max_frame_bytes.
    Sent, the writer closed the connection and every message in flight on
    it failed; it is refused before it is sent, and the connection goes on."""
    from engine.queue import MessageTooBig
    client = SpoolClient(writer.sock, max_frame=4096)

    async def main():
        small = client.submit(Envelope("a@b", ("c@d",)), b"x" * 100)
        with pytest.raises(MessageTooBig, match="frame limit"):
            await client.submit(Envelope("a@b", ("c@d",)), b"\r\n" * 4000)
        return await small, await client.submit(Envelope("a@b", ("c@d",)), b"y" * 100)
    try:
        first, second = asyncio.run(main())
    finally:
        client.close()
    assert first > 0 and second > first


def test_a_big_request_is_not_kept_once_sent(writer: Writer):
    # A frame the kernel does not take at once goes out from the sender
    # thread, which kept the last one it sent while it waited for another: a
    # receiver held its last big message for as long as no other needed it.
    import tracemalloc
    client = SpoolClient(writer.sock)
    message = b"x" * (8 * 1024 * 1024)
    tracemalloc.start()
    try:
        assert client.enqueue(Envelope("a@b", ("c@d",)), message) > 0
        assert client._sender is not None          # it went the thread's way
        deadline = time.monotonic() + 5            # the thread's turn after its send
        while tracemalloc.get_traced_memory()[0] > len(message) // 2 \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        client.close()
    assert held < len(message) // 2, held


def test_injection_socket_holds_at_most_its_connections(tmp_path: Path, caplog):
    """[spool] inject_max_connections: any local user may connect to
    inject.sock. Unbounded, connections held open used up the writer's
    descriptors: it could not accept a receiver's connection (every SMTP
    message waited writer_reply_timeout for a 451) nor open a segment. Past
    the cap a connection is closed at once, with one log line; the writer
    socket is not held to it, and a connection that closes makes room."""
    from engine.config.settings import SpoolSettings
    from engine.queue.writer import SpoolWriterServer

    envelope = Envelope("x@example.com", ("a@example.net",))

    async def answered(conn) -> int:
        conn[1].write(encode_request(7, envelope, b"Subject: x\r\n\r\nhi\r\n"))
        reqid, status, _ = decode_response(await ipc.read_frame(conn[0], 1 << 16))
        return status

    async def go():
        spool = Spool(tmp_path / "queue", SpoolSettings(inject_max_connections=2))
        inject = SpoolWriterServer(spool, tmp_path / "inject.sock", local_users=True)
        receivers = SpoolWriterServer(spool, tmp_path / "writer.sock")
        await inject.start()
        await receivers.start()
        conns = []
        try:
            for _ in range(4):
                conns.append(await asyncio.open_unix_connection(str(tmp_path / "inject.sock")))
            for _, w in conns[:2]:
                assert await answered((_, w)) == 0
            # past the cap: closed without a word
            assert await asyncio.wait_for(conns[2][0].read(), 10) == b""
            assert await asyncio.wait_for(conns[3][0].read(), 10) == b""
            for _ in range(3):
                conns.append(await asyncio.open_unix_connection(str(tmp_path / "writer.sock")))
            for conn in conns[4:]:
                assert await answered(conn) == 0
            conns[0][1].close()
            for _ in range(1000):            # its handler ends: room for one more
                if len(inject._connections) == 1:
                    break
                await asyncio.sleep(0.01)
            conns.append(await asyncio.open_unix_connection(str(tmp_path / "inject.sock")))
            assert await answered(conns[-1]) == 0
        finally:
            for _, w in conns:
                w.close()
            await inject.close()
            await receivers.close()
            spool.close()
    with caplog.at_level(logging.WARNING, logger="qrelay.spool-writer"):
        asyncio.run(asyncio.wait_for(go(), 30))
    refusals = [r.getMessage() for r in caplog.records if "inject_max_connections" in r.getMessage()]
    assert len(refusals) == 1, refusals


def test_accept_at_the_open_files_limit_is_logged_once(tmp_path: Path):
    """A writer out of descriptors cannot accept: asyncio logs a traceback for
    each try, a hundred a second while connections wait (thousands of lines
    on stderr). It is one line; the waiting connections are served once
    descriptors are free."""
    script = WRITER.replace("import os, sys", "import os, sys, resource\n"
                            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))")
    queue, sock = tmp_path / "queue", tmp_path / "writer.sock"
    proc = subprocess.Popen([sys.executable, "-c", script, str(queue), str(sock), str(1 << 30)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    conns = []
    try:
        assert proc.stdout.readline() == b"ready\n"
        frame = encode_request(1, Envelope("x@example.com", ("a@example.net",)), b"\r\nhi\r\n")
        for _ in range(80):             # more than its descriptors: the last ones wait
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            s.sendall(frame)
            conns.append(s)
        err = b""
        while b"Too many open files" not in err:
            err += proc.stderr.readline()
        for s in conns[:-10]:
            s.close()
        for s in conns[-10:]:           # accepted once there is room, and answered
            s.settimeout(30)
            assert decode_response(ipc.FrameBuffer(1 << 16).feed(s.recv(1 << 16))[0])[1] == 0
    finally:
        for s in conns:
            s.close()
        proc.terminate()
        err += proc.communicate(timeout=30)[1]
    assert err.count(b"Too many open files") == 1, err.decode()[:2000]
