"""`qrelay run`: the service table, and the supervisor that runs it.

Every child of `qrelay run` is one line of `services()` (Postfix's master.cf):
its name, how many, what it runs, which signals reach it, and its stop
phase. The supervisor (engine.supervisor) starts them in table order,
restarts any that dies (engine.backoff's schedule) and stops them phase by
phase. Delivery workers are started and restarted by the scheduler
(engine.delivery.spawner), so they live and die with it.

    service        count        stop phase  signals       job
    spool-writer   1            1           -             commits every receiver's messages
    receiver       --procs      0           HUP           SMTP, POP3 (engine.smtp, engine.pop3)
    lspawn         1 if root    1           -             qmail-lspawn (engine.delivery.lspawn)
    scheduler      1            0           HUP, ALRM     qmail-send (engine.delivery.service)
    status         1 if http    0           -             /metrics, status page (engine.status)

Users (engine/privilege.py): started as root, every service but lspawn runs
as `[run] user`, who owns queue/, log/, relay/ and run/; lspawn stays root,
takes the scheduler's jobs for other mailbox owners over queue/lspawn.sock
(bound here before anything starts) and starts the scheduler's worker
processes, which then become the run user or the mailbox owner.

Every listener but `http://` ones goes to the receivers; those go to the
status service alone, so a scrape or a page kept open never runs on a
receiver's event loop. Every process counts into ROOT/run/metrics
(engine.metrics, enabled by `serve` before the first fork, emptied at start).

The writer is first, so receivers find it, and stops last, after the
receivers whose last messages it commits. One `qrelay run` per root: the
supervisor holds queue/lock/sendmutex as qmail-send does, with its pid written
in it; every tool finds the running instance through that lock
(`running_instance`), never through a pid file. A service that is no receiver
closes its inherited copy of the listening sockets at once. What the
supervisor and the spool log goes to ROOT/log/current beside qmail-send's
lines (engine.log.LogHandler), and to stderr; the receivers write their
connection and refusal lines to ROOT/log/smtpd/current.

Before it takes the lock or binds a port, `serve` checks that every service
can start with the configuration it has (`check_services`: the receivers'
files, and the scheduler's) and that ROOT/queue is not a qmail queue; any
problem is one line naming the file, and nothing starts. While running, the
supervisor polls the mtimes of every file the receivers and the delivery side
read and sends them HUP on a change; each side refuses a broken edit itself
and keeps its previous configuration.
"""
from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.privilege import (PrivilegeError, RunUser, acting_as, acting_as_owner, become,
                              check_installation, NotRegularFile, check_reachable,
                              check_readable, give_tree, open_own_file, run_user)
from engine.proctitle import set_title
from engine.smtp.connlimit import ConnectionTable
from engine.smtp.listeners import ListenAddress, Listener, bind_listeners, bound_address, more_listeners
from engine.supervisor import ChildSpec, Supervisor, follow_parent
from engine.tls_tickets import TicketKeys


def receivers_listeners(listeners: list[Listener]) -> list[Listener]:
    """What the receivers serve: every listener but the status page's (http)."""
    return [listener for listener in listeners if listener.scheme != "http"]


def services(root: Path, config: Any, listeners: list[Listener], procs: int,
             user: RunUser | None = None, lspawn: socket.socket | None = None,
             tickets: TicketKeys | None = None,
             own: list[list[Listener]] | None = None) -> list[ChildSpec]:
    """The children of `qrelay run`, in start order. `user`: what every child
    but the local spawner becomes (engine/privilege.py); `lspawn`: the local
    spawner's bound socket (with `user`); `tickets`: the TLS session-ticket
    keys every receiver shares (forked with them); `own` ([smtp] reuse_port):
    receiver k + 1's own sockets for the receivers' listeners (receiver 0
    serves `listeners`), else every receiver serves `listeners`."""
    settings = config.settings
    http = [listener for listener in listeners if listener.scheme == "http"]
    served = receivers_listeners(listeners)
    slots = [served] + (own or [])
    receivers_sockets = [listener.sock for slot in slots for listener in slot]
    sockets = ([listener.sock for listener in http] + receivers_sockets
               + ([lspawn] if lspawn else []))

    def child(spec: ChildSpec, keep: Sequence[socket.socket] = (), root_kept: bool = False
              ) -> ChildSpec:
        """spec, closing the inherited sockets it does not serve, run as `user`
        unless it keeps root."""
        spec = _without_sockets(spec, [sock for sock in sockets if sock not in keep])
        return spec if root_kept else _as(user, spec)

    table = ConnectionTable(procs, ("smtp", "pop3"))
    specs = []
    if settings.spool.single_writer:
        specs.append(child(_spool_writer(root, settings)))
    from engine.smtp.receiver import receiver_main
    specs.append(child(ChildSpec(
        "receiver", target=lambda slot: receiver_main(str(root), slots[slot % len(slots)],
                                                      table.counter(slot), tickets,
                                                      table.counter(slot, "pop3")),
        count=procs, on_exit=table.clear_row, forward_signals=frozenset({signal.SIGHUP})),
        keep=receivers_sockets))
    if settings.scheduler.enabled:   # false: `qrelay run` only receives, mail stays queued
        from engine.delivery.service import scheduler_spec
        if lspawn is not None:
            specs.append(child(_lspawn_spec(root, lspawn, user), keep=[lspawn], root_kept=True))
        specs.append(child(scheduler_spec(root)))
    if http:
        from engine.status import status_main
        specs.append(child(ChildSpec("status", target=lambda slot: status_main(str(root), http),
                                     forward_signals=frozenset()),
                           keep=[listener.sock for listener in http]))
    return specs


def _lspawn_spec(root: Path, sock: socket.socket, user: RunUser) -> ChildSpec:
    """The local spawner: stays root, serves the (unprivileged) scheduler's jobs."""
    from engine.delivery.lspawn import lspawn_main
    # Stopped after the scheduler (phase 1, beside the spool writer): the
    # deliveries the scheduler lets finish run in workers this service started.
    return ChildSpec("lspawn", target=lambda slot: lspawn_main(str(root), sock,
                                                                frozenset({user.uid, 0})),
                     forward_signals=frozenset(), stop_phase=1)


def _as(user: RunUser | None, spec: ChildSpec) -> ChildSpec:
    """The service, run as `user` (None: as the supervisor)."""
    if user is None:
        return spec
    target = spec.target

    def run(slot: int) -> None:
        parent = os.getppid()
        become(user)
        # A change of uid clears the parent-death signal: ask for it again.
        if not follow_parent(parent):
            os._exit(0)
        target(slot)
    return dataclasses.replace(spec, target=run)


def _spool_writer(root: Path, settings: Any) -> ChildSpec:
    from engine.queue.writer import run_writer

    def writer_main(slot: int) -> None:
        from engine.queue import SpoolError
        set_title("qrelay: spool writer")
        try:
            run_writer(root / "queue", settings=settings.spool,
                       drain_seconds=settings.smtp.shutdown_grace + 1.0)
        except (SpoolError, OSError) as exc:
            # A spool it cannot open (a damaged index, a newer format), a socket
            # it cannot bind: the reason in the log at each restart, as the
            # scheduler's, not a traceback on stderr and a bare exit status.
            logging.getLogger("qrelay.spool-writer").error(f"cannot start: {exc}")
            raise SystemExit(111) from None
    return ChildSpec("spool-writer", target=writer_main, forward_signals=frozenset(),
                     stop_phase=1)


def _without_sockets(spec: ChildSpec, sockets: list[socket.socket]) -> ChildSpec:
    """The service, closing its inherited copies of `sockets` first: a listening
    socket a service does not serve would otherwise stay open (and queue
    connections nobody answers) until that service exits."""
    if not sockets:
        return spec
    target = spec.target

    def run(slot: int) -> None:
        for sock in sockets:
            sock.close()
        target(slot)
    return dataclasses.replace(spec, target=run)


def _log_to_root(root: Path, settings: Any, user: RunUser | None = None) -> logging.Handler:
    """The `logging` records of the supervisor and of its forks that have no
    log of their own (the spool writer, a receiver that cannot start) into ROOT/log
    (files it creates belong to `user`, who shares the directory)."""
    from engine.log import LogHandler, QmailSendLog
    handler = LogHandler(QmailSendLog(root / "log", max_bytes=settings.log.max_bytes,
                                      max_files=settings.log.max_files, fmt=settings.log.format,
                                      owner=user.owner if user else None))
    logging.getLogger("qrelay").addHandler(handler)
    return handler


class AlreadyRunning(Exception):
    """Another `qrelay run` (or qmail-send) holds ROOT's queue."""


LOCK_FILE = Path("queue") / "lock" / "sendmutex"
# qmail's queue directories: a root holding them is a qmail home with a queue
# qrelay cannot read; starting on it would leave that mail where it is.
QMAIL_QUEUE_DIRS = ("mess", "todo", "info")


def hold_queue(root: Path) -> int:
    """qmail-send's `queue/lock/sendmutex`, held for the life of `qrelay run`
    (its children share it): a second instance on the same root, or a qmail-send
    running on that qmail home, makes this one refuse to start instead of
    delivering every message twice. The holder's pid is written into the file
    (for the refusal and for `running_instance`). The kernel drops the lock with
    the last process holding it, so a kill -9 leaves nothing to clean up.
    Raises ConfigError if the lock is not a regular file."""
    from engine.smtp.config import ConfigError
    path = root / LOCK_FILE
    # queue/lock/ is the run user's: never follow a link it left there (root
    # would truncate and write the file it points to), nor one it made of
    # lock/ itself (root would create or truncate a sendmutex wherever that is).
    try:
        try:
            with acting_as_owner(root / "queue"):
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = open_own_file(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            if not _adopt_qmail_lock(root / "queue"):
                raise
            with acting_as_owner(root / "queue"):
                fd = open_own_file(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except NotRegularFile:
        raise ConfigError(f"cannot start: {path} is not a regular file (a link, or a special "
                          "file): remove it") from None
    except OSError as exc:
        raise ConfigError(f"cannot start: {path}: {exc.strerror}") from None
    # A `qrelay flush` probing the lock holds it for a moment: try a few times.
    for attempt in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 4:
                pid = _lock_pid(fd)
                # Killed (-9), the supervisor leaves its services holding the
                # lock while they finish what they hold (follow_parent's TERM).
                gone = pid is not None and _holder_gone(pid, os.fstat(fd))
                os.close(fd)
                if gone:
                    why = (f"the services of a killed qrelay run (pid {pid}) still hold {path}"
                           " while they finish; start it again once they have exited")
                elif pid:
                    why = (f"qrelay is already running on {root} (pid {pid} holds"
                           " queue/lock/sendmutex)")
                else:
                    why = (f"qrelay or qmail-send is already running on {root}"
                           " (queue/lock/sendmutex is held)")
                raise AlreadyRunning(f"cannot start: {why}") from None
            time.sleep(0.05)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass   # the lock is what counts; the pid is for messages
    return fd


# qrelay.toml settings read once, when `qrelay run` (or the service that
# reads them) starts (README: a change needs a restart, not a HUP): whole
# sections, then single keys of the sections a HUP rereads.
START_ONLY_SECTIONS = ("run", "relay", "login", "spool", "log", "status")
START_ONLY_KEYS = (
    ("smtp", "reload_poll_seconds"), ("smtp", "reuse_port"),   # the supervisor's
    ("tls", "ticket_key_seconds"), ("tls", "handshake_threads"),
    ("auth", "hash_threads"), ("auth", "cache_seconds"), ("auth", "cache_entries"),
    ("scheduler", "enabled"), ("scheduler", "stop_grace"),
    ("delivery", "program_timeout"), ("delivery", "local_active"),   # the local workers'
)


def start_only_warning(root: Path, started: Any, warned: list[tuple]) -> None:
    """One log line when a reload finds a START_ONLY_SECTIONS section or a
    START_ONLY_KEYS key of qrelay.toml changed since the start (once per such
    change): the HUP that follows applies everything else, and without a word
    the operator would believe it applied that too."""
    from engine.config.settings import SettingsError, load_settings
    try:
        now = load_settings(root)
    except SettingsError:
        return              # the children's reloads say why
    seen = tuple((f"[{name}]", getattr(now, name)) for name in START_ONLY_SECTIONS
                 if getattr(now, name) != getattr(started, name))
    seen += tuple((f"[{section}] {key}", getattr(getattr(now, section), key))
                  for section, key in START_ONLY_KEYS
                  if getattr(getattr(now, section), key) != getattr(getattr(started, section), key))
    if seen and seen != warned[0]:
        names = ", ".join(name for name, _ in seen)
        logging.getLogger("qrelay.run").warning(
            f"qrelay.toml: {names} changed; read when qrelay run starts: restart it to apply")
    warned[0] = seen


def check_spool_index(root: Path, settings: Any) -> None:
    """A spool index LMDB cannot open, or one cut short (its pages past the
    end would be SIGBUS), stops the start in one line, instead of a spool
    writer that restarts with an alert while the receivers answer 451 to
    everyone. Looked at read-only, without a lock, as the queue's owner (root
    never opens the run user's files), under the queue's lock; what a first
    start killed early left (no tables yet) is the writer's to finish."""
    import lmdb

    from engine.lmdbfile import truncation
    from engine.smtp.config import ConfigError
    index = root / "queue" / "index"
    if not (index / "data.mdb").exists():
        return
    with acting_as_owner(root / "queue"):
        try:
            env = lmdb.open(str(index), readonly=True, lock=False, subdir=True,
                            map_size=settings.spool.index_map_bytes, max_dbs=16)
            try:
                why = truncation(env, index / "data.mdb")
            finally:
                env.close()
        except (lmdb.Error, OSError) as exc:
            why = str(exc)
    if why is not None:
        raise ConfigError(f"cannot start: {root / 'queue'}: cannot open spool index: {why}")


def _adopt_qmail_lock(queue: Path) -> bool:
    """qmail's own queue/lock/ (qmails's, or root's after `qrelay import-qmail`
    as root) in a queue/ whose owner is another user: give that directory and
    its files to queue/'s owner, as give_tree does after the start, so the lock
    opens as that owner. Root only; the directory is opened without following
    a link and its files are chowned as give_tree does (no link, no file with
    other hard links). False if there was nothing to give."""
    if os.geteuid() != 0:
        return False
    try:
        owner = os.stat(queue, follow_symlinks=False)
        fd = os.open(queue / "lock", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        ids = (owner.st_uid, owner.st_gid)
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) == ids:
            return False
        for name in os.listdir(fd):
            entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISREG(entry.st_mode) and entry.st_nlink == 1:
                os.chown(name, *ids, dir_fd=fd, follow_symlinks=False)
        os.fchown(fd, *ids)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _lock_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def running_instance(root: Path) -> int | None:
    """The pid of the `qrelay run` holding ROOT's lock, or None if none runs.

    The lock is the truth: if a non-blocking shared flock succeeds, nobody
    holds it (whatever the file says). Held, the pid written by hold_queue is
    returned only if that process has the lock file open (the file is the
    run user's to write) and it is a live qrelay process, so a
    qmail-send holding the lock (its sendmutex is empty) or a pid reused
    since is never signalled."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_pid(fd)
            if pid is not None and not _has_open(pid, os.fstat(fd)):
                pid = None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    return pid if b"qrelay" in cmdline or b"engine" in cmdline else None


def _holder_gone(pid: int, st: os.stat_result) -> bool:
    """Is the supervisor whose pid the lock holds gone (dead, a zombie, or
    its pid reused), while others still hold the lock? False when it is
    another user's live process, whose descriptors we may not look at."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return not _has_open(pid, st)


def _has_open(pid: int, st: os.stat_result) -> bool:
    """Has process `pid` the file `st` describes open? (The file is the run
    user's to write: a pid it wrote there is believed only of a process of
    this run, which holds the lock's descriptor. Compared through /proc/PID/fd,
    the same view of the file as ours: /proc/locks names the device as the
    filesystem underneath sees it, which differs on overlayfs and btrfs.)"""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:         # gone, or another user's
        return False
    for name in names:
        try:
            other = os.stat(f"{fds}/{name}")
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def refuse_qmail_queue(root: Path) -> None:
    """Raise ConfigError if ROOT/queue is qmail's (mess/, todo/, info/)."""
    from engine.smtp.config import ConfigError
    queue = root / "queue"
    found = [d for d in QMAIL_QUEUE_DIRS if (queue / d).is_dir()]
    if found:
        raise ConfigError(
            f"cannot start: {queue} holds a qmail queue ({', '.join(d + '/' for d in found)}):"
            f" with qmail-send stopped, move it into the spool with `qrelay import-qmail"
            f" {root} {queue}`")


def check_services(root: Path, config: Any, schemes: set[str] | None = None) -> None:
    """Can every service of the table start with the configuration it has?
    The receivers' files were read into `config` already; the scheduler's
    (engine.delivery.service.load_delivery_config: settings, locals,
    concurrency*, queuelifetime, smtproutes, timeouts, DNS) and local
    delivery's (defaultdelivery, users/assign) are read here, so a bad file
    stops `qrelay run` before it binds, instead of a scheduler that
    crash-loops behind receivers taking mail. A listener of a TLS scheme
    (`schemes`) needs control/servercert.pem, and one that exists must load
    (engine.tls). Raises ConfigError (one line)."""
    from engine.smtp.config import ConfigError
    from engine.tls import TlsError, check_certificate
    try:
        check_certificate(root, config.settings.tls, schemes or set())
    except TlsError as exc:
        raise ConfigError(f"cannot start: {exc}") from None
    if not config.settings.scheduler.enabled:
        return
    from engine.delivery.service import DeliveryConfigError, load_delivery_config
    try:
        load_delivery_config(root)
    except DeliveryConfigError as exc:
        raise ConfigError(f"scheduler cannot start: {exc}") from None
    try:
        from engine.delivery.local.courier import load_local_config
        load_local_config(root)
        if (root / "users").is_dir():
            from engine.accounts.store import Accounts
            Accounts(root).assign()
    except Exception as exc:   # AccountsError, an unreadable file, a bad defaultdelivery
        raise ConfigError(f"local delivery cannot start: {exc}") from None


def _run_user(root: Path, settings: Any) -> RunUser | None:
    """`[run] user`, checked before anything starts (created if it is the
    default and missing); None when not root. Raises ConfigError (one line)."""
    from engine.smtp.config import ConfigError
    try:
        user = run_user(settings.run.user, create_default=True)
        if user is not None:
            check_installation(user)
            check_reachable(root, user)
            from engine.tls import CERT_FILE
            from engine.delivery.tlspolicy import CLIENT_CERT_FILE
            check_readable(root / CERT_FILE, user)   # the receivers load it
            check_readable(root / CLIENT_CERT_FILE, user)   # the scheduler does
    except (PrivilegeError, OSError) as exc:
        raise ConfigError(f"cannot start: {exc}") from None
    if user is not None:
        _config_readable_by(root, user, settings)
    return user


def _config_readable_by(root: Path, user: RunUser, settings: Any) -> None:
    """The receivers and the scheduler load the configuration as `user`: load
    it as they will, so a file only root may read (a control file left 0600)
    stops the start in one line instead of restarting every child in a loop."""
    from engine.delivery.service import DeliveryConfigError, load_delivery_config
    from engine.smtp.config import ConfigError, load_smtp_config
    with acting_as(user.uid, user.gid):
        try:
            load_smtp_config(root)
            if settings.scheduler.enabled:
                load_delivery_config(root)
        except (ConfigError, DeliveryConfigError) as exc:
            raise ConfigError(f"cannot start: as [run] user {user.name}: {exc}") from None


def _foreign_domains_warning(root: Path, user: RunUser) -> None:
    from engine.privilege import foreign_domains
    found = foreign_domains(root, user)
    if found:
        shown = ", ".join(f"{name} (uid {uid})" for name, uid in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        logging.getLogger("qrelay.run").warning(
            f"receivers run as {user.name} (uid {user.uid}) and cannot read the vpasswd of "
            f"{shown}{more}: RCPT checks, AUTH and POP3 for them fail with temporary errors; "
            f"set [run] user to their owner (e.g. vpopmail) in qrelay.toml")


def _assign_unreadable_warning(root: Path, user: RunUser) -> None:
    """users/assign (or users/cdb) only root may read: lspawn delivers, but
    the receivers, which read it as `user`, answer 451 to every RCPT check,
    AUTH and POP3 login of its domains (engine.smtp.policy)."""
    if not (root / "users").is_dir():
        return
    from engine.accounts.store import Accounts, AccountsError
    with acting_as(user.uid, user.gid):
        try:
            Accounts(root).assign()
        except AccountsError as exc:
            logging.getLogger("qrelay.run").warning(
                f"receivers run as {user.name} (uid {user.uid}) and cannot read the mailbox"
                f" list ({exc}): RCPT checks, AUTH and POP3 for its domains fail with temporary"
                f" errors; make users/ and its files readable by {user.name}")


def open_files_warning(config: Any, schemes: set[str]) -> None:
    """Raise the open-files limit the children inherit; say when it is still
    too small for the connection caps (engine.openfiles)."""
    from engine import openfiles
    soft = openfiles.raise_soft_limit()
    caps = config.concurrencyincoming
    if schemes & {"pop3", "pop3s"}:
        caps += config.settings.pop3.max_connections
    why = openfiles.shortfall(soft, caps)
    if why:
        logging.getLogger("qrelay.run").warning(why)


def stale_rules_warning(root: Path) -> None:
    """tcp.smtp edited after `qrelay tcprules`: the cdb is what is read; say so."""
    from engine.config.tcprules import stale_cdb
    why = stale_cdb(root / "control")
    if why:
        logging.getLogger("qrelay.run").warning(why)


def serve(root: Path, listen: list[ListenAddress], procs: int,
          announce: Callable[[list[ListenAddress]], None]) -> int:
    """Run qrelay in the foreground until TERM/INT; returns the exit status.
    Raises ConfigError / ListenError / AlreadyRunning before anything starts."""
    set_title(f"qrelay: supervisor {root}")
    # Every mode below is meant as written: an inherited umask of 000 (some
    # init systems) would make queue/lock/ and run/metrics/ world-writable.
    os.umask(0o022)
    # ALRM's and HUP's default action ends a process: a `qrelay flush` (which
    # finds us by the lock as soon as hold_queue took it), svc -h or
    # systemctl reload must not kill a start the Supervisor has no handlers
    # for yet. Nothing is lost: the flush marked the spool itself, and every
    # child reads the configuration when it starts.
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from engine.config.control import SettledChanges
    from engine.delivery.service import delivery_fingerprint
    from engine.smtp.config import ConfigError, config_fingerprint, load_smtp_config

    from engine import metrics
    from engine.status import check_listen

    refuse_qmail_queue(root)
    config = load_smtp_config(root)
    check_services(root, config, {addr.scheme for addr in listen})
    check_listen(listen, config.settings)
    smtp = config.settings.smtp
    user = _run_user(root, config.settings)
    mutex = hold_queue(root)
    lspawn = None
    try:
        check_spool_index(root, config.settings)
        # Before the first fork, under the lock: this run's counters only.
        # As run/'s owner: root emptying a run/metrics the run user made a
        # link would delete the *.db files wherever it points.
        try:
            with acting_as_owner(root / metrics.METRICS_DIR.parent):
                metrics.enable(root / metrics.METRICS_DIR)
        except OSError as exc:
            raise ConfigError(f"cannot empty {root / metrics.METRICS_DIR}: "
                              f"{exc.filename}: {exc.strerror}") from None
        from engine.delivery.lspawn import bind_lspawn, remove_lspawn_socket
        remove_lspawn_socket(root)     # a stale one would tell the scheduler to use it
        reuse_port = smtp.reuse_port and procs > 1
        listeners = bind_listeners(listen, reuse_port=reuse_port)
        own: list[list[Listener]] = []
        if reuse_port:
            own = [more_listeners(receivers_listeners(listeners)) for _ in range(procs - 1)]
        if user is not None:
            try:
                give_tree(root, user)
                lspawn = bind_lspawn(root, user.owner)
            except OSError as exc:   # a file where a directory goes, a full or read-only disk
                raise ConfigError(f"cannot start: {exc.filename or root / 'queue'}: "
                                  f"{exc.strerror}") from None
            except PrivilegeError as exc:   # a link to the tree it may not follow or reach
                raise ConfigError(f"cannot start: {exc}") from None
    except BaseException:
        os.close(mutex)
        raise
    sockets = [listener.sock for listener in listeners] + [l.sock for slot in own for l in slot]
    if lspawn is not None:
        sockets.append(lspawn)
    handler = None
    try:
        handler = _log_to_root(root, config.settings, user)
        open_files_warning(config, {addr.scheme for addr in listen})
        stale_rules_warning(root)
        if user is not None:
            _foreign_domains_warning(root, user)
            _assign_unreadable_warning(root, user)

        def fingerprint_now() -> tuple:
            # What the receivers read, and what the delivery side reads.
            return config_fingerprint(root), delivery_fingerprint(root)

        # A change is reloaded once it has held for a poll: never a file
        # caught half written or in an editor's remove-and-rewrite.
        watch = SettledChanges(fingerprint_now)
        tls = config.settings.tls
        tickets = TicketKeys(tls.ticket_key_seconds) if tls.ticket_key_seconds > 0 else None

        warned: list[tuple] = [()]

        def control_files_changed() -> bool:
            if tickets is not None:
                tickets.epoch()     # a receiver restarted later is forked with a current key
            if watch.changed():
                stale_rules_warning(root)
                start_only_warning(root, config.settings, warned)
                return True
            return False

        supervisor = Supervisor(
            services(root, config, listeners, procs, user, lspawn, tickets, own),
            # Each phase waits for the longest of the receivers' and the
            # scheduler's own grace (its running deliveries), plus margin.
            stop_grace=max(smtp.shutdown_grace, config.settings.scheduler.stop_grace) + 2.0,
            reload_check=control_files_changed,
            reload_poll=smtp.reload_poll_seconds,
            on_stop=lambda: [sock.close() for sock in sockets],
        )
        announce([bound_address(listener) for listener in listeners])
        return supervisor.run()
    finally:
        for sock in sockets:
            sock.close()
        if lspawn is not None:
            remove_lspawn_socket(root)
        if handler is not None:
            logging.getLogger("qrelay").removeHandler(handler)
            handler.log.close()
        os.close(mutex)
