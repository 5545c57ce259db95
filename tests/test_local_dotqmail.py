"""qmail-local's pure parts: .qmail search order, header lines, environment, line types."""
from __future__ import annotations

import pytest

from engine.delivery.local.dotqmail import (LocalTemporary, candidates, dtline, environment,
                                            has_delivered_to, myctime, parse_lines, quote2,
                                            rpline, ufline)


def names(dash, ext):
    return [n for n, _ in candidates(dash, ext)]


def test_search_order_as_qmail_local_comments():
    assert names("-", "a-b-c") == [".qmail-a-b-c", ".qmail-a-b-default", ".qmail-a-default",
                                   ".qmail-default"]
    assert names("-", "a-") == [".qmail-a-", ".qmail-a-default", ".qmail-default"]
    assert names("-", "a") == [".qmail-a", ".qmail-default"]
    assert names("-", "") == [".qmail-", ".qmail-default"]


def test_safeext_lowercases_and_maps_dots():
    assert names("-", "Joe.Smith")[0] == ".qmail-joe:smith"
    # $DEFAULT keeps the original case of the replaced part.
    assert dict(candidates("-", "List-Foo.Bar"))[".qmail-list-default"] == "Foo.Bar"
    assert dict(candidates("-", "x"))[".qmail-default"] == "x"


def test_safeext_lowercases_ascii_only_as_case_lowerb():
    # qmail-local lower-cases the extension's bytes A-Z only: a UTF-8 "Ä" stays
    # "Ä", and "İ" (whose Unicode lower case is two characters) keeps $DEFAULT
    # aligned with the part of ext that `default` replaced.
    assert names("-", "Ä")[0] == ".qmail-Ä"
    assert dict(candidates("-", "İ-Foo"))[".qmail-İ-default"] == "Foo"
    assert names("-", "\u212aey")[0] == ".qmail-\u212aey"     # KELVIN SIGN is not k


def test_return_path_and_delivered_to_lines():
    assert rpline("joe@example.com") == "Return-Path: <joe@example.com>\n"
    assert rpline("") == "Return-Path: <>\n"
    assert rpline("#@[]") == "Return-Path: <#@[]>\n"
    assert rpline("a b@example.com") == 'Return-Path: <"a b"@example.com>\n'
    assert rpline('x"y@h') == 'Return-Path: <"x\\"y"@h>\n'
    assert dtline("example.com-joe", "example.com") == \
        "Delivered-To: example.com-joe@example.com\n"
    assert quote2("a..b@h") == '"a..b"@h'
    assert quote2(".a@h") == '".a"@h'


def test_a_sender_kept_quoted_is_not_quoted_again():
    # The receiver queues `"a b"@c` as sent (engine.smtp.policy): qmail, which
    # stores `a b@c`, writes `Return-Path: <"a b"@c>`, and so must qrelay.
    assert rpline('"a b"@src.test') == 'Return-Path: <"a b"@src.test>\n'
    assert rpline('"a\\"b"@h') == 'Return-Path: <"a\\"b"@h>\n'
    assert quote2('"x@y"@h') == '"x@y"@h'
    assert quote2('"a"b@h') == '"\\"a\\"b"@h'       # not one quoted string


def test_ufline_and_myctime():
    t = 1796335099      # Thu Dec  3 21:58:19 2026 UTC
    assert myctime(t) == "Thu Dec 03 21:58:19 2026\n"
    assert ufline("", t) == "From MAILER-DAEMON Thu Dec 03 21:58:19 2026\n"
    assert ufline("a b\tc@d", t) == "From a-b-c@d Thu Dec 03 21:58:19 2026\n"


def test_environment():
    env = environment(user="u", home="/h", local="example.com-joe-x-y-z", host="a.b.example.com",
                      sender="s@x", newsender="s@x", ext="joe-x-y-z", default="z", when=0)
    assert env["EXT"] == "joe-x-y-z"
    assert (env["EXT2"], env["EXT3"], env["EXT4"]) == ("x-y-z", "y-z", "z")
    assert (env["HOST2"], env["HOST3"], env["HOST4"]) == ("a.b.example", "a.b", "a")
    assert env["RECIPIENT"] == "example.com-joe-x-y-z@a.b.example.com"
    assert env["DTLINE"] == "Delivered-To: example.com-joe-x-y-z@a.b.example.com\n"
    assert env["RPLINE"] == "Return-Path: <s@x>\n"
    assert env["DEFAULT"] == "z"
    short = environment(user="u", home="/h", local="l", host="localhost", sender="",
                        newsender="", ext="", default=None, when=0)
    assert (short["HOST2"], short["HOST3"], short["HOST4"]) == ("localhost",) * 3
    assert short["EXT2"] == "" and "DEFAULT" not in short


def test_line_types():
    got = parse_lines("# c\n|prog arg  \n./Maildir/\n/var/mail/joe\n&a@b\nc@d\t\n+list\n\n")
    assert [(i.kind, i.arg) for i in got] == [
        ("comment", "# c"), ("program", "prog arg"), ("maildir", "./Maildir/"),
        ("mbox", "/var/mail/joe"), ("forward", "a@b"), ("forward", "c@d"), ("list", "+list")]
    with pytest.raises(LocalTemporary, match=r"first line of \.qmail file is blank"):
        parse_lines("\n./Maildir/\n")


def test_nul_ends_a_line_as_in_qmail_local():
    # qmail-local's lines are C strings: a NUL ends what the line says (a
    # path, a command or an address with a NUL cannot even be opened or run),
    # while the line's type is read from its first and last characters.
    got = parse_lines("|echo hi\0junk\n./Maildir/\0x/\n./Mailbox\0x\n&a@b\0junk\n"
                      "+list\0x\n\0junk\n")
    assert [(i.kind, i.arg) for i in got] == [
        ("program", "echo hi"), ("maildir", "./Maildir/"), ("mbox", "./Mailbox"),
        ("forward", "a@b"), ("list", "+list")]
    with pytest.raises(LocalTemporary, match=r"first line of \.qmail file is blank"):
        parse_lines("\0|prog\n")


def test_delivered_to_only_in_header_and_exact():
    line = b"Delivered-To: d-joe@d\n"
    assert has_delivered_to(b"A: b\nDelivered-To: d-joe@d\n\nbody\n", line)
    assert not has_delivered_to(b"A: b\n\nDelivered-To: d-joe@d\n", line)
    assert not has_delivered_to(b"delivered-to: d-joe@d\n\n", line)    # qmail compares bytes
    assert not has_delivered_to(b"Delivered-To: d-joe@dx\n\n", line)
