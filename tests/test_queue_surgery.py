"""engine.queue.surgery: selection, qshape, hold/release/requeue/delete on a real spool."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.config.settings import SpoolSettings
from engine.queue import Deferred, Delivered, Envelope, Spool
from engine.queue.surgery import Selection

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spool(tmp_path: Path):
    clock = Clock()
    s = Spool(tmp_path / "queue", SpoolSettings(surgery_batch=2), clock=clock)
    s.test_clock = clock
    yield s
    s.close()


def queue(spool, sender: str, rcpts: tuple[str, ...], channels=None) -> int:
    msgid = spool.enqueue(Envelope(sender, rcpts), b"Subject: x\n\nbody\n")
    if channels is not False:
        spool.preprocess(msgid, channels or ["remote"] * len(rcpts))
    return msgid


def due_ids(spool, now: float) -> set[int]:
    return {j.msgid for j in spool.due(now, 1000)}


def test_select_by_each_criterion_and_their_conjunction(spool):
    a = queue(spool, "joe@src.test", ("x@a.test", "y@b.test"))
    spool.test_clock.now += 3600
    b = queue(spool, "", ("z@A.TEST",))
    c = queue(spool, "joe@src.test", ("w@c.test",))
    spool.mark_delivered(a, 0)          # a@a.test is done: no longer "at" a.test
    now = spool.test_clock.now
    assert spool.select(Selection(domain="a.test"), now) == ([b], [])
    assert spool.select(Selection(domain="b.test"), now) == ([a], [])
    assert spool.select(Selection(sender=""), now) == ([b], [])
    assert spool.select(Selection(sender="JOE@src.test"), now) == ([a, c], [])
    assert spool.select(Selection(older_than=1800), now) == ([a], [])
    assert spool.select(Selection(sender="joe@src.test", older_than=0), now) == ([a, c], [])
    assert spool.select(Selection(ids=(a, 999)), now) == ([a], [999])
    assert spool.select(Selection(ids=(a, b), domain="a.test"), now) == ([b], [a])


def test_shape_counts_messages_per_destination_and_age(spool):
    queue(spool, "s@x", ("a@big.test", "b@big.test", "c@small.test"))
    spool.test_clock.now += 7 * 60
    queue(spool, "s@x", ("d@big.test",))
    queue(spool, "s@x", ("e@todo.test",), channels=False)     # not yet preprocessed
    shape = spool.shape(spool.test_clock.now)
    assert shape.buckets == (5, 10, 20, 40, 80, 160, 320, 640, 1280)
    assert shape.total[:2] == (2, 1) and sum(shape.total) == 3
    assert shape.rows[0] == ("big.test", 2, (1, 1) + (0,) * 8)
    assert {r[0] for r in shape.rows} == {"big.test", "small.test", "todo.test"}
    assert [r[0] for r in spool.shape(spool.test_clock.now, top=1).rows] == ["big.test"]
    assert spool.shape(spool.test_clock.now, held=True).rows == ()


def test_hold_survives_flush_results_and_preprocess_then_release(spool):
    now = spool.test_clock.now
    a = queue(spool, "s@x", ("a@d.test", "b@d.test"))
    b = queue(spool, "s@x", ("c@d.test",))
    t = queue(spool, "s@x", ("t@d.test",), channels=False)
    spool.mark_deferred(a, 0, now + 400, "try later")
    assert spool.hold([a, t]) == 2
    assert spool.hold([a]) == 0                                  # already held
    assert due_ids(spool, now + 10_000) == {b}
    spool.reschedule_all(now + 1)                                # a flush
    assert due_ids(spool, now + 10_000) == {b}
    assert spool.jobs([(a, 1)], now + 10_000) == []              # the scheduler's lookups
    spool.apply([Deferred(a, 1, now + 5, "in flight when held")])
    assert due_ids(spool, now + 10_000) == {b}
    spool.preprocess(t, ["local"])                               # classified, still held
    assert due_ids(spool, now + 10_000) == {b}
    info = spool.message_info(a)
    assert info.held and [r.state for r in info.recipients] == ["deferred", "deferred"]
    assert spool.release_held([a, t, b]) == 2                    # b was not held
    jobs = {(j.msgid, j.index): j.next_try for j in spool.due(now + 10_000, 100)}
    assert jobs[(a, 0)] == now + 400 and jobs[(a, 1)] == now + 5  # each at its own time
    assert (t, 0) in jobs and not spool.message_info(a).held


def test_requeue_makes_unfinished_recipients_due_now(spool):
    now = spool.test_clock.now
    a = queue(spool, "s@x", ("a@d.test", "b@d.test"))
    spool.apply([Delivered(a, 0), Deferred(a, 1, now + 4000, "later")])
    spool.hold([a])
    spool.test_clock.now += 60
    assert spool.requeue([a]) == 1
    jobs = spool.due(now + 60, 100)
    assert [(j.index, j.next_try, j.attempts, j.last_error) for j in jobs] == [
        (1, now + 60, 1, "later")]
    assert not spool.message_info(a).held


def test_delete_frees_the_segment_like_completion(spool):
    ids = [queue(spool, "s@x", (f"r{i}@d.test",)) for i in range(5)]
    spool.close()
    s = Spool(spool.path, SpoolSettings(surgery_batch=2))        # seals the segment
    try:
        segs = os.listdir(s.path / "segments")
        assert len(segs) == 1
        assert s.delete(ids[:3] + [12345]) == 3
        assert os.listdir(s.path / "segments") == segs
        g = s.surgery_generation()
        assert s.delete(ids[3:]) == 2
        assert s.surgery_generation() > g
        assert os.listdir(s.path / "segments") == []
        assert s.stats().messages == 0 and s.due(T0 + 10**6, 10) == []
    finally:
        s.close()


def test_a_deleted_message_in_flight_records_nothing(spool):
    a = queue(spool, "s@x", ("a@d.test",))
    spool.delete([a])
    assert spool.apply([Delivered(a, 0)]) == [None]
    assert spool.stats().messages == 0


def test_readonly_open_of_a_spool_without_the_held_table(tmp_path: Path):
    import lmdb
    s = Spool(tmp_path / "queue")
    a = s.enqueue(Envelope("s@x", ("a@d.test",)), b"x")
    s.close()
    env = lmdb.open(str(tmp_path / "queue" / "index"), max_dbs=20)
    with env.begin(write=True) as txn:            # as an older qrelay left it
        for name in (b"held", b"imported"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
    env.close()
    r = Spool(tmp_path / "queue", readonly=True)
    try:
        assert not r.message_info(a).held
        assert r.shape(T0).total and r.select(Selection(domain="d.test"))[0] == [a]
    finally:
        r.close()
