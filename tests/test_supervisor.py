"""engine.supervisor: restarts, backoff, signal forwarding, bounded stop — run in a real
subprocess (the supervisor installs signal handlers and blocks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path
    from engine.supervisor import ChildSpec, Supervisor
    work = Path(sys.argv[1])
    mode = sys.argv[2]

    def note(name, text):
        with open(work / name, "a") as f:
            f.write(text + "\\n")

    def worker(slot):
        note(f"start-{slot}", str(os.getpid()))
        signal.signal(signal.SIGHUP, lambda *a: note(f"hup-{slot}", str(os.getpid())))
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if mode == "crash":
            raise SystemExit(3)
        while True:
            time.sleep(0.05)

    if mode == "forkfail":
        # The next two forks after `failfork` appears fail as under a full
        # process table or cgroup (pids.max): EAGAIN.
        real_fork = os.fork
        def fork():
            if (work / "failfork").exists() and len(lines_of("forkfailed")) < 2:
                note("forkfailed", "x")
                raise BlockingIOError(11, "Resource temporarily unavailable")
            return real_fork()
        os.fork = fork

    def lines_of(name):
        return (work / name).read_text().split() if (work / name).exists() else []

    checks = []
    def reload_check():
        checks.append(1)
        return (work / "changed").exists() and len(checks) == 3

    spec = ChildSpec("worker", worker, count=2, on_exit=lambda slot: note("exited", str(slot)))
    sup = Supervisor([spec], stop_grace=1.0, reload_check=reload_check, reload_poll=0.1)
    print("ready", flush=True)
    sys.exit(sup.run())
''')


@pytest.fixture
def supervise(tmp_path: Path):
    procs: list[subprocess.Popen] = []
    script = tmp_path / "sup.py"
    script.write_text(SCRIPT)

    def start(mode: str = "normal") -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
        procs.append(p)
        assert p.stdout.readline() == "ready\n"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)
        p.stdout.close()
        p.stderr.close()


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_killed_child_is_restarted_in_its_slot(supervise, tmp_path):
    p = supervise()
    assert wait_for(lambda: lines(tmp_path / "start-0") and lines(tmp_path / "start-1"))
    first = int(lines(tmp_path / "start-1")[0])
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: len(lines(tmp_path / "start-1")) == 2)
    assert lines(tmp_path / "exited") == ["1"]
    assert len(lines(tmp_path / "start-0")) == 1
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0
    # The shell's words for a signal, not multiprocessing's "status -9".
    assert f"worker-1 (pid {first}) killed by signal 9; restarting" in p.stderr.read().splitlines()


def test_sighup_and_reload_check_are_forwarded(supervise, tmp_path):
    p = supervise()
    assert wait_for(lambda: lines(tmp_path / "start-0") and lines(tmp_path / "start-1"))
    p.send_signal(signal.SIGHUP)
    assert wait_for(lambda: lines(tmp_path / "hup-0") and lines(tmp_path / "hup-1"))
    (tmp_path / "changed").touch()
    assert wait_for(lambda: len(lines(tmp_path / "hup-0")) == 2 and len(lines(tmp_path / "hup-1")) == 2)
    p.send_signal(signal.SIGALRM)  # forwarded; the children ignore it; nobody dies
    time.sleep(0.3)
    assert p.poll() is None and len(lines(tmp_path / "start-0")) == 1
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0


def test_crashing_child_backs_off(supervise, tmp_path):
    p = supervise("crash")
    started = time.monotonic()                  # "ready": before the first start
    assert wait_for(lambda: len(lines(tmp_path / "start-0")) >= 3, timeout=30)
    # 0.1 + 0.2 s of backoff before the third start, not a busy loop.
    assert time.monotonic() - started >= 0.3
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0
    assert any(line.endswith(") exited with status 3; restarting") for line in p.stderr.read().splitlines())


def test_a_failed_fork_is_retried_with_backoff_not_the_end_of_the_supervisor(supervise, tmp_path):
    p = supervise("forkfail")
    assert wait_for(lambda: lines(tmp_path / "start-0") and lines(tmp_path / "start-1"))
    (tmp_path / "failfork").touch()
    first = int(lines(tmp_path / "start-1")[0])
    os.kill(first, signal.SIGKILL)
    # Restarted once the forks work again (0.1 + 0.2 + 0.4 s of backoff).
    assert wait_for(lambda: len(lines(tmp_path / "start-1")) == 2)
    assert len(lines(tmp_path / "forkfailed")) == 2 and p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0
    err = p.stderr.read().splitlines()
    assert err.count("cannot start worker-1: [Errno 11] Resource temporarily unavailable;"
                     " trying again") == 2, err
    assert not any("Traceback" in line for line in err)


def test_exit_reason_words():
    from engine.supervisor import exit_reason
    assert exit_reason(111) == "exited with status 111"
    assert exit_reason(0) == "exited with status 0"
    assert exit_reason(-9) == "killed by signal 9"
    assert exit_reason(-15) == "killed by signal 15"


def test_stubborn_child_is_killed_after_stop_grace(supervise, tmp_path):
    p = supervise("stubborn")
    assert wait_for(lambda: lines(tmp_path / "start-0") and lines(tmp_path / "start-1"))
    pids = [int(lines(tmp_path / f"start-{i}")[0]) for i in (0, 1)]
    start = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 1
    assert 0.9 <= time.monotonic() - start < 4
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_follow_parent_says_whether_the_parent_is_still_the_one_it_forked_from():
    # In a child process: prctl would otherwise tie pytest itself to its parent.
    code = ("import os; from engine.supervisor import follow_parent; "
            "print(follow_parent(os.getppid()), follow_parent(os.getppid() + 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=30, check=True).stdout
    assert out.split() == ["True", "False"]
