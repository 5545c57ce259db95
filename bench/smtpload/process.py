"""Child processes of the bench tools and tests: waiting until one serves, and
stopping it by its own pid, TERM first.

Readiness is an event the child produces (its port file names a port, its
SMTP greeting arrives), awaited with a bound; never a fixed sleep.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

# How often a port file that is not there yet is looked at again.
PORT_FILE_POLL = 0.02


def wait_port_file(proc: subprocess.Popen, path: Path, deadline: float) -> int | None:
    """The first port named in `path` (written atomically by the child once it
    listens); None if `proc` exits or the monotonic `deadline` passes first."""
    while True:
        try:
            text = path.read_text().split()
        except OSError:
            text = []
        if text:
            return int(text[0])
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(PORT_FILE_POLL)


def wait_greeting(host: str, port: int, deadline: float,
                  proc: subprocess.Popen | None = None) -> bytes | None:
    """Connect and read the server's first reply line; its bytes, or None if
    none arrived by the monotonic `deadline` (or `proc` exited). A server that
    listens before it says so (qrelay's port file) holds the connection in the
    backlog until a process accepts it: the 220 is the moment one serves."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (proc is not None and proc.poll() is not None):
            return None
        try:
            with socket.create_connection((host, port), timeout=left) as s:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    line += chunk
                if line:
                    return line
        except OSError:
            pass
        # Refused or closed before a greeting: the server is still starting.
        time.sleep(PORT_FILE_POLL)


def free_port() -> int:
    """A loopback port nothing listens on at this moment: for a child that
    cannot take port 0, or as a destination that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
