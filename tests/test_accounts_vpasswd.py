"""vpasswd / vpasswd.cdb, gid flags, quota field, hashed directories (spec vpopmail §2.3–2.7)."""
from __future__ import annotations

import pytest

from engine.accounts import vpasswd as vp
from engine.accounts.vpasswd import (
    QuotaError, VpopDomain, VUser, format_quota, hash_subdir, parse_quota, parse_vpasswd_line,
    vpasswd_cdb, vpasswd_text,
)
from engine.config.cdb import CdbFile

LINES = (
    "joe:$1$abcdefgh$N6kqD.QY6E1ZTtWTWZb1e.:1:0:Joe Smith:/home/vpopmail/domains/example.com/joe:NOQUOTA\n"
    "ann:$6$salt$x:1:2050:ann:/home/vpopmail/domains/example.com/0/ann:10485760S,1000C:clear:with:colons\n"
    "\n"
    "broken:line\n"
)


def test_line_fields_and_optional_cleartext():
    joe = parse_vpasswd_line(LINES.split("\n")[0])
    assert joe == VUser("joe", "$1$abcdefgh$N6kqD.QY6E1ZTtWTWZb1e.", 1, 0, "Joe Smith",
                        "/home/vpopmail/domains/example.com/joe", "NOQUOTA", None)
    ann = parse_vpasswd_line(LINES.split("\n")[1])
    assert ann.clear == "clear:with:colons"
    assert ann.line() == LINES.split("\n")[1]
    assert parse_vpasswd_line("broken:line") is None
    assert parse_vpasswd_line("") is None


def test_flags_are_vpopmails_bits():
    assert (vp.NO_PASSWD_CHNG, vp.NO_POP, vp.NO_WEBMAIL, vp.NO_IMAP) == (0x01, 0x02, 0x04, 0x08)
    assert (vp.BOUNCE_MAIL, vp.NO_RELAY, vp.NO_SMTP, vp.QA_ADMIN, vp.V_OVERRIDE) == (
        0x10, 0x20, 0x800, 0x1000, 0x2000)
    assert vp.NO_MAILDROP == 0x40000
    u = parse_vpasswd_line(f"u:x:1:{vp.NO_POP | vp.NO_SMTP | vp.BOUNCE_MAIL}:u:/d:NOQUOTA")
    assert u.no_pop and u.no_smtp and u.bounce_mail
    assert not (u.no_imap or u.no_webmail or u.no_relay or u.no_passwd_chng or u.qa_admin)
    assert u.flag_names == ["no_pop", "bounce_mail", "no_smtp"]
    assert parse_vpasswd_line("u:x:1:2050:u:/d:NOQUOTA").flag_names == ["no_pop", "no_smtp"]


def test_uid_and_gid_are_read_as_atoi_reads_them():
    # vgetent / auth_getpw: atoi(), so trailing garbage keeps the leading number
    # (a hand-edited `2x` is NO_POP to vpopmail) and a rewrite keeps the flag.
    u = parse_vpasswd_line("u:x:1x: 2050 junk:u:/d:NOQUOTA")
    assert (u.uid, u.gid) == (1, 2050) and u.no_pop and u.no_smtp
    assert u.line() == "u:x:1:2050:u:/d:NOQUOTA"
    assert parse_vpasswd_line("u:x::zz:u:/d:NOQUOTA").gid == 0


@pytest.mark.parametrize("text,expected", [
    ("NOQUOTA", (None, None)),
    ("", (None, None)),
    ("NO", (None, None)),
    ("1048576", (1048576, None)),
    ("1M", (1048576, None)),
    ("1MB", (1048576, None)),
    ("1024K", (1048576, None)),
    ("1024KB", (1048576, None)),
    ("1048576S", (1048576, None)),
    ("1000C", (None, 1000)),
    ("1mbs,1000C", (1048576, 1000)),
    ("1000C,10MBS", (10485760, 1000)),
    ("10485760S,1000C", (10485760, 1000)),
    ("0S,0C", (None, None)),
])
def test_quota_parse(text, expected):
    assert parse_quota(text) == expected


@pytest.mark.parametrize("text", ["lots", "10XB", "-5", "10C5", "1,,2"])
def test_bad_quota(text):
    with pytest.raises(QuotaError):
        parse_quota(text)


def test_quota_format_and_user_properties():
    assert format_quota(10485760, 1000) == "10485760S,1000C"
    assert format_quota(10485760, None) == "10485760S"
    assert format_quota(None, 5) == "5C"
    assert format_quota(None, None) == "NOQUOTA"
    u = parse_vpasswd_line("u:x:1:0:u:/d:10485760S,1000C")
    assert (u.quota_bytes, u.quota_count) == (10485760, 1000)
    u = parse_vpasswd_line("u:x:1:0:u:/d:garbage")
    assert (u.quota_bytes, u.quota_count) == (None, None)
    assert parse_vpasswd_line("u:x:1:0:u:/d/u:NOQUOTA").maildir == "/d/u/Maildir/"


def test_file_is_sorted_and_cdb_has_vpopmails_format():
    users = [parse_vpasswd_line(line) for line in LINES.split("\n")[:2]]
    text = vpasswd_text(users)
    assert text.splitlines()[0].startswith("ann:") and text.endswith("\n")
    cdb = CdbFile(vpasswd_cdb(users))
    assert cdb.get(b"joe") == LINES.split("\n")[0].split(":", 1)[1].encode()
    assert [k for k, _ in cdb.items()] == [b"ann", b"joe"]


def test_domain_from_text_and_cdb_agree_and_ignore_case():
    by_text = VpopDomain.from_text("/d", LINES)
    users = list(by_text.users())
    by_cdb = VpopDomain.from_cdb("/d", vpasswd_cdb(users))
    for d in (by_text, by_cdb):
        assert d.user("JOE").gecos == "Joe Smith"
        assert d.user("ann").directory.endswith("/0/ann")  # the dir field, hashed or not
        assert d.user("nobody") is None
        assert len(d) == 2
    assert sorted(u.name for u in by_cdb.users()) == ["ann", "joe"]


def test_hashed_directories_follow_bigdir_spread():
    assert [hash_subdir(i) for i in (0, 98)] == ["", ""]
    assert [hash_subdir(i) for i in (99, 198, 199)] == ["0", "0", "1"]
    last_single = 99 + 62 * 100 - 1
    assert hash_subdir(last_single) == "z"
    assert hash_subdir(last_single + 1) == "0/0"
    assert hash_subdir(last_single + 101) == "0/1"


@pytest.mark.parametrize("name,ok", [
    ("joe", True), ("joe.smith", True), ("a+b", True), ("x", False), ("vpasswd", False),
    (".qmail-x", False), ("joe@x", False), ("jo e", False), ("a:b", False), ("j" * 33, False),
])
def test_user_names(name, ok):
    assert (vp.valid_user_name(name) is None) == ok


@pytest.mark.parametrize("name,ok", [
    ("example.com", True), ("a-b.example", True), ("ab", False), ("-ab.com", False),
    ("ab.com-", False), ("a..com", False), ("ex_ample.com", False), ("x" * 97, False),
])
def test_domain_names(name, ok):
    assert (vp.valid_domain_name(name) is None) == ok
