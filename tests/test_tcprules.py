"""tcprules text format (spec §4.1), cdb encoding, tcpserver's matching order (§4.2)."""
from __future__ import annotations

import errno
import os

import pytest
from click.testing import CliRunner

from engine.config.cdb import CdbFile
from engine.config.tcprules import (
    ALLOW_ALL, Rule, TcpRules, TcpRulesError, compile_rules, parse_rule_line,
)


def env(rule: Rule) -> dict:
    return dict(rule.env)


# -- parsing ---------------------------------------------------------------------

def test_allow_deny_and_variables():
    keys, rule = parse_rule_line('127.0.0.1:allow,RELAYCLIENT="",TCPLOCALHOST="movie.edu"')
    assert keys == ["127.0.0.1"]
    assert rule.allow is True
    assert env(rule) == {"RELAYCLIENT": "", "TCPLOCALHOST": "movie.edu"}
    keys, rule = parse_rule_line("10.:deny")
    assert keys == ["10."] and rule.allow is False and env(rule) == {}


def test_any_quote_character():
    _, rule = parse_rule_line("1.2.3.4:allow,RELAYCLIENT=//,RBLSMTPD='-go away',X=|a\"b|")
    assert env(rule) == {"RELAYCLIENT": "", "RBLSMTPD": "-go away", "X": 'a"b'}


def test_value_may_contain_commas_colons_and_equals():
    _, rule = parse_rule_line(':allow,RELAYCLIENT="@fix,me:x=y"')
    assert env(rule) == {"RELAYCLIENT": "@fix,me:x=y"}


def test_repeated_variable_last_wins():
    _, rule = parse_rule_line(':allow,A="1",A="2"')
    assert env(rule) == {"A": "2"}


def test_skipped_lines():
    assert parse_rule_line("") is None
    assert parse_rule_line("# 1.2.3.4:deny") is None
    assert parse_rule_line("no colon here") is None
    assert parse_rule_line("   ") is None


def test_trailing_whitespace_stripped():
    keys, rule = parse_rule_line("1.2.3.4:deny \t ")
    assert keys == ["1.2.3.4"] and rule.allow is False


@pytest.mark.parametrize("line", [
    "1.2.3.4:permit",
    "1.2.3.4:allowed",
    "1.2.3.4:allow,",
    "1.2.3.4:allow,X",
    "1.2.3.4:allow,X=",
    '1.2.3.4:allow,X="unterminated',
    '1.2.3.4:allow X="1"',
    "1.2.3.a-5:allow",
    "1.2.3.4-x:allow",
    "10.0.0.0/33:deny",           # a CIDR rule that is no network
    "2001:db8::/x:deny",
])
def test_parse_errors_use_tcprules_text(line):
    with pytest.raises(TcpRulesError) as info:
        parse_rule_line(line)
    assert str(info.value) == f"unable to parse this line: {line}"


def test_crlf_line_is_an_error_shown_escaped():
    with pytest.raises(TcpRulesError) as info:
        TcpRules.from_text("1.2.3.4:allow\r\n")
    assert str(info.value) == "unable to parse this line: 1.2.3.4:allow\\r"


def test_ranges_expand_like_tcprules():
    keys, _ = parse_rule_line("1.2.3.37-53:allow")
    assert keys == [f"1.2.3.{n}" for n in range(37, 54)]
    keys, _ = parse_rule_line("10.2-3.:allow")
    assert keys == ["10.2.", "10.3."]
    keys, _ = parse_rule_line("1.2.250-300.:allow")
    assert keys == [f"1.2.{n}." for n in range(250, 256)]  # top capped at 255
    keys, _ = parse_rule_line("1.2.3.9-5:allow")
    assert keys == []
    keys, _ = parse_rule_line("-2.:allow")
    assert keys == ["0.", "1.", "2."]
    keys, _ = parse_rule_line("1.2.3.007-0010:allow")
    assert keys == [f"1.2.3.{n}" for n in range(7, 11)]
    # bounds of any length (Python's int() refuses over 4300 digits)
    keys, _ = parse_rule_line("1.2.3.250-" + "9" * 5000 + ":allow")
    assert keys == [f"1.2.3.{n}" for n in range(250, 256)]
    keys, _ = parse_rule_line("1.2.3." + "9" * 5000 + "-5:allow")
    assert keys == []
    # no expansion for host names or info@ forms
    assert parse_rule_line("=a-b.example.com:allow")[0] == ["=a-b.example.com"]
    assert parse_rule_line("jo-e@1.2.3.4:allow")[0] == ["jo-e@1.2.3.4"]


def test_address_with_colons_ends_at_allow_or_deny():
    keys, rule = parse_rule_line('::1:allow,RELAYCLIENT=""')
    assert keys == ["::1"] and env(rule) == {"RELAYCLIENT": ""}


def test_first_rule_for_a_key_wins():
    rules = TcpRules.from_text("1.2.3.4:deny\n1.2.3.4:allow\n")
    assert rules.match("1.2.3.4").allow is False


# -- matching order (spec §4.2) ----------------------------------------------------------

def test_prefix_needs_trailing_dot():
    rules = TcpRules.from_text('127.0.0.:allow,RELAYCLIENT=""\n:deny\n')
    assert env(rules.match("127.0.0.1")) == {"RELAYCLIENT": ""}
    assert rules.match("127.0.0.10").allow is True
    assert rules.match("127.0.1.1").allow is False
    rules = TcpRules.from_text('127.0.0:allow,RELAYCLIENT=""\n:deny\n')
    assert rules.match("127.0.0.1").allow is False  # `127.0.0` is an exact key
    rules = TcpRules.from_text('127.0.0.10:allow,RELAYCLIENT=""\n:deny\n')
    assert rules.match("127.0.0.1").allow is False
    assert rules.match("127.0.0.10").allow is True
    assert rules.match("127.0.0.100").allow is False


def test_full_order():
    text = "\n".join([
        'joe@1.2.3.4:allow,K="info@ip"',
        'joe@=host.example.com:allow,K="info@=host"',
        '1.2.3.4:allow,K="ip"',
        '=host.example.com:allow,K="=host"',
        '1.2.3.:allow,K="1.2.3."',
        '1.2.:allow,K="1.2."',
        '1.:allow,K="1."',
        '=.example.com:allow,K="=.example.com"',
        '=.com:allow,K="=.com"',
        '=:allow,K="="',
        ':deny,K=""',
    ])
    rules = TcpRules.from_text(text)
    k = lambda *a, **kw: rules.match(*a, **kw).env["K"]  # noqa: E731
    assert k("1.2.3.4", "host.example.com", "joe") == "info@ip"
    assert k("1.2.3.5", "host.example.com", "joe") == "info@=host"
    assert k("1.2.3.4", "host.example.com", "ann") == "ip"
    assert k("1.2.3.4", "host.example.com") == "ip"
    assert k("1.2.3.5", "HOST.example.com") == "=host"   # names are lower-cased
    assert k("1.2.3.5", "other.example.com") == "1.2.3."
    assert k("1.2.4.5", "other.example.com") == "1.2."
    assert k("1.9.9.9") == "1."
    assert k("9.9.9.9", "x.y.example.com") == "=.example.com"
    assert k("9.9.9.9", "example.com") == "=.com"        # `=.example.com` is subdomains only
    assert k("9.9.9.9", "localhost") == "="
    assert k("9.9.9.9") == ""
    assert rules.match("9.9.9.9").allow is False
    # info@ keys need info; info@=host needs a host
    assert k("1.2.3.5", None, "joe") == "1.2.3."


def test_no_match_is_allow_without_env():
    rules = TcpRules.from_text("10.:deny\n")
    assert rules.match("192.0.2.1") == Rule(True, {})
    assert TcpRules({}).match("192.0.2.1") is ALLOW_ALL


def test_deny_rule_keeps_env():
    rules = TcpRules.from_text(':deny,RBLSMTPD="-no"\n')
    rule = rules.match("1.1.1.1")
    assert rule.allow is False and env(rule) == {"RBLSMTPD": "-no"}


def test_rule_is_immutable():
    rule = TcpRules.from_text(':allow,X="1"\n').match("1.1.1.1")
    with pytest.raises(TypeError):
        rule.env["X"] = "2"  # type: ignore[index]


# -- files and cdb --------------------------------------------------------------------

RULES_TEXT = """\
# loopback relays
127.0.0.1:allow,RELAYCLIENT=""
10.2-3.:allow,RELAYCLIENT="@relay.example"
192.0.2.37-39:deny
=.trusted.example:allow,RBLSMTPD=""
:allow
"""


def test_cdb_encoding_is_tcprules_format(tmp_path):
    cdb_path = tmp_path / "tcp.smtp.cdb"
    assert compile_rules(RULES_TEXT, cdb_path) == 1 + 2 + 3 + 1 + 1
    cdb = CdbFile.open(cdb_path)
    assert cdb.get(b"127.0.0.1") == b"+RELAYCLIENT=\0"
    assert cdb.get(b"10.3.") == b"+RELAYCLIENT=@relay.example\0"
    assert cdb.get(b"192.0.2.38") == b"D\0"
    assert cdb.get(b"") == b""
    assert Rule(False, {"A": "1", "B": ""}).encode() == b"D\0+A=1\0+B=\0"
    assert Rule.decode(b"D\0+A=1\0+B=\0junk-without-nul") == Rule(False, {"A": "1", "B": ""})


def test_cdb_and_text_match_the_same(tmp_path):
    compile_rules(RULES_TEXT, tmp_path / "tcp.smtp.cdb")
    from_cdb = TcpRules.load(tmp_path)
    from_text = TcpRules.from_text(RULES_TEXT)
    for ip, host in [("127.0.0.1", None), ("10.2.9.9", None), ("10.4.0.1", None),
                     ("192.0.2.38", None), ("192.0.2.40", None), ("8.8.8.8", "a.trusted.example")]:
        assert from_cdb.match(ip, host) == from_text.match(ip, host), ip


def test_cdb_keys_with_one_value_share_one_rule(tmp_path, monkeypatch):
    """100,000 keys of a tcp.smtp.cdb hold a few distinct values: each is
    decoded once (a Rule per key took 240 bytes and 1.2 us more per key, in
    every receiver at every reload)."""
    compile_rules("".join(f'10.0.{i}.:allow,RELAYCLIENT=""\n11.0.{i}.:deny\n' for i in range(50))
                  + "10.1.0-99.:deny\n:allow\n", tmp_path / "tcp.smtp.cdb")
    decoded = []
    real = Rule.decode.__func__
    monkeypatch.setattr(Rule, "decode", classmethod(lambda cls, data: decoded.append(data)
                                                    or real(cls, data)))
    rules = TcpRules.load(tmp_path)
    assert len(rules) == 201 and sorted(decoded) == [b"", b"+RELAYCLIENT=\0", b"D\0"]
    assert rules.match("10.0.7.1") is rules.match("10.0.49.2")
    assert env(rules.match("10.0.7.1")) == {"RELAYCLIENT": ""}
    assert not rules.match("10.1.5.1").allow and not rules.match("11.0.3.3").allow


def test_load_prefers_cdb_then_text_then_allow_all(tmp_path):
    assert TcpRules.load(tmp_path).match("1.2.3.4") == Rule(True, {})
    (tmp_path / "tcp.smtp").write_text("1.2.3.4:deny\n")
    assert TcpRules.load(tmp_path).match("1.2.3.4").allow is False
    compile_rules('1.2.3.4:allow,RELAYCLIENT=""\n', tmp_path / "tcp.smtp.cdb")
    assert env(TcpRules.load(tmp_path).match("1.2.3.4")) == {"RELAYCLIENT": ""}


def test_load_errors(tmp_path):
    (tmp_path / "tcp.smtp").write_text("1.2.3.4:maybe\n")
    with pytest.raises(TcpRulesError, match="unable to parse this line: 1.2.3.4:maybe"):
        TcpRules.load(tmp_path)
    (tmp_path / "tcp.smtp.cdb").write_bytes(b"short")
    with pytest.raises(TcpRulesError, match="truncated"):
        TcpRules.load(tmp_path)


def test_compile_parse_error_leaves_old_cdb(tmp_path):
    cdb_path = tmp_path / "tcp.smtp.cdb"
    compile_rules(":allow\n", cdb_path)
    before = cdb_path.read_bytes()
    with pytest.raises(TcpRulesError):
        compile_rules(":allow\n1.2.3.4:nope\n", cdb_path)
    assert cdb_path.read_bytes() == before


def test_ipv4_mapped_client_matches_ipv4_rules():
    rules = TcpRules.from_text('127.:allow,RELAYCLIENT=""\n:deny\n')
    assert dict(rules.match("::ffff:127.0.0.1").env) == {"RELAYCLIENT": ""}
    assert rules.match("::FFFF:10.0.0.1").allow is False
    assert rules.match("::1").allow is False


def test_ipv6_prefix_rules_end_at_a_colon(tmp_path):
    # The IPv6 tcpserver walks a client's address back to each '.' and ':';
    # `2001:db8:1::deny` is the key `2001:db8:1:`, a prefix.
    text = ("2001:db8:1::deny\n"
            'fe80::allow,X="link-local"\n'
            '2001:db8:1:2::/64:allow,X="cidr /64"\n'
            '2001:db8::/32:allow,X="cidr /32"\n'
            ":allow\n")
    compile_rules(text, tmp_path / "tcp.smtp.cdb")
    for rules in (TcpRules.from_text(text), TcpRules.load(tmp_path)):
        def said(ip):
            rule = rules.match(ip)
            return rule.allow, dict(rule.env)
        assert said("2001:db8:1::5") == (False, {})
        assert said("2001:db8:1:7::5") == (False, {})            # /48 beats the /32
        assert said("2001:db8:1:2::5") == (True, {"X": "cidr /64"})  # /64 beats the /48
        assert said("2001:db8:2::5") == (True, {"X": "cidr /32"})
        assert said("fe80::1") == (True, {"X": "link-local"})
        assert said("2001:db9::1") == (True, {})


def test_ipv6_address_rules_in_any_spelling_match(tmp_path):
    # A client's address comes in one spelling (lower case, `::` for the
    # longest zero run); ucspi-tcp6's tcprules reads a rule's address the same
    # whatever its spelling. Kept as written, `2001:DB8::BAD:deny` never matched.
    text = ("2001:DB8::BAD:deny\n"
            '2001:0db8:0:0:0:0:0:1:allow,X="one"\n'
            'joe@2001:DB8::2:allow,X="joe"\n'
            "2001:db8:1:2::/64:deny\n"
            ":allow\n")
    compile_rules(text, tmp_path / "tcp.smtp.cdb")
    assert CdbFile.open(tmp_path / "tcp.smtp.cdb").get(b"2001:db8::bad") == b"D\0"
    for rules in (TcpRules.from_text(text), TcpRules.load(tmp_path)):
        assert rules.match("2001:db8::bad").allow is False
        assert dict(rules.match("2001:db8::1").env) == {"X": "one"}
        assert dict(rules.match("2001:db8::2", info="joe").env) == {"X": "joe"}
        assert rules.match("2001:db8:1:2::5").allow is False
        assert rules.match("2001:db8::3") == Rule(True, {})
    assert TcpRules.from_text("a:\udcff:deny\n").match("::1").allow is True  # no address: as written
    # A cdb compiled by ucspi-tcp6's tcprules holds the address written out in full.
    compile_rules("", tmp_path / "tcp.smtp.cdb")
    from engine.config.cdb import write_cdb
    write_cdb(tmp_path / "tcp.smtp.cdb",
              [(b"2001:0DB8:0000:0000:0000:0000:0000:0BAD", b"D\0"), (b"", b"")])
    assert TcpRules.load(tmp_path).match("2001:db8::bad").allow is False


@pytest.mark.parametrize("key", [b"_00001010\0", b"_0000a0b0", b"^" + b"0" * 32])
def test_a_cdb_with_cidr_rules_compiled_by_ucspi_tcp6_is_refused(tmp_path, key):
    """ucspi-tcp6's tcprules stores `10.0.0.0/8:deny` as a key of bits
    (`_...` for IPv4, `^...` for IPv6) that only its tcpserver looks up:
    read as it was, the deny silently let 10/8 in."""
    from engine.config.cdb import write_cdb
    write_cdb(tmp_path / "tcp.smtp.cdb", [(key, b"D\0"), (b"", b"")])
    with pytest.raises(TcpRulesError, match="ucspi-tcp6's tcprules.*qrelay tcprules"):
        TcpRules.load(tmp_path)


def test_cidr_rules_of_ucspi_tcp6_and_the_longest_prefix_wins(tmp_path):
    text = ("10.0.0.0/8:deny\n"
            '10.1.0.0/16:allow,RELAYCLIENT=""\n'
            '10.1.2.:allow,X="dotted /24"\n'
            '192.168.:allow,X="dotted /16"\n'
            '192.168.1.0/24:allow,X="cidr /24"\n'
            "2001:db8::/32:deny\n"
            '2001:db8:1::/48:allow,RELAYCLIENT=""\n'
            ":allow\n")
    compile_rules(text, tmp_path / "tcp.smtp.cdb")
    for rules in (TcpRules.from_text(text), TcpRules.load(tmp_path)):
        def said(ip):
            rule = rules.match(ip)
            return rule.allow, dict(rule.env)
        assert said("10.9.9.9") == (False, {})                    # a deny by CIDR
        assert said("10.1.9.9") == (True, {"RELAYCLIENT": ""})
        assert said("10.1.2.3") == (True, {"X": "dotted /24"})    # longer than /16
        assert said("::ffff:10.1.2.3") == (True, {"X": "dotted /24"})
        assert said("192.168.1.5") == (True, {"X": "cidr /24"})   # longer than 192.168.
        assert said("192.168.2.5") == (True, {"X": "dotted /16"})
        assert said("2001:db8:0:1::5") == (False, {})
        assert said("2001:db8:1::5") == (True, {"RELAYCLIENT": ""})
        assert said("2001:db9::1") == (True, {})
        assert said("8.8.8.8") == (True, {})


def test_cli_tcprules_and_newmrh(root, qrelay_cli):
    control = root / "control"
    (control / "tcp.smtp").write_text('127.0.0.:allow,RELAYCLIENT=""\n10.0-1.:deny\n:allow\n')
    result = qrelay_cli("tcprules", str(root))
    assert result.returncode == 0, result.stderr
    assert "4 keys" in result.stdout
    assert TcpRules.load(control).match("10.1.2.3").allow is False
    (control / "morercpthosts").write_text("More.Test\n")
    result = qrelay_cli("newmrh", str(root))
    assert result.returncode == 0, result.stderr
    assert CdbFile.open(control / "morercpthosts.cdb").get(b"more.test") == b""
    (control / "tcp.smtp").write_text("1.2.3.4:allow,oops\n")
    result = qrelay_cli("tcprules", str(root))
    assert result.returncode == 1
    assert result.stderr.strip().endswith("unable to parse this line: 1.2.3.4:allow,oops")
    assert "Traceback" not in result.stderr
    assert TcpRules.load(control).match("10.1.2.3").allow is False  # old cdb kept
    (control / "morercpthosts").unlink()
    result = qrelay_cli("newmrh", str(root))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_cli_tcprules_on_a_full_disk_names_the_file_and_keeps_the_old_cdb(root, monkeypatch):
    """The line was `Error: [Errno 28] No space left on device`: no file named."""
    from engine.cli import cli
    control = root / "control"
    (control / "tcp.smtp").write_text(":allow\n")
    assert CliRunner().invoke(cli, ["tcprules", str(root)]).exit_code == 0
    old = (control / "tcp.smtp.cdb").read_bytes()
    (control / "tcp.smtp").write_text("10.:deny\n:allow\n")
    real = os.write

    def write(fd, data):
        if "tcp.smtp.cdb" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    monkeypatch.setattr(os, "write", write)
    result = CliRunner().invoke(cli, ["tcprules", str(root)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {control / 'tcp.smtp.cdb'}: No space left on device\n"
    assert (control / "tcp.smtp.cdb").read_bytes() == old
    assert sorted(p.name for p in control.iterdir() if ".tmp." in p.name) == []


def test_cli_newmrh_beside_a_domain_add_loses_neither(root, monkeypatch):
    """As newu: `domain add` past rcpthosts' 50 lines appends to morercpthosts
    and compiles it under users/assign.lock; a `qrelay newmrh` that read the
    file before must not replace that cdb with one without the new domain."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from click.testing import CliRunner

    from engine.cli import cli
    from engine.config import cdb
    from tests.conftest import REPO
    control = root / "control"
    (control / "rcpthosts").write_text("".join(f"d{i}.test\n" for i in range(50)))
    (control / "morercpthosts").write_text("more.test\n")
    lock = root / "users" / "assign.lock"
    lock.touch()
    ino = f":{os.stat(lock).st_ino} "
    build, adding = cdb.build_cdb, []

    def waiting_for_the_lock() -> bool:
        return any("->" in line and ino in line
                   for line in Path("/proc/locks").read_text().splitlines())

    def build_while_a_domain_is_added(records):
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "domain", "add", str(root),
                                 "new.test", "--uid", "89", "--gid", "89"],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        adding.append(proc)
        deadline = time.monotonic() + 60
        while proc.poll() is None and not waiting_for_the_lock() and time.monotonic() < deadline:
            os.sched_yield()      # until it is done, or waits for our lock
        return build(records)
    monkeypatch.setattr(cdb, "build_cdb", build_while_a_domain_is_added)
    assert CliRunner().invoke(cli, ["newmrh", str(root)]).exit_code == 0
    assert adding[0].wait(60) == 0
    assert CdbFile.open(control / "morercpthosts.cdb").get(b"new.test") == b""


def test_cli_newmrh_unreadable_source_is_one_line(root, qrelay_cli):
    # A file that exists but cannot be read (EACCES for an operator who is not
    # root; /proc/self/mem gives EIO to anyone): an error line, no traceback.
    control = root / "control"
    (control / "morercpthosts").symlink_to("/proc/self/mem")
    result = qrelay_cli("newmrh", str(root))
    assert result.returncode == 1
    assert result.stderr == (f"Error: unable to read {control / 'morercpthosts'}:"
                             " Input/output error\n")
    assert not (control / "morercpthosts.cdb").exists()


def test_cli_tcprules_makes_a_running_qrelay_use_the_new_rules_at_once(root, dns):
    """tcpserver reads tcp.smtp.cdb at every connection, so a rule compiled by
    tcprules holds for the next client; `qrelay tcprules` HUPs the running
    `qrelay run` for the same (its poll alone took up to two settle periods;
    an hour here, so only the HUP can have done it)."""
    import smtplib

    from engine.cli import cli
    from tests.smtp_harness import QrelayProcess
    from tests.test_delivery_e2e import wait_for
    (root / "qrelay.toml").write_text(f'[smtp]\nreload_poll_seconds = 3600\n'
                                      f'[delivery]\ndns_servers = ["{dns.address}"]\n')
    control = root / "control"
    (control / "tcp.smtp").write_text("127.0.0.1:allow\n")
    assert CliRunner().invoke(cli, ["tcprules", str(root)]).exit_code == 0
    q = QrelayProcess(root, procs=1)
    try:
        def greeting() -> int:
            try:
                with smtplib.SMTP("127.0.0.1", q.port, timeout=10) as s:
                    return s.noop()[0]
            except smtplib.SMTPServerDisconnected:
                return 0        # tcpserver's deny: closed before any greeting
        assert greeting() == 250
        (control / "tcp.smtp").write_text("127.0.0.1:deny\n")
        assert CliRunner().invoke(cli, ["tcprules", str(root)]).exit_code == 0
        wait_for(lambda: greeting() == 0, what="127.0.0.1 denied after tcprules")
    finally:
        q.stop()
        q.proc.stderr.close()
