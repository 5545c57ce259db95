"""engine.status: `qrelay run --listen http://...` serves /metrics, /status.json
and the status page; tested through a real `qrelay run`, a loopback sink,
the fake DNS server and headless Chromium."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_cli
from tests.headless import Chromium, chromium_path
from tests.smtp_harness import RunningQrelay, route_to_loopback
from tests.test_delivery_e2e import ThreadSink, send, wait_for

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"


@pytest.fixture
def sink():
    s = ThreadSink()
    yield s
    s.close()


class StatusRun:
    """`qrelay run` with an SMTP and an http listener, routes to loopback sinks."""

    def __init__(self, root: Path, dns, routes: dict[str, int], toml: str = "") -> None:
        route_to_loopback(root, routes, f'[delivery]\ndns_servers = ["{dns.address}"]\n'
                                        f"idle_timeout = 0.2\n[scheduler]\npoll_interval = 0.02\n{toml}")
        self.q = RunningQrelay(root, procs=1, extra=("--listen", "http://127.0.0.1:0"))
        ports = self.q.port_file.read_text().split()
        self.port, self.http_port = int(ports[0]), int(ports[1])

    def get(self, path: str, method: str = "GET", headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple, float]:
        status, headers, body = self.get("/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples}

    def status(self) -> dict:
        status, _, body = self.get("/status.json")
        assert status == 200
        return json.loads(body)


@pytest.fixture
def status_run(root, dns):
    started: list[StatusRun] = []

    def start(routes: dict[str, int], toml: str = "") -> StatusRun:
        run = StatusRun(root, dns, routes, toml)
        started.append(run)
        return run

    yield start
    for run in started:
        run.q.stop()


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_after_mail_through_qrelay_run(status_run, sink, root):
    run = status_run({"sink.test": sink.start()})
    before = run.metrics()
    assert value(before, "qrelay_queue_messages") == 0
    send(run.port, ["x@sink.test", "y@sink.test"], n=3)
    wait_for(lambda: len(sink.messages()) >= 3, what="3 deliveries")

    def moved():
        m = run.metrics()
        done = value(m, "qrelay_deliveries_total", channel="remote", result="delivered") >= 6
        return done and m
    after = wait_for(moved, what="the delivery counters")
    assert value(after, "qrelay_messages_received_total", protocol="smtp", result="queued") == 3
    assert value(after, "qrelay_spool_commits_total", result="ok") == 3
    assert value(after, "qrelay_sessions_total", protocol="smtp", result="accepted") >= 1
    assert value(after, "qrelay_remote_connections_total", result="ok") >= 1
    # the latency histogram: 6 delivered recipients, each queued moments ago
    assert value(after, "qrelay_delivery_latency_seconds_count", channel="remote") == 6
    assert value(after, "qrelay_delivery_latency_seconds_bucket", channel="remote", le="+Inf") == 6
    assert value(after, "qrelay_delivery_latency_seconds_bucket", channel="remote", le="60.0") == 6
    # the queue's gauges, read from the spool by the status service
    assert "qrelay_queue_oldest_message_age_seconds" in {name for name, _ in after}
    wait_for(lambda: value(run.metrics(), "qrelay_queue_messages") == 0, what="an empty queue")
    # one file per process that counted, under ROOT/run/metrics
    files = {p.name.split("_")[0] for p in (root / "run" / "metrics").glob("*.db")}
    assert {"counter", "histogram"} <= files


def test_deferred_destination_with_its_last_error_in_metrics_and_status(status_run, sink, root):
    port = sink.start(rcpt_replies={"slow@sink.test": "451 4.3.0 try again later"})
    run = status_run({"sink.test": port})
    send(run.port, ["slow@sink.test"], n=2)

    def deferred():
        # Both messages' deferrals: they are recorded one commit at a time, and
        # a page read between the two shows the first alone.
        doc = run.status()
        return doc["queue"]["deferred"] and doc["queue"]["deferred"][0]["count"] == 2 and doc
    doc = wait_for(deferred, what="both messages deferred on the status page")
    row = doc["queue"]["deferred"][0]
    assert row["destination"] == "sink.test" and row["count"] == 2
    assert "451 4.3.0 try again later" in row["last_error"]
    assert doc["queue"]["shape"][0]["destination"] == "sink.test"
    assert doc["queue"]["shape"][0]["ages"][0] == 2          # both younger than 5 minutes
    assert doc["queue"]["messages"] == 2
    assert doc["queue"]["recipients"] == {"pending": 0, "deferred": 2}
    assert 0 <= doc["queue"]["oldest_age"] < 60
    assert doc["totals"]["deferred"] >= 2
    assert {r["result"] for r in doc["recent"]} == {"deferred"}
    assert {r["recipient"] for r in doc["recent"]} == {"slow@sink.test"}
    m = wait_for(lambda: (x := run.metrics()) and
                 value(x, "qrelay_queue_deferred_recipients", destination="sink.test") == 2 and x,
                 what="the deferred gauge")
    assert value(m, "qrelay_deliveries_total", channel="remote", result="deferred") >= 2


def test_http_refusals_are_one_line_4xx(status_run, sink):
    run = status_run({"sink.test": sink.start()})
    assert run.get("/nope")[0] == 404
    status, headers, _ = run.get("/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = run.get("/status.json", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    # DNS rebinding: a page from elsewhere naming this port under its own host name
    assert run.get("/status.json", headers={"Host": "evil.example:80"})[0] == 403
    status, headers, body = run.get("/")
    assert status == 200 and b"<title>qrelay status</title>" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    # a request head that never ends: bounded, answered, closed
    with socket.create_connection(("127.0.0.1", run.http_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", run.http_port), timeout=10) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")


def test_http_listen_off_loopback_is_refused_unless_allowed(root, tmp_path):
    (root / "qrelay.toml").write_text("[scheduler]\nenabled = false\n")
    r = run_cli("run", str(root), "--listen", "127.0.0.1:0", "--listen", "http://0.0.0.0:0")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "Error: --listen http://0.0.0.0:0: the status page and /metrics are served on loopback"
        " only (e.g. http://127.0.0.1:8080); set [status] allow_remote = true in qrelay.toml to"
        " serve them on another address"]
    from engine.config.settings import load_settings
    from engine.smtp.listeners import parse_listen
    from engine.status import check_listen
    (root / "qrelay.toml").write_text("[status]\nallow_remote = true\n")
    check_listen([parse_listen("http://0.0.0.0:0")], load_settings(root))   # allowed now
    (root / "qrelay.toml").write_text("[status]\ntop_destinations = 0\n")
    r = run_cli("run", str(root), "--listen", "http://127.0.0.1:0")
    assert r.returncode == 1 and "top_destinations = 0 is out of range" in r.stderr


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (./dev test installs it)")
def test_status_page_in_headless_chromium(status_run, sink, tmp_path):
    run = status_run({"sink.test": sink.start(rcpt_replies={"slow@sink.test": "451 4.3.0 greylisted"})})
    with Chromium(tmp_path) as browser:
        page = browser.page()
        page.navigate(f"http://127.0.0.1:{run.http_port}/")
        wait_for(lambda: page.evaluate("document.getElementById('updated').textContent")
                 .startswith("updated"), timeout=30, what="the page's first poll")
        assert page.evaluate("document.getElementById('delivered').textContent") == "0"
        send(run.port, ["x@sink.test", "y@sink.test"], n=3)
        wait_for(lambda: page.evaluate("document.getElementById('delivered').textContent") == "6",
                 timeout=30, what="the page to show 6 delivered")
        assert page.evaluate("document.getElementById('received').textContent") == "3"
        send(run.port, ["slow@sink.test"], tag="slow")
        first_deferred = ("Array.from(document.querySelector('#deferred-table tbody tr')?.cells"
                          " ?? []).map(td => td.textContent)")
        cells = wait_for(lambda: page.evaluate(first_deferred), timeout=30,
                         what="the deferred destination on the page")
        assert cells[:2] == ["sink.test", "1"] and "451 4.3.0 greylisted" in cells[3]
        assert page.evaluate("document.getElementById('messages').textContent") == "1"
        rows = page.evaluate("Array.from(document.querySelectorAll('#recent tbody tr'))"
                             ".map(tr => tr.cells[3].textContent + ' ' + tr.cells[4].textContent)")
        assert sorted(rows) == sorted(["x@sink.test delivered", "y@sink.test delivered"] * 3
                                      + ["slow@sink.test deferred"])
        page.pump()
        assert page.errors == []
        shot = page.screenshot(tmp_path / "status-page.png")
        # Also where CI keeps it (tests/artifacts/ is not tracked): a person
        # can look at the page each run produced.
        ARTIFACTS.mkdir(exist_ok=True)
        kept = Path(shutil.copy(shot, ARTIFACTS / shot.name))
        print(f"status page screenshot: {shot} (kept as {kept})")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_chromium_that_exits_at_start_leaves_nothing_of_its_group(tmp_path, monkeypatch):
    # Chromium's zygote and helpers share its process group: a browser that
    # exits before it opened its DevTools port must not leave them running.
    import os
    import signal
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = tmp_path / "helper.pid"
    fake = bin_dir / "chromium"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {helper}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    pid = None
    try:
        with pytest.raises(RuntimeError, match="chromium exited with status 1"):
            with Chromium(tmp_path):
                pass
        pid = int(helper.read_text())
        assert wait_for(lambda: not alive_process(pid), timeout=10, what="the helper to be gone")
    finally:
        if pid is not None and alive_process(pid):
            os.kill(pid, signal.SIGKILL)


def alive_process(pid: int) -> bool:
    """pid runs and is not a zombie (/proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("fmt", ["qmail", "json"])
def test_recent_deliveries_from_either_log_format(tmp_path, fmt):
    from engine.log import QmailSendLog
    from engine.status.facts import recent_deliveries
    log = QmailSendLog(tmp_path / "log", fmt=fmt)
    log.starting_delivery(1, 10, "remote", "a@x.test")
    log.starting_delivery(2, 11, "local", "b@y.test")
    log.delivery(2, "Z", "Unable to chdir to maildir. (#4.2.1)\n")
    log.delivery(1, "K", "127.0.0.1 accepted message.\nRemote host said: 250 ok\n")
    log.delivery(7, "D", "a result whose start rotated away\n")
    log.flush()
    log.close()
    got = recent_deliveries(tmp_path / "log", 2)
    assert [(r["msgid"], r["channel"], r["recipient"], r["result"]) for r in got] == [
        ("", "", "", "bounced"), ("10", "remote", "a@x.test", "delivered")]
    assert got[1]["text"] == "127.0.0.1 accepted message. Remote host said: 250 ok"
    assert abs(got[1]["time"] - time.time()) < 60
    assert len(recent_deliveries(tmp_path / "log", 30)) == 3
    assert recent_deliveries(tmp_path / "nothing", 30) == []


def test_rates_are_the_change_over_the_last_seconds():
    from engine.status.facts import Rates
    rates = Rates()
    assert rates.add(100.0, {"received": 10})["received"] == 0.0
    assert rates.add(101.0, {"received": 20})["received"] == 10.0
    for t in range(102, 111):
        got = rates.add(float(t), {"received": 20 + 5 * (t - 101)})
    assert got["received"] == 5.0                 # over the last RATE_WINDOW seconds
    assert rates.add(111.0, {"received": 0})["received"] == 0.0   # a restart: never negative


class InProcessStatus:
    """engine.status's HttpServer and StatusFacts on a loop in a thread, on 127.0.0.1:0."""

    def __init__(self, root: Path) -> None:
        import asyncio
        import threading

        from engine.config.settings import load_settings
        from engine.status import StatusFacts
        from engine.status.http import HttpServer
        settings = load_settings(root)
        self.facts = StatusFacts(root, settings, root / "run" / "metrics")
        self.server = HttpServer(self.facts.handle, max_connections=settings.status.max_connections,
                                 timeout=settings.status.request_timeout, loopback_only=True)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            self.listener = await self.loop.create_server(self.server.protocol, "127.0.0.1", 0)
            self.http_port = self.listener.sockets[0].getsockname()[1]
            started.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        assert started.wait(10)

    get = StatusRun.get
    metrics = StatusRun.metrics
    status = StatusRun.status

    def stop(self) -> None:
        def close() -> None:
            self.listener.close()
            self.server.close_all()
            self.loop.stop()
        self.loop.call_soon_threadsafe(close)
        self.thread.join(10)
        self.loop.close()
        self.facts.close()


def test_a_spool_that_cannot_be_read_is_not_shown_as_an_empty_queue(root, tmp_path):
    """An alert on qrelay_queue_messages must not see 0 when the spool cannot
    be read (the gauge is absent instead), and the page says why."""
    index = root / "queue" / "index"
    index.mkdir(parents=True, exist_ok=True)
    (index / "data.mdb").write_bytes(b"not an LMDB file" * 512)
    srv = InProcessStatus(root)
    try:
        samples = srv.metrics()
        names = {name for name, _ in samples}
        assert "qrelay_queue_messages" not in names
        assert "qrelay_queue_not_preprocessed" not in names
        assert "qrelay_queue_oldest_message_age_seconds" not in names
        assert "MDB_INVALID" in srv.status()["queue"]["error"]
        if chromium_path() is None:
            return
        with Chromium(tmp_path) as browser:
            page = browser.page()
            page.navigate(f"http://127.0.0.1:{srv.http_port}/")
            shown = wait_for(lambda: page.evaluate("document.getElementById('updated').textContent")
                             if page.evaluate("document.getElementById('updated').className")
                             == "stale" else None, timeout=30, what="the page to say the spool is unreadable")
            assert shown.startswith("cannot read the queue: ") and "MDB_INVALID" in shown
            assert page.evaluate("document.getElementById('messages').textContent") != "0"
            page.pump()
            assert page.errors == []
    finally:
        srv.stop()


def test_loopback_host_headers_include_ipv4_mapped_and_ipv6(root):
    """allow_remote off: a Host naming loopback in any spelling is served, any other 403."""
    srv = InProcessStatus(root)
    try:
        for host in ("127.0.0.1:8080", "localhost", "[::1]:8080", "[::ffff:127.0.0.1]:8080",
                     "[::ffff:7f00:2]"):
            assert srv.get("/status.json", headers={"Host": host})[0] == 200, host
        for host in ("evil.example", "127.0.0.1.evil.example", "[::ffff:192.0.2.1]:8080", "[::]"):
            assert srv.get("/status.json", headers={"Host": host})[0] == 403, host
    finally:
        srv.stop()


def test_a_destination_that_is_not_utf8_does_not_break_metrics(root):
    """A recipient domain with a byte that is not UTF-8 (the spool keeps it,
    surrogate-escaped) is a label value Prometheus can read, not a 500."""
    from engine.queue import Deferred, Envelope, Spool
    spool = Spool(root / "queue")
    try:
        now = time.time()
        ids = [spool.enqueue(Envelope("a@src.test", (rcpt,)), b"Subject: x\r\n\r\nx\r\n")
               for rcpt in ("u@caf\udce9.test", 'v@q"uo\\te.test')]
        spool.preprocess_many([(m, ["remote"]) for m in ids], now=now)
        spool.apply([Deferred(m, 0, now + 600, "no host (#4.1.2)\n") for m in ids])
    finally:
        spool.close()
    srv = InProcessStatus(root)
    try:
        samples = srv.metrics()
        assert value(samples, "qrelay_queue_deferred_recipients", destination="caf\\xe9.test") == 1
        assert value(samples, "qrelay_queue_deferred_recipients", destination='q"uo\\te.test') == 1
    finally:
        srv.stop()


def raw_request(port: int, data: bytes) -> bytes:
    """Send DATA, read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_absolute_form_targets_are_served_and_their_host_checked(root):
    """RFC 9112 3.2.2: a server must accept the absolute form (what a client
    talking to a proxy sends); its authority is the host, not Host:."""
    srv = InProcessStatus(root)
    try:
        port = srv.http_port
        got = raw_request(port, f"GET http://127.0.0.1:{port}/metrics?x=1 HTTP/1.1\r\n"
                                f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
        assert got.startswith(b"HTTP/1.1 200 ") and b"# TYPE qrelay_queue_messages gauge" in got
        got = raw_request(port, f"GET HTTP://localhost:{port} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        assert got.startswith(b"HTTP/1.1 200 ") and b"<title>qrelay status</title>" in got
        got = raw_request(port, b"GET http://evil.example/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 403 ")
    finally:
        srv.stop()


def test_a_request_with_bare_lf_line_ends_is_answered(root):
    """RFC 9112 2.2 lets a server take a bare LF as a line end; one that does
    not must not leave the client waiting for request_timeout in silence."""
    (root / "qrelay.toml").write_text("[status]\nrequest_timeout = 3.0\n")
    srv = InProcessStatus(root)
    try:
        got = raw_request(srv.http_port, b"GET /metrics HTTP/1.0\nHost: 127.0.0.1\n\n")
        assert got.startswith(b"HTTP/1.1 200 ") and b"# TYPE qrelay_queue_messages gauge" in got
        got = raw_request(srv.http_port, b"GET /metrics HTTP/1.0\nHost: evil.example\r\n\n")
        assert got.startswith(b"HTTP/1.1 403 ")
    finally:
        srv.stop()


def test_a_metrics_file_that_cannot_be_read_leaves_the_others_served(root):
    """A process's file is empty between its creation and its first size (or
    is damaged): the other processes' counters are still served, not a 500."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    directory = root / "run" / "metrics"
    directory.mkdir(parents=True)
    good = MmapedDict(str(directory / "counter_1.db"))
    good.write_value(mmap_key("qrelay_messages_received", "qrelay_messages_received_total",
                              ["protocol", "result"], ["smtp", "queued"], "Messages"), 3.0, 0.0)
    good.close()
    (directory / "counter_2.db").write_bytes(b"")                       # being made
    (directory / "counter_3.db").write_bytes(b"\x00\x01\x00\x00" + b"\x00" * 60)   # cut short
    srv = InProcessStatus(root)
    try:
        samples = srv.metrics()
        assert value(samples, "qrelay_messages_received_total", protocol="smtp", result="queued") == 3
        assert srv.status()["totals"]["received"] == 3
    finally:
        srv.stop()


def test_an_answer_slower_than_request_timeout_is_still_sent(root):
    """request_timeout bounds the request's arrival; an answer that takes
    longer (the first scan of a large queue) is sent, not cut off unsaid."""
    import asyncio
    import threading

    from engine.status.http import HttpServer, text_response

    async def slow(path: str):
        await asyncio.sleep(0.6)              # three request timeouts: a long queue scan
        return text_response(200, "scanned")

    server = HttpServer(slow, max_connections=4, timeout=0.2, loopback_only=True)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    listener = asyncio.run_coroutine_threadsafe(
        loop.create_server(server.protocol, "127.0.0.1", 0), loop).result(10)
    try:
        port = listener.sockets[0].getsockname()[1]
        got = raw_request(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\nscanned\n")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\n")              # and a request that never ends
            assert s.recv(100) == b""                      # is closed after the timeout
    finally:
        def close() -> None:
            listener.close()
            server.close_all()
            loop.stop()
        loop.call_soon_threadsafe(close)
        thread.join(10)
        loop.close()
