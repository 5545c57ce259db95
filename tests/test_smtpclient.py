"""Outbound SMTP client: dot-stuffing on the exact bytes, the dialogue, the pool."""
from __future__ import annotations

import asyncio
import re

import pytest

from engine.delivery.smtpclient import (ConnectFailed, ConnectionDied, ConnectionPool,
                                        GreetingFailed, NameRejected, PoolLimits,
                                        SmtpConnection, data_wire)
from tests.smtp_recorder import RecordingSink


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --- data_wire: dot-stuffing and the smuggling cases ------------------------

def test_clean_message_fast_path():
    assert data_wire(b"a\r\n.b\r\n..c\r\n") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert data_wire(b".first\r\n") == b"..first\r\n.\r\n"
    assert data_wire(b"") == b".\r\n"
    assert data_wire(b"no final newline") == b"no final newline\r\n.\r\n"
    assert data_wire(b"x\r\n.") == b"x\r\n..\r\n.\r\n"


@pytest.mark.parametrize("stored", [
    b"a\r.\r\nMAIL FROM:<evil@x>\r\n",     # notqmail: CR becomes CRLF without stuffing
    b"a\n.\r\nMAIL FROM:<evil@x>\r\n",
    b"a\r\n.\nMAIL FROM:<evil@x>\r\n",
    b"a\n.\nMAIL FROM:<evil@x>\r\n",
    b"a\r\n.\rMAIL FROM:<evil@x>\r\n",
    b"a\r.\rb\n.\n\r\n.\r\nc",
    b".\n",
    b"\r.\r\n",
])
def test_no_bare_line_end_can_end_data_early(stored):
    wire = data_wire(stored)
    body = wire[:-3]
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    # Only CRLF line ends leave, so strict and lenient readers agree...
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    # ...and every line starting with "." is stuffed: no end marker inside.
    lines = body.split(b"\r\n")
    assert b"." not in lines
    assert all(not l.startswith(b".") or l.startswith(b"..") for l in lines)
    # Reading it back (strict) gives the stored text with bare CR/LF as CRLF.
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", stored)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert b"\r\n".join(l[1:] if l.startswith(b".") else l for l in lines) == expected


def test_a_bare_cr_in_a_message_of_many_lines_costs_a_few_copies():
    # A stored bare CR (refuse_bare_cr off, a qmail queue imported) sent every
    # line end through a regex substitution that held a piece per line end
    # before joining them: 689 MB for an 11 MB message of 4 million lines.
    import tracemalloc
    stored = b"Subject: x\r\n\r\n" + b"a\r\n" * 1_000_000 + b"bare\rcr\r\n"
    tracemalloc.start()
    try:
        wire = data_wire(stored)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert wire == stored.replace(b"bare\rcr", b"bare\r\ncr") + b".\r\n"
    assert peak < 5 * len(stored), peak


# --- one connection ----------------------------------------------------------

async def _with_sink(fn, **knobs):
    sink = await RecordingSink.start("127.0.0.2", **knobs)
    try:
        return await fn(sink), sink
    finally:
        await sink.stop()


async def _open(sink, **kw):
    return await SmtpConnection.open("127.0.0.2", sink.port, "me.test",
                                     timeoutconnect=kw.get("tc", 2), timeoutremote=kw.get("tr", 2))


def test_pipelined_transaction_with_size_and_8bitmime():
    async def go(sink):
        conn = await _open(sink)
        out = await conn.transaction("s@a.test", ["r1@b.test", "r2@b.test"], "é\r\n".encode())
        await conn.quit()
        return out
    out, sink = run(_with_sink(go))
    assert out.mail.code == 250 and [r.code for r in out.rcpt] == [250, 250]
    assert out.data.code == 354 and out.final.code == 250
    assert out.final.text == "250 ok queued\n"
    c = sink.connections[0]
    assert c.commands[0] == b"EHLO me.test"
    assert c.commands[1] == b"MAIL FROM:<s@a.test> SIZE=4 BODY=8BITMIME"
    assert sink.messages[0].content == "é\r\n".encode()


def test_helo_fallback_and_lockstep_without_extensions():
    async def go(sink):
        conn = await _open(sink)
        out = await conn.transaction("", ["r@b.test"], b"hi\r\n")
        await conn.quit()
        return out, conn.esmtp
    (out, esmtp), sink = run(_with_sink(go, esmtp=False))
    assert not esmtp and out.final.code == 250
    cmds = sink.connections[0].commands
    assert cmds[:3] == [b"EHLO me.test", b"HELO me.test", b"MAIL FROM:<>"]


def test_rcpt_refusal_and_multiline_reply():
    async def go(sink):
        conn = await _open(sink)
        out = await conn.transaction("s@a.test", ["bad@b.test", "ok@b.test"], b"x\r\n")
        await conn.quit()
        return out
    out, sink = run(_with_sink(go, rcpt_replies={"bad@b.test": "550-no such user\r\n550 really"}))
    assert out.rcpt[0].code == 550 and out.rcpt[0].text == "550-no such user\n550 really\n"
    assert out.final.code == 250
    assert sink.messages[0].rcpts == [b"RCPT TO:<ok@b.test>"]


def test_greeting_failure_and_connect_failure():
    async def go(sink):
        with pytest.raises(GreetingFailed) as info:
            await _open(sink)
        return info.value.reply
    reply, _ = run(_with_sink(go, greeting="421 too busy"))
    assert reply.code == 421 and reply.text == "421 too busy\n"

    async def refused():
        # Bind then close to get a port with nothing listening.
        sink = await RecordingSink.start("127.0.0.3")
        port = sink.port
        await sink.stop()
        await SmtpConnection.open("127.0.0.3", port, "me.test", timeoutconnect=2, timeoutremote=2)
    with pytest.raises(ConnectFailed):
        run(refused())


def test_name_rejected():
    # A server that refuses both EHLO and HELO.
    async def server(reader, writer):
        writer.write(b"220 hi\r\n")
        while await reader.readline():
            writer.write(b"550 go away\r\n")
        writer.close()

    async def go2():
        srv = await asyncio.start_server(server, "127.0.0.2", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(NameRejected) as info:
                await SmtpConnection.open("127.0.0.2", port, "me.test", timeoutconnect=2, timeoutremote=2)
            return info.value.reply
        finally:
            srv.close()
            await srv.wait_closed()
    assert run(go2()).code == 550


def test_silent_server_times_out():
    async def go(sink):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionDied):
            await SmtpConnection.open("127.0.0.2", sink.port, "me.test", timeoutconnect=2,
                                      timeoutremote=0.3)
        return loop.time() - t0
    elapsed, _ = run(_with_sink(go, silent=True))
    assert 0.25 < elapsed < 2


def after_dot_of_a_hangup(body: bytes, in_data) -> bool:
    """ConnectionDied.after_dot for a transaction of `body` with a server that
    takes EHLO, MAIL, RCPT and DATA, then runs in_data(reader, writer) and hangs up."""
    async def server(reader, writer):
        writer.write(b"220 hi\r\n")
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.startswith(b"EHLO"):
                writer.write(b"250 hi\r\n")
            elif line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                await writer.drain()
                await in_data(reader, writer)
                break
            elif line[:4] in (b"MAIL", b"RCPT"):
                writer.write(b"250 ok\r\n")
        writer.close()

    async def go():
        srv = await asyncio.start_server(server, "127.0.0.2", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            conn = await SmtpConnection.open("127.0.0.2", port, "me.test", timeoutconnect=2,
                                             timeoutremote=2)
            with pytest.raises(ConnectionDied) as info:
                await conn.transaction("s@a", ["r@b"], body)
            await conn.quit()
            return info.value.after_dot
        finally:
            srv.close()
            await srv.wait_closed()
    return run(go())


def test_hangup_after_dot_is_possible_duplicate():
    async def read_to_the_dot(reader, writer):
        while await reader.readline() not in (b".\r\n", b""):
            pass        # then hang up instead of answering
    assert after_dot_of_a_hangup(b"x\r\n", read_to_the_dot) is True


def test_hangup_in_the_middle_of_a_large_body_is_no_possible_duplicate():
    # qmail says "Possible duplicate!" only once the final dot is on its way:
    # a server gone after part of the body cannot have taken the message.
    async def gone_early(reader, writer):
        await reader.readexactly(100_000)
        writer.transport.abort()    # gone, most of the body unread
    assert after_dot_of_a_hangup((b"x" * 998 + b"\r\n") * 10_000, gone_early) is False


def test_a_server_that_stops_reading_loses_its_socket_at_the_abort():
    # The body fills the socket while the server reads nothing: the write
    # times out, and the abort (pool.release of a dead connection) must close
    # the socket. close() waited for the unread bytes to drain, for good: one
    # descriptor and up to a write chunk kept per stalled delivery.
    stalled = []

    async def server(reader, writer):
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            if line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                writer.transport.pause_reading()
                stalled.append(writer)
                return
            writer.write(b"250 ok\r\n")

    async def go(port):
        conn = await SmtpConnection.open("127.0.0.2", port, "me.test", timeoutconnect=2,
                                         timeoutremote=0.3)
        with pytest.raises(ConnectionDied, match="timeout writing"):
            await conn.transaction("s@a", ["r@b"], (b"x" * 998 + b"\r\n") * 20_000)
        conn.abort()
        await asyncio.wait_for(conn._writer.wait_closed(), 5)
        assert conn._writer.transport.get_extra_info("socket").fileno() == -1
        stalled[0].transport.abort()

    run(_serve(server, go))


# --- the pool -------------------------------------------------------------------

def test_pool_reuses_with_rset_and_caps_messages():
    async def go(sink):
        pool = ConnectionPool(timeoutconnect=2, timeoutremote=2,
                              limits=PoolLimits(max_messages_per_connection=3))
        reused = []
        for i in range(7):
            conn, was_reused = await pool.acquire("127.0.0.2", sink.port, "me.test")
            reused.append(was_reused)
            out = await conn.transaction("s@a", [f"r{i}@b"], b"m%d\r\n" % i)
            assert out.final.code == 250
            pool.release(conn)
        await pool.close()
        return reused, pool.opened
    (reused, opened), sink = run(_with_sink(go))
    assert reused == [False, True, True, False, True, True, False]
    assert opened == 3
    assert [len(c.transactions) for c in sink.connections] == [3, 3, 1]
    assert sink.connections[0].commands.count(b"RSET") == 2
    assert [m.content for m in sink.messages] == [b"m%d\r\n" % i for i in range(7)]


def test_pool_caps_connections_per_host():
    async def go(sink):
        pool = ConnectionPool(timeoutconnect=2, timeoutremote=2,
                              limits=PoolLimits(max_connections_per_host=2))

        async def one(i):
            conn, _ = await pool.acquire("127.0.0.2", sink.port, "me.test")
            try:
                await asyncio.sleep(0.05)
                return (await conn.transaction("s@a", [f"r{i}@b"], b"x\r\n")).final.code
            finally:
                pool.release(conn)
        codes = await asyncio.gather(*(one(i) for i in range(8)))
        await pool.close()
        assert pool.tracked_hosts() == 0
        return codes, pool.opened
    (codes, opened), sink = run(_with_sink(go))
    assert codes == [250] * 8
    assert opened == 2 and len(sink.connections) == 2
    assert len(sink.messages) == 8


def test_pool_idle_timeout_and_dropped_idle_connection():
    async def go(sink):
        pool = ConnectionPool(timeoutconnect=2, timeoutremote=2, limits=PoolLimits(idle_timeout=0.2))
        conn, _ = await pool.acquire("127.0.0.2", sink.port, "me.test")
        pool.release(conn)
        assert pool.idle_count() == 1
        assert pool.tracked_hosts() == 1
        await asyncio.sleep(0.4)
        assert pool.idle_count() == 0          # expired and closed
        assert pool.tracked_hosts() == 0       # nothing kept for a host not in use
        conn, reused = await pool.acquire("127.0.0.2", sink.port, "me.test")
        assert not reused
        pool.release(conn)
        await pool.close()
        return pool.opened
    opened, sink = run(_with_sink(go))
    assert opened == 2 and len(sink.connections) == 2


def test_smtputf8_only_when_needed_and_offered():
    async def go(sink):
        conn = await _open(sink)
        await conn.transaction("s@a.test", ["ascii@b.test"], b"x\r\n")
        await conn.reset()
        await conn.transaction("s@a.test", ["jörg@b.test"], b"x\r\n")
        await conn.quit()
    _, sink = run(_with_sink(go, extensions=["SMTPUTF8"]))
    mails = [m.mail for m in sink.messages]
    assert mails == [b"MAIL FROM:<s@a.test>", b"MAIL FROM:<s@a.test> SMTPUTF8"]
    assert sink.messages[1].rcpts == ["RCPT TO:<jörg@b.test>".encode()]


def test_long_reply_text_is_bounded_and_nul_shown_as_question_mark():
    long = "550-" + "x" * 3000
    async def go(sink):
        conn = await _open(sink)
        out = await conn.transaction("s@a.test", ["r@b.test", "ok@b.test"], b"x\r\n")
        await conn.quit()
        return out
    out, _ = run(_with_sink(go, rcpt_replies={"r@b.test": "\r\n".join([long] * 4 + ["550 a\0b"])}))
    assert out.rcpt[0].code == 550
    assert len(out.rcpt[0].text) <= 5001
    assert out.final.code == 250
    out2, _ = run(_with_sink(go, rcpt_replies={"r@b.test": "550 a\0b"}))
    assert out2.rcpt[0].text == "550 a?b\n"


def test_large_message_sent_whole():
    body = b"".join(b"line %07d .\r\n.dot\r\n" % i for i in range(60000))   # ~1.3 MB

    async def go(sink):
        conn = await _open(sink)
        out = await conn.transaction("s@a.test", ["r@b.test"], body)
        await conn.quit()
        return out
    out, sink = run(_with_sink(go))
    assert out.final.code == 250
    assert sink.messages[0].content == body


def _one_reply_server(replies: dict[bytes, bytes], greeting: bytes = b"220 hi\r\n"):
    """A server answering each command by its first four bytes (default 250)."""
    async def server(reader, writer):
        writer.write(greeting)
        while line := await reader.readline():
            writer.write(replies.get(line[:4], b"250 ok\r\n"))
        writer.close()
    return server


async def _serve(server, fn):
    srv = await asyncio.start_server(server, "127.0.0.2", 0)
    try:
        return await fn(srv.sockets[0].getsockname()[1])
    finally:
        srv.close()
        await srv.wait_closed()


def test_extensions_after_the_kept_reply_text_are_seen():
    # Only 5000 bytes of a reply are kept for "Remote host said:", but a long
    # EHLO reply (600 lines) still offers what its last lines name.
    lines = ([b"250-hi"] + [b"250-X-EXT%04d with some parameters" % i for i in range(600)]
             + [b"250-STARTTLS", b"250 PIPELINING"])
    ehlo = b"\r\n".join(lines) + b"\r\n"

    async def go(port):
        conn = await SmtpConnection.open("127.0.0.2", port, "me.test", timeoutconnect=2,
                                         timeoutremote=2)
        await conn.quit()
        return conn.extensions
    extensions = run(_serve(_one_reply_server({b"EHLO": ehlo}), go))
    assert "PIPELINING" in extensions and "STARTTLS" in extensions
    assert "X-EXT0599" in extensions and len(extensions) == 602
