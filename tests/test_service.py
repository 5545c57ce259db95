"""engine/delivery/service.py: the scheduler process's configuration, live.

Every file the delivery side reads is reread on HUP and when its mtime
changes (the supervisor polls them), with no restart; a broken edit is
refused with qmail-send's `alert:` line and the previous configuration kept.
End to end with real `qrelay run` processes, loopback sinks and the fake DNS
(tests/test_delivery_e2e.py's fixtures); each process is stopped by its pid.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from engine.delivery.service import (DELIVERY_FILES, DeliveryConfigError, SwappableCourier,
                                     alias_uid, delivery_fingerprint, load_delivery_config)
from tests.conftest import REPO
from tests.test_delivery_e2e import (free_port, relay, send, service_texts, sink,  # noqa: F401
                                     texts, wait_for)

RELOADED = "info: scheduler: configuration reloaded"


def scheduler_starts(root) -> int:
    return sum(bool(re.match(r"info: supervisor: started qrelay-scheduler-0 pid \d+$", t))
               for t in service_texts(root))


def reloads(root) -> int:
    return service_texts(root).count(RELOADED)


def routes(root, table: dict[str, int]) -> None:
    (root / "control" / "smtproutes").write_text(
        "".join(f"{d}:127.0.0.1:{p}\n" for d, p in table.items()))


def ready(root) -> None:
    wait_for(lambda: any(t.startswith("status: local ") for t in texts(root)),
             what="the scheduler's first status line")


def subjects(sink) -> list[bytes]:
    return [re.search(rb"Subject: (\S+)", m.content).group(1) for m in sink.messages()]


# --- per file, end to end ------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_smtproutes_edit_and_hup_moves_the_next_delivery_with_no_restart(relay, sink, root, workers):
    first = ThreadSinkPair(sink)
    q = relay({"sink.test": first.a}, delivery=f"worker_procs = {workers}\n")
    ready(root)
    send(q.port, ["x@sink.test"], tag="before")
    wait_for(lambda: first.count("a") == 1, what="delivery on the first route")
    routes(root, {"sink.test": first.b})
    os.kill(q.pid, signal.SIGHUP)
    wait_for(lambda: reloads(root) >= 1, what="the scheduler's reload")
    send(q.port, ["x@sink.test"], tag="after")
    wait_for(lambda: first.count("b") == 1, what="delivery on the new route")
    assert first.count("a") == 1
    assert scheduler_starts(root) == 1                  # reloaded, not restarted
    first.close()


class ThreadSinkPair:
    """Two RecordingSinks in the test's sink thread: route a and route b."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.a = sink.start()
        self.first = sink.current
        self.b = sink.start()
        self.second = sink.current

    def count(self, which: str) -> int:
        target = self.first if which == "a" else self.second

        async def snap():
            return len(target.messages)
        return self.sink._call(snap())

    def close(self) -> None:
        self.sink._call(self.first.stop())


def test_smtproutes_edit_is_picked_up_without_hup(relay, sink, root):
    pair = ThreadSinkPair(sink)
    q = relay({"sink.test": pair.a}, toml="[smtp]\nreload_poll_seconds = 0.2\n")
    ready(root)
    routes(root, {"sink.test": pair.b})
    wait_for(lambda: reloads(root) >= 1, what="a reload after the mtime change")
    assert "info: supervisor: control files changed: reloading" in service_texts(root)
    send(q.port, ["x@sink.test"])
    wait_for(lambda: pair.count("b") == 1, what="delivery on the new route")
    assert pair.count("a") == 0
    pair.close()


def test_a_bad_smtproutes_line_is_refused_and_the_previous_routes_kept(relay, sink, root):
    port = sink.start()
    q = relay({"sink.test": port})
    ready(root)
    path = root / "control" / "smtproutes"
    path.write_text(f"sink.test:127.0.0.1:{port}\nother.test:127.0.0.1:26x26\n")
    os.kill(q.pid, signal.SIGHUP)
    alert = (f"alert: unable to reread controls: {path} line 2: bad port '26x26' in"
             " 'other.test:127.0.0.1:26x26' (a number from 1 to 65535); keeping the previous"
             " configuration")
    wait_for(lambda: alert in texts(root), what="the alert line")
    send(q.port, ["x@sink.test"])
    wait_for(lambda: len(sink.messages()) == 1, what="delivery on the kept route")
    assert reloads(root) == 0 and scheduler_starts(root) == 1


def test_concurrencyremote_change_is_live(relay, sink, root):
    port = sink.start(delay=0.5)
    q = relay({"sink.test": port}, controls={"concurrencyremote": "2"})
    ready(root)
    assert texts(root)[0] == "status: local 0/10 remote 0/2"
    (root / "control" / "concurrencyremote").write_text("7\n")
    os.kill(q.pid, signal.SIGHUP)
    wait_for(lambda: reloads(root) >= 1, what="the reload")
    send(q.port, ["x@sink.test"])
    wait_for(lambda: any(t.startswith("status: ") and t.endswith("/7") for t in texts(root)),
             what="a status line with the new limit")
    # A broken edit keeps 7.
    (root / "control" / "concurrencyremote").write_text("lots\n")
    os.kill(q.pid, signal.SIGHUP)
    wait_for(lambda: any("concurrencyremote line 1: 'lots' is not a number; keeping the previous"
                         in t for t in texts(root)), what="the alert line")


def test_queuelifetime_change_is_live(relay, sink, root):
    live = sink.start()
    dead = free_port()
    q = relay({"sink.test": dead, "src.test": live})
    ready(root)
    send(q.port, ["x@sink.test"])
    wait_for(lambda: any("deferral:" in t for t in texts(root)), what="the first deferral")
    (root / "control" / "queuelifetime").write_text("1\n")
    os.kill(q.pid, signal.SIGHUP)
    wait_for(lambda: reloads(root) >= 1, what="the reload")
    time.sleep(1.1)                                     # older than the new lifetime
    os.kill(q.pid, signal.SIGALRM)                      # retry now
    bounce = wait_for(lambda: [m for m in sink.messages() if m.mail.startswith(b"MAIL FROM:<>")],
                      what="the expiry bounce")[0]
    assert b"this message has been in the queue too long." in bounce.content


def test_tlsdestinations_edit_is_reread_and_the_log_says_tls(relay, sink, root):
    import trustme

    from tests.test_remote_tls import server_context
    port = sink.start(tls_context=server_context(trustme.CA(), "127.0.0.1"))
    q = relay({"sink.test": port}, toml="[smtp]\nreload_poll_seconds = 0.2\n")
    ready(root)
    send(q.port, ["x@sink.test"], tag="tls")
    said = "/Remote_host_said:_250_ok_queued/"
    wait_for(lambda: any(f"success: 127.0.0.1_TLS_transmitted_message_accepted.{said}" in t
                         for t in texts(root)), what="the TLS delivery's log line")
    (root / "control" / "tlsdestinations").write_text("!127.0.0.1:\n")   # the relay's name
    wait_for(lambda: reloads(root) >= 1, what="a reload after the mtime change")
    send(q.port, ["x@sink.test"], tag="clear")
    wait_for(lambda: any(f"success: 127.0.0.1_accepted_message.{said}" in t for t in texts(root)),
             what="the clear delivery's log line")
    assert [m.tls for m in sink.messages()] == [True, False]
    assert scheduler_starts(root) == 1


# --- pieces --------------------------------------------------------------------

def test_every_file_the_delivery_side_reads_is_watched(root):
    assert {"control/smtproutes", "control/concurrencyremote", "control/concurrencylocal",
            "control/queuelifetime", "control/timeoutconnect", "control/timeoutremote",
            "control/helohost", "control/locals", "control/virtualdomains",
            "control/tlsdestinations", "control/tlsclientciphers",
            "qrelay.toml"} <= set(DELIVERY_FILES)
    before = delivery_fingerprint(root)
    (root / "control" / "timeoutconnect").write_text("5\n")
    assert delivery_fingerprint(root) != before


@pytest.mark.parametrize("name, text, fragment", [
    ("control/smtproutes", "nocolon\n", "smtproutes line 1: no ':'"),
    ("control/tlsdestinations", "*:\n-a.test:;99999\n", "tlsdestinations line 2: bad port"),
    ("control/concurrencyremote", "20x\n", "concurrencyremote line 1: '20x' is not a number"),
    ("control/queuelifetime", "1w\n", "queuelifetime line 1: '1w' is not a number"),
    ("control/timeoutconnect", "abc\n", "timeoutconnect line 1"),
    ("qrelay.toml", "[delivery]\ndns_servers = [\"nameserver\"]\n", "[delivery] dns_servers"),
    ("qrelay.toml", "[scheduler]\nscan_batch = 0\n", "[scheduler] scan_batch = 0 is out of range"),
])
def test_load_delivery_config_names_the_broken_file(root, name, text, fragment):
    load_delivery_config(root)
    (root / name).write_text(text)
    with pytest.raises(DeliveryConfigError) as info:
        load_delivery_config(root)
    assert fragment in str(info.value) and "\n" not in str(info.value)


class GatedCourier:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.closed = False
        self.calls = 0

    async def deliver(self, group):
        self.calls += 1
        await self.gate.wait()
        return ["done"]

    async def close(self):
        self.closed = True


def test_a_replaced_courier_is_closed_only_after_its_deliveries():
    async def scenario():
        old, new = GatedCourier(), GatedCourier()
        live = SwappableCourier(old)
        running = asyncio.ensure_future(live.deliver("g1"))
        await asyncio.sleep(0.01)
        live.swap(new)
        new.gate.set()
        assert await live.deliver("g2") == ["done"]
        assert (old.calls, new.calls) == (1, 1)
        await asyncio.sleep(0.01)
        assert not old.closed                            # its delivery is still running
        old.gate.set()
        assert await running == ["done"]
        await asyncio.sleep(0.01)
        assert old.closed and not new.closed
        idle = GatedCourier()
        live.swap(idle)                                  # nothing in flight: closed at once
        await asyncio.sleep(0.01)
        assert new.closed
        await live.close()
        assert idle.closed

    asyncio.run(scenario())


def test_a_hup_while_the_scheduler_starts_is_not_lost(root, dns):
    """The supervisor sends one HUP for a settled change. One that came while
    the scheduler was starting (a long spool recovery, after a restart) was
    ignored, and the edit it was for never applied until another change."""
    (root / "qrelay.toml").write_text(f'[delivery]\ndns_servers = ["{dns.address}"]\n')
    code = ("import os, signal, sys\n"
            "from pathlib import Path\n"
            "from engine.queue import Spool\n"
            "from engine.delivery.service import scheduler_main\n"
            f"root = Path({str(root)!r})\n"
            "recover = Spool.recover\n"
            "def recover_after_an_edit(self):\n"
            "    (root / 'control' / 'concurrencyremote').write_text('3\\n')\n"
            "    os.kill(os.getpid(), signal.SIGHUP)    # the supervisor's, for that edit\n"
            "    return recover(self)\n"
            "Spool.recover = recover_after_an_edit\n"
            "scheduler_main(str(root))\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: reloads(root) == 1, what="the reload the HUP asked for")
    finally:
        p.terminate()
        status = p.wait(30)
        stderr = p.stderr.read()
        p.stderr.close()
    assert status == 0 and "Traceback" not in stderr, stderr


def test_a_scheduler_that_cannot_start_says_why_on_stderr_and_in_the_log(root):
    (root / "control" / "smtproutes").write_text("sink.test:127.0.0.1:26x26\n")
    code = "import sys; from pathlib import Path; from engine.delivery.service import run_scheduler; " \
           f"sys.exit(run_scheduler(Path({str(root)!r})))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 111
    reason = (f"cannot start: {root / 'control' / 'smtproutes'} line 1: bad port '26x26' in"
              " 'sink.test:127.0.0.1:26x26' (a number from 1 to 65535)")
    assert r.stderr.strip().splitlines() == [f"qrelay: scheduler: alert: {reason}"]
    assert texts(root)[-1] == f"alert: {reason}"


def test_a_pid_file_that_cannot_be_written_does_not_stop_the_scheduler(root, dns):
    # log/scheduler.pid is for an operator's eyes; on a full disk its write
    # failed (ENOSPC) and the scheduler died at every restart, a traceback
    # each time, so nothing was delivered and nothing freed the disk. Here
    # the write fails because its temporary name is a directory.
    (root / "qrelay.toml").write_text(f'[delivery]\ndns_servers = ["{dns.address}"]\n')
    (root / "log" / "scheduler.pid").write_text("1\n")          # a dead scheduler's
    (root / "log" / "scheduler.pid.tmp").mkdir()
    code = "import sys; from pathlib import Path; from engine.delivery.service import run_scheduler; " \
           f"sys.exit(run_scheduler(Path({str(root)!r})))"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        ready(root)
        assert f"warning: cannot write {root / 'log' / 'scheduler.pid'}: Is a directory" in texts(root)
        assert not (root / "log" / "scheduler.pid").exists()
    finally:
        p.terminate()
        status = p.wait(30)
        stderr = p.stderr.read()
        p.stderr.close()
    assert status == 0 and "Traceback" not in stderr, stderr


def test_a_scheduler_whose_spool_recovery_fails_says_why_in_one_line(root):
    # A full index map (or disk) and a stopped writer's segment to seal: the
    # recovery's commit failed and the scheduler died with a traceback, the
    # log saying nothing of why, at every restart.
    (root / "qrelay.toml").write_text("[spool]\nindex_map_bytes = 524288\n")
    fill = ("import os\n"
            "from engine.config.settings import SpoolSettings\n"
            "from engine.queue import Envelope, Spool, SpoolWriteError\n"
            f"s = Spool({str(root / 'queue')!r}, SpoolSettings(index_map_bytes=524288))\n"
            "try:\n"
            "    while True:\n"
            "        s.enqueue(Envelope('a@b', ('c@d',)), b'x' * 100)\n"
            "except SpoolWriteError:\n"
            "    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", fill], cwd=REPO, check=True, timeout=120)
    code = "import sys; from pathlib import Path; from engine.delivery.service import run_scheduler; " \
           f"sys.exit(run_scheduler(Path({str(root)!r})))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 111, r.stderr
    reason = ("cannot start: cannot repair the spool index: the spool index is full (its map of"
              " 524288 bytes is used up; raise [spool] index_map_bytes)")
    assert r.stderr.strip().splitlines() == [f"qrelay: scheduler: alert: {reason}"]
    assert texts(root)[-1] == f"alert: {reason}"


def test_the_alias_user_is_the_system_user_alias(monkeypatch):
    """Its forwards say `invoked by alias`, as qmail-queue's auto_uida does."""
    import pwd
    from types import SimpleNamespace
    real = pwd.getpwnam

    def getpwnam(name: str):
        if name == "alias":
            return SimpleNamespace(pw_name="alias", pw_uid=7790, pw_gid=2108, pw_dir="/var/qmail/alias")
        return real(name)
    monkeypatch.setattr("pwd.getpwnam", getpwnam)
    assert alias_uid() == 7790
    monkeypatch.setattr("pwd.getpwnam", real)
    try:
        real("alias")
    except KeyError:
        assert alias_uid() is None
