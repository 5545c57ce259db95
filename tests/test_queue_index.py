"""engine.queue.index: the one write-transaction helper — a full index map (or
disk) is a one-line SpoolError on every write path, never an lmdb.Error,
and `qrelay flush` says so in one line."""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import lmdb
import pytest

from engine.config.settings import SpoolSettings
from engine.queue import Deferred, Envelope, Failed, Spool, SpoolError, SpoolWriteError
from engine.queue.index import failure_text
from tests.conftest import run_cli

LATER = time.time() + 10 ** 6       # deferred: not due before the test ends
TINY = SpoolSettings(index_map_bytes=4096)


def env(*rcpts: str) -> Envelope:
    return Envelope("joe@example.com", tuple(rcpts))


def _fill_then_compact(q: Path) -> dict[str, int]:
    """A spool holding a message per state a write path works on, whose
    index is then compacted: no free page left, so with a map no larger
    than the data (LMDB grows a smaller map to the data's size) every
    write transaction that changes a page fails with MapFullError."""
    with Spool(q) as s:
        deferred = [s.enqueue(env("a@x", "b@y"), b"deferred") for _ in range(200)]
        s.preprocess_many([(m, ["remote", "remote"]) for m in deferred], now=100.0)
        s.apply([Deferred(m, i, LATER, "later") for m in deferred for i in (0, 1)])
        todo = s.enqueue(env("c@z"), b"todo")
        pending = s.enqueue(env("d@z"), b"pending")
        s.preprocess(pending, ["local"], now=100.0)
        bouncing = s.enqueue(env("e@z"), b"bouncing")
        s.preprocess(bouncing, ["local"], now=100.0)
        s.mark_failed(bouncing, 0, "no such user")
    index = q / "index"
    copy = q / "compacted"
    copy.mkdir()
    e = lmdb.open(str(index), max_dbs=8)
    e.copy(str(copy), compact=True)
    e.close()
    os.replace(copy / "data.mdb", index / "data.mdb")
    shutil.rmtree(copy)
    return {"deferred": deferred[0], "todo": todo, "pending": pending, "bouncing": bouncing}


@pytest.fixture
def full(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    q = tmp_path / "q"
    return q, _fill_then_compact(q)


def _one_line_full(exc: SpoolError) -> None:
    text = str(exc)
    assert "\n" not in text and "spool index is full" in text and "index_map_bytes" in text
    assert exc.__cause__ is None and exc.__suppress_context__    # no lmdb.Error behind it


def test_full_map_makes_reschedule_all_raise_spool_error_and_change_nothing(full):
    q, ids = full
    with Spool(q, TINY) as s:
        with pytest.raises(SpoolError) as info:
            s.reschedule_all()
        assert not isinstance(info.value, lmdb.Error)
        assert str(info.value).startswith("cannot reschedule deferred recipients: ")
        _one_line_full(info.value)
        assert s.due(time.time(), 1000, "remote") == []     # the transaction was aborted
    with Spool(q) as s:                                     # a map with room again
        assert s.reschedule_all() == 400


@pytest.mark.parametrize("path", ["apply", "mark_delivered", "preprocess", "preprocess_many",
                                  "release", "reschedule_all"])
def test_every_ledger_write_path_raises_spool_error_on_a_full_map(full, path):
    q, ids = full
    calls = {
        "apply": lambda s: s.apply([Failed(ids["pending"], 0, "x")]),
        "mark_delivered": lambda s: s.mark_delivered(ids["pending"], 0),
        "preprocess": lambda s: s.preprocess(ids["todo"], ["remote"]),
        "preprocess_many": lambda s: s.preprocess_many([(ids["todo"], ["remote"])]),
        "release": lambda s: s.release(ids["bouncing"]),
        "reschedule_all": lambda s: s.reschedule_all(),
    }
    with Spool(q, TINY) as s:
        before = [s.message_info(m) for m in ids.values()]
        with pytest.raises(SpoolError) as info:
            calls[path](s)
        _one_line_full(info.value)
        assert [s.message_info(m) for m in ids.values()] == before


def test_enqueue_on_a_full_map_raises_spool_write_error(full):
    q, _ids = full
    with Spool(q, TINY) as s:
        with pytest.raises(SpoolWriteError) as info:
            s.enqueue(env("f@z"), b"no room")
        _one_line_full(info.value)
        assert s.stats().messages == 203


def test_repair_on_a_full_map_warns_or_raises_spool_error(full):
    q, ids = full
    warnings: list[str] = []
    with Spool(q, TINY, warn=warnings.append) as s:
        # found corrupt by a reader: quarantining it needs a write, so a warning
        s.repair.quarantine_after_error(ids["pending"], ValueError("pretend it is corrupt"))
        assert warnings == [f"warning: cannot quarantine #{ids['pending']}: the spool index "
                            f"is full (its map of {s.env.info()['map_size']} bytes is used "
                            f"up; raise [spool] index_map_bytes)"]
        assert s.read_message(ids["pending"]) == b"pending"     # still queued
        assert s.recover().quarantined == []                    # nothing to write: fine


def test_failure_text_names_a_full_disk_and_keeps_one_line():
    enospc = lmdb.Error(f"mdb_txn_commit: {os.strerror(errno.ENOSPC)}")
    assert failure_text("record delivery results", enospc, 1 << 20) == \
        "cannot record delivery results: the disk holding the spool index is full"
    oserror = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert failure_text("quarantine #7", oserror, 0).endswith("the disk holding the spool "
                                                              "index is full")
    assert failure_text("x", lmdb.Error("two\nlines"), 0) == "cannot x: two lines"


def test_qrelay_flush_on_a_full_map_prints_one_line(tmp_path: Path):
    root = tmp_path / "root"
    assert run_cli("init", str(root), "--me", "mx.example.org").returncode == 0
    _fill_then_compact(root / "queue")
    owner = (root / "queue").stat()
    if os.geteuid() == 0 and owner.st_uid != 0:
        # Made by this (root) process: the spool's, as `qrelay run` would leave
        # it; root's flush acts as its owner. Until then it says how to mend it.
        r = run_cli("flush", str(root))
        assert r.returncode == 1 and r.stderr.endswith(
            f"Permission denied (root acts as the owner of {root}/queue here: "
            f"chown -R {owner.st_uid}:{owner.st_gid} {root}/queue)\n")
        for path in [root / "queue", *(root / "queue").rglob("*")]:
            os.chown(path, owner.st_uid, owner.st_gid)
    (root / "qrelay.toml").write_text("[spool]\nindex_map_bytes = 4096\n")
    r = run_cli("flush", str(root))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("Error: cannot reschedule deferred recipients: the spool index "
                               "is full")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    (root / "qrelay.toml").write_text("")
    r = run_cli("flush", str(root))
    assert r.returncode == 0 and r.stdout.startswith("qrelay: 400 deferred recipients due now")


def test_the_lock_file_has_its_disk_blocks_before_lmdb_maps_it(tmp_path: Path, monkeypatch):
    # LMDB makes lock.mdb with ftruncate (a hole) and writes it through a
    # map: on a full disk the first start died of SIGBUS, and every restart.
    with Spool(tmp_path / "q"):
        pass
    st = (tmp_path / "q" / "index" / "lock.mdb").stat()
    assert st.st_size > 0 and st.st_blocks * 512 >= st.st_size

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(SpoolError) as err:
        Spool(tmp_path / "new")
    assert str(err.value) == (f"{tmp_path / 'new'}: cannot open spool index: "
                              f"{tmp_path / 'new' / 'index' / 'lock.mdb'}: No space left on device")


def _hold_index_writer(index_dir: Path, conn) -> None:
    """Hold the spool index's writer mutex (as a spool writer stopped
    mid-commit does) until told, or for 10 s at most."""
    env = lmdb.open(str(index_dir), max_dbs=16, subdir=True)
    txn = env.begin(write=True)
    conn.send("held")
    conn.poll(10)
    txn.abort()
    env.close()


def test_opening_the_index_never_freezes_the_process_behind_the_writer_mutex(tmp_path):
    """A writable open (the scheduler's, a tool's) waits for LMDB's writer
    mutex while another process holds it; it used to wait inside open_db
    holding the GIL, so every other thread of the process (and its signal
    handlers) stopped too. Now only the opening thread waits."""
    import multiprocessing
    import threading
    q = tmp_path / "queue"
    Spool(q).close()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_hold_index_writer, args=(q / "index", child))
    proc.start()
    opened: list[float] = []
    try:
        assert parent.poll(30) and parent.recv() == "held"

        def open_spool() -> None:
            Spool(q).close()
            opened.append(time.monotonic())
        opener = threading.Thread(target=open_spool)
        opener.start()
        ticks = [time.monotonic()]
        while ticks[-1] - ticks[0] < 0.5:
            ticks.append(time.monotonic())
        released = time.monotonic()
        parent.send("release")
        opener.join(30)
        assert opened and opened[0] >= released      # it did wait for the mutex...
        assert max(b - a for a, b in zip(ticks, ticks[1:])) < 1.0   # ...alone
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
