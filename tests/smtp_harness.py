"""Test helpers for the SMTP receiver: an in-process server, a raw client, a fake spool,
and `qrelay run` as a subprocess (always stopped by its own pid)."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from qrelay_process import QrelayProcess  # noqa: E402


class FakeSpool:
    """In-memory spool with the `submit` of contract B; can be told to fail or wait."""

    def __init__(self) -> None:
        self.messages: list[tuple[object, bytes]] = []
        self.fail: Exception | None = None
        self.delay = 0.0
        self.next_id = 1000
        self.closed = False
        self.submitting = 0         # submits begun and not yet answered

    async def submit(self, envelope, message: bytes) -> int:
        self.submitting += 1
        try:
            return await self._submit(envelope, message)
        finally:
            self.submitting -= 1

    async def _submit(self, envelope, message: bytes) -> int:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.next_id += 1
        self.messages.append((envelope, message))
        return self.next_id

    def enqueue(self, envelope, message: bytes) -> int:
        self.next_id += 1
        self.messages.append((envelope, message))
        return self.next_id

    def close(self) -> None:
        self.closed = True


class InProcessServer:
    """The receiver (Receiver + SmtpSession) on a uvloop loop in a thread."""

    def __init__(self, root: Path, spool=None, rows: int = 1, scheme: str = "smtp",
                 host: str = "127.0.0.1") -> None:
        import uvloop

        from engine.smtp.config import load_smtp_config
        from engine.smtp.connlimit import ConnectionTable
        from engine.smtp.receiver import Receiver

        self.root = root
        self.scheme = scheme      # what the receiver serves (engine.smtp.listeners.SCHEMES)
        self.spool = spool if spool is not None else FakeSpool()
        self.table = ConnectionTable(rows)
        self.loop = uvloop.new_event_loop()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.receiver = Receiver(load_smtp_config(root), self.spool, self.table.counter(0),
                                 load_config=lambda: load_smtp_config(root))
        self.thread = threading.Thread(target=self._run, daemon=True)
        started = threading.Event()
        self._started = started
        self.thread.start()
        started.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        from engine.smtp.listeners import Listener
        self.loop.run_until_complete(self.receiver.serve([Listener(self.scheme, self.sock)]))
        self._started.set()
        self.loop.run_forever()

    def call(self, fn, *args):
        """Run fn(*args) on the loop thread and return its result."""
        fut = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)
        return fut.result(5)

    def reload(self) -> bool:
        return self.call(self.receiver.reload)

    def shutdown(self, grace: float = 2.0) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.receiver.shutdown(grace), self.loop)
        fut.result(grace + 5)

    def stop(self) -> None:
        if self.loop.is_running():
            if not self.receiver.closing:
                try:
                    self.shutdown(0.5)
                except Exception:
                    pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()
        self.sock.close()


async def _call(fn, *args):
    return fn(*args)


class RawClient:
    """A plain socket speaking SMTP byte by byte, for exact replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0,
                 source: str | None = None) -> None:
        """`source`: the client's own address (127.0.0.2: another host, for the server)."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next reply line with its CRLF; b"" at EOF."""
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk
        i = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def reply(self) -> bytes:
        """A whole (possibly multi-line) reply, CRLFs kept."""
        out = b""
        while True:
            ln = self.line()
            out += ln
            if not ln or len(ln) < 4 or ln[3:4] != b"-":
                return out

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 3.0) -> bool:
        """True if the server closed the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except (socket.timeout, TimeoutError):
            return False

    def starttls(self, context, server_hostname: str = "mx.example.com") -> None:
        """The TLS handshake on this connection (after a 220 to STARTTLS, or at
        once on an implicit-TLS listener); unread plaintext must not be left."""
        assert not self.buf, self.buf
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def close(self) -> None:
        self.sock.close()


def disable_scheduler(root: Path) -> None:
    """These tests are about the receiver: keep queued mail where it is (and keep
    the scheduler away from DNS) by adding `[scheduler] enabled = false`."""
    toml = root / "qrelay.toml"
    text = toml.read_text() if toml.exists() else ""
    if "[scheduler]" not in text:
        root.mkdir(parents=True, exist_ok=True)
        toml.write_text(text + "\n[scheduler]\nenabled = false\n")


def process_title(pid: int) -> str:
    """The title a qrelay process set (engine/proctitle: `qrelay: receiver 0`),
    or its command line before it did; "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode("utf-8", "replace")
    except OSError:
        return ""


def children_of(pid: int) -> list[int]:
    """Live (not zombie) child pids of `pid`, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            kids.append(int(entry))
    return sorted(kids)


def route_to_loopback(root: Path, routes: dict[str, int], toml: str) -> None:
    """Point ROOT's smtproutes at loopback sinks ({domain: port}) and write its
    qrelay.toml (which should name a fake DNS server: tests never use the system's)."""
    (root / "control" / "smtproutes").write_text(
        "".join(f"{d}:127.0.0.1:{p}\n" for d, p in routes.items()))
    (root / "qrelay.toml").write_text(toml)


class RunningQrelay(QrelayProcess):
    """`qrelay run ROOT` (bench/qrelay_process.py) with the scheduler off; stderr
    (the log of the whole run) is kept in `stderr_text` once stopped."""

    def __init__(self, root: Path, procs: int = 2, extra: tuple[str, ...] = (), timeout: float = 20.0) -> None:
        self.stderr_text = ""
        disable_scheduler(root)
        super().__init__(root, procs, extra, timeout=timeout)

    def children(self) -> list[int]:
        """Live child pids of the supervisor (from /proc)."""
        return children_of(self.proc.pid)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL of the whole group after `timeout`."""
        status = super().stop(timeout)
        if self.proc.stderr and not self.proc.stderr.closed:
            self.stderr_text = self.proc.stderr.read()
            self.proc.stderr.close()
        return status


def install_certificate(root: Path, name: str = "mx.example.com", ca=None):
    """A trustme CA's certificate + key for `name` in ROOT/control/servercert.pem
    (qmail-tls's one-file layout); returns the CA (clients trust it with ca.configure_trust)."""
    import trustme

    ca = ca if ca is not None else trustme.CA()
    cert = ca.issue_cert(name)
    path = root / "control" / "servercert.pem"
    tmp = path.with_suffix(".tmp")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp))
    os.replace(tmp, path)
    return ca


def encrypted_certificate(name: str) -> bytes:
    """A trustme certificate chain for `name` and its key encrypted with a
    passphrase, as one PEM (what qmail-tls cannot read)."""
    import trustme
    from cryptography.hazmat.primitives import serialization

    cert = trustme.CA().issue_cert(name)
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"passphrase"))
    return b"".join(p.bytes() for p in cert.cert_chain_pems) + encrypted


def run_without_a_terminal(argv: list[str]) -> "subprocess.CompletedProcess":
    """argv with a stdin that stays open and no controlling terminal: what
    OpenSSL's passphrase prompt would wait on. The test fails if it waits."""
    import pytest
    read_end, write_end = os.pipe()
    try:
        return subprocess.run(argv, stdin=read_end, capture_output=True, text=True, timeout=20,
                              start_new_session=True, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv[:4]} waited for a passphrase")
    finally:
        os.close(read_end)
        os.close(write_end)


def client_context(ca) -> "ssl.SSLContext":
    """A client context trusting `ca` (trustme), for the certificate's host name."""
    import ssl

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx
