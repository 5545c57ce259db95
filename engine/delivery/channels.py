"""Delivery channels: the courier contract and the table of channels.

qmail-send knows its channels by index (`CHANNELS`, `chanskip[]`) and runs
every one through the same spawn protocol; chasquid's queue holds its local
and remote couriers behind one interface. Here the scheduler loops over
`CHANNELS` and never names one: a channel is a courier and a concurrency
control file (its retry skip is qmail's chanskip[], engine.delivery.retry).
Adding a channel means writing a courier and one line in `CHANNELS`.

A courier delivers one `Group` — recipients of one message that share a
channel and a destination — and answers one `RecipientResult` per recipient,
in order: `K` delivered, `Z` temporary (deferred), `D` permanent (bounced),
with qmail's report text. The bytes are a `Deliverer`'s business; a courier
finds them by `group.msgid` (ReadingCourier in-process, or a worker of
engine.delivery.spawner, which reads them itself so only the envelope
crosses the process boundary). A courier must never raise for a delivery
problem; the scheduler turns an exception into a deferral all the same.
"""
from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

UNREADABLE_TEXT = "qmail-spawn unable to open message. (#4.3.0)\n"


@dataclass(slots=True, frozen=True)
class Forward:
    """A message a local delivery sends on (.qmail `&addr` lines, vdelivermail's
    address argument): `prefix` (CRLF lines, its Delivered-To) + the original.
    `uid`: the user the delivery ran as, qmail-queue's caller (its
    `invoked by uid` line and the copy's `info msg … uid`). `reports_qp`:
    qmail-local's own forward, whose copy's qp ends its report (vdelivermail's
    go through qmail-inject, which qmail-local's report never names)."""
    sender: str
    recipients: tuple[str, ...]
    prefix: bytes
    uid: int
    reports_qp: bool


@dataclass(slots=True, frozen=True)
class RecipientResult:
    address: str
    status: str     # "K" delivered | "Z" temporary (defer) | "D" permanent (fail)
    text: str       # qmail's report style, lines joined with "\n", ending in "\n"
    # Queued by the scheduler, whatever the status, before the result is
    # recorded (a forward that cannot be queued makes the result a deferral).
    forwards: tuple[Forward, ...] = ()


@dataclass(slots=True, frozen=True)
class Group:
    """One deliver() call: recipients of one message, one channel, one destination."""
    channel: str
    msgid: int
    destination: str            # the recipients' domain
    sender: str                 # the envelope sender as stored ("" for bounces, "#@[]" for
                                # double bounces: RemoteDelivery sends that as "")
    recipients: tuple[str, ...]


class Courier(Protocol):
    async def deliver(self, group: Group) -> list[RecipientResult]: ...

    async def close(self) -> None: ...


def all_results(recipients: Sequence[str], status: str, text: str) -> list[RecipientResult]:
    return [RecipientResult(r, status, text) for r in recipients]


class Deliverer(Protocol):
    """What a channel does with a message's bytes (RemoteDelivery, LocalDelivery);
    the courier that reads them is ReadingCourier in the scheduler's process,
    or a worker of engine.delivery.spawner."""

    async def deliver(self, destination: str, sender: str, recipients: Sequence[str],
                      message: bytes) -> list[RecipientResult]: ...

    async def close(self) -> None: ...


class SharedReads:
    """Messages read from the spool, each held once while deliveries use it:
    the deliveries of one message (one per domain, or per mailbox owner) run
    at once, and would otherwise hold a copy each. `get` is called from one
    thread (an event loop), so the read itself is outside the lock; `done`
    from any thread."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._held: dict[int, list] = {}    # msgid -> [message, deliveries using it]
        self._lock = threading.Lock()

    def get(self, msgid: int) -> bytes:
        """The message, read unless a delivery holds it already; raises what
        the read raises. Every get is answered by one done."""
        with self._lock:
            held = self._held.get(msgid)
            if held is not None:
                held[1] += 1
                return held[0]
        message = self._read(msgid)
        with self._lock:
            self._held[msgid] = [message, 1]
        return message

    def done(self, msgid: int, message: bytes) -> None:
        """A delivery is done with `message` (one not from get: nothing)."""
        with self._lock:
            held = self._held.get(msgid)
            if held is not None and held[0] is message:
                held[1] -= 1
                if not held[1]:
                    del self._held[msgid]


class ReadingCourier:
    """A courier around a deliverer: reads the message from the spool, and
    answers qmail-spawn's deferral when it cannot be read."""

    def __init__(self, spool, deliverer: Deliverer) -> None:
        self.spool = spool
        self.deliverer = deliverer
        self._reads = SharedReads(lambda msgid: self.spool.read_message(msgid))

    async def deliver(self, group: Group, message: bytes | None = None) -> list[RecipientResult]:
        """`message`: given when the caller has it already (else read here)."""
        from engine.queue import SpoolError
        if message is None:
            try:
                message = self._reads.get(group.msgid)
            except SpoolError:
                return all_results(group.recipients, "Z", UNREADABLE_TEXT)
        try:
            return await self.deliverer.deliver(group.destination, group.sender,
                                                group.recipients, message)
        finally:
            self._reads.done(group.msgid, message)

    def forget_timeouts(self) -> None:
        """The deliverer's (remote delivery's connect-timeout table), if it keeps one."""
        forget = getattr(self.deliverer, "forget_timeouts", None)
        if forget is not None:
            forget()

    async def close(self) -> None:
        await self.deliverer.close()


@dataclass(slots=True, frozen=True)
class ChannelSpec:
    """One line of the channel table."""
    name: str
    concurrency_file: str       # control/<file>: deliveries at once (qmail's meaning)
    default_concurrency: int
    # "module:function" -> function(root, settings, log) -> Deliverer, called
    # in the process that delivers (the scheduler, or a worker).
    opener: str
    # The [delivery] setting that runs it in that many worker processes
    # (engine.delivery.spawner); "" or 0: in the scheduler's process.
    procs_setting: str = ""
    # "module:function" -> function(root, spool, settings, log) -> Courier: a
    # channel that decides for itself how the scheduler reaches its deliverer
    # (local: a worker per mailbox owner when running as root).
    courier: str = ""
    # "module:function" -> function(text) -> bool: whether a deferral's text
    # says the destination was not reached, so that a success there makes it
    # due at once (the scheduler's recovery); "": every deferral does.
    unreached: str = ""

    def open(self, root, settings, log=None) -> Deliverer:
        return _load(self.opener)(root, settings, log)

    def open_courier(self, root, spool, settings, log=None) -> Courier:
        return _load(self.courier)(root, spool, settings, log)

    def recovers(self, text: str) -> bool:
        return not self.unreached or _load(self.unreached)(text)


def _load(where: str):
    module, _, name = where.partition(":")
    function = getattr(importlib.import_module(module), name, None)
    if function is None:
        raise ImportError(f"{module} has no {name}")
    return function


# qmail-send's order (status lines say "local a/b remote c/d").
CHANNELS: tuple[ChannelSpec, ...] = (
    ChannelSpec("local", "concurrencylocal", 10, "engine.delivery.lspawn:open_deliverer",
                courier="engine.delivery.lspawn:open_courier"),
    ChannelSpec("remote", "concurrencyremote", 20, "engine.delivery.remote:open_deliverer",
                procs_setting="worker_procs",
                unreached="engine.delivery.remote:destination_unreached"),
)


def channel(name: str) -> ChannelSpec:
    for spec in CHANNELS:
        if spec.name == name:
            return spec
    raise KeyError(f"no delivery channel {name!r}")
