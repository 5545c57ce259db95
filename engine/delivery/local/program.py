"""Program delivery: qmail-local's mailprogram() (spec §3.5, qmail-command(8)).

`/bin/sh -c <command>` in the home directory, the message (without the
Return-Path/Delivered-To lines) on a seekable stdin, stdout and stderr into
one pipe whose first `output_max` bytes are kept for the report (the rest is
read and dropped, so a chatty program cannot block or eat memory). A program
still running after `timeout` seconds is killed with its whole process group
and the delivery deferred — qmail has no limit here; a hung filter would
otherwise hold a delivery slot for ever.

Exit codes as qmail-local: 0 ok, 99 ok and skip the remaining lines, 100 and
64 65 70 76 77 78 112 permanent, anything else (and a signal) temporary.
"""
from __future__ import annotations

import fcntl
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

from engine.delivery.local.dotqmail import error_str

PERMANENT_EXITS = frozenset({100, 64, 65, 70, 76, 77, 78, 112})
# The programs this process runs now (process state by nature, like its
# children): a delivery worker that stops with deliveries in flight kills
# them (abandon), else each would run on, orphaned, past program_timeout.
_running: set[subprocess.Popen] = set()
TEXT_CRASHED = "Aack, child crashed. (#4.3.0)\n"
TEXT_TIMEOUT = "Program timed out. (#4.3.0)\n"       # ours: qmail has no limit
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(slots=True, frozen=True)
class ProgramRun:
    status: str        # "ok" | "stop" (99) | "permanent" | "temporary"
    output: str        # what the program wrote (bounded), then our text if any
    exit_code: int | None


def classify(code: int) -> str:
    if code == 0:
        return "ok"
    if code == 99:
        return "stop"
    if code in PERMANENT_EXITS:
        return "permanent"
    return "temporary"


def message_fd(message: bytes) -> int:
    """A seekable descriptor holding `message` (memfd where available),
    sealed against writes: a program reopening its stdin (/dev/stdin) for
    writing must not change what the next line gets, as qmail's programs
    cannot write the queue file they read."""
    sealed = True
    try:
        fd = os.memfd_create("qrelay-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError):
        import tempfile
        fd, path = tempfile.mkstemp(prefix="qrelay-msg.")
        os.unlink(path)
        sealed = False
    view = memoryview(message)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def run(command: str, *, cwd: str, env: dict[str, str], stdin_fd: int,
        timeout: float, output_max: int = 4096) -> ProgramRun:
    """Run one program line. Never raises for the program's own failures."""
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command], stdin=stdin_fd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=cwd, env=env, close_fds=True,
            start_new_session=True, restore_signals=True, umask=0o077)  # qmail-local's umask
    except OSError as exc:
        if exc.filename == cwd:
            return ProgramRun("temporary",
                              f"Unable to switch to {cwd}: {error_str(exc.errno)}. (#4.3.0)\n",
                              None)
        return ProgramRun("temporary",
                          f"Unable to run /bin/sh: {error_str(exc.errno)}. (#4.3.0)\n", None)
    _running.add(proc)
    try:
        return _wait(proc, timeout, output_max)
    finally:
        _running.discard(proc)


def abandon() -> None:
    """Kill every program this process runs now, each with its process group,
    as at a timeout: their deliveries were given up (the worker stops) and
    are tried again, so none may run on without a limit or twice at once."""
    for proc in list(_running):
        if proc.returncode is None:
            _kill_group(proc)


def _wait(proc: subprocess.Popen, timeout: float, output_max: int) -> ProgramRun:
    kept = bytearray()
    timed_out = False
    deadline = time.monotonic() + timeout
    pipe = proc.stdout
    assert pipe is not None
    fd = pipe.fileno()
    # The shell's exit ends the run, not the pipe's end: a daemon it started
    # may hold the pipe open for ever (qmail-lspawn would hang on it). Once
    # the shell is gone, what is already in the pipe is read, then no more.
    try:
        exit_fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        exit_fd = None      # no pidfd: look at the shell twice a second
    exited = False
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            if exit_fd is not None:
                sel.register(exit_fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                wait = 0 if exited else left if exit_fd is not None else min(left, 0.5)
                ready = {key.fd for key, _ in sel.select(wait)}
                if fd not in ready:
                    if exited:
                        break
                    exited = exit_fd in ready if exit_fd is not None else proc.poll() is not None
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if len(kept) < output_max:
                    kept += chunk[:output_max - len(kept)]
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
    if timed_out:
        _kill_group(proc)
    pipe.close()
    try:
        code = proc.wait(timeout=max(0.0, deadline - time.monotonic()) if not timed_out else None)
    except subprocess.TimeoutExpired:
        # stdout closed (e.g. a daemonised child) but the shell runs on.
        timed_out = True
        _kill_group(proc)
        code = proc.wait()
    out = bytes(kept).split(b"\0", 1)[0].decode("utf-8", "replace")
    if timed_out:
        return ProgramRun("temporary", out + TEXT_TIMEOUT, None)
    if code < 0:
        return ProgramRun("temporary", out + TEXT_CRASHED, None)
    return ProgramRun(classify(code), out, code)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
