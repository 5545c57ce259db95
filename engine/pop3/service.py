"""What the POP3 sessions of one receiver process share.

`Pop3Service.of(receiver)` is created on first use and kept on the receiver:
the accounts view (engine.accounts.store.Accounts: cached, re-read when the
files change) and a dummy hash, so a login for a user that does not exist
costs the same time as a wrong password. Everything else is the receiver's
and reached through it, never copied: the hashing threads SMTP AUTH uses too
(`Receiver.passwords().pool`, `[auth] hash_threads`: a `$6$` check costs
milliseconds and never runs on the event loop), the TLS context
(`Receiver.tls`, engine.tls), the relay table and the login throttle, the
config snapshot, the sessions set and the smtpd log.
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from engine.accounts import passwords
from engine.accounts.store import Accounts

T = TypeVar("T")


class Pop3Service:
    def __init__(self, receiver: Any) -> None:
        self.receiver = receiver
        self.accounts = Accounts(receiver.config.root,
                                 default_domain=receiver.config.settings.accounts.default_domain)
        # An unknown user's check costs what a real one does (passwords.DummyHash).
        self.dummy = passwords.DummyHash()

    @classmethod
    def of(cls, receiver: Any) -> "Pop3Service":
        if receiver.pop3 is None:
            receiver.pop3 = cls(receiver)
        return receiver.pop3

    @property
    def executor(self) -> Executor:
        return self.receiver.passwords().pool

    async def run(self, fn: Callable[[], T]) -> T:
        """fn() in the hashing threads; its result or its exception. The
        thread hands the result straight to the loop: loop.run_in_executor
        chains an asyncio future to a concurrent one and cost the event loop
        twice as much per call (46 against 23 us of CPU, 1 thread, uvloop)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def work() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting session
                loop.call_soon_threadsafe(_settle, done, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        self.executor.submit(work)
        return await done

    def tls_context(self) -> ssl.SSLContext | None:
        """control/servercert.pem's context of the moment, None without one."""
        return self.receiver.tls.context()


def _settle(done: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if done.cancelled():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)
