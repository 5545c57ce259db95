"""`qrelay run` as a child process of a benchmark or a test: the one way both
start it, learn its port and stop it.

    q = QrelayProcess(root, procs=2, log=work / "qrelay.log")
    ...  # SMTP to 127.0.0.1:q.port
    q.stop()

Owns: the command line (`--listen 127.0.0.1:0 --port-file F`, in a process
group of its own), readiness (the port file names the port, then a receiver
greets on it: events awaited with a bound, never a sleep), and the stop by its
own pid (TERM, wait, KILL, then whatever of its group is left).
Must never import `engine`: it runs the real command, as an operator would.
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtpload.process import stop_group, wait_greeting, wait_port_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# As root, `qrelay run` serves as its `[run] user`; a bench whose root holds
# vpopmail domains runs it as their owner (it reads vpasswd), as an operator
# sets `[run] user = "vpopmail"`: here nobody, as root; the caller otherwise.
ACCOUNTS_RUN_TOML = '[run]\nuser = "nobody"\n' if os.getuid() == 0 else ""
ACCOUNTS_OWNER = os.getuid() or 65534


@contextlib.contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory for roots `qrelay run` serves: searchable by
    others (mkdtemp makes it 0700), else its run user cannot reach ROOT."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        work.chmod(0o711)
        yield work


class QrelayStartError(RuntimeError):
    """`qrelay run` exited, or did not serve in time; the message says which (one line)."""


class QrelayProcess:
    """`qrelay run ROOT --listen 127.0.0.1:0`, ready to take mail on `.port`.

    `extra` is appended to the command line; a `--port-file F` in it is used
    instead of the default `ROOT.port` beside the root. `log`: a file for the
    process's stdout and stderr; without one, stdout is discarded and stderr is
    a pipe (text) the caller may read once the process has ended."""

    def __init__(self, root: Path, procs: int = 1, extra: tuple[str, ...] = (), *,
                 env: dict[str, str] | None = None, log: Path | None = None,
                 timeout: float = 20.0) -> None:
        self.root = Path(root)
        extra = tuple(extra)
        if "--port-file" in extra:
            self.port_file = Path(extra[extra.index("--port-file") + 1])
        else:
            self.port_file = self.root.parent / (self.root.name + ".port")
            extra += ("--port-file", str(self.port_file))
        self.port_file.unlink(missing_ok=True)  # a restart on the same root must not read the old port
        self.log = log
        out = open(log, "ab") if log is not None else None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "run", str(self.root),
                 "--listen", "127.0.0.1:0", "--procs", str(procs), *extra],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                stdout=out if out else subprocess.DEVNULL,
                stderr=subprocess.STDOUT if out else subprocess.PIPE,
                text=out is None, start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout
        port = wait_port_file(self.proc, self.port_file, deadline)
        if port is None:
            self._fail("did not write its port file")
        self.port: int = port
        if wait_greeting("127.0.0.1", port, deadline, self.proc) is None:
            self._fail(f"never greeted on port {port}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> int | None:
        """TERM by pid, wait `timeout`, KILL; then the rest of its process group.
        Returns the exit status."""
        stop_group(self.proc, timeout)
        return self.proc.returncode

    def _fail(self, what: str) -> None:
        exited = self.proc.poll()
        stop_group(self.proc, 5)
        if self.log is not None:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        else:
            lines = self.proc.stderr.read().strip().splitlines()
            self.proc.stderr.close()
        why = f"exited with status {exited}" if exited is not None else what
        raise QrelayStartError(f"qrelay run {why}" + (f": {lines[-1]}" if lines else ""))


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc (one pass)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parent


def title_of(pid: int) -> bytes | None:
    """The process title (argv[0] as the process set it), None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0]
    except OSError:
        return None


def service_pids(supervisor: int, title: bytes) -> list[int]:
    """The supervisor's children whose process title contains `title`
    (b"receiver", b"qrelay: status"), from /proc."""
    return [pid for pid, ppid in _parents().items()
            if ppid == supervisor and title in (title_of(pid) or b"")]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc (one pass)."""
    parent = _parents()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return found


def cpu_by_title(pids: list[int]) -> dict[str, float]:
    """On-CPU seconds of each process in `pids`, summed by process title
    (digits dropped: `qrelay: receiver 0` and `1` count together)."""
    out: dict[str, float] = {}
    for pid in pids:
        raw = title_of(pid)
        if raw is None:
            continue
        title = re.sub(r"[ \d]+$", "", raw.decode("utf-8", "replace").split(" /")[0])[:40] or "?"
        out[title] = out.get(title, 0.0) + cpu_seconds([pid])
    return out


def thread_seconds(pid: int) -> dict[int, float]:
    """tid -> on-CPU seconds of each thread of `pid` (schedstat); {} once it is gone."""
    out = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
    except OSError:
        pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    """On-CPU time of every thread of `pids`; a process that is gone counts nothing."""
    return sum(sum(thread_seconds(pid).values()) for pid in pids)


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (flood.py, load clients)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
