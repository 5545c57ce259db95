"""atheris fuzz entry point for engine._smtpcore (not part of CI; pytest does
not collect it: the name does not match test_*.py).

Every input is used as a whole client stream and checked differentially:

- LineReader: fed in pseudo-random chunks (derived from the input), must give
  the lines of a plain split at LF (one CR before LF dropped, TOO_LONG for
  lines over the limit), and keep ``buffered`` bounded;
- parse_command / parse_path / parse_rcpt / split_address / parse_params on
  every line: parse_path must equal the plain-Python port of qmail's
  addrparse (quotes kept, and equal to qmail's own result once quotes and
  escapes are stripped); nothing may raise;
- DataScanner: the stream fed whole and fed in pseudo-random chunks must give
  the same result, which must agree with the plain-Python port of qmail's
  blast() (tests/test_smtpcore_properties.py); consumed never passes the end
  marker.

Run (from the repository), bounded in time; libFuzzer writes new inputs into the
FIRST directory, so give it a scratch directory before the seed corpus:

    .venv/bin/pip install atheris          # wheel for CPython 3.11 x86_64
    mkdir -p /tmp/smtpcore-fuzz
    .venv/bin/python tests/fuzz/fuzz_smtpcore.py /tmp/smtpcore-fuzz \\
        tests/fuzz/corpus -max_total_time=60 -max_len=4096

A crash or failed check stops the run and leaves ``crash-<sha1>`` in the
current directory; replay it with
``.venv/bin/python tests/fuzz/fuzz_smtpcore.py crash-<sha1>``.
Coverage feedback comes from the instrumented Python references (the C
extension itself is not built with -fsanitize=fuzzer), so the fuzzer steers
by the grammar paths those take.
"""
from __future__ import annotations

import random
import sys
import zlib
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["tests.test_smtpcore_properties"]):
    from tests.test_smtpcore_properties import qmail_addrparse, qmail_blast, strip_quoting

from engine._smtpcore import (  # noqa: E402
    TOO_LONG,
    DataScanner,
    LineReader,
    parse_command,
    parse_params,
    parse_path,
    parse_rcpt,
    split_address,
)

MAX_LINE = 64


def chunks_of(data: bytes) -> list[bytes]:
    rng = random.Random(zlib.crc32(data))
    parts, k = [], 0
    while k < len(data):
        n = rng.choice((1, 2, 3, 5, 8, 64, 1000))
        parts.append(data[k:k + n])
        k += n
    return parts


def check_lines(data: bytes) -> list[bytes]:
    expected = []
    for line in data.split(b"\n")[:-1]:
        if line.endswith(b"\r"):
            line = line[:-1]
        expected.append(TOO_LONG if len(line) > MAX_LINE else line)
    reader = LineReader(max_line=MAX_LINE)
    got = []
    for part in chunks_of(data):
        reader.feed(part)
        assert reader.buffered <= MAX_LINE + 2 + len(part)
        while (line := reader.next_line()) is not None:
            got.append(line)
    assert got == expected, (got, expected)
    reader.take_buffer()
    return [line for line in got if line is not TOO_LONG]


def check_parsers(line: bytes) -> None:
    verb, arg = parse_command(line)
    assert line.endswith(arg)
    path = parse_path(arg)
    assert parse_rcpt(line) == path
    kept = qmail_addrparse(arg, keep_quotes=True)
    if len(kept) > 900:
        assert path is None
        return
    assert path is not None and path[0] == kept
    assert strip_quoting(path[0]) == qmail_addrparse(arg, keep_quotes=False)
    local, domain = split_address(path[0])
    assert (local if domain is None else local + b"@" + domain) == path[0]
    params = parse_params(path[1])
    assert params is None or isinstance(params, list)


def scan(parts: list[bytes]) -> tuple:
    s = DataScanner(max_bytes=200)
    used = 0
    for part in parts:
        n = s.feed(part)
        assert 0 <= n <= len(part)
        used += n
        if s.done:
            break
    return (used, s.done, s.message, s.size, s.too_big, s.hops, s.bare_lf, s.bare_cr,
            s.has_nul)


def check_data(data: bytes) -> None:
    whole = scan([data])
    assert scan(chunks_of(data)) == whole
    used, done, message, size, too_big, hops, bare_lf, _, has_nul = whole
    ref = qmail_blast(data)
    assert (done, used, hops, bare_lf) == (ref["done"], ref["consumed"], ref["hops"],
                                           ref["bare_lf"])
    assert has_nul == (b"\x00" in data[:used])
    if done:
        assert size == len(ref["lf_message"])
        assert too_big == (size > 200)
        if not too_big:
            assert message.replace(b"\r\n", b"\n") == ref["lf_message"]


def test_one_input(data: bytes) -> None:
    for line in check_lines(data):
        check_parsers(line)
    check_data(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
