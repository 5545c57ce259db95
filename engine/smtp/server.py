"""`qrelay run`: bind the listeners, then supervise the receiver processes.

This module only composes: the sockets come from `engine.smtp.listeners`, the
processes from `engine.supervisor`, the per-process work from
`engine.smtp.receiver`. Services other than the receivers (scheduler, delivery
workers) are added in `service_specs`.
"""
from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.smtp.connlimit import ConnectionTable
from engine.smtp.listeners import ListenAddress, bind_listeners, bound_address
from engine.smtp.receiver import receiver_main
from engine.supervisor import ChildSpec, Supervisor


def service_specs(root: Path, config: Any) -> list[ChildSpec]:
    """Children `run` starts besides the receivers (the delivery issue adds the
    scheduler and delivery workers here)."""
    # --- added by the scheduler/delivery engineer: qmail-send's role as one child
    # (engine/delivery/service.py); `[scheduler] enabled = false` leaves mail queued.
    if not config.settings.scheduler.enabled:
        return []
    from engine.delivery.service import scheduler_spec
    return [scheduler_spec(root)]


def writer_specs(root: Path, config: Any) -> list[ChildSpec]:
    """The single spool writer (engine/queue/writer.py): every receiver's messages
    share its group commits. Stopped last, after the receivers it commits for."""
    if not config.settings.spool.single_writer:
        return []
    from engine.queue.writer import run_writer
    spool_settings = config.settings.spool

    def writer_main(slot: int) -> None:
        run_writer(root / "queue", settings=spool_settings,
                   drain_seconds=config.settings.smtp.shutdown_grace + 1.0)
    return [ChildSpec("spool-writer", target=writer_main,
                      forward_signals=frozenset(), stop_phase=1)]


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


def serve(root: Path, listen: list[ListenAddress], procs: int,
          announce: Callable[[list[ListenAddress]], None]) -> int:
    """Run qrelay in the foreground until TERM/INT; returns the exit status.
    Raises ConfigError / ListenError before anything starts."""
    from engine.config.smtp import config_fingerprint, load_smtp_config

    config = load_smtp_config(root)
    smtp = config.settings.smtp
    sockets = bind_listeners(listen)
    try:
        table = ConnectionTable(procs)
        receivers = ChildSpec(
            "receiver",
            target=lambda slot: receiver_main(str(root), sockets, table.counter(slot)),
            count=procs,
            on_exit=table.clear_row,
        )
        fingerprint = [config_fingerprint(root)]

        def control_files_changed() -> bool:
            now = config_fingerprint(root)
            if now != fingerprint[0]:
                fingerprint[0] = now
                return True
            return False

        # The writer starts first so receivers find it; each spec's stop_phase
        # decides the order of stopping.
        writers = [_without_listeners(s, sockets) for s in writer_specs(root, config)]
        services = [_without_listeners(s, sockets) for s in service_specs(root, config)]
        supervisor = Supervisor(
            [*writers, receivers, *services],
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
