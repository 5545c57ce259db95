"""Connection rules in ucspi-tcp's tcprules format (`control/tcp.smtp[.cdb]`).

Owns parsing the text format exactly as `tcprules` does (spec §4.1), reading a
compiled `tcp.smtp.cdb`, and matching a client the way tcpserver does
(spec §4.2). It decides nothing about SMTP: a matching rule only says allow or
deny and which environment variables to set. The receiver applies them:
`RELAYCLIENT` (relaying allowed, value appended to recipients), `RBLSMTPD`
(rblsmtpd's block text, spec §1.8), `DATABYTES`, `TCPLOCALHOST`, ...

Text format, one rule per line (`#` lines and lines without `:` ignored):

    127.0.0.1:allow,RELAYCLIENT=""
    10.2-3.:allow,RELAYCLIENT=//         (any quote character)
    =.example.com:deny
    joe@=host.example.com:allow
    :allow                               (the default)

A rule `127.0.0.` is a prefix and matches 127.0.0.1; `127.0.0` (no trailing
dot) is an exact-address key and matches only a client whose address is
literally "127.0.0", i.e. never. An IPv6 client's prefixes end at a `:` as
well (the IPv6 tcpserver's walk): `2001:db8:1::deny` (key `2001:db8:1:`)
matches 2001:db8:1::5. An IPv6 address rule matches however it is spelt
(`2001:DB8::0BAD`, or written out in full in ucspi-tcp6's cdb), as in
ucspi-tcp6: it is kept in the spelling of a client's address. ucspi-tcp6's
CIDR rules (`10.0.0.0/8`, `2001:db8::/32`), which s/qmail boxes have, are
prefixes too: of a client's prefixes, dotted and CIDR, the longest wins. One
that is not a network is refused (a deny rule that never matched would let
its clients in).
"""
from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from engine.config.cdb import CdbError, CdbFile, write_cdb

RULES_TEXT = "tcp.smtp"
RULES_CDB = "tcp.smtp.cdb"

_EMPTY_ENV: Mapping[str, str] = MappingProxyType({})


class TcpRulesError(Exception):
    """A rules file cannot be parsed or read (message as tcprules prints it)."""


@dataclass(slots=True, frozen=True)
class Rule:
    """What tcpserver does with a matching client: allow or deny, and env to set."""

    allow: bool
    env: Mapping[str, str] = field(default_factory=lambda: _EMPTY_ENV)

    def encode(self) -> bytes:
        """tcprules' cdb value: `D\\0` for deny, then `+VAR=value\\0` per variable."""
        out = bytearray() if self.allow else bytearray(b"D\0")
        for name, value in self.env.items():
            out += b"+" + _b(name) + b"=" + _b(value) + b"\0"
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Rule:
        """Read a tcprules cdb value as tcpserver's found() does."""
        allow = True
        env: dict[str, str] = {}
        # tcpserver walks NUL-terminated items; trailing bytes without a NUL are ignored.
        for item in data.split(b"\0")[:-1]:
            if item[:1] == b"D":
                allow = False
            elif item[:1] == b"+" and b"=" in item:
                name, value = item[1:].split(b"=", 1)
                env[_s(name)] = _s(value)
        return cls(allow, MappingProxyType(env))


ALLOW_ALL = Rule(True, _EMPTY_ENV)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _s(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _printable(line: str) -> str:
    # The message goes on one terminal line: show control bytes (a CRLF file's \r) escaped.
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in line)


def parse_rule_line(line: str) -> tuple[list[str], Rule] | None:
    """Parse one text line into (keys, rule); None for lines tcprules skips.

    Several keys come out of a range (`1.2.3.37-53`). Raises TcpRulesError with
    tcprules' text `unable to parse this line: <line>`.
    """
    if not line or line[0] == "#":
        return None
    line = line.rstrip("\n \t")
    # The address ends at the first ':' that starts `allow`/`deny` (the IPv6-aware
    # tcprules); with no ':' at all, tcprules 0.88 ignores the line.
    if ":" not in line:
        return None
    colon = -1
    search = 0
    while True:
        colon = line.find(":", search)
        if colon < 0:
            # No ':' is followed by allow/deny: tcprules 0.88 splits at the first ':'.
            colon = line.index(":")
            break
        rest = line[colon + 1:]
        if rest.startswith("deny") or rest.startswith("allow"):
            break
        search = colon + 1
    address = line[:colon]
    rest = line[colon + 1:]
    bad = TcpRulesError(f"unable to parse this line: {_printable(line)}")
    if rest.startswith("deny"):
        allow, rest = False, rest[4:]
    elif rest.startswith("allow"):
        allow, rest = True, rest[5:]
    else:
        raise bad
    env: dict[str, str] = {}
    while rest:
        if rest[0] != ",":
            raise bad
        eq = rest.find("=")
        if eq < 0:
            raise bad
        name = rest[1:eq]
        rest = rest[eq + 1:]
        if not rest:
            raise bad
        quote, rest = rest[0], rest[1:]
        end = rest.find(quote)
        if end < 0:
            raise bad
        # A repeated variable: tcpserver sets them in order, so the last one wins.
        env[name] = rest[:end]
        rest = rest[end + 1:]
    rule = Rule(allow, MappingProxyType(env))
    return _expand_address(address, bad), rule


def _expand_address(address: str, bad: TcpRulesError) -> list[str]:
    """tcprules' range expansion: `1.2.3.37-53` / `10.2-3.` → one key per value."""
    if "/" in address and "=" not in address:
        if _network(address.rpartition("@")[2]) is None:
            raise bad
        return [address]
    if "=" in address or "@" in address or "-" not in address:
        return [_ipv6_spelling(address)]
    dash = address.index("-")
    left = address.rfind(".", 0, dash) + 1
    right = address.find(".", dash + 1)
    if right < 0:
        right = len(address)
    bot_text, top_text = address[left:dash], address[dash + 1:right]
    for text in (bot_text, top_text):
        if text and not (text.isascii() and text.isdigit()):
            raise bad
    bot = _octet(bot_text)
    top = min(_octet(top_text), 255)
    return [f"{address[:left]}{n}{address[right:]}" for n in range(bot, top + 1)]


def _ipv6_spelling(key: str) -> str:
    """An IPv6 address key (also `info@` one) spelt as a client's address is
    (lower case, `::` for the longest zero run: inet_ntop), as ucspi-tcp6
    reads both sides; written otherwise it could never match. Other keys as they are."""
    info, at, address = key.rpartition("@")
    if ":" not in address:
        return key
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):   # (UnicodeEncodeError, a NUL: ValueError)
        return key          # a prefix (`2001:db8:`), a CIDR rule, not an address
    return info + at + socket.inet_ntop(socket.AF_INET6, packed)


def _octet(text: str) -> int:
    """A range bound's value; one over 255 as 256 (int() refuses 4300+ digits)."""
    digits = text.lstrip("0")
    return int(digits or "0") if len(digits) <= 3 else 256


def _prefix_bits(ip: str, end: int) -> int:
    """How many leading bits of `ip` its text prefix ip[:end] fixes: 8 per
    dotted octet; 16 per IPv6 group, and past a `::` all but the groups
    still to come."""
    if ip[end - 1] == ".":
        return ip.count(".", 0, end) * 8
    if "::" not in ip[:end]:
        return 16 * ip.count(":", 0, end)
    rest = ip[end:]
    return 128 - 16 * (rest.count(":") + 1) if rest else 128


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


class TcpRules:
    """A snapshot of connection rules, matched in tcpserver's order."""

    __slots__ = ("_rules", "_nets", "source")

    def __init__(self, rules: Mapping[str, Rule], source: str = "") -> None:
        self._rules = MappingProxyType(dict(rules))
        self.source = source
        # CIDR rules by IP version: [(prefix length, {network bits: rule})],
        # longest first (none: matching costs nothing more).
        nets: dict[int, dict[int, dict[int, Rule]]] = {}
        for key, rule in self._rules.items():
            if "/" in key and "@" not in key and "=" not in key:
                net = _network(key)
                if net is not None:
                    by_len = nets.setdefault(net.version, {}).setdefault(net.prefixlen, {})
                    by_len.setdefault(int(net.network_address) >> (net.max_prefixlen - net.prefixlen),
                                      rule)
        self._nets = {v: sorted(by_len.items(), reverse=True) for v, by_len in nets.items()}

    @classmethod
    def from_text(cls, text: str, source: str = "tcp.smtp") -> TcpRules:
        """Rules from tcprules text; the first rule for a key wins, as in the cdb."""
        rules: dict[str, Rule] = {}
        for line in text.split("\n"):
            parsed = parse_rule_line(line)
            if parsed is None:
                continue
            keys, rule = parsed
            for key in keys:
                rules.setdefault(key, rule)
        return cls(rules, source)

    @classmethod
    def from_cdb(cls, cdb: CdbFile) -> TcpRules:
        rules: dict[str, Rule] = {}
        # One Rule per distinct value, as from_text makes one per line: 100,000
        # keys share a few values, and a Rule each cost 3.5 x the memory and
        # 2.4 x the time of a receiver's reload.
        decoded: dict[bytes, Rule] = {}
        for key, value in cdb.items():
            if key[:1] in (b"_", b"^") and b"@" not in key and b"=" not in key:
                # ucspi-tcp6's tcprules stores a CIDR rule as a string of its
                # bits that only its tcpserver looks up: read as a plain key, a
                # CIDR deny would never match.
                raise TcpRulesError(
                    f"a CIDR rule compiled by ucspi-tcp6's tcprules "
                    f"({_printable(_s(key))}): compile control/{RULES_TEXT} with `qrelay tcprules`")
            rule = decoded.get(value)
            if rule is None:
                rule = decoded[value] = Rule.decode(value)
            # ucspi-tcp6's tcprules writes an IPv6 address out in full.
            rules.setdefault(_ipv6_spelling(_s(key)), rule)
        return cls(rules, cdb.name)

    @classmethod
    def load(cls, control_dir: os.PathLike | str) -> TcpRules:
        """tcp.smtp.cdb if present (as tcpserver -x), else tcp.smtp text, else allow-all."""
        control_dir = Path(control_dir)
        try:
            return cls.from_cdb(CdbFile.open(control_dir / RULES_CDB))
        except FileNotFoundError:
            pass
        except CdbError as exc:
            raise TcpRulesError(str(exc)) from exc
        path = control_dir / RULES_TEXT
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls({}, "")
        except OSError as exc:
            raise TcpRulesError(f"unable to read {path}: {exc.strerror}") from exc
        return cls.from_text(_s(raw), str(path))

    def __len__(self) -> int:
        return len(self._rules)

    def items(self) -> Iterable[tuple[str, Rule]]:
        return self._rules.items()

    def match(self, ip: str, host: str | None = None, info: str | None = None) -> Rule:
        """The rule tcpserver would apply (spec §4.2); no match at all = allow, no env."""
        rules = self._rules
        if not rules:
            return ALLOW_ALL
        if ip[:7].lower() == "::ffff:" and ip.count(".") == 3:
            # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; rules
            # are written for a.b.c.d (tcpserver on IPv4 never sees the prefix).
            ip = ip[7:]
        if host is not None:
            # tcpserver lower-cases the name it got from DNS.
            host = host.lower()
        if info is not None:
            rule = rules.get(f"{info}@{ip}")
            if rule is not None:
                return rule
            if host is not None:
                rule = rules.get(f"{info}@={host}")
                if rule is not None:
                    return rule
        rule = rules.get(ip)
        if rule is not None:
            return rule
        if host is not None:
            rule = rules.get("=" + host)
            if rule is not None:
                return rule
        dotted = 0              # the longest dotted (or IPv6 `:`) prefix's length in bits
        for end in range(len(ip), 0, -1):
            if ip[end - 1] in ".:":
                rule = rules.get(ip[:end])
                if rule is not None:
                    dotted = _prefix_bits(ip, end)
                    break
        if self._nets:
            net_rule = self._net_match(ip, dotted)
            if net_rule is not None:
                return net_rule
        if dotted:
            return rule
        if host is not None:
            for i, ch in enumerate(host):
                if ch == ".":
                    rule = rules.get("=" + host[i:])
                    if rule is not None:
                        return rule
            rule = rules.get("=")
            if rule is not None:
                return rule
        rule = rules.get("")
        return rule if rule is not None else ALLOW_ALL


    def _net_match(self, ip: str, longer_than: int) -> Rule | None:
        """The rule of the longest CIDR network holding `ip`, if it is longer
        than `longer_than` bits (a dotted prefix found)."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        value, bits = int(address), address.max_prefixlen
        for length, table in self._nets.get(address.version, ()):
            if length <= longer_than and longer_than:
                return None
            rule = table.get(value >> (bits - length))
            if rule is not None:
                return rule
        return None


def stale_cdb(control_dir: os.PathLike | str) -> str | None:
    """A warning if tcp.smtp was edited after tcp.smtp.cdb was built: the cdb
    is what is read (as tcpserver -x), so the edit has no effect until
    `qrelay tcprules` runs again. None when nothing is stale."""
    control_dir = Path(control_dir)
    try:
        text = os.stat(control_dir / RULES_TEXT).st_mtime_ns
        cdb = os.stat(control_dir / RULES_CDB).st_mtime_ns
    except OSError:
        return None
    if text <= cdb:
        return None
    return (f"{control_dir / RULES_TEXT} is newer than {RULES_CDB}, which is what is read:"
            " run `qrelay tcprules` to apply the edit")


def compile_rules(text: str, cdb_path: os.PathLike | str) -> int:
    """tcprules: compile rules text into a cdb (atomic). Returns the number of keys.

    Keeps every key in input order (duplicates too, as tcprules does; lookups
    return the first).
    """
    records: list[tuple[bytes, bytes]] = []
    for line in text.split("\n"):
        parsed = parse_rule_line(line)
        if parsed is None:
            continue
        keys, rule = parsed
        value = rule.encode()
        records.extend((_b(key), value) for key in keys)
    write_cdb(cdb_path, records)
    return len(records)
