"""The SMTP server engine behind sink.py: accept everything fast, or
misbehave on purpose (421 at connect, 4xx/5xx at RCPT or end of DATA, a
delay before every reply), count, and optionally store what it received.

Owns: SinkConfig, SinkStats and the per-connection SinkSession Protocol.
Every complete command of a data_received batch is handled before one
transport.write; DATA is scanned in bulk with bytes.find across chunk
boundaries (the last 4 bytes are carried over). Never blocks the loop except
for the optional message store, which is synchronous on purpose (it is a
benchmark of the client, not of our disk layer).
"""
from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
import time
from dataclasses import dataclass

from .message import unstuff

# A command line longer than this is answered 500 and discarded (memory bound).
MAX_LINE = 4096
TOO_LONG = b"500 5.5.2 line too long\r\n"
# With --maildir/--store-dir, a message is held in memory until its end; a
# bigger one is refused (552) rather than letting a client exhaust memory.
MAX_STORED_MESSAGE = 64 * 1024 * 1024
END = b"\r\n.\r\n"


@dataclass(slots=True, frozen=True)
class SinkConfig:
    hostname: str = "sink.bench.test"
    tempfail: float = 0.0        # percent of messages (or recipients) answered 4xx
    permfail: float = 0.0        # percent answered 5xx
    fail_at: str = "data"        # "rcpt" or "data"
    greet_fail: float = 0.0      # percent of connections answered 421 and closed
    delay: float = 0.0           # seconds before each reply
    pipelining: bool = True      # announce PIPELINING in the EHLO reply
    maildir: str | None = None   # store each message in this Maildir
    store_dir: str | None = None # store each message as one file here
    max_store: int = MAX_STORED_MESSAGE  # bytes; a bigger message is refused 552 when storing
    seed: int | None = None
    tempfail_reply: bytes = b"451 4.3.0 sink: temporary failure (injected)\r\n"
    permfail_rcpt_reply: bytes = b"550 5.1.1 sink: no such user (injected)\r\n"
    permfail_data_reply: bytes = b"554 5.6.0 sink: message refused (injected)\r\n"
    greet_fail_reply: bytes = b"421 4.3.2 sink: service not available (injected)\r\n"
    tls_cert: str | None = None  # PEM certificate + key: offer STARTTLS


@dataclass(slots=True)
class SinkStats:
    connections: int = 0
    open: int = 0
    greet_failed: int = 0
    messages: int = 0            # accepted at end of DATA (250)
    tempfailed: int = 0          # end of DATA answered 4xx
    permfailed: int = 0          # end of DATA answered 5xx
    rcpts: int = 0               # RCPT accepted
    rcpt_tempfailed: int = 0
    rcpt_permfailed: int = 0
    bytes: int = 0               # DATA bytes received (accepted or not)
    stored: int = 0
    ehlo: int = 0                # EHLO / HELO commands seen
    starttls: int = 0            # STARTTLS handshakes begun
    helo: int = 0
    store_errors: int = 0
    first_message: float = 0.0   # time.time() of the first/last accepted message
    last_message: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    def add(self, other: dict) -> None:
        for k, v in other.items():
            if k == "first_message":
                if v and (not self.first_message or v < self.first_message):
                    self.first_message = v
            elif k == "last_message":
                self.last_message = max(self.last_message, v)
            else:
                setattr(self, k, getattr(self, k) + v)


class MessageStore:
    """Writes accepted messages to a Maildir (tmp → new) or one file each."""

    def __init__(self, cfg: SinkConfig):
        self.maildir = cfg.maildir
        self.dir = cfg.store_dir
        self.seq = 0
        self.host = socket.gethostname().replace("/", "_").replace(":", "_")
        for sub in (("tmp", "new", "cur") if self.maildir else ("",)):
            os.makedirs(os.path.join(self.maildir or self.dir, sub), exist_ok=True)

    def store(self, sender: bytes, rcpts: list[bytes], wire: bytes) -> None:
        self.seq += 1
        now = time.time()
        name = f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{self.seq}.{self.host}"
        body = unstuff(wire)
        if self.maildir:
            head = b"Return-Path: <" + sender + b">\n" + b"".join(
                b"Delivered-To: " + r + b"\n" for r in rcpts)
            data = head + body.replace(b"\r\n", b"\n")
            tmp = os.path.join(self.maildir, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, os.path.join(self.maildir, "new", name))
        else:
            head = b"X-Sink-Mail-From: <" + sender + b">\r\n" + b"".join(
                b"X-Sink-Rcpt-To: <" + r + b">\r\n" for r in rcpts)
            path = os.path.join(self.dir, name + ".eml")
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(head + body)
            os.rename(tmp, path)


def _addr(arg: bytes) -> bytes:
    lt = arg.find(b"<")
    if lt >= 0:
        gt = arg.find(b">", lt)
        return arg[lt + 1:gt if gt > 0 else len(arg)]
    colon = arg.find(b":")
    return arg[colon + 1:].strip().split(b" ", 1)[0]


class SinkServer:
    """State shared by the sessions of one process (config, stats, store, rng)."""

    def __init__(self, cfg: SinkConfig, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        self.stats = SinkStats()
        self.rng = random.Random(cfg.seed)
        self.store = MessageStore(cfg) if (cfg.maildir or cfg.store_dir) else None
        self.sessions: set[SinkSession] = set()
        self.greeting = f"220 {cfg.hostname} ESMTP bench/sink.py\r\n".encode()
        lines = [cfg.hostname]
        if cfg.pipelining:
            lines.append("PIPELINING")
        lines += ["8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 0"]
        self.ehlo = _ehlo(lines)
        self.tls_context: ssl.SSLContext | None = None
        self.ehlo_before_tls = self.ehlo
        if cfg.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cfg.tls_cert)
            self.tls_context = ctx
            self.ehlo_before_tls = _ehlo(lines[:1] + ["STARTTLS"] + lines[1:])
        self.helo = f"250 {cfg.hostname}\r\n".encode()
        self.fail_rcpt = cfg.fail_at == "rcpt"
        self.failing = cfg.tempfail > 0 or cfg.permfail > 0

    def roll(self) -> bytes | None:
        """None (accept), or the injected failure reply for this message/recipient."""
        cfg = self.cfg
        x = self.rng.random() * 100
        if x < cfg.tempfail:
            return cfg.tempfail_reply
        if x < cfg.tempfail + cfg.permfail:
            return cfg.permfail_rcpt_reply if self.fail_rcpt else cfg.permfail_data_reply
        return None

    def protocol(self) -> "SinkSession":
        return SinkSession(self)

    def close_all(self) -> None:
        for s in list(self.sessions):
            if s.transport is not None:
                s.transport.abort()


def _ehlo(lines: list[str]) -> bytes:
    return ("".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n").encode()


class SinkSession(asyncio.Protocol):
    __slots__ = ("srv", "stats", "transport", "buf", "in_data", "tail", "chunks",
                 "mail", "rcpts", "rcpt_list", "closing", "delayed", "paused", "held",
                 "tls", "starting_tls", "lost", "pending", "blocked", "skipping")

    def __init__(self, srv: SinkServer):
        self.srv = srv
        self.stats = srv.stats
        self.transport = None
        self.buf = b""
        self.in_data = False
        self.tail = b""
        self.chunks: list[bytes] | None = None
        self.mail: bytes | None = None
        self.rcpts = 0
        self.rcpt_list: list[bytes] = []
        self.closing = False
        self.delayed: list[bytes] = []
        self.paused = False
        self.held = 0                # bytes of the message held for the store
        self.tls = False
        self.starting_tls = False
        self.lost = False
        self.pending: list[bytes] = []
        self.blocked = False         # our replies wait in the transport (pause_writing)
        self.skipping = False        # in a line too long, answered already

    def connection_made(self, transport) -> None:
        srv = self.srv
        self.transport = transport
        stats = self.stats
        stats.connections += 1
        stats.open += 1
        srv.sessions.add(self)
        cfg = srv.cfg
        if cfg.greet_fail and srv.rng.random() * 100 < cfg.greet_fail:
            stats.greet_failed += 1
            self.closing = True
            self._send([cfg.greet_fail_reply])
            return
        self._send([srv.greeting])

    def connection_lost(self, exc) -> None:
        if self.lost:
            return
        self.lost = True
        self.stats.open -= 1
        self.srv.sessions.discard(self)
        self.transport = None

    def pause_writing(self) -> None:
        # A client sending commands without reading the replies: stop
        # reading until they drain, rather than queue replies without bound.
        self.blocked = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.blocked = False
        if self.transport is not None and not (self.paused or self.starting_tls or self.closing):
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.starting_tls:
            # Reading in clear stopped at STARTTLS, so this came through the
            # new TLS transport before start_tls() returned it: keep it.
            self.pending.append(data)
            return
        if self.closing:
            return
        out: list[bytes] = []
        if self.in_data:
            data = self._scan(data, out)
            if data is None:
                if out:
                    self._send(out)
                return
        buf = self.buf + data if self.buf else data
        pos = 0
        while True:
            eol = buf.find(b"\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            pos = eol + 1
            if self.skipping:  # the end of a line already answered 500
                self.skipping = False
                continue
            if len(line) > MAX_LINE:
                out.append(TOO_LONG)
                continue
            self._command(line, out)
            if self.closing or self.starting_tls:
                # After STARTTLS nothing sent in clear is kept (CVE-2011-0411).
                pos = len(buf)
                break
            if self.in_data:
                rest = self._scan(buf[pos:], out)
                if rest is None:
                    buf = b""
                    pos = 0
                    break
                buf = rest
                pos = 0
        rest = buf[pos:]
        if len(rest) > MAX_LINE:
            if not self.skipping:
                out.append(TOO_LONG)
                self.skipping = True  # the rest of the line, up to its LF
            rest = b""
        self.buf = rest
        if out:
            self._send(out)
        if self.starting_tls:
            self._start_tls()

    def _start_tls(self) -> None:
        # Stop reading now: the client's ClientHello may arrive before the
        # start_tls task first runs, and must not be read as a command.
        self.transport.pause_reading()
        loop = self.srv.loop
        task = loop.create_task(loop.start_tls(self.transport, self, self.srv.tls_context,
                                               server_side=True))
        task.add_done_callback(self._tls_done)

    def _tls_done(self, task: asyncio.Task) -> None:
        self.starting_tls = False
        if task.cancelled() or task.exception() is not None:
            if self.transport is not None:
                self.transport.abort()
            self.connection_lost(None)
            return
        self.transport = task.result()
        self.tls = True
        self.mail = None
        self.rcpts = 0
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            self.data_received(data)

    def _command(self, line: bytes, out: list[bytes]) -> None:
        verb = line[:4].upper()
        srv = self.srv
        if verb == b"MAIL":
            self.mail = _addr(line[5:]) if srv.store else b""
            self.rcpts = 0
            self.rcpt_list = []
            out.append(b"250 2.1.0 ok\r\n")
        elif verb == b"RCPT":
            if self.mail is None:
                out.append(b"503 5.5.1 MAIL first\r\n")
                return
            if srv.failing and srv.fail_rcpt:
                fail = srv.roll()
                if fail is not None:
                    if fail[0] == 52:  # b"4"
                        self.stats.rcpt_tempfailed += 1
                    else:
                        self.stats.rcpt_permfailed += 1
                    out.append(fail)
                    return
            self.rcpts += 1
            self.stats.rcpts += 1
            if srv.store:
                self.rcpt_list.append(_addr(line[5:]))
            out.append(b"250 2.1.5 ok\r\n")
        elif verb == b"DATA":
            if not self.rcpts:
                out.append(b"554 5.5.1 no valid recipients\r\n" if self.mail is not None
                           else b"503 5.5.1 MAIL first\r\n")
                return
            self.in_data = True
            self.tail = b"\r\n"  # DATA starts at a line start: ".\r\n" ends it at once
            self.chunks = [] if srv.store else None
            self.held = 0
            out.append(b"354 go ahead\r\n")
        elif verb == b"EHLO":
            self.stats.ehlo += 1
            out.append(srv.ehlo if self.tls else srv.ehlo_before_tls)
        elif verb == b"STAR" and line.rstrip(b"\r").upper() == b"STARTTLS" \
                and srv.tls_context is not None and not self.tls:
            self.stats.starttls += 1
            out.append(b"220 2.0.0 ready for tls\r\n")
            self.starting_tls = True
        elif verb == b"HELO":
            self.stats.helo += 1
            out.append(srv.helo)
        elif verb == b"RSET":
            self.mail = None
            self.rcpts = 0
            out.append(b"250 2.0.0 ok\r\n")
        elif verb == b"QUIT":
            out.append(b"221 2.0.0 bye\r\n")
            self.closing = True
        elif verb == b"NOOP":
            out.append(b"250 2.0.0 ok\r\n")
        elif verb == b"VRFY":
            out.append(b"252 2.1.5 send some mail\r\n")
        else:
            out.append(b"502 5.5.1 unimplemented\r\n")

    def _scan(self, data: bytes, out: list[bytes]) -> bytes | None:
        """Feed DATA bytes; at the end marker answer it and return what follows."""
        tail = self.tail
        end = -1
        if tail:
            j = (tail + data[:4]).find(END)
            if j >= 0:
                end = j + 5 - len(tail)
        if end < 0:
            k = data.find(END)
            if k >= 0:
                end = k + 5
        if end < 0:
            self.stats.bytes += len(data)
            chunks = self.chunks
            if chunks is not None:
                chunks.append(data)
                self.held += len(data)
                if self.held > self.srv.cfg.max_store:
                    self.chunks = None  # keep scanning for the end, refuse it there
            self.tail = (tail + data)[-4:] if len(data) < 4 else data[-4:]
            return None
        self.stats.bytes += end
        self.in_data = False
        self.tail = b""
        too_big = self.srv.store is not None and self.held + end > self.srv.cfg.max_store
        if self.chunks is not None:
            self.chunks.append(data[:end])
            raw = b"".join(self.chunks)
            self.chunks = None
            wire = raw[:-3] if len(raw) >= 5 else b""
        else:
            wire = b""
        self.held = 0
        if too_big:
            self.stats.permfailed += 1
            out.append(b"552 5.3.4 sink: message too big to store\r\n")
        else:
            out.append(self._end_of_data(wire))
        self.mail = None
        self.rcpts = 0
        return data[end:]

    def _end_of_data(self, wire: bytes) -> bytes:
        srv = self.srv
        stats = self.stats
        if srv.failing and not srv.fail_rcpt:
            fail = srv.roll()
            if fail is not None:
                if fail[0] == 52:
                    stats.tempfailed += 1
                else:
                    stats.permfailed += 1
                return fail
        stats.messages += 1
        now = time.time()
        if not stats.first_message:
            stats.first_message = now
        stats.last_message = now
        if srv.store is not None:
            try:
                srv.store.store(self.mail or b"", self.rcpt_list, wire)
                stats.stored += 1
            except OSError:
                stats.store_errors += 1
                stats.messages -= 1
                stats.tempfailed += 1
                return b"451 4.3.0 sink: cannot store message\r\n"
        return b"250 2.0.0 ok\r\n"

    # --- replies ------------------------------------------------------------
    def _send(self, out: list[bytes]) -> None:
        delay = self.srv.cfg.delay
        if delay <= 0:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self.closing:
                self.transport.close()
            return
        # A slow server: reading stops while it "thinks", each reply costs
        # `delay`, and pipelined commands wait their turn.
        self.delayed.extend(out)
        # Every time, not only when the pause begins: one taken for the
        # greeting, in connection_made, is undone by uvloop, which starts
        # reading after connection_made returns.
        self.transport.pause_reading()
        if not self.paused:
            self.paused = True
            self.srv.loop.call_later(delay, self._flush_one)

    def _flush_one(self) -> None:
        if self.transport is None:
            return
        self.transport.write(self.delayed.pop(0))
        if self.delayed:
            self.srv.loop.call_later(self.srv.cfg.delay, self._flush_one)
            return
        self.paused = False
        self.held = 0                # bytes of the message held for the store
        if self.closing:
            self.transport.close()
        elif not self.blocked:
            self.transport.resume_reading()
