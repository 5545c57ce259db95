from pathlib import Path

from engine.config.control import read_int, read_line, read_list


def test_init_creates_qmail_home(tmp_path: Path, qrelay_cli):
    root = tmp_path / "r"
    res = qrelay_cli("init", str(root), "--me", "mx.example.com")
    assert res.returncode == 0, res.stderr
    control = root / "control"
    assert read_line(control / "me") == "mx.example.com"
    assert read_list(control / "rcpthosts") == ["mx.example.com"]
    assert read_line(control / "defaultdomain") == "example.com"
    assert read_int(control / "concurrencyremote", 0) == 20
    assert read_int(control / "queuelifetime", 0) == 604800
    assert read_int(control / "databytes", -1) == 0
    assert (control / "smtproutes").read_text() == ""
    assert (control / "tcp.smtp").read_text() == (
        '127.:allow,RELAYCLIENT=""\n::1:allow,RELAYCLIENT=""\n:allow\n')
    for d in ("users", "queue", "log"):
        assert (root / d).is_dir()


def test_init_sets_its_modes_whatever_the_umask(tmp_path: Path):
    """Under root's umask 077 (a hardened box) the root and control/ came out
    0700 and the control files 0600: the run user read none of them, and
    `qrelay run` refused to start. init sets qmail's modes itself."""
    import os
    import stat
    import subprocess
    import sys
    from tests.conftest import REPO
    root = tmp_path / "r"
    got = subprocess.run([sys.executable, "-c", "import os; os.umask(0o077); "
                          "from engine.cli import main; main()",
                          "init", str(root), "--me", "mx.example.com"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)   # noqa: E731
    assert [mode(root / d) for d in ("", "control", "users")] == [0o755] * 3
    assert {p.name: mode(p) for p in (root / "control").iterdir()} == {
        p.name: 0o644 for p in (root / "control").iterdir()}
    pre = tmp_path / "pre"
    pre.mkdir(mode=0o750)
    got = subprocess.run([sys.executable, "-c", "import os; os.umask(0o077); "
                          "from engine.cli import main; main()", "init", str(pre)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert mode(pre) == 0o750            # the operator's own root keeps its mode


def test_init_refuses_existing_root_unless_forced(tmp_path: Path, qrelay_cli):
    root = tmp_path / "r"
    assert qrelay_cli("init", str(root), "--me", "a.example").returncode == 0
    (root / "control" / "me").write_text("kept.example\n")
    res = qrelay_cli("init", str(root), "--me", "b.example")
    assert res.returncode == 1
    assert "already" in res.stderr and "Traceback" not in res.stderr
    assert read_line(root / "control" / "me") == "kept.example"
    res = qrelay_cli("init", str(root), "--me", "b.example", "--force")
    assert res.returncode == 0
    assert read_line(root / "control" / "me") == "b.example"


def test_init_rejects_bad_host_name(tmp_path: Path, qrelay_cli):
    res = qrelay_cli("init", str(tmp_path / "r"), "--me", "bad\nname")
    assert res.returncode == 1 and "invalid host name" in res.stderr
    # A name no address can carry: rcpthosts and locals would never match
    # (every recipient 553), and the greeting and HELO would say it.
    for bad in ("mx example.com", "mx\texample.com", "a..example", ".example.com",
                "mx.example.com.", "mx:25", ""):     # "": `--me "$HOST"`, $HOST unset
        res = qrelay_cli("init", str(tmp_path / "r"), "--me", bad)
        assert res.returncode == 1, bad
        assert res.stderr == f"Error: invalid host name for --me: {bad!r}\n"
        assert not (tmp_path / "r").exists()
    assert qrelay_cli("init", str(tmp_path / "r"), "--me", "mx-1.ex_ample.com").returncode == 0


def test_version(qrelay_cli):
    res = qrelay_cli("--version")
    assert res.returncode == 0 and "qrelay, version" in res.stdout


def test_missing_compiled_core_is_a_clear_error(tmp_path: Path):
    # A checkout without the built extension must fail loudly, not fall back.
    # -S keeps the editable install's import hook from finding the real checkout.
    import shutil
    import subprocess
    import sys
    from tests.conftest import REPO
    shutil.copytree(REPO / "engine", tmp_path / "engine",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    res = subprocess.run([sys.executable, "-S", "-c", "import engine"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "compiled SMTP core" in res.stderr and "pip install -e ." in res.stderr
