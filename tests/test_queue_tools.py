"""engine.queue.tools and `qrelay qstat|qread` through the real CLI."""
from __future__ import annotations

import calendar
import os
import signal
import subprocess
import sys
from pathlib import Path

from engine.queue import Envelope, Spool, SpoolStats
from engine.queue.spool import QueuedMessage, RecipientView
from engine.queue.tools import format_date, format_message, format_qstat, safe
from tests.conftest import REPO, run_cli

BIRTH = calendar.timegm((2026, 11, 27, 2, 25, 36))


def view(addr, channel, done=False, state="pending"):
    return RecipientView(addr, channel, state, done, 0, 0.0, "")


def test_qstat_lines_exact():
    assert format_qstat(SpoolStats(4, 1)) == (
        "messages in queue: 4\nmessages in queue but not yet preprocessed: 1\n")


def test_qread_block_matches_qmail_capture():
    msg = QueuedMessage(1458520, BIRTH, 414, "b@bench.local", "network", 1, 2, True, False,
                        (view("y@sink.test", "remote"), view("z@sink.test", "remote")))
    assert format_message(msg) == ("27 Nov 2026 02:25:36 GMT  #1458520  414  <b@bench.local> \n"
                                   "\tremote\ty@sink.test\n\tremote\tz@sink.test\n")


def test_qread_done_local_first_bouncing_and_sanitised():
    msg = QueuedMessage(7, BIRTH, 10, "", "network", 1, 2, True, True,
                        (view("r@x", "remote"), view("l\x7f\u00e9@x", "local", True, "failed")))
    assert format_message(msg).splitlines() == [
        "27 Nov 2026 02:25:36 GMT  #7  10  <>  bouncing",
        "  done\tlocal\tl___@x",
        "\tremote\tr@x"]
    assert safe("a\tb") == "a_b"
    held = QueuedMessage(8, BIRTH, 10, "a@b", "network", 1, 2, True, False,
                         (view("r@x", "remote"),), held=True)
    assert format_message(held).splitlines()[0] == "27 Nov 2026 02:25:36 GMT  #8  10  <a@b>  held"
    assert format_date(calendar.timegm((2024, 1, 5, 9, 3, 7))) == "5 Jan 2024 09:03:07 GMT"


def test_cli_on_real_spool_including_todo(root: Path):
    with Spool(root / "queue") as s:
        a = s.enqueue(Envelope("joe@example.com", ("bob@example.net", "me@local")), b"hello")
        b = s.enqueue(Envelope("", ("x@y",)), b"12345678")
        s.preprocess(a, ["remote", "local"])
        s.mark_delivered(a, 0)
    r = run_cli("qstat", str(root))
    assert r.returncode == 0 and r.stdout == (
        "messages in queue: 2\nmessages in queue but not yet preprocessed: 1\n")
    r = run_cli("qread", str(root))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith(f"GMT  #{a}  5  <joe@example.com> ")
    assert lines[1:3] == ["\tlocal\tme@local", "  done\tremote\tbob@example.net"]
    assert lines[3].endswith(f"GMT  #{b}  8  <> ")
    assert run_cli("hold", str(root), str(b)).returncode == 0
    assert run_cli("qread", str(root)).stdout.splitlines()[3].endswith(f"GMT  #{b}  8  <>  held")
    assert lines[4] == "\ttodo\tx@y"


def test_cli_works_while_a_writer_holds_the_spool(root: Path):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom engine.queue import Spool, Envelope\n"
         "s = Spool(sys.argv[1])\nfor i in range(3): s.enqueue(Envelope('a@b', ('c@d',)), b'x')\n"
         "print('ready', flush=True)\ntime.sleep(60)\n", str(root / "queue")],
        stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline() == b"ready\n"
        r = run_cli("qstat", str(root))
        assert r.stdout.startswith("messages in queue: 3\n"), r.stderr
        assert run_cli("qread", str(root)).stdout.count("\ttodo\tc@d") == 3
    finally:
        os.kill(child.pid, signal.SIGTERM)
        child.communicate(timeout=10)


def test_cli_errors_are_one_line(tmp_path: Path, root: Path):
    for cmd in ("qstat", "qread"):
        r = run_cli(cmd, str(tmp_path / "missing"))
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("qstat", str(root))          # initialised, nothing ever queued
    assert r.stdout == "messages in queue: 0\nmessages in queue but not yet preprocessed: 0\n"
    assert run_cli("qread", str(root)).stdout == ""
    (root / "queue" / "index").mkdir()
    (root / "queue" / "index" / "data.mdb").write_bytes(b"not an lmdb file" * 100)
    r = run_cli("qstat", str(root))
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_a_qmail_queue_in_the_root_is_pointed_out_not_counted_silently(root: Path):
    """A qmail home turned qrelay root: qstat says 0 for the spool, and says
    where the qmail queue's mail is and how to bring it in."""
    for d in ("mess", "todo"):
        (root / "queue" / d).mkdir()
    r = run_cli("qstat", str(root))
    assert r.stdout == "messages in queue: 0\nmessages in queue but not yet preprocessed: 0\n"
    assert r.stderr == (f"qrelay: note: {root}/queue holds a qmail queue that is not counted "
                        f"here: qrelay import-qmail {root} {root}/queue\n")
