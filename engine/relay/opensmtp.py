"""vpopmail's `open-smtp` file, read and written (`qrelay relayclients import`,
`export`). One line per client IP that logged in:

    IP:allow,RELAYCLIENT="",RBLSMTPD=""<TAB>UNIXTIME

UNIXTIME is the login time; clearopensmtp keeps a line while
UNIXTIME + RELAY_CLEAR_MINUTES*60 > now (spec vpopmail-pop3-auth.md §4.2), so
here an imported entry keeps its remaining lifetime UNIXTIME + ttl - now, ttl
being `[relay] pop_before_smtp_ttl` (never more than ttl: a login time in the
future counts as now); export writes expiry - ttl back. A line
without its timestamp is refused (clearopensmtp drops it too), and so is one
whose rule, read as tcprules reads it, is not an `allow` with `RELAYCLIENT=""`
for one address: such a line let its IP connect, never relay.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config.tcprules import TcpRulesError, parse_rule_line
from engine.relay import normalize_ip

# What vchkpw writes after the IP and its colon.
RULE = 'allow,RELAYCLIENT="",RBLSMTPD=""'


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
        stamp = stamp.strip()
        if not rule or not (stamp.isascii() and stamp.isdigit()):
            bad.append((number, "no login time (TAB then unix seconds) at the end"))
            continue
        # The address ends at the ':' before the instruction (an IPv6
        # address has colons of its own): tcprules' own reading.
        try:
            parsed = parse_rule_line(rule.strip())
        except TcpRulesError:
            parsed = None
        if parsed is None or len(parsed[0]) != 1:
            bad.append((number, "not IP:allow,..."))
            continue
        (ip,), parsed_rule = parsed
        if not parsed_rule.allow:
            bad.append((number, "not an allow rule: 'deny'"))
            continue
        try:
            ip = normalize_ip(ip)
        except ValueError:
            bad.append((number, f"not an IP address: {ip[:60]!r}"))
            continue
        if parsed_rule.env.get("RELAYCLIENT") != "":
            bad.append((number, 'no RELAYCLIENT="": the rule lets the IP connect, not relay'))
            continue
        # (float, not int: a login time of 400 digits is inf, far in the future)
        lines.append(OpenSmtpLine(number, ip, float(stamp)))
    return lines, bad


def format_open_smtp(entries: list[tuple[str, float]], ttl: float) -> str:
    """open-smtp lines for (ip, expiry) entries: login time = expiry - ttl."""
    return "".join(f"{ip}:{RULE}\t{int(until - ttl)}\n" for ip, until in entries)
