"""vpopmail's domain limits (vlimits.c), the part a mail server acts on.

A domain's limits are DOMDIR/.qmailadmin-limits (qmailadmin writes it), else
VPOPMAIL/etc/vlimits.default (VPOPMAIL: the directory that holds `domains/`),
else none. Lines are `name value` (space, tab or `:` between), `#` starts a
comment. What they do here, as in vpopmail:

- `disable_pop`, `disable_smtp`, `disable_imap`, `disable_webmail`,
  `disable_external_relay`, `disable_password_changing`, `disable_dialup`,
  `disable_spamassassin`, `delete_spam`, `disable_maildrop` add their gid
  flag bit to every user of the domain at each login (vlimits_setflags), unless
  the user has V_OVERRIDE. The name alone sets it, whatever follows (so does
  vpopmail: `disable_pop 0` disables POP too);
- `default_quota` (bytes) and `default_maxmsgcount` are the quota of a user
  added without one (vadduser).

The other keys (maxpopaccounts, perm_*, …) are qmailadmin's and ignored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from engine.accounts.files import read_whole
from engine.accounts.vpasswd import (
    DELETE_SPAM, NO_DIALUP, NO_IMAP, NO_MAILDROP, NO_PASSWD_CHNG, NO_POP, NO_RELAY, NO_SMTP,
    NO_SPAMASSASSIN, NO_WEBMAIL,
)

LIMITS_FILE = ".qmailadmin-limits"
DEFAULT_FILE = os.path.join("etc", "vlimits.default")

_FLAGS = {"disable_pop": NO_POP, "disable_smtp": NO_SMTP, "disable_imap": NO_IMAP,
          "disable_external_relay": NO_RELAY, "disable_webmail": NO_WEBMAIL,
          "disable_password_changing": NO_PASSWD_CHNG, "disable_dialup": NO_DIALUP,
          "disable_spamassassin": NO_SPAMASSASSIN, "delete_spam": DELETE_SPAM,
          "disable_maildrop": NO_MAILDROP}


@dataclass(frozen=True, slots=True)
class Limits:
    flags: int = 0                  # vlimits_get_flag_mask
    default_quota: int = 0          # bytes; 0 = none
    default_maxmsgcount: int = 0
    source: str = ""                # the file they came from


NONE = Limits()


def _number(text: str | None) -> int:
    """strtoll's reading: leading digits (after an optional sign), else 0."""
    if not text:
        return 0
    digits = ""
    for i, c in enumerate(text):
        if c.isdigit() or (i == 0 and c in "+-"):
            digits += c
        else:
            break
    try:
        return max(int(digits), 0)
    except ValueError:
        return 0


def parse_limits(text: str, source: str = "") -> Limits:
    flags = quota = count = 0
    for line in text.replace("\r", "\n").split("\n"):
        if not line or line.startswith("#"):
            continue
        name, value = line, None
        for i, c in enumerate(line):
            if c in " \t:":
                name, value = line[:i], line[i:].lstrip(" \t:")
                break
        if name in _FLAGS:
            flags |= _FLAGS[name]
        elif name == "default_quota":
            quota = _number(value)
        elif name == "default_maxmsgcount":
            count = _number(value)
    return Limits(flags, quota, count, source)


def limits_paths(domain_dir: str) -> tuple[str, str | None]:
    """The domain's own limits file, and vlimits.default when the domain
    directory is under a `domains/` (None otherwise)."""
    own = os.path.join(domain_dir, LIMITS_FILE)
    head, sep, _ = domain_dir.rstrip("/").rpartition("/domains/")
    return own, (os.path.join(head, DEFAULT_FILE) if sep else None)


def read_limits(domain_dir: str) -> Limits:
    """The domain's limits (NONE when neither file exists). OSError passes
    through: an unreadable limits file must not silently lift a restriction."""
    for path in limits_paths(domain_dir):
        if path is None:
            continue
        got = read_whole(path)
        if got is not None:
            return parse_limits(got[0].decode("utf-8", "replace"), path)
    return NONE
