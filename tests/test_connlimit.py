"""engine.smtp.connlimit: the shared connection counts behind concurrencyincoming and
the per-IP cap."""
from __future__ import annotations

import multiprocessing

import pytest

from engine.smtp.connlimit import ConnectionTable


def test_total_cap_counts_every_row():
    table = ConnectionTable(3)
    a, b = table.counter(0), table.counter(2)
    assert a.admit("10.0.0.1", 3, 0) is None
    assert b.admit("10.0.0.2", 3, 0) is None
    assert b.admit("10.0.0.3", 3, 0) is None
    assert a.admit("10.0.0.4", 3, 0) == "total"
    assert table.total() == 3 and a.mine() == 1 and b.mine() == 2
    b.release("10.0.0.2")
    assert a.admit("10.0.0.4", 3, 0) is None


def test_per_ip_cap_and_zero_means_off():
    c = ConnectionTable(2).counter(1)
    assert c.admit("192.0.2.1", 0, 2) is None
    assert c.admit("192.0.2.1", 0, 2) is None
    assert c.admit("192.0.2.1", 0, 2) == "ip"
    assert c.admit("192.0.2.2", 0, 2) is None
    for _ in range(100):
        assert c.admit("192.0.2.9", 0, 0) is None


def test_release_never_goes_negative_and_clear_row_forgets_a_dead_receiver():
    table = ConnectionTable(2)
    c = table.counter(0)
    c.release("10.0.0.1")
    assert table.total() == 0
    for i in range(5):
        c.admit(f"10.0.0.{i}", 0, 1)
    table.clear_row(0)
    assert table.total() == 0
    assert c.admit("10.0.0.1", 1, 1) is None


def test_slot_out_of_range():
    with pytest.raises(ValueError):
        ConnectionTable(2).counter(2)


def _child(table: ConnectionTable) -> None:
    c = table.counter(1)
    for i in range(7):
        c.admit(f"10.1.0.{i}", 0, 0)


def test_rows_are_shared_with_forked_children():
    table = ConnectionTable(2)
    p = multiprocessing.get_context("fork").Process(target=_child, args=(table,))
    p.start()
    p.join(10)
    assert p.exitcode == 0
    assert table.total() == 7
    assert table.counter(0).admit("10.2.0.1", 7, 0) == "total"


def test_connection_numbers_are_unique_across_slots_and_restarts():
    table = ConnectionTable(3)
    seen = []
    for slot in (0, 1, 2, 0, 1):
        seen.append(table.counter(slot).next_number())
    table.clear_row(0)                       # a receiver died and is restarted
    seen.append(table.counter(0).next_number())
    assert seen == [1, 2, 3, 4, 5, 7]
    assert len(set(seen)) == len(seen)


def test_services_are_counted_apart_and_cleared_together():
    table = ConnectionTable(2, ("smtp", "pop3"))
    smtp, pop3 = table.counter(1), table.counter(1, "pop3")
    assert smtp.admit("10.0.0.1", 1, 0) is None
    assert pop3.admit("10.0.0.1", 1, 1) is None          # SMTP's count is not POP3's
    assert pop3.admit("10.0.0.2", 1, 0) == "total"
    assert table.counter(0, "pop3").admit("10.0.0.1", 0, 1) == "ip"
    assert (table.total(), table.total("pop3"), smtp.mine(), pop3.mine()) == (1, 1, 1, 1)
    table.clear_row(1)                                    # the receiver died: both go
    assert table.total() == 0 and table.total("pop3") == 0
