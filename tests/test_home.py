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
