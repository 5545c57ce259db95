"""control/smtproutes parsing and matching (spec §2, §7.1)."""
from __future__ import annotations

import pytest

from engine.delivery.remote import RemoteConfigError, load_remote_config
from engine.delivery.routes import Route, RoutesError, SmtpRoutes

TABLE = """\
# comment line
example.com:relay.example.net
port.example.com:relay2.example.net:2525
.sub.example.org:[192.0.2.7]
except.example.org:
:smarthost.example.net:587
"""


def test_exact_domain_default_port():
    routes = SmtpRoutes.from_text(TABLE)
    assert routes.lookup("example.com") == Route("relay.example.net", 25)


def test_port_given():
    assert SmtpRoutes.from_text(TABLE).lookup("port.example.com") == Route("relay2.example.net", 2525)


def test_suffix_matches_subdomains_only():
    routes = SmtpRoutes.from_text(TABLE)
    assert routes.lookup("a.sub.example.org") == Route("[192.0.2.7]", 25)
    assert routes.lookup("x.y.sub.example.org") == Route("[192.0.2.7]", 25)
    # ".sub.example.org" does not match sub.example.org itself: default route.
    assert routes.lookup("sub.example.org") == Route("smarthost.example.net", 587)


def test_default_route_and_empty_relay_exception():
    routes = SmtpRoutes.from_text(TABLE)
    assert routes.lookup("elsewhere.test") == Route("smarthost.example.net", 587)
    assert routes.lookup("except.example.org") is None   # empty relay: use MX


def test_no_default_route_means_mx():
    routes = SmtpRoutes.from_text("example.com:relay\n")
    assert routes.lookup("other.test") is None
    assert SmtpRoutes().lookup("example.com") is None


def test_case_insensitive_and_first_line_wins():
    routes = SmtpRoutes.from_text("Example.COM:first\nexample.com:second\n")
    assert routes.lookup("EXAMPLE.com") == Route("first", 25)


def test_longest_suffix_first():
    routes = SmtpRoutes.from_text(".com:tld\n.example.com:dom\n")
    assert routes.lookup("a.example.com") == Route("dom", 25)
    assert routes.lookup("a.other.com") == Route("tld", 25)


def test_bad_port_falls_back_to_25_and_junk_lines_ignored():
    routes = SmtpRoutes.from_text("a.test:relay:xyz\nb.test:relay:99999\nno-colon-line\n\n")
    assert routes.lookup("a.test") == Route("relay", 25)
    assert routes.lookup("b.test") == Route("relay", 25)
    assert routes.lookup("no-colon-line") is None


def test_trailing_space_and_crlf_stripped(tmp_path):
    (tmp_path / "smtproutes").write_bytes(b"a.test:relay.test:26  \r\n#x:y\n")
    routes = SmtpRoutes.load(tmp_path)
    assert routes.lookup("a.test") == Route("relay.test", 26)
    assert len(routes) == 1


def test_missing_file_is_empty(tmp_path):
    assert len(SmtpRoutes.load(tmp_path)) == 0


@pytest.mark.parametrize("line, why", [
    ("no-colon-line", "no ':' in 'no-colon-line'"),
    ("a.test:relay.test:26x26", "bad port '26x26'"),
    ("a.test:relay.test:99999", "bad port '99999'"),
    ("a.test:relay.test:0", "bad port '0'"),
])
def test_load_refuses_a_malformed_line_naming_file_and_line(tmp_path, line, why):
    # qmail ignores the first (the domain silently goes by MX) and reads the
    # others as 26, 25, 25: an operator's typo must not reroute mail quietly.
    (tmp_path / "smtproutes").write_text(f"# routes\ngood.test:relay.test\n\n{line}\n")
    with pytest.raises(RoutesError) as info:
        SmtpRoutes.load(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'smtproutes'} line 4: {why}")


def test_load_accepts_what_is_well_formed(tmp_path):
    (tmp_path / "smtproutes").write_text(TABLE + "b.test:relay.test:\n")
    routes = SmtpRoutes.load(tmp_path)
    assert routes == SmtpRoutes.from_text(TABLE + "b.test:relay.test:\n")
    assert routes != SmtpRoutes.from_text(TABLE)
    assert routes.lookup("b.test") == Route("relay.test", 25)


def test_ipv6_relay_in_brackets_with_and_without_port(tmp_path):
    text = "six.test:[2001:db8::25]:2525\nsix2.test:[IPv6:2001:db8::26]\n:[::1]\n"
    (tmp_path / "smtproutes").write_text(text)
    routes = SmtpRoutes.load(tmp_path)
    assert routes.lookup("six.test") == Route("[2001:db8::25]", 2525)
    assert routes.lookup("six2.test") == Route("[IPv6:2001:db8::26]", 25)
    assert routes.lookup("other.test") == Route("[::1]", 25)
    (tmp_path / "smtproutes").write_text("six.test:[2001:db8::25]:x\n")
    with pytest.raises(RoutesError, match="bad port 'x'"):
        SmtpRoutes.load(tmp_path)


def test_remote_config_refuses_a_bad_smtproutes_line(root):
    (root / "control" / "smtproutes").write_text("sink.test 127.0.0.1\n")
    with pytest.raises(RemoteConfigError) as info:
        load_remote_config(root)
    assert str(info.value) == (f"{root / 'control' / 'smtproutes'} line 1: no ':' in"
                               " 'sink.test 127.0.0.1' (a route is host:relay or host:relay:port)")


def test_remote_config_refuses_a_timeout_that_is_not_a_number(root):
    (root / "control" / "timeoutremote").write_text("20m\n")
    with pytest.raises(RemoteConfigError, match="timeoutremote line 1: '20m' is not a number"):
        load_remote_config(root)
