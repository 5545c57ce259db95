"""Delivery plans: a vpopmail user's next message goes straight to their
Maildir, with the same bytes, and any change to what the plan was made from
(or a message it does not cover) takes the whole way, with its answer."""
from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from engine.delivery.local import LocalDelivery, deliver_one
from engine.delivery.local.plans import Plans
from tests.test_local_fixtures import (MSG, MSG_LF, new_messages, vpop_tree, write_assign,
                                       write_qmail)
from tests.test_local_vpopmail import set_user

JOE = "example.com-joe@example.com"


def trusting() -> Plans:
    """Plans that take files made a moment ago for old ones (the real clock
    trusts a file two seconds after its last change)."""
    return Plans(now_ns=lambda: time.time_ns() + 10 * 10**9)


@pytest.fixture
def vp(tmp_path):
    tree, ddir = vpop_tree(tmp_path)
    tree.ddir = ddir
    tree.vp = tmp_path / "vpopmail"
    tree.plans = trusting()
    return tree


def deliver(vp, recipient=JOE, message=MSG, sender="s@x.example", plans=True):
    return deliver_one(vp.config, vp.accounts, sender, recipient, message,
                       plans=vp.plans if plans else None)


def answer(r):
    return r.status, r.text, r.forwards


def wait_tick(path: Path, scratch: Path) -> None:
    """Until a change made now gets a ctime other than path's: two changes
    within one timestamp tick would look alike."""
    before = os.stat(path).st_ctime_ns
    scratch.touch()
    while os.stat(scratch).st_ctime_ns <= before:
        os.utime(scratch)


def test_the_next_message_follows_the_plan_with_the_same_bytes(vp):
    first = deliver(vp)
    assert len(vp.plans) == 1 and vp.plans.used == 0
    second = deliver(vp)
    assert vp.plans.used == 1
    assert answer(first) == answer(second) == ("K", "did 0+0+1\n", ())
    paths = sorted((vp.ddir / "joe" / "Maildir" / "new").iterdir())
    want = b"Return-Path: <s@x.example>\nDelivered-To: joe@example.com\n" + MSG_LF
    assert [p.read_bytes() for p in paths] == [want, want]
    assert all(p.name.endswith(f",S={len(want)}") and ".mx.test" in p.name for p in paths)
    assert {p.stat().st_mode & 0o777 for p in paths} == {0o600}


def test_an_unusual_sender_is_quoted_as_the_whole_way_does(vp):
    deliver(vp)
    deliver(vp, sender="a b@x.example")
    deliver(vp, sender="a b@x.example", plans=False)
    assert vp.plans.used == 1
    [_, planned, whole] = new_messages(vp.ddir / "joe" / "Maildir")
    assert planned == whole and planned.startswith(b'Return-Path: <"a b"@x.example>\n')


def test_no_plan_from_files_changed_in_the_last_two_seconds(vp):
    vp.plans = Plans()
    assert deliver(vp).status == "K" and deliver(vp).status == "K"
    assert len(vp.plans) == 0 and vp.plans.used == 0
    assert len(new_messages(vp.ddir / "joe" / "Maildir")) == 2


def test_no_plan_for_an_alias_a_forward_or_a_users_own_qmail(vp):
    write_qmail(vp.ddir, ".qmail-alias", "&joe@example.net\n")
    write_qmail(vp.ddir / "joe", ".qmail", "./Maildir/\n")
    set_user(vp, "fwd")
    assert deliver(vp, "example.com-alias@example.com").status == "K"
    assert deliver(vp).status == "K"
    assert len(vp.plans) == 0


@pytest.mark.parametrize("where", ["alias", "own"])
def test_no_plan_past_a_link_to_nothing(vp, where):
    """qmail-local finds no `.qmail-joe` (nor vdelivermail the user's `.qmail`)
    when it is a link to nothing; the file it names may appear elsewhere,
    which no stat of the plan's would see."""
    target = vp.root.parent / "later"
    link = vp.ddir / ".qmail-joe" if where == "alias" else vp.ddir / "joe" / ".qmail"
    link.symlink_to(target)
    assert deliver(vp).status == "K" and len(vp.plans) == 0
    target.write_text("&joe@example.net\n")
    target.chmod(0o600)
    assert answer(deliver(vp))[2] != ()        # forwarded now


def test_a_plan_that_cannot_be_kept_costs_nothing(vp, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(vp.plans, "learn", broken)
    assert answer(deliver(vp)) == ("K", "did 0+0+1\n", ())
    assert len(new_messages(vp.ddir / "joe" / "Maildir")) == 1


def _alias(vp):
    write_qmail(vp.ddir, ".qmail-joe", "&joe@example.net\n")


def _default_edited_in_place(vp):
    # the same size, so only the file's times say it changed
    path = vp.ddir / ".qmail-default"
    old = path.read_text()
    new = "|echo gone; exit 100 #"
    new += "x" * (len(old) - len(new) - 1) + "\n"
    assert len(new) == len(old)
    wait_tick(path, vp.root.parent / "tick")
    with open(path, "r+") as f:
        f.write(new)


def _home_writable(vp):
    vp.ddir.chmod(0o752)


def _own_qmail(vp):
    write_qmail(vp.ddir / "joe", ".qmail", "&joe@example.net\n")


def _user_dir_gone(vp):
    (vp.ddir / "joe").rename(vp.ddir / ".joe.deleted")


def _user_locked(vp):
    set_user(vp, "joe", gid=0x10)


def _assign_gone(vp):
    write_assign(vp.root, [])


CHANGES = {
    "alias": (_alias, ("K", "did 0+1+0\n")),
    "default edited in place": (_default_edited_in_place, ("D", "gone\n")),
    "home writable": (_home_writable, ("Z", "Uh-oh: home directory is writable. (#4.7.0)\n")),
    "own .qmail": (_own_qmail, ("K", "did 0+0+1\n")),
    "user directory gone": (_user_dir_gone, ("K", "did 0+0+1\n")),
    "user locked": (_user_locked,
                    ("D", "vdelivermail: account is locked email bounced joe@example.com\n")),
    "assign line gone": (_assign_gone, ("Z", "Unable to find alias user!\n")),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_change_takes_the_whole_way(vp, name):
    change, (status, text) = CHANGES[name]
    deliver(vp)
    assert len(vp.plans) == 1
    change(vp)
    got = deliver(vp)
    assert vp.plans.used == 0
    assert (got.status, got.text) == (status, text)
    assert answer(got) == answer(deliver(vp, plans=False))


def test_a_recreated_user_directory_gets_a_plan_again_once_it_is_old(vp):
    deliver(vp)
    _user_dir_gone(vp)
    assert deliver(vp).status == "K"       # vdelivermail made the directory again
    assert len(vp.plans) == 0               # not trusted: just made
    vp.plans.now_ns = lambda: time.time_ns() + 20 * 10**9
    deliver(vp)
    assert deliver(vp).status == "K" and vp.plans.used == 1
    assert len(new_messages(vp.ddir / "joe" / "Maildir")) == 3


LOOPS = {
    "qmail-local's": (b"Delivered-To: example.com-joe@example.com\r\n",
                      "This message is looping: it already has my Delivered-To line. (#5.4.6)\n"),
    "vdelivermail's": (b"delivered-to: JOE@example.com\r\n", "mail is looping\n"),
    "vdelivermail's maildir": (None, "mail is looping\n"),
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_a_looping_message_takes_the_whole_way_and_the_plan_stays(vp, name):
    line, text = LOOPS[name]
    if line is None:
        line = f"Delivered-To: {vp.ddir}/joe/Maildir/\r\n".encode()
    deliver(vp)
    got = deliver(vp, message=line + MSG)
    assert (got.status, got.text) == ("D", text) and vp.plans.used == 0
    assert deliver(vp, message=b"Delivered-To: someone@else.example\r\n" + MSG).status == "K"
    assert vp.plans.used == 1
    assert len(new_messages(vp.ddir / "joe" / "Maildir")) == 2


def test_a_delivered_to_line_in_the_body_is_no_loop(vp):
    deliver(vp)
    assert deliver(vp, message=MSG + b"Delivered-To: joe@example.com\r\n").status == "K"
    assert vp.plans.used == 1


def test_an_empty_message_takes_the_whole_way(vp):
    deliver(vp)
    assert answer(deliver(vp, message=b"")) == ("K", "did 0+0+1\n", ())
    assert vp.plans.used == 0
    assert len(new_messages(vp.ddir / "joe" / "Maildir")) == 1     # vdelivermail drops it


def test_quota_answers_as_the_whole_way_does(tmp_path):
    """The same messages into two trees, with and without plans: the same
    answers, the same maildirsize, the same files."""
    outcomes = []
    for name, plans in (("planned", trusting()), ("whole", None)):
        tree, ddir = vpop_tree(tmp_path / name)
        tree.ddir = ddir
        set_user(tree, "joe", quota_field="1000S")
        answers = [deliver_one(tree.config, tree.accounts, "s@x.example", JOE, MSG,
                               plans=plans).status for _ in range(8)]
        if plans is not None:
            assert plans.used >= 2
        md = ddir / "joe" / "Maildir"
        outcomes.append((answers, (md / "maildirsize").read_text(), new_messages(md)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0][-1] == "D"


def test_a_failed_write_takes_the_whole_way(vp):
    deliver(vp)
    (vp.ddir / "joe" / "Maildir" / "tmp").rmdir()
    got, whole = deliver(vp), deliver(vp, plans=False)
    tmp = vp.ddir / "joe" / "Maildir" / "tmp"
    assert got.status == whole.status == "Z"
    assert [re.sub(r"/Maildir/tmp/[^/\n]+", "/Maildir/tmp/NAME", r.text) for r in (got, whole)] == [
        f"can not open new email file errno=2 file={tmp}/NAME\nsystem error\n"] * 2
    assert len(new_messages(vp.ddir / "joe" / "Maildir")) == 1


def test_plans_are_bounded_and_the_oldest_goes_first(vp):
    vp.plans = Plans(size=1, now_ns=vp.plans.now_ns)
    deliver(vp)
    deliver(vp, "example.com-postmaster@example.com")
    assert len(vp.plans) == 1
    deliver(vp)
    assert vp.plans.used == 0
    deliver(vp)
    assert vp.plans.used == 1


def test_local_delivery_keeps_plans_across_its_threads(vp):
    delivery = LocalDelivery(vp.config, vp.accounts, max_threads=8, plans=vp.plans)
    try:
        delivery.deliver_sync("s@x.example", JOE, MSG)

        async def many():
            return await asyncio.gather(*(delivery.deliver("s@x.example", [JOE], MSG)
                                          for _ in range(50)))
        results = asyncio.run(many())
    finally:
        delivery.close()
    assert {answer(r) for [r] in results} == {("K", "did 0+0+1\n", ())}
    assert vp.plans.used == 50
    got = new_messages(vp.ddir / "joe" / "Maildir")
    assert len(got) == 51 and set(got) == {
        b"Return-Path: <s@x.example>\nDelivered-To: joe@example.com\n" + MSG_LF}
    assert LocalDelivery(vp.config, vp.accounts, plans=False).plans is None
