"""bench/relay.py: flood → qrelay run → sink.py end to end, with small counts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import relay  # noqa: E402
from sink import SinkProcess  # noqa: E402

RELAY = REPO / "bench" / "relay.py"


def run_relay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RELAY), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_end_to_end_through_qrelay(tmp_path):
    out = tmp_path / "r.json"
    r = run_relay("-s", "5", "-m", "200", "--idle", "4", "--e2e-timeout", "30", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["direct"]["accepted"] == 200 and rep["direct"]["rate"] > 0
    assert rep["ingest"]["accepted"] == 200 and rep["ingest"]["failed"] == 0
    assert rep["ratio_ingest_vs_direct"] > 0
    assert "flood → qrelay (ingest)" in r.stdout
    e2e = rep["end_to_end"]
    if e2e is None:  # a build without delivery: reported, not waited for
        assert "ingest only" in r.stdout
    else:
        assert 0 < e2e["delivered"] <= 200 and e2e["rate"] > 0
        assert e2e["complete"] == (e2e["delivered"] == 200)


def test_target_side_by_side_without_qrelay(tmp_path):
    other = SinkProcess(tmp_path / "other", "--quiet")
    try:
        out = tmp_path / "t.json"
        r = run_relay("-s", "4", "-m", "100", "--pipelining", "-d", "--no-qrelay",
                      "--target", other.address, "--rounds", "2", "--json", str(out))
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        assert rep["direct"]["accepted"] == 100
        assert rep["target"]["accepted"] == 100 and rep["target"]["ratio_vs_direct"] > 0
        assert "ingest" not in rep
        assert len(rep["rounds"]) == 2 and "median of 2" in r.stdout
    finally:
        st = other.stop()
    assert st["messages"] == 200


def test_qrelay_unavailable_is_said_clearly(monkeypatch, capsys):
    monkeypatch.setattr(relay, "qrelay_available", lambda: "`qrelay run` is unavailable")
    with pytest.raises(SystemExit) as e:
        relay.main(["-m", "10"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "relay.py: error: `qrelay run` is unavailable\n"


@pytest.mark.parametrize("args", [["--no-qrelay"], ["--target", "nope"], ["-m", "0"]])
def test_bad_arguments_exit_2(args):
    r = run_relay(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
