"""One receiver process: an event loop serving SMTP sessions on inherited sockets.

A `Receiver` owns what the sessions of one process share: the current config
snapshot (swapped whole on reload; a connection keeps the snapshot it started
with), the process's `Spool` (opened after the fork), this process's rows of the
shared connection counts (SMTP's and POP3's) and the admission of a connection
against them and against the process's open-files limit (engine.openfiles),
the commit tasks in flight, and the graceful stop.
It never reads a control file on the hot path and never forks.

`receiver_main` is the body of a receiver process started by the supervisor:
uvloop loop, signal handlers (TERM = graceful stop, HUP = reload, ALRM =
harmless), sessions until stopped. Every commit started before the stop is
awaited before the spool is closed, so no accepted message is lost.

The receiver also owns its process's writer of ROOT/log/smtpd (engine.log.
SmtpdLog; every receiver appends to the same `current`): the sessions' lines
are buffered and written at most every LOG_FLUSH_SECONDS, in a thread of its
own, never one write per line; the rare `logging` records of qrelay.receiver and
qrelay.smtpd go there too (at once), instead of to ROOT/log/current.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine import metrics, openfiles
from engine.log import LogHandler, SmtpdLog
from engine.relay import RelayTable, open_relay_table
from engine.relay.throttle import LoginThrottle
from engine.smtp.connlimit import ConnectionCounter, ConnectionTable
from engine.smtp.auth import PasswordChecker
from engine.smtp.listeners import IMPLICIT_TLS_SCHEMES, Listener
from engine.smtp.remotehost import RemoteHostResolver
from engine.smtp.session import SmtpSession
from engine.tls import ServerTls, TlsError
from engine.tls_tickets import TicketKeys

log = logging.getLogger("qrelay.receiver")

# The smtpd log's lines wait at most this long in memory (tail -f stays live;
# under load one write carries the lines of thousands of connections).
LOG_FLUSH_SECONDS = 0.1


class Receiver:
    """The process-wide side of the SMTP sessions (see the module docstring)."""

    def __init__(self, config: Any, spool: Any, counter: ConnectionCounter,
                 *, load_config: Callable[[], Any] | None = None,
                 log: SmtpdLog | None = None, tickets: TicketKeys | None = None,
                 pop3_counter: ConnectionCounter | None = None) -> None:
        self.config = config
        self.tickets = tickets          # the run's shared TLS session-ticket keys
        self.spool = spool
        self.counter = counter          # SMTP's counts; it also numbers every connection
        self.pop3_counter = pop3_counter or ConnectionTable(1, ("pop3",)).counter(0, "pop3")
        # Sessions this process may hold before its descriptors run out.
        self.room = openfiles.room()
        # Bytes of message the sessions hold in memory (DATA coming in, commits
        # in flight), against [smtp] max_buffered_bytes (SmtpSession._hold).
        self.buffered = 0
        self.load_config = load_config
        self.pid = os.getpid()
        self.uid = os.getuid()
        self.sessions: set[SmtpSession] = set()
        # Implicit-TLS connections still in their handshake (admit_handshake).
        self.handshakes = 0
        self.tasks: set[asyncio.Task] = set()
        self.side_tasks: set[asyncio.Task] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.closing = False
        self.sweeper: asyncio.Task | None = None
        self.stopped = asyncio.Event()
        self.host_resolver: RemoteHostResolver | None = None
        # spool_space_short's last look at the spool's filesystem.
        self._space_at = 0.0
        self._space_free: int | None = None
        self._space_short = False
        self._tls: ServerTls | None = None
        # POP-before-SMTP table and login throttle (engine.relay), set by
        # receiver_main after the fork; None: no relay table (in-process tests).
        self.relay: RelayTable | None = None
        self.throttle: LoginThrottle | None = None
        self._passwords: PasswordChecker | None = None
        self.pop3: Any = None          # engine.pop3.service.Pop3Service, on first use
        self.log: SmtpdLog | None = None
        self._log_timer: asyncio.TimerHandle | None = None
        self._log_writer: ThreadPoolExecutor | None = None
        self._log_writing = False
        if log is not None:
            self.attach_log(log)

    # --- the smtpd log ---------------------------------------------------------------

    def attach_log(self, smtpd_log: SmtpdLog) -> None:
        """Sessions opened from now on write their lines to `smtpd_log`."""
        self.log = smtpd_log
        smtpd_log.on_first_line = self._schedule_log_flush
        if self._log_writer is None:
            # One thread: writes (and a rotation's fsync) never block the loop.
            self._log_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smtpd-log")

    def _schedule_log_flush(self) -> None:
        if self._log_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:   # a line before the loop runs: the next one schedules
                return
            self._log_timer = loop.call_later(LOG_FLUSH_SECONDS, self._flush_log)

    def _flush_log(self) -> None:
        self._log_timer = None
        if self.log is None or self._log_writing:
            return             # a write in flight reschedules when it is done
        if self._log_writer is None:    # stopped: the last lines, written here
            self.log.flush()
            return
        try:
            done = asyncio.get_running_loop().run_in_executor(self._log_writer, self.log.flush)
        except RuntimeError:    # no thread to be had (ulimit -u counts threads): written here
            self.log.flush()
            if self.log.pending:      # a failed write (disk full): later
                self._schedule_log_flush()
            return
        self._log_writing = True
        done.add_done_callback(self._log_written)

    def _log_written(self, done: asyncio.Future) -> None:
        self._log_writing = False
        if self.log is not None and self.log.pending:
            # Lines that came meanwhile, or a failed write (disk full): later.
            self._schedule_log_flush()

    # --- used by sessions -------------------------------------------------------------

    def spool_space_short(self, size: int = 0) -> bool:
        """Is the spool's filesystem below [spool] min_free_bytes (plus 1.5 x
        `size`, a MAIL's SIZE=, as Postfix asks)? Looked up at most once a
        second; a filesystem that cannot be asked is not short."""
        need = self.config.settings.spool.min_free_bytes
        if need <= 0:
            return False
        now = time.monotonic()
        if now >= self._space_at:
            self._space_at = now + 1.0
            try:
                vfs = os.statvfs(self.config.root / "queue")
                free = vfs.f_bavail * vfs.f_frsize
            except OSError:
                free = None
            short = free is not None and free < need
            if short != self._space_short and self.log is not None:
                self.log.warning(
                    f"spool filesystem has {free} bytes free, below [spool] min_free_bytes "
                    f"{need}: MAIL gets 452" if short else
                    "spool filesystem has room again: MAIL accepted")
            self._space_free, self._space_short = free, short
        return self._space_short or (size > 0 and self._space_free is not None
                                     and self._space_free < need + size * 3 // 2)

    def remote_hosts(self) -> RemoteHostResolver:
        """PTR lookups for settings.smtp.reverse_dns (created on first use, and
        after a reload changed what it is made from)."""
        if self.host_resolver is None:
            delivery = self.config.settings.delivery
            self.host_resolver = RemoteHostResolver(
                delivery.dns_servers, delivery.dns_timeout,
                paranoid=self.config.settings.smtp.reverse_dns_paranoid)
        return self.host_resolver

    @property
    def tls(self) -> ServerTls:
        """control/servercert.pem's context (engine.tls), loaded on first use."""
        if self._tls is None:
            self._tls = ServerTls(self.config.root, self.config.settings.tls, tickets=self.tickets)
        return self._tls

    def passwords(self) -> PasswordChecker:
        """SMTP AUTH's checker (engine.smtp.auth), with its hashing threads, on first use."""
        if self._passwords is None:
            from engine.accounts.store import Accounts
            st = self.config.settings.auth
            accounts = Accounts(self.config.root,
                                default_domain=self.config.settings.accounts.default_domain)
            self._passwords = PasswordChecker(accounts, st.hash_threads,
                                              cache_seconds=st.cache_seconds,
                                              cache_entries=st.cache_entries,
                                              max_password_bytes=st.max_password_bytes)
        return self._passwords

    def admit(self, counter: ConnectionCounter, ip: str, max_total: int, max_per_ip: int
              ) -> str | None:
        """Count a new connection of `counter`'s service and return None, or
        return why not: "files" (this process is near its open-files limit),
        "total" or "ip" (the service's caps)."""
        if len(self.sessions) + self.handshakes >= self.room:
            return "files"
        return counter.admit(ip, max_total, max_per_ip)

    def refusal_detail(self, refused: str, total: str, max_per_ip: int) -> str:
        """The log's reason for admit()'s refusal `refused`; `total` is the
        service's own count for "total"."""
        return (total if refused == "total" else
                f"max_connections_per_ip {max_per_ip}" if refused == "ip" else
                f"{len(self.sessions)} sessions in this receiver: open files limit")

    def admit_handshake(self, scheme: str, ip: str) -> Callable[[], None] | None:
        """An implicit-TLS connection (engine.tls.ImplicitTls) counted against
        its service's caps and the open-files room while its handshake runs;
        the call that releases it, or None when it is refused (logged; it is
        closed without a handshake: no reply can be read before one)."""
        cfg = self.config
        if scheme == "pop3":
            counter = self.pop3_counter
            cap, per_ip = cfg.settings.pop3.max_connections, cfg.settings.pop3.max_connections_per_ip
        else:
            counter = self.counter
            cap, per_ip = cfg.concurrencyincoming, cfg.settings.smtp.max_connections_per_ip
        refused = self.admit(counter, ip, cap, per_ip)
        if refused is not None:
            metrics.session_refused("limit", scheme)
            if self.log is not None:
                why = self.refusal_detail(refused, f"status: {counter.total()}/{cap}", per_ip)
                self.log.smtpd(self.counter.next_number(), ip,
                               f"{scheme} TLS connection refused: too many connections ({why})")
            return None
        self.handshakes += 1

        def release() -> None:
            self.handshakes -= 1
            counter.release(ip)
        return release

    def start_task(self, coro: Any) -> asyncio.Task:
        """A side task of a session (host name lookup): cancelled at shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self.side_tasks.add(task)
        task.add_done_callback(self.side_tasks.discard)
        return task

    def start_commit(self, session: SmtpSession, envelope: Any, message: bytes) -> asyncio.Task:
        """A commit: shutdown waits for every one of them."""
        task = asyncio.get_running_loop().create_task(session.commit(envelope, message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- serving --------------------------------------------------------------------

    def protocol_factory(self, scheme: str) -> Callable[[], asyncio.Protocol]:
        """What this process serves on a listener of `scheme` (listeners.SCHEMES)."""
        if scheme in ("smtp", "submission", "submissions"):
            return lambda: SmtpSession(self, scheme)
        if scheme in ("pop3", "pop3s"):
            from engine.pop3.service import Pop3Service
            from engine.pop3.session import Pop3Session
            pop3 = Pop3Service.of(self)
            return lambda: Pop3Session(pop3, tls=scheme == "pop3s")
        raise ValueError(f"no protocol for listener scheme {scheme!r}")

    async def serve(self, listeners: Iterable[Listener]) -> None:
        loop = asyncio.get_running_loop()
        for listener in listeners:
            factory = self.protocol_factory(listener.scheme)
            if listener.scheme in IMPLICIT_TLS_SCHEMES:
                self.tls.required = True
                if self.tls.context() is None:       # `qrelay run` checks this before it starts
                    raise TlsError(self.tls.error or "no certificate")
                factory = self.tls.implicit(factory, listener.scheme, self.admit_handshake)
            server = await loop.create_server(factory, sock=listener.sock, backlog=1024)
            self.servers.append(server)
        self.sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        # One timer for all sessions instead of one per read: timeoutsmtpd has
        # second granularity in qmail too.
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for session in list(self.sessions):
                session.check_idle(now)

    def reload(self) -> bool:
        """Swap in a fresh config snapshot; keep the old one if the new is broken."""
        if self.load_config is None:
            return False
        try:
            config = self.load_config()
        except Exception as exc:  # ConfigError or SettingsError: keep serving
            log.warning("reload failed, keeping the previous configuration: %s", exc)
            return False
        if _resolver_settings(config) != _resolver_settings(self.config):
            self.host_resolver = None       # lookups in flight end on the old one
        self.config = config
        if self._tls is not None:
            self._tls.reload(config.settings.tls)
        # Logins without a domain: AUTH's and POP3's accounts were made with the old one.
        default_domain = config.settings.accounts.default_domain
        if self._passwords is not None:
            self._passwords.accounts.set_default_domain(default_domain)
        if self.pop3 is not None:
            self.pop3.accounts.set_default_domain(default_domain)
        log.info("configuration reloaded")
        return True

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let messages in flight finish (at most `grace` seconds),
        then close the rest; every commit started is awaited."""
        self.closing = True
        for server in self.servers:
            server.close()
        for task in list(self.side_tasks):
            task.cancel()
        for session in list(self.sessions):
            session.begin_shutdown()
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions):
            if not session.busy() or time.monotonic() >= deadline:
                session.abort()
        if self.tasks:
            # A commit the spool has started must complete: its message may be
            # durable already, and closing the spool under it could tear it.
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self._log_timer is not None:
            self._log_timer.cancel()
            self._log_timer = None
        if self._log_writer is not None:
            self._log_writer.shutdown(wait=True)   # a write in flight ends first
            self._log_writer = None
        if self.log is not None:
            self.log.flush()
        if self._passwords is not None:
            self._passwords.close()
        if self._tls is not None:
            self._tls.close()
        self.stopped.set()


def _resolver_settings(config: Any) -> tuple:
    """What Receiver.remote_hosts's resolver is made from."""
    delivery = config.settings.delivery
    return delivery.dns_servers, delivery.dns_timeout, config.settings.smtp.reverse_dns_paranoid


def receiver_main(root: str, listeners: list[Listener], counter: ConnectionCounter,
                  tickets: TicketKeys | None = None,
                  pop3_counter: ConnectionCounter | None = None) -> None:
    """Body of one receiver process (called in the forked child, which the
    supervisor has already tied to its own life)."""
    import uvloop

    from engine.proctitle import set_title
    from engine.smtp.config import load_smtp_config
    from engine.queue.writer import open_spool_writer

    set_title(f"qrelay: receiver {counter.slot}")
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    rootp = Path(root)
    try:
        config = load_smtp_config(rootp)
        # Through the single spool writer when it runs (see engine/queue/writer.py).
        spool = open_spool_writer(rootp / "queue", config.settings.spool)
        smtpd_log = SmtpdLog(rootp / "log" / "smtpd", max_bytes=config.settings.log.max_bytes,
                             max_files=config.settings.log.max_files,
                             fmt=config.settings.log.format)
    except Exception as exc:
        # Before the smtpd log: this one goes where the supervisor's lines go.
        log.error("receiver %d cannot start: %s", os.getpid(), exc)
        raise SystemExit(1) from None
    # This process's records into log/smtpd (not ROOT/log/current, not stderr).
    handler = LogHandler(smtpd_log)
    for name in ("qrelay.receiver", "qrelay.smtpd", "qrelay.relay"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    # A reload keeps the [spool] this process's spool writer client was made with.
    receiver = Receiver(config, spool, counter,
                        load_config=lambda: load_smtp_config(rootp, spool=config.settings.spool),
                        log=smtpd_log, tickets=tickets, pop3_counter=pop3_counter)
    # Opened here, after the fork (it connects lazily); its store is read at start only.
    receiver.relay = open_relay_table(rootp, config.settings)
    receiver.throttle = LoginThrottle(receiver.relay, config.settings)
    stop = asyncio.Event()

    async def main() -> None:
        # Handlers are installed from inside the running loop: uvloop drops a
        # signal that arrives between add_signal_handler and the loop's start
        # (a TERM before this point still finds the default action: exit).
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, receiver.reload)
        # SIGALRM means "flush the queue" to qmail-send; a receiver has nothing
        # to flush, but the default action (terminate) must never apply.
        loop.add_signal_handler(signal.SIGALRM,
                                lambda: log.debug("receiver %d: SIGALRM ignored", receiver.pid))
        await receiver.serve(listeners)
        await stop.wait()
        await receiver.shutdown(receiver.config.settings.smtp.shutdown_grace)
        await receiver.relay.close()

    try:
        loop.run_until_complete(main())
    finally:
        spool.close()
        loop.close()
        smtpd_log.close()
