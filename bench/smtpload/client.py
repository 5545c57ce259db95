"""The SMTP client engine behind flood.py: one process, one event loop,
`sessions` concurrent connections, each an asyncio Protocol state machine.

Owns: the per-process message budget, the rate cap, the --duration deadline,
and the counters/histograms of one worker (FloodStats). Every message it
claims ends in exactly one outcome: accepted, tempfailed (4xx), permfailed
(5xx), conn_failed (the connection broke or could not be made) or unfinished
(still in flight when --duration's drain time ran out). Replies are parsed in
bulk per data_received; with PIPELINING, MAIL+RCPT+DATA go out in one write.
Must never block the loop and never keep per-message state after the message.
"""
from __future__ import annotations

import asyncio
import errno
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .hist import LatencyHistogram
from .tls_session import SessionCache

# Stages: what a reply answers. Names appear in the summary and --json.
CONNECT, EHLO, HELO, RSET_PRE, MAIL, RCPT, DATA, EOD, RSET_NOOP, QUIT, STARTTLS, AUTH = range(12)
STAGE_NAMES = ("CONNECT", "EHLO", "HELO", "RSET", "MAIL", "RCPT", "DATA",
               "END-OF-DATA", "RSET", "QUIT", "STARTTLS", "AUTH")

# Distinct (stage, code, text) keys kept; a server with a unique id in every
# error text must not make the summary (or memory) grow without bound.
MAX_REPLY_KEYS = 64
REPLY_TEXT_CHARS = 80
# Bytes of a reply kept while waiting for its end: a server that never ends a
# line must not make flood hold unbounded memory.
MAX_REPLY_BUFFER = 65536
# "Service not available, closing transmission channel" (RFC 5321 3.8), at
# any command: nothing more is sent on that connection.
CLOSING = 421
# Seconds a session waits after a failed connect before it tries again.
CONNECT_RETRY_DELAY = 0.01


@dataclass(slots=True, frozen=True)
class FloodConfig:
    host: str
    port: int
    sessions: int = 1
    messages: int = 1            # 0 = no count limit (needs duration)
    duration: float = 0.0        # seconds; 0 = until messages are done
    per_conn: int = 1            # messages per connection; 0 = unlimited
    rcpts: int = 1
    pipelining: bool = False
    noop: bool = False
    rate: float = 0.0            # messages/s cap for this process; 0 = none
    helo: str = "flood.bench.test"
    ehlo: bool = True            # EHLO (needed for PIPELINING) or plain HELO
    sender: str = "flood@bench.test"
    recipient: str = "user{i}@{domain}"
    domains: tuple[tuple[str, float], ...] = (("sink.test", 1.0),)
    bodies: tuple[bytes, ...] = ()   # wire form (CRLF, dot-stuffed), no final "."
    unique_header: bytes = b"Message-ID"  # header prepended per message
    timeout: float = 30.0        # seconds without a reply before a connection is dropped
    drain: float = 2.0           # seconds in-flight work may finish after --duration
    seed: int | None = None
    rand_range: int = 1_000_000  # {rand} is drawn from 0 .. rand_range-1
    seq_start: int = 0           # message numbers: seq_start + k * seq_step
    seq_step: int = 1
    starttls: bool = False       # STARTTLS after EHLO (certificate not verified), then EHLO again
    auth: str = ""               # "user:password": AUTH PLAIN before the first MAIL
    tls_resume: bool = False     # offer the server's last TLS session on each new connection


@dataclass(slots=True)
class FloodStats:
    attempted: int = 0
    sent: int = 0
    accepted: int = 0
    tempfailed: int = 0
    permfailed: int = 0
    conn_failed: int = 0
    unfinished: int = 0
    rcpt_accepted: int = 0
    rcpt_rejected: int = 0
    connections: int = 0
    bytes_sent: int = 0
    tls_handshakes: int = 0
    tls_resumed: int = 0          # of which resumed a session (--tls-resume)
    conn_errors: dict = field(default_factory=dict)   # kind -> count
    replies: dict = field(default_factory=dict)       # (stage, code, text) -> count
    connect_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    txn_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    started: float = 0.0          # time.monotonic(), comparable across processes
    finished: float = 0.0

    def reply_error(self, stage: int, code: int, text: bytes) -> None:
        key = (STAGE_NAMES[stage], code, text[:REPLY_TEXT_CHARS].decode("latin-1").strip())
        replies = self.replies
        if key not in replies and len(replies) >= MAX_REPLY_KEYS:
            key = (STAGE_NAMES[stage], code, "(other texts)")
        replies[key] = replies.get(key, 0) + 1

    def conn_error(self, kind: str) -> None:
        self.conn_errors[kind] = self.conn_errors.get(kind, 0) + 1

    def progress(self) -> dict:
        return {"attempted": self.attempted, "accepted": self.accepted,
                "errors": self.tempfailed + self.permfailed + self.conn_failed,
                "tempfailed": self.tempfailed, "permfailed": self.permfailed,
                "conn_failed": self.conn_failed}

    def to_state(self) -> dict:
        """Plain data (picklable, mergeable) for the parent process."""
        return {
            "counters": {k: getattr(self, k) for k in COUNTERS},
            "conn_errors": dict(self.conn_errors),
            "replies": [[*k, v] for k, v in self.replies.items()],
            "connect_latency": self.connect_latency.to_state(),
            "txn_latency": self.txn_latency.to_state(),
            "started": self.started, "finished": self.finished,
        }

    def merge_state(self, state: dict) -> None:
        for k, v in state["counters"].items():
            setattr(self, k, getattr(self, k) + v)
        for k, v in state["conn_errors"].items():
            self.conn_errors[k] = self.conn_errors.get(k, 0) + v
        for stage, code, text, n in state["replies"]:
            key = (stage, code, text)
            self.replies[key] = self.replies.get(key, 0) + n
        self.connect_latency.merge(LatencyHistogram.from_state(state["connect_latency"]))
        self.txn_latency.merge(LatencyHistogram.from_state(state["txn_latency"]))
        if state["started"] and (not self.started or state["started"] < self.started):
            self.started = state["started"]
        self.finished = max(self.finished, state["finished"])


COUNTERS = ("attempted", "sent", "accepted", "tempfailed", "permfailed", "conn_failed",
            "unfinished", "rcpt_accepted", "rcpt_rejected", "connections", "bytes_sent",
            "tls_handshakes", "tls_resumed")


class EnvelopeMaker:
    """MAIL/RCPT command bytes from the --from/--to templates.

    Placeholders: {n} message number, {i} recipient index, {domain} a domain
    drawn from the weighted mix, {rand} a random number, {session} the session.
    Templates without placeholders are rendered once.
    """

    def __init__(self, cfg: FloodConfig, rng: random.Random):
        self.rng = rng
        self.sender = cfg.sender
        self.recipient = cfg.recipient
        self.rcpts = cfg.rcpts
        self.rand_range = cfg.rand_range
        names = [d for d, _ in cfg.domains]
        weights = [w for _, w in cfg.domains]
        self.names = names
        self.cum = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)
        self.single = names[0] if len(names) == 1 else None
        self.static_mail = self._static(cfg.sender, "MAIL FROM:<%s>\r\n")
        self.static_rcpts: list[bytes] | None = None
        if self.single is not None and "{" not in cfg.recipient.replace(
                "{domain}", "").replace("{i}", ""):
            # Only {i} and one {domain}: every message has the same recipients.
            self.static_rcpts = [
                f"RCPT TO:<{cfg.recipient.format(domain=self.single, i=i)}>\r\n".encode()
                for i in range(cfg.rcpts)]

    def _static(self, template: str, fmt: str) -> bytes | None:
        if "{" not in template:
            return (fmt % template).encode()
        if self.single is not None and "{" not in template.replace("{domain}", ""):
            return (fmt % template.format(domain=self.single)).encode()
        return None

    def domain(self) -> str:
        if self.single is not None:
            return self.single
        x = self.rng.random() * self.cum[-1]
        for name, edge in zip(self.names, self.cum):
            if x < edge:
                return name
        return self.names[-1]

    def _render(self, template: str, n: int, i: int, session: int) -> str:
        return template.format(n=n, i=i, session=session, domain=self.domain(),
                               rand=self.rng.randrange(self.rand_range))

    def mail(self, n: int, session: int) -> bytes:
        if self.static_mail is not None:
            return self.static_mail
        return f"MAIL FROM:<{self._render(self.sender, n, 0, session)}>\r\n".encode()

    def rcpt_list(self, n: int, session: int) -> list[bytes]:
        if self.static_rcpts is not None:
            return self.static_rcpts
        return [f"RCPT TO:<{self._render(self.recipient, n, i, session)}>\r\n".encode()
                for i in range(self.rcpts)]


def validate_templates(cfg: FloodConfig) -> None:
    """Raise ValueError (one line) when a template names an unknown placeholder."""
    for name, template in (("--from", cfg.sender), ("--to", cfg.recipient)):
        try:
            template.format(n=0, i=0, session=0, domain="d.test", rand=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{name} template {template!r}: bad placeholder {exc}") from None
        rendered = template.format(n=0, i=0, session=0, domain="d.test", rand=0)
        if any(c in rendered for c in "<>\r\n\0 "):
            raise ValueError(f"{name} template {template!r} renders an invalid address")


def _is_pipelining(text: bytes) -> bool:
    """An EHLO reply line (after its code) names the PIPELINING keyword, in
    any case (RFC 5321 2.4), not merely contains the word."""
    return text[:10].upper() == b"PIPELINING" and not text[10:].strip()


def _errno_kind(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        # Its errno is OpenSSL's error class (1 = SSL_ERROR_SSL), not an errno.
        return (exc.reason or "ssl error").lower().replace("_", " ")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "connect timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno)).lower()
    return type(exc).__name__


class FloodRun:
    """One worker's share of the flood: its sessions, budget and stats."""

    def __init__(self, cfg: FloodConfig, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        self.rng = random.Random(cfg.seed)
        self.env = EnvelopeMaker(cfg, self.rng)
        self.stats = FloodStats()
        self.remaining = cfg.messages if cfg.messages > 0 else -1
        self.claimed = 0
        self.stopping = False
        self.cutting = False
        self.clients: set[SmtpClient] = set()
        self.connecting: dict[asyncio.Task, float] = {}
        self.live_sessions = 0
        self.done = loop.create_future()
        self.t0 = 0.0
        self.deadline = 0.0
        self.timers: list[asyncio.TimerHandle] = []
        # Messages claimed but waiting for their --rate slot: handle -> callback.
        self.slot_waits: dict[asyncio.TimerHandle, Callable[[], None]] = {}
        # Set when the first wave of connects all failed: the target is down,
        # and burning through the message budget would only hide that.
        self.unreachable: str | None = None
        bodies = cfg.bodies or (b"\r\n",)
        self.bodies = [b + b".\r\n" for b in bodies]
        self.bodies_quit = [b + b".\r\nQUIT\r\n" for b in bodies]
        self.ehlo = f"EHLO {cfg.helo}\r\n".encode()
        self.helo = f"HELO {cfg.helo}\r\n".encode()
        self.tls_context = None
        if cfg.starttls:
            # A load generator: the server's certificate is not checked. No CA
            # store either (not create_default_context): OpenSSL builds the
            # chain even when it will not check it, and the system store made
            # it scan /etc/ssl/certs on every handshake (a third of flood's
            # handshake CPU, on the CPUs the server under test shares).
            self.tls_context = (SessionCache if cfg.tls_resume else ssl.SSLContext)(ssl.PROTOCOL_TLS_CLIENT)
            self.tls_context.check_hostname = False
            self.tls_context.verify_mode = ssl.CERT_NONE
        self.auth_line = b""
        if cfg.auth:
            import base64
            user, _, password = cfg.auth.partition(":")
            self.auth_line = b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n"
        self.uniq = cfg.unique_header + b": <%d.%d@flood.bench.test>\r\n"
        self.uniq_pid = random.Random(cfg.seed).randrange(1 << 30) if cfg.seed is not None \
            else (id(self) ^ int(time.time() * 1e6)) & 0x3FFFFFFF

    # --- budget -------------------------------------------------------------
    def claim(self) -> int:
        """A message number to send next, or -1 when this worker is done."""
        if self.stopping:
            return -1
        if self.remaining == 0:
            return -1
        if self.remaining > 0:
            self.remaining -= 1
        k = self.claimed
        self.claimed += 1
        self.stats.attempted += 1
        return self.cfg.seq_start + k * self.cfg.seq_step

    def slot_delay(self) -> float:
        """Seconds to wait before the message just claimed may start (--rate)."""
        rate = self.cfg.rate
        if rate <= 0:
            return 0.0
        due = self.t0 + (self.claimed - 1) / rate
        return due - time.monotonic()

    def wait_slot(self, delay: float, callback: Callable[..., None], *args) -> None:
        """callback(*args) after `delay`, or at once when the run stops (it
        then starts nothing): a slot past the end must not hold the run."""
        def due() -> None:
            del self.slot_waits[handle]
            callback(*args)
        handle = self.loop.call_later(delay, due)
        self.slot_waits[handle] = due

    # --- sessions -----------------------------------------------------------
    def start(self) -> None:
        self.t0 = time.monotonic()
        self.stats.started = self.t0
        cfg = self.cfg
        if cfg.duration > 0:
            self.deadline = self.t0 + cfg.duration
            self.timers.append(self.loop.call_at(
                self.loop.time() + cfg.duration, self.stop))
        self.timers.append(self.loop.call_later(1.0, self._watchdog))
        for i in range(cfg.sessions):
            self.live_sessions += 1
            self.next_connection(i)
        self._maybe_done()

    def next_connection(self, session: int) -> None:
        seq = self.claim()
        if seq < 0:
            self.live_sessions -= 1
            self._maybe_done()
            return
        delay = self.slot_delay() if self.cfg.rate > 0 else 0.0
        if delay > 0:
            self.wait_slot(delay, self._spawn_connect, session, seq)
        else:
            self._spawn_connect(session, seq)

    def _spawn_connect(self, session: int, seq: int) -> None:
        if self.stopping:
            self.stats.attempted -= 1  # claimed but never started: not a message
            self.live_sessions -= 1
            self._maybe_done()
            return
        t = time.perf_counter()
        cfg = self.cfg
        # A Task per connect, with a done-callback rather than a wrapping
        # coroutine (one frame less per message); the watchdog cancels
        # connects older than --timeout.
        task = self.loop.create_task(self.loop.create_connection(
            lambda: SmtpClient(self, session, seq, t), cfg.host, cfg.port))
        self.connecting[task] = t
        task.add_done_callback(lambda task: self._connected(task, session))

    def _connected(self, task: asyncio.Task, session: int) -> None:
        del self.connecting[task]
        exc = None if not task.cancelled() else asyncio.CancelledError()
        if exc is None:
            exc = task.exception()
            if exc is None:
                return
        if self.cutting:
            self.stats.unfinished += 1
            self.live_sessions -= 1
            self._maybe_done()
            return
        kind = "connect timeout" if isinstance(exc, asyncio.CancelledError) else _errno_kind(exc)
        self.stats.conn_error(kind)
        self.stats.conn_failed += 1
        if self.stats.connections == 0 and self.stats.conn_failed >= self.cfg.sessions:
            self.unreachable = kind
            self.stop()
            self.connection_ended(session)
        else:
            # A server that went away mid-run: retry soon, not in a tight loop.
            self.loop.call_later(CONNECT_RETRY_DELAY, self.connection_ended, session)

    def connection_ended(self, session: int) -> None:
        if self.stopping or self.remaining == 0:
            self.live_sessions -= 1
            self._maybe_done()
        else:
            self.next_connection(session)

    def _maybe_done(self) -> None:
        if self.live_sessions <= 0 and not self.done.done():
            self.stats.finished = time.monotonic()
            for timer in self.timers:
                timer.cancel()
            self.done.set_result(None)

    def stop(self) -> None:
        """No new messages; in-flight ones get `drain` seconds, then are cut."""
        if self.stopping:
            return
        self.stopping = True
        if not self.stats.finished:
            self.stats.finished = time.monotonic()
        self.timers.append(self.loop.call_later(self.cfg.drain, self._cut))
        for handle, due in list(self.slot_waits.items()):
            handle.cancel()
            due()
        # Idle connections between messages have nothing to finish.
        for client in list(self.clients):
            client.on_stop()

    def _cut(self) -> None:
        self.cutting = True
        for task in list(self.connecting):
            task.cancel()
        for client in list(self.clients):
            client.cut()

    def _watchdog(self) -> None:
        now = time.perf_counter()
        limit = self.cfg.timeout
        for client in list(self.clients):
            # A client that received nothing since the last round while
            # waiting for a reply has been idle for another second.
            if client.expect and client.nrecv == client.wd_seen:
                client.wd_idle += 1
                if client.wd_idle >= limit:
                    client.timed_out()
            else:
                client.wd_seen = client.nrecv
                client.wd_idle = 0
        for task, started in list(self.connecting.items()):
            if now - started > limit:
                task.cancel()
        self.timers.append(self.loop.call_later(1.0, self._watchdog))


class SmtpClient(asyncio.Protocol):
    """One SMTP connection of a session: a reply-driven state machine."""

    __slots__ = ("run", "stats", "session", "seq", "t_connect", "t_txn", "nrecv",
                 "wd_seen", "wd_idle",
                 "transport", "expect", "buf", "pipelining", "ehlo_pipelining",
                 "on_conn", "rcpt_ok", "txn_fail", "need_rset", "closing",
                 "pending", "quit_sent", "_rcpts_left", "rcpt_next",
                 "tls_done", "authed", "resumed", "upgrading")

    def __init__(self, run: FloodRun, session: int, seq: int, t_connect: float):
        self.run = run
        self.stats = run.stats
        self.session = session
        self.seq = seq
        self.pending = True      # a claimed message has no outcome yet
        self.t_connect = t_connect
        self.t_txn = 0.0
        self.nrecv = 0           # chunks received: the watchdog's sign of life
        self.wd_seen = -1
        self.wd_idle = 0
        self.transport = None
        self.expect: deque[int] = deque((CONNECT,))
        self.buf = b""
        self.pipelining = False
        self.ehlo_pipelining = False
        self.on_conn = 0
        self.rcpt_ok = 0
        self.txn_fail = 0        # 0, or the code that failed the message
        self.need_rset = False
        self.closing = False
        self.quit_sent = False
        self._rcpts_left: list[bytes] = []
        self.rcpt_next = 0
        self.tls_done = False
        self.authed = False
        self.resumed = False
        self.upgrading = False   # from the 220 to STARTTLS to the handshake's end:
                                 # nothing read in clear, _upgrade counts a loss

    # --- asyncio callbacks --------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.stats.connections += 1
        self.run.clients.add(self)

    def connection_lost(self, exc) -> None:
        run = self.run
        run.clients.discard(self)
        if self.pending and not self.upgrading:
            self._count_lost(_errno_kind(exc) if exc else "closed by server")
        self.transport = None
        run.connection_ended(self.session)

    def _count_lost(self, kind: str) -> None:
        """The connection is gone under the pending message: its one outcome."""
        if not self.pending:
            return
        if self.txn_fail:
            # Refused (a pipelined 421 or 5xx) and then closed: the reply is the outcome.
            self._outcome(self.txn_fail)
        elif self.run.stopping and self.closing:
            self.pending = False
            self.stats.unfinished += 1
        else:
            self.pending = False
            self.stats.conn_failed += 1
            self.stats.conn_error(kind)

    def data_received(self, data: bytes) -> None:
        self.nrecv += 1
        expect = self.expect
        if not self.buf and len(expect) == 1:
            # Fast path (no pipelining, the usual case): exactly one
            # single-line reply in this chunk.
            eol = data.find(b"\n")
            if eol == len(data) - 1 and eol >= 4 and data[3] == 32:
                head = data[:3]
                if head.isdigit():
                    self._reply(expect.popleft(), int(head), data[4:eol])
                    return
        if self.upgrading:
            return  # sent in clear after the 220 to STARTTLS: never read (RFC 3207)
        buf = self.buf + data if self.buf else data
        pos = 0
        end = len(buf)
        while pos < end:
            eol = buf.find(b"\n", pos)
            if eol < 0:
                break
            if eol - pos >= 4 and buf[pos + 3] == 45:  # "250-..." continuation
                if self.expect and self.expect[0] == EHLO and _is_pipelining(buf[pos + 4:eol]):
                    self.ehlo_pipelining = True
                pos = eol + 1
                continue
            head = buf[pos:pos + 3]
            text = buf[pos + 4:eol]
            pos = eol + 1
            if not head.isdigit():
                self._protocol_error()
                return
            if self.expect:
                self._reply(self.expect.popleft(), int(head), text)
            if self.transport is None or self.upgrading or self.closing and not self.expect:
                self.buf = b""
                return
        rest = buf[pos:]
        if len(rest) > MAX_REPLY_BUFFER:
            self._protocol_error()
            return
        self.buf = rest

    def eof_received(self):
        return None  # close our side too; connection_lost does the accounting

    # --- the state machine --------------------------------------------------
    def _reply(self, stage: int, code: int, text: bytes) -> None:
        ok = 200 <= code < 300
        if stage == RCPT:
            if ok:
                self.rcpt_ok += 1
                self.stats.rcpt_accepted += 1
            else:
                self.stats.rcpt_rejected += 1
                if not self.txn_fail:
                    self.stats.reply_error(RCPT, code, text)
            if not self.pipelining:
                i = self.rcpt_next
                if code == CLOSING:
                    self._finish(code)
                elif i < len(self._rcpts_left):
                    self.rcpt_next = i + 1
                    self.expect.append(RCPT)
                    self.transport.write(self._rcpts_left[i])
                elif self.rcpt_ok:
                    if self.run.cfg.noop:
                        self._write(b"RSET\r\n", RSET_NOOP)
                    else:
                        self.expect.append(DATA)
                        self.transport.write(b"DATA\r\n")
                else:
                    self._finish(code)
            elif code == CLOSING or self.rcpt_ok == 0 and not self.expect_has_more_rcpt():
                self.txn_fail = self.txn_fail or code
            return
        if stage == DATA:
            if code == 354:
                self._send_body()
            else:
                if self.rcpt_ok and not self.txn_fail:
                    self.stats.reply_error(DATA, code, text)
                self._finish(self.txn_fail or code)
            return
        if stage == EOD:
            # Every transaction that got an end-of-DATA reply, accepted or not.
            self.stats.txn_latency.record(time.perf_counter() - self.t_txn)
            if ok:
                self._finish(0)
            else:
                self.stats.reply_error(EOD, code, text)
                self._finish(code)
            return
        if stage == MAIL:
            if ok:
                if not self.pipelining:
                    rcpts = self._rcpts_left = self.run.env.rcpt_list(self.seq, self.session)
                    self.rcpt_next = 1
                    self.expect.append(RCPT)
                    self.transport.write(rcpts[0])
            else:
                self.stats.reply_error(MAIL, code, text)
                self.txn_fail = code
                if not self.pipelining:
                    self._finish(code)
            return
        if stage == RSET_NOOP:
            if self.rcpt_ok and not self.txn_fail and ok:
                self.stats.txn_latency.record(time.perf_counter() - self.t_txn)
                self._finish(0, rset_done=True)
            else:
                self._finish(self.txn_fail or code, rset_done=True)
            return
        if stage == CONNECT:
            self.stats.connect_latency.record(time.perf_counter() - self.t_connect)
            if ok:
                run = self.run
                if run.cfg.ehlo:
                    self.expect.append(EHLO)
                    self.transport.write(run.ehlo)
                else:
                    self.expect.append(HELO)
                    self.transport.write(run.helo)
            else:
                self.stats.reply_error(CONNECT, code, text)
                self._outcome(code)
                self._quit()
            return
        if stage == EHLO or stage == HELO:
            if ok:
                if _is_pipelining(text):
                    self.ehlo_pipelining = True
                self.pipelining = self.run.cfg.pipelining and self.ehlo_pipelining \
                    and stage == EHLO
                run = self.run
                if self.tls_done and run.cfg.tls_resume and not self.resumed:
                    # The tickets came before this reply: a session to resume from now on
                    # (one reused until the server stops resuming it: reading a session
                    # from the ssl module decodes the server's certificate again).
                    run.tls_context.session = self.transport.get_extra_info("ssl_object").session
                if run.tls_context is not None and not self.tls_done:
                    self._write(b"STARTTLS\r\n", STARTTLS)
                elif run.auth_line and not self.authed:
                    self._write(run.auth_line, AUTH)
                else:
                    self._begin(self.seq)
            elif stage == EHLO and 500 <= code < 600:
                self._write(self.run.helo, HELO)
            else:
                self.stats.reply_error(stage, code, text)
                self._outcome(code)
                self._quit()
            return
        if stage == RSET_PRE:
            if code == CLOSING:
                self.stats.reply_error(RSET_PRE, code, text)
                self.txn_fail = code
                if not self.pipelining:
                    self._finish(code, rset_done=True)
            elif not self.pipelining:
                self._write(self.run.env.mail(self.seq, self.session), MAIL)
            return
        if stage == QUIT:
            self.closing = True
            self.transport.close()
            return
        if stage == STARTTLS or stage == AUTH:
            if code == 220 and stage == STARTTLS:
                self.upgrading = True
                self.run.loop.create_task(self._upgrade())
            elif code == 235 and stage == AUTH:
                self.authed = True
                self._begin(self.seq)
            else:
                self.stats.reply_error(stage, code, text)
                self._outcome(code)
                self._quit()

    async def _upgrade(self) -> None:
        """The TLS handshake after `220`, then EHLO again (RFC 3207)."""
        transport = self.transport
        if transport is None:  # lost since the 220
            self.upgrading = False
            self._count_lost("closed by server")
            return
        timeout = self.run.cfg.timeout
        # The connection may be lost before or after the handshake fails:
        # counted here either way, once, with the TLS failure's name.
        try:
            tls = await self.run.loop.start_tls(transport, self, self.run.tls_context,
                                                server_hostname=self.run.cfg.host,
                                                ssl_handshake_timeout=timeout)
        except Exception as exc:  # whatever failed, the message is counted
            self.upgrading = False
            # ConnectionAbortedError: ssl_handshake_timeout ran out (our own
            # aborts are cuts, which _count_lost counts as unfinished).
            kind = "handshake timeout" if isinstance(exc, ConnectionAbortedError) \
                else _errno_kind(exc)
            self._count_lost(f"tls: {kind}")
            if transport is not None:
                transport.abort()
            return
        self.upgrading = False
        if self.transport is None:
            self._count_lost("closed by server")
            tls.abort()
            return
        self.transport = tls
        self.tls_done = True
        self.stats.tls_handshakes += 1
        self.resumed = tls.get_extra_info("ssl_object").session_reused
        self.stats.tls_resumed += self.resumed
        self.ehlo_pipelining = False
        self._write(self.run.ehlo, EHLO)

    def expect_has_more_rcpt(self) -> bool:
        return bool(self.expect) and self.expect[0] == RCPT

    def _write(self, data: bytes, stage: int) -> None:
        self.expect.append(stage)
        self.transport.write(data)

    def _begin(self, seq: int) -> None:
        """Start the transaction of message `seq` (already claimed)."""
        self.seq = seq
        self.pending = True
        self.rcpt_ok = 0
        self.txn_fail = 0
        self.t_txn = time.perf_counter()
        run = self.run
        env = run.env
        mail = env.mail(seq, self.session)
        if self.pipelining:
            rcpts = env.rcpt_list(seq, self.session)
            last = b"RSET\r\n" if run.cfg.noop else b"DATA\r\n"
            parts = [mail, *rcpts, last]
            expect = self.expect
            if self.need_rset:
                parts.insert(0, b"RSET\r\n")
                expect.append(RSET_PRE)
            expect.append(MAIL)
            expect.extend([RCPT] * len(rcpts))
            expect.append(RSET_NOOP if run.cfg.noop else DATA)
            self.transport.write(b"".join(parts))
        elif self.need_rset:
            self._write(b"RSET\r\n", RSET_PRE)
        else:
            self.expect.append(MAIL)
            self.transport.write(mail)
        self.need_rset = False

    def _send_body(self) -> None:
        run = self.run
        i = self.seq % len(run.bodies)  # --eml: the files in turn over the whole run
        last = self.pipelining and self._is_last_on_conn()
        body = (run.bodies_quit if last else run.bodies)[i]
        head = run.uniq % (self.seq, run.uniq_pid)
        self.expect.append(EOD)
        if last:
            self.expect.append(QUIT)
            self.quit_sent = True
        self.transport.write(head + body)
        self.stats.sent += 1
        self.stats.bytes_sent += len(head) + len(body)

    def _is_last_on_conn(self) -> bool:
        per = self.run.cfg.per_conn
        return (per and self.on_conn + 1 >= per) or self.run.remaining == 0 \
            or self.run.stopping

    def _outcome(self, code: int) -> None:
        """Count the pending message's outcome (exactly once)."""
        if not self.pending:
            return
        self.pending = False
        if code == 0:
            self.stats.accepted += 1
        elif code < 500:
            self.stats.tempfailed += 1
        else:
            self.stats.permfailed += 1

    def _finish(self, code: int, rset_done: bool = False) -> None:
        """The message's transaction is over: count it, then next or QUIT."""
        self._outcome(code)
        self.on_conn += 1
        # A failed RCPT/DATA leaves MAIL open on the server: RSET before the next.
        if code and not rset_done:
            self.need_rset = True
        if self.quit_sent:
            return
        run = self.run
        per = run.cfg.per_conn
        if (per and self.on_conn >= per) or run.stopping or code == CLOSING:
            self._quit()
            return
        seq = run.claim()
        if seq < 0:
            self._quit()
            return
        delay = run.slot_delay() if run.cfg.rate > 0 else 0.0
        if delay > 0:
            self.pending = True  # claimed: counts as in flight while waiting
            self.txn_fail = 0
            run.wait_slot(delay, self._begin_later, seq)
        else:
            self._begin(seq)

    def _begin_later(self, seq: int) -> None:
        if self.transport is None:
            return  # connection_lost already counted the pending message
        if self.run.stopping:
            self.pending = False
            self.stats.attempted -= 1
            self._quit()
            return
        self._begin(seq)

    def _quit(self) -> None:
        if self.transport is None or self.quit_sent:
            return
        self.quit_sent = True
        self.closing = True
        self._write(b"QUIT\r\n", QUIT)

    def on_stop(self) -> None:
        """--duration is over: an idle connection (between messages) quits now."""
        if not self.pending and not self.quit_sent and self.transport is not None:
            self._quit()

    def cut(self) -> None:
        if self.transport is not None:
            self.closing = True
            self.transport.abort()

    def timed_out(self) -> None:
        if self.transport is None:
            return
        if self.pending:
            self.pending = False
            self.stats.conn_failed += 1
        self.stats.conn_error("reply timeout")
        self.transport.abort()

    def _protocol_error(self) -> None:
        if self.pending:
            self.pending = False
            self.stats.conn_failed += 1
        self.stats.conn_error("malformed reply")
        self.transport.abort()
