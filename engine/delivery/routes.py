"""control/smtproutes, read and matched exactly as qmail-remote does (spec §2, §7.1).

A line is `key:relay` or `key:relay:port`; the key is the text before the
first `:`.  For a target host `h` the keys tried are `h`, then every suffix of
`h` that starts at a `.` (longest first), then the empty key (the default
route).  The first key found wins; keys match case-insensitively, as qmail's
constmap does.  An empty relay (`example.com:`) means "no route: use MX" — the
exception to a wildcard or default route.

This module only parses and matches; it never resolves a name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from engine.config.control import read_list

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
        """Read control/smtproutes (missing file = no routes)."""
        return cls.from_lines(read_list(Path(control_dir) / "smtproutes", []) or [])

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
        name, sep, port = relay.partition(":")
        if not name:
            return None
        return Route(name, _parse_port(port) if sep else SMTP_PORT)
