"""Remote delivery worker processes (qmail-remote's role, `[delivery] worker_procs`).

Owns the worker processes and the framed protocol between them and the
scheduler. With `worker_procs = M >= 1` the scheduler process starts M
workers (children of the scheduler, so descendants of `qrelay run`; each asks
Linux for SIGTERM when the scheduler dies, so none outlives it). Each worker
runs its own uvloop loop with its own `RemoteDelivery` (connection pool, DNS
cache, tcpto) and serves many jobs at once. A worker reads the message bytes
itself from a read-only `Spool`, so only the envelope crosses the socket.

`WorkerPool.deliver(domain, sender, recipients, msgid)` is the Scheduler's
deliver callable (`Scheduler(..., deliver_by_id=True)`). Jobs of one domain
always go to the same worker (crc32(domain) % M) so its connections are
reused; results come back per job id, in any order.

Frames on a socketpair (big-endian), each preceded by its length (u32, at
most MAX_FRAME); fields are versioned by position (a later version only
appends fields):
    job      id u64 | msgid u64 | domain, sender (u32 len + bytes each)
             | nrcpt u32 | nrcpt x (u32 len + bytes)
    result   id u64 | status u8 (0 ok, 1 message unreadable, 2 bad job)
             | ok: n u32 | n x (code u8 'K'/'Z'/'D' | u32 len + text)
             | else: error text (utf-8)
Strings are utf-8 with surrogateescape (addresses are bytes on the wire).

Robustness: a worker that dies (or sends a frame that breaks the protocol,
after which it is killed) fails every job in flight on it with a temporary
`Z` (DIED_TEXT) -- the scheduler defers those recipients, the message may
have been delivered already (at least once, never lost) -- and is restarted
by the pool with a backoff (RESTART_MIN..RESTART_MAX seconds). A worker that
gets a malformed job answers "bad job" for it (a Z for each recipient); a
frame over MAX_FRAME cannot be skipped safely, so the worker exits and is
restarted. On close (scheduler TERM, after the scheduler has let its running
deliveries finish) the pool sends nothing more, closes the sockets, and waits
`stop_grace` seconds for the workers to QUIT their connections and exit
before it sends SIGTERM, then SIGKILL (the scheduler passes a short grace:
its own stop_grace was spent letting the deliveries finish).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from engine.delivery.remote import RecipientResult

_LEN = struct.Struct(">I")
_JOB_HEAD = struct.Struct(">QQ")
_RESULT_HEAD = struct.Struct(">QB")
_CODE = struct.Struct(">B")
# A job carries at most max_recipients_per_delivery addresses (each < 1 KB
# in SMTP); results carry their texts. 1 MiB is far above both.
MAX_FRAME = 1 << 20
OK, UNREADABLE, BAD_JOB = 0, 1, 2
_FAILED = -1   # not on the wire: the pool failed the job itself (worker died, closing)
# Restart backoff: doubles per quick death, back to RESTART_MIN after a
# worker lived RESTART_RESET seconds.
RESTART_MIN = 0.1
RESTART_MAX = 10.0
RESTART_RESET = 30.0

DIED_TEXT = "Sorry, the delivery worker died. Possible duplicate! (#4.3.0)\n"
STOPPING_TEXT = "Sorry, delivery is shutting down. (#4.3.0)\n"
UNREADABLE_TEXT = "qmail-spawn unable to open message. (#4.3.0)\n"
TOO_BIG_TEXT = "Sorry, the delivery job is too large for a worker. (#4.3.0)\n"


class FrameError(ValueError):
    """A frame that does not follow the protocol."""


# --- frames ------------------------------------------------------------------------

def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _framed(body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes is over the {MAX_FRAME} byte limit")
    return _LEN.pack(len(body)) + body


class _Fields:
    """Sequential reader of length-prefixed fields in one frame body."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes, pos: int) -> None:
        self.body = body
        self.pos = pos

    def u32(self) -> int:
        try:
            (n,) = _LEN.unpack_from(self.body, self.pos)
        except struct.error:
            raise FrameError("frame ends inside a field length") from None
        self.pos += _LEN.size
        return n

    def u8(self) -> int:
        if self.pos >= len(self.body):
            raise FrameError("frame ends inside a field")
        self.pos += 1
        return self.body[self.pos - 1]

    def text(self) -> str:
        n = self.u32()
        if self.pos + n > len(self.body):
            raise FrameError("field runs past the frame")
        raw = self.body[self.pos:self.pos + n]
        self.pos += n
        return _dec(raw)

    def end(self) -> None:
        if self.pos != len(self.body):
            raise FrameError(f"{len(self.body) - self.pos} stray bytes after the last field")


def encode_job(jobid: int, msgid: int, domain: str, sender: str,
               recipients: Sequence[str]) -> bytes:
    parts = [_JOB_HEAD.pack(jobid, msgid)]
    for text in (domain, sender):
        raw = _enc(text)
        parts += [_LEN.pack(len(raw)), raw]
    parts.append(_LEN.pack(len(recipients)))
    for rcpt in recipients:
        raw = _enc(rcpt)
        parts += [_LEN.pack(len(raw)), raw]
    return _framed(b"".join(parts))


def job_id(body: bytes) -> int | None:
    """The id of a job frame, if even that much can be read."""
    return _JOB_HEAD.unpack_from(body)[0] if len(body) >= _JOB_HEAD.size else None


def decode_job(body: bytes) -> tuple[int, int, str, str, list[str]]:
    if len(body) < _JOB_HEAD.size:
        raise FrameError("job frame shorter than its header")
    jobid, msgid = _JOB_HEAD.unpack_from(body)
    f = _Fields(body, _JOB_HEAD.size)
    domain, sender = f.text(), f.text()
    n = f.u32()
    if n > len(body):  # each recipient takes at least 4 bytes: cheap sanity bound
        raise FrameError(f"recipient count {n} cannot fit in the frame")
    rcpts = [f.text() for _ in range(n)]
    f.end()
    return jobid, msgid, domain, sender, rcpts


def encode_results(jobid: int, results: Sequence[RecipientResult]) -> bytes:
    parts = [_RESULT_HEAD.pack(jobid, OK), _LEN.pack(len(results))]
    for r in results:
        raw = _enc(r.text)
        parts += [_CODE.pack(ord(r.status[:1] or "Z")), _LEN.pack(len(raw)), raw]
    return _framed(b"".join(parts))


def encode_error(jobid: int, status: int, text: str) -> bytes:
    return _framed(_RESULT_HEAD.pack(jobid, status) + _enc(text)[:4096])


def decode_result(body: bytes) -> tuple[int, int, list[tuple[str, str]] | str]:
    """(jobid, status, [(code, text)] if status is OK else the error text)."""
    if len(body) < _RESULT_HEAD.size:
        raise FrameError("result frame shorter than its header")
    jobid, status = _RESULT_HEAD.unpack_from(body)
    if status != OK:
        return jobid, status, _dec(body[_RESULT_HEAD.size:])
    f = _Fields(body, _RESULT_HEAD.size)
    n = f.u32()
    if n > len(body):
        raise FrameError(f"result count {n} cannot fit in the frame")
    out = []
    for _ in range(n):
        code = chr(f.u8())
        out.append((code, f.text()))
    f.end()
    return jobid, status, out


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame body; None at a clean end of stream. FrameError if the
    announced length is over MAX_FRAME (the stream cannot be resynchronised)."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("stream ends inside a frame length") from None
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes announced, over the {MAX_FRAME} byte limit")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise FrameError("stream ends inside a frame") from None


# --- the worker process ------------------------------------------------------------

class WorkerServer:
    """One worker's job loop: read jobs, deliver each in its own task, answer."""

    def __init__(self, spool, remote, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.spool = spool
        self.remote = remote
        self.reader = reader
        self.writer = writer
        self._tasks: set[asyncio.Task] = set()

    async def serve(self) -> None:
        """Until the scheduler closes the socket (or a frame breaks the protocol)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    body = await read_frame(self.reader)
                except FrameError as exc:
                    sys.stderr.write(f"qrelay: delivery worker {os.getpid()}: {exc}; exiting\n")
                    return
                except ConnectionError:
                    return
                if body is None:
                    return
                task = loop.create_task(self._job(body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _job(self, body: bytes) -> None:
        try:
            jobid, msgid, domain, sender, rcpts = decode_job(body)
        except FrameError as exc:
            jobid = job_id(body)
            if jobid is not None:
                self._send(encode_error(jobid, BAD_JOB, f"bad job frame: {exc}"))
            return
        try:
            message = self.spool.read_message(msgid)
        except Exception as exc:  # SpoolError, or LMDB trouble: the scheduler decides
            self._send(encode_error(jobid, UNREADABLE, str(exc)))
            return
        try:
            results = await self.remote.deliver(domain, sender, rcpts, message)
            frame = encode_results(jobid, results)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug in remote delivery costs a retry of this job only.
            frame = encode_error(jobid, BAD_JOB, f"delivery failed: {exc!r}")
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame)


def worker_main(root: str, fd: int, parent_pid: int) -> int:
    """Body of one worker process (after exec); exit status 0, or 111 if it
    cannot start."""
    from engine.supervisor import follow_parent

    # The scheduler alone takes ALRM/HUP; INT (a terminal's ^C to the whole
    # group) is the supervisor's to turn into an orderly TERM.
    for sig in (signal.SIGHUP, signal.SIGALRM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if not follow_parent(parent_pid):
        return 0  # the scheduler died before we could ask to follow it
    import uvloop

    sock = socket.socket(fileno=fd)
    return uvloop.run(_worker_serve(Path(root), sock))


async def _worker_serve(root: Path, sock: socket.socket) -> int:
    from engine.config.settings import SettingsError, load_settings
    from engine.delivery.remote import RemoteConfigError, RemoteDelivery, load_remote_config
    from engine.queue import Spool, SpoolError

    try:
        settings = load_settings(root)
        remote_config = load_remote_config(root)
        spool = Spool(root / "queue", settings.spool, readonly=True)
    except (SettingsError, RemoteConfigError, SpoolError, OSError) as exc:
        sys.stderr.write(f"qrelay: delivery worker cannot start: {exc}\n")
        sock.close()
        return 111
    remote = RemoteDelivery(remote_config)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME)
    server = WorkerServer(spool, remote, reader, writer)
    serving = asyncio.get_running_loop().create_task(server.serve())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        pass
    finally:
        writer.close()
        try:
            await asyncio.wait_for(remote.close(), 2)
        except (asyncio.TimeoutError, OSError):
            pass
        spool.close()
    return 0


# --- the pool in the scheduler process ---------------------------------------------

class _Worker:
    """The pool's view of one worker process: its socket and its jobs in flight."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.up = asyncio.Event()
        self.started_at = 0.0
        self.backoff = RESTART_MIN
        self.task: asyncio.Task | None = None


class WorkerPool:
    """M delivery worker processes behind one deliver-by-msgid coroutine."""

    def __init__(self, root: Path | str, procs: int, *, log=None, spool=None,
                 stop_grace: float = 10.0, python: str = sys.executable) -> None:
        if procs < 1:
            raise ValueError("a WorkerPool needs at least one worker process")
        self.root = str(root)
        self.log = log
        self.spool = spool       # the scheduler's (writable) spool: quarantines unreadable mail
        self.stop_grace = stop_grace
        self.python = python
        self.workers = [_Worker(i) for i in range(procs)]
        self.restarts = 0
        self._next_id = 0
        self._closing = False

    # -- life cycle
    async def start(self) -> None:
        for w in self.workers:
            w.task = asyncio.get_running_loop().create_task(self._keep_running(w))

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.up.is_set()]

    async def close(self) -> None:
        """Send nothing more; close every socket so the workers finish and exit;
        SIGTERM after stop_grace, SIGKILL 1 s later. Jobs still pending get Z."""
        self._closing = True
        for w in self.workers:
            if w.writer is not None:
                w.writer.close()
        deadline = time.monotonic() + self.stop_grace
        for sig, until in ((None, deadline), (signal.SIGTERM, deadline + 1),
                           (signal.SIGKILL, deadline + 3)):
            alive = [w for w in self.workers
                     if w.proc is not None and w.proc.returncode is None]
            if not alive:
                break
            for w in alive:
                if sig is not None:
                    try:
                        w.proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
            await asyncio.wait([asyncio.ensure_future(w.proc.wait()) for w in alive],
                               timeout=max(0.0, until - time.monotonic()))
        for w in self.workers:
            if w.task is not None:
                w.task.cancel()
        await asyncio.gather(*(w.task for w in self.workers if w.task is not None),
                             return_exceptions=True)
        for w in self.workers:
            self._fail_pending(w, STOPPING_TEXT)
            w.up.set()     # wakes callers waiting for a restart: they see _closing

    async def _keep_running(self, w: _Worker) -> None:
        """Start worker w, and start it again (with backoff) whenever it dies."""
        while not self._closing:
            try:
                await self._run_once(w)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. fork failure: retry later
                self._warn(f"delivery worker {w.slot} trouble: {exc!r}")
            if self._closing:
                return
            if time.monotonic() - w.started_at >= RESTART_RESET:
                w.backoff = RESTART_MIN
            delay, w.backoff = w.backoff, min(RESTART_MAX, w.backoff * 2)
            self.restarts += 1
            await asyncio.sleep(delay)

    async def _run_once(self, w: _Worker) -> None:
        w.started_at = time.monotonic()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            w.proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "engine.delivery.workers", self.root,
                str(theirs.fileno()), str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        reader, w.writer = await asyncio.open_unix_connection(sock=mine, limit=MAX_FRAME)
        w.up.set()
        why = ""
        try:
            while True:
                try:
                    body = await read_frame(reader)
                except FrameError as exc:
                    why = f"broke the protocol ({exc})"
                    break
                except ConnectionError:
                    break
                if body is None:
                    break
                try:
                    self._resolve(w, body)
                except FrameError as exc:
                    why = f"broke the protocol ({exc})"
                    break
        finally:
            w.up.clear()
            w.writer.close()
            w.writer = None
            if w.proc.returncode is None and why:
                w.proc.kill()
            try:
                code = await asyncio.wait_for(w.proc.wait(), 5)
            except asyncio.TimeoutError:
                w.proc.kill()
                code = await w.proc.wait()
            lost = len(w.pending)
            self._fail_pending(w, DIED_TEXT)
        if not self._closing:
            how = f"signal {-code}" if code < 0 else f"status {code}"
            self._warn(f"delivery worker {w.slot} pid {w.proc.pid} "
                       f"{why or 'exited'} ({how}) with {lost} jobs in flight; restarting")

    def _resolve(self, w: _Worker, body: bytes) -> None:
        jobid, status, payload = decode_result(body)
        fut = w.pending.pop(jobid, None)
        if fut is None or fut.done():
            return  # the caller was cancelled meanwhile
        fut.set_result((status, payload))

    def _fail_pending(self, w: _Worker, text: str) -> None:
        pending, w.pending = w.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_result((_FAILED, text))

    def _warn(self, text: str) -> None:
        if self.log is not None:
            self.log.warning(text)

    # -- the Scheduler's deliver (deliver_by_id=True)
    def worker_for(self, domain: str) -> int:
        return zlib.crc32(_enc(domain.lower())) % len(self.workers)

    async def deliver(self, domain: str, sender: str, recipients: Sequence[str],
                      msgid: int) -> list[RecipientResult]:
        """Deliver message `msgid` to recipients that share `domain` in the worker
        for `domain`; one result per recipient, in order (as RemoteDelivery.deliver)."""
        recipients = list(recipients)
        if not recipients:
            return []
        w = self.workers[self.worker_for(domain)]
        if self._closing:
            return _all(recipients, "Z", STOPPING_TEXT)
        self._next_id += 1
        jobid = self._next_id
        try:
            frame = encode_job(jobid, msgid, domain, sender, recipients)
        except FrameError:
            return _all(recipients, "Z", TOO_BIG_TEXT)
        # A worker being restarted is waited for (the backoff is bounded); the
        # scheduler's concurrency limit bounds how many jobs wait here.
        while w.writer is None or not w.up.is_set():
            if self._closing:
                return _all(recipients, "Z", STOPPING_TEXT)
            await w.up.wait()
        fut = asyncio.get_running_loop().create_future()
        w.pending[jobid] = fut
        try:
            w.writer.write(frame)
            status, payload = await fut
        finally:
            w.pending.pop(jobid, None)
        if status == _FAILED:
            return _all(recipients, "Z", payload)
        if status == UNREADABLE:
            self._quarantine_check(msgid)
            return _all(recipients, "Z", UNREADABLE_TEXT)
        if status != OK:
            self._warn(f"delivery worker {w.slot}: {payload}")
            return _all(recipients, "Z", f"Sorry, {_one_line(payload)} (#4.3.0)\n")
        if len(payload) != len(recipients):
            raise FrameError(f"worker answered {len(payload)} results for "
                             f"{len(recipients)} recipients")
        return [RecipientResult(r, code, text) for r, (code, text) in zip(recipients, payload)]

    def _quarantine_check(self, msgid: int) -> None:
        """The worker's read-only spool could not read msgid: read it here, where a
        corrupt message is quarantined (spool contract) instead of retried forever."""
        if self.spool is None:
            return
        try:
            self.spool.read_message(msgid)
        except Exception:
            pass


def _all(recipients: Sequence[str], status: str, text: str) -> list[RecipientResult]:
    return [RecipientResult(r, status, text) for r in recipients]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.stderr.write("usage: python -m engine.delivery.workers ROOT FD PARENT_PID\n")
        sys.exit(2)
    sys.exit(worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
