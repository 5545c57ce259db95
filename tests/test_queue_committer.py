"""engine.queue.committer: batching while a stage is busy, ordering, error fan-out."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from engine.queue.committer import GroupCommitter


class Stages:
    """prepare/index doubles that record batch sizes and can be held."""

    def __init__(self, hold_first_prepare: bool = False, fail_prepare=(), fail_index=()):
        self.prepared: list[int] = []
        self.indexed: list[list[int]] = []
        self.gate = threading.Event()
        self.hold = hold_first_prepare
        self.fail_prepare = set(fail_prepare)
        self.fail_index = set(fail_index)
        self.ids = itertools.count(1)

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
        if k in self.fail_index:
            raise RuntimeError("index boom")


def test_requests_arriving_while_a_batch_syncs_form_the_next_batch():
    st = Stages(hold_first_prepare=True)
    c = GroupCommitter(st.prepare, st.index, 100, 10**6)
    first = c.put(None, b"0")
    time.sleep(0.05)
    rest = [c.put(None, b"x") for _ in range(20)]
    st.gate.set()
    assert first.result(5) == 1
    assert [f.result(5) for f in rest] == list(range(2, 22))
    c.close()
    assert st.prepared == [1, 20]
    assert [t for batch in st.indexed for t in batch] == [0, 1]   # indexed in order


def test_batch_limits_are_respected():
    st = Stages(hold_first_prepare=True)
    c = GroupCommitter(st.prepare, st.index, 4, 10**6)
    fs = [c.put(None, b"x") for _ in range(10)]
    st.gate.set()
    assert sorted(f.result(5) for f in fs) == list(range(1, 11))
    c.close()
    assert sum(st.prepared) == 10 and max(st.prepared) <= 4


def test_byte_limit_cuts_batches():
    st = Stages(hold_first_prepare=True)
    c = GroupCommitter(st.prepare, st.index, 100, 250)
    fs = [c.put(None, b"x" * 100) for _ in range(6)]
    st.gate.set()
    for f in fs:
        f.result(5)
    c.close()
    assert max(st.prepared) <= 3


def test_prepare_failure_reaches_only_its_batch():
    st = Stages(fail_prepare={0})
    c = GroupCommitter(st.prepare, st.index, 10, 10**6)
    with pytest.raises(OSError, match="disk full"):
        c.put(None, b"a").result(5)
    assert c.put(None, b"b").result(5) == 1     # no ids were spent on the failed batch
    c.close()


def test_index_failure_reaches_every_waiter_and_committer_survives():
    st = Stages(fail_index={0})
    c = GroupCommitter(st.prepare, st.index, 10, 10**6)
    with pytest.raises(RuntimeError, match="index boom"):
        c.put(None, b"a").result(5)
    assert c.put(None, b"b").result(5) == 2
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.put(None, b"c")


def test_close_commits_what_was_submitted():
    st = Stages()
    c = GroupCommitter(st.prepare, st.index, 3, 10**6)
    fs = [c.put(None, b"%d" % i) for i in range(10)]
    c.close()
    assert all(f.done() and not f.exception() for f in fs)
    assert sum(st.prepared) == 10


def test_asyncio_callers_are_woken_once_per_batch():
    import asyncio
    st = Stages(hold_first_prepare=True)
    c = GroupCommitter(st.prepare, st.index, 100, 10**6)

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
