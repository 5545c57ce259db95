"""vpopmail's per-domain user table: `vpasswd` and `vpasswd.cdb` (spec vpopmail §2.3–2.7).

Owns parsing and writing both files, the gid flag bits, the quota field and
where a new user's directory goes:

- `vpasswd` lines `name:crypted:uid:gid:gecos:dir:quota[:clear]`, sorted by
  name; the eighth field (cleartext, for APOP / CRAM-MD5) is optional and may
  itself contain `:`.
- `vpasswd.cdb`: key = name, value = the line after the first `:`. vpopmail's
  lookups read only the cdb, so when it exists it is what we read too (a hand
  edit to vpasswd is invisible until the cdb is rebuilt, exactly as with
  vpopmail); without it the text is read.
- names are looked up lower-cased (vpopmail lower-cases logins).
- a user's directory is whatever field 6 says — never derived from the name
  (vpopmail hashes big domains into `0/`, `1/`, … sub-directories).

This module never decides whether a password is right (passwords.py does) and
never writes without the caller holding the domain's lock.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from engine.config.cdb import CdbError, CdbFile, build_cdb
from engine.config.domains import ascii_lower

VPASSWD = "vpasswd"
VPASSWD_CDB = "vpasswd.cdb"
VPASSWD_LOCK = ".vpasswd.lock"

# gid flag bits (vpopmail.h). Names as vpopmail's, values exact.
NO_PASSWD_CHNG = 0x01
NO_POP = 0x02
NO_WEBMAIL = 0x04
NO_IMAP = 0x08
BOUNCE_MAIL = 0x10
NO_RELAY = 0x20
NO_DIALUP = 0x40
V_USER0 = 0x80
V_USER1 = 0x100
V_USER2 = 0x200
V_USER3 = 0x400
NO_SMTP = 0x800
QA_ADMIN = 0x1000
V_OVERRIDE = 0x2000
NO_SPAMASSASSIN = 0x4000
DELETE_SPAM = 0x8000
SA_ADMIN = 0x10000
SA_EXPERT = 0x20000
NO_MAILDROP = 0x40000

FLAG_NAMES: dict[int, str] = {
    NO_PASSWD_CHNG: "no_passwd_chng", NO_POP: "no_pop", NO_WEBMAIL: "no_webmail",
    NO_IMAP: "no_imap", BOUNCE_MAIL: "bounce_mail", NO_RELAY: "no_relay",
    NO_DIALUP: "no_dialup", V_USER0: "v_user0", V_USER1: "v_user1", V_USER2: "v_user2",
    V_USER3: "v_user3", NO_SMTP: "no_smtp", QA_ADMIN: "qa_admin", V_OVERRIDE: "v_override",
    NO_SPAMASSASSIN: "no_spamassassin", DELETE_SPAM: "delete_spam", SA_ADMIN: "sa_admin",
    SA_EXPERT: "sa_expert", NO_MAILDROP: "no_maildrop",
}


def flag_names(gid: int) -> list[str]:
    """The names of the flag bits set in a vpasswd gid field."""
    return [name for bit, name in FLAG_NAMES.items() if gid & bit]


# vpopmail's limits and characters (§2.3).
MAX_NAME = 32
MAX_LINE = 255  # vpopmail 5.4 cannot build a cdb from longer lines
_USER_CHARS = re.compile(r"^[!#$&'*+\-./0-9=?A-Z^_`a-z{|}~]+$")
_DOMAIN_CHARS = re.compile(r"^[-.0-9A-Za-z]+$")
# vdelivermail checks EXT and HOST (lower-cased) against these before any
# look-up: another character is `invalid username` / `invalid domain name`
# (exit 100), whatever the user table or the catch-all says.
VDELIVER_USER_CHARS = frozenset("!#$&'*+-./0123456789=?^_`abcdefghijklmnopqrstuvwxyz{|}~")
VDELIVER_DOMAIN_CHARS = frozenset("-.0123456789abcdefghijklmnopqrstuvwxyz")

# bigdir.c: the first 99 users go in the domain directory itself, then 100
# per sub-directory named by one of these characters, then two levels.
HASH_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DIRECT_USERS = 99
PER_HASH_DIR = 100


class VpasswdError(Exception):
    """vpasswd / vpasswd.cdb unreadable or corrupt, or a field that cannot be stored."""


class QuotaError(ValueError):
    """A quota text that format_maildirquota would not accept."""


_QUOTA_PART = re.compile(r"^(\d+)\s*(KB|K|MB|M|GB|G|S|C|B)?(S)?$", re.IGNORECASE)
_UNITS = {"K": 1024, "KB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "G": 1024 ** 3, "GB": 1024 ** 3,
          "B": 1, "S": 1}


def parse_quota(text: str) -> tuple[int | None, int | None]:
    """(bytes, count) from a quota field or a `--quota` value; None = no limit.

    Accepts what format_maildirquota accepts: `NOQUOTA` (anything starting
    `NO` is unlimited, as in vdelivermail), plain bytes, `1M`/`1MB`/`1024K`/
    `1024KB`/`1G`, `<bytes>S`, `<count>C`, and comma-joined combinations in any
    order (`1mbs,1000C`). 0 means no limit for that part. Raises QuotaError.
    """
    text = text.strip()
    if not text or text[:2].upper() == "NO":
        return None, None
    size: int | None = None
    count: int | None = None
    for part in text.split(","):
        m = _QUOTA_PART.match(part.strip())
        if not m:
            raise QuotaError(f"bad quota {text!r} (examples: NOQUOTA, 10485760S, 10MB, 1000C, 10MB,1000C)")
        number, unit = int(m.group(1)), (m.group(2) or "").upper()
        if unit == "C":
            if m.group(3):
                raise QuotaError(f"bad quota {text!r}")
            count = number or None
        else:
            size = number * _UNITS.get(unit, 1) or None
    return size, count


def format_quota(size: int | None, count: int | None) -> str:
    """The stored form: `<bytes>S`, `<count>C`, `<bytes>S,<count>C`, or `NOQUOTA`."""
    parts = []
    if size:
        parts.append(f"{size}S")
    if count:
        parts.append(f"{count}C")
    return ",".join(parts) if parts else "NOQUOTA"


def normalize_quota(text: str) -> str:
    return format_quota(*parse_quota(text))


@dataclass(frozen=True, slots=True)
class VUser:
    name: str
    crypted: str
    uid: int
    gid: int
    gecos: str
    directory: str
    quota: str
    clear: str | None

    def has_flag(self, bit: int) -> bool:
        return bool(self.gid & bit)

    @property
    def no_passwd_chng(self) -> bool:
        return bool(self.gid & NO_PASSWD_CHNG)

    @property
    def no_pop(self) -> bool:
        return bool(self.gid & NO_POP)

    @property
    def no_webmail(self) -> bool:
        return bool(self.gid & NO_WEBMAIL)

    @property
    def no_imap(self) -> bool:
        return bool(self.gid & NO_IMAP)

    @property
    def bounce_mail(self) -> bool:
        return bool(self.gid & BOUNCE_MAIL)

    @property
    def no_relay(self) -> bool:
        return bool(self.gid & NO_RELAY)

    @property
    def no_smtp(self) -> bool:
        return bool(self.gid & NO_SMTP)

    @property
    def qa_admin(self) -> bool:
        return bool(self.gid & QA_ADMIN)

    @property
    def v_override(self) -> bool:
        return bool(self.gid & V_OVERRIDE)

    @property
    def no_maildrop(self) -> bool:
        return bool(self.gid & NO_MAILDROP)

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.gid)

    def _quota(self) -> tuple[int | None, int | None]:
        try:
            return parse_quota(self.quota)
        except QuotaError:
            return None, None  # vdelivermail's atol() of garbage is 0 = no quota

    @property
    def quota_bytes(self) -> int | None:
        return self._quota()[0]

    @property
    def quota_count(self) -> int | None:
        return self._quota()[1]

    @property
    def maildir(self) -> str:
        """The user's Maildir (with its trailing `/`, as in a .qmail line)."""
        return os.path.join(self.directory, "Maildir", "")

    def line(self) -> str:
        """The vpasswd line, without its newline."""
        fields = [self.name, self.crypted, str(self.uid), str(self.gid), self.gecos,
                  self.directory, self.quota]
        if self.clear is not None:
            fields.append(self.clear)
        return ":".join(fields)


_ATOI = re.compile(r"[ \t\n\v\f\r]*([-+]?[0-9]+)")


def _int(text: str) -> int:
    """vpopmail's atoi: the leading number (`2x` is 2), 0 when there is none."""
    m = _ATOI.match(text)
    return int(m.group(1)) if m else 0


def parse_vpasswd_line(line: str) -> VUser | None:
    """One line (no newline); None for a blank or malformed line (vpopmail skips those)."""
    fields = line.split(":", 7)
    if len(fields) < 7 or not fields[0]:
        return None
    name, crypted, uid, gid, gecos, directory, quota = fields[:7]
    clear = fields[7] if len(fields) == 8 else None
    return VUser(name, crypted, _int(uid), _int(gid), gecos, directory, quota, clear)


def parse_vpasswd(text: str) -> Iterator[VUser]:
    for line in text.split("\n"):
        user = parse_vpasswd_line(line.rstrip("\r"))
        if user is not None:
            yield user


def malformed_lines(text: str) -> list[str]:
    """What parse_vpasswd leaves out or shadows, one `line N: why` each: a line
    with fewer than seven fields or no name (vpopmail skips it: that user has no
    mailbox and cannot log in), a name seen before (only the first one counts)."""
    out: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line:
            continue
        user = parse_vpasswd_line(line)
        if user is None:
            fields = line.split(":")
            why = "no user name" if len(fields) >= 7 else f"{len(fields)} fields, not 7 or 8"
            out.append(f"line {n}: {why} (skipped)")
            continue
        key = ascii_lower(user.name)
        if key in seen:
            out.append(f"line {n}: {user.name} again (only the first line for it counts)")
        seen.add(key)
    return out


def unread_lines(text: str) -> list[str]:
    """The non-blank lines parse_vpasswd leaves out, as they are: a rewrite
    keeps them (vpopmail copies every line it does not change verbatim)."""
    return [line for line in (raw.rstrip("\r") for raw in text.split("\n"))
            if line and parse_vpasswd_line(line) is None]


def vpasswd_text(users: Iterable[VUser], unread: Iterable[str] = ()) -> str:
    """The whole file, sorted by name as vpopmail keeps it; `unread` lines last."""
    return ("".join(u.line() + "\n" for u in sorted(users, key=lambda u: u.name))
            + "".join(line + "\n" for line in unread))


def vpasswd_cdb(users: Iterable[VUser]) -> bytes:
    records = []
    for u in sorted(users, key=lambda u: u.name):
        name, rest = u.line().split(":", 1)
        records.append((name.encode("utf-8", "surrogateescape"), rest.encode("utf-8", "surrogateescape")))
    return build_cdb(records)


class VpopDomain:
    """A snapshot of one domain's users; lookups never touch the disk."""

    __slots__ = ("directory", "_cdb", "_users")

    def __init__(self, directory: str, *, cdb: CdbFile | None = None,
                 users: dict[str, VUser] | None = None) -> None:
        self.directory = directory
        self._cdb = cdb
        self._users = users

    @classmethod
    def from_text(cls, directory: str, text: str) -> VpopDomain:
        users: dict[str, VUser] = {}
        for u in parse_vpasswd(text):
            users.setdefault(ascii_lower(u.name), u)
        return cls(directory, users=users)

    @classmethod
    def from_cdb(cls, directory: str, data: bytes) -> VpopDomain:
        try:
            return cls(directory, cdb=CdbFile(data, name=os.path.join(directory, VPASSWD_CDB)))
        except CdbError as exc:
            raise VpasswdError(str(exc)) from exc

    def user(self, name: str) -> VUser | None:
        """The user called name (ASCII case-insensitive, as vpopmail lower-cases), or None."""
        key = ascii_lower(name)
        if self._users is not None:
            return self._users.get(key)
        try:
            value = self._cdb.get(key.encode("utf-8", "surrogateescape"))
        except CdbError as exc:
            raise VpasswdError(str(exc)) from exc
        if value is None:
            return None
        return parse_vpasswd_line(key + ":" + value.decode("utf-8", "surrogateescape"))

    def users(self) -> Iterator[VUser]:
        if self._users is not None:
            yield from self._users.values()
            return
        seen = set()
        try:
            for key, value in self._cdb.items():
                if key in seen:
                    continue
                seen.add(key)
                u = parse_vpasswd_line((key + b":" + value).decode("utf-8", "surrogateescape"))
                if u is not None:
                    yield u
        except CdbError as exc:
            raise VpasswdError(str(exc)) from exc

    def __len__(self) -> int:
        return sum(1 for _ in self.users()) if self._users is None else len(self._users)


def valid_user_name(name: str) -> str | None:
    """Why name cannot be a vpopmail user, or None when it can."""
    if not name:
        return "empty user name"
    if len(name) > MAX_NAME:
        return f"user name longer than {MAX_NAME} characters"
    if not _USER_CHARS.match(name):
        return "user name has a character vpopmail refuses (allowed: letters, digits, !#$&'*+-.=?^_`{|}~)"
    if "/" in name:
        # vpopmail's list has '/', but the user's directory is DOMDIR/NAME: `a/../../x`
        # would be a Maildir outside the domain (and vchkpw splits logins at '/').
        return "a user name cannot contain '/' (it would be a path, not a directory name)"
    if len(name) == 1:
        return "one-character user names would collide with vpopmail's hash directories"
    if name.startswith("."):
        return "a user name cannot start with '.' (it would collide with the domain's .qmail files)"
    if name == VPASSWD:
        return "'vpasswd' cannot be a user name"
    return None


def valid_domain_name(domain: str) -> str | None:
    if not (3 <= len(domain) <= 96):
        return "domain name must be 3 to 96 characters"
    if not _DOMAIN_CHARS.match(domain) or domain.startswith(("-", ".")) or domain.endswith(("-", ".")):
        return "domain name may hold only letters, digits, '-' and '.', not at either end"
    if ".." in domain:
        return "domain name has an empty label"
    return None


def hash_subdir(index: int) -> str:
    """Relative directory ('' = the domain directory) of the index-th user (0-based), as bigdir.c
    spreads them: 99 direct, then 100 per directory `0`..`z`, then `0/0`..`z/z`, and so on."""
    if index < DIRECT_USERS:
        return ""
    n = (index - DIRECT_USERS) // PER_HASH_DIR
    base = len(HASH_CHARS)
    levels, size = 1, base
    while n >= size:  # one level holds 62 directories, two levels 62*62, ...
        n -= size
        levels += 1
        size *= base
    digits = []
    for _ in range(levels):
        digits.append(HASH_CHARS[n % base])
        n //= base
    return "/".join(reversed(digits))
