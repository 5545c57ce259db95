"""engine/config/showctl.py and `qrelay showctl`: qmail-showctl's lines for a
qrelay root, with qrelay's defaults and refusals."""
from __future__ import annotations

import os

import trustme

from engine.config.showctl import show
from tests.conftest import run_cli


def sections(text: str) -> dict[str, list[str]]:
    """NAME -> [the rest of its first line, its further lines]."""
    out = {}
    for block in text.split("\n\n")[1:]:
        first, *more = block.rstrip("\n").split("\n")
        name, _, rest = first.partition(": ")
        out[name] = [rest, *more]
    return out


def test_a_fresh_root_in_qmail_showctls_words(root):
    text = show(root)
    assert text.startswith(f"qmail home directory: {root}.\nuser-ext delimiter: -.\n"
                           "paternalism (in decimal): 2.\n\nbadmailfrom: (Default.) Any MAIL FROM"
                           " is allowed.\n\nbouncefrom: (Default.) Bounce user name is MAILER-DAEMON.\n")
    s = sections(text)
    assert s["bouncehost"] == ["(Default.) Bounce host name is mx.example.com."]
    assert s["concurrencylocal"] == ["(Default.) Local concurrency is 10."]
    assert s["me"] == ["My name is mx.example.com."]
    assert s["locals"] == ["", "Messages for mx.example.com are delivered locally."]
    assert s["rcpthosts"] == ["", "SMTP clients may send messages to recipients at mx.example.com."]
    assert s["morercpthosts"] == ["(Default.) No effect."]
    assert s["morercpthosts.cdb"] == ["(Default.) No effect."]
    assert s["timeoutsmtpd"] == ["(Default.) SMTP server data timeout is 1200 seconds."]
    # qrelay's own defaults, where they are not qmail's
    assert s["databytes"][0].startswith("SMTP DATA limit is 0 bytes (none: [smtp] "
                                        "max_message_bytes = ")
    assert s["servercert.pem"] == ["(Default.) No certificate: no STARTTLS, no submissions or "
                                   "pop3s listener."]
    assert s["tcp.smtp.cdb"] == ["(Default.) tcp.smtp is read as it is."]
    assert s["tlsdestinations"] == ["(Default.) Opportunistic TLS to every destination."]
    # every file of a fresh root is one qrelay reads
    assert not [n for n, v in s.items() if v[0].startswith("I have no idea")]


def test_set_values_refusals_and_files_qrelay_ignores(root):
    control = root / "control"
    (control / "concurrencylocal").write_text("30\n")
    (control / "bouncehost").write_text("bounces.example.com\n")
    (control / "databytes").write_text("10MB\n")
    (control / "timeoutsmtpd").write_text("1m\n")
    (control / "concurrencyincoming").write_text("0\n")
    (control / "badmailfrom").write_text("spam@x.test\n@y.test\n")
    (control / "rcpthosts").unlink()
    (control / "morercpthosts").write_text("a.test\n")
    (control / "qmqpservers").write_text("192.0.2.1\n")
    (control / "tlshosts").mkdir()
    (control / "tlshosts" / "mx.bank.test.pem").write_text("")
    (control / "tlshosts" / "exhaustivelist").write_text("")
    (control / "tlsclientciphers").write_text("ECDHE-RSA-AES128-GCM-SHA256\nECDHE-RSA-AES256-GCM-SHA384\n")
    (control / "clientcert.pem").write_text("not a certificate\n")
    ca = trustme.CA()
    ca.issue_cert("mx.example.com").private_key_and_cert_chain_pem.write_to_path(
        str(control / "servercert.pem"))
    s = sections(show(root))
    assert s["concurrencylocal"] == ["Local concurrency is 30."]
    assert s["bouncehost"] == ["Bounce host name is bounces.example.com."]
    assert s["databytes"] == ["Oops! databytes line 1: '10MB' is not a number: qrelay refuses it."]
    assert s["timeoutsmtpd"] == ["Oops! timeoutsmtpd line 1: '1m' is not a number: qrelay refuses it."]
    assert s["concurrencyincoming"] == [
        "Oops! concurrencyincoming line 1: 0 is below the minimum 1: qrelay refuses it."]
    assert s["badmailfrom"] == ["", "spam@x.test not accepted in MAIL FROM.",
                                "@y.test not accepted in MAIL FROM."]
    assert s["rcpthosts"] == ["Oops! There is no rcpthosts: qrelay refuses to start (it would be an"
                              " open relay)."]
    assert s["morercpthosts"] == ["", "No rcpthosts; doesn't matter that morercpthosts has a.test."]
    assert s["morercpthosts.cdb"] == ["Oops! morercpthosts exists but morercpthosts.cdb doesn't."]
    assert s["qmqpservers"] == ["I have no idea what this file does."]
    assert s["tlshosts"] == ["", "TLS only to the hosts listed here (exhaustivelist).",
                             "TLS required to mx.bank.test, verified with tlshosts/mx.bank.test.pem."]
    assert s["tlsclientciphers"] == ["Ciphers: ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384."]
    assert s["clientcert.pem"] == ["Oops! clientcert.pem: cannot load the certificate and key: PEM lib."]
    assert s["servercert.pem"] == ["Certificate and key for STARTTLS, submissions and pop3s."]


def test_files_qrelay_run_refuses_are_oops_lines(root):
    # Listed as if fine, these stop `qrelay run` (or its reload).
    control = root / "control"
    (control / "tcp.smtp").write_text('127.:allow,RELAYCLIENT\n')
    (control / "smtproutes").write_text("example.com\n")
    (control / "tlsdestinations").write_text("bad line here\n")
    (control / "morercpthosts").write_text("a.test\n")
    (control / "morercpthosts.cdb").write_text("garbage\n")
    s = sections(show(root))
    assert s["tcp.smtp"] == ["Oops! unable to parse this line: 127.:allow,RELAYCLIENT:"
                             " qrelay refuses it."]
    assert s["smtproutes"][0].startswith("Oops! smtproutes line 1: no ':' in 'example.com'")
    assert s["smtproutes"][0].endswith(": qrelay refuses it.")
    assert s["tlsdestinations"][0].startswith("Oops! ") and "qrelay refuses it." in s["tlsdestinations"][0]
    assert s["morercpthosts.cdb"] == ["Oops! morercpthosts.cdb: truncated cdb (shorter than its"
                                      " 2048-byte header): qrelay refuses it."]
    # With a cdb, the text is not read: its error is no refusal; a broken cdb is.
    (control / "tcp.smtp.cdb").write_text("garbage\n")
    s = sections(show(root))
    assert s["tcp.smtp"] == ["", "Rule: 127.:allow,RELAYCLIENT"]
    assert s["tcp.smtp.cdb"] == ["Oops! tcp.smtp.cdb: truncated cdb (shorter than its 2048-byte"
                                 " header): qrelay refuses it."]


def test_rule_variables_qrelay_ignores_are_named(root):
    """A moved box's tcp.smtp may run a scanner through QMAILQUEUE: nothing
    does that here, and showctl, the list of what does not carry over, says so."""
    control = root / "control"
    (control / "tcp.smtp").write_text('127.:allow,RELAYCLIENT="",DATABYTES="5000"\n'
                                      ':allow,QMAILQUEUE="/var/qmail/bin/simscan",CHKUSER_START="1"\n')
    assert sections(show(root))["tcp.smtp.cdb"] == [
        "(Default.) tcp.smtp is read as it is.",
        "Rule variable CHKUSER_START: I have no idea what it does; qrelay ignores it.",
        "Rule variable QMAILQUEUE: I have no idea what it does; qrelay ignores it."]


def test_a_broken_qrelay_toml_is_said_after_the_header(root):
    (root / "qrelay.toml").write_text("[smtp\n")
    text = show(root)
    head = text.split("\n\n", 1)[0].splitlines()
    assert head[3].startswith(f"Oops! {root / 'qrelay.toml'}") and head[3].endswith(
        ": qrelay refuses to start.")
    assert sections(text)["concurrencyincoming"] == ["(Default.) Incoming SMTP concurrency is 500."]


def test_a_cdb_older_than_its_text(root):
    control = root / "control"
    assert run_cli("tcprules", str(root)).returncode == 0
    st = (control / "tcp.smtp.cdb").stat()
    os.utime(control / "tcp.smtp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert sections(show(root))["tcp.smtp.cdb"] == [
        "Oops! tcp.smtp.cdb is older than tcp.smtp: run `qrelay tcprules`."]
    os.utime(control / "tcp.smtp", ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    assert sections(show(root))["tcp.smtp.cdb"] == [
        "Modified recently enough; hopefully up to date."]


def test_cli(root, tmp_path):
    r = run_cli("showctl", str(root))
    assert r.returncode == 0 and r.stdout == show(root)
    r = run_cli("showctl", str(tmp_path / "nothing"))
    assert r.returncode == 1
    assert r.stderr == f"Error: {tmp_path / 'nothing' / 'control'}: no such directory (not a qrelay" \
                       " or qmail home)\n"


def test_an_encrypted_server_key_is_an_oops_not_a_passphrase_prompt(root):
    """showctl loaded servercert.pem without a passphrase callback: an
    encrypted key made OpenSSL prompt on the terminal (or read stdin) and wait."""
    import sys

    from tests.smtp_harness import encrypted_certificate, run_without_a_terminal
    (root / "control" / "servercert.pem").write_bytes(encrypted_certificate("mx.example.com"))
    done = run_without_a_terminal([sys.executable, "-m", "engine.cli", "showctl", str(root)])
    assert "The private key is encrypted" in done.stdout, done.stdout
    assert "pass phrase" not in (done.stdout + done.stderr).lower()
