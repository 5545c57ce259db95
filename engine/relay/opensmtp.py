"""vpopmail's `open-smtp` file, read and written (`qrelay relayclients import`,
`export`). One line per client IP that logged in:

    IP:allow,RELAYCLIENT="",RBLSMTPD=""<TAB>UNIXTIME

UNIXTIME is the login time; clearopensmtp keeps a line while
UNIXTIME + RELAY_CLEAR_MINUTES*60 > now (spec vpopmail-pop3-auth.md §4.2), so
here an imported entry keeps its remaining lifetime UNIXTIME + ttl - now, ttl
being `[relay] pop_before_smtp_ttl`; export writes expiry - ttl back. A line
without its timestamp is refused (clearopensmtp drops it too).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from engine.relay import normalize_ip

# What vchkpw writes after the IP and its colon.
RULE = 'allow,RELAYCLIENT="",RBLSMTPD=""'
_RULE = re.compile(r"([^\s]+?):(allow|deny)(?:,|$)")


@dataclass(slots=True, frozen=True)
class OpenSmtpLine:
    number: int        # 1-based line number in the file
    ip: str
    login_time: float


def parse_open_smtp(text: str) -> tuple[list[OpenSmtpLine], list[tuple[int, str]]]:
    """The grants of an open-smtp file, and its malformed lines as
    (line number, why). Blank lines and `#` comments are skipped."""
    lines: list[OpenSmtpLine] = []
    bad: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rule, _, stamp = line.rpartition("\t") if "\t" in line else line.rpartition(" ")
        if not rule or not stamp.strip().isdigit():
            bad.append((number, "no login time (TAB then unix seconds) at the end"))
            continue
        # The address ends at the ':' before the instruction (an IPv6
        # address has colons of its own).
        match = _RULE.match(rule.strip())
        if match is None:
            bad.append((number, "not IP:allow,..."))
            continue
        ip, instruction = match.group(1), match.group(2)
        if instruction != "allow":
            bad.append((number, f"not an allow rule: {instruction!r}"))
            continue
        try:
            ip = normalize_ip(ip)
        except ValueError:
            bad.append((number, f"not an IP address: {ip[:60]!r}"))
            continue
        lines.append(OpenSmtpLine(number, ip, float(int(stamp.strip()))))
    return lines, bad


def format_open_smtp(entries: list[tuple[str, float]], ttl: float) -> str:
    """open-smtp lines for (ip, expiry) entries: login time = expiry - ttl."""
    return "".join(f"{ip}:{RULE}\t{int(until - ttl)}\n" for ip, until in entries)
