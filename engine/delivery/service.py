"""The scheduler process of `qrelay run` (qmail-send + qmail-rspawn's roles).

Owns the process-level wiring only: signal handlers, opening the spool and
the log, the uvloop event loop, the pid file `ROOT/log/scheduler.pid` that
`qrelay flush` signals, and the ChildSpec the supervisor starts. The work is
done by `engine.delivery.scheduler.Scheduler` with one courier per channel
(`open_couriers`: each channel's deliverer in this process, or a `Spawner`
of delivery worker processes).

Signals (spec §6.5): ALRM = retry every deferred recipient now; HUP = reread
locals / virtualdomains / percenthack (the old snapshot stays if that fails);
TERM = start nothing new, let running deliveries finish (stop_grace), exit.

SIGALRM's default action kills a process, so the handler (first SIG_IGN,
then the real one) is installed before anything else happens; under the
supervisor the forked child already ignores it until then.

`[delivery] worker_procs = 0` (the default): remote delivery runs in this
one process, many concurrent SMTP connections on its event loop -- on a
2-core machine the fastest, with no extra hop and one connection pool. M >= 1:
M delivery worker processes (engine.delivery.spawner, children of this one,
restarted if one dies) get jobs by message id, each domain to one worker; on
TERM the scheduler lets running deliveries finish, then the workers are
stopped.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from engine.supervisor import ChildSpec

PID_FILE = "scheduler.pid"


def pid_file(root: Path | str) -> Path:
    return Path(root) / "log" / PID_FILE


def scheduler_spec(root: Path | str) -> ChildSpec:
    """The supervisor's child for the scheduler (ALRM and HUP forwarded to it)."""
    root = str(root)
    return ChildSpec("scheduler", target=lambda slot: scheduler_main(root),
                     forward_signals=frozenset({signal.SIGHUP, signal.SIGALRM}))


def scheduler_main(root: str) -> None:
    """Run the scheduler until SIGTERM; exits the process with 0, or 111 on a
    configuration error (after logging `alert: cannot start: ...`)."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.exit(run_scheduler(Path(root)))


def run_scheduler(root: Path) -> int:
    import uvloop

    from engine.config.control import ControlError
    from engine.config.domains import DomainConfigError, load_domain_config
    from engine.config.settings import SettingsError, load_settings
    from engine.delivery.bounce import load_bounce_config
    from engine.delivery.remote import RemoteConfigError, load_remote_config
    from engine.delivery.scheduler import load_scheduler_config
    from engine.log import QmailSendLog
    from engine.queue import Spool, SpoolError

    log = None
    try:
        settings = load_settings(root)
        log = QmailSendLog(root / "log", max_bytes=settings.log.max_bytes,
                           max_files=settings.log.max_files)
        domains = load_domain_config(root)
        bounce = load_bounce_config(root, settings.scheduler.bounce_copy_max_bytes)
        config = load_scheduler_config(root, settings, bounce)
        load_remote_config(root)     # a bad smtproutes or DNS setting stops the start here
        spool = Spool(root / "queue", settings.spool)
    except (SettingsError, ControlError, DomainConfigError, RemoteConfigError, SpoolError,
            OSError) as exc:
        if log is not None:
            log.alert(f"cannot start: {exc}")
            log.close()
        return 111
    try:
        spool.recover()
        path = pid_file(root)
        tmp = path.with_name(PID_FILE + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
        uvloop.run(_serve(root, spool, log, config, domains, settings))
    finally:
        try:
            if pid_file(root).read_text().strip() == str(os.getpid()):
                pid_file(root).unlink()
        except OSError:
            pass
        spool.close()
        log.close()
    return 0


async def open_couriers(root: Path, spool, settings, log) -> dict:
    """Each channel's courier, in CHANNELS order: the channel's own (local), a
    Spawner of worker processes, or its deliverer in this process (reading
    the message from `spool`)."""
    from engine.delivery.channels import CHANNELS, ReadingCourier
    from engine.delivery.spawner import Spawner

    couriers = {}
    for spec in CHANNELS:
        procs = getattr(settings.delivery, spec.procs_setting, 0) if spec.procs_setting else 0
        if spec.courier:
            courier = spec.open_courier(root, spool, settings, log)
        elif procs > 0:
            # The scheduler's stop_grace goes to finishing deliveries; the idle
            # workers then only close their connections (bounded by 2 s each).
            courier = Spawner(root, procs, spec.name, log=log, spool=spool, stop_grace=2.5)
            await courier.start()
        else:
            courier = ReadingCourier(spool, spec.open(root, settings, log))
        couriers[spec.name] = courier
    return couriers


async def _serve(root, spool, log, config, domains, settings) -> None:
    from engine.config.domains import DomainConfigError, load_domain_config
    from engine.delivery.scheduler import Scheduler

    loop = asyncio.get_running_loop()
    couriers = await open_couriers(root, spool, settings, log)
    scheduler = Scheduler(spool, couriers, log, config, domains.resolve, qp=os.getpid())

    def reload_domains() -> None:
        try:
            scheduler.reload_domains(load_domain_config(root).resolve)
        except DomainConfigError:
            log.alert("unable to reread control/locals")

    loop.add_signal_handler(signal.SIGALRM, scheduler.request_flush)
    loop.add_signal_handler(signal.SIGHUP, reload_domains)
    loop.add_signal_handler(signal.SIGTERM, scheduler.stop)
    loop.add_signal_handler(signal.SIGINT, scheduler.stop)
    try:
        await scheduler.run(stop_grace=settings.scheduler.stop_grace)
    except Exception as exc:
        # A bug must not die silently: say so in the log; the supervisor restarts us
        # and the spool still holds every recipient that was not recorded.
        log.alert(f"scheduler crashed: {exc!r}; restarting")
        log.flush()
        raise
    finally:
        for courier in couriers.values():
            try:
                # A spawner bounds its own wait (stop_grace, then TERM, then KILL).
                await asyncio.wait_for(courier.close(), 10)
            except (asyncio.TimeoutError, OSError):
                pass


def signal_running_scheduler(root: Path | str) -> int | None:
    """Send SIGALRM to the running scheduler of ROOT; its pid, or None if none runs.

    The pid is checked to be a live qrelay process first: a stale pid file
    must never make us signal (and, SIGALRM's default being to exit, kill)
    an unrelated process that reused the pid.
    """
    try:
        pid = int(pid_file(root).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    if b"qrelay" not in cmdline and b"engine" not in cmdline:
        return None
    try:
        os.kill(pid, signal.SIGALRM)
    except (ProcessLookupError, PermissionError):
        return None
    return pid
