from pathlib import Path

import pytest

from engine.config.control import (ControlError, SettledChanges, read_int, read_line, read_list,
                                   read_number, read_numbered_lines, stat_fingerprint)
from engine.config.settings import SettingsError, load_settings


def test_single_value_keeps_cr_like_qmail(tmp_path: Path):
    p = tmp_path / "me"
    p.write_bytes(b"mx.example.com\r\nsecond line\n")
    assert read_line(p) == "mx.example.com\r"
    p.write_bytes(b"mx.example.com \t\n")
    assert read_line(p) == "mx.example.com"
    assert read_line(tmp_path / "absent", "dflt") == "dflt"


def test_int_reads_leading_digits(tmp_path: Path):
    p = tmp_path / "databytes"
    p.write_bytes(b"10000xyz\n")
    assert read_int(p, 0) == 10000
    p.write_bytes(b"junk\n")
    assert read_int(p, 7) == 7
    assert read_int(tmp_path / "absent", 20) == 20


def test_list_skips_comments_and_blanks(tmp_path: Path):
    p = tmp_path / "rcpthosts"
    p.write_bytes(b"# comment\nexample.com  \n\n.sub.example.net\t\n")
    assert read_list(p) == ["example.com", ".sub.example.net"]
    assert read_list(tmp_path / "absent") is None


def test_unreadable_control_is_an_error(tmp_path: Path):
    d = tmp_path / "rcpthosts"
    d.mkdir()  # reading a directory fails with something other than ENOENT
    with pytest.raises(ControlError):
        read_list(d)


def test_settings_defaults_and_overrides(tmp_path: Path):
    s = load_settings(tmp_path)
    assert s.smtp.max_line_length == 4096
    (tmp_path / "qrelay.toml").write_text("[smtp]\nmax_recipients = 50\nshutdown_grace = 3\n")
    s = load_settings(tmp_path)
    assert s.smtp.max_recipients == 50 and s.smtp.shutdown_grace == 3.0


@pytest.mark.parametrize("text, message", [
    ("[smtp]\nmax_recipientz = 5\n", "[smtp] unknown setting 'max_recipientz'"),
    ("[smpt]\n", "unknown section [smpt]"),
    ("[smtp]\nmax_recipients = 'many'\n", "[smtp] max_recipients: expected an integer, got a string"),
    ("[delivery]\ndns_timeout = true\n", "[delivery] dns_timeout: expected a float, got a boolean"),
    ("[delivery]\ndns_servers = [53]\n", "[delivery] dns_servers: expected an array of strings"),
    ("smtp = 5\n", "[smtp] must be a table, not an integer"),
    ("[smtp]\nmax_recipients = -1\n", "[smtp] max_recipients = -1: must not be negative"),
    ("[smtp]\nmax_line_length = 0\n",
     "[smtp] max_line_length = 0 is out of range: at least 512 (RFC 5321 4.5.3.1.4)"),
    ("[smtp]\nmax_line_length = 511\n", "[smtp] max_line_length = 511 is out of range"),
    ("[spool]\nsync_depth = 65\n", "[spool] sync_depth = 65 is out of range: at most 64"),
    ("[auth]\nmax_password_bytes = 8\n",
     "[auth] max_password_bytes = 8 is out of range: at least 16 (room for a passphrase)"),
    ('[delivery]\nmy_addresses = ["192.0.2.1", "192.0.2.300"]\n',
     "[delivery] my_addresses: '192.0.2.300' is not an IP address"),
    ('[pop3]\nwebmail_addresses = ["localhost"]\n',
     "[pop3] webmail_addresses: 'localhost' is not an IP address"),
    ("[spool]\nindex_map_bytes = 140737488355328\n",
     "[spool] index_map_bytes = 140737488355328 is out of range: at most 17592186044416"),
    ("[delivery]\nmx_port = 0\n", "[delivery] mx_port = 0 is out of range: at least 1"),
    ("[scheduler]\nscan_batch = 0\n", "[scheduler] scan_batch = 0 is out of range"),
    ("[log]\nmax_files = 1\n", "[log] max_files = 1 is out of range: at least 2"),
    # (isqrt(age) + 0)^2 <= age: every deferral due again at once, in a loop
    ("[scheduler]\nretry_skip_remote = 0\n",
     "[scheduler] retry_skip_remote = 0 is out of range: at least 1"),
    ("[scheduler]\nretry_skip_local = 0\n", "[scheduler] retry_skip_local = 0 is out of range"),
    # a segment a writer just created, not yet registered, would look abandoned
    ("[spool]\norphan_grace = 0\n", "[spool] orphan_grace = 0 is out of range: at least 600"),
    # TOML has nan and inf; nan passes every range check (each comparison is
    # false) and makes the event loop's timers raise ValueError.
    ("[tls]\nhandshake_timeout = nan\n", "[tls] handshake_timeout = nan: must be a finite number"),
    ("[smtp]\nreload_poll_seconds = nan\n", "[smtp] reload_poll_seconds = nan: must be a finite number"),
    ("[smtp]\nshutdown_grace = inf\n", "[smtp] shutdown_grace = inf: must be a finite number"),
    # TOML's integers are 64-bit; tomllib reads any size, and a receiver then
    # failed every connection (OverflowError converting max_line_length).
    ("[smtp]\nmax_line_length = 99999999999999999999\n",
     "[smtp] max_line_length = 99999999999999999999: too large for a 64-bit integer"),
    ("[smtp]\nmax_line_length = " + "9" * 5000 + "\n", "Exceeds the limit (4300 digits)"),
])
def test_settings_errors_name_the_file_the_section_and_the_key(tmp_path: Path, text: str, message: str):
    (tmp_path / "qrelay.toml").write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'qrelay.toml'}: ")
    assert message in str(info.value)


def test_settings_at_their_minimum_are_accepted(tmp_path: Path):
    (tmp_path / "qrelay.toml").write_text("[smtp]\nmax_line_length = 512\n[spool]\nsync_depth = 64\n")
    s = load_settings(tmp_path)
    assert s.smtp.max_line_length == 512 and s.spool.sync_depth == 64


def test_address_settings_are_spelled_as_they_are_compared(tmp_path: Path):
    """my_addresses is compared with the resolver's spelling of an MX's address
    (ipme: a mismatch is a mail loop), webmail_addresses with the socket's."""
    (tmp_path / "qrelay.toml").write_text('[delivery]\nmy_addresses = ["2001:DB8:0::1", " 192.0.2.1"]\n')
    assert load_settings(tmp_path).delivery.my_addresses == ("2001:db8::1", "192.0.2.1")


def test_a_broken_toml_names_the_file(tmp_path: Path):
    (tmp_path / "qrelay.toml").write_text("[smtp\n")
    with pytest.raises(SettingsError) as info:
        load_settings(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'qrelay.toml'}: ")


def test_read_number_refuses_what_read_int_would_truncate(tmp_path: Path):
    p = tmp_path / "databytes"
    p.write_bytes(b"10MB\n")
    assert read_int(p, 0) == 10                       # qmail's reading
    with pytest.raises(ControlError) as info:
        read_number(p, 0)
    assert str(info.value) == f"{p} line 1: '10MB' is not a number"
    for raw, value in ((b"10000\n", 10000), (b" 42 \r\n", 42), (b"0\n", 0), (b"", 7), (b"\n", 7)):
        p.write_bytes(raw)
        assert read_number(p, 7) == value
    assert read_number(tmp_path / "absent", 20) == 20
    p.write_bytes(b"0\n")
    with pytest.raises(ControlError, match="below the minimum 1"):
        read_number(p, 5, minimum=1)


def test_a_number_of_thousands_of_digits_is_no_traceback(tmp_path: Path):
    p = tmp_path / "databytes"
    p.write_bytes(b"9" * 5000 + b"\n")
    with pytest.raises(ControlError) as info:
        read_number(p, 0)
    assert str(info.value) == f"{p} line 1: a number of 5000 digits is too large"
    assert read_int(p, 7) == 7
    p.write_bytes(b"0" * 5000 + b"42\n")
    assert read_number(p, 0) == 42 and read_int(p, 7) == 42


def test_read_number_refuses_a_negative_number(tmp_path: Path):
    # qmail's scan_ulong reads no sign: `-1` in queuelifetime is the default
    # 604800 there; read as -1 every message would bounce at its first
    # deferral, and `-1` in concurrencyremote would hold all remote mail.
    p = tmp_path / "queuelifetime"
    p.write_bytes(b"-1\n")
    with pytest.raises(ControlError) as info:
        read_number(p, 604800)
    assert str(info.value) == f"{p} line 1: -1 is below the minimum 0"


def test_numbered_lines_keep_the_file_line_numbers(tmp_path: Path):
    p = tmp_path / "smtproutes"
    p.write_bytes(b"# c\n\na:b  \nc:d\n")
    assert read_numbered_lines(p) == [(3, "a:b"), (4, "c:d")]
    assert read_numbered_lines(tmp_path / "absent") is None


def test_a_change_is_reported_once_it_has_settled(tmp_path: Path):
    # The supervisor polls this to send the reload HUP: a file caught half
    # written, or between an editor's removal and its new copy, must not be
    # what the children read; the state after it, one poll later, is.
    (tmp_path / "control").mkdir()
    rules = tmp_path / "control" / "tcp.smtp"
    rules.write_text("1.2.3.:deny\n:allow\n")
    watch = SettledChanges(lambda: stat_fingerprint(tmp_path, ("control/tcp.smtp",)))
    assert not watch.changed()
    rules.write_text("1.2.3.:deny\n")                  # half written
    assert not watch.changed()
    rules.write_text("1.2.3.:deny\n5.6.7.:deny\n:allow\n")
    assert not watch.changed()                          # still moving
    assert watch.changed()                              # the same twice: reload
    assert not watch.changed()                          # once
    rules.unlink()                                      # an editor's save ...
    assert not watch.changed()
    rules.write_text("1.2.3.:deny\n5.6.7.:deny\n:allow\n# saved\n")   # ... its new copy
    assert not watch.changed()
    assert watch.changed()
    rules.unlink()                                      # removed, and it stays so
    assert not watch.changed()
    assert watch.changed()
