"""Delivery worker processes: qmail-lspawn's and qmail-rspawn's role, for any channel.

A `Spawner` is a courier (engine.delivery.channels) that runs another
channel's deliverer in M worker processes, children of the scheduler (each
asks Linux for SIGTERM when the scheduler dies, so none outlives it). Each
worker runs its own uvloop loop and its own deliverer (for remote: its own
connection pool, DNS cache and tcpto) and serves many jobs at once.

- `[delivery] worker_procs = M >= 1` runs the remote channel this way.
- `user=(uid, gid)`: the workers drop to that user before they open anything
  (a local delivery runs as the mailbox owner, never as root). Such a worker
  cannot read the spool, so the message travels in the job (`inline=True`),
  read here by the scheduler; otherwise a worker reads it itself from a
  read-only Spool and only the envelope crosses the socket.

Jobs of one destination always go to the same worker (crc32 % M), so its
connections are reused; results come back per job id, in any order.

Frames (engine.ipc) on a socketpair:
    job      id u64 | msgid u64 | channel, destination, sender (text)
             | recipients (count + texts) | inline u8 | message bytes if inline
    result   id u64 | status u8 (0 ok, 2 bad job)
             | ok: count u32 | count x (code u8 'K'/'Z'/'D' | text | forwards:
                       count u32 | count x (uid u32 | reports_qp u8 | sender text
                                            | recipients | prefix bytes))
             | else: error text (utf-8)

Robustness: a worker that dies (or sends a frame that breaks the protocol,
after which it is killed) fails every job in flight on it with a temporary
`Z` (DIED_TEXT) -- the scheduler defers those recipients, the message may
have been delivered already (at least once, never lost) -- and is restarted
with engine.backoff's schedule. A worker that gets a malformed job answers
"bad job" for it (a Z for each recipient); a frame over the limit cannot be
skipped safely, so the worker exits and is restarted. On close (scheduler
TERM, after the scheduler has let its running deliveries finish) the
spawner sends nothing more, closes the sockets, and waits `stop_grace`
seconds for the workers to finish and exit before it sends SIGTERM, then
SIGKILL.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

from engine import ipc
from engine.backoff import Backoff
from engine.delivery.channels import (UNREADABLE_TEXT, Forward, Group, RecipientResult,
                                      SharedReads, all_results)
from engine.privilege import acting_as, drop_to, no_new_privileges

# A job without its message carries at most max_recipients_per_delivery
# addresses (each < 1 KB in SMTP); results carry their texts. An inline
# worker's results may be as large as its jobs: a .qmail's `&` lines come
# back as forwards, and a list of them has no size of its own.
MAX_FRAME = 1 << 20
OK, BAD_JOB = 0, 2
_FAILED = -1   # not on the wire: the spawner failed the job itself (worker died, closing)

DIED_TEXT = "Sorry, the delivery worker died. Possible duplicate! (#4.3.0)\n"
STOPPING_TEXT = "Sorry, delivery is shutting down. (#4.3.0)\n"
TOO_BIG_TEXT = "Sorry, the delivery job is too large for a worker. (#4.3.0)\n"


# --- frames ------------------------------------------------------------------------

def encode_job(jobid: int, msgid: int, group: Group, message: bytes | None,
               max_frame: int = MAX_FRAME) -> bytes:
    body = (ipc.Body().u64(jobid).u64(msgid).text(group.channel).text(group.destination)
            .text(group.sender).texts(group.recipients))
    if message is None:
        body.u8(0)
    else:
        body.u8(1).rest(message)
    return body.frame(max_frame)


def job_id(body: bytes) -> int | None:
    """The id of a job frame, if even that much can be read."""
    try:
        return ipc.Fields(body).u64()
    except ipc.FrameError:
        return None


def decode_job(body: bytes) -> tuple[int, Group, bytes | None]:
    f = ipc.Fields(body)
    jobid, msgid = f.u64(), f.u64()
    channel, destination, sender = f.text(), f.text(), f.text()
    group = Group(channel, msgid, destination, sender, tuple(f.texts()))
    inline = f.u8()
    if inline > 1:
        raise ipc.FrameError(f"bad inline flag {inline}")
    message = f.rest() if inline else None
    f.end()
    return jobid, group, message


def encode_results(jobid: int, results: list[RecipientResult],
                   max_frame: int = MAX_FRAME) -> bytes:
    body = ipc.Body().u64(jobid).u8(OK).u32(len(results))
    for r in results:
        body.u8(ord(r.status[:1] or "Z")).text(r.text).u32(len(r.forwards))
        for fwd in r.forwards:
            body.u32(fwd.uid).u8(fwd.reports_qp).text(fwd.sender).texts(fwd.recipients)
            body.raw(fwd.prefix)
    return body.frame(max_frame)


def _forward(f: ipc.Fields) -> Forward:
    uid, reports_qp = f.u32(), f.u8()
    if reports_qp > 1:
        raise ipc.FrameError(f"bad reports_qp flag {reports_qp}")
    return Forward(f.text(), tuple(f.texts()), f.raw(), uid, bool(reports_qp))


def encode_error(jobid: int, status: int, text: str) -> bytes:
    return ipc.Body().u64(jobid).u8(status).rest(ipc.enc(text)[:4096]).frame(MAX_FRAME)


def decode_result(body: bytes, recipients: tuple[str, ...] | None = None
                  ) -> tuple[int, int, list[RecipientResult] | str]:
    """(jobid, status, results if status is OK else the error text); results
    are named after `recipients` when given (the caller's job), else ""."""
    f = ipc.Fields(body)
    jobid, status = f.u64(), f.u8()
    if status != OK:
        return jobid, status, ipc.dec(f.rest())
    out = []
    for i in range(f.count()):
        code, text = chr(f.u8()), f.text()
        forwards = tuple(_forward(f) for _ in range(f.count()))
        address = recipients[i] if recipients is not None and i < len(recipients) else ""
        out.append(RecipientResult(address, code, text, forwards))
    f.end()
    return jobid, status, out


# --- the worker process ------------------------------------------------------------

class WorkerServer:
    """One worker's job loop: read jobs, deliver each in its own task, answer.

    `spool` reads the message of a job that does not carry it (None: every
    job must carry it); `deliverer.deliver(destination, sender, recipients,
    message)` delivers it. A deliverer whose work is blocking file and
    program I/O (local) may offer `deliver_blocking(...)` (same arguments and
    results) and `threads`: each job then runs whole in one of that many
    threads — delivery and its result frame — and only the frames pass
    through the event loop (per job, an asyncio task and a future chained
    across threads cost more CPU than the Maildir delivery's own Python).

    Such a deliverer may also say how many jobs run at once (`active`, fewer
    than `threads`; 0: no limit): the others wait in a backlog, and a thread
    that finishes a job takes the next from it itself (no hand-over to
    another thread). More threads running Python than cores only pass the
    GIL around, a futex wake and a context switch at each system call: on 2
    cores a local worker spent 10–15 % more CPU per job with 10 at once than
    with 4 (until its small reads kept the GIL, engine._fileio: since then
    the limit makes no difference there). A job that only waits (a
    |program's run) steps out (`stepped_out`), letting a backlog job start,
    so slow programs still run side by side."""

    def __init__(self, spool, deliverer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, max_frame: int = MAX_FRAME) -> None:
        self.spool = spool
        self.deliverer = deliverer
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self._tasks: set[asyncio.Task] = set()
        self._blocking = getattr(deliverer, "deliver_blocking", None)
        self._pool: ThreadPoolExecutor | None = None
        if self._blocking is not None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, deliverer.threads),
                                            thread_name_prefix="qrelay-job")
        self._active = max(1, getattr(deliverer, "active", 0) or getattr(deliverer, "threads", 1))
        self._running = 0
        self._backlog: deque[tuple[int, Group, bytes]] = deque()
        self._lock = threading.Lock()
        # The jobs of one message (one per domain or mailbox owner, run at
        # once) share one read of it (none here: a worker without a spool).
        self._reads = SharedReads(lambda msgid: self.spool.read_message(msgid))
        self._out: ipc.FrameSender | None = None

    async def serve(self) -> None:
        """Until the scheduler closes the socket (or a frame breaks the protocol)."""
        loop = asyncio.get_running_loop()
        self._out = ipc.FrameSender(self.writer, loop)
        try:
            while True:
                try:
                    body = await ipc.read_frame(self.reader, self.max_frame)
                except ipc.FrameError as exc:
                    sys.stderr.write(f"qrelay: delivery worker {os.getpid()}: {exc}; exiting\n")
                    return
                except ConnectionError:
                    return
                if body is None:
                    return
                if self._pool is not None:
                    self._start_blocking(body)
                    continue
                task = loop.create_task(self._job(body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._pool is not None:
                # Jobs not started yet get no answer (the spawner fails them:
                # deferred); running ones finish in their threads (but for
                # their programs: _worker_serve), and deliverer.close() waits
                # for them.
                with self._lock:
                    self._backlog.clear()
                self._pool.shutdown(wait=False, cancel_futures=True)

    def _decoded(self, body: bytes) -> tuple[int, Group, bytes] | None:
        """A job frame's id, group and message (read from the spool when the
        frame does not carry it); None after answering a job that cannot run."""
        try:
            jobid, group, message = decode_job(body)
        except ipc.FrameError as exc:
            jobid = job_id(body)
            if jobid is not None:
                self._send(encode_error(jobid, BAD_JOB, f"bad job frame: {exc}"))
            return None
        if message is None:
            try:
                message = self._reads.get(group.msgid)
            except Exception:  # SpoolError, LMDB trouble, no spool: the scheduler decides
                self._send(encode_results(jobid, all_results(group.recipients, "Z",
                                                             UNREADABLE_TEXT)))
                return None
        return jobid, group, message

    def _start_blocking(self, body: bytes) -> None:
        """A job for deliver_blocking: decoded (and its message read) here, run
        and answered in a pool thread, or kept in the backlog while `active`
        jobs run."""
        job = self._decoded(body)
        if job is None:
            return
        with self._lock:
            if self._running >= self._active:
                self._backlog.append(job)
                return
            self._running += 1
        self._pool.submit(self._run_jobs, job)

    def _run_jobs(self, job: tuple[int, Group, bytes] | None) -> None:
        """Run `job`, then the backlog's jobs while there are any (and no
        more than `active` run: a job back from stepping out may make one too
        many, and then this thread is the one that stops)."""
        while job is not None:
            self._run_blocking(*job)
            self._reads.done(job[1].msgid, job[2])
            with self._lock:
                if self._backlog and self._running <= self._active:
                    job = self._backlog.popleft()
                else:
                    self._running -= 1
                    job = None

    @contextmanager
    def stepped_out(self):
        """Around a running job's wait (engine.delivery.local's Waiting): it
        does not count as running meanwhile, and a backlog job starts."""
        with self._lock:
            job = self._backlog.popleft() if self._backlog else None
            if job is None:
                self._running -= 1
        if job is not None:
            try:
                self._pool.submit(self._run_jobs, job)
            except RuntimeError:        # shutting down: the spawner defers it
                pass
        try:
            yield
        finally:
            with self._lock:
                self._running += 1

    def _run_blocking(self, jobid: int, group: Group, message: bytes) -> None:
        try:
            frame = encode_results(jobid, self._blocking(group.destination, group.sender,
                                                         group.recipients, message, self),
                                   self.max_frame)
        except Exception as exc:
            # A bug in a deliverer costs a retry of this job only.
            frame = encode_error(jobid, BAD_JOB, f"delivery failed: {exc!r}")
        try:
            self._out.send_threadsafe(frame)
        except RuntimeError:
            pass  # the loop is gone (worker stopping): the spawner defers the job

    async def _job(self, body: bytes) -> None:
        job = self._decoded(body)
        if job is None:
            return
        jobid, group, message = job
        try:
            results = await self.deliverer.deliver(group.destination, group.sender,
                                                   group.recipients, message)
            frame = encode_results(jobid, results, self.max_frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug in a deliverer costs a retry of this job only.
            frame = encode_error(jobid, BAD_JOB, f"delivery failed: {exc!r}")
        finally:
            self._reads.done(group.msgid, message)
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        self._out.send(frame)


def worker_main(root: str, fd: int, parent_pid: int, channel: str,
                user: tuple[int, int] | None, max_frame: int, inline: bool) -> int:
    """Body of one worker process (after exec); exit status 0, or 111 if it
    cannot start."""
    from engine.proctitle import set_title
    from engine.supervisor import follow_parent

    set_title(f"qrelay: delivery worker {channel}")
    # The scheduler alone takes HUP, and ALRM but for a remote worker's
    # connect timeouts (_worker_serve); INT (a terminal's ^C to the whole
    # group) is the supervisor's to turn into an orderly TERM. Caught and
    # dropped, not SIG_IGN: exec resets a caught signal to its default, so a
    # .qmail `|program` starts with qmail-local's default actions (an ignored
    # ALRM would stop its own alarm() from ever ending it).
    for sig in (signal.SIGHUP, signal.SIGALRM, signal.SIGINT):
        signal.signal(sig, _dropped)
    if not follow_parent(parent_pid):
        return 0  # the scheduler died before we could ask to follow it
    sock = socket.socket(fileno=fd)
    # Everything is imported and opened before the privileges go: the user a
    # worker becomes may not be able to read the Python installation, the
    # spool or the control files.
    import uvloop

    from engine.config.settings import load_settings
    from engine.delivery.channels import channel as channel_spec
    from engine.queue import Spool

    rootp = Path(root)
    spool = None
    try:
        settings = load_settings(rootp)
        if not inline:
            # As the user it becomes: root never opens the run user's spool files.
            with acting_as(*user) if user is not None else nullcontext():
                spool = Spool(rootp / "queue", settings.spool, readonly=True)
        deliverer = channel_spec(channel).open(rootp, settings)
        if user is not None:
            drop_to(*user)
            if channel != "local":
                # It reads what remote servers send: as every process that
                # reads the network (engine.privilege.become), a set-uid
                # program it could exec gives it nothing more.
                no_new_privileges()
            # setuid() cleared the parent-death signal: ask again.
            if not follow_parent(parent_pid):
                return 0
    except Exception as exc:  # a config error, or a bug: one line, and the spawner retries
        sys.stderr.write(f"qrelay: {channel} delivery worker cannot start: {exc}\n")
        sock.close()
        if spool is not None:
            spool.close()
        return 111
    return uvloop.run(_worker_serve(sock, spool, deliverer, max_frame))


async def _worker_serve(sock: socket.socket, spool, deliverer, max_frame: int) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=max_frame)
    server = WorkerServer(spool, deliverer, reader, writer, max_frame)
    serving = asyncio.get_running_loop().create_task(server.serve())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, serving.cancel)
    forget = getattr(deliverer, "forget_timeouts", None)
    if forget is not None:
        loop.add_signal_handler(signal.SIGALRM, forget)    # Spawner.forget_timeouts
    try:
        await serving
    except asyncio.CancelledError:
        pass
    finally:
        writer.close()
        # Jobs still running were given up with the connection: nothing
        # they start may outlive this worker (a `|program`: engine.delivery.lspawn).
        abandon = getattr(deliverer, "abandon", None)
        if abandon is not None:
            abandon()
        try:
            await asyncio.wait_for(deliverer.close(), 2)
        except (asyncio.TimeoutError, OSError):
            pass
        if spool is not None:
            spool.close()
    return 0


def _dropped(signum: int, frame) -> None:
    """worker_main's handler for the signals a worker leaves to others."""


def worker_argv(python: str, root: str, fd: int, parent_pid: int, channel: str,
                max_frame: int, inline: bool, user: tuple[int, int] | None) -> list[str]:
    # -P: `-m` would put the working directory first on sys.path, and a worker
    # loads itself as root (it drops afterwards): a `qrelay run` started in a
    # directory another user writes (/tmp, ROOT/queue) would import their
    # uvloop.py as root. qrelay is an installed package (or on PYTHONPATH).
    argv = [python, "-P", "-m", "engine.delivery.spawner", root, str(fd), str(parent_pid), channel,
            str(max_frame), "inline" if inline else "spool"]
    if user is not None:
        argv += [str(user[0]), str(user[1])]
    return argv


# --- starting a worker through the local spawner service --------------------------
# A scheduler running as `[run] user` may be unable to run the interpreter (it
# can live where only root may look). It asks the root local spawner
# (engine.delivery.lspawn) instead: one connection per worker, kept open for
# the worker's life. Request frame: "spawn" | channel | max_frame u64 |
# inline u8; the answer is the worker's pid (u32) carrying its socket
# (SCM_RIGHTS), and, when the worker has exited, a frame with its wait status (i32).

SPAWN = "spawn"


def spawn_via(path: Path, channel: str, max_frame: int, inline: bool
              ) -> tuple[socket.socket, socket.socket, int]:
    """(connection, worker socket, worker pid) for a new worker started by the
    service at `path` as this process's uid/gid. Blocking (run in a thread)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(30)
        conn.connect(str(path))
        conn.sendall(ipc.Body().text(SPAWN).text(channel).u64(max_frame).u8(int(inline))
                     .frame(MAX_FRAME))
        data, fds, _, _ = socket.recv_fds(conn, 4, 1)
        if not fds:
            raise ConnectionError(f"{path}: the local spawner did not start a worker")
        conn.settimeout(None)
        return conn, socket.socket(fileno=fds[0]), int.from_bytes(data.ljust(4, b"\0"), "big")
    except BaseException:
        conn.close()
        raise


def spawned_end(conn: socket.socket | None, pid: int, why: str) -> str:
    """How a worker started by the service ended (its status frame; blocking)."""
    why = f"pid {pid} {why or 'exited'}"
    if conn is None:
        return why
    try:
        conn.settimeout(10)
        data = b""
        while len(data) < 4 + 4:
            chunk = conn.recv(64)
            if not chunk:
                break
            data += chunk
        body = data[4:8] if len(data) >= 8 else b""
        if len(body) == 4:
            code = int.from_bytes(body, "big", signed=True)
            how = f"signal {-code}" if code < 0 else f"status {code}"
            return f"{why} ({how})"
        return why
    except OSError:
        return why
    finally:
        conn.close()


# --- the spawner in the scheduler process ------------------------------------------

class _Worker:
    """The spawner's view of one worker process: its socket and its jobs in flight."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.out: ipc.FrameSender | None = None     # jobs leave through it
        self.pending: dict[int, tuple[asyncio.Future, tuple[str, ...]]] = {}
        self.up = asyncio.Event()
        self.backoff = Backoff()
        self.task: asyncio.Task | None = None
        self.handle: socket.socket | None = None   # the local spawner's connection (via)
        self.remote_pid = 0                          # and the worker it started


class Spawner:
    """M worker processes of one channel behind one courier (see the module docstring)."""

    def __init__(self, root: Path | str, procs: int, channel: str, *, log=None, spool=None,
                 user: tuple[int, int] | None = None, max_message: int = 0,
                 inline: bool | None = None, stop_grace: float = 10.0,
                 python: str = sys.executable, via: Path | None = None) -> None:
        """`spool`: the scheduler's (writable) spool: it reads inline messages and
        quarantines one a worker cannot read. `inline` (default: with `user`):
        the message travels in the job, at most `max_message` bytes; a frame
        may be that much over MAX_FRAME either way, inline or not (a local
        delivery's result carries its .qmail's forwards). `via`: the
        local spawner service's socket, which starts the workers (as root, then
        they become this process's user) for a scheduler that cannot run the
        interpreter itself."""
        if procs < 1:
            raise ValueError("a Spawner needs at least one worker process")
        self.root = str(root)
        self.channel = channel
        self.log = log
        self.spool = spool
        self.user = user
        self.inline = user is not None if inline is None else inline
        self.max_frame = MAX_FRAME + max_message
        self.stop_grace = stop_grace
        self.python = python
        self.via = via
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

    def forget_timeouts(self) -> None:
        """`qrelay flush` for workers that keep a connect-timeout table (remote):
        ALRM, which they take for that alone (the scheduler's flush is its own)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGALRM)
            except (ProcessLookupError, PermissionError):
                pass

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
            w.backoff.started()
            try:
                await self._run_once(w)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. fork failure: retry later
                self._warn(f"delivery worker {w.slot} trouble: {exc!r}")
            if self._closing:
                return
            self.restarts += 1
            await asyncio.sleep(w.backoff.died())

    def _argv(self, fd: int) -> list[str]:
        return worker_argv(self.python, self.root, fd, os.getpid(), self.channel,
                           self.max_frame, self.inline, self.user)

    async def _connect(self, w: _Worker) -> socket.socket:
        """A new worker process for w; the scheduler's end of its socket."""
        if self.via is not None:
            w.proc = None
            w.handle, mine, w.remote_pid = await asyncio.to_thread(
                spawn_via, self.via, self.channel, self.max_frame, self.inline)
            return mine
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *self._argv(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return mine

    async def _ended(self, w: _Worker, why: str) -> str:
        """After w's socket closed: reap the process; how it ended, for the log."""
        if w.proc is None:    # started by the local spawner service, which reaps it
            handle, w.handle = w.handle, None
            return await asyncio.to_thread(spawned_end, handle, w.remote_pid, why)
        if w.proc.returncode is None and why:
            w.proc.kill()
        try:
            code = await asyncio.wait_for(w.proc.wait(), 5)
        except asyncio.TimeoutError:
            w.proc.kill()
            code = await w.proc.wait()
        how = f"signal {-code}" if code < 0 else f"status {code}"
        return f"pid {w.proc.pid} {why or 'exited'} ({how})"

    async def _run_once(self, w: _Worker) -> None:
        reader, w.writer = await asyncio.open_unix_connection(sock=await self._connect(w),
                                                              limit=self.max_frame)
        w.out = ipc.FrameSender(w.writer, asyncio.get_running_loop())
        w.up.set()
        why = ""
        try:
            while True:
                try:
                    body = await ipc.read_frame(reader, self.max_frame)
                    if body is None:
                        break
                    self._resolve(w, body)
                except ipc.FrameError as exc:
                    why = f"broke the protocol ({exc})"
                    break
                except ConnectionError:
                    break
        finally:
            w.up.clear()
            w.writer.close()
            w.writer = w.out = None
            ended = await self._ended(w, why)
            lost = len(w.pending)
            self._fail_pending(w, DIED_TEXT)
        if not self._closing:
            self._warn(f"delivery worker {w.slot} {ended} with {lost} jobs in flight; restarting")

    def _resolve(self, w: _Worker, body: bytes) -> None:
        jobid = job_id(body)
        fut, recipients = w.pending.pop(jobid, (None, ()))
        _, status, payload = decode_result(body, recipients)
        if fut is None or fut.done():
            return  # the caller was cancelled meanwhile
        fut.set_result((status, payload))

    def _fail_pending(self, w: _Worker, text: str) -> None:
        pending, w.pending = w.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_result((_FAILED, text))

    def _warn(self, text: str) -> None:
        if self.log is not None:
            self.log.warning(text)

    # -- the courier
    def worker_for(self, destination: str) -> int:
        return zlib.crc32(ipc.enc(destination.lower())) % len(self.workers)

    async def deliver(self, group: Group, message: bytes | None = None) -> list[RecipientResult]:
        """Deliver `group` in the worker for its destination; one result per
        recipient, in order. `message`: the message when the caller has it
        already (an inline spawner reads it from the spool otherwise)."""
        recipients = group.recipients
        if not recipients:
            return []
        w = self.workers[self.worker_for(group.destination)]
        if self._closing:
            return all_results(recipients, "Z", STOPPING_TEXT)
        if not self.inline:
            message = None
        elif message is None:
            try:
                message = self.spool.read_message(group.msgid)
            except Exception:
                return all_results(recipients, "Z", UNREADABLE_TEXT)
        self._next_id += 1
        jobid = self._next_id
        try:
            frame = encode_job(jobid, group.msgid, group, message, self.max_frame)
        except ipc.FrameError:
            return all_results(recipients, "Z", TOO_BIG_TEXT)
        # A worker being restarted is waited for (the backoff is bounded); the
        # scheduler's concurrency limit bounds how many jobs wait here.
        while w.writer is None or not w.up.is_set():
            if self._closing:
                return all_results(recipients, "Z", STOPPING_TEXT)
            await w.up.wait()
        fut = asyncio.get_running_loop().create_future()
        w.pending[jobid] = (fut, recipients)
        try:
            w.out.send(frame)
            status, payload = await fut
        finally:
            w.pending.pop(jobid, None)
        if status == _FAILED:
            return all_results(recipients, "Z", payload)
        if status != OK:
            self._warn(f"delivery worker {w.slot}: {payload}")
            return all_results(recipients, "Z", f"Sorry, {_one_line(payload)} (#4.3.0)\n")
        if len(payload) != len(recipients):
            raise ipc.FrameError(f"worker answered {len(payload)} results for "
                                 f"{len(recipients)} recipients")
        if all(r.text == UNREADABLE_TEXT for r in payload):
            self._quarantine_check(group.msgid)
        return payload

    def _quarantine_check(self, msgid: int) -> None:
        """The worker's read-only spool could not read msgid: read it here, where a
        corrupt message is quarantined (spool contract) instead of retried forever."""
        if self.spool is None:
            return
        try:
            self.spool.read_message(msgid)
        except Exception:
            pass


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (6, 8) or args[5] not in ("inline", "spool"):
        sys.stderr.write("usage: python -m engine.delivery.spawner ROOT FD PARENT_PID CHANNEL "
                         "MAX_FRAME inline|spool [UID GID]\n")
        sys.exit(2)
    status = worker_main(args[0], int(args[1]), int(args[2]), args[3],
                         (int(args[6]), int(args[7])) if len(args) == 8 else None, int(args[4]),
                         args[5] == "inline")
    # Not sys.exit: the interpreter would wait for delivery threads still busy
    # (a |program that never ends) after the scheduler has gone; their
    # recipients are the scheduler's to retry (at least once).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
