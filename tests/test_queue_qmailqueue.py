"""engine.queue.qmailqueue and `qrelay import-qmail`: qmail queues built in
qmail's on-disk format (tests/qmail_queue.py) moved into the spool."""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from engine.config.settings import SpoolSettings
from engine.queue import Spool
from engine.queue import intake as intake_module
from engine.queue import qmailqueue
from engine.queue.qmailqueue import QmailQueue, import_queue
from tests.conftest import run_cli
from tests.qmail_queue import add_message, make_queue

NOW = time.time()
DAY = 86400.0


def files(qdir: Path) -> set[str]:
    return {str(p.relative_to(qdir)) for p in qdir.rglob("*")
            if p.is_file() and p.parts[-2] != "lock"}


def build(qdir: Path) -> dict[str, int]:
    make_queue(qdir)
    n = {}
    n["deferred"] = add_message(qdir, b"Subject: deferred\n\nbody\n", "joe@example.com",
                                birth=NOW - 2 * DAY, next_try=NOW + 3000,
                                remote=[("a@far.test", True), ("b@far.test", False)])
    n["local"] = add_message(qdir, b"Subject: local\n\n.dot\n", "", birth=NOW - 60,
                             local=[("example.com-joe@example.com", False)])
    n["todo"] = add_message(qdir, b"Subject: todo\n\nx\n", "s@src.test", birth=NOW - 5,
                            todo=["t1@far.test", "t2@example.com"])
    n["bouncing"] = add_message(
        qdir, b"Subject: half\n\nx\n", "s@src.test", birth=NOW - DAY, next_try=NOW - 10,
        remote=[("gone@far.test", True), ("later@far.test", False)],
        bounce="<gone@far.test>:\n192.0.2.1 does not like recipient.\n"
               "Remote host said: 550 no such user\nGiving up on 192.0.2.1.\n\n")
    n["bounced"] = add_message(
        qdir, b"Subject: all gone\n\nx\n", "s@src.test", birth=NOW - DAY,
        local=[("vd-nobody@v.test", True)],
        bounce="<nobody@v.test>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n")
    n["finished"] = add_message(qdir, b"Subject: done\n\nx\n", "s@src.test", birth=NOW - DAY,
                                remote=[("ok@far.test", True)])
    # Torn: a remote file cut in the middle of a record (no final NUL).
    n["torn"] = add_message(qdir, b"Subject: torn\n\nx\n", "s@src.test", birth=NOW - DAY,
                            remote=[("x@far.test", False)])
    p = next(qdir.glob(f"remote/*/{n['torn']}"))
    p.write_bytes(p.read_bytes()[:-3])
    # qmail-queue interrupted: mess/S/N with neither intd/todo nor info.
    tmp = qdir / "pid" / "stray"
    tmp.write_bytes(b"half written\n")
    n["noenv"] = tmp.stat().st_ino
    os.link(tmp, qdir / "mess" / str(n["noenv"] % 23) / str(n["noenv"]))
    tmp.unlink()
    return n


def by_subject(spool: Spool) -> dict[str, object]:
    out = {}
    for m in spool.iter_messages():
        data = spool.read_message(m.msgid)
        out[data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()] = (m, data)
    return out


def test_cli_moves_each_kind_and_leaves_the_malformed(root: Path, tmp_path: Path):
    qdir = tmp_path / "qmail" / "queue"
    n = build(qdir)
    n_before = files(qdir)
    r = run_cli("import-qmail", str(root), str(qdir), "--dry-run")
    assert r.returncode == 1, r.stderr
    assert files(qdir) == n_before and not (root / "queue" / "index").exists()
    assert "would move 5 messages (5 recipients to deliver, 3 done; 1 not yet preprocessed, " \
           "2 bouncing); 1 finished" in r.stdout
    r = run_cli("import-qmail", str(root), str(qdir))
    assert r.returncode == 1
    assert "moved 5 messages" in r.stdout and "2 malformed left in place" in r.stdout
    errs = r.stderr.splitlines()
    assert len(errs) == 2 and all(e.startswith("qrelay: import-qmail: #") for e in errs)
    assert any("remote is torn (no final NUL); left in place" in e for e in errs)
    assert any("no envelope (neither todo/N nor info/S/N)" in e for e in errs)
    left = files(qdir)
    assert {p.rsplit("/", 1)[1] for p in left} == {str(n["torn"]), str(n["noenv"])}
    assert len(left) == 4       # the torn one's mess, info, remote; the stray mess

    with Spool(root / "queue", readonly=True) as s:
        got = by_subject(s)
        assert set(got) == {"deferred", "local", "todo", "half", "all gone"}
        m, data = got["deferred"]
        assert abs(m.birth - (NOW - 2 * DAY)) < 0.01 and m.sender == "joe@example.com"
        assert data.startswith(b"Received: (qmail 4242 invoked by uid 89); ")
        assert data.endswith(b"\r\n\r\nbody\r\n") and b"\n\n" not in data.replace(b"\r\n", b"")
        assert [(r.address, r.channel, r.state) for r in m.recipients] == [
            ("a@far.test", "remote", "delivered"), ("b@far.test", "remote", "deferred")]
        assert abs(m.recipients[1].next_try - (NOW + 3000)) < 0.01
        m, _ = got["local"]
        assert m.sender == "" and [(r.channel, r.state) for r in m.recipients] == [
            ("local", "pending")]
        m, _ = got["todo"]
        assert not m.preprocessed and (m.pid, m.uid) == (4242, 89)
        assert [r.address for r in m.recipients] == ["t1@far.test", "t2@example.com"]
        m, _ = got["half"]
        assert m.bouncing and [r.state for r in m.recipients] == ["failed", "deferred"]
        assert "Remote host said: 550 no such user" in m.recipients[0].text
        bouncing = s.bouncing()
        assert [b.failed for b in bouncing] == [
            (("vd-nobody@v.test", "Sorry, no mailbox here by that name. (#5.1.1)\n"),)]
        due = {j.address for j in s.due(NOW + 1, 100)}
        assert due == {"example.com-joe@example.com", "later@far.test"}


def test_a_queue_file_that_is_a_link_is_left_in_place_never_read(root: Path, tmp_path: Path):
    # qmail-queue is set-uid qmailq: whoever holds that uid could link a
    # queue file to a file only root reads, for root's import to queue it.
    qdir = tmp_path / "qmail" / "queue"
    make_queue(qdir)
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$secret:19000:0:99999:7:::\n")
    n = add_message(qdir, b"Subject: planted\n\nx\n", "s@src.test", birth=NOW - 60,
                    remote=[("thief@far.test", False)])
    add_message(qdir, b"Subject: fine\n\nx\n", "s@src.test", birth=NOW - 30,
                remote=[("a@far.test", False)])
    mess = next(qdir.glob(f"mess/*/{n}"))
    mess.unlink()
    mess.symlink_to(secret)
    r = run_cli("import-qmail", str(root), str(qdir))
    assert r.returncode == 1
    assert "moved 1 message" in r.stdout and "1 malformed left in place" in r.stdout
    assert f"#{n} (mess/" in r.stderr and "symbolic links; left in place" in r.stderr
    assert mess.is_symlink() and secret.exists()
    with Spool(root / "queue", readonly=True) as s:
        got = [s.read_message(m.msgid) for m in s.iter_messages()]
    assert len(got) == 1 and b"Subject: fine" in got[0] and b"secret" not in got[0]


def test_import_tells_how_many_messages_are_read(root: Path, tmp_path: Path):
    qdir = make_queue(tmp_path / "queue")
    for i in range(5):
        add_message(qdir, b"Subject: m%d\n\nx\n" % i, "s@src.test", birth=NOW - DAY,
                    next_try=NOW + 100, remote=[(f"r{i}@far.test", False)])
    heard = []
    with Spool(root / "queue", SpoolSettings()) as s:
        import_queue(QmailQueue(qdir), s, dry_run=False, batch=2, now=NOW, report=print,
                     progress=lambda *a: heard.append(a))
    assert heard == [("messages", n, 5) for n in range(5)]


def test_a_batch_holds_at_most_max_batch_bytes_of_messages(root: Path, tmp_path: Path):
    # Every message of a batch is in memory until its commit: 2000 messages
    # of 10 MB would be 20 GB (and more in copies).
    qdir = make_queue(tmp_path / "queue")
    for i in range(5):
        add_message(qdir, b"Subject: m%d\n\n" % i + b"x" * 10000, "s@src.test",
                    birth=NOW - DAY, remote=[(f"r{i}@far.test", False)])
    batches = []
    with Spool(root / "queue", SpoolSettings()) as s:
        real = s.import_messages

        def import_messages(items, forget=()):
            batches.append(len(items))
            return real(items, forget)
        s.import_messages = import_messages
        got = import_queue(QmailQueue(qdir), s, dry_run=False, batch=100, batch_bytes=15000,
                           now=NOW, report=print)
        assert got.moved == 5 and len(list(s.iter_messages())) == 5
    assert batches == [2, 2, 1]


def test_a_second_run_after_a_crash_anywhere_moves_the_rest_once(root: Path, tmp_path: Path,
                                                                   monkeypatch):
    qdir = make_queue(tmp_path / "queue")
    for i in range(7):
        add_message(qdir, b"Subject: m%d\n\nx\n" % i, "s@src.test", birth=NOW - DAY,
                    next_try=NOW + 100, remote=[(f"r{i}@far.test", False)])
    settings = SpoolSettings(surgery_batch=2)
    queue = QmailQueue(qdir)

    # 1: killed after the second batch's commit, when its info and remote
    # files were gone but not yet its mess files (removed last).
    calls = []

    def remove_then_die(paths, pool=None):
        calls.append(paths)
        if len(calls) == 4:
            assert all("/mess/" in p for p in paths)
            raise KeyboardInterrupt
        for p in paths:
            os.unlink(p)
    monkeypatch.setattr(qmailqueue, "remove_files", remove_then_die)
    with Spool(root / "queue", settings) as s, pytest.raises(KeyboardInterrupt):
        import_queue(queue, s, dry_run=False, batch=2, now=NOW, report=print)
    monkeypatch.undo()

    # 2: killed after the segment sync of a batch, before its index commit.
    real = intake_module.Intake.index_stage
    state = {"n": 0}

    def index_then_die(self, batches, also=None):
        if also is not None:
            state["n"] += 1
            if state["n"] == 2:
                raise KeyboardInterrupt
        return real(self, batches, also)
    monkeypatch.setattr(intake_module.Intake, "index_stage", index_then_die)
    with Spool(root / "queue", settings) as s, pytest.raises(KeyboardInterrupt):
        import_queue(queue, s, dry_run=False, batch=2, now=NOW, report=print)
    monkeypatch.undo()

    with Spool(root / "queue", settings) as s:   # the open re-indexes the lost batch's tail
        got = import_queue(queue, s, dry_run=False, batch=2, now=NOW, report=print)
        assert got.malformed == []
        subjects = sorted(s.read_message(m.msgid).split(b"Subject: ")[1][:2]
                          for m in s.iter_messages())
        assert subjects == [b"m%d" % i for i in range(7)]
        for m in s.iter_messages():
            assert m.preprocessed and abs(m.birth - (NOW - DAY)) < 0.01
            assert [(r.state, round(r.next_try)) for r in m.recipients] == [
                ("deferred", round(NOW + 100))]
        assert s.imported([b"x"]) == {}
        with s.index.env.begin() as txn:
            assert txn.stat(s.index.dbs[b"imported"])["entries"] == 0
    assert files(qdir) == set()


def test_refused_while_qmail_send_holds_the_lock_and_bad_input(root: Path, tmp_path: Path):
    qdir = make_queue(tmp_path / "queue")
    add_message(qdir, b"x\n", "s@src.test", birth=NOW, remote=[("a@b.test", False)])
    fd = os.open(qdir / "lock" / "sendmutex", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = run_cli("import-qmail", str(root), str(qdir))
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert "lock/sendmutex is locked: qmail-send (or qrelay run) is running" in r.stderr
    finally:
        os.close(fd)
    for args, text in [((str(root), str(tmp_path / "nope")), "no such directory"),
                       ((str(root), str(root / "control")), "not a qmail queue"),
                       ((str(tmp_path / "nope"), str(qdir)), "not a qrelay root")]:
        r = run_cli("import-qmail", *args)
        assert r.returncode == 2 and text in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_as_root_into_a_spool_the_run_user_owns_the_new_files_are_that_users(
        root: Path, tmp_path: Path):
    # Root reads qmail's files, but a `qrelay run` beside it (as the run user)
    # must read the segments the import writes: a root-owned 0600 one is
    # quarantined by its scheduler, and the message lost.
    import pwd
    from engine.privilege import RunUser, give_tree
    nobody = pwd.getpwnam("nobody")
    user = RunUser("nobody", nobody.pw_uid, nobody.pw_gid)
    Spool(root / "queue", SpoolSettings()).close()      # a spool qrelay run started
    give_tree(root, user)
    qdir = make_queue(tmp_path / "queue")
    add_message(qdir, b"Subject: m\n\nx\n", "s@src.test", birth=NOW - DAY,
                remote=[("r@far.test", False)])
    r = run_cli("import-qmail", str(root), str(qdir))
    assert r.returncode == 0, r.stderr
    owners = {p.relative_to(root): (p.stat().st_uid, p.stat().st_gid)
              for p in (root / "queue").rglob("*")}
    assert any(p.suffix == ".seg" for p in owners)
    assert {p: o for p, o in owners.items() if o != user.owner} == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
def test_a_user_who_cannot_remove_qmails_files_is_refused_before_anything_moves(
        root: Path, tmp_path: Path):
    # qmails owns lock/sendmutex, info/, local/, remote/, but not mess/ (qmailq):
    # each batch was committed, then its removal failed half way, run after run.
    import pwd
    import subprocess
    import sys
    from engine.privilege import RunUser, give_tree
    from tests.conftest import REPO
    nobody = pwd.getpwnam("nobody")
    give_tree(root, RunUser("nobody", nobody.pw_uid, nobody.pw_gid))
    qdir = make_queue(tmp_path / "queue")
    add_message(qdir, b"Subject: m\n\nx\n", "s@src.test", birth=NOW - DAY,
                remote=[("r@far.test", False)])
    for p in [qdir / "lock" / "sendmutex", *qdir.glob("info/*"), *qdir.glob("remote/*")]:
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    before = files(qdir)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "import-qmail", str(root), str(qdir)],
                       cwd=REPO, capture_output=True, text=True, timeout=60, user=nobody.pw_uid,
                       group=nobody.pw_gid, extra_groups=[],
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{qdir}/mess/" in r.stderr and "cannot remove" in r.stderr
    assert files(qdir) == before
    assert not (root / "queue" / "index" / "data.mdb").exists()


def test_imported_queue_in_the_root_itself_is_delivered_by_qrelay_run(root: Path, dns):
    from tests.test_delivery_e2e import ThreadSink, queue_count, wait_for
    from tests.smtp_harness import RunningQrelay, route_to_loopback
    qdir = make_queue(root / "queue")               # a qmail home turned qrelay root
    add_message(qdir, b"Subject: due\n\nhello\n", "s@src.test", birth=NOW - 600,
                remote=[("done@sink.test", True), ("x@sink.test", False)])
    add_message(qdir, b"Subject: new\n\nhello\n", "s@src.test", birth=NOW, todo=["y@sink.test"])
    add_message(qdir, b"Subject: gone\n\nhello\n", "s@src.test", birth=NOW - 600,
                remote=[("z@sink.test", True)],
                bounce="<z@sink.test>:\n192.0.2.1 does not like recipient.\n"
                       "Remote host said: 550 no such user\nGiving up on 192.0.2.1.\n\n")
    r = run_cli("import-qmail", str(root), str(qdir))
    assert r.returncode == 0, r.stderr
    assert not (qdir / "mess").exists() and not (qdir / "todo").exists()
    sink = ThreadSink()
    q = None
    try:
        port = sink.start()
        route_to_loopback(root, {"sink.test": port, "src.test": port},
                          f'[delivery]\ndns_servers = ["{dns.address}"]\n'
                          f"[scheduler]\npoll_interval = 0.02\n")
        q = RunningQrelay(root, procs=1)
        wait_for(lambda: len(sink.messages()) == 3, what="3 messages at the sink")
        got = {m.rcpts[0]: m for m in sink.messages()}
        assert set(got) == {b"RCPT TO:<x@sink.test>", b"RCPT TO:<y@sink.test>",
                            b"RCPT TO:<s@src.test>"}
        assert all(len(m.rcpts) == 1 for m in sink.messages())      # done@ is not sent again
        bounce = got[b"RCPT TO:<s@src.test>"]
        assert bounce.mail.startswith(b"MAIL FROM:<>")
        assert b"<z@sink.test>:\r\n192.0.2.1 does not like recipient." in bounce.content
        assert b"Subject: gone" in bounce.content
        wait_for(lambda: queue_count(root) == 0, what="empty queue")
    finally:
        if q is not None:
            q.stop()
        sink.close()


# `qrelay import-qmail` that is killed (-9) in its index commit, after its
# batch's segment sync (a fault injected into the real command).
DIE_IN_INDEX_COMMIT = """
import os, signal, sys
from engine.queue import intake
real = intake.Intake.index_stage
def index_stage(self, batches, also=None):
    if also is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batches, also)
intake.Intake.index_stage = index_stage
from engine.cli import main
sys.argv = ["qrelay", *sys.argv[1:]]
main()
"""


def test_killed_in_its_index_commit_beside_qrelay_run_nothing_is_delivered_twice(
        root: Path, tmp_path: Path, dns):
    import subprocess
    import sys
    from tests.conftest import REPO
    from tests.test_delivery_e2e import ThreadSink, queue_count, wait_for
    from tests.smtp_harness import RunningQrelay, route_to_loopback
    qdir = make_queue(tmp_path / "queue")
    add_message(qdir, b"Subject: m\n\nhello\n", "s@src.test", birth=NOW - 600,
                remote=[("x@sink.test", False)])
    sink = ThreadSink()
    q = None
    try:
        port = sink.start()
        route_to_loopback(root, {"sink.test": port},
                          f'[delivery]\ndns_servers = ["{dns.address}"]\n'
                          f"[scheduler]\npoll_interval = 0.02\n")
        q = RunningQrelay(root, procs=1)
        r = subprocess.run([sys.executable, "-c", DIE_IN_INDEX_COMMIT, "import-qmail",
                            str(root), str(qdir)], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
        assert r.returncode == -9, r.stderr
        # The scheduler indexes what the killed writer synced, and delivers it.
        wait_for(lambda: len(sink.messages()) == 1, what="the message at the sink")
        wait_for(lambda: queue_count(root) == 0, what="an empty queue")
        r = run_cli("import-qmail", str(root), str(qdir))
        assert r.returncode == 0, r.stderr
        assert "moved 0 messages" in r.stdout and "1 moved by an earlier run" in r.stdout
        assert queue_count(root) == 0 and files(qdir) == set()
    finally:
        if q is not None:
            q.stop()
        sink.close()
