"""One SMTP connection: qmail-smtpd's dialogue as an asyncio Protocol.

A `SmtpSession` owns the state of one connection — HELO name, the transaction
(sender, recipients), the line reader and the DATA scanner — and nothing else.
Policy (rcpthosts, badmailfrom, RELAYCLIENT) comes from the config snapshot the
connection started with; the spool commits the message; the receiver
(`engine.smtp.receiver`) owns the process-wide parts (config swaps, connection
counts, shutdown). A session must never reply 250 to DATA before the spool has
committed the message, and never queue anything of a message that was refused.

Hot path: every complete command in one `data_received` chunk is handled in one
batch and the replies go out in one `transport.write` (qmail flushes only when
it would block on input, so pipelined clients get their replies together);
past MAX_PENDING_REPLIES they go out mid-batch, and once the transport is over
its high-water mark the rest of the commands wait in the line reader until it
drains: a client that never reads cannot turn one read into megabytes of replies.
While the spool commits a message, reading is paused; the pipelined commands
that followed the end marker wait in the line reader until the 250 is written.

Replies are qmail-smtpd's texts (spec §1.3, §1.6) where qmail has one; the
hardening replies qrelay adds are listed in `README.md`.

Log (the receiver's `SmtpdLog`, ROOT/log/smtpd): tcpserver -v's lines for the
connection (status, pid, ok/deny, end) and one line for every refusal — rule
deny, rblsmtpd, too many connections, a refused sender or recipient with its
address, a refused message, an over-long line, a timeout. Nothing is logged
per accepted command: the lines of a normal connection are tcpserver's only.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from engine import metrics
from engine._smtpcore import TOO_LONG, DataScanner, LineReader, parse_command, parse_params, parse_path
from engine.config.control import scan_ulong
from engine.queue import Envelope, MessageTooBig, SpoolError, SpoolWriteError
from engine.smtp import auth
from engine.smtp.listeners import IMPLICIT_TLS_SCHEMES
from engine.smtp.policy import (address_syntax_error, mailbox_refusal, plain_address,
                                rewrite_local_ip_literal)
from engine.tls import session_cipher
from engine.received import queue_received_line, received_line

if TYPE_CHECKING:
    from engine.smtp.receiver import Receiver

log = logging.getLogger("qrelay.smtpd")

# Session states. RBL = rblsmtpd's blocking dialogue (spec §1.8); LOOKUP = waiting
# for the client's host name before the greeting (settings.smtp.reverse_dns);
# TLS = the handshake after STARTTLS: every byte that comes meanwhile in
# plaintext is dropped unread (an implicit-TLS listener's handshake is done
# by the loop before the session starts: engine.smtp.receiver.serve);
# AUTH = an AUTH exchange waiting for the client's next line; CHECK = its
# credentials being checked (reading paused, like COMMIT).
CMD, DATA, COMMIT, CLOSED, RBL, LOOKUP, TLS, AUTH, CHECK = 0, 1, 2, 3, 4, 5, 6, 7, 8

R_MAIL_OK = b"250 ok\r\n"
R_RCPT_OK = b"250 ok\r\n"
R_FLUSHED = b"250 flushed\r\n"
R_NOOP = b"250 ok\r\n"
R_VRFY = b"252 send some mail, i'll try my best\r\n"
R_HELP = b"214 qrelay: a qmail-compatible mail relay\r\n"
R_UNIMPL = b"502 unimplemented (#5.5.1)\r\n"
R_MAIL_FIRST = b"503 MAIL first (#5.5.1)\r\n"
R_RCPT_FIRST = b"503 RCPT first (#5.5.1)\r\n"
R_SYNTAX = b"555 syntax error (#5.5.4)\r\n"
R_BADMAILFROM = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
R_GO_AHEAD = b"354 go ahead\r\n"
R_BARE_LF = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"
R_TOO_BIG = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
R_HOPS = b"554 too many hops, this message is looping (#5.4.6)\r\n"
R_NUL_DATA = b"554 sorry, message contains NUL bytes (#5.6.0)\r\n"
R_BARE_CR = b"554 sorry, message contains a bare CR, which is not allowed (#5.6.0)\r\n"
R_QQ_WRITE = b"451 qq write error or disk full (#4.3.0)\r\n"
R_QQ_TEMP = b"451 qq temporary problem (#4.3.0)\r\n"
# The receiver's [smtp] max_buffered_bytes was spent while this message came in.
R_NO_MEMORY = b"452 sorry, insufficient system storage, try again later (#4.3.1)\r\n"
R_TOO_MANY_RCPTS = b"452 sorry, too many recipients (#4.5.3)\r\n"
R_NO_SPACE = b"452 sorry, not enough free space in the queue here; try again later (#4.3.1)\r\n"
R_LINE_TOO_LONG = b"500 sorry, that command line is too long (#5.5.2)\r\n"
R_NUL_CMD = b"501 sorry, NUL bytes are not allowed in commands (#5.5.2)\r\n"
R_TIMEOUT = b"451 timeout (#4.4.2)\r\n"
R_TLS_READY = b"220 ready for tls\r\n"
R_TLS_SYNTAX = b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
R_TLS_NO_CERT = b"454 TLS missing certificate: control/servercert.pem (#4.3.0)\r\n"
R_NOT_YOURS = b"553 sorry, that sender address is not yours (#5.7.1)\r\n"

# A command line still without its LF after this many times max_line_length
# bytes: the client is not speaking SMTP; its 500 went out when the limit was
# passed, now the connection is closed (the line's bytes were never kept).
LONG_LINE_CLOSE_FACTOR = 64

# Replies held before they are written mid-batch (an empty line is 1 byte of
# input and 28 of reply: the replies to one read must not pile up unwritten).
MAX_PENDING_REPLIES = 256

# tcpserver's `end N status S` prints the child's wait status: 0 after QUIT
# (qmail-smtpd exits 0) and after any rblsmtpd dialogue, 256 when qmail-smtpd
# exits 1 (EOF, timeout, bare LF, a dropped client), 25600 for a rule's deny
# (tcpserver's child exits 100).
END_QUIT, END_DROPPED, END_DENIED = 0, 256, 25600

_NUL = b"\0"


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _size(digits: bytes) -> int:
    """A SIZE= value (ASCII digits, any length): one too long for scan_ulong
    is more than any limit anyway."""
    value = scan_ulong(digits)
    return (1 << 63) if value is None else value


class SmtpSession(asyncio.Protocol):
    """qmail-smtpd for one connection (see the module docstring)."""

    __slots__ = (
        "receiver", "config", "transport", "state", "reader", "scanner", "out",
        "remoteip", "remotehost", "remoteinfo", "localip", "local", "relayclient",
        "databytes", "helo", "mail", "sender", "sender_refused", "rcpts",
        "last_activity", "timeout", "counted", "paused_for_commit", "paused_for_write",
        "write_paused", "greeting", "me", "max_rcpts", "max_hops", "refuse_bare_cr",
        "task", "in_transaction", "connected_at", "rbl_reply", "eof", "held",
        "log", "number", "end_status", "max_line", "long_line_answered", "early",
        "scheme", "tls", "protocol", "auth_user", "exchange", "rule_relayclient",
        "rule_remoteinfo",
    )

    def __init__(self, receiver: "Receiver", scheme: str = "smtp") -> None:
        self.receiver = receiver
        self.scheme = scheme            # smtp, submission (AUTH before MAIL), submissions (+ implicit TLS)
        self.tls: str | None = None     # the cipher once encrypted
        self.protocol = "SMTP"          # the Received line's `with` part
        self.auth_user: str | None = None
        self.exchange: auth.AuthExchange | None = None
        self.config = receiver.config  # the snapshot this connection keeps
        # qmail's timeoutsmtpd (set again by _start): also bounds a closed
        # connection's wait for its last replies to drain (check_idle).
        self.timeout = self.config.timeout if self.config.timeout > 0 else 1
        self.transport: Any = None
        self.state = CMD
        self.out: list[bytes] = []
        self.counted = False
        self.held = 0                  # bytes of message counted in receiver.buffered
        self.paused_for_commit = False
        self.paused_for_write = False
        self.write_paused = False
        self.task: asyncio.Task | None = None
        self.mail = False
        self.sender = ""
        self.sender_refused = False
        self.rcpts: list[str] = []
        self.helo: str | None = None
        self.in_transaction = False
        self.eof = False
        self.log = receiver.log
        self.number = 0
        self.end_status = END_DROPPED
        self.long_line_answered = False
        self.early = b""   # bytes that came while state was LOOKUP (before the greeting)

    # --- connection lifecycle -------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        cfg = self.config
        st = cfg.settings.smtp
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.remoteip = peer[0] if peer else "unknown"
        self.localip = sock[0] if sock else "unknown"
        self.last_activity = self.connected_at = time.monotonic()
        receiver = self.receiver
        counter = receiver.counter
        self.number = counter.next_number()
        refused = receiver.admit(counter, self.remoteip, cfg.concurrencyincoming,
                                 st.max_connections_per_ip)
        if refused is not None:
            why = "too many connections from your address" if refused == "ip" else "too many connections"
            reply = f"421 {cfg.me} {why}, try again later"
            transport.write(f"{reply}\r\n".encode())
            transport.close()
            self.state = CLOSED
            metrics.session_refused("limit", self.scheme)
            if self.log is not None:
                cap = receiver.refusal_detail(
                    refused, f"status: {counter.total()}/{cfg.concurrencyincoming}",
                    st.max_connections_per_ip)
                self.log.smtpd(self.number, self.remoteip, f"{reply} ({cap})")
            return
        self.counted = True
        receiver.sessions.add(self)
        metrics.session_opened(self.scheme)
        if self.log is not None:
            self.log.tcpserver_status(counter.total(), cfg.concurrencyincoming)
            self.log.tcpserver_pid(self.number, self.remoteip)
        if st.reverse_dns:
            # tcpserver without -H: the greeting waits for the PTR lookup (bounded).
            self.state = LOOKUP
            transport.pause_reading()
            receiver.start_task(self._lookup_then_begin())
            return
        self._begin(None)

    async def _lookup_then_begin(self) -> None:
        host = await self.receiver.remote_hosts().lookup(self.remoteip)
        if self.state != LOOKUP:
            return  # the client left meanwhile
        self.state = CMD
        self.last_activity = time.monotonic()
        self._begin(host)
        self._resume_after_lookup()

    def _begin(self, host: str | None) -> None:
        """tcpserver's rule match, then qmail-smtpd's start: environment and greeting."""
        cfg = self.config
        st = cfg.settings.smtp
        transport = self.transport
        rule = cfg.rules.match(self.remoteip, host)
        if self.log is not None:
            peer = transport.get_extra_info("peername")
            sock = transport.get_extra_info("sockname")
            self.log.tcpserver_ok(
                self.number, (cfg.me, self.localip, sock[1] if sock else 0),
                (host or "", self.remoteip, "", peer[1] if peer else 0), deny=not rule.allow)
        if not rule.allow:
            # tcpserver closes a denied connection without running qmail-smtpd.
            metrics.session_refused("denied", self.scheme)
            self.end_status = END_DENIED
            transport.close()
            self.state = CLOSED
            return
        env = rule.env
        relay = self.receiver.relay
        if relay is not None and "RELAYCLIENT" not in env:
            # POP-before-SMTP (engine.relay): a granted IP relays as open-smtp's
            # `allow,RELAYCLIENT="",RBLSMTPD=""` would make it.
            allowed = relay.allows_nowait(self.remoteip)
            if allowed is None:      # a shared store: the greeting waits (bounded)
                self.state = LOOKUP
                transport.pause_reading()
                self.receiver.start_task(self._relay_check_then_start(env, host))
                return
            if allowed:
                env = {**env, "RELAYCLIENT": "", "RBLSMTPD": ""}
        self._start(env, host)

    async def _relay_check_then_start(self, env: dict, host: str | None) -> None:
        allowed = await self.receiver.relay.allows(self.remoteip)
        if self.state != LOOKUP:
            return  # the client left meanwhile
        self.state = CMD
        self.last_activity = time.monotonic()
        self._start({**env, "RELAYCLIENT": "", "RBLSMTPD": ""} if allowed else env, host)
        self._resume_after_lookup()

    def _resume_after_lookup(self) -> None:
        """Read again once the greeting is out; bytes that came before it first."""
        if self.state in (CMD, RBL):
            self.transport.resume_reading()
            if self.early:
                early, self.early = self.early, b""
                self.data_received(early)

    def _start(self, env: dict, host: str | None) -> None:
        """qmail-smtpd's start under the rule's environment: settings and greeting."""
        cfg = self.config
        st = cfg.settings.smtp
        transport = self.transport
        # What tcp.smtp grants is kept apart: STARTTLS forgets what AUTH added.
        self.relayclient = self.rule_relayclient = env.get("RELAYCLIENT")
        self.remotehost = env.get("TCPREMOTEHOST") or host or "unknown"
        self.remoteinfo = self.rule_remoteinfo = env.get("TCPREMOTEINFO")
        self.local = env.get("TCPLOCALHOST") or cfg.me
        databytes = cfg.databytes
        if "DATABYTES" in env:
            # qmail: the DATABYTES variable wins over control/databytes.
            # Its leading ASCII digits, as qmail's scan_ulong (str.isdigit
            # takes "²" too); none, or too many to be a limit anyone
            # means: 0, so the cap below applies.
            databytes = scan_ulong(env["DATABYTES"].encode("utf-8", "surrogateescape")) or 0
        # The limit actually enforced: databytes, else the max_message_bytes cap
        # (0 only if that is switched off too). EHLO's SIZE and MAIL's SIZE= use it.
        self.databytes = databytes if databytes > 0 else st.max_message_bytes
        self.timeout = cfg.timeout if cfg.timeout > 0 else 1
        self.me = cfg.me
        self.greeting = cfg.greeting
        self.max_rcpts = st.max_recipients
        self.max_hops = st.max_hops
        self.refuse_bare_cr = st.refuse_bare_cr
        self.max_line = st.max_line_length
        self.reader = LineReader(st.max_line_length)
        self.scanner = DataScanner(self.databytes)
        if self.scheme in IMPLICIT_TLS_SCHEMES:
            # RFC 8314: the listener's handshake came first (receiver.serve).
            self._encrypted(transport, "TLS")
        rbl = env.get("RBLSMTPD")
        if rbl:
            metrics.session_refused("rbl", self.scheme)
            self._start_rbl_block(rbl)
            return
        # The greeting's bytes as in the file (a Latin-1 smtpgreeting), as qmail-smtpd sends them.
        transport.write(f"220 {self.greeting} ESMTP\r\n".encode("utf-8", "surrogateescape"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != COMMIT:      # a commit in flight lets its message go itself
            self._hold(0)
        self.state = CLOSED
        if self.counted:
            self.counted = False
            counter = self.receiver.counter
            counter.release(self.remoteip)
            metrics.session_closed(self.scheme)
            if self.log is not None:
                self.log.tcpserver_end(self.number, self.end_status)
                self.log.tcpserver_status(counter.total(), self.config.concurrencyincoming)
        self.receiver.sessions.discard(self)
        # A commit in flight finishes on its own (the message is then queued although
        # the client never saw the 250: the same as qmail, delivery at least once).

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands so the
        # write buffer cannot grow without bound.
        self.write_paused = True
        if not self.paused_for_write and self.transport is not None:
            self.paused_for_write = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.paused_for_write:
            self.paused_for_write = False
            if self.paused_for_commit:
                return
            # The commands left in the reader when the replies backed up.
            if self.state in (CMD, AUTH):
                self._run_commands()
            elif self.state == RBL:
                self._run_rbl_commands()
            if self.out and self.state != CLOSED:
                self._flush()
            # Every state that reads the client (an AUTH exchange and
            # rblsmtpd's dialogue too, or the session hangs until its timeout).
            if (not self.paused_for_write and not self.paused_for_commit
                    and self.state in (CMD, DATA, AUTH, RBL)):
                self.transport.resume_reading()

    def eof_received(self) -> bool:
        # qmail exits silently on EOF, but only after answering everything it had
        # read: a client that half-closes right after its end marker still gets
        # the 250 once the commit is done.
        if self.state == COMMIT or self.state == CHECK:
            self.eof = True
            return True
        return False

    # --- input ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        state = self.state
        if state == DATA:
            self._feed_data(data)
            if self.state == CMD:
                self._run_commands()
        elif state == CMD or state == AUTH:
            self.reader.feed(data)
            self._run_commands()
        elif state == RBL:
            self.reader.feed(data)
            self._run_rbl_commands()
        elif state == COMMIT or state == CHECK:
            self.reader.feed(data)  # pipelined commands: handled after the commit
            return
        elif state == LOOKUP:
            # uvloop may deliver bytes read before pause_reading took effect:
            # kept (bounded) for when the session starts.
            if len(self.early) <= self.config.settings.smtp.max_line_length:
                self.early += data
            return
        else:
            # CLOSED, or TLS: plaintext sent after STARTTLS is never
            # executed (CVE-2011-0411).
            return
        if self.receiver.closing and self.state == CMD and not self.in_transaction:
            self.out.append(self.shutdown_reply())
            self._close_after_flush()
        elif self.out:
            self._flush()

    def _flush(self) -> None:
        out = self.out
        if len(out) == 1:
            self.transport.write(out[0])
        else:
            self.transport.write(b"".join(out))
        out.clear()

    def _close_after_flush(self) -> None:
        if self.out:
            self._flush()
        self.state = CLOSED
        self.transport.close()

    def _run_commands(self) -> None:
        reader = self.reader
        while True:
            state = self.state
            if state != CMD and state != AUTH:
                return
            if len(self.out) >= MAX_PENDING_REPLIES:
                self._flush()
                if self.write_paused and not self.eof:
                    return          # the rest when the client reads (resume_writing)
            line = reader.next_line()
            if line is None:
                if reader.unterminated > self.max_line + 1:
                    self._long_line(R_LINE_TOO_LONG)
                return
            if line is TOO_LONG:
                if state == AUTH:
                    self.exchange, self.state = None, CMD
                if self.long_line_answered:
                    # Its LF at last: the 500 went out when the limit was passed.
                    self.long_line_answered = False
                    continue
                self._refuse(R_LINE_TOO_LONG)
                continue
            if state == AUTH:
                self._auth_step(self.exchange.line(line))
                continue
            self._command(line)

    def _long_line(self, reply: bytes) -> None:
        """The unterminated line is already longer than max_line_length (even
        if a CR comes next): answer now, not when (if ever) its LF arrives; drop
        a client that goes on past LONG_LINE_CLOSE_FACTOR times the limit."""
        if not self.long_line_answered:
            self.long_line_answered = True
            self._refuse(reply)
        if self.reader.unterminated > LONG_LINE_CLOSE_FACTOR * max(self.max_line, 1):
            self._note(f"command line without LF past {LONG_LINE_CLOSE_FACTOR} x "
                       f"max_line_length ({self.max_line}): connection closed")
            self._close_after_flush()

    def _refuse(self, reply: bytes, command: str = "", why: str = "") -> None:
        """Queue a refusal reply and log it (one line, in the smtpd log; `why`,
        a cause the client is not told, after the reply in parentheses)."""
        self.out.append(reply)
        if self.log is not None:
            logged = reply[:-2].decode("utf-8", "replace")
            self.log.smtpd(self.number, self.remoteip, f"{logged} ({why})" if why else logged,
                           command)

    def _note(self, text: str) -> None:
        if self.log is not None:
            self.log.smtpd(self.number, self.remoteip, text)

    def _command(self, line: bytes) -> None:
        out = self.out
        verb, arg = parse_command(line)
        if _NUL in line:
            # In an address it is the policy's 555 (a NUL would split an envelope
            # record); anywhere else a 501. Logged without the line: no NUL in the log.
            if verb in (b"MAIL", b"RCPT"):
                self._refuse(R_SYNTAX, verb.decode("ascii"))
            else:
                self._refuse(R_NUL_CMD)
            return
        if verb == b"RCPT":
            self._rcpt(arg)
        elif verb == b"MAIL":
            self._mail(arg)
        elif verb == b"DATA":
            self._data()
        elif verb == b"EHLO":
            self._helo(arg)
            out.append(self._ehlo_reply())
        elif verb == b"HELO":
            self._helo(arg)
            out.append(f"250 {self.greeting}\r\n".encode("utf-8", "surrogateescape"))
        elif verb == b"RSET":
            self._reset_transaction()
            out.append(R_FLUSHED)
        elif verb == b"NOOP":
            out.append(R_NOOP)
        elif verb == b"QUIT":
            out.append(f"221 {self.greeting}\r\n".encode("utf-8", "surrogateescape"))
            self.end_status = END_QUIT
            self._close_after_flush()
        elif verb == b"VRFY":
            out.append(R_VRFY)
        elif verb == b"HELP":
            out.append(R_HELP)
        elif verb == b"AUTH":
            self._auth(arg)
        elif verb == b"STARTTLS":
            self._starttls(arg)
        else:
            out.append(R_UNIMPL)

    # --- commands -------------------------------------------------------------------

    def _ehlo_reply(self) -> bytes:
        # qmail-tls puts STARTTLS right after the greeting line; SIZE stays last.
        starttls = "250-STARTTLS\r\n" if self.tls is None and self.receiver.tls.context() is not None else ""
        return (f"250-{self.greeting}\r\n{starttls}250-PIPELINING\r\n250-8BITMIME\r\n"
                f"{auth.ehlo_lines(self._mechanisms())}250 SIZE {self.databytes}\r\n"
                ).encode("utf-8", "surrogateescape")

    def _mechanisms(self) -> tuple[str, ...]:
        if self.tls is not None or self.config.settings.auth.allow_plaintext:
            return auth.ALL_MECHANISMS
        return auth.SAFE_MECHANISMS

    def _helo(self, arg: bytes) -> None:
        self.helo = _text(arg)
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.mail = False
        self.sender = ""
        self.sender_refused = False
        self.rcpts = []
        self.in_transaction = False

    def _mail(self, arg: bytes) -> None:
        # A second MAIL restarts the transaction (qmail), refused or not: the
        # RCPTs a pipelining client sent with a refused one must get 503, not
        # join the transaction it left open.
        self._reset_transaction()
        if self.auth_user is None and self.scheme != "smtp":
            self._refuse(auth.R_AUTH_REQUIRED, "MAIL")
            return
        parsed = parse_path(arg)
        if parsed is None:
            self._refuse(R_SYNTAX, "MAIL")
            return
        addr, rest = parsed
        size = 0
        if rest:
            for key, value in parse_params(rest) or ():
                if key == b"SIZE" and value is not None and value.isdigit():
                    size = _size(value)
            if self.databytes > 0 and size > self.databytes:
                self._refuse(R_TOO_BIG, f"MAIL <{_text(addr)}> SIZE={size}")
                return
        if self.receiver.spool_space_short(size):
            self._refuse(R_NO_SPACE, f"MAIL <{_text(addr)}>" + (f" SIZE={size}" if size else ""))
            return
        sender = self._address(addr)
        if address_syntax_error(sender):
            self._refuse(R_SYNTAX, f"MAIL <{sender}>")
            return
        if (self.auth_user is not None and self.config.settings.auth.sender_must_match
                and not self.receiver.passwords().sender_allowed(self.auth_user, sender)):
            self._refuse(R_NOT_YOURS, f"MAIL <{sender}> by {self.auth_user}")
            return
        self.mail = True
        self.in_transaction = True
        self.sender = sender
        self.sender_refused = self.config.policy.sender_refused(sender)
        self.out.append(R_MAIL_OK)

    def _address(self, addr: bytes) -> str:
        # qmail replaces a bracketed literal of one of this host's addresses by
        # control/localiphost (spec §1.4 step 4); ours = the address the client
        # connected to (and 0.0.0.0).
        text = plain_address(_text(addr))
        if text.endswith("]"):
            text = rewrite_local_ip_literal(text, (self.localip,), self.config.localiphost)
        return text

    def _rcpt(self, arg: bytes) -> None:
        out = self.out
        if not self.mail:
            out.append(R_MAIL_FIRST)
            return
        parsed = parse_path(arg)
        if parsed is None:
            self._refuse(R_SYNTAX, "RCPT")
            return
        if self.sender_refused:
            self._refuse(R_BADMAILFROM, f"MAIL <{self.sender}> RCPT <{_text(parsed[0])}>")
            return
        if len(self.rcpts) >= self.max_rcpts:
            self._refuse(R_TOO_MANY_RCPTS, f"RCPT <{_text(parsed[0])}>")
            return
        rcpt = self._address(parsed[0])
        policy = self.config.policy
        refusal = policy.check_rcpt(rcpt, self.relayclient)
        final = policy.final_rcpt(rcpt, self.relayclient)
        why = ""
        if refusal is None and self.config.mailboxes is not None:
            # The address as queued: RELAYCLIENT's value may name the domain.
            refused = mailbox_refusal(self.config.mailboxes, final)
            if refused is not None:
                refusal, why = refused
        if refusal is not None:
            self._refuse(refusal.encode("utf-8", "surrogateescape") + b"\r\n", f"RCPT <{rcpt}>", why)
            return
        self.rcpts.append(final)
        out.append(R_RCPT_OK)

    def _data(self) -> None:
        if not self.mail:
            self.out.append(R_MAIL_FIRST)
            return
        if not self.rcpts:
            self.out.append(R_RCPT_FIRST)
            return
        self.out.append(R_GO_AHEAD)
        self.state = DATA
        self.scanner.reset()
        # A body sent without waiting for the 354 is read as it comes (qmail),
        # its first line whole even if no command line may be that long.
        rest = self.reader.take_body()
        if rest:
            self._feed_data(rest)

    # --- DATA -----------------------------------------------------------------------

    def _feed_data(self, data: bytes) -> None:
        scanner = self.scanner
        used = scanner.feed(data)
        if (scanner.has_nul or scanner.bare_cr and self.refuse_bare_cr
                or scanner.hops >= self.max_hops) and not scanner.dropped:
            # Refused at its end whatever follows (_end_data): not held meanwhile.
            scanner.drop()
        self._hold(scanner.buffered)
        if scanner.bare_lf:
            # qmail answers the first bare LF at once and drops the connection:
            # nothing of the message is queued and nothing after it is read.
            self._refuse(R_BARE_LF, f"DATA from <{self.sender}>")
            self._hold(0)
            self._reset_transaction()
            self._close_after_flush()
            return
        if not scanner.done:
            return
        if used < len(data):
            self.reader.feed(data[used:])
        self._end_data()

    def _end_data(self) -> None:
        scanner = self.scanner
        sender, rcpts = self.sender, self.rcpts
        self._reset_transaction()  # DATA ends the transaction whatever the outcome
        self.state = CMD
        if scanner.hops >= self.max_hops:
            self._refuse(R_HOPS, f"DATA from <{sender}>")
        elif scanner.too_big:
            self._refuse(R_TOO_BIG, f"DATA from <{sender}>")
        elif scanner.has_nul:
            self._refuse(R_NUL_DATA, f"DATA from <{sender}>")
        elif scanner.bare_cr and self.refuse_bare_cr:
            self._refuse(R_BARE_CR, f"DATA from <{sender}>")
        elif scanner.dropped:
            self._refuse(R_NO_MEMORY, f"DATA from <{sender}>")
        else:
            # Held (counted in self.held) until the commit ends.
            self._start_commit(sender, rcpts, scanner)
        if self.state != COMMIT:
            self._hold(0)
        scanner.reset()

    def _hold(self, n: int) -> None:
        """This session now holds n bytes of message in memory. Past the
        receiver's max_buffered_bytes the message is dropped (452 at its end)
        unless it is the only one held: a lone message always gets through."""
        receiver = self.receiver
        if n > self.held:
            total = receiver.buffered + n - self.held
            if total > receiver.config.settings.smtp.max_buffered_bytes and total > n:
                self.scanner.drop()
                n = 0
        receiver.buffered += n - self.held
        self.held = n

    def _start_commit(self, sender: str, rcpts: list[str], scanner: DataScanner) -> None:
        receiver = self.receiver
        now = time.time()
        pid = receiver.pid
        # The message's one copy, behind the Received lines; the scanner's is freed.
        message = scanner.take_message(
            queue_received_line(pid=pid, origin="network", uid=receiver.uid, when=now)
            + received_line(remotehost=self.remotehost, helo=self.helo, remoteip=self.remoteip,
                            remoteinfo=self.remoteinfo, local=self.local, when=now,
                            protocol=self.protocol))
        envelope = Envelope(sender=sender, recipients=tuple(rcpts), pid=pid, uid=receiver.uid, origin="network")
        self.state = COMMIT
        if not self.paused_for_write:
            self.transport.pause_reading()
        self.paused_for_commit = True
        self.task = receiver.start_commit(self, envelope, message)

    async def commit(self, envelope: Envelope, message: bytes) -> None:
        """Queue the message; reply 250 only once the spool says it is durable."""
        try:
            msgid = await self.receiver.spool.submit(envelope, message)
        except MessageTooBig as exc:
            log.warning("pid %d from %s: %s", self.number, self.remoteip, exc)
            reply = R_TOO_BIG       # stored with CRLF it is over the limit: no retry helps
            metrics.message_received("refused", self.scheme)
        except SpoolWriteError as exc:
            log.warning("pid %d from %s: spool write error: %s", self.number, self.remoteip, exc)
            reply = R_QQ_WRITE
            metrics.message_received("tempfail", self.scheme)
        except SpoolError as exc:
            log.warning("pid %d from %s: spool error: %s", self.number, self.remoteip, exc)
            reply = R_QQ_TEMP
            metrics.message_received("tempfail", self.scheme)
        except Exception:  # never let one message kill the receiver
            log.exception("pid %d from %s: unexpected error while queueing", self.number, self.remoteip)
            reply = R_QQ_TEMP
            metrics.message_received("tempfail", self.scheme)
        else:
            metrics.message_received("queued", self.scheme)
            reply = f"250 ok {int(time.time())} qp {msgid}\r\n".encode()
        self._hold(0)
        self._resume(reply)

    def _resume(self, reply: bytes) -> None:
        """After a commit or a credentials check: the reply, then the commands
        that were pipelined meanwhile, then reading again."""
        self.task = None
        self.paused_for_commit = False
        if self.state == CLOSED:
            return
        self.last_activity = time.monotonic()
        self.state = CMD
        self.out.append(reply)
        if self.receiver.closing:
            self.out.append(self.shutdown_reply())
            self._close_after_flush()
            return
        self._run_commands()
        if self.state == CLOSED:
            return
        if self.eof and self.state != COMMIT:
            self._close_after_flush()
            return
        if self.out:
            self._flush()
        if self.state in (CMD, DATA, AUTH) and not self.paused_for_write and not self.paused_for_commit:
            self.transport.resume_reading()

    # --- STARTTLS ---------------------------------------------------------------------

    def _starttls(self, arg: bytes) -> None:
        if self.tls is not None:
            self.out.append(R_UNIMPL)     # qmail-tls: not twice
            return
        if arg.strip():
            self.out.append(R_TLS_SYNTAX)
            return
        context = self.receiver.tls.context()
        if context is None:
            self._refuse(R_TLS_NO_CERT, "STARTTLS")
            return
        self.out.append(R_TLS_READY)
        self._flush()
        # CVE-2011-0411: whatever the client pipelined after STARTTLS in
        # plaintext is dropped, never executed; bytes still on their way are
        # dropped by data_received (state TLS) or break the handshake.
        self.reader.take_buffer()
        self.state = TLS
        self.transport.pause_reading()
        self.receiver.start_task(self._handshake(context))

    async def _handshake(self, context: Any) -> None:
        try:
            transport = await self.receiver.tls.handshake(
                self.transport, self, context, self.config.settings.tls.handshake_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # ssl.SSLError, a reset, the handshake timeout
            metrics.tls_result("failed", self.scheme)
            if self.state != CLOSED:
                self._note(f"TLS connection failed: {type(exc).__name__}: {exc}".rstrip(": "))
                self.state = CLOSED
                self.transport.abort()
                # Whether the loop tells the protocol or not, the count is released once.
                self.connection_lost(exc)
            return
        if self.state == CLOSED:      # the client left (or shutdown) meanwhile
            transport.abort()
            return
        self.transport = transport
        # RFC 3207 4.2: nothing of the plaintext session is kept (qmail-tls
        # resets HELO; AUTH, the transaction and any buffered byte go too).
        self.reader.take_buffer()
        self.helo = None
        self._reset_transaction()
        self.auth_user = None
        self.exchange = None
        self.relayclient = self.rule_relayclient
        self.remoteinfo = self.rule_remoteinfo
        self._encrypted(transport, "STARTTLS")
        self.last_activity = time.monotonic()
        self.state = CMD
        if not self.paused_for_write:
            transport.resume_reading()

    def _encrypted(self, transport: Any, how: str) -> None:
        """The session is encrypted from now on: the Received line says so
        (qmail-tls: `with ESMTPS (<cipher> encrypted)`), and the log."""
        cipher = session_cipher(transport)
        self.tls = cipher
        metrics.tls_result("ok", self.scheme)
        self.protocol = f"ESMTPS ({cipher} encrypted)"
        ssl_object = transport.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else "TLS"
        self._note(f"{how}: {version} {cipher} encrypted")

    # --- AUTH -------------------------------------------------------------------------

    def _auth(self, arg: bytes) -> None:
        if self.auth_user is not None:
            self._refuse(auth.R_AUTH_ALREADY, "AUTH")
            return
        if self.mail:
            self._refuse(auth.R_AUTH_IN_MAIL, "AUTH")
            return
        mech, _, initial = arg.partition(b" ")
        name = mech.upper().decode("ascii", "replace")
        if name not in self._mechanisms():
            self._refuse(auth.R_AUTH_TYPE, f"AUTH {name}")
            return
        self.exchange = auth.AuthExchange(name, self.local)
        self._auth_step(self.exchange.start(initial.strip()))

    def _auth_step(self, got: "bytes | auth.Credentials") -> None:
        if isinstance(got, bytes):
            if got.startswith(b"334"):
                self.state = AUTH         # a prompt: the exchange goes on
                self.out.append(got)
            else:
                self.exchange, self.state = None, CMD
                self._refuse(got, "AUTH")
            return
        self.exchange = None
        self.state = CHECK
        if not self.paused_for_write:
            self.transport.pause_reading()
        self.paused_for_commit = True
        self.task = self.receiver.start_task(self._check(got))

    async def _check(self, creds: "auth.Credentials") -> None:
        receiver = self.receiver
        throttle = receiver.throttle
        ip = self.remoteip
        who = f"[{ip}] {creds.login}"
        close = False
        try:
            # Counted before the check, so guesses sent at once are counted at once.
            attempt = await throttle.attempt(ip) if throttle is not None else 0
            if attempt is None:
                ok, why, close = False, "locked out", True
            else:
                ok, why = await receiver.passwords().check(creds, ip)
            if ok:
                if throttle is not None:
                    await throttle.success(ip)
            elif not close:
                # [login] settings: a growing delay, then 421 and close (the
                # patches slept a fixed 5 s holding a process).
                delay = (await throttle.failed(ip, attempt) if throttle is not None
                         else self.config.settings.auth.failure_delay)
                if delay == math.inf:
                    close = True
                elif delay > 0 and self.state != CLOSED:
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # accounts unreadable, the shared throttle unreachable
            log.warning("pid %d from %s: AUTH %s: %s", self.number, ip, creds.login, exc)
            self._note(f"AUTH unavailable {who}: {exc}")
            metrics.auth_result("tempfail", creds.mechanism, self.scheme)
            self._resume(auth.R_AUTH_TEMP)
            return
        if ok:
            self.auth_user = creds.login
            self.relayclient = ""      # the patches' RELAYCLIENT="": relaying allowed
            self.remoteinfo = creds.login
            self.protocol = (f"ESMTPSA ({self.tls} encrypted)" if self.tls is not None else "ESMTPA")
            self._note(f"AUTH successful {who} ({creds.mechanism})")
            metrics.auth_result("ok", creds.mechanism, self.scheme)
            self._resume(auth.R_AUTH_OK)
            return
        self._note(f"AUTH failed {who} ({creds.mechanism}: {why})")
        metrics.auth_result("locked_out" if why == "locked out" else "failed", creds.mechanism,
                            self.scheme)
        if close:
            if self.state == CLOSED:
                return
            self.task = None
            self.paused_for_commit = False
            self.out.append(f"421 {self.me} too many failed logins from your address, "
                            f"try again later (#4.7.0)\r\n".encode())
            self._close_after_flush()
            return
        self._resume(auth.R_AUTH_FAILED)

    # --- rblsmtpd ---------------------------------------------------------------------

    def _start_rbl_block(self, text: str) -> None:
        # RBLSMTPD set and non-empty (spec §1.8): "-text" blocks permanently (553),
        # anything else temporarily (451); the text is cut to 200 bytes and made printable.
        code = "451"
        if text.startswith("-"):
            code, text = "553", text[1:]
        raw = text.encode("utf-8", "surrogateescape")[:200]
        clean = bytes(c if 32 <= c <= 126 else 63 for c in raw)
        self.rbl_reply = code.encode() + b" " + clean + b"\r\n"
        self.state = RBL
        self.end_status = END_QUIT   # rblsmtpd exits 0 on QUIT, EOF and its timeout alike
        if self.log is not None:
            self.log.rblsmtpd(self.remoteip, self.number, self.rbl_reply[:-2].decode("ascii"))
        self.transport.write(b"220 rblsmtpd.local\r\n")

    def _run_rbl_commands(self) -> None:
        reader = self.reader
        while self.state == RBL:
            if len(self.out) >= MAX_PENDING_REPLIES:
                self._flush()
                if self.write_paused:
                    return          # the rest when the client reads (resume_writing)
            line = reader.next_line()
            if line is None:
                if reader.unterminated > self.max_line + 1:
                    self._long_line(self.rbl_reply)
                return
            if line is TOO_LONG:
                if self.long_line_answered:
                    self.long_line_answered = False
                    continue
                self.out.append(self.rbl_reply)
                continue
            verb = parse_command(line)[0]
            if verb in (b"HELO", b"EHLO", b"MAIL", b"RSET", b"NOOP"):
                self.out.append(b"250 rblsmtpd.local\r\n")
            elif verb == b"QUIT":
                self.out.append(b"221 rblsmtpd.local\r\n")
                self.end_status = END_QUIT
                self._close_after_flush()
            else:
                self.out.append(self.rbl_reply)

    # --- called by the receiver -----------------------------------------------------

    def shutdown_reply(self) -> bytes:
        return f"421 {self.me} service shutting down, try again later (#4.3.2)\r\n".encode()

    def busy(self) -> bool:
        """True while a message is being received or committed (shutdown waits for it)."""
        return self.state in (DATA, COMMIT)

    def begin_shutdown(self) -> None:
        """Close now unless a message is in flight; then close after its reply."""
        if self.state in (CMD, RBL, AUTH, CHECK) and not self.in_transaction:
            self.out.append(self.shutdown_reply())
            self._close_after_flush()
        elif self.state in (LOOKUP, TLS):
            self.state = CLOSED
            self.transport.close()

    def check_idle(self, now: float) -> None:
        """Called about once a second: qmail's timeoutsmtpd (451, then close);
        rblsmtpd drops a blocked client after its own timeout (-t)."""
        if self.state == CLOSED:
            # Closed, but close() waits for replies the client does not read
            # (its 451, a QUIT's 221 behind pipelined answers): qmail-smtpd's
            # write timeout ends that too, or the connection kept its slot for good.
            if now - self.last_activity >= self.timeout:
                self.abort()
            return
        if self.state == RBL:
            if now - self.connected_at >= self.config.settings.smtp.rblsmtpd_timeout:
                self.state = CLOSED
                self.transport.close()
            return
        if self.state in (CMD, DATA, AUTH) and now - self.last_activity >= self.timeout:
            self.out.clear()
            self._refuse(R_TIMEOUT)
            self._close_after_flush()

    def abort(self) -> None:
        self.state = CLOSED
        if self.transport is not None:
            self.transport.abort()
