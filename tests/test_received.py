"""Received lines byte-exact with qmail-smtpd / qmail-queue (spec §1.7, captures)."""
from __future__ import annotations

import calendar
import time

import pytest

from engine.received import date822, queue_received_line, received_line, safe_bytes

# 27 Nov 2026 02:20:28 UTC, the capture's timestamp
CAPTURE_TIME = calendar.timegm((2026, 11, 27, 2, 20, 28))


def line(**kw) -> bytes:
    args = dict(remotehost="unknown", helo=None, remoteip="127.0.0.1", remoteinfo=None,
                local="bench.local", when=CAPTURE_TIME)
    args.update(kw)
    return received_line(**args)


def test_matches_capture():
    assert line(helo="client.test") == (
        b"Received: from unknown (HELO client.test) (127.0.0.1)\r\n"
        b"  by bench.local with SMTP; 27 Nov 2026 02:20:28 -0000\r\n")
    assert queue_received_line(pid=29203, origin="network", uid=0, when=CAPTURE_TIME) == (
        b"Received: (qmail 29203 invoked from network); 27 Nov 2026 02:20:28 -0000\r\n")
    assert queue_received_line(pid=29209, origin="bounce", uid=0, when=CAPTURE_TIME) == (
        b"Received: (qmail 29209 invoked for bounce); 27 Nov 2026 02:20:28 -0000\r\n")


def test_no_helo_part_without_helo():
    assert line().startswith(b"Received: from unknown (127.0.0.1)\r\n")


def test_helo_equal_to_remotehost_is_omitted_case_insensitively():
    assert line(remotehost="client.test", helo="CLIENT.Test").startswith(
        b"Received: from client.test (127.0.0.1)\r\n")
    assert line(remotehost="client.test", helo="other.test").startswith(
        b"Received: from client.test (HELO other.test) (127.0.0.1)\r\n")


def test_empty_helo_still_printed():
    assert line(helo="").startswith(b"Received: from unknown (HELO ) (127.0.0.1)\r\n")


def test_remoteinfo():
    assert line(remoteinfo="joe").startswith(b"Received: from unknown (joe@127.0.0.1)\r\n")
    assert line(helo="h", remoteinfo="").startswith(b"Received: from unknown (HELO h) (@127.0.0.1)\r\n")


def test_unsafe_bytes_become_question_marks():
    got = line(helo="evil\r\nX-Injected: yes [1.2.3.4] ok_<>\"'é\0")
    first = got.split(b"\r\n")[0]
    # notqmail allows [ ]; every other unsafe byte is '?', é is two bytes
    assert first == b"Received: from unknown (HELO evil??X-Injected:?yes?[1.2.3.4]?ok????????) (127.0.0.1)"
    assert got.count(b"\r\n") == 2


def test_safe_set():
    allowed = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.@%+/=:-[]"
    assert safe_bytes(allowed.decode()) == allowed
    for c in range(256):
        if c not in allowed:
            as_str = bytes([c]).decode("utf-8", "surrogateescape")
            assert safe_bytes(as_str) == b"?", c


def test_ipv6_and_local_sanitised():
    got = line(remoteip="::1", local="mx example")
    assert b"(::1)\r\n  by mx?example with SMTP;" in got


@pytest.mark.parametrize("when,text", [
    (calendar.timegm((2024, 1, 5, 9, 3, 7)), b"5 Jan 2024 09:03:07 -0000"),
    (calendar.timegm((2000, 12, 31, 23, 59, 59)), b"31 Dec 2000 23:59:59 -0000"),
    (calendar.timegm((2026, 2, 1, 0, 0, 0)) + 0.999, b"1 Feb 2026 00:00:00 -0000"),
])
def test_date_format(when, text):
    assert date822(when) == text
    assert line(when=when).endswith(b"; " + text + b"\r\n")


def test_queue_line_origins():
    assert b"invoked by uid 1000)" in queue_received_line(pid=1, origin="local", uid=1000, when=0)
    assert b"invoked by alias)" in queue_received_line(pid=1, origin="alias", uid=0, when=0)
    assert queue_received_line(pid=7, origin="network", uid=0, when=0) == (
        b"Received: (qmail 7 invoked from network); 1 Jan 1970 00:00:00 -0000\r\n")


def test_protocol_variant():
    assert b" with ESMTPA; " in line(protocol="ESMTPA")


def test_fast_enough():
    # Called once per message: must cost microseconds, not milliseconds.
    now = time.time()
    start = time.perf_counter()
    for i in range(20000):
        received_line(remotehost="unknown", helo="client.test", remoteip="192.0.2.7",
                      remoteinfo=None, local="mx.example.com", when=now + i / 1000)
    per_call = (time.perf_counter() - start) / 20000
    assert per_call < 50e-6
