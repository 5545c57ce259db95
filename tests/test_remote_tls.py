"""Outbound TLS end to end: RemoteDelivery -> a RecordingSink with STARTTLS on
127.0.0.1, certificates from trustme, names from the fake DNS server.

Each policy of control/tlsdestinations (engine/delivery/tlspolicy.py) against
a sink that does TLS, fails its handshake, or has no TLS at all.
"""
from __future__ import annotations

import asyncio
import hashlib
import ssl

import pytest
import trustme

from engine.delivery.remote import RecipientResult, RemoteConfig, RemoteDelivery
from engine.delivery.routes import SmtpRoutes
from engine.delivery.tlspolicy import TlsDestinations
from tests.fakedns import fake_dns  # noqa: F401  (fixture)
from tests.smtp_recorder import RecordingSink

MSG = b"Subject: tls\r\n\r\nbody\r\n.leading dot\r\n"
MX = "mx.tls.test"
SAID = "Remote host said: 250 ok queued\n"
TLS_OK = RecipientResult("x@tls.test", "K", f"127.0.0.1 TLS transmitted message accepted.\n{SAID}")
CLEAR_OK = RecipientResult("x@tls.test", "K", f"127.0.0.1 accepted message.\n{SAID}")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or (MX,))).configure_cert(ctx)
    return ctx


def run(coro, timeout=25):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def deliver(dns, tlsdestinations: str = "", messages: int = 1, root="/", min_version="TLSv1.2",
            tls: TlsDestinations | None = None, client_cert: str = "", route: str = "", **knobs):
    """Start a sink with `knobs`, deliver `messages` messages to x@tls.test
    (MX mx.tls.test -> 127.0.0.1, or smtproutes to `route`:PORT) one after
    the other; results and the sink."""
    async def go():
        sink = await RecordingSink.start("127.0.0.1", 0, **knobs)
        dns.zone["tls.test"] = {"MX": [(10, MX)]}
        dns.zone[MX] = {"A": ["127.0.0.1"]}
        lines = list(enumerate(tlsdestinations.splitlines(), 1))
        routes = SmtpRoutes.from_text(f"tls.test:{route}:{sink.port}\n" if route else "")
        config = RemoteConfig(helohost="relay.test", routes=routes,
                              dns_servers=(dns.address,), mx_port=sink.port, dns_timeout=0.5,
                              dns_tries=1, timeoutconnect=2, timeoutremote=5,
                              tls=tls if tls is not None else TlsDestinations.from_lines(lines, root),
                              tls_handshake_timeout=5, tls_min_version=min_version,
                              tls_client_cert=client_cert)
        rd = RemoteDelivery(config)
        try:
            results = [await rd.deliver("tls.test", "a@src.test", ["x@tls.test"], MSG)
                       for _ in range(messages)]
            return results, sink, rd.pool
        finally:
            await rd.close()
            await sink.stop()
    return run(go())


def commands(conn) -> list[bytes]:
    return [c.split(b" ")[0].upper() for c in conn.commands]


def test_opportunistic_to_a_tls_sink_is_encrypted_and_says_so(fake_dns, ca):
    (result,), sink, _ = deliver(fake_dns, tls_context=server_context(ca))
    assert result == [TLS_OK]
    (conn,) = sink.connections
    assert conn.tls and sink.messages[0].tls and sink.messages[0].content == MSG
    # RFC 3207: EHLO again after the handshake, nothing sent in clear after STARTTLS.
    assert commands(conn)[:4] == [b"EHLO", b"STARTTLS", b"EHLO", b"MAIL"]


def test_pooled_connection_is_reused_encrypted(fake_dns, ca):
    results, sink, pool = deliver(fake_dns, messages=3, tls_context=server_context(ca))
    assert results == [[TLS_OK]] * 3
    (conn,) = sink.connections
    assert pool.opened == 1 and commands(conn).count(b"STARTTLS") == 1
    assert [t.tls for t in conn.transactions] == [True, True, True]
    assert commands(conn).count(b"RSET") == 2


def test_opportunistic_handshake_failure_is_delivered_in_clear(fake_dns):
    results, sink, pool = deliver(fake_dns, messages=2, tls_break=True)
    assert results == [[CLEAR_OK]] * 2
    first, second = sink.connections
    assert commands(first) == [b"EHLO", b"STARTTLS"] and not first.transactions
    # The same attempt on a new connection, in clear; reused for the next message.
    assert b"STARTTLS" not in commands(second) and len(second.transactions) == 2
    assert pool.tls_fallbacks == 1


def test_opportunistic_starttls_refused_goes_on_in_clear_on_the_same_connection(fake_dns, ca):
    (result,), sink, _ = deliver(fake_dns, tls_context=server_context(ca),
                                 starttls_reply="454 TLS not available")
    assert result == [CLEAR_OK]
    (conn,) = sink.connections
    assert commands(conn)[:3] == [b"EHLO", b"STARTTLS", b"MAIL"]


def test_plaintext_injected_after_220_is_never_read_as_a_tls_reply(fake_dns, ca):
    # A man in the middle appends a reply to the 220: the client must not take
    # it for the server's answer inside TLS (it gives up that connection).
    (result,), sink, pool = deliver(fake_dns, tls_context=server_context(ca),
                                    starttls_reply="220 go ahead\r\n250 injected")
    assert result == [CLEAR_OK]
    assert len(sink.connections) == 2 and pool.tls_fallbacks == 1


def test_required_tls_to_a_sink_without_tls_defers_with_the_reason(fake_dns):
    (result,), sink, _ = deliver(fake_dns, "-tls.test:\n")
    assert result == [RecipientResult(
        "x@tls.test", "Z", "No TLS achieved while control/tlsdestinations requires it"
        " (-tls.test); connected to 127.0.0.1.\n")]
    assert not sink.messages and b"MAIL" not in commands(sink.connections[0])


def test_required_tls_refused_or_broken_defers(fake_dns, ca):
    (refused,), _, _ = deliver(fake_dns, "-*:\n", tls_context=server_context(ca),
                               starttls_reply="454 TLS not available")
    assert refused[0].status == "Z"
    assert refused[0].text == ("STARTTLS rejected while control/tlsdestinations requires TLS"
                               " (-*); connected to 127.0.0.1.\n"
                               "Remote host said: 454 TLS not available\n")
    (broken,), sink, _ = deliver(fake_dns, "-tls.test:\n", tls_break=True)
    assert broken[0].status == "Z" and broken[0].text.startswith("TLS connect failed: ")
    assert broken[0].text.endswith("; connected to 127.0.0.1.\n")
    assert len(sink.connections) == 1 and not sink.messages     # no retry in clear


def test_verified_with_the_right_ca_delivers(fake_dns, ca, ca_file):
    (result,), sink, _ = deliver(fake_dns, f"tls.test:{ca_file}\n", tls_context=server_context(ca))
    assert result == [TLS_OK] and sink.messages[0].tls


def test_verified_with_a_wrong_ca_defers(fake_dns, ca, tmp_path):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    (result,), sink, _ = deliver(fake_dns, f"tls.test:{other}\n", tls_context=server_context(ca))
    assert result[0].status == "Z"
    assert result[0].text.startswith(f"TLS unable to verify server with {other}: ")
    assert "unable to get local issuer certificate" in result[0].text
    assert not sink.messages


def test_a_ca_file_that_does_not_load_defers_or_goes_in_clear(fake_dns, ca, tmp_path):
    # The file exists (tlsdestinations is loaded) but is no PEM bundle, or is
    # replaced after the load: no courier crash at every delivery. Required
    # TLS defers with s/qmail's text, opportunistic goes on in clear.
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    (result,), sink, _ = deliver(fake_dns, f"tls.test:{garbage}\n", tls_context=server_context(ca))
    assert result == [RecipientResult("x@tls.test", "Z", f"I wasn't able to set up CAFILE: {garbage}"
                                      " or CADIR:  for TLS. (#4.4.1)\n")]
    assert not sink.connections
    (result,), sink, _ = deliver(fake_dns, f"*:{garbage}\n", tls_context=server_context(ca))
    assert result == [CLEAR_OK] and b"STARTTLS" not in commands(sink.connections[0])


def test_verified_with_the_system_cas_refuses_a_private_ca(fake_dns, ca):
    (result,), _, _ = deliver(fake_dns, "+*:\n", tls_context=server_context(ca))
    assert result[0].status == "Z"
    assert result[0].text.startswith("TLS unable to verify server with the system CAs: ")


@pytest.mark.parametrize("route", ["[127.0.0.1]", "127.0.0.1"])
def test_a_relay_given_as_an_ip_is_verified_by_its_ip_address(fake_dns, ca, ca_file, route):
    # The certificate's name is the address (an IP SAN), brackets or not; and an
    # address is never sent as SNI (RFC 6066 3).
    (result,), sink, _ = deliver(fake_dns, f"*:{ca_file}\n", route=route,
                                 tls_context=server_context(ca, "127.0.0.1"))
    assert result[0].status == "K", result[0].text
    assert sink.messages[0].tls


def test_sni_is_the_relay_name_without_its_trailing_dot(fake_dns, ca, ca_file):
    # RFC 6066 3: "without a trailing dot"; an smtproutes relay may be
    # written with one (and still names the host the certificate is for).
    ctx = server_context(ca)
    sent = []
    ctx.sni_callback = lambda obj, name, c: sent.append(name)
    (result,), sink, _ = deliver(fake_dns, f"~{MX}:{ca_file}\n", route=f"{MX}.", tls_context=ctx)
    assert result == [TLS_OK] and sent == [MX]


@pytest.mark.parametrize("rule, names, ok, why", [
    ("=tls.test", (MX,), True, ""),
    ("=tls.test", ("*.tls.test",), False, "certificate contains no matching dNSNnames"),
    ("~tls.test", ("*.tls.test",), True, ""),
    ("tls.test", ("other.test",), False, "certificate contains no matching dNSNnames"),
    ("~.test", (MX.upper(),), True, ""),
])
def test_certificate_names(fake_dns, ca, ca_file, rule, names, ok, why):
    (result,), _, _ = deliver(fake_dns, f"{rule}:{ca_file}\n", tls_context=server_context(ca, *names))
    if ok:
        assert result == [TLS_OK]
    else:
        assert result[0].text == f"TLS unable to verify server {MX}: {why}; connected to 127.0.0.1.\n"


def test_fingerprint(fake_dns, ca):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert = ca.issue_cert(MX)
    cert.configure_cert(ctx)
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    good = hashlib.sha256(der).hexdigest().upper()
    (result,), _, _ = deliver(fake_dns, f"%tls.test:={good}\n", tls_context=ctx)
    assert result == [TLS_OK]
    (result,), _, _ = deliver(fake_dns, f"%tls.test:={'0' * 40}\n", tls_context=ctx)
    assert result[0].text == ("TLS fingerprint of server mx.tls.test does not match"
                              " control/tlsdestinations; connected to 127.0.0.1.\n")


def test_opportunistic_with_a_ca_that_does_not_verify_goes_on_in_clear(fake_dns, ca, tmp_path):
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    (result,), sink, pool = deliver(fake_dns, f"*:{other}\n", tls_context=server_context(ca))
    assert result == [CLEAR_OK] and pool.tls_fallbacks == 1 and not sink.messages[0].tls


def test_no_tls_rule_never_sends_starttls(fake_dns, ca):
    (result,), sink, _ = deliver(fake_dns, "!.test:\n*:\n", tls_context=server_context(ca))
    assert result == [CLEAR_OK] and b"STARTTLS" not in commands(sink.connections[0])


def test_qmail_tls_tlshosts_and_notlshosts(fake_dns, ca, tmp_path):
    control = tmp_path / "control"
    (control / "tlshosts").mkdir(parents=True)
    ca.cert_pem.write_to_path(str(control / "tlshosts" / f"{MX}.pem"))
    files = TlsDestinations.load(tmp_path)
    (result,), sink, _ = deliver(fake_dns, tls=files, tls_context=server_context(ca))
    assert result == [TLS_OK] and sink.messages[0].tls
    # Required by the file: a next hop without TLS gets nothing, in qmail-tls's words.
    (result,), sink, _ = deliver(fake_dns, tls=files)
    assert result == [RecipientResult("x@tls.test", "Z", f"No TLS achieved while control/tlshosts/"
                                      f"{MX}.pem exists; connecting to 127.0.0.1.\n")]
    assert not sink.messages
    (result,), _, _ = deliver(fake_dns, tls=files, tls_context=server_context(ca),
                              starttls_reply="454 TLS not available")
    assert result[0].text.startswith(f"STARTTLS rejected while control/tlshosts/{MX}.pem exists; "
                                     "connecting to 127.0.0.1.\n")
    (control / "tlshosts" / f"{MX}.pem").unlink()
    (control / "notlshosts").mkdir()
    (control / "notlshosts" / MX).write_text("")
    (result,), sink, _ = deliver(fake_dns, tls=TlsDestinations.load(tmp_path),
                                 tls_context=server_context(ca))
    assert result == [CLEAR_OK] and b"STARTTLS" not in commands(sink.connections[0])


def test_client_certificate_is_presented_when_asked(fake_dns, ca, tmp_path):
    # A next hop that wants its clients' certificates (qmail-tls's
    # control/clientcert.pem). Without one, TLS 1.3 ends the handshake on
    # the client's side before the server refuses: the connection dies
    # after it, a deferral, and nothing was delivered; with one it is TLS.
    ctx = server_context(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    (result,), sink, _ = deliver(fake_dns, tls_context=ctx)
    assert result[0].status == "Z" and not sink.messages
    cert = tmp_path / "clientcert.pem"
    ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(cert))
    (result,), sink, _ = deliver(fake_dns, tls_context=ctx, client_cert=str(cert))
    assert result == [TLS_OK] and sink.messages[0].tls


def test_min_version_is_enforced(fake_dns, ca):
    ctx = server_context(ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    (result,), _, _ = deliver(fake_dns, tls_context=ctx)
    assert result == [TLS_OK]
    # [delivery] tls_min_version = "TLSv1.3" and a server that stops at 1.2:
    # opportunistic goes on in clear, required defers.
    (result,), _, pool = deliver(fake_dns, tls_context=ctx, min_version="TLSv1.3")
    assert result == [CLEAR_OK] and pool.tls_fallbacks == 1
    (result,), _, _ = deliver(fake_dns, "-tls.test:\n", tls_context=ctx, min_version="TLSv1.3")
    assert result[0].status == "Z" and result[0].text.startswith("TLS connect failed: ")


def test_port_465_is_implicit_tls(fake_dns, ca, ca_file, monkeypatch, tmp_path):
    import engine.delivery.smtpclient as smtpclient
    ctx = server_context(ca)

    async def go(rule):
        sink = await RecordingSink.start("127.0.0.1", 0, tls_context=ctx, implicit_tls=True)
        monkeypatch.setattr(smtpclient, "SMTPS_PORT", sink.port)   # the sink stands for :465
        fake_dns.zone[MX] = {"A": ["127.0.0.1"]}
        config = RemoteConfig(helohost="relay.test", routes=SmtpRoutes.from_text(f"tls.test:{MX}\n"),
                              dns_servers=(fake_dns.address,), dns_timeout=0.5, dns_tries=1,
                              timeoutconnect=2, timeoutremote=5,
                              tls=TlsDestinations.from_lines([(1, f"{rule};{sink.port}")]))
        rd = RemoteDelivery(config)
        try:
            return await rd.deliver("tls.test", "a@src.test", ["x@tls.test"], MSG), sink
        finally:
            await rd.close()
            await sink.stop()
    # The policy's `;PORT` replaces the route's port; DEST is the relay's name.
    result, sink = run(go(f"~{MX}:{ca_file}"))
    assert result == [TLS_OK] and sink.messages[0].content == MSG
    assert b"STARTTLS" not in commands(sink.connections[0])
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    result, _ = run(go(f"={MX}:{other}"))
    assert result[0].status == "Z"
    assert result[0].text.startswith(f"TLS unable to verify server with {other}: ")
