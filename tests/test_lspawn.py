"""The local channel end to end (engine/delivery/lspawn.py): `qrelay run` as
root takes mail over SMTP for a vpopmail domain managed with the qrelay CLI,
refuses unknown users at RCPT, and its local delivery runs as the domain's
owner (never root) and lands in the user's Maildir. DNS is a fake server;
every process is stopped by its pid."""
from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest

from engine.delivery.channels import Group
from engine.delivery.lspawn import UserSpawner, open_deliverer
from tests.conftest import run_cli
from tests.smtp_harness import QrelayProcess
from tests.test_delivery_e2e import texts, wait_for

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
    (root / "qrelay.toml").write_text(
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
        [path] = wait_for(lambda: maildir_files(root, user), what=f"the forward in {user}'s Maildir")
        assert b"Delivered-To: example.com-sales@example.com\n" in path.read_bytes()


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
