"""`qrelay relayclients` (engine/cli/relay.py): list, add, del, import of
vpopmail's open-smtp with old and fresh entries, export round trip, bad input."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from engine.config.settings import Settings
from engine.relay import open_relay_table
from engine.relay.opensmtp import RULE
from tests.conftest import REPO, run_cli


def entries(root: Path) -> dict[str, float]:
    async def read():
        table = open_relay_table(root, Settings())
        try:
            return dict(await table.entries())
        finally:
            await table.close()
    return asyncio.run(read())


def test_add_list_del(root: Path) -> None:
    done = run_cli("relayclients", "add", str(root), "192.0.2.1", "--ttl", "120")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"qrelay: 192\.0\.2\.1 may relay until \S+ \S+ UTC \(1[12]\d s left\)\n",
                        done.stdout)
    assert run_cli("relayclients", "add", str(root), "::ffff:192.0.2.2").returncode == 0
    listed = run_cli("relayclients", str(root))
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["192.0.2.1", "192.0.2.2"]
    assert re.search(r"\(10[78]\d\d s left\)$", lines[1])      # 10800 s by default
    assert run_cli("relayclients", "list", str(root)).stdout.split("\t")[0] == "192.0.2.1"
    gone = run_cli("relayclients", "del", str(root), "192.0.2.1")
    assert gone.returncode == 0 and gone.stdout == "qrelay: removed 192.0.2.1\n"
    again = run_cli("relayclients", "del", str(root), "192.0.2.1")
    assert again.returncode == 0 and "was not in the relay table" in again.stdout
    assert list(entries(root)) == ["192.0.2.2"]


def test_import_keeps_remaining_lifetime(root: Path, tmp_path: Path) -> None:
    now = int(time.time())
    open_smtp = tmp_path / "open-smtp"
    open_smtp.write_text(
        f"192.0.2.1:{RULE}\t{now - 3600}\n"           # logged in an hour ago: 2 h left
        f"192.0.2.2:{RULE}\t{now - 20000}\n"          # older than 3 h: expired
        f"192.0.2.3:{RULE}\t{now}\n"                  # fresh: 3 h left
        f"192.0.2.4:{RULE}\n"                         # no timestamp
        "192.0.2.5 allow\tsoon\n"
        f"192.0.2.6:{RULE}\t{now - 10801}\n")         # just expired
    done = run_cli("relayclients", "import", str(root), str(open_smtp))
    assert done.returncode == 1     # malformed lines were there
    assert done.stdout == "qrelay: imported 2, skipped 2 expired, 2 malformed\n"
    assert done.stderr.splitlines() == [
        f"{open_smtp}:4: no login time (TAB then unix seconds) at the end",
        f"{open_smtp}:5: no login time (TAB then unix seconds) at the end"]
    got = entries(root)
    assert set(got) == {"192.0.2.1", "192.0.2.3"}
    assert abs(got["192.0.2.1"] - (now + 7200)) < 1
    assert abs(got["192.0.2.3"] - (now + 10800)) < 1


def test_export_round_trip(root: Path, tmp_path: Path) -> None:
    assert run_cli("relayclients", "add", str(root), "192.0.2.1", "--ttl", "3600").returncode == 0
    assert run_cli("relayclients", "add", str(root), "2001:db8::5").returncode == 0
    before = entries(root)
    out = run_cli("relayclients", "export", str(root))
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [f"192.0.2.1:{RULE}", f"2001:db8::5:{RULE}"]
    exported = tmp_path / "exported"
    assert run_cli("relayclients", "export", str(root), "-o", str(exported)).returncode == 0
    assert exported.read_text() == out.stdout
    other = tmp_path / "other"
    assert run_cli("init", str(other), "--me", "mx.example.com").returncode == 0
    done = run_cli("relayclients", "import", str(other), str(exported))
    assert done.returncode == 0 and done.stdout.startswith("qrelay: imported 2,")
    after = entries(other)
    assert set(after) == set(before)
    for ip, until in before.items():
        assert until - 2 < after[ip] <= until      # whole seconds in the file


def test_export_a_write_cannot_finish_keeps_the_old_file_and_leaves_no_temp(root: Path,
                                                                         tmp_path: Path) -> None:
    """The export wrote .FILE.tmp without fsync and left it half written when a
    write failed (a full disk; here RLIMIT_FSIZE's EFBIG, in a child that
    ignores SIGXFSZ)."""
    now = int(time.time())
    source = tmp_path / "open-smtp"
    source.write_text("".join(f"192.0.2.{i}:{RULE}\t{now}\n" for i in range(1, 61)))
    assert run_cli("relayclients", "import", str(root), str(source)).returncode == 0
    out = tmp_path / "out"
    out.write_text("old\n")
    code = ("import resource, runpy, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))\n"
            "sys.argv = ['qrelay'] + sys.argv[1:]\n"
            "runpy.run_module('engine.cli', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code, "relayclients", "export", str(root),
                           "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert done.stderr == f"Error: {out}: File too large\n"
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_bad_input_is_one_line_exit_2(root: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"      # a mistyped ROOT: a directory, but no qrelay root
    empty.mkdir()
    for args in (("add", str(empty), "192.0.2.1"),
                 ("list", str(empty)),
                 ("add", str(root), "192.0.2.300"),
                 ("add", str(root), "192.0.2.1", "--ttl", "0"),
                 ("add", str(root), "192.0.2.1", "--ttl", "1e300"),   # no expiry fits it
                 ("del", str(root), "nonsense"),
                 ("import", str(root), str(tmp_path / "missing")),
                 ("list", str(tmp_path / "no-root")),
                 ("export", str(root), "-o", "")):
        done = run_cli("relayclients", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert list(empty.iterdir()) == []      # no relay table made there
    # `relayclients import ROOT - <&-`: no stdin is one line too, not a traceback.
    closed = subprocess.run([sys.executable, "-m", "engine.cli", "relayclients", "import",
                             str(root), "-"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, timeout=60,
                            preexec_fn=lambda: os.close(0))
    assert (closed.returncode, closed.stderr.splitlines()) == (
        2, ["Error: -: standard input is closed"])
    (root / "qrelay.toml").write_text('[relay]\nstore = "bogus"\n')
    done = run_cli("relayclients", str(root))
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "[relay] store" in done.stderr


def test_an_unreachable_redis_is_one_line_that_says_why(root: Path) -> None:
    """The store's outage warning went to stderr beside the command's error:
    two lines, and the error itself without the reason ('relay store ...
    unreachable (grant)')."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # closed once the block ends: refused
    (root / "qrelay.toml").write_text(f'[relay]\nstore = "redis://:hunter2@127.0.0.1:{port}/0"\n')
    for args in (("add", str(root), "192.0.2.1"), ("list", str(root))):
        done = run_cli("relayclients", *args)
        lines = done.stderr.splitlines()
        assert done.returncode == 1 and len(lines) == 1, (args, lines)
        assert lines[0].startswith(f"Error: relay store redis://:***@127.0.0.1:{port}/0 "
                                   "unreachable (") and f"to 127.0.0.1:{port}" in lines[0], lines
        assert "hunter2" not in done.stderr


def test_help_says_what_is_read_and_written() -> None:
    for cmd in ("list", "add", "del", "import", "export"):
        out = run_cli("relayclients", cmd, "--help").stdout
        assert "relay table" in " ".join(out.split()), cmd


def test_import_grants_only_lines_that_say_relayclient(root: Path, tmp_path: Path) -> None:
    # open-smtp lines are tcprules rules: one without RELAYCLIENT lets its IP
    # connect, never relay, so it is no grant (vpopmail would not relay it).
    now = int(time.time())
    open_smtp = tmp_path / "open-smtp"
    open_smtp.write_text(
        f"192.0.2.1:allow\t{now}\n"
        f"192.0.2.2:allow,RBLSMTPD=\"\"\t{now}\n"
        f"192.0.2.3:allow,RBLSMTPD=\"-RELAYCLIENT\"\t{now}\n"
        f"192.0.2.4:allow,RELAYCLIENT=//,RBLSMTPD=//\t{now}\n"     # any quote character
        f"192.0.2.5:allow,RELAYCLIENT=\"\"junk\t{now}\n")
    done = run_cli("relayclients", "import", str(root), str(open_smtp))
    assert done.returncode == 1
    assert done.stdout == "qrelay: imported 1, skipped 0 expired, 4 malformed\n"
    assert [ln.split(": ", 1)[0] for ln in done.stderr.splitlines()] == [
        f"{open_smtp}:1", f"{open_smtp}:2", f"{open_smtp}:3", f"{open_smtp}:5"]
    assert list(entries(root)) == ["192.0.2.4"]



def test_import_never_grants_more_than_a_login_would(root: Path, tmp_path: Path) -> None:
    # A login time in the future (a wrong clock, milliseconds) must not keep
    # an IP relaying for years: at most [relay] pop_before_smtp_ttl from now.
    now = int(time.time())
    open_smtp = tmp_path / "open-smtp"
    open_smtp.write_text(f"192.0.2.1:{RULE}\t{now + 86400 * 365}\n"
                         f"192.0.2.2:{RULE}\t{now * 1000}\n")
    done = run_cli("relayclients", "import", str(root), str(open_smtp))
    assert done.returncode == 0, done.stderr
    got = entries(root)
    assert set(got) == {"192.0.2.1", "192.0.2.2"}
    assert all(until <= time.time() + 10800 for until in got.values())


def test_import_of_a_login_time_too_long_for_a_number(root: Path, tmp_path: Path) -> None:
    # Past a float (400 digits) or Python's int() limit (5000): far in the
    # future, so now, as any other; not a traceback.
    now = int(time.time())
    open_smtp = tmp_path / "open-smtp"
    open_smtp.write_text(f"192.0.2.1:{RULE}\t{'9' * 400}\n192.0.2.2:{RULE}\t{'9' * 5000}\n"
                         f"192.0.2.3:{RULE}\t{now}\n")
    done = run_cli("relayclients", "import", str(root), str(open_smtp))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == "qrelay: imported 3, skipped 0 expired, 0 malformed\n"
    got = entries(root)
    assert set(got) == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    assert all(until <= time.time() + 10800 for until in got.values())
