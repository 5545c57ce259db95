"""RETR/TOP output: the Cython MessageEncoder against a plain reading of
qmail-pop3d's blast() over any chunking, and a 50 MB message sent by a real
`qrelay run` whose receiver's peak memory stays bounded."""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine._smtpcore import MessageEncoder
from tests.smtp_harness import RunningQrelay
from qrelay_process import service_pids  # noqa: E402 (bench/ is on the path once smtp_harness is imported)
from tests.test_pop3 import _close_clients, Client, deliver, make_root, server  # noqa: F401 (fixtures)


def blast(data: bytes, body_lines: int) -> bytes:
    """qmail-pop3d.c's blast(), line by line (getln semantics)."""
    limit = body_lines + 1 if body_lines >= 0 else 0
    inheaders = True
    out = []
    pieces = data.split(b"\n")
    for n, line in enumerate(pieces):
        match = n < len(pieces) - 1
        if not match and not line:
            break
        if limit and not inheaders:
            limit -= 1
            if limit == 0:
                break
        if not line:
            inheaders = False
        elif line[:1] == b".":
            out.append(b".")
        out.append(line + b"\r\n")
        if not match:
            break
    out.append(b"\r\n.\r\n")
    return b"".join(out)


def encode(data: bytes, body_lines: int, cuts: list[int]) -> bytes:
    enc = MessageEncoder(body_lines)
    out, start = [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        out.append(enc.feed(data[start:cut]))
        start = cut
    return b"".join(out) + enc.finish()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.translate(bytes.maketrans(b"abcdef", b"\n\n..\r\n"))),
       st.integers(min_value=-1, max_value=5), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_encoder_matches_blast_over_any_chunking(data, body_lines, cuts):
    assert encode(data, body_lines, cuts) == blast(data, body_lines)


def test_encoder_cases():
    assert encode(b"", -1, []) == b"\r\n.\r\n"
    assert encode(b"abc\r\n", -1, []) == b"abc\r\r\n\r\n.\r\n"       # a stored CR stays
    assert encode(b".\n..\n", -1, [1]) == b"..\r\n...\r\n\r\n.\r\n"
    assert encode(b"H: 1\n\nb1\nb2\n", 0, []) == b"H: 1\r\n\r\n\r\n.\r\n"
    enc = MessageEncoder(1)
    assert enc.feed(b"H: 1\n\nb1\nb2\n") == b"H: 1\r\n\r\nb1\r\n" and enc.done
    assert enc.feed(b"more\n") == b""


def test_encoder_lines_of_every_length_over_block_boundaries():
    # The encoder scans and copies 16 bytes at a time: lines of 0-40 bytes,
    # some starting with ".", cut at every offset of the first 70 bytes.
    data = b"".join((b"." if n % 3 == 0 else b"") + bytes(range(65, 65 + n % 26)) * (n // 26 + 1)
                    + b"\n" for n in range(41)) + b"no final LF" * 3
    for body_lines in (-1, 0, 7):
        want = blast(data, body_lines)
        for cut in range(70):
            assert encode(data, body_lines, [cut, cut + 17, cut + 33]) == want


def test_feed_into_writes_what_feed_returns():
    data = b"H: 1\n\n.a\nbb\n" * 50 + b"tail"
    for body_lines in (-1, 3):
        enc, out = MessageEncoder(body_lines), bytearray(2 * 64 + 2)
        got = b""
        for i in range(0, len(data), 64):
            n = enc.feed_into(data[i:i + 64], out)
            got += bytes(out[:n])
        assert got + enc.finish() == blast(data, body_lines)
    with pytest.raises(ValueError):
        MessageEncoder().feed_into(b"x" * 10, bytearray(21))


def test_retr_to_a_slow_reader_is_byte_exact(tmp_path, server):
    # The sender writes to the socket itself while the transport holds
    # nothing, and queues what the kernel did not take: with a reader slower
    # than the sender both happen, over and over; the bytes must come in order.
    root = make_root(tmp_path)
    body = b"Subject: slow\n\n" + b"".join(b"." * (i % 3 == 0) + b"y" * (i % 131) + b"\n"
                                            for i in range(130_000))      # 8.5 MB
    path = deliver(root, "joe@example.com", body)
    os.utime(path, (time.time() - 10, time.time() - 10))
    want = b"+OK \r\n" + blast(path.read_bytes(), -1)
    srv = server(root)
    c = Client(srv.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert c.login() == b"+OK \r\n"
    c.send(b"RETR 1\r\n")
    got = bytearray(c.buf)
    while not got.endswith(b"\r\n.\r\n") or len(got) < len(want):
        chunk = c.sock.recv(2000)
        assert chunk, "closed mid-message"
        got += chunk
    assert bytes(got) == want


def test_retr_of_a_fifo_answers_and_blocks_no_one(tmp_path, server):
    # A FIFO in cur/ (listed, as by qmail-pop3d, with its size 0): opening it
    # blocked until a writer came, and it was opened on the event loop, so every
    # SMTP and POP3 session of the receiver hung with it. Only regular files are sent.
    root = make_root(tmp_path)
    fifo = root / "domains" / "example.com" / "joe" / "Maildir" / "cur" / "1700000000.f.host:2,"
    os.mkfifo(fifo)
    os.utime(fifo, (time.time() - 10, time.time() - 10))
    srv = server(root)
    c = Client(srv.port)
    assert c.login() == b"+OK \r\n"
    assert c.cmd("RETR 1") == b"-ERR unable to open that message\r\n"
    assert c.cmd("NOOP") == b"+OK \r\n"


def rss_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))


def pop3_port(q: RunningQrelay) -> int:
    return int(q.port_file.read_text().split()[1])


def test_50mb_message_in_bounded_memory(tmp_path):
    root = make_root(tmp_path)
    line = b"x" * 75 + b"\n"
    body = b"Subject: big\n\n" + b".leading dot\n" + line * (50 * 1024 * 1024 // len(line))
    path = deliver(root, "joe@example.com", body)
    line_ends = body.count(b"\n") + 2        # + Return-Path and Delivered-To
    del body
    os.utime(path, (time.time() - 10, time.time() - 10))
    size = path.stat().st_size
    q = RunningQrelay(root, procs=1, extra=("--listen", "pop3://127.0.0.1:0"))
    try:
        [receiver] = service_pids(q.pid, b"receiver")
        port = pop3_port(q)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"+OK <")
            s.sendall(b"USER joe@example.com\r\nPASS secret\r\nLIST 1\r\n")
            assert f.readline() == b"+OK \r\n" and f.readline() == b"+OK \r\n"
            assert f.readline() == f"+OK 1 {size}\r\n".encode()
            before = peak = rss_kb(receiver)
            s.sendall(b"RETR 1\r\n")
            assert f.readline() == b"+OK \r\n"
            received, tail, dots = 0, b"", 0
            while True:
                chunk = f.read1(1 << 20)
                assert chunk, "closed mid-message"
                received += len(chunk)
                if received % 16 == 0:
                    peak = max(peak, rss_kb(receiver))   # sampled while it sends
                dots += chunk.count(b"\r\n..leading")
                tail = (tail + chunk)[-5:]
                if tail == b"\r\n.\r\n":
                    break
            s.sendall(b"QUIT\r\n")
            assert f.readline() == b"+OK \r\n"
    finally:
        q.stop()
    # every LF became CRLF, one dot was doubled, then the extra empty line and "."
    assert received == size + line_ends + 1 + len(b"\r\n.\r\n")
    assert dots == 1
    # the receiver's resident memory grew by far less than the message
    print(f"receiver RSS {before} kB before RETR, at most {peak} kB while sending 50 MB")
    assert peak - before < 8 * 1024, (before, peak)
