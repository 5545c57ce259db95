"""Property test: whatever bytes a client sends, split anywhere, the session never
raises, every reply is a well-formed line, and nothing is queued without a 250."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.smtp.config import load_smtp_config
from engine.smtp.connlimit import ConnectionTable
from engine.smtp.receiver import Receiver
from engine.smtp.session import SmtpSession
from tests.smtp_harness import FakeSpool

TOKENS = [b"HELO x\r\n", b"EHLO y\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b> SIZE=99999999\r\n",
          b"RCPT TO:<x@sink.test>\r\n", b"RCPT TO:<u%far@mx.example.com>\r\n", b"DATA\r\n", b"RSET\r\n",
          b"NOOP\r\n", b"VRFY\r\n", b"HELP\r\n", b"QUIT\r\n", b"\r\n", b".\r\n", b"..\r\n", b"\r\n.\r\n",
          b"\n", b"\r", b".", b"\0", b"Received: x\r\n", b"body line\r\n", b"x" * 5000, b"\xff\xfe",
          b"rcpt to:<\"q@r\"@mx.example.com>\r\n", b"MAIL FROM:<" + b"a" * 950 + b">\r\n"]

REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][\x20-\x7e\x80-\xff]*$")


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def get_extra_info(self, name: str):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.written += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from engine.home import init_home
    root = init_home(tmp_path_factory.mktemp("fuzz") / "q", me="mx.example.com")
    (root / "qrelay.toml").write_text("[smtp]\nmax_line_length = 1000\nmax_recipients = 5\n")
    (root / "control" / "databytes").write_text("3000\n")
    return load_smtp_config(root)


async def drive(config, chunks: list[bytes]) -> tuple[FakeTransport, FakeSpool]:
    spool = FakeSpool()
    receiver = Receiver(config, spool, ConnectionTable(1).counter(0))
    session = SmtpSession(receiver)
    t = FakeTransport()
    session.connection_made(t)
    for chunk in chunks:
        while t.paused and not t.closed:
            await asyncio.sleep(0)  # a commit in flight: the socket would not be read
        if t.closed:
            break
        session.data_received(chunk)
    for _ in range(10):
        await asyncio.sleep(0)
    if receiver.tasks:
        await asyncio.gather(*receiver.tasks)
    session.connection_lost(None)
    return t, spool


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TOKENS) | st.binary(max_size=40), max_size=40), st.data())
def test_any_input_is_answered_sanely(config, tokens, data):
    stream = b"".join(tokens)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if b > a]
    t, spool = asyncio.run(drive(config, chunks))
    out = bytes(t.written)
    assert out.startswith(b"220 mx.example.com ESMTP\r\n")
    assert out.endswith(b"\r\n")
    lines = out[:-2].split(b"\r\n")
    assert all(REPLY_LINE.match(line) for line in lines), lines
    oks = [line for line in lines if re.match(rb"250 ok \d+ qp \d+$", line)]
    assert len(oks) == len(spool.messages)
    event(f"queued {min(len(spool.messages), 2)}")
    for env, msg in spool.messages:
        assert env.recipients and all(r == "x@sink.test" for r in env.recipients)
        assert b"\0" not in msg and len(msg) < 4000
