"""One POP3 connection: qmail-popup's AUTHORIZATION, then qmail-pop3d's TRANSACTION.

A `Pop3Session` owns one connection's state: the line reader, the login in
progress, and after a login the locked `Mailbox` (engine.pop3.maildir) with
its deletion marks. The receiver owns the process-wide parts (config
snapshot, sessions set for timeouts and shutdown, log); `Pop3Service` the
accounts view and the password executor.

Replies are qmail-popup's and qmail-pop3d's texts (spec vpopmail-pop3-auth.md
§1.3, §1.6): `+OK ` with its trailing space, `-ERR authorization first`,
`-ERR unimplemented`, the message-number errors, STAT counting deleted
messages, LAST, `RETR i k` = `TOP i k`. Where qrelay differs on purpose
(README's compatibility table): CAPA and STLS (RFC 2449, 2595), USER/PASS
only over TLS or from this host unless `[pop3] allow_plaintext`, pipelined
commands after PASS are answered instead of lost, a failed login waits
the throttle's delay (engine.relay.throttle; `[auth] failure_delay` without
one) before its `-ERR`, one
session per mailbox (`-ERR [IN-USE] …`), a line-length limit, an APOP
timestamp unique per connection (`<PID.N.TIME@HOST>`).

States: AUTH (qmail-popup) → CHECK (password check in the hashing thread)
→ TRANS (qmail-pop3d) ⇄ SEND (a message streaming) → COMMIT (QUIT's unlinks
and renames in the hashing thread; none to do: closed at once) → CLOSED. TLS
(the STLS or pop3s handshake) pauses AUTH. Commands pipelined behind a login,
a RETR or STLS wait in the line reader, and reading pauses once more bytes
come, so they cannot pile up (plaintext behind STLS is discarded); so do
commands behind answers the client has not read (the transport above its
high-water mark), so their answers cannot pile up either.

Nothing in the Maildir changes before QUIT: a dropped connection, a timeout
or a shutdown releases the lock and leaves every file where it was.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from engine import metrics
from engine._smtpcore import TOO_LONG, LineReader, parse_command
from engine.config.domains import ascii_lower
from engine.log import logsafe
from engine.pop3 import login as logins
from engine.pop3.maildir import Mailbox, Message
from engine.pop3.stream import WriteGate, send_file

if TYPE_CHECKING:
    from engine.pop3.service import Pop3Service

# A child of qrelay.smtpd: the receiver sends its records to log/smtpd.
log = logging.getLogger("qrelay.smtpd.pop3")

AUTH, CHECK, TRANS, SEND, COMMIT, TLS, CLOSED = range(7)

OK = b"+OK \r\n"
R_AUTH_FIRST = b"-ERR authorization first\r\n"
R_UNIMPL = b"-ERR unimplemented\r\n"
R_SYNTAX = b"-ERR syntax error\r\n"
R_USER_FIRST = b"-ERR USER first\r\n"
R_AUTH_FAILED = b"-ERR authorization failed\r\n"
R_NOZERO = b"-ERR messages are counted from 1\r\n"
R_TOOBIG = b"-ERR not that many messages\r\n"
R_DELETED = b"-ERR already deleted\r\n"
R_NOSUCH = b"-ERR unable to open that message\r\n"
R_NOUNLINK = b"-ERR unable to unlink all deleted messages\r\n"
R_TEMP = b"-ERR [SYS/TEMP] unable to read the account files, try again later\r\n"
R_LINE_TOO_LONG = b"-ERR line too long\r\n"
R_STLS_GO = b"+OK begin TLS negotiation\r\n"
R_STLS_ACTIVE = b"-ERR TLS already active\r\n"
R_CLEAR = b"-ERR [AUTH] no password in clear: STLS first, or port 995\r\n"

# An unterminated line this many times max_line_length long: not a POP3 client.
LONG_LINE_CLOSE_FACTOR = 64


def _one_line(text: str) -> str:
    """Free text (an error's reason) fit for one log line: no control bytes."""
    return "".join(c if c.isprintable() else "_" for c in text)


class Pop3Session(asyncio.Protocol):
    """One POP3 connection (see the module docstring)."""

    def __init__(self, service: "Pop3Service", tls: bool = False) -> None:
        self.service = service
        self.receiver = service.receiver
        self.config = self.receiver.config          # the snapshot this connection keeps
        self.settings = self.config.settings.pop3
        self.transport: Any = None
        self.state = AUTH
        self.out: list[bytes] = []
        self.reader = LineReader(self.settings.max_line_length)
        self.gate = WriteGate()
        self.user: str | None = None
        self.login = ""           # once logged in: the name as logged (lower-cased)
        self.mailbox: Mailbox | None = None
        self.last = 0
        self.tls = tls            # pop3s: the listener did the handshake already
        self.committing = False
        self.reading_paused = False
        self.eof = False          # the client has shut its side: answer what it sent, then close
        self.remoteip = "unknown"
        self.private = False      # the peer is this host itself (its address is ours)
        self.timestamp = ""
        self.last_activity = time.monotonic()
        self.task: asyncio.Task | None = None
        self.counted = False      # in the receiver's POP3 connection counts

    # --- connection lifecycle -------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remoteip = peer[0] if peer else "unknown"
        own = transport.get_extra_info("sockname")
        self.private = bool(peer and own and peer[0] == own[0])
        if self.tls:        # pop3s: the listener's handshake (its failures count in engine.tls)
            metrics.tls_result("ok", "pop3")
        receiver = self.receiver
        number = receiver.counter.next_number()
        st = self.settings
        refused = receiver.admit(receiver.pop3_counter, self.remoteip, st.max_connections,
                                 st.max_connections_per_ip)
        if refused is not None:
            self._refuse(refused)
            return
        self.counted = True
        # qmail-popup's <PID.TIME@HOST>, with this process's connection number:
        # unique per connection, so an APOP digest can never be replayed.
        self.timestamp = f"<{receiver.pid}.{number}.{int(time.time())}@{self.config.me}>"
        receiver.sessions.add(self)
        metrics.session_opened("pop3")
        transport.write(f"+OK {self.timestamp}\r\n".encode())

    def _refuse(self, refused: str) -> None:
        """Over a cap (Receiver.admit): say so and close, counting nothing."""
        self.state = CLOSED
        why = "too many connections from your address" if refused == "ip" else "too many connections"
        self.transport.write(f"-ERR [SYS/TEMP] {why}, try again later\r\n".encode())
        self.transport.close()
        metrics.session_refused("limit", "pop3")
        st = self.settings
        cap = self.receiver.refusal_detail(
            refused, f"{self.receiver.pop3_counter.total()}/{st.max_connections} connections",
            st.max_connections_per_ip)
        self._log(f"pop3: connection from {self.remoteip} refused: too many connections ({cap})")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.receiver.pop3_counter.release(self.remoteip)
        self.state = CLOSED
        self.gate.resume()
        if self in self.receiver.sessions:
            metrics.session_closed("pop3")
        self.receiver.sessions.discard(self)
        if self.mailbox is not None and not self.committing:
            # Dropped before QUIT: nothing changes, the lock goes.
            self.mailbox.close()
            self.mailbox = None

    def eof_received(self) -> bool:
        # qmail-pop3d answers every command it read before the EOF: a client
        # that half-closes after its pipelined commands still gets their
        # answers, and a QUIT among them its deletions. The transport stays
        # open for writing; the session closes once the reader is drained.
        if self.state == CLOSED:
            return False
        self.eof = True
        if self.state in (AUTH, TRANS):
            self._run_commands()
            if self.state in (AUTH, TRANS):
                self._flush()
        return True

    def pause_writing(self) -> None:
        self.gate.pause()

    def resume_writing(self) -> None:
        self.gate.resume()
        self.last_activity = time.monotonic()
        if self.state in (AUTH, TRANS) and self.reading_paused:
            self._resume(self.state)        # the commands that waited for the client to read

    # --- input ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.last_activity = time.monotonic()
        self.reader.feed(data)
        if self.state in (AUTH, TRANS):
            self._run_commands()
            if self.state in (AUTH, TRANS):
                self._flush()
            # else: a login, a message or a commit started; what is pending goes
            # out with its answer (one write per exchange, not one per reply)
        else:
            # A login, a message or a commit in flight: what follows waits in
            # the reader, and reading stops so it cannot pile up. (Paused here,
            # when bytes come, not when the step starts: a client that waits
            # for its answers costs no pause and resume.)
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _flush(self) -> None:
        if self.out and self.state != CLOSED:
            self.transport.write(b"".join(self.out))
            self.out.clear()

    def _close(self) -> None:
        """Write what is pending, then close (the Maildir lock goes in connection_lost)."""
        if self.state == CLOSED:
            return
        self._flush()
        self.state = CLOSED
        self.transport.close()

    def _spawn(self, coro: Any) -> asyncio.Task:
        """The one step in flight for this connection; a bug in it drops the
        connection (logged), never the receiver."""
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._step_done)
        self.task = task
        return task

    def _step_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("pop3 session from %s failed", self.remoteip, exc_info=task.exception())
        self.abort()

    def _resume(self, state: int) -> None:
        """Back to reading commands after something asynchronous finished."""
        if self.state == CLOSED:
            return
        self.state = state
        self.last_activity = time.monotonic()
        self._run_commands()
        if self.state in (AUTH, TRANS):
            self._flush()
            if self.reading_paused and not self.gate.paused:
                self.reading_paused = False
                self.transport.resume_reading()

    def _run_commands(self) -> None:
        reader = self.reader
        while self.state in (AUTH, TRANS):
            if self.gate.paused:
                # The client is not reading its answers: what it sent next waits
                # in the reader, reading stops, and resume_writing goes on. Six
                # bytes of UIDL can ask for megabytes; they must not pile up here.
                self._pause_reading()
                return
            line = reader.next_line()
            if line is None:
                if self.eof:
                    self._close()          # all read is answered (a last line without LF: never read)
                elif reader.unterminated > LONG_LINE_CLOSE_FACTOR * self.settings.max_line_length:
                    self.out.append(R_LINE_TOO_LONG)
                    self._close()
                return
            if line is TOO_LONG:
                self.out.append(R_LINE_TOO_LONG)
                continue
            nul = line.find(b"\0")
            if nul >= 0:
                line = line[:nul]          # qmail's reader: a NUL ends the line
            verb, arg = parse_command(line)
            if self.state == AUTH:
                self._authorization(verb, arg)
            else:
                self._transaction(verb, arg)

    # --- AUTHORIZATION (qmail-popup) ---------------------------------------------------

    def _authorization(self, verb: bytes, arg: bytes) -> None:
        out = self.out
        if verb == b"USER":
            if not arg:
                out.append(R_SYNTAX)
            elif not self._clear_ok():
                self._log(f"pop3: USER before TLS from {self.remoteip} refused: no password "
                          "in clear ([pop3] allow_plaintext)")
                out.append(R_CLEAR)
            else:
                self.user = arg.decode("utf-8", "surrogateescape")
                out.append(OK)
        elif verb == b"PASS":
            if self.user is None:
                out.append(R_USER_FIRST)
            elif not arg:
                out.append(R_SYNTAX)
            else:
                self._begin_login(self.user, arg.decode("utf-8", "surrogateescape"), None)
        elif verb == b"APOP":
            name, space, digest = arg.partition(b" ")
            if not space:
                out.append(R_SYNTAX)
            else:
                self._begin_login(name.decode("utf-8", "surrogateescape"),
                                  digest.decode("ascii", "replace"), self.timestamp)
        elif verb == b"QUIT":
            out.append(OK)
            self._close()
        elif verb == b"NOOP":
            out.append(OK)
        elif verb == b"CAPA":
            out.append(self._capabilities())
        elif verb == b"STLS":
            self._stls()
        else:
            out.append(R_AUTH_FIRST)

    def _clear_ok(self) -> bool:
        """Whether USER/PASS may be used now: over TLS, from this host itself,
        or with `[pop3] allow_plaintext` (qmail-popup's way)."""
        return self.tls or self.private or self.settings.allow_plaintext

    def _capabilities(self) -> bytes:
        caps = ["+OK capability list follows", "TOP", "UIDL", "PIPELINING", "RESP-CODES"]
        if self.state == AUTH:
            if self._clear_ok():
                caps.append("USER")
            if not self.tls and self.service.tls_context() is not None:
                caps.append("STLS")
        caps += ["IMPLEMENTATION qrelay", "."]
        return "".join(c + "\r\n" for c in caps).encode()

    def _stls(self) -> None:
        if self.tls:
            self.out.append(R_STLS_ACTIVE)
            return
        if self.service.tls_context() is None:
            self.out.append(R_AUTH_FIRST)   # no certificate: as qmail-popup answers it
            return
        self.out.append(R_STLS_GO)
        self._flush()
        self.reader.take_buffer()          # plaintext pipelined behind STLS is never read
        self.user = None
        self.state = TLS
        self._pause_reading()
        self._spawn(self._handshake())

    async def _handshake(self) -> None:
        context = self.service.tls_context()
        try:
            if context is None:
                raise ConnectionError("no control/servercert.pem")
            # The signature in the handshake threads, not on the loop (engine.tls_transport).
            transport = await self.receiver.tls.handshake(
                self.transport, self, context, self.config.settings.tls.handshake_timeout)
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as exc:
            log.info("pop3 TLS handshake with %s failed: %s", self.remoteip, exc)
            metrics.tls_result("failed", "pop3")
            if self.state != CLOSED:
                self.state = CLOSED
                self.transport.abort()
            return
        if self.state == CLOSED or transport is None:
            return
        self.transport = transport
        self.tls = True
        metrics.tls_result("ok", "pop3")
        self.reader.take_buffer()
        self._resume(AUTH)

    def _begin_login(self, name: str, secret: str, apop: str | None) -> None:
        # Replies still pending (a pipelined USER's) go out with the answer.
        self.state = CHECK
        self._spawn(self._login(name, secret, apop))

    async def _login(self, name: str, secret: str, apop: str | None) -> None:
        receiver = self.receiver
        ip = self.remoteip
        throttle = getattr(receiver, "throttle", None)
        result: logins.LoginResult | None = None
        # Counted before the check, so guesses sent at once are counted at once.
        attempt = await throttle.attempt(ip) if throttle is not None else 0
        if attempt is not None:
            check = partial(logins.check_login, self.service.accounts, name, secret,
                            apop_timestamp=apop, max_messages=self.settings.max_messages,
                            dummy_hash=self.service.dummy.get, hash_seen=self.service.dummy.seen,
                            webmail=self._webmail(), remoteip=ip,
                            max_password_bytes=self.config.settings.auth.max_password_bytes)
            result = await self.service.run(check)
        outcome = result.outcome if result is not None else "locked out"
        mechanism = "apop" if apop is not None else "user"
        if outcome in (logins.OK, logins.MAILBOX):
            metrics.auth_result("ok", mechanism, "pop3")
            await self._granted(result)
            return
        if outcome == logins.TEMPORARY:
            metrics.auth_result("tempfail", mechanism, "pop3")
            self._log(f"{self._vchkpw()}: temporary failure reading accounts "
                      f"{logsafe(ascii_lower(name))}:{ip}")
            if self.state != CLOSED:
                self.out.append(R_TEMP)
                self._close()
            return
        # A wrong user or password, NO_POP (NO_WEBMAIL), or a client the throttle has locked
        # out: the same answer, and one attempt per connection (qmail-popup).
        # The throttle's delay comes first; a lockout answers at once.
        if throttle is None:
            delay = self.config.settings.auth.failure_delay
        elif result is None:
            delay = 0.0
        else:
            delay = await throttle.failed(ip, attempt)
            if math.isinf(delay):
                delay = 0.0
        # vchkpw logs user@domain as it parsed them (`joe%dom`, `joe` in the default domain).
        who = result.login if result is not None else ascii_lower(name)
        self._log(f"{self._vchkpw()}: {outcome} {logsafe(who)}:{ip}")
        metrics.auth_result("locked_out" if result is None else "failed", mechanism, "pop3")
        if delay > 0 and self.state != CLOSED:
            await asyncio.sleep(delay)
        if self.state != CLOSED:
            self.out.append(R_AUTH_FAILED)
            self._close()

    async def _granted(self, result: logins.LoginResult) -> None:
        """A right password: the throttle forgets, the client may relay
        (POP-before-SMTP, unless NO_RELAY), then the mailbox opens."""
        receiver = self.receiver
        ip = self.remoteip
        throttle = getattr(receiver, "throttle", None)
        try:
            if throttle is not None:
                await throttle.success(ip)
            relay = getattr(receiver, "relay", None)
            if relay is not None and result.user is not None and not result.user.no_relay:
                await relay.grant(ip)
        except Exception as exc:  # the relay table's store down: the login still counts
            log.warning("pop3: relay grant for %s failed: %s", ip, exc)
        mailbox = result.mailbox
        if self.state == CLOSED:
            if mailbox is not None:
                mailbox.close()
            return
        if mailbox is None:
            # EACCES here: the receivers do not run as the mailbox's owner ([run] user).
            why = f" ({_one_line(result.why)}; this receiver runs as uid {os.getuid()})" \
                if result.why else ""
            self._log(f"pop3d: {logsafe(result.login)}:{ip}: -ERR {result.reply}{why}")
            self.out.append(f"-ERR {result.reply}\r\n".encode())
            self._close()
            return
        self.mailbox = mailbox
        self.login = result.login
        self.out.append(OK)
        self._resume(TRANS)

    def _webmail(self) -> bool:
        return self.remoteip in self.settings.webmail_addresses

    def _vchkpw(self) -> str:
        """vchkpw's log name for this connection."""
        return "vchkpw-webmail" if self._webmail() else "vchkpw-pop3"

    def _log(self, text: str) -> None:
        """One line to log/smtpd; its variable parts are made safe by the caller
        (logsafe for names, as qmail's lines)."""
        smtpd_log = self.receiver.log
        if smtpd_log is not None:
            smtpd_log.line(text)

    # --- TRANSACTION (qmail-pop3d) -----------------------------------------------------

    def _transaction(self, verb: bytes, arg: bytes) -> None:
        out = self.out
        messages = self.mailbox.messages
        if verb == b"STAT":
            total = sum(m.size for m in messages if not m.deleted)
            out.append(f"+OK {len(messages)} {total}\r\n".encode())
        elif verb in (b"LIST", b"UIDL"):
            self._listing(arg, verb == b"UIDL")
        elif verb == b"DELE":
            i = self._msgno(arg)
            if i is not None:
                messages[i].deleted = True
                self.last = max(self.last, i + 1)
                out.append(OK)
        elif verb in (b"RETR", b"TOP"):
            self._top(arg)
        elif verb == b"RSET":
            for m in messages:
                m.deleted = False
            self.last = 0
            out.append(OK)
        elif verb == b"LAST":
            out.append(f"+OK {self.last}\r\n".encode())
        elif verb == b"NOOP":
            out.append(OK)
        elif verb == b"QUIT":
            self._quit()
        elif verb == b"CAPA":
            out.append(self._capabilities())
        else:
            out.append(R_UNIMPL)

    def _msgno(self, arg: bytes) -> int | None:
        digits = _leading_digits(arg)
        if not digits:
            self.out.append(R_SYNTAX)
            return None
        u = _number(digits)
        if u == 0:
            self.out.append(R_NOZERO)
            return None
        messages = self.mailbox.messages
        if u > len(messages):
            self.out.append(R_TOOBIG)
            return None
        if messages[u - 1].deleted:
            self.out.append(R_DELETED)
            return None
        return u - 1

    def _listing(self, arg: bytes, uidl: bool) -> None:
        def entry(i: int, m: Message) -> str:
            return f"{i + 1} {m.uidl if uidl else m.size}\r\n"

        # A name is the file system's bytes (surrogateescape): sent as they are.
        if arg:
            i = self._msgno(arg)
            if i is not None:
                self.out.append(("+OK " + entry(i, self.mailbox.messages[i])).encode(
                    "utf-8", "surrogateescape"))
            return
        lines = [entry(i, m) for i, m in enumerate(self.mailbox.messages) if not m.deleted]
        self.out.append(("+OK \r\n" + "".join(lines) + ".\r\n").encode("utf-8", "surrogateescape"))
        self._flush()      # a listing can be large: the transport's flow control sees it now

    def _top(self, arg: bytes) -> None:
        i = self._msgno(arg)
        if i is None:
            return
        # qmail-pop3d: the number's digits, spaces, then the line count (none: whole message)
        rest = arg[len(_leading_digits(arg)):].lstrip(b" ")
        count = _leading_digits(rest)
        body_lines = _number(count) if count else -1
        self.state = SEND
        message = self.mailbox.messages[i]
        self._spawn(self._send(self.mailbox.file(message), message.name, body_lines))

    async def _send(self, path: str, name: str, body_lines: int) -> None:
        # Replies still pending go out in the same write as the +OK.
        pending = b"".join(self.out)
        self.out.clear()
        # Plain TCP: the stream may write to the socket itself (stream._write).
        sock = None if self.tls else self.transport.get_extra_info("socket")
        try:
            refused = await send_file(self.transport, self.gate, path, pending + OK, body_lines,
                                      self.settings.chunk_bytes, sock.fileno() if sock is not None else -1)
        except OSError as exc:
            # qmail-pop3d dies on a read error: truncated reply, no terminator.
            log.warning("pop3: reading %s failed: %s", path, exc)
            if self.state != CLOSED:
                self.state = CLOSED
                self.transport.abort()
            return
        if refused is not None:
            # EACCES here: the receivers do not run as the mailbox's owner ([run] user).
            self._log(f"pop3d: {logsafe(self.login)}:{self.remoteip}: -ERR unable to open that message "
                      f"({logsafe(name)}: {_one_line(refused)}; this receiver runs as uid {os.getuid()})")
            self.out.append(pending + R_NOSUCH)
        if self.receiver.closing and self.state != CLOSED:
            self._close()
            return
        self._resume(TRANS)

    def _quit(self) -> None:
        mailbox = self.mailbox
        assert mailbox is not None
        if not mailbox.has_changes():
            # Nothing to unlink or rename: answered now, no step in flight.
            mailbox.close()
            self.mailbox = None
            self._quit_done(0)
            return
        self.state = COMMIT
        self.committing = True
        # Shutdown waits for a commit as for the spool's (Receiver.tasks).
        task = self._spawn(self._commit())
        self.receiver.tasks.add(task)
        task.add_done_callback(self.receiver.tasks.discard)

    async def _commit(self) -> None:
        mailbox = self.mailbox
        assert mailbox is not None
        try:
            failed = await self.service.run(mailbox.commit)
        finally:
            mailbox.close()
            self.mailbox = None
            self.committing = False
        if failed:
            # EACCES here: the receivers do not run as the mailbox's owner ([run] user).
            name, why = failed[0]
            deleted = sum(m.deleted for m in mailbox.messages)
            self._log(f"pop3d: {logsafe(self.login)}:{self.remoteip}: -ERR unable to unlink all "
                      f"deleted messages ({len(failed)} of {deleted}: {logsafe(name)}: "
                      f"{_one_line(why)}; this receiver runs as uid {os.getuid()})")
        if self.state != CLOSED:
            self._quit_done(len(failed))

    def _quit_done(self, failed: int) -> None:
        self.out.extend([R_NOUNLINK] * failed)
        self.out.append(OK)
        self.state = TRANS
        self._close()

    # --- called by the receiver -----------------------------------------------------

    def busy(self) -> bool:
        """A message being sent or QUIT's commit in flight: shutdown waits for it."""
        return self.state in (SEND, COMMIT)

    def begin_shutdown(self) -> None:
        """Idle sessions close at once (nothing changes without QUIT); a message
        being sent finishes first."""
        if self.state in (AUTH, TRANS, CHECK, TLS):
            self._close()

    def check_idle(self, now: float) -> None:
        """qmail's 1200-second read and write timeouts: a silent close."""
        if self.state == CLOSED:
            # Closed, but close() waits for answers the client does not read:
            # the write timeout ends that too (else it keeps its slot for good).
            if now - self.last_activity >= self.settings.timeout and self.transport is not None:
                self.transport.abort()
            return
        if self.state in (AUTH, TRANS, SEND) and now - self.last_activity >= self.settings.timeout:
            if self.state == SEND and not self.gate.paused:
                return   # still sending at full speed
            self.abort()

    def abort(self) -> None:
        if self.state != CLOSED:
            self.state = CLOSED
            if self.transport is not None:
                self.transport.abort()


def _number(digits: bytes) -> int:
    """The value of a message number or line count, at most 2**62: int() refuses
    more than 4300 digits, and [pop3] max_line_length may allow more."""
    digits = digits.lstrip(b"0")
    return int(digits or b"0") if len(digits) <= 18 else 1 << 62


def _leading_digits(arg: bytes) -> bytes:
    n = 0
    while n < len(arg) and 48 <= arg[n] <= 57:
        n += 1
    return arg[:n]
