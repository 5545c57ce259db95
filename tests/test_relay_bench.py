"""bench/bench_relay_e2e.py: flood → qrelay run → sink.py end to end (and its
--target and --delivery-procs comparisons), with small counts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from sink import SinkProcess  # noqa: E402

BENCH = REPO / "bench" / "bench_relay_e2e.py"
SMALL = ("-s", "5", "-m", "200", "--rounds", "1", "--procs", "1", "--idle", "10")


def run_bench(tmp_path: Path, *args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "fig.json"
    r = subprocess.run([sys.executable, str(BENCH), *args, "--json", str(out)], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    assert r.returncode in (0, 1), r.stderr  # 1: a target missed, figures still printed
    fig = json.loads(out.read_text())
    assert fig["targets_met"] == (r.returncode == 0)
    return r, fig


def test_every_phase_on_a_small_load(tmp_path):
    r, fig = run_bench(tmp_path, *SMALL, "--queue", "300", "--ingest", "100", "--warmup", "20")
    for key in ("rate_direct", "rate_e2e", "rate_relay_ingest", "rate_ingest_empty",
                "rate_ingest_loaded", "rate_drain"):
        assert fig[key] > 0, key
    assert fig["drained"] == 400  # the queue and one round's ingest
    for phase in ("A direct flood -> sink:", "B relay end to end:", "C ingest into empty queue",
                  "D drain of 400 after flush:"):
        assert phase in r.stdout, phase


def test_delivery_procs_compared_end_to_end(tmp_path):
    r, fig = run_bench(tmp_path, *SMALL, "--queue", "0", "--delivery-procs", "0,1", "--domains", "2")
    assert fig["rate_e2e"] > 0 and "rate_drain" not in fig
    one = fig["worker_procs"]["1"]
    assert fig["worker_procs"]["first"] == 0
    assert one["rate_e2e"] > 0 and one["ratio_e2e_first"] > 0
    assert "B relay end to end (worker_procs = 0):" in r.stdout
    assert "B relay end to end, worker_procs = 1:" in r.stdout


def test_slow_disk_compared_with_the_plain_disk_in_the_same_rounds(tmp_path):
    r, fig = run_bench(tmp_path, *SMALL, "--queue", "0", "--slow-sync-ms", "5")
    assert fig["rate_e2e"] > 0 and fig["rate_e2e_fast"] > 0
    assert fig["ratio_slow_fast"] == fig["rate_e2e"] / fig["rate_e2e_fast"]
    assert len(fig["ratio_slow_fast_rounds"]) == 1
    assert "B relay end to end, every sync +5 ms:" in r.stdout and "x plain disk" in r.stdout


def test_target_side_by_side_without_qrelay(tmp_path):
    other = SinkProcess(tmp_path / "other", "--quiet")
    try:
        r, fig = run_bench(tmp_path, "-s", "4", "-m", "100", "--rounds", "2", "--flood-arg=--pipelining",
                           "--flood-arg=-d", "--no-qrelay", "--target", other.address)
        assert fig["rate_direct"] > 0 and len(fig["rounds_direct"]) == 2
        t = fig["target"]
        assert t["accepted"] == 100 and t["ratio_direct"] > 0 and len(t["rounds"]) == 2
        assert "rate_e2e" not in fig and f"T flood -> {other.address} (--target):" in r.stdout
    finally:
        st = other.stop()
    assert st["messages"] == 200


def test_a_qrelay_that_cannot_start_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), *SMALL, "--queue", "0",
                        "--spool-setting", "no_such_setting = 1"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.startswith("bench_relay_e2e.py: error: relay: qrelay run exited"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--no-qrelay"], ["--target", "nope"], ["-m", "0"],
                                  ["--queue", "10", "--ingest", "10"], ["--delivery-procs", "1,1"]])
def test_bad_arguments_exit_2(args):
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
