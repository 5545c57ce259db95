"""The local channel: qmail-lspawn's role between the scheduler and local delivery.

`open_deliverer` is the channel's deliverer (engine.delivery.channels):
engine.delivery.local's LocalDelivery — users/assign, .qmail, vdelivermail,
Maildir — with its results in the channel contract's shape. It delivers as
whoever runs it.

`open_courier` is what the scheduler holds. qmail-lspawn never delivers as
root, and neither does this: each group's recipients are split by the
uid/gid of their users/assign line (`UserSpawner`), and each part goes to
a courier that runs as that user. A recipient with no assignment, or one
that would run as root, gets its error from the deliverer without any
delivery.

- Scheduler running as root (`[run] user = ""`): a Spawner per mailbox
  owner, whose worker runs as that user (started on first use, at most
  `MAX_USERS` kept, the least recently used closed first). The message
  travels inline: a worker running as the mailbox owner cannot read the spool.
- Scheduler running as `[run] user` under a root `qrelay run` (the normal
  case, engine/privilege.py): the run user's own mailboxes are delivered by a
  worker process of that user (started by the local spawner, reading the
  spool itself); every other owner's go to the local spawner service
  (`lspawn_main`, root, a child of the supervisor) over ROOT/queue/lspawn.sock
  (`LspawnClient`). That service accepts connections from the run user only,
  reads nothing but delivery jobs (message inline) and runs each as above —
  qmail-lspawn's role, with the scheduler unprivileged as qmail-send is.
- Not root at all: the deliverer in the scheduler's process (its file work
  runs in threads), as whoever runs it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from engine.delivery.channels import Forward, Group, RecipientResult, ReadingCourier, all_results
from engine import ipc
from engine.delivery.spawner import SPAWN, MAX_FRAME, Spawner, WorkerServer, worker_argv

# In ROOT/queue: where the local spawner service listens (bound by the
# supervisor before anything starts, so it exists before the scheduler does).
LSPAWN_SOCKET = "lspawn.sock"
# The first frame of a connection to it: delivery jobs follow, or a request to
# start a worker process (engine.delivery.spawner.spawn_via).
JOBS = "jobs"

# Workers kept, one per mailbox owner; vpopmail boxes have one owner (vpopmail).
MAX_USERS = 32
# Room above the largest message for a bounce, which carries its original.
INLINE_SLACK = 1 << 20


def inline_limit(settings) -> int:
    """The largest message a job carries inline: any the spool writer takes
    ([spool] max_frame_bytes bounds every message it holds, whatever databytes
    or a reloaded [smtp] max_message_bytes allow), and a bounce of it."""
    return max(settings.smtp.max_message_bytes, settings.spool.max_frame_bytes) + INLINE_SLACK


class LocalDeliverer:
    """LocalDelivery behind the channel contract's deliver()/close()."""

    def __init__(self, delivery) -> None:
        self.delivery = delivery

    async def deliver(self, destination: str, sender: str, recipients: Sequence[str],
                      message: bytes) -> list[RecipientResult]:
        return _channel_results(await self.delivery.deliver(sender, list(recipients), message))

    @property
    def threads(self) -> int:
        """Whole jobs a spawner worker may run at once through deliver_blocking."""
        return self.delivery.max_threads

    @property
    def active(self) -> int:
        """Of those, how many run at once when none only waits (`[delivery]
        local_active`; 0: all of them)."""
        return self.delivery.active

    def deliver_blocking(self, destination: str, sender: str, recipients: Sequence[str],
                         message: bytes, waiting=None) -> list[RecipientResult]:
        """deliver() in the caller's thread (engine.delivery.spawner runs whole
        jobs in threads: no event-loop round trip per recipient). `waiting`:
        engine.delivery.local's Waiting."""
        return _channel_results(self.delivery.deliver_blocking(sender, list(recipients), message,
                                                               waiting))

    def user_of(self, recipient: str) -> tuple[int, int] | None:
        """The (uid, gid) `recipient`'s delivery runs as; None when nothing is to
        run (no assignment, or root: the deliverer answers the error)."""
        try:
            a = self.delivery.assignment_for(recipient)
        except Exception:
            return None
        if a is None or a.uid == 0:
            return None
        return a.uid, a.gid

    def refusals(self, recipients: Sequence[str]) -> list[RecipientResult]:
        """The results of recipients `user_of` gave None, with nothing run (the
        caller may be root: a user found now would run as root)."""
        return _channel_results([self.delivery.refusal(r) for r in recipients])

    async def close(self) -> None:
        await asyncio.to_thread(self.delivery.close)

    def abandon(self) -> None:
        """A stopping worker's: kill the `|program`s still running (their
        results can no longer be reported; the deliveries are tried again)."""
        from engine.delivery.local.program import abandon
        abandon()


class _Refusals:
    """The courier of the recipients nobody may deliver to: each gets its
    error, and nothing runs (this process may be root)."""

    def __init__(self, deliverer: LocalDeliverer) -> None:
        self.deliverer = deliverer

    async def deliver(self, group: Group, message: bytes | None = None) -> list[RecipientResult]:
        return self.deliverer.refusals(group.recipients)


def _channel_results(got) -> list[RecipientResult]:
    # The delivery ran as this process's user (a worker has dropped to the
    # assign line's uid): the user qmail-local would queue its forwards as.
    uid = os.geteuid()
    return [RecipientResult(r.address, r.status, r.text,
                            tuple(Forward(f.sender, tuple(f.recipients), f.prefix, uid,
                                          f.reports_qp) for f in r.forwards))
            for r in got]


def open_deliverer(root, settings=None, log=None) -> LocalDeliverer:
    from engine.delivery.local import LocalDelivery
    from engine.delivery.local.accounts import DeliveryAccounts
    from engine.delivery.local.courier import load_local_config
    if settings is None:
        return LocalDeliverer(LocalDelivery.for_root(root))
    config = load_local_config(root, program_timeout=settings.delivery.program_timeout)
    return LocalDeliverer(LocalDelivery(config, DeliveryAccounts.at(root),
                                        active=settings.delivery.local_active))


class UserSpawner:
    """The local courier that never delivers as root (see the module docstring)."""

    def __init__(self, root, spool, deliverer: LocalDeliverer, *, log=None,
                 max_message: int, max_users: int = MAX_USERS,
                 lspawn: "LspawnClient | None" = None) -> None:
        self.root = root
        self.spool = spool
        self.deliverer = deliverer
        self.refusals = _Refusals(deliverer)
        self.log = log
        self.max_message = max_message
        self.max_users = max_users
        self.lspawn = lspawn
        self._lspawn_started = False
        self.own = (os.getuid(), os.getgid())
        self.own_worker: Spawner | None = None
        self.spawners: OrderedDict[tuple[int, int], Spawner] = OrderedDict()
        self._closing: set[asyncio.Task] = set()

    async def _courier(self, user: tuple[int, int] | None):
        if user is None:
            return self.refusals        # its answer is the error; nothing runs
        if self.lspawn is not None:
            if user == self.own:
                return await self._own_worker()
            if not self._lspawn_started:
                self._lspawn_started = True
                await self.lspawn.start()
            return self.lspawn
        return await self._spawner(user)

    async def _own_worker(self) -> Spawner:
        """The run user's own mailboxes: a worker process of this user, started
        by the local spawner, reading the spool itself (only the envelope
        crosses), so Maildir work runs beside the scheduler, not on its loop."""
        if self.own_worker is None:
            self.own_worker = Spawner(self.root, 1, "local", log=self.log, spool=self.spool,
                                      inline=False, max_message=self.max_message,
                                      stop_grace=10.0, via=self.lspawn.path)
            await self.own_worker.start()
        return self.own_worker

    async def _spawner(self, user: tuple[int, int]) -> Spawner:
        spawner = self.spawners.get(user)
        if spawner is not None:
            self.spawners.move_to_end(user)
            return spawner
        spawner = Spawner(self.root, 1, "local", log=self.log, spool=self.spool, user=user,
                          max_message=self.max_message, stop_grace=10.0)
        await spawner.start()
        self.spawners[user] = spawner
        while len(self.spawners) > self.max_users:
            _, old = self.spawners.popitem(last=False)
            # Its deliveries in flight finish first (close lets them).
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return spawner

    async def deliver(self, group: Group, message: bytes | None = None) -> list[RecipientResult]:
        by_user: dict[tuple[int, int] | None, list[int]] = {}
        for i, rcpt in enumerate(group.recipients):
            by_user.setdefault(self.deliverer.user_of(rcpt), []).append(i)
        if len(by_user) == 1:
            # The usual case (a vpopmail box has one owner): the whole group,
            # without a task per part.
            courier = await self._courier(next(iter(by_user)))
            return await courier.deliver(group, message)
        results: list[RecipientResult | None] = [None] * len(group.recipients)

        async def part(user, indexes: list[int]) -> None:
            sub = Group(group.channel, group.msgid, group.destination, group.sender,
                        tuple(group.recipients[i] for i in indexes))
            courier = await self._courier(user)
            for i, got in zip(indexes, await courier.deliver(sub, message)):
                results[i] = got
        await asyncio.gather(*(part(u, ix) for u, ix in by_user.items()))
        if any(r is None for r in results):
            return all_results(group.recipients, "Z", "qmail-local crashed.\n")
        return results

    async def close(self) -> None:
        closers = [s.close() for s in self.spawners.values()]
        if self.own_worker is not None:
            closers.append(self.own_worker.close())
        if self._lspawn_started:
            closers.append(self.lspawn.close())
        await asyncio.gather(*closers, *self._closing, return_exceptions=True)
        self.spawners.clear()
        await self.deliverer.close()


class LspawnClient(Spawner):
    """The scheduler's end of the local spawner service: a Spawner whose one
    "worker" is a connection to ROOT/queue/lspawn.sock (reconnected with
    engine.backoff's schedule when the service restarts; jobs in flight then
    defer, as with a worker that died). Messages travel inline."""

    def __init__(self, path: Path, root, spool, *, log=None, max_message: int) -> None:
        super().__init__(root, 1, "local", log=log, spool=spool, inline=True,
                         max_message=max_message, stop_grace=10.0)
        self.path = path

    async def _connect(self, w) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, str(self.path))
            await loop.sock_sendall(sock, ipc.Body().text(JOBS).frame(MAX_FRAME))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _ended(self, w, why: str) -> str:
        return f"(local spawner {self.path}) {why or 'closed the connection'}"


def spawner_service(root) -> Path | None:
    """The root local spawner's socket when this scheduler runs unprivileged
    under a root `qrelay run` (engine/privilege.py): it delivers for other
    mailbox owners and starts the worker processes, which the run user may be
    unable to exec. Else None. (The supervisor binds the socket before any
    service starts and removes it when it stops, so it exists exactly then.)"""
    path = Path(root) / "queue" / LSPAWN_SOCKET
    return path if os.geteuid() != 0 and path.exists() else None


def open_courier(root, spool, settings, log=None):
    """The local channel's courier in the scheduler's process."""
    deliverer = open_deliverer(root, settings, log)
    max_message = inline_limit(settings)
    if os.geteuid() == 0:
        return UserSpawner(root, spool, deliverer, log=log, max_message=max_message)
    path = spawner_service(root)
    if path is not None:
        client = LspawnClient(path, root, spool, log=log, max_message=max_message)
        return UserSpawner(root, spool, deliverer, log=log, max_message=max_message,
                           lspawn=client)
    return ReadingCourier(spool, deliverer)


# --- the local spawner service (root; a child of the supervisor) -----------------

def bind_lspawn(root: Path, owner: tuple[int, int]) -> socket.socket:
    """The service's listening socket, bound by the supervisor (root) before
    anything starts; only `owner` (the run user) and root may connect."""
    path = Path(root) / "queue" / LSPAWN_SOCKET
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # queue/ is the run user's: the socket is made 0600 as it is bound,
        # and its owner set without following a link put in its place (root
        # would otherwise chown the link's target to the run user).
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chown(path, *owner, follow_symlinks=False)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def remove_lspawn_socket(root: Path) -> None:
    (Path(root) / "queue" / LSPAWN_SOCKET).unlink(missing_ok=True)


class _Dispatch:
    """What the service's WorkerServer calls: a job (message inline) to UserSpawner."""

    def __init__(self, users: UserSpawner) -> None:
        self.users = users

    async def deliver(self, destination: str, sender: str, recipients: Sequence[str],
                      message: bytes) -> list[RecipientResult]:
        return await self.users.deliver(Group("local", 0, destination, sender,
                                              tuple(recipients)), message)

    async def close(self) -> None:
        pass     # the UserSpawner outlives each connection


async def _start_worker(root: Path, fields: ipc.Fields, user: tuple[int, int],
                        writer: asyncio.StreamWriter, log) -> None:
    """A `spawn` request: exec a worker as root, which becomes `user` once it
    has loaded itself; its socket goes back over the connection, and its
    wait status when it has exited."""
    import sys

    from engine.delivery.channels import CHANNELS
    channel, max_frame, inline = fields.text(), fields.u64(), bool(fields.u8())
    fields.end()
    if channel not in {spec.name for spec in CHANNELS} or user[0] == 0:
        log.warning("local spawner: refused to start a %r worker for uid %d", channel, user[0])
        return
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = await asyncio.create_subprocess_exec(
            *worker_argv(sys.executable, str(root), theirs.fileno(), os.getpid(), channel,
                         max_frame, inline, user),
            stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    try:
        conn = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        try:
            conn.setblocking(True)
            socket.send_fds(conn, [proc.pid.to_bytes(4, "big")], [mine.fileno()])
        finally:
            conn.close()
    finally:
        mine.close()
    code = await proc.wait()
    writer.write(ipc.frame(code.to_bytes(4, "big", signed=True), 64))
    await writer.drain()


def lspawn_main(root: str, listener: socket.socket, clients: frozenset[int]) -> None:
    """Body of the local spawner service (root): serve delivery jobs from the
    uids in `clients` (the run user's) until TERM."""
    import uvloop

    from engine.config.settings import load_settings
    from engine.proctitle import set_title

    set_title("qrelay: lspawn")
    log = logging.getLogger("qrelay.lspawn")
    rootp = Path(root)
    try:
        settings = load_settings(rootp)
        deliverer = open_deliverer(rootp, settings)
    except Exception as exc:
        log.error("local spawner cannot start: %s", exc)
        raise SystemExit(111) from None
    max_message = inline_limit(settings)
    uvloop.run(_lspawn_serve(rootp, listener, clients, deliverer, max_message, log))


async def _lspawn_serve(root: Path, listener: socket.socket, clients: frozenset[int],
                        deliverer: LocalDeliverer, max_message: int, log) -> None:
    users = UserSpawner(root, None, deliverer, log=log, max_message=max_message)
    dispatch = _Dispatch(users)
    max_frame = MAX_FRAME + max_message
    connections: set[asyncio.Task] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        user = ipc.peer_credentials(writer.get_extra_info("socket"))[1:]   # (uid, gid)
        if user[0] not in clients:
            log.warning("local spawner: refused a connection from uid %d", user[0])
            writer.close()
            return
        task = asyncio.current_task()
        connections.add(task)
        try:
            first = await ipc.read_frame(reader, MAX_FRAME)
            fields = ipc.Fields(first or b"")
            kind = fields.text()
            if kind == JOBS:
                fields.end()
                await WorkerServer(None, dispatch, reader, writer, max_frame).serve()
            elif kind == SPAWN:
                await _start_worker(root, fields, user, writer, log)
        except ConnectionError as exc:
            # The scheduler or a worker went away (killed, restarted): no request was bad.
            log.info("local spawner: connection from uid %d lost: %s", user[0], exc)
        except ipc.FrameError as exc:
            log.warning("local spawner: a bad request from uid %d: %s", user[0], exc)
        except asyncio.CancelledError:
            pass    # stopping: asyncio's server callback must not see it raised
        finally:
            connections.discard(task)
            writer.close()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_unix_server(handle, sock=listener, limit=max_frame)
    try:
        await stop.wait()
    finally:
        server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await users.close()
