"""Delivery plans: a vpopmail mailbox's next message without the look-ups.

Every message to a vpopmail user takes the same way: the users/assign line
of the domain, its `.qmail-default` (one vdelivermail line), the vpasswd
user, no `.qmail` of the user's own: into USERDIR/Maildir. Found from
scratch that is 14 system calls and about 0.1 ms of Python, a third of a
delivery worker's time per message (bench/bench_mx.py). A `Plan` is that
way as a delivery that took it found it (the courier and Vdelivermail say
so: `Learned`), kept with what it was found from; a later delivery to the
same recipient checks only that nothing of it changed:

- users/assign's table and the domain's vpasswd table are the objects
  `Accounts` answers with now (it re-reads a file that changed, at most
  `recheck_seconds` late, as for every delivery);
- the home (domain) directory, the `.qmail` file that was read and the
  user's directory stat as they did (device, inode, mode, owner, size, mtime,
  ctime): a `.qmail` file created beside the one read, or removed, renamed
  over, edited in place or chmod'ed; a user directory removed, replaced or
  given a `.qmail`; a home made writable: each changes one of the three.

A stat is trusted only when its ctime (which nothing can set back) is two
seconds older than the start of the delivery that looked the plan up: a
change made while it ran (an fsync can take seconds), or a second one within
one timestamp tick, would otherwise look like no change.

What depends on the message is done for each one: qmail-local's and
vdelivermail's loop checks, the quota (over or near it: the whole
delivery runs, for its bounce or warning), the Return-Path. Anything else
unusual (an empty message, a write that fails) also goes the whole way, so
every text and exit a delivery can give still comes from the code that
gives it; a plan only ever says "delivered".
"""
from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine._fileio import stat_keys
from engine.delivery.local import quota as maildirquota
from engine.delivery.local.accounts import AccountsError
from engine.delivery.local.dotqmail import has_delivered_to, rpline
from engine.delivery.local.maildir import MaildirError, MaildirWriter
from engine.delivery.local.quota import Quota
from engine.delivery.local.vdelivermail import Learned, header_lower

# Plans kept per process at most (about 1.3 KB each); the oldest made goes first.
PLANS_MAX = 10_000
_RACY_NS = 2_000_000_000

# engine._fileio.stat_keys: (dev, ino, mode, uid, size, mtime_ns, ctime_ns)
# of each path, packed (56 bytes a path), read from the kernel's caches
# without handing the GIL over.
_KEY = struct.Struct("7q")
_CTIME = 6
_FAILED = (0,) * 7


@dataclass(slots=True, frozen=True)
class Plan:
    tables: tuple[object, object]       # DeliveryAccounts.snapshot(domain_dir)
    domain_dir: str
    paths: tuple[bytes, ...]
    keys: bytes
    dt: bytes                           # qmail-local's Delivered-To line
    loops: tuple[bytes, ...]            # vdelivermail's, lower-case
    maildir: str
    email: str
    quota: Quota | None                 # vpasswd's; None and quota_file: maildirsize's
    quota_file: bool


class Plans:
    """Plans by recipient address (thread-safe). `now_ns`: the wall clock
    (tests move it on, to trust files they have just made)."""

    def __init__(self, size: int = PLANS_MAX, now_ns=time.time_ns) -> None:
        self.size = max(1, size)
        self.now_ns = now_ns
        self._plans: dict[str, Plan] = {}
        self._lock = threading.Lock()
        self.used = 0           # deliveries a plan did (tests, bench)

    def __len__(self) -> int:
        return len(self._plans)

    def learn(self, recipient: str, started_ns: int, assign: object, home: str, dotqmail: str,
              passed: Sequence[str], dt: bytes, learned: Learned) -> bool:
        """Keep the plan of a delivery that went as `learned` says, begun at
        `started_ns` (now_ns()) with users/assign's table `assign`, which
        read `dotqmail` in `home` after finding none of the `.qmail` names
        `passed`; False when a file changed too recently to be trusted, or
        one of those names (or the user's `.qmail`) is there after all: a
        link to nothing, which a change elsewhere could bring to life."""
        paths = tuple(os.fsencode(p) for p in (home, os.path.join(home, dotqmail),
                                                 learned.user_dir))
        keys = stat_keys(paths)
        if any(k == _FAILED or k[_CTIME] > started_ns - _RACY_NS for k in _KEY.iter_unpack(keys)):
            return False
        for path in [os.path.join(home, n) for n in passed] + [
                os.path.join(learned.user_dir, ".qmail")]:
            try:
                os.lstat(path)
                return False
            except FileNotFoundError:
                pass
            except OSError:
                return False
        self._keep(recipient, Plan(
            (assign, learned.vpasswd), learned.domain_dir, paths, keys, dt, learned.loops,
            learned.maildir, learned.email, maildirquota.parse_quota(learned.quota),
            learned.quota is None))
        return True

    def _keep(self, recipient: str, plan: Plan) -> None:
        with self._lock:
            self._plans.pop(recipient, None)
            while len(self._plans) >= self.size:
                del self._plans[next(iter(self._plans))]
            self._plans[recipient] = plan

    def _drop(self, recipient: str, plan: Plan) -> None:
        with self._lock:
            if self._plans.get(recipient) is plan:
                del self._plans[recipient]

    def deliver(self, accounts, recipient: str, sender: str, message: bytes,
                writer: MaildirWriter, clock) -> bool:
        """Deliver `message` (LF) by the recipient's plan: True when done;
        False when the whole delivery must run (no plan, a changed file, a
        message the plan does not cover, a failed write: nothing delivered)."""
        plan = self._plans.get(recipient)
        if plan is None or not message:
            return False
        try:
            tables = accounts.snapshot(plan.domain_dir)
        except AccountsError:
            return False
        if (tables[0] is not plan.tables[0] or tables[1] is not plan.tables[1]
                or stat_keys(plan.paths) != plan.keys):
            self._drop(recipient, plan)
            return False
        head = header_lower(message)
        if b"delivered-to:" in head and (has_delivered_to(message, plan.dt) or any(
                has_delivered_to(head, line) for line in plan.loops)):
            return False
        try:
            q = maildirquota.maildirsize_quota(plan.maildir) if plan.quota_file else plan.quota
            if q is not None:
                over, usage = maildirquota.check(plan.maildir, q, len(message), clock)
                if over or usage.percent(q) >= maildirquota.WARN_PERCENT:
                    return False
        except OSError:
            return False
        header = (rpline(sender) + "Delivered-To: " + plan.email + "\n").encode(
            "utf-8", "surrogateescape")
        try:
            writer.deliver(plan.maildir, [header, message], size_suffix=True)
        except MaildirError:
            return False        # nothing was delivered: the whole way tells why
        if q is not None:
            try:
                maildirquota.add(plan.maildir, len(header) + len(message))
            except OSError:
                pass            # the next rebuild counts it
        with self._lock:
            self.used += 1
        return True
