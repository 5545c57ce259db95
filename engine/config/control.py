"""Reading qmail control files exactly as qmail's control.c does.

- single-value files: first line only, trailing space/TAB/LF stripped; CR is
  *not* stripped (a CRLF file keeps its `\\r`, as in qmail);
- integer files: leading decimal digits, otherwise the default
  (`read_int`); `read_number` is the strict reading for files whose
  silent change would alter a limit (databytes, concurrency*, timeouts):
  anything but a whole number, or a negative one, is a ControlError naming
  the file and line;
- list files: every line, trailing space/TAB stripped, empty and `#` lines
  skipped;
- a missing file gives the default; any other error is raised as
  ControlError so callers can answer with a temporary failure.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


# Digits of the largest number read (below 2**63): more is no limit anyone
# means, and Python's int() refuses strings of over 4300 digits.
MAX_DIGITS = 18


class ControlError(Exception):
    """A control file exists but could not be read."""


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ControlError(f"unable to read {path}: {exc.strerror}") from exc


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def read_line(path: os.PathLike | str, default: str | None = None) -> str | None:
    """First line of a single-value control file, or `default` if absent."""
    raw = _read(Path(path))
    if raw is None:
        return default
    line = raw.split(b"\n", 1)[0].rstrip(b" \t")
    return _decode(line)


def scan_ulong(text: bytes) -> int | None:
    """qmail's scan_ulong: the number its leading ASCII digits spell, or None
    when there are none or more than MAX_DIGITS (qmail's unsigned long would
    wrap; int() refuses 4300+ digits)."""
    end = 0
    while end < len(text) and 48 <= text[end] <= 57:
        end += 1
    digits = text[:end].lstrip(b"0")
    if not end or len(digits) > MAX_DIGITS:
        return None
    return int(digits or b"0")


def read_int(path: os.PathLike | str, default: int) -> int:
    """Leading decimal digits of the first line (a leading `-` is allowed)."""
    raw = _read(Path(path))
    if raw is None:
        return default
    text = raw.split(b"\n", 1)[0].lstrip(b" \t")
    sign = 1
    if text[:1] == b"-":
        sign, text = -1, text[1:]
    value = scan_ulong(text)
    return default if value is None else sign * value


def read_number(path: os.PathLike | str, default: int, *, minimum: int = 0) -> int:
    """The first line of an integer control file, which must be a whole number
    (surrounding space allowed) of at least `minimum`: qmail reads `10MB` as 10,
    and `-1` as no number at all (its default: scan_ulong reads no sign); qrelay
    refuses both rather than silently change a limit. Missing file: `default`."""
    raw = _read(Path(path))
    if raw is None:
        return default
    first = raw.split(b"\n", 1)[0]
    text = first.strip(b" \t\r")
    if not text:
        return default          # an empty first line: qmail's default too
    sign = -1 if text[:1] == b"-" else 1
    body = text[1:] if text[:1] in (b"-", b"+") else text
    if not body.isdigit():
        raise ControlError(f"{path} line 1: {_decode(first)!r} is not a number")
    digits = body.lstrip(b"0") or b"0"
    if len(digits) > MAX_DIGITS:
        raise ControlError(f"{path} line 1: a number of {len(digits)} digits is too large")
    value = sign * int(digits)
    if value < minimum:
        raise ControlError(f"{path} line 1: {value} is below the minimum {minimum}")
    return value


def read_numbered_lines(path: os.PathLike | str) -> list[tuple[int, str]] | None:
    """(line number, text) of every non-empty, non-comment line, as read_list
    keeps them (None if absent): for parsers that name the line of an error."""
    raw = _read(Path(path))
    if raw is None:
        return None
    out = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        line = line.rstrip(b" \t")
        if not line or line.startswith(b"#"):
            continue
        out.append((number, _decode(line)))
    return out


def stat_fingerprint(root: os.PathLike | str, names: tuple[str, ...]) -> tuple:
    """(name, inode, size, mtime_ns) of each ROOT-relative file, (name, None)
    where absent: a few stat() calls, cheap enough to poll every second."""
    out = []
    for name in names:
        try:
            st = os.stat(Path(root) / name)
        except OSError:
            out.append((name, None))
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class SettledChanges:
    """Whether the files behind `fingerprint` (stat_fingerprint) changed, told
    once the change has settled: two looks in a row, a poll apart, must see
    the same new state. A file caught half written, or in the moment between
    an editor's removal and its new copy, is then not what a reload reads;
    the state one poll later is (a reload comes a poll later too)."""

    __slots__ = ("_fingerprint", "_loaded", "_seen")

    def __init__(self, fingerprint: Callable[[], tuple]) -> None:
        self._fingerprint = fingerprint
        self._loaded = self._seen = fingerprint()

    def changed(self) -> bool:
        now = self._fingerprint()
        settled, self._seen = now == self._seen, now
        if not settled or now == self._loaded:
            return False
        self._loaded = now
        return True


def read_list(path: os.PathLike | str, default: list[str] | None = None) -> list[str] | None:
    """Every non-empty, non-comment line of a list control file."""
    raw = _read(Path(path))
    if raw is None:
        return default
    out = []
    for line in raw.split(b"\n"):
        line = line.rstrip(b" \t")
        if not line or line.startswith(b"#"):
            continue
        out.append(_decode(line))
    return out
