"""engine/delivery/scheduler.py against a real spool, a fake RemoteDelivery and an injected clock."""
from __future__ import annotations

import asyncio
import email
import time

import pytest

from engine.config.domains import DomainConfig
from engine.delivery.bounce import DOUBLE_BOUNCE_SENDER, BounceConfig
from engine.delivery.channels import ReadingCourier, RecipientResult
from engine.delivery.retry import DYING_TEXT, RetryPolicy
from engine.delivery.scheduler import (BOUNCE_RETRY_SECONDS, BOUNCE_SCAN_INTERVAL, DeferredByDomain,
                                       Scheduler, SchedulerConfig)
from engine.log import QmailSendLog
from engine.queue import Envelope, MessageNotFound, Spool

T0 = 1_800_000_000.0
OK = "127.0.0.1 accepted message.\nRemote host said: 250 ok\n"
NOCONN = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
NOUSER = "127.0.0.1 does not like recipient.\nRemote host said: 550 no such user\nGiving up on 127.0.0.1.\n"
MSG = b"From: a@src.test\r\nSubject: t\r\n\r\nhello\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeRemote:
    """Answers per recipient from `rules` (address -> (status, text)); default success."""

    def __init__(self) -> None:
        self.rules: dict[str, tuple[str, str]] = {}
        self.down: set[str] = set()
        self.calls: list[tuple[str, str, tuple[str, ...]]] = []
        self.messages: list[bytes] = []
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.max_running = 0

    async def close(self):
        pass

    async def deliver(self, domain, sender, recipients, message):
        self.calls.append((domain, sender, tuple(recipients)))
        self.messages.append(message)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            out = []
            for r in recipients:
                if domain in self.down:
                    out.append(RecipientResult(r, "Z", NOCONN))
                else:
                    st, tx = self.rules.get(r, ("K", OK))
                    out.append(RecipientResult(r, st, tx))
            return out
        finally:
            self.running -= 1


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    spool = Spool(tmp_path / "queue", clock=clock)
    log = QmailSendLog(tmp_path / "log", clock_ns=lambda: int(clock.now * 1e9))
    remote = FakeRemote()
    domains = DomainConfig.build(me="mx.test", locals=["mx.test"])
    cfg = SchedulerConfig(bounce=BounceConfig(bouncehost="mx.test", doublebouncehost="mx.test"),
                          retry=RetryPolicy(queuelifetime=604800), per_destination=20)
    couriers = {"local": None, "remote": ReadingCourier(spool, remote)}   # local mail stays queued
    sched = Scheduler(spool, couriers, log, cfg, domains.resolve, clock=clock, qp=4242)
    yield sched, spool, remote, clock, log, tmp_path
    sched.close()       # its commit thread, before the spool it writes to
    spool.close()


async def settle(sched: Scheduler) -> None:
    """Run passes until the scheduler is idle (nothing in flight, to record, to
    preprocess or being bounced) and one more pass starts nothing."""
    if sched._wake is None:
        sched._wake = asyncio.Event()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sched.run_pass()
        if sched.idle():
            sched.run_pass()
            if sched.idle():
                break
        await asyncio.sleep(0.002)
    else:
        raise AssertionError("the scheduler did not settle in 30 s")
    sched.log.flush()


async def passes_until(sched: Scheduler, cond, what: str) -> None:
    """Run passes until cond() holds: what a pass starts may first wait for the
    commit thread (preprocessing), which a loaded machine runs late."""
    deadline = time.monotonic() + 30
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        sched.run_pass()
        await asyncio.sleep(0.002)


def log_texts(tmp_path) -> list[str]:
    return [line[26:] for line in (tmp_path / "log" / "current").read_text().splitlines()]


def test_delivers_groups_by_domain_and_keeps_local_pending(env):
    sched, spool, remote, clock, log, tmp = env
    mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test", "y@D1.test", "z@d2.test", "me@mx.test"),
                                 pid=77, uid=5), MSG)
    asyncio.run(settle(sched))
    assert sorted(remote.calls) == [("d1.test", "a@src.test", ("x@d1.test", "y@D1.test")),
                                    ("d2.test", "a@src.test", ("z@d2.test",))]
    assert remote.messages[0] == MSG
    info = spool.message_info(mid)
    assert [(r.channel, r.state) for r in info.recipients] == [
        ("remote", "delivered"), ("remote", "delivered"), ("remote", "delivered"), ("local", "pending")]
    texts = log_texts(tmp)
    assert f"new msg {mid}" in texts
    assert f"info msg {mid}: bytes {len(MSG)} from <a@src.test> qp {mid} uid 5" in texts
    assert any(t.startswith("starting delivery ") and t.endswith(f"msg {mid} to remote x@d1.test") for t in texts)
    assert "status: local 0/10 remote 1/20" in texts or "status: local 0/10 remote 2/20" in texts
    assert sum(1 for t in texts if t.endswith(": success: 127.0.0.1_accepted_message./Remote_host_said:_250_ok/")) == 3
    assert f"end msg {mid}" not in texts     # the local recipient is still queued


def test_a_forward_is_logged_with_the_qp_of_its_copy_as_qmail_local_says_it(env):
    """qmail-local ends a forwarding delivery's report with `qp N`, the qp of
    the copy it queued (`delivery 5: success: did_0+1+0/qp_1234/`): one grep
    follows the message to its forwarded copy (`info msg …: … qp 1234`)."""
    from engine.delivery.channels import Forward
    sched, spool, remote, clock, log, tmp = env

    class Forwarding:
        async def deliver(self, domain, sender, recipients, message):
            return [RecipientResult(r, "K", "did 0+1+0\n",
                                    (Forward(sender, ("fwd@d1.test",), b"Delivered-To: me@mx.test\r\n", 0, True),))
                    for r in recipients]

    sched.lanes[0].courier = ReadingCourier(spool, Forwarding())
    mid = spool.enqueue(Envelope("a@src.test", ("me@mx.test",)), MSG)
    asyncio.run(settle(sched))
    texts = log_texts(tmp)
    (copy,) = [int(t.split()[2]) for t in texts if t.startswith("new msg ") and t != f"new msg {mid}"]
    received = len(b"Received: (qmail 4242 invoked by uid 0); 15 Jan 2027 08:00:00 -0000\r\n")
    assert f"info msg {copy}: bytes {len(MSG) + received + 26} from <a@src.test> qp {copy} uid 0" in texts
    assert any(t.endswith(f": success: did_0+1+0/qp_{copy}/") for t in texts), texts


def test_a_vdelivermail_forward_adds_no_qp_to_the_report(env):
    """vdelivermail forwards through qmail-inject, not qmail-local: qmail-local
    reports `did 0+0+1` and no `qp` line; only its own `&` lines add one."""
    from engine.delivery.channels import Forward
    sched, spool, remote, clock, log, tmp = env

    class Forwarding:   # `| vdelivermail '' joe@far.test` after a `&` line
        async def deliver(self, domain, sender, recipients, message):
            own = tuple(Forward(sender, ("list@d1.test",), b"Delivered-To: both@mx.test\r\n", 89,
                                True) for _ in range(recipients[0].startswith("both")))
            return [RecipientResult(r, "K", "did 0+%d+1\n" % len(own),
                                    (Forward(sender, ("joe@far.test",),
                                             b"Delivered-To: catch@mx.test\r\n", 89, False), *own))
                    for r in recipients]

    sched.lanes[0].courier = ReadingCourier(spool, Forwarding())
    spool.enqueue(Envelope("a@src.test", ("catch@mx.test",)), MSG)
    asyncio.run(settle(sched))
    spool.enqueue(Envelope("a@src.test", ("both@mx.test",)), MSG)
    asyncio.run(settle(sched))
    texts = log_texts(tmp)
    last = [int(t.split()[2]) for t in texts if t.startswith("new msg ")][-1]   # the `&` copy
    assert len(remote.calls) == 3
    reports = [t.split(": ", 1)[1] for t in texts if t.startswith("delivery ") and "did_" in t]
    assert reports == ["success: did_0+0+1/", f"success: did_0+1+1/qp_{last}/"]


def test_a_forward_is_queued_as_qmail_queue_queues_it_for_the_user_that_delivered(env):
    """qmail-local hands the copy to qmail-queue, which prepends `Received:
    (qmail PID invoked by uid UID)` (`invoked by alias` for the alias user)
    above the Delivered-To line, and qmail-send's `info msg` names that uid:
    the mailbox owner's, never root's."""
    from engine.delivery.channels import Forward
    sched, spool, remote, clock, log, tmp = env
    sched.alias_uid = 7790

    class Forwarding:
        async def deliver(self, domain, sender, recipients, message):
            uid = 7790 if recipients[0].startswith("alias") else 89
            return [RecipientResult(r, "K", "did 0+1+0\n",
                                    (Forward(sender, ("fwd@d1.test",),
                                             b"Delivered-To: %s\r\n" % r.encode(), uid, True),))
                    for r in recipients]

    sched.lanes[0].courier = ReadingCourier(spool, Forwarding())
    spool.enqueue(Envelope("a@src.test", ("me@mx.test",)), MSG)
    asyncio.run(settle(sched))
    spool.enqueue(Envelope("a@src.test", ("alias-x@mx.test",)), MSG)
    asyncio.run(settle(sched))
    assert remote.messages == [
        b"Received: (qmail 4242 invoked by uid 89); 15 Jan 2027 08:00:00 -0000\r\n"
        b"Delivered-To: me@mx.test\r\n" + MSG,
        b"Received: (qmail 4242 invoked by alias); 15 Jan 2027 08:00:00 -0000\r\n"
        b"Delivered-To: alias-x@mx.test\r\n" + MSG]
    infos = [t for t in log_texts(tmp) if t.startswith("info msg ")]
    assert [t.rsplit(" ", 1)[1] for t in infos] == ["0", "89", "0", "7790"]


def test_a_forward_to_an_address_qmail_queue_refuses_is_a_failure_not_a_retry(env):
    """qmail-queue takes addresses of at most 1002 bytes (exit 11); qmail-local
    then dies `Unable to forward message: envelope address too long for qq
    (#5.1.3).` (exit 100): the recipient fails and the sender gets a bounce.
    A .qmail line of 70,000 bytes crashed the spool's write here instead
    ("qmail-local crashed."), deferred for ever, the Maildir lines before it
    delivering again on every try."""
    from engine.delivery.channels import Forward
    sched, spool, remote, clock, log, tmp = env
    longest = "x" * (1002 - len("@far.test")) + "@far.test"

    class Forwarding:   # .qmail-big: `./Maildir/` then `&` lines
        async def deliver(self, domain, sender, recipients, message):
            target = longest if recipients[0].startswith("ok") else "x" * 70000 + "@far.test"
            return [RecipientResult(r, "K", "did 1+2+0\n",
                                    (Forward(sender, ("a@far.test", target),
                                             b"Delivered-To: big@mx.test\r\n", 0, True),))
                    for r in recipients]

    sched.lane("local").courier = ReadingCourier(spool, Forwarding())
    big = spool.enqueue(Envelope("a@src.test", ("big@mx.test",)), MSG)
    ok = spool.enqueue(Envelope("a@src.test", ("ok@mx.test",)), MSG)
    asyncio.run(settle(sched))
    texts = log_texts(tmp)
    assert any(t.endswith(": failure: Unable_to_forward_message:_envelope_address_too_long_for_qq"
                          "_(#5.1.3)./") for t in texts), texts
    assert not any("crashed" in t for t in texts), texts
    assert [c for c in remote.calls if c[2] == ("a@src.test",)] == [("src.test", "", ("a@src.test",))]
    forwarded = sorted(c[2] for c in remote.calls if c[0] == "far.test")
    assert forwarded == [("a@far.test", longest)]     # only ok@'s copy went; big@'s none
    with pytest.raises(MessageNotFound):
        spool.message_info(big)
    with pytest.raises(MessageNotFound):
        spool.message_info(ok)


def test_message_finishes_and_logs_end(env):
    sched, spool, remote, clock, log, tmp = env
    mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert f"end msg {mid}" in log_texts(tmp)
    assert spool.stats().messages == 0


def test_retry_schedule_with_injected_clock(env):
    sched, spool, remote, clock, log, tmp = env
    remote.down.add("d1.test")
    mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert len(remote.calls) == 1
    rcpt = spool.message_info(mid).recipients[0]
    assert rcpt.state == "deferred" and rcpt.next_try == T0 + 400 and rcpt.text == NOCONN
    assert "deferral: Sorry,_I_wasn't_able_to_establish_an_SMTP_connection._(#4.4.1)/" in log_texts(tmp)[-2]
    clock.now = T0 + 399
    asyncio.run(settle(sched))
    assert len(remote.calls) == 1                     # not before its time
    clock.now = T0 + 400
    asyncio.run(settle(sched))
    assert len(remote.calls) == 2
    assert spool.message_info(mid).recipients[0].next_try == T0 + 1600
    clock.now = T0 + 1700                             # late: isqrt(1700)=41 -> (41+20)^2
    asyncio.run(settle(sched))
    assert spool.message_info(mid).recipients[0].next_try == T0 + 61 * 61
    remote.down.clear()
    sched.request_flush()                             # ALRM: due now
    asyncio.run(settle(sched))
    assert len(remote.calls) == 4 and spool.stats().messages == 0


def _bounces(remote: FakeRemote):
    return [(c, m) for c, m in zip(remote.calls, remote.messages) if c[1] == ""]


def test_permanent_failure_bounces_once_after_all_recipients_finish(env):
    sched, spool, remote, clock, log, tmp = env
    remote.rules["bad@d1.test"] = ("D", NOUSER)
    remote.down.add("d2.test")
    mid = spool.enqueue(Envelope("a@src.test", ("bad@d1.test", "ok@d2.test")), MSG)
    asyncio.run(settle(sched))
    assert not _bounces(remote)                       # d2 still deferred: no bounce yet
    assert spool.message_info(mid).bouncing
    remote.down.clear()
    clock.now = T0 + 400
    asyncio.run(settle(sched))
    bounces = _bounces(remote)
    assert len(bounces) == 1
    (domain, sender, rcpts), raw = bounces[0]
    assert (domain, sender, rcpts) == ("src.test", "", ("a@src.test",))
    msg = email.message_from_bytes(raw)
    text = msg.get_payload()[0].get_payload()
    assert "<bad@d1.test>:\r\n127.0.0.1 does not like recipient." in text
    assert "ok@d2.test" not in text
    texts = log_texts(tmp)
    bounce_line = next(t for t in texts if t.startswith(f"bounce msg {mid} qp "))
    bounce_id = int(bounce_line.rsplit(" ", 1)[1])
    assert bounce_id != mid  # qp = the bounce's own id, which its info line repeats
    assert any(t.startswith(f"info msg {bounce_id}: bytes ") and t.endswith(f"from <> qp {bounce_id} uid 0")
               for t in texts)
    assert f"end msg {mid}" in texts
    assert texts.index(bounce_line) < texts.index(f"end msg {mid}")
    assert spool.stats().messages == 0


def test_failed_bounce_double_bounces_and_failed_double_bounce_is_discarded(env):
    sched, spool, remote, clock, log, tmp = env
    remote.rules["bad@d1.test"] = ("D", NOUSER)
    remote.rules["a@src.test"] = ("D", NOUSER)          # the bounce fails too
    remote.rules["postmaster@mx.test"] = ("D", NOUSER)  # unreachable: but postmaster is local
    mid = spool.enqueue(Envelope("a@src.test", ("bad@d1.test",)), MSG)
    asyncio.run(settle(sched))
    # the bounce went out and failed; the double bounce is queued for postmaster@me (local)
    queued = list(spool.iter_messages())
    assert len(queued) == 1
    double = queued[0]
    assert double.sender == DOUBLE_BOUNCE_SENDER and double.origin == "bounce"
    assert [(r.address, r.channel) for r in double.recipients] == [("postmaster@mx.test", "local")]
    raw = spool.read_message(double.msgid)
    assert b"I tried to deliver a bounce message to this address, but the bounce bounced!" in raw
    # a double bounce that fails is discarded (triple bounce)
    spool.mark_failed(double.msgid, 0, "Sorry, no mailbox here by that name. (#5.1.1)\n")
    sched._next_bounce_scan = 0            # as after a restart: the periodic scan finds it
    asyncio.run(settle(sched))
    assert f"triple bounce: discarding bounce/{double.msgid}" in log_texts(tmp)
    assert spool.stats().messages == 0


def test_double_bounce_goes_to_doublebounceto_with_qmails_sender(env):
    # The courier gets the stored #@[]; RemoteDelivery sends it as <> (test_remote).
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(bounce=BounceConfig(bouncehost="mx.test", doublebounceto="pm",
                                                       doublebouncehost="admin.test"))
    remote.rules["a@src.test"] = ("D", NOUSER)
    spool.enqueue(Envelope("", ("a@src.test",)), MSG)   # a bounce that will fail
    asyncio.run(settle(sched))
    calls = [c for c in remote.calls if c[0] == "admin.test"]
    assert calls == [("admin.test", DOUBLE_BOUNCE_SENDER, ("pm@admin.test",))]


def test_queuelifetime_expiry_turns_deferral_into_bounce(env):
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(bounce=sched.config.bounce, retry=RetryPolicy(queuelifetime=1000))
    remote.down.add("d1.test")
    mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert spool.message_info(mid).recipients[0].state == "deferred"
    clock.now = T0 + 1600                             # past the lifetime: one more attempt
    asyncio.run(settle(sched))
    bounces = _bounces(remote)
    assert len(bounces) == 1
    assert DYING_TEXT.strip().encode() in bounces[0][1]
    assert b"Status: 5.4.7" in bounces[0][1]
    assert any(t.endswith("I'm_not_going_to_try_again;_this_message_has_been_in_the_queue_too_long./")
               for t in log_texts(tmp))


def test_concurrency_limits(env):
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(concurrency={"remote": 3}, per_destination=2,
                                   bounce=sched.config.bounce)

    async def scenario():
        sched._wake = asyncio.Event()
        remote.gate = asyncio.Event()
        for i in range(6):
            spool.enqueue(Envelope("a@src.test", (f"u{i}@one.test",)), MSG)
        for i in range(6):
            spool.enqueue(Envelope("a@src.test", (f"u{i}@two.test",)), MSG)
        await passes_until(sched, lambda: sched.lane("remote").active >= 3, "3 deliveries")
        assert sched.lane("remote").active == 3
        assert sorted(sched.lane("remote").per_domain.values()) == [1, 2]
        remote.gate.set()
        await settle(sched)

    asyncio.run(scenario())
    assert remote.max_running == 3 and len(remote.calls) == 12
    assert spool.stats().messages == 0


def test_held_and_deleted_messages_in_the_ready_view_are_never_started(env):
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(concurrency={"remote": 1}, bounce=sched.config.bounce)

    async def scenario():
        sched._wake = asyncio.Event()
        remote.gate = asyncio.Event()
        ids = [spool.enqueue(Envelope("a@src.test", (f"u{i}@one.test",)), MSG) for i in range(4)]
        lane = sched.lane("remote")
        await passes_until(sched, lambda: lane.active >= 1 and len(lane.ready) >= 3, "1 + 3 ready")
        assert lane.active == 1 and len(lane.ready) == 3     # three wait in memory
        # Another process (qrelay hold / delete) changes the spool under the view.
        assert spool.hold(ids[1:3]) == 2 and spool.delete([ids[3]]) == 1
        remote.gate.set()
        await settle(sched)
        return ids

    ids = asyncio.run(scenario())
    assert [c[2] for c in remote.calls] == [("u0@one.test",)]
    assert spool.message_info(ids[1]).held and spool.stats().messages == 2
    spool.release_held(ids[1:3])
    asyncio.run(settle(sched))
    assert sorted(c[2][0] for c in remote.calls) == ["u0@one.test", "u1@one.test", "u2@one.test"]
    assert spool.stats().messages == 0


def test_recovered_destination_gets_deferred_mail_at_once(env):
    sched, spool, remote, clock, log, tmp = env
    remote.down.add("d1.test")
    ids = [spool.enqueue(Envelope("a@src.test", (f"u{i}@d1.test",)), MSG) for i in range(5)]
    asyncio.run(settle(sched))
    assert all(spool.message_info(m).recipients[0].state == "deferred" for m in ids)
    remote.down.clear()
    clock.now = T0 + 10                               # long before the 400 s retry slot
    spool.enqueue(Envelope("a@src.test", ("new@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert spool.stats().messages == 0                # the 5 deferred ones went too
    assert len(remote.calls) == 5 + 1 + 5


def test_a_recipient_the_destination_deferred_waits_for_its_slot_after_a_success(env):
    """Recovery is for mail that could not reach the destination: a recipient
    it deferred itself (greylisting, a full mailbox, a rate limit) was pulled
    forward by every success there, once a minute for a week on a busy domain."""
    sched, spool, remote, clock, log, tmp = env
    remote.rules["full@d1.test"] = ("Z", "Remote host said: 452 4.2.2 mailbox full\n")
    full = spool.enqueue(Envelope("a@src.test", ("full@d1.test",)), MSG)
    asyncio.run(settle(sched))
    remote.down.add("d1.test")
    down = spool.enqueue(Envelope("a@src.test", ("u@d1.test",)), MSG)
    asyncio.run(settle(sched))
    remote.down.clear()
    clock.now = T0 + 10                               # long before the 400 s retry slot
    spool.enqueue(Envelope("a@src.test", ("new@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert [c[2] for c in remote.calls].count(("full@d1.test",)) == 1    # waits for its slot
    assert [c[2] for c in remote.calls].count(("u@d1.test",)) == 2       # recovered at once
    assert spool.message_info(full).recipients[0].state == "deferred"
    with pytest.raises(MessageNotFound):
        spool.message_info(down)


def test_deferred_by_domain_is_bounded():
    d = DeferredByDomain(3)
    for i in range(10):
        d.add("a.test", i)
    assert len(d) == 3
    assert d.take("a.test", limit=2) == [0, 1] and len(d) == 1
    assert d.take("a.test") == [2] and len(d) == 0
    assert d.take("a.test") == []


def test_delivery_crash_costs_a_retry_not_mail(env):
    sched, spool, remote, clock, log, tmp = env

    async def broken(domain, sender, rcpts, message):
        raise RuntimeError("bug")

    remote.deliver = broken
    mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
    asyncio.run(settle(sched))
    r = spool.message_info(mid).recipients[0]
    assert r.state == "deferred" and r.text == "qmail-remote crashed.\n"
    # qmail's text names no cause: the log says it, in one line
    assert f"alert: remote delivery of msg {mid} to d1.test crashed: RuntimeError('bug')" in log_texts(tmp)


def test_stop_waits_for_running_deliveries(env):
    sched, spool, remote, clock, log, tmp = env

    async def scenario():
        remote.gate = asyncio.Event()
        spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
        runner = asyncio.create_task(sched.run(stop_grace=5))
        deadline = time.monotonic() + 30
        while not remote.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sched.stop()
        await asyncio.sleep(0.05)
        remote.gate.set()
        await runner

    asyncio.run(scenario())
    texts = log_texts(tmp)
    assert "status: local 0/10 remote 1/20 exitasap" in texts
    assert texts[-1] == "status: exiting"
    assert spool.stats().messages == 0


def test_blocked_destination_neither_starves_others_nor_grows_memory(env):
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(concurrency={"remote": 5}, per_destination=2, scan_batch=10,
                                   bounce=sched.config.bounce)
    from engine.delivery.scheduler import ReadyJobs
    lane = sched.lane("remote")
    lane.ready = ReadyJobs(10)

    async def scenario():
        sched._wake = asyncio.Event()
        hang = asyncio.Event()
        real = remote.deliver

        async def deliver(domain, sender, rcpts, message):
            if domain == "slow.test":
                await hang.wait()          # a destination that never answers
            return await real(domain, sender, rcpts, message)

        remote.deliver = deliver
        for i in range(200):
            spool.enqueue(Envelope("a@src.test", (f"u{i}@slow.test",)), MSG)
        for _ in range(5):
            sched.run_pass()
            await asyncio.sleep(0.005)
        fast = [spool.enqueue(Envelope("a@src.test", (f"u{i}@fast.test",)), MSG) for i in range(5)]
        for _ in range(100):
            sched.run_pass()
            await asyncio.sleep(0.005)
            assert len(lane.ready) <= 10 and lane.active <= 5
            if all(m not in {q.msgid for q in spool.iter_messages()} for m in fast):
                break
        assert lane.per_domain.get("slow.test") == 2
        assert all(m not in {q.msgid for q in spool.iter_messages()} for m in fast)
        hang.set()
        await settle(sched)

    asyncio.run(scenario())
    assert spool.stats().messages == 0


def _job(msgid: int, domain: str):
    from engine.queue import Job
    return Job(msgid, 0, f"u@{domain}", "remote", 0, T0, T0, "a@src.test", 10, "network")


def test_ready_view_bounds_and_hands_back_skipped_keys():
    from engine.delivery.scheduler import ReadyJobs
    ready = ReadyJobs(capacity=8, per_domain_cap=4, skip_max=5)
    ready.add([_job(i, "busy.test") for i in range(20)])
    assert len(ready) == 4 and len(ready.skipped) == 5          # the rest is forgotten
    assert ready.forgot                                          # ...and that is known
    claimed = ready.claimed(set())
    assert (0, 0) in claimed and (4, 0) in claimed and (19, 0) not in claimed
    ready.add([_job(100, "other.test")])
    assert len(ready) == 5
    busy = {"busy.test"}
    ready.drop_blocked(lambda d: d in busy)
    assert len(ready) == 1 and len(ready.skipped) == 5          # still bounded
    busy.clear()
    assert ready.release_skipped(lambda d: d in busy) == [(4, 0), (5, 0)]
    assert len(ready.skipped) == 3                               # half a cap handed back, oldest first
    assert (4, 0) not in ready.skipped and (5, 0) not in ready.skipped
    assert ready.pop("other.test", 10) == (100, [_job(100, "other.test")])
    assert ready.pop("other.test", 10) is None


def test_hup_reload_of_locals_applies_to_new_mail(env):
    sched, spool, remote, clock, log, tmp = env
    first = spool.enqueue(Envelope("a@src.test", ("x@newlocal.test",)), MSG)
    asyncio.run(settle(sched))
    assert remote.calls == [("newlocal.test", "a@src.test", ("x@newlocal.test",))]
    sched.reload_domains(DomainConfig.build(me="mx.test", locals=["mx.test", "newlocal.test"],
                                            virtualdomains=["virt.test:alias"]).resolve)
    second = spool.enqueue(Envelope("a@src.test", ("x@newlocal.test", "y@virt.test")), MSG)
    asyncio.run(settle(sched))
    assert len(remote.calls) == 1                      # nothing more went remote
    assert [(r.channel, r.address, r.state) for r in spool.message_info(second).recipients] == [
        ("local", "x@newlocal.test", "pending"), ("local", "alias-y@virt.test", "pending")]
    assert first not in {m.msgid for m in spool.iter_messages()}


def test_concurrencyremote_zero_holds_remote_mail(env):
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(concurrency={"remote": 0}, bounce=sched.config.bounce)
    mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert remote.calls == [] and spool.message_info(mid).recipients[0].state == "pending"


def test_backlog_of_one_destination_is_read_once_not_per_pass(env):
    """250,000 due recipients of a busy destination once made every read of the
    due table pass over all those held back (O(n) per read): the scan watermark
    resumes after the last job read, remembered keys are looked up directly,
    and keys that could not be remembered are found by a read from the start
    once the end is reached. Everything is delivered, none twice."""
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(concurrency={"remote": 4}, per_destination=2, scan_batch=20,
                                   skip_max=50, bounce=sched.config.bounce)
    from engine.delivery.scheduler import ReadyJobs
    sched.lane("remote").ready = ReadyJobs(20, skip_max=50)         # forgets most of the backlog at first
    reads = {"from_start": 0, "resumed": 0}
    real_due = spool.due

    def counting_due(*args, after=None, **kw):
        reads["resumed" if after is not None else "from_start"] += 1
        return real_due(*args, after=after, **kw)

    spool.due = counting_due
    for i in range(400):
        spool.enqueue(Envelope("a@src.test", (f"u{i}@busy.test",)), MSG)
    other = spool.enqueue(Envelope("a@src.test", ("v@other.test",)), MSG)

    async def drain():
        sched._wake = asyncio.Event()
        deadline = time.monotonic() + 20
        while spool.stats().messages and time.monotonic() < deadline:
            sched.run_pass()
            await asyncio.sleep(0.002)
        await settle(sched)

    asyncio.run(drain())
    delivered = [rcpts for _d, _s, rcpts in remote.calls]
    assert sorted(r for rs in delivered for r in rs) == sorted(
        [f"u{i}@busy.test" for i in range(400)] + ["v@other.test"])     # all, once each
    assert spool.stats().messages == 0 and other not in {q.msgid for q in spool.iter_messages()}
    assert reads["resumed"] > reads["from_start"]
    assert reads["from_start"] <= 40, reads          # not one full pass per read


def test_reload_takes_new_limits_while_deliveries_run(env):
    sched, spool, remote, clock, log, tmp = env
    sched.reload(SchedulerConfig(concurrency={"remote": 2}, per_destination=20, scan_batch=64,
                                 bounce=sched.config.bounce))

    async def scenario():
        sched._wake = asyncio.Event()
        remote.gate = asyncio.Event()
        for i in range(8):
            spool.enqueue(Envelope("a@src.test", (f"u{i}@d{i}.test",)), MSG)
        await passes_until(sched, lambda: sched.lane("remote").active >= 2, "2 deliveries")
        assert sched.lane("remote").active == 2
        # concurrencyremote raised (a HUP): the next pass starts more at once,
        # the two in flight go on under the old snapshot.
        sched.reload(SchedulerConfig(concurrency={"remote": 5}, per_destination=20, scan_batch=64,
                                     bounce=sched.config.bounce))
        await passes_until(sched, lambda: sched.lane("remote").active >= 5, "5 deliveries")
        assert sched.lane("remote").active == 5
        remote.gate.set()
        await settle(sched)

    asyncio.run(scenario())
    assert len(remote.calls) == 8 and spool.stats().messages == 0
    assert sched.lane("remote").ready.capacity == 64


def test_reload_of_queuelifetime_applies_to_the_next_deferral(env):
    sched, spool, remote, clock, log, tmp = env
    remote.down.add("d1.test")
    mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert spool.message_info(mid).recipients[0].state == "deferred"
    clock.now += 3600                     # an hour old: young under a week's queuelifetime
    sched.reload(SchedulerConfig(retry=RetryPolicy(queuelifetime=60), bounce=sched.config.bounce))
    sched.request_flush()
    asyncio.run(settle(sched))
    # ...but past a 60 s one: the deferral became a failure (and a bounce).
    assert any(t.endswith("I'm_not_going_to_try_again;_this_message_has_been_in_the_queue_too_long./")
               for t in log_texts(tmp))


def test_flush_during_an_attempt_makes_its_deferral_due_at_once(env):
    """qmail's ALRM is for everything deferred; an attempt running when it comes
    and deferring just after is tried once more at once, not at its next slot
    (400 s here); that next try defers on the normal schedule."""
    sched, spool, remote, clock, log, tmp = env
    remote.down.add("d1.test")

    async def scenario():
        sched._wake = asyncio.Event()
        remote.gate = asyncio.Event()
        mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
        deadline = time.monotonic() + 10
        while remote.running == 0 and time.monotonic() < deadline:
            sched.run_pass()
            await asyncio.sleep(0.002)
        assert remote.running == 1
        sched.request_flush()
        remote.gate.set()
        await settle(sched)
        return mid

    mid = asyncio.run(scenario())
    assert len(remote.calls) == 2                     # the flushed attempt, then one more at once
    r = spool.message_info(mid).recipients[0]
    assert r.state == "deferred" and r.attempts == 2 and r.next_try == T0 + 400


def test_an_attempt_under_way_when_requeued_that_defers_is_tried_again_at_once(env):
    """`qrelay requeue` is a flush of some messages: as after ALRM, an attempt
    already running when it commits and deferring just after is tried once
    more at once, not at its next slot (400 s here). A hold, a release or a
    requeue of other messages leaves such an attempt's next try as it was."""
    sched, spool, remote, clock, log, tmp = env
    remote.down.add("d1.test")

    async def scenario():
        sched._wake = asyncio.Event()
        remote.gate = asyncio.Event()
        mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
        other = spool.enqueue(Envelope("a@src.test", ("y@d1.test",)), MSG)
        deadline = time.monotonic() + 10
        while remote.running < 2 and time.monotonic() < deadline:
            sched.run_pass()
            await asyncio.sleep(0.002)
        assert remote.running == 2
        clock.now = T0 + 5
        assert spool.requeue([mid]) == 1
        assert spool.hold([other]) == 1 and spool.release_held([other]) == 1
        remote.gate.set()
        await settle(sched)
        return mid, other

    mid, other = asyncio.run(scenario())
    assert sorted(c[2] for c in remote.calls) == [("x@d1.test",), ("x@d1.test",), ("y@d1.test",)]
    r = spool.message_info(mid).recipients[0]
    assert r.state == "deferred" and r.attempts == 2
    assert r.next_try == sched.config.retry.next_try(T0, T0 + 5, "remote") > T0 + 400
    r = spool.message_info(other).recipients[0]
    assert r.state == "deferred" and r.attempts == 1 and r.next_try == T0 + 400


def test_loop_keeps_dispatching_while_a_commit_waits_on_the_disk(env):
    """The scheduler's spool writes run in its commit thread: while one waits
    (a slow sync, LMDB's write lock), the loop goes on starting deliveries; a
    recipient whose result is not committed yet is not handed out again, and
    is marked only once the commit is done."""
    import threading
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(concurrency={"remote": 1}, mark_delay=0.0,
                                   bounce=sched.config.bounce)
    disk = threading.Event()
    real_commit = spool.commit

    def slow_commit(results=(), *args, **kw):
        if results:
            assert disk.wait(20)
        return real_commit(results, *args, **kw)

    spool.commit = slow_commit
    ids = [spool.enqueue(Envelope("a@src.test", (f"u{i}@d{i}.test",)), MSG) for i in range(3)]

    async def scenario():
        sched._wake = asyncio.Event()
        deadline = time.monotonic() + 10
        while len(remote.calls) < 3 and time.monotonic() < deadline:
            t = time.monotonic()
            sched.run_pass()
            assert time.monotonic() - t < 1.0          # never waits for the commit
            await asyncio.sleep(0.002)
        # all three delivered one after the other while the first commit waits
        assert sorted(c[0] for c in remote.calls) == ["d0.test", "d1.test", "d2.test"]
        assert sched._commit is not None and not sched.idle()
        assert all(spool.message_info(m).recipients[0].state == "pending" for m in ids)
        for _ in range(20):                             # nothing handed out twice
            sched.run_pass()
            await asyncio.sleep(0.002)
        assert len(remote.calls) == 3
        disk.set()
        await settle(sched)

    asyncio.run(scenario())
    assert len(remote.calls) == 3 and spool.stats().messages == 0
    assert all(f"end msg {m}" in log_texts(tmp) for m in ids)


def test_a_failed_commit_of_results_is_tried_again_not_delivered_again(env, monkeypatch):
    # The recipients of results the spool could not record (a full disk) were
    # let go at once: delivered again at every pass while the disk stayed
    # full (151 copies in 2 s to one recipient here). They stay in flight
    # now, and their results are committed again, later.
    from engine.delivery import scheduler as scheduler_module
    from engine.queue import SpoolError
    monkeypatch.setattr(scheduler_module, "UNRECORDED_RETRY", 0.05, raising=False)
    sched, spool, remote, clock, log, tmp = env
    real_commit = spool.commit
    failures = []

    def failing_for_a_while(results=(), *args, **kw):
        if results and len(failures) < 3:
            failures.append(len(results))
            raise SpoolError("cannot record delivery results: the disk holding the spool index is full")
        return real_commit(results, *args, **kw)

    spool.commit = failing_for_a_while
    mid = spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert failures == [1, 1, 1] and len(remote.calls) == 1
    assert spool.stats().messages == 0
    texts = log_texts(tmp)
    assert sum("trouble marking results: cannot record delivery results" in t
               for t in texts) == 3, texts
    assert sum(t.startswith("delivery ") for t in texts) == 1
    assert f"end msg {mid}" in texts


def test_results_that_cannot_be_recorded_at_stop_are_left_for_the_restart(env):
    from engine.queue import SpoolError
    sched, spool, remote, clock, log, tmp = env

    def failing(results=(), *args, **kw):
        raise SpoolError("cannot record delivery results: the disk holding the spool index is full")

    async def scenario():
        sched._wake = asyncio.Event()
        spool.enqueue(Envelope("a@src.test", ("x@d1.test",)), MSG)
        # preprocessed and delivered, not yet recorded
        await passes_until(sched, lambda: remote.calls, "the delivery")
        spool.commit = failing
        await asyncio.wait_for(sched.commit_all(), 5)     # one try, then it gives up
    asyncio.run(scenario())
    assert len(remote.calls) == 1 and spool.stats().messages == 1


def test_a_held_message_is_not_bounced_until_released(env):
    sched, spool, remote, clock, log, tmp = env
    remote.rules["bad@d1.test"] = ("D", NOUSER)
    # Finished with a failure while no scheduler ran (its bounce not yet queued), then held.
    a = spool.enqueue(Envelope("a@src.test", ("bad@d1.test",)), MSG)
    spool.preprocess(a, ["remote"])
    spool.mark_failed(a, 0, NOUSER)
    assert spool.hold([a]) == 1

    async def held_in_flight():
        # Held while its last recipient's delivery runs; that delivery fails.
        sched._wake = asyncio.Event()
        remote.gate = asyncio.Event()
        b = spool.enqueue(Envelope("b@src.test", ("bad@d1.test",)), MSG)
        await passes_until(sched, lambda: sched.lane("remote").per_domain.get("d1.test"),
                           "the delivery")
        assert sched.lane("remote").per_domain.get("d1.test") == 1
        assert spool.hold([b]) == 1
        remote.gate.set()
        await settle(sched)
        return b

    b = asyncio.run(held_in_flight())
    assert _bounces(remote) == []
    assert all(spool.message_info(m).held and spool.message_info(m).bouncing for m in (a, b))
    assert spool.bouncing() == []
    assert spool.release_held([a, b]) == 2
    sched._next_bounce_scan = 0
    asyncio.run(settle(sched))
    assert sorted(c[2] for c, _ in _bounces(remote)) == [("a@src.test",), ("b@src.test",)]
    assert spool.stats().messages == 0


def test_pulling_deferred_mail_forward_is_not_counted_as_an_attempt(env):
    sched, spool, remote, clock, log, tmp = env
    remote.down.add("d1.test")
    mid = spool.enqueue(Envelope("a@src.test", ("u0@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert spool.message_info(mid).recipients[0].attempts == 1
    remote.down.clear()
    remote.rules["u0@d1.test"] = ("Z", "greylisted, try later\n")
    clock.now = T0 + 10
    spool.enqueue(Envelope("a@src.test", ("new@d1.test",)), MSG)   # d1 recovers
    asyncio.run(settle(sched))
    assert [c[2] for c in remote.calls] == [("u0@d1.test",), ("new@d1.test",), ("u0@d1.test",)]
    r = spool.message_info(mid).recipients[0]
    assert (r.state, r.attempts, r.text) == ("deferred", 2, "greylisted, try later\n")


def test_a_message_deleted_as_it_finishes_with_a_failure_is_not_bounced(env):
    sched, spool, remote, clock, log, tmp = env
    a = spool.enqueue(Envelope("a@src.test", ("bad@d1.test",)), MSG)
    spool.preprocess(a, ["remote"])
    finished = spool.mark_failed(a, 0, NOUSER)      # as the commit thread records it...
    assert finished is not None and finished.failed
    assert spool.delete([a]) == 1                   # ...`qrelay delete` commits next...

    async def collect():
        sched._wake = asyncio.Event()
        sched._complete(finished)                   # ...and then the loop collects it
        await settle(sched)

    asyncio.run(collect())
    assert _bounces(remote) == [] and spool.stats().messages == 0
    assert spool.todo(10) == []                     # no bounce queued either


def test_a_verp_sender_is_sent_per_recipient_as_qmail_send_makes_it(env):
    """qmail-send's VERP (ezmlm's lists, a .qmail -owner-default): a sender
    `pre@host-@[]` goes out as `pre<rbox>=<rhost>@host`, one envelope per
    recipient; the bounce of one goes to the sender without `-@[]`."""
    sched, spool, remote, clock, log, tmp = env
    remote.rules["bad@d1.test"] = ("D", NOUSER)
    mid = spool.enqueue(Envelope("list-return-7-@lists.test-@[]",
                                 ("x@d1.test", "bad@d1.test", "z@d2.test")), MSG)
    asyncio.run(settle(sched))
    sent = sorted(c for c in remote.calls if c[1])
    assert sent == [("d1.test", "list-return-7-bad=d1.test@lists.test", ("bad@d1.test",)),
                    ("d1.test", "list-return-7-x=d1.test@lists.test", ("x@d1.test",)),
                    ("d2.test", "list-return-7-z=d2.test@lists.test", ("z@d2.test",))]
    (bounce,) = _bounces(remote)
    assert bounce[0] == ("lists.test", "", ("list-return-7-@lists.test",))
    assert spool.stats().messages == 0 and f"end msg {mid}" in log_texts(tmp)


def test_a_bounce_waits_when_its_message_cannot_be_read_now(env, monkeypatch):
    """The original refused to be read (EACCES, EIO): its bounce waits and goes
    later with the original's text, rather than at once without it."""
    from engine.queue import MessageUnreadable
    sched, spool, remote, clock, log, tmp = env
    remote.rules["bad@d1.test"] = ("D", NOUSER)
    real = spool.read_message
    refusing = {"on": True}

    def read_message(msgid, **kw):
        if refusing["on"] and remote.calls:         # after the delivery: the bounce's read
            raise MessageUnreadable(f"#{msgid}: Permission denied")
        return real(msgid, **kw)
    monkeypatch.setattr(spool, "read_message", read_message)
    mid = spool.enqueue(Envelope("a@src.test", ("bad@d1.test",)), MSG)
    asyncio.run(settle(sched))
    assert not _bounces(remote) and spool.message_info(mid).bouncing
    assert (f"warning: trouble reading msg {mid} for its bounce: #{mid}: Permission denied, "
            "will try later") in log_texts(tmp)
    refusing["on"] = False
    sched.monotonic = lambda: time.monotonic() + BOUNCE_RETRY_SECONDS + 1   # 123 s later
    sched._next_bounce_scan = 0
    asyncio.run(settle(sched))
    ((_, raw),) = _bounces(remote)
    assert b"hello" in raw and spool.stats().messages == 0


def test_a_big_message_is_not_read_whole_to_bounce_its_header(env, monkeypatch):
    """A bounce copies at most max_copy_bytes of the original, else its
    header only: the scheduler read 64 MiB (twice over, for the check) to
    return a few lines of it. It reads the head, the rest only for its crc."""
    sched, spool, remote, clock, log, tmp = env
    remote.rules["bad@d1.test"] = ("D", NOUSER)
    real = spool.read_message
    bounce_reads = []

    def read_message(msgid, **kw):
        got = real(msgid, **kw)
        if remote.calls:                            # after the delivery: the bounce's read
            bounce_reads.append(len(got))
        return got
    monkeypatch.setattr(spool, "read_message", read_message)
    big = MSG + b"x" * (3 * sched.config.bounce.max_copy_bytes) + b"\r\n"
    spool.enqueue(Envelope("a@src.test", ("bad@d1.test",)), big)
    asyncio.run(settle(sched))
    ((_, raw),) = _bounces(remote)
    assert b"Content-Type: text/rfc822-headers" in raw and b"Subject: t\r\n" in raw
    assert b"hello" not in raw and spool.stats().messages == 0
    assert bounce_reads and max(bounce_reads) <= sched.config.bounce.max_copy_bytes + 2


def test_a_bounce_that_fails_to_build_stops_nothing_else(env, monkeypatch):
    """A bug met by one message's bounce (969fd90: a sender no code expected)
    crashed the scheduler at every restart: nothing was delivered for anyone.
    It is an alert line for that message, retried later; the rest goes on."""
    import engine.delivery.scheduler as scheduler_module
    sched, spool, remote, clock, log, tmp = env
    remote.rules["bad@d1.test"] = ("D", NOUSER)
    real = scheduler_module.build_bounce

    def broken(*args, **kwargs):
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
    monkeypatch.setattr(scheduler_module, "build_bounce", broken)
    bad = spool.enqueue(Envelope("a@src.test", ("bad@d1.test",)), MSG)
    asyncio.run(settle(sched))
    good = spool.enqueue(Envelope("a@src.test", ("x@d2.test",)), MSG)
    asyncio.run(settle(sched))
    assert ("d2.test", "a@src.test", ("x@d2.test",)) in remote.calls
    assert spool.message_info(bad).bouncing and f"end msg {good}" in log_texts(tmp)
    assert any(t.startswith(f"alert: trouble bouncing msg {bad}: UnicodeEncodeError")
               for t in log_texts(tmp))
    monkeypatch.setattr(scheduler_module, "build_bounce", real)
    sched.monotonic = lambda: time.monotonic() + BOUNCE_RETRY_SECONDS + 1   # 123 s later
    sched._next_bounce_scan = 0
    asyncio.run(settle(sched))
    assert len(_bounces(remote)) == 1 and spool.stats().messages == 0


def test_a_bounce_names_the_recipient_without_its_virtualdomains_prepend(env):
    """qmail-send's stripvdomprepend: a virtual domain's mailbox is delivered
    as `prepend-joe@virt.test`, but its bounce names `joe@virt.test`, the
    address the sender used (vpopmail's `virt.test:virt.test` made every such
    bounce read `<virt.test-joe@virt.test>`)."""
    sched, spool, remote, clock, log, tmp = env
    local = FakeRemote()
    local.rules["virt.test-joe@virt.test"] = ("D", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    local.rules["alias-ann-marie@whole.test"] = ("D", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    sched.lane("local").courier = ReadingCourier(spool, local)
    sched.reload_domains(DomainConfig.build(
        me="mx.test", locals=["mx.test"],
        virtualdomains=["virt.test:virt.test", "ann-marie@whole.test:alias"]).resolve)
    spool.enqueue(Envelope("a@src.test", ("joe@virt.test", "ann-marie@whole.test")), MSG)
    asyncio.run(settle(sched))
    assert sorted(c[2] for c in local.calls) == [("alias-ann-marie@whole.test",),
                                                 ("virt.test-joe@virt.test",)]
    ((_, raw),) = _bounces(remote)
    text = raw.decode()
    assert "<joe@virt.test>:\r\nSorry, no mailbox" in text
    assert "<ann-marie@whole.test>:\r\nSorry, no mailbox" in text
    assert "Final-Recipient: rfc822; joe@virt.test\r\n" in text
    assert "virt.test-joe" not in text and "alias-ann" not in text


def test_a_clock_set_back_does_not_stop_the_scan_for_bounces_to_queue(env):
    """The scan for finished messages whose bounce is not queued (a crash, a
    failed injection, a message released from hold; it also indexes what a
    stopped writer left) was timed by the wall clock: set back an hour, it
    did not run for that hour. Its timers are monotonic."""
    sched, spool, remote, clock, log, tmp = env
    ahead = {"s": 0.0}
    sched.monotonic = lambda: time.monotonic() + ahead["s"]
    remote.rules["bad@d1.test"] = ("D", NOUSER)
    a = spool.enqueue(Envelope("a@src.test", ("bad@d1.test",)), MSG)
    spool.preprocess(a, ["remote"])
    spool.mark_failed(a, 0, NOUSER)
    assert spool.hold([a]) == 1
    asyncio.run(settle(sched))                      # scanned: nothing to bounce (held)
    clock.now = T0 - 3600                           # the wall clock is set back an hour
    ahead["s"] += BOUNCE_SCAN_INTERVAL + 1
    assert spool.release_held([a]) == 1
    asyncio.run(settle(sched))
    assert [c for c, _ in _bounces(remote)] == [("src.test", "", ("a@src.test",))]
    assert spool.stats().messages == 0


def test_a_double_bounce_a_local_mailbox_forwards_is_not_bounced_again(env):
    """A double bounce is delivered locally with qmail's sender `#@[]`
    (qmail-local writes `Return-Path: <#@[]>`), so what postmaster's .qmail
    forwards of it keeps that sender and its failure is a triple bounce,
    discarded. Handed `<>` instead, the failed forward became a new double
    bounce to postmaster, forwarded again: a loop without end."""
    from engine.delivery.channels import Forward
    sched, spool, remote, clock, log, tmp = env
    senders = []

    class Forwarding:   # postmaster's .qmail: `&admin@far.test`, sent on with the same sender
        async def deliver(self, domain, sender, recipients, message):
            senders.append(sender)
            return [RecipientResult(r, "K", "did 0+1+0/\n",
                                    (Forward(sender, ("admin@far.test",),
                                             b"Delivered-To: postmaster@mx.test\r\n", 0, True),))
                    for r in recipients]

        async def close(self):
            pass

    sched.lane("local").courier = ReadingCourier(spool, Forwarding())
    remote.rules["a@src.test"] = ("D", NOUSER)
    remote.rules["admin@far.test"] = ("D", NOUSER)
    spool.enqueue(Envelope("", ("a@src.test",)), MSG)      # a bounce that fails

    asyncio.run(settle(sched))      # the loop never settled: each forward bounced again
    assert senders == [DOUBLE_BOUNCE_SENDER]
    forwarded = [c for c in remote.calls if c[2] == ("admin@far.test",)]
    assert forwarded == [("far.test", DOUBLE_BOUNCE_SENDER, ("admin@far.test",))]
    assert sum(t.startswith("triple bounce: discarding bounce/") for t in log_texts(tmp)) == 1
    assert spool.stats().messages == 0


def test_messages_bouncing_at_once_are_released_in_group_commits(env):
    """Thousands of messages whose queuelifetime passes at once: each one's
    release after its bounce was a durable transaction of its own on the
    loop (a sync each, ~340 a second, every delivery waiting meanwhile).
    They go into the scheduler's group commits now."""
    sched, spool, remote, clock, log, tmp = env
    for i in range(60):
        remote.rules[f"bad{i}@d{i % 3}.test"] = ("D", NOUSER)
    ids = [spool.enqueue(Envelope("a@src.test", (f"bad{i}@d{i % 3}.test",)), MSG)
           for i in range(60)]
    writes = []
    real_write = spool.index.write

    def counting(what, *args, **kw):
        writes.append(what)
        return real_write(what, *args, **kw)
    spool.index.write = counting
    asyncio.run(settle(sched))
    assert len(_bounces(remote)) == 60 and spool.stats().messages == 0
    texts = log_texts(tmp)
    assert all(f"end msg {m}" in texts for m in ids)
    assert [w for w in writes if w.startswith("release")] == []
    assert len(writes) < 30, writes


def test_a_hung_destination_with_more_due_than_the_skip_memory_is_not_reread(env):
    """A destination that does not answer, with more due recipients than
    skip_max can remember: once the due table's end was reached, it was read
    again from the start every RESCAN_MIN_SECONDS, decoding every forgotten
    recipient to forget it again (30 % of a core, for ever, with 250,000
    queued for one hung domain). It is read again only once a destination
    whose keys were forgotten can take more; other mail still goes."""
    from engine.delivery.scheduler import ReadyJobs
    sched, spool, remote, clock, log, tmp = env
    sched.config = SchedulerConfig(concurrency={"remote": 4}, per_destination=2, scan_batch=20,
                                   skip_max=50, bounce=sched.config.bounce)
    lane = sched.lane("remote")
    lane.ready = ReadyJobs(20, skip_max=50)
    mono = [time.monotonic()]
    sched.monotonic = lambda: mono[0]
    read: list = []
    real_due = spool.due

    def counting_due(*args, **kw):
        jobs = real_due(*args, **kw)
        read.extend(jobs)
        return jobs

    spool.due = counting_due

    async def passes(n: int) -> None:
        for _ in range(n):
            sched.run_pass()
            mono[0] += 0.05         # poll_interval: RESCAN_MIN_SECONDS is 20 passes
            await asyncio.sleep(0.001)

    async def scenario():
        sched._wake = asyncio.Event()
        hang = asyncio.Event()
        real = remote.deliver

        async def deliver(domain, sender, rcpts, message):
            if domain == "slow.test":
                await hang.wait()
            return await real(domain, sender, rcpts, message)

        remote.deliver = deliver
        for i in range(400):
            spool.enqueue(Envelope("a@src.test", (f"u{i}@slow.test",)), MSG)
        await passes(150)           # the end of the due table reached
        assert lane.per_domain == {"slow.test": 2}
        read.clear()
        await passes(300)           # 15 s: before the 30 s safety-net read
        assert len(read) < 100, f"{len(read)} due recipients read again for nothing"
        clock.now += 1              # new mail, due after the backlog's last entry
        fast = spool.enqueue(Envelope("a@src.test", ("v@fast.test",)), MSG)
        await passes(20)
        assert fast not in {q.msgid for q in spool.iter_messages()}
        hang.set()
        deadline = time.monotonic() + 20
        while spool.stats().messages and time.monotonic() < deadline:
            await passes(1)
        await settle(sched)

    asyncio.run(scenario())
    assert spool.stats().messages == 0
    assert len([c for c in remote.calls if c[0] == "slow.test"]) == 400
