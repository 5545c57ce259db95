"""bench/flood.py against bench/sink.py (a real subprocess on port 0).

flood runs in-process through main() where that is enough (fast), and as a
subprocess where the exit status and stderr are what is tested.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import flood  # noqa: E402
from smtpload.hist import LatencyHistogram  # noqa: E402

FLOOD = REPO / "bench" / "flood.py"


@pytest.fixture
def run_flood(tmp_path, capsys):
    """flood.main() in-process; returns (exit code, --json report, stdout)."""
    n = [0]

    def run(target: str, *args: str) -> tuple[int, dict, str]:
        n[0] += 1
        out = tmp_path / f"flood{n[0]}.json"
        rc = flood.main([target, "-q", "--json", str(out), *args])
        text = capsys.readouterr().out
        return rc, json.loads(out.read_text()), text

    return run


def test_counts_match_and_json_is_complete(sinks, run_flood):
    s = sinks()
    rc, rep, text = run_flood(s.address, "-s", "4", "-m", "60", "-l", "2000")
    assert rc == 0
    m = rep["messages"]
    assert m["attempted"] == m["sent"] == m["accepted"] == 60
    assert m["tempfailed"] == m["permfailed"] == m["conn_failed"] == 0
    assert rep["connections"]["opened"] == 60  # default: one message per connection
    assert rep["rate"]["accepted_per_s"] > 0 and rep["elapsed_s"] > 0
    for key in ("connect", "transaction"):
        lat = rep["latency_ms"][key]
        assert lat["n"] == 60 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    st = s.wait_messages(60, timeout=5)
    assert st["messages"] == 60 and st["connections"] == 60
    assert st["bytes"] >= 60 * 2000
    assert "messages/s" in text and "p99" in text


def test_greeting_command_helo_by_default_ehlo_on_request(sinks, run_flood):
    s = sinks()
    run_flood(s.address, "-s", "1", "-m", "2")  # like smtp-source: HELO
    run_flood(s.address, "-s", "1", "-m", "3", "--hello", "ehlo")
    run_flood(s.address, "-s", "1", "-m", "4", "--pipelining")  # needs EHLO
    st = s.stop()
    assert (st["helo"], st["ehlo"]) == (2, 7)


def test_pipelining_reuse_and_recipients(sinks, run_flood):
    s = sinks()
    rc, rep, _ = run_flood(s.address, "-s", "3", "-m", "30", "-r", "3", "--pipelining", "-d")
    assert rep["messages"]["accepted"] == 30
    assert rep["recipients"]["accepted"] == 90
    assert rep["connections"]["opened"] == 3
    st = s.stop()
    assert st["messages"] == 30 and st["rcpts"] == 90 and st["connections"] == 3


def test_pipelining_falls_back_when_not_offered(sinks, run_flood):
    s = sinks("--no-pipelining")
    rc, rep, _ = run_flood(s.address, "-s", "2", "-m", "10", "--pipelining", "--per-conn", "5")
    assert rep["messages"]["accepted"] == 10 and rep["connections"]["opened"] == 2
    assert s.stop()["messages"] == 10


def test_tempfail_shows_451_under_end_of_data(sinks, run_flood):
    s = sinks("--tempfail", "100")
    rc, rep, text = run_flood(s.address, "-s", "2", "-m", "12", "-d")
    assert rc == 0
    m = rep["messages"]
    assert m["tempfailed"] == 12 and m["accepted"] == 0
    (r,) = rep["replies"]
    assert (r["stage"], r["code"], r["count"]) == ("END-OF-DATA", 451, 12)
    assert "temporary failure" in r["text"]
    assert "451" in text and "END-OF-DATA" in text
    assert s.stop()["tempfailed"] == 12


@pytest.mark.parametrize("pipelining", [False, True])
def test_permfail_at_rcpt_shows_550(sinks, run_flood, pipelining):
    s = sinks("--permfail", "100", "--fail-at", "rcpt")
    args = ["-s", "2", "-m", "10", "--per-conn", "5"] + (["--pipelining"] if pipelining else [])
    rc, rep, _ = run_flood(s.address, *args)
    assert rep["messages"]["permfailed"] == 10 and rep["messages"]["accepted"] == 0
    # Only the cause is reported, not the DATA refusal that follows it.
    assert [(r["stage"], r["code"], r["count"]) for r in rep["replies"]] == [("RCPT", 550, 10)]
    assert rep["recipients"]["rejected"] == 10


def test_mixed_failures_add_up(sinks, run_flood):
    s = sinks("--tempfail", "30", "--permfail", "20", "--seed", "7")
    rc, rep, _ = run_flood(s.address, "-s", "4", "-m", "200", "--pipelining", "-d")
    m = rep["messages"]
    assert m["accepted"] + m["tempfailed"] + m["permfailed"] == 200
    assert 20 < m["tempfailed"] < 100 and 10 < m["permfailed"] < 70
    codes = {r["code"]: r["count"] for r in rep["replies"]}
    assert codes == {451: m["tempfailed"], 554: m["permfailed"]}
    st = s.stop()
    assert (st["messages"], st["tempfailed"], st["permfailed"]) == \
        (m["accepted"], m["tempfailed"], m["permfailed"])


def test_greet_fail_counts_421_at_connect(sinks, run_flood):
    s = sinks("--greet-fail", "100")
    rc, rep, _ = run_flood(s.address, "-s", "2", "-m", "8")
    assert rep["messages"]["tempfailed"] == 8
    (r,) = rep["replies"]
    assert (r["stage"], r["code"], r["count"]) == ("CONNECT", 421, 8)
    assert rep["messages"]["conn_failed"] == 0


def test_delay_shows_in_latency(sinks, run_flood):
    s = sinks("--delay", "20")
    rc, rep, _ = run_flood(s.address, "-s", "2", "-m", "4")
    assert rep["latency_ms"]["connect"]["p50"] >= 19
    # MAIL, RCPT, DATA, end of DATA: four replies of 20 ms each.
    assert rep["latency_ms"]["transaction"]["p50"] >= 79


def test_duration_stops_on_time(sinks, run_flood):
    s = sinks()
    t = time.monotonic()
    rc, rep, _ = run_flood(s.address, "-s", "4", "--duration", "1", "-d")
    took = time.monotonic() - t
    assert 0.9 <= took < 2.5
    m = rep["messages"]
    assert m["accepted"] > 50 and m["conn_failed"] == 0
    assert m["accepted"] + m["unfinished"] + m["tempfailed"] + m["permfailed"] == m["attempted"]
    assert 0.9 <= rep["elapsed_s"] < 2.5


def test_duration_with_slow_server_cuts_after_drain(sinks, run_flood):
    s = sinks("--delay", "400")
    t = time.monotonic()
    rc, rep, _ = run_flood(s.address, "-s", "2", "--duration", "0.5", "--drain", "0.3")
    assert time.monotonic() - t < 2.0
    m = rep["messages"]
    assert m["unfinished"] == m["attempted"] == 2 and m["conn_failed"] == 0


def test_rate_cap(sinks, run_flood):
    s = sinks()
    t = time.monotonic()
    rc, rep, _ = run_flood(s.address, "-s", "4", "-m", "20", "--rate", "40", "-d")
    assert time.monotonic() - t >= 0.45  # 20 messages at 40/s: the last starts at 0.475 s
    assert rep["messages"]["accepted"] == 20


@pytest.mark.parametrize("reuse", [[], ["-d"]])
def test_rate_waits_end_with_duration(sinks, run_flood, reuse):
    # 40 sessions at 20/s claim slots up to 2 s ahead: when --duration ends,
    # those waits start nothing and must not hold the run (and its elapsed
    # time, halving the rate reported) until their slot comes.
    s = sinks()
    t = time.monotonic()
    rc, rep, _ = run_flood(s.address, "-s", "40", "--rate", "20", "--duration", "1", *reuse)
    assert time.monotonic() - t < 1.8
    m = rep["messages"]
    assert 18 <= m["accepted"] <= 22 and m["accepted"] == m["attempted"]
    assert rep["elapsed_s"] < 1.5 and 15 <= rep["rate"]["accepted_per_s"] <= 22


def test_noop_mode_sends_no_data(sinks, run_flood):
    s = sinks()
    rc, rep, _ = run_flood(s.address, "-s", "2", "-m", "10", "--noop", "-d")
    assert rep["messages"]["accepted"] == 10 and rep["messages"]["sent"] == 0
    st = s.stop()
    assert st["messages"] == 0 and st["rcpts"] == 10


def test_templates_and_domain_mix(sinks, run_flood, tmp_path):
    store = tmp_path / "store"
    s = sinks("--store-dir", str(store))
    rc, rep, _ = run_flood(s.address, "-s", "2", "-m", "200", "-d", "--seed", "3",
                           "-f", "bounce-{n}@src.test", "-t", "u{n}.{i}@{domain}", "-r", "2",
                           "--domain", "a.test:1", "--domain", "b.test:3")
    assert rep["messages"]["accepted"] == 200
    s.stop()
    rcpts = []
    senders = set()
    for f in store.glob("*.eml"):
        for line in f.read_bytes().split(b"\r\n"):
            if line.startswith(b"X-Sink-Rcpt-To: "):
                rcpts.append(line[17:-1].decode())
            elif line.startswith(b"X-Sink-Mail-From: "):
                senders.add(line[19:-1].decode())
    assert len(rcpts) == 400 and len(senders) == 200  # {n} is unique per message
    a = sum(r.endswith("@a.test") for r in rcpts)
    b = sum(r.endswith("@b.test") for r in rcpts)
    assert a + b == 400 and 50 < a < 150  # weight 1:3 → about 100
    assert any(r.startswith("u") and ".1@" in r for r in rcpts)


def test_rand_range_spreads_over_a_fixed_set_of_mailboxes(sinks, run_flood, tmp_path):
    store = tmp_path / "store"
    s = sinks("--store-dir", str(store))
    rc, rep, _ = run_flood(s.address, "-s", "2", "-m", "300", "-d", "--seed", "5",
                           "-t", "u{rand}@{domain}", "--rand-range", "4",
                           "--domain", "a.test", "--domain", "b.test")
    assert rep["messages"]["accepted"] == 300 and rep["settings"]["rand_range"] == 4
    s.stop()
    rcpts = {line[17:-1].decode() for f in store.glob("*.eml")
             for line in f.read_bytes().split(b"\r\n") if line.startswith(b"X-Sink-Rcpt-To: ")}
    assert rcpts == {f"u{k}@{d}" for k in range(4) for d in ("a.test", "b.test")}


def test_eml_directory_is_sent_verbatim(sinks, run_flood, tmp_path):
    src = tmp_path / "eml"
    src.mkdir()
    (src / "a.eml").write_bytes(b"Subject: a\n\n.dot line\nbody a\n")
    (src / "b.eml").write_bytes(b"Subject: b\r\n\r\nbody b\r\n")
    store = tmp_path / "store"
    s = sinks("--store-dir", str(store))
    rc, rep, _ = run_flood(s.address, "-s", "1", "-m", "4", "--eml", str(src), "-d")
    assert rep["messages"]["accepted"] == 4 and rep["settings"]["eml_files"] == 2
    s.stop()
    bodies = sorted(f.read_bytes().split(b"\r\n", 2)[2] for f in store.glob("*.eml"))
    assert sorted(b.split(b"\r\n", 1)[1] for b in bodies) == [
        b"Subject: a\r\n\r\n.dot line\r\nbody a\r\n"] * 2 + [b"Subject: b\r\n\r\nbody b\r\n"] * 2
    assert all(b.startswith(b"X-Flood-Id: ") for b in bodies)


def test_eml_files_in_turn_with_a_connection_per_message(sinks, run_flood, tmp_path):
    # The turn was kept per connection: with one message per connection
    # (the default) every message was the first file.
    src = tmp_path / "eml"
    src.mkdir()
    for name in "abc":
        (src / f"{name}.eml").write_bytes(f"Subject: {name}\r\n\r\nbody\r\n".encode())
    store = tmp_path / "store"
    s = sinks("--store-dir", str(store))
    rc, rep, _ = run_flood(s.address, "-s", "2", "-m", "6", "--eml", str(src))
    assert rep["messages"]["accepted"] == 6
    s.stop()
    subjects = sorted(line for f in store.glob("*.eml") for line in f.read_bytes().split(b"\r\n")
                      if line.startswith(b"Subject: "))
    assert subjects == [b"Subject: a"] * 2 + [b"Subject: b"] * 2 + [b"Subject: c"] * 2


def test_server_closing_mid_session_is_a_connection_error(run_flood):
    # A server that greets and then hangs up: every message is a connection error.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(5)
    import threading

    def serve():
        for _ in range(3):
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(b"220 hi\r\n")
            c.recv(100)
            c.close()

    th = threading.Thread(target=serve)
    th.start()
    try:
        rc, rep, _ = run_flood(f"127.0.0.1:{srv.getsockname()[1]}", "-s", "1", "-m", "3")
    finally:
        th.join(10)
        srv.close()
    assert rep["messages"]["conn_failed"] == 3
    assert rep["connections"]["errors"] == {"closed by server": 3}


class ScriptedServer:
    """A one-connection-at-a-time SMTP server on loopback (a thread) that
    answers `reply(command, n)` for each command line, n counting MAIL
    commands on the connection; DATA's content is read up to the final dot,
    then `reply(b".", n)` answers it. A reply starting "421" closes the
    connection, as servers do (RFC 5321 3.8)."""

    def __init__(self, reply):
        import threading

        self.reply = reply
        self.connections = 0
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.address = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return  # stop(): the listening socket was shut down
            self.connections += 1
            with c, c.makefile("rb") as f:
                self._session(c, f)

    def _session(self, c, f) -> None:
        c.sendall(b"220 scripted\r\n")
        mails = 0
        for line in f:
            verb = line[:4].upper()
            if verb == b"QUIT":
                c.sendall(b"221 bye\r\n")
                return
            mails += verb == b"MAIL"
            answer = self.reply(verb, mails)
            if verb == b"DATA" and answer.startswith(b"354"):
                c.sendall(answer)
                for body in f:
                    if body == b".\r\n":
                        break
                answer = self.reply(b".", mails)
            c.sendall(answer)
            if answer.startswith(b"421"):
                # Close without a reset (which could destroy the reply in
                # flight): our side first, then read until the client closes.
                c.shutdown(socket.SHUT_WR)
                while f.read1(4096):
                    pass
                return

    def stop(self) -> None:
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.srv.close()
        self.thread.join(10)


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize("at", [b"MAIL", b"RCPT", b"DATA", b"."])
def test_421_ends_the_connection_and_counts_once(run_flood, at, pipelining):
    # A 421 (Postfix's message rate limit at MAIL, a server shutting down)
    # means the server closes the channel: that message is temp-failed, and
    # the next one goes on a new connection (not a connection error).
    def reply(verb: bytes, mails: int) -> bytes:
        if verb == at and mails >= 2:
            return b"421 4.7.0 too many messages\r\n"
        if verb == b"EHLO":
            return b"250-scripted\r\n250 PIPELINING\r\n"
        return b"354 go\r\n" if verb == b"DATA" else b"250 ok\r\n"

    srv = ScriptedServer(reply)
    try:
        args = ["-s", "1", "-m", "6", "-d"] + (["--pipelining"] if pipelining else [])
        rc, rep, _ = run_flood(srv.address, *args)
    finally:
        srv.stop()
    m = rep["messages"]
    # Each connection: one message accepted, the next refused 421.
    assert (m["accepted"], m["tempfailed"], m["conn_failed"]) == (3, 3, 0), rep
    assert rep["connections"] == {"opened": 3, "errors": {}}
    stage = {b".": "END-OF-DATA"}.get(at, at.decode())
    assert [(r["stage"], r["code"], r["count"]) for r in rep["replies"]] == [(stage, 421, 3)]


def test_procs_split_and_merge(sinks, tmp_path):
    s = sinks()
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, str(FLOOD), s.address, "-s", "4", "-m", "101", "-q",
                        "--procs", "2", "--pipelining", "-d", "--json", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["settings"]["procs"] == 2
    assert rep["messages"]["accepted"] == 101 and rep["latency_ms"]["transaction"]["n"] == 101
    assert s.stop()["messages"] == 101


@pytest.mark.parametrize("procs", ["1", "2"])
def test_sigint_stops_and_still_reports(sinks, tmp_path, procs):
    s = sinks()
    out = tmp_path / "i.json"
    p = subprocess.Popen([sys.executable, str(FLOOD), s.address, "-s", "4", "--duration", "30",
                          "-q", "--procs", procs, "-d", "--json", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Once mail flows, flood's handlers are in place (a fixed sleep was
        # too short on a loaded machine: the SIGINT came during the imports).
        assert s.wait_messages(1, timeout=20)["messages"] >= 1
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, stderr
    rep = json.loads(out.read_text())
    assert rep["messages"]["accepted"] > 0 and rep["elapsed_s"] < 5
    assert "messages/s" in stdout


@pytest.mark.parametrize("load", [["-m", "50"], ["-m", "1"], ["-m", "3", "-s", "10"],
                                  ["-m", "1", "--procs", "2"]])
def test_unreachable_target_exits_2_with_one_line(load):
    # Issue #15: with fewer messages than sessions (-m 1) it used to exit 0.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        r = subprocess.run([sys.executable, str(FLOOD), f"127.0.0.1:{port}", *load],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"flood.py: error: cannot connect to 127.0.0.1:{port}: connection refused"]


@pytest.mark.parametrize("where", ["missing/out.json", "."])
def test_json_that_cannot_be_written_is_refused_before_the_run(sinks, tmp_path, where):
    # It was found out only after the run: the results (and the summary,
    # never printed) lost, and a stray FILE.PID.tmp left beside the target.
    s = sinks()
    target = tmp_path / where
    r = subprocess.run([sys.executable, str(FLOOD), s.address, "-m", "3", "-q",
                        "--json", str(target)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith(f"flood.py: error: --json {target}: ") and \
        len(r.stderr.splitlines()) == 1, r.stderr
    assert s.stop()["connections"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0"]


@pytest.mark.parametrize("hard", [100, 4096])
def test_sessions_beyond_the_open_files_limit(sinks, tmp_path, hard):
    # -s beyond `ulimit -n` made every connect past it fail with EMFILE,
    # counted as the server's connection errors. Now the soft limit is raised
    # as far as the hard one allows, else a one-line error before the run.
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))

    s = sinks()
    out = tmp_path / "fd.json"
    r = subprocess.run([sys.executable, str(FLOOD), s.address, "-s", "150", "-m", "300", "-q",
                        "--json", str(out)], capture_output=True, text=True, timeout=60,
                       preexec_fn=limit)
    if hard < 150:
        assert r.returncode == 2 and s.stop()["connections"] == 0
        assert r.stderr.startswith("flood.py: error: -s 150 needs ") and \
            len(r.stderr.splitlines()) == 1, r.stderr
    else:
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        assert rep["messages"]["accepted"] == 300 and rep["connections"]["errors"] == {}


@pytest.mark.parametrize("args", [
    ["127.0.0.1"],
    ["127.0.0.1:notaport"],
    ["127.0.0.1:0"],
    ["127.0.0.1:25", "-s", "0"],
    ["127.0.0.1:25", "-m", "-1"],
    ["127.0.0.1:25", "-m", "0"],
    ["127.0.0.1:25", "--rate", "fast"],
    ["127.0.0.1:25", "--domain", "a.test:0"],
    ["127.0.0.1:25", "--to", "x{nope}@y"],
    ["127.0.0.1:25", "--rand-range", "0"],
    ["127.0.0.1:25", "--eml", "/nonexistent/dir"],
    ["127.0.0.1:25", "--bogus"],
    ["127.0.0.1:25", "--pipelining", "--hello", "helo"],
])
def test_bad_arguments_exit_2_with_one_line(args):
    r = subprocess.run([sys.executable, str(FLOOD), *args], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flood.py: error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_synthetic_payload_has_the_size_asked_for():
    # -l N: N bytes of CRLF-ended lines after the headers. A rest of one byte
    # after a full line became "\r" + "\r\n", then a bare CR made a line
    # of it: 82 bytes for -l 79 (every N = 1 modulo 78).
    from smtpload.message import synthetic

    headers = len(synthetic(0))
    for size in range(2, 500):
        wire = synthetic(size)
        assert len(wire) - headers == size, size
        assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    assert len(synthetic(1)) - headers == 2  # the least a line can be


def test_histogram_percentiles_are_close():
    h = LatencyHistogram()
    for us in range(1, 10001):
        h.record(us / 1e6)
    assert abs(h.percentile(50) - 0.005) / 0.005 < 0.01
    assert abs(h.percentile(99) - 0.0099) / 0.0099 < 0.01
    other = LatencyHistogram()
    other.record(1.0)
    h.merge(LatencyHistogram.from_state(json.loads(json.dumps(other.to_state()))))
    assert h.n == 10001 and h.max_us == 1_000_000


def test_starttls_and_auth(root, run_flood):
    """--starttls and --auth against the real receiver (STARTTLS, EHLO again, AUTH PLAIN)."""
    from engine.accounts import admin
    from tests.smtp_harness import InProcessServer, install_certificate

    admin.add_domain(root, "auth.test", uid=12345, gid=12345)
    admin.add_user(root, "bench@auth.test", "Bench-pw-1")
    install_certificate(root)
    (root / "control" / "tcp.smtp").write_text(":allow\n")     # only AUTH may relay
    srv = InProcessServer(root)
    try:
        target = f"127.0.0.1:{srv.port}"
        rc, rep, _ = run_flood(target, "-s", "2", "-m", "6", "--starttls", "--auth", "bench@auth.test:Bench-pw-1")
        assert rc == 0 and rep["messages"]["accepted"] == 6 and len(srv.spool.messages) == 6
        assert b"with ESMTPSA (" in srv.spool.messages[0][1]
        rc, rep, text = run_flood(target, "-s", "1", "-m", "2", "--starttls", "--auth", "bench@auth.test:wrong")
        assert rep["messages"]["permfailed"] == 2 and "535" in text
    finally:
        srv.stop()
    with pytest.raises(SystemExit):
        flood.main(["127.0.0.1:25", "--auth", "no-colon"])


def test_tls_resume_offers_the_last_session(root, run_flood):
    """--tls-resume: after the first connections, each STARTTLS resumes the
    session the server gave before (the server's certificate is not sent again)."""
    from tests.smtp_harness import InProcessServer, install_certificate

    install_certificate(root)
    srv = InProcessServer(root)
    try:
        target = f"127.0.0.1:{srv.port}"
        rc, rep, text = run_flood(target, "-s", "2", "-m", "8", "--starttls", "--tls-resume")
        assert rc == 0 and rep["messages"]["accepted"] == 8
        # The first two connections start together, before any session exists.
        assert rep["tls"] == {"handshakes": 8, "resumed": 6}
        assert rep["settings"]["tls_resume"] is True
        rc, rep, _ = run_flood(target, "-s", "2", "-m", "4", "--starttls")
        assert rep["tls"] == {"handshakes": 4, "resumed": 0}
        assert len(srv.spool.messages) == 12 and b"with ESMTPS (" in srv.spool.messages[-1][1]
    finally:
        srv.stop()
    with pytest.raises(SystemExit):
        flood.main(["127.0.0.1:25", "--tls-resume"])


class FirstWriteServer(ScriptedServer):
    """Answers EHLO with `ehlo`, then keeps the client's first write after it."""

    def __init__(self, ehlo: bytes):
        self.ehlo = ehlo
        self.first: list[bytes] = []
        super().__init__(None)

    def _session(self, c, f) -> None:
        c.sendall(b"220 scripted\r\n")
        c.recv(4096)  # EHLO
        c.sendall(self.ehlo)
        self.first.append(c.recv(4096))
        c.sendall(b"421 4.3.0 that is all\r\n")
        c.shutdown(socket.SHUT_WR)
        while c.recv(4096):
            pass


@pytest.mark.parametrize("ehlo, pipelined", [
    (b"250-scripted\r\n250 PIPELINING\r\n", True),
    (b"250-scripted\r\n250-pipelining\r\n250 SIZE 0\r\n", True),   # keywords: any case
    (b"250-scripted\r\n250-XPIPELINING\r\n250 SIZE 0\r\n", False),  # another keyword
    (b"250-scripted\r\n250 X-NO-PIPELINING\r\n", False),
])
def test_pipelining_only_when_the_keyword_is_offered(run_flood, ehlo, pipelined):
    srv = FirstWriteServer(ehlo)
    try:
        run_flood(srv.address, "-s", "1", "-m", "1", "--pipelining")
    finally:
        srv.stop()
    (first,) = srv.first
    assert first.startswith(b"MAIL FROM:") and (b"RCPT TO:" in first) == pipelined, first


def test_reply_text_with_brackets_is_printed_as_sent(run_flood):
    # Server text is not rich markup: "[mx.example.com]" vanished from the
    # table (read as a style) and "[/help]" ended the run in a MarkupError.
    text = "5.7.1 rejected by [mx.example.com], see [/help]"

    def reply(verb: bytes, mails: int) -> bytes:
        return f"550 {text}\r\n".encode() if verb == b"RCPT" else b"250 ok\r\n"

    srv = ScriptedServer(reply)
    try:
        rc, rep, out = run_flood(srv.address, "-s", "1", "-m", "1")
    finally:
        srv.stop()
    assert rc == 0 and rep["replies"][0]["text"] == text
    assert text in out


class TlsScriptedServer(ScriptedServer):
    """Offers STARTTLS, says `reply_220` to it, then `after_220(connection)`."""

    def __init__(self, after_220, reply_220: bytes = b"220 go ahead\r\n"):
        self.after_220 = after_220
        self.reply_220 = reply_220
        super().__init__(None)

    def _session(self, c, f) -> None:
        c.sendall(b"220 scripted\r\n")
        f.readline()
        c.sendall(b"250-scripted\r\n250 STARTTLS\r\n")
        f.readline()
        c.sendall(self.reply_220)
        self.after_220(c)
        while c.recv(4096):  # until the client gives up and closes
            pass


def test_starttls_handshake_bounded_by_timeout_and_counted_once(run_flood):
    # A server that never answers the ClientHello: --timeout (not the event
    # loop's 60 s) ends it, and the message is one connection error.
    srv = TlsScriptedServer(lambda c: None)
    t = time.monotonic()
    try:
        rc, rep, _ = run_flood(srv.address, "-s", "1", "-m", "1", "--starttls", "--timeout", "1")
    finally:
        srv.stop()
    assert time.monotonic() - t < 10
    assert rep["messages"]["conn_failed"] == 1
    assert rep["connections"]["errors"] == {"tls: handshake timeout": 1}


def _not_tls(c) -> None:
    c.recv(4096)  # the ClientHello
    c.sendall(b"this is not a TLS record at all\r\n" * 4)


def test_starttls_garbage_is_one_tls_error(run_flood):
    # Not TLS after the 220: one error, named by OpenSSL's reason (it was
    # counted twice, once as "tls: eperm" from SSL_ERROR_SSL's number 1).
    srv = TlsScriptedServer(_not_tls)
    try:
        rc, rep, _ = run_flood(srv.address, "-s", "1", "-m", "2", "--starttls", "--timeout", "5")
    finally:
        srv.stop()
    assert rep["messages"]["conn_failed"] == 2
    assert rep["connections"]["errors"] == {"tls: wrong version number": 2}


def test_starttls_cleartext_after_220_is_not_read(run_flood, caplog):
    # Bytes in clear after "220" to STARTTLS are not replies (RFC 3207; the
    # STARTTLS injection): they were parsed, the connection aborted as a
    # malformed reply, and the handshake then begun on the closed transport
    # logged a traceback from the event loop.
    srv = TlsScriptedServer(_not_tls, b"220 go ahead\r\nnot a reply\r\n250 injected\r\n")
    try:
        rc, rep, _ = run_flood(srv.address, "-s", "1", "-m", "2", "--starttls", "--timeout", "5")
    finally:
        srv.stop()
    assert rep["connections"]["errors"] == {"tls: wrong version number": 2}
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_session_cache_offers_its_session_through_openssl_and_falls_back():
    """--tls-resume's context: the session goes to OpenSSL without the ssl
    module's encode-and-decode copy; when the pointers do not check out, the
    ssl module's way still resumes."""
    import ssl

    import trustme
    from smtpload.tls_session import SessionCache

    cert = trustme.CA().issue_cert("flood.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = SessionCache(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE

    def connect() -> ssl.SSLObject:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c, s = client.wrap_bio(c_in, c_out), server.wrap_bio(s_in, s_out, server_side=True)
        while True:
            for side in (c, s):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            if not (c_out.pending or s_out.pending):
                break
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        s.write(b"250")                  # the tickets come with the first record
        c_in.write(s_out.read())
        assert c.read(3) == b"250"
        with pytest.raises(ssl.SSLWantReadError):
            c.unwrap()                   # close_notify: the session stays resumable
        return c

    first = connect()
    assert not first.session_reused
    client.session = first.session
    probe = ssl.SSLContext.wrap_bio(client, ssl.MemoryBIO(), ssl.MemoryBIO())
    assert client._offer(probe, client.session)              # the direct way is taken
    assert connect().session_reused and connect().session_reused
    other = SessionCache(ssl.PROTOCOL_TLS_CLIENT)
    assert not other._offer(ssl.SSLContext.wrap_bio(other, ssl.MemoryBIO(), ssl.MemoryBIO()),
                            client.session)                  # another context's session: refused
    client._offer = lambda sslobj, session: False             # the ssl module's way
    assert connect().session_reused
