"""Durable Maildir writes: unique names, fsyncs before success, shared directory
syncs, failure injection, 200 concurrent deliveries into one mailbox."""
from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading

import pytest

from engine.delivery.local import LocalDelivery
from engine.delivery.local.maildir import DirSync, MaildirError, MaildirWriter
from tests.test_delivery_e2e import wait_for
from tests.test_local_fixtures import (GID, MSG, MSG_LF, UID, accounts_at, config, make_home,
                                       make_maildir, new_messages, write_assign)


def is_dir_fd(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def test_names_are_unique_within_one_second(tmp_path):
    w = MaildirWriter("mx/a:b", clock=lambda: 1700000000.25)
    names = {w.unique_name() for _ in range(1000)}
    assert len(names) == 1000
    assert next(iter(names)).startswith("1700000000.M250000P")
    assert all(n.endswith(".mx\\057a\\072b") for n in names)


def test_fsync_order_file_then_directory(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    calls = []

    def fsync(fd):
        calls.append("dir" if is_dir_fd(fd) else "file")
        os.fsync(fd)
    w = MaildirWriter("h", fsync=fsync)
    name = w.deliver(str(md), [b"a\n", b"b\n"], size_suffix=True)
    assert calls == ["file", "dir"]
    assert name.endswith(",S=4")
    assert (md / "new" / name).read_bytes() == b"a\nb\n"
    assert (md / "new" / name).stat().st_mode & 0o777 == 0o600
    assert os.listdir(md / "tmp") == []


def test_file_fsync_failure_leaves_nothing(tmp_path):
    md = make_maildir(tmp_path / "Maildir")

    def fsync(fd):
        raise OSError(5, "Input/output error")
    with pytest.raises(MaildirError) as got:
        MaildirWriter("h", fsync=fsync).deliver(str(md), [b"x\n"])
    assert (got.value.step, got.value.errno) == ("write", 5)
    assert got.value.tmp.startswith(f"{md}/tmp/") and got.value.new.startswith(f"{md}/new/")
    assert os.listdir(md / "tmp") == [] and os.listdir(md / "new") == []


def test_directory_fsync_failure_takes_the_link_back(tmp_path):
    md = make_maildir(tmp_path / "Maildir")

    def fsync(fd):
        if is_dir_fd(fd):
            raise OSError(5, "Input/output error")
        os.fsync(fd)
    with pytest.raises(MaildirError) as got:
        MaildirWriter("h", fsync=fsync).deliver(str(md), [b"x\n"])
    assert got.value.step == "sync"
    assert os.listdir(md / "tmp") == [] and os.listdir(md / "new") == []


@pytest.mark.parametrize("c_steps", [True, False])
def test_failed_step_and_files_are_named(tmp_path, c_steps):
    # engine._fileio's steps (os.fsync) and the Python ones name the same step.
    md = make_maildir(tmp_path / "Maildir")
    (md / "tmp").rmdir()
    (md / "tmp").write_text("")
    w = MaildirWriter("h") if c_steps else MaildirWriter("h", fsync=lambda fd: os.fsync(fd))
    with pytest.raises(MaildirError) as got:
        w.deliver(str(md), [b"x\n"])
    e = got.value
    assert (e.kind, e.step, e.errno) == ("write", "open", errno.ENOTDIR)
    assert os.path.dirname(e.tmp) == f"{md}/tmp" and os.path.dirname(e.new) == f"{md}/new"
    assert os.path.basename(e.tmp) == os.path.basename(e.new)


def test_courier_reports_fsync_failure_as_deferral(tmp_path):
    home = make_home(tmp_path / "joe")
    md = make_maildir(home / "Maildir")
    write_assign(tmp_path, [f"=joe:joe:{UID}:{GID}:{home}:::"])

    def fsync(fd):
        raise OSError(28, "No space left on device")
    from engine.delivery.local import deliver_one
    r = deliver_one(config(), accounts_at(tmp_path), "", "joe@h", MSG,
                    writer=MaildirWriter("h", fsync=fsync))
    assert (r.status, r.text) == ("Z", "Temporary error on maildir delivery. (#4.3.0)\n")
    assert new_messages(md) == []


def test_directory_syncs_are_shared(tmp_path):
    """While one fsync of new/ is in flight, the deliveries that link meanwhile
    all wait for the next one: N deliveries, 2 directory fsyncs."""
    md = make_maildir(tmp_path / "Maildir")
    gate = threading.Event()
    first = threading.Event()
    lock = threading.Lock()
    dir_calls = []

    def fsync(fd):
        if is_dir_fd(fd):
            with lock:
                dir_calls.append(fd)
                n = len(dir_calls)
            if n == 1:
                first.set()
                gate.wait(10)
        os.fsync(fd)
    w = MaildirWriter("h", fsync=fsync)
    errors = []

    def one():
        try:
            w.deliver(str(md), [b"x\n"])
        except Exception as exc:        # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=one) for _ in range(20)]
    threads[0].start()
    assert first.wait(10)
    for t in threads[1:]:
        t.start()
    # all 19 others have linked and are waiting behind the fsync in flight
    wait_for(lambda: sum(1 for n in os.listdir(md / "new")) == 20, what="20 links")
    state = w.dirsync._dirs[str(md / "new")]
    wait_for(lambda: state.linked == 20, what="20 waiters")
    gate.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert len(dir_calls) == 2
    assert w.dirsync.fsyncs == 2 and w.dirsync.requests == 20
    assert w.dirsync._dirs == {}


def test_unshared_dirsync_fsyncs_every_time(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    w = MaildirWriter("h", dirsync=DirSync(share=False))
    for _ in range(3):
        w.deliver(str(md), [b"x\n"])
    assert w.dirsync.fsyncs == 3


def test_200_concurrent_deliveries_to_one_mailbox(tmp_path):
    home = make_home(tmp_path / "joe")
    md = make_maildir(home / "Maildir")
    write_assign(tmp_path, [f"=joe:joe:{UID}:{GID}:{home}:::"])
    courier = LocalDelivery(config(), accounts_at(tmp_path), max_threads=32)

    async def main():
        calls = [courier.deliver(f"s{i}@x.example", ["joe@mx.test"],
                                 MSG + f"n={i}\r\n".encode(), msgid=i) for i in range(200)]
        return await asyncio.gather(*calls)
    try:
        results = asyncio.run(main())
    finally:
        courier.close()
    assert [r[0].status for r in results] == ["K"] * 200
    got = new_messages(md)
    assert len(got) == 200
    expect = {(f"Return-Path: <s{i}@x.example>\nDelivered-To: joe@mx.test\n".encode()
               + MSG_LF + f"n={i}\n".encode()) for i in range(200)}
    assert set(got) == expect
    assert os.listdir(md / "tmp") == []
    assert courier.writer.dirsync.fsyncs <= 200


def test_two_writers_never_pick_the_same_name():
    a = MaildirWriter("h", clock=lambda: 5.5)
    b = MaildirWriter("h", clock=lambda: 5.5)
    names = {w.unique_name() for _ in range(100) for w in (a, b)}
    assert len(names) == 200


def test_existing_tmp_name_is_skipped(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    (md / "tmp" / "taken").write_bytes(b"stale")

    class Replaying(MaildirWriter):
        names = iter(["taken", "free"])

        def unique_name(self):
            return next(self.names)
    assert Replaying("h").deliver(str(md), [b"x\n"]) == "free"
    assert (md / "new" / "free").read_bytes() == b"x\n"
    assert (md / "tmp" / "taken").read_bytes() == b"stale"
