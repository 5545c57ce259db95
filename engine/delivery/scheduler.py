"""qmail-send's role: preprocess, schedule, record results, bounce, log.

Owns the decisions of *when* and *how much* to deliver; it never speaks SMTP
nor writes a mailbox (couriers do) and never lays out spool records (the spool does). The
spool is the truth: every in-memory structure here is a bounded view that can
be thrown away (a restart loses nothing but the "recovered destination" hint).

One pass of the loop (woken by a delivery finishing, by SIGALRM, or by the
poll timer that notices newly queued mail):

1. preprocess up to `todo_batch` new messages: classify each recipient
   local or remote (locals / virtualdomains / percenthack, spec §2, §5.3),
   log `new msg` / `info msg`;
2. hand the scheduler's spool writes — that batch, the delivery results
   gathered since the last commit (at most `mark_delay` seconds or
   `mark_batch` results later; logged now), a flush — to its commit thread,
   which records them all in ONE spool transaction (one sync) while the loop
   goes on; when it is done, complete the messages it finished: bounce (or
   double bounce, or discard a triple bounce), `bounce msg`, `end msg`;
3. for each channel (engine.delivery.channels.CHANNELS: local, remote) start
   deliveries from its ready view (`ReadyJobs`: due recipients grouped by
   destination and message, at most `scan_batch` of them) while fewer than
   the channel's concurrency (control/concurrencylocal, concurrencyremote)
   calls run in all and fewer than `per_destination_concurrency` for that
   domain; one `courier.deliver(group)` call per (message, domain), up to
   `max_recipients_per_delivery` recipients. The view is refilled from the
   spool's due table only when slots stay free, so the table is read in
   batches, not once per delivery. Recipients of a destination already at
   its limit are remembered by key only (bounded by `skip_max`) so the next
   read passes over them and finds other destinations' mail: a slow
   destination neither starves the others nor grows memory.

Nothing here names a channel: each one is a `Lane` (its courier, counters,
ready view and scan position), and a channel without a courier keeps its
recipients queued. A courier's result may carry forwards (.qmail `&addr`
lines): each is queued as a new message, indexed, before the recipient's
result is recorded.

Beyond qmail: when a delivery to a domain succeeds, the deferred recipients
this process saw defer on that domain because it could not be reached (the
channel's `unreached` rule: for remote, no address, no connection, no
greeting, a lost connection) are made due at once (a recovered MX gets its
backlog now, not at each message's next retry slot); what the destination
deferred itself (greylisting, a full mailbox, a rate limit) waits for its
slot, or every success there would retry it. The memory for
that is bounded by `recovered_index_max` message ids; past it, messages just
wait for their normal retry time. A destination is pulled forward at most once
per `recovery_interval` seconds, so a server that defers some recipients
(greylisting) while accepting others is not retried in a hot loop.

The numbers in `status:` lines count running deliver() calls per channel
(the unit its concurrency limits), while `starting delivery N` / `delivery
N` lines are per recipient as in qmail.

Crash safety comes from the spool: a recipient stays due until its result is
recorded, so a crash between an SMTP `250` and the recording means one
duplicate delivery (qmail's at-least-once), never a lost message. A recipient
whose result waits for (or is in) a commit stays in `inflight` until that
commit is done, so it is not handed out again meanwhile.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine import metrics
from engine.config.control import read_number
from engine.delivery.bounce import (BounceConfig, Failure, build_bounce, bounce_kind,
                                   is_verp, verp_sender)
from engine.delivery.channels import (CHANNELS, Courier, Group, RecipientResult, all_results,
                                      channel)
from engine.delivery.retry import RetryPolicy
from engine.received import queue_received_line
from engine.log import QmailSendLog
from engine.queue import (Deferred, Delivered, Envelope, Failed, Finished, Job,
                          MessageNotFound, MessageUnreadable, Spool, SpoolError)

# qmail-lspawn's and qmail-rspawn's text for a courier that died: "qmail-<channel> crashed."
CRASHED_TEXT = "qmail-{channel} crashed.\n"
# qmail-queue's ADDR: an envelope address of this many bytes or more is
# refused (exit 11), and qmail-local's forward of it fails for good.
QQ_ADDRESS_MAX = 1003
QQ_TOO_LONG_TEXT = "Unable to forward message: envelope address too long for qq (#5.1.3).\n"
# Seconds between scans of the spool for finished messages whose bounce is not queued.
BOUNCE_SCAN_INTERVAL = 5.0
# Seconds before a bounce that could not be made or queued is tried again.
BOUNCE_RETRY_SECONDS = 123
# The due table is read from the scan watermark on (see Scheduler.dispatch);
# at least this often it is read from the start again, as a safety net for a
# due entry that landed behind the watermark some way not foreseen below.
RESCAN_SECONDS = 30.0
# ...and after reaching the end of what is due, from the start again at most
# this often while keys were forgotten (the skip memory was full).
RESCAN_MIN_SECONDS = 1.0
# Results a commit could not record (a full disk) are committed again after
# this, doubling to UNRECORDED_RETRY_MAX; their recipients stay in flight
# meanwhile, so they are not delivered again at every pass.
UNRECORDED_RETRY = 0.5
UNRECORDED_RETRY_MAX = 10.0


Classify = Callable[[str], tuple[str, str]]


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    """qmail-send's controls plus qrelay's scheduler settings, read once at start."""

    # channel -> deliveries at once (control/concurrencylocal, concurrencyremote)
    concurrency: Mapping[str, int] = field(
        default_factory=lambda: {c.name: c.default_concurrency for c in CHANNELS})
    per_destination: int = 20
    max_rcpts_per_delivery: int = 100
    scan_batch: int = 2000
    todo_batch: int = 1000
    poll_interval: float = 0.05
    recovered_index_max: int = 100_000
    recovery_interval: float = 60.0
    mark_delay: float = 0.01
    mark_batch: int = 500
    skip_max: int = 200_000
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    bounce: BounceConfig = field(default_factory=BounceConfig)


def load_scheduler_config(root: Path | str, settings, bounce: BounceConfig) -> SchedulerConfig:
    """Each channel's control/concurrency*, queuelifetime + [scheduler] settings.
    A control file that is not a whole number is a ControlError (naming it),
    never read as its leading digits: a reload keeps the previous snapshot."""
    control = Path(root) / "control"
    s = settings.scheduler
    return SchedulerConfig(
        concurrency={c.name: max(0, read_number(control / c.concurrency_file, c.default_concurrency))
                     for c in CHANNELS},
        per_destination=max(1, s.per_destination_concurrency),
        max_rcpts_per_delivery=max(1, s.max_recipients_per_delivery),
        scan_batch=max(1, s.scan_batch),
        todo_batch=max(1, s.todo_batch),
        poll_interval=max(0.001, s.poll_interval),
        recovered_index_max=s.recovered_index_max,
        recovery_interval=float(s.recovery_interval),
        mark_delay=float(s.mark_delay),
        mark_batch=max(1, s.mark_batch),
        skip_max=s.skip_max,
        retry=RetryPolicy(queuelifetime=read_number(control / "queuelifetime", 604800),
                          local_skip=s.retry_skip_local, remote_skip=s.retry_skip_remote),
        bounce=bounce,
    )


def recipient_domain(address: str) -> str:
    """The destination key: the domain after the last `@`, ASCII lower-cased."""
    return address.rpartition("@")[2].lower()


def shown_recipient(address: str, classify: Classify) -> str:
    """The address a bounce names for a failed recipient: without the
    virtualdomains prepend preprocessing gave it (`prepend-joe@virt.test` is
    shown as `joe@virt.test`, as qmail-send's stripvdomprepend does). The
    address shown is the one `classify` makes into `address` now."""
    local, at, domain = address.rpartition("@")
    dash = local.find("-") if at else -1
    while dash >= 0:
        candidate = f"{local[dash + 1:]}@{domain}"
        if classify(candidate) == ("local", address):
            return candidate
        dash = local.find("-", dash + 1)
    return address


class DeferredByDomain:
    """Bounded memory of which messages deferred on which domain (for recovery)."""

    def __init__(self, max_ids: int) -> None:
        self.max_ids = max_ids
        self._by_domain: dict[str, OrderedDict[int, None]] = {}
        self._count = 0

    def add(self, domain: str, msgid: int) -> None:
        ids = self._by_domain.get(domain)
        if ids is None:
            ids = self._by_domain[domain] = OrderedDict()
        if msgid in ids:
            return
        if self._count >= self.max_ids:
            return  # full: this message waits for its normal retry time
        ids[msgid] = None
        self._count += 1

    def take(self, domain: str, limit: int = 5000) -> list[int]:
        """Up to `limit` ids for domain, oldest first (the rest stay for next time)."""
        ids = self._by_domain.get(domain)
        if not ids:
            self._by_domain.pop(domain, None)
            return []
        out = []
        while ids and len(out) < limit:
            out.append(ids.popitem(last=False)[0])
        if not ids:
            del self._by_domain[domain]
        self._count -= len(out)
        return out

    def __len__(self) -> int:
        return self._count


class _Claimed:
    """(msgid, index) pairs due() must skip: in flight, in the ready view, or
    remembered as waiting behind a busy destination."""

    __slots__ = ("sets",)

    def __init__(self, *sets: set) -> None:
        self.sets = sets

    def __contains__(self, key: object) -> bool:
        return any(key in s for s in self.sets)


class ReadyJobs:
    """A bounded view of due remote recipients, per destination, in due order.

    At most `capacity` jobs in all and `per_domain_cap` per destination are
    held. Further due recipients of a destination that is already full are
    only remembered by key (`skipped`, at most `skip_max` keys) so that the
    next read of the due table passes over them cheaply (no record decoded)
    and reaches other destinations' mail; they are handed back, oldest first,
    as their destination's queue drains. Nothing here is the truth: jobs stay
    due in the spool, so forgetting any of them loses nothing.
    """

    def __init__(self, capacity: int, per_domain_cap: int | None = None,
                 skip_max: int = 200_000) -> None:
        self._fixed_cap = per_domain_cap
        self.capacity = max(1, capacity)
        self.per_domain_cap = max(1, per_domain_cap or max(16, self.capacity // 4))
        self.skip_max = skip_max
        self.keys: set[tuple[int, int]] = set()
        self.skipped: set[tuple[int, int]] = set()
        # True once a due key was neither held nor remembered (skip memory
        # full): only a read of the due table from the start finds it again.
        # `forgotten`: the destinations of such keys.
        self.forgot = False
        self.forgotten: set[str] = set()
        self._by_domain: dict[str, deque[tuple[int, list[Job]]]] = {}
        self._count: dict[str, int] = {}
        self._skipped_by_domain: dict[str, deque[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def resize(self, capacity: int, skip_max: int) -> None:
        """New bounds (a reload); what is held already stays, and drains."""
        self.capacity = max(1, capacity)
        self.per_domain_cap = max(1, self._fixed_cap or max(16, self.capacity // 4))
        self.skip_max = skip_max

    def domains(self):
        return self._by_domain.keys()

    def claimed(self, inflight: set) -> _Claimed:
        return _Claimed(inflight, self.keys, self.skipped)

    def _skip(self, domain: str, key: tuple[int, int]) -> None:
        if len(self.skipped) < self.skip_max:
            self.skipped.add(key)
            self._skipped_by_domain.setdefault(domain, deque()).append(key)
        else:
            self.forgot = True
            self.forgotten.add(domain)

    def could_take_forgotten(self, blocked: Callable[[str], bool]) -> bool:
        """Whether a read from the start would find room for a key it forgot:
        the skip memory has some, or a destination whose keys were forgotten
        can take more. Else that read would only forget them again."""
        return len(self.skipped) < self.skip_max or any(
            not blocked(d) and self._count.get(d, 0) < self.per_domain_cap
            for d in self.forgotten)

    def add(self, jobs: Sequence[Job]) -> None:
        groups: dict[tuple[str, int], list[Job]] = {}
        for job in jobs:
            key = (job.msgid, job.index)
            if key in self.keys or key in self.skipped:
                continue
            domain = recipient_domain(job.address)
            if self._count.get(domain, 0) >= self.per_domain_cap:
                self._skip(domain, key)
                continue
            self.keys.add(key)
            self._count[domain] = self._count.get(domain, 0) + 1
            groups.setdefault((domain, job.msgid), []).append(job)
        for (domain, msgid), group in groups.items():
            self._by_domain.setdefault(domain, deque()).append((msgid, group))

    def pop(self, domain: str, max_rcpts: int) -> tuple[int, list[Job]] | None:
        """The next (msgid, up to max_rcpts jobs) for domain, or None."""
        queue = self._by_domain.get(domain)
        if not queue:
            self._by_domain.pop(domain, None)
            return None
        msgid, jobs = queue[0]
        if len(jobs) > max_rcpts:
            taken, queue[0] = jobs[:max_rcpts], (msgid, jobs[max_rcpts:])
        else:
            taken = jobs
            queue.popleft()
            if not queue:
                del self._by_domain[domain]
        for job in taken:
            self.keys.discard((job.msgid, job.index))
        left = self._count.get(domain, 0) - len(taken)
        if left > 0:
            self._count[domain] = left
        else:
            self._count.pop(domain, None)
        return msgid, taken

    def release_skipped(self, blocked: Callable[[str], bool]) -> list[tuple[int, int]]:
        """Forget and return remembered keys of destinations that can take more
        work, oldest first (the caller looks their jobs up: Spool.jobs)."""
        half = max(1, self.per_domain_cap // 2)
        released: list[tuple[int, int]] = []
        for domain in list(self._skipped_by_domain):
            if blocked(domain) or self._count.get(domain, 0) >= half:
                continue
            keys = self._skipped_by_domain[domain]
            for _ in range(min(half, len(keys))):
                key = keys.popleft()
                self.skipped.discard(key)
                released.append(key)
            if not keys:
                del self._skipped_by_domain[domain]
        return released

    def drop_blocked(self, blocked: Callable[[str], bool]) -> None:
        """Turn the held jobs of busy destinations into remembered keys (frees room)."""
        for domain in [d for d in self._by_domain if blocked(d)]:
            for _, jobs in self._by_domain.pop(domain):
                for job in jobs:
                    key = (job.msgid, job.index)
                    self.keys.discard(key)
                    self._skip(domain, key)
            self._count.pop(domain, None)

    def forget_skipped(self) -> None:
        """Forget every remembered key (after a flush: their due times changed)."""
        self.skipped.clear()
        self._skipped_by_domain.clear()


class Lane:
    """One channel's share of the scheduler: its courier, its deliveries in
    flight (in all and per destination), its bounded ready view and its scan
    position in the spool's due table."""

    def __init__(self, name: str, courier: Courier | None, *, scan_batch: int,
                 skip_max: int) -> None:
        self.name = name
        # None: the channel holds its recipients queued (nothing delivers them).
        self.courier = courier
        self.active = 0
        self.per_domain: dict[str, int] = {}
        self.ready = ReadyJobs(scan_batch, skip_max=skip_max)
        # Scan watermark: (next_try, msgid, index) of the last due job read.
        # Everything before it is in flight, held in `ready` or remembered
        # there, so the next read resumes after it instead of passing over
        # all of those again (which made each read O(remembered)). None =
        # read from the start; see Scheduler.dispatch for when that happens.
        self.scan_after: tuple[float, int, int] | None = None
        self.rescan_at = 0.0        # monotonic: next forced read from the start
        self.rescan_min_at = 0.0    # monotonic: earliest read from the start after forgetting

    def started(self, domain: str) -> None:
        self.active += 1
        self.per_domain[domain] = self.per_domain.get(domain, 0) + 1

    def finished(self, domain: str) -> None:
        self.active -= 1
        left = self.per_domain.get(domain, 1) - 1
        if left > 0:
            self.per_domain[domain] = left
        else:
            self.per_domain.pop(domain, None)


@dataclass(slots=True)
class _Commit:
    """One group commit of the scheduler's own spool writes (Spool.commit),
    handed to its commit thread: delivery results (`results`: (lane,
    domain, status, Result), their log lines already written), recovered
    destinations' deferrals made due (`reschedules`: (lane, Deferred)), a
    flush, a preprocess batch, and the messages whose bounce is queued (or
    not needed) to release (`releases`). Filled in by the thread: `applied`,
    `preprocessed` (Finished | None per item), or `error`."""
    results: list[tuple[Lane, str, str, object]]
    reschedules: list[tuple[Lane, Deferred]]
    flush: bool
    preprocess: list[tuple]
    now: float
    releases: list[int] = field(default_factory=list)
    applied: list[Finished | None] = field(default_factory=list)
    preprocessed: list[Finished | None] = field(default_factory=list)
    error: SpoolError | None = None


class Scheduler:
    """The scheduling loop; one per `qrelay run` (see the module docstring)."""

    def __init__(self, spool: Spool, couriers: Mapping[str, Courier | None], log: QmailSendLog,
                 config: SchedulerConfig, classify: Classify, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, qp: int = 0,
                 alias_uid: int | None = None) -> None:
        """`couriers`: channel name -> its courier, in the order status lines
        list them (engine.delivery.channels.CHANNELS). `alias_uid`: qmail's
        alias user, whose forwards say `invoked by alias` (None: no such user)."""
        self.spool = spool
        self.log = log
        self.config = config
        self.classify = classify
        self.clock = clock
        self.monotonic = monotonic
        self.qp = qp
        self.alias_uid = alias_uid
        self.delivery_number = 0
        self.lanes = [Lane(name, courier, scan_batch=config.scan_batch, skip_max=config.skip_max)
                      for name, courier in couriers.items()]
        # (msgid, index) of recipients being delivered, and msgids whose bounce
        # is being queued: due()/bouncing() skip them.
        self.inflight: set[tuple[int, int]] = set()
        self.bouncing_now: set[int] = set()
        self._bounce_retry_at: dict[int, float] = {}    # msgid -> monotonic time
        # Recovery hints, per (channel, destination).
        self.deferred = DeferredByDomain(config.recovered_index_max)
        # (lane, domain, delivery number, spool Result, K/Z/D, report text)
        self._results: list[tuple[Lane, str, int, object, str, str]] = []
        # Results (lane, domain, K/Z/D, spool Result) whose commit failed, logged
        # already: committed again at _unrecorded_due.
        self._unrecorded: list[tuple[Lane, str, str, object]] = []
        self._unrecorded_due = 0.0
        self._unrecorded_delay = UNRECORDED_RETRY
        # The spool writes waiting for the commit thread (see step 2), and the
        # one commit it runs: its future, and what it carries.
        self._reschedules: list[tuple[Lane, Deferred]] = []
        self._to_preprocess: list[tuple] = []
        self._preprocessing: set[int] = set()   # ids waiting or in the commit
        # Messages bounced (or needing no bounce) to release in the next
        # commit, and those waiting or in it: the bounce scan passes over them.
        self._releases: list[int] = []
        self._releasing: set[int] = set()
        self._flush_pending = False
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        self._commit: concurrent.futures.Future | None = None
        # The scheduler's own timers are monotonic: a clock set back must not
        # stop them (the wall clock is for the spool's retry times only).
        self._recovered_at: dict[tuple[str, str], float] = {}
        self._results_due = 0.0
        self._next_bounce_scan = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._flush_requested = False
        # Monotonic time of the last flush request: an attempt already running
        # then, which defers, is due again at once (the flush was meant for it too).
        self._flushed_at = float("-inf")
        self._stopping = False
        self.delivered = self.deferrals = self.failures = 0
        # Queue surgery's counter (engine.queue.surgery) when the ready views were filled.
        self._surgery_gen = spool.surgery_generation()

    def lane(self, name: str) -> Lane:
        for lane in self.lanes:
            if lane.name == name:
                return lane
        raise KeyError(name)

    def concurrency(self, lane: Lane) -> int:
        return self.config.concurrency.get(lane.name, 0)

    # --- control from outside (signal handlers call these in the loop) -------------
    def request_flush(self) -> None:
        """qmail's ALRM: every deferred recipient is due now, and so is every
        recipient whose running attempt defers after this."""
        self._flush_requested = True
        self._flushed_at = self.monotonic()
        self.wake()

    def stop(self) -> None:
        """qmail's TERM: start nothing new, let running deliveries finish."""
        self._stopping = True
        self.wake()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def reload_domains(self, classify: Classify) -> None:
        self.classify = classify

    def reload(self, config: SchedulerConfig, classify: Classify | None = None) -> None:
        """A new snapshot (HUP, or a control file changed): the next pass uses
        its limits, retry schedule and bounce settings; deliveries in flight
        finish under the old ones. The ready views keep their jobs (they are
        only a view of the spool) and take the new sizes."""
        self.config = config
        if classify is not None:
            self.classify = classify
        for lane in self.lanes:
            lane.ready.resize(config.scan_batch, config.skip_max)
        self.deferred.max_ids = config.recovered_index_max
        self.wake()

    def idle(self) -> bool:
        """Nothing in flight, nothing to record or being committed, nothing
        new to preprocess, no flush to do, no bounce being queued: what a test
        waits for after feeding the spool."""
        return (not self._tasks and not self._results and not self.bouncing_now
                and self._commit is None and not self._writes_waiting()
                and not self._flush_requested and not self.spool.todo(1))

    # --- the loop ------------------------------------------------------------------
    async def run(self, *, stop_grace: float = 8.0) -> None:
        self._wake = asyncio.Event()
        self._log_status()
        self.log.flush()
        try:
            while not self._stopping:
                busy = self.run_pass()
                self.log.flush()
                if busy:
                    await asyncio.sleep(0)
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), self._sleep_time())
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
            await self._drain(stop_grace)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the commit thread, after the commit it runs (if any): the
        spool must not be closed under it (after a crash of the loop too)."""
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None

    def _sleep_time(self) -> float:
        if self._results and self._commit is None:
            return max(0.0, min(self.config.poll_interval, self._results_due - self.monotonic()))
        return self.config.poll_interval   # a commit that ends wakes the loop

    def run_pass(self) -> bool:
        """One pass; True if more work is ready at once (so don't sleep)."""
        self._collect()
        now = self.clock()
        if self._flush_requested:
            self._flush_requested = False
            self._flush_pending = True     # ordered after the results already gathered
        busy = self.preprocess(now)
        mono = self.monotonic()
        if mono >= self._next_bounce_scan and self._commit is None:
            # Messages that finish here are completed at once; this scan finds
            # those left by a crash and bounces that failed to be queued. Only
            # between commits (the next one starts just below): a message a
            # running commit finishes would be found before its Finished
            # record is collected, and bounced twice.
            self._next_bounce_scan = mono + BOUNCE_SCAN_INTERVAL
            self.complete_pending_bounces()
            self._adopt_tails()
        self._maybe_commit()
        if not self._stopping:
            self._notice_surgery()
            for lane in self.lanes:
                if lane.courier is not None:
                    self.dispatch(lane, now)
        return busy

    def _notice_surgery(self) -> None:
        """`qrelay hold|release|requeue|delete` changed the spool under the
        ready views: throw them away (they are only a view) so nothing held
        or deleted is started; the next read of the due table refills them.
        One read of a counter per pass."""
        gen = self.spool.surgery_generation()
        if gen == self._surgery_gen:
            return
        self._surgery_gen = gen
        for lane in self.lanes:
            lane.ready = ReadyJobs(self.config.scan_batch, skip_max=self.config.skip_max)
            lane.scan_after = None

    async def _drain(self, grace: float) -> None:
        if self._tasks:
            self._log_status(exiting=True)
            self.log.flush()
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)
        await self.commit_all()
        self.log.exiting()
        self.log.flush()

    # --- step 1: preprocessing (qmail's todo -> local/remote, spec §5.3) -----------
    def preprocess(self, now: float) -> bool:
        """Classify a batch of new messages; the commit thread records it
        (step 2). One batch waits at a time, beside the one being committed."""
        if self._to_preprocess:
            return False
        limit = self.config.todo_batch
        ids = [m for m in self.spool.todo(limit + len(self._preprocessing))
               if m not in self._preprocessing][:limit]
        if not ids:
            return False
        items = []
        for msgid in ids:
            try:
                info = self.spool.message_info(msgid)
            except SpoolError:
                continue  # gone or quarantined (the spool logged why)
            self.log.new_msg(msgid)
            # qp = the id the queueing step got back: the "qp" of the client's
            # `250 ok <time> qp <id>` and of `bounce msg N qp <id>`, so one grep
            # follows a message from the SMTP reply through the log.
            self.log.info_msg(msgid, info.size, info.sender, msgid, info.uid)
            routed = [self.classify(r.address) for r in info.recipients]
            items.append((msgid, [c for c, _ in routed], [a for _, a in routed]))
        self._to_preprocess = items
        self._preprocessing.update(item[0] for item in items)
        return len(ids) >= limit

    # --- step 3: dispatch ----------------------------------------------------------
    def dispatch(self, lane: Lane, now: float) -> int:
        """Start deliveries from the lane's ready view; refill it from the spool
        when slots stay free (so the due table is read in big batches, not once
        per delivery)."""
        started = self._dispatch_ready(lane)
        if lane.active >= self.concurrency(lane):
            return started
        ready = lane.ready
        blocked = self._blocked(lane)
        if len(ready) >= ready.capacity:
            # Full of work for destinations at their limit: remember it by key
            # only, so other destinations' mail can be seen.
            ready.drop_blocked(blocked)
        released = ready.release_skipped(blocked)
        if released:
            # Remembered keys are behind the watermark: look them up directly.
            ready.add(self.spool.jobs(released, now, lane.name))
        room = ready.capacity - len(ready)
        if room > 0:
            mono = self.monotonic()
            if mono >= lane.rescan_at:
                lane.scan_after = None
            if lane.scan_after is None:
                lane.rescan_at = mono + RESCAN_SECONDS
            jobs = self.spool.due(now, room, lane.name, exclude=ready.claimed(self.inflight),
                                  after=lane.scan_after)
            if jobs:
                last = jobs[-1]
                lane.scan_after = (last.next_try, last.msgid, last.index)
            ready.add(jobs)
            if len(jobs) < room and ready.forgot and mono >= lane.rescan_min_at \
                    and ready.could_take_forgotten(blocked):
                # The end of what is due: keys forgotten on the way are
                # behind the watermark, so the next read starts over (not
                # while their destinations are as full as when they were
                # forgotten: a hung one's backlog would be read for nothing).
                ready.forgot = False
                ready.forgotten.clear()
                lane.scan_after = None
                lane.rescan_min_at = mono + RESCAN_MIN_SECONDS
            started += self._dispatch_ready(lane)
        return started

    def _blocked(self, lane: Lane) -> Callable[[str], bool]:
        limit = self.config.per_destination
        return lambda domain: lane.per_domain.get(domain, 0) >= limit

    def _dispatch_ready(self, lane: Lane) -> int:
        limit = self.concurrency(lane)
        started = 0
        if lane.active >= limit:
            return 0
        blocked = self._blocked(lane)
        for domain in list(lane.ready.domains()):
            while not blocked(domain):
                if lane.active >= limit:
                    return started
                group = lane.ready.pop(domain, self.config.max_rcpts_per_delivery)
                if group is None:
                    break
                msgid, jobs = group
                self._start(lane, domain, jobs)
                started += 1
        return started

    def _start(self, lane: Lane, domain: str, jobs: list[Job]) -> None:
        lane.started(domain)
        numbers = []
        for job in jobs:
            self.inflight.add((job.msgid, job.index))
            self.delivery_number += 1
            numbers.append(self.delivery_number)
            self.log.starting_delivery(self.delivery_number, job.msgid, lane.name, job.address)
        self._log_status()
        self._spawn(self._deliver(lane, domain, jobs, numbers))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, lane: Lane, domain: str, jobs: list[Job], numbers: list[int]) -> None:
        opened = self.clock()
        opened_mono = self.monotonic()
        surgery_gen = self._surgery_gen
        first = jobs[0]
        group = Group(lane.name, first.msgid, domain, first.sender,
                      tuple(j.address for j in jobs))
        results: list[RecipientResult] = []
        try:
            try:
                if is_verp(group.sender):
                    # VERP: a sender of its own for each recipient, so one
                    # envelope each (a remote connection is reused for the next).
                    for j in jobs:
                        one = Group(lane.name, first.msgid, domain,
                                    verp_sender(group.sender, j.address), (j.address,))
                        results += await lane.courier.deliver(one)
                else:
                    results = await lane.courier.deliver(group)
                if len(results) != len(jobs):
                    raise ValueError("result count mismatch")
                results = [await self._forward(first, r) if r.forwards else r
                           for r in results]
            except asyncio.CancelledError:
                results = []
                raise
            except Exception as exc:
                # A bug or crash in a courier must cost a retry, never mail;
                # and the log says why (qmail's text alone names no cause).
                self.log.alert(f"{lane.name} delivery of msg {first.msgid} to {domain} "
                               f"crashed: {exc!r}")
                results = all_results(group.recipients, "Z", CRASHED_TEXT.format(channel=lane.name))
        finally:
            lane.finished(domain)
            retry = self.config.retry
            dying = retry.is_dying(first.birth, opened)
            next_try = retry.next_try(first.birth, opened, lane.name)
            if self._flushed_at >= opened_mono:
                next_try = self.clock()   # flushed while running: one more try now
            requeued = self._requeued(jobs, surgery_gen) \
                if any(r.status not in ("K", "D") for r in results) else set()
            for job, got, number in zip(jobs, results, numbers):
                status, text = retry.final_result(got.status, got.text, dying)
                metrics.delivery_result(lane.name, status, opened - first.birth)
                if status == "K":
                    result = Delivered(job.msgid, job.index)
                elif status == "D":
                    result = Failed(job.msgid, job.index, text)
                else:
                    if status != "Z":
                        status, text = "Z", "report mangled, will defer\n"
                    # Requeued while running: one more try now, as after a flush.
                    result = Deferred(job.msgid, job.index,
                                      self.clock() if job.index in requeued else next_try, text)
                if not self._results:
                    # Results are recorded in batches (one durable spool
                    # transaction each), at most mark_delay after the first.
                    self._results_due = self.monotonic() + self.config.mark_delay
                self._results.append((lane, domain, number, result, status, text))
            if not results:
                # Cancelled at shutdown: nothing recorded, the recipients stay due.
                for job in jobs:
                    self.inflight.discard((job.msgid, job.index))
            self.wake()

    def _requeued(self, jobs: list[Job], surgery_gen: int) -> set[int]:
        """Indexes of these jobs (of one message) whose recipient `qrelay
        requeue` made due again while their attempt ran: its record's next
        try is no longer the one the job was read with. Read only when queue
        surgery committed something since the attempt started."""
        if self.spool.surgery_generation() == surgery_gen:
            return set()
        try:
            rcpts = self.spool.message_info(jobs[0].msgid).recipients
        except SpoolError:
            return set()        # deleted meanwhile: its result is ignored
        return {j.index for j in jobs if j.index < len(rcpts)
                and rcpts[j.index].state in ("pending", "deferred")
                and rcpts[j.index].next_try != j.next_try}

    async def _forward(self, job: Job, got: RecipientResult) -> RecipientResult:
        """Queue what a local delivery forwards (qmail-local's own qmail-queue
        call), indexed before the recipient's result is recorded: a crash in
        between costs a duplicate forward, never a lost one. A success's report
        ends, as qmail-local's, with `qp N` for qmail-local's own copy (not
        vdelivermail's): the copy's id, its `info msg`'s qp.
        Each copy is queued as qmail-queue queues it for the user that ran the
        delivery: with that uid and its `Received: (qmail … invoked by uid …)`
        line above the Delivered-To line.
        An address qmail-queue would refuse fails the recipient, nothing queued."""
        qps = []
        if any(len(a.encode("utf-8", "surrogateescape")) >= QQ_ADDRESS_MAX
               for fwd in got.forwards for a in (fwd.sender, *fwd.recipients)):
            return RecipientResult(got.address, "D", QQ_TOO_LONG_TEXT)
        try:
            original = self.spool.read_message(job.msgid)
            for fwd in got.forwards:
                origin = "alias" if fwd.uid == self.alias_uid else "local"
                received = queue_received_line(pid=self.qp, origin=origin, uid=fwd.uid,
                                               when=self.clock())
                qp = await self.spool.submit(
                    Envelope(fwd.sender, fwd.recipients, self.qp, fwd.uid, "local"),
                    received + fwd.prefix + original, indexed=True)
                if fwd.reports_qp:
                    qps.append(qp)
        except (SpoolError, OSError) as exc:
            return RecipientResult(got.address, "Z", f"Unable to forward message: {exc} (#4.3.0)\n")
        if got.status != "K":
            return got      # qmail-local says qp only in a success's report
        return RecipientResult(got.address, got.status,
                               got.text + "".join(f"qp {qp}\n" for qp in qps), got.forwards)

    # --- step 2: the commit thread: results, flush, preprocessing ------------------
    # The scheduler's spool writes wait in memory and go to the spool in ONE
    # transaction per commit (Spool.commit), run by a thread of its own while
    # the loop goes on dispatching: one sync for everything gathered since
    # the last commit, and never the loop waiting on a sync or on LMDB's
    # write lock (held by the receivers' spool writer, slowed by mailbox
    # syncs). One commit runs at a time and they run in order, so the spool
    # sees the writes in the order the loop made them. A result is kept in
    # `inflight` until its commit is done (due() must not hand the
    # recipient out again), and the commit's outcome is taken in on the loop
    # by the next pass (_collect), so nothing here is touched by two threads.
    def _writes_waiting(self) -> bool:
        return bool(self._results or self._unrecorded or self._reschedules
                    or self._to_preprocess or self._flush_pending or self._releases)

    def _maybe_commit(self) -> None:
        if self._commit is not None:
            return
        if self._to_preprocess or self._flush_pending or self._reschedules or self._releases or (
                self._results and (len(self._results) >= self.config.mark_batch
                                   or self.monotonic() >= self._results_due)) or (
                self._unrecorded and self.monotonic() >= self._unrecorded_due):
            self._start_commit()

    def _start_commit(self) -> None:
        """Hand everything waiting to the commit thread (at most mark_delay
        after the first result, or at once for new mail or a flush)."""
        batch, self._results = self._results, []
        results, self._unrecorded = self._unrecorded, []
        for lane, domain, number, result, status, text in batch:
            self.log.delivery(number, status, text)
            if status == "K":
                self.delivered += 1
            elif isinstance(result, Deferred):
                self.deferrals += 1
                if self._recovers(lane, text):
                    self.deferred.add((lane.name, domain), result.msgid)
            else:
                self.failures += 1
            results.append((lane, domain, status, result))
        commit = _Commit(results, self._reschedules, self._flush_pending, self._to_preprocess,
                         self.clock(), self._releases)
        self._reschedules, self._flush_pending, self._to_preprocess = [], False, []
        self._releases = []
        if self._committer is None:
            self._committer = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="scheduler-commit")
        self._commit = self._committer.submit(self._write, commit)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        wake = self.wake

        def done(_future) -> None:   # in the commit thread
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:
                pass  # that loop is closed; the next pass collects

        self._commit.add_done_callback(done)

    def _write(self, c: _Commit) -> _Commit:
        """In the commit thread: the one transaction."""
        try:
            c.applied, c.preprocessed, _ = self.spool.commit(
                [r for _, _, _, r in c.results] + [r for _, r in c.reschedules],
                c.preprocess, c.now, c.flush, releases=c.releases)
        except SpoolError as exc:
            c.error = exc
        return c

    def _collect(self) -> None:
        """Take in a finished commit (on the loop): release its recipients,
        move scan watermarks, complete finished messages."""
        if self._commit is None or not self._commit.done():
            return
        future, self._commit = self._commit, None
        c: _Commit = future.result()   # anything but a SpoolError is a bug: let it out
        now = self.clock()
        if c.error is not None:
            if c.results:
                # Not recorded: tried again later, the recipients kept in
                # flight; a stop before that means they are delivered again
                # (at least once), as qmail's "trouble marking" case.
                self.log.warning(f"trouble marking results: {c.error}; "
                                 "will try again, or the message will be delivered twice!")
                self._unrecorded = c.results + self._unrecorded
                self._unrecorded_due = self.monotonic() + self._unrecorded_delay
                self._unrecorded_delay = min(UNRECORDED_RETRY_MAX, self._unrecorded_delay * 2)
            if c.reschedules:
                self.log.warning(f"trouble rescheduling deferred recipients: {c.error}")
            if c.flush:
                self.log.warning(f"trouble rescheduling the queue: {c.error}")
            if c.preprocess:
                self.log.warning(f"trouble preprocessing messages: {c.error}; "
                                 "will try again later")
            for msgid in c.releases:
                # Still bouncing in the spool: the bounce scan finds it again
                # (a second bounce at worst, as a crash here would cost).
                self.log.warning(f"trouble releasing msg {msgid}: {c.error}")
            for lane in self.lanes:
                lane.scan_after = None  # due entries unchanged, maybe behind the watermark
        self._preprocessing.difference_update(item[0] for item in c.preprocess)
        self._releasing.difference_update(c.releases)
        if c.error is None:
            for msgid in c.releases:
                self.log.end_msg(msgid)
        recovered: set[tuple[Lane, str]] = set()
        if c.results and c.error is None:
            self._unrecorded_delay = UNRECORDED_RETRY
        for lane, domain, status, result in c.results:
            if c.error is not None:
                continue        # still in flight: in _unrecorded
            self.inflight.discard((result.msgid, result.index))
            if status == "K":
                recovered.add((lane, domain))
            elif isinstance(result, Deferred) and result.next_try <= now:
                lane.scan_after = None  # due at once (a flush): may sort before the watermark
        for lane, _ in c.reschedules:
            lane.scan_after = None      # due now: may sort before the watermark
        if c.flush:
            for lane in self.lanes:
                lane.ready.forget_skipped()
                lane.scan_after = None
        if c.preprocess and c.error is None:
            for lane in self.lanes:
                if lane.scan_after is not None and c.now - lane.scan_after[0] < 0.002:
                    # New entries due `now` may sort before the watermark (same
                    # millisecond, smaller id): read from the start next time.
                    lane.scan_after = None
        if c.results:
            self._log_status()
        for f in c.applied + c.preprocessed:
            if f is not None:
                self._finish(f)
        for lane, domain in recovered:
            self._recover_domain(lane, domain, now)

    async def commit_all(self) -> None:
        """Commit everything gathered, and wait for it (at stop)."""
        while True:
            if self._commit is not None:
                c = await asyncio.wrap_future(self._commit)
                self._collect()
                if c.error is not None:
                    return      # what is not recorded is delivered again after the restart
            if not self._writes_waiting():
                return
            self._start_commit()

    @staticmethod
    def _recovers(lane: Lane, text: str) -> bool:
        """Whether this deferral is one a success at its destination ends."""
        try:
            spec = channel(lane.name)
        except KeyError:
            return True
        return spec.recovers(text)

    def _recover_domain(self, lane: Lane, domain: str, now: float) -> None:
        """Make the deferred recipients we saw defer on `domain` due now."""
        key = (lane.name, domain)
        mono = self.monotonic()
        if self._recovered_at.get(key, -1e18) + self.config.recovery_interval > mono:
            return  # e.g. a greylisting server: don't retry its deferrals in a hot loop
        ids = self.deferred.take(key)
        if not ids:
            return
        self._recovered_at[key] = mono
        if len(self._recovered_at) > 10_000:
            self._recovered_at.clear()
        for msgid in ids:
            try:
                info = self.spool.message_info(msgid)
            except SpoolError:
                continue
            for i, r in enumerate(info.recipients):
                if (r.state == "deferred" and r.channel == lane.name and r.next_try > now
                        and (msgid, i) not in self.inflight
                        and recipient_domain(r.address) == domain):
                    self._reschedules.append((lane, Deferred(msgid, i, now, r.text,
                                                             attempted=False)))

    def _adopt_tails(self) -> None:
        # Messages a writer answered but died before indexing (engine.queue, C2).
        try:
            self.spool.adopt_tails()
        except (SpoolError, OSError) as exc:
            self.log.warning(f"trouble indexing what a stopped writer left: {exc}; "
                             "will try again later")

    def complete_pending_bounces(self) -> None:
        now = self.monotonic()
        for f in self.spool.bouncing(self.config.todo_batch):
            if f.msgid in self.bouncing_now or f.msgid in self._releasing or \
                    self._bounce_retry_at.get(f.msgid, 0) > now:
                continue
            self._finish(f)

    def _finish(self, f: Finished) -> None:
        """_complete, where a failure is this message's alone: a bug met by one
        message's bounce (a sender no code expected) would otherwise crash the
        scheduler at every restart, and nothing would be delivered for anyone."""
        try:
            self._complete(f)
        except Exception as exc:  # noqa: BLE001 - one message must not stop every delivery
            self.log.alert(f"trouble bouncing msg {f.msgid}: {exc!r}; will try again later")
            self._bounce_retry_at[f.msgid] = self.monotonic() + BOUNCE_RETRY_SECONDS

    def _complete(self, f: Finished) -> None:
        if not f.failed:
            self.log.end_msg(f.msgid)
            return
        cfg = self.config.bounce
        kind = bounce_kind(f.sender, cfg)
        if kind in ("triple", "double-discard"):
            if kind == "triple":
                self.log.triple_bounce(f.msgid)
            else:
                self.log.double_bounce_discarded(f.msgid)
            self._release(f.msgid)
            return
        try:
            # A bounce copies at most max_copy_bytes of the original (else its
            # header only): a bigger message is not read into memory whole.
            original = self.spool.read_message(f.msgid, limit=cfg.max_copy_bytes + 2)
        except MessageNotFound:
            return  # deleted (`qrelay delete`) since it finished: no bounce
        except MessageUnreadable as exc:
            # Whole but not readable now: bounce it with its text later.
            self.log.warning(f"trouble reading msg {f.msgid} for its bounce: {exc}, "
                             "will try later")
            self._bounce_retry_at[f.msgid] = self.monotonic() + BOUNCE_RETRY_SECONDS
            return
        except SpoolError:
            original = b""      # quarantined: the bounce says what failed, without it
        failures = [Failure(shown_recipient(addr, self.classify), text) for addr, text in f.failed]
        bounce = build_bounce(cfg, sender=f.sender, failures=failures, original=original,
                              now=self.clock(), qp=self.qp, arrival=f.birth)
        if bounce is None:
            self._release(f.msgid)
            return
        self.bouncing_now.add(f.msgid)
        self._spawn(self._inject_bounce(f.msgid, bounce))

    async def _inject_bounce(self, msgid: int, bounce) -> None:
        try:
            # Queue the bounce first, then release the original: a crash in
            # between costs a duplicate bounce, never a lost one. Wait for the
            # index too, so the next pass sees the bounce in the queue.
            bounce_id = await self.spool.submit(Envelope(bounce.sender, (bounce.recipient,),
                                                         self.qp, 0, "bounce"), bounce.message,
                                                indexed=True)
        except Exception:
            self.log.warning("trouble injecting bounce message, will try later")
            self._bounce_retry_at[msgid] = self.monotonic() + BOUNCE_RETRY_SECONDS
            return
        finally:
            self.bouncing_now.discard(msgid)
            self.wake()
        self._bounce_retry_at.pop(msgid, None)
        self.log.bounce_msg(msgid, bounce_id)
        self._release(msgid)

    def _release(self, msgid: int) -> None:
        """Release `msgid` (its bounce queued, or none needed) in the next
        group commit, not a durable transaction of its own on the loop:
        thousands of messages bouncing at once (their queuelifetime passed)
        must not stall every delivery for a sync each. `end msg` is logged
        when that commit is done."""
        if msgid not in self._releasing:
            self._releasing.add(msgid)
            self._releases.append(msgid)

    def _log_status(self, exiting: bool = False) -> None:
        self.log.status([(lane.name, lane.active, self.concurrency(lane)) for lane in self.lanes],
                        exiting=exiting)
