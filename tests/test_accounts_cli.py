"""qrelay domain / user / alias / newu on real roots; bad input is one line and exit status 2."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from engine.accounts import admin
from engine.accounts.passwords import verify
from engine.accounts.store import Accounts
from engine.cli import cli
from engine.config.cdb import CdbFile

OWNER = ["--uid", "89", "--gid", "89"]


def qrelay(*args: str, input: str | None = None):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    return result


def bad(result, words: str) -> None:
    assert result.exit_code == 2, (result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], lines
    assert "Traceback" not in result.output + result.stderr


@pytest.fixture
def droot(root: Path) -> Path:
    """A root (from `qrelay init`) with example.com added."""
    r = qrelay("domain", "add", str(root), "example.com", *OWNER)
    assert r.exit_code == 0, r.output + r.stderr
    return root


def test_domain_add_writes_what_vadddomain_writes(droot):
    dom = droot / "domains" / "example.com"
    assert (dom / "vpasswd").read_text() == ""
    assert CdbFile.open(dom / "vpasswd.cdb").get(b"x") is None
    assert (dom / ".qmail-default").read_text() == "| /home/vpopmail/bin/vdelivermail '' bounce-no-mailbox\n"
    assert f"+example.com-:example.com:89:89:{dom}:-::\n.\n" == (droot / "users" / "assign").read_text()
    assert CdbFile.open(droot / "users" / "cdb").get(b"!example.com-") == \
        f"example.com\x0089\x0089\x00{dom}\x00-\x00".encode()
    assert "example.com:example.com" in (droot / "control" / "virtualdomains").read_text().splitlines()
    assert "example.com" in (droot / "control" / "rcpthosts").read_text().splitlines()
    assert stat.S_IMODE(os.stat(dom).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(dom / "vpasswd").st_mode) == 0o600
    if os.geteuid() == 0:
        assert (os.stat(dom).st_uid, os.stat(dom / "vpasswd").st_gid) == (89, 89)
    assert qrelay("domain", "list", str(droot)).output == f"example.com\t{dom}\t89:89\n"


def test_domain_add_bad_input(root, droot):
    bad(qrelay("domain", "add", str(root), "example.com", *OWNER), "domain exists")
    bad(qrelay("domain", "add", str(root), "bad_domain.com", *OWNER), "domain name")
    bad(qrelay("domain", "add", str(root), "x.org", "--uid", "0", "--gid", "0"), "uid 0")
    bad(qrelay("domain", "add", str(root), "x.org", "--uid", "5"), "--gid")
    # Past uid_t: refused before anything is made, not a traceback (or chown's
    # EINVAL) with the domain directory left behind.
    for big in (str(1 << 32), str((1 << 32) - 1), "99999999999999999999"):
        bad(qrelay("domain", "add", str(root), "x.org", "--uid", big, "--gid", "89"), "--uid")
        bad(qrelay("domain", "add", str(root), "x.org", "--uid", "89", "--gid", big), "--gid")
    assert not (root / "domains" / "x.org").exists()
    bad(qrelay("domain", "add", str(root / "nope"), "x.org", *OWNER), "no such qrelay root")


def test_domain_owner_prefers_a_non_root_owner(root, monkeypatch):
    if os.geteuid() != 0:
        assert admin.domain_owner(root) == (os.getuid(), os.getgid())
        return
    monkeypatch.setattr(admin.pwd, "getpwnam", lambda name: (_ for _ in ()).throw(KeyError(name)))
    bad(qrelay("domain", "add", str(root), "x.org"), "qmail never delivers as root")
    (root / "domains").mkdir()
    os.chown(root / "domains", 123, 456)
    assert admin.domain_owner(root) == (123, 456)


def fake_users(monkeypatch, **users: tuple[int, int]) -> None:
    """pwd for admin: only these users exist (name=(uid, gid))."""
    entries = [SimpleNamespace(pw_name=name, pw_uid=uid, pw_gid=gid)
               for name, (uid, gid) in users.items()]

    def lookup(field, value):
        for e in entries:
            if getattr(e, field) == value:
                return e
        raise KeyError(value)
    monkeypatch.setattr(admin.pwd, "getpwnam", lambda name: lookup("pw_name", name))
    monkeypatch.setattr(admin.pwd, "getpwuid", lambda uid: lookup("pw_uid", uid))


@pytest.mark.skipif(os.geteuid() != 0, reason="as anyone else the domain is the caller's")
def test_domain_owner_is_the_run_user_the_receivers_read_it_as(root, monkeypatch, tmp_path):
    fake_users(monkeypatch, qrelay=(999, 998), vpopmail=(89, 89))
    # README's five commands on a box that has a vpopmail user: the receivers
    # (`[run] user`, qrelay) must read the vpasswd, so qrelay owns the domain.
    assert admin.domain_owner(root) == (999, 998)
    (root / "qrelay.toml").write_text('[run]\nuser = ""\n')
    assert admin.domain_owner(root) == (89, 89)      # receivers run as root
    (root / "qrelay.toml").write_text("")
    # A vpopmail box: its domains (outside ROOT/domains) keep their one owner.
    vdom = tmp_path / "home" / "vpopmail" / "domains" / "old.example"
    vdom.mkdir(parents=True)
    (vdom / "vpasswd").write_text("")
    (root / "users").mkdir(exist_ok=True)
    (root / "users" / "assign").write_text(f"+old.example-:old.example:4242:4343:{vdom}:-::\n.\n")
    assert admin.domain_owner(root) == (4242, 4343)
    (root / "domains").mkdir()
    os.chown(root / "domains", 123, 456)
    assert admin.domain_owner(root) == (123, 456)
    assert admin.domain_owner(root, 7, 8) == (7, 8)


@pytest.mark.skipif(os.geteuid() != 0, reason="the receivers run as the caller when not root")
def test_domain_add_warns_when_the_receivers_cannot_read_it(root, monkeypatch):
    fake_users(monkeypatch, qrelay=(999, 998), vpopmail=(89, 89))
    r = qrelay("domain", "add", str(root), "example.com")
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert "uid 999, gid 998" in r.output
    r = qrelay("domain", "add", str(root), "other.example", *OWNER)
    assert r.exit_code == 0
    assert r.stderr == ("qrelay: warning: other.example belongs to uid 89, but the receivers run as "
                        "qrelay (uid 999) and cannot read its vpasswd: RCPT checks, AUTH and POP3 "
                        'for it fail with temporary errors until [run] user = "vpopmail" in '
                        "qrelay.toml\n")
    r = qrelay("domain", "add", str(root), "third.example", "--uid", "4242", "--gid", "4242")
    assert r.stderr.endswith("until the domain belongs to qrelay (--uid 999 --gid 998)\n")


def test_rcpthosts_overflow_goes_to_morercpthosts(root):
    (root / "control" / "rcpthosts").write_text("".join(f"d{i}.example\n" for i in range(50)))
    assert qrelay("domain", "add", str(root), "example.com", *OWNER).exit_code == 0
    assert "example.com" not in (root / "control" / "rcpthosts").read_text()
    assert (root / "control" / "morercpthosts").read_text() == "example.com\n"
    assert CdbFile.open(root / "control" / "morercpthosts.cdb").get(b"example.com") == b""


def test_domain_del_removes_everything(droot):
    r = qrelay("domain", "del", str(droot), "example.com")
    assert r.exit_code == 0, r.stderr
    assert not (droot / "domains" / "example.com").exists()
    assert (droot / "users" / "assign").read_text() == ".\n"
    assert "example.com" not in (droot / "control" / "virtualdomains").read_text()
    assert "example.com" not in (droot / "control" / "rcpthosts").read_text().splitlines()
    assert qrelay("domain", "list", str(droot)).output == ""
    bad(qrelay("domain", "del", str(droot), "example.com"), "no such domain")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as the owner needs root")
def test_domain_del_of_a_tree_with_a_part_root_owns_says_which_and_how(droot):
    # Removed as its owner, a tree holding a directory root made (a mkdir as
    # root by hand) stops part way: the error names that part and the chown,
    # not "every directory above must be searchable".
    # The tree is first moved out of deliveries' way: the error names where it is.
    stray = droot / "domains" / "example.com" / "byhand"
    stray.mkdir()
    (stray / "note").write_text("root's\n")
    left = droot / "domains" / f".example.com.deleted.{os.getpid()}"
    bad(qrelay("domain", "del", str(droot), "example.com"),
        f"{left}/byhand/note: Permission denied as uid 89, the owner of example.com: "
        f"{left} holds files it may not remove "
        f"(chown -R 89:89 {left}, then remove what is left)")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as the owner needs root")
def test_a_domain_add_its_owner_cannot_reach_leaves_no_directory_the_retry_would_refuse(root):
    """ROOT under a directory the owner may not search: `domain add` said so,
    but left the empty domain directory it had made as root, and the retry,
    once the operator had run the chmod it named, was refused ("exists;
    remove it or pick another domain")."""
    os.chmod(root.parent, 0o700)
    try:
        bad(qrelay("domain", "add", str(root), "example.com", *OWNER),
            "must be searchable by it (chmod o+x)")
        assert not (root / "domains" / "example.com").exists()
    finally:
        os.chmod(root.parent, 0o755)
    r = qrelay("domain", "add", str(root), "example.com", *OWNER)
    assert r.exit_code == 0, r.output + r.stderr


def test_a_bad_users_assign_line_stops_domain_commands_before_they_write(droot):
    """qmail-newu would refuse the file: say so before anything changes, not
    after a domain directory and a rewritten users/assign are left behind."""
    assign = droot / "users" / "assign"
    before = "=broken\n" + assign.read_text()
    assign.write_text(before)
    control = {p.name: p.read_text() for p in (droot / "control").iterdir() if p.is_file()}
    for args in (("domain", "add", str(droot), "second.com", *OWNER),
                 ("domain", "alias", str(droot), "alias.com", "example.com"),
                 ("domain", "del", str(droot), "example.com")):
        bad(qrelay(*args), "users/assign")
        assert assign.read_text() == before
        assert {p.name: p.read_text() for p in (droot / "control").iterdir() if p.is_file()} == control
    assert sorted(p.name for p in (droot / "domains").iterdir()) == ["example.com"]
    assign.write_text(before.replace("=broken\n", ""))
    assert qrelay("domain", "add", str(droot), "second.com", *OWNER).exit_code == 0


def test_user_add_then_deliverable_and_password_checks(droot):
    r = qrelay("user", "add", str(droot), "Joe@Example.com", "--quota", "10MB", input="s3cret\n")
    assert r.exit_code == 0, r.stderr
    dom = droot / "domains" / "example.com"
    for sub in ("cur", "new", "tmp"):
        assert (dom / "joe" / "Maildir" / sub).is_dir()
    line = (dom / "vpasswd").read_text()
    name, crypted, uid, gid, gecos, directory, quota = line.rstrip("\n").split(":")
    assert (name, uid, gid, gecos, directory, quota) == ("joe", "1", "0", "joe", str(dom / "joe"), "10485760S")
    assert crypted.startswith("$6$") and verify("s3cret", crypted)
    accounts = Accounts(droot, recheck_seconds=0)
    assert accounts.mailbox("joe@example.com").maildir == f"{dom}/joe/Maildir/"
    assert accounts.accepts("joe@example.com") and not accounts.accepts("bob@example.com")
    out = qrelay("user", "show", str(droot), "joe@example.com").output
    assert "maildir:   " + f"{dom}/joe/Maildir/" in out and "10485760S" in out and "sha512_crypt" in out
    assert qrelay("user", "list", str(droot), "example.com").output == "joe@example.com\t10485760S\t-\n"


def test_user_add_bad_input(droot):
    qrelay("user", "add", str(droot), "joe@example.com", input="pw\n")
    bad(qrelay("user", "add", str(droot), "joe@example.com", input="pw\n"), "user exists")
    bad(qrelay("user", "add", str(droot), "joe@nowhere.com", input="pw\n"), "no such domain")
    bad(qrelay("user", "add", str(droot), "joe", input="pw\n"), "not a full email address")
    bad(qrelay("user", "add", str(droot), "jo e@example.com", input="pw\n"), "character")
    bad(qrelay("user", "add", str(droot), "bob@example.com", input=""), "no password")
    bad(qrelay("user", "add", str(droot), "bob@example.com", input="\n"), "empty password")
    long = "p" * 129 + "\n"       # [auth] max_password_bytes: logins never check more
    bad(qrelay("user", "add", str(droot), "bob@example.com", input=long), "at most 128 bytes")
    bad(qrelay("user", "passwd", str(droot), "joe@example.com", input=long), "at most 128 bytes")
    bad(qrelay("user", "import", str(droot), "-", input="bob@example.com:" + long), "at most 128 bytes")
    assert qrelay("user", "add", str(droot), "bob@example.com", input="p" * 128 + "\n").exit_code == 0
    qrelay("user", "del", str(droot), "bob@example.com")
    bad(qrelay("user", "add", str(droot), "bob@example.com", "--quota", "lots", input="pw\n"), "bad quota")
    bad(qrelay("user", "add", str(droot / "x"), "bob@example.com", input="pw\n"), "no such qrelay root")
    bad(qrelay("user", "del", str(droot), "bob@example.com"), "no such user")
    bad(qrelay("user", "passwd", str(droot), "bob@example.com", input="pw\n"), "no such user")
    bad(qrelay("user", "show", str(droot), "bob@example.com"), "no such user")
    bad(qrelay("user", "list", str(droot), "nowhere.com"), "no such domain")


def test_passwd_and_cleartext_setting(droot):
    qrelay("user", "add", str(droot), "joe@example.com", input="one\n")
    vpasswd = droot / "domains" / "example.com" / "vpasswd"
    assert len(vpasswd.read_text().rstrip("\n").split(":")) == 7
    (droot / "qrelay.toml").write_text("[accounts]\nkeep_cleartext = true\n")
    assert qrelay("user", "passwd", str(droot), "joe@example.com", input="two\n").exit_code == 0
    fields = vpasswd.read_text().rstrip("\n").split(":")
    assert fields[7] == "two" and verify("two", fields[1]) and not verify("one", fields[1])
    (droot / "qrelay.toml").write_text("[accounts]\nkeep_cleartext = false\n")
    qrelay("user", "passwd", str(droot), "joe@example.com", input="three\n")
    assert len(vpasswd.read_text().rstrip("\n").split(":")) == 7  # stale cleartext dropped
    (droot / "qrelay.toml").write_text("[accounts]\nkeep_cleartxt = true\n")
    bad(qrelay("user", "passwd", str(droot), "joe@example.com", input="x\n"), "unknown setting")


def test_user_del_removes_line_and_tree_but_not_the_catch_all(droot):
    qrelay("user", "add", str(droot), "joe@example.com", input="pw\n")
    qrelay("user", "add", str(droot), "ann@example.com", input="pw\n")
    assert qrelay("domain", "catchall", str(droot), "example.com", "ann@example.com").exit_code == 0
    bad(qrelay("user", "del", str(droot), "ann@example.com"), "catch-all")
    assert qrelay("alias", "add", str(droot), "sales@example.com", "joe@example.com",
                  "ann@example.com").exit_code == 0
    assert qrelay("alias", "add", str(droot), "info@example.com", "ann@example.com").exit_code == 0
    r = qrelay("user", "del", str(droot), "Joe@example.com")
    assert r.exit_code == 0
    assert not (droot / "domains" / "example.com" / "joe").exists()
    assert qrelay("user", "list", str(droot), "example.com").output.startswith("ann@example.com")
    # As vdeluser, the aliases stay; the command names those still forwarding to joe.
    assert r.stderr == (f"qrelay: note: sales@example.com still forwards to joe@example.com "
                        f"(qrelay alias del {droot} ALIAS)\n")


def test_a_delivery_racing_user_del_bounces_instead_of_landing_in_the_removed_tree(droot, monkeypatch):
    """A delivery worker's view of vpasswd may be up to a second old: one that
    runs while `user del` removes the tree must not write into it (the message
    would vanish with the mailbox, or make the removal fail half done)."""
    from engine.delivery.local import deliver_one
    from engine.delivery.local.accounts import DeliveryAccounts
    from tests.test_local_fixtures import MSG, config
    assert qrelay("user", "add", str(droot), "joe@example.com", input="pw\n").exit_code == 0
    stale = DeliveryAccounts.at(droot, recheck_seconds=3600)

    def deliver():
        return deliver_one(config(), stale, "s@x.example", "example.com-joe@example.com", MSG)
    assert deliver().status == "K"
    rmtree, during = admin.shutil.rmtree, []

    def racing_rmtree(path, *args, **kwargs):
        during.append(deliver())
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(admin.shutil, "rmtree", racing_rmtree)
    assert qrelay("user", "del", str(droot), "joe@example.com").exit_code == 0
    [r] = during
    assert (r.status, r.text) == ("D", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    assert [p.name for p in (droot / "domains" / "example.com").iterdir()
            if "joe" in p.name] == []


def test_a_delivery_racing_domain_del_is_deferred_not_left_in_the_removed_tree(droot, monkeypatch):
    """As for `user del`: a delivery whose users/cdb and vpasswd are up to a
    second old, running while `domain del` removes the tree, must not write
    into it (reported delivered, gone with the tree; or, landing mid-walk, a
    removal that fails half done: lines gone, tree left)."""
    from engine.delivery.local import deliver_one
    from engine.delivery.local.accounts import DeliveryAccounts
    from tests.test_local_fixtures import MSG, config
    assert qrelay("user", "add", str(droot), "joe@example.com", input="pw\n").exit_code == 0
    stale = DeliveryAccounts.at(droot, recheck_seconds=3600)

    def deliver():
        return deliver_one(config(), stale, "s@x.example", "example.com-joe@example.com", MSG)
    assert deliver().status == "K"
    walk, during = admin.os.walk, []

    def racing_walk(top, *args, **kwargs):
        during.append(deliver())
        return walk(top, *args, **kwargs)
    monkeypatch.setattr(admin.os, "walk", racing_walk)
    assert qrelay("domain", "del", str(droot), "example.com").exit_code == 0
    [r] = during
    home = droot / "domains" / "example.com"
    assert (r.status, r.text) == ("Z", f"Unable to switch to {home}: file does not exist. (#4.3.0)\n")
    assert os.listdir(droot / "domains") == []


def test_user_del_removes_every_line_of_a_name_vpasswd_holds_twice(droot):
    """vdeluser (auth_deluser) drops every vpasswd line with the name: a
    hand-made second line must not come back as the user once the first is gone."""
    assert qrelay("user", "add", str(droot), "joe@example.com", input="pw\n").exit_code == 0
    dom = droot / "domains" / "example.com"
    joe = (dom / "vpasswd").read_text()
    (dom / "vpasswd").write_text(joe + joe.replace(":1:0:joe:", ":1:0:joe again:"))
    assert qrelay("user", "del", str(droot), "joe@example.com").exit_code == 0
    assert (dom / "vpasswd").read_text() == ""
    assert Accounts(droot, recheck_seconds=0).mailbox("joe@example.com") is None
    bad(qrelay("user", "del", str(droot), "joe@example.com"), "no such user")


def disk_full_for(monkeypatch, word: str) -> None:
    """os.write fails with ENOSPC (a full disk) on every file whose name has `word`."""
    real = os.write

    def write(fd, data):
        if word in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    monkeypatch.setattr(os, "write", write)


def failed_on_full_disk(result) -> None:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert "Traceback" not in result.output + result.stderr


def test_a_vpasswd_rewrite_the_disk_cannot_finish_changes_neither_vpasswd_nor_its_cdb(
        droot, monkeypatch):
    """vpasswd.cdb failing after vpasswd was replaced left the two apart: the
    lookups still had ann, vpasswd not, and `user del` again said "no such user"."""
    for user in ("joe", "ann"):
        assert qrelay("user", "add", str(droot), f"{user}@example.com", input="pw\n").exit_code == 0
    dom = droot / "domains" / "example.com"
    before = {name: (dom / name).read_bytes() for name in ("vpasswd", "vpasswd.cdb")}
    with monkeypatch.context() as m:
        disk_full_for(m, "vpasswd.cdb")
        r = qrelay("user", "del", str(droot), "ann@example.com")
        failed_on_full_disk(r)
        assert r.stderr == f"Error: {dom / 'vpasswd.cdb'}: No space left on device\n"
        failed_on_full_disk(qrelay("user", "passwd", str(droot), "joe@example.com", input="new\n"))
    assert {name: (dom / name).read_bytes() for name in before} == before
    assert [p.name for p in dom.iterdir() if ".tmp." in p.name] == []
    assert qrelay("user", "del", str(droot), "ann@example.com").exit_code == 0   # space is back
    assert Accounts(droot, recheck_seconds=0).mailbox("ann@example.com") is None


def test_adds_the_disk_cannot_finish_leave_no_tree_the_retry_would_refuse(droot, tmp_path,
                                                                          monkeypatch):
    """`user add`, `user import` and `domain add` made their directories, then
    failed to write vpasswd on a full disk: the trees stayed, and once space
    was back the retry refused them ("exists but is not in vpasswd; remove it
    first"), an import's by the thousand."""
    assert qrelay("user", "add", str(droot), "joe@example.com", input="pw\n").exit_code == 0
    qrelay("domain", "add", str(droot), "example.org", *OWNER)
    src = tmp_path / "users.txt"
    src.write_text("ann@example.com:pw\nbob@example.org:pw\n")
    dom = droot / "domains" / "example.com"
    with monkeypatch.context() as m:
        disk_full_for(m, "vpasswd")
        failed_on_full_disk(qrelay("user", "add", str(droot), "zed@example.com", input="pw\n"))
        failed_on_full_disk(qrelay("user", "import", str(droot), str(src)))
        failed_on_full_disk(qrelay("domain", "add", str(droot), "example.net", *OWNER))
    assert sorted(p.name for p in dom.iterdir() if p.is_dir()) == ["joe"]
    assert not (droot / "domains" / "example.org" / "bob").exists()
    assert not (droot / "domains" / "example.net").exists()
    # space is back: every retry works
    assert qrelay("user", "add", str(droot), "zed@example.com", input="pw\n").exit_code == 0
    assert qrelay("user", "import", str(droot), str(src)).exit_code == 0
    assert qrelay("domain", "add", str(droot), "example.net", *OWNER).exit_code == 0
    assert Accounts(droot, recheck_seconds=0).mailbox("bob@example.org") is not None


def test_commands_that_rewrite_vpasswd_keep_the_lines_they_cannot_read(droot):
    """vpopmail copies every line it does not change verbatim (auth_setpw,
    auth_adduser, auth_deluser): a line short of fields is still a password
    and a directory an operator may mean to repair, never ours to drop."""
    assert qrelay("user", "add", str(droot), "joe@example.com", input="pw\n").exit_code == 0
    dom = droot / "domains" / "example.com"
    short = f"old:$1$abcdefgh$N6kqD.QY6E1ZTtWTWZb1e.:1:0:Old:{dom}/old"
    (dom / "vpasswd").write_text((dom / "vpasswd").read_text() + short + "\n")
    assert qrelay("user", "passwd", str(droot), "joe@example.com", input="new\n").exit_code == 0
    assert qrelay("user", "add", str(droot), "ann@example.com", input="pw\n").exit_code == 0
    assert qrelay("user", "mod", str(droot), "example.com", "--no-pop").exit_code == 0
    assert qrelay("user", "quota", str(droot), "joe@example.com", "1M").exit_code == 0
    assert qrelay("user", "del", str(droot), "ann@example.com").exit_code == 0
    lines = (dom / "vpasswd").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["joe", "old"] and lines[1] == short


def test_catchall(droot):
    default = droot / "domains" / "example.com" / ".qmail-default"
    accounts = Accounts(droot, recheck_seconds=0)
    assert not accounts.accepts("x@example.com")
    qrelay("domain", "catchall", str(droot), "example.com", "delete")
    assert default.read_text().endswith("'' delete\n") and accounts.accepts("x@example.com")
    qrelay("domain", "catchall", str(droot), "example.com", "bounce")
    assert default.read_text().endswith("'' bounce-no-mailbox\n") and not accounts.accepts("x@example.com")
    bad(qrelay("domain", "catchall", str(droot), "example.com", "|rm -rf /"), "give an address")
    # The line is a `|` program line qmail-local runs with sh -c: an address
    # with a shell character would run a command, not forward the mail.
    kept = default.read_text()
    for target in ("a;touch${IFS}x;b@x.com", "a$(id)@x.com", "a`id`@x.com", "a|b@x.com",
                   "a&b@x.com", "a>b@x.com", "a*@x.com", "a@x.com;id"):
        bad(qrelay("domain", "catchall", str(droot), "example.com", target), "give an address")
    assert default.read_text() == kept
    assert qrelay("domain", "catchall", str(droot), "example.com", "Sales.Team+x=y@ex-ample.org").exit_code == 0
    assert default.read_text().endswith("'' Sales.Team+x=y@ex-ample.org\n")
    bad(qrelay("domain", "catchall", str(droot), "nowhere.com", "bounce"), "no such domain")


def test_alias_commands(droot):
    r = qrelay("alias", "add", str(droot), "Info.Desk@example.com", "joe@example.com", "a@example.org")
    assert r.exit_code == 0, r.stderr
    path = droot / "domains" / "example.com" / ".qmail-info:desk"
    assert path.read_text() == "&joe@example.com\n&a@example.org\n"
    qrelay("alias", "add", str(droot), "info.desk@example.com", "a@example.org", "b@example.org")
    assert path.read_text() == "&joe@example.com\n&a@example.org\n&b@example.org\n"
    assert Accounts(droot, recheck_seconds=0).accepts("info.desk@example.com")
    out = qrelay("alias", "list", str(droot), "example.com").output
    assert out == "info.desk@example.com\t&joe@example.com &a@example.org &b@example.org\n"
    assert qrelay("alias", "del", str(droot), "info.desk@example.com").exit_code == 0
    assert not path.exists()
    bad(qrelay("alias", "del", str(droot), "info.desk@example.com"), "no such alias")
    bad(qrelay("alias", "add", str(droot), "x@example.com", "|/bin/sh"), "must be an address")
    bad(qrelay("alias", "add", str(droot), "default@example.com", "a@b.org"), "catchall")
    bad(qrelay("alias", "add", str(droot), "x@nowhere.com", "a@b.org"), "no such domain")
    r = qrelay("alias", "add", str(droot), "x@example.com")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_alias_add_keeps_8bit_bytes_as_given(droot):
    # A target from argv that is not UTF-8 (it arrives with surrogates), or a
    # line valias wrote with such bytes, is stored byte for byte, as valias -i
    # stores it: not a traceback.
    path = droot / "domains" / "example.com" / ".qmail-sales"
    admin.add_alias(droot, "sales@example.com", ["j\udce9@example.org"])
    assert path.read_bytes() == b"&j\xe9@example.org\n"
    path.write_bytes(b"&k\xe9@example.org\n")
    admin.add_alias(droot, "sales@example.com", ["joe@example.com"])
    assert path.read_bytes() == b"&k\xe9@example.org\n&joe@example.com\n"


def test_import(droot, tmp_path):
    qrelay("domain", "add", str(droot), "example.org", *OWNER)
    src = tmp_path / "users.txt"
    src.write_text("# comment\n\n" + "".join(f"u{i}@example.com:pw{i}\n" for i in range(150))
                   + "boss@example.org:bosspw:1000C\n")
    r = qrelay("user", "import", str(droot), str(src), "--workers", "2")
    assert r.exit_code == 0, r.stderr
    assert "imported 151 mailboxes into 2 domains" in r.output
    accounts = Accounts(droot, recheck_seconds=0)
    dom = droot / "domains" / "example.com"
    assert accounts.mailbox("u0@example.com").user.directory == str(dom / "u0")
    hashed = accounts.mailbox("u120@example.com").user
    assert hashed.directory == str(dom / "0" / "u120")  # past 99 users: hashed dirs
    assert Path(hashed.maildir, "new").is_dir() and verify("pw120", hashed.crypted)
    assert accounts.mailbox("boss@example.org").user.quota == "1000C"


def test_import_tells_how_far_each_step_is(droot):
    from engine.accounts.admin import import_users
    heard = []
    lines = [f"p{i}@example.com:pw{i}\n" for i in range(100)]
    import_users(droot, lines, workers=2, progress=lambda *a: heard.append(a))
    steps = {what: [(d, t) for w, d, t in heard if w == what] for what, _, _ in heard}
    assert steps["Maildirs made"] == [(n, 100) for n in range(1, 101)]
    hashed = steps["passwords hashed"]                  # as each worker's chunk comes back
    assert hashed[-1] == (100, 100) and all(t == 100 for _, t in hashed)
    assert steps["domains' vpasswd written"] == [(0, 1)]


def test_progress_lines_wait_for_their_interval(capsys):
    from engine.cli.base import Progress
    now = [0.0]
    progress = Progress("user import", every=2.0, clock=lambda: now[0])
    for t, n in ((1.0, 10), (2.5, 20), (3.0, 30), (4.6, 40)):
        now[0] = t
        progress("Maildirs made", n, 100)
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == ["qrelay: user import: 20 of 100 Maildirs made (2 s)",
                                    "qrelay: user import: 40 of 100 Maildirs made (5 s)"]


def test_import_checks_every_line_before_writing(droot, tmp_path):
    qrelay("user", "add", str(droot), "old@example.com", input="pw\n")
    src = tmp_path / "users.txt"
    src.write_text("aa@example.com:pw\nold@example.com:pw\nbb@nowhere.com:pw\nnocolon\naa@example.com:x\n")
    r = qrelay("user", "import", str(droot), str(src))
    bad(r, f"{src}:2: old@example.com: user exists (and 3 more bad lines)")
    assert qrelay("user", "list", str(droot), "example.com").output == "old@example.com\tNOQUOTA\t-\n"
    bad(qrelay("user", "import", str(droot), str(tmp_path / "missing.txt")), "missing.txt")


def test_newu(root):
    (root / "users" / "assign").write_text("=joe:joe:507:100:/home/joe:::\n.\n")
    r = qrelay("newu", str(root))
    assert r.exit_code == 0 and "1 assignments" in r.output
    assert CdbFile.open(root / "users" / "cdb").get(b"!joe\0") is not None
    (root / "users" / "assign").write_text("=joe:joe\n.\n")
    bad(qrelay("newu", str(root)), "bad format")
    bad(qrelay("newu", str(root / "nope")), "no such qrelay root")


def _lock_waiters(path: Path) -> int:
    """Processes waiting for a POSIX lock on path (/proc/locks' `->` lines)."""
    ino = f":{os.stat(path).st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and ino in line)


def test_newu_beside_a_domain_add_loses_neither(root, monkeypatch):
    """qmail-newu under vpopmail's users/assign.lock: a `domain add` that
    writes users/assign while newu compiles must not have its line taken
    out of users/cdb (which wins) by newu's write of the file it read before."""
    import subprocess
    import sys
    import time
    from engine.accounts import assign
    from tests.conftest import REPO
    (root / "users" / "assign").write_text(".\n")
    lock = root / "users" / "assign.lock"
    lock.touch()
    build, adding = assign.build_cdb, []

    def build_while_a_domain_is_added(records):
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "domain", "add", str(root),
                                 "new.test", *OWNER], env={**os.environ, "PYTHONPATH": str(REPO)},
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        adding.append(proc)
        deadline = time.monotonic() + 60
        while proc.poll() is None and not _lock_waiters(lock) and time.monotonic() < deadline:
            os.sched_yield()      # until it is done, or waits for our lock
        return build(records)
    monkeypatch.setattr(assign, "build_cdb", build_while_a_domain_is_added)
    assert qrelay("newu", str(root)).exit_code == 0
    assert adding[0].wait(60) == 0
    assert CdbFile.open(root / "users" / "cdb").get(b"!new.test-") is not None


def test_real_process_one_line_exit_2(root, qrelay_cli):
    r = qrelay_cli("user", "add", str(root), "joe@example.com")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such domain" in r.stderr
    r = qrelay_cli("domain", "add", str(root), "example.com", *OWNER)
    assert r.returncode == 0, r.stderr
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "engine.cli", "user", "add", str(root), "joe@example.com"],
                       input="pw\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Accounts(root).mailbox("joe@example.com") is not None


def test_import_from_a_closed_stdin_is_one_line(droot):
    # `qrelay user import ROOT - <&-` (a cron job without stdin) was a traceback.
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "engine.cli", "user", "import", str(droot), "-"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                       preexec_fn=lambda: os.close(0))
    assert (r.returncode, r.stderr.splitlines()) == (2, ["Error: -: standard input is closed"])


def test_import_refuses_a_leftover_user_tree(droot, tmp_path):
    leftover = droot / "domains" / "example.com" / "bb"
    (leftover / "Maildir" / "new").mkdir(parents=True)
    (leftover / "Maildir" / "new" / "old-mail").write_text("someone else's")
    src = tmp_path / "users.txt"
    src.write_text("aa@example.com:pw\nbb@example.com:pw\n")
    bad(qrelay("user", "import", str(droot), str(src)), "exists but is not in vpasswd")
    assert qrelay("user", "list", str(droot), "example.com").output == ""
    assert not (droot / "domains" / "example.com" / "aa").exists()
    bad(qrelay("user", "add", str(droot), "bb@example.com", input="pw\n"), "exists but is not in vpasswd")


def test_import_names_every_leftover_tree_at_once(droot, tmp_path):
    """An import killed part way leaves a tree per user made: its rerun named
    the first only, so finding 5,500 took as many runs."""
    for name in ("aa", "bb", "cc"):
        (droot / "domains" / "example.com" / name / "Maildir" / "new").mkdir(parents=True)
    src = tmp_path / "users.txt"
    src.write_text("aa@example.com:pw\nbb@example.com:pw\ncc@example.com:pw\ndd@example.com:pw\n")
    bad(qrelay("user", "import", str(droot), str(src)),
        f"{droot}/domains/example.com/aa (and 2 more): exists but is not in vpasswd; remove them first")
    assert qrelay("user", "list", str(droot), "example.com").output == ""


def test_user_show_usage_from_maildirsize_or_a_walk(droot):
    qrelay("user", "add", str(droot), "joe@example.com", "--quota", "1000S,10C", input="pw\n")
    maildir = droot / "domains" / "example.com" / "joe" / "Maildir"
    (maildir / "new" / "1700000000.1.host,S=300").write_text("x")
    (maildir / "cur" / "1700000001.1.host:2,S").write_text("12345")
    # counted as vdelivermail's quota counts: an IMAP-deleted (`:2,…T`) message
    # not at all, a folder's messages, but not .Trash's
    (maildir / "cur" / "1700000002.1.host,S=400:2,ST").write_text("x")
    (maildir / ".Sent" / "cur").mkdir(parents=True)
    (maildir / ".Sent" / "cur" / "1700000003.1.host,S=100:2,S").write_text("x")
    (maildir / ".Trash" / "cur").mkdir(parents=True)
    (maildir / ".Trash" / "cur" / "1700000004.1.host,S=200:2,S").write_text("x")
    out = qrelay("user", "show", str(droot), "joe@example.com").output
    assert "usage:     405 bytes, 3 messages (walk), 40% of bytes, 30% of messages" in out
    (maildir / "maildirsize").write_text("1000S,10C\n500 1\n250 2\n")
    out = qrelay("user", "show", str(droot), "joe@example.com").output
    assert "usage:     750 bytes, 3 messages (maildirsize), 75% of bytes, 30% of messages" in out


def test_user_quota_sets_field_7_and_rebuilds_maildirsize(droot):
    qrelay("user", "add", str(droot), "joe@example.com", input="pw\n")
    maildir = droot / "domains" / "example.com" / "joe" / "Maildir"
    (maildir / "new" / "1700000000.1.host,S=300").write_text("x" * 300)
    (maildir / "maildirsize").write_text("5S\n999 9\n")          # stale
    r = qrelay("user", "quota", str(droot), "joe@example.com", "10MB,1000C")
    assert r.output == "qrelay: quota of joe@example.com is 10485760S,1000C\n"
    assert (droot / "domains" / "example.com" / "vpasswd").read_text().rstrip("\n") \
        .split(":")[6] == "10485760S,1000C"
    assert (maildir / "maildirsize").read_text() == "10485760S,1000C\n300 1\n"
    if os.geteuid() == 0:     # vdelivermail, running as the domain's owner, appends to it
        assert (os.stat(maildir / "maildirsize").st_uid, os.stat(maildir / "maildirsize").st_gid) == (89, 89)
    assert Accounts(droot).mailbox("joe@example.com").user.quota == "10485760S,1000C"
    r = qrelay("user", "quota", str(droot), "joe@example.com", "NOQUOTA")
    assert r.output == "qrelay: quota of joe@example.com is NOQUOTA\n"
    assert not (maildir / "maildirsize").exists()
    bad(qrelay("user", "quota", str(droot), "joe@example.com", "10XB"), "bad quota '10XB'")
    bad(qrelay("user", "quota", str(droot), "nobody@example.com", "1MB"), "no such user")


def test_a_user_without_a_directory_never_touches_the_current_directorys_maildir(
        droot, tmp_path, monkeypatch):
    """vpasswd's dir field may be empty (vdelivermail makes it at the next
    delivery): quota and show must not read or rebuild ./Maildir instead."""
    qrelay("user", "add", str(droot), "joe@example.com", input="pw\n")
    vpasswd = droot / "domains" / "example.com" / "vpasswd"
    fields = vpasswd.read_text().rstrip("\n").split(":")
    fields[5] = ""
    vpasswd.write_text(":".join(fields) + "\n")
    here = tmp_path / "cwd"
    for sub in ("new", "cur", "tmp"):
        (here / "Maildir" / sub).mkdir(parents=True)
    (here / "Maildir" / "maildirsize").write_text("5S\n999 9\n")
    (here / "lastauth").write_text("192.0.2.1")
    if os.geteuid() == 0:   # as the domain's owner (89) would find it: its own files
        for path in [tmp_path, here, *here.rglob("*")]:
            os.chown(path, 89, 89)
    monkeypatch.chdir(here)
    assert qrelay("user", "quota", str(droot), "joe@example.com", "1MB").exit_code == 0
    assert (here / "Maildir" / "maildirsize").read_text() == "5S\n999 9\n"
    out = qrelay("user", "show", str(droot), "joe@example.com").output
    assert "usage:     0 bytes, 0 messages" in out and "last login: never" in out


def test_user_mod_sets_and_clears_flags_for_one_or_all(droot):
    for name in ("joe", "ann"):
        qrelay("user", "add", str(droot), f"{name}@example.com", input="pw\n")
    r = qrelay("user", "mod", str(droot), "joe@example.com", "--no-pop", "--no-smtp")
    assert r.output == "joe@example.com\tno_pop,no_smtp\n"
    joe = Accounts(droot).mailbox("joe@example.com").user
    assert joe.no_pop and joe.no_smtp and not joe.bounce_mail and joe.gid == 0x802
    r = qrelay("user", "mod", str(droot), "example.com", "--bounce-mail")      # every mailbox
    assert sorted(r.output.splitlines()) == ["ann@example.com\tbounce_mail",
                                             "joe@example.com\tno_pop,bounce_mail,no_smtp"]
    assert qrelay("user", "mod", str(droot), "joe@example.com", "--pop", "--smtp").output == \
        "joe@example.com\tbounce_mail\n"
    assert qrelay("user", "mod", str(droot), "example.com", "--clear", "--no-relay").output \
        .count("\tno_relay\n") == 2
    bad(qrelay("user", "mod", str(droot), "joe@example.com"), "nothing to change")
    bad(qrelay("user", "mod", str(droot), "nobody@example.com", "--pop"), "no such user")
    bad(qrelay("user", "mod", str(droot), "other.example", "--pop"), "no such domain")


def test_alias_domain_add_and_del_leaves_the_real_domain(droot):
    qrelay("user", "add", str(droot), "joe@example.com", input="pw\n")
    dom = droot / "domains" / "example.com"
    r = qrelay("domain", "alias", str(droot), "example.net", "example.com")
    assert r.output == f"qrelay: added alias domain example.net of example.com ({dom})\n"
    assert f"+example.net-:example.com:89:89:{dom}:-::" in (droot / "users" / "assign").read_text()
    assert "example.net:example.net" in (droot / "control" / "virtualdomains").read_text().splitlines()
    assert "example.net" in (droot / "control" / "rcpthosts").read_text().splitlines()
    accounts = Accounts(droot)
    assert accounts.mailbox("joe@example.net").user.name == "joe"
    assert accounts.local_verdict("joe@example.net") is True
    # an alias of the alias is one of the real domain
    assert qrelay("domain", "alias", str(droot), "example.org", "example.net").output.startswith(
        "qrelay: added alias domain example.org of example.com ")
    bad(qrelay("domain", "alias", str(droot), "example.net", "example.com"), "domain exists")
    bad(qrelay("domain", "alias", str(droot), "new.example", "missing.example"), "no such domain")
    bad(qrelay("domain", "alias", str(droot), "bad_name.example", "example.com"), "domain name")
    # Deleting an alias (vdeldomain on an alias domain) keeps the real domain and its mail.
    r = qrelay("domain", "del", str(droot), "example.net")
    assert r.output == "qrelay: deleted alias domain example.net (of example.com, whose mailboxes stay)\n"
    assert (dom / "joe" / "Maildir").is_dir()
    assert "+example.net-" not in (droot / "users" / "assign").read_text()
    assert "example.net" not in (droot / "control" / "rcpthosts").read_text().splitlines()
    assert Accounts(droot).mailbox("joe@example.com") is not None
    # Deleting the real domain takes its remaining aliases along.
    assert qrelay("domain", "del", str(droot), "example.com").exit_code == 0
    assert (droot / "users" / "assign").read_text() == ".\n" and not dom.exists()
    assert "example.org" not in (droot / "control" / "virtualdomains").read_text()


def test_user_del_through_an_alias_domain_still_refuses_the_catch_all(droot):
    # vdeluser maps an alias domain to the real one (vget_assign) before its
    # checks: the catch-all is the same mailbox whichever name reaches it.
    qrelay("user", "add", str(droot), "ann@example.com", input="pw\n")
    qrelay("domain", "alias", str(droot), "example.net", "example.com")
    assert qrelay("domain", "catchall", str(droot), "example.com", "ann@example.com").exit_code == 0
    bad(qrelay("user", "del", str(droot), "ann@example.net"), "catch-all")
    assert qrelay("domain", "catchall", str(droot), "example.com", "Ann@Example.NET").exit_code == 0
    bad(qrelay("user", "del", str(droot), "ann@example.com"), "catch-all")
    assert (droot / "domains" / "example.com" / "ann" / "Maildir").is_dir()


def test_user_del_names_the_aliases_forwarding_to_it_through_an_alias_domain(droot):
    # joe@example.net is joe@example.com (vaddaliasdomain): an alias naming
    # either forwards to the mailbox just deleted.
    qrelay("user", "add", str(droot), "joe@example.com", input="pw\n")
    qrelay("domain", "alias", str(droot), "example.net", "example.com")
    qrelay("alias", "add", str(droot), "sales@example.com", "Joe@Example.NET")
    r = qrelay("user", "del", str(droot), "joe@example.com")
    assert r.exit_code == 0
    assert r.stderr == (f"qrelay: note: sales@example.com still forwards to joe@example.com "
                        f"(qrelay alias del {droot} ALIAS)\n")


def test_domain_del_of_an_alias_whose_real_domain_is_gone(droot):
    # The real domain removed by hand (or by a vdeldomain that left the alias
    # line): the alias points at a directory that is gone, and `domain del`
    # of the alias is how its lines go.
    qrelay("domain", "alias", str(droot), "example.net", "example.com")
    assign = droot / "users" / "assign"
    assign.write_text("".join(line + "\n" for line in assign.read_text().splitlines()
                              if not line.startswith("+example.com-")))
    assert qrelay("newu", str(droot)).exit_code == 0
    dom = droot / "domains" / "example.com"
    (dom / "vpasswd").unlink()
    (dom / "vpasswd.cdb").unlink()
    r = qrelay("domain", "del", str(droot), "example.net")
    assert r.output == "qrelay: deleted alias domain example.net (of example.com, whose mailboxes stay)\n"
    assert assign.read_text() == ".\n"
    assert "example.net" not in (droot / "control" / "rcpthosts").read_text().splitlines()
    assert "example.net" not in (droot / "control" / "virtualdomains").read_text()
    assert dom.is_dir()         # not a domain any more, but not the alias's to remove
    bad(qrelay("domain", "del", str(droot), "example.net"), "no such domain")


def test_domain_del_of_a_linked_domain_directory_removes_the_link_only(root, tmp_path):
    # vpopmail boxes link big domains elsewhere (domains/DOM -> /data/DOM): vdeldomain
    # unlinks; the tree behind it is the operator's.
    assert qrelay("domain", "add", str(root), "example.com", *OWNER).exit_code == 0
    dom = root / "domains" / "example.com"
    elsewhere = tmp_path / "data" / "example.com"
    elsewhere.parent.mkdir()
    dom.rename(elsewhere)
    dom.symlink_to(elsewhere)
    assert qrelay("user", "add", str(root), "joe@example.com", input="pw\n").exit_code == 0
    assert qrelay("domain", "del", str(root), "example.com").exit_code == 0
    assert not dom.exists() and not dom.is_symlink()
    assert (elsewhere / "joe" / "Maildir").is_dir()
    assert (root / "users" / "assign").read_text() == ".\n"


def test_user_show_last_login(droot):
    qrelay("user", "add", str(droot), "joe@example.com", input="pw\n")
    assert "last login: never (no lastauth)\n" in qrelay("user", "show", str(droot), "joe@example.com").output
    joe = droot / "domains" / "example.com" / "joe"
    (joe / "lastauth").write_text("192.0.2.7")
    os.utime(joe / "lastauth", (1700000000, 1700000000))
    assert "last login: 2023-11-14 22:13:20 UTC from 192.0.2.7\n" in \
        qrelay("user", "show", str(droot), "joe@example.com").output


def test_a_name_with_a_slash_never_makes_a_mailbox_or_alias_outside_the_domain(droot):
    # vpopmail's character list has '/', but a user directory is DOMDIR/NAME:
    # `u1/../../../x` would be ROOT/x (and vchkpw splits a login at '/' anyway).
    qrelay("user", "add", str(droot), "u1@example.com", input="pw\n")
    bad(qrelay("user", "add", str(droot), "u1/../../../x@example.com", input="pw\n"), "'/'")
    bad(qrelay("user", "import", str(droot), "-", input="u1/x@example.com:pw\n"), "'/'")
    bad(qrelay("alias", "add", str(droot), "a/b@example.com", "joe@example.org"), "bad alias name")
    assert not (droot / "x").exists() and not (droot / "domains" / "example.com" / "u1" / "x").exists()
    assert [u.name for u in admin.list_users(droot, "example.com")] == ["u1"]


def test_domain_mkpasswd_makes_a_hand_edit_of_vpasswd_take_effect(droot):
    """Lookups read vpasswd.cdb, as vpopmail's: an operator's edit of vpasswd
    counts once `domain mkpasswd` (vmkpasswd) has rebuilt it; malformed lines
    are named, and make the exit status 1."""
    assert qrelay("user", "add", str(droot), "joe@example.com", input="s3cret\n").exit_code == 0
    dom = droot / "domains" / "example.com"
    joe = (dom / "vpasswd").read_text()
    bob = joe.replace("joe", "bob")
    (dom / "vpasswd").write_text(joe + bob + "broken:line\n" + bob.replace(":1:0:", ":1:2:"))
    os.utime(dom / "vpasswd.cdb", (1, 1))           # built before the edit
    accounts = Accounts(droot, recheck_seconds=0)
    assert not accounts.accepts("bob@example.com")   # not in effect yet
    r = qrelay("domain", "mkpasswd", str(droot), "example.com")
    assert (r.exit_code, r.stdout) == (1, "qrelay: example.com: vpasswd.cdb rebuilt with 2 users\n")
    assert r.stderr.splitlines() == [
        f"qrelay: {dom}/vpasswd line 3: 2 fields, not 7 or 8 (skipped)",
        f"qrelay: {dom}/vpasswd line 4: bob again (only the first line for it counts)"]
    assert accounts.accepts("bob@example.com") and accounts.accepts("joe@example.com")
    assert accounts.domain(str(dom)).user("bob").gid == 0
    assert stat.S_IMODE((dom / "vpasswd.cdb").stat().st_mode) == 0o600
    (dom / "vpasswd").write_text(joe)
    r = qrelay("domain", "mkpasswd", str(droot), "example.com")
    assert (r.exit_code, r.stderr) == (0, "")
    assert not Accounts(droot, recheck_seconds=0).accepts("bob@example.com")
    bad(qrelay("domain", "mkpasswd", str(droot), "nowhere.test"), "nowhere.test: no such domain")
    (dom / "vpasswd").unlink()
    bad(qrelay("domain", "mkpasswd", str(droot), "example.com"), "vpasswd is missing")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_root_never_follows_a_link_the_domain_owner_put_in_its_tree(droot, tmp_path):
    """A domain's tree is its owner's (by default the run user, whom the network
    reaches): a .vpasswd.lock, a maildirsize or a user directory swapped for a
    link made root's `user add`/`quota` open, chown or create what it points
    at (/etc/shadow given to the owner). Root works there as the owner now."""
    import pwd
    import shutil
    import subprocess
    nobody = pwd.getpwnam("nobody")
    assert qrelay("domain", "add", str(droot), "own.example", "--uid", str(nobody.pw_uid),
                  "--gid", str(nobody.pw_gid)).exit_code == 0
    dom = droot / "domains" / "own.example"
    assert qrelay("user", "add", str(droot), "joe@own.example", input="pw\n").exit_code == 0
    secret = tmp_path / "secret"
    secret.write_text("root:only\n")
    secret.chmod(0o600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)

    def as_owner(*argv: str) -> None:
        done = subprocess.run(argv, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    as_owner("ln", "-sf", str(secret), str(dom / ".vpasswd.lock"))
    as_owner("ln", "-sf", str(secret), str(dom / "joe" / "Maildir" / "maildirsize"))
    for args in (("user", "add", str(droot), "ann@own.example"),
                 ("user", "quota", str(droot), "joe@own.example", "1MB"),
                 ("alias", "add", str(droot), "info@own.example", "joe@own.example")):
        qrelay(*args, input="pw\n")
        assert secret.read_text() == "root:only\n", args
        assert (secret.stat().st_uid, secret.stat().st_mode & 0o7777) == (0, 0o600), args
    # A user directory made a link: the new Maildir is not made where it points.
    as_owner("rm", "-f", str(dom / ".vpasswd.lock"))
    as_owner("ln", "-s", str(elsewhere), str(dom / "bob"))
    r = qrelay("user", "add", str(droot), "bob@own.example", input="pw\n")
    assert r.exit_code != 0 and "Traceback" not in r.output + r.stderr
    assert list(elsewhere.iterdir()) == []
    shutil.rmtree(elsewhere)


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_a_domain_its_owner_cannot_reach_is_one_line_naming_the_cure(tmp_path):
    """Root works in a domain's tree as its owner: a ROOT under a directory
    that owner may not search fails at once, saying why (its deliveries, made
    as that owner, would fail there too)."""
    from engine.home import init_home
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    hidden.chmod(0o700)
    root = init_home(hidden / "qrelay", me="mx.example.com")
    r = qrelay("domain", "add", str(root), "example.com", *OWNER)
    assert r.exit_code == 2, r.output
    assert "Permission denied as uid 89, the owner of example.com, who delivers its mail: every " \
           "directory above" in r.stderr and "Traceback" not in r.output + r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_domain_del_never_removes_a_tree_the_owner_pointed_its_path_at(root, tmp_path,
                                                                        monkeypatch):
    """A domain directory under a directory its owner writes (a qmail box's
    /home/vpopmail/domains): the owner swaps that directory for a link while
    `domain del` runs, and root's rm -rf of DOMDIR would follow it and remove
    another tree of that name (/var/www/example.com). Root removes the tree
    as the owner: only what that user could remove itself goes."""
    import pwd
    import subprocess
    nobody = pwd.getpwnam("nobody")
    vhome = tmp_path / "vpopmail"
    vhome.mkdir()
    os.chown(vhome, nobody.pw_uid, nobody.pw_gid)
    assert qrelay("domain", "add", str(root), "example.com", "--uid", str(nobody.pw_uid),
                  "--gid", str(nobody.pw_gid)).exit_code == 0
    # As import-qmail leaves a qmail box: the domain lives under the owner's home.
    real = vhome / "domains"
    subprocess.run(["cp", "-a", str(root / "domains"), str(real)], check=True)
    assign = root / "users" / "assign"
    assign.write_text(assign.read_text().replace(str(root / "domains"), str(real)))
    assert qrelay("newu", str(root)).exit_code == 0
    victim = tmp_path / "www" / "example.com"
    victim.mkdir(parents=True)
    (victim / "index.html").write_text("root's\n")
    (victim / "vpasswd").write_text("")

    swap = admin._write_assign

    def owner_swaps(*args):
        subprocess.run(["sh", "-c", f'mv "$0/domains" "$0/moved" && ln -s "$1" "$0/domains"',
                        str(vhome), str(victim.parent)], user=nobody.pw_uid,
                       group=nobody.pw_gid, extra_groups=[], check=True, timeout=30)
        swap(*args)
    monkeypatch.setattr(admin, "_write_assign", owner_swaps)
    r = qrelay("domain", "del", str(root), "example.com")
    assert "Traceback" not in r.output + r.stderr
    assert (victim / "index.html").read_text() == "root's\n"


def test_user_show_never_blocks_on_a_fifo_nor_reads_a_device_the_owner_put_there(droot, qrelay_cli):
    """`qrelay user show` (root) reads maildirsize in a tree the domain's owner
    writes: a FIFO there blocked it for ever, a link to /dev/zero filled its
    memory. Only a regular file is read; anything else is one line, exit 1."""
    assert qrelay("user", "add", str(droot), "joe@example.com", input="pw\n").exit_code == 0
    size = droot / "domains" / "example.com" / "joe" / "Maildir" / "maildirsize"
    os.mkfifo(size)
    for _ in range(2):
        r = qrelay_cli("user", "show", str(droot), "joe@example.com", timeout=30)
        assert (r.returncode, r.stderr) == (1, f"Error: {size}: not a regular file\n")
        size.unlink()
        size.symlink_to("/dev/zero")


def test_domain_add_and_del_make_a_running_qrelay_reload_at_once(root, dns):
    """vadddomain HUPs qmail-send; `qrelay domain add` HUPs the running `qrelay
    run`, so the new domain's mail is taken at once, not after a settled poll
    (an hour here: only the HUP can have done it)."""
    import smtplib

    from tests.smtp_harness import QrelayProcess
    from tests.test_delivery_e2e import wait_for
    (root / "qrelay.toml").write_text(f'[smtp]\nreload_poll_seconds = 3600\n'
                                      f'[delivery]\ndns_servers = ["{dns.address}"]\n')
    (root / "control" / "tcp.smtp").write_text("127.0.0.1:allow\n")     # no relaying
    (root / "control" / "tcp.smtp.cdb").unlink(missing_ok=True)
    q = QrelayProcess(root, procs=1)
    try:
        def rcpt(address: str) -> int:
            with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
                s.ehlo("client.test")
                s.mail("a@src.test")
                return s.rcpt(address)[0]
        assert rcpt("joe@new.test") == 553
        # Owned by [run] user (domain add's default as root): the receivers read it.
        assert qrelay("domain", "add", str(root), "new.test").exit_code == 0
        assert qrelay("user", "add", str(root), "joe@new.test", input="pw\n").exit_code == 0
        wait_for(lambda: rcpt("joe@new.test") == 250, what="new.test taken after domain add")
        assert qrelay("domain", "del", str(root), "new.test").exit_code == 0
        wait_for(lambda: rcpt("joe@new.test") == 553, what="new.test refused after domain del")
    finally:
        q.stop()
        q.proc.stderr.close()
