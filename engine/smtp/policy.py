"""Who may send to whom: badmailfrom and rcpthosts, qmail-smtpd's relay policy.

Owns the decision for one envelope address (spec §1.5); it never reads files
(the snapshot is built by `engine.smtp.config.load_smtp_config`) and never
touches the network.

Addresses arrive as str decoded from the wire (utf-8, surrogateescape) after
`parse_path` and `plain_address`: quotes and backslashes are still in them
where the local part needs them, a source route `@a,@b:` is already gone.

- `sender_refused`: the sender (quotes and escapes removed, as qmail's
  addrparse does) equals a badmailfrom line, or `@domain` does; ASCII
  case-insensitive; `<>` never matches.
- `check_rcpt`, client with RELAYCLIENT: accepted (qmail skips rcpthosts).
- `check_rcpt`, any other client: accepted only if the domain after the last
  unquoted `@`, or a suffix of it starting at a `.`, is in rcpthosts or
  morercpthosts.cdb. Stricter than qmail, so that nothing accepted here can
  later be routed off-site (the percent hack, `!` paths, a second `@` in a
  quoted or escaped local part, address literals, a trailing dot):
  refused are a local part containing `%`, `!` or `@` (quoted, escaped or
  not), a domain that is empty, starts or ends with `.`, has an empty label,
  or holds characters outside letters, digits, `-`, `_`, `.` and non-ASCII
  (so `[1.2.3.4]` is refused), a domain longer than 255 characters (RFC
  5321 4.5.3.1.2; each of its suffixes would cost a lookup), and the empty
  recipient `<>`. A recipient without `@` (qmail qualifies it with
  envnoathost later) is accepted only if it has none of `% ! " \\ @`.
- Any client: an address with NUL, CR or LF is a syntax error (555) — those
  bytes would end an envelope record in qmail-style stores.

Domain comparison lower-cases ASCII letters only, so no Unicode case folding
can turn a foreign domain into one of ours.
"""
from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path

from engine.config.cdb import CdbFile
from engine.config.domains import ascii_lower

RCPTHOSTS_REFUSED = "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
BADMAILFROM_REFUSED = "553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)"
NO_MAILBOX = "550 sorry, no mailbox here by that name. (#5.1.1)"
MAILBOXES_UNREADABLE = "451 sorry, I can't read the mailbox list right now (#4.3.0)"
SYNTAX_ERROR = "555 syntax error (#5.5.4)"

# RFC 5321 4.5.3.1.2's longest domain (octets; so at most as many characters).
MAX_DOMAIN = 255
# Letters, digits, '-', '_', non-ASCII (IDN in UTF-8, or undecodable bytes as
# surrogates); dots only between non-empty labels.
_DOMAIN_OK = re.compile(r"[A-Za-z0-9_\-\x80-\U0010FFFF]+(?:\.[A-Za-z0-9_\-\x80-\U0010FFFF]+)*\Z")
_UNSAFE_BYTES = re.compile(r"[\x00\r\n]")
_LOCAL_FORBIDDEN = re.compile(r"[%!@]")
_BARE_FORBIDDEN = re.compile(r"[%!@\"\\]")


def address_syntax_error(addr: str) -> str | None:
    """555 reply for an address holding NUL, CR or LF (use for MAIL too), else None."""
    return SYNTAX_ERROR if _UNSAFE_BYTES.search(addr) else None


def split_address(addr: str) -> tuple[str, str | None]:
    """(local part, domain) at the last '@' not inside quotes nor backslash-escaped."""
    if '"' not in addr and "\\" not in addr:
        at = addr.rfind("@")
        return (addr, None) if at < 0 else (addr[:at], addr[at + 1:])
    at = -1
    quoted = False
    i = 0
    n = len(addr)
    while i < n:
        ch = addr[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == "@" and not quoted:
            at = i
        i += 1
    return (addr, None) if at < 0 else (addr[:at], addr[at + 1:])


# RFC 5322 dot-atom text: a local part that needs no quotes.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*\Z")


def plain_address(addr: str) -> str:
    """`"joe"@example.com` (or `jo\\e@…`) as `joe@example.com` when the local
    part without its quotes and escapes is a plain dot-atom: the same mailbox
    (RFC 5321 4.1.2), and how qmail's addrparse stores it, so local delivery
    and the RCPT check find joe. Any other address is kept as sent."""
    if '"' not in addr and "\\" not in addr:
        return addr
    local, domain = split_address(addr)
    plain = unquote_address(local)
    if not _DOT_ATOM.match(plain):
        return addr
    return plain if domain is None else f"{plain}@{domain}"


def unquote_address(addr: str) -> str:
    """The address as qmail's addrparse stores it: `"` removed, `\\x` → `x`."""
    if '"' not in addr and "\\" not in addr:
        return addr
    out = []
    i = 0
    n = len(addr)
    while i < n:
        ch = addr[i]
        if ch == "\\" and i + 1 < n:
            out.append(addr[i + 1])
            i += 2
            continue
        if ch != '"':
            out.append(ch)
        i += 1
    return "".join(out)


def rewrite_local_ip_literal(addr: str, local_ips: Collection[str], localiphost: str) -> str:
    """qmail-smtpd's localiphost step (spec §1.4): `u@[ip]` with ip one of ours → `u@localiphost`.

    `local_ips` are the addresses this host accepts on (the receiver knows its
    sockets), as the socket spells them; 0.0.0.0 always counts, as in netqmail,
    and so does `::`. An IPv6 address is RFC 5321's `[IPv6:2001:db8::1]`.
    """
    local, domain = split_address(addr)
    if domain is None or len(domain) < 9 or domain[0] != "[" or domain[-1] != "]":
        return addr
    text = domain[1:-1]
    try:
        if text[:5].lower() == "ipv6:":
            ip6 = ipaddress.IPv6Address(text[5:])
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ip6.ipv4_mapped or ip6
        else:
            ip = ipaddress.IPv4Address(text)
    except ValueError:
        return addr
    if str(ip) in local_ips or ip.is_unspecified:
        return f"{local}@{localiphost}"
    return addr


class RecipientPolicy:
    """A snapshot of rcpthosts, morercpthosts.cdb and badmailfrom."""

    __slots__ = ("_rcpthosts", "_more", "_badmailfrom")

    def __init__(self, rcpthosts: Iterable[str], morercpthosts: CdbFile | None = None,
                 badmailfrom: Iterable[str] = ()) -> None:
        self._rcpthosts = frozenset(ascii_lower(h) for h in rcpthosts)
        self._more = morercpthosts
        self._badmailfrom = frozenset(ascii_lower(b) for b in badmailfrom)

    @classmethod
    def load(cls, control_dir: os.PathLike | str) -> RecipientPolicy:
        """From control/{rcpthosts,morercpthosts.cdb,badmailfrom}.

        Raises FileNotFoundError naming rcpthosts when it is missing (qrelay
        refuses to be an open relay), ControlError / CdbError when unreadable.
        """
        from engine.config.control import read_list

        control_dir = Path(control_dir)
        rcpthosts = read_list(control_dir / "rcpthosts")
        if rcpthosts is None:
            raise FileNotFoundError(str(control_dir / "rcpthosts"))
        try:
            # Checked whole now: a lookup at RCPT time must not meet damage.
            more = CdbFile.open(control_dir / "morercpthosts.cdb").check()
        except FileNotFoundError:
            more = None
        badmailfrom = read_list(control_dir / "badmailfrom", []) or []
        return cls(rcpthosts, more, badmailfrom)

    # -- senders -----------------------------------------------------------

    def sender_refused(self, sender: str) -> bool:
        """Sender listed in badmailfrom (whole address or `@domain`)."""
        bmf = self._badmailfrom
        if not bmf or not sender:
            return False
        plain = ascii_lower(unquote_address(sender))
        if plain in bmf:
            return True
        at = plain.rfind("@")
        if at < 0:
            return False
        domain = plain[at:]
        if domain in bmf:
            return True
        # `joe@spam.example.` must not dodge a `@spam.example` line.
        stripped = domain.rstrip(".")
        return stripped != domain and (stripped in bmf or plain[:at] + stripped in bmf)

    # -- recipients --------------------------------------------------------

    def check_rcpt(self, rcpt: str, relayclient: str | None) -> str | None:
        """None = accept; else the reply line (no CRLF) for this recipient."""
        if _UNSAFE_BYTES.search(rcpt):
            return SYNTAX_ERROR
        if relayclient is not None:
            return None
        return None if self.rcpt_allowed(rcpt) else RCPTHOSTS_REFUSED

    def final_rcpt(self, rcpt: str, relayclient: str | None) -> str:
        """The recipient as queued: RELAYCLIENT's value appended verbatim (qmail)."""
        return rcpt + relayclient if relayclient else rcpt

    def rcpt_allowed(self, rcpt: str) -> bool:
        """May a client without RELAYCLIENT send to rcpt? (rcpthosts + hardening)"""
        local, domain = split_address(rcpt)
        if domain is None:
            # qmail accepts an @-less recipient (qualified later with envnoathost);
            # only a plain one can never become a foreign address.
            return bool(local) and not _BARE_FORBIDDEN.search(local)
        if _LOCAL_FORBIDDEN.search(local) or len(domain) > MAX_DOMAIN or not _DOMAIN_OK.match(domain):
            return False
        return self.domain_listed(ascii_lower(domain))

    def domain_listed(self, domain: str) -> bool:
        """Lower-cased domain, or a `.suffix` of it, in rcpthosts / morercpthosts.cdb."""
        hosts = self._rcpthosts
        if domain in hosts:
            return True
        dots = [i for i, ch in enumerate(domain) if ch == "."]
        for i in dots:
            if domain[i:] in hosts:
                return True
        more = self._more
        if more is not None:
            raw = domain.encode("utf-8", "surrogateescape")
            if raw in more:
                return True
            for i in dots:
                # Suffixes are ASCII-aligned at '.', so re-encoding each is exact.
                if domain[i:].encode("utf-8", "surrogateescape") in more:
                    return True
        return False


def mailbox_refusal(mailboxes, rcpt: str) -> tuple[str, str] | None:
    """None, or (the reply, why for the log) for a recipient of a local domain
    that local delivery would bounce (no mailbox, alias or catch-all:
    engine.accounts' `accepts`), or whose mailbox list cannot be read.
    Remote recipients are not this check's business."""
    from engine.accounts.store import AccountsError
    try:
        if mailboxes.local_verdict(rcpt) is not False:
            return None
    except AccountsError as exc:
        return MAILBOXES_UNREADABLE, str(exc)
    except OSError as exc:
        return MAILBOXES_UNREADABLE, f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    return NO_MAILBOX, ""
