"""Stopping a child process the bench tools started: by its own pid, TERM first."""
from __future__ import annotations

import os
import signal
import subprocess


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM `proc`, wait up to `timeout` seconds, then SIGKILL and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """`terminate` a process started with start_new_session=True, then SIGKILL
    whatever of its process group outlived it (e.g. qrelay run's children)."""
    terminate(proc, timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
