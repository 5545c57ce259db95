"""contrib/: the systemd unit and the daemontools run scripts, checked for
syntax with the real tools, and their qrelay command lines against qrelay's CLI."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config.settings import LogSettings, SchedulerSettings, SmtpSettings
from tests.conftest import REPO

CONTRIB = REPO / "contrib"
UNIT = CONTRIB / "qrelay.service"
RUN = CONTRIB / "daemontools" / "run"
LOG_RUN = CONTRIB / "daemontools" / "log" / "run"


def unit_settings(text: str) -> dict[tuple[str, str], str]:
    """(section, key) -> value of a unit file (no key appears twice in ours)."""
    out: dict[tuple[str, str], str] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        assert (section, key) not in out, f"{key} twice in [{section}]"
        out[(section, key)] = value
    return out


def check_qrelay_command_line(words: list[str]) -> None:
    """The command line parses with qrelay's own CLI: what `qrelay run --help` lists."""
    from engine.cli import cli
    from engine.smtp.listeners import parse_listen
    assert Path(words[0]).name == "qrelay"
    assert words[1] == "run"
    command = cli.get_command(None, "run")  # type: ignore[arg-type]
    ctx = command.make_context("run", list(words[2:]))   # raises UsageError on a bad option
    for address in ctx.params["listen"]:
        parse_listen(address)
    assert ctx.params["listen"] == ("0.0.0.0:25",)
    assert "/var/qrelay" in words[2:]


def test_unit_runs_qrelay_as_the_supervisor_expects():
    s = unit_settings(UNIT.read_text())
    assert s[("Service", "Type")] == "simple"
    check_qrelay_command_line(shlex.split(s[("Service", "ExecStart")]))
    assert s[("Service", "ExecReload")] == "/bin/kill -HUP $MAINPID"
    # TERM to the supervisor only: it stops its children in phases itself.
    assert s[("Service", "KillMode")] == "mixed"
    assert s[("Service", "KillSignal")] == "SIGTERM"
    assert s[("Service", "Restart")] == "on-failure"
    assert int(s[("Service", "LimitNOFILE")]) >= 4096
    # Two stop phases, each up to the longer grace + 2 s (engine/run.py's stop_grace).
    grace = max(SmtpSettings().shutdown_grace, SchedulerSettings().stop_grace)
    assert int(s[("Service", "TimeoutStopSec")]) > 2 * (grace + 2.0)
    assert s[("Service", "Environment")] == "QRELAY_ROOT=/var/qrelay"
    assert s[("Install", "WantedBy")] == "multi-user.target"


def test_run_qrelay_help_lists_the_units_options():
    done = subprocess.run([sys.executable, "-m", "engine.cli", "run", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "--listen" in done.stdout


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify wants ExecStart's program to exist: point it at this checkout's qrelay.
    qrelay = Path(sys.executable).parent / "qrelay"
    if not os.access(qrelay, os.X_OK):
        pytest.skip(f"{qrelay} is not installed (./dev setup)")
    unit = tmp_path / "qrelay.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/qrelay", str(qrelay)))
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and bad values: it only prints them.
    complaints = [l for l in (done.stdout + done.stderr).splitlines() if "qrelay.service" in l]
    assert done.returncode == 0 and complaints == [], done.stdout + done.stderr


def test_daemontools_scripts_are_executable_sh():
    for script in (RUN, LOG_RUN):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert script.read_text().startswith("#!/bin/sh\n")
        done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr


def test_daemontools_run_execs_qrelay_in_the_foreground():
    lines = [l for l in RUN.read_text().splitlines() if l.startswith("exec ")]
    assert lines[0] == "exec 2>&1"           # stderr into the log service too
    check_qrelay_command_line(shlex.split(lines[-1])[1:])


def test_log_run_rotates_like_qrelays_own_log():
    lines = [l for l in LOG_RUN.read_text().splitlines() if l.startswith("exec ")]
    assert lines == ["exec multilog t s99999 n10 ./main"]
    log = LogSettings()
    assert re.search(rf"\bs{log.max_bytes} n{log.max_files}\b", lines[0])


def test_the_sendmail_program_is_a_console_script():
    import importlib
    import tomllib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["qrelay-sendmail"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.slow
def test_the_source_distribution_builds_a_complete_wheel(tmp_path):
    # What `python -m build` does (and pip with an sdist): the sdist first, then
    # the wheel from the sdist alone, with the Cython sources compiled there.
    import zipfile
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    tree = tmp_path / "tree"
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", hook, str(tmp_path / "dist")], cwd=tree,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sdist = tmp_path / "dist" / done.stdout.split()[-1]
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", str(sdist), "-w", str(tmp_path / "wheel")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = (tmp_path / "wheel").glob("qrelay-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    assert {"engine/status/page.html", "engine/status/status.css",
            "engine/status/status.js"} <= names
    for core in ("_smtpcore", "_fileio"):
        assert any(n.startswith(f"engine/{core}.") and n.endswith(".so") for n in names), core
    assert b"qrelay = engine.cli:main" in entry_points
    assert b"qrelay-sendmail = engine.inject:sendmail_main" in entry_points
