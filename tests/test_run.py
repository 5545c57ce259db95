"""engine/run.py: the service table and `qrelay run`'s one-instance rule, with
real `qrelay run` processes (each stopped by its own pid)."""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from engine.smtp.config import load_smtp_config
from engine.run import AlreadyRunning, services
from tests.conftest import REPO
from tests.smtp_harness import RawClient, RunningQrelay
from tests.test_delivery_e2e import service_texts, wait_for


def test_service_table_lists_every_child_in_start_order(root):
    config = load_smtp_config(root)
    names = [(s.name, s.count, s.stop_phase) for s in services(root, config, [], 3)]
    assert names == [("spool-writer", 1, 1), ("receiver", 3, 0), ("scheduler", 1, 0)]
    (root / "qrelay.toml").write_text("[spool]\nsingle_writer = false\n[scheduler]\nenabled = false\n")
    config = load_smtp_config(root)
    assert [s.name for s in services(root, config, [], 1)] == ["receiver"]


def test_a_second_run_on_the_same_root_refuses_to_start(root):
    first = RunningQrelay(root, procs=1)
    try:
        second = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(root),
                                 "--listen", "127.0.0.1:0"], cwd=REPO, capture_output=True,
                                text=True, timeout=30)
        assert second.returncode != 0
        assert second.stderr.strip().splitlines() == [
            f"Error: cannot start: qrelay is already running on {root}"
            f" (pid {first.pid} holds queue/lock/sendmutex)"]
        # The first one is untouched: it still answers, and its pid file is its own.
        client = RawClient(first.port)
        assert client.reply().startswith(b"220 ")
        assert client.cmd(b"QUIT").startswith(b"221 ")
        client.close()
    finally:
        assert first.stop() == 0
    # ...and once it has stopped, the root can be run again.
    again = RunningQrelay(root, procs=1)
    assert again.stop() == 0


def test_a_start_while_a_killed_runs_services_finish_says_so(root):
    # kill -9 of the supervisor: its services get TERM and finish what they
    # hold (a message in DATA), sharing the lock until they exit. The refusal
    # named the dead supervisor as the one "running", a pid nobody can signal.
    import signal
    (root / "qrelay.toml").write_text("[smtp]\nshutdown_grace = 20.0\n")
    q = RunningQrelay(root, procs=1)
    client = RawClient(q.port)
    try:
        assert client.reply().startswith(b"220 ")
        for line in (b"HELO x", b"MAIL FROM:<a@example.org>", b"RCPT TO:<postmaster@mx.example.com>"):
            assert client.cmd(line).startswith(b"250")
        assert client.cmd(b"DATA").startswith(b"354")
        os.kill(q.proc.pid, signal.SIGKILL)
        q.proc.wait(10)
        second = run_once(root)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"Error: cannot start: the services of a killed qrelay run (pid {q.pid}) still hold"
            f" {root}/queue/lock/sendmutex while they finish; start it again once they have exited"]
    finally:
        client.close()
        q.stop()


def test_supervisor_lines_go_to_the_log(root):
    q = RunningQrelay(root, procs=1)
    try:
        wait_for(lambda: any(re.match(r"info: supervisor: started qrelay-receiver-0 pid \d+$", t)
                             for t in service_texts(root)), what="the supervisor's start lines")
    finally:
        q.stop()
    assert "info: supervisor: stopping" in service_texts(root)


def test_a_spool_writer_that_cannot_open_the_spool_says_why_in_one_line(root):
    # An index damaged while qrelay runs (a damaged one at start stops the
    # start: test_a_damaged_spool_index_stops_the_start_in_one_line): the
    # restarted writer used to die with a traceback on stderr and only
    # "exited with status 1" in the log, at every restart.
    import signal

    from tests.smtp_harness import children_of, process_title
    index = root / "queue" / "index"
    q = RunningQrelay(root, procs=1)
    try:
        [writer] = wait_for(lambda: [p for p in children_of(q.proc.pid)
                                     if process_title(p).endswith("spool writer")] or None,
                            what="the spool writer")
        (index / "data.mdb").unlink(missing_ok=True)
        (index / "data.mdb").write_bytes(b"\0" * 8192)
        owner = index.stat()                    # the run user's, as the writer is
        os.chown(index / "data.mdb", owner.st_uid, owner.st_gid)
        os.kill(writer, signal.SIGKILL)
        wait_for(lambda: any(re.match(r"warning: supervisor: spool-writer-0 \(pid \d+\) exited"
                                      r" with status 111; restarting$", t)
                             for t in service_texts(root)), what="the writer's restart")
    finally:
        q.stop()
    why = (f"alert: spool-writer: cannot start: {root}/queue: cannot open spool index:"
           f" {index}: MDB_INVALID: File is not an LMDB file")
    assert why in service_texts(root)
    assert "Traceback" not in q.stderr_text


# --- one instance per root, found through its lock ----------------------------

def test_two_runs_started_at_once_deliver_every_message_once(root, dns, tmp_path):
    import threading

    from tests.smtp_harness import route_to_loopback
    from tests.test_delivery_e2e import ThreadSink, send

    sink = ThreadSink()
    port = sink.start()
    route_to_loopback(root, {"sink.test": port},
                      f'[delivery]\ndns_servers = ["{dns.address}"]\nidle_timeout = 0.2\n'
                      "[scheduler]\npoll_interval = 0.02\n")
    started: list = []
    refused: list[str] = []

    def start(i: int) -> None:
        try:
            started.append(RunningQrelay(root, procs=1,
                                         extra=("--port-file", str(tmp_path / f"port{i}"))))
        except Exception as exc:   # QrelayStartError expected
            refused.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(started) == 1 and len(refused) == 1, (started, refused)
        q = started[0]
        assert refused[0] == ("QrelayStartError: qrelay run exited with status 1: Error: cannot start: qrelay is"
                              f" already running on {root} (pid {q.pid} holds queue/lock/sendmutex)")
        send(q.port, ["x@sink.test"], n=20, tag="once")
        wait_for(lambda: len(sink.messages()) >= 20, what="20 deliveries")
        time.sleep(1.0)                               # a second scheduler would deliver again
        subjects = sorted(re.search(rb"Subject: (once\d+)", m.content).group(1)
                          for m in sink.messages())
        assert subjects == sorted(b"once%d" % i for i in range(20))
    finally:
        for q in started:
            q.stop()
        sink.close()


def test_flush_finds_the_running_instance_through_its_lock_not_a_pid_file(root, dns):
    from engine.run import running_instance
    from tests.smtp_harness import route_to_loopback

    assert running_instance(root) is None
    route_to_loopback(root, {}, f'[delivery]\ndns_servers = ["{dns.address}"]\n'
                                "[scheduler]\npoll_interval = 0.02\n")
    q = RunningQrelay(root, procs=1)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert running_instance(root) == q.pid
        assert (root / "queue" / "lock" / "sendmutex").read_text() == f"{q.pid}\n"
        wait_for(lambda: (root / "log" / "scheduler.pid").exists(), what="the scheduler's pid file")
        # A pid file someone overwrote is not trusted: the lock holder is signalled.
        (root / "log" / "scheduler.pid").write_text(f"{sleeper.pid}\n")
        r = subprocess.run([sys.executable, "-m", "engine.cli", "flush", str(root)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith(f"; woke the scheduler (qrelay run pid {q.pid})")
        assert sleeper.poll() is None and q.proc.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
        assert q.stop() == 0
    assert running_instance(root) is None             # the lock went with the process


def test_the_scheduler_gets_its_own_stop_grace_on_term(root, dns):
    # The supervisor gave every phase shutdown_grace + 2 s: a [scheduler]
    # stop_grace longer than that had its running deliveries killed, an
    # alert, and exit status 1.
    from tests.smtp_harness import route_to_loopback
    from tests.test_delivery_e2e import ThreadSink, log_lines, send

    sink = ThreadSink()
    port = sink.start()
    sink.current.delay = 30.0                 # the delivery is still running at TERM
    route_to_loopback(root, {"sink.test": port},
                      f'[delivery]\ndns_servers = ["{dns.address}"]\n'
                      "[smtp]\nshutdown_grace = 0.5\n"
                      "[scheduler]\npoll_interval = 0.02\nstop_grace = 3.0\n")
    q = RunningQrelay(root, procs=1)
    try:
        send(q.port, ["x@sink.test"])
        wait_for(lambda: any("starting delivery" in line for line in log_lines(root)),
                 what="the delivery's start")
    finally:
        status = q.stop()
        sink.close()
    assert "did not stop in time" not in q.stderr_text
    assert status == 0


def test_a_lock_held_by_something_else_is_not_a_qrelay_to_signal(root):
    import fcntl

    from engine.run import hold_queue, running_instance
    path = root / "queue" / "lock"
    path.mkdir(parents=True, exist_ok=True)
    # qmail-send holds an empty sendmutex: no pid to signal, and run refuses.
    fd = os.open(path / "sendmutex", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert running_instance(root) is None
        with pytest.raises(AlreadyRunning) as info:
            hold_queue(root)
        assert str(info.value) == (f"cannot start: qrelay or qmail-send is already running on {root}"
                                   " (queue/lock/sendmutex is held)")
    finally:
        os.close(fd)



@pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
def test_a_pid_the_run_user_wrote_into_the_lock_is_not_signalled(root):
    """The run user owns queue/lock/sendmutex (and its processes hold it open):
    a pid written there is trusted only if that process has the lock file
    open, else `qrelay flush` (root) would send ALRM -- whose default action
    kills -- to any process whose command line says `engine`."""
    from engine.run import running_instance
    (root / "qrelay.toml").write_text('[run]\nuser = "nobody"\n')
    q = RunningQrelay(root, procs=1)
    victim = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "engine"],
                              stdin=subprocess.PIPE)
    try:
        assert running_instance(root) == q.pid
        done = subprocess.run(["/bin/sh", "-c", f'echo {victim.pid} > "$1"', "sh",
                               str(root / "queue" / "lock" / "sendmutex")],
                              user="nobody", capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert running_instance(root) is None
    finally:
        victim.stdin.close()
        victim.wait(timeout=30)
        assert q.stop() == 0


def test_a_flush_or_a_reload_while_it_starts_does_not_kill_it(root, tmp_path):
    # `qrelay flush` signals the lock's holder as soon as hold_queue wrote its
    # pid, svc -h or systemctl reload as soon as it runs: ALRM's and HUP's
    # default action used to end the supervisor until its handlers were in.
    import signal
    script = ("import os, signal, sys\n"
              "import engine.run as run\n"
              "check = run.check_spool_index\n"
              "def signalled(*args):\n"
              "    os.kill(os.getpid(), signal.SIGALRM)\n"
              "    os.kill(os.getpid(), signal.SIGHUP)\n"
              "    check(*args)\n"
              "run.check_spool_index = signalled\n"
              "from engine.cli import main\n"
              "main()\n")
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-c", script, "run", str(root), "--listen",
                             "127.0.0.1:0", "--procs", "1", "--port-file", str(port_file)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_file.exists() or proc.poll() is not None, 30, "the start")
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(30)
        proc.stderr.close()
    assert status == 0


@pytest.mark.parametrize("stdout", ["closed", "nobody reads it"])
def test_a_stdout_it_cannot_write_does_not_stop_the_start(root, tmp_path, stdout):
    # The `listening on` line is for a person: `qrelay run ... >&-` died in a
    # traceback, `qrelay run ... | head -1` exited 1 without a word.
    import signal
    port_file = tmp_path / "port"
    argv = [sys.executable, "-m", "engine.cli", "run", str(root), "--listen", "127.0.0.1:0",
            "--procs", "1", "--port-file", str(port_file)]
    if stdout == "closed":
        proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.close(1))
    else:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        proc.stdout.close()
    try:
        wait_for(lambda: port_file.exists() or proc.poll() is not None, 30, "the start")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(30)
        err = proc.stderr.read()
        proc.stderr.close()
    assert status == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


# --- fail loudly, before binding anything -------------------------------------

def run_once(root, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "run", str(root),
                           "--listen", "127.0.0.1:0", *extra], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("setup, message", [
    (lambda r: (r / "control" / "smtproutes").write_text("sink.test 127.0.0.1\n"),
     "Error: scheduler cannot start: {root}/control/smtproutes line 1: no ':' in"
     " 'sink.test 127.0.0.1' (a route is host:relay or host:relay:port)"),
    (lambda r: (r / "control" / "smtproutes").write_text("sink.test:127.0.0.1:26x26\n"),
     "Error: scheduler cannot start: {root}/control/smtproutes line 1: bad port '26x26' in"
     " 'sink.test:127.0.0.1:26x26' (a number from 1 to 65535)"),
    (lambda r: (r / "qrelay.toml").write_text('[delivery]\ndns_servers = ["ns1.example"]\n'),
     "Error: scheduler cannot start: {root}/qrelay.toml: [delivery] dns_servers: 'ns1.example'"
     " is not an IP address with an optional :port"),
    (lambda r: (r / "control" / "clientcert.pem").write_text("not a certificate\n"),
     "Error: scheduler cannot start: {root}/control/clientcert.pem: cannot load the certificate"
     " and key: PEM lib"),
    (lambda r: (r / "control" / "queuelifetime").write_text("7d\n"),
     "Error: scheduler cannot start: {root}/control/queuelifetime line 1: '7d' is not a number"),
    (lambda r: (r / "control" / "databytes").write_text("10MB\n"),
     "Error: {root}/control/databytes line 1: '10MB' is not a number"),
    (lambda r: (r / "qrelay.toml").write_text("[smtp]\nmax_line_length = 0\n"),
     "Error: {root}/qrelay.toml: [smtp] max_line_length = 0 is out of range: at least 512"
     " (RFC 5321 4.5.3.1.4)"),
    (lambda r: (r / "qrelay.toml").write_text("[scheduler]\nenabeld = true\n"),
     "Error: {root}/qrelay.toml: [scheduler] unknown setting 'enabeld'"),
    (lambda r: [(r / "queue" / d).mkdir() for d in ("mess", "todo", "info")],
     "Error: cannot start: {root}/queue holds a qmail queue (mess/, todo/, info/): with"
     " qmail-send stopped, move it into the spool with `qrelay import-qmail {root}"
     " {root}/queue`"),
])
def test_run_refuses_a_configuration_a_service_cannot_start_with(root, setup, message):
    setup(root)
    r = run_once(root)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [message.format(root=root)]
    # Nothing started: no lock taken, no log written, no qrelay spool inside a qmail queue.
    assert not (root / "queue" / "lock" / "sendmutex").exists()
    assert not (root / "log" / "current").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
@pytest.mark.parametrize("name", ["log", "relay"])
def test_a_run_user_directory_that_is_not_one_stops_the_start_in_one_line(root, name):
    # Given to the run user after the lock is taken: a file where the
    # directory should be used to end the start in a traceback.
    import shutil
    shutil.rmtree(root / name, ignore_errors=True)
    (root / name).write_text("")
    r = run_once(root)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"Error: cannot start: {root / name}: Not a directory"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
def test_a_log_link_the_run_user_owns_stops_the_start_in_one_line(root, tmp_path):
    import shutil
    shutil.rmtree(root / "log", ignore_errors=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "log").symlink_to(tmp_path / "elsewhere")
    os.lchown(root / "log", 65534, 65534)
    r = run_once(root)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: cannot start: {root / 'log'} is a link owned by uid 65534, not root: make it "
        f"a directory, or a link of root's (ln -sfn DIR {root / 'log'})"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
def test_a_users_assign_the_run_user_cannot_read_is_a_warning_at_start(root):
    # The receivers read it as [run] user for every RCPT check, AUTH and POP3
    # login: unreadable, each of those got a 451 and the start said nothing.
    from engine.accounts.admin import add_domain
    add_domain(root, "example.com")
    (root / "users").chmod(0o700)
    q = RunningQrelay(root, procs=1)
    assert q.stop() == 0
    from engine.privilege import run_user
    user = run_user("qrelay")
    warning = (f"receivers run as qrelay (uid {user.uid}) and cannot read the mailbox list"
               f" (trouble reading {root}/users/cdb: Permission denied): RCPT checks, AUTH and"
               " POP3 for its domains fail with temporary errors; make users/ and its files"
               " readable by qrelay")
    assert f"qrelay.run: {warning}" in q.stderr_text.splitlines()
    assert f"warning: run: {warning}" in service_texts(root)


def test_a_procs_no_box_runs_is_a_usage_error(root):
    # It sized the receivers' shared connection table first: a traceback
    # (ftruncate: File too large), or thousands of receivers forked.
    r = run_once(root, "--procs", "99999999999999")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: Invalid value for '--procs': 99999999999999 is not in the range 1<=x<=1024"
        " (see: qrelay run --help)"]
    assert not (root / "log" / "current").exists()


def test_a_port_file_it_cannot_write_is_one_line(root, tmp_path):
    port_file = tmp_path / "missing" / "port"
    r = run_once(root, "--port-file", str(port_file))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1:] == [
        f"Error: cannot write --port-file {port_file}: No such file or directory"]
    assert "Traceback" not in r.stderr


def test_a_tcp_smtp_newer_than_its_cdb_is_a_warning_at_start(root):
    from engine.config.tcprules import compile_rules
    control = root / "control"
    compile_rules((control / "tcp.smtp").read_text(), control / "tcp.smtp.cdb")
    st = (control / "tcp.smtp.cdb").stat()
    (control / "tcp.smtp").write_text(":deny\n")
    os.utime(control / "tcp.smtp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    q = RunningQrelay(root, procs=1)
    assert q.stop() == 0
    warning = (f"{control / 'tcp.smtp'} is newer than tcp.smtp.cdb, which is what is read:"
               " run `qrelay tcprules` to apply the edit")
    assert f"qrelay.run: {warning}" in q.stderr_text.splitlines()
    assert f"warning: run: {warning}" in service_texts(root)


def _listening_sockets(port: int) -> int:
    """LISTEN entries on 127.0.0.1:port in /proc/net/tcp."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f.readlines()[1:] if line.split()[1] == want and line.split()[3] == "0A")


def _greeters(port: int, want: set[int], tries: int = 64) -> set[int]:
    """The pids in the POP3 greetings (<PID.N.TIME@HOST>) of up to `tries`
    connections, stopping once every pid in `want` answered."""
    greeted: set[int] = set()
    for _ in range(tries):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            greeting = c.recv(512)
        greeted.add(int(re.search(rb"<(\d+)\.", greeting).group(1)))
        if want <= greeted:
            break
    return greeted


@pytest.mark.parametrize("reuse_port", [False, True])
def test_reuse_port_gives_every_receiver_a_socket_of_its_own(tmp_path, reuse_port):
    from qrelay_process import service_pids
    from tests.test_pop3 import make_root as pop3_root
    root = pop3_root(tmp_path, toml=f"[smtp]\nreuse_port = {str(reuse_port).lower()}\n")
    q = RunningQrelay(root, procs=2, extra=("--listen", "pop3://127.0.0.1:0"))
    try:
        port = int(q.port_file.read_text().split()[1])
        assert wait_for(lambda: len(service_pids(q.pid, b"receiver")) == 2, 20)
        receivers = set(service_pids(q.pid, b"receiver"))
        assert _listening_sockets(port) == (2 if reuse_port else 1)
        greeted = _greeters(port, receivers if reuse_port else set())
        assert greeted <= receivers
        if reuse_port:      # 64 source ports hashed: both sockets get some
            assert greeted == receivers
    finally:
        q.stop()


def test_a_restarted_receiver_serves_the_socket_of_the_one_it_replaces(tmp_path):
    import signal
    from qrelay_process import service_pids
    from tests.test_pop3 import make_root as pop3_root
    root = pop3_root(tmp_path, toml="[smtp]\nreuse_port = true\n")
    q = RunningQrelay(root, procs=2, extra=("--listen", "pop3://127.0.0.1:0"))
    try:
        port = int(q.port_file.read_text().split()[1])
        assert wait_for(lambda: len(service_pids(q.pid, b"receiver")) == 2, 20)
        victim, survivor = service_pids(q.pid, b"receiver")
        os.kill(victim, signal.SIGKILL)
        restarted = wait_for(lambda: set(service_pids(q.pid, b"receiver")) - {victim, survivor}, 30,
                             "the receiver's restart")
        # Connections hashed to the dead one's socket waited for the new one:
        # every connection is answered, by the survivor or the new receiver.
        assert _greeters(port, restarted | {survivor}) == restarted | {survivor}
        assert _listening_sockets(port) == 2
    finally:
        q.stop()


def test_an_open_files_limit_below_the_connection_caps_is_a_warning(monkeypatch):
    from types import SimpleNamespace

    from engine import openfiles, run
    monkeypatch.setattr(openfiles, "raise_soft_limit", lambda: 700)     # room for 600
    said = []
    monkeypatch.setattr(logging.getLogger("qrelay.run"), "warning", said.append)
    config = SimpleNamespace(concurrencyincoming=500,
                             settings=SimpleNamespace(pop3=SimpleNamespace(max_connections=500)))
    run.open_files_warning(config, {"smtp", "submission"})
    assert said == []
    run.open_files_warning(config, {"smtp", "pop3s"})          # POP3's cap counts too
    assert said == [openfiles.shortfall(700, 1000)]


def test_an_inherited_umask_of_000_makes_nothing_world_writable(root):
    from tests.smtp_harness import RunningQrelay
    old = os.umask(0)
    try:
        q = RunningQrelay(root, procs=1)
    finally:
        os.umask(old)
    try:
        for d in (root / "queue" / "lock", root / "run" / "metrics"):
            assert d.stat().st_mode & 0o022 == 0, (d, oct(d.stat().st_mode))
    finally:
        assert q.stop() == 0


def test_a_damaged_spool_index_stops_the_start_in_one_line(root):
    """A data.mdb cut short (a restore stopped half way) or not an LMDB file:
    `qrelay run` says so and exits, instead of starting a spool writer that
    restarts with an alert while every client gets 451."""
    import subprocess
    import sys

    from engine.queue import Envelope, Spool
    with Spool(root / "queue") as s:
        for n in range(50):
            s.enqueue(Envelope("a@b", ("c@d",)), b"x" * 3000 + b"%d" % n)
    data = root / "queue" / "index" / "data.mdb"
    os.truncate(data, 8192)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(root), "--listen",
                        "127.0.0.1:0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: cannot start: {root}/queue: cannot open spool index: "
                               f"{data} is truncated (8192 bytes; its pages need "), r.stderr
    data.write_bytes(b"not an LMDB file" * 1000)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(root), "--listen",
                        "127.0.0.1:0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"Error: cannot start: {root}/queue: cannot open spool index: ")


def test_a_change_to_a_section_read_at_start_is_said_on_reload(root):
    """[relay], [login] and [run] are read when qrelay run starts: an edit is
    reloaded for everything else, and one log line says this part waits for a
    restart (once), instead of the operator believing it applied."""
    (root / "qrelay.toml").write_text("[smtp]\nreload_poll_seconds = 0.1\n")
    q = RunningQrelay(root, procs=1)
    try:
        toml = root / "qrelay.toml"
        toml.write_text(toml.read_text() + "[relay]\npop_before_smtp_ttl = 600\n")
        line = ("warning: run: qrelay.toml: [relay] changed; read when qrelay run starts: "
                "restart it to apply")
        wait_for(lambda: line in service_texts(root) or None, what="the start-only warning")
        os.utime(toml)                      # another reload, the same change: said once
        wait_for(lambda: service_texts(root).count("info: supervisor: control files changed: "
                                                   "reloading") >= 2 or None,
                 what="the second reload")
        assert service_texts(root).count(line) == 1
    finally:
        q.stop()


def test_a_reload_never_takes_a_size_limit_the_spool_writers_frame_cannot_carry(root):
    """The spool writer reads [spool] when it starts: a reload that raised
    [smtp] max_message_bytes with max_frame_bytes had the receivers offer
    SIZE 5000000 and answer 552 to a message of 2.5 MB. The receivers keep
    the [spool] their writer has, so that reload is refused in one line."""
    toml = root / "qrelay.toml"
    toml.write_text("[smtp]\nreload_poll_seconds = 0.1\nmax_message_bytes = 1000000\n"
                    "[spool]\nmax_frame_bytes = 7000000\n")
    q = RunningQrelay(root, procs=1)
    try:
        toml.write_text("[smtp]\nreload_poll_seconds = 0.1\nmax_message_bytes = 5000000\n"
                        "[spool]\nmax_frame_bytes = 12000000\n")
        smtpd = root / "log" / "smtpd" / "current"
        line = wait_for(lambda: smtpd.exists() and [
                            t for t in smtpd.read_text().splitlines()
                            if "receiver: reload" in t or "receiver: configuration" in t],
                        what="the receiver's reload")[0]
        assert line[26:] == (
            "warning: receiver: reload failed, keeping the previous configuration: qrelay.toml:"
            " [smtp] max_message_bytes 5000000 does not fit in a spool frame: [spool]"
            " max_frame_bytes = 7000000 in qrelay.toml must be at least 10160576 (the message,"
            " max_recipients recipients and the envelope; [spool] is read when qrelay run starts)")
        client = RawClient(q.port)
        client.reply()
        assert client.cmd(b"EHLO x").endswith(b"250 SIZE 1000000\r\n")
        client.close()
    finally:
        q.stop()


def test_every_setting_read_only_at_start_is_said_on_reload(root, caplog):
    """Not only [run], [relay] and [login] wait for a restart: [spool], [log]
    and [status] are read when their services start, and so are a few keys of
    the reloaded sections (the supervisor's poll period, the local deliveries'
    program timeout, the hashing threads...). A reload changing them said
    nothing, and the operator believed them applied."""
    from engine.config.settings import load_settings
    from engine.run import start_only_warning
    started = load_settings(root)
    (root / "qrelay.toml").write_text(
        "[smtp]\nreload_poll_seconds = 1.0\nmax_recipients = 50\n"
        "[delivery]\nprogram_timeout = 60.0\nworker_procs = 2\n[log]\nformat = \"json\"\n")
    warned: list[tuple] = [()]
    with caplog.at_level(logging.WARNING, logger="qrelay.run"):
        start_only_warning(root, started, warned)
    assert [r.getMessage() for r in caplog.records] == [
        "qrelay.toml: [log], [smtp] reload_poll_seconds, [delivery] program_timeout changed;"
        " read when qrelay run starts: restart it to apply"]
    (root / "qrelay.toml").write_text("[smtp]\nmax_recipients = 50\n")   # reloaded: no word
    caplog.clear()
    start_only_warning(root, started, warned)
    assert caplog.records == []
