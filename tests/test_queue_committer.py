"""engine.queue.committer: batching while a stage is busy, ordering, error fan-out."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from engine.queue.committer import GroupCommitter


MODES = {"ack-at-sync": dict(sync_depth=4),
         "ack-after-index": dict(sync_depth=4, ack_after_index=True),
         "one-sync-at-a-time": dict(sync_depth=1)}


class Stages:
    """prepare/sync/index doubles that record what they saw and can be held."""

    def __init__(self, hold_first_prepare: bool = False, fail_prepare=(), fail_index=(),
                 fail_sync=(), hold_sync=()):
        self.prepared: list[int] = []
        self.indexed: list[list[int]] = []
        self.synced: list[int] = []
        self.events: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.held = threading.Event()         # the first prepare waits at the gate
        self.sync_gate = threading.Event()
        self.index_gate = threading.Event()
        self.index_gate.set()
        self.hold = hold_first_prepare
        self.hold_sync = set(hold_sync)
        self.fail_prepare = set(fail_prepare)
        self.fail_index = set(fail_index)
        self.fail_sync = set(fail_sync)
        self.ids = itertools.count(1)

    def committer(self, max_messages: int, max_bytes: int, mode: str = "ack-at-sync", **kw):
        return GroupCommitter(self.prepare, self.sync, self.index, max_messages, max_bytes,
                              **{**MODES[mode], "retry_seconds": 0.02, **kw})

    def sync(self, token):
        if token in self.hold_sync:
            self.sync_gate.wait(5)
        self.synced.append(token)
        self.events.append(("synced", token))
        if token in self.fail_sync:
            raise OSError("EIO on fdatasync")

    def prepare(self, batch):
        n = len(self.prepared)
        if self.hold and n == 0:
            self.held.set()
            self.gate.wait(5)
        self.prepared.append(len(batch))
        if n in self.fail_prepare:
            raise OSError("disk full")
        ids = [next(self.ids) for _ in batch]
        return ids, n

    def index(self, tokens):
        self.index_gate.wait(5)
        k = len(self.indexed)
        self.indexed.append(list(tokens))
        self.events.extend(("indexed", t) for t in tokens)
        if k in self.fail_index:
            raise RuntimeError("index boom")


@pytest.fixture(params=sorted(MODES))
def mode(request) -> str:
    return request.param


def test_requests_arriving_while_a_batch_syncs_form_the_next_batch(mode):
    st = Stages(hold_first_prepare=True)
    c = st.committer(100, 10**6, mode)
    first = c.put(None, b"0")
    assert st.held.wait(5)
    rest = [c.put(None, b"x") for _ in range(20)]
    st.gate.set()
    assert first.result(5) == 1
    assert [f.result(5) for f in rest] == list(range(2, 22))
    c.close()
    assert st.prepared == [1, 20]
    assert [t for batch in st.indexed for t in batch] == [0, 1]   # indexed in order


def test_batch_limits_are_respected(mode):
    st = Stages(hold_first_prepare=True)
    c = st.committer(4, 10**6, mode)
    fs = [c.put(None, b"x") for _ in range(10)]
    st.gate.set()
    assert sorted(f.result(5) for f in fs) == list(range(1, 11))
    c.close()
    assert sum(st.prepared) == 10 and max(st.prepared) <= 4


def test_byte_limit_cuts_batches(mode):
    st = Stages(hold_first_prepare=True)
    c = st.committer(100, 250, mode)
    fs = [c.put(None, b"x" * 100) for _ in range(6)]
    st.gate.set()
    for f in fs:
        f.result(5)
    c.close()
    assert max(st.prepared) <= 3


def test_prepare_failure_reaches_only_its_batch(mode):
    st = Stages(fail_prepare={0})
    c = st.committer(10, 10**6, mode)
    with pytest.raises(OSError, match="disk full"):
        c.put(None, b"a").result(5)
    assert c.put(None, b"b").result(5) == 1     # no ids were spent on the failed batch
    c.close()


def test_index_failure_reaches_the_waiters_of_the_index_and_committer_survives(mode):
    st = Stages(fail_index={0})
    c = st.committer(10, 10**6, mode)
    with pytest.raises(RuntimeError, match="index boom"):
        c.put(None, b"a", wait_index=True).result(5)
    assert c.put(None, b"b", wait_index=True).result(5) == 2
    assert c.close()
    assert st.indexed == [[0], [1]]     # nobody was answered for #1: not retried
    with pytest.raises(RuntimeError, match="closed"):
        c.put(None, b"c")


def test_close_commits_what_was_submitted(mode):
    st = Stages()
    c = st.committer(3, 10**6, mode)
    fs = [c.put(None, b"%d" % i) for i in range(10)]
    c.close()
    assert all(f.done() and not f.exception() for f in fs)
    assert sum(st.prepared) == 10


def test_asyncio_callers_are_woken_once_per_batch(mode):
    import asyncio
    st = Stages(hold_first_prepare=True)
    c = st.committer(100, 10**6, mode)

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            calls.append(cb)
            return real(cb, *args)
        loop.call_soon_threadsafe = counting
        first = c.put(None, b"0", loop)
        while not st.held.is_set():             # not to_thread: it calls call_soon_threadsafe
            await asyncio.sleep(0.005)
        rest = [c.put(None, b"x", loop) for _ in range(30)]
        rest[0].cancel()                        # a caller that gave up
        st.gate.set()
        got = await asyncio.gather(first, *rest[1:])
        return got, len(calls)
    got, wakeups = asyncio.run(main())
    c.close()
    assert got == [1] + list(range(3, 32))
    assert 1 <= wakeups <= 2                     # one per batch, not one per message


def test_callers_hear_at_the_sync_and_the_index_follows():
    st = Stages()
    st.index_gate.clear()
    c = st.committer(10, 10**6)
    assert c.put(None, b"a").result(5) == 1      # answered while the index is held
    waiting = c.put(None, b"b", wait_index=True)
    time.sleep(0.05)
    assert not waiting.done()
    st.index_gate.set()
    assert waiting.result(5) == 2
    assert c.close()
    assert [t for batch in st.indexed for t in batch] == [0, 1]


def test_after_index_order_answers_only_after_the_index():
    st = Stages()
    st.index_gate.clear()
    c = st.committer(10, 10**6, "ack-after-index")
    f = c.put(None, b"a")
    deadline = time.monotonic() + 5
    while not st.synced and time.monotonic() < deadline:
        time.sleep(0.005)
    assert st.synced == [0] and not f.done()
    st.index_gate.set()
    assert f.result(5) == 1
    c.close()


def test_the_index_never_runs_ahead_of_a_sync(mode):
    st = Stages()
    c = st.committer(2, 10**6, mode)
    fs = [c.put(None, b"x") for _ in range(9)]
    assert sorted(f.result(5) for f in fs) == list(range(1, 10))
    c.close()
    for token in st.synced:
        assert st.events.index(("synced", token)) < st.events.index(("indexed", token))


def test_syncs_overlap_and_batches_are_still_indexed_in_order():
    st = Stages(hold_first_prepare=True, hold_sync={0})
    c = st.committer(1, 10**6, sync_depth=3)
    first = c.put(None, b"0")
    later = [c.put(None, b"x") for _ in range(2)]
    st.gate.set()
    # #2 and #3 are written and synced while #1's sync is still held...
    assert [f.result(5) for f in later] == [2, 3]
    assert not first.done() and st.indexed == []   # ...but the index waits for #1
    st.sync_gate.set()
    assert first.result(5) == 1
    assert c.close()
    assert [t for batch in st.indexed for t in batch] == [0, 1, 2]


def test_sync_depth_bounds_the_syncs_in_flight_and_batches_grow_meanwhile():
    st = Stages(hold_sync={0, 1})
    c = st.committer(100, 10**6, sync_depth=2)
    a, b = c.put(None, b"0"), None
    while len(st.prepared) < 1:
        time.sleep(0.005)
    b = c.put(None, b"1")
    while len(st.prepared) < 2:
        time.sleep(0.005)
    rest = [c.put(None, b"x") for _ in range(10)]
    time.sleep(0.05)
    assert st.prepared == [1, 1]                  # both slots busy: nothing more written
    st.sync_gate.set()
    assert [f.result(5) for f in (a, b, *rest)] == list(range(1, 13))
    c.close()
    assert st.prepared == [1, 1, 10]


def test_sync_failure_fails_its_batch_and_the_index_skips_past_it(mode):
    st = Stages(fail_sync={0})
    c = st.committer(10, 10**6, mode)
    with pytest.raises(OSError, match="EIO"):
        c.put(None, b"a").result(5)
    assert c.put(None, b"b").result(5) == 2
    c.close()
    # the failed batch still reaches the index stage (its token says it failed)
    assert [t for batch in st.indexed for t in batch] in ([0, 1], [0], [1])
    assert 1 in [t for batch in st.indexed for t in batch]


def test_an_index_failure_after_callers_heard_is_retried_and_refuses_new_mail_meanwhile():
    st = Stages(fail_index={0, 1})
    c = st.committer(10, 10**6, retry_seconds=0.5)   # tries at 0, 0.5 and 1.5 s
    assert c.put(None, b"a").result(5) == 1       # answered at its sync
    deadline = time.monotonic() + 5
    while c._index_error is None and time.monotonic() < deadline:   # the first try failed
        time.sleep(0.005)
    with pytest.raises(RuntimeError, match="index boom"):
        c.put(None, b"b").result(5)               # refused while #1 waits for the index
    # Until the third try went in and the committer has heard so (the index
    # stage appends before it returns: checking only indexed raced the put).
    while (len(st.indexed) < 3 or c._index_error is not None) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert st.indexed == [[0], [0], [0]]          # the same batch, until it went in
    assert c.put(None, b"c").result(5) == 2       # taken again
    assert c.close()


def test_close_reports_answered_batches_it_could_not_index():
    st = Stages(fail_index=set(range(100)))
    c = st.committer(10, 10**6)
    assert c.put(None, b"a").result(5) == 1
    assert c.close() is False


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_committed_message_is_not_kept_by_the_stages(mode):
    # Each stage's thread held the last batch it handled (its messages, and
    # the token that holds them too) while it waited for the next one: in the
    # spool writer, up to sync_depth + 2 batches of big messages, for ever.
    import gc
    import weakref

    class Message:              # the committer only asks a message its len()
        def __len__(self):
            return 1000
    messages = [Message() for _ in range(3)]
    alive = [weakref.ref(m) for m in messages]
    indexed = threading.Event()
    c = GroupCommitter(lambda batch: ([0] * len(batch), [r.message for r in batch]),
                       lambda token: None, lambda tokens: indexed.set(), 10, 10**6,
                       **{**MODES[mode], "retry_seconds": 0.02})
    try:
        futures = [c.put(None, m, wait_index=True) for m in messages]
        del messages
        assert [f.result(5) for f in futures] == [0, 0, 0] and indexed.is_set()
        del futures
        gc.collect()
        deadline = time.monotonic() + 5     # the index stage finishes its turn
        while any(r() is not None for r in alive) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [r() for r in alive] == [None, None, None]
    finally:
        c.close()
