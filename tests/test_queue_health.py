"""engine/queue/health.py: the doctor's one-pass read of the spool index."""
from __future__ import annotations

import time

from engine.queue import Deferred, Envelope, Spool
from engine.queue.health import queue_health


def test_counts_oldest_and_deferred_per_destination_with_the_last_error(tmp_path):
    spool = Spool(tmp_path / "queue")
    now = time.time()
    try:
        ids = [spool.enqueue(Envelope("a@src.test", (f"u{i}@{d}", "x@Other.TEST")), b"m\r\n")
               for i, d in enumerate(["a.test"] * 3 + ["b.test"] * 2 + ["c.test"])]
        spool.preprocess_many([(m, ["remote", "remote"]) for m in ids[:5]], now=now)
        spool.apply([Deferred(m, 0, now + 100 + k, f"error {k}") for k, m in enumerate(ids[:5])])
    finally:
        spool.close()
    ro = Spool(tmp_path / "queue", readonly=True)
    try:
        h = queue_health(ro, top=1)
        assert (h.messages, h.not_preprocessed, h.deferred, h.pending) == (6, 1, 5, 5)
        assert h.destination_count == 2 and h.unreadable == 0
        (top,) = h.destinations
        assert (top.domain, top.deferred, top.last_error) == ("a.test", 3, "error 2")
        assert h.oldest_birth <= h.oldest_todo_birth
        assert [d.domain for d in queue_health(ro, top=1, domain="B.test").destinations] == \
            ["a.test", "b.test"]
        assert queue_health(ro, top=0, domain="none.test").destinations == ()
    finally:
        ro.close()


def test_an_empty_spool(tmp_path):
    Spool(tmp_path / "queue").close()
    with Spool(tmp_path / "queue", readonly=True) as ro:
        h = queue_health(ro)
    assert (h.messages, h.oldest_birth, h.oldest_todo_birth, h.destinations) == (0, None, None, ())


def test_the_read_keeps_nothing_per_message(tmp_path):
    """The status page reads this every few seconds and the doctor at each
    run: its memory must not grow with the queue (a list of every birth once)."""
    import tracemalloc
    with Spool(tmp_path / "queue") as spool:
        for _ in range(4):
            spool._write_batch([(Envelope("a@src.test", ("u@far.test",)), b"m\r\n")] * 1000)
    with Spool(tmp_path / "queue", readonly=True) as ro:
        tracemalloc.start()
        try:
            h = queue_health(ro)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert h.messages == 4000 and h.oldest_birth is not None
    assert peak < 20 * 4000, f"queue_health held {peak} bytes for 4000 messages"
