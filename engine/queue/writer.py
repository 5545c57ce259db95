"""The single spool writer: one process commits for every receiver.

Owns the framed unix-socket protocol between receivers and the writer
process. The writer is an ordinary `Spool` whose `submit` group-commits the
messages of *all* receiver processes together, where with LMDB's writer lock
each process commits its own batches one after the other (see the
measurement in engine/queue/__init__.py). Receivers use `SpoolClient`, which
has the writer half of Spool's API (`enqueue`, `submit`, `close`) with the
guarantee of `Spool.submit`: an id is returned once the message and its
envelope are synced in the writer's segment (the commit point); the
writer's index has it a moment later (both calls: the protocol has no
"wait for the index" flag, receivers never need one).

Frames (engine.ipc), the request's size bounded by `[spool] max_frame_bytes`:
    request   id u64 | pid u32 | uid u32 | origin u8 | sender (text)
              | recipients (count + texts) | message bytes
    response  id u64 | status u8 (0 ok, 1 write error, 2 other error)
              | ok: msgid u64 ; else: error text (utf-8)
A lost connection fails every request in flight with SpoolWriteError (the
receiver answers 451; the message may still have been committed — at least
once, as with any crash after the commit point).

Two sockets, one protocol. `writer.sock` (0600, the spool owner's) is for
the receivers and trusted. `inject.sock` (0666) is qmail-queue's role for
local users who cannot open the spool (PHP's mail() as www-data, cron): the
envelope's pid, uid and origin are taken from the connection's credentials
(SO_PEERCRED), never from the request, and the writer itself prepends
qmail-queue's `Received: (qmail PID invoked by uid UID)` line. A request
`qrelay inject` would never send (no recipient; NUL, CR or LF in an address)
is refused there, as SMTP refuses it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import resource
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from typing import Callable

from engine import ipc, metrics, openfiles
from engine.config.settings import SpoolSettings
from engine.ipc import FrameError
from engine.queue import records as R
from engine.queue.spool import Spool
from engine.queue.values import (Envelope, MessageTooBig, SpoolError, SpoolWriteError,
                                 WriterUnreachable)

OK, WRITE_ERROR, OTHER_ERROR = 0, 1, 2
WRITER_SOCKET = "writer.sock"     # in the queue directory
INJECT_SOCKET = "inject.sock"     # in the queue directory: any local user
# Responses are an id, a status and a short text: far below this.
MAX_RESPONSE = 64 * 1024

log = logging.getLogger("qrelay.spool-writer")


class _OncePer:
    """True at most once per `seconds`: a warning repeated while its cause
    lasts (out of descriptors, inject.sock full) is one line, not a flood."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self._at: float | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._at is not None and now - self._at < self.seconds:
            return False
        self._at = now
        return True


def encode_request(reqid: int, envelope: Envelope, message: bytes) -> bytes:
    # The writer refuses a request over [spool] max_frame_bytes (the receivers'
    # message size limit is far below it).
    return (ipc.Body().u64(reqid).u32(envelope.pid).u32(envelope.uid)
            .u8(R.ORIGIN_CODES[envelope.origin]).text(envelope.sender)
            .texts(envelope.recipients).rest(message).frame(1 << 62))


def decode_request(body: bytes) -> tuple[int, Envelope, bytes]:
    f = ipc.Fields(body)
    reqid, pid, uid, origin = f.u64(), f.u32(), f.u32(), f.u8()
    sender = f.text()
    rcpts = tuple(f.texts())
    if origin not in R.ORIGIN_NAMES:
        raise FrameError(f"unknown origin {origin}")
    return reqid, Envelope(sender, rcpts, pid, uid, R.ORIGIN_NAMES[origin]), f.rest()


def encode_response(reqid: int, status: int, payload: bytes) -> bytes:
    return ipc.Body().u64(reqid).u8(status).rest(payload).frame(MAX_RESPONSE)


def decode_response(body: bytes) -> tuple[int, int, bytes]:
    f = ipc.Fields(body)
    return f.u64(), f.u8(), f.rest()


# Seconds the injection socket waits for the rest of a frame it made room for.
INJECT_BODY_SECONDS = 60.0


class ByteBudget:
    """Request bytes the injection socket's connections may hold at once (read
    and not yet answered). Any local user may open connections and pipeline
    frames; without it, one could fill the writer's memory and stop mail for
    the whole box. A frame waits for room before its body is read (its sender
    blocks); one alone always fits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[asyncio.Future] = []

    async def take(self, n: int) -> int:
        while self.used and self.used + n > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.used += n
        return n

    def give(self, n: int) -> None:
        self.used -= n
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:      # each looks again; who does not fit waits again
            if not waiter.done():
                waiter.set_result(None)


class SpoolWriterServer:
    """Serves `spool.submit` to receivers over a unix socket (asyncio)."""

    def __init__(self, spool: Spool, socket_path: Path | str, *, local_users: bool = False):
        """`local_users`: the injection socket (see the module docstring), its
        requests held to [spool] inject_buffered_bytes together, its
        connections to [spool] inject_max_connections."""
        self.spool = spool
        self.socket_path = str(socket_path)
        self.local_users = local_users
        self.budget = ByteBudget(spool.settings.inject_buffered_bytes) if local_users else None
        # Connections past it are closed at once (None: no cap). The writer's
        # descriptors would otherwise be anyone's to take, and then it could
        # not accept a receiver's connection nor open a segment file.
        self.max_connections = (min(spool.settings.inject_max_connections, openfiles.room())
                                if local_users else None)
        self._refusals_said = _OncePer()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._serve, self.socket_path)
        os.chmod(self.socket_path, 0o666 if self.local_users else 0o600)

    async def drain(self, timeout: float) -> None:
        """Accept no new connection; wait (at most `timeout` s) until every
        client has closed its connection."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + timeout
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop serving: no new connections, and the open ones end after the
        requests they already sent are committed and answered (at shutdown the
        receivers have stopped before the writer, so none is in flight)."""
        if self._server is not None:
            self._server.close()
            for conn in list(self._connections):
                conn.close()  # its handler sees EOF and finishes what it sent
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.max_connections is not None and len(self._connections) >= self.max_connections:
            if self._refusals_said():
                log.warning(f"{self.socket_path}: {len(self._connections)} local users' "
                            f"connections, the most [spool] inject_max_connections and the "
                            f"open-files limit allow: closing more until one ends")
            writer.close()
            return
        limit = self.spool.settings.max_frame_bytes
        pending: set[asyncio.Task] = set()
        self._connections.add(writer)
        peer = None
        if self.local_users:     # (pid, uid) from the kernel
            peer = ipc.peer_credentials(writer.get_extra_info("socket"))[:2]
        try:
            while (n := await ipc.read_frame_length(reader, limit)) is not None:
                held = await self.budget.take(n) if self.budget is not None else 0
                try:
                    task = await self._request(reader, writer, n, peer)
                except BaseException:
                    self._give(held)
                    raise
                if task is None:
                    self._give(held)
                    continue
                pending.add(task)
                task.add_done_callback(pending.discard)
                if held:
                    task.add_done_callback(lambda _task, held=held: self._give(held))
        except (ConnectionError, FrameError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            # The loop is shutting down: end this connection quietly (a traceback
            # from the stream machinery would be noise in the operator's log).
            pass
        finally:
            self._connections.discard(writer)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            writer.close()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int,
                       peer: tuple[int, int] | None) -> asyncio.Future | None:
        """The body of a frame of n bytes, and the commit it asks for started;
        None when it is refused on the injection socket (answered already)."""
        if peer is None:
            body = await ipc.read_frame_body(reader, n)
        else:     # room was made for it: it must come
            body = await asyncio.wait_for(ipc.read_frame_body(reader, n), INJECT_BODY_SECONDS)
        reqid, envelope, message = decode_request(body)
        if peer is not None:
            if refusal := _local_user_refusal(envelope):
                writer.write(encode_response(reqid, OTHER_ERROR, refusal.encode()))
                return None
            envelope, message = _as_local_user(envelope, message, *peer)
        return asyncio.ensure_future(self._one(writer, reqid, envelope, message))

    def _give(self, held: int) -> None:
        if held:
            self.budget.give(held)

    async def _one(self, writer: asyncio.StreamWriter, reqid: int, envelope: Envelope,
                   message: bytes) -> None:
        try:
            msgid = await self.spool.submit(envelope, message)
            frame = encode_response(reqid, OK, ipc.U64.pack(msgid))
            metrics.spool_commit("ok")
        except SpoolWriteError as exc:
            frame = encode_response(reqid, WRITE_ERROR, str(exc).encode())
            metrics.spool_commit("write_error")
        except SpoolError as exc:
            frame = encode_response(reqid, OTHER_ERROR, str(exc).encode())
            metrics.spool_commit("error")
        if not writer.is_closing():
            writer.write(frame)


# As engine.smtp.policy refuses them for every SMTP client (remote delivery
# would only bounce such an address: it never writes one into a command).
_UNSAFE_ADDRESS = re.compile(r"[\x00\r\n]")


def _local_user_refusal(envelope: Envelope) -> str | None:
    """Why a request from the injection socket is refused, else None: any local
    user can write one by hand, past the checks `qrelay inject` makes."""
    if not envelope.recipients:
        return "no recipients"
    if any(_UNSAFE_ADDRESS.search(a) for a in (envelope.sender, *envelope.recipients)):
        return "an address contains NUL, CR or LF"
    return None


def _as_local_user(envelope: Envelope, message: bytes, pid: int, uid: int
                   ) -> tuple[Envelope, bytes]:
    """A request from the injection socket: who sent it is the kernel's word."""
    from engine.received import queue_received_line
    line = queue_received_line(pid=pid, origin="local", uid=uid, when=time.time())
    return (Envelope(envelope.sender, envelope.recipients, pid=pid, uid=uid, origin="local"),
            line + message)


class SpoolClient:
    """A receiver's handle on the single writer: `enqueue`/`submit`/`close`
    like Spool's, one connection per process (open it after fork)."""

    def __init__(self, socket_path: Path | str, timeout: float = 30.0,
                 fallback: Callable[[], Spool] | None = None, retry_seconds: float = 1.0,
                 reply_timeout: float = 120.0, max_frame: int = 0):
        """`fallback`, if given, opens a direct Spool used while the writer is
        unreachable (LMDB's lock keeps that safe beside a running writer);
        the writer is tried again every `retry_seconds`. `timeout` bounds the
        connect; `reply_timeout` how long `submit` waits for the writer's
        answer (then SpoolWriteError: the client gets 451, and the message may
        still be committed later — at least once)."""
        self.socket_path = str(socket_path)
        self._timeout = timeout
        self._reply_timeout = reply_timeout
        # The writer's [spool] max_frame_bytes (0: not known): a larger frame is
        # refused here, for that message alone; sent, the writer would close
        # the connection and every message in flight on it would fail.
        self._max_frame = max_frame
        # What a send could not hand to the kernel at once (the writer reads
        # slowly, or not at all): sent in order by a thread of its own, never
        # by the event loop, which must go on serving every other session.
        self._backlog: deque[tuple[socket.socket, memoryview]] = deque()
        self._sending = False
        self._sender: threading.Thread | None = None
        self._fallback_factory = fallback
        self._fallback: Spool | None = None
        self._retry_seconds = retry_seconds
        self._retry_at = 0.0
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake_sender = threading.Condition(self._lock)
        # request id -> (connection it was sent on, its future)
        self._pending: dict[int, tuple[socket.socket, Future[int]]] = {}
        self._sock: socket.socket | None = None
        self._closed = False

    def _connect(self) -> socket.socket:
        # called with self._lock held
        if self._sock is not None:
            return self._sock
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self._timeout)
        try:
            s.connect(self.socket_path)
        except OSError as exc:
            s.close()
            raise WriterUnreachable(f"spool writer unreachable: {exc.strerror or exc}") from None
        s.settimeout(None)
        self._sock = s
        threading.Thread(target=self._read_responses, args=(s,), name="spool-client",
                         daemon=True).start()
        return s

    def _put(self, envelope: Envelope, message: bytes) -> Future[int]:
        if self._closed:
            raise SpoolError("spool client is closed")
        if os.getpid() != self._pid:
            raise SpoolError("spool client was opened in another process; open it after fork")
        future: Future[int] = Future()
        with self._lock:
            reqid = next(self._ids)
            frame = encode_request(reqid, envelope, bytes(message))
            if self._max_frame and len(frame) - ipc.LEN.size > self._max_frame:
                # A message within databytes, counted as qmail counts it (CRLF
                # as one byte), may be up to twice that stored.
                raise MessageTooBig(f"message of {len(message)} bytes is over the spool "
                                    f"writer's frame limit ([spool] max_frame_bytes "
                                    f"{self._max_frame})")
            direct = self._direct()
            if direct is not None:
                return direct._put(envelope, message)  # thread-safe future
            try:
                sock = self._connect()
            except SpoolWriteError:
                if self._fallback_factory is None:
                    raise
                self._retry_at = time.monotonic() + self._retry_seconds
                return self._open_fallback()._put(envelope, message)
            self._pending[reqid] = (sock, future)
            if self._backlog or self._sending:
                self._queue(sock, memoryview(frame))     # behind what waits: frames in order
                return future
            try:
                sent = sock.send(frame, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._pending.pop(reqid, None)
                self._drop(sock, f"spool writer connection lost: {exc.strerror or exc}")
                raise SpoolWriteError(f"spool writer connection lost: {exc}") from None
            if sent < len(frame):
                self._queue(sock, memoryview(frame)[sent:])
        return future

    def _queue(self, sock: socket.socket, rest: memoryview) -> None:
        # called with self._lock held
        self._backlog.append((sock, rest))
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_backlog, name="spool-client-send",
                                            daemon=True)
            self._sender.start()
        else:
            self._wake_sender.notify()

    def _send_backlog(self) -> None:
        """The sender thread: blocking sends of the backlog, one frame's rest
        at a time, outside the lock so the event loop can go on queueing."""
        while True:
            with self._lock:
                while not self._backlog and not self._closed:
                    self._wake_sender.wait()
                if self._closed:
                    return
                sock, data = self._backlog.popleft()
                self._sending = True
            error = None
            try:
                sock.sendall(data)
            except OSError as exc:
                error = exc
            del data        # the frame (a whole message) is not kept while the next is awaited
            with self._lock:
                self._sending = False
                if error is not None:
                    self._drop(sock, f"spool writer connection lost: {error.strerror or error}")

    def _direct(self) -> Spool | None:
        # called with self._lock held: the fallback spool while the writer
        # was recently unreachable, else None (use the writer)
        if self._sock is None and self._fallback is not None \
                and time.monotonic() < self._retry_at:
            return self._fallback
        return None

    def _open_fallback(self) -> Spool:
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        return self._fallback

    @property
    def using_writer(self) -> bool:
        """True while requests go to the single writer (not the fallback)."""
        return self._sock is not None

    def enqueue(self, envelope: Envelope, message: bytes) -> int:
        return self._put(envelope, message).result()

    async def submit(self, envelope: Envelope, message: bytes) -> int:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._put(envelope, message)),
                                          self._reply_timeout)
        except asyncio.TimeoutError:
            # A writer stuck in the kernel (a dying disk) or stopped: the
            # client is answered instead of waiting for its own timeout.
            raise SpoolWriteError(f"spool writer did not answer in {self._reply_timeout:g} s") \
                from None

    def _read_responses(self, sock: socket.socket) -> None:
        frames = ipc.FrameBuffer(MAX_RESPONSE)
        reason = "spool writer closed the connection"
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                for body in frames.feed(chunk):
                    reqid, status, payload = decode_response(body)
                    with self._lock:
                        entry = self._pending.pop(reqid, None)
                    if entry is None:
                        continue
                    future = entry[1]
                    if future.done():
                        continue        # its submit gave up waiting (reply_timeout)
                    try:
                        if status == OK:
                            future.set_result(ipc.U64.unpack(payload)[0])
                        elif status == WRITE_ERROR:
                            future.set_exception(
                                SpoolWriteError(payload.decode("utf-8", "replace")))
                        else:
                            future.set_exception(SpoolError(payload.decode("utf-8", "replace")))
                    except InvalidStateError:
                        pass            # cancelled that moment
        except OSError as exc:
            reason = f"spool writer connection lost: {exc.strerror or exc}"
        except FrameError as exc:
            reason = f"spool writer broke the protocol: {exc}"
        with self._lock:
            self._drop(sock, reason)

    def _drop(self, sock: socket.socket, reason: str) -> None:
        # called with self._lock held: fail everything in flight on this connection
        self._backlog = deque(item for item in self._backlog if item[0] is not sock)
        if self._sock is sock:
            self._sock = None
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        lost = [reqid for reqid, (s, _f) in self._pending.items() if s is sock]
        for reqid in lost:
            future = self._pending.pop(reqid)[1]
            if not future.done():
                future.set_exception(SpoolWriteError(reason))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake_sender.notify()
            if self._sock is not None:
                self._drop(self._sock, "spool client closed")
            fallback, self._fallback = self._fallback, None
        if fallback is not None:
            fallback.close()


def open_spool_writer(queue_dir: Path | str,
                      settings: SpoolSettings | None = None) -> SpoolClient | Spool:
    """What a receiver process should enqueue through (open it after fork).

    With `spool.single_writer` (the default) a SpoolClient for the writer at
    QUEUE/writer.sock, falling back to a direct Spool while no writer
    answers; otherwise a direct Spool. Both have enqueue/submit/close."""
    settings = settings or SpoolSettings()
    if not settings.single_writer:
        return Spool(queue_dir, settings)
    return SpoolClient(Path(queue_dir) / WRITER_SOCKET,
                       fallback=lambda: Spool(queue_dir, settings),
                       reply_timeout=settings.writer_reply_timeout,
                       max_frame=settings.max_frame_bytes)


def _accept_errors_once_a_minute() -> Callable[[asyncio.AbstractEventLoop, dict], None]:
    """The writer's loop's exception handler. Out of descriptors (EMFILE,
    ENFILE...), asyncio's accept logs a traceback for each try, a hundred a
    second while connections wait in the backlog; they wait there until a
    descriptor is free, which one line a minute says as well."""
    said = _OncePer()

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError)
                and context.get("message", "").startswith("socket.accept() out of system")):
            loop.default_exception_handler(context)
            return
        if said():
            log.warning(f"cannot accept a connection: {exc.strerror or exc}; it waits until "
                        f"a descriptor is free (open files limit "
                        f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]})")
    return handle


def run_writer(queue_dir: Path | str, socket_path: Path | str | None = None,
               settings: SpoolSettings | None = None,
               on_ready: Callable[[], None] | None = None,
               drain_seconds: float = 10.0) -> None:
    """Run the single writer in this process until SIGTERM/SIGINT: open the
    spool, serve the socket, then commit what is in flight and close.

    TERM often reaches the whole process group at once (a service manager, a
    terminal, `timeout`), so the receivers are still finishing their last
    transactions when the writer hears it: it keeps serving the connections it
    has until their receivers close them, at most `drain_seconds`."""
    import signal

    async def main() -> None:
        spool = Spool(queue_dir, settings)
        servers = [SpoolWriterServer(spool, socket_path or Path(queue_dir) / WRITER_SOCKET),
                   SpoolWriterServer(spool, Path(queue_dir) / INJECT_SOCKET, local_users=True)]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_accept_errors_once_a_minute())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            for server in servers:
                await server.start()
            if on_ready is not None:
                on_ready()
            await stop.wait()
            await asyncio.gather(*(server.drain(drain_seconds) for server in servers))
        finally:
            for server in servers:
                await server.close()
            spool.close()
    asyncio.run(main())
