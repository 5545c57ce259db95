"""Property tests (hypothesis) of engine._smtpcore against plain-Python readings.

- DataScanner vs a direct port of qmail-smtpd.c blast() (byte at a time, whole
  stream), for any stream and any chunking.
- Dot-stuffing any body and feeding it in any chunking gives it back byte-exact.
- SMTP-smuggling sequences inside a body never end DATA.
- parse_path vs a port of qmail's addrparse (quotes kept; with quotes and
  escapes stripped it must equal what qmail itself stores).
- LineReader vs a plain split at LF.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine._smtpcore import (
    TOO_LONG,
    DataScanner,
    LineReader,
    parse_command,
    parse_params,
    parse_path,
    parse_rcpt,
    split_address,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- references


def qmail_blast(stream: bytes) -> dict:
    """qmail-smtpd.c blast() in Python. A stray LF sets a flag instead of
    hanging up (qmail's policy is the receiver's job) and is kept as a byte."""
    out = bytearray()
    state = 1
    hops = 0
    in_header, pos = True, 0
    mx = my = mz = True
    bare_lf = False
    for idx, ch in enumerate(stream):
        if in_header:
            if pos < 9:
                if ch not in b"delivered"[pos:pos + 1] + b"DELIVERED"[pos:pos + 1]:
                    mz = False
                if mz and pos == 8:
                    hops += 1
                if pos < 8:
                    if ch not in b"received"[pos:pos + 1] + b"RECEIVED"[pos:pos + 1]:
                        mx = False
                    if mx and pos == 7:
                        hops += 1
                if pos < 2 and ch != b"\r\n"[pos]:
                    my = False
                if my and pos == 1:
                    in_header = False
                pos += 1
            if ch == 10:
                pos, mx, my, mz = 0, True, True, True
        if state == 0:
            if ch == 10:
                bare_lf = True
            if ch == 13:
                state = 4
                continue
        elif state == 1:
            if ch == 10:
                bare_lf = True
            if ch == 46:
                state = 2
                continue
            if ch == 13:
                state = 4
                continue
            state = 0
        elif state == 2:
            if ch == 10:
                bare_lf = True
            if ch == 13:
                state = 3
                continue
            state = 0
        elif state == 3:
            if ch == 10:
                return dict(done=True, consumed=idx + 1, lf_message=bytes(out), hops=hops,
                            bare_lf=bare_lf)
            out += b".\r"
            if ch == 13:
                state = 4
                continue
            state = 0
        elif state == 4:
            if ch == 10:
                state = 1
            elif ch != 13:
                out += b"\r"
                state = 0
        out.append(ch)
    return dict(done=False, consumed=len(stream), lf_message=None, hops=hops, bare_lf=bare_lf)


def qmail_addrparse(arg: bytes, keep_quotes: bool) -> bytes:
    """qmail-smtpd.c addrparse() without the 900 check; keep_quotes=True is
    qrelay's reading (backslashes and quotes copied, not interpreted away)."""
    terminator = b">"[0]
    i = arg.find(b"<")
    if i >= 0:
        k = i + 1
    else:
        terminator = b" "[0]
        k = arg.find(b":")
        k = len(arg) if k < 0 else k + 1
        while k < len(arg) and arg[k] == 32:
            k += 1
    if k < len(arg) and arg[k] == 64:
        while k < len(arg):
            k += 1
            if arg[k - 1] == 58:
                break
    addr = bytearray()
    esc = quoted = False
    for ch in arg[k:]:
        if esc:
            addr.append(ch)
            esc = False
            continue
        if not quoted and ch == terminator:
            break
        if ch == 92:
            esc = True
            if keep_quotes:
                addr.append(ch)
        elif ch == 34:
            quoted = not quoted
            if keep_quotes:
                addr.append(ch)
        else:
            addr.append(ch)
    return bytes(addr)


def strip_quoting(addr: bytes) -> bytes:
    out, esc = bytearray(), False
    for ch in addr:
        if esc:
            out.append(ch)
            esc = False
        elif ch == 92:
            esc = True
        elif ch != 34:
            out.append(ch)
    return bytes(out)


# --------------------------------------------------------------------------- strategies


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, prev = [], 0
    for p in points + [len(data)]:
        parts.append(data[prev:p])
        prev = p
    return parts


def feed_chunks(s: DataScanner, parts: list[bytes]) -> tuple[int, bytes]:
    used, rest = 0, bytearray()
    for part in parts:
        if s.done:
            rest += part
            continue
        n = s.feed(part)
        assert 0 <= n <= len(part)
        if not s.done:
            assert n == len(part)          # consumes everything until the marker
        used += n
        rest += part[n:]
    return used, bytes(rest)


SMUGGLE = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\r\r\n",
           b"\r.\r", b"\n.\r", b"\r\n..\r\n", b".\r\n", b"\r\n.", b"\r", b"\n", b"\r\n"]
PIECES = st.one_of(
    st.sampled_from(SMUGGLE),
    st.sampled_from([b"Received: x\r\n", b"delivered-to: y\r\n", b"\r\n", b".", b"..", b"\x00",
                     b"Subject: s\r\n", b"text"]),
    st.binary(max_size=12),
)
STREAMS = st.lists(PIECES, max_size=30).map(b"".join)
LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
LINE_DOTTY = st.one_of(LINE, LINE.map(lambda b: b"." + b), st.just(b"."), st.just(b".."))
CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


# --------------------------------------------------------------------------- DataScanner


@FAST
@given(stream=STREAMS, tail=st.binary(max_size=10), cuts=CUTS, end=st.booleans())
def test_scanner_agrees_with_qmail_blast(stream, tail, cuts, end):
    if end:
        stream += b"\r\n.\r\n" + tail
    ref = qmail_blast(stream)
    s = DataScanner()
    used, rest = feed_chunks(s, chunked(stream, cuts))
    assert s.done == ref["done"]
    assert used == ref["consumed"]
    assert rest == stream[used:]
    consumed = stream[:used]
    assert s.hops == ref["hops"]
    assert s.bare_lf == ref["bare_lf"]
    # a CR is bare when the byte after it is not LF (a CR at the very end of
    # the bytes fed so far is still undecided)
    assert s.bare_cr == any(consumed[k] == 13 and consumed[k + 1] != 10
                            for k in range(len(consumed) - 1))
    assert s.has_nul == (b"\x00" in consumed)
    if ref["done"]:
        assert s.message.replace(b"\r\n", b"\n") == ref["lf_message"]
        assert s.size == len(ref["lf_message"])
        # the message is the consumed bytes minus dropped dots and the marker
        assert len(s.message) <= used - 3


@FAST
@given(lines=st.lists(LINE_DOTTY, max_size=40), tail=st.binary(max_size=20), cuts=CUTS)
def test_dot_stuffed_body_comes_back_exact_in_any_chunking(lines, tail, cuts):
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    stream = stuffed + b".\r\n" + tail
    s = DataScanner()
    used, rest = feed_chunks(s, chunked(stream, cuts))
    assert s.done
    assert s.message == body
    assert used == len(stuffed) + 3           # never past the end marker
    assert rest == tail
    assert s.size == len(body) - body.count(b"\r\n")
    assert not s.bare_lf and not s.bare_cr


@FAST
@given(pieces=st.lists(st.one_of(st.sampled_from(SMUGGLE), LINE), min_size=1, max_size=20),
       cuts=CUTS)
def test_smuggling_sequences_never_end_data(pieces, cuts):
    body = b"".join(pieces)
    # only bodies where no real CRLF.CRLF occurs (the DATA line's CRLF counts)
    if b"\r\n.\r\n" in b"\r\n" + body + b"\r\n":
        return
    stream = body + b"\r\n.\r\nNEXT"
    s = DataScanner()
    used, rest = feed_chunks(s, chunked(stream, cuts))
    assert s.done
    assert rest == b"NEXT"
    assert used == len(stream) - 4


@FAST
@given(stream=STREAMS, limit=st.integers(min_value=1, max_value=60), cuts=CUTS)
def test_scanner_max_bytes(stream, limit, cuts):
    stream += b"\r\n.\r\n"
    full = DataScanner()
    full.feed(stream)
    s = DataScanner(max_bytes=limit)
    feed_chunks(s, chunked(stream, cuts))
    assert s.done and s.size == full.size and s.hops == full.hops
    assert s.too_big == (full.size > limit)
    assert s.message == (b"" if s.too_big else full.message)


# --------------------------------------------------------------------------- parsers

ADDR_BYTES = st.lists(st.sampled_from(list(b'<>:@ "\\,.[]abAB=\t\x00\xff')), max_size=30).map(bytes)


@settings(max_examples=400, deadline=None)
@given(arg=ADDR_BYTES)
def test_parse_path_agrees_with_qmail_addrparse(arg):
    got = parse_path(arg)
    kept = qmail_addrparse(arg, keep_quotes=True)
    assert got is not None
    address, rest = got
    assert address == kept
    assert strip_quoting(address) == qmail_addrparse(arg, keep_quotes=False)
    # rest is what follows the terminator, leading spaces stripped
    assert arg.endswith(rest)
    assert not rest.startswith(b" ")
    assert parse_rcpt(b"RCPT " + arg) == got


@FAST
@given(local=st.integers(min_value=880, max_value=920), route=st.booleans())
def test_parse_path_length_limit(local, route):
    addr = b"u" * local + b"@h"
    arg = b"TO:<" + (b"@r1,@r2:" if route else b"") + addr + b"> SIZE=1"
    got = parse_path(arg)
    if len(addr) > 900:
        assert got is None
    else:
        assert got == (addr, b"SIZE=1")


@FAST
@given(addr=ADDR_BYTES)
def test_split_address_reassembles(addr):
    at, esc, quoted = -1, False, False
    for k, ch in enumerate(addr):
        if esc:
            esc = False
        elif ch == 92:
            esc = True
        elif ch == 34:
            quoted = not quoted
        elif ch == 64 and not quoted:
            at = k
    expected = (addr, None) if at < 0 else (addr[:at], addr[at + 1:])
    assert split_address(addr) == expected


@FAST
@given(line=st.binary(max_size=40))
def test_parse_command_shape(line):
    verb, arg = parse_command(line)
    assert b" " not in verb
    assert verb == line.split(b" ", 1)[0].upper() or not line.split(b" ", 1)[0].isascii()
    assert len(verb) == len(line.split(b" ", 1)[0])
    assert not arg.startswith(b" ")
    assert line.endswith(arg)


KEYS = st.from_regex(rb"\A[A-Za-z0-9][A-Za-z0-9-]{0,8}\Z")
VALUES = st.one_of(st.none(), st.from_regex(rb"\A[!-<>-~]{1,10}\Z"))


@FAST
@given(params=st.lists(st.tuples(KEYS, VALUES), max_size=5),
       seps=st.lists(st.integers(min_value=1, max_value=3), min_size=6, max_size=6))
def test_parse_params_roundtrip(params, seps):
    text = b"".join(b" " * seps[i] + k + (b"" if v is None else b"=" + v)
                    for i, (k, v) in enumerate(params))
    assert parse_params(text) == [(k.upper(), v) for k, v in params]


@FAST
@given(rest=st.binary(max_size=30))
def test_parse_params_never_crashes(rest):
    got = parse_params(rest)
    assert got is None or all(isinstance(k, bytes) and k == k.upper() for k, _ in got)


# --------------------------------------------------------------------------- LineReader


@FAST
@given(stream=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"bc", b" ", b"x" * 9]),
                       max_size=40).map(b"".join),
       limit=st.integers(min_value=0, max_value=12), cuts=CUTS)
def test_reader_agrees_with_split_at_lf(stream, limit, cuts):
    expected = []
    *complete, partial = stream.split(b"\n")
    for line in complete:
        if line.endswith(b"\r"):
            line = line[:-1]
        expected.append(TOO_LONG if len(line) > limit else line)
    r = LineReader(max_line=limit)
    got = []
    for part in chunked(stream, cuts):
        r.feed(part)
        while (line := r.next_line()) is not None:
            got.append(line)
        assert r.buffered <= limit + 2 + len(part)
    assert got == expected
    left = r.take_buffer()
    assert left == partial[:limit + 2]
