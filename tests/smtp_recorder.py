"""A recording SMTP sink for delivery tests, on any 127.0.0.x address.

It runs in the test's own event loop, parses strictly (commands end at CRLF,
DATA ends only at CRLF "." CRLF) and keeps the raw bytes of every DATA phase,
so a test can check byte-exact relaying and that nothing is smuggled.

    sink = await RecordingSink.start("127.0.0.2", port)   # port 0 = any
    ... sink.connections -> list[SinkConnection]; sink.messages -> list[Transaction]
    await sink.stop()

Behaviour knobs: `greeting` (e.g. "421 busy"), `silent` (never greets),
`esmtp` (False: EHLO answers 502), `extensions`, `rcpt_replies`
({address: reply}), `mail_reply`, `data_reply`, `final_reply`,
`close_after_messages` (hang up after n messages on a connection),
`drop_on_rset` (hang up, without a reply, on RSET), `close_after_mail`
(hang up right after answering MAIL, as servers refusing a sender often do),
`busy_after_messages` (after n messages on a connection, answer MAIL with a
421 and hang up, as Exim's smtp_accept_max_per_connection does),
`hard_error_limit` (after the n-th refused RCPT on a connection, send a 421
and hang up, as Postfix's smtpd_hard_error_limit does), `max_rcpts` (RCPTs
past the n-th of a transaction get `452 4.5.3 Error: too many recipients`,
as Postfix's smtpd_recipient_limit does).

TLS: `tls_context` (a server ssl.SSLContext) offers STARTTLS before TLS and
does the handshake after `starttls_reply` (a reply not starting with 220
leaves the session in clear); `tls_break` answers 220 and then sends
garbage instead of a handshake; `implicit_tls` does TLS from the first
byte (SMTPS) with `tls_context`. `SinkConnection.tls` / `Transaction.tls`
say whether the session was encrypted when it ended / when the message came.
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field


@dataclass
class Transaction:
    mail: bytes = b""                       # the MAIL command line, without CRLF
    rcpts: list[bytes] = field(default_factory=list)
    raw: bytes = b""                        # DATA bytes as sent, terminator excluded
    content: bytes = b""                    # raw with dot-stuffing undone
    tls: bool = False                       # received inside TLS


@dataclass
class SinkConnection:
    commands: list[bytes] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    tls: bool = False


class RecordingSink:
    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.greeting = "220 sink.test ESMTP"
        self.silent = False
        self.esmtp = True
        self.extensions = ["PIPELINING", "SIZE 100000000", "8BITMIME"]
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply = "250 ok"
        self.data_reply = "354 go ahead"
        self.final_reply = "250 ok queued"
        self.close_after_messages = 0
        self.drop_on_rset = False
        self.close_after_mail = False
        self.busy_after_messages = 0
        self.hard_error_limit = 0
        self.max_rcpts = 0
        self.tls_context: ssl.SSLContext | None = None
        self.starttls_reply = "220 ready for tls"
        self.tls_break = False
        self.implicit_tls = False    # TLS from the first byte (SMTPS, port 465)
        self.connections: list[SinkConnection] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, host: str, port: int = 0, **knobs) -> "RecordingSink":
        sink = cls(host)
        for k, v in knobs.items():
            if not hasattr(sink, k):
                raise AttributeError(k)
            setattr(sink, k, v)
        sink._server = await asyncio.start_server(
            sink._handle, host, port, ssl=sink.tls_context if sink.implicit_tls else None)
        sink.port = sink._server.sockets[0].getsockname()[1]
        return sink

    @property
    def messages(self) -> list[Transaction]:
        return [t for c in self.connections for t in c.transactions]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.add(writer)
        conn = SinkConnection(tls=self.implicit_tls)
        self.connections.append(conn)
        try:
            await self._session(conn, reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass    # OSError: ConnectionError, and ssl.SSLError of a failed handshake
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass    # the handshake's SSLError again, or a reset

    async def _session(self, conn: SinkConnection, reader, writer) -> None:
        if self.silent:
            await reader.read()   # never greet; wait for the client to give up
            return
        writer.write(self.greeting.encode() + b"\r\n")
        await writer.drain()
        if not self.greeting.startswith("220"):
            return
        current: Transaction | None = None
        refused = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            line = line[:-2]
            conn.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                if not self.esmtp:
                    reply = "502 unimplemented"
                else:
                    offer = ["STARTTLS"] if (self.tls_context or self.tls_break) and not conn.tls else []
                    lines = ["sink.test"] + offer + self.extensions
                    reply = "\r\n".join(
                        ("250 " if i == len(lines) - 1 else "250-") + x for i, x in enumerate(lines))
            elif verb == b"HELO":
                reply = "250 sink.test"
            elif verb == b"MAIL":
                if self.busy_after_messages and len(conn.transactions) >= self.busy_after_messages:
                    writer.write(b"421 too many messages in this connection\r\n")
                    await writer.drain()
                    return
                current = Transaction(mail=line)
                reply = self.mail_reply
                if not reply.startswith("2"):
                    current = None
                if self.close_after_mail:
                    writer.write(reply.encode() + b"\r\n")
                    await writer.drain()
                    return
            elif verb == b"RCPT":
                addr = line.split(b"<", 1)[-1].split(b">", 1)[0].decode()
                reply = self.rcpt_replies.get(addr, "250 ok")
                if current is None:
                    reply = "503 MAIL first"
                elif self.max_rcpts and len(current.rcpts) >= self.max_rcpts:
                    reply = "452 4.5.3 Error: too many recipients"
                elif reply.startswith("2"):
                    current.rcpts.append(line)
                if not reply.startswith("2"):
                    refused += 1
                    if self.hard_error_limit and refused >= self.hard_error_limit:
                        writer.write(reply.encode() + b"\r\n421 too many errors\r\n")
                        await writer.drain()
                        return
            elif verb == b"DATA":
                if current is None or not current.rcpts:
                    reply = "554 no valid recipients"
                else:
                    writer.write(self.data_reply.encode() + b"\r\n")
                    await writer.drain()
                    if not self.data_reply.startswith("3"):
                        current = None
                        continue
                    raw = await self._read_data(reader)
                    current.raw = raw
                    current.content = _unstuff(raw)
                    current.tls = conn.tls
                    conn.transactions.append(current)
                    current = None
                    reply = self.final_reply
                    writer.write(reply.encode() + b"\r\n")
                    await writer.drain()
                    if self.close_after_messages and len(conn.transactions) >= self.close_after_messages:
                        return
                    continue
            elif verb == b"RSET":
                if self.drop_on_rset:
                    return          # hang up as a server that timed out an idle client
                current = None
                reply = "250 flushed"
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            elif line.upper() == b"STARTTLS" and (self.tls_context or self.tls_break) and not conn.tls:
                writer.write(self.starttls_reply.encode() + b"\r\n")
                await writer.drain()
                if not self.starttls_reply.startswith("220"):
                    continue
                if self.tls_break:
                    writer.write(b"this is not a TLS handshake\r\n")
                    await writer.drain()
                    return
                await writer.start_tls(self.tls_context)
                conn.tls = True
                current = None
                continue
            elif verb == b"NOOP":
                reply = "250 ok"
            else:
                reply = "502 unimplemented"
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader) -> bytes:
        # Strict: lines end only at CRLF; DATA ends at a line that is exactly
        # "." (so CRLF "." CRLF, or "." CRLF right after DATA).
        lines = []
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line)


def _unstuff(raw: bytes) -> bytes:
    lines = raw.split(b"\r\n")
    return b"\r\n".join(l[1:] if l.startswith(b".") else l for l in lines)
