"""Accounts: users/assign, vpopmail domains and their users, passwords, admin writes.

One package used by local delivery (which home and Maildir?), RCPT validation
(does this local recipient exist?), SMTP AUTH and POP3 (is this password
right? may this user use this protocol?):

- `assign`    — users/assign + users/cdb, qmail-lspawn's lookup, qmail-newu
- `vpasswd`   — vpasswd + vpasswd.cdb, gid flag bits, quota field, hashed dirs
- `passwords` — crypt(3) strings: verify any scheme, make `$6$` (CPU-heavy:
                callers on an event loop use an executor)
- `store`     — `Accounts(root)`: cached view re-read on change; `mailbox()`,
                `accepts()`
- `files`     — whole-file reads, atomic writes, vpopmail-compatible locks
- `admin`     — vadddomain / vadduser / valias / qmail-newu as functions (the CLI's)

Nothing here reads a file on a lookup that found a fresh snapshot, and nothing
outside `admin` writes.
"""
from engine.accounts.assign import Assign, Assignment, AssignError, compile_assign, load_assign
from engine.accounts.passwords import hash_password, verify
from engine.accounts.store import Accounts, AccountsError, Mailbox
from engine.accounts.vpasswd import VpopDomain, VUser

__all__ = [
    "Accounts", "AccountsError", "Assign", "AssignError", "Assignment", "Mailbox", "VUser",
    "VpopDomain", "compile_assign", "hash_password", "load_assign", "verify",
]
