"""engine/delivery/tlspolicy.py: control/tlsdestinations parsed and looked up
in s/qmail's order, refused lines named, contexts and certificate names."""
from __future__ import annotations

import ssl

import pytest

from engine.delivery.remote import RemoteConfigError, load_remote_config
from engine.delivery.tlspolicy import (DEFAULT_POLICY, ENCRYPT, FINGERPRINT, FQDN, MAY, NONE,
                                       VERIFY, TlsContexts, TlsDestinations, TlsPolicy,
                                       TlsPolicyError, _check_name)


def table(text: str, root="/r") -> TlsDestinations:
    return TlsDestinations.from_lines(enumerate(text.splitlines(), 1), root)


def test_no_file_or_no_match_is_opportunistic(tmp_path):
    (tmp_path / "control").mkdir()
    assert TlsDestinations.load(tmp_path).lookup("example.com") == DEFAULT_POLICY
    assert DEFAULT_POLICY.level == MAY and not DEFAULT_POLICY.required
    assert table("-other.test:\n").lookup("example.com") == DEFAULT_POLICY


def test_lookup_order_follows_s_qmail():
    t = table("\n".join([
        "!skip.example.com:",
        "%fp.example.com:=" + "ab" * 20,
        "=exact.example.com:",
        "~.wild.example.com:",
        ".example.com:",
        "-enc.test:",
        "-*:",
        "*:",
    ]))
    levels = {h: t.lookup(h).level for h in (
        "skip.example.com", "fp.example.com", "exact.example.com", "a.wild.example.com",
        "other.example.com", "enc.test", "sub.enc.test", "elsewhere.test")}
    assert levels == {"skip.example.com": NONE, "fp.example.com": FINGERPRINT,
                      "exact.example.com": FQDN, "a.wild.example.com": VERIFY,
                      "other.example.com": VERIFY, "enc.test": ENCRYPT,
                      "sub.enc.test": ENCRYPT, "elsewhere.test": ENCRYPT}
    # `=` and `%` are exact: no parent-domain match.
    assert t.lookup("x.exact.example.com").rule == ".example.com"
    # `!` wins over every other rule, parent domains included.
    assert table("!.example.com:\n=mx.example.com:\n").lookup("mx.example.com").level == NONE
    # General rules in their order, then `*`, then `-`.
    assert table("-:\n*:\n+*:\n").lookup("x.test").rule == "+*"
    assert table("-:\n*:\n").lookup("x.test").rule == "*"
    assert table("-:\n").lookup("x.test").level == MAY
    assert table("EXAMPLE.com:\n").lookup("Example.COM.").level == VERIFY


def test_values_cafile_ciphers_port(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "cadir").mkdir()
    t = table(f"a.test:ca.pem|ECDHE-RSA-AES256-GCM-SHA384;465\nb.test:{tmp_path}/cadir/\n"
              "c.test:;2525\n-d.test:ca.pem\n", root=tmp_path)
    a = t.lookup("a.test")
    assert (a.cafile, a.ciphers, a.port) == (str(tmp_path / "ca.pem"),
                                             "ECDHE-RSA-AES256-GCM-SHA384", 465)
    assert t.lookup("b.test").capath == f"{tmp_path}/cadir/" and t.lookup("b.test").verifies
    assert t.lookup("c.test").port == 2525 and t.lookup("c.test").cafile == ""
    assert not t.lookup("d.test").verifies              # encrypt only: the CA is not used


@pytest.mark.parametrize("line, fragment", [
    ("example.com", "no ':'"),
    ("a.test:;0", "bad port '0'"),
    ("a.test:;25x", "bad port '25x'"),
    ("%a.test:abc", "needs '=' and a hex"),
    ("%a.test:=" + "g" * 40, "needs '=' and a hex"),
    ("a.test:=" + "a" * 40, "a fingerprint is only for a %HOST rule"),
    ("a.test:|NO-SUCH-CIPHER", "no usable cipher"),
    ("+a.test:", "bad destination '+a.test'"),
    ("%*:", "bad destination '%*'"),
    ("a.test:/nonexistent/ca.pem", "CA /nonexistent/ca.pem: No such file"),
])
def test_bad_lines_are_refused_naming_the_line(line, fragment):
    with pytest.raises(TlsPolicyError) as info:
        table("*:\n" + line + "\n")
    assert fragment in str(info.value)
    assert "line 2" in str(info.value) or "CA " in str(info.value)


def test_remote_config_reads_tlsdestinations_and_settings(root):
    control = root / "control"
    (control / "tlsdestinations").write_text("-secure.test:\n")
    config = load_remote_config(root)
    assert config.tls.lookup("secure.test").level == ENCRYPT and config.tls_min_version == "TLSv1.2"
    (control / "tlsdestinations").write_text("secure.test\n")
    with pytest.raises(RemoteConfigError, match=r"tlsdestinations line 1: no ':'"):
        load_remote_config(root)
    (control / "tlsdestinations").unlink()
    (root / "qrelay.toml").write_text('[delivery]\ntls_min_version = "TLSv1.1"\n')
    with pytest.raises(RemoteConfigError, match=r"\[delivery\] tls_min_version = 'TLSv1.1': exp"):
        load_remote_config(root)
    (root / "qrelay.toml").write_text('[delivery]\ntls_ca_file = "missing.pem"\n')
    with pytest.raises(RemoteConfigError, match=r"\[delivery\] tls_ca_file: no file"):
        load_remote_config(root)
    (control / "tlsclientciphers").write_text("NO-SUCH\n")
    (root / "qrelay.toml").write_text("")
    with pytest.raises(RemoteConfigError, match="tlsclientciphers: no usable cipher"):
        load_remote_config(root)
    (control / "tlsclientciphers").write_text("ECDHE-RSA-AES128-GCM-SHA256\nECDHE-RSA-AES256-GCM-SHA384\n")
    assert load_remote_config(root).tls_ciphers == \
        "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"


def test_a_changed_ca_file_makes_a_different_snapshot(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("one")
    first = table(f"a.test:{ca}\n")
    assert table(f"a.test:{ca}\n") == first
    ca.write_text("two, longer")
    assert table(f"a.test:{ca}\n") != first


def test_qmail_tls_per_host_files(tmp_path):
    control = tmp_path / "control"
    (control / "tlshosts").mkdir(parents=True)
    (control / "notlshosts").mkdir()
    (control / "tlshosts" / "MX.Bank.test.pem").write_text("CA")
    (control / "notlshosts" / "mx.bank.test").write_text("")      # tlshosts wins
    (control / "notlshosts" / "broken.test").write_text("")
    t = TlsDestinations.load(tmp_path)
    opportunistic = t.lookup("bank.test")
    assert opportunistic == DEFAULT_POLICY
    bank = t.for_host(opportunistic, "mx.bank.test.")
    assert (bank.level, bank.cafile, bank.rule) == (
        VERIFY, str(control / "tlshosts" / "MX.Bank.test.pem"), "tlshosts/MX.Bank.test.pem")
    assert bank.required and bank.verifies
    assert t.for_host(opportunistic, "broken.test").level == NONE
    assert t.for_host(opportunistic, "other.test") == DEFAULT_POLICY
    # exhaustivelist: TLS only to the hosts that have a file.
    (control / "tlshosts" / "exhaustivelist").write_text("")
    t2 = TlsDestinations.load(tmp_path)
    assert t2 != t and t2.for_host(opportunistic, "other.test").level == NONE
    assert t2.for_host(opportunistic, "mx.bank.test").level == VERIFY
    # A tlsdestinations rule naming the destination wins; `*:` leaves it to the files.
    (control / "tlsdestinations").write_text("-bank.test:\n*:\n")
    t3 = TlsDestinations.load(tmp_path)
    assert t3.for_host(t3.lookup("bank.test"), "mx.bank.test").level == ENCRYPT
    assert t3.for_host(t3.lookup("x.test"), "mx.bank.test").level == VERIFY
    # A changed CA file is a different snapshot (contexts are built again).
    (control / "tlshosts" / "MX.Bank.test.pem").write_text("another CA")
    assert TlsDestinations.load(tmp_path) != t3


def test_client_cert_is_read_and_a_broken_one_refused(root):
    import trustme
    path = root / "control" / "clientcert.pem"
    assert load_remote_config(root).tls_client_cert == ""
    trustme.CA().issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(path))
    first = load_remote_config(root)
    assert first.tls_client_cert == str(path) and first.tls_client_cert_stamp
    ctx = TlsContexts(client_cert=first.tls_client_cert).get(DEFAULT_POLICY)
    assert ctx.verify_mode == ssl.CERT_NONE
    # Broken after it was read: a context without it, not an exception mid-delivery.
    assert TlsContexts(client_cert=str(root / "gone.pem")).get(DEFAULT_POLICY) is not None
    # A renewed certificate (same path) is a different configuration: a new courier.
    trustme.CA().issue_cert("relay.test", "spare.test").private_key_and_cert_chain_pem \
        .write_to_path(str(path))
    assert load_remote_config(root) != first
    path.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    with pytest.raises(RemoteConfigError, match=r"clientcert\.pem: cannot load the certificate and key"):
        load_remote_config(root)


def test_an_encrypted_client_key_is_refused_without_asking_for_a_passphrase(root):
    """Without a password callback OpenSSL prompts on the terminal (or reads
    stdin) for control/clientcert.pem's passphrase: `qrelay run` would wait
    at start, a courier on its event loop. Refused instead, saying why."""
    import sys

    from tests.smtp_harness import encrypted_certificate, run_without_a_terminal
    path = root / "control" / "clientcert.pem"
    path.write_bytes(encrypted_certificate("relay.test"))
    code = ("import sys; from engine.delivery.tlspolicy import read_client_cert, TlsPolicyError\n"
            "from engine.delivery.tlspolicy import TlsContexts, DEFAULT_POLICY\n"
            "TlsContexts(client_cert=sys.argv[1] + '/control/clientcert.pem').get(DEFAULT_POLICY)\n"
            "try:\n    read_client_cert(sys.argv[1])\nexcept TlsPolicyError as exc:\n"
            "    print(exc)\nelse:\n    print('loaded')\n")
    proc = run_without_a_terminal([sys.executable, "-c", code, str(root)])
    assert "pass phrase" not in proc.stderr.lower()
    assert proc.stdout == f"{path}: the private key is encrypted; qmail-tls reads it without" \
                          " a passphrase (store it unencrypted, mode 640)\n"


def test_contexts_are_tls12_plus_and_shared():
    contexts = TlsContexts("TLSv1.2")
    ctx = contexts.get(DEFAULT_POLICY)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_NONE
    assert contexts.get(TlsPolicy(ENCRYPT)) is ctx
    verified = contexts.get(TlsPolicy(VERIFY))
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified is not ctx
    assert TlsContexts("TLSv1.3").get(DEFAULT_POLICY).minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize("cert, name, wildcard, ok", [
    ({"subjectAltName": (("DNS", "mx.a.test"),)}, "MX.A.test", True, True),
    ({"subjectAltName": (("DNS", "*.a.test"),)}, "mx.a.test", True, True),
    ({"subjectAltName": (("DNS", "*.a.test"),)}, "mx.a.test", False, False),
    ({"subjectAltName": (("DNS", "*.a.test"),)}, "x.mx.a.test", True, False),
    ({"subjectAltName": (("DNS", "*.a.test"),)}, "a.test", True, False),
    ({"subject": ((("commonName", "mx.a.test"),),)}, "mx.a.test", False, True),
    # SAN present: the CN is not looked at.
    ({"subjectAltName": (("DNS", "x.test"),), "subject": ((("commonName", "mx.a.test"),),)},
     "mx.a.test", True, False),
    ({"subjectAltName": (("IP Address", "127.0.0.1"),)}, "127.0.0.1", True, True),
])
def test_certificate_name_rules(cert, name, wildcard, ok):
    assert (_check_name(cert, name, wildcard) is None) == ok


def test_certificate_name_texts():
    assert _check_name({"subject": ((("commonName", "b.test"),),)}, "a.test", True) == \
        "TLS unable to verify server a.test: received certificate for b.test"
    assert _check_name({}, "a.test", True) == \
        "TLS unable to verify server a.test: certificate contains no valid commonName"
