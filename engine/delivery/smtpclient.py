"""Outbound SMTP: one client connection (`SmtpConnection`) and the pool that
reuses connections for many messages to the same host (`ConnectionPool`).

The connection speaks SMTP and reports what the server said (`Reply`,
`TransactionOutcome`); turning that into qmail-remote's K/Z/D texts is
remote.py's job. TLS (qmail-tls's qmail-remote): with a `TlsRequest` the
connection does STARTTLS when the server offers it (implicit TLS on port
465), checks the certificate as the destination's policy says
(engine.delivery.tlspolicy) and introduces itself again; `conn.tls` then
names the protocol and cipher, and a pooled connection keeps it. Under an
opportunistic policy the pool retries a failed handshake in clear on a new
connection; under a required one `TlsFailed` carries qmail-tls's text.

Byte-exactness lives in `data_wire`: the stored message goes out unchanged
except for dot-stuffing, and no stored byte sequence can end DATA early
(the SMTP smuggling class of bugs, which notqmail has with a stored
`\\r.\\r\\n`).

This module never resolves names and never touches the spool.
"""
from __future__ import annotations

import asyncio
import errno
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from engine import metrics
from engine.delivery.tlspolicy import NONE, SMTPS_PORT, TlsContexts, TlsPolicy, check_peer

# qmail-remote keeps up to this much of a reply for "Remote host said:".
MAX_REPLY_TEXT = 5000
# A reply with more lines than this is a hostile or broken server.
MAX_REPLY_LINES = 1000
# StreamReader line limit: a longer reply line is a protocol error.
MAX_REPLY_LINE = 65536
# Of each EHLO reply line, this much is read for the extension it names
# (RFC 5321 4.5.3.1.5: a reply line is at most 512 octets).
MAX_EHLO_LINE = 512

# Large bodies are written in pieces of this size, each under timeoutremote.
WRITE_CHUNK = 256 * 1024
DOT = b".\r\n"        # the end of DATA

def data_wire(message: bytes) -> bytes:
    """The bytes to send after a 354: `message` dot-stuffed, ending in CRLF.CRLF."""
    return stuffed(message) + DOT


def stuffed(message: bytes) -> bytes:
    """data_wire without the final dot: `message` dot-stuffed, ending in CRLF
    (or empty); the message itself when it needs no change.

    `message` is the stored wire form (CRLF line ends, not dot-stuffed). A bare
    CR or bare LF in it is sent as CRLF, so the transmitted stream has only
    CRLF line ends and every line that starts with "." is stuffed: no reading
    of it by the next hop, strict or lenient about bare CR/LF, can find the
    end of DATA before our terminator.
    """
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        # What re.sub(rb"\r\n|\r|\n", b"\r\n") gives, without a piece per line
        # end held before the join (60 times the message for short lines).
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


@dataclass(slots=True, frozen=True)
class Reply:
    """One SMTP reply: its code and its text as qmail-remote shows it
    (every line, CRs dropped, NULs as '?', each line ending in "\\n")."""
    code: int
    text: str


class SmtpError(Exception):
    """Base of the errors below; `reply` is the server's reply when there is one."""

    def __init__(self, ip: str, reply: Reply | None = None, detail: str = "") -> None:
        super().__init__(detail or (reply.text.strip() if reply else ip))
        self.ip = ip
        self.reply = reply


class ConnectFailed(SmtpError):
    """connect() failed: refused, unreachable or timed out (try the next address)."""

    def __init__(self, ip: str, detail: str = "", timed_out: bool = False) -> None:
        super().__init__(ip, None, detail)
        self.timed_out = timed_out


class NoLocalResources(ConnectFailed):
    """No socket for want of a local resource (EMFILE at the open-files limit,
    ENFILE, ENOBUFS, ENOMEM): no address would do better."""


# socket() and connect() errors that are this host's, not the destination's.
LOCAL_RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class GreetingFailed(SmtpError):
    """Connected, but the greeting was not 220 (try the next address)."""


class NameRejected(SmtpError):
    """EHLO and HELO were both refused (qmail: stay with this host, defer)."""


class ConnectionDied(SmtpError):
    """EOF, error, timeout or a garbled reply. `after_dot`: the message may
    have been delivered (qmail's "Possible duplicate!")."""

    def __init__(self, ip: str, detail: str = "", after_dot: bool = False) -> None:
        super().__init__(ip, None, detail or "connection died")
        self.after_dot = after_dot


class TlsFailed(SmtpError):
    """TLS could not be had as the policy wants. `text`: the qmail-style
    deferral (ending in "\\n"); `fallback`: the policy is opportunistic and a
    new connection in clear may be tried."""

    def __init__(self, ip: str, text: str, reply: Reply | None = None,
                 fallback: bool = False) -> None:
        super().__init__(ip, reply, text.strip())
        self.text = text + (f"Remote host said: {reply.text}" if reply is not None else "")
        self.fallback = fallback


@dataclass(slots=True, frozen=True)
class TlsRequest:
    """TLS wanted on a connection: the destination's policy and the next hop's
    name (sent as SNI, and the name its certificate must carry). Hashable:
    part of the pool's key, so a connection is only reused under the policy
    it was opened with."""
    policy: TlsPolicy
    server_name: str


@dataclass(slots=True)
class TransactionOutcome:
    """What the server answered in one MAIL…DATA transaction."""
    mail: Reply
    rcpt: list[Reply] = field(default_factory=list)   # one per recipient, in order
    data: Reply | None = None      # reply to DATA (None: DATA not sent)
    final: Reply | None = None     # reply after the final dot (None: body not sent)
    # The connection died before DATA's reply, after the server refused some
    # recipients: `rcpt` holds the replies that came (see _kept_refusals).
    died: bool = False


class SmtpConnection:
    """One client connection to (ip, port), greeted and introduced.

    Use `await SmtpConnection.open(...)`; then `transaction()` for each
    message, `reset()` between messages, `quit()` at the end.
    """

    def __init__(self, ip: str, port: int, helohost: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, timeoutremote: float) -> None:
        self.ip = ip
        self.port = port
        self.helohost = helohost
        self._reader = reader
        self._writer = writer
        self._timeout = timeoutremote
        self.extensions: dict[str, str] = {}   # EHLO keyword (upper) -> parameters
        self.esmtp = False
        self.transactions = 0                   # transactions started on this connection
        self.last_used = 0.0
        # False once the SMTP state is unknown (a protocol surprise): never reuse.
        self.reusable = True
        # Reused from the pool: RSET goes first in the next transaction
        # (in the same write as MAIL when pipelining, saving a round trip).
        self.pending_rset = False
        # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted, else None.
        self.tls: str | None = None
        self.pool_key: tuple = (ip, port, helohost, None)

    # --- opening -----------------------------------------------------------

    @classmethod
    async def open(cls, ip: str, port: int, helohost: str, *, timeoutconnect: float,
                   timeoutremote: float, local_addr: tuple[str, int] | None = None,
                   tls: TlsRequest | None = None, contexts: TlsContexts | None = None,
                   handshake_timeout: float = 60.0) -> "SmtpConnection":
        if tls is not None and tls.policy.level == NONE:
            tls = None
        context = None
        if tls is not None:
            contexts = contexts or TlsContexts()
            try:
                context = contexts.get(tls.policy)
            except (ssl.SSLError, OSError):
                # A CA file that is no PEM bundle (or went away since it was
                # read): s/qmail's deferral; opportunistic goes on in clear.
                if tls.policy.required:
                    cafile = tls.policy.cafile or ("" if tls.policy.capath else contexts.default_cafile)
                    raise TlsFailed(ip, f"I wasn't able to set up CAFILE: {cafile} or CADIR: "
                                        f"{tls.policy.capath} for TLS. (#4.4.1)\n") from None
                tls = None
        implicit = tls is not None and port == SMTPS_PORT
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    ip, port, limit=MAX_REPLY_LINE, local_addr=local_addr,
                    **({"ssl": context, "server_hostname": _sni(tls.server_name),
                        "ssl_handshake_timeout": handshake_timeout} if implicit else {})),
                timeoutconnect + (handshake_timeout if implicit else 0))
        except asyncio.TimeoutError:
            metrics.remote_connection(False)
            raise ConnectFailed(ip, f"connect to {ip}:{port}: timed out", timed_out=True) from None
        except ssl.SSLError as exc:
            metrics.remote_connection(True)    # connected; the implicit TLS handshake failed
            raise TlsFailed(ip, _tls_error_text(exc, tls, contexts, ip)) from None
        except OSError as exc:
            metrics.remote_connection(False)
            if exc.errno in LOCAL_RESOURCE_ERRNOS:
                raise NoLocalResources(ip, f"connect to {ip}:{port}: {exc!r}") from None
            raise ConnectFailed(ip, f"connect to {ip}:{port}: {exc!r}",
                                timed_out=isinstance(exc, TimeoutError)) from None
        metrics.remote_connection(True)
        conn = cls(ip, port, helohost, reader, writer, timeoutremote)
        try:
            if implicit:
                conn._check_tls(tls, fallback=False)
            greeting = await conn.read_reply()
            if greeting.code != 220:
                if implicit:
                    raise TlsFailed(ip, f"TLS Connected to {ip} but greeting failed.\n", greeting)
                raise GreetingFailed(ip, greeting)
            await conn._introduce()
            if tls is not None and not implicit:
                await conn._starttls(tls, context, contexts, handshake_timeout)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _starttls(self, tls: TlsRequest, context: ssl.SSLContext,
                        contexts: TlsContexts | None, handshake_timeout: float) -> None:
        """STARTTLS (RFC 3207), the certificate check, EHLO again. Raises
        TlsFailed; returns in clear when the policy lets a server that does
        not offer or refuses STARTTLS be used as it is (qmail-tls)."""
        policy, ip = tls.policy, self.ip
        required = policy.required
        if "STARTTLS" not in self.extensions:
            if required:
                raise TlsFailed(ip, _required_text("No TLS achieved", "it", policy, ip))
            return
        reply = await self.command(b"STARTTLS")
        if reply.code != 220:
            if required:
                raise TlsFailed(ip, _required_text("STARTTLS rejected", "TLS", policy, ip), reply)
            return
        # Bytes after the 220 were sent in clear before the handshake: taking
        # them for replies inside TLS would let a man in the middle answer
        # for the server (the client side of CVE-2011-0411).
        if getattr(self._reader, "_buffer", b""):
            raise TlsFailed(ip, f"TLS connect failed: plaintext after STARTTLS's 220;"
                                f" connected to {ip}.\n", fallback=not required)
        try:
            await asyncio.wait_for(
                self._writer.start_tls(context, server_hostname=_sni(tls.server_name),
                                       ssl_handshake_timeout=handshake_timeout),
                handshake_timeout + 1)
        except (ssl.SSLError, OSError, EOFError, asyncio.TimeoutError) as exc:
            raise TlsFailed(ip, _tls_error_text(exc, tls, contexts, ip),
                            fallback=not required) from None
        self._check_tls(tls, fallback=not required)
        # RFC 3207 4.2: forget what the server said in clear, introduce again.
        self.extensions = {}
        self.esmtp = False
        await self._introduce()

    def _check_tls(self, tls: TlsRequest, fallback: bool) -> None:
        obj = self._writer.get_extra_info("ssl_object")
        if obj is None:
            raise TlsFailed(self.ip, f"TLS connect failed: no TLS session; connected to {self.ip}.\n",
                            fallback=fallback)
        why = check_peer(obj, tls.policy, tls.server_name)
        if why is not None:
            raise TlsFailed(self.ip, f"{why}; connected to {self.ip}.\n", fallback=fallback)
        cipher = obj.cipher()
        self.tls = f"{obj.version()} {cipher[0] if cipher else ''}".strip()

    async def _introduce(self) -> None:
        # Extensions come from every line, not from the reply's kept text
        # (MAX_REPLY_TEXT), which a long EHLO reply outgrows.
        lines: list[bytes] = []
        await self.write(b"EHLO " + self.helohost.encode("utf-8", "surrogateescape") + b"\r\n")
        reply = await self.read_reply(lines=lines)
        if reply.code == 250:
            self.esmtp = True
            self.extensions = _parse_ehlo(lines)
            return
        if reply.code < 500:
            raise NameRejected(self.ip, reply)
        # An old server: EHLO unknown, HELO it is.
        reply = await self.command(b"HELO " + self.helohost.encode("utf-8", "surrogateescape"))
        if reply.code != 250:
            raise NameRejected(self.ip, reply)

    # --- replies and commands --------------------------------------------

    async def read_reply(self, after_dot: bool = False,
                         lines: list[bytes] | None = None) -> Reply:
        """The next reply; `lines`, when given, gets the start of each of its
        lines (MAX_EHLO_LINE bytes), however much of the text is kept."""
        kept_lines: list[bytes] = []
        kept = 0
        count = 0
        code = -1
        while True:
            count += 1
            try:
                line = await asyncio.wait_for(self._reader.readline(), self._timeout)
            except asyncio.TimeoutError:
                raise ConnectionDied(self.ip, "timeout reading reply", after_dot) from None
            except (OSError, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
                raise ConnectionDied(self.ip, f"reading reply: {exc!r}", after_dot) from None
            if not line.endswith(b"\n"):
                raise ConnectionDied(self.ip, "connection closed", after_dot)
            head = line[:3]
            if not head.isdigit():
                raise ConnectionDied(self.ip, f"garbled reply {line[:40]!r}", after_dot)
            if lines is not None:
                lines.append(line[:MAX_EHLO_LINE])
            if code < 0:
                code = int(head)
                if code == 421:
                    self.reusable = False   # the server is closing the connection
            if kept < MAX_REPLY_TEXT:
                clean = line.replace(b"\r", b"").replace(b"\0", b"?")
                clean = clean[:MAX_REPLY_TEXT - kept]
                kept_lines.append(clean)
                kept += len(clean)
            if line[3:4] != b"-":
                break
            if count >= MAX_REPLY_LINES:
                raise ConnectionDied(self.ip, "reply too long", after_dot)
        text = b"".join(kept_lines).decode("utf-8", "replace")
        if not text.endswith("\n"):
            text += "\n"
        return Reply(code, text)

    async def write(self, data: bytes, after_dot: bool = False) -> None:
        # timeoutremote bounds each stretch without progress, as qmail's
        # per-write timeout does, not the whole of a large message.
        # `after_dot` (data ends with the final dot) counts from the last
        # piece on: as qmail's flagcritical, a failure before it means the
        # server cannot have taken the message.
        last = True
        try:
            if len(data) <= WRITE_CHUNK:
                self._writer.write(data)
                await asyncio.wait_for(self._writer.drain(), self._timeout)
                return
            view = memoryview(data)
            for start in range(0, len(view), WRITE_CHUNK):
                last = start + WRITE_CHUNK >= len(view)
                self._writer.write(view[start:start + WRITE_CHUNK])
                await asyncio.wait_for(self._writer.drain(), self._timeout)
        except asyncio.TimeoutError:
            raise ConnectionDied(self.ip, "timeout writing", after_dot and last) from None
        except (OSError, RuntimeError) as exc:
            raise ConnectionDied(self.ip, f"writing: {exc!r}", after_dot and last) from None

    async def command(self, line: bytes) -> Reply:
        await self.write(line + b"\r\n")
        return await self.read_reply()

    # --- a transaction ----------------------------------------------------

    async def transaction(self, sender: str, recipients: Sequence[str], message: bytes,
                          clock: Callable[[], float] = time.monotonic) -> TransactionOutcome:
        """MAIL, RCPT for each recipient, DATA and the body (pipelined when the
        server offers PIPELINING). Raises ConnectionDied; every SMTP answer
        is reported in the outcome."""
        self.transactions += 1
        self.last_used = clock()
        params = b""
        if "SIZE" in self.extensions:
            params += b" SIZE=%d" % len(message)
        if "8BITMIME" in self.extensions and not message.isascii():
            params += b" BODY=8BITMIME"
        if "SMTPUTF8" in self.extensions and not (sender + "".join(recipients)).isascii():
            params += b" SMTPUTF8"
        mail = b"MAIL FROM:<" + _addr(sender) + b">" + params + b"\r\n"
        rcpts = [b"RCPT TO:<" + _addr(r) + b">\r\n" for r in recipients]
        pipelining = "PIPELINING" in self.extensions
        rset = self.pending_rset
        self.pending_rset = False
        if rset and not pipelining:
            await self._rset()
        if pipelining:
            outcome = await self._pipelined(mail, rcpts, rset)
        else:
            outcome = await self._lockstep(mail, rcpts)
        if outcome.data is None or outcome.data.code >= 400:
            return outcome
        if outcome.data.code // 100 != 3:
            # Only a 354 lets the body go: after any other answer the server
            # would read it as commands (and answer its first line as if it
            # were the final reply). The state is unknown from here.
            self.reusable = False
            return outcome
        accepted = any(r.code < 400 for r in outcome.rcpt) and outcome.mail.code < 400
        if not accepted:
            # A pipelined DATA the server accepted although nothing else was:
            # end it empty and never trust this connection's state again.
            self.reusable = False
            await self.write(b".\r\n")
            await self.read_reply()
            outcome.data = None
            return outcome
        body = stuffed(message)
        if len(body) > WRITE_CHUNK:
            # Written in pieces anyway: the dot on its own, not a copy of a
            # message of many megabytes with it appended.
            await self.write(body)
            body = b""
        await self.write(body + DOT, after_dot=True)
        outcome.final = await self.read_reply(after_dot=True)
        self.last_used = clock()
        return outcome

    async def _lockstep(self, mail: bytes, rcpts: list[bytes]) -> TransactionOutcome:
        await self.write(mail)
        outcome = TransactionOutcome(await self.read_reply())
        if outcome.mail.code >= 400:
            return outcome
        try:
            for rcpt in rcpts:
                await self.write(rcpt)
                outcome.rcpt.append(await self.read_reply())
            if not any(r.code < 400 for r in outcome.rcpt):
                return outcome
            await self.write(b"DATA\r\n")
            outcome.data = await self.read_reply()
        except ConnectionDied:
            if not self._kept_refusals(outcome):
                raise
        return outcome

    def _kept_refusals(self, outcome: TransactionOutcome) -> bool:
        """After the connection died before DATA's reply: True (and the
        outcome marked `died`) if the server had refused recipients. Their
        refusals stand (Postfix hangs up after smtpd_hard_error_limit of
        them); retrying them with the rest would die the same way each time."""
        if not any(r.code >= 400 for r in outcome.rcpt):
            return False
        self.reusable = False
        outcome.data = None
        outcome.died = True
        return True

    async def _rset(self) -> None:
        reply = await self.command(b"RSET")
        if reply.code != 250:
            # The state is unknown: the caller retries on a fresh connection.
            self.reusable = False
            raise ConnectionDied(self.ip, f"RSET refused: {reply.text.strip()}")

    async def _pipelined(self, mail: bytes, rcpts: list[bytes], rset: bool) -> TransactionOutcome:
        # RFC 2920: [RSET,] MAIL, every RCPT and DATA in one write; replies in order.
        await self.write((b"RSET\r\n" if rset else b"") + mail + b"".join(rcpts) + b"DATA\r\n")
        if rset:
            reply = await self.read_reply()
            if reply.code != 250:
                self.reusable = False
                raise ConnectionDied(self.ip, f"RSET refused: {reply.text.strip()}")
        outcome = TransactionOutcome(await self.read_reply())
        try:
            for _ in rcpts:
                outcome.rcpt.append(await self.read_reply())
            outcome.data = await self.read_reply()
        except ConnectionDied:
            if outcome.mail.code < 400:
                if self._kept_refusals(outcome):
                    return outcome
                raise
            # A server refusing the sender often hangs up at once: the
            # refusal is its answer, as in lockstep (a 5xx must bounce, not
            # turn into "connection died" deferrals for a week).
            self.reusable = False
            outcome.rcpt = []
            return outcome
        if outcome.mail.code >= 400:
            # Keep the per-recipient story consistent with lockstep: no RCPT
            # counts when MAIL was refused.
            if outcome.data.code < 400:
                self.reusable = False
                await self.write(b".\r\n")
                await self.read_reply()
            outcome.rcpt = []
            outcome.data = None
        return outcome

    async def reset(self) -> bool:
        """RSET now and wait for it; False if the connection is unusable."""
        if not self.reusable or self.closed:
            return False
        try:
            await self._rset()
        except ConnectionDied:
            return False
        return True

    # --- closing ------------------------------------------------------------

    def abort(self) -> None:
        """Close now, QUIT sent without waiting for its reply (as qmail-remote).
        Bytes the server has not read are dropped: close() would wait for them
        to drain, and a server that reads nothing would keep the socket open
        for good. (A TLS close ends within asyncio's SSL shutdown timeout.)"""
        try:
            if not self._writer.is_closing():
                self._writer.write(b"QUIT\r\n")
                if self._writer.transport.get_write_buffer_size():
                    self._writer.transport.abort()
                else:
                    self._writer.close()
        except (OSError, RuntimeError):
            pass

    async def quit(self, wait: float = 1.0) -> None:
        self.abort()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), wait)
        except (OSError, RuntimeError, asyncio.TimeoutError):
            pass

    @property
    def closed(self) -> bool:
        return self._writer.is_closing() or self._reader.at_eof()


def _required_text(what: str, needs: str, policy, ip: str) -> str:
    """Why required TLS was not had, in the texts of the file that requires it:
    qmail-tls's for control/tlshosts/H.pem, s/qmail's for tlsdestinations."""
    if policy.rule.startswith("tlshosts/"):
        return f"{what} while control/{policy.rule} exists; connecting to {ip}.\n"
    return f"{what} while control/tlsdestinations requires {needs} ({policy.rule}); connected to {ip}.\n"


def _sni(name: str) -> str | None:
    """The name sent as SNI: without a trailing dot (RFC 6066 3), which an
    smtproutes relay may be written with."""
    return name.rstrip(".") or None


def _tls_error_text(exc: BaseException, tls: TlsRequest | None,
                    contexts: TlsContexts | None, ip: str) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and tls is not None:
        ca = tls.policy.ca_name(contexts.default_cafile if contexts else "")
        why = exc.verify_message or exc.reason or str(exc)
        return f"TLS unable to verify server with {ca}: {why}; connected to {ip}.\n"
    if isinstance(exc, asyncio.TimeoutError):
        why = "handshake timed out"
    elif isinstance(exc, ssl.SSLError):
        why = exc.reason or exc.strerror or str(exc)
    else:
        why = str(exc) or type(exc).__name__
    return f"TLS connect failed: {why}; connected to {ip}.\n"


def _addr(address: str) -> bytes:
    return address.encode("utf-8", "surrogateescape")


def _parse_ehlo(lines: list[bytes]) -> dict[str, str]:
    extensions: dict[str, str] = {}
    for line in lines[1:]:   # the first line is the greeting name
        words = line[4:].decode("utf-8", "replace").strip().split(None, 1)
        if words:
            extensions[words[0].upper()] = words[1] if len(words) > 1 else ""
    return extensions


@dataclass(slots=True, frozen=True)
class PoolLimits:
    max_messages_per_connection: int = 100
    max_connections_per_host: int = 20
    idle_timeout: float = 30.0


class _HostSlots:
    """Per destination (ip, port): the connection cap, who uses it, idle count."""
    __slots__ = ("sem", "users", "idle")

    def __init__(self, cap: int) -> None:
        self.sem = asyncio.Semaphore(cap)
        self.users = 0      # holders + waiters
        self.idle = 0       # idle connections kept for this destination


class ConnectionPool:
    """Open connections by (ip, port, helohost, TLS request): reused for the
    next message to the same host (RSET between, a cap per connection), closed
    when idle too long, and at most `max_connections_per_host` open per
    (ip, port). An encrypted connection stays encrypted for every message it
    carries; one opened in clear after an opportunistic handshake failed is
    reused in clear (no second failed handshake per message).

    Bookkeeping for a destination disappears once nothing uses or waits for
    it and no idle connection is kept, so memory follows the live set of
    destinations, not every destination ever seen.
    """

    def __init__(self, *, timeoutconnect: float, timeoutremote: float,
                 limits: PoolLimits = PoolLimits(),
                 clock: Callable[[], float] = time.monotonic,
                 tls_contexts: TlsContexts | None = None,
                 handshake_timeout: float = 60.0) -> None:
        self._timeoutconnect = timeoutconnect
        self._contexts = tls_contexts or TlsContexts()
        self._handshake_timeout = handshake_timeout
        self._timeoutremote = timeoutremote
        self._limits = limits
        self._clock = clock
        self._idle: dict[tuple, list[SmtpConnection]] = {}
        self._expiry: dict[SmtpConnection, asyncio.TimerHandle] = {}
        self._slots: dict[tuple[str, int], _HostSlots] = {}
        self._closed = False
        self.opened = 0     # connections opened, for tests and stats
        self.tls_fallbacks = 0   # opportunistic handshakes that failed, retried in clear

    async def acquire(self, ip: str, port: int, helohost: str,
                      tls: TlsRequest | None = None) -> tuple[SmtpConnection, bool]:
        """A ready connection and whether it was reused. Raises ConnectFailed,
        GreetingFailed, NameRejected, ConnectionDied or TlsFailed. Pair with
        release()."""
        key = (ip, port, helohost, tls)
        slots = self._slots.get((ip, port))
        if slots is None:
            slots = self._slots[(ip, port)] = _HostSlots(max(1, self._limits.max_connections_per_host))
        slots.users += 1
        try:
            await slots.sem.acquire()
        except BaseException:
            slots.users -= 1
            self._forget_if_unused(ip, port)
            raise
        try:
            while True:
                conn = self._pop_idle(key)
                if conn is None:
                    break
                if (self._clock() - conn.last_used < self._limits.idle_timeout
                        and conn.reusable and not conn.closed):
                    # RSET is sent with the next transaction; a connection the
                    # server dropped meanwhile shows up there as ConnectionDied
                    # before the dot, which the caller retries on a fresh one.
                    conn.pending_rset = True
                    return conn, True
                conn.abort()
            conn = await self._open(ip, port, helohost, tls)
            conn.pool_key = key
            conn.last_used = self._clock()
            return conn, False
        except BaseException:
            slots.sem.release()
            slots.users -= 1
            self._forget_if_unused(ip, port)
            raise

    async def _open(self, ip: str, port: int, helohost: str,
                    tls: TlsRequest | None) -> SmtpConnection:
        kw = dict(timeoutconnect=self._timeoutconnect, timeoutremote=self._timeoutremote,
                  contexts=self._contexts, handshake_timeout=self._handshake_timeout)
        try:
            conn = await SmtpConnection.open(ip, port, helohost, tls=tls, **kw)
        except TlsFailed as exc:
            if not exc.fallback:
                raise
            # Opportunistic: the same attempt goes on in clear, on a new
            # connection (the failed one's state is unknown).
            self.opened += 1
            self.tls_fallbacks += 1
            conn = await SmtpConnection.open(ip, port, helohost, tls=None, **kw)
        self.opened += 1
        return conn

    def release(self, conn: SmtpConnection, reusable: bool = True) -> None:
        """Give a connection back: kept idle for reuse, or closed."""
        slots = self._slots.get((conn.ip, conn.port))
        if slots is not None:
            slots.sem.release()
            slots.users -= 1
        keep = (slots is not None and reusable and conn.reusable and not self._closed
                and not conn.closed and self._limits.idle_timeout > 0
                and conn.transactions < self._limits.max_messages_per_connection)
        if keep:
            conn.last_used = self._clock()
            self._idle.setdefault(conn.pool_key, []).append(conn)
            slots.idle += 1
            loop = asyncio.get_running_loop()
            self._expiry[conn] = loop.call_later(self._limits.idle_timeout, self._expire, conn)
        else:
            conn.abort()
            self._forget_if_unused(conn.ip, conn.port)

    def _pop_idle(self, key: tuple) -> SmtpConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        conn = idle.pop()   # most recently used: the likeliest to be alive
        if not idle:
            del self._idle[key]
        self._slots[key[:2]].idle -= 1
        handle = self._expiry.pop(conn, None)
        if handle is not None:
            handle.cancel()
        return conn

    def _expire(self, conn: SmtpConnection) -> None:
        self._expiry.pop(conn, None)
        key = conn.pool_key
        idle = self._idle.get(key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[key]
            self._slots[(conn.ip, conn.port)].idle -= 1
            conn.abort()
            self._forget_if_unused(conn.ip, conn.port)

    def _forget_if_unused(self, ip: str, port: int) -> None:
        slots = self._slots.get((ip, port))
        if slots is not None and slots.users <= 0 and slots.idle <= 0:
            del self._slots[(ip, port)]

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def tracked_hosts(self) -> int:
        """Destinations with bookkeeping (for tests: it must not grow forever)."""
        return len(self._slots)

    async def close(self) -> None:
        """QUIT and close every idle connection; busy ones close on release."""
        self._closed = True
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        conns = [c for v in self._idle.values() for c in v]
        self._idle.clear()
        for key, slots in list(self._slots.items()):
            slots.idle = 0
            self._forget_if_unused(*key)
        if conns:
            await asyncio.gather(*(c.quit() for c in conns))
