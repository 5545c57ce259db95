"""engine/run.py: the service table and `qrelay run`'s one-instance rule, with
real `qrelay run` processes (each stopped by its own pid)."""
from __future__ import annotations

import re
import subprocess
import sys

from engine.smtp.config import load_smtp_config
from engine.run import services
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
            f"Error: cannot start: qrelay or qmail-send is already running on {root}"
            " (queue/lock/sendmutex is held)"]
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


def test_supervisor_lines_go_to_the_log(root):
    q = RunningQrelay(root, procs=1)
    try:
        wait_for(lambda: any(re.match(r"info: supervisor: started qrelay-receiver-0 pid \d+$", t)
                             for t in service_texts(root)), what="the supervisor's start lines")
    finally:
        q.stop()
    assert "info: supervisor: stopping" in service_texts(root)
