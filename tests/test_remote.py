"""RemoteDelivery end to end: fake DNS (dnslib) + recording sinks on 127.0.0.x.

No test here asks the machine's resolver: names are either routed with
smtproutes to a loopback sink or resolved by the fake DNS server.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import replace

import pytest

from engine.delivery.mx import TEXT_DNS_SOFT, TEXT_IPME
from engine.delivery.remote import (TEXT_NO_CONNECTION, RecipientResult, RemoteConfig,
                                    RemoteConfigError, RemoteDelivery, destination_unreached,
                                    load_remote_config)
from engine.delivery.routes import Route, SmtpRoutes
from tests.fakedns import fake_dns  # noqa: F401  (fixture)
from tests.smtp_recorder import RecordingSink

MSG = b"Received: from x\r\nSubject: hello\r\n\r\nbody line\r\n.leading dot\r\n"


def run(coro, timeout=25):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def config(dns=None, routes="", port=25, **kw) -> RemoteConfig:
    kw.setdefault("timeoutconnect", 2)
    kw.setdefault("timeoutremote", 2)
    return RemoteConfig(helohost="relay.test", routes=SmtpRoutes.from_text(routes),
                        dns_servers=(dns.address,) if dns else (), mx_port=port,
                        dns_timeout=0.5, dns_tries=1, **kw)


async def sinks(*specs: tuple[str, dict]) -> list[RecordingSink]:
    """Start sinks on the given 127.0.0.x addresses, all on one port."""
    started: list[RecordingSink] = []
    port = 0
    for host, knobs in specs:
        s = await RecordingSink.start(host, port, **knobs)
        port = s.port
        started.append(s)
    return started


async def stop(delivery: RemoteDelivery, started: list[RecordingSink]) -> None:
    await delivery.close()
    for s in started:
        await s.stop()


def statuses(results: list[RecipientResult]) -> list[str]:
    return [r.status for r in results]


# --- smtproutes ---------------------------------------------------------------

# An IPv6 relay is written in brackets (qmail had no IPv6): it ends at its `]`.
@pytest.mark.parametrize("ip, relay", [("127.0.0.2", "127.0.0.2"), ("::1", "[::1]")])
def test_smtproutes_with_port_delivers_and_reports_qmail_text(ip, relay):
    async def go():
        started = await sinks((ip, {}))
        port = started[0].port
        rd = RemoteDelivery(config(routes=f"example.test:{relay}:{port}\n"))
        try:
            return await rd.deliver("example.test", "a@src.test", ["x@example.test"], MSG), started
        finally:
            await stop(rd, started)
    results, (sink,) = run(go())
    assert results == [RecipientResult("x@example.test", "K",
                                       f"{ip} accepted message.\nRemote host said: 250 ok queued\n")]
    assert sink.messages[0].content == MSG
    assert sink.messages[0].mail.startswith(b"MAIL FROM:<a@src.test>")


def test_default_route_and_empty_relay_uses_mx(fake_dns):
    async def go():
        started = await sinks(("127.0.0.2", {}), ("127.0.0.3", {}))
        port = started[0].port
        fake_dns.zone["except.test"] = {"MX": [(10, "mx.except.test")]}
        fake_dns.zone["mx.except.test"] = {"A": ["127.0.0.3"]}
        rd = RemoteDelivery(config(fake_dns, routes=f":127.0.0.2:{port}\nexcept.test:\n", port=port))
        try:
            r1 = await rd.deliver("any.where.test", "a@src.test", ["x@any.where.test"], MSG)
            r2 = await rd.deliver("except.test", "a@src.test", ["y@except.test"], MSG)
            return r1, r2, started
        finally:
            await stop(rd, started)
    r1, r2, (smart, mx) = run(go())
    assert statuses(r1) == statuses(r2) == ["K"]
    assert r1[0].text.startswith("127.0.0.2 accepted") and r2[0].text.startswith("127.0.0.3 accepted")
    assert [m.rcpts for m in smart.messages] == [[b"RCPT TO:<x@any.where.test>"]]
    assert [m.rcpts for m in mx.messages] == [[b"RCPT TO:<y@except.test>"]]
    assert ("any.where.test", "MX") not in fake_dns.queries   # a route needs no MX lookup


def test_relay_name_resolved_by_a_record(fake_dns):
    async def go():
        started = await sinks(("127.0.0.4", {}))
        fake_dns.zone["smarthost.test"] = {"A": ["127.0.0.4"]}
        rd = RemoteDelivery(config(fake_dns, routes=f"example.test:smarthost.test:{started[0].port}\n"))
        try:
            return await rd.deliver("example.test", "", ["x@example.test"], MSG)
        finally:
            await stop(rd, started)
    assert statuses(run(go())) == ["K"]


# --- MX order and fallback ----------------------------------------------------------

def test_mx_fallback_refused_then_421_then_timeout_then_accept(fake_dns):
    async def go():
        # .3 listens nowhere (refused), .4 greets 421, .5 never greets, .6 accepts.
        started = await sinks(("127.0.0.6", {}), ("127.0.0.4", {"greeting": "421 too busy"}),
                              ("127.0.0.5", {"silent": True}))
        port = started[0].port
        fake_dns.zone.update({
            "fall.test": {"MX": [(40, "d.fall.test"), (10, "a.fall.test"),
                                 (30, "c.fall.test"), (20, "b.fall.test")]},
            "a.fall.test": {"A": ["127.0.0.3"]}, "b.fall.test": {"A": ["127.0.0.4", "127.0.0.3"]},
            "c.fall.test": {"A": ["127.0.0.5"]}, "d.fall.test": {"A": ["127.0.0.6"]},
        })
        rd = RemoteDelivery(config(fake_dns, port=port, timeoutremote=0.5, max_greeting_failures=3))
        try:
            res = await rd.deliver("fall.test", "a@src.test", ["x@fall.test", "y@fall.test"], MSG)
            return res, started
        finally:
            await stop(rd, started)
    results, (good, busy, silent) = run(go())
    assert statuses(results) == ["K", "K"]
    assert results[0].text.startswith("127.0.0.6 accepted message.")
    assert len(busy.connections) == 1 and len(silent.connections) == 1
    assert len(good.messages) == 1
    assert good.messages[0].rcpts == [b"RCPT TO:<x@fall.test>", b"RCPT TO:<y@fall.test>"]


def test_greeting_failures_defer_after_max_greeting_failures(fake_dns):
    """Each address that takes the connection and fails the greeting may have
    cost a timeoutremote (a tarpit): after [delivery] max_greeting_failures
    (2) of them the delivery defers with the last one's text, not going on
    through every address of the domain's MX list (30 × 20 min)."""
    async def go():
        started = await sinks(("127.0.0.6", {}), ("127.0.0.4", {"greeting": "421 too busy"}),
                              ("127.0.0.5", {"greeting": "421 me too"}))
        fake_dns.zone.update({
            "tarpit.test": {"MX": [(10, "a.tarpit.test"), (20, "b.tarpit.test"),
                                   (30, "c.tarpit.test")]},
            "a.tarpit.test": {"A": ["127.0.0.4"]}, "b.tarpit.test": {"A": ["127.0.0.5"]},
            "c.tarpit.test": {"A": ["127.0.0.6"]},
        })
        rd = RemoteDelivery(config(fake_dns, port=started[0].port))
        try:
            return await rd.deliver("tarpit.test", "a@src.test", ["x@tarpit.test"], MSG), started
        finally:
            await stop(rd, started)
    (result,), (good, first, second) = run(go())
    assert (result.status, result.text) == (
        "Z", "Connected to 127.0.0.5 but greeting failed.\nRemote host said: 421 me too\n")
    assert len(first.connections) == len(second.connections) == 1
    assert good.connections == [] and good.messages == []


def test_all_mx_fail_to_connect_is_4_4_1(fake_dns):
    async def go():
        started = await sinks(("127.0.0.2", {}))
        port = started[0].port
        await started[0].stop()          # keep the port, listen nowhere
        fake_dns.zone.update({"down.test": {"MX": [(10, "mx.down.test")]},
                              "mx.down.test": {"A": ["127.0.0.2", "127.0.0.3"]}})
        rd = RemoteDelivery(config(fake_dns, port=port))
        try:
            return await rd.deliver("down.test", "a@src.test", ["x@down.test"], MSG)
        finally:
            await rd.close()
    (result,) = run(go())
    assert (result.status, result.text) == ("Z", TEXT_NO_CONNECTION)
    assert result.text == "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"


def test_no_descriptor_for_a_connection_is_a_local_deferral():
    """socket() failing for want of a local resource (EMFILE at the open-files
    limit) is not the destination's fault: qmail-remote's temp_oserr text,
    not "wasn't able to establish an SMTP connection" (which sends the
    operator after the network, and makes the mail look like the
    destination's to the scheduler's recovery)."""
    import os
    import resource

    async def go():
        started = await sinks(("127.0.0.2", {}))
        port = started[0].port
        rd = RemoteDelivery(config(routes=f"full.test:127.0.0.2:{port}\n"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hogs = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
            try:
                while True:
                    hogs.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            return await rd.deliver("full.test", "a@src.test", ["x@full.test"], MSG), started
        finally:
            for fd in hogs:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await stop(rd, started)
    (result,), started = run(go())
    assert (result.status, result.text) == (
        "Z", "System resources temporarily unavailable. (#4.3.0)\n")
    assert not destination_unreached(result.text)
    assert started[0].connections == []


def test_only_busy_greetings_defer_with_the_reply(fake_dns):
    async def go():
        started = await sinks(("127.0.0.2", {"greeting": "421 too busy"}))
        fake_dns.zone["busy.test"] = {"A": ["127.0.0.2"]}
        rd = RemoteDelivery(config(fake_dns, port=started[0].port))
        try:
            return await rd.deliver("busy.test", "a@src.test", ["x@busy.test"], MSG)
        finally:
            await stop(rd, started)
    (result,) = run(go())
    assert result.status == "Z"
    assert result.text == "Connected to 127.0.0.2 but greeting failed.\nRemote host said: 421 too busy\n"


def test_a_fallback_without_mx(fake_dns):
    async def go():
        started = await sinks(("127.0.0.7", {}))
        fake_dns.zone["nomx.test"] = {"A": ["127.0.0.7"]}
        rd = RemoteDelivery(config(fake_dns, port=started[0].port))
        try:
            return await rd.deliver("nomx.test", "a@src.test", ["x@nomx.test"], MSG), started
        finally:
            await stop(rd, started)
    results, (sink,) = run(go())
    assert statuses(results) == ["K"] and len(sink.messages) == 1


@pytest.mark.parametrize("entry, status, text", [
    ({"MX": [(0, ".")]}, "D", "Sorry, nullmx.test does not accept mail (null MX). (#5.1.10)\n"),
    (None, "D", "Sorry, I couldn't find any host named nullmx.test. (#5.1.2)\n"),
    ("SERVFAIL", "Z", TEXT_DNS_SOFT),
])
def test_dns_outcomes(fake_dns, entry, status, text):
    if entry is not None:
        fake_dns.zone["nullmx.test"] = entry

    async def go():
        rd = RemoteDelivery(config(fake_dns, port=1))
        try:
            return await rd.deliver("nullmx.test", "a@src.test", ["x@nullmx.test", "y@nullmx.test"], MSG)
        finally:
            await rd.close()
    assert run(go()) == [RecipientResult("x@nullmx.test", status, text),
                         RecipientResult("y@nullmx.test", status, text)]


def test_ipme_skips_own_address(fake_dns):
    async def go():
        started = await sinks(("127.0.0.3", {}))
        fake_dns.zone.update({"me.test": {"MX": [(10, "mx1.me.test"), (20, "mx2.me.test")]},
                              "mx1.me.test": {"A": ["127.0.0.3"]},
                              "mx2.me.test": {"A": ["127.0.0.2"]},
                              "loop.test": {"MX": [(10, "mx2.me.test")]}})
        rd = RemoteDelivery(config(fake_dns, port=started[0].port,
                                   my_addresses=frozenset({"0.0.0.0", "127.0.0.2"})))
        try:
            ok = await rd.deliver("me.test", "a@src.test", ["x@me.test"], MSG)
            loop = await rd.deliver("loop.test", "a@src.test", ["x@loop.test"], MSG)
            return ok, loop
        finally:
            await stop(rd, started)
    ok, loop = run(go())
    assert statuses(ok) == ["K"]
    assert loop == [RecipientResult("x@loop.test", "D", TEXT_IPME)]


# --- the dialogue -------------------------------------------------------------------

def _routed(sink_knobs: dict, recipients, message=MSG, sender="a@src.test"):
    async def go():
        started = await sinks(("127.0.0.2", sink_knobs))
        rd = RemoteDelivery(config(routes=f":127.0.0.2:{started[0].port}\n"))
        try:
            return await rd.deliver("example.test", sender, recipients, message), started[0]
        finally:
            await stop(rd, started)
    return run(go())


def test_one_recipient_refused_others_delivered():
    results, sink = _routed({"rcpt_replies": {"bad@example.test": "550 no such user"}},
                            ["a@example.test", "bad@example.test", "c@example.test"])
    assert statuses(results) == ["K", "D", "K"]
    assert results[1].text == "127.0.0.2 does not like recipient.\nRemote host said: 550 no such user\n"
    assert len(sink.messages) == 1 and len(sink.messages[0].rcpts) == 2


def test_all_recipients_refused_gives_up():
    results, sink = _routed({"rcpt_replies": {"a@example.test": "550 no", "b@example.test": "450 later"}},
                            ["a@example.test", "b@example.test"])
    assert statuses(results) == ["D", "Z"]
    assert results[0].text == ("127.0.0.2 does not like recipient.\nRemote host said: 550 no\n"
                               "Giving up on 127.0.0.2.\n")
    assert sink.messages == []


@pytest.mark.parametrize("extensions", [["PIPELINING"], []])
def test_recipients_past_the_servers_limit_go_in_the_next_transaction(extensions):
    # A server's recipient limit (Postfix's smtpd_recipient_limit) answers 452
    # past it (RFC 5321 4.5.3.1.10): the rest go in further transactions now,
    # not at the next retry (400 s, then 1600 s... for the last ones).
    rcpts = [f"r{i}@example.test" for i in range(7)]
    results, sink = _routed({"max_rcpts": 3, "extensions": extensions}, rcpts)
    assert statuses(results) == ["K"] * 7
    assert [len(m.rcpts) for m in sink.messages] == [3, 3, 1]
    assert [r for m in sink.messages for r in m.rcpts] == [f"RCPT TO:<{r}>".encode() for r in rcpts]
    assert len(sink.connections) == 1


def test_a_452_in_a_transaction_that_delivered_nothing_defers():
    # Nothing accepted: no next transaction (each one must deliver to someone).
    results, sink = _routed({"max_rcpts": 2, "rcpt_replies": {"a@example.test": "452 mailbox full",
                                                               "b@example.test": "452 mailbox full"}},
                            ["a@example.test", "b@example.test", "c@example.test"])
    assert statuses(results) == ["Z", "Z", "K"]
    assert [len(m.rcpts) for m in sink.messages] == [1]


@pytest.mark.parametrize("knobs, status, text", [
    ({"mail_reply": "553 sender refused"}, "D",
     "Connected to 127.0.0.2 but sender was rejected.\nRemote host said: 553 sender refused\n"),
    ({"mail_reply": "451 try later"}, "Z",
     "Connected to 127.0.0.2 but sender was rejected.\nRemote host said: 451 try later\n"),
    ({"data_reply": "554 no data today"}, "D",
     "127.0.0.2 failed on DATA command.\nRemote host said: 554 no data today\n"),
    ({"final_reply": "452 disk full"}, "Z",
     "127.0.0.2 failed after I sent the message.\nRemote host said: 452 disk full\n"),
    ({"final_reply": "554 spam"}, "D",
     "127.0.0.2 failed after I sent the message.\nRemote host said: 554 spam\n"),
])
def test_dialogue_failures(knobs, status, text):
    for pipelining in (True, False):
        if not pipelining:
            knobs = {**knobs, "extensions": []}
        results, _ = _routed(knobs, ["a@example.test", "b@example.test"])
        assert results == [RecipientResult("a@example.test", status, text),
                           RecipientResult("b@example.test", status, text)], pipelining


@pytest.mark.parametrize("extensions", [["PIPELINING"], []])
def test_recipients_refused_before_a_hang_up_keep_their_answer(extensions):
    # Postfix hangs up (421) after smtpd_hard_error_limit refusals: the
    # recipients refused before keep their answer instead of being deferred
    # with the rest, or a batch with that many unknown users would never
    # get through (each retry dying the same way).
    bad = {f"bad{i}@example.test": "550 5.1.1 no such user" for i in range(3)}
    recipients = ["ok1@example.test", *bad, "ok2@example.test"]
    results, sink = _routed({"rcpt_replies": bad, "hard_error_limit": 3,
                             "extensions": extensions}, recipients)
    assert statuses(results) == ["Z", "D", "D", "D", "Z"]
    assert results[0].text == "Connected to 127.0.0.2 but connection died. (#4.4.2)\n"
    assert results[1].text == ("127.0.0.2 does not like recipient.\n"
                               "Remote host said: 550 5.1.1 no such user\n")
    assert results[4].text == ("127.0.0.2 does not like recipient.\n"
                               "Remote host said: 421 too many errors\n")
    assert sink.messages == []


def test_data_answered_without_354_sends_no_body():
    # A 250 to DATA is no go-ahead: a body sent then is read as commands, and
    # the answer to its first line taken for the final reply ("accepted
    # message" for mail the server never took), with the replies off by one
    # for every later message on the connection.
    message = b"Subject: x\r\n\r\nRCPT TO:<evil@example.test>\r\n"
    text = "127.0.0.2 failed on DATA command.\nRemote host said: 250 what DATA?\n"
    for extensions in (["PIPELINING"], []):
        results, sink = _routed({"data_reply": "250 what DATA?", "extensions": extensions},
                                ["a@example.test"], message)
        assert results == [RecipientResult("a@example.test", "Z", text)], extensions
        assert all(b"evil" not in c and not c.startswith(b"Subject")
                   for conn in sink.connections for c in conn.commands)


@pytest.mark.parametrize("reply, status", [("554 5.7.1 blocked", "D"), ("421 4.7.0 go away", "Z")])
@pytest.mark.parametrize("extensions", [["PIPELINING"], []])
def test_sender_refused_then_hang_up_keeps_the_refusal(extensions, reply, status):
    # A server refusing a sender often closes at once: with PIPELINING the
    # RCPT and DATA replies never come, and the refusal must still decide.
    results, _ = _routed({"mail_reply": reply, "close_after_mail": True, "extensions": extensions},
                         ["a@example.test", "b@example.test"])
    text = f"Connected to 127.0.0.2 but sender was rejected.\nRemote host said: {reply}\n"
    assert results == [RecipientResult("a@example.test", status, text),
                       RecipientResult("b@example.test", status, text)]


def test_a_double_bounce_goes_out_with_the_null_sender():
    # Stored with qmail's #@[] (so a local delivery and its forwards keep it,
    # and its failure is a triple bounce); many servers refuse MAIL FROM:<#@[]>.
    results, sink = _routed({}, ["pm@example.test"], sender="#@[]")
    assert statuses(results) == ["K"]
    assert [t.mail.split(b" ")[:2] for c in sink.connections for t in c.transactions] == [
        [b"MAIL", b"FROM:<>"]]


def test_address_with_line_break_is_refused_without_sending():
    results, sink = _routed({}, ["ok@example.test", "x@example.test\r\nRCPT TO:<evil@x>"])
    assert statuses(results) == ["K", "D"]
    assert all(b"evil" not in c for conn in sink.connections for c in conn.commands)


# --- connection reuse -------------------------------------------------------------------

def test_many_messages_share_one_connection():
    async def go():
        started = await sinks(("127.0.0.2", {}))
        rd = RemoteDelivery(config(routes=f":127.0.0.2:{started[0].port}\n"))
        try:
            out = []
            for i in range(25):
                out += await rd.deliver("example.test", "a@src.test", [f"u{i}@example.test"],
                                        b"Subject: %d\r\n\r\nbody\r\n" % i)
            return out, started[0]
        finally:
            await stop(rd, started)
    results, sink = run(go())
    assert statuses(results) == ["K"] * 25
    assert len(sink.connections) == 1
    assert len(sink.connections[0].transactions) == 25
    assert [m.content for m in sink.messages] == [b"Subject: %d\r\n\r\nbody\r\n" % i for i in range(25)]


def test_concurrent_deliveries_respect_per_host_cap_and_message_cap():
    async def go():
        started = await sinks(("127.0.0.2", {}))
        rd = RemoteDelivery(config(routes=f":127.0.0.2:{started[0].port}\n",
                                   max_connections_per_host=3, max_messages_per_connection=10))
        try:
            res = await asyncio.gather(*(rd.deliver("example.test", "a@src.test", [f"u{i}@example.test"], MSG)
                                         for i in range(60)))
            return [r for rs in res for r in rs], started[0]
        finally:
            await stop(rd, started)
    results, sink = run(go())
    assert statuses(results) == ["K"] * 60
    assert len(sink.messages) == 60
    assert all(len(c.transactions) <= 10 for c in sink.connections)
    assert 6 <= len(sink.connections) <= 8


def one_by_one(sink_options: dict, n: int, pause: float = 0.0):
    """n messages delivered in turn through one sink (smtproutes to 127.0.0.2):
    (their results, the sink)."""
    async def go():
        started = await sinks(("127.0.0.2", sink_options))
        rd = RemoteDelivery(config(routes=f":127.0.0.2:{started[0].port}\n"))
        try:
            out = []
            for i in range(n):
                out += await rd.deliver("example.test", "a@src.test", [f"u{i}@example.test"], MSG)
                if pause:
                    await asyncio.sleep(pause)
            return out, started[0]
        finally:
            await stop(rd, started)
    return run(go())


@pytest.mark.parametrize("extensions", [["PIPELINING"], []])
def test_server_dropping_an_idle_connection_is_retried_fresh(extensions):
    results, sink = one_by_one({"close_after_messages": 1, "extensions": extensions}, 3, pause=0.05)
    assert statuses(results) == ["K"] * 3
    assert len(sink.connections) == 3


@pytest.mark.parametrize("extensions", [["PIPELINING"], []])
def test_reused_connection_dying_before_the_dot_is_retried_fresh(extensions):
    results, sink = one_by_one({"drop_on_rset": True, "extensions": extensions}, 3)
    assert statuses(results) == ["K"] * 3
    assert len(sink.messages) == 3 and len(sink.connections) == 3
    assert [len(c.transactions) for c in sink.connections] == [1, 1, 1]


@pytest.mark.parametrize("extensions", [["PIPELINING"], []])
def test_421_to_mail_on_a_reused_connection_is_retried_fresh(extensions):
    # A server's messages-per-connection limit (Exim: 421 to MAIL, then it
    # closes) is about the connection, not the message: a new one takes it.
    results, sink = one_by_one({"busy_after_messages": 2, "extensions": extensions}, 5)
    assert statuses(results) == ["K"] * 5
    assert [len(c.transactions) for c in sink.connections] == [2, 2, 1]


def test_greeting_timeout_uses_timeoutremote():
    async def go():
        started = await sinks(("127.0.0.2", {"silent": True}))
        rd = RemoteDelivery(config(routes=f":127.0.0.2:{started[0].port}\n", timeoutremote=0.3))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            res = await rd.deliver("example.test", "a@src.test", ["x@example.test"], MSG)
            return res, loop.time() - t0
        finally:
            await stop(rd, started)
    (result,), elapsed = run(go())
    assert result.status == "Z"
    assert result.text == "Connected to 127.0.0.2 but connection died. (#4.4.2)\n"
    assert elapsed < 2


# --- byte exactness and smuggling ------------------------------------------------------

def test_relaying_is_byte_exact():
    message = (b"Received: from a\r\n\tby b\r\nSubject: =?utf-8?q?x?=\r\n\r\n"
               + bytes(range(32, 256)).replace(b".", b"") + b"\r\n"
               + b".\r\n..\r\n. \r\n.x\r\n\t\r\n\r\n" + "é ü\r\n".encode() + b"x" * 5000 + b"\r\n")
    results, sink = _routed({}, ["a@example.test"], message)
    assert statuses(results) == ["K"]
    assert sink.messages[0].content == message
    assert b"BODY=8BITMIME" in sink.messages[0].mail
    assert b"SIZE=%d" % len(message) in sink.messages[0].mail


def test_stored_bare_cr_and_lf_cannot_smuggle_a_second_message():
    evil = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n"
    message = (b"Subject: smuggle\r\n\r\nhello\r.\r\n" + evil + b"more\n.\n" + evil
               + b"again\r\n.\n" + evil + b"last\n.\r\n" + evil + b"end\r\n")
    results, sink = _routed({}, ["a@example.test"], message)
    assert statuses(results) == ["K"]
    assert len(sink.connections) == 1
    assert len(sink.messages) == 1
    commands = [c.split(b" ")[0] for c in sink.connections[0].commands]
    assert commands.count(b"MAIL") == 1 and commands.count(b"DATA") == 1
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    assert sink.messages[0].content == expected
    raw = sink.messages[0].raw
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")


# --- configuration ------------------------------------------------------------------------

def test_load_remote_config(root):
    control = root / "control"
    (control / "helohost").write_text("out.example.com\n")
    (control / "timeoutconnect").write_text("7\n")
    (control / "smtproutes").write_text("a.test:127.0.0.2:2526\n")
    (root / "qrelay.toml").write_text(
        '[delivery]\ndns_servers = ["127.0.0.1:5353"]\nmx_port = 2525\n'
        'max_messages_per_connection = 5\nmy_addresses = ["192.0.2.1"]\n'
        'max_addresses_per_delivery = 4\n')
    cfg = load_remote_config(root)
    assert cfg.helohost == "out.example.com"
    assert (cfg.timeoutconnect, cfg.timeoutremote) == (7, 1200)
    assert cfg.routes.lookup("a.test") == Route("127.0.0.2", 2526)
    assert cfg.dns_servers == ("127.0.0.1:5353",) and cfg.mx_port == 2525
    assert cfg.max_messages_per_connection == 5 and cfg.max_addresses_per_delivery == 4
    # Not port 25: an MX on one of our interfaces is somebody else's service.
    assert cfg.my_addresses == frozenset({"0.0.0.0", "192.0.2.1"})


def test_ipme_includes_every_interface_address_for_port_25(root, fake_dns):
    import psutil
    (root / "qrelay.toml").write_text('[delivery]\nmy_addresses = ["192.0.2.1"]\n')
    cfg = load_remote_config(root)
    ours = {a.address.partition("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}
    assert {"0.0.0.0", "127.0.0.1", "192.0.2.1"} <= cfg.my_addresses
    assert {ipaddress.ip_address(a).compressed for a in ours} <= cfg.my_addresses
    # The best MX of a domain not local here is this host: qmail's #5.4.6,
    # without a connection to itself.
    fake_dns.zone.update({"loop.test": {"MX": [(10, "mx.loop.test")]},
                          "mx.loop.test": {"A": ["127.0.0.1"]}})

    async def go():
        rd = RemoteDelivery(replace(cfg, dns_servers=(fake_dns.address,)))
        try:
            return await rd.deliver("loop.test", "a@src.test", ["x@loop.test"], MSG)
        finally:
            await rd.close()
    assert run(go()) == [RecipientResult("x@loop.test", "D", TEXT_IPME)]


def test_load_remote_config_defaults_and_errors(root):
    cfg = load_remote_config(root)
    assert cfg.helohost == "mx.example.com" and cfg.mx_port == 25 and cfg.dns_servers == ()
    (root / "qrelay.toml").write_text('[delivery]\ndns_servers = "127.0.0.1"\n')
    with pytest.raises(RemoteConfigError, match="dns_servers"):
        load_remote_config(root)
    for bad in ("localhost:53", "127.0.0.1:0", "127.0.0.1:x", "[::1]x"):
        (root / "qrelay.toml").write_text(f'[delivery]\ndns_servers = ["{bad}"]\n')
        with pytest.raises(RemoteConfigError, match="dns_servers"):
            load_remote_config(root)
    (root / "qrelay.toml").write_text('[delivery]\ndns_servers = ["127.0.0.1", "[::1]:5353", "::1"]\n')
    assert load_remote_config(root).dns_servers == ("127.0.0.1", "[::1]:5353", "::1")
    (root / "qrelay.toml").unlink()
    (root / "control" / "me").unlink()
    with pytest.raises(RemoteConfigError, match="helohost"):
        load_remote_config(root)


def test_connect_timeout_moves_to_next_mx(fake_dns):
    import socket

    async def go():
        started = await sinks(("127.0.0.2", {}))
        port = started[0].port
        # A listener with a full backlog never completes a new connect().
        hole = socket.socket()
        hole.bind(("127.0.0.8", port))
        hole.listen(0)
        filler = socket.create_connection(("127.0.0.8", port), timeout=1)
        fake_dns.zone.update({"hole.test": {"MX": [(10, "a.hole.test"), (20, "b.hole.test")]},
                              "a.hole.test": {"A": ["127.0.0.8"]}, "b.hole.test": {"A": ["127.0.0.2"]}})
        rd = RemoteDelivery(config(fake_dns, port=port, timeoutconnect=0.3))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            res = await rd.deliver("hole.test", "a@src.test", ["x@hole.test"], MSG)
            return res, loop.time() - t0
        finally:
            await stop(rd, started)
            filler.close()
            hole.close()
    (result,), elapsed = run(go())
    assert result.status == "K" and result.text.startswith("127.0.0.2 accepted")
    assert 0.25 < elapsed < 2


def test_delivery_under_uvloop(fake_dns):
    import uvloop

    async def go():
        started = await sinks(("127.0.0.2", {}))
        fake_dns.zone.update({"uv.test": {"MX": [(5, "mx.uv.test")]}, "mx.uv.test": {"A": ["127.0.0.2"]}})
        rd = RemoteDelivery(config(fake_dns, port=started[0].port))
        try:
            out = []
            for i in range(3):
                out += await rd.deliver("uv.test", "a@src.test", [f"x{i}@uv.test"], MSG)
            return out, started[0]
        finally:
            await stop(rd, started)
    loop = uvloop.new_event_loop()
    try:
        results, sink = loop.run_until_complete(asyncio.wait_for(go(), 20))
    finally:
        loop.close()
    assert statuses(results) == ["K"] * 3
    assert len(sink.connections) == 1 and len(sink.messages) == 3


def test_targets_tried_once_each_in_preference_order(fake_dns):
    fake_dns.zone.update({"dup.test": {"MX": [(20, "b.dup.test"), (10, "a.dup.test")]},
                          "a.dup.test": {"A": ["127.0.0.3", "127.0.0.4"]},
                          "b.dup.test": {"A": ["127.0.0.4", "127.0.0.5"]}})

    async def go():
        rd = RemoteDelivery(config(fake_dns, port=2525))
        try:
            return await rd.targets("dup.test")
        finally:
            await rd.close()
    targets, port, tls_name = run(go())
    assert port == 2525 and tls_name == "dup.test"
    assert [(t.ip, t.preference) for t in targets] == [("127.0.0.3", 10), ("127.0.0.4", 10),
                                                       ("127.0.0.5", 20)]


def test_a_delivery_tries_a_bounded_number_of_addresses(fake_dns):
    # A domain's DNS decides how many addresses there are; each may cost a
    # full timeoutconnect. RFC 5321 5.1: a configurable limit, best first.
    fake_dns.zone.update({"many.test": {"MX": [(10, "a.many.test"), (20, "b.many.test")]},
                          "a.many.test": {"A": [f"127.0.3.{i}" for i in range(1, 5)]},
                          "b.many.test": {"A": ["127.0.3.9"]},
                          "relay.many.test": {"A": [f"127.0.4.{i}" for i in range(1, 6)]}})

    async def go():
        started = await sinks(("127.0.3.9", {}))
        port = started[0].port
        rd = RemoteDelivery(config(fake_dns, port=port, ipv6=False, max_addresses_per_delivery=3,
                                   routes="relayed.test:relay.many.test\n"))
        try:
            targets, _, _ = await rd.targets("many.test")
            relayed, _, _ = await rd.targets("relayed.test")
            result = await rd.deliver("many.test", "a@src.test", ["x@many.test"], MSG)
            return targets, relayed, result, started
        finally:
            await stop(rd, started)
    targets, relayed, result, (sink,) = run(go())
    assert [t.ip for t in targets] == ["127.0.3.1", "127.0.3.2", "127.0.3.3"]
    assert [t.ip for t in relayed] == ["127.0.4.1", "127.0.4.2", "127.0.4.3"]
    assert result == [RecipientResult("x@many.test", "Z", TEXT_NO_CONNECTION)]
    assert sink.messages == []
    assert RemoteConfig(helohost="h").max_addresses_per_delivery == 30


def test_connect_timeouts_table_as_qmail_tcpto():
    from engine.delivery.remote import ConnectTimeouts

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now
    clock = Clock()
    t = ConnectTimeouts(3840, clock)
    t.timed_out("192.0.2.1")
    assert not t.skipped("192.0.2.1")           # one timeout is not enough
    clock.now = 60
    t.timed_out("192.0.2.1")                    # < 120 s later: not counted
    assert not t.skipped("192.0.2.1")
    clock.now = 200
    t.timed_out("192.0.2.1")
    assert t.skipped("192.0.2.1")
    clock.now = 200 + 3839
    assert t.skipped("192.0.2.1")
    clock.now = 200 + 3840
    assert not t.skipped("192.0.2.1")
    t.timed_out("192.0.2.2")
    clock.now += 130
    t.timed_out("192.0.2.2")
    t.reached("192.0.2.2")                      # a completed connect clears it
    assert not t.skipped("192.0.2.2")
    assert not ConnectTimeouts(0, clock).skipped("192.0.2.2")
    t.timed_out("192.0.2.3")
    clock.now += 130
    t.timed_out("192.0.2.3")
    assert t.skipped("192.0.2.3")
    t.clear()                                   # qmail-tcpok
    assert not t.skipped("192.0.2.3")


def test_flush_forgets_connect_timeouts_through_the_couriers():
    # `qrelay flush` -> the scheduler's ALRM -> SwappableCourier -> ReadingCourier
    # -> RemoteDelivery's table (a worker's: Spawner.forget_timeouts, ALRM).
    from engine.delivery.channels import ReadingCourier
    from engine.delivery.service import SwappableCourier
    clock = iter(range(0, 10_000, 200)).__next__

    async def go():
        rd = RemoteDelivery(RemoteConfig(helohost="h.test", routes=SmtpRoutes(),
                                         dns_servers=("127.0.0.1:9",)), clock=clock)
        try:
            rd.tcpto.timed_out("192.0.2.1")
            rd.tcpto.timed_out("192.0.2.1")         # 200 s later: counted
            assert rd.tcpto.skipped("192.0.2.1")
            SwappableCourier(ReadingCourier(None, rd)).forget_timeouts()
            assert not rd.tcpto.skipped("192.0.2.1")
        finally:
            await rd.close()
    run(go())


def test_black_holed_mx_skipped_after_two_timeouts(fake_dns):
    import socket

    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now
    clock = Clock()

    async def go():
        started = await sinks(("127.0.0.2", {}))
        port = started[0].port
        hole = socket.socket()
        hole.bind(("127.0.0.8", port))
        hole.listen(0)
        filler = socket.create_connection(("127.0.0.8", port), timeout=1)
        fake_dns.zone.update({"bh.test": {"MX": [(10, "a.bh.test"), (20, "b.bh.test")]},
                              "a.bh.test": {"A": ["127.0.0.8"]}, "b.bh.test": {"A": ["127.0.0.2"]}})
        rd = RemoteDelivery(config(fake_dns, port=port, timeoutconnect=0.3, idle_timeout=0), clock=clock)
        loop = asyncio.get_running_loop()
        times = []
        try:
            for _ in range(3):
                t0 = loop.time()
                (res,) = await rd.deliver("bh.test", "a@src.test", ["x@bh.test"], MSG)
                assert res.status == "K"
                times.append(loop.time() - t0)
                clock.now += 121
            return times
        finally:
            await stop(rd, started)
            filler.close()
            hole.close()
    times = run(go())
    assert times[0] > 0.25 and times[1] > 0.25
    assert times[2] < 0.25                      # skipped without waiting


def test_destination_unreached_names_only_what_never_reached_it():
    from engine.delivery.mx import TEXT_DNS_SOFT
    from engine.delivery.remote import TEXT_NO_CONNECTION, destination_unreached
    for text in (TEXT_NO_CONNECTION, TEXT_DNS_SOFT,
                 "Connected to 192.0.2.1 but greeting failed.\nRemote host said: 421 busy\n",
                 "Connected to 192.0.2.1 but connection died. (#4.4.2)\n",
                 "Connected to 192.0.2.1 but connection died. Possible duplicate! (#4.4.2)\n"):
        assert destination_unreached(text), text
    for text in ("192.0.2.1 does not like recipient.\nRemote host said: 452 4.2.2 full\n",
                 "Connected to 192.0.2.1 but sender was rejected.\nRemote host said: 421 4.7.0 rate\n",
                 "Connected to 192.0.2.1 but my name was rejected.\nRemote host said: 451 x\n",
                 "Remote host said: 451 4.7.1 greylisted\n"):
        assert not destination_unreached(text), text


def test_a_domain_that_is_no_dns_name_has_no_host_not_a_crash(fake_dns):
    """Bytes that are not UTF-8 reach a domain (a relay client's RCPT): IDNA
    refused to encode it and the delivery crashed, deferred for a week with
    no cause said. qmail looks the bytes up and finds no such host."""
    async def go():
        rd = RemoteDelivery(config(fake_dns))
        try:
            return await rd.deliver("caf\udce9.test", "a@src.test", ["u@caf\udce9.test"], MSG)
        finally:
            await rd.close()
    assert run(go()) == [RecipientResult("u@caf\udce9.test", "D",
                                         "Sorry, I couldn't find any host named caf\udce9.test. (#5.1.2)\n")]


# --- memory: one copy of a big message, whatever its fan-out ------------------------

BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8000     # 8 MB, no dot to stuff


class _ReadingSpool:
    """Spool.read_message's contract: fresh bytes at each read."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.reads = 0

    def read_message(self, msgid: int) -> bytes:
        self.reads += 1
        return bytes(memoryview(self.message))     # a copy


def _traced(tmp_path, deliver):
    """deliver(port) run against bench/sink.py in a process of its own (so
    only the sending side is traced); returns (its value, peak bytes)."""
    import sys
    import tracemalloc

    from tests.conftest import REPO
    sys.path.insert(0, str(REPO / "bench"))
    from sink import SinkProcess
    sink = SinkProcess(tmp_path / "sink", "--quiet")
    try:
        tracemalloc.start()
        try:
            value = run(deliver(sink.port))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        sink.stop()
    return value, peak


def test_a_big_message_goes_out_without_a_copy_of_it(tmp_path):
    # The final dot was appended to the dot-stuffed message: a whole copy of
    # it for each transaction in flight.
    async def deliver(port):
        rd = RemoteDelivery(config(routes=f":127.0.0.1:{port}\n"))
        try:
            return await rd.deliver("example.test", "a@src.test", ["x@example.test"], BIG)
        finally:
            await rd.close()
    results, peak = _traced(tmp_path, deliver)
    assert statuses(results) == ["K"]
    assert peak < len(BIG) // 4, peak


def test_deliveries_of_one_message_at_once_share_one_read_of_it(tmp_path):
    # A message to many domains is delivered to them at once (one transaction
    # per domain): each read the message from the spool, a copy per domain.
    from engine.delivery.channels import Group, ReadingCourier
    spool = _ReadingSpool(BIG)

    async def deliver(port):
        courier = ReadingCourier(spool, RemoteDelivery(config(routes=f":127.0.0.1:{port}\n")))
        try:
            return await asyncio.gather(*(
                courier.deliver(Group("remote", 7, f"d{i}.test", "a@src.test", (f"x@d{i}.test",)))
                for i in range(5)))
        finally:
            await courier.close()
    results, peak = _traced(tmp_path, deliver)
    assert [statuses(r) for r in results] == [["K"]] * 5
    assert spool.reads == 1
    assert peak < 2 * len(BIG), peak
