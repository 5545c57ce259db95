"""engine/delivery/bounce.py: QSBMF text inside an RFC 3464 multipart/report."""
from __future__ import annotations

import email
import email.policy
import calendar

import pytest

from engine.delivery.bounce import (
    DOUBLE_BOUNCE_SENDER, BounceConfig, Failure, bounce_kind, build_bounce, date822,
    dsn_status, load_bounce_config, quote_address, wire_sender,
)
from engine.delivery.retry import DYING_TEXT

CFG = BounceConfig(bouncehost="bench.local", doublebouncehost="bench.local")
NOW = calendar.timegm((2026, 11, 27, 2, 20, 28))
ORIGINAL = (b"Received: (qmail 29203 invoked from network); 27 Nov 2026 02:20:28 -0000\r\n"
            b"From: a@bench.local\r\nSubject: hi\r\n\r\nbody line\r\n")


def _parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def test_date822():
    assert date822(NOW) == "27 Nov 2026 02:20:28 -0000"
    assert date822(calendar.timegm((2024, 1, 5, 9, 3, 7))) == "5 Jan 2024 09:03:07 -0000"


def test_bounce_matches_captured_qmail_text():
    b = build_bounce(CFG, sender="a@bench.local", original=ORIGINAL, now=NOW, qp=29209,
                     failures=[Failure("z@elsewhere.test",
                                       "Sorry, I couldn't find any host named elsewhere.test. (#5.1.2)\n")],
                     boundary="BOUNDARY")
    assert b is not None and b.sender == "" and b.recipient == "a@bench.local" and not b.double
    raw = b.message
    assert b"\n" not in raw.replace(b"\r\n", b"")       # CRLF wire form throughout
    assert raw.startswith(b"Received: (qmail 29209 invoked for bounce); 27 Nov 2026 02:20:28 -0000\r\n"
                          b"Date: 27 Nov 2026 02:20:28 -0000\r\n"
                          b"From: MAILER-DAEMON@bench.local\r\n"
                          b"To: a@bench.local\r\n"
                          b"Subject: failure notice\r\n")
    msg = _parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Message-ID"] is None
    text, status, copy = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert text.get_payload().replace("\r\n", "\n") == (
        "Hi. This is the qmail-send program at bench.local.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n"
        "\n"
        "<z@elsewhere.test>:\n"
        "Sorry, I couldn't find any host named elsewhere.test. (#5.1.2)\n"
        "\n"
        "--- Below this line is a copy of the message.\n")
    assert status.get_content_type() == "message/delivery-status"
    per_msg, per_rcpt = status.get_payload()
    assert per_msg["Reporting-MTA"] == "dns; bench.local"
    assert per_rcpt["Final-Recipient"] == "rfc822; z@elsewhere.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.2"
    assert per_rcpt["Diagnostic-Code"] is None
    assert copy.get_content_type() == "message/rfc822"
    inner = copy.get_payload()[0]
    assert inner["Return-Path"] == "<a@bench.local>"
    assert inner["Subject"] == "hi"
    assert raw.endswith(b"\r\n--BOUNDARY--\r\n")


def test_remote_reply_gives_status_and_diagnostic_and_multiple_recipients():
    fails = [
        Failure("x@example.net", "192.0.2.1 does not like recipient.\n"
                "Remote host said: 550 5.1.1 no such user\nGiving up on 192.0.2.1.\n"),
        Failure("y@example.net", "192.0.2.1 does not like recipient.\n"
                "Remote host said: 554 go away\nGiving up on 192.0.2.1.\n"),
    ]
    b = build_bounce(CFG, sender="s@a.test", original=ORIGINAL, now=NOW, arrival=NOW - 60,
                     failures=fails)
    msg = _parse(b.message)
    text, status, _ = msg.get_payload()
    body = text.get_payload().replace("\r\n", "\n")
    assert "<x@example.net>:\n192.0.2.1 does not like recipient.\nRemote host said: 550 5.1.1 no such user\n" \
           "Giving up on 192.0.2.1.\n\n<y@example.net>:\n" in body
    blocks = status.get_payload()
    assert blocks[0]["Arrival-Date"] == "27 Nov 2026 02:19:28 -0000"
    assert [(p["Status"], p["Diagnostic-Code"]) for p in blocks[1:]] == [
        ("5.1.1", "smtp; 550 5.1.1 no such user"), ("5.0.0", "smtp; 554 go away")]


def test_status_codes():
    assert dsn_status("Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n" + DYING_TEXT) == "5.4.7"
    assert dsn_status("Sorry, no mailbox here by that name. (#5.1.1)\n") == "5.1.1"
    assert dsn_status("Connected to 1.2.3.4 but sender was rejected.\nRemote host said: 553 5.7.1 no\n") == "5.7.1"
    assert dsn_status("weird") == "5.0.0"


def test_double_bounce():
    bounce_bytes = build_bounce(CFG, sender="a@x.test", original=ORIGINAL, now=NOW,
                                failures=[Failure("q@y.test", "nope (#5.1.1)\n")]).message
    b = build_bounce(CFG, sender="", original=bounce_bytes, now=NOW,
                     failures=[Failure("a@x.test", "a.x.test does not like recipient.\n\nodd\n")])
    assert b.double and b.sender == DOUBLE_BOUNCE_SENDER and b.recipient == "postmaster@bench.local"
    msg = _parse(b.message)
    assert msg["To"] == "postmaster@bench.local"
    text = msg.get_payload()[0].get_payload().replace("\r\n", "\n")
    assert text == ("Hi. This is the qmail-send program at bench.local.\n"
                    "I tried to deliver a bounce message to this address, but the bounce bounced!\n\n"
                    "<a@x.test>:\na.x.test does not like recipient.\n/odd\n\n"
                    "--- Below this line is the original bounce.\n")
    inner = msg.get_payload()[2].get_payload()[0]
    assert inner["Return-Path"] == "<>"
    assert wire_sender(b.sender) == ""


@pytest.mark.parametrize("report, shown", [
    ("a\n\nb\n", "a\n/b\n"),
    ("a\n\n\nb\n", "a\n//b\n"),         # every newline after a newline
    ("\nleading\n", "/leading\n"),        # the one ending "<addr>:" counts
    ("no newline", "no newline\n"),
    ("", ""),                              # nothing added to an empty report
])
def test_report_paragraph_escaping_is_qmail_sends(report, shown):
    # qmail-send's addbounce: `\n` after `\n` becomes `/` (except the last
    # byte), so no report can end its paragraph early or add an empty one.
    b = build_bounce(CFG, sender="a@b.test", original=ORIGINAL, now=NOW,
                     failures=[Failure("r@x.test", report)])
    text = _parse(b.message).get_payload()[0].get_payload().replace("\r\n", "\n")
    assert f"<r@x.test>:\n{shown}\n--- Below this line" in text


def test_triple_bounce_and_discard():
    assert build_bounce(CFG, sender=DOUBLE_BOUNCE_SENDER, original=ORIGINAL, now=NOW,
                        failures=[Failure("p@x", "no (#5.1.1)\n")]) is None
    assert bounce_kind(DOUBLE_BOUNCE_SENDER, CFG) == "triple"
    no_db = BounceConfig(bouncehost="h", doublebounceto="")
    assert bounce_kind("", no_db) == "double-discard"
    assert build_bounce(no_db, sender="", original=ORIGINAL, now=NOW,
                        failures=[Failure("p@x", "no (#5.1.1)\n")]) is None
    assert build_bounce(CFG, sender="a@b", original=ORIGINAL, now=NOW, failures=[]) is None


def test_verp_sender_loses_suffix():
    b = build_bounce(CFG, sender="list-@lists.test-@[]", original=ORIGINAL, now=NOW,
                     failures=[Failure("p@x", "no (#5.1.1)\n")])
    assert b.recipient == "list-@lists.test"
    # qmail-send strips the sender before it writes anything: the copy's
    # Return-Path is the address the bounce goes to, never the `-@[]` form.
    assert b"Return-Path: <list-@lists.test>\r\n" in b.message
    assert b"-@[]" not in b.message


def test_a_sender_that_is_not_utf8_is_bounced_as_its_bytes():
    # The receiver keeps an address's bytes (utf-8, surrogateescape): MAIL
    # FROM:<a\xff@src.test> is accepted, and its bounce once crashed the
    # scheduler on the copy's Return-Path, again at every restart.
    sender = b"a\xff@src.test".decode("utf-8", "surrogateescape")
    b = build_bounce(CFG, sender=sender, original=ORIGINAL, now=NOW,
                     failures=[Failure("p@x", "no (#5.1.1)\n")])
    assert b.recipient == sender
    assert b"\r\nTo: \"a\xff\"@src.test\r\n" in b.message
    assert b"\r\nReturn-Path: <\"a\xff\"@src.test>\r\nReceived: (qmail 29203" in b.message


def test_line_breaks_in_addresses_and_reports_never_reach_the_bounce_raw():
    # `qrelay import-qmail` takes a sender as qmail-queue stored it (any byte
    # but NUL), and a .qmail program's output keeps its CRs: quoted into To:,
    # a sender's CRLF started a header of its own (here a Bcc:), and a
    # report's CR was a bare CR in the bounce.
    sender = "a\r\nBcc: victim@evil.test\r\nX: \"@src.test"
    b = build_bounce(CFG, sender=sender, original=ORIGINAL, now=NOW, failures=[
        Failure("p\r@x.test", "program said:\r\nline\rtwo\0three\n"),
        Failure("q\n@x.test", "no (#5.1.1)\n")])
    assert b.recipient == sender               # the envelope keeps the address as stored
    raw = b.message
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert b"\0" not in raw
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert not any(line.startswith((b"Bcc", b"X:")) for line in head.split(b"\r\n"))
    assert b"\r\nTo: \"a__Bcc: victim@evil.test__X: \\\"\"@src.test\r\n" in raw
    assert b"Return-Path: <\"a__Bcc: victim@evil.test__X: \\\"\"@src.test>\r\n" in raw
    assert b"<p_@x.test>:\r\nprogram said:\r\nlinetwo?three\r\n\r\n<q_@x.test>:\r\n" in raw
    assert b"Final-Recipient: rfc822; p_@x.test\r\n" in raw


def test_big_original_returns_headers_only():
    cfg = BounceConfig(bouncehost="h", max_copy_bytes=1000)
    big = b"Subject: big\r\nX-A: 1\r\n\r\n" + b"x" * 5000 + b"\r\n"
    b = build_bounce(cfg, sender="a@b.test", original=big, now=NOW,
                     failures=[Failure("p@x", "no (#5.1.1)\n")])
    copy = _parse(b.message).get_payload()[2]
    assert copy.get_content_type() == "text/rfc822-headers"
    assert b"xxxx" not in b.message
    assert b"Return-Path: <a@b.test>\r\nSubject: big\r\nX-A: 1\r\n" in b.message


def test_a_huge_original_is_not_copied_to_bounce_its_header():
    # The caller holds the message once; its bounce (header only over
    # max_copy_bytes) must not cost a second copy of it.
    import tracemalloc
    big = b"Subject: big\r\n\r\n" + b"x" * (30 * 1024 * 1024)
    tracemalloc.start()
    try:
        b = build_bounce(CFG, sender="a@b.test", original=big, now=NOW,
                         failures=[Failure("p@x", "no (#5.1.1)\n")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert b"Return-Path: <a@b.test>\r\nSubject: big\r\n\r\n--" in b.message
    assert peak < 4 * CFG.max_copy_bytes


@pytest.mark.parametrize("big", [
    b"no header at all, no blank line\r\n" * 200,               # a script's bare body
    b"Subject: big\r\n" + b"X-Junk: x\r\n" * 500 + b"\r\nbody\r\n",
    b"X-Long: " + b"y" * 5000 + b"\r\n\r\nbody\r\n",            # one line over the limit
])
def test_a_header_bigger_than_the_limit_is_cut_too(big):
    # "Header only" must still be bounded: a message without a blank line is
    # all header, and a bounce must not cost its size.
    cfg = BounceConfig(bouncehost="h", max_copy_bytes=1000)
    b = build_bounce(cfg, sender="a@b.test", original=big, now=NOW,
                     failures=[Failure("p@x", "no (#5.1.1)\n")])
    copy = _parse(b.message).get_payload()[2]
    assert copy.get_content_type() == "text/rfc822-headers"
    start = b.message.index(b"Return-Path: <a@b.test>\r\n")
    end = b.message.index(b"\r\n--", start)
    assert end - start <= 1000
    first = big.split(b"\r\n", 1)[0]
    assert (first in b.message) == (len(first) < 900)    # whole lines only
    # Even a limit of 0 returns the Return-Path line, and nothing that is cut.
    b = build_bounce(BounceConfig(bouncehost="h", max_copy_bytes=0), sender="a@b.test",
                     original=big, now=NOW, failures=[Failure("p@x", "no (#5.1.1)\n")])
    assert b"Content-Description: Undelivered message\r\n\r\nReturn-Path: <a@b.test>\r\n\r\n--" \
        in b.message


def test_an_8bit_original_is_labelled_8bit():
    """RFC 2046 5.2.1 / RFC 2045 6.4: a message/rfc822 part (and the multipart
    around it) holding 8-bit bytes says `8bit`; unlabelled it is 7bit, and a
    gateway downgrading for a next hop without 8BITMIME would trust that."""
    eight = ORIGINAL.replace(b"Subject: hi", b"Subject: h\xc3\xa9")
    b = build_bounce(CFG, sender="a@bench.local", original=eight, now=NOW,
                     failures=[Failure("z@x.test", "no (#5.1.1)\n")])
    msg = _parse(b.message)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert msg.get_payload()[2]["Content-Transfer-Encoding"] == "8bit"
    b = build_bounce(CFG, sender="a@bench.local", original=ORIGINAL, now=NOW,
                     failures=[Failure("z@x.test", "no (#5.1.1)\n")])
    msg = _parse(b.message)
    assert msg["Content-Transfer-Encoding"] is None
    assert msg.get_payload()[2]["Content-Transfer-Encoding"] is None
    b = build_bounce(CFG, sender="a@bench.local", original=ORIGINAL, now=NOW,
                     failures=[Failure("j\u00f6@x.test", "no (#5.1.1)\n")])
    msg = _parse(b.message)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert msg.get_payload()[2]["Content-Transfer-Encoding"] is None


def test_quote_address():
    assert quote_address("MAILER-DAEMON@h.test") == "MAILER-DAEMON@h.test"
    assert quote_address("a b@h") == '"a b"@h'
    assert quote_address("a..b@h") == '"a..b"@h'
    assert quote_address("first.last@h") == "first.last@h"
    # The receiver keeps a local part that needs its quotes as sent: the
    # bounce's To: must not quote it a second time.
    assert quote_address('"a b"@h') == '"a b"@h'
    assert quote_address('"a\\"b"@h') == '"a\\"b"@h'



def test_return_path_is_quoted_as_qmail_send_quotes_it():
    # qmail-send: `Return-Path: <` quote2(sender) `>`, the same quoting as To:.
    for sender, shown in [("a..b@x.test", '"a..b"@x.test'), (".a@x.test", '".a"@x.test'),
                          ("first.last@x.test", "first.last@x.test"),
                          ('"a b"@x.test', '"a b"@x.test')]:
        b = build_bounce(CFG, sender=sender, original=ORIGINAL, now=NOW,
                         failures=[Failure("p@x", "no (#5.1.1)\n")])
        assert f"\r\nTo: {shown}\r\n".encode() in b.message
        assert f"\r\nReturn-Path: <{shown}>\r\nReceived: (qmail 29203".encode() in b.message


def test_load_bounce_config_defaults_and_files(root):
    cfg = load_bounce_config(root)
    assert (cfg.bouncefrom, cfg.bouncehost, cfg.doublebounceto, cfg.doublebouncehost) == (
        "MAILER-DAEMON", "mx.example.com", "postmaster", "mx.example.com")
    (root / "control" / "bouncehost").write_text("b.example.com\n")
    (root / "control" / "doublebounceto").write_text("abuse\n")
    cfg = load_bounce_config(root)
    assert cfg.bouncehost == "b.example.com" and cfg.doublebounceto == "abuse"


@pytest.mark.parametrize("n", [1, 5])
def test_every_failure_listed(n):
    fails = [Failure(f"u{i}@d.test", f"bad {i} (#5.1.1)\n") for i in range(n)]
    msg = _parse(build_bounce(CFG, sender="a@b", original=ORIGINAL, now=NOW, failures=fails).message)
    assert len(msg.get_payload()[1].get_payload()) == n + 1


def test_verp_sender_is_qmail_sends():
    from engine.delivery.bounce import verp_sender
    assert verp_sender("list-return-7-@lists.test-@[]", "joe@far.test") == \
        "list-return-7-joe=far.test@lists.test"
    assert verp_sender("a-@b-@[]", "x@y@z") == "a-x@y=z@b"          # the last @ of the recipient
    assert verp_sender("pre-@[]", "joe@far.test") == "prejoe=far.test"   # no @ in the sender
    assert verp_sender("a-@b-@[]", "local") == "a-local@b"
    for plain in ("a@b", "", "#@[]"):
        assert verp_sender(plain, "joe@far.test") == plain
