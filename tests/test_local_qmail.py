"""qmail-lspawn + qmail-local through deliver_one: real homes, .qmail files,
Maildirs, mboxes and /bin/sh programs in tmp_path."""
from __future__ import annotations

import os
import re
import time

import pytest

from engine.delivery.local import LocalConfig, deliver_one
from engine.delivery.local.courier import system_getpw
from tests.test_local_fixtures import (GID, MSG, MSG_LF, UID, Tree, accounts_at, make_home,
                                       make_maildir, new_messages, write_assign, write_qmail)


@pytest.fixture
def tree(tmp_path):
    home = make_home(tmp_path / "home" / "joe")
    make_maildir(home / "Maildir")
    write_assign(tmp_path, [
        f"=joe:joe:{UID}:{GID}:{home}:::",
        f"+joe-:joe:{UID}:{GID}:{home}:-::",
    ])
    t = Tree(tmp_path)
    t.home = home
    return t


def test_bare_user_default_delivery_headers_exact(tree):
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("K", "did 1+0+0\n")
    [got] = new_messages(tree.home / "Maildir")
    assert got == (b"Return-Path: <joe@sender.example>\n"
                   b"Delivered-To: joe@mx.test\n" + MSG_LF)
    assert os.listdir(tree.home / "Maildir" / "tmp") == []


def test_bounce_sender_return_path(tree):
    tree.deliver("joe@mx.test", sender="")
    [got] = new_messages(tree.home / "Maildir")
    assert got.startswith(b"Return-Path: <>\nDelivered-To: joe@mx.test\nReceived:")


def test_empty_dotqmail_uses_default_delivery(tree):
    write_qmail(tree.home, ".qmail", "")
    assert tree.deliver("joe@mx.test").status == "K"
    assert len(new_messages(tree.home / "Maildir")) == 1


def test_extension_without_file_bounces(tree):
    r = tree.deliver("joe-nosuch@mx.test")
    assert (r.status, r.text) == ("D", "Sorry, no mailbox here by that name. (#5.1.1)\n")


def test_extension_and_default_files(tree):
    make_maildir(tree.home / "a")
    make_maildir(tree.home / "b")
    make_maildir(tree.home / "c")
    write_qmail(tree.home, ".qmail-list:x", "./a/\n")
    write_qmail(tree.home, ".qmail-list-default", "./b/\n")
    write_qmail(tree.home, ".qmail-default", "./c/\n")
    assert tree.deliver("joe-List.X@mx.test").status == "K"
    assert tree.deliver("joe-list-other@mx.test").status == "K"
    assert tree.deliver("joe-zzz@mx.test").status == "K"
    assert [len(new_messages(tree.home / d)) for d in "abc"] == [1, 1, 1]
    [b] = new_messages(tree.home / "b")
    assert b"Delivered-To: joe-list-other@mx.test\n" in b


def test_assign_exact_beats_wildcard_and_longest_prefix(tmp_path):
    homes = {n: make_home(tmp_path / n) for n in ("exact", "short", "long", "all")}
    for h in homes.values():
        make_maildir(h / "Maildir")
    write_assign(tmp_path, [
        f"+:alias:{UID}:{GID}:{homes['all']}:-::",
        f"+ab-:u:{UID}:{GID}:{homes['short']}:-:pre-:",
        f"+ab-cd-:u:{UID}:{GID}:{homes['long']}:-::",
        f"=ab-cd-ef:u:{UID}:{GID}:{homes['exact']}:::",
    ])
    acc = accounts_at(tmp_path)
    assert acc.assignment("AB-CD-EF").home == str(homes["exact"])
    a = acc.assignment("ab-cd-XY")
    assert (a.home, a.ext) == (str(homes["long"]), "XY")
    a = acc.assignment("ab-Zz")
    assert (a.home, a.ext) == (str(homes["short"]), "pre-Zz")
    assert acc.assignment("zz").home == str(homes["all"])
    write_qmail(homes["short"], ".qmail-pre-default", "./Maildir/\n")
    assert Tree(tmp_path).deliver("ab-zz@mx.test").status == "K"
    assert len(new_messages(homes["short"] / "Maildir")) == 1


def test_assign_cdb_is_read_like_qmail_lspawn(tmp_path):
    from engine.config.cdb import write_cdb
    home = make_home(tmp_path / "h")
    (tmp_path / "users").mkdir()
    rec = f"u\0{UID}\0{GID}\0{home}\0-\0".encode()
    write_cdb(tmp_path / "users" / "cdb", [
        (b"", b"-"), (b"!ex.com-", rec), (b"!joe\0", f"joe\0{UID}\0{GID}\0{home}\0\0".encode())])
    acc = accounts_at(tmp_path)
    assert acc.assignment("Ex.Com-Fred").ext == "Fred"
    assert acc.assignment("JOE").dash == ""
    assert acc.assignment("joex") is None       # 'x' is not a wildchar


def test_no_assignment_getpw_fallback_and_alias(tmp_path):
    write_assign(tmp_path, [])
    t = Tree(tmp_path)
    assert t.deliver("nobody-here@mx.test").text == "Unable to find alias user!\n"
    alias = make_home(tmp_path / "alias")
    pw = {"alias": ("alias", UID, GID, str(alias))}
    t = Tree(tmp_path, getpw=pw.get)
    r = t.deliver("nobody-here@mx.test")
    assert (r.status, r.text) == ("D", "Sorry, no mailbox here by that name. (#5.1.1)\n")
    write_qmail(alias, ".qmail-nobody-here", "./Maildir/\n")
    make_maildir(alias / "Maildir")
    assert t.deliver("Nobody-Here@mx.test").status == "K"
    assert system_getpw("no-such-user-qrelay") is None


def test_empty_local_part_is_trashed(tree):
    assert (tree.deliver("@mx.test").status, tree.deliver("@mx.test").text) == ("K", "")


def test_uid_zero_refused(tmp_path):
    home = make_home(tmp_path / "r")
    write_assign(tmp_path, [f"=root:root:0:0:{home}:::"])
    r = Tree(tmp_path).deliver("root@mx.test")
    assert (r.status, r.text) == ("Z", "Not allowed to perform deliveries as root.\n")


def test_writable_home_and_dotqmail_defer(tree):
    tree.home.chmod(0o702)
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("Z", "Uh-oh: home directory is writable. (#4.7.0)\n")
    tree.home.chmod(0o1700)
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == (
        "Z", "Home directory is sticky: user is editing his .qmail file. (#4.2.1)\n")
    tree.home.chmod(0o700)
    write_qmail(tree.home, ".qmail", "./Maildir/\n", mode=0o602)
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("Z", "Uh-oh: .qmail file is writable. (#4.7.0)\n")
    assert new_messages(tree.home / "Maildir") == []


def test_missing_home_defers(tmp_path):
    write_assign(tmp_path, [f"=joe:joe:{UID}:{GID}:{tmp_path}/gone:::"])
    r = Tree(tmp_path).deliver("joe@mx.test")
    assert r.status == "Z"
    assert r.text == f"Unable to switch to {tmp_path}/gone: file does not exist. (#4.3.0)\n"


def test_delivered_to_loop_bounces(tree):
    msg = b"Delivered-To: joe@mx.test\r\nSubject: x\r\n\r\nbody\r\n"
    r = tree.deliver("joe@mx.test", message=msg)
    assert (r.status, r.text) == (
        "D", "This message is looping: it already has my Delivered-To line. (#5.4.6)\n")
    # another address's line, or the line in the body, is not a loop
    assert tree.deliver("joe-x@mx.test", message=msg).text.startswith("Sorry")
    body_only = b"Subject: x\r\n\r\nDelivered-To: joe@mx.test\r\n"
    assert tree.deliver("joe@mx.test", message=body_only).status == "K"


def test_blank_first_line_defers(tree):
    write_qmail(tree.home, ".qmail", "\n./Maildir/\n")
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("Z", "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n")


def test_comments_and_forwards(tree):
    write_qmail(tree.home, ".qmail", "# a comment\n&a@x.example\nb@y.example  \n./Maildir/\n")
    r = tree.deliver("joe@mx.test", message=MSG)
    assert (r.status, r.text) == ("K", "did 1+2+0\n")
    [fwd] = r.forwards
    assert fwd.sender == "joe@sender.example"
    assert fwd.recipients == ("a@x.example", "b@y.example")
    assert fwd.prefix == b"Delivered-To: joe@mx.test\r\n"
    assert fwd.reports_qp        # qmail-local's own: its report names the copy's qp


def test_forward_owner_and_verp_sender(tree):
    write_qmail(tree.home, ".qmail-list", "&a@x.example\n")
    write_qmail(tree.home, ".qmail-list-owner", "&owner@x.example\n")
    assert tree.deliver("joe-list@mx.test").forwards[0].sender == "joe-list-owner@mx.test"
    write_qmail(tree.home, ".qmail-list-owner-default", "&owner@x.example\n")
    assert tree.deliver("joe-list@mx.test").forwards[0].sender == "joe-list-owner-@mx.test-@[]"
    assert tree.deliver("joe-list@mx.test", sender="").forwards[0].sender == ""
    assert tree.deliver("joe-list@mx.test", sender="#@[]").forwards[0].sender == "#@[]"


def test_no_forward_when_a_later_line_fails(tree):
    write_qmail(tree.home, ".qmail", "&a@x.example\n|exit 111\n")
    r = tree.deliver("joe@mx.test")
    assert r.status == "Z" and r.forwards == ()


def test_mbox_from_line_quoting_and_two_messages(tree):
    write_qmail(tree.home, ".qmail", "./Mailbox\n")
    assert tree.deliver("joe@mx.test").text == "did 1+0+0\n"
    tree.deliver("joe@mx.test", sender="", message=b"Subject: 2\r\n\r\nno final newline")
    data = (tree.home / "Mailbox").read_bytes()
    first, rest = data.split(b"\n", 1)
    assert re.fullmatch(rb"From joe@sender.example [A-Z][a-z]{2} [A-Z][a-z]{2} \d\d "
                        rb"\d\d:\d\d:\d\d \d{4}", first)
    assert rest.startswith(b"Return-Path: <joe@sender.example>\nDelivered-To: joe@mx.test\n")
    assert b"\n>From the start\n>>From quoted\nbody\n\nFrom MAILER-DAEMON " in data
    assert data.endswith(b"Return-Path: <>\nDelivered-To: joe@mx.test\n"
                         b"Subject: 2\n\nno final newline\n\n")
    assert (tree.home / "Mailbox").stat().st_mode & 0o777 == 0o600


def test_mbox_quoting_of_many_from_lines_holds_a_few_copies():
    # The quoting's regex substitution held a piece per quoted line until it
    # joined them: 247 MB for a 7 MB message of `From ` lines, gigabytes in
    # the delivery worker for one near max_message_bytes.
    import tracemalloc
    from engine.delivery.local.mbox import quote_from
    body = b"Subject: x\n\n" + b"From a\n>From b\n" * 200_000 + b"last From\nFrom"
    tracemalloc.start()
    try:
        out = quote_from(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == re.sub(rb"(?m)^(>*From )", rb">\1", body) + b"\n"
    assert peak < 5 * len(body), peak


def test_mbox_locked_too_long_defers(tree):
    import fcntl
    write_qmail(tree.home, ".qmail", "./Mailbox\n")
    box = tree.home / "Mailbox"
    box.write_bytes(b"")
    with open(box, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        t = Tree(tree.root, mbox_lock_timeout=0.2)
        r = t.deliver("joe@mx.test")
    assert (r.status, r.text) == ("Z", "File has been locked for 30 seconds straight. (#4.3.0)\n")
    assert box.read_bytes() == b""


def test_absolute_maildir_and_missing_maildir(tree, tmp_path):
    target = make_maildir(tmp_path / "abs" / "Maildir")
    write_qmail(tree.home, ".qmail", f"{target}/\n")
    assert tree.deliver("joe@mx.test").status == "K"
    assert len(new_messages(target)) == 1
    write_qmail(tree.home, ".qmail", "./NoSuch/\n")
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("Z", "Unable to chdir to maildir. (#4.2.1)\n")


@pytest.mark.parametrize("code,status", [
    (0, "K"), (99, "K"), (100, "D"), (64, "D"), (65, "D"), (70, "D"), (76, "D"), (77, "D"),
    (78, "D"), (112, "D"), (111, "Z"), (1, "Z"), (2, "Z"), (75, "Z"), (101, "Z")])
def test_program_exit_codes(tree, code, status):
    write_qmail(tree.home, ".qmail", f"|echo said {code}; exit {code}\n")
    r = tree.deliver("joe@mx.test")
    assert r.status == status
    assert r.text.startswith(f"said {code}\n")
    if status == "K":
        assert r.text == f"said {code}\ndid 0+0+1\n"
    else:
        assert r.text == f"said {code}\n"


def test_program_99_skips_later_lines_but_keeps_earlier_forwards(tree):
    write_qmail(tree.home, ".qmail", "&a@x.example\n|exit 99\n./Maildir/\n&b@x.example\n")
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("K", "did 0+1+1\n")
    assert r.forwards[0].recipients == ("a@x.example",)
    assert new_messages(tree.home / "Maildir") == []


def test_first_failure_stops_everything(tree):
    write_qmail(tree.home, ".qmail", "|exit 100\n./Maildir/\n")
    assert tree.deliver("joe@mx.test").status == "D"
    assert new_messages(tree.home / "Maildir") == []


def test_program_environment_stdin_and_cwd(tree, tmp_path):
    out = tmp_path / "env.out"
    write_qmail(tree.home, ".qmail-x-default",
                f"|(env; echo CWD=$(pwd); echo STDIN; cat) > {out}\n")
    r = tree.deliver("joe-x-Foo.Bar@mx.test", sender="s@x.example")
    assert r.status == "K", r.text
    text = out.read_bytes()
    env = dict(l.split("=", 1) for l in text.split(b"STDIN\n")[0].decode().splitlines()
               if "=" in l)
    assert env["USER"] == "joe" and env["HOME"] == str(tree.home)
    assert env["SENDER"] == "s@x.example" and env["NEWSENDER"] == "s@x.example"
    assert env["RECIPIENT"] == "joe-x-Foo.Bar@mx.test"
    assert env["LOCAL"] == "joe-x-Foo.Bar" and env["HOST"] == "mx.test"
    assert env["HOST2"] == "mx" and env["HOST3"] == "mx" and env["HOST4"] == "mx"
    assert env["EXT"] == "x-Foo.Bar" and env["EXT2"] == "Foo.Bar" and env["EXT3"] == ""
    assert env["DEFAULT"] == "Foo.Bar"
    assert env["CWD"] == str(tree.home)
    assert env["PATH"] == LocalConfig().path
    assert b"DTLINE=Delivered-To: joe-x-Foo.Bar@mx.test\n" in text
    assert b"RPLINE=Return-Path: <s@x.example>\n" in text
    assert b"UFLINE=From s@x.example " in text
    assert text.split(b"STDIN\n", 1)[1] == MSG_LF       # no Return-Path/Delivered-To added


def test_program_cannot_change_the_message_later_lines_get(tree, tmp_path):
    # qmail's programs read the queue file, which they cannot write: one
    # program line must not truncate or overwrite what the next one reads.
    out = tmp_path / "seen"
    write_qmail(tree.home, ".qmail",
                "|(: > /dev/stdin) 2>/dev/null; (echo X 1<>/dev/stdin) 2>/dev/null; exit 0\n"
                f"|cat > {out}\n")
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("K", "did 0+0+2\n")
    assert out.read_bytes() == MSG_LF


def test_program_output_is_bounded(tree):
    write_qmail(tree.home, ".qmail", "|head -c 100000 /dev/zero | tr '\\0' a; exit 100\n")
    r = tree.deliver("joe@mx.test")
    assert r.status == "D"
    assert r.text == "a" * 3000 + "\nError report too long, sorry.\n"


def test_program_time_limit(tree):
    write_qmail(tree.home, ".qmail", "|echo started; exec sleep 60\n")
    t = Tree(tree.root, program_timeout=0.5)
    started = time.monotonic()
    r = t.deliver("joe@mx.test")
    assert time.monotonic() - started < 30
    assert (r.status, r.text) == ("Z", "started\nProgram timed out. (#4.3.0)\n")


def test_program_that_leaves_a_daemon_succeeds_when_it_exits(tree, tmp_path):
    # The daemon keeps the output pipe open: the program's exit, not the
    # pipe's end, is the end of the delivery (else: "timed out", and a
    # successful delivery made again on every retry).
    pidfile = tmp_path / "daemon.pid"
    write_qmail(tree.home, ".qmail",
                f"|(sleep 60 & echo $! > {pidfile}); echo hi; exit 0\n./Maildir/\n")
    t = Tree(tree.root, program_timeout=20)
    started = time.monotonic()
    try:
        r = t.deliver("joe@mx.test")
    finally:
        os.kill(int(pidfile.read_text()), 9)
    assert (r.status, r.text) == ("K", "hi\ndid 1+0+1\n")
    assert time.monotonic() - started < 10
    assert len(new_messages(tree.home / "Maildir")) == 1


def test_program_killed_by_signal_defers(tree):
    write_qmail(tree.home, ".qmail", "|kill -9 $$\n")
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("Z", "Aack, child crashed. (#4.3.0)\n")


def test_x_bit_and_plus_list_allow_only_forwards(tree):
    write_qmail(tree.home, ".qmail", "&a@x.example\n./Maildir/\n", mode=0o700)
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == (
        "Z", "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n")
    write_qmail(tree.home, ".qmail", "+list\n|true\n")
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == (
        "Z", "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)\n")
    write_qmail(tree.home, ".qmail", "&a@x.example\n", mode=0o700)
    assert tree.deliver("joe@mx.test").status == "K"


def test_deliver_one_never_raises(tree):
    class Broken:
        def assignment(self, local):
            raise RuntimeError("bug")
    r = deliver_one(tree.config, Broken(), "", "joe@mx.test", MSG)
    assert (r.status, r.text) == ("Z", "qmail-local crashed.\n")


def test_getpw_user_and_extension(tmp_path):
    write_assign(tmp_path, [])
    home = make_home(tmp_path / "fred")
    os.chown(home, UID, GID)
    make_maildir(home / "Maildir")
    write_qmail(home, ".qmail-lists-default", "./Maildir/\n")
    pw = {"fred": ("fred", UID, GID, str(home))}
    t = Tree(tmp_path, getpw=pw.get)
    r = t.deliver("Fred-lists-x@mx.test")
    assert (r.status, r.text) == ("K", "did 1+0+0\n")
    assert t.deliver("fred@mx.test").status == "K"          # bare user: defaultdelivery
    assert len(new_messages(home / "Maildir")) == 2


def test_getpw_lowercases_ascii_only(tmp_path):
    # qmail-getpw's case_lowers: "\u212a" (KELVIN SIGN) is not "k", so no
    # passwd user "kate" takes "\u212aate"; the alias user does.
    write_assign(tmp_path, [])
    kate = make_home(tmp_path / "kate")
    os.chown(kate, UID, GID)
    alias = make_home(tmp_path / "alias")
    write_qmail(alias, ".qmail-default", "./Maildir/\n")
    make_maildir(alias / "Maildir")
    pw = {"kate": ("kate", UID, GID, str(kate)), "alias": ("alias", UID, GID, str(alias))}
    assert Tree(tmp_path, getpw=pw.get).deliver("\u212aate@mx.test").status == "K"
    assert len(new_messages(alias / "Maildir")) == 1


def test_program_runs_with_qmail_local_umask(tree, tmp_path):
    write_qmail(tree.home, ".qmail", f"|umask > {tmp_path}/umask.out\n")
    assert tree.deliver("joe@mx.test").status == "K"
    assert (tmp_path / "umask.out").read_text().strip() == "0077"


def test_unreadable_users_cdb_defers(tree):
    (tree.root / "users" / "cdb").write_bytes(b"not a cdb")
    r = tree.deliver("joe@mx.test")
    assert (r.status, r.text) == ("Z", "Trouble reading users/cdb in qmail-lspawn.\n")
