"""Accounts on a copy of a vpopmail-style tree: mailbox(), accepts(), reload on change."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine.accounts import store as store_mod
from engine.accounts.assign import compile_assign
from engine.accounts.files import atomic_write
from engine.accounts.store import Accounts, AccountsError, default_candidates, parse_qmail_default
from engine.accounts.vpasswd import BOUNCE_MAIL, parse_vpasswd, vpasswd_cdb

VDELIVER = "| /home/vpopmail/bin/vdelivermail '' bounce-no-mailbox\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_domain(directory: Path, lines: list[str], *, cdb: bool = True) -> None:
    text = "".join(line + "\n" for line in lines)
    atomic_write(directory / "vpasswd", text.encode(), mode=0o600)
    if cdb:
        atomic_write(directory / "vpasswd.cdb", vpasswd_cdb(parse_vpasswd(text)), mode=0o600)


@pytest.fixture
def box(tmp_path: Path) -> dict:
    """/var/qmail + /home/vpopmail as vadddomain/vadduser leave them (one domain, hashed user)."""
    qmail = tmp_path / "qmail"
    (qmail / "control").mkdir(parents=True)
    (qmail / "users").mkdir()
    (qmail / "control" / "me").write_text("mx.example.net\n")
    (qmail / "control" / "locals").write_text("mx.example.net\n")
    (qmail / "control" / "rcpthosts").write_text("mx.example.net\nexample.com\n")
    (qmail / "control" / "virtualdomains").write_text("example.com:example.com\nalias.example:alias.example\n")
    dom = tmp_path / "home" / "vpopmail" / "domains" / "example.com"
    (dom / "0" / "ann" / "Maildir").mkdir(parents=True)
    (dom / "joe" / "Maildir").mkdir(parents=True)
    home_joe = tmp_path / "home" / "joe"
    home_joe.mkdir()
    (qmail / "users" / "assign").write_text(
        f"+example.com-:example.com:89:89:{dom}:-::\n"
        f"+alias.example-:example.com:89:89:{dom}:-::\n"
        f"=joe:joe:507:100:{home_joe}:::\n"
        f"+joe-:joe:507:100:{home_joe}:-::\n"
        ".\n")
    compile_assign(qmail)
    write_domain(dom, [
        f"joe:$6$x$y:1:0:Joe:{dom}/joe:NOQUOTA",
        f"ann:$6$x$y:1:0:Ann:{dom}/0/ann:10485760S,1000C:clearpw",
        f"locked:$6$x$y:1:{BOUNCE_MAIL}:Locked:{dom}/locked:NOQUOTA",
    ])
    (dom / ".qmail-default").write_text(VDELIVER)
    (dom / ".qmail-info").write_text("&joe@example.com\n")
    (dom / ".qmail-info:desk").write_text("&ann@example.com\n")
    (dom / ".qmail-sales-default").write_text("&joe@example.com\n")
    (home_joe / ".qmail-list").write_text("&x@example.org\n")
    return {"root": qmail, "dom": dom, "home_joe": home_joe}


@pytest.fixture
def accounts(box) -> Accounts:
    return Accounts(box["root"], recheck_seconds=0)


def test_mailbox_resolves_through_virtualdomains_assign_and_vpasswd(accounts, box):
    mb = accounts.mailbox("Joe@Example.COM")
    assert mb is not None
    assert mb.user.name == "joe" and mb.domain == "example.com"
    assert mb.domain_dir == str(box["dom"])
    assert (mb.assignment.uid, mb.assignment.gid) == (89, 89)
    assert mb.maildir == f"{box['dom']}/joe/Maildir/"


def test_mailbox_follows_the_dir_field_of_a_hashed_user(accounts, box):
    mb = accounts.mailbox("ann@example.com")
    assert mb.maildir == f"{box['dom']}/0/ann/Maildir/"
    assert mb.user.clear == "clearpw" and mb.user.quota_bytes == 10485760


def test_alias_domain_reaches_the_real_domains_users(accounts):
    mb = accounts.mailbox("ann@alias.example")
    assert mb is not None and mb.user.name == "ann" and mb.domain == "alias.example"


@pytest.mark.parametrize("address", [
    "nobody@example.com", "info@example.com", "joe@example.org", "joe@mx.example.net", "@example.com",
])
def test_no_mailbox(accounts, address):
    assert accounts.mailbox(address) is None


@pytest.mark.parametrize("address,expected", [
    ("joe@example.com", True),            # vpasswd user (through .qmail-default → vdelivermail)
    ("JOE@EXAMPLE.COM", True),
    ("ann@example.com", True),
    ("nobody@example.com", False),        # bounce-no-mailbox
    ("locked@example.com", False),        # BOUNCE_MAIL: vdelivermail bounces
    ("info@example.com", True),           # .qmail-info
    ("Info.Desk@example.com", True),      # .qmail-info:desk (dots become colons)
    ("info.other@example.com", False),
    ("sales-anything@example.com", True),  # .qmail-sales-default
    ("sales@example.com", False),          # `sales` alone has no `-` for sales-default
    ("joe-foo@example.com", False),        # vdelivermail does not split extensions (qmail-ext off)
    ("joe@somewhere.else", False),         # remote: not ours to judge
    ("joe@mx.example.net", True),          # exact =joe line, no extension: joe's own mailbox
    ("joe-list@mx.example.net", True),     # ~joe/.qmail-list
    ("joe-nolist@mx.example.net", False),  # dash set, no .qmail file
    ("root@mx.example.net", True),         # not in users/assign: qmail-getpw / alias, accepted
])
def test_accepts(accounts, address, expected):
    assert accounts.accepts(address) is expected


def test_catch_all_variants(accounts, box):
    default = box["dom"] / ".qmail-default"
    for text, expected in [
        ("| /home/vpopmail/bin/vdelivermail '' delete\n", True),
        ("| /home/vpopmail/bin/vdelivermail '' postmaster@example.com\n", True),
        (f"| /home/vpopmail/bin/vdelivermail '' {box['dom']}/joe\n", True),
        ("&someone@example.org\n", True),          # not vdelivermail: forwards everything
        ("", True),                                 # empty: qmail-local's default delivery
        (VDELIVER, False),
    ]:
        atomic_write(default, text.encode())
        assert accounts.accepts("nobody@example.com") is expected, text
    default.unlink()
    assert accounts.accepts("nobody@example.com") is False   # no .qmail-default: no mailbox here
    assert accounts.accepts("info@example.com") is True


@pytest.mark.parametrize("local", ['"a b"', "a(b)c", "j\u00f6e", "\u212aoe", "a,b"])
def test_a_catch_all_refuses_what_vdelivermail_calls_an_invalid_username(accounts, box, local):
    # vdelivermail checks EXT's characters before its ARG: `invalid username`,
    # exit 100, so a 250 at RCPT would become a bounce.
    atomic_write(box["dom"] / ".qmail-default", b"| /home/vpopmail/bin/vdelivermail '' joe@example.com\n")
    assert accounts.accepts(f"{local}@example.com") is False
    assert accounts.accepts("Nobody@example.com") is True


def test_parse_qmail_default():
    assert parse_qmail_default(VDELIVER).bounces
    d = parse_qmail_default("# comment\n|/usr/local/vpopmail/bin/vdelivermail '' delete\n")
    assert d.vdelivermail and d.argument == "delete" and not d.bounces
    assert not parse_qmail_default("|preline procmail\n").vdelivermail


def test_default_candidates_match_qmail_local():
    assert default_candidates("-", "a-b-c") == [
        ".qmail-a-b-c", ".qmail-a-b-default", ".qmail-a-default", ".qmail-default"]
    assert default_candidates("-", "a-") == [".qmail-a-", ".qmail-a-default", ".qmail-default"]
    assert default_candidates("-", "Joe.Smith") == [".qmail-joe:smith", ".qmail-default"]
    # No name longer than a file name can be (an RCPT of 880 bytes was 440 names).
    long = default_candidates("-", "a-" * 440)
    assert long[0] == ".qmail-" + "a-" * 440 and long[-1] == ".qmail-default"
    assert len(long) == 129 and all(len(n) <= 255 + len(".qmail-default") for n in long[1:])


def test_sees_a_new_user_a_new_alias_and_a_new_domain(accounts, box):
    dom = box["dom"]
    assert accounts.mailbox("new@example.com") is None
    lines = (dom / "vpasswd").read_text().splitlines() + [f"new:$6$x$y:1:0:New:{dom}/new:NOQUOTA"]
    write_domain(dom, lines)
    assert accounts.mailbox("new@example.com").user.name == "new"
    assert accounts.accepts("help@example.com") is False
    atomic_write(dom / ".qmail-help", b"&joe@example.com\n")
    assert accounts.accepts("help@example.com") is True
    (dom / ".qmail-help").unlink()
    assert accounts.accepts("help@example.com") is False
    # virtualdomains change: example.com becomes remote
    atomic_write(box["root"] / "control" / "virtualdomains", b"alias.example:alias.example\n")
    assert accounts.mailbox("joe@example.com") is None
    assert accounts.accepts("joe@example.com") is False


def test_cdb_is_what_lookups_read_as_in_vpopmail(accounts, box):
    dom = box["dom"]
    with open(dom / "vpasswd", "a") as f:  # hand edit, no vmkpasswd
        f.write(f"hand:$6$x$y:1:0:Hand:{dom}/hand:NOQUOTA\n")
    assert accounts.mailbox("hand@example.com") is None
    (dom / "vpasswd.cdb").unlink()
    assert accounts.mailbox("hand@example.com").user.name == "hand"  # no cdb: the text


def test_rechecks_are_bounded_by_the_interval(box, monkeypatch):
    clock = Clock()
    accounts = Accounts(box["root"], recheck_seconds=5.0, clock=clock)
    assert accounts.accepts("joe@example.com") and accounts.mailbox("joe@example.com")
    calls = []
    real = store_mod.stat_key
    monkeypatch.setattr(store_mod, "stat_key", lambda p: calls.append(p) or real(p))
    dom = box["dom"]
    write_domain(dom, [f"other:$6$x$y:1:0:O:{dom}/other:NOQUOTA"])
    for _ in range(1000):
        assert accounts.mailbox("joe@example.com") is not None  # old snapshot: not looked at yet
    assert calls == []
    clock.now += 5.0
    assert accounts.mailbox("joe@example.com") is None
    assert accounts.mailbox("other@example.com") is not None
    # control (5 files), users/assign + cdb, vpasswd + cdb, the domain's limits (2): once each
    assert len(calls) <= 11


def test_verdicts_are_kept_no_longer_than_their_snapshots(box, monkeypatch):
    """The receiver's repeated RCPT check: answered without a walk through the
    tables while the snapshots are fresh; a change is seen exactly when it
    would be without the kept answers (the next recheck); forget() drops them."""
    clock = Clock()
    accounts = Accounts(box["root"], recheck_seconds=5.0, clock=clock)
    dom = box["dom"]
    # the domain directory's mtime must be old, or its listing is racy (never kept)
    old = time.time() - 60
    os.utime(dom, (old, old))
    assert accounts.local_verdict("joe@example.com") is True
    walks = []
    real = Accounts._local_verdict
    monkeypatch.setattr(Accounts, "_local_verdict",
                        lambda self, a, used: walks.append(a) or real(self, a, used))
    for _ in range(100):
        assert accounts.local_verdict("joe@example.com") is True
    assert walks == []
    write_domain(dom, [f"other:$6$x$y:1:0:O:{dom}/other:NOQUOTA"])
    os.utime(dom, (old, old))
    clock.now += 4.9
    assert accounts.local_verdict("joe@example.com") is True      # snapshot not rechecked yet
    clock.now += 0.1
    assert accounts.local_verdict("joe@example.com") is False     # rechecked: joe is gone
    assert accounts.local_verdict("other@example.com") is True
    walks.clear()
    accounts.forget()
    assert accounts.local_verdict("other@example.com") is True
    assert walks == ["other@example.com"]


def test_verdicts_of_overlong_addresses_are_not_kept(box):
    """The kept answers are bounded in count and, by RFC 5321's longest path,
    in size: a client's random recipients of 900 bytes (parse_path's most)
    would keep 100,000 x 1 KB = 100 MB in every receiver."""
    clock = Clock()
    accounts = Accounts(box["root"], recheck_seconds=5.0, clock=clock)
    old = time.time() - 60
    os.utime(box["dom"], (old, old))
    longest = "x" * (254 - len("@example.com")) + "@example.com"
    for address in (longest, "y" + longest, "z" * 880 + "@example.com"):
        assert accounts.local_verdict(address) is False
    assert list(accounts._verdicts) == [longest]


def test_a_racy_directory_is_never_answered_from_memory(box):
    """A listing taken within the racy window may miss a file created in the
    same tick (the directory's stat key unchanged): at the next recheck it is
    read again, and no kept answer stands in its way."""
    clock = Clock()
    accounts = Accounts(box["root"], recheck_seconds=5.0, clock=clock)
    dom = box["dom"]
    atomic_write(dom / ".qmail-other", b"&joe@example.com\n")   # the listing is racy now
    assert accounts.accepts("help@example.com") is False
    assert accounts._verdicts == {}
    stamp = os.stat(dom)
    atomic_write(dom / ".qmail-help", b"&joe@example.com\n")
    os.utime(dom, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))       # same tick, same key
    clock.now += 5.0
    assert accounts.accepts("help@example.com") is True


def test_unreadable_tables_are_errors_not_unknown_users(accounts, box):
    (box["dom"] / "vpasswd.cdb").write_bytes(b"corrupt")
    with pytest.raises(AccountsError):
        accounts.mailbox("joe@example.com")
    (box["root"] / "users" / "cdb").write_bytes(b"corrupt")
    with pytest.raises(AccountsError):
        accounts.accepts("joe@example.com")


def test_missing_me_is_an_error(accounts, box):
    os.unlink(box["root"] / "control" / "me")
    with pytest.raises(AccountsError):
        accounts.accepts("joe@example.com")


def test_vpop_domain_by_name(accounts, box):
    assignment, users = accounts.vpop_domain("EXAMPLE.com")
    assert assignment.home == str(box["dom"]) and users.user("joe") is not None
    assert accounts.vpop_domain("example.org") is None


def test_vpasswd_users_with_every_scheme_log_in(box):
    from passlib import hash as lp

    from engine.accounts.passwords import verify
    dom = box["dom"]
    schemes = {
        "des": lp.des_crypt.hash("pw-des"),
        "md5": lp.md5_crypt.hash("pw-md5"),
        "sha256": lp.sha256_crypt.using(rounds=5000).hash("pw-sha256"),
        "sha512": lp.sha512_crypt.using(rounds=5000).hash("pw-sha512"),
        "bcrypt": lp.bcrypt.using(rounds=4, ident="2y").hash("pw-bcrypt"),
    }
    write_domain(dom, [f"{n}:{h}:1:0:{n}:{dom}/{n}:NOQUOTA" for n, h in schemes.items()])
    accounts = Accounts(box["root"], recheck_seconds=0)
    for name in schemes:
        user = accounts.mailbox(f"{name}@example.com").user
        assert verify(f"pw-{name}", user.crypted), name
        assert not verify("wrong", user.crypted), name


def test_a_corrupt_record_is_an_error_too(accounts, box):
    cdb = box["dom"] / "vpasswd.cdb"
    data = bytearray(cdb.read_bytes())
    data[2048:2052] = (10 ** 9).to_bytes(4, "little")  # first record (ann): key length past the end
    atomic_write(cdb, bytes(data))
    with pytest.raises(AccountsError):
        accounts.mailbox("ann@example.com")
    with pytest.raises(AccountsError):
        accounts.accepts("ann@example.com")


def test_logins_as_vchkpw_parses_them(box, tmp_path):
    from engine.accounts.store import split_login
    assert split_login("Joe%Example.COM") == ("joe", "example.com")
    # ASCII only, as vchkpw's lowerit: the Kelvin sign is not a `k`.
    assert split_login("\u212aim@example.com") == ("\u212aim", "example.com")
    vp = tmp_path / "vpopmail"
    accounts = Accounts(box["root"], vpopmail_dir=str(vp))
    assert accounts.login("joe") == ("joe", None)                     # no default domain
    assert accounts.login("JOE@Example.com")[0] == "joe@example.com"
    assert accounts.login("joe/example.com")[1].name == "joe"
    (vp / "etc").mkdir(parents=True)
    (vp / "etc" / "defaultdomain").write_text("Example.com\nignored\n")
    fresh = Accounts(box["root"], vpopmail_dir=str(vp))
    name, user = fresh.login("joe")
    assert name == "joe@example.com" and user.name == "joe"           # ~vpopmail/etc/defaultdomain
    assert fresh.login("joe@") == ("joe@", None) and fresh.login("") == ("", None)
    setting = Accounts(box["root"], vpopmail_dir=str(vp), default_domain="other.example")
    assert setting.login("joe") == ("joe@other.example", None)        # the setting wins


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to look as another user")
def test_a_domain_directory_others_cannot_enter_is_accounts_error_for_every_lookup(box):
    # The receivers run as `[run] user`; a domain of another owner (0700) must
    # be a temporary failure (AccountsError: 454 at AUTH, -ERR at POP3), never
    # an exception the callers do not expect.
    import subprocess
    import sys
    from tests.conftest import REPO
    box["dom"].chmod(0o700)
    program = (
        "import sys\n"
        "from engine.accounts.store import Accounts, AccountsError\n"
        "a = Accounts(sys.argv[1])\n"
        "for call in (lambda: a.login('joe@example.com'), lambda: a.mailbox('joe@example.com'),\n"
        "             lambda: a.local_verdict('nobody@example.com')):\n"
        "    try:\n"
        "        print(call())\n"
        "    except AccountsError:\n"
        "        print('AccountsError')\n")
    r = subprocess.run([sys.executable, "-c", program, str(box["root"])], cwd="/",
                       capture_output=True, text=True, timeout=60, user=65534, group=65534,
                       extra_groups=[], env={"PYTHONPATH": str(REPO)})
    assert r.stdout.splitlines() == ["AccountsError"] * 3, r.stdout + r.stderr
