"""The local channel: qmail-lspawn's role between the scheduler and local delivery.

`open_deliverer` is the channel's deliverer (engine.delivery.channels):
engine.delivery.local's LocalDelivery — users/assign, .qmail, vdelivermail,
Maildir — with its results in the channel contract's shape. It delivers as
whoever runs it.

`open_courier` is what the scheduler holds. Not root: the deliverer in the
scheduler's process (its file work runs in threads). Root (the normal case
on an MX): qmail-lspawn never delivers as root, and neither does this — each
group's recipients are split by the uid/gid of their users/assign line, and
each part goes to a Spawner whose worker runs as that user (started on first
use, at most `MAX_USERS` kept, the least recently used closed first). The
message travels inline: a worker running as the mailbox owner cannot read
the spool. A recipient with no assignment, or one that would run as root,
gets its error from the deliverer without any delivery.
"""
from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Sequence

from engine.delivery.channels import Forward, Group, RecipientResult, ReadingCourier, all_results

# Workers kept, one per mailbox owner; vpopmail boxes have one owner (vpopmail).
MAX_USERS = 32
# Largest message sent to a worker inline (a bounce carries its original).
INLINE_SLACK = 1 << 20


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

    def deliver_blocking(self, destination: str, sender: str, recipients: Sequence[str],
                         message: bytes) -> list[RecipientResult]:
        """deliver() in the caller's thread (engine.delivery.spawner runs whole
        jobs in threads: no event-loop round trip per recipient)."""
        return _channel_results(self.delivery.deliver_blocking(sender, list(recipients), message))

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

    async def close(self) -> None:
        await asyncio.to_thread(self.delivery.close)


def _channel_results(got) -> list[RecipientResult]:
    return [RecipientResult(r.address, r.status, r.text,
                            tuple(Forward(f.sender, tuple(f.recipients), f.prefix)
                                  for f in r.forwards))
            for r in got]


def open_deliverer(root, settings=None, log=None) -> LocalDeliverer:
    from engine.delivery.local import LocalDelivery
    return LocalDeliverer(LocalDelivery.for_root(root))


class UserSpawner:
    """The local courier when running as root (see the module docstring)."""

    def __init__(self, root, spool, deliverer: LocalDeliverer, *, log=None,
                 max_message: int, max_users: int = MAX_USERS) -> None:
        self.root = root
        self.spool = spool
        self.deliverer = deliverer
        self.in_process = ReadingCourier(spool, deliverer)
        self.log = log
        self.max_message = max_message
        self.max_users = max_users
        self.spawners: OrderedDict[tuple[int, int], object] = OrderedDict()
        self._closing: set[asyncio.Task] = set()

    async def _spawner(self, user: tuple[int, int]):
        from engine.delivery.spawner import Spawner
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

    async def deliver(self, group: Group) -> list[RecipientResult]:
        by_user: dict[tuple[int, int] | None, list[int]] = {}
        for i, rcpt in enumerate(group.recipients):
            by_user.setdefault(self.deliverer.user_of(rcpt), []).append(i)
        results: list[RecipientResult | None] = [None] * len(group.recipients)

        async def part(user, indexes: list[int]) -> None:
            sub = Group(group.channel, group.msgid, group.destination, group.sender,
                        tuple(group.recipients[i] for i in indexes))
            courier = self.in_process if user is None else await self._spawner(user)
            for i, got in zip(indexes, await courier.deliver(sub)):
                results[i] = got
        await asyncio.gather(*(part(u, ix) for u, ix in by_user.items()))
        if any(r is None for r in results):
            return all_results(group.recipients, "Z", "qmail-local crashed.\n")
        return results

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.spawners.values()), *self._closing,
                             return_exceptions=True)
        self.spawners.clear()
        await self.deliverer.close()


def open_courier(root, spool, settings, log=None):
    """The local channel's courier in the scheduler's process."""
    deliverer = open_deliverer(root, settings, log)
    if os.geteuid() != 0:
        return ReadingCourier(spool, deliverer)
    max_message = settings.smtp.max_message_bytes + INLINE_SLACK
    return UserSpawner(root, spool, deliverer, log=log, max_message=max_message)
