"""A small HTTP/1.1 server for the status service: GET and HEAD, one request
per connection (`Connection: close`), bounded in every way a client controls.

A request head is at most MAX_HEAD bytes and must arrive within the
timeout; at most `max_connections` are open at once (more get a 503); a
body is never read. Anything else is a 4xx, never a traceback. The
responses come from `handler(path) -> Response`, awaited.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

MAX_HEAD = 8192
# The blank line that ends a head; a bare LF is a line end too (RFC 9112 2.2).
HEAD_END = re.compile(rb"\r?\n\r?\n")
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}
# No script, style or frame from anywhere but this server; data: for the
# empty favicon. The page writes every value with textContent.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
)


@dataclass(slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


Handler = Callable[[str], Awaitable[Response]]


def text_response(status: int, text: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", f"{text}\n".encode())


def loopback_host(host_header: str) -> bool:
    """Is a Host header's host part a loopback address or `localhost`? (A
    page from elsewhere cannot reach the loopback server by DNS rebinding.)"""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    # ::ffff:127.0.0.1 is loopback too (Python 3.11's is_loopback says not).
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


class HttpServer:
    """What the connections of one process share."""

    def __init__(self, handler: Handler, *, max_connections: int, timeout: float,
                 loopback_only: bool) -> None:
        self.handler = handler
        self.max_connections = max_connections
        self.timeout = timeout
        self.loopback_only = loopback_only
        self.open: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task] = set()

    def protocol(self) -> "HttpConnection":
        return HttpConnection(self)

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.open) >= self.server.max_connections:
            self.answered = True
            self._send(text_response(503, "too many connections"), head_only=False)
            return
        self.server.open.add(self)
        self.timer = asyncio.get_running_loop().call_later(self.server.timeout, self.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.buffer += data
        found = HEAD_END.search(self.buffer)
        if found is None:
            if len(self.buffer) > MAX_HEAD:
                self._answer(text_response(431, "request head too large"))
            return
        end = found.start()
        if end > MAX_HEAD:
            self._answer(text_response(431, "request head too large"))
            return
        self.answered = True
        self.transport.pause_reading()
        # The request is in; its answer may wait for a first scan of a long queue.
        self.timer.cancel()
        head = self.buffer[:end].decode("latin-1")
        self.buffer = b""
        task = asyncio.get_running_loop().create_task(self._respond(head))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _respond(self, head: str) -> None:
        lines = [line.removesuffix("\r") for line in head.split("\n")]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._send(text_response(400, "bad request line"), head_only=False)
            return
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            self._send(text_response(405, "only GET and HEAD"), head_only=False,
                       extra=(("Allow", "GET, HEAD"),))
            return
        host = next((ln.partition(":")[2] for ln in lines[1:]
                     if ln.lower().startswith("host:")), "")
        scheme, sep, rest = target.partition("://")
        if sep and scheme.lower() in ("http", "https"):
            # The absolute form (RFC 9112 3.2.2): its authority is the host.
            host, _, path = rest.partition("/")
            target = "/" + path
        if self.server.loopback_only:
            if not loopback_host(host):
                self._send(text_response(403, "Host must be a loopback address or localhost"),
                           head_only=method == "HEAD")
                return
        path = target.partition("?")[0]
        try:
            response = await self.server.handler(path)
        except Exception as exc:   # noqa: BLE001 - one line to the client, never a traceback
            response = text_response(500, f"error: {type(exc).__name__}: {exc}")
        self._send(response, head_only=method == "HEAD")

    def _answer(self, response: Response) -> None:
        self.answered = True
        self._send(response, head_only=False)

    def _send(self, response: Response, *, head_only: bool,
              extra: tuple[tuple[str, str], ...] = ()) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))),
                   ("Connection", "close"), *SECURITY_HEADERS, *response.headers, *extra]
        head = f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Error')}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self.transport.write(head.encode("latin-1") + (b"" if head_only else response.body))
        self.close()
        # A client that does not read its answer keeps no connection for ever.
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.server.timeout,
                                                           self.transport.abort)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
