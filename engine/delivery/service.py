"""The scheduler process of `qrelay run` (qmail-send + qmail-rspawn's roles).

Owns the process-level wiring only: signal handlers, opening the spool and
the log, the uvloop event loop, reloading the delivery side's configuration
(`DeliveryConfig`), and the ChildSpec the supervisor starts. The work is
done by `engine.delivery.scheduler.Scheduler` with one courier per channel
(`open_couriers`: each channel's deliverer in this process, or a `Spawner`
of delivery worker processes).

Signals (spec §6.5): ALRM = retry every deferred recipient now; HUP = reread
everything the delivery side reads (`DELIVERY_FILES`: locals / virtualdomains
/ percenthack, concurrency*, queuelifetime, smtproutes, tlsdestinations,
tlsclientciphers, timeouts, helohost, bounce names, qrelay.toml's [delivery]
and [scheduler]; a CA file tlsdestinations names is reread on HUP); TERM = start nothing
new, let running deliveries finish (stop_grace), exit. The supervisor also
sends HUP when one of those files changes (engine.run polls their mtimes).
A reload reads the whole `DeliveryConfig` first; if any file is broken it
logs `alert: unable to reread controls: <file, line, why>; keeping the
previous configuration` and changes nothing. Otherwise the scheduler takes
the new snapshot at once, and if the remote channel's configuration changed
it gets a new courier (a new RemoteDelivery, or new worker processes): the
deliveries in flight finish on the old one, which is closed after them.

`qrelay flush` never reads a pid file to find us: it signals the supervisor
that holds the root's lock (engine.run.running_instance), which forwards
ALRM here. `ROOT/log/scheduler.pid` is still written, for an operator's eyes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.log import readable
from engine.proctitle import set_title
from engine.supervisor import ChildSpec

PID_FILE = "scheduler.pid"

# Every file (relative to ROOT) the delivery side reads: a change to any of
# them makes the supervisor send HUP (engine.run polls this fingerprint).
DELIVERY_FILES = (
    "qrelay.toml", "control/me", "control/locals", "control/virtualdomains",
    "control/percenthack", "control/envnoathost", "control/concurrencylocal",
    "control/concurrencyremote", "control/queuelifetime", "control/smtproutes",
    "control/timeoutconnect", "control/timeoutremote", "control/helohost",
    "control/bouncefrom", "control/bouncehost", "control/doublebounceto",
    "control/doublebouncehost", "control/tlsdestinations", "control/tlsclientciphers",
    "control/clientcert.pem",
    "control/tlshosts", "control/notlshosts",     # directories: a file added or removed
)


class DeliveryConfigError(Exception):
    """The delivery side's configuration cannot be used (one line naming the file)."""


@dataclass(slots=True, frozen=True)
class DeliveryConfig:
    """One snapshot of everything the scheduler process reads, loaded whole."""
    settings: Any        # engine.config.settings.Settings
    domains: Any         # engine.config.domains.DomainConfig
    scheduler: Any       # engine.delivery.scheduler.SchedulerConfig
    remote: Any          # engine.delivery.remote.RemoteConfig

    def remote_key(self) -> tuple:
        """What the remote courier is built from: a new one when this changes."""
        return (self.remote, self.settings.delivery.worker_procs)


def load_delivery_config(root: Path | str) -> DeliveryConfig:
    """Read the delivery side's files; raises DeliveryConfigError (one line)."""
    from engine.config.control import ControlError
    from engine.config.domains import DomainConfigError, load_domain_config
    from engine.config.settings import SettingsError, load_settings
    from engine.delivery.bounce import load_bounce_config
    from engine.delivery.remote import RemoteConfigError, load_remote_config
    from engine.delivery.scheduler import load_scheduler_config

    root = Path(root)
    try:
        settings = load_settings(root)
        domains = load_domain_config(root)
        bounce = load_bounce_config(root, settings.scheduler.bounce_copy_max_bytes)
        scheduler = load_scheduler_config(root, settings, bounce)
        remote = load_remote_config(root)
    except (SettingsError, ControlError, DomainConfigError, RemoteConfigError, OSError) as exc:
        raise DeliveryConfigError(str(exc)) from None
    return DeliveryConfig(settings, domains, scheduler, remote)


def delivery_fingerprint(root: Path | str) -> tuple:
    from engine.config.control import stat_fingerprint
    return stat_fingerprint(root, DELIVERY_FILES)


def pid_file(root: Path | str) -> Path:
    return Path(root) / "log" / PID_FILE


def scheduler_spec(root: Path | str) -> ChildSpec:
    """The supervisor's child for the scheduler (ALRM and HUP forwarded to it)."""
    root = str(root)
    return ChildSpec("scheduler", target=lambda slot: scheduler_main(root),
                     forward_signals=frozenset({signal.SIGHUP, signal.SIGALRM}))


# HUPs that came while the scheduler was starting (a spool recovery can take
# long): the supervisor sends one per settled change, so it is kept and
# answered once the reload handler is in place, not ignored.
_hup_at_start: list[int] = []


def scheduler_main(root: str) -> None:
    """Run the scheduler until SIGTERM; exits the process with 0, or 111 on a
    configuration error (after logging `alert: cannot start: ...`)."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, lambda signum, frame: _hup_at_start.append(signum))
    signal.siginterrupt(signal.SIGHUP, False)     # a system call it lands in goes on
    set_title("qrelay: scheduler")
    sys.exit(run_scheduler(Path(root)))


def run_scheduler(root: Path) -> int:
    import uvloop

    from engine.config.settings import SettingsError, load_settings
    from engine.log import QmailSendLog
    from engine.queue import Spool, SpoolError

    log = None
    try:
        settings = load_settings(root)
        log = QmailSendLog(root / "log", max_bytes=settings.log.max_bytes,
                           max_files=settings.log.max_files, fmt=settings.log.format)
        config = load_delivery_config(root)   # a bad smtproutes or DNS setting stops the start here
        # The spool's warnings (a quarantined message, a stopped writer's
        # tail indexed) are worded lines of their own: into qmail-send's log.
        spool = Spool(root / "queue", config.settings.spool,
                      warn=lambda text: log.line(readable(text)))
        try:
            spool.recover()    # a full index map or disk: nothing could be recorded
        except SpoolError:
            spool.close()
            raise
    except (SettingsError, DeliveryConfigError, SpoolError, OSError) as exc:
        # The reason goes to the log and to stderr (the supervisor's, so the
        # operator sees why the scheduler keeps restarting, not just its status).
        sys.stderr.write(f"qrelay: scheduler: alert: cannot start: {exc}\n")
        sys.stderr.flush()
        if log is not None:
            log.line(f"alert: cannot start: {readable(exc)}")
            log.close()
        return 111
    try:
        write_pid_file(root, log)
        uvloop.run(_serve(root, spool, log, config))
    finally:
        try:
            if pid_file(root).read_text().strip() == str(os.getpid()):
                pid_file(root).unlink()
        except OSError:
            pass
        spool.close()
        log.close()
    return 0


def write_pid_file(root: Path, log) -> None:
    """log/scheduler.pid, for an operator's eyes only: a full disk must not stop
    the scheduler, whose deliveries are what frees it. Not written, the old
    one goes (it would name a dead process)."""
    path = pid_file(root)
    tmp = path.with_name(PID_FILE + ".tmp")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(f"cannot write {path}: {exc.strerror or exc}")
        for stale in (tmp, path):
            try:
                stale.unlink()
            except OSError:
                pass


async def start_workers(root: Path, procs: int, name: str, spool, log):
    """A started Spawner of `procs` worker processes for channel `name`; under a
    root `qrelay run` the root local spawner starts them (lspawn.spawner_service)."""
    from engine.delivery.lspawn import spawner_service
    from engine.delivery.spawner import Spawner
    # The scheduler's stop_grace goes to finishing deliveries; the idle
    # workers then only close their connections (bounded by 2 s each).
    spawner = Spawner(root, procs, name, log=log, spool=spool, stop_grace=2.5,
                      via=spawner_service(root))
    await spawner.start()
    return spawner


async def open_couriers(root: Path, spool, settings, log) -> dict:
    """Each channel's courier, in CHANNELS order: the channel's own (local), a
    Spawner of worker processes, or its deliverer in this process (reading
    the message from `spool`)."""
    from engine.delivery.channels import CHANNELS, ReadingCourier

    couriers = {}
    for spec in CHANNELS:
        procs = getattr(settings.delivery, spec.procs_setting, 0) if spec.procs_setting else 0
        if spec.courier:
            courier = spec.open_courier(root, spool, settings, log)
        elif procs > 0:
            courier = await start_workers(root, procs, spec.name, spool, log)
        else:
            courier = ReadingCourier(spool, spec.open(root, settings, log))
        couriers[spec.name] = courier
    return couriers


class SwappableCourier:
    """A channel's courier that a reload can replace: each deliver() runs on the
    courier current when it started; a replaced one is closed once its last
    call has returned, so a reload never cuts a delivery in flight."""

    def __init__(self, courier) -> None:
        self.current = courier
        self._calls: dict[int, int] = {}
        self._retired: dict[int, Any] = {}
        self._closing: set[asyncio.Task] = set()

    async def deliver(self, group):
        courier = self.current
        key = id(courier)
        self._calls[key] = self._calls.get(key, 0) + 1
        try:
            return await courier.deliver(group)
        finally:
            left = self._calls[key] - 1
            if left:
                self._calls[key] = left
            else:
                del self._calls[key]
                if key in self._retired:
                    self._close_later(self._retired.pop(key))

    def forget_timeouts(self) -> None:
        forget = getattr(self.current, "forget_timeouts", None)
        if forget is not None:
            forget()

    def swap(self, courier) -> None:
        old, self.current = self.current, courier
        if id(old) in self._calls:
            self._retired[id(old)] = old
        else:
            self._close_later(old)

    def _close_later(self, courier) -> None:
        task = asyncio.get_running_loop().create_task(_close_courier(courier))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await _close_courier(self.current)
        for courier in list(self._retired.values()):
            await _close_courier(courier)
        self._retired.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_courier(courier) -> None:
    try:
        # A spawner bounds its own wait (stop_grace, then TERM, then KILL).
        await asyncio.wait_for(courier.close(), 10)
    except (asyncio.TimeoutError, OSError):
        pass


async def open_remote_courier(root: Path, spool, config: DeliveryConfig, log):
    """A new remote courier for `config` (a reload): like open_couriers's,
    but an in-process deliverer is built from the snapshot already checked."""
    from engine.delivery.channels import ReadingCourier, channel
    from engine.delivery.remote import RemoteDelivery

    spec = channel("remote")
    procs = getattr(config.settings.delivery, spec.procs_setting, 0)
    if procs > 0:
        # New workers read the new files when they start; the old ones finish
        # their jobs, then are stopped (SwappableCourier).
        courier = await start_workers(root, procs, spec.name, spool, log)
        return courier
    return ReadingCourier(spool, RemoteDelivery(config.remote))


class DeliveryReload:
    """HUP in the scheduler process: read the whole DeliveryConfig, refuse a
    broken one with qmail-send's alert line, else hand it over (see the
    module docstring)."""

    def __init__(self, root: Path, spool, log, scheduler, config: DeliveryConfig,
                 remote: SwappableCourier | None) -> None:
        self.root = root
        self.spool = spool
        self.log = log
        self.scheduler = scheduler
        self.config = config
        self.remote = remote
        self._task: asyncio.Task | None = None
        self._again = False

    def request(self) -> None:
        """The signal handler: one reload at a time; a HUP during one runs another after."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> bool:
        try:
            new = load_delivery_config(self.root)
        except DeliveryConfigError as exc:
            self.log.line(f"alert: unable to reread controls: {readable(exc)};"
                          " keeping the previous configuration")
            self.log.flush()
            return False
        if self.remote is not None and new.remote_key() != self.config.remote_key():
            try:
                courier = await open_remote_courier(self.root, self.spool, new, self.log)
            except Exception as exc:   # e.g. the resolver cannot be set up
                self.log.line(f"alert: unable to reread controls: remote delivery: {readable(exc)};"
                              " keeping the previous configuration")
                self.log.flush()
                return False
            self.remote.swap(courier)
        self.scheduler.reload(new.scheduler, new.domains.resolve)
        self.config = new
        self.log.line("info: scheduler: configuration reloaded")
        self.log.flush()
        return True


def alias_uid() -> int | None:
    """qmail's alias user's uid (qmail-queue's auto_uida), or None without one."""
    from engine.delivery.local.courier import LocalConfig, system_getpw
    pw = system_getpw(LocalConfig().alias_user)
    return None if pw is None else pw[1]


async def _serve(root, spool, log, config: DeliveryConfig) -> None:
    from engine.delivery.scheduler import Scheduler

    loop = asyncio.get_running_loop()
    couriers = await open_couriers(root, spool, config.settings, log)
    remote = couriers.get("remote")
    if remote is not None:
        remote = couriers["remote"] = SwappableCourier(remote)
    scheduler = Scheduler(spool, couriers, log, config.scheduler, config.domains.resolve,
                          qp=os.getpid(), alias_uid=alias_uid())
    reloader = DeliveryReload(root, spool, log, scheduler, config, remote)

    def flush() -> None:
        # qmail's ALRM, and qmail-tcpok with it: after an outage, `qrelay flush`
        # must not leave the addresses that timed out skipped for an hour.
        scheduler.request_flush()
        if remote is not None:
            remote.forget_timeouts()
    loop.add_signal_handler(signal.SIGALRM, flush)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    if _hup_at_start:
        _hup_at_start.clear()
        reloader.request()
    loop.add_signal_handler(signal.SIGTERM, scheduler.stop)
    loop.add_signal_handler(signal.SIGINT, scheduler.stop)
    try:
        await scheduler.run(stop_grace=config.settings.scheduler.stop_grace)
    except Exception as exc:
        # A bug must not die silently: say so in the log; the supervisor restarts us
        # and the spool still holds every recipient that was not recorded.
        log.alert(f"scheduler crashed: {exc!r}; restarting")
        log.flush()
        raise
    finally:
        for courier in couriers.values():
            await _close_courier(courier)


def signal_running_scheduler(root: Path | str, sig: int = signal.SIGALRM) -> int | None:
    """Wake the scheduler of ROOT's running `qrelay run` (qmail's `kill -ALRM
    qmail-send`): SIGALRM to the supervisor that holds the root's lock, which
    forwards it to the scheduler (SIGHUP: to every service, a reload now, as
    vadddomain's `kill -HUP qmail-send`). Returns that supervisor's pid, or
    None if nothing runs on ROOT.

    The lock, not log/scheduler.pid, says who runs (engine.run.running_instance):
    a pid file can be stale or overwritten, and SIGALRM's default action would
    kill an unrelated process that reused the pid.
    """
    from engine.run import running_instance

    pid = running_instance(Path(root))
    if pid is None:
        return None
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return None
    return pid
