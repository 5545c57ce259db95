"""The three account questions local delivery asks, answered by
`engine.accounts.Accounts` (users/cdb or users/assign, DOMDIR/vpasswd(.cdb)):

- `assignment(local)`: qmail-lspawn's users/assign look-up (None: not
  assigned; qmail-getpw is the courier's fallback, not this module's);
- `domain_assignment(domain)`: vget_assign — the `+DOMAIN-` line, whose user
  field is the real domain of an alias domain and whose home is the domain
  directory;
- `vpop_user(domain_dir, name)`: vauth_getpw in that directory;

and `snapshot(domain_dir)`, which a delivery plan (engine.delivery.local.
plans) keeps to know that neither table changed since it was made.

An unreadable file raises `AccountsError` (delivery defers). Nothing here
reads a file itself or caches anything beyond what `Accounts` caches.
"""
from __future__ import annotations

import os

from engine.accounts import Accounts, Assignment, VUser
from engine.accounts.store import AccountsError
from engine.accounts.vpasswd import VpasswdError

__all__ = ["AccountsError", "Assignment", "DeliveryAccounts", "VUser"]


class DeliveryAccounts:
    """`Accounts` seen from local delivery (thread-safe enough: a race only
    loads a snapshot twice)."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    @classmethod
    def at(cls, root: os.PathLike | str, **kwargs) -> DeliveryAccounts:
        return cls(Accounts(root, **kwargs))

    def assignment(self, local: str) -> Assignment | None:
        return self.accounts.assign().lookup(local)

    def domain_assignment(self, domain: str) -> Assignment | None:
        return self.accounts.assign().wildcard(domain + "-")

    def snapshot(self, domain_dir: str | None = None) -> tuple[object, object]:
        """(users/assign's table, the vpasswd table of domain_dir or None) as
        answers come from now: the same objects until a file of theirs
        changes (`Accounts` re-reads it then), so identity says "unchanged"."""
        return (self.accounts.assign(),
                None if domain_dir is None else self.accounts.domain(domain_dir))

    def vpop_user(self, domain_dir: str, name: str, *, fresh: bool = False) -> VUser | None:
        """`fresh`: from vpasswd as it is now, not as last checked (up to
        `recheck_seconds` ago)."""
        try:
            users = self.accounts.domain(domain_dir, fresh=fresh)
            return None if users is None else users.user(name)
        except VpasswdError as exc:
            raise AccountsError(str(exc)) from exc
