"""Relay policy: rcpthosts (+ .suffix, morercpthosts.cdb), badmailfrom, anti-relay tricks."""
from __future__ import annotations

import struct

import pytest

from engine.config.cdb import CdbError, CdbFile, build_cdb, newmrh, write_cdb
from engine.smtp.policy import (
    BADMAILFROM_REFUSED, RCPTHOSTS_REFUSED, SYNTAX_ERROR, RecipientPolicy, rewrite_local_ip_literal,
    plain_address, split_address, unquote_address,
)

RELAY_553 = "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"


@pytest.fixture
def control(tmp_path):
    (tmp_path / "rcpthosts").write_text("local.test\n.sub.test\n# comment\nMixed.Case.TEST\n")
    (tmp_path / "morercpthosts").write_text("more.test\n.moresub.test\n")
    newmrh(tmp_path)
    (tmp_path / "badmailfrom").write_text("spammer@bad.test\n@evil.test\n")
    return tmp_path


@pytest.fixture
def policy(control):
    return RecipientPolicy.load(control)


def test_reply_texts_are_qmails():
    assert RCPTHOSTS_REFUSED == RELAY_553
    assert BADMAILFROM_REFUSED == "553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)"
    assert SYNTAX_ERROR == "555 syntax error (#5.5.4)"


# -- rcpthosts ----------------------------------------------------------------------------

@pytest.mark.parametrize("rcpt", [
    "user@local.test",
    "User@LOCAL.Test",
    "user@mixed.case.test",
    "user@a.sub.test",
    "user@a.b.sub.test",
    "user@more.test",
    "user@x.moresub.test",
    "user@MORE.TEST",
    "postmaster",             # @-less: qmail qualifies it with envnoathost later
    "@local.test",            # empty local part: qmail accepts it too
    '"john smith"@local.test',
    "john\\ smith@local.test",
    "user+tag@local.test",
])
def test_allowed_recipients(policy, rcpt):
    assert policy.check_rcpt(rcpt, None) is None


@pytest.mark.parametrize("rcpt", [
    "user@foreign.test",
    "user@sub.test",               # `.sub.test` is subdomains only
    "user@moresub.test",
    "user@local.test.evil",
    "user@notlocal.test",
    "user@xlocal.test",
    # the relay tricks of issue #4
    "user%foreign.test@local.test",
    "user%foreign.test@LOCAL.TEST",
    "foreign.test!user@local.test",
    '"user@foreign.test"@local.test',
    '"user%foreign.test"@local.test',
    "user\\@foreign.test@local.test",
    "user@foreign.test@local.test",
    "user@foreign.test",           # what `@local.test:user@foreign.test` is after parse_path
    "@local.test:user@foreign.test",  # in case a source route arrives unstripped
    "user@[1.2.3.4]",
    "user@[127.0.0.1]",
    "user@local.test.",            # trailing dot
    "user@LOCAL.TEST.",
    "user@local.test..",
    "user@.local.test",
    "user@a..sub.test",
    "user@",                       # empty domain
    "",                            # <> as a recipient
    "user@local.test ",
    "user@local.test,foreign.test",
    "user@local.test>",
    "user%foreign.test",           # @-less but not plain
    "foreign.test!user",
    '"user@foreign.test"',
    "user\\@foreign.test",
    "user@\u212a.test",            # Kelvin sign: Unicode lower() would make it k.test
])
def test_refused_for_non_relay_client(rcpt, control):
    (control / "rcpthosts").write_text("local.test\n.sub.test\nk.test\n")
    policy = RecipientPolicy.load(control)
    assert policy.check_rcpt(rcpt, None) == RELAY_553


@pytest.mark.parametrize("rcpt", [
    "user%foreign.test@local.test",
    "foreign.test!user@local.test",
    '"user@foreign.test"@local.test',
    "user@foreign.test@local.test",
    "user@foreign.test",
    "user@[1.2.3.4]",
    "user@local.test.",
    "USER@FOREIGN.TEST",
    "joe",
])
@pytest.mark.parametrize("relayclient", ["", "@fixme"])
def test_relay_client_accepted_and_value_appended(policy, rcpt, relayclient):
    assert policy.check_rcpt(rcpt, relayclient) is None
    assert policy.final_rcpt(rcpt, relayclient) == rcpt + relayclient


def test_final_rcpt_without_relayclient_is_unchanged(policy):
    assert policy.final_rcpt("user@local.test", None) == "user@local.test"
    assert policy.final_rcpt("joe", "@fixme") == "joe@fixme"


@pytest.mark.parametrize("rcpt", ["a\0b@local.test", "a@local.test\r\nRCPT TO:<x@y>", "a\n@local.test"])
def test_nul_cr_lf_are_syntax_errors_for_everyone(policy, rcpt):
    assert policy.check_rcpt(rcpt, None) == SYNTAX_ERROR
    assert policy.check_rcpt(rcpt, "") == SYNTAX_ERROR


def test_undecodable_bytes_compare_exactly(tmp_path):
    raw_domain = b"caf\xe9.test".decode("utf-8", "surrogateescape")
    (tmp_path / "rcpthosts").write_bytes(b"caf\xe9.test\n")
    policy = RecipientPolicy.load(tmp_path)
    assert policy.check_rcpt("u@" + raw_domain, None) is None
    assert policy.check_rcpt("u@CAF" + raw_domain[3:], None) is None
    assert policy.check_rcpt("u@café.test", None) == RELAY_553


def test_morercpthosts_cdb_only_and_text_ignored(tmp_path):
    (tmp_path / "rcpthosts").write_text("local.test\n")
    (tmp_path / "morercpthosts").write_text("text-only.test\n")  # not compiled: qmail ignores it
    policy = RecipientPolicy.load(tmp_path)
    assert policy.check_rcpt("u@text-only.test", None) == RELAY_553
    write_cdb(tmp_path / "morercpthosts.cdb", [(b"cdb.test", b""), (b".cdbsub.test", b"")])
    policy = RecipientPolicy.load(tmp_path)
    assert policy.check_rcpt("u@cdb.test", None) is None
    assert policy.check_rcpt("u@x.cdbsub.test", None) is None
    assert policy.check_rcpt("u@cdbsub.test", None) == RELAY_553


def test_corrupt_morercpthosts_cdb_is_refused_at_load_not_at_rcpt(tmp_path):
    # A record length past the end of the file: only a lookup of that key
    # reached it, and the exception killed the SMTP session at RCPT.
    (tmp_path / "rcpthosts").write_text("local.test\n")
    data = bytearray(build_cdb([(b"cdb.test", b"")]))
    struct.pack_into("<I", data, 2048, 0xFFFFFFFF)
    (tmp_path / "morercpthosts.cdb").write_bytes(bytes(data))
    with pytest.raises(CdbError, match="morercpthosts.cdb: corrupt cdb"):
        RecipientPolicy.load(tmp_path)


def test_many_morercpthosts(tmp_path):
    (tmp_path / "rcpthosts").write_text("")
    write_cdb(tmp_path / "morercpthosts.cdb", [(f"d{i}.test".encode(), b"") for i in range(5000)])
    policy = RecipientPolicy([], CdbFile.open(tmp_path / "morercpthosts.cdb"))
    assert all(policy.check_rcpt(f"u@D{i}.test", None) is None for i in range(0, 5000, 7))
    assert policy.check_rcpt("u@d5000.test", None) == RELAY_553


def test_a_domain_longer_than_rfc_5321_allows_costs_no_lookup(tmp_path):
    """Each suffix of a domain is a lookup in morercpthosts.cdb (a cdb hash of
    the suffix, in Python): a domain of 890 bytes (parse_path takes 900) and
    440 labels was 440 hashes of up to 890 bytes, 16 ms of a receiver's event
    loop for one RCPT from any client. A domain over 255 characters is no
    name rcpthosts can list: refused at once."""
    (tmp_path / "rcpthosts").write_text("")
    write_cdb(tmp_path / "morercpthosts.cdb", [(b".more.test", b"")])
    policy = RecipientPolicy.load(tmp_path)
    probed: list[bytes] = []
    cdb = policy._more

    class Probes:
        def __contains__(self, key: bytes) -> bool:
            probed.append(key)
            return key in cdb

    policy._more = Probes()
    longest = "a." * 121 + "xyz.more.test"                # 255 characters
    assert len(longest) == 255 and policy.check_rcpt("u@" + longest, None) is None
    probed.clear()
    assert policy.check_rcpt("u@a." + longest, None) == RELAY_553
    assert policy.check_rcpt("u@" + "a." * 440 + "more.test", None) == RELAY_553
    assert probed == []
    assert policy.check_rcpt("u@a." + longest, "") is None          # RELAYCLIENT: not checked


def test_empty_rcpthosts_accepts_no_domain(tmp_path):
    (tmp_path / "rcpthosts").write_text("")
    policy = RecipientPolicy.load(tmp_path)
    assert policy.check_rcpt("u@anything.test", None) == RELAY_553
    assert policy.check_rcpt("postmaster", None) is None


def test_missing_rcpthosts_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="rcpthosts"):
        RecipientPolicy.load(tmp_path)


def test_crlf_rcpthosts_kept_as_qmail_does(tmp_path):
    # qmail keeps the CR, so the line never matches: same here (README: CRLF files).
    (tmp_path / "rcpthosts").write_bytes(b"local.test\r\n")
    policy = RecipientPolicy.load(tmp_path)
    assert policy.check_rcpt("u@local.test", None) == RELAY_553


# -- badmailfrom --------------------------------------------------------------------------

@pytest.mark.parametrize("sender", [
    "spammer@bad.test",
    "SPAMMER@Bad.Test",
    '"spammer"@bad.test',
    "anyone@evil.test",
    "anyone@EVIL.TEST",
    "anyone@evil.test.",
    '"x@good.test"@evil.test',
])
def test_badmailfrom_refused(policy, sender):
    assert policy.sender_refused(sender) is True


@pytest.mark.parametrize("sender", [
    "",
    "other@bad.test",
    "spammer@bad.test.org",
    "anyone@sub.evil.test",     # `@domain` is exact, no subdomains (qmail)
    "anyone@evil.test.org",
    "evil.test",
    "x@good.test",
])
def test_badmailfrom_not_refused(policy, sender):
    assert policy.sender_refused(sender) is False


def test_no_badmailfrom_file(tmp_path):
    (tmp_path / "rcpthosts").write_text("local.test\n")
    assert RecipientPolicy.load(tmp_path).sender_refused("a@b.test") is False


# -- helpers ------------------------------------------------------------------------------

def test_split_address():
    assert split_address("a@b") == ("a", "b")
    assert split_address("a") == ("a", None)
    assert split_address("a@b@c") == ("a@b", "c")
    assert split_address('"a@b"@c') == ('"a@b"', "c")
    assert split_address('"a@b"') == ('"a@b"', None)
    assert split_address("a\\@b") == ("a\\@b", None)
    assert split_address('"a\\"@b"@c') == ('"a\\"@b"', "c")
    assert split_address("") == ("", None)


def test_unquote_address():
    assert unquote_address('"a b"@c') == "a b@c"
    assert unquote_address("a\\@b@c") == "a@b@c"
    assert unquote_address("plain@c") == "plain@c"


def test_plain_address_drops_quotes_only_where_none_are_needed():
    assert plain_address('"joe"@example.com') == "joe@example.com"
    assert plain_address('"joe.q"@example.com') == "joe.q@example.com"
    assert plain_address("jo\\e@example.com") == "joe@example.com"
    assert plain_address('"joe"') == "joe"
    for kept in ('"jo e"@example.com', '"a@b"@example.com', '".joe"@example.com', '""@example.com',
                 "joe@example.com", '"jo\\"e"@example.com'):
        assert plain_address(kept) == kept


def test_rewrite_local_ip_literal():
    ips = {"192.0.2.1"}
    assert rewrite_local_ip_literal("postmaster@[192.0.2.1]", ips, "mx.test") == "postmaster@mx.test"
    assert rewrite_local_ip_literal("postmaster@[0.0.0.0]", ips, "mx.test") == "postmaster@mx.test"
    assert rewrite_local_ip_literal("postmaster@[192.0.2.2]", ips, "mx.test") == "postmaster@[192.0.2.2]"
    assert rewrite_local_ip_literal("postmaster@[not.an.ip.x]", ips, "mx.test") == "postmaster@[not.an.ip.x]"
    assert rewrite_local_ip_literal("postmaster@192.0.2.1", ips, "mx.test") == "postmaster@192.0.2.1"
    assert rewrite_local_ip_literal("postmaster", ips, "mx.test") == "postmaster"


def test_rewrite_local_ip_literal_ipv6():
    # RFC 5321's IPv6 address literal, against the address as the socket spells it.
    ips = {"2001:db8::1", "192.0.2.1"}
    for ours in ("postmaster@[IPv6:2001:db8::1]", "postmaster@[ipv6:2001:DB8:0::1]",
                 "postmaster@[IPv6:::]", "postmaster@[IPv6:::ffff:192.0.2.1]"):
        assert rewrite_local_ip_literal(ours, ips, "mx.test") == "postmaster@mx.test", ours
    for kept in ("postmaster@[IPv6:2001:db8::2]", "postmaster@[IPv6:192.0.2.1]",
                 "postmaster@[2001:db8::1]", "postmaster@[IPv6:nonsense]"):
        assert rewrite_local_ip_literal(kept, ips, "mx.test") == kept


# -- property: nothing a non-relay client gets accepted can route off-site -----------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from engine.config.domains import DomainConfig  # noqa: E402

_PIECES = st.sampled_from([
    "u", "x", "local.test", "LOCAL.TEST", "foreign.test", "a.sub.test", "sub.test", "@", "%", "!",
    '"', "\\", ".", "[", "]", "1.2.3.4", ":", ",", " ", "\u212a", "\udce9", "",
])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=9).map("".join))
def test_accepted_never_leaves_our_domains(rcpt):
    policy = RecipientPolicy(["local.test", ".sub.test"])
    if policy.check_rcpt(rcpt, None) is not None:
        return
    # Every way a later stage could read the address must land on one of our domains:
    # qmail-style unquoting, then the percent hack even if every domain were listed,
    # then the last '@'.
    ours = DomainConfig.build(me="local.test", locals=["local.test"],
                              percenthack=["local.test", "foreign.test", "x"])
    for form in (rcpt, unquote_address(rcpt)):
        if "@" not in form:
            assert not any(c in form for c in '%!"\\'), rcpt
            continue
        channel, address = ours.resolve(form)
        domain = address.rsplit("@", 1)[1].lower()
        assert domain == "local.test" or domain.endswith(".sub.test"), (rcpt, address)
        assert "!" not in address.rsplit("@", 1)[0], rcpt


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(["a", "@", '"', "\\", ".", "b", "\udce9", "é"]), max_size=12).map("".join))
def test_split_agrees_with_the_compiled_core(addr):
    core = pytest.importorskip("engine._smtpcore")
    if not hasattr(core, "split_address"):
        pytest.skip("engine._smtpcore.split_address not built")
    raw = addr.encode("utf-8", "surrogateescape")
    local, domain = core.split_address(raw)
    expect = (local.decode("utf-8", "surrogateescape"),
              None if domain is None else domain.decode("utf-8", "surrogateescape"))
    assert split_address(addr) == expect


def test_address_syntax_error_helper():
    from engine.smtp.policy import address_syntax_error
    assert address_syntax_error("a@b") is None
    assert address_syntax_error("") is None
    assert address_syntax_error("a\0@b") == SYNTAX_ERROR
