"""engine.queue.committer: batching while a stage is busy, ordering, error fan-out."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from engine.queue.committer import GroupCommitter


MODES = {"parallel": dict(pipeline=True, parallel=True),
         "serial": dict(pipeline=True, parallel=False),
         "one-thread": dict(pipeline=False)}


class Stages:
    """prepare/sync/index/unindex doubles that record what they saw and can be held."""

    def __init__(self, hold_first_prepare: bool = False, fail_prepare=(), fail_index=(),
                 fail_sync=(), hold_sync: bool = False):
        self.prepared: list[int] = []
        self.indexed: list[list[int]] = []
        self.synced: list[int] = []
        self.unindexed: list[int] = []
        self.events: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.sync_gate = threading.Event()
        self.hold = hold_first_prepare
        self.hold_sync = hold_sync
        self.fail_prepare = set(fail_prepare)
        self.fail_index = set(fail_index)
        self.fail_sync = set(fail_sync)
        self.ids = itertools.count(1)

    def committer(self, max_messages: int, max_bytes: int, mode: str = "parallel"):
        return GroupCommitter(self.prepare, self.sync, self.index, self.unindex,
                              max_messages, max_bytes, **MODES[mode])

    def sync(self, token):
        if self.hold_sync:
            self.sync_gate.wait(5)
        self.synced.append(token)
        self.events.append(("synced", token))
        if token in self.fail_sync:
            raise OSError("EIO on fdatasync")

    def unindex(self, token):
        self.unindexed.append(token)

    def prepare(self, batch):
        n = len(self.prepared)
        if self.hold and n == 0:
            self.gate.wait(5)
        self.prepared.append(len(batch))
        if n in self.fail_prepare:
            raise OSError("disk full")
        ids = [next(self.ids) for _ in batch]
        return ids, n

    def index(self, tokens):
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
    time.sleep(0.05)
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


def test_index_failure_reaches_every_waiter_and_committer_survives(mode):
    st = Stages(fail_index={0})
    c = st.committer(10, 10**6, mode)
    with pytest.raises(RuntimeError, match="index boom"):
        c.put(None, b"a").result(5)
    assert c.put(None, b"b").result(5) == 2
    c.close()
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
        await asyncio.sleep(0.05)
        rest = [c.put(None, b"x", loop) for _ in range(30)]
        rest[0].cancel()                        # a caller that gave up
        st.gate.set()
        got = await asyncio.gather(first, *rest[1:])
        return got, len(calls)
    got, wakeups = asyncio.run(main())
    c.close()
    assert got == [1] + list(range(3, 32))
    assert 1 <= wakeups <= 2                     # one per index commit, not one per message


def test_parallel_order_answers_only_when_both_sync_and_index_are_done():
    st = Stages(hold_sync=True)
    c = st.committer(10, 10**6, "parallel")
    f = c.put(None, b"a")
    deadline = time.monotonic() + 5
    while not st.indexed and time.monotonic() < deadline:
        time.sleep(0.005)
    assert st.indexed == [[0]] and not st.synced   # indexed while the sync is held
    time.sleep(0.05)
    assert not f.done()
    st.sync_gate.set()
    assert f.result(5) == 1
    c.close()


def test_serial_order_never_indexes_before_the_sync():
    st = Stages()
    c = st.committer(2, 10**6, "serial")
    fs = [c.put(None, b"x") for _ in range(9)]
    assert sorted(f.result(5) for f in fs) == list(range(1, 10))
    c.close()
    for token in st.synced:
        assert st.events.index(("synced", token)) < st.events.index(("indexed", token))


@pytest.mark.parametrize("mode_", ["parallel", "serial"])
def test_sync_failure_fails_its_batch_and_takes_it_out_of_the_index(mode_):
    st = Stages(fail_sync={0})
    c = st.committer(10, 10**6, mode_)
    with pytest.raises(OSError, match="EIO"):
        c.put(None, b"a").result(5)
    assert c.put(None, b"b").result(5) == 2
    c.close()
    if mode_ == "parallel":     # it was indexed meanwhile: withdrawn
        assert 0 in [t for batch in st.indexed for t in batch]
        assert st.unindexed == [0]
    else:                       # never reached the index
        assert [t for batch in st.indexed for t in batch] == [1]
        assert st.unindexed == []
