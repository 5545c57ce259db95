"""Stopping a child process the bench tools started: by its own pid, TERM first."""
from __future__ import annotations

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
