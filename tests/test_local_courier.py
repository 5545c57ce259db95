"""The async courier: one result per recipient in order, forwards returned,
and blocking work (a program waiting on a FIFO) never stalls the event loop."""
from __future__ import annotations

import asyncio
import os

import pytest

from engine.delivery.local import LocalDelivery, load_local_config
from tests.test_local_fixtures import (GID, MSG, UID, accounts_at, config, make_home,
                                       make_maildir, new_messages, vpop_tree, write_assign,
                                       write_qmail)


def test_results_in_order_for_a_vpopmail_domain(tmp_path):
    tree, ddir = vpop_tree(tmp_path)
    write_qmail(ddir, ".qmail-list", "&a@x.example\n&b@y.example\n")
    courier = LocalDelivery(tree.config, tree.accounts)
    try:
        got = asyncio.run(courier.deliver("s@x.example", [
            "example.com-joe@example.com", "example.com-nobody@example.com",
            "example.com-list@example.com", "@example.com", "example.com-postmaster@example.com",
        ], MSG, msgid=7))
    finally:
        courier.close()
    assert [(r.address, r.status) for r in got] == [
        ("example.com-joe@example.com", "K"), ("example.com-nobody@example.com", "D"),
        ("example.com-list@example.com", "K"), ("@example.com", "K"),
        ("example.com-postmaster@example.com", "K")]
    assert got[1].text == "Sorry, no mailbox here by that name. (#5.1.1)\n"
    [fwd] = got[2].forwards
    assert fwd.recipients == ("a@x.example", "b@y.example")
    assert fwd.prefix + MSG == b"Delivered-To: example.com-list@example.com\r\n" + MSG


def test_deliver_blocking_gives_the_same_results_as_deliver(tmp_path):
    """The spawner worker's path: one recipient in the caller's thread, several
    in the pool; results in order, forwards included."""
    tree, ddir = vpop_tree(tmp_path)
    write_qmail(ddir, ".qmail-list", "&a@x.example\n")
    courier = LocalDelivery(tree.config, tree.accounts, max_threads=2)
    try:
        [one] = courier.deliver_blocking("s@x.example", ["example.com-joe@example.com"], MSG)
        many = courier.deliver_blocking("s@x.example", [
            "example.com-nobody@example.com", "example.com-list@example.com",
            "example.com-joe@example.com"], MSG)
    finally:
        courier.close()
    assert (one.address, one.status) == ("example.com-joe@example.com", "K")
    assert [(r.address, r.status) for r in many] == [
        ("example.com-nobody@example.com", "D"), ("example.com-list@example.com", "K"),
        ("example.com-joe@example.com", "K")]
    assert many[1].forwards[0].recipients == ("a@x.example",)


class RecordingWaiting:
    """engine.delivery.local's Waiting, recording when a delivery steps out."""

    def __init__(self) -> None:
        self.events = []

    def stepped_out(self):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            self.events.append("out")
            try:
                yield
            finally:
                self.events.append("in")
        return cm()


def test_a_program_run_and_an_mbox_lock_step_out_a_maildir_does_not(tmp_path):
    """The delivery worker counts a delivery as running except while it only
    waits: around a |program's run and an mbox append, never a Maildir."""
    tree, ddir = vpop_tree(tmp_path)
    write_qmail(ddir, ".qmail-prog", "|cat > /dev/null\n")
    write_qmail(ddir, ".qmail-box", "./mbox\n")
    courier = LocalDelivery(tree.config, tree.accounts, max_threads=1)
    try:
        steps = {}
        for name in ("joe", "prog", "box"):
            waiting = RecordingWaiting()
            [r] = courier.deliver_blocking("s@x.example", [f"example.com-{name}@example.com"],
                                           MSG, waiting)
            assert r.status == "K", (name, r.text)
            steps[name] = waiting.events
    finally:
        courier.close()
    assert steps == {"joe": [], "prog": ["out", "in"], "box": ["out", "in"]}


def test_assignment_for_tells_the_spawner_the_uid(tmp_path):
    tree, ddir = vpop_tree(tmp_path)
    courier = LocalDelivery(tree.config, tree.accounts, max_threads=1)
    try:
        a = courier.assignment_for("example.com-joe@example.com")
        assert (a.uid, a.gid, a.home) == (UID, GID, str(ddir))
        assert courier.assignment_for("@example.com") is None
        with pytest.raises(LookupError):
            courier.assignment_for("nobody@elsewhere")      # no alias user configured
    finally:
        courier.close()


def test_program_blocking_does_not_stall_the_loop(tmp_path):
    home = make_home(tmp_path / "joe")
    make_maildir(home / "Maildir")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    write_qmail(home, ".qmail", f"|read line < {fifo}; echo got $line\n")
    write_assign(tmp_path, [f"=joe:joe:{UID}:{GID}:{home}:::"])
    courier = LocalDelivery(config(), accounts_at(tmp_path))

    async def main():
        task = asyncio.ensure_future(courier.deliver("", ["joe@h"], MSG))
        # The loop keeps running while the program blocks: it can open the
        # FIFO's other end (in a thread) and write the line the program waits for.
        ticks = 0
        for _ in range(3):
            await asyncio.sleep(0)
            ticks += 1
        assert not task.done()

        def release():
            with open(fifo, "w") as f:
                f.write("go\n")
        await asyncio.to_thread(release)
        return ticks, await asyncio.wait_for(task, 30)
    try:
        ticks, [r] = asyncio.run(main())
    finally:
        courier.close()
    assert ticks == 3
    assert (r.status, r.text) == ("K", "got go\ndid 0+0+1\n")


def test_load_local_config_reads_defaultdelivery(tmp_path):
    (tmp_path / "control").mkdir()
    assert load_local_config(tmp_path).default_delivery == "./Maildir/"
    (tmp_path / "control" / "defaultdelivery").write_text("./Mailbox\n")
    cfg = load_local_config(tmp_path, program_timeout=5)
    assert (cfg.default_delivery, cfg.program_timeout) == ("./Mailbox\n", 5)


def test_for_root(tmp_path):
    home = make_home(tmp_path / "joe")
    md = make_maildir(home / "Maildir")
    write_assign(tmp_path, [f"=joe:joe:{UID}:{GID}:{home}:::"])
    courier = LocalDelivery.for_root(tmp_path, max_threads=2)
    try:
        [r] = asyncio.run(courier.deliver("", ["joe@h"], MSG))
    finally:
        courier.close()
    assert r.status == "K" and len(new_messages(md)) == 1
