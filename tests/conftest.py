"""Shared fixtures: real temp dirs, real subprocesses, each stopped by its own pid."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# Hypothesis fails an example slower than 200 ms (DeadlineExceeded, or Flaky
# when the rerun is quick): on a loaded 2-core CI machine a stall that long
# is no bug. The property tests that set their own settings say None too.
settings.register_profile("qrelay", deadline=None)
settings.load_profile("qrelay")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `qrelay ARGS` as a real subprocess of this interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def searchable(path: Path) -> Path:
    """path, with o+x added (list stays private): a root `qrelay run` drops to
    `[run] user` (engine/privilege.py), who must reach the test's root."""
    path.chmod(path.stat().st_mode | 0o111)
    return path


def pytest_configure(config):
    # The files and directories tests make (roots, Maildirs, spools) get the
    # modes a usual shell gives, whatever umask the suite was started under
    # (077 made every root unreachable by the run user): tests that are about
    # the umask set their own.
    os.umask(0o022)
    # As root (CI), every `qrelay run` runs its children as the qrelay user,
    # who must reach the test roots: pytest's own /tmp/pytest-of-root is kept
    # 0700 by pytest, so the temporary directories go under a searchable one.
    if os.geteuid() == 0 and not config.option.basetemp:
        import tempfile
        top = searchable(Path(tempfile.mkdtemp(prefix="qrelay-tests-")))
        config.option.basetemp = str(top / "tmp")
        config.qrelay_tmp = top


def pytest_unconfigure(config):
    top = getattr(config, "qrelay_tmp", None)
    if top is not None:
        import shutil
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _temp_dirs_searchable(tmp_path_factory):
    """pytest makes its temporary directories 0700: as root, make them
    searchable (o+x) for the qrelay user (see pytest_configure)."""
    if os.geteuid() != 0:
        return
    searchable(tmp_path_factory.getbasetemp())
    mktemp = tmp_path_factory.mktemp

    def mktemp_searchable(*args, **kwargs):
        return searchable(mktemp(*args, **kwargs))
    tmp_path_factory.mktemp = mktemp_searchable


@pytest.fixture
def qrelay_cli():
    return run_cli


@pytest.fixture
def sinks(tmp_path: Path):
    """Start `bench/sink.py` processes (port 0); each stopped by its pid afterwards."""
    sys.path.insert(0, str(REPO / "bench"))
    from sink import SinkProcess
    started: list = []

    def start(*args: str):
        s = SinkProcess(tmp_path / f"s{len(started)}", "--quiet", *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def redis_server(tmp_path: Path):
    """A real redis-server on a free loopback port (bench/redis_process.py),
    stopped by its pid afterwards."""
    sys.path.insert(0, str(REPO / "bench"))
    from redis_process import RedisServer
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def dns():
    """A fake DNS server (dnslib) on 127.0.0.1, empty zone: tests never ask the system's."""
    from tests.fakedns import FakeDns
    with FakeDns({}) as server:
        yield server


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fresh qrelay home made by the real `init` code."""
    from engine.home import init_home
    return init_home(tmp_path / "qrelay", me="mx.example.com")
