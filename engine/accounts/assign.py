"""qmail's users/assign and users/cdb: which user, uid, gid and home get a local part.

Owns the table qmail-lspawn consults for every local delivery (spec QB §3.1–3.3):

- `users/assign` text: `=local:user:uid:gid:home:dash:ext:` (exact) and
  `+prefix:user:uid:gid:home:dash:pre:` (wildcard), ended by a line starting
  with `.`; a line whose first character is not `+` counts as exact, as in
  qmail-newu.
- `users/cdb` (qmail-newu's output): key `!`+lc(local)+`\\0` for `=`,
  `!`+lc(prefix) for `+`, value `user\\0uid\\0gid\\0home\\0dash\\0ext`, and the
  empty key holding the "wildchars" (distinct last characters of all prefixes).
  When users/cdb exists it is the table (qmail reads only the cdb; an edited
  but not compiled assign file has no effect); otherwise the text is parsed.
- lookup, as qmail-lspawn: exact entry first; then prefixes of lc(L) from the
  whole of L down to the empty prefix, a prefix tried only when it is empty or
  its last character is a wildchar; ext = pre + the rest of L in its original
  case. Duplicate keys: the first line wins (the cdb returns the first record).

Keys are lower-cased in ASCII only (qmail's case_lowerb). This module never
falls back to the system passwd file (qmail-getpw): `lookup` answers None and
the caller decides; an empty local part is qmail-lspawn's "trash" case and is
None here too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from collections.abc import Mapping

from engine.accounts.files import atomic_write, read_whole
from engine.config.cdb import CdbError, CdbFile, build_cdb
from engine.config.domains import ascii_lower

ASSIGN_FILE = "users/assign"
CDB_FILE = "users/cdb"


class AssignError(Exception):
    """users/assign has a bad format, or users/cdb is unreadable or corrupt."""


@dataclass(frozen=True, slots=True)
class Assignment:
    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str


@dataclass(frozen=True, slots=True)
class AssignLine:
    """One parsed users/assign line (wild: `+` line; local: the key as written)."""
    wild: bool
    local: str
    user: str
    uid: str
    gid: str
    home: str
    dash: str
    ext: str

    def value(self) -> bytes:
        fields = (self.user, self.uid, self.gid, self.home, self.dash, self.ext)
        return b"\0".join(f.encode("utf-8", "surrogateescape") for f in fields)

    def key(self) -> bytes:
        k = b"!" + ascii_lower(self.local).encode("utf-8", "surrogateescape")
        return k if self.wild else k + b"\0"

    def text(self) -> str:
        sign = "+" if self.wild else "="
        return f"{sign}{self.local}:{self.user}:{self.uid}:{self.gid}:{self.home}:{self.dash}:{self.ext}:"


def _leading_int(text: str) -> int:
    """qmail's scan_ulong: leading decimal digits, 0 if none."""
    n = 0
    for ch in text:
        if not "0" <= ch <= "9":
            break
        n = n * 10 + ord(ch) - 48
    return n


def parse_assign_line(line: str, lineno: int = 0) -> AssignLine:
    """One line without its newline, as qmail-newu reads it (AssignError if malformed)."""
    where = f"line {lineno}: " if lineno else ""
    if "\0" in line:
        raise AssignError(f"bad format in users/assign ({where}NUL byte)")
    colon = line.find(":")
    if colon <= 0:
        raise AssignError(f"bad format in users/assign ({where}no key)")
    wild = line[0] == "+"
    local = line[1:colon]
    fields = line[colon + 1:].split(":")
    if len(fields) < 7:  # at least six more colons
        raise AssignError(f"bad format in users/assign ({where}fewer than 7 fields)")
    user, uid, gid, home, dash, ext = fields[:6]
    return AssignLine(wild, local, user, uid, gid, home, dash, ext)


def parse_assign_text(text: str) -> list[AssignLine]:
    """Every assignment in users/assign; the `.` end line is required (qmail-newu)."""
    lines = text.split("\n")
    out: list[AssignLine] = []
    for n, line in enumerate(lines, 1):
        if line.startswith("."):
            return out
        if n == len(lines):  # last piece had no newline and was not the end line
            break
        out.append(parse_assign_line(line, n))
    raise AssignError("bad format in users/assign (no `.` line at the end)")


def assign_cdb_records(lines: list[AssignLine]) -> list[tuple[bytes, bytes]]:
    """qmail-newu's records: one per line, then the wildchars under the empty key."""
    records = []
    wildchars = bytearray()
    for entry in lines:
        key = entry.key()
        records.append((key, entry.value()))
        if entry.wild and entry.local:
            # qmail-newu records the last byte as written (not lower-cased), so
            # a prefix ending in an upper-case letter is never tried: kept.
            last = entry.local.encode("utf-8", "surrogateescape")[-1]
            if last not in wildchars:
                wildchars.append(last)
    records.append((b"", bytes(wildchars)))
    return records


def _assignment(value: bytes, rest: str) -> Assignment:
    fields = value.decode("utf-8", "surrogateescape").split("\0")
    if len(fields) < 6:
        raise AssignError("users/cdb: record with fewer than 6 fields")
    user, uid, gid, home, dash, ext = fields[:6]
    return Assignment(user, _leading_int(uid), _leading_int(gid), home, dash, ext + rest)


class Assign:
    """An immutable snapshot of the assign table; `lookup` never touches the disk."""

    __slots__ = ("_exact", "_wild", "_wildchars", "_longest")

    def __init__(self, exact: Mapping[str, bytes], wild: Mapping[str, bytes], wildchars: str) -> None:
        self._exact = MappingProxyType(dict(exact))
        self._wild = MappingProxyType(dict(wild))
        self._wildchars = frozenset(wildchars)
        # No prefix longer than the longest `+` key can match: a local part of
        # 880 bytes, a dash every other one, is no walk of 440 prefixes.
        self._longest = max(map(len, self._wild), default=0)

    @classmethod
    def from_records(cls, records) -> Assign:
        exact: dict[str, bytes] = {}
        wild: dict[str, bytes] = {}
        wildchars = ""
        for key, value in records:
            if key == b"":
                wildchars = wildchars or value.decode("utf-8", "surrogateescape")
                continue
            if not key.startswith(b"!"):
                continue
            name = key[1:].decode("utf-8", "surrogateescape")
            if name.endswith("\0"):
                exact.setdefault(name[:-1], value)
            else:
                wild.setdefault(name, value)
        return cls(exact, wild, wildchars)

    @classmethod
    def from_lines(cls, lines: list[AssignLine]) -> Assign:
        return cls.from_records(assign_cdb_records(lines))

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)

    def lookup(self, local: str) -> Assignment | None:
        """qmail-lspawn's answer for local part `local` (before the last `@`), or None."""
        if not local:
            return None
        lower = ascii_lower(local)
        value = self._exact.get(lower)
        if value is not None:
            return _assignment(value, "")
        wild, wildchars = self._wild, self._wildchars
        for i in range(min(len(lower), self._longest), -1, -1):
            if i and lower[i - 1] not in wildchars:
                continue
            value = wild.get(lower[:i])
            if value is not None:
                return _assignment(value, local[i:])
        return None

    def wildcard(self, prefix: str) -> Assignment | None:
        """The `+prefix` entry itself (e.g. `example.com-` for a vpopmail domain), or None."""
        value = self._wild.get(ascii_lower(prefix))
        return None if value is None else _assignment(value, "")

    def wildcards(self) -> dict[str, Assignment]:
        return {k: _assignment(v, "") for k, v in self._wild.items()}


def parse_assign_cdb(data: bytes, name: str = CDB_FILE) -> Assign:
    try:
        cdb = CdbFile(data, name=name)
        return Assign.from_records(cdb.items())
    except CdbError as exc:
        raise AssignError(str(exc)) from exc


def load_assign(root: os.PathLike | str) -> Assign:
    """ROOT/users/cdb when present, else ROOT/users/assign, else an empty table."""
    root = Path(root)
    got = read_whole(root / CDB_FILE)
    if got is not None:
        return parse_assign_cdb(got[0], str(root / CDB_FILE))
    got = read_whole(root / ASSIGN_FILE)
    if got is not None:
        return Assign.from_lines(parse_assign_text(got[0].decode("utf-8", "surrogateescape")))
    return Assign({}, {}, "")


def compile_assign(root: os.PathLike | str) -> int:
    """qmail-newu: compile ROOT/users/assign into ROOT/users/cdb atomically.

    Returns the number of assignments. A bad format raises AssignError and
    leaves users/cdb unchanged, as qmail-newu does.
    """
    root = Path(root)
    got = read_whole(root / ASSIGN_FILE)
    if got is None:
        raise AssignError(f"{root / ASSIGN_FILE}: no such file")
    lines = parse_assign_text(got[0].decode("utf-8", "surrogateescape"))
    atomic_write(root / CDB_FILE, build_cdb(assign_cdb_records(lines)), mode=0o644)
    return len(lines)
