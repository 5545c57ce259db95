"""`qrelay run` end to end: SMTP in -> spool -> scheduler -> RemoteDelivery -> sink on loopback.

Every route goes through control/smtproutes to 127.0.0.1, and the resolver is a
fake DNS server (never the machine's). Each test stops every process it
started, by pid (the harness kills its own process group).
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.smtp_harness import RunningQrelay, route_to_loopback
from tests.smtp_recorder import RecordingSink

ME = "mx.example.com"
STAMP = re.compile(r"^@4[0-9a-f]{23} ")


class SlowSink(RecordingSink):
    """A sink that takes `delay` seconds per message (to be killed mid-delivery)."""
    delay = 0.0

    async def _read_data(self, reader):
        data = await super()._read_data(reader)
        if self.delay:
            await asyncio.sleep(self.delay)
        return data


class ThreadSink:
    """RecordingSinks on 127.0.0.1 served by an event loop in a thread of the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sinks: list[RecordingSink] = []
        self.current: RecordingSink | None = None
        self.port = 0

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self, port: int = 0, **knobs) -> int:
        self.current = self._call(SlowSink.start("127.0.0.1", port, **knobs))
        self.sinks.append(self.current)
        self.port = self.current.port
        return self.port

    def stop(self) -> None:
        if self.current is not None:
            self._call(self.current.stop())
            self.current = None

    def messages(self):
        async def snap():
            return [t for s in self.sinks for t in s.messages]
        return self._call(snap())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sink():
    s = ThreadSink()
    yield s
    s.close()


@pytest.fixture
def relay(root: Path, dns):
    """Start `qrelay run` on ROOT with routes {domain: port}; stopped afterwards."""
    started: list[RunningQrelay] = []

    def start(routes: dict[str, int], toml: str = "", controls: dict[str, str] | None = None,
              delivery: str = ""):
        route_to_loopback(root, routes,
                          f'[delivery]\ndns_servers = ["{dns.address}"]\nidle_timeout = 0.2\n{delivery}'
                          f"[scheduler]\npoll_interval = 0.02\n{toml}")
        for name, value in (controls or {}).items():
            (root / "control" / name).write_text(value + "\n")
        q = RunningQrelay(root, procs=1)
        started.append(q)
        return q

    yield start
    for q in started:
        q.stop()


def send(port: int, rcpts: list[str], n: int = 1, sender: str = "a@src.test", tag: str = "m") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        for i in range(n):
            refused = s.sendmail(sender, rcpts, f"Subject: {tag}{i}\r\n\r\nhello {i}\r\n".encode())
            assert refused == {}


def wait_for(pred, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def log_lines(root: Path) -> list[str]:
    path = root / "log" / "current"
    if not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()


# Lines the supervisor, receivers and spool write beside qmail-send's
# (engine.log.LogHandler): "info: supervisor: started ...".
SERVICE_LINE = re.compile(r"(info|warning|alert): [a-z-]+: ")


def texts(root: Path) -> list[str]:
    """qmail-send's lines of ROOT/log/current, without their stamps."""
    return [t for t in (line[26:] for line in log_lines(root)) if not SERVICE_LINE.match(t)]


def service_texts(root: Path) -> list[str]:
    """The other services' lines of ROOT/log/current, without their stamps."""
    return [t for t in (line[26:] for line in log_lines(root)) if SERVICE_LINE.match(t)]


def queue_count(root: Path) -> int:
    r = run_cli("qstat", str(root))
    return int(r.stdout.split("\n")[0].rsplit(" ", 1)[1])


def test_relay_delivers_and_logs(relay, sink, root):
    port = sink.start()
    q = relay({"sink.test": port})
    send(q.port, ["x@sink.test", "y@sink.test"], n=3)
    msgs = wait_for(lambda: len(sink.messages()) >= 3 and sink.messages(), what="3 deliveries")
    assert len(msgs) == 3
    assert all(m.mail.startswith(b"MAIL FROM:<a@src.test>") for m in msgs)
    assert all(sorted(m.rcpts) == [b"RCPT TO:<x@sink.test>", b"RCPT TO:<y@sink.test>"] for m in msgs)
    assert all(b"invoked from network" in m.content and b"hello" in m.content for m in msgs)
    wait_for(lambda: sum(t.startswith("end msg ") for t in texts(root)) == 3, what="end msg lines")
    lines = log_lines(root)
    assert all(STAMP.match(line) for line in lines)
    t = texts(root)
    assert t[0] == "status: local 0/10 remote 0/20"
    assert sum(x.startswith("new msg ") for x in t) == 3
    assert sum(bool(re.match(r"info msg \d+: bytes \d+ from <a@src.test> qp \d+ uid \d+$", x)) for x in t) == 3
    assert sum(bool(re.match(r"starting delivery \d+: msg \d+ to remote [xy]@sink.test$", x)) for x in t) == 6
    assert sum(bool(re.match(r"delivery \d+: success: 127.0.0.1_accepted_message./Remote_host_said:_250_ok_queued/$", x))
               for x in t) == 6
    assert queue_count(root) == 0
    assert q.stop() == 0
    assert texts(root)[-1] == "status: exiting"


def test_log_format_json_for_both_logs(relay, sink, root):
    import json
    port = sink.start()
    q = relay({"sink.test": port}, toml='[log]\nformat = "json"\n')
    send(q.port, ["x@sink.test"])

    def events(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    wait_for(lambda: any(e["event"] == "end_msg" for e in events(root / "log" / "current")),
             what="end_msg event")
    sent = events(root / "log" / "current")
    assert all(e["time"].endswith("Z") for e in sent)
    delivery = next(e for e in sent if e["event"] == "delivery")
    assert delivery["status"] == "success" and "250 ok queued" in delivery["text"]
    start = next(e for e in sent if e["event"] == "starting_delivery")
    assert (start["channel"], start["recipient"]) == ("remote", "x@sink.test")
    assert any(e["event"] == "info" and e["source"] == "supervisor" for e in sent)
    smtpd = wait_for(lambda: [e for e in events(root / "log" / "smtpd" / "current")
                              if e["event"] == "tcpserver_end"], what="smtpd end event")
    assert smtpd[0]["pid"] >= 1 and isinstance(smtpd[0]["status"], int)
    assert q.stop() == 0


def test_delivery_by_mx_through_the_fake_dns(relay, sink, root, dns):
    port = sink.start()
    dns.zone["mx.test"] = {"MX": [(10, "mail.mx.test")]}
    dns.zone["mail.mx.test"] = {"A": ["127.0.0.1"]}
    q = relay({}, delivery=f"mx_port = {port}\n")
    send(q.port, ["x@mx.test"])
    msg = wait_for(lambda: sink.messages(), what="delivery by MX")[0]
    assert msg.rcpts == [b"RCPT TO:<x@mx.test>"]
    assert ("mx.test", "MX") in dns.queries


def test_5xx_bounces_and_failed_bounce_double_bounces_then_is_discarded(relay, sink, root):
    port = sink.start(rcpt_replies={"bad@sink.test": "550 5.1.1 no such user",
                                    "a@src.test": "550 sender unknown",
                                    "postmaster@admin.test": "550 not even postmaster"})
    q = relay({"sink.test": port, "src.test": port, "admin.test": port},
              controls={"doublebouncehost": "admin.test"})
    send(q.port, ["bad@sink.test", "good@sink.test"])
    wait_for(lambda: any(x.startswith("triple bounce: discarding bounce/") for x in texts(root)),
             what="triple bounce")
    cmds = [c for s in sink.sinks for conn in s.connections for c in conn.commands]
    # the bounce was tried (null sender, to the original sender) and refused ...
    assert b"RCPT TO:<a@src.test>" in cmds
    # ... so a double bounce went to doublebounceto@doublebouncehost, also with <>
    assert b"RCPT TO:<postmaster@admin.test>" in cmds
    assert sum(c.startswith(b"MAIL FROM:<>") for c in cmds) >= 2
    t = texts(root)
    bounce_lines = [x for x in t if x.startswith("bounce msg ")]
    assert len(bounce_lines) == 2                      # the bounce, then the double bounce
    assert any("failure: 127.0.0.1_does_not_like_recipient./Remote_host_said:_550_5.1.1_no_such_user/" in x for x in t)
    assert wait_for(lambda: queue_count(root) == 0 or None, what="empty queue") is True


def test_bounce_arrives_back_with_qsbmf_text(relay, sink, root):
    port = sink.start(rcpt_replies={"bad@sink.test": "550 5.1.1 no such user"})
    q = relay({"sink.test": port, "src.test": port})
    send(q.port, ["bad@sink.test"], tag="orig")
    bounce = wait_for(lambda: [m for m in sink.messages() if m.mail.startswith(b"MAIL FROM:<>")], what="bounce")[0]
    assert bounce.rcpts == [b"RCPT TO:<a@src.test>"]
    body = bounce.content
    assert b"Received: (qmail " in body and b" invoked for bounce); " in body
    assert b"\r\nSubject: failure notice\r\n" in body
    assert b"Content-Type: multipart/report; report-type=delivery-status;" in body
    assert (b"Hi. This is the qmail-send program at mx.example.com.\r\n"
            b"I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
            b"This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
            b"<bad@sink.test>:\r\n127.0.0.1 does not like recipient.\r\n"
            b"Remote host said: 550 5.1.1 no such user\r\n") in body
    assert b"Status: 5.1.1" in body and b"Subject: orig0" in body


def test_flush_after_sink_comes_back(relay, sink, root):
    port = free_port()                                  # nothing listens: connection refused
    q = relay({"sink.test": port})
    send(q.port, ["x@sink.test"], n=5)
    wait_for(lambda: sum("deferral: Sorry,_I_wasn't_able_to_establish_an_SMTP_connection._(#4.4.1)/" in x
                         for x in texts(root)) >= 5, what="5 deferrals")
    time.sleep(0.3)
    assert sink.messages() == []
    sink.start(port)
    assert queue_count(root) == 5                       # next retry would be 400 s away
    r = run_cli("flush", str(root))
    assert r.returncode == 0, r.stderr
    assert re.match(rf"qrelay: \d+ deferred recipients due now; woke the scheduler \(qrelay run pid {q.pid}\)$", r.stdout.strip())
    wait_for(lambda: len(sink.messages()) >= 5, timeout=10, what="delivery after flush")
    wait_for(lambda: queue_count(root) == 0 or None, what="empty queue")


def test_sigalrm_to_run_flushes_and_queuelifetime_expiry_bounces(relay, sink, root):
    live = sink.start()
    dead = free_port()
    q = relay({"sink.test": dead, "src.test": live}, controls={"queuelifetime": "2"})
    send(q.port, ["x@sink.test"])
    wait_for(lambda: any("deferral:" in x for x in texts(root)), what="first deferral")
    time.sleep(2.2)                                     # past queuelifetime; retry is 400 s away
    os.kill(q.pid, signal.SIGALRM)                      # to the supervisor, as to qmail-send
    bounce = wait_for(lambda: [m for m in sink.messages() if m.mail.startswith(b"MAIL FROM:<>")],
                      what="expiry bounce")[0]
    assert b"I'm not going to try again; this message has been in the queue too long." in bounce.content
    assert b"Status: 5.4.7" in bounce.content
    assert q.proc.poll() is None                        # ALRM did not kill anything
    assert any(x.endswith("this_message_has_been_in_the_queue_too_long./") for x in texts(root))


def test_kill9_of_everything_mid_delivery_then_every_message_arrives(relay, sink, root):
    port = sink.start(delay=0.02)
    q = relay({"sink.test": port}, controls={"concurrencyremote": "4"})
    accepted: list[bytes] = []

    def client() -> None:
        # Sends until qrelay dies under it; a message counts once it got its 250.
        try:
            with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
                for i in range(400):
                    s.sendmail("a@src.test", ["x@sink.test"], b"Subject: k%d\r\n\r\nhello\r\n" % i)
                    accepted.append(b"k%d" % i)
        except (OSError, smtplib.SMTPException):
            pass

    sender = threading.Thread(target=client)
    sender.start()
    try:
        wait_for(lambda: len(sink.messages()) >= 5, what="some deliveries")
        os.killpg(q.pid, signal.SIGKILL)             # supervisor, receivers, scheduler: all at once
        q.proc.wait(5)
    finally:
        sender.join(15)
    before = {re.search(rb"Subject: (k\d+)", m.content).group(1) for m in sink.messages()}
    assert len(accepted) > len(before), "nothing was left in the queue at the kill"
    q2 = relay({"sink.test": port}, controls={"concurrencyremote": "4"})

    def subjects():
        return {re.search(rb"Subject: (k\d+)", m.content).group(1) for m in sink.messages()}

    wait_for(lambda: subjects() >= set(accepted), timeout=30, what="every accepted message after restart")
    wait_for(lambda: queue_count(root) == 0 or None, what="empty queue")
    assert q2.stop() == 0


def test_flush_with_nothing_running_marks_the_spool(root):
    from engine.queue import Envelope, Spool
    with Spool(root / "queue") as spool:
        mid = spool.enqueue(Envelope("a@src.test", ("x@sink.test",)), b"Subject: s\r\n\r\nx\r\n")
        spool.preprocess(mid, ["remote"])
        later = time.time() + 3600
        spool.mark_deferred(mid, 0, later, "Sorry. (#4.4.1)\n")
    r = run_cli("flush", str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "qrelay: 1 deferred recipients due now; no scheduler running"
    with Spool(root / "queue", readonly=True) as spool:
        assert spool.message_info(mid).recipients[0].next_try <= time.time()


def test_flush_bad_root_is_a_one_line_error(tmp_path):
    r = run_cli("flush", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: {tmp_path / 'nope'}: no such qrelay root"
    r = run_cli("flush", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() == f"Error: {tmp_path}: not a qrelay root (no queue/ directory)"


def test_stale_pid_file_is_not_signalled(root):
    # a pid file naming a process that is not qrelay must never be sent ALRM
    sleeper = __import__("subprocess").Popen(["sleep", "30"])
    try:
        (root / "log" / "scheduler.pid").write_text(f"{sleeper.pid}\n")
        r = run_cli("flush", str(root))
        assert r.returncode == 0 and "no scheduler running" in r.stdout
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
