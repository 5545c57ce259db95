"""load_smtp_config / config_fingerprint on real qmail-style homes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.config.cdb import newmrh
from engine.smtp.config import ConfigError, SmtpConfig, config_fingerprint, load_smtp_config
from engine.config.tcprules import compile_rules

RELAY_553 = "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"


def write(root: Path, name: str, text: str | bytes) -> None:
    path = root / "control" / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def test_defaults_from_init(root):
    cfg = load_smtp_config(root)
    assert isinstance(cfg, SmtpConfig)
    assert cfg.root == root
    assert cfg.me == "mx.example.com"
    assert cfg.greeting == "mx.example.com"
    assert cfg.localiphost == "mx.example.com"
    assert cfg.databytes == 0
    assert cfg.timeout == 1200
    assert cfg.concurrencyincoming == cfg.settings.smtp.max_connections
    # init's tcp.smtp: loopback relays, everyone else connects
    assert dict(cfg.rules.match("127.0.0.1").env) == {"RELAYCLIENT": ""}
    assert cfg.rules.match("192.0.2.1").allow and not cfg.rules.match("192.0.2.1").env
    assert cfg.policy.check_rcpt("a@mx.example.com", None) is None
    assert cfg.policy.check_rcpt("a@elsewhere.test", None) == RELAY_553


def test_control_values(root):
    write(root, "smtpgreeting", "mx.example.com NO UCE\n")
    write(root, "localiphost", "ip.example.com\n")
    write(root, "databytes", "10000\n")
    write(root, "timeoutsmtpd", "30\n")
    write(root, "concurrencyincoming", "77\n")
    write(root, "badmailfrom", "@evil.test\n")
    cfg = load_smtp_config(root)
    assert cfg.greeting == "mx.example.com NO UCE"
    assert cfg.localiphost == "ip.example.com"
    assert (cfg.databytes, cfg.timeout, cfg.concurrencyincoming) == (10000, 30, 77)
    assert cfg.policy.sender_refused("x@evil.test")


def test_timeout_and_databytes_edges(root):
    write(root, "timeoutsmtpd", "0\n")
    write(root, "databytes", "0\n")
    cfg = load_smtp_config(root)
    assert cfg.timeout == 1 and cfg.databytes == 0
    write(root, "timeoutsmtpd", "-3\n")       # qmail: no digits, so 1200; qrelay: refused
    with pytest.raises(ConfigError, match="timeoutsmtpd line 1: -3 is below the minimum 0"):
        load_smtp_config(root)
    write(root, "timeoutsmtpd", "30\n")
    write(root, "databytes", "junk\n")       # qmail: 0; qrelay: refused (below)
    with pytest.raises(ConfigError, match="databytes line 1: 'junk' is not a number"):
        load_smtp_config(root)


def test_crlf_me_keeps_cr_as_qmail(root):
    write(root, "me", "mx.example.com\r\n")
    assert load_smtp_config(root).me == "mx.example.com\r"


def test_settings_are_loaded(root):
    (root / "qrelay.toml").write_text("[smtp]\nmax_connections = 12\n")
    cfg = load_smtp_config(root)
    assert cfg.settings.smtp.max_connections == 12
    assert cfg.concurrencyincoming == 12


def test_morercpthosts_and_suffix(root):
    write(root, "rcpthosts", "mx.example.com\n.hosted.test\n")
    write(root, "morercpthosts", "more.test\n")
    newmrh(root / "control")
    policy = load_smtp_config(root).policy
    assert policy.check_rcpt("a@more.test", None) is None
    assert policy.check_rcpt("a@x.hosted.test", None) is None
    assert policy.check_rcpt("a@hosted.test", None) == RELAY_553


def test_tcp_smtp_cdb_wins_over_text(root):
    compile_rules('127.0.0.1:allow,RELAYCLIENT="@cdb"\n', root / "control" / "tcp.smtp.cdb")
    cfg = load_smtp_config(root)
    assert dict(cfg.rules.match("127.0.0.1").env) == {"RELAYCLIENT": "@cdb"}


def test_missing_tcp_smtp_allows_all(root):
    (root / "control" / "tcp.smtp").unlink()
    rule = load_smtp_config(root).rules.match("127.0.0.1")
    assert rule.allow and not rule.env


@pytest.mark.parametrize("setup,message", [
    (lambda r: (r / "control" / "me").unlink(), "control/me is missing"),
    (lambda r: write(r, "me", ""), "control/me is empty"),
    (lambda r: (r / "control" / "rcpthosts").unlink(),
     "control/rcpthosts is missing: refusing to run as an open relay"),
    (lambda r: write(r, "tcp.smtp", "127.0.0.1:allow,RELAYCLIENT\n"),
     "control/tcp.smtp: unable to parse this line: 127.0.0.1:allow,RELAYCLIENT"),
    (lambda r: write(r, "tcp.smtp.cdb", b"garbage"), "control/tcp.smtp.cdb: "),
    (lambda r: write(r, "morercpthosts.cdb", b"garbage"), "control/morercpthosts.cdb: "),
    (lambda r: write(r, "concurrencyincoming", "0\n"),
     "control/concurrencyincoming line 1: 0 is below the minimum 1"),
    (lambda r: (r / "qrelay.toml").write_text("[smtp]\nbogus = 1\n"), "unknown setting 'bogus'"),
    (lambda r: (r / "control" / "badmailfrom").mkdir(), "unable to read"),
    # qmail reads `10MB` as 10 bytes (every message then gets 552): refused instead.
    (lambda r: write(r, "databytes", "10MB\n"), "control/databytes line 1: '10MB' is not a number"),
    # ...and `1m` as a 1-second timeout, `5k` as 5 connections at once.
    (lambda r: write(r, "timeoutsmtpd", "1m\n"), "control/timeoutsmtpd line 1: '1m' is not a number"),
    (lambda r: write(r, "concurrencyincoming", "5k\n"),
     "control/concurrencyincoming line 1: '5k' is not a number"),
    (lambda r: (r / "qrelay.toml").write_text("[smtp]\nmax_line_length = 0\n"),
     "qrelay.toml: [smtp] max_line_length = 0 is out of range: at least 512"),
])
def test_config_errors_are_one_line(root, setup, message):
    setup(root)
    with pytest.raises(ConfigError) as info:
        load_smtp_config(root)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_snapshot_is_frozen(root):
    cfg = load_smtp_config(root)
    with pytest.raises(AttributeError):
        cfg.me = "other"  # type: ignore[misc]


def test_fingerprint_changes_on_edit_and_rename(root):
    before = config_fingerprint(root)
    assert before == config_fingerprint(root)
    assert all(name.startswith(("control/", "qrelay.toml")) for name, *_ in before)
    write(root, "badmailfrom", "@evil.test\n")
    after_create = config_fingerprint(root)
    assert after_create != before
    # atomic replace with identical size and mtime still shows (new inode)
    path = root / "control" / "rcpthosts"
    st = path.stat()
    tmp = path.with_name("rcpthosts.tmp")
    tmp.write_text(path.read_text().upper())
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)
    assert config_fingerprint(root) != after_create
    compile_rules(":allow\n", root / "control" / "tcp.smtp.cdb")
    assert config_fingerprint(root) != after_create


def test_databytes_that_is_a_number_is_read(root):
    write(root, "databytes", "10485760\n")
    assert load_smtp_config(root).databytes == 10485760
    write(root, "databytes", "-5\n")
    with pytest.raises(ConfigError, match="databytes line 1: -5 is below the minimum 0"):
        load_smtp_config(root)


def test_tcp_smtp_newer_than_its_cdb_is_named(root):
    from engine.config.tcprules import stale_cdb
    control = root / "control"
    assert stale_cdb(control) is None                    # no cdb: the text is read
    compile_rules((control / "tcp.smtp").read_text(), control / "tcp.smtp.cdb")
    assert stale_cdb(control) is None
    st = (control / "tcp.smtp.cdb").stat()
    write(root, "tcp.smtp", ":deny\n")
    os.utime(control / "tcp.smtp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stale_cdb(control) == (f"{control / 'tcp.smtp'} is newer than tcp.smtp.cdb, which is"
                                  " what is read: run `qrelay tcprules` to apply the edit")


def test_a_size_limit_that_no_spool_frame_can_carry_is_refused(root):
    # A message under the size limit but over [spool] max_frame_bytes was
    # refused by the spool writer: 451 "qq write error or disk full", every
    # retry, until the sender gave up. qmail boxes often have databytes of
    # 100 MB; the default frame is 80 MiB.
    write(root, "databytes", "104857600\n")
    with pytest.raises(ConfigError) as info:
        load_smtp_config(root)
    assert str(info.value) == (
        "control/databytes 104857600 does not fit in a spool frame: [spool] max_frame_bytes"
        " = 83886080 in qrelay.toml must be at least 110018176 (the message, max_recipients"
        " recipients and the envelope)")
    (root / "qrelay.toml").write_text("[spool]\nmax_frame_bytes = 110018176\n")
    assert load_smtp_config(root).databytes == 104857600
    write(root, "databytes", "0\n")
    (root / "qrelay.toml").write_text("[smtp]\nmax_message_bytes = 83886080\n")
    with pytest.raises(ConfigError, match=r"^qrelay.toml: \[smtp\] max_message_bytes 83886080 does "
                                          r"not fit in a spool frame: \[spool\] max_frame_bytes"):
        load_smtp_config(root)
    # Without the single writer no frame carries messages.
    (root / "qrelay.toml").write_text("[smtp]\nmax_message_bytes = 83886080\n"
                                      "[spool]\nsingle_writer = false\n")
    assert load_smtp_config(root).settings.smtp.max_message_bytes == 83886080


def test_a_tcp_smtp_databytes_that_no_spool_frame_can_carry_is_refused(root):
    # A rule's DATABYTES replaces control/databytes for its clients: over the
    # frame, their messages between the two were read whole, then refused.
    write(root, "tcp.smtp", '10.:allow,DATABYTES="104857600"\n127.:allow\n')
    with pytest.raises(ConfigError) as info:
        load_smtp_config(root)
    assert str(info.value) == (
        "control/tcp.smtp rule '10.': DATABYTES 104857600 does not fit in a spool frame:"
        " [spool] max_frame_bytes = 83886080 in qrelay.toml must be at least 110018176 (the"
        " message, max_recipients recipients and the envelope)")
    write(root, "tcp.smtp", '10.:allow,DATABYTES="52428800"\n127.:allow,DATABYTES="0"\n')
    assert load_smtp_config(root).rules.match("10.1.2.3").env["DATABYTES"] == "52428800"
