"""engine/privilege.py: `qrelay run` as root binds, then runs everything that
reads the network as `[run] user`; only the supervisor and the local spawner
keep root, and a delivery to another owner's mailbox runs as that owner."""
from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from engine.privilege import (PrivilegeError, RunUser, check_installation, check_reachable,
                              foreign_domains, give_tree, run_user)
from tests.conftest import run_cli, searchable
from tests.smtp_harness import QrelayProcess, RunningQrelay, children_of, process_title as _title
from tests.test_delivery_e2e import service_texts, texts, wait_for

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")
NOBODY = pwd.getpwnam("nobody")
OTHER = 4242     # a mailbox owner with no passwd entry (vpopmail's numeric uid style)


def test_not_root_or_empty_name_means_nothing_to_drop():
    assert run_user("") is None
    if os.geteuid() != 0:
        assert run_user("qrelay") is None


@as_root
def test_a_missing_or_root_run_user_is_one_line():
    with pytest.raises(PrivilegeError, match="'no-such-user-x' does not exist"):
        run_user("no-such-user-x")
    with pytest.raises(PrivilegeError, match="is root"):
        run_user("root")
    assert run_user("nobody") == RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)


@as_root
def test_unreachable_root_is_named(tmp_path):
    user = RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    hidden = tmp_path / "hidden"
    (hidden / "root").mkdir(parents=True)
    hidden.chmod(0o700)
    with pytest.raises(PrivilegeError, match=f"{hidden} is not searchable"):
        check_reachable(hidden / "root", user)
    hidden.chmod(0o711)
    check_reachable(hidden / "root", user)


@as_root
def test_an_installation_the_run_user_cannot_read_is_refused(tmp_path, monkeypatch):
    """Services import modules after changing users: a Python under a private
    directory (pyenv under /root) is refused at start, not at the first lazy import."""
    import sysconfig
    private = tmp_path / "private"
    (private / "lib").mkdir(parents=True)
    private.chmod(0o700)
    paths = dict(sysconfig.get_paths(), stdlib=str(private / "lib"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: paths)
    user = RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(PrivilegeError, match=f"cannot read qrelay's installation .*{private} is not"):
        check_installation(user)


@as_root
def test_give_tree_hands_queue_and_log_over(root):
    (root / "queue" / "segments").mkdir()
    (root / "queue" / "segments" / "s1").write_bytes(b"x")
    user = RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    give_tree(root, user)
    for path in (root / "queue", root / "queue" / "segments" / "s1", root / "log"):
        assert (path.stat().st_uid, path.stat().st_gid) == user.owner
    assert (root / "control").stat().st_uid == 0


@as_root
def test_give_tree_never_hands_over_a_file_linked_in_from_outside(root, tmp_path):
    """Where fs.protected_hardlinks is 0 (the kernel's default) the run user can
    hard-link any file into the spool it owns: the next start must not chown it."""
    secret = tmp_path / "secret"
    secret.write_text("root:only\n")
    secret.chmod(0o600)
    os.link(secret, root / "queue" / "planted")
    user = RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    give_tree(root, user)
    assert (secret.stat().st_uid, secret.stat().st_gid) == (0, 0)
    assert (root / "queue").stat().st_uid == user.uid


@as_root
def test_give_tree_follows_a_link_root_made_for_a_directory_on_another_disk(root, tmp_path):
    """A qmail box moved its queue to another disk with a link (ROOT/queue ->
    /data/queue): the tree the link leads to is handed over, or every service
    restarted in a loop on "Permission denied". A link root did not make is
    refused in one line."""
    moved = tmp_path / "data" / "queue"
    (moved / "segments").mkdir(parents=True)
    (moved / "segments" / "s1").write_bytes(b"x")
    shutil.rmtree(root / "queue")
    (root / "queue").symlink_to(moved)
    user = RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    give_tree(root, user)
    for path in (moved, moved / "segments", moved / "segments" / "s1"):
        assert (path.stat().st_uid, path.stat().st_gid) == user.owner, path
    assert (root / "queue").is_symlink() and tmp_path.stat().st_uid == 0
    os.chmod(tmp_path / "data", 0o700)          # the other disk's mount point, root's only
    with pytest.raises(PrivilegeError, match=r"cannot reach .*data/queue .*: .*data is not searchable"):
        give_tree(root, user)
    os.chmod(tmp_path / "data", 0o755)
    (root / "log").rmdir()
    (root / "log").symlink_to(tmp_path / "data")
    os.lchown(root / "log", user.uid, user.gid)
    with pytest.raises(PrivilegeError, match="is a link owned by uid"):
        give_tree(root, user)
    assert (tmp_path / "data").stat().st_uid == 0


def _status(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, v in (line.split(":", 1) for line in f)}


def _probe_writes(status: dict[str, list[str]], targets: list[Path]) -> dict[Path, bool]:
    """Which of `targets` (directories) a process with exactly these
    credentials could create a file in: a shell probe run as that uid/gid/groups."""
    uid, gid = int(status["Uid"][1]), int(status["Gid"][1])
    groups = [int(g) for g in status.get("Groups", [])]
    script = ('for d; do if (: > "$d/probe.$$") 2>/dev/null; then rm -f "$d/probe.$$"; echo 1;'
              ' else echo 0; fi; done')
    done = subprocess.run(["/bin/sh", "-c", script, "probe", *map(str, targets)], user=uid,
                          group=gid, extra_groups=groups, capture_output=True, text=True,
                          timeout=30, cwd="/")
    assert done.returncode == 0, done.stderr
    return dict(zip(targets, (line == "1" for line in done.stdout.split())))


@pytest.fixture
def unprivileged(root: Path, dns):
    """`qrelay run` as root with [run] user = nobody; a domain owned by uid 4242
    (whose vpasswd the receivers cannot read: RCPT checks off for it) and one
    owned by nobody."""
    (root / "qrelay.toml").write_text(
        f'[run]\nuser = "nobody"\n[smtp]\nreject_unknown_mailboxes = false\n'
        f'[delivery]\ndns_servers = ["{dns.address}"]\n[scheduler]\npoll_interval = 0.02\n')
    for domain, user, owner in (("other.example", "bo", OTHER),
                                ("own.example", "al", NOBODY.pw_uid)):
        r = run_cli("domain", "add", str(root), domain, "--uid", str(owner), "--gid", str(owner))
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-m", "engine.cli", "user", "add", str(root),
                            f"{user}@{domain}"], input="secret\n", capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        assert r.returncode == 0, r.stderr
    q = QrelayProcess(root, procs=1)
    yield q
    _stop(q)


def _stop(q: QrelayProcess) -> None:
    q.stop()
    stderr = q.proc.stderr.read()
    q.proc.stderr.close()
    assert "Traceback" not in stderr, stderr


@as_root
def test_children_run_as_the_run_user_and_cannot_write_outside_the_spool(unprivileged, root):
    sup = unprivileged.proc.pid
    wanted = {"spool writer", "receiver 0", "scheduler", "lspawn"}

    def services() -> dict[str, int] | None:
        # A child sets its title just after the fork: wait for all four.
        titles = {_title(pid).split(" ", 1)[-1]: pid for pid in children_of(sup)}
        return titles if wanted <= set(titles) else None
    by_title = wait_for(services, what="four services with their titles")
    assert _status(sup)["Uid"][1] == "0"
    assert _status(by_title["lspawn"])["Uid"][1] == "0"
    for name in ("spool writer", "receiver 0", "scheduler"):
        st = _status(by_title[name])
        assert st["Uid"] == [str(NOBODY.pw_uid)] * 4, name
        assert st["Gid"] == [str(NOBODY.pw_gid)] * 4, name
        assert st.get("Groups", []) == [], name
        assert int(st["CapEff"][0], 16) == 0, name
        assert st["NoNewPrivs"] == ["1"], name    # a set-uid program gives it nothing
    assert _status(by_title["lspawn"])["NoNewPrivs"] == ["0"]   # its |programs may need them
    receiver = _status(by_title["receiver 0"])
    writable = _probe_writes(receiver, [root / "queue", root, root / "control", root / "users",
                                        root / "domains" / "other.example", Path("/etc")])
    assert writable == {root / "queue": True, root: False, root / "control": False,
                        root / "users": False, root / "domains" / "other.example": False,
                        Path("/etc"): False}


@as_root
def test_another_owners_mailbox_is_delivered_by_the_root_spawner_as_that_owner(unprivileged, root):
    with smtplib.SMTP("127.0.0.1", unprivileged.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["bo@other.example"], b"Subject: x\r\n\r\nhi\r\n") == {}
    new = root / "domains" / "other.example" / "bo" / "Maildir" / "new"
    [path] = wait_for(lambda: sorted(new.iterdir()) or None, what="the message in bo's Maildir")
    assert (path.stat().st_uid, path.stat().st_gid) == (OTHER, OTHER)
    wait_for(lambda: any(": success: " in t for t in texts(root)), what="the success line")
    # The receivers were told why they cannot check other.example's mailboxes.
    assert any("cannot read the vpasswd of other.example (uid 4242)" in t for t in service_texts(root))
    assert foreign_domains(root, RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)) == \
        [("other.example", OTHER)]
    # The spool and the logs stay the run user's, whoever wrote last.
    for path in (root / "log" / "current", root / "queue" / "lspawn.sock"):
        assert path.stat().st_uid == NOBODY.pw_uid, path


@as_root
def test_the_run_users_own_mailboxes_are_delivered_by_a_worker_of_that_user(unprivileged, root):
    """A domain of the run user: a worker of that user, started by the local
    spawner and reading the spool itself, writes the Maildir (not the scheduler's loop)."""
    with smtplib.SMTP("127.0.0.1", unprivileged.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("a@src.test")
        assert s.rcpt("al@own.example")[0] == 250
        assert s.data(b"Subject: own\r\n\r\nhi\r\n")[0] == 250
    new = root / "domains" / "own.example" / "al" / "Maildir" / "new"
    [path] = wait_for(lambda: sorted(new.iterdir()) or None, timeout=30,
                      what="the message in al's Maildir")
    assert path.stat().st_uid == NOBODY.pw_uid
    kids = {_title(pid).split(" ", 1)[-1]: pid for pid in children_of(unprivileged.proc.pid)}
    workers = [p for p in children_of(kids["lspawn"]) if _title(p).endswith("delivery worker local")]
    assert workers and all(_status(p)["Uid"] == [str(NOBODY.pw_uid)] * 4 for p in workers)


@as_root
def test_a_dotqmail_list_of_many_forwards_is_sent_on_whoever_owns_the_domain(root, dns):
    """A .qmail with 45,000 `&` lines (over a megabyte of addresses) forwards
    them all, both from the run user's own worker and through the root local
    spawner, as qmail-local does: their results must not be cut at the
    1 MiB frame of a job that carries no message."""
    (root / "qrelay.toml").write_text(
        f'[run]\nuser = "nobody"\n[smtp]\nreject_unknown_mailboxes = false\n'
        f'[delivery]\ndns_servers = ["{dns.address}"]\n[scheduler]\npoll_interval = 0.02\n')
    (root / "control" / "concurrencyremote").write_text("0\n")   # the copies stay queued
    for domain, owner in (("own.example", NOBODY.pw_uid), ("other.example", OTHER)):
        r = run_cli("domain", "add", str(root), domain, "--uid", str(owner), "--gid", str(owner))
        assert r.returncode == 0, r.stderr
        dotqmail = root / "domains" / domain / ".qmail-list"
        dotqmail.write_text("".join(f"&member{i:05d}@lists.example.net\n" for i in range(45000)))
        os.chown(dotqmail, owner, owner)
        assert dotqmail.stat().st_size > 1 << 20
    q = QrelayProcess(root, procs=1)
    try:
        with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
            assert s.sendmail("a@src.test", ["list@own.example", "list@other.example"],
                              b"Subject: x\r\n\r\nhi\r\n") == {}
        wait_for(lambda: sum(": success: did_0+45000+0/qp_" in t for t in texts(root)) == 2
                 or None, timeout=60, what="both lists forwarded")
        assert not any(": deferral: " in t for t in texts(root))
        # Each copy is queued for the user whose delivery made it (qmail-queue's caller).
        copies = [int(t.rsplit("qp_", 1)[1].rstrip("/")) for t in texts(root)
                  if ": success: did_0+45000+0/qp_" in t]
        uids = [int(t.rsplit(" ", 1)[1]) for t in texts(root)
                if t.startswith("info msg ") and int(t.split()[2].rstrip(":")) in copies]
        assert sorted(uids) == sorted([NOBODY.pw_uid, OTHER])
    finally:
        _stop(q)


@as_root
def test_the_local_spawner_socket_is_the_run_users_alone(unprivileged, root):
    st = (root / "queue" / "lspawn.sock").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY.pw_uid, 0o600)


@as_root
def test_remote_workers_are_started_by_the_root_spawner_and_run_as_the_run_user(root, dns, sinks):
    """worker_procs = 1 with an unprivileged scheduler: the worker is exec'd by
    the local spawner (root may run the interpreter wherever it lives) and
    becomes the run user before it opens anything."""
    sink = sinks()
    (root / "control" / "smtproutes").write_text(f"sink.test:127.0.0.1:{sink.port}\n")
    (root / "qrelay.toml").write_text(
        f'[run]\nuser = "nobody"\n[delivery]\nworker_procs = 1\n'
        f'dns_servers = ["{dns.address}"]\n[scheduler]\npoll_interval = 0.02\n')
    (root / "control" / "tcp.smtp").write_text("127.:allow,RELAYCLIENT=\"\"\n")
    r = run_cli("tcprules", str(root))
    assert r.returncode == 0, r.stderr
    q = QrelayProcess(root, procs=1)
    try:
        with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
            assert s.sendmail("a@src.test", ["x@sink.test"], b"Subject: r\r\n\r\nhi\r\n") == {}
        assert sink.wait_messages(1, timeout=30).get("messages") == 1
        kids = {_title(pid).split(" ", 1)[1]: pid for pid in children_of(q.proc.pid)}
        [worker] = children_of(kids["lspawn"])
        assert _title(worker).endswith("delivery worker remote")
        assert _status(worker)["Uid"] == [str(NOBODY.pw_uid)] * 4
        # It reads what remote servers send: as the receivers, no set-uid program helps it.
        assert _status(worker)["NoNewPrivs"] == ["1"]
    finally:
        _stop(q)


@as_root
def test_a_link_the_run_user_puts_in_log_is_never_followed_by_the_root_supervisor(root, tmp_path):
    """log/ is the run user's, and the supervisor (root) writes its lines there
    too: a `current` replaced by a symlink (or a hard link) must not make root
    append to, chown or chmod the file it points to."""
    (root / "qrelay.toml").write_text('[run]\nuser = "nobody"\n')
    secret = tmp_path / "secret"
    secret.write_text("root:only\n")
    secret.chmod(0o600)
    q = RunningQrelay(root, procs=1)
    try:
        wait_for(lambda: any("started qrelay-receiver-0" in t for t in service_texts(root)),
                 what="the supervisor's start lines")
        # As the run user (a receiver taken over would do the same).
        done = subprocess.run(["ln", "-sfn", str(secret), str(root / "log" / "current")],
                              user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    finally:
        assert q.stop() == 0       # the supervisor logs `stopping`, then closes its log
    st = secret.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o600)
    assert secret.read_text() == "root:only\n"


@as_root
def test_a_link_the_run_user_puts_in_place_of_the_lock_is_refused_not_followed(root, tmp_path):
    """queue/lock/ is the run user's: a sendmutex replaced by a symlink must
    not make the next `qrelay run` (root) truncate and write the file it points to."""
    (root / "qrelay.toml").write_text('[run]\nuser = "nobody"\n')
    (root / "queue" / "lock").mkdir()
    give_tree(root, RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid))   # as a previous run left it
    secret = tmp_path / "secret"
    secret.write_text("root:only\n")
    secret.chmod(0o600)
    done = subprocess.run(["ln", "-sfn", str(secret), str(root / "queue" / "lock" / "sendmutex")],
                          user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    r = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(root), "--listen",
                        "127.0.0.1:0"], cwd=Path(__file__).parent.parent, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: cannot start: {root}/queue/lock/sendmutex is not a regular file"
        " (a link, or a special file): remove it"]
    assert secret.read_text() == "root:only\n"
    assert (secret.stat().st_uid, secret.stat().st_mode & 0o7777) == (0, 0o600)


@as_root
def test_qmails_lock_directory_in_a_queue_the_run_user_owns_is_handed_over(root):
    """A qmail home turned qrelay root (README: import-qmail, then `qrelay
    run`) keeps qmail's queue/lock/ (qmails's, or root's after an import as
    root) while queue/ is the run user's: the lock, opened as queue/'s owner,
    was refused (`Permission denied`). Its real directory and sendmutex are
    given to queue/'s owner first, as give_tree would after the start."""
    from engine.run import hold_queue
    give_tree(root, RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid))
    lock = root / "queue" / "lock"
    lock.mkdir(mode=0o750, exist_ok=True)
    (lock / "sendmutex").touch(mode=0o600)
    for p in (lock, lock / "sendmutex"):
        os.chown(p, 0, 0)
    fd = hold_queue(root)
    try:
        assert (lock / "sendmutex").read_text() == f"{os.getpid()}\n"
        for p in (lock, lock / "sendmutex"):
            assert (p.stat().st_uid, p.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    finally:
        os.close(fd)


def test_acting_as_changes_the_effective_ids_for_its_duration_only(tmp_path):
    from engine.privilege import acting_as, acting_as_owner
    before = (os.getuid(), os.geteuid(), os.getegid(), os.getgroups())
    if os.geteuid() == 0:
        with acting_as(NOBODY.pw_uid, NOBODY.pw_gid):
            assert (os.getuid(), os.geteuid(), os.getegid(), os.getgroups()) == (
                0, NOBODY.pw_uid, NOBODY.pw_gid, [])
            with pytest.raises(PermissionError):
                (tmp_path / "x").write_text("")     # 0700 root's: nobody may not
    with acting_as_owner(tmp_path / "missing"), acting_as(0, 0):
        assert (os.getuid(), os.geteuid(), os.getegid(), os.getgroups()) == before
    assert (os.getuid(), os.geteuid(), os.getegid(), os.getgroups()) == before


def _links_by_nobody(targets: dict[Path, Path]) -> None:
    """As the run user (nobody) would: each key replaced by a symlink to its value."""
    for link, target in targets.items():
        done = subprocess.run(["ln", "-sfn", str(target), str(link)], user=NOBODY.pw_uid,
                              group=NOBODY.pw_gid, extra_groups=[], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr


@as_root
def test_root_tools_never_follow_a_link_the_run_user_puts_in_its_spool_or_relay_table(
        root, tmp_path):
    """queue/ and relay/ are the run user's. Its index's lock.mdb swapped for a
    symlink to a root-only file: LMDB opens a lock file read-write, grows it
    and writes its header, so root's qstat, hold, flush, doctor or
    relayclients would have overwritten the file it points to. They open the
    spool and the table as its owner: the link leads nowhere nobody may write."""
    from engine.queue import Envelope, Spool
    with Spool(root / "queue") as s:
        s.enqueue(Envelope("a@src.test", ("b@dst.test",)), b"Subject: x\n\nhi\n")
    assert run_cli("relayclients", "add", str(root), "192.0.2.1").returncode == 0
    give_tree(root, RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid))   # as `qrelay run` does
    # First as it should be: the tools work as the owner, and leave nothing of root's.
    assert run_cli("qstat", str(root)).stdout.startswith("messages in queue: 1\n")
    assert run_cli("hold", str(root), "--older-than", "0").returncode == 0
    assert "192.0.2.1" in run_cli("relayclients", str(root)).stdout
    for top in ("queue", "relay"):
        for path in (root / top).rglob("*"):
            assert path.lstat().st_uid == NOBODY.pw_uid, path
    secrets = {}
    for top in ("queue/index", "relay"):
        secret = tmp_path / f"secret-{top.replace('/', '-')}"
        secret.write_text("root:only\n")
        secret.chmod(0o600)
        secrets[root / top / "lock.mdb"] = secret
    _links_by_nobody(secrets)
    for args in (("qstat",), ("qread",), ("qshape",), ("why", "1"), ("release", "1"),
                 ("flush",), ("doctor",), ("relayclients",),
                 ("relayclients", "add", "192.0.2.2")):
        done = run_cli(args[0], str(root), *args[1:])
        assert "Traceback" not in done.stderr, (args, done.stderr)
        for secret in secrets.values():
            assert secret.read_text() == "root:only\n", args
            assert (secret.stat().st_uid, secret.stat().st_mode & 0o7777) == (0, 0o600)
    # A lock it may not write: read without one, as any reader without write access.
    assert run_cli("qstat", str(root)).stdout.startswith("messages in queue: 1\n")


@as_root
def test_a_worker_the_root_spawner_starts_opens_the_spool_as_the_user_it_becomes(root, tmp_path):
    """The run user asks the local spawner (root) for a worker that reads the
    spool itself: that worker opens the index as the run user, before it drops
    for good, so a lock.mdb swapped for a link is not written through."""
    import socket

    from engine.delivery.spawner import worker_argv
    from engine.queue import Envelope, Spool
    with Spool(root / "queue") as s:
        s.enqueue(Envelope("a@src.test", ("b@dst.test",)), b"Subject: x\n\nhi\n")
    give_tree(root, RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid))
    secret = tmp_path / "secret"
    secret.write_text("root:only\n")
    secret.chmod(0o600)
    _links_by_nobody({root / "queue" / "index" / "lock.mdb": secret})
    mine, theirs = socket.socketpair()
    with mine, theirs:
        argv = worker_argv(sys.executable, str(root), theirs.fileno(), os.getpid(), "local",
                           1 << 20, False, (NOBODY.pw_uid, NOBODY.pw_gid))
        proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), cwd=Path(__file__).parent.parent,
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        theirs.close()
        mine.shutdown(socket.SHUT_WR)       # no job: it serves, reads the end, exits
        try:
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    assert secret.read_text() == "root:only\n"


@as_root
def test_a_metrics_directory_the_run_user_made_a_link_is_emptied_as_that_user(root, tmp_path):
    """run/ is the run user's: `qrelay run` (root) empties run/metrics of the
    last run's *.db files as that user, so a run/metrics swapped for a link to
    another directory never makes root delete the *.db files there (a link to a
    directory of the run user's own, tmpfs say, still works)."""
    searchable(tmp_path)
    (root / "qrelay.toml").write_text('[run]\nuser = "nobody"\n')
    give_tree(root, RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (elsewhere / "aliases.db").write_text("root's\n")
    shutil.rmtree(root / "run" / "metrics", ignore_errors=True)
    _links_by_nobody({root / "run" / "metrics": elsewhere})
    r = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(root), "--listen",
                        "127.0.0.1:0"], cwd=Path(__file__).parent.parent, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stderr) == (1, f"Error: cannot empty {root}/run/metrics: "
                                           f"{root}/run/metrics/aliases.db: Permission denied\n")
    assert (elsewhere / "aliases.db").read_text() == "root's\n"


@as_root
def test_a_lock_directory_the_run_user_made_a_link_is_not_followed_by_root(root, tmp_path):
    """queue/lock itself swapped for a link to another directory (another
    qmail's queue/lock, say): `qrelay run` opens the lock as queue/'s owner, so
    root never truncates or creates a sendmutex there."""
    searchable(tmp_path)
    (root / "qrelay.toml").write_text('[run]\nuser = "nobody"\n')
    (root / "queue" / "lock").mkdir(exist_ok=True)
    give_tree(root, RunUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid))
    other = tmp_path / "other-lock"
    other.mkdir(mode=0o755)
    (other / "sendmutex").write_text("4242\n")
    shutil.rmtree(root / "queue" / "lock")
    _links_by_nobody({root / "queue" / "lock": other})
    r = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(root), "--listen",
                        "127.0.0.1:0"], cwd=Path(__file__).parent.parent, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stderr) == (
        1, f"Error: cannot start: {root}/queue/lock/sendmutex: Permission denied\n")
    assert (other / "sendmutex").read_text() == "4242\n"


@as_root
def test_a_control_file_only_root_may_read_stops_the_start_in_one_line(root, tmp_path):
    """The receivers read the control files as the run user: one left 0600
    root's made every child fail and restart in a loop behind a started
    `qrelay run`; the start now loads them as that user and says which."""
    searchable(tmp_path)
    (root / "qrelay.toml").write_text('[run]\nuser = "nobody"\n')
    (root / "control" / "rcpthosts").chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(root), "--listen",
                        "127.0.0.1:0"], cwd=Path(__file__).parent.parent, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stderr) == (1, "Error: cannot start: as [run] user nobody: unable to "
                                           f"read {root}/control/rcpthosts: Permission denied\n")
