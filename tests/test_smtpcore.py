"""Unit tests of engine._smtpcore: one test per grammar case of contract A.

Property tests (hypothesis) live in test_smtpcore_properties.py.
"""
from __future__ import annotations

import doctest

import pytest

from engine import _smtpcore
from engine._smtpcore import (
    MAX_ADDRESS,
    TOO_LONG,
    DataScanner,
    LineReader,
    parse_command,
    parse_params,
    parse_path,
    parse_rcpt,
    split_address,
)


def test_module_docstring_examples_run():
    result = doctest.testmod(_smtpcore)
    assert result.attempted >= 15
    assert result.failed == 0


# --------------------------------------------------------------------------- LineReader


def drain(reader: LineReader) -> list:
    lines = []
    while (line := reader.next_line()) is not None:
        lines.append(line)
    return lines


def test_reader_crlf_and_bare_lf():
    r = LineReader()
    r.feed(b"HELO a\r\nNOOP\nRSET\r\n")
    assert drain(r) == [b"HELO a", b"NOOP", b"RSET"]
    assert r.buffered == 0


def test_reader_only_one_cr_right_before_lf_is_dropped():
    r = LineReader()
    r.feed(b"A\r\r\nB\rC\n\r\nD\r")
    assert drain(r) == [b"A\r", b"B\rC", b""]
    assert r.buffered == 2          # "D\r" waits for its LF
    r.feed(b"\n")
    assert drain(r) == [b"D"]


def test_reader_empty_lines():
    r = LineReader()
    r.feed(b"\n\r\n")
    assert drain(r) == [b"", b""]


def test_reader_no_complete_line_returns_none():
    r = LineReader()
    assert r.next_line() is None
    r.feed(b"MAIL FROM:<a@b>")
    assert r.next_line() is None
    assert r.buffered == len(b"MAIL FROM:<a@b>")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_reader_chunk_splits(size):
    stream = b"EHLO x\r\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\r\n\r\nDATA\r\n"
    r = LineReader()
    got = []
    for k in range(0, len(stream), size):
        r.feed(stream[k:k + size])
        got += drain(r)
    assert got == [b"EHLO x", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"", b"DATA"]


def test_reader_cr_split_from_lf():
    r = LineReader()
    r.feed(b"QUIT\r")
    assert r.next_line() is None
    r.feed(b"\n")
    assert r.next_line() == b"QUIT"


def test_reader_limit_is_exclusive_of_terminator():
    r = LineReader(max_line=5)
    r.feed(b"12345\r\n123456\r\n12345\n123456\nok\n")
    assert drain(r) == [b"12345", TOO_LONG, b"12345", TOO_LONG, b"ok"]


def test_reader_too_long_line_across_chunks_reported_once_at_its_lf():
    r = LineReader(max_line=8)
    r.feed(b"NOOP\r\n0123456789")
    assert r.next_line() == b"NOOP"
    assert r.next_line() is None
    r.feed(b"abcdef")
    assert r.next_line() is None
    r.feed(b"xyz\r\nQUIT\r\n")
    assert drain(r) == [TOO_LONG, b"QUIT"]


def test_reader_line_of_exactly_max_plus_cr_split():
    # max_line bytes + CR in one chunk, LF in the next: not too long.
    r = LineReader(max_line=4)
    r.feed(b"abcd\r")
    r.feed(b"\n")
    assert r.next_line() == b"abcd"
    r.feed(b"abcde\r")
    r.feed(b"\n")
    assert r.next_line() is TOO_LONG


def test_reader_ten_megabytes_without_lf_keeps_memory_bounded():
    r = LineReader(max_line=512)
    chunk = b"A" * 65536
    peak = 0
    for _ in range(160):            # 10 MiB
        r.feed(chunk)
        assert r.next_line() is None
        peak = max(peak, r.buffered)
    assert peak <= 512 + 2
    r.feed(b"B\r\nQUIT\r\n")
    assert drain(r) == [TOO_LONG, b"QUIT"]
    assert r.buffered == 0


def test_reader_one_huge_chunk_without_lf_is_bounded():
    r = LineReader(max_line=100)
    r.feed(b"x" * (10 * 1024 * 1024))
    assert r.buffered <= 102
    r.feed(b"\nNOOP\n")
    assert drain(r) == [TOO_LONG, b"NOOP"]


def test_reader_take_buffer_returns_unread_bytes_and_empties():
    r = LineReader()
    r.feed(b"DATA\r\nSubject: x\r\n\r\nbody")
    assert r.next_line() == b"DATA"
    assert r.take_buffer() == b"Subject: x\r\n\r\nbody"
    assert r.buffered == 0
    assert r.next_line() is None
    assert r.take_buffer() == b""
    r.feed(b"QUIT\r\n")
    assert r.next_line() == b"QUIT"


def test_reader_take_buffer_ends_discarding():
    r = LineReader(max_line=3)
    r.feed(b"abcdefgh")
    assert r.take_buffer() == b"abcde"     # the kept head of the over-long line
    r.feed(b"xy\r\n")
    assert r.next_line() == b"xy"


def test_reader_take_body_keeps_the_last_feeds_long_line_whole():
    r = LineReader(max_line=8)
    long = b"0123456789abcdef"
    r.feed(b"DATA\r\nSubject\r\n" + long)
    assert r.next_line() == b"DATA"
    assert r.take_body() == b"Subject\r\n" + long     # DATA's body, its lines whole
    assert r.buffered == 0 and r.unterminated == 0
    r.feed(long)
    assert r.next_line() is None                        # no DATA came: its tail goes
    assert r.take_body() == long[:10]
    r.feed(long)
    r.feed(b"ijk")                                      # dropped over two feeds: the head only
    assert r.take_body() == long[:10]
    r.feed(b"QUIT\r\n")
    assert r.take_body() == b"QUIT\r\n"


def test_reader_accepts_bytearray_and_memoryview():
    r = LineReader()
    r.feed(bytearray(b"A\n"))
    r.feed(memoryview(b"B\n"))
    assert drain(r) == [b"A", b"B"]


def test_reader_rejects_negative_limit_and_str():
    with pytest.raises(ValueError):
        LineReader(max_line=-1)
    with pytest.raises(TypeError):
        LineReader().feed("text")


def test_too_long_is_a_sentinel_not_bytes():
    assert not isinstance(TOO_LONG, (bytes, bytearray))
    assert repr(TOO_LONG) == "TOO_LONG"


# --------------------------------------------------------------------------- parse_command


@pytest.mark.parametrize("line, expected", [
    (b"HELO client.example", (b"HELO", b"client.example")),
    (b"rcpt TO:<a@b>", (b"RCPT", b"TO:<a@b>")),
    (b"MaIl   FROM:<a@b>  SIZE=1 ", (b"MAIL", b"FROM:<a@b>  SIZE=1 ")),
    (b"QUIT", (b"QUIT", b"")),
    (b"NOOP ", (b"NOOP", b"")),
    (b"", (b"", b"")),
    (b" DATA", (b"", b"DATA")),
    (b"ehlo\txyz", (b"EHLO\tXYZ", b"")),
    (b"h\xc3\xa9lo x", (b"H\xc3\xa9LO", b"x")),
])
def test_parse_command(line, expected):
    assert parse_command(line) == expected


# --------------------------------------------------------------------------- parse_path


@pytest.mark.parametrize("arg, expected", [
    (b"FROM:<a@b>", (b"a@b", b"")),
    (b"FROM: <a@b>", (b"a@b", b"")),                   # space after the colon
    (b"FROM:   <a@b>", (b"a@b", b"")),
    (b"TO:a@b", (b"a@b", b"")),                        # no brackets
    (b"FROM:a@b", (b"a@b", b"")),
    (b"TO: a@b", (b"a@b", b"")),                       # spaces skipped without '<'
    (b"TO:a@b SIZE=1", (b"a@b", b"SIZE=1")),           # space ends a bracketless path
    (b"FROM:<>", (b"", b"")),
    (b"TO:<>", (b"", b"")),
    (b"FROM x", (b"", b"")),                           # neither '<' nor ':'
    (b"", (b"", b"")),
    (b"FROM:", (b"", b"")),
    (b"TO:<@a,@b:u@c>", (b"u@c", b"")),                # source route stripped
    (b"TO:<@a:u@c>", (b"u@c", b"")),
    (b"TO:<@a>", (b"", b"")),                          # route without ':' eats all (qmail)
    (b'TO:<"a b"@c>', (b'"a b"@c', b"")),              # quoted local part kept with quotes
    (b'TO:<"x>y"@c>', (b'"x>y"@c', b"")),              # terminator literal inside quotes
    (b'TO:<"user@foreign"@local>', (b'"user@foreign"@local', b"")),
    (b"TO:<a\\>b@c>", (b"a\\>b@c", b"")),              # escaped terminator, backslash kept
    (b'TO:<a\\"b@c>', (b'a\\"b@c', b"")),              # escaped quote does not open quoting
    (b"TO:<u@[1.2.3.4]>", (b"u@[1.2.3.4]", b"")),      # domain literal
    (b"TO:<u@[IPv6:::1]>", (b"u@[IPv6:::1]", b"")),
    (b"FROM:<a@b> SIZE=100 BODY=8BITMIME", (b"a@b", b"SIZE=100 BODY=8BITMIME")),
    (b"FROM:<a@b>   SMTPUTF8", (b"a@b", b"SMTPUTF8")),
    (b"FROM:<a@b>SIZE=1", (b"a@b", b"SIZE=1")),
    (b"FROM:<a@b> AUTH=<> ", (b"a@b", b"AUTH=<> ")),
    (b"TO:<a@b", (b"a@b", b"")),                       # missing terminator: no error
    (b"TO:<a@b\\", (b"a@b\\", b"")),                   # trailing backslash kept
    (b'TO:<"open@b> X', (b'"open@b> X', b"")),          # unterminated quote runs to the end
    (b"TO:<<a@b>>", (b"<a@b", b">")),                  # after the FIRST '<'
    (b"TO x<a@b>", (b"a@b", b"")),                     # '<' wins over ':' wherever it is
    (b"TO:<Joe.User@Example.COM>", (b"Joe.User@Example.COM", b"")),  # case kept
    (b"TO:<a%b@c>", (b"a%b@c", b"")),                  # no percent hack here
])
def test_parse_path(arg, expected):
    assert parse_path(arg) == expected


def test_parse_path_limit_900_ok_901_syntax_error():
    local = b"u" * (MAX_ADDRESS - 2)
    assert MAX_ADDRESS == 900
    ok = local + b"@h"
    assert len(ok) == 900
    assert parse_path(b"TO:<" + ok + b">") == (ok, b"")
    assert parse_path(b"TO:" + ok) == (ok, b"")
    assert parse_path(b"TO:<" + ok + b"x>") is None
    assert parse_path(b"TO:" + ok + b"x SIZE=1") is None
    # the limit applies to the address after the source route is dropped
    assert parse_path(b"TO:<@" + b"r" * 200 + b":" + ok + b">") == (ok, b"")


def test_parse_rcpt_equals_command_then_path():
    for line in [b"RCPT TO:<user@example.com>", b"mail   FROM:<> SIZE=1", b"RCPT",
                 b"RCPT TO:" + b"x" * 901, b'RCPT TO:<@r:"a b"@c> X=1']:
        assert parse_rcpt(line) == parse_path(parse_command(line)[1])


def test_parsers_refuse_non_bytes():
    for fn in (parse_command, parse_path, parse_rcpt, split_address, parse_params):
        with pytest.raises(TypeError):
            fn("text")
        with pytest.raises(TypeError):
            fn(None)


# --------------------------------------------------------------------------- split_address


@pytest.mark.parametrize("addr, expected", [
    (b"user@example.com", (b"user", b"example.com")),
    (b"postmaster", (b"postmaster", None)),
    (b"", (b"", None)),
    (b"a@b@c", (b"a@b", b"c")),                        # last '@'
    (b'"user@foreign"@local', (b'"user@foreign"', b"local")),
    (b'"a@b"', (b'"a@b"', None)),                      # only '@' is quoted
    (b"a\\@b", (b"a\\@b", None)),                      # escaped '@'
    (b"a\\@b@c", (b"a\\@b", b"c")),
    (b"u@[1.2.3.4]", (b"u", b"[1.2.3.4]")),
    (b"@", (b"", b"")),
])
def test_split_address(addr, expected):
    assert split_address(addr) == expected


# --------------------------------------------------------------------------- parse_params


@pytest.mark.parametrize("rest, expected", [
    (b"", []),
    (b"   ", []),
    (b"SIZE=100", [(b"SIZE", b"100")]),
    (b"size=100 body=8bitmime", [(b"SIZE", b"100"), (b"BODY", b"8bitmime")]),
    (b"SMTPUTF8", [(b"SMTPUTF8", None)]),
    (b"AUTH=<>", [(b"AUTH", b"<>")]),
    (b"AUTH=joe+40example.com", [(b"AUTH", b"joe+40example.com")]),
    (b"  X-FOO=1   BODY=7BIT ", [(b"X-FOO", b"1"), (b"BODY", b"7BIT")]),
    (b"ENVID=\xc3\xa9", [(b"ENVID", b"\xc3\xa9")]),    # UTF-8 allowed (SMTPUTF8)
])
def test_parse_params(rest, expected):
    assert parse_params(rest) == expected


@pytest.mark.parametrize("rest", [
    b"=100",            # empty key
    b"SIZE=",           # empty value
    b"SIZE==1",         # '=' in value
    b"SI_ZE=1",         # bad key character
    b"-X=1",            # key must start with a letter or digit
    b"SIZE=1\t",        # control byte in value
    b"SIZE=1 BO\x00DY",
    b"SIZE=1 =",
    b"S\xc3\xa9=1",     # non-ASCII key
])
def test_parse_params_malformed(rest):
    assert parse_params(rest) is None


# --------------------------------------------------------------------------- DataScanner


def scan_all(stream: bytes, max_bytes: int = 0, chunk: int = 0) -> tuple[DataScanner, int]:
    s = DataScanner(max_bytes)
    if not chunk:
        return s, s.feed(stream)
    used = 0
    for k in range(0, len(stream), chunk):
        part = stream[k:k + chunk]
        n = s.feed(part)
        used += n
        if n < len(part):
            break
    return s, used


def test_scanner_dot_unstuffing():
    s, used = scan_all(b"..one\r\n.two\r\n...\r\n. \r\nx.\r\n.\r\n")
    assert s.done and used == len(b"..one\r\n.two\r\n...\r\n. \r\nx.\r\n.\r\n")
    assert s.message == b".one\r\ntwo\r\n..\r\n \r\nx.\r\n"


def test_scanner_empty_message():
    s, used = scan_all(b".\r\nQUIT\r\n")
    assert (s.done, used, s.message, s.size, s.hops) == (True, 3, b"", 0, 0)


def test_scanner_message_ends_with_crlf_before_marker():
    s, used = scan_all(b"a\r\n.\r\n")
    assert s.message == b"a\r\n" and s.size == 2 and used == 6


def test_scanner_take_message_puts_a_prefix_in_front_and_lets_its_copy_go():
    s, _ = scan_all(b"..a\r\nb\r\n.\r\n")
    assert s.take_message(b"Received: x\r\n") == b"Received: x\r\n.a\r\nb\r\n"
    assert s.buffered == 0 and s.size == 5 and s.take_message() == b""
    big, _ = scan_all(b"x" * 50 + b"\r\n.\r\n", max_bytes=10)
    assert big.too_big and big.take_message(b"R\r\n") == b""


def test_scanner_not_done_without_marker():
    s, used = scan_all(b"a\r\nb\r\n")
    assert not s.done and used == 6 and s.message == b"a\r\nb\r\n"


def test_scanner_end_marker_split_at_every_boundary():
    stream = b"Subject: t\r\n\r\n..x\r\nbody\r\n.\r\nMAIL FROM:<a@b>\r\n"
    end = stream.index(b"\r\n.\r\n") + 5
    for cut1 in range(len(stream) + 1):
        for cut2 in range(cut1, len(stream) + 1):
            s = DataScanner()
            rest = b""
            for part in (stream[:cut1], stream[cut1:cut2], stream[cut2:]):
                if s.done:
                    rest += part
                    continue
                n = s.feed(part)
                rest += part[n:]
            assert s.done, (cut1, cut2)
            assert s.message == b"Subject: t\r\n\r\n.x\r\nbody\r\n"
            assert rest == stream[end:], (cut1, cut2)


def test_scanner_bytes_after_marker_unconsumed():
    s = DataScanner()
    assert s.feed(b"x\r\n.\r\nQUIT\r\n") == 6
    assert s.done
    assert s.feed(b"more") == 0          # a finished scanner consumes nothing
    assert s.message == b"x\r\n"


def test_scanner_size_counts_crlf_as_one_and_dots_removed():
    s, _ = scan_all(b"ab\r\n..c\r\nd\re\r\n.\r\n")
    assert s.message == b"ab\r\n.c\r\nd\re\r\n"
    # qmail writes "ab\n.c\nd\re\n" = 10 bytes
    assert s.size == 10


@pytest.mark.parametrize("chunk", [0, 1, 7, 4096])
def test_scanner_max_bytes_too_big_keeps_scanning_with_bounded_memory(chunk):
    body = b"".join(b"line %06d xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n" % k for k in range(20000))
    stream = body + b".\r\nQUIT\r\n"
    s = DataScanner(max_bytes=10000)
    used = peak = 0
    step = chunk or len(stream)
    for k in range(0, len(stream), step):
        part = stream[k:k + step]
        n = s.feed(part)
        used += n
        peak = max(peak, s.buffered)
        if s.done:
            break
    assert s.done and s.too_big
    assert used == len(body) + 3
    assert s.message == b""
    assert s.size == len(body) - body.count(b"\r\n")
    assert peak <= 2 * 10000 + step + 64


def test_scanner_drop_scans_on_to_the_end_holding_nothing():
    s = DataScanner()
    s.feed(b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n")
    assert s.buffered > 5000
    s.drop()                                  # the receiver's buffer budget is spent
    assert s.buffered == 0 and s.dropped
    used = s.feed(b"more\r\n.\r\nQUIT\r\n")
    assert s.done and used == len(b"more\r\n.\r\n")
    assert s.message == b"" and s.buffered == 0 and not s.too_big
    s.reset()
    assert not s.dropped
    s.feed(b"a\r\n.\r\n")
    assert s.message == b"a\r\n"


def test_scanner_max_bytes_exact_limit_is_not_too_big():
    body = b"x" * 98 + b"\r\n"               # qmail counts 99 bytes
    s, _ = scan_all(body + b".\r\n", max_bytes=99)
    assert not s.too_big and s.message == body
    s, _ = scan_all(body + b".\r\n", max_bytes=98)
    assert s.too_big and s.message == b""


def test_scanner_hops_only_in_header():
    msg = (b"Received: from a\r\n"
           b"RECEIVED: from b\r\n"
           b"received:x\r\n"
           b"Delivered-To: joe@example.com\r\n"
           b"delivered\r\n"            # 9 bytes match: counts
           b"Deliver: no\r\n"
           b"X-Received: no\r\n"
           b" Received: continuation does not count\r\n"
           b"\r\n"
           b"Received: in the body\r\n"
           b"Delivered-To: in the body\r\n")
    s, _ = scan_all(msg + b".\r\n")
    assert s.hops == 5


def test_scanner_hops_split_across_chunks():
    msg = b"Received: a\r\nDelivered-To: b\r\n\r\nReceived: body\r\n.\r\n"
    for size in range(1, 12):
        s, _ = scan_all(msg, chunk=size)
        assert s.hops == 2, size


def test_scanner_hops_no_empty_line_all_header():
    s, _ = scan_all(b"Received: a\r\nReceived: b\r\n.\r\n")
    assert s.hops == 2


def test_scanner_bare_lf_flag():
    s, _ = scan_all(b"Subject: x\r\n\r\nline with bare LF\nline two\r\n.\r\n")
    assert s.done and s.bare_lf and not s.bare_cr
    s, _ = scan_all(b"ok\r\n.\r\n")
    assert not s.bare_lf and not s.bare_cr and not s.has_nul


def test_scanner_bare_lf_in_header_and_at_start():
    s, _ = scan_all(b"\nx\r\n.\r\n")
    assert s.bare_lf


def test_scanner_bare_cr_flag_kept_in_message():
    s, _ = scan_all(b"a\rb\r\n.\r\n")
    assert s.bare_cr and not s.bare_lf
    assert s.message == b"a\rb\r\n"
    s, _ = scan_all(b"a\r\r\n.\r\n")
    assert s.bare_cr and s.message == b"a\r\r\n"


def test_scanner_bare_cr_split_from_its_next_byte():
    for tail in (b"x", b"\r"):
        s = DataScanner()
        s.feed(b"a\r")
        s.feed(tail + b"\r\n.\r\n")
        assert s.bare_cr
    s = DataScanner()
    s.feed(b"a\r")
    s.feed(b"\n.\r\n")
    assert not s.bare_cr and s.done


def test_scanner_nul_flag():
    s, _ = scan_all(b"a\x00b\r\n.\r\n")
    assert s.has_nul and s.message == b"a\x00b\r\n"
    # a NUL after the marker is not part of the message
    s, _ = scan_all(b"a\r\n.\r\n\x00")
    assert not s.has_nul


def test_scanner_dot_cr_not_followed_by_lf_keeps_dot_like_qmail():
    s, _ = scan_all(b"x\r\n.\rY\r\n.\r\n")
    assert s.done and s.message == b"x\r\n.\rY\r\n" and s.bare_cr


@pytest.mark.parametrize("smuggle", [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\r\r\n", b"\r.\r",
    b"\n.\r", b"\r\n\x00.\r\n", b"\r\n .\r\n",
])
def test_scanner_smuggling_sequences_do_not_end_data(smuggle):
    stream = b"Subject: x\r\n\r\nhead" + smuggle + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\n.\r\nQUIT\r\n"
    s = DataScanner()
    used = s.feed(stream)
    assert s.done
    assert stream[used:] == b"QUIT\r\n"
    assert b"MAIL FROM:<evil@x>" in s.message


def test_scanner_reset_reuses():
    s = DataScanner(max_bytes=5)
    s.feed(b"Received: x\r\n\r\na\nb\rc\x00 long body\r\n.\r\n")
    assert s.done and s.too_big and s.hops == 1 and s.bare_lf and s.bare_cr and s.has_nul
    s.reset()
    assert (s.done, s.too_big, s.hops, s.bare_lf, s.bare_cr, s.has_nul, s.size, s.message) == \
        (False, False, 0, False, False, False, 0, b"")
    assert s.feed(b"..x\r\n.\r\n") == 8
    assert s.done and s.message == b".x\r\n"


def test_scanner_starts_at_line_start_after_reset():
    s = DataScanner()
    s.feed(b"abc")
    s.reset()
    s.feed(b".\r\n")
    assert s.done and s.message == b""


def test_scanner_rejects_negative_limit():
    with pytest.raises(ValueError):
        DataScanner(max_bytes=-1)


def test_scanner_accepts_memoryview_slices():
    data = memoryview(b"junk..a\r\n.\r\n")[4:]
    s = DataScanner()
    assert s.feed(data) == 8
    assert s.message == b".a\r\n"


def test_scanner_hops_counted_on_raw_lines_like_qmail():
    # qmail looks at the raw bytes: a dot-stuffed ".Received:" does not count,
    # and mixed case does.
    msg = b"ReCeIvEd: a long header line\r\n..Received: b\r\nDELIVERED-TO: c\r\n\r\n.\r\n"
    for size in (0, 1, 5, 9, 10, 31):
        s, _ = scan_all(msg, chunk=size)
        assert s.hops == 2, size


def test_scanner_many_header_lines_fast_path():
    header = b"".join(b"Received: from hop%d.example by x\r\n" % k for k in range(150))
    header += b"X-Other: y\r\n" * 100
    s, used = scan_all(header + b"\r\nReceived: body\r\n.\r\n", chunk=4096)
    assert s.done and s.hops == 150


def test_reader_unterminated_counts_dropped_bytes_until_the_lf():
    r = LineReader(max_line=8)
    r.feed(b"NOOP\r\n0123")
    assert r.next_line() == b"NOOP" and r.unterminated == 4
    r.feed(b"x" * 1000)                      # dropped, but counted
    assert r.unterminated == 1004 and r.buffered <= 8 + 2
    r.feed(b"y\r\nQU")
    assert r.unterminated == 2
    assert drain(r) == [TOO_LONG]
    assert r.take_buffer() == b"QU" and r.unterminated == 0
