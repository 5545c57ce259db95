"""engine.queue.spool: enqueue/submit, scheduler API, faults, versions, quarantine."""
from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import lmdb
import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.config.settings import SpoolSettings
from engine.queue import (Deferred, Delivered, Envelope, Failed, MessageNotFound,
                          Spool, SpoolError, SpoolVersionError,
                          SpoolWriteError)
from engine.queue import records as R
from engine.queue.segments import SegmentIO


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(tmp_path / "queue")
    try:
        yield s
    finally:
        s.close()


def env(*rcpts: str, sender: str = "joe@example.com") -> Envelope:
    return Envelope(sender, tuple(rcpts), pid=4242, uid=89)


def test_enqueue_is_readable_and_counted(spool: Spool):
    a = spool.enqueue(env("bob@example.net"), b"Subject: a\r\n\r\nbody\r\n")
    b = spool.enqueue(env("c@x", "d@y"), b"second")
    assert a != b
    assert spool.read_message(a) == b"Subject: a\r\n\r\nbody\r\n"
    assert spool.read_message(b) == b"second"
    assert spool.stats() == (2, 2)
    assert spool.todo() == [a, b]
    assert spool.envelope(b) == Envelope("joe@example.com", ("c@x", "d@y"), 4242, 89, "network")


def test_writing_a_message_copies_it_once(spool: Spool):
    # The spool writer holds every message of a batch while it writes them:
    # the batch's one write buffer is the only copy (each message was first
    # copied into a record of its own, then the records into the buffer).
    import tracemalloc
    spool.enqueue(env("a@x"), b"warm up")
    message = b"x" * (20 * 1024 * 1024)
    tracemalloc.start()
    try:
        [msgid] = spool._write_batch([(env("bob@example.net"), message)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert spool.read_message(msgid) == message
    assert peak < 1.5 * len(message), peak


def test_ids_survive_reopen_and_never_repeat(tmp_path: Path):
    with Spool(tmp_path / "q") as s:
        first = {s.enqueue(env("a@b"), b"x") for _ in range(5)}
    with Spool(tmp_path / "q") as s:
        second = {s.enqueue(env("a@b"), b"y") for _ in range(5)}
        assert not first & second
        assert s.stats().messages == 10
        for msgid in first:
            assert s.read_message(msgid) == b"x"


def test_submit_group_commits_concurrent_writers(tmp_path: Path):
    syncs = []
    io = SegmentIO(fdatasync=lambda fd: (syncs.append(fd), os.fdatasync(fd)))
    with Spool(tmp_path / "q", io=io) as s:
        async def main():
            return await asyncio.gather(*(s.submit(env(f"r{i}@x"), b"m%d" % i, indexed=True)
                                          for i in range(200)))
        ids = asyncio.run(main())
        assert len(set(ids)) == 200
        assert [s.read_message(i) for i in ids] == [b"m%d" % i for i in range(200)]
    # 200 messages made durable with far fewer fsyncs than messages.
    assert len(syncs) < 50


def test_threads_share_blocking_enqueue(spool: Spool):
    out: dict[int, bytes] = {}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(k: int):
        start.wait()  # all race to the first enqueue (one committer must be made)
        for i in range(20):
            data = b"%d-%d" % (k, i)
            msgid = spool.enqueue(env("a@b"), data)
            with lock:
                out[msgid] = data
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 160
    assert spool.stats().messages == 160
    assert all(spool.read_message(m) == data for m, data in out.items())
    assert spool.recover(verify_bytes=True).quarantined == []


def test_scheduler_flow_delivers_and_releases_bytes(tmp_path: Path):
    now = 1_000_000.0
    with Spool(tmp_path / "q", SpoolSettings(segment_max_age=10**6, orphan_grace=10**7),
               clock=lambda: now) as s:
        m = s.enqueue(env("joe@local", "bob@remote"), b"hello")
        assert s.preprocess(m, ["local", "remote"], ["joe-rewritten@local", "bob@remote"],
                            now=now) is None
        assert s.stats() == (1, 0)
        jobs = s.due(now, limit=10)
        assert [(j.index, j.channel, j.address, j.attempts) for j in jobs] == [
            (0, "local", "joe-rewritten@local", 0), (1, "remote", "bob@remote", 0)]
        assert [j.index for j in s.due(now, 10, channel="remote")] == [1]
        assert s.due(now, 10, exclude={(m, 0)})[0].index == 1
        assert s.mark_delivered(m, 0) is None
        s.mark_deferred(m, 1, now + 400, "connection refused")
        assert s.due(now + 399, 10) == []
        assert s.next_due() == pytest.approx(now + 400)
        job = s.due(now + 400, 10)[0]
        assert (job.attempts, job.last_error) == (1, "connection refused")
        fin = s.mark_delivered(m, 1)
        assert fin is not None and fin.released and fin.failed == ()
        assert fin.delivered == ("joe-rewritten@local", "bob@remote")
        assert s.stats() == (0, 0)
        with pytest.raises(MessageNotFound):
            s.read_message(m)
        # marks are idempotent: a replayed result for a gone message is ignored
        assert s.apply([Delivered(m, 1)]) == [None]
    # the segment was sealed at close and is empty: its file is gone
    with Spool(tmp_path / "q") as s:
        s.recover()
    assert list((tmp_path / "q" / "segments").iterdir()) == []


def test_failure_keeps_message_until_bounce_released(spool: Spool):
    m = spool.enqueue(env("a@x", "b@y"), b"data")
    spool.preprocess(m, ["remote", "remote"])
    fin = spool.apply([Failed(m, 0, "no such user"), Delivered(m, 1)])
    assert fin[0] is None
    assert fin[1].failed == (("a@x", "no such user"),) and not fin[1].released
    assert spool.read_message(m) == b"data"          # still there for the bounce
    assert [f.msgid for f in spool.bouncing()] == [m]
    info = spool.message_info(m)
    assert info.bouncing and all(r.done for r in info.recipients)
    spool.release(m)
    assert spool.bouncing() == [] and spool.stats() == (0, 0)


def test_zero_recipients_finish_at_preprocess(spool: Spool):
    m = spool.enqueue(env(), b"x")
    fin = spool.preprocess(m, [])
    assert fin is not None and fin.released
    assert spool.stats() == (0, 0)


def test_preprocess_errors(spool: Spool):
    m = spool.enqueue(env("a@b"), b"x")
    with pytest.raises(SpoolError):
        spool.preprocess(m, ["local", "remote"])
    with pytest.raises(SpoolError):
        spool.preprocess(m, ["smoke-signal"])
    spool.preprocess(m, ["local"])
    with pytest.raises(SpoolError, match="already"):
        spool.preprocess(m, ["local"])
    with pytest.raises(MessageNotFound):
        spool.preprocess(999999, ["local"])


def test_reschedule_all_makes_deferred_due_now(spool: Spool):
    ids = [spool.enqueue(env("a@b"), b"x") for _ in range(3)]
    for m in ids:
        spool.preprocess(m, ["remote"], now=100.0)
        spool.mark_deferred(m, 0, 10_000.0, "later")
    assert spool.due(200.0, 10) == []
    assert spool.reschedule_all(200.0) == 3
    assert sorted(j.msgid for j in spool.due(200.0, 10)) == ids


def test_reschedule_all_holds_a_chunk_of_keys_not_every_deferred_one(spool: Spool, monkeypatch):
    """A flush on a big queue moved every deferred entry through one list of
    their keys (15 MB for 250,000, in the scheduler too, at ALRM): it reads
    them RESCHEDULE_CHUNK at a time now, in the same transaction."""
    import tracemalloc

    from engine.queue import ledger
    monkeypatch.setattr(ledger, "RESCHEDULE_CHUNK", 100)
    for _ in range(4):
        ids = spool._write_batch([(env("a@far.test", "b@far.test"), b"x")] * 1000)
        spool.preprocess_many([(m, ["remote", "local"]) for m in ids], now=10_000.0)
    tracemalloc.start()
    try:
        assert spool.reschedule_all(200.0) == 8000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(spool.due(200.0, 10_000)) == 8000 and spool.due(199.0, 10) == []
    assert peak < 20 * 8000, f"reschedule_all held {peak} bytes for 8000 recipients"


def test_due_is_time_ordered_and_limited(spool: Spool):
    ids = [spool.enqueue(env("a@b"), b"x") for _ in range(10)]
    for k, m in enumerate(ids):
        spool.preprocess(m, ["remote" if k % 2 else "local"], now=100.0)
        spool.mark_deferred(m, 0, 1000.0 + (10 - k), "e")
    jobs = spool.due(5000.0, limit=4)
    assert [j.msgid for j in jobs] == list(reversed(ids))[:4]
    assert [j.next_try for j in jobs] == sorted(j.next_try for j in jobs)



def test_due_resumes_after_a_seen_job(spool: Spool):
    ids = [spool.enqueue(env("a@b", "c@d"), b"x") for _ in range(5)]
    for m in ids:
        spool.preprocess(m, ["remote", "remote"], now=100.0)  # all due at the same ms
    first = spool.due(200.0, 3, "remote")
    assert [(j.msgid, j.index) for j in first] == [(ids[0], 0), (ids[0], 1), (ids[1], 0)]
    last = first[-1]
    rest = spool.due(200.0, 100, "remote", after=(last.next_try, last.msgid, last.index))
    assert [(j.msgid, j.index) for j in rest] == [(m, i) for m in ids for i in (0, 1)][3:]
    assert spool.due(200.0, 100, "remote", after=(rest[-1].next_try, rest[-1].msgid, 1)) == []


def test_jobs_looks_up_keys_still_due(spool: Spool):
    ids = [spool.enqueue(env("a@b", "c@d"), b"x") for _ in range(3)]
    for m in ids:
        spool.preprocess(m, ["remote", "local"], now=100.0)
    spool.mark_delivered(ids[0], 0)
    spool.mark_deferred(ids[1], 0, 5000.0, "later")
    keys = [(ids[2], 0), (ids[0], 0), (ids[1], 0), (ids[2], 1), (999999, 0)]
    got = spool.jobs(keys, now=200.0, channel="remote")
    # delivered, not yet due, local and unknown keys are left out; order kept
    assert [(j.msgid, j.index, j.channel) for j in got] == [(ids[2], 0, "remote")]
    assert [(j.msgid, j.index) for j in spool.jobs(keys, now=6000.0)] == [
        (ids[2], 0), (ids[1], 0), (ids[2], 1)]


# ----------------------------------------------------------------------- faults

def test_disk_full_raises_write_error_and_commits_nothing(tmp_path: Path):
    fail = {"on": False}

    def pwrite(fd, data, offset):
        if fail["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)
    with Spool(tmp_path / "q", io=SegmentIO(pwrite=pwrite)) as s:
        good = s.enqueue(env("a@b"), b"ok")
        fail["on"] = True
        with pytest.raises(SpoolWriteError, match="No space"):
            s.enqueue(env("a@b"), b"lost")

        async def one():
            return await s.submit(env("a@b"), b"lost too")
        with pytest.raises(SpoolWriteError):
            asyncio.run(one())
        assert s.stats() == (1, 1)
        fail["on"] = False
        again = s.enqueue(env("a@b"), b"after")
        assert s.read_message(good) == b"ok" and s.read_message(again) == b"after"
        assert s.recover(verify_bytes=True).quarantined == []


@pytest.mark.parametrize("depth", [1, 4])
def test_fsync_error_raises_write_error_and_leaves_nothing_indexed(tmp_path: Path, depth):
    state = {"fail": False}

    def fdatasync(fd):
        if state["fail"]:
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)
    settings = SpoolSettings(sync_depth=depth)
    with Spool(tmp_path / "q", settings, io=SegmentIO(fdatasync=fdatasync)) as s:
        one = s.enqueue(env("a@b"), b"one")
        state["fail"] = True
        with pytest.raises(SpoolWriteError, match="Input/output"):
            s.enqueue(env("a@b"), b"two")
        assert s.stats() == (1, 1) and s.todo() == [one]
        state["fail"] = False
        three = s.enqueue(env("a@b"), b"three")     # into a new segment
        assert s.read_message(three) == b"three" and s.read_message(one) == b"one"
        assert s.recover(verify_bytes=True).quarantined == []


def test_full_index_map_raises_write_error(tmp_path: Path):
    small = SpoolSettings(index_map_bytes=256 * 1024)
    with Spool(tmp_path / "q", small) as s:
        with pytest.raises(SpoolWriteError):
            for _ in range(5000):
                s.enqueue(env("someone@example.com" * 3), b"x")
        n = s.stats().messages
        assert n > 0
        assert s.recover(verify_bytes=True).quarantined == []


def test_newer_format_version_refused(tmp_path: Path):
    with Spool(tmp_path / "q") as s:
        s.enqueue(env("a@b"), b"x")
    e = lmdb.open(str(tmp_path / "q" / "index"), max_dbs=8)
    meta = e.open_db(b"meta")
    with e.begin(write=True) as txn:
        txn.put(b"format", R.u32(R.SPOOL_FORMAT + 1), db=meta)
    e.close()
    with pytest.raises(SpoolVersionError, match="newer qrelay"):
        Spool(tmp_path / "q")
    with pytest.raises(SpoolVersionError):
        Spool(tmp_path / "q", readonly=True)


def test_readonly_spool_refuses_writes(tmp_path: Path):
    with Spool(tmp_path / "q") as s:
        s.enqueue(env("a@b"), b"x")
    with Spool(tmp_path / "q", readonly=True) as ro:
        assert ro.stats() == (1, 1)
        with pytest.raises(SpoolError, match="read-only"):
            ro.enqueue(env("a@b"), b"y")
    with pytest.raises(SpoolError, match="no spool"):
        Spool(tmp_path / "nothing", readonly=True)


def test_open_after_fork_rule(tmp_path: Path):
    s = Spool(tmp_path / "q")
    pid = os.fork()
    if pid == 0:  # child: using the parent's spool must fail cleanly
        try:
            s.enqueue(env("a@b"), b"x")
            os._exit(1)
        except SpoolError:
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    s.close()
    assert os.waitstatus_to_exitcode(status) == 0


# ----------------------------------------------------------------------- state machine

class RecipientStates(RuleBasedStateMachine):
    """Random enqueue / preprocess / deliver / defer / fail / release against a model."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.tmp = tempfile.TemporaryDirectory()
        self.now = 1000.0
        self.spool = Spool(Path(self.tmp.name) / "q",
                           SpoolSettings(segment_bytes=4096, orphan_grace=10**7,
                                         segment_max_age=10**6),
                           clock=lambda: self.now)
        self.model: dict[int, dict] = {}   # msgid -> {"rcpts": [state], "todo": bool, "data"}

    def teardown(self):
        self.spool.close()
        self.tmp.cleanup()

    def _active(self):
        return [(m, i) for m, v in self.model.items() if not v["todo"]
                for i, st_ in enumerate(v["rcpts"]) if st_ in ("pending", "deferred")]

    @rule(n=st.integers(0, 3), size=st.integers(0, 3000))
    def enqueue(self, n, size):
        data = os.urandom(size)
        m = self.spool.enqueue(env(*[f"r{i}@x" for i in range(n)]), data)
        assert m not in self.model
        self.model[m] = {"rcpts": ["todo"] * n, "todo": True, "data": data}

    @precondition(lambda self: any(v["todo"] for v in self.model.values()))
    @rule(data=st.data())
    def preprocess(self, data):
        m = data.draw(st.sampled_from(sorted(k for k, v in self.model.items() if v["todo"])))
        v = self.model[m]
        chans = data.draw(st.lists(st.sampled_from(["local", "remote"]),
                                   min_size=len(v["rcpts"]), max_size=len(v["rcpts"])))
        fin = self.spool.preprocess(m, chans, now=self.now)
        v["todo"] = False
        v["rcpts"] = ["pending"] * len(chans)
        if not chans:
            assert fin is not None and fin.released
            del self.model[m]
        else:
            assert fin is None

    @precondition(lambda self: self._active())
    @rule(data=st.data(), kind=st.sampled_from(["delivered", "deferred", "failed"]))
    def mark(self, data, kind):
        m, i = data.draw(st.sampled_from(self._active()))
        v = self.model[m]
        if kind == "deferred":
            assert self.spool.apply([Deferred(m, i, self.now + 50, "later")]) == [None]
            v["rcpts"][i] = "deferred"
            return
        res = Delivered(m, i) if kind == "delivered" else Failed(m, i, "nope")
        fin = self.spool.apply([res])[0]
        v["rcpts"][i] = kind
        if all(s in ("delivered", "failed") for s in v["rcpts"]):
            assert fin is not None
            assert fin.msgid == m
            assert len(fin.failed) == v["rcpts"].count("failed")
            if fin.released:
                assert not fin.failed
                del self.model[m]
            else:
                v["bouncing"] = True
        else:
            assert fin is None

    @precondition(lambda self: any(v.get("bouncing") for v in self.model.values()))
    @rule(data=st.data())
    def release(self, data):
        m = data.draw(st.sampled_from(sorted(k for k, v in self.model.items()
                                             if v.get("bouncing"))))
        assert self.spool.read_message(m) == self.model[m]["data"]
        self.spool.release(m)
        del self.model[m]

    @rule()
    def tick(self):
        self.now += 60

    @invariant()
    def counts_and_due_agree(self):
        stats = self.spool.stats()
        assert stats.messages == len(self.model)
        assert stats.not_preprocessed == sum(v["todo"] for v in self.model.values())
        due = {(j.msgid, j.index) for j in self.spool.due(self.now, limit=10_000)}
        expect = {(m, i) for m, v in self.model.items() if not v["todo"]
                  for i, s in enumerate(v["rcpts"]) if s == "pending"
                  or (s == "deferred" and True)}
        # deferred ones are due only when their time has come (now+50 after a tick)
        assert due <= expect
        assert {(m, i) for (m, i) in expect
                if self.model[m]["rcpts"][i] == "pending"} <= due
        views = {q.msgid: q for q in self.spool.iter_messages()}
        assert set(views) == set(self.model)
        for m, v in self.model.items():
            assert [r.state for r in views[m].recipients] == v["rcpts"]

    @invariant()
    def segments_only_hold_live_messages(self):
        report_segments = list((Path(self.tmp.name) / "q" / "segments").iterdir())
        # at most: one per live message plus the writer's current one
        assert len(report_segments) <= len(self.model) + 1


TestRecipientStates = RecipientStates.TestCase
TestRecipientStates.settings = hsettings(max_examples=25, stateful_step_count=30,
                                         deadline=None)


def test_closed_spool_refuses_enqueue(tmp_path: Path):
    s = Spool(tmp_path / "q")
    s.enqueue(env("a@b"), b"x")
    s.close()
    with pytest.raises(SpoolError, match="closed"):
        s.enqueue(env("a@b"), b"y")

    async def one():
        return await s.submit(env("a@b"), b"z")
    with pytest.raises(SpoolError, match="closed"):
        asyncio.run(one())
    s.close()  # twice is harmless


def test_sync_depth_is_capped(tmp_path: Path):
    before = threading.active_count()
    with Spool(tmp_path / "q", SpoolSettings(sync_depth=10**6)) as s:
        assert s.read_message(s.enqueue(env("a@b"), b"x")) == b"x"
        assert threading.active_count() - before <= 64 + 2   # sync slots, write and index


def test_the_default_warning_is_not_prefixed_twice(caplog):
    """Spool warnings are worded for qmail-send's log (`warning: …`); through
    the logger, whose line says `warning: queue:` itself, not twice."""
    import logging
    from engine.queue.spool import log_warning
    with caplog.at_level(logging.WARNING, logger="qrelay.queue"):
        log_warning("warning: quarantined #7: bad crc")
    assert [r.getMessage() for r in caplog.records] == ["quarantined #7: bad crc"]


def test_an_address_the_index_cannot_hold_is_refused_before_anything_is_written(spool: Spool):
    # Its segment records take it, its index record (a 16-bit length) not:
    # `qrelay inject` of a 70 KB recipient wrote it, then every index commit
    # failed, this message's and all after it ("refusing new mail").
    from engine.queue import AddressTooLong
    with pytest.raises(AddressTooLong, match="over the spool's 65535 bytes"):
        spool.enqueue(env("a" * 70_000 + "@far.test"), b"x")
    with pytest.raises(AddressTooLong):
        spool.enqueue(env("b@far.test", sender="é" * 40_000 + "@x"), b"x")   # bytes, not characters
    msgid = spool.enqueue(env("b@far.test"), b"next")
    assert spool.read_message(msgid) == b"next" and spool.stats().messages == 1


def test_commit_threads_that_cannot_start_are_a_write_error_and_none_is_left(
        spool: Spool, monkeypatch):
    """At the run user's process limit (ulimit -u: threads count), the group
    commit's threads could not all start: the threads started stayed, blocked
    for ever (holding that limit's room), and every message was refused with
    'spool is closed'. It is a write error that says why, the threads started
    end, and the next message once threads can start is committed."""
    started = 0
    real_start = threading.Thread.start

    def start(self):
        nonlocal started
        if self.name.startswith("spool-"):
            started += 1
            if started == 3:
                raise RuntimeError("can't start new thread")
        real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(SpoolWriteError, match="can't start new thread"):
        spool.enqueue(Envelope("a@b", ("c@d",)), b"hi\r\n")
    monkeypatch.undo()
    for _ in range(1000):
        if not any(t.name.startswith("spool-") for t in threading.enumerate()):
            break
        threading.Event().wait(0.01)
    assert [t.name for t in threading.enumerate() if t.name.startswith("spool-")] == []
    msgid = spool.enqueue(Envelope("a@b", ("c@d",)), b"hi\r\n")
    assert spool.read_message(msgid) == b"hi\r\n"
