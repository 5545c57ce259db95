"""`qrelay run`: the service table, and the supervisor that runs it.

Every child of `qrelay run` is one line of `services()` (Postfix's master.cf):
its name, how many, what it runs, which signals reach it, and its stop
phase. The supervisor (engine.supervisor) starts them in table order,
restarts any that dies (engine.backoff's schedule) and stops them phase by
phase. Delivery workers are the scheduler's own children (engine.delivery.
spawner), started and restarted by it, so they live and die with it.

    service        count        stop phase  signals       job
    spool-writer   1            1           -             commits every receiver's messages
    receiver       --procs      0           HUP           SMTP (engine.smtp)
    scheduler      1            0           HUP, ALRM     qmail-send (engine.delivery.service)

The writer is first, so receivers find it, and stops last, after the
receivers whose last messages it commits. One `qrelay run` per root: the
supervisor holds queue/lock/sendmutex as qmail-send does. A service that is no receiver
closes its inherited copy of the listening sockets at once. Everything the
supervisor and the receivers log goes to ROOT/log beside qmail-send's lines
(engine.log.LogHandler), and to stderr.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.smtp.connlimit import ConnectionTable
from engine.smtp.listeners import ListenAddress, bind_listeners, bound_address
from engine.supervisor import ChildSpec, Supervisor


def services(root: Path, config: Any, sockets: list[socket.socket], procs: int) -> list[ChildSpec]:
    """The children of `qrelay run`, in start order."""
    settings = config.settings
    table = ConnectionTable(procs)
    specs = []
    if settings.spool.single_writer:
        specs.append(_without_listeners(_spool_writer(root, settings), sockets))
    from engine.smtp.receiver import receiver_main
    specs.append(ChildSpec(
        "receiver", target=lambda slot: receiver_main(str(root), sockets, table.counter(slot)),
        count=procs, on_exit=table.clear_row, forward_signals=frozenset({signal.SIGHUP})))
    if settings.scheduler.enabled:   # false: `qrelay run` only receives, mail stays queued
        from engine.delivery.service import scheduler_spec
        specs.append(_without_listeners(scheduler_spec(root), sockets))
    return specs


def _spool_writer(root: Path, settings: Any) -> ChildSpec:
    from engine.queue.writer import run_writer

    def writer_main(slot: int) -> None:
        run_writer(root / "queue", settings=settings.spool,
                   drain_seconds=settings.smtp.shutdown_grace + 1.0)
    return ChildSpec("spool-writer", target=writer_main, forward_signals=frozenset(),
                     stop_phase=1)


def _without_listeners(spec: ChildSpec, sockets: list[socket.socket]) -> ChildSpec:
    """A service that is no receiver closes its inherited copy of the listening
    sockets at once: otherwise the port would stay open (and queue connections
    nobody answers) until that service exits."""
    target = spec.target

    def run(slot: int) -> None:
        for sock in sockets:
            sock.close()
        target(slot)
    return dataclasses.replace(spec, target=run)


def _log_to_root(root: Path, settings: Any) -> logging.Handler:
    """The supervisor's and receivers' `logging` records into ROOT/log."""
    from engine.log import LogHandler, QmailSendLog
    handler = LogHandler(QmailSendLog(root / "log", max_bytes=settings.log.max_bytes,
                                      max_files=settings.log.max_files))
    logging.getLogger("qrelay").addHandler(handler)
    return handler


class AlreadyRunning(Exception):
    """Another `qrelay run` (or qmail-send) holds ROOT's queue."""


def hold_queue(root: Path) -> int:
    """qmail-send's `queue/lock/sendmutex`, held for the life of `qrelay run`
    (its children share it): a second instance on the same root, or a qmail-send
    running on that qmail home, makes this one refuse to start instead of
    delivering every message twice. The kernel drops the lock with the last
    process holding it, so a kill -9 leaves nothing to clean up."""
    lock_dir = root / "queue" / "lock"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / "sendmutex", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"cannot start: qrelay or qmail-send is already running on {root}"
                             " (queue/lock/sendmutex is held)") from None
    return fd


def serve(root: Path, listen: list[ListenAddress], procs: int,
          announce: Callable[[list[ListenAddress]], None]) -> int:
    """Run qrelay in the foreground until TERM/INT; returns the exit status.
    Raises ConfigError / ListenError / AlreadyRunning before anything starts."""
    from engine.smtp.config import config_fingerprint, load_smtp_config

    config = load_smtp_config(root)
    smtp = config.settings.smtp
    mutex = hold_queue(root)
    try:
        sockets = bind_listeners(listen)
    except BaseException:
        os.close(mutex)
        raise
    handler = None
    try:
        handler = _log_to_root(root, config.settings)
        fingerprint = [config_fingerprint(root)]

        def control_files_changed() -> bool:
            now = config_fingerprint(root)
            if now != fingerprint[0]:
                fingerprint[0] = now
                return True
            return False

        supervisor = Supervisor(
            services(root, config, sockets, procs),
            stop_grace=smtp.shutdown_grace + 2.0,
            reload_check=control_files_changed,
            reload_poll=smtp.reload_poll_seconds,
            on_stop=lambda: [sock.close() for sock in sockets],
        )
        announce([bound_address(s) for s in sockets])
        return supervisor.run()
    finally:
        for sock in sockets:
            sock.close()
        if handler is not None:
            logging.getLogger("qrelay").removeHandler(handler)
            handler.log.close()
        os.close(mutex)
