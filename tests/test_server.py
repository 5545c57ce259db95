"""`qrelay run` as a real subprocess: supervisor, receiver processes, signals, the spool."""
from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from engine.queue import Spool
from tests.conftest import run_cli
from tests.smtp_harness import REPO, RawClient, RunningQrelay, children_of, process_title

ME = "mx.example.com"
OK_RE = re.compile(rb"^250 ok (\d+) qp (\d+)\r\n$")


@pytest.fixture
def qrelay(root: Path):
    started: list[RunningQrelay] = []

    def start(procs: int = 2, extra: tuple[str, ...] = ()) -> RunningQrelay:
        q = RunningQrelay(root, procs=procs, extra=extra)
        started.append(q)
        return q

    yield start
    for q in started:
        q.stop()


def queued(root: Path, expect: int = 0) -> list[tuple[int, str, tuple[str, ...]]]:
    """What the index holds; with `expect`, wait (up to 5 s) until it holds
    that many: a 250 comes at the segment sync, the index commit just after."""
    deadline = time.monotonic() + 5
    while True:
        with Spool(root / "queue", readonly=True) as spool:
            got = [(m.msgid, m.sender, tuple(r.address for r in m.recipients))
                   for m in spool.iter_messages()]
        if len(got) >= expect or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def send(port: int, n: int = 1, rcpt: str = "x@sink.test") -> list[int]:
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        for i in range(n):
            s.ehlo("client.test")
            s.mail("a@example.org")
            s.rcpt(rcpt)
            code, text = s.data(b"Subject: %d\r\n\r\nhello\r\n" % i)
            assert code == 250, text
            ids.append(int(text.split()[-1]))
    return ids


def socket_holder(client: socket.socket, pids: list[int]) -> int | None:
    """Which of `pids` holds the server side of `client`'s TCP connection
    (from /proc/net/tcp and /proc/PID/fd; no tools needed)."""
    cport = client.getsockname()[1]
    sport = client.getpeername()[1]
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == sport and int(remote.split(":")[1], 16) == cport:
                inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                pass
    return None


def alive(pid: int) -> bool:
    """Running (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_run_accepts_and_queues_and_stops_cleanly(qrelay, root):
    q = qrelay()
    kids = q.children()
    assert len(kids) == 3  # two receivers and the spool writer (scheduler off)
    ids = send(q.port, 3)
    msgs = queued(root, 3)
    assert sorted(m[0] for m in msgs) == sorted(ids)  # qp = the spool's message id (qread's #id)
    assert all(m[1] == "a@example.org" and m[2] == ("x@sink.test",) for m in msgs)
    assert q.stop() == 0
    assert "Traceback" not in q.stderr_text, q.stderr_text  # a clean stop logs no stack
    assert not any(alive(k) for k in kids)


def test_bad_config_and_bad_listen_are_one_line_errors(tmp_path, root):
    r = run_cli("run", str(tmp_path / "nope"), "--listen", "127.0.0.1:0")
    assert r.returncode == 1 and "no such qrelay root" in r.stderr and "Traceback" not in r.stderr
    (root / "control" / "rcpthosts").unlink()
    r = run_cli("run", str(root), "--listen", "127.0.0.1:0")
    assert r.returncode == 1 and "rcpthosts is missing" in r.stderr
    r = run_cli("run", str(root), "--listen", "nonsense")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


def test_listen_on_a_busy_port_is_an_error(root):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        r = run_cli("run", str(root), "--listen", f"127.0.0.1:{s.getsockname()[1]}")
    finally:
        s.close()
    assert r.returncode == 1 and "cannot listen on" in r.stderr and "Traceback" not in r.stderr


def test_dev_creates_the_root_and_port_file(tmp_path):
    home = tmp_path / "var" / "qrelay"
    port_file = tmp_path / "port"
    q = RunningQrelay(home, procs=1, extra=("--dev", "--port-file", str(port_file)))
    try:
        assert (home / "control" / "me").exists()
        assert int(port_file.read_text()) == q.port
        send(q.port, 1, rcpt="someone@elsewhere.test")  # 127. may relay in the embedded default
    finally:
        assert q.stop() == 0


def test_kill9_of_a_receiver_mid_transaction_leaves_the_others_serving(qrelay, root):
    q = qrelay(procs=2)
    # A transaction stopped in the middle of DATA; find the receiver holding it.
    c = RawClient(q.port)
    c.line()
    c.cmd(b"MAIL FROM:<a@example.org>")
    c.cmd(b"RCPT TO:<x@sink.test>")
    c.cmd(b"DATA")
    c.send(b"Subject: half\r\n\r\nhalf a mess")
    kids = q.children()
    holder = socket_holder(c.sock, kids)
    assert holder is not None, "no receiver holds the connection?"
    victim = holder
    os.kill(victim, signal.SIGKILL)
    assert c.closed()
    c.close()
    # The survivor (and soon the restarted one) keep serving.
    for _ in range(6):
        send(q.port, 1)
    # The supervisor restarts it after its backoff; a loaded machine takes a
    # while to start a Python process.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = q.children()
        if len(now) == 3 and victim not in now:
            break
        time.sleep(0.1)
    assert len(now) == 3 and victim not in now  # receivers + spool writer
    assert all(m[2] == ("x@sink.test",) for m in queued(root, 6))
    assert len(queued(root)) == 6  # nothing of the half message


def test_kill9_of_a_receiver_committing_directly_loses_no_answered_message(
        qrelay, root, tmp_path, monkeypatch):
    # Direct commits: each receiver owns a segment, answers at its sync and
    # indexes after. With every sync 300 ms slower (LD_PRELOAD shim) the kill
    # right after a 250 lands before that message's index commit; the
    # restarted receiver indexes what it left (engine/queue, C2).
    shim = tmp_path / "slowsync.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(shim),
                    str(REPO / "bench" / "spool_slowsync.c"), "-ldl"], check=True)
    (root / "qrelay.toml").write_text("[spool]\nsingle_writer = false\n")
    monkeypatch.setenv("LD_PRELOAD", str(shim))
    monkeypatch.setenv("SLOWSYNC_MS", "300")
    q = qrelay(procs=2)
    monkeypatch.delenv("LD_PRELOAD")
    c = RawClient(q.port)
    assert c.line().startswith(b"220 ")
    # Found before the transactions: reading every process's fds in /proc
    # takes long on a loaded machine, and the kill must come right after the
    # last 250, well inside the 300 ms before that message's index commit.
    victim = socket_holder(c.sock, q.children())
    assert victim is not None
    answered = []
    for i in range(3):
        assert c.cmd(b"MAIL FROM:<a@example.org>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<x@sink.test>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(b"Subject: %d\r\n\r\nbody\r\n.\r\n" % i)
        m = OK_RE.match(c.reply())
        assert m, "no 250"
        answered.append(int(m.group(2)))
    os.kill(victim, signal.SIGKILL)                # right after its last 250
    c.close()
    assert answered[-1] not in [x[0] for x in queued(root)]   # not indexed yet
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (len(q.children()) != 2 or victim in q.children()):
        time.sleep(0.05)
    assert sorted(x[0] for x in queued(root, len(answered))) == sorted(answered)
    assert q.stop() == 0


def test_sighup_and_mtime_reload_without_dropping_connections(qrelay, root):
    (root / "qrelay.toml").write_text("[smtp]\nreload_poll_seconds = 0.3\n")
    q = qrelay()
    old = RawClient(q.port)
    assert old.line() == f"220 {ME} ESMTP\r\n".encode()
    (root / "control" / "smtpgreeting").write_text("greet.one\n")
    os.kill(q.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    got = b""
    while time.monotonic() < deadline:
        c = RawClient(q.port)
        got = c.line()
        c.close()
        if got == b"220 greet.one ESMTP\r\n":
            break
        time.sleep(0.05)
    assert got == b"220 greet.one ESMTP\r\n"
    # Without a signal: the supervisor notices the changed mtime.
    (root / "control" / "smtpgreeting").write_text("greet.two\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        c = RawClient(q.port)
        got = c.line()
        c.close()
        if got == b"220 greet.two ESMTP\r\n":
            break
        time.sleep(0.1)
    assert got == b"220 greet.two ESMTP\r\n"
    assert old.cmd(b"HELO x") == f"250 {ME}\r\n".encode()  # still connected, old snapshot
    old.close()


def test_sigalrm_is_harmless(qrelay):
    q = qrelay()
    kids = q.children()
    os.kill(q.pid, signal.SIGALRM)
    for k in kids:
        os.kill(k, signal.SIGALRM)
    time.sleep(0.3)
    assert alive(q.pid) and all(alive(k) for k in kids)
    send(q.port, 1)


@pytest.mark.parametrize("whole_group", [False, True], ids=["supervisor", "process-group"])
def test_sigterm_lets_the_message_in_flight_finish(qrelay, root, whole_group):
    # A service manager often sends TERM to every process at once: the spool
    # writer must then still commit what the receivers finish.
    q = qrelay(procs=1)
    first = send(q.port, 1)  # the receiver now talks to the spool writer
    c = RawClient(q.port)
    c.line()
    idle = RawClient(q.port)
    idle.line()
    c.cmd(b"MAIL FROM:<a@example.org>")
    c.cmd(b"RCPT TO:<x@sink.test>")
    c.cmd(b"DATA")
    c.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    if whole_group:
        os.killpg(q.pid, signal.SIGTERM)
    else:
        os.kill(q.pid, signal.SIGTERM)
    assert idle.reply().startswith(b"421 ")
    # No longer accepting, even in the backlog, once the supervisor (which
    # handles TERM at its next tick) has closed its copy of the socket too.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", q.port), timeout=2).close()
        except ConnectionRefusedError:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the port still accepts connections 10 s after TERM")
    c.send(b"second half\r\n.\r\n")
    assert OK_RE.match(c.reply())
    assert q.proc.wait(10) == 0
    assert [m[2] for m in queued(root)] == [("x@sink.test",)] * 2
    assert first[0] in [m[0] for m in queued(root)]
    assert "Traceback" not in q.proc.stderr.read()
    c.close()
    idle.close()


def test_500_idle_connections_do_not_delay_a_new_greeting(qrelay, root):
    (root / "control" / "concurrencyincoming").write_text("1000\n")  # default cap is 500
    q = qrelay(procs=2)
    idle = []
    try:
        for _ in range(500):
            idle.append(socket.create_connection(("127.0.0.1", q.port), timeout=5))
        start = time.monotonic()
        c = RawClient(q.port)
        assert c.line() == f"220 {ME} ESMTP\r\n".encode()
        assert time.monotonic() - start < 1.0
        send(q.port, 1)
        c.close()
    finally:
        for s in idle:
            s.close()


def test_concurrencyincoming_is_shared_by_all_receivers(qrelay, root):
    (root / "control" / "concurrencyincoming").write_text("4\n")
    q = qrelay(procs=2)
    # The start-up probe's connection counts until its receiver saw it close
    # (the counter is released before the end line is logged).
    deadline = time.monotonic() + 10
    log = root / "log" / "smtpd" / "current"
    while "tcpserver: end " not in (log.read_text() if log.exists() else "") \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    held = []
    try:
        for _ in range(4):
            held.append(RawClient(q.port))
            assert held[-1].line().startswith(b"220 ")
        held.append(RawClient(q.port))
        assert held[-1].line() == f"421 {ME} too many connections, try again later\r\n".encode()
    finally:
        for h in held:
            h.close()


def survivors(q: RunningQrelay, pids: list[int], seconds: float) -> str:
    """Wait up to `seconds` for `pids` to exit; "" if they did, else what each
    survivor is (its name in the supervisor's log so far, state, where it waits)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    if not left:
        return ""
    os.set_blocking(q.proc.stderr.fileno(), False)  # the survivors hold the pipe open
    log = q.proc.stderr.read() or ""
    os.set_blocking(q.proc.stderr.fileno(), True)
    q.stderr_text += log
    lines = []
    for p in left:
        names = re.findall(rf"started (\S+) pid {p}\b", log)
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{p}/wchan") as f:
                wchan = f.read()
            with open(f"/proc/{p}/status") as f:
                wchan += " " + " ".join(x.strip() for x in f if x.startswith(("Sig", "Shd")))
        except OSError as exc:
            stat, wchan = "?", str(exc)
        lines.append(f"pid {p} {names} state {stat} waiting in {wchan!r}")
    return "; ".join(lines) + "\n" + log[-3000:]


def test_receivers_follow_a_killed_supervisor(qrelay):
    q = qrelay(procs=2)
    kids = q.children()
    os.kill(q.pid, signal.SIGKILL)
    q.proc.wait(5)
    # PR_SET_PDEATHSIG: no orphan keeps the port. They get TERM and stop in
    # order (shutdown_grace bounds it), so a slow, shared disk may take a while.
    assert survivors(q, kids, 30) == ""


def test_every_service_follows_a_killed_supervisor(root):
    # Scheduler and its delivery workers too (grandchildren): kill -9 of the
    # supervisor alone must leave nothing running on the spool.
    (root / "qrelay.toml").write_text("[scheduler]\nenabled = true\n[delivery]\nworker_procs = 1\n")
    (root / "control" / "smtproutes").write_text(":127.0.0.1:9\n")
    q = RunningQrelay(root, procs=1)
    # writer, receiver, scheduler, worker; as root also the local spawner
    # (engine/privilege.py), which then starts the worker.
    want = 5 if os.geteuid() == 0 else 4
    try:
        deadline = time.monotonic() + 10
        tree = descendants(q.pid)
        while time.monotonic() < deadline and len(tree) < want:
            time.sleep(0.05)
            tree = descendants(q.pid)
        assert len(tree) == want, tree
        os.kill(q.pid, signal.SIGKILL)
        q.proc.wait(5)
        assert survivors(q, tree, 30) == ""
    finally:
        q.stop()


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for kid in children_of(todo.pop()):
            found.append(kid)
            todo.append(kid)
    return found


def test_port_closes_promptly_on_sigterm(qrelay):
    q = qrelay(procs=2)
    os.kill(q.pid, signal.SIGTERM)
    assert q.proc.wait(10) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", q.port), timeout=2).close()


def test_full_run_with_scheduler_stops_without_a_traceback(root):
    # Every service up (writer, receivers, scheduler); the route goes to a closed
    # loopback port, so the message is deferred and no DNS is asked.
    (root / "qrelay.toml").write_text("[scheduler]\nenabled = true\n")
    (root / "control" / "smtproutes").write_text(":127.0.0.1:9\n")
    q = RunningQrelay(root, procs=2)
    try:
        # spool writer, two receivers, scheduler (as root also the local spawner)
        want = 5 if os.geteuid() == 0 else 4
        deadline = time.monotonic() + 10     # the greeting can come before the last start
        while len(q.children()) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(q.children()) == want
        send(q.port, 2)
        time.sleep(0.5)
    finally:
        status = q.stop()
    assert status == 0
    assert "Traceback" not in q.stderr_text, q.stderr_text
    assert len(queued(root)) == 2  # deferred, still queued


def test_smtpd_log_and_process_titles(qrelay, root):
    # Issue #15 item 5: the receivers write log/smtpd/current (tcpserver's lines,
    # the refusals) and show their role in ps.
    (root / "control" / "tcp.smtp").write_text("127.0.0.1:allow\n")   # no RELAYCLIENT
    (root / "control" / "tcp.smtp.cdb").unlink(missing_ok=True)
    q = qrelay(procs=2)
    deadline = time.monotonic() + 10
    while True:     # a receiver that has not greeted yet may not have its title yet
        titles = {process_title(pid) for pid in q.children()}
        if {"qrelay: receiver 0", "qrelay: receiver 1"} <= titles or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {"qrelay: receiver 0", "qrelay: receiver 1"} <= titles, titles
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        assert s.noop()[0] == 250
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("a@example.org")
        assert s.rcpt("u@far.example")[0] == 553
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline:
        try:
            text = (root / "log" / "smtpd" / "current").read_text()
        except FileNotFoundError:
            text = ""
        if text.count("tcpserver: end ") >= 3 and "RCPT <" in text:
            break
        time.sleep(0.05)
    assert re.search(r"^@[0-9a-f]{24} tcpserver: ok \d+ ", text, re.M), text
    assert re.search(r"^@[0-9a-f]{24} smtpd: pid \d+ from 127\.0\.0\.1: RCPT <u@far\.example>: 553 ",
                     text, re.M), text
    assert "tcpserver:" not in (root / "log" / "current").read_text()
    assert q.stop() == 0
