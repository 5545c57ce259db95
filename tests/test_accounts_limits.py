"""engine/accounts/limits.py: vpopmail's domain limits as vlimits.c reads them,
their flags at login (Accounts.mailbox) and the default quota of new users."""
from __future__ import annotations

import os

import pytest

from engine.accounts.limits import NONE, limits_paths, parse_limits, read_limits
from engine.accounts.store import Accounts
from engine.accounts.vpasswd import (NO_IMAP, NO_POP, NO_RELAY, NO_SMTP, NO_WEBMAIL,
                                     V_OVERRIDE)
from tests.test_accounts_cli import qrelay
from tests.test_accounts_store import Clock, box, write_domain  # noqa: F401  (box: fixture)


def test_parse_as_vlimits_c():
    # qmailadmin's own output (vlimits_write_limits_file), with `:` separators
    text = ("maxpopaccounts: -1\nmaxaliases: 20\nquota: 100\nmaxmsgcount: 0\n"
            "default_quota: 52428800\ndefault_maxmsgcount: 1000\ndisable_pop\n"
            "disable_external_relay\nperm_account: 0\n")
    got = parse_limits(text, "f")
    assert (got.flags, got.default_quota, got.default_maxmsgcount, got.source) == (
        NO_POP | NO_RELAY, 52428800, 1000, "f")
    # space or tab separators, CR line ends, comments; the name alone sets a flag
    got = parse_limits("# plan B\r\ndisable_smtp 0\r\ndisable_imap\tyes\rdisable_webmail:\r"
                       "default_quota 10x\n#disable_pop\n")
    assert got.flags == NO_SMTP | NO_IMAP | NO_WEBMAIL and got.default_quota == 10
    assert parse_limits("") == NONE
    assert parse_limits("default_quota: -5\nbogus_key 1\n").default_quota == 0


def test_paths_and_the_global_default(tmp_path):
    dom = tmp_path / "vpopmail" / "domains" / "example.com"
    dom.mkdir(parents=True)
    assert limits_paths(str(dom)) == (str(dom / ".qmailadmin-limits"),
                                      str(tmp_path / "vpopmail" / "etc" / "vlimits.default"))
    assert limits_paths("/srv/mail/example.com")[1] is None
    assert limits_paths("/home/vpopmail/domains/0/example.com")[1] == \
        "/home/vpopmail/etc/vlimits.default"                       # a hashed domain directory
    assert read_limits(str(dom)) == NONE
    (tmp_path / "vpopmail" / "etc").mkdir()
    (tmp_path / "vpopmail" / "etc" / "vlimits.default").write_text("disable_smtp\n")
    assert read_limits(str(dom)).flags == NO_SMTP                  # the global file
    (dom / ".qmailadmin-limits").write_text("disable_pop\n")
    assert read_limits(str(dom)).flags == NO_POP                   # the domain's wins, whole


def test_login_flags_carry_the_domain_limits(box):
    clock = Clock()
    accounts = Accounts(box["root"], recheck_seconds=1.0, clock=clock)
    dom = box["dom"]
    assert not accounts.mailbox("joe@example.com").user.no_pop
    (dom / ".qmailadmin-limits").write_text("disable_pop\ndisable_external_relay\n")
    clock.now += 1.0
    joe = accounts.mailbox("joe@example.com").user
    assert joe.no_pop and joe.no_relay and not joe.no_smtp
    write_domain(dom, [f"joe:$6$x$y:1:{V_OVERRIDE}:Joe:{dom}/joe:NOQUOTA"])
    clock.now += 1.0
    assert not accounts.mailbox("joe@example.com").user.no_pop      # V_OVERRIDE
    (dom / ".qmailadmin-limits").chmod(0)
    if os.geteuid() != 0:                                           # root reads it anyway
        from engine.accounts.store import AccountsError
        clock.now += 1.0
        with pytest.raises(AccountsError, match="qmailadmin-limits"):
            accounts.mailbox("joe@example.com")


def test_new_users_get_the_default_quota(root):
    assert qrelay("domain", "add", str(root), "example.com", "--uid", "89", "--gid", "89").exit_code == 0
    dom = root / "domains" / "example.com"
    (dom / ".qmailadmin-limits").write_text("default_quota: 52428800\ndefault_maxmsgcount: 1000\n")
    assert qrelay("user", "add", str(root), "joe@example.com", input="pw\n").output.endswith(
        "quota 52428800S,1000C)\n")
    assert qrelay("user", "add", str(root), "ann@example.com", "--quota", "1MB",
                  input="pw\n").exit_code == 0
    assert qrelay("user", "import", str(root), "-",
                  input="bob@example.com:pw\ncy@example.com:pw:NOQUOTA\n").exit_code == 0
    quotas = {line.split(":")[0]: line.split(":")[6]
              for line in (dom / "vpasswd").read_text().splitlines()}
    assert quotas == {"joe": "52428800S,1000C", "ann": "1048576S", "bob": "52428800S,1000C",
                      "cy": "NOQUOTA"}


def test_user_show_names_the_flags_limits_add(root):
    qrelay("domain", "add", str(root), "example.com", "--uid", "89", "--gid", "89")
    dom = root / "domains" / "example.com"
    (dom / ".qmailadmin-limits").write_text("disable_pop\ndisable_smtp\n")
    qrelay("user", "add", str(root), "joe@example.com", input="pw\n")
    qrelay("user", "mod", str(root), "joe@example.com", "--no-pop")
    out = qrelay("user", "show", str(root), "joe@example.com").output
    assert "flags:     no_pop (gid 2)\n" in out
    assert f"limits:    no_smtp ({dom / '.qmailadmin-limits'}; added at login)\n" in out
