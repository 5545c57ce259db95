"""engine.queue.committer: batching while a commit is in flight, error fan-out."""
from __future__ import annotations

import threading
import time

import pytest

from engine.queue.committer import GroupCommitter


def test_requests_arriving_during_a_commit_form_one_batch():
    batches = []
    gate = threading.Event()

    def commit(batch):
        if not batches:
            gate.wait(5)          # first commit "syncs" until the others have queued
        batches.append(len(batch))
        for r in batch:
            r.future.set_result(r.message)
    c = GroupCommitter(commit, max_messages=100, max_bytes=10**6)
    first = c.put(None, b"0")
    time.sleep(0.05)
    rest = [c.put(None, b"%d" % i) for i in range(1, 21)]
    gate.set()
    assert first.result(5) == b"0"
    assert [f.result(5) for f in rest] == [b"%d" % i for i in range(1, 21)]
    c.close()
    assert batches == [1, 20]


def test_batch_limits_are_respected():
    batches = []
    gate = threading.Event()

    def commit(batch):
        gate.wait(5)
        batches.append(len(batch))
        for r in batch:
            r.future.set_result(0)
    c = GroupCommitter(commit, max_messages=4, max_bytes=10**6)
    fs = [c.put(None, b"x") for _ in range(10)]
    gate.set()
    for f in fs:
        f.result(5)
    c.close()
    assert sum(batches) == 10 and max(batches) <= 4


def test_exception_reaches_every_waiter_and_committer_survives():
    calls = {"n": 0}

    def commit(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        for r in batch:
            r.future.set_result(1)
    c = GroupCommitter(commit, 10, 10**6)
    with pytest.raises(RuntimeError, match="boom"):
        c.put(None, b"a").result(5)
    assert c.put(None, b"b").result(5) == 1
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.put(None, b"c")


def test_close_commits_what_was_submitted():
    done = []

    def commit(batch):
        time.sleep(0.01)
        for r in batch:
            done.append(r.message)
            r.future.set_result(0)
    c = GroupCommitter(commit, 3, 10**6)
    fs = [c.put(None, b"%d" % i) for i in range(10)]
    c.close()
    assert all(f.done() for f in fs) and len(done) == 10
