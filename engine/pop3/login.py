"""Checking a POP3 login as vchkpw does, then opening the mailbox.

Owns (spec vpopmail-pop3-auth.md §1.5), for USER/PASS and APOP:
- the login name: lower-cased, split at the first `@`, else `%`, else `/`
  (`joe%example.com` works, as with vchkpw); a name without a domain is in
  the default domain (engine.accounts.store's `Accounts.login`);
- the lookup: the domain through users/assign's `+DOMAIN-` line (vget_assign,
  alias domains included), the user in its vpasswd(.cdb), the domain's
  limits in its flags;
- the check: PASS against the crypt string (engine.accounts.passwords,
  constant-time; an unknown user is checked against a dummy hash, so the
  answer takes as long as for a wrong password); APOP as hex(md5(timestamp + cleartext)) when the cleartext
  is kept (vpasswd's 8th field, not empty), never otherwise; an account with the NO_POP
  flag is refused like a wrong password (vchkpw exits 1 for both, and a
  distinct answer would confirm the password). A login from one of
  `[pop3] webmail_addresses` (127.0.0.1: a webmail on the box) is vchkpw's
  WEBMAIL protocol: NO_WEBMAIL refuses it and NO_POP does not, so "webmail
  only" accounts keep working;
- then, only for a right password, the Maildir: locked and scanned
  (engine.pop3.maildir).

`check_login` blocks (crypt costs milliseconds, the scan reads directories):
it runs in the receiver's password executor, never on the event loop. It
never raises for a client's input; a broken account file is TEMPORARY.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

from engine.accounts import lastauth, passwords
from engine.accounts.store import Accounts, AccountsError
from engine.accounts.vpasswd import VpasswdError, VUser
from engine.pop3.maildir import NO_MAILDIR, Mailbox, MailboxError

# Outcomes (vchkpw's syslog words where it has them).
OK, NOT_FOUND, BAD_PASSWORD, NO_POP, NO_WEBMAIL, MAILBOX, TEMPORARY = (
    "ok", "vpopmail user not found", "password fail", "pop access denied",
    "webmail access denied", "mailbox", "temporary")


@dataclass(slots=True)
class LoginResult:
    outcome: str
    login: str                       # lower-cased, as logged
    user: VUser | None = None
    mailbox: Mailbox | None = None
    reply: str = ""                  # MAILBOX: qmail-pop3d's -ERR text
    why: str = ""                    # MAILBOX: the system's reason, for the log


def apop_digest(timestamp: str, secret: str) -> str:
    return hashlib.md5((timestamp + secret).encode("utf-8", "surrogateescape")).hexdigest()


def check_login(accounts: Accounts, login: str, secret: str, *, apop_timestamp: str | None,
                max_messages: int, dummy_hash: Callable[[], str],
                webmail: bool = False, remoteip: str = "",
                hash_seen: Callable[[str], None] = lambda crypted: None,
                max_password_bytes: int = 128) -> LoginResult:
    """USER/PASS (apop_timestamp None) or APOP (secret = the digest); `webmail`:
    the client is one of `[pop3] webmail_addresses` (vchkpw's WEBMAIL). A login
    that passes is recorded in USERDIR/lastauth (`remoteip`), as vchkpw does.
    `hash_seen` is told each stored hash checked, for `dummy_hash` to follow
    the scheme the accounts use. A password over `max_password_bytes` is
    wrong unhashed (its cost grows with its length)."""
    too_long = (apop_timestamp is None
                and len(secret.encode("utf-8", "surrogateescape")) > max_password_bytes)
    try:
        name, user = accounts.login(login)
    except (AccountsError, VpasswdError, OSError):
        return LoginResult(TEMPORARY, login.lower())
    if user is None:
        if apop_timestamp is None and not too_long:
            passwords.verify(secret, dummy_hash())     # the same time as a real check
        return LoginResult(NOT_FOUND, name)
    if too_long:
        return LoginResult(BAD_PASSWORD, name, user)
    if apop_timestamp is None:
        if passwords.scheme(user.crypted) is None:
            # A hash no password matches (`!$1$…`) would answer at once:
            # as long as an unknown user's, so the time tells nothing.
            passwords.verify(secret, dummy_hash())
            return LoginResult(BAD_PASSWORD, name, user)
        hash_seen(user.crypted)
        right = passwords.verify(secret, user.crypted)
    else:
        # An empty eighth field (vadduser -e) keeps no cleartext: never a match.
        right = bool(user.clear) and hmac.compare_digest(
            apop_digest(apop_timestamp, user.clear).encode(), secret.lower().encode("ascii", "replace"))
    if not right:
        return LoginResult(BAD_PASSWORD, name, user)
    if webmail:
        if user.no_webmail:
            return LoginResult(NO_WEBMAIL, name, user)
    elif user.no_pop:
        return LoginResult(NO_POP, name, user)
    if not os.path.isabs(user.directory):
        # An empty (or relative) vpasswd directory would name the receiver's
        # working directory: no Maildir (vchkpw makes one; this never writes).
        return LoginResult(MAILBOX, name, user, reply=NO_MAILDIR,
                           why=f"vpasswd directory {user.directory!r} is not absolute")
    if remoteip:
        lastauth.record(user.directory, remoteip)
    try:
        mailbox = Mailbox.open(user.maildir, max_messages)
    except MailboxError as exc:
        return LoginResult(MAILBOX, name, user, reply=exc.reply, why=exc.why)
    return LoginResult(OK, name, user, mailbox)
