"""`qrelay qshape | hold | release | requeue | delete | why | qread --json` through the
real CLI, beside a running `qrelay run` (sink on loopback, fake DNS)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from engine.queue import Envelope, Spool
from tests.conftest import run_cli
from tests.test_delivery_e2e import (free_port, queue_count, relay, send, sink,  # noqa: F401
                                     texts, wait_for)


def queued(root: Path) -> list[dict]:
    r = run_cli("qread", str(root), "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def subjects(sink) -> list[bytes]:
    return sorted(re.search(rb"Subject: (\w+)", m.content).group(1) for m in sink.messages())


def deferred_queue(relay, root: Path, senders: list[str]):
    """`qrelay run` with every message deferred (nothing listens on sink.test's port)."""
    port = free_port()
    q = relay({"sink.test": port})
    for i, sender in enumerate(senders):
        send(q.port, ["x@sink.test"], sender=sender, tag=f"m{i}x")
    wait_for(lambda: sum("deferral:" in t for t in texts(root)) >= len(senders),
             what="every message deferred")
    return q, port


def test_held_message_survives_flush_and_goes_once_released(relay, sink, root):
    q, port = deferred_queue(relay, root, ["keep@src.test", "hold@src.test", "hold@src.test"])
    r = run_cli("hold", str(root), "--sender", "hold@src.test")
    assert (r.returncode, r.stdout) == (0, "qrelay: Placed on hold: 2 messages\n"), r.stderr
    held = [m["id"] for m in queued(root) if m["held"]]
    assert len(held) == 2
    sink.start(port)
    assert run_cli("flush", str(root)).returncode == 0
    wait_for(lambda: subjects(sink) == [b"m0x0"], what="the message not held, after flush")
    wait_for(lambda: queue_count(root) == 2, what="the delivered one gone")
    # Another flush and another delivery: the scheduler has passed over the
    # held ones twice, and they are still not delivered.
    send(q.port, ["x@sink.test"], tag="late")
    assert run_cli("flush", str(root)).returncode == 0
    wait_for(lambda: len(sink.messages()) == 2, what="a later message")
    assert subjects(sink) == [b"late0", b"m0x0"]
    w = run_cli("why", str(root), str(held[0]))
    assert w.returncode == 0 and "  held" in w.stdout.splitlines()[0]
    assert "next try: when released" in w.stdout and "last result: Sorry" in w.stdout
    r = run_cli("release", str(root), f"#{held[0]}", str(held[1]))
    assert (r.returncode, r.stdout) == (0, "qrelay: Released from hold: 2 messages\n")
    # Released to their own retry times (400 s away): a flush delivers them.
    assert run_cli("flush", str(root)).returncode == 0
    wait_for(lambda: len(sink.messages()) == 4, what="released messages delivered")
    assert subjects(sink) == [b"late0", b"m0x0", b"m1x0", b"m2x0"]
    wait_for(lambda: queue_count(root) == 0, what="empty queue")


def test_delete_by_domain_beside_a_running_scheduler(relay, sink, root):
    q, port = deferred_queue(relay, root, ["a@src.test", "b@src.test"])
    segments = root / "queue" / "segments"
    r = run_cli("delete", str(root), "--domain", "SINK.test", "--older-than", "0")
    assert (r.returncode, r.stdout) == (0, "qrelay: Deleted: 2 messages\n"), r.stderr
    assert queue_count(root) == 0 and queued(root) == []
    sink.start(port)
    send(q.port, ["x@sink.test"], tag="after")
    assert run_cli("flush", str(root)).returncode == 0
    wait_for(lambda: len(sink.messages()) >= 1, what="the new message")
    assert subjects(sink) == [b"after0"]
    assert not any("bounce msg" in t for t in texts(root))           # delete never bounces
    wait_for(lambda: queue_count(root) == 0, what="empty queue")
    assert all(p.stat().st_size < 1 << 20 for p in segments.iterdir())


def test_requeue_retries_now_and_qshape_shows_the_destination(relay, sink, root):
    q, port = deferred_queue(relay, root, ["a@src.test", "b@src.test", "c@src.test"])
    r = run_cli("qshape", str(root))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                                "1280+"]
    assert lines[1].split()[:3] == ["TOTAL", "3", "3"]
    assert lines[2].split()[:3] == ["sink.test", "3", "3"]
    shape = json.loads(run_cli("qshape", str(root), "--json").stdout)
    assert shape["rows"] == [{"domain": "sink.test", "total": 3, "by_bucket": [3] + [0] * 9}]
    sink.start(port)
    ids = [str(m["id"]) for m in queued(root)]
    r = run_cli("requeue", str(root), *ids[:2])
    assert (r.returncode, r.stdout) == (0, "qrelay: Requeued: 2 messages\n")
    wait_for(lambda: len(sink.messages()) >= 2, what="requeued messages delivered")
    assert subjects(sink)[:2] == [b"m0x0", b"m1x0"]
    # The third follows: a success to sink.test pulls its deferrals forward.
    wait_for(lambda: queue_count(root) == 0, what="empty queue")


def test_qshape_prints_a_destination_as_qread_prints_an_address():
    """A domain is whatever a sender wrote (a bounce goes to it): its bytes
    outside 32..126 print as `_`, as qread's, so none reaches the terminal as
    an escape sequence, and the columns stay aligned."""
    from engine.cli.surgery import format_shape
    from engine.queue.surgery import Shape
    shape = Shape((5, 10), (2, 0, 0), (("evil\x1b[2J\x07.test", 1, (1, 0, 0)),
                                      ("caf\udcff.test", 1, (1, 0, 0))), 2)
    lines = format_shape(shape).splitlines()
    assert lines == ["               T 5 10 10+",
                     "         TOTAL 2 2  0   0",
                     "evil_[2J_.test 1 1  0   0",
                     "     caf_.test 1 1  0   0"]


def test_surgery_leaves_its_trace_in_the_log(root):
    """hold, release, requeue and delete say in ROOT/log/current what they did
    and who did it; a deleted message gets its `end msg`, so a log analyser
    (qmailanalog's matchup) sees it leave the queue instead of waiting for it
    for good."""
    import os
    with Spool(root / "queue") as s:
        ids = [s.enqueue(Envelope("a@src.test", ("x@sink.test",)), b"x") for _ in range(3)]
    said = []
    for args in (("hold", str(ids[0])), ("release", str(ids[0])), ("requeue", str(ids[1])),
                 ("delete", str(ids[0]), str(ids[2]))):
        r = run_cli(args[0], str(root), *args[1:])
        assert r.returncode == 0, (args, r.stderr)
        said.append(f"info: qrelay {args[0]} (uid {os.getuid()}): {r.stdout[8:-1]}")
    assert said[0].endswith("Placed on hold: 1 message") and said[3].endswith("Deleted: 2 messages")
    assert [line[26:] for line in (root / "log" / "current").read_text().splitlines()] == [
        *said, f"end msg {ids[0]}", f"end msg {ids[2]}"]


def test_surgery_as_root_logs_with_a_qrelay_toml_only_root_reads(root):
    """Root's `qrelay hold` acts as the queue's owner; its log line's settings
    were read then, so a qrelay.toml only root may read (spool_of reads it as
    root for that reason) ended the command in a traceback after the hold was made."""
    import os

    import pytest
    if os.geteuid() != 0:
        pytest.skip("needs root: the queue's owner must be another user")
    with Spool(root / "queue") as s:
        msgid = s.enqueue(Envelope("a@src.test", ("x@sink.test",)), b"x")
    for top, dirs, files in os.walk(root / "queue"):
        for name in (top, *(os.path.join(top, f) for f in dirs + files)):
            os.chown(name, 65534, 65534)
    os.chown(root / "log", 65534, 65534)
    (root / "qrelay.toml").write_text("[log]\nmax_files = 5\n")
    os.chmod(root / "qrelay.toml", 0o600)
    r = run_cli("hold", str(root), str(msgid))
    assert (r.returncode, r.stdout, r.stderr) == (0, "qrelay: Placed on hold: 1 message\n", "")
    assert [line[26:] for line in (root / "log" / "current").read_text().splitlines()] == [
        "info: qrelay hold (uid 0): Placed on hold: 1 message"]


def test_bad_input_is_one_line_exit_2(root, tmp_path):
    with Spool(root / "queue") as s:
        s.enqueue(Envelope("a@src.test", ("x@sink.test",)), b"x")
    cases = [
        (("hold", str(tmp_path / "nope"), "1"), "no such qrelay root"),
        (("delete", str(root), "424242"), "no message #424242 in the queue"),
        (("release", str(root), "--domain", "nowhere.test"), "no queued message matches"),
        (("requeue", str(root)), "say which messages"),
        (("hold", str(root), "x1"), "not a message id"),
        (("delete", str(root), "--older-than", "soon"), "not an age"),
        (("why", str(root), "424242"), "no message #424242 in the queue"),
        (("qshape", str(tmp_path / "nope")), "no such qrelay root"),
    ]
    for args, text in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and text in r.stderr, (args, r.stderr)
    r = run_cli("why", str(root), "--json", "1")
    assert r.returncode == 0 and json.loads(r.stdout)["recipients"][0]["state"] == "todo"


def test_ids_out_of_range_or_given_twice_are_one_line_exit_2(root):
    with Spool(root / "queue") as s:
        s.enqueue(Envelope("a@src.test", ("x@sink.test",)), b"x")
    huge = str(1 << 64)
    for args in (("hold", str(root), huge), ("why", str(root), f"#{huge}"),
                 ("delete", str(root), "1", huge)):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "not a message id" in r.stderr, (args, r.stderr)
    r = run_cli("delete", str(root), "424242", "#424242")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "no message #424242 in the queue" in r.stderr and "more" not in r.stderr, r.stderr


def test_json_output_holds_no_lone_surrogate(root):
    """A sender's or a recipient's bytes that are not UTF-8 are surrogate
    escapes inside: printed as `\\udcfe`, a strict JSON parser (Go's, Rust's
    serde) refuses the line. They print as U+FFFD, as the JSON log writes them."""
    with Spool(root / "queue") as s:
        s.enqueue(Envelope("s\udcfe@src.test", ("r\udcff@caf\udce9.test",)), b"x")
    for args in (("qread", str(root), "--json"), ("why", str(root), "--json", "1"),
                 ("qshape", str(root), "--json")):
        r = run_cli(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert "\\udc" not in r.stdout and "\\ufffd" in r.stdout, (args, r.stdout)
        json.loads(r.stdout)
