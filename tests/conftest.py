"""Shared fixtures: real temp dirs, real subprocesses, each stopped by its own pid."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `qrelay ARGS` as a real subprocess of this interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


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
