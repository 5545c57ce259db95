"""control/smtproutes, read and matched exactly as qmail-remote does (spec §2, §7.1).

A line is `key:relay` or `key:relay:port`; the key is the text before the
first `:`, and a relay in brackets (`[2001:db8::25]:2525`) ends at its `]`.
For a target host `h` the keys tried are `h`, then every suffix of
`h` that starts at a `.` (longest first), then the empty key (the default
route).  The first key found wins; keys match case-insensitively, as qmail's
constmap does.  An empty relay (`example.com:`) means "no route: use MX" — the
exception to a wildcard or default route.

Where qmail is lenient and the result is surprising, `load` (the file an
operator edits) refuses instead, naming the file and line: a line without a
`:` (qmail ignores it, so the domain silently goes by MX) and a port that is
not a number from 1 to 65535 (qmail reads `:26x26` as 26, and junk as 25).
`from_lines` / `from_text` keep qmail's leniency.

This module only parses and matches; it never resolves a name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from engine.config.control import read_numbered_lines

SMTP_PORT = 25


@dataclass(slots=True, frozen=True)
class Route:
    """Where smtproutes sends a host: a relay (name, IP or `[IP]`) and a port."""
    relay: str
    port: int = SMTP_PORT


def _parse_port(text: str) -> int:
    # qmail: scan_ulong on the text after the second ':' — leading digits,
    # anything else (or nothing) leaves the port at 25.
    digits = ""
    for c in text:
        if not c.isdigit() or not c.isascii():
            break
        digits += c
    if not digits:
        return SMTP_PORT
    port = int(digits)
    return port if 0 < port < 65536 else SMTP_PORT


def _split_relay(relay: str) -> tuple[str, str, str]:
    """`relay[:port]` as (name, sep, port), like str.partition; a bracketed
    literal keeps its colons, so `[2001:db8::25]:2525` (IPv6, which qmail
    never had) is the address and a port."""
    if relay.startswith("["):
        end = relay.find("]")
        if end > 0 and relay[end + 1:end + 2] in ("", ":"):
            return relay[:end + 1], relay[end + 1:end + 2], relay[end + 2:]
    return relay.partition(":")


class RoutesError(ValueError):
    """A control/smtproutes line qrelay refuses (one line naming file and line)."""


def check_line(line: str) -> str | None:
    """Why `load` refuses a (stripped, non-comment) smtproutes line, or None."""
    key, sep, relay = line.partition(":")
    if not sep:
        return f"no ':' in {line!r} (a route is host:relay or host:relay:port)"
    name, sep, port = _split_relay(relay)
    if sep and port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return f"bad port {port!r} in {line!r} (a number from 1 to 65535)"
    return None


class SmtpRoutes:
    """The smtproutes table: `lookup(host)` gives a Route, or None to use MX."""

    __slots__ = ("_table",)

    def __init__(self, table: Mapping[str, str] | None = None) -> None:
        # key (lower-cased) -> raw relay text ("" = use MX); first line wins,
        # as constmap returns the first of duplicate keys.
        self._table: dict[str, str] = dict(table or {})

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> "SmtpRoutes":
        table: dict[str, str] = {}
        for line in lines:
            line = line.rstrip(" \t\r\n")
            if not line or line.startswith("#"):
                continue
            key, sep, relay = line.partition(":")
            if not sep:
                # qmail's constmap needs the ':'; a line without one maps
                # nothing useful, so it is ignored.
                continue
            table.setdefault(key.lower(), relay)
        return cls(table)

    @classmethod
    def from_text(cls, text: str) -> "SmtpRoutes":
        return cls.from_lines(text.split("\n"))

    @classmethod
    def load(cls, control_dir: Path | str) -> "SmtpRoutes":
        """Read control/smtproutes (missing file = no routes). Raises
        RoutesError for a malformed line, ControlError if unreadable."""
        path = Path(control_dir) / "smtproutes"
        lines = read_numbered_lines(path) or []
        for number, line in lines:
            why = check_line(line.rstrip(" \t\r"))
            if why is not None:
                raise RoutesError(f"{path} line {number}: {why}")
        return cls.from_lines(line for _, line in lines)

    def __eq__(self, other: object) -> bool:
        # A reload compares snapshots: same table, same routes.
        return isinstance(other, SmtpRoutes) and self._table == other._table

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, host: str) -> Route | None:
        host = host.lower()
        relay = self._table.get(host)
        if relay is None:
            i = host.find(".")
            while i != -1:
                relay = self._table.get(host[i:])
                if relay is not None:
                    break
                i = host.find(".", i + 1)
        if relay is None:
            relay = self._table.get("")
        if not relay:
            return None
        name, sep, port = _split_relay(relay)
        if not name:
            return None
        return Route(name, _parse_port(port) if sep else SMTP_PORT)
