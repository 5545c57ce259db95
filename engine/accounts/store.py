"""`Accounts`: one cached, self-refreshing view of a qmail + vpopmail box's accounts.

Owns the answers local delivery, RCPT validation, SMTP AUTH and POP3 need:

    address ──control/virtualdomains──▶ `DOM-joe@DOM` ──users/assign──▶ home DOMDIR, ext `joe`
            ──DOMDIR/vpasswd(.cdb)──▶ VUser joe (crypted, dir, quota, flags)

What is cached, and when it is looked at again (never more than once per
`recheck_seconds` per item, so the number of stat calls is bounded whatever
the lookup rate):

| item | files compared (inode, size, mtime) |
|---|---|
| domain rewrite | control/{me,locals,virtualdomains,percenthack,envnoathost} |
| assign table | users/cdb, users/assign |
| one domain's users | DOMDIR/vpasswd.cdb, DOMDIR/vpasswd (cdb wins when present) |
| `.qmail*` names in a directory | the directory itself (while its mtime is < 2 s old it is re-scanned at every recheck even if unchanged: a second change within one clock tick leaves the mtime as it was) |
| a `.qmail-default`'s meaning | the file |
| a domain's limits (engine.accounts.limits) | DOMDIR/.qmailadmin-limits, VPOPMAIL/etc/vlimits.default |

Files are read whole and writers replace them by rename, so a snapshot is
never half-read. Lookups are dict / cdb probes: their cost does not grow with
the number of users or domains.

An unreadable or corrupt file raises AccountsError: delivery must treat that
as a temporary failure (qmail-lspawn's `Trouble reading users/cdb`), never as
"no such user". This module never writes anything.
"""
from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.accounts.assign import ASSIGN_FILE, CDB_FILE, Assign, AssignError, Assignment, load_assign
from engine.accounts.files import read_whole, stat_key
from engine.accounts.limits import Limits, limits_paths, read_limits
from engine.accounts.vpasswd import (V_OVERRIDE, VDELIVER_DOMAIN_CHARS, VDELIVER_USER_CHARS, VPASSWD,
                                     VPASSWD_CDB, VpasswdError, VpopDomain, VUser)
from engine.config.domains import DomainConfig, DomainConfigError, ascii_lower, load_domain_config

_CONTROL_FILES = ("me", "locals", "virtualdomains", "percenthack", "envnoathost")
_NAME_MAX = 255             # the longest file name (bytes; so at most as many characters)
_RACY_NS = 2_000_000_000
# local_verdict's answers kept at most (then all are dropped and kept anew).
_VERDICTS_MAX = 100_000
# Longest address whose answer is kept: RFC 5321's longest path (256 octets
# with its <>). A client's RCPTs of 900 bytes (parse_path's most) would
# otherwise keep 100 MB in every receiver.
_VERDICT_ADDRESS_MAX = 254


class AccountsError(Exception):
    """An account file exists but cannot be read or parsed (deliveries defer)."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A vpopmail user found for an address."""
    address: str            # the address asked about
    domain: str             # its domain, lower-case
    domain_dir: str         # the domain directory (users/assign's home)
    user: VUser
    assignment: Assignment  # uid/gid deliveries run as

    @property
    def maildir(self) -> str:
        return self.user.maildir


@dataclass(frozen=True, slots=True)
class DefaultDelivery:
    """What a `.qmail-default` does with an unknown user."""
    vdelivermail: bool      # runs vpopmail's vdelivermail
    argument: str           # vdelivermail's ARG (bounce-no-mailbox, delete, address, dir) or ""

    @property
    def bounces(self) -> bool:
        return self.vdelivermail and self.argument == "bounce-no-mailbox"


def parse_qmail_default(text: str) -> DefaultDelivery:
    """Read a .qmail-default: vdelivermail's ARG when it is vpopmail's line."""
    for line in text.split("\n"):
        line = line.rstrip(" \t")
        if not line or line.startswith("#"):
            continue
        if line.startswith("|") and "vdelivermail" in line:
            try:
                argv = shlex.split(line[1:])
            except ValueError:
                argv = line[1:].split()
            if argv and argv[0].endswith("vdelivermail"):
                return DefaultDelivery(True, argv[2] if len(argv) >= 3 else "")
        return DefaultDelivery(False, "")
    return DefaultDelivery(False, "")  # comments only / empty: qmail-local delivers by default


def safe_ext(ext: str) -> str:
    """qmail-local's safeext: lower-case (ASCII), `.` → `:`."""
    return ascii_lower(ext).replace(".", ":")


def default_candidates(dash: str, ext: str) -> list[str]:
    """The `.qmail` names qmail-local tries for ext, in order (spec QB §3.4),
    but for `-default` ones too long to be a file name (NAME_MAX): an
    extension of 880 bytes, a dash every other one, would be 440 names."""
    safe = safe_ext(ext)
    names = [f".qmail{dash}{safe}"]
    for i in range(min(len(safe), _NAME_MAX), -1, -1):
        if i == 0 or safe[i - 1] == "-":
            names.append(f".qmail{dash}{safe[:i]}default")
    return names


def split_login(login: str) -> tuple[str, str] | None:
    """(user, domain) as vchkpw's parse_email splits a login (first `@`, else
    `%`, else `/`), or None without a domain."""
    login = ascii_lower(login)
    for sep in ("@", "%", "/"):
        user, found, domain = login.partition(sep)
        if found:
            return (user, domain) if user and domain else None
    return None


def _vpopmail_home() -> str | None:
    """~vpopmail (vpopmail's VPOPMAILDIR), when the box has a vpopmail user."""
    import pwd
    try:
        return getattr(pwd.getpwnam("vpopmail"), "pw_dir", None) or None
    except KeyError:
        return None


class _Entry:
    __slots__ = ("value", "keys", "checked", "racy")

    def __init__(self, value: Any, keys: tuple, checked: float, racy: bool) -> None:
        self.value, self.keys, self.checked, self.racy = value, keys, checked, racy


class Accounts:
    """The accounts under ROOT, re-read when their files change."""

    def __init__(self, root: os.PathLike | str, *, recheck_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, default_domain: str = "",
                 vpopmail_dir: str | None = None) -> None:
        self.root = Path(root)
        # logins without a domain: the setting, else ~vpopmail/etc/defaultdomain
        self._default_domain = ascii_lower(default_domain.strip())
        self._vpopmail_dir = vpopmail_dir       # None: ~vpopmail, looked up when needed
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._cache: dict[tuple, _Entry] = {}
        # address -> (verdict, monotonic time it stops being fresh)
        self._verdicts: dict[str, tuple[bool | None, float]] = {}
        control = self.root / "control"
        self._control_paths = tuple(str(control / n) for n in _CONTROL_FILES)
        self._assign_paths = (str(self.root / CDB_FILE), str(self.root / ASSIGN_FILE))

    # -- the cache ---------------------------------------------------------
    def _cached(self, key: tuple, paths: tuple[str, ...], load: Callable[[], Any],
                *, directory: bool = False, fresh: bool = False) -> Any:
        """load()'s value, kept until one of paths changes; `fresh`: compare
        the files now, even if they were compared under recheck_seconds ago."""
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and not fresh and now - entry.checked < self.recheck_seconds:
            return entry.value
        try:
            keys = tuple(stat_key(p) for p in paths)
        except OSError as exc:      # EACCES: a directory this user may not enter
            raise AccountsError(f"trouble reading {exc.filename}: {exc.strerror}") from exc
        if entry is not None and entry.keys == keys and not entry.racy:
            entry.checked = now
            return entry.value
        value = load()
        racy = directory and any(k is not None and time.time_ns() - k.mtime_ns < _RACY_NS for k in keys)
        self._cache[key] = _Entry(value, keys, now, racy)
        return value

    def forget(self) -> None:
        """Drop every snapshot (the next lookup re-reads)."""
        self._cache.clear()
        self._verdicts.clear()

    # -- the three tables --------------------------------------------------
    def domain_config(self) -> DomainConfig:
        def load() -> DomainConfig:
            try:
                return load_domain_config(self.root)
            except DomainConfigError as exc:
                raise AccountsError(str(exc)) from exc
        return self._cached(("control",), self._control_paths, load)

    def assign(self) -> Assign:
        def load() -> Assign:
            try:
                return load_assign(self.root)
            except (AssignError, OSError) as exc:
                raise AccountsError(f"trouble reading users/cdb: {exc}") from exc
        return self._cached(("assign",), self._assign_paths, load)

    def domain(self, directory: str, *, fresh: bool = False) -> VpopDomain | None:
        """The vpopmail users of a domain directory, or None when it has no vpasswd.
        `fresh`: as the files are now (a stat of each), not as last checked."""
        cdb_path = os.path.join(directory, VPASSWD_CDB)
        text_path = os.path.join(directory, VPASSWD)

        def load() -> VpopDomain | None:
            try:
                got = read_whole(cdb_path)
                if got is not None:
                    return VpopDomain.from_cdb(directory, got[0])
                got = read_whole(text_path)
                if got is not None:
                    return VpopDomain.from_text(directory, got[0].decode("utf-8", "surrogateescape"))
                return None
            except (VpasswdError, OSError) as exc:
                raise AccountsError(f"trouble reading {cdb_path}: {exc}") from exc
        return self._cached(("vpasswd", directory), (cdb_path, text_path), load, fresh=fresh)

    def limits(self, directory: str) -> Limits:
        """The domain's vpopmail limits (engine.accounts.limits)."""
        own, default = limits_paths(directory)

        def load() -> Limits:
            try:
                return read_limits(directory)
            except OSError as exc:
                raise AccountsError(f"trouble reading {own}: {exc.strerror}") from exc
        return self._cached(("limits", directory), (own, default or own), load)

    @staticmethod
    def _user(users: VpopDomain, name: str) -> VUser | None:
        try:
            return users.user(name)
        except VpasswdError as exc:  # a corrupt record found by this lookup
            raise AccountsError(f"trouble reading {users.directory}: {exc}") from exc

    def _qmail_names(self, directory: str) -> frozenset[str]:
        def load() -> frozenset[str]:
            try:
                with os.scandir(directory) as it:
                    return frozenset(e.name for e in it if e.name.startswith(".qmail"))
            except (FileNotFoundError, NotADirectoryError):
                return frozenset()
            except OSError as exc:
                raise AccountsError(f"trouble reading {directory}: {exc.strerror}") from exc
        return self._cached(("dir", directory), (directory,), load, directory=True)

    def _cached_file(self, key: tuple, path: str, parse: Callable[[bytes], Any]) -> Any:
        """parse(content) of the file at path, None when there is none; parsed
        once per version of the file."""
        def load() -> Any:
            try:
                got = read_whole(path)
            except OSError as exc:
                raise AccountsError(f"trouble reading {path}: {exc.strerror}") from exc
            return None if got is None else parse(got[0])
        return self._cached(key, (path,), load)

    def _default_delivery(self, path: str) -> DefaultDelivery | None:
        """What the .qmail-default at path does (None when it is gone)."""
        return self._cached_file(("qmail-default", path), path, lambda raw: parse_qmail_default(
            raw.decode("utf-8", "surrogateescape")))

    # -- answers -----------------------------------------------------------
    def route(self, address: str) -> tuple[str, Assignment] | None:
        """(domain, assignment) for a local address, None when remote or unassigned."""
        channel, rewritten = self.domain_config().resolve(address)
        if channel != "local":
            return None
        at = rewritten.rfind("@")
        assignment = self.assign().lookup(rewritten[:at] if at >= 0 else rewritten)
        if assignment is None:
            return None
        return ascii_lower(rewritten[at + 1:]), assignment

    def vpop_domain(self, domain: str) -> tuple[Assignment, VpopDomain] | None:
        """A vpopmail domain by name, through its users/assign `+DOMAIN-` line (vget_assign)."""
        assignment = self.assign().wildcard(ascii_lower(domain) + "-")
        if assignment is None:
            return None
        users = self.domain(assignment.home)
        return None if users is None else (assignment, users)

    def mailbox(self, address: str) -> Mailbox | None:
        """The vpopmail user an address reaches (with its domain's limits in
        its flags, as `login_user`), or None.

        Only the vpasswd user is looked up: a `.qmail-NAME` alias file that
        shadows the user for delivery is accepts()'s and delivery's business.
        """
        routed = self.route(address)
        if routed is None:
            return None
        domain, assignment = routed
        if not assignment.dash or not assignment.ext:
            return None
        users = self.domain(assignment.home)
        if users is None:
            return None
        user = self._user(users, assignment.ext)
        if user is None:
            return None
        return Mailbox(address, domain, assignment.home, self._with_limits(assignment.home, user),
                       assignment)

    def set_default_domain(self, default_domain: str) -> None:
        """`[accounts] default_domain` after a reload (engine.smtp.receiver)."""
        self._default_domain = ascii_lower(default_domain.strip())

    def default_domain(self) -> str | None:
        """vchkpw's domain for a login without one (`[accounts] default_domain`,
        else the first line of ~vpopmail/etc/defaultdomain), or None."""
        if self._default_domain:
            return self._default_domain
        if self._vpopmail_dir is None:
            self._vpopmail_dir = _vpopmail_home() or ""     # looked up once
        if not self._vpopmail_dir:
            return None
        path = os.path.join(self._vpopmail_dir, "etc", "defaultdomain")
        return self._cached_file(("defaultdomain",), path, lambda raw: ascii_lower(
            raw.decode("utf-8", "replace").split("\n", 1)[0].strip()) or None)

    def login(self, login: str) -> tuple[str, VUser | None]:
        """vchkpw: a POP3 or SMTP AUTH login (`joe@dom`, `joe%dom`, `joe/dom`, or
        `joe` in the default domain) as `user@domain`, and its user with the
        domain's limits in its flags (None: no such user)."""
        name = ascii_lower(login)
        parts = split_login(name)
        if parts is None:
            domain = None if any(sep in name for sep in "@%/") else self.default_domain()
            if domain is None or not name:
                return name, None
            parts = (name, domain)
        local, domain = parts
        return f"{local}@{domain}", self.login_user(domain, local)

    def login_user(self, domain: str, name: str) -> VUser | None:
        """vchkpw's vauth_getpw(name, domain): the user through the domain's
        `+DOMAIN-` assign line, with the domain's limits in its flags."""
        found = self.vpop_domain(domain)
        if found is None:
            return None
        user = self._user(found[1], name)
        return None if user is None else self._with_limits(found[0].home, user)

    def _with_limits(self, directory: str, user: VUser) -> VUser:
        """vpopmail's vlimits_setflags: the domain's disable_* limits are the
        user's flags too at every login, unless the user has V_OVERRIDE."""
        mask = self.limits(directory).flags
        if mask & ~user.gid and not user.gid & V_OVERRIDE:
            return replace(user, gid=user.gid | mask)
        return user

    def accepts(self, address: str) -> bool:
        """Would local delivery find somewhere to put mail for this local address?

        True for a vpopmail user (unless flagged BOUNCE_MAIL), an alias file
        (`.qmail-LOCAL`, `.` as `:`), an extension matched by a
        `.qmail-EXT-default` (qmail-local's search order), or a `.qmail-default`
        catch-all that is not vdelivermail's `bounce-no-mailbox`. Remote
        addresses answer False (not ours to judge). A local address users/assign
        does not know goes to qmail-getpw/alias, which this module does not
        model: True (qmail would accept it too).
        """
        return self.local_verdict(address) is True

    def local_verdict(self, address: str) -> bool | None:
        """accepts() for a local address; None for a remote one (one resolve
        for the receiver's RCPT check, which must tell the two apart).

        An answer is kept per address for as long as every snapshot it came
        from is fresh (checked under recheck_seconds ago, not racy): a change
        to a file is seen as soon as without it, and the receiver, asked
        about the same mailboxes again and again, skips the walk through the
        tables (20 µs a recipient on 1,000 mailboxes; 2 µs kept)."""
        now = self._clock()
        kept = self._verdicts.get(address)
        if kept is not None and now < kept[1]:
            return kept[0]
        used: list[tuple] = []
        verdict = self._local_verdict(address, used)
        fresh_until = None
        for key in used:
            entry = self._cache.get(key)
            if entry is None or entry.racy:
                return verdict
            until = entry.checked + self.recheck_seconds
            if fresh_until is None or until < fresh_until:
                fresh_until = until
        if fresh_until is not None and now < fresh_until and len(address) <= _VERDICT_ADDRESS_MAX:
            if len(self._verdicts) >= _VERDICTS_MAX:
                self._verdicts.clear()
            self._verdicts[address] = (verdict, fresh_until)
        return verdict

    def _local_verdict(self, address: str, used: list[tuple]) -> bool | None:
        """local_verdict's walk; the keys of the snapshots it read go to `used`."""
        used.append(("control",))
        channel, rewritten = self.domain_config().resolve(address)
        if channel != "local":
            return None
        at = rewritten.rfind("@")
        local = rewritten[:at]
        if not local:
            return True  # qmail-lspawn's trash: accepted, silently dropped
        used.append(("assign",))
        assignment = self.assign().lookup(local)
        if assignment is None:
            return True
        home, dash, ext = assignment.home, assignment.dash, assignment.ext
        if not dash and not ext:
            return True  # the user's own .qmail or defaultdelivery
        used.append(("dir", home))
        names = self._qmail_names(home)
        candidates = default_candidates(dash, ext)
        found = next((n for n in candidates if n in names), None)
        if found is None:
            return not dash
        if found != f".qmail{dash}default":
            return True  # alias or EXT-default
        path = os.path.join(home, found)
        used.append(("qmail-default", path))
        default = self._default_delivery(path)
        if default is None:  # removed since the directory was listed
            return not dash
        if not default.vdelivermail:
            return True
        if (any(ch not in VDELIVER_USER_CHARS for ch in ascii_lower(ext))
                or any(ch not in VDELIVER_DOMAIN_CHARS for ch in ascii_lower(rewritten[at + 1:]))):
            return False  # vdelivermail's `invalid username` / `invalid domain name`: a bounce
        used.append(("vpasswd", home))
        users = self.domain(home)
        user = self._user(users, ext) if users is not None else None
        if user is not None:
            return not user.bounce_mail
        return not default.bounces
