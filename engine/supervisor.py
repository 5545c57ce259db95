"""The process tree of `qrelay run`: start named children, restart them, stop them.

The supervisor is the foreground process. It never daemonises and every process
it starts is its child (forked, so listening sockets and shared memory are
inherited), so a service manager — or kill -9 of the process group — sees all of
them. It owns only process lifetimes and signals:

- a child that exits or is killed is restarted, with engine.backoff's schedule
  (0.1 s doubling to 10 s while it keeps dying quickly, reset once it has run a while);
- TERM/INT: run `on_stop`, forward TERM to the children phase by phase
  (`ChildSpec.stop_phase`), each phase waiting up to `stop_grace` seconds before KILL;
- HUP: forwarded to the children whose spec asks for it (the receivers reload);
- ALRM: forwarded likewise (qmail's "flush now"; the delivery side will use it);
- `reload_check`, polled every `reload_poll` seconds, may ask for a HUP round
  (control files changed).

It must never do a child's work itself, so a bug in a service can kill only that
service's process. Which children there are is engine.run's service table.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.backoff import Backoff

log = logging.getLogger("qrelay.supervisor")

@dataclass(slots=True, frozen=True)
class ChildSpec:
    """`count` processes running `target(slot)`; slot is 0..count-1 and stays the
    same across restarts. `on_exit(slot)` runs in the supervisor after a child of
    this spec died, before it is restarted (e.g. to clear shared counters)."""
    name: str
    target: Callable[[int], None]
    count: int = 1
    forward_signals: frozenset[int] = field(
        default_factory=lambda: frozenset({signal.SIGHUP, signal.SIGALRM}))
    on_exit: Callable[[int], None] | None = None
    # Children are stopped in ascending phases: a later phase gets TERM only once
    # every child of the earlier ones has exited (the spool writer must outlive the
    # receivers whose last messages it commits).
    stop_phase: int = 0


@dataclass(slots=True)
class _Child:
    spec: ChildSpec
    slot: int
    process: Any = None
    backoff: Backoff = field(default_factory=Backoff)
    restart_at: float = 0.0
    restarts: int = 0


_PR_SET_PDEATHSIG = 1


def follow_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies, so a killed
    parent never leaves a child holding the port or the spool. False if the parent
    (`parent_pid`, taken before the fork) is gone already: it died before the
    request was made, and no signal will ever come, so the caller must exit."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent_pid


def _child_entry(target: Callable[[int], None], slot: int, parent_pid: int) -> None:
    # Forked children inherit the supervisor's Python signal handlers: put back
    # harmless ones until the child installs its own. INT is ignored because a
    # terminal's Ctrl-C reaches the whole group; the supervisor turns it into TERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Every service dies with the supervisor, even when it is killed with -9.
    # Only now: a TERM the inherited handler caught would be lost.
    if not follow_parent(parent_pid):
        os._exit(0)
    target(slot)


def exit_reason(code: int | None) -> str:
    """How a child ended, in the shell's words: `exited with status 111`,
    `killed by signal 9` (multiprocessing gives a signal as -N)."""
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Runs the children of `specs` until TERM/INT (see the module docstring)."""

    def __init__(self, specs: Sequence[ChildSpec], *, stop_grace: float = 10.0,
                 reload_check: Callable[[], bool] | None = None, reload_poll: float = 5.0,
                 tick: float = 0.05, on_stop: Callable[[], None] | None = None) -> None:
        self.children = [_Child(spec, slot) for spec in specs for slot in range(spec.count)]
        self.stop_grace = stop_grace
        self.reload_check = reload_check
        self.reload_poll = reload_poll
        self.tick = tick
        self.on_stop = on_stop
        self._pending: list[int] = []
        self._context = multiprocessing.get_context("fork")

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending.append(signum)

    def _start(self, child: _Child) -> None:
        name = f"qrelay-{child.spec.name}-{child.slot}"
        proc = self._context.Process(target=_child_entry, args=(child.spec.target, child.slot, os.getpid()), name=name)
        proc.daemon = False
        try:
            proc.start()
        except OSError as exc:
            # No fork (EAGAIN from a full process table or the cgroup's pids.max,
            # ENOMEM): tried again on the backoff schedule; the supervisor, and
            # with it every other service, must not die of it.
            log.warning("cannot start %s-%d: %s; trying again", child.spec.name, child.slot, exc)
            child.restart_at = time.monotonic() + child.backoff.died()
            return
        child.process = proc
        child.backoff.started()
        log.info("started %s pid %d", name, proc.pid)

    def _forward(self, signum: int) -> None:
        for child in self.children:
            proc = child.process
            if proc is not None and proc.pid and signum in child.spec.forward_signals and proc.exitcode is None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def _reap(self, now: float) -> None:
        for child in self.children:
            proc = child.process
            if proc is None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            if proc.is_alive():
                continue
            code, pid = proc.exitcode, proc.pid
            proc.close()
            child.process = None
            log.warning("%s-%d (pid %d) %s; restarting", child.spec.name, child.slot, pid,
                        exit_reason(code))
            if child.spec.on_exit is not None:
                child.spec.on_exit(child.slot)
            child.restart_at = now + child.backoff.died()
            child.restarts += 1

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.children if c.process is not None and c.process.pid]

    def run(self) -> int:
        """Start every child, supervise until TERM/INT, stop them; returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, self._on_signal)
        for child in self.children:
            self._start(child)
        next_reload_poll = time.monotonic() + self.reload_poll
        stopping = False
        while not stopping:
            time.sleep(self.tick)
            while self._pending:
                signum = self._pending.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    stopping = True
                    break
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading")
                self._forward(signum)
            if stopping:
                break
            now = time.monotonic()
            self._reap(now)
            if self.reload_check is not None and now >= next_reload_poll:
                next_reload_poll = now + self.reload_poll
                try:
                    changed = self.reload_check()
                except Exception as exc:  # a broken file is the children's to report
                    log.warning("reload check failed: %s", exc)
                    changed = False
                if changed:
                    log.info("control files changed: reloading")
                    self._forward(signal.SIGHUP)
        return self._stop()

    def _stop(self) -> int:
        log.info("stopping")
        if self.on_stop is not None:
            # e.g. close the supervisor's copy of the listening sockets, so the port
            # closes as soon as the children have closed theirs.
            self.on_stop()
        status = 0
        for phase in sorted({c.spec.stop_phase for c in self.children}):
            status |= self._stop_phase([c for c in self.children if c.spec.stop_phase == phase])
        return status

    def _stop_phase(self, children: list[_Child]) -> int:
        for child in children:
            proc = child.process
            if proc is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.stop_grace
        status = 0
        for child in children:
            proc = child.process
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.error("%s-%d (pid %d) did not stop in time: killing it",
                          child.spec.name, child.slot, proc.pid)
                proc.kill()
                proc.join(5)
                status = 1
            child.process = None
        return status
