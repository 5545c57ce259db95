"""The local channel end to end (engine/delivery/lspawn.py): `qrelay run` as
root takes mail over SMTP for a vpopmail domain managed with the qrelay CLI,
refuses unknown users at RCPT, and its local delivery runs as the domain's
owner (never root) and lands in the user's Maildir. Then the hard cases:
kill -9 of the local worker or of everything mid-delivery (at least once,
nothing partial), permission trouble (deferred until fixed), 200 deliveries
at once into one Maildir, a no-mailbox bounce and an over-quota failure.
DNS is a fake server; every process is stopped by its pid."""
from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pytest

from engine.delivery.channels import Group
from engine.delivery.local.dotqmail import TEXT_HOME_WRITABLE, TEXT_QMAIL_WRITABLE
from engine.delivery.local.vdelivermail import TEXT_NO_USER, TEXT_OVER_QUOTA
from engine.delivery.lspawn import UserSpawner, open_deliverer
from engine.log import logsafe
from tests.conftest import run_cli
from tests.smtp_harness import QrelayProcess, children_of, process_title
from tests.test_delivery_e2e import log_lines, queue_count, texts, wait_for

OWNER = 65534   # nobody/nogroup: what the deliveries must run as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to the owner's uid needs root")


def traversable(path: Path) -> None:
    """Let the mailbox owner reach the test's temporary root (pytest makes 0700 dirs)."""
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o001)


@pytest.fixture
def mx(root: Path, dns):
    traversable(root)
    # `[run] user = ""`: everything stays root, so the scheduler itself starts
    # a worker per mailbox owner (the mode these tests kill and break);
    # test_privilege.py runs the default mode, where the scheduler is
    # unprivileged and the root local spawner starts those workers.
    (root / "qrelay.toml").write_text(
        f'[run]\nuser = ""\n'
        f'[delivery]\ndns_servers = ["{dns.address}"]\n[scheduler]\npoll_interval = 0.02\n')
    for args in (["domain", "add", str(root), "example.com", "--uid", str(OWNER), "--gid", str(OWNER)],
                 ["alias", "add", str(root), "sales@example.com", "joe@example.com", "ann@example.com"]):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
    for user in ("joe", "ann"):
        r = run_cli_input(["user", "add", str(root), f"{user}@example.com"], "secret\n")
        assert r.returncode == 0, r.stderr
    q = QrelayProcess(root, procs=1)
    yield q
    q.stop()
    stderr = q.proc.stderr.read()
    q.proc.stderr.close()
    assert "Traceback" not in stderr


def run_cli_input(args: list[str], stdin: str):
    import subprocess
    import sys

    from tests.conftest import REPO
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], input=stdin, cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def maildir_files(root: Path, user: str) -> list[Path]:
    new = root / "domains" / "example.com" / user / "Maildir" / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_mail_lands_in_the_maildir_as_the_domain_owner(mx, root):
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["joe@example.com"], b"Subject: one\r\n\r\nhello\r\n") == {}
    [path] = wait_for(lambda: maildir_files(root, "joe"), what="the message in joe's Maildir/new")
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (OWNER, OWNER)
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <a@src.test>\nDelivered-To: joe@example.com\n")
    assert data.endswith(b"Subject: one\n\nhello\n") and b"\r\n" not in data
    wait_for(lambda: any(t.startswith("delivery ") and ": success: " in t for t in texts(root)),
             what="the success line")
    assert any(t.endswith("to local example.com-joe@example.com") for t in texts(root))


def test_unknown_user_gets_550_at_rcpt_and_an_alias_fans_out(mx, root):
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("a@src.test")
        assert s.rcpt("nobody@example.com") == (550, b"sorry, no mailbox here by that name. (#5.1.1)")
        assert s.rcpt("sales@example.com")[0] == 250
        assert s.data(b"Subject: to sales\r\n\r\nhi\r\n")[0] == 250
    for user in ("joe", "ann"):
        # A forward is queued, preprocessed and delivered again: slow on a loaded box.
        [path] = wait_for(lambda: maildir_files(root, user), timeout=45,
                          what=f"the forward in {user}'s Maildir")
        # qmail-queue's line for the copy, queued by the user that delivered.
        assert re.match(rb"Return-Path: <a@src.test>\nDelivered-To: %s@example.com\n"
                        rb"Received: \(qmail \d+ invoked by uid %d\); .* -0000\n"
                        rb"Delivered-To: example.com-sales@example.com\n"
                        rb"Received: \(qmail \d+ invoked from network\)" % (user.encode(), OWNER),
                        path.read_bytes())
    assert any(re.fullmatch(rf"info msg \d+: bytes \d+ from <a@src.test> qp \d+ uid {OWNER}", t)
               for t in texts(root))


def test_a_program_runs_with_the_default_signal_actions(mx, root):
    # qmail-local's programs start with HUP, INT and ALRM at their defaults; the
    # worker ignores them (SIG_IGN survives exec), so a program that times
    # itself out with alarm() ran for ever.
    domain = root / "domains" / "example.com"
    out = domain / "signals"
    (domain / ".qmail-sig").write_text(f"|grep ^SigIgn: /proc/self/status > {out}\n")
    os.chown(domain / ".qmail-sig", OWNER, OWNER)
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["sig@example.com"], b"Subject: s\r\n\r\nx\r\n") == {}
    wait_for(lambda: any(t.startswith("delivery ") and ": success: " in t for t in texts(root)),
             what="the program's success line")
    ignored = int(out.read_text().split()[1], 16)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGALRM):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} ignored in the program"


def test_user_spawner_splits_by_owner_and_refuses_root(root, tmp_path):
    """Recipients with no users/assign line get the deliverer's error without
    any worker; nothing runs as root."""
    import asyncio

    class Spool:
        def read_message(self, msgid):
            return b"Subject: x\r\n\r\nbody\r\n"

    async def main():
        courier = UserSpawner(root, Spool(), open_deliverer(root), max_message=1 << 20)
        try:
            got = await courier.deliver(Group("local", 1, "mx.example.com", "a@src.test",
                                              ("nosuchuser@mx.example.com",)))
        finally:
            await courier.close()
        return got, courier
    got, courier = asyncio.run(main())
    assert [r.status for r in got] in (["Z"], ["D"])
    assert courier.spawners == {}



def test_a_dotqmail_list_of_many_forwards_comes_back_from_the_owners_worker(root):
    """qmail-local forwards to every `&` line of a .qmail, however many: a list
    of 45,000 addresses (over a megabyte of them) must come back from the
    worker that ran it, not fail the job (retried for ever, the Maildir line
    before the forwards delivering again on every try)."""
    import asyncio

    traversable(root)
    r = run_cli("domain", "add", str(root), "example.com", "--uid", str(OWNER), "--gid", str(OWNER))
    assert r.returncode == 0, r.stderr
    targets = [f"member{i:05d}@lists.example.net" for i in range(45000)]
    dotqmail = root / "domains" / "example.com" / ".qmail-list"
    dotqmail.write_text("".join(f"&{t}\n" for t in targets))
    os.chown(dotqmail, OWNER, OWNER)
    assert dotqmail.stat().st_size > 1 << 20

    async def main():
        courier = UserSpawner(root, None, open_deliverer(root), max_message=1 << 20)
        try:
            return await courier.deliver(Group("local", 1, "example.com", "a@src.test",
                                              ("example.com-list@example.com",)),
                                         b"Subject: x\r\n\r\nbody\r\n")
        finally:
            await courier.close()
    [got] = asyncio.run(main())
    assert (got.status, got.text) == ("K", "did 0+45000+0\n")
    [fwd] = got.forwards
    assert fwd.recipients == tuple(targets)
    assert fwd.prefix == b"Delivered-To: example.com-list@example.com\r\n"


def test_delivery_program_timeout_reaches_the_local_deliverer(root):
    """`[delivery] program_timeout` in qrelay.toml is what a `|program` line gets."""
    from engine.config.settings import load_settings
    assert open_deliverer(root, load_settings(root)).delivery.config.program_timeout == 1200
    (root / "qrelay.toml").write_text("[delivery]\nprogram_timeout = 30\n")
    assert open_deliverer(root, load_settings(root)).delivery.config.program_timeout == 30


def test_a_recipient_with_no_user_never_runs_here_even_if_its_user_appears_meanwhile(root, tmp_path):
    """A recipient `user_of` found no owner for is answered without running
    anything in this process (root, in the local spawner): a passwd entry
    that appears between that look-up and the delivery (useradd) must not
    make its .qmail run as root."""
    import asyncio

    from engine.delivery.local import LocalDelivery
    from engine.delivery.local.accounts import DeliveryAccounts
    from engine.delivery.local.courier import load_local_config
    from engine.delivery.lspawn import LocalDeliverer

    home = tmp_path / "carol"
    home.mkdir()
    ran = tmp_path / "ran"
    (home / ".qmail").write_text(f"|id -u > {ran}\n")
    os.chown(home, 4242, 4242)
    os.chown(home / ".qmail", 4242, 4242)
    looked_up = []

    def getpw(name):     # carol is created (useradd) right after the first look-up
        looked_up.append(name)
        return ("carol", 4242, 4242, str(home)) if len(looked_up) > 2 and name == "carol" else None
    config = load_local_config(root, getpw=getpw)
    deliverer = LocalDeliverer(LocalDelivery(config, DeliveryAccounts.at(root)))

    async def main():
        courier = UserSpawner(root, None, deliverer, max_message=1 << 20)
        try:
            return await courier.deliver(Group("local", 1, "mx.example.com", "a@src.test",
                                              ("carol@mx.example.com",)),
                                         b"Subject: x\r\n\r\nbody\r\n")
        finally:
            await courier.close()
    [got] = asyncio.run(main())
    assert not ran.exists()
    assert got.status == "Z"     # retried: the next try runs it as carol


# --- crash, permission, concurrency and failure cases (issue #11 item 5) ---------------
#
# The tests below start `qrelay run` themselves (some restart it on the same
# root). A slow delivery is a `.qmail-slow` alias whose first line is a program
# that waits for a flag file the test creates, then a Maildir line: the test
# knows a delivery is in flight by the pid the program wrote, not by a clock.

DOMAIN_DIR = ("domains", "example.com")


def body_of(tag: str, size: int = 0) -> bytes:
    """A message whose last line names it: a file that ends with it is whole."""
    pad = b"".join(b"%s line %05d\r\n" % (tag.encode(), i) for i in range(size // 24))
    return b"Subject: %s\r\n\r\n%send of %s\r\n" % (tag.encode(), pad, tag.encode())


def tag_of(data: bytes) -> str:
    return re.search(rb"^Subject: (\S+)$", data, re.M).group(1).decode()


def all_new(root: Path) -> list[Path]:
    """Every file in every new/ under the domain (users and aliases alike)."""
    return sorted(p for p in (root.joinpath(*DOMAIN_DIR)).rglob("new/*") if p.is_file())


def tags_in(root: Path, user: str) -> list[str]:
    return [tag_of(p.read_bytes()) for p in maildir_files(root, user)]


def assert_nothing_partial(root: Path, bodies: dict[str, bytes]) -> None:
    """Each file in a new/ ends with its whole message, and no tmp/ name is in new/."""
    for path in all_new(root):
        data = path.read_bytes()
        tag = tag_of(data)
        assert data.endswith(bodies[tag].replace(b"\r\n", b"\n")), f"{path} is partial"
    under = root.joinpath(*DOMAIN_DIR)
    tmp = {p.name for p in under.rglob("tmp/*")}
    new = {p.name for p in under.rglob("new/*")}
    assert not tmp & new


def is_local_worker(pid: int) -> bool:
    return process_title(pid).startswith("qrelay: delivery worker local")


def local_workers(root: Path) -> list[int]:
    pidfile = root / "log" / "scheduler.pid"
    if not pidfile.exists():
        return []
    try:
        sched = int(pidfile.read_text())
    except ValueError:
        return []
    return [p for p in children_of(sched) if is_local_worker(p)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Gate:
    """`.qmail-slow`: a program that writes its pid and waits for the flag, then
    joe's Maildir. `open()` lets every waiting and future delivery through."""

    def __init__(self, root: Path, work: Path) -> None:
        work.mkdir()
        os.chown(work, OWNER, OWNER)
        self.pids_file = work / "pids"
        self.flag = work / "go"
        qmail = root.joinpath(*DOMAIN_DIR, ".qmail-slow")
        qmail.write_text(f"|echo $$ >> {self.pids_file}; "
                         f"while [ ! -e {self.flag} ]; do sleep 0.02; done\n./joe/Maildir/\n")
        os.chown(qmail, OWNER, OWNER)
        os.chmod(qmail, 0o600)

    def pids(self) -> list[int]:
        if not self.pids_file.exists():
            return []
        return [int(x) for x in self.pids_file.read_text().split()]

    def open(self) -> None:
        self.flag.touch()

    def close(self) -> None:
        """Let the programs an unclean kill left behind end; kill by pid any that do not."""
        self.open()
        try:
            wait_for(lambda: not any(alive(p) for p in self.pids()), timeout=5,
                     what="the gate programs to exit")
        finally:
            for p in self.pids():
                if alive(p):
                    os.kill(p, signal.SIGKILL)


@pytest.fixture
def mailroot(root: Path):
    """ROOT with example.com owned by OWNER and users joe and ann (no qrelay running;
    made in process: the CLI's own path is the `mx` fixture's and the quota test's)."""
    from engine.accounts.admin import add_domain, add_user
    traversable(root)
    add_domain(root, "example.com", uid=OWNER, gid=OWNER)
    for user in ("joe", "ann"):
        add_user(root, f"{user}@example.com", "secret")
    return root


@pytest.fixture
def start(mailroot: Path, dns):
    """start(toml="") runs `qrelay run` on ROOT (again, after a kill); all stopped by pid."""
    started: list[QrelayProcess] = []

    def go(toml: str = "") -> QrelayProcess:
        (mailroot / "qrelay.toml").write_text(     # [run] user: see the mx fixture
            f'[run]\nuser = ""\n[delivery]\ndns_servers = ["{dns.address}"]\n'
            f"[scheduler]\npoll_interval = 0.02\n{toml}")
        q = QrelayProcess(mailroot, procs=1)
        started.append(q)
        return q

    yield go
    print("\n".join(log_lines(mailroot)[-80:]))     # shown when the test failed
    stderr = ""
    for q in started:
        q.stop()
        stderr += q.proc.stderr.read()
        q.proc.stderr.close()
    assert "Traceback" not in stderr


@pytest.fixture
def gate(mailroot: Path, tmp_path: Path):
    g = Gate(mailroot, tmp_path / "gate")
    yield g
    g.close()


def deliveries(root: Path, word: str, text: str = "") -> list[str]:
    """`delivery N: WORD: TEXT…` lines (text in the log's form)."""
    return [t for t in texts(root)
            if re.match(r"delivery \d+: %s: " % word, t) and logsafe(text) in t]


def test_kill9_of_the_local_worker_mid_delivery_defers_then_delivers_whole(start, gate, root):
    q = start()
    bodies = {f"slow{i}": body_of(f"slow{i}", 20_000) for i in range(4)}
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        for tag, body in bodies.items():
            assert s.sendmail("a@src.test", ["slow@example.com"], body) == {}
    wait_for(lambda: len(gate.pids()) == 4, what="4 deliveries waiting in the program")
    [worker] = local_workers(root)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: len(deliveries(root, "deferral", "Possible duplicate!")) == 4,
             what="4 deferrals for the dead worker")
    assert maildir_files(root, "joe") == []
    [again] = wait_for(lambda: local_workers(root), what="the local worker restarted")
    assert again != worker
    gate.open()
    assert run_cli("flush", str(root)).returncode == 0
    wait_for(lambda: set(tags_in(root, "joe")) >= set(bodies), what="every message in joe's Maildir")
    wait_for(lambda: queue_count(root) == 0 or None, what="empty queue")
    assert_nothing_partial(root, bodies)


def test_kill9_of_everything_mid_delivery_then_restart_delivers_every_accepted_message(
        start, gate, root):
    q = start()
    bodies = {f"slow{i}": body_of(f"slow{i}", 20_000) for i in range(3)}
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        for tag, body in bodies.items():
            assert s.sendmail("a@src.test", ["slow@example.com"], body) == {}
    wait_for(lambda: len(gate.pids()) == 3, what="3 deliveries waiting in the program")
    accepted: list[str] = []
    sending = threading.Event()

    def client() -> None:
        # Big messages straight to joe until qrelay dies under it: some are being
        # written into the Maildir at the kill. One counts once it got its 250.
        try:
            with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
                for i in range(200):
                    tag = f"big{i}"
                    bodies[tag] = body_of(tag, 100_000)
                    s.sendmail("a@src.test", ["joe@example.com"], bodies[tag])
                    accepted.append(tag)
                    sending.set()
        except (OSError, smtplib.SMTPException):
            pass

    sender = threading.Thread(target=client)
    sender.start()
    try:
        wait_for(lambda: len(maildir_files(root, "joe")) >= 3, what="some big messages delivered")
        [worker] = local_workers(root)
        os.killpg(q.pid, signal.SIGKILL)       # supervisor, receiver, scheduler, worker at once
        q.proc.wait(5)
    finally:
        sender.join(15)
    accepted += bodies.keys() - {t for t in bodies if t.startswith("big")}
    wait_for(lambda: not alive(worker), timeout=5, what="the worker gone with its group")
    assert_nothing_partial(root, bodies)
    assert not set(tags_in(root, "joe")) & {t for t in bodies if t.startswith("slow")}
    start()
    gate.open()
    wait_for(lambda: set(tags_in(root, "joe")) >= set(accepted), timeout=20,
             what="every accepted message in joe's Maildir after the restart")
    wait_for(lambda: queue_count(root) == 0 or None, what="empty queue")
    assert_nothing_partial(root, bodies)


def flush(root: Path) -> str:
    r = run_cli("flush", str(root))
    assert r.returncode == 0, r.stderr
    assert re.match(r"qrelay: \d+ deferred recipients due now; woke the scheduler", r.stdout), r.stdout
    return r.stdout


def test_a_world_writable_home_then_dotqmail_defer_until_fixed_and_flushed(start, root):
    home = root.joinpath(*DOMAIN_DIR)
    dotqmail = home / ".qmail-default"
    os.chmod(home, 0o702)
    q = start()
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["joe@example.com"], body_of("perm")) == {}
    wait_for(lambda: deliveries(root, "deferral", TEXT_HOME_WRITABLE), what="the writable-home deferral")
    assert queue_count(root) == 1 and maildir_files(root, "joe") == []
    os.chmod(home, 0o700)
    os.chmod(dotqmail, 0o602)            # the next trouble: the .qmail file
    assert flush(root).startswith("qrelay: 1 deferred recipients due now;")
    wait_for(lambda: deliveries(root, "deferral", TEXT_QMAIL_WRITABLE), what="the writable-.qmail deferral")
    assert queue_count(root) == 1 and maildir_files(root, "joe") == []
    os.chmod(dotqmail, 0o600)
    # `qrelay flush` marks the spool, then sends ALRM, whose reschedule can come
    # after the attempt the marking started has deferred: one more attempt may
    # have begun before the chmod and defer again. Each such deferral gets a flush.
    seen = len(deliveries(root, "deferral"))
    for _ in range(3):
        flush(root)
        wait_for(lambda: tags_in(root, "joe") or len(deliveries(root, "deferral")) > seen,
                 what="the message in joe's Maildir after the flush")
        if tags_in(root, "joe"):
            break
        seen = len(deliveries(root, "deferral"))
    assert tags_in(root, "joe") == ["perm"]
    wait_for(lambda: queue_count(root) == 0 or None, what="empty queue")
    assert {t.split(": ", 2)[2] for t in deliveries(root, "deferral")} == {
        logsafe(TEXT_HOME_WRITABLE), logsafe(TEXT_QMAIL_WRITABLE)}


def test_200_concurrent_deliveries_to_one_mailbox_are_200_intact_files(start, root):
    # As many deliveries at once as the scheduler and the worker's threads allow.
    (root / "control" / "concurrencylocal").write_text("200\n")
    q = start("per_destination_concurrency = 200\n")
    bodies = {f"c{i:03d}": body_of(f"c{i:03d}", 2_000 + 37 * i) for i in range(200)}

    def session(tags: list[str]) -> None:
        with smtplib.SMTP("127.0.0.1", q.port, timeout=20) as s:
            for tag in tags:
                assert s.sendmail(f"{tag}@src.test", ["joe@example.com"], bodies[tag]) == {}

    tags = sorted(bodies)
    with ThreadPool(10) as pool:
        pool.map(session, [tags[i::10] for i in range(10)])
    wait_for(lambda: len(maildir_files(root, "joe")) >= 200, timeout=30, what="200 files")
    files = maildir_files(root, "joe")
    assert len(files) == 200 and len({p.name for p in files}) == 200
    got = sorted(tag_of(p.read_bytes()) for p in files)
    assert got == tags
    for path in files:
        data = path.read_bytes()
        tag = tag_of(data)
        assert data.startswith(f"Return-Path: <{tag}@src.test>\nDelivered-To: joe@example.com\n".encode())
        assert data.endswith(bodies[tag].replace(b"\r\n", b"\n"))
        # vdelivermail's Maildir++ name carries the size its quota code counts.
        assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+\..+,S=%d" % len(data), path.name), path.name
    assert_nothing_partial(root, bodies)
    wait_for(lambda: len(deliveries(root, "success")) == 200, what="200 success lines")


def test_unknown_user_accepted_when_rcpt_checks_are_off_then_bounced(start, root):
    q = start("[smtp]\nreject_unknown_mailboxes = false\n")
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["nosuch@example.com"], body_of("lost")) == {}
    [line] = wait_for(lambda: deliveries(root, "failure", TEXT_NO_USER), what="the no-mailbox failure")
    number = line.split()[1].rstrip(":")
    [start_line] = [t for t in texts(root) if t.startswith(f"starting delivery {number}: ")]
    msgid = start_line.split()[4]
    assert start_line.endswith(" to local example.com-nosuch@example.com")
    wait_for(lambda: any(re.match(rf"bounce msg {msgid} qp \d+$", t) for t in texts(root)),
             what="the bounce msg line")
    assert all_new(root) == []


def test_over_quota_is_a_failure_with_vdelivermails_text(start, mailroot, root):
    r = run_cli_input(["user", "add", str(root), "tiny@example.com", "--quota", "1000"], "secret\n")
    assert r.returncode == 0, r.stderr
    q = start()
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["tiny@example.com"], body_of("fat", 5_000)) == {}
    wait_for(lambda: deliveries(root, "failure", TEXT_OVER_QUOTA), what="the over-quota failure")
    wait_for(lambda: any(t.startswith("bounce msg ") for t in texts(root)), what="the bounce msg line")
    assert maildir_files(root, "tiny") == []


def test_a_message_over_the_start_size_limit_but_accepted_after_a_reload_is_delivered(start, root):
    """The local workers took messages up to the [smtp] max_message_bytes of
    the start (+ 1 MB): after a reload raised it, the receivers accepted a
    4 MB message that then deferred at every try ("the delivery job is too
    large for a worker") until it bounced. So did one under a databytes above
    max_message_bytes. A job carries any message the spool writer takes."""
    q = start("[smtp]\nmax_message_bytes = 1000000\nreload_poll_seconds = 0.1\n")
    toml = root / "qrelay.toml"
    toml.write_text(toml.read_text().replace("max_message_bytes = 1000000",
                                             "max_message_bytes = 5000000"))

    def size() -> int:
        with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
            s.ehlo("client.test")
            return int(s.esmtp_features["size"])
    wait_for(lambda: size() == 5000000, what="the receiver's reload")
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["joe@example.com"], body_of("big", 6_000_000)) == {}
    [line] = wait_for(lambda: [t for t in texts(root) if re.match(r"delivery \d+: ", t)],
                      what="the delivery's result")
    assert ": success: " in line
    [path] = maildir_files(root, "joe")
    assert path.read_bytes().endswith(b"end of big\n")


def within(pred, seconds: float) -> bool:
    """Whether pred() comes true within `seconds` (polled; never raises)."""
    try:
        wait_for(pred, timeout=seconds)
        return True
    except AssertionError:
        return False


def test_a_busy_local_worker_dies_with_its_scheduler(start, gate, root):
    q = start()
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["slow@example.com"], body_of("orphan")) == {}
    wait_for(lambda: len(gate.pids()) == 1, what="the delivery waiting in the program")
    [worker] = local_workers(root)
    os.kill(int((root / "log" / "scheduler.pid").read_text()), signal.SIGKILL)
    died = within(lambda: not alive(worker), 6)
    gate.open()
    try:
        wait_for(lambda: not alive(worker), what="the worker to finish its delivery and exit")
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
    # The supervisor restarted the scheduler, which delivers it again: at least once.
    wait_for(lambda: "orphan" in tags_in(root, "joe"), what="the message in joe's Maildir")
    assert died, "the local worker outlived its scheduler"


def test_term_leaves_no_program_of_an_abandoned_delivery_running(start, gate, root):
    # The worker gave the delivery up at the stop; its `|program` (a session of
    # its own) ran on, orphaned and with no time limit, and ran again at the
    # next start. Now the worker kills it as a timeout would.
    q = start()
    with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
        assert s.sendmail("a@src.test", ["slow@example.com"], body_of("abandoned")) == {}
    wait_for(lambda: len(gate.pids()) == 1, what="the delivery waiting in the program")
    [program] = gate.pids()
    assert q.stop() == 0
    assert within(lambda: not alive(program), 5), "the program outlived qrelay run"
    assert queue_count(root) == 1                     # tried again at the next start


def test_the_lspawn_socket_is_born_0600_and_its_owner_set_without_following_links(tmp_path):
    # queue/ is the run user's: the socket's mode comes with the bind (no chmod by
    # name), and a link in its place is never followed by root's chown.
    from engine.delivery.lspawn import LSPAWN_SOCKET, bind_lspawn
    (tmp_path / "queue").mkdir()
    chowned = []
    real = os.chown

    def recording_chown(path, uid, gid, *, follow_symlinks=True, **kw):
        chowned.append(follow_symlinks)
        return real(path, uid, gid, follow_symlinks=follow_symlinks, **kw)
    old = os.umask(0)
    try:
        os.chown = recording_chown
        sock = bind_lspawn(tmp_path, (65534, 65534))
    finally:
        os.chown = real
        os.umask(old)
    try:
        st = (tmp_path / "queue" / LSPAWN_SOCKET).stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 65534, 65534)
        assert chowned == [False]
    finally:
        sock.close()
