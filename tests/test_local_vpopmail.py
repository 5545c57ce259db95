"""vdelivermail, natively: a vpopmail-style tree in tmp_path (assign line of
vadddomain's shape, DOM/.qmail-default → vdelivermail, vpasswd), Maildir++ quota."""
from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import time

import pytest

from engine.delivery.local import quota
from engine.delivery.local.accounts import DeliveryAccounts
from engine.delivery.local.maildir import MaildirError
from engine.delivery.local.vdelivermail import _write_error, maildir_to_email
from tests.test_local_fixtures import (GID, MSG, MSG_LF, UID, make_home, make_maildir,
                                       new_messages, vpop_tree, write_assign, write_qmail)


@pytest.fixture
def vp(tmp_path):
    tree, ddir = vpop_tree(tmp_path)
    tree.ddir = ddir
    tree.vp = tmp_path / "vpopmail"
    return tree


def set_user(vp, name, *, gid=0, quota_field="NOQUOTA", directory=None):
    lines = [l for l in (vp.ddir / "vpasswd").read_text().splitlines()
             if not l.startswith(name + ":")]
    d = directory if directory is not None else vp.ddir / name
    lines.append(f"{name}:x:1:{gid}:{name}:{d}:{quota_field}")
    (vp.ddir / "vpasswd").write_text("".join(l + "\n" for l in lines))


def test_user_maildir_headers_and_name(vp):
    r = vp.deliver("example.com-joe@example.com", sender="s@x.example")
    assert (r.status, r.text) == ("K", "did 0+0+1\n")
    [path] = (vp.ddir / "joe" / "Maildir" / "new").iterdir()
    data = path.read_bytes()
    assert data == b"Return-Path: <s@x.example>\nDelivered-To: joe@example.com\n" + MSG_LF
    assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.mx\.test,S=(\d+)", path.name)
    assert path.name.endswith(f",S={len(data)}")


def test_user_lookup_is_case_insensitive(vp):
    assert vp.deliver("example.com-JOE@Example.COM").status == "K"
    assert len(new_messages(vp.ddir / "joe" / "Maildir")) == 1


def test_user_is_lower_cased_as_vpopmail_does_ascii_only(vp):
    # vpopmail's lowerit() is tolower(): the Kelvin sign (U+212A) is no `k`,
    # and stays an invalid username character, as the RCPT check says.
    write_qmail(vp.ddir, ".qmail-default", f"| {vp.vp}/bin/vdelivermail '' delete\n")
    set_user(vp, "koe")
    r = vp.deliver("example.com-\u212aoe@example.com")
    assert (r.status, r.text) == ("D", "invalid username\n")


def test_no_user_bounce_texts(vp):
    r = vp.deliver("example.com-nobody@example.com")
    assert (r.status, r.text) == ("D", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    (vp.vp / "domains" / ".no-user.msg").write_text("global: no such user\n")
    assert vp.deliver("example.com-nobody@example.com").text == "global: no such user\n"
    (vp.ddir / ".no-user.msg").write_text("domain: no such user\n")
    assert vp.deliver("example.com-nobody@example.com").text == "domain: no such user\n"


def test_delete(vp):
    write_qmail(vp.ddir, ".qmail-default", f"| {vp.vp}/bin/vdelivermail '' delete\n")
    r = vp.deliver("example.com-nobody@example.com")
    assert (r.status, r.text) == ("K", "did 0+0+1\n")


def test_catchall_address_forward(vp):
    write_qmail(vp.ddir, ".qmail-default", f"| {vp.vp}/bin/vdelivermail '' catch@other.example\n")
    r = vp.deliver("example.com-nobody@example.com", sender="s@x.example")
    assert r.status == "K"
    [fwd] = r.forwards
    assert (fwd.sender, fwd.recipients) == ("s@x.example", ("catch@other.example",))
    assert fwd.prefix == b"Delivered-To: nobody@example.com\r\n"


def test_catchall_user_directory(vp):
    catch = make_home(vp.ddir / "catch")
    make_maildir(catch / "Maildir")
    write_qmail(vp.ddir, ".qmail-default", f"| {vp.vp}/bin/vdelivermail '' {catch}\n")
    r = vp.deliver("example.com-nobody@example.com")
    assert (r.status, r.text) == (
        "K", f"user does not exist, but will deliver to {catch}/\ndid 0+0+1\n")
    [got] = new_messages(catch / "Maildir")
    assert b"Delivered-To: nobody@example.com\n" in got


def test_catchall_user_directory_keeps_its_maildirsize_quota(vp):
    # 5.4.33's usernotfound: deliver_mail(DIR/Maildir/, "") reads the quota from
    # the target's maildirsize, as for a user's .qmail line (5.4.10 passed NOQUOTA).
    catch = make_home(vp.ddir / "catch")
    md = make_maildir(catch / "Maildir")
    (md / "maildirsize").write_text("10S\n0 0\n")
    write_qmail(vp.ddir, ".qmail-default", f"| {vp.vp}/bin/vdelivermail '' {catch}\n")
    r = vp.deliver("example.com-nobody@example.com")
    assert (r.status, r.text) == (
        "D", f"user does not exist, but will deliver to {catch}/\nuser is over quota\n\n")
    assert new_messages(md) == []


def test_catchall_pointing_at_maildir_defers(vp):
    # README.vdelivermail's `.../Maildir` becomes `.../Maildir/Maildir/`: mail stuck (111).
    catch = make_maildir(vp.ddir / "catch" / "Maildir")
    write_qmail(vp.ddir, ".qmail-default", f"| {vp.vp}/bin/vdelivermail '' {catch}\n")
    r = vp.deliver("example.com-nobody@example.com")
    assert r.status == "Z"
    assert r.text.endswith("system error\n")


def test_maildir_open_failure_names_the_file(vp):
    # vdelivermail's text, with the tmp/ file it could not create (bounce
    # parsers look for it); qmail defers (111).
    tmp = vp.ddir / "joe" / "Maildir" / "tmp"
    tmp.rmdir()
    tmp.write_text("not a directory\n")
    r = vp.deliver("example.com-joe@example.com")
    assert r.status == "Z"
    m = re.search(r"can not open new email file errno=(\d+) file=(\S+)\nsystem error\n$", r.text)
    assert m and int(m.group(1)) == errno.ENOTDIR
    assert re.fullmatch(re.escape(f"{tmp}/") + r"\d+\.M\d+P\d+Q\d+\.mx\.test,S=\d+", m.group(2))


def test_missing_maildir_in_an_existing_user_directory_names_the_tmp_file(vp):
    # vdelivermail recreates only a missing user directory; a missing Maildir
    # inside it fails at the open of tmp/NAME: its "can not open" line, 111.
    md = vp.ddir / "joe" / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).rmdir()
    md.rmdir()
    r = vp.deliver("example.com-joe@example.com")
    assert r.status == "Z"
    m = re.fullmatch(r"can not open new email file errno=(\d+) file=(\S+)\nsystem error\n", r.text)
    assert m and int(m.group(1)) == errno.ENOENT, r.text
    assert re.fullmatch(re.escape(f"{md}/tmp/") + r"\d+\.M\d+P\d+Q\d+\.mx\.test,S=\d+", m.group(2))


def test_maildir_step_texts():
    # deliver_mail's other failures: a write (or sync) and the move into new/.
    err = MaildirError("write", errno.EIO, "x", step="write", tmp="/m/tmp/n", new="/m/new/n")
    assert _write_error(err) == "write failed errno = 5\n"
    err.step = "sync"
    assert _write_error(err) == "write failed errno = 5\n"
    err.step = "link"
    assert _write_error(err) == "rename failed /m/tmp/n /m/new/n errno = 5\n"


def test_bad_syntax(vp):
    write_qmail(vp.ddir, ".qmail-default", f"| {vp.vp}/bin/vdelivermail bounce-no-mailbox\n")
    r = vp.deliver("example.com-joe@example.com")
    assert (r.status, r.text) == ("Z", "vdelivermail: invalid syntax in .qmail-default file\n")


def test_locked_account(vp):
    set_user(vp, "joe", gid=0x10)
    r = vp.deliver("example.com-joe@example.com")
    assert (r.status, r.text) == (
        "D", "vdelivermail: account is locked email bounced joe@example.com\n")


def test_missing_user_directory_is_recreated(vp):
    set_user(vp, "new", directory=vp.ddir / "new")
    assert vp.deliver("example.com-new@example.com").status == "K"
    assert len(new_messages(vp.ddir / "new" / "Maildir")) == 1


def test_a_user_deleted_since_the_cached_vpasswd_is_not_given_a_new_maildir(vp):
    # `user del` rewrites vpasswd, then removes the tree; a worker whose view of
    # vpasswd is up to recheck_seconds old must not re-create the directory of
    # a user who is gone (the mail would land where nobody reads it).
    vp.accounts = DeliveryAccounts.at(vp.root, recheck_seconds=3600)
    assert vp.deliver("example.com-joe@example.com").status == "K"
    kept = [l for l in (vp.ddir / "vpasswd").read_text().splitlines() if not l.startswith("joe:")]
    (vp.ddir / "vpasswd.new").write_text("".join(l + "\n" for l in kept))
    os.replace(vp.ddir / "vpasswd.new", vp.ddir / "vpasswd")
    shutil.rmtree(vp.ddir / "joe")
    r = vp.deliver("example.com-joe@example.com")
    assert (r.status, r.text) == ("D", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    assert not (vp.ddir / "joe").exists()


def test_empty_directory_field(vp):
    set_user(vp, "nodir", directory="")
    r = vp.deliver("example.com-nodir@example.com")
    assert (r.status, r.text) == ("D", "Auto creation of maildir failed. (#5.9.8)\n")


def test_user_dotqmail_forward_and_keep(vp):
    udir = vp.ddir / "joe"
    write_qmail(udir, ".qmail", f"&other@example.net\n{udir}/Maildir/\n")
    r = vp.deliver("example.com-joe@example.com", sender="s@x.example")
    assert (r.status, r.text) == ("K", "did 0+0+1\n")
    # vdelivermail's forward is qmail-inject's: qmail-local's report says no qp for it.
    assert [(f.sender, f.recipients, f.prefix, f.reports_qp) for f in r.forwards] == [
        ("s@x.example", ("other@example.net",), b"Delivered-To: joe@example.com\r\n", False)]
    [got] = new_messages(udir / "Maildir")
    assert got.startswith(b"Return-Path: <s@x.example>\nDelivered-To: joe@example.com\n")


def test_user_dotqmail_relative_maildir_line_names_the_user(vp):
    """`./Maildir/` in a user's .qmail (vpopmail 5.4.33 takes `./` paths):
    the Delivered-To line names the user, never `.@domain`."""
    udir = vp.ddir / "joe"
    write_qmail(udir, ".qmail", "&other@example.net\n./Maildir/\n")
    r = vp.deliver("example.com-joe@example.com", sender="s@x.example")
    assert (r.status, r.text) == ("K", "did 0+0+1\n")
    [got] = new_messages(udir / "Maildir")
    assert got.startswith(b"Return-Path: <s@x.example>\nDelivered-To: joe@example.com\n")


def test_user_dotqmail_comment_only_drops_mail(vp):
    write_qmail(vp.ddir / "joe", ".qmail", "# nothing\n")
    assert vp.deliver("example.com-joe@example.com").status == "K"
    assert new_messages(vp.ddir / "joe" / "Maildir") == []


@pytest.mark.parametrize("code,status", [(0, "K"), (99, "K"), (100, "D"), (77, "D"), (1, "Z")])
def test_user_dotqmail_program(vp, tmp_path, code, status):
    out = tmp_path / "prog.out"
    write_qmail(vp.ddir / "joe", ".qmail",
                f"|echo $SHELL $EXT $HOST > {out}; cat >> {out}; exit {code}\n")
    r = vp.deliver("example.com-joe@example.com")
    assert r.status == status
    assert out.read_bytes() == b"/bin/sh joe example.com\n" + MSG_LF


def test_user_dotqmail_mbox_line_defers(vp):
    write_qmail(vp.ddir / "joe", ".qmail", "./Mailbox\n")
    r = vp.deliver("example.com-joe@example.com")
    assert (r.status, r.text) == ("Z", "can't handle mbox delivery for ./Mailbox")


def test_loop_on_own_delivered_to(vp):
    msg = b"Delivered-To: JOE@example.com\r\n" + MSG
    r = vp.deliver("example.com-joe@example.com", message=msg)
    assert (r.status, r.text) == ("D", "mail is looping\n")


def test_dot_qmail_alias_in_domain_beats_vdelivermail(vp):
    write_qmail(vp.ddir, ".qmail-info", "&joe@example.com\n")
    r = vp.deliver("example.com-info@example.com")
    assert (r.status, r.text) == ("K", "did 0+1+0\n")
    assert r.forwards[0].prefix == b"Delivered-To: example.com-info@example.com\r\n"


@pytest.mark.parametrize("prefix,recipient", [
    ("example-com", "example-com-Nobody@example.com"),     # virtualdomains example.com:example-com
    ("example.com", "example.com-Nobody@alias.com"),       # alias.com:example.com
    ("ex", "ex-Nobody@example.com"),                       # any other prefix
])
def test_forward_delivered_to_whatever_the_virtualdomains_prefix(vp, prefix, recipient):
    """vdelivermail cuts len(HOST)+1 characters off DTLINE's local part, right
    only when the virtualdomains prefix is the domain itself; the line names
    the address the mail was sent to (EXT@HOST) whatever the prefix."""
    write_assign(vp.root, [f"+{prefix}-:example.com:{UID}:{GID}:{vp.ddir}:-::"])
    write_qmail(vp.ddir, ".qmail-default", f"| {vp.vp}/bin/vdelivermail '' catch@other.example\n")
    write_qmail(vp.ddir / "joe", ".qmail", "&other@example.net\n")
    host = recipient.rsplit("@", 1)[1]
    r = vp.deliver(recipient)
    assert r.status == "K", r.text
    assert [f.prefix for f in r.forwards] == [f"Delivered-To: Nobody@{host}\r\n".encode()]
    r = vp.deliver(recipient.replace("Nobody", "joe"))
    assert r.status == "K", r.text
    assert [f.prefix for f in r.forwards] == [f"Delivered-To: joe@{host}\r\n".encode()]


def test_alias_domain_resolves_to_real_domain(vp, tmp_path):
    write_assign(vp.root, [f"+example.com-:example.com:{UID}:{GID}:{vp.ddir}:-::",
                           f"+alias.example-:example.com:{UID}:{GID}:{vp.ddir}:-::"])
    r = vp.deliver("alias.example-joe@alias.example")
    assert r.status == "K", r.text
    [got] = new_messages(vp.ddir / "joe" / "Maildir")
    assert b"Delivered-To: joe@example.com\n" in got


def test_quota_over_bounce_and_maildirsize(vp):
    set_user(vp, "joe", quota_field="1000S")
    big = b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"
    r = vp.deliver("example.com-joe@example.com", message=big)
    assert (r.status, r.text) == ("D", "user is over quota\n\n")
    md = vp.ddir / "joe" / "Maildir"
    assert new_messages(md) == []
    assert (md / "maildirsize").read_text() == "1000S\n0 0\n"
    (vp.ddir / ".over-quota.msg").write_text("Mailbox full.\n")
    assert vp.deliver("example.com-joe@example.com", message=big).text == "Mailbox full.\n\n"


def test_disk_quota_at_write_is_one_over_quota_line(vp):
    # EDQUOT from the filesystem: deliver_to_maildir returns -1 and deliver_mail
    # says vexiterr(100, "user is over quota"): one line, not the maildirsize
    # check's message followed by an empty line.
    from engine.delivery.local import deliver_one
    from engine.delivery.local.maildir import MaildirWriter

    def fsync(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    r = deliver_one(vp.config, vp.accounts, "s@x.example", "example.com-joe@example.com", MSG,
                    writer=MaildirWriter("mx.test", fsync=fsync))
    assert (r.status, r.text) == ("D", "user is over quota\n")
    assert new_messages(vp.ddir / "joe" / "Maildir") == []


def test_quota_counts_and_appends(vp):
    set_user(vp, "joe", quota_field="100000S,3C")
    for _ in range(3):
        assert vp.deliver("example.com-joe@example.com").status == "K"
    md = vp.ddir / "joe" / "Maildir"
    lines = (md / "maildirsize").read_text().splitlines()
    size = len(new_messages(md)[0])
    assert lines == ["100000S,3C", "0 0"] + [f"{size} 1"] * 3
    r = vp.deliver("example.com-joe@example.com")
    assert (r.status, r.text) == ("D", "user is over quota\n\n")
    assert len(new_messages(md)) == 3


def test_quota_warning_once_a_day(vp):
    set_user(vp, "joe", quota_field="100000S,2C")
    (vp.ddir / ".quotawarn.msg").write_text("Subject: quota warning\n\nnearly full\n")
    md = vp.ddir / "joe" / "Maildir"
    assert vp.deliver("example.com-joe@example.com").status == "K"       # 0 of 2 used
    assert vp.deliver("example.com-joe@example.com").status == "K"       # 1 of 2: 50 %
    assert vp.deliver("example.com-joe@example.com").status == "D"       # over: warning
    warnings = [m for m in new_messages(md) if b"quota warning" in m]
    assert len(warnings) == 1
    assert re.match(rb"Delivered-To: joe@example.com\nDate: \w{3}, \d\d \w{3} \d{4} "
                    rb"\d\d:\d\d:\d\d \+0000\nSubject: quota warning\n", warnings[0])
    # counted like any message (vdelivermail delivers it with deliver_to_maildir,
    # which appends it): else a POP3 DELE of it takes off what was never added
    lines = [line.split() for line in (md / "maildirsize").read_text().splitlines()[1:]]
    assert [sum(int(f[0]) for f in lines), sum(int(f[1]) for f in lines)] == [
        sum(len(m) for m in new_messages(md)), len(new_messages(md))]
    assert vp.deliver("example.com-joe@example.com").status == "D"
    assert len([m for m in new_messages(md) if b"quota warning" in m]) == 1


def test_quota_from_maildirsize_for_dotqmail_lines(vp):
    target = make_maildir(vp.ddir / "joe" / "Maildir")
    (target / "maildirsize").write_text("10S\n0 0\n")
    write_qmail(vp.ddir / "joe", ".qmail", f"{target}/\n")
    assert vp.deliver("example.com-joe@example.com").text == "user is over quota\n\n"


def test_empty_quota_field_takes_the_quota_from_maildirsize(vp):
    # checkuser's deliver_mail(USERDIR/Maildir/, pw_shell): an empty field is
    # "no argument", so line 1 of Maildir/maildirsize is the quota; NOQUOTA is none.
    md = vp.ddir / "joe" / "Maildir"
    (md / "maildirsize").write_text("10S\n0 0\n")
    set_user(vp, "joe", quota_field="")
    assert vp.deliver("example.com-joe@example.com").text == "user is over quota\n\n"
    set_user(vp, "joe", quota_field="NOQUOTA")
    assert vp.deliver("example.com-joe@example.com").status == "K"
    (md / "maildirsize").unlink()
    set_user(vp, "joe", quota_field="")
    assert vp.deliver("example.com-joe@example.com").status == "K"
    assert len(new_messages(md)) == 2
    assert not (md / "maildirsize").exists()


def test_maildirsize_rebuild_rules(tmp_path):
    md = make_maildir(tmp_path / "Maildir")
    make_maildir(md / ".Sent")
    make_maildir(md / ".Trash")
    (md / "cur" / "1.a.h,S=100:2,S").write_bytes(b"")
    (md / "cur" / "2.a.h,S=50:2,ST").write_bytes(b"")     # trashed: not counted
    (md / ".Sent" / "cur" / "3.a.h").write_bytes(b"x" * 70)
    (md / ".Trash" / "cur" / "4.a.h,S=999").write_bytes(b"")
    q = quota.parse_quota("1000S,10C")
    over, usage = quota.check(str(md), q, 10)
    assert not over and (usage.bytes, usage.count) == (170, 2)
    assert (md / "maildirsize").read_text() == "1000S,10C\n170 2\n"
    # a stale file (> 15 min) is rebuilt whatever it says
    (md / "maildirsize").write_text("1000S,10C\n900 9\n")
    old = time.time() - 16 * 60
    os.utime(md / "maildirsize", (old, old))
    over, usage = quota.check(str(md), q, 10)
    assert not over and usage.bytes == 170
    # a fresh file that says "over" with several lines is re-checked by a rebuild
    (md / "maildirsize").write_text("1000S,10C\n500 1\n500 1\n")
    assert quota.check(str(md), q, 10)[0] is False
    # ...but one fresh data line is believed
    (md / "maildirsize").write_text("1000S,10C\n995 1\n")
    assert quota.check(str(md), q, 10)[0] is True
    # 5120 bytes or more: rebuilt
    (md / "maildirsize").write_text("1000S,10C\n" + "0 0\n" * 1300)
    quota.check(str(md), q, 10)
    assert (md / "maildirsize").read_text() == "1000S,10C\n170 2\n"


def test_a_negative_maildirsize_is_rebuilt(tmp_path):
    """Sums below zero (a size taken off twice: a rebuild between a POP3
    unlink and its `-bytes -count` line, an IMAP server's expunge racing
    ours) are wrong by construction: Courier's maildirquota recalculates
    then. Believed, they raise the quota by as much, and a mailbox that
    gets mail every few minutes keeps its file young and small, so neither
    the 15-minute nor the 5120-byte rule would correct it for days."""
    md = make_maildir(tmp_path / "Maildir")
    (md / "cur" / "1.a.h,S=900:2,S").write_bytes(b"")
    q = quota.parse_quota("1000S,10C")
    (md / "maildirsize").write_text("1000S,10C\n900 1\n-900 -1\n-900 -1\n")
    over, usage = quota.check(str(md), q, 200)
    assert over and (usage.bytes, usage.count) == (900, 1)
    assert (md / "maildirsize").read_text() == "1000S,10C\n900 1\n"


def test_concurrent_rebuilds_in_one_process_never_share_a_tmp_file(tmp_path):
    """Local deliveries run in threads of one process: a burst for one user
    after 15 idle minutes rebuilds maildirsize in several threads in the same
    second. Each must write its own tmp file, or one renames the other's away
    and that delivery fails (`can not open new email file`, deferred)."""
    md = make_maildir(tmp_path / "Maildir")
    (md / "cur" / "1.a.h,S=100:2,S").write_bytes(b"")
    q = quota.parse_quota("1000S")
    barrier = threading.Barrier(2)
    failed: list[OSError] = []

    def rebuilds() -> None:
        for _ in range(50):
            barrier.wait()
            try:
                quota.rebuild(str(md), q, clock=lambda: 1700000000)
            except OSError as exc:
                failed.append(exc)
    threads = [threading.Thread(target=rebuilds) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []
    assert (md / "maildirsize").read_text() == "1000S\n100 1\n"
    assert os.listdir(md / "tmp") == []


def test_parse_quota_forms():
    assert quota.parse_quota("NOQUOTA") is None
    assert quota.parse_quota("") is None
    assert quota.parse_quota("1048576") == quota.Quota(1048576, 0)
    assert quota.parse_quota("1M") == quota.parse_quota("1MB") == quota.Quota(1048576, 0)
    assert quota.parse_quota("1024K") == quota.Quota(1048576, 0)
    assert quota.parse_quota("1000C") == quota.Quota(0, 1000)
    assert quota.parse_quota("1mbs,1000C") == quota.Quota(1048576, 1000)
    assert quota.parse_quota("10485760S,1000C").line() == "10485760S,1000C"


def test_maildir_to_email():
    assert maildir_to_email("/home/vpopmail/domains/dom.com/joe/Maildir/") == "joe@dom.com"
    assert maildir_to_email("/home/vpopmail/domains/0/dom.com/A/joe/Maildir/") == "joe@dom.com"
    assert maildir_to_email("/var/mail/joe/Maildir/") == ""
    assert maildir_to_email("/var/mail/joe/") == ""


def test_user_dotqmail_blank_lines_are_skipped(vp):
    udir = vp.ddir / "joe"
    write_qmail(udir, ".qmail", f"{udir}/Maildir/\n\n")
    r = vp.deliver("example.com-joe@example.com")
    assert (r.status, r.forwards) == ("K", ())
    assert len(new_messages(udir / "Maildir")) == 1
