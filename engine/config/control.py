"""Reading qmail control files exactly as qmail's control.c does.

- single-value files: first line only, trailing space/TAB/LF stripped; CR is
  *not* stripped (a CRLF file keeps its `\\r`, as in qmail);
- integer files: leading decimal digits, otherwise the default;
- list files: every line, trailing space/TAB stripped, empty and `#` lines
  skipped;
- a missing file gives the default; any other error is raised as
  ControlError so callers can answer with a temporary failure.
"""
from __future__ import annotations

import os
from pathlib import Path


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


def read_int(path: os.PathLike | str, default: int) -> int:
    """Leading decimal digits of the first line (a leading `-` is allowed)."""
    raw = _read(Path(path))
    if raw is None:
        return default
    text = raw.split(b"\n", 1)[0].lstrip(b" \t")
    sign = 1
    if text[:1] == b"-":
        sign, text = -1, text[1:]
    digits = bytearray()
    for c in text:
        if 48 <= c <= 57:
            digits.append(c)
        else:
            break
    if not digits:
        return default
    return sign * int(digits)


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
