"""users/assign, users/cdb and qmail-lspawn's lookup (spec QB §3.1–3.3), on real files."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.accounts.assign import (
    Assign, AssignError, Assignment, compile_assign, load_assign, parse_assign_text,
)
from engine.config.cdb import CdbFile

QMAIL_EXAMPLE = (
    "+:alias:7790:2108:/var/qmail/alias:-::\n"
    "+joe-:joe:507:100:/home/joe:-::\n"
    "=joe:joe:507:100:/home/joe:::\n"
    "+example.com-:example.com:89:89:/home/vpopmail/domains/example.com:-::\n"
    ".\n"
)


def write_assign(root: Path, text: str) -> None:
    (root / "users").mkdir(parents=True, exist_ok=True)
    (root / "users" / "assign").write_text(text)


@pytest.fixture
def table() -> Assign:
    return Assign.from_lines(parse_assign_text(QMAIL_EXAMPLE))


def test_exact_beats_wildcards(table):
    assert table.lookup("joe") == Assignment("joe", 507, 100, "/home/joe", "", "")
    assert table.lookup("JoE") == Assignment("joe", 507, 100, "/home/joe", "", "")


def test_longest_wildcard_prefix_wins_and_ext_keeps_case(table):
    assert table.lookup("joe-Foo") == Assignment("joe", 507, 100, "/home/joe", "-", "Foo")
    vpop = table.lookup("example.com-Joe.Smith")
    assert vpop == Assignment("example.com", 89, 89, "/home/vpopmail/domains/example.com", "-", "Joe.Smith")
    assert table.lookup("EXAMPLE.COM-joe").ext == "joe"


def test_catch_all_takes_the_rest(table):
    assert table.lookup("bob") == Assignment("alias", 7790, 2108, "/var/qmail/alias", "-", "bob")
    # `joex` is not `joe-` + something: the catch-all gets all of it
    assert table.lookup("joex").user == "alias"


def test_empty_local_part_is_none(table):
    assert table.lookup("") is None


def test_no_catch_all_no_hit():
    t = Assign.from_lines(parse_assign_text("+joe-:joe:507:100:/home/joe:-::\n.\n"))
    assert t.lookup("bob") is None
    assert t.lookup("joe") is None  # `joe` alone does not start with `joe-`
    assert t.lookup("joe-").ext == ""


def test_wildcard_pre_field_is_prepended():
    t = Assign.from_lines(parse_assign_text("+list-:lists:600:600:/home/lists:-:ml-:\n.\n"))
    assert t.lookup("list-Owner").ext == "ml-Owner"


def test_duplicate_key_first_line_wins():
    t = Assign.from_lines(parse_assign_text("=a:first:1:1:/one:::\n=A:second:2:2:/two:::\n.\n"))
    assert t.lookup("a").user == "first"


def test_wildchars_skip_prefixes_that_no_line_ends_with():
    # Prefix `ab` ends in b; a local part `abc` may match `ab`, never `a` (no line).
    t = Assign.from_lines(parse_assign_text("+ab:u:1:1:/h:-::\n.\n"))
    assert t.lookup("abc").ext == "c"
    assert t.lookup("ab").ext == ""
    assert t.lookup("a") is None


def test_a_long_local_part_tries_no_prefix_longer_than_the_keys(table):
    """An RCPT of 880 bytes (parse_path takes 900), a dash every other one,
    at a vpopmail domain: the prefixes longer than the longest `+` key are
    never tried (each was a slice and a hash: the square of its length)."""
    local = "example.com-" + "a-" * 440

    class Probes(dict):
        def get(self, key, default=None):
            probed.append(key)
            return super().get(key, default)

    probed: list[str] = []
    table._wild = Probes(table._wild)
    found = table.lookup(local)
    assert found.home == "/home/vpopmail/domains/example.com" and found.ext == "a-" * 440
    assert probed == ["example.com-"]
    assert table.lookup("joe-" + "x-" * 440).ext == "x-" * 440
    assert max(map(len, probed)) <= len("example.com-")


@pytest.mark.parametrize("text", [
    "=joe:joe:507:100:/home/joe:::\n",               # no `.` line
    "=joe:joe:507:100:/home/joe::\n.\n",             # only 5 more colons
    ":joe:507:100:/home/joe:::\n.\n",                # empty key
    "=joe\n.\n",                                     # no colon
    "=jo\0e:joe:507:100:/home/joe:::\n.\n",          # NUL
])
def test_bad_format(text):
    with pytest.raises(AssignError, match="bad format"):
        parse_assign_text(text)


def test_text_after_end_line_is_ignored():
    assert len(parse_assign_text("=a:u:1:1:/h:::\n.\ngarbage\n")) == 1


def test_newu_writes_qmails_exact_records(tmp_path):
    write_assign(tmp_path, QMAIL_EXAMPLE)
    assert compile_assign(tmp_path) == 4
    cdb = CdbFile.open(tmp_path / "users" / "cdb")
    assert list(cdb.items()) == [
        (b"!", b"alias\x007790\x002108\x00/var/qmail/alias\x00-\x00"),
        (b"!joe-", b"joe\x00507\x00100\x00/home/joe\x00-\x00"),
        (b"!joe\x00", b"joe\x00507\x00100\x00/home/joe\x00\x00"),
        (b"!example.com-", b"example.com\x0089\x0089\x00/home/vpopmail/domains/example.com\x00-\x00"),
        (b"", b"-"),  # wildchars: `+:` adds nothing, both other prefixes end in `-`
    ]
    assert not list((tmp_path / "users").glob("*.tmp*"))


def test_newu_keeps_upper_case_last_char_as_qmail_does(tmp_path):
    # qmail-newu records the prefix's last byte as written; qmail-lspawn compares
    # the lower-cased address against it, so `+BoX` can never match: kept.
    write_assign(tmp_path, "+BoX:u:1:1:/h:-::\n+Joe-:j:2:2:/j:-::\n.\n")
    compile_assign(tmp_path)
    cdb = CdbFile.open(tmp_path / "users" / "cdb")
    assert cdb.get(b"") == b"X-"
    assert cdb.get(b"!box") is not None  # keys are lower-cased
    table = load_assign(tmp_path)
    assert table.lookup("boxy") is None
    assert table.lookup("JOE-a").user == "j"


def test_newu_bad_format_leaves_cdb_unchanged(tmp_path):
    write_assign(tmp_path, QMAIL_EXAMPLE)
    compile_assign(tmp_path)
    before = (tmp_path / "users" / "cdb").read_bytes()
    write_assign(tmp_path, "=joe:joe:507\n.\n")
    with pytest.raises(AssignError):
        compile_assign(tmp_path)
    assert (tmp_path / "users" / "cdb").read_bytes() == before


def test_cdb_is_what_qmail_reads_when_both_exist(tmp_path):
    write_assign(tmp_path, "=joe:joe:507:100:/home/joe:::\n.\n")
    compile_assign(tmp_path)
    write_assign(tmp_path, "=joe:other:1:1:/other:::\n.\n")  # edited, not compiled
    assert load_assign(tmp_path).lookup("joe").user == "joe"
    (tmp_path / "users" / "cdb").unlink()
    assert load_assign(tmp_path).lookup("joe").user == "other"


def test_cdb_and_text_give_the_same_answers(tmp_path):
    write_assign(tmp_path, QMAIL_EXAMPLE)
    text_table = load_assign(tmp_path)
    compile_assign(tmp_path)
    cdb_table = load_assign(tmp_path)
    for local in ("joe", "Joe-x", "joe-a-b", "example.com-Bob", "x", "example.com-", "exam"):
        assert text_table.lookup(local) == cdb_table.lookup(local), local


def test_missing_files_mean_an_empty_table(tmp_path):
    assert load_assign(tmp_path).lookup("joe") is None


def test_corrupt_cdb_is_an_error(tmp_path):
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "cdb").write_bytes(b"short")
    with pytest.raises(AssignError):
        load_assign(tmp_path)


def test_uid_gid_as_scan_ulong():
    t = Assign.from_lines(parse_assign_text("=a:u:12x:abc:/h:::\n.\n"))
    assert (t.lookup("a").uid, t.lookup("a").gid) == (12, 0)
