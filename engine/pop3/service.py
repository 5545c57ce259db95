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
import secrets
import ssl
import threading
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
        self._dummy: str | None = None
        self._dummy_lock = threading.Lock()

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

    def dummy_hash(self) -> str:
        """The stored hash last checked (hash_seen), so of the scheme and cost
        the box's accounts use: on a box of vpopmail 5.4's `$1$` hashes (0.1 ms)
        a `$6$` one (1.4 ms) told unknown users apart. Until one is seen, a
        `$6$` hash of a random password (made once, in the calling thread)."""
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = passwords.hash_password(secrets.token_hex(8))
            return self._dummy

    def hash_seen(self, crypted: str) -> None:
        self._dummy = crypted


def _settle(done: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if done.cancelled():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)
