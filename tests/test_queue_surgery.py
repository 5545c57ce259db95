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


def test_requeue_counts_only_what_it_changed(spool):
    """A message with nothing left to deliver (it waits for its bounce) is not
    requeued: `qrelay requeue` must not say it did something it did not."""
    from engine.queue import Failed
    a = queue(spool, "s@x", ("a@d.test",))
    b = queue(spool, "s@x", ("b@d.test",))
    spool.apply([Failed(a, 0, "no")])
    assert spool.requeue([a, b]) == 1
    spool.hold([a])             # held, its bounce waits: taking it off hold changes that
    assert spool.requeue([a]) == 1 and not spool.message_info(a).held


def test_a_held_message_whose_attempt_failed_is_still_selected_by_its_domain(spool):
    """`qrelay hold --domain D` while an attempt to D runs, which fails: the
    message is finished, its bounce waiting for the release. `qrelay release
    --domain D` must find it, or it stays held for ever."""
    from engine.queue import Failed
    now = spool.test_clock.now
    a = queue(spool, "s@x", ("a@far.test",))
    b = queue(spool, "s@x", ("b@far.test", "c@near.test"))
    assert spool.hold([a]) == 1
    spool.apply([Failed(a, 0, "no"), Failed(b, 0, "no")])
    assert spool.message_info(a).bouncing and spool.bouncing() == []
    # b's failure at far.test is bounced with c's result: nothing left there.
    assert spool.select(Selection(domain="far.test"), now) == ([a], [])
    assert spool.select(Selection(domain="near.test"), now) == ([b], [])
    assert spool.release_held([a]) == 1
    assert [f.msgid for f in spool.bouncing()] == [a]


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


def test_domain_is_the_part_after_the_last_at_sign(spool):
    a = queue(spool, "s@x", ("u@big.test",))
    b = queue(spool, "s@x", ("u@sub.big.test", "v@ig.test"))
    c = queue(spool, "s@x", ('"x@big.test"@other.test', "U@BIG.Test"))
    d = queue(spool, "s@x", ("big.test",))               # no @: the address is its domain
    queue(spool, "s@x", ("w@big.test.example",))
    now = spool.test_clock.now
    assert spool.select(Selection(domain="big.test."), now) == ([a, c, d], [])
    assert spool.select(Selection(domain="ig.test"), now) == ([b], [])
    assert spool.select(Selection(domain="test"), now) == ([], [])


def dump(path: Path) -> dict:
    """Every table of a closed spool's index, the surgery counter left out."""
    import lmdb
    env = lmdb.open(str(path / "index"), max_dbs=20, readonly=True, lock=False)
    try:
        out = {}
        with env.begin() as txn:
            for name, _ in txn.cursor():
                db = env.open_db(name, txn=txn, create=False)
                out[name] = {k: v for k, v in txn.cursor(db=db)
                             if not (name == b"meta" and k == b"surgery")}
        return out
    finally:
        env.close()


def test_batched_delete_leaves_what_one_drop_message_each_leaves(tmp_path: Path):
    """delete() removes a batch in one walk of each table
    (SpoolIndex.drop_messages): the index after it must be the same as after
    the removal of each message on its own (drop_message, the completion path)."""
    import shutil
    from engine.queue import Failed
    clock = Clock()
    s = Spool(tmp_path / "a" / "queue", SpoolSettings(surgery_batch=3), clock=clock)
    now = clock.now
    ids = [queue(s, "s@x", (f"a{i}@d.test", f"b{i}@e.test", f"c{i}@f.test"),
                 ["remote", "local", "remote"]) for i in range(12)]
    ids.append(queue(s, "s@x", ("t@d.test",), channels=False))             # todo
    s.apply([Delivered(ids[1], 0), Deferred(ids[1], 1, now + 600, "later"),
             Deferred(ids[2], 2, now + 60, "soon")])
    s.apply([Failed(ids[3], i, "no") for i in range(3)])                     # bouncing
    s.hold([ids[4], ids[5], ids[12]])
    s.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    gone = [ids[i] for i in (12, 0, 1, 2, 3, 4, 7, 8, 11)] + [999]             # any order
    s = Spool(tmp_path / "a" / "queue", SpoolSettings(surgery_batch=3), clock=clock)
    try:
        assert s.delete(gone) == 9
    finally:
        s.close()
    s = Spool(tmp_path / "b" / "queue", clock=clock)
    try:
        for msgid in sorted(set(gone) - {999}):
            unlink: list[int] = []
            with s.index.write("drop") as txn:
                s.index.drop_message(txn, msgid, s.index.message(txn, msgid).segid, unlink)
    finally:
        s.close()
    a, b = dump(tmp_path / "a" / "queue"), dump(tmp_path / "b" / "queue")
    assert a == b
    assert len(a[b"messages"]) == 4 and len(a[b"held"]) == 1 and not a[b"bounces"]


def test_delete_of_a_torn_message_record_leaves_its_segment_count_to_recover(spool):
    from engine.queue import records as R
    a, b = queue(spool, "s@x", ("a@d.test",)), queue(spool, "s@x", ("b@d.test",))
    with spool.index.write("tear") as txn:
        raw = bytearray(txn.get(R.u64(a), db=spool.index.dbs[b"messages"]))
        raw[-1] ^= 0xFF                                    # the crc no longer matches
        txn.put(R.u64(a), bytes(raw), db=spool.index.dbs[b"messages"])
    assert spool.delete([a]) == 1
    assert spool.select(Selection(ids=(a, b)), T0) == ([b], [a])
    assert spool.due(T0 + 10, 10)[0].msgid == b
    with spool.env.begin() as txn:
        segs = {k: R.SegmentRecord.decode(v).live
                for k, v in txn.cursor(db=spool.index.dbs[b"segments"])}
    assert list(segs.values()) == [2]                      # not lowered for the torn one
    assert spool.recover().segments_fixed == 1


DELETER = r"""
import sys
from engine.config.settings import SpoolSettings
from engine.queue import Spool
spool = Spool(sys.argv[1], SpoolSettings(surgery_batch=3, surgery_pause=0.02))
print("ready", flush=True)
spool.delete([int(a) for a in sys.argv[2:]])
print("done", flush=True)
"""


def test_kill9_in_the_middle_of_a_delete_leaves_each_message_whole_or_gone(tmp_path: Path):
    import signal
    import subprocess
    import sys
    import time
    repo = Path(__file__).resolve().parent.parent
    q = tmp_path / "queue"
    s = Spool(q, SpoolSettings(segment_bytes=4096))          # several segments
    ids = [queue(s, "s@x", (f"a{i}@d.test", f"b{i}@e.test")) for i in range(300)]
    s.apply([Deferred(m, 1, T0 + 600, "later") for m in ids[::3]])
    s.hold(ids[::5])
    doomed = ids[::2]
    s.close()
    r = Spool(q, readonly=True)
    gen0 = r.surgery_generation()
    proc = subprocess.Popen([sys.executable, "-c", DELETER, str(q), *map(str, doomed)],
                            stdout=subprocess.PIPE, cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 60
        # Killed once some batches have committed, well before the last (50 of them).
        while r.surgery_generation() < gen0 + 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        r.close()
    s = Spool(q)
    try:
        left = set(s.select(Selection(older_than=0), T0 + 10)[0])
        assert set(ids) - set(doomed) <= left and 0 < len(set(doomed) - left) < len(doomed)
        report = s.recover(verify_bytes=True)                 # nothing torn, dangling or miscounted
        assert (report.quarantined, report.dangling_removed, report.segments_fixed) == ([], 0, 0)
        for m in left:                                        # each one whole
            info = s.message_info(m)
            assert len(info.recipients) == 2 and info.held == (m in ids[::5])
        assert {j.msgid for j in s.due(T0 + 10**6, 10**4)} == left - set(ids[::5])
        assert s.delete(sorted(left)) == len(left)            # the rest goes, and its space
        assert s.stats().messages == 0 and os.listdir(q / "segments") == []
    finally:
        s.close()


def test_select_of_many_ids_is_linear_and_lists_each_missing_id_once(tmp_path: Path):
    import time
    s = Spool(tmp_path / "queue")
    try:
        ids = s._write_batch([(Envelope("s@x", ("a@d.test",)), b"x")] * 20_000)
        asked = tuple(ids) + (99_999_999, 99_999_999)
        t = time.monotonic()
        assert s.select(Selection(ids=asked), T0) == (ids, [99_999_999])
        assert s.select(Selection(ids=asked, older_than=0), T0 + 10) == (ids, [99_999_999])
        # Quadratic (a set of the found ids built again per id) took ~10 s here.
        assert time.monotonic() - t < 3
    finally:
        s.close()


def test_a_read_that_loses_the_race_with_a_delete_quarantines_nothing(spool):
    a = queue(spool, "s@x", ("a@d.test",))
    assert spool.delete([a]) == 1
    # What read_message does when the delete unlinked the segment between its
    # index lookup and its read (a delivery starting as the operator deletes).
    spool.repair.quarantine_after_error(a, FileNotFoundError(2, "No such file or directory"))
    assert spool.quarantined() == []


def test_each_surgery_transaction_reports_progress(spool):
    """A long hold/release/requeue/delete says how far it is after each
    transaction (the CLI prints it every 2 s), not only at its end."""
    ids = [queue(spool, "a@src.test", ("x@far.test",)) for _ in range(5)]
    for change in (spool.hold, spool.release_held, spool.requeue, spool.delete):
        seen = []
        assert change(ids, progress=lambda *a: seen.append(a)) == 5
        assert seen == [("messages", 2, 5), ("messages", 4, 5), ("messages", 5, 5)], change


def test_shape_keeps_nothing_per_held_message(tmp_path: Path):
    """qshape (and the status page, every few seconds) reads which messages
    are held in step with the recipients, not into a set of every held id."""
    import tracemalloc
    with Spool(tmp_path / "queue", SpoolSettings(surgery_batch=5000)) as s:
        ids = s._write_batch([(Envelope("a@src.test", ("u@far.test",)), b"m\r\n")] * 4000)
        s.hold(ids)
        tracemalloc.start()
        try:
            shape = s.shape(T0, held=True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert sum(shape.total) == 4000 and s.shape(T0).domains == 0
    assert peak < 20 * 4000, f"shape held {peak} bytes for 4000 held messages"
