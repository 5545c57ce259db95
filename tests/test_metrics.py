"""engine.metrics: the counters' API, multiprocess mode, and that it never fails its caller."""
from __future__ import annotations

import asyncio
import os

import pytest
from prometheus_client import CollectorRegistry, multiprocess
from engine import metrics


def collected(directory) -> dict[tuple, float]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples}


@pytest.fixture
def multiprocess_mode(monkeypatch):
    """engine.metrics.enable() in this process, undone afterwards."""
    monkeypatch.delenv(metrics.ENV_DIR, raising=False)
    yield metrics.enable
    os.environ.pop(metrics.ENV_DIR, None)
    from prometheus_client import mmap_dict, values
    values.ValueClass = values.MutexValue
    values.MmapedDict = mmap_dict.MmapedDict
    metrics._forget()
    metrics._bound.clear()
    metrics._series.clear()


def test_values_go_to_the_directory_and_are_summed_across_processes(tmp_path, multiprocess_mode):
    d = tmp_path / "m"
    d.mkdir()
    (d / "counter_1.db").write_bytes(b"left by a previous run")
    multiprocess_mode(d)
    assert os.environ[metrics.ENV_DIR] == str(d)
    assert not (d / "counter_1.db").exists()          # emptied at start
    metrics.message_received()                        # no running loop: written at once
    pid = os.fork()
    if pid == 0:                                      # another process of the tree
        try:
            metrics.message_received()
            metrics.message_received("tempfail")
            metrics.delivery_result("remote", "K", 0.3)
            metrics.delivery_result("local", "D", 9.0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    got = collected(d)
    assert got[("qrelay_messages_received_total", (("protocol", "smtp"), ("result", "queued")))] == 2
    assert got[("qrelay_messages_received_total", (("protocol", "smtp"), ("result", "tempfail")))] == 1
    assert got[("qrelay_deliveries_total", (("channel", "local"), ("result", "bounced")))] == 1
    assert got[("qrelay_delivery_latency_seconds_bucket", (("channel", "remote"), ("le", "0.25")))] == 0
    assert got[("qrelay_delivery_latency_seconds_bucket", (("channel", "remote"), ("le", "0.5")))] == 1


def test_on_a_loop_calls_are_summed_and_written_by_a_timer(tmp_path, multiprocess_mode):
    d = tmp_path / "m"
    multiprocess_mode(d)
    async def main():
        for _ in range(1000):
            metrics.session_opened()
            metrics.delivery_result("remote", "K", 2.0)
        metrics.session_closed()
        metrics.auth_result("failed", "PLAIN")
        metrics.auth_result("failed", "X-EVIL-%d" % os.getpid())   # the client's word
        metrics.tls_result("ok")
        assert collected(d) == {}                        # nothing written yet: one timer
        await asyncio.sleep(metrics.FLUSH_SECONDS * 2)
    asyncio.run(main())
    got = collected(d)
    assert got[("qrelay_sessions_total", (("protocol", "smtp"), ("result", "accepted")))] == 1000
    assert got[("qrelay_sessions_active", (("protocol", "smtp"),))] == 999
    assert got[("qrelay_delivery_latency_seconds_count", (("channel", "remote"),))] == 1000
    assert got[("qrelay_delivery_latency_seconds_sum", (("channel", "remote"),))] == 2000
    assert got[("qrelay_delivery_latency_seconds_bucket", (("channel", "remote"), ("le", "1.0")))] == 0
    assert got[("qrelay_delivery_latency_seconds_bucket", (("channel", "remote"), ("le", "2.5")))] == 1000
    auth = {k[1]: v for k, v in got.items() if k[0] == "qrelay_auth_total"}
    assert auth == {(("mechanism", "other"), ("protocol", "smtp"), ("result", "failed")): 1,
                    (("mechanism", "plain"), ("protocol", "smtp"), ("result", "failed")): 1}
    assert got[("qrelay_tls_total", (("protocol", "smtp"), ("result", "ok")))] == 1


def test_a_broken_metric_never_fails_its_caller(monkeypatch):
    def broken(key):
        raise OSError("disk full")
    monkeypatch.setattr(metrics, "_child", broken)
    assert metrics.message_received() is None          # written at once: raised, swallowed

    async def main():
        metrics.delivery_result("remote", "K", 1.0)
        assert metrics._pending and metrics._observed
        metrics.flush()                                 # raised while writing, swallowed
    asyncio.run(main())
    assert not metrics._pending and not metrics._observed


def test_metric_files_have_their_disk_space_before_they_are_mapped(tmp_path, multiprocess_mode):
    # prometheus_client makes them with truncate: a hole, and a store into a
    # hole of a mapped file on a full disk is SIGBUS (a receiver restarted
    # while the spool's disk was full died at its first count, in a loop).
    d = tmp_path / "m"
    multiprocess_mode(d)
    pid = os.fork()
    if pid == 0:
        try:
            metrics.message_received()
            metrics.session_opened()                    # a livesum gauge: a file of its own
            metrics.delivery_result("remote", "K", 0.3)
            from prometheus_client import values
            grown = values.MmapedDict(str(d / "grown.db"))
            for n in range(5000):                       # past its first 64 KiB
                grown.write_value(f"key {n}", 1.0, 0.0)
            grown.close()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    files = sorted(d.glob("*.db"))
    assert len(files) == 3 + 1
    for path in files:
        st = path.stat()
        assert st.st_blocks * 512 >= st.st_size, (path.name, st.st_blocks, st.st_size)
    assert (d / "grown.db").stat().st_size > 1 << 16


def test_a_metric_file_with_no_room_on_disk_drops_the_counts(tmp_path, multiprocess_mode,
                                                              monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    multiprocess_mode(tmp_path / "m")
    assert metrics.message_received() is None           # written at once: dropped, not raised
    assert list((tmp_path / "m").iterdir()) == []         # no empty file for the status page
    monkeypatch.undo()
    multiprocess_mode(tmp_path / "m")
    metrics.message_received()                           # room again: counted
    assert collected(tmp_path / "m")[
        ("qrelay_messages_received_total", (("protocol", "smtp"), ("result", "queued")))] == 1
