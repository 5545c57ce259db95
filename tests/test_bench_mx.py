"""bench/bench_mx.py: flood → qrelay run → Maildirs of vpopmail mailboxes (local
delivery as their owner) against flood → qrelay run → sink.py, small counts."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "bench_mx.py"


@pytest.mark.skipif(os.geteuid() != 0, reason="local delivery switches to the mailboxes' owner")
def test_both_sides_on_a_small_load(tmp_path):
    out = tmp_path / "fig.json"
    r = subprocess.run([sys.executable, str(BENCH), "-s", "5", "-m", "150", "--domains", "2",
                        "--users", "3", "--rounds", "2", "--procs", "1", "--idle", "20",
                        "--json", str(out)], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode in (0, 1), r.stderr  # 1: the target missed, figures still printed
    fig = json.loads(out.read_text())
    assert fig["targets_met"] == (r.returncode == 0)
    assert fig["rate_local"] > 0 and fig["rate_remote"] > 0
    assert len(fig["rounds_local"]) == len(fig["rounds_remote"]) == 2
    assert fig["ratio_local_remote"] == fig["rate_local"] / fig["rate_remote"]
    assert fig["local_active"] == 0          # qrelay's default
    assert "local end to end (flood -> qrelay -> 6 Maildirs):" in r.stdout
    ratios = [lo / re for lo, re in zip(fig["rounds_local"], fig["rounds_remote"])]
    assert fig["ratio_rounds"] == ratios
    assert fig["ratio_rounds_median"] == sum(ratios) / 2
    assert f"each round's local/remote: {ratios[0]:.2f} {ratios[1]:.2f} (median " in r.stdout


def test_bad_owner_is_one_line():
    r = subprocess.run([sys.executable, str(BENCH), "--owner", "0:0"], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "bench_mx.py: error: --owner: mail is never delivered as root: '0:0'"]


def test_no_worker_sync_shim_skips_only_the_workers_syncs(tmp_path):
    """--no-worker-sync's shim: fsync of a pipe is EINVAL, unless the shim
    returns before the kernel sees it, which it does only in the worker."""
    sys.path.insert(0, str(REPO / "bench"))
    from spool_bench_lib import preload_shim
    so = preload_shim(tmp_path, "worker_nosync")
    probe = ("import ctypes, os, sys\n"
             "ctypes.CDLL(None).prctl(15, sys.argv[1].encode())  # PR_SET_NAME\n"
             "r, w = os.pipe()\n"
             "for sync in (os.fsync, os.fdatasync):\n"
             "    try:\n"
             "        sync(r); print('skipped')\n"
             "    except OSError as exc:\n"
             "        print(exc.errno)\n")
    def run(name: str) -> list[str]:
        r = subprocess.run([sys.executable, "-c", probe, name], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "LD_PRELOAD": so}, check=True)
        return r.stdout.split()
    assert run("qrelay: delivery worker local") == ["skipped", "skipped"]
    assert run("qrelay: scheduler") == [str(errno.EINVAL)] * 2
