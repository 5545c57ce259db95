from pathlib import Path

import pytest

from engine.config.control import ControlError, read_int, read_line, read_list
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


@pytest.mark.parametrize("text, fragment", [
    ("[smtp]\nmax_recipientz = 5\n", "unknown setting 'max_recipientz'"),
    ("[smpt]\n", "unknown section [smpt]"),
    ("[smtp]\nmax_recipients = 'many'\n", "expected int"),
    ("[smtp]\nmax_recipients = -1\n", "must not be negative"),
    ("[smtp\n", "qrelay.toml"),
])
def test_settings_errors_name_the_problem(tmp_path: Path, text: str, fragment: str):
    (tmp_path / "qrelay.toml").write_text(text)
    with pytest.raises(SettingsError, match=None) as info:
        load_settings(tmp_path)
    assert fragment in str(info.value)
