"""vpopmail's admin commands as functions: vadddomain, vdeldomain, vadduser, vdeluser,
vpasswd, vsetuserquota, vmoduser, valias, qmail-newu (the `qrelay domain|user|alias|newu`
commands call these).

Every write goes through files.atomic_write (temp file, fsync, rename, directory
fsync), so a running server sees the old or the new file, never a torn one, and
picks the change up at its next mtime poll. Read-modify-write cycles hold the
lock files vpopmail itself uses (users/assign.lock for domain changes,
DOMDIR/.vpasswd.lock for a domain's users), so our commands and vpopmail's may
share a tree.

Owner of what we create (decided once, in `domain_owner`): `--uid/--gid`; else,
as root, the first uid that is not 0 among the owner of ROOT/domains, the owner
of the vpopmail domains already in users/assign (a vpopmail box keeps one
owner), `[run] user` (the receivers run as it and must read the domain's
vpasswd for RCPT checks, AUTH and POP3), the `vpopmail` user; not as root, the
user running the command (nobody else may give files away, so the files are
theirs). qmail refuses to deliver as root, so a domain owned by uid 0 would
bounce every message: with no other choice we refuse, in one line, and ask for
`--uid/--gid` or a vpopmail user. `receivers_cannot_read` says when a domain's
owner is not the user the receivers run as.

Modes follow vpopmail (umask 077): domain and user directories 0700, vpasswd,
vpasswd.cdb and .qmail files 0600; users/assign, users/cdb and control files 0644.

Bad input raises AdminError (the CLI: one line, exit status 2); OSError passes
through (exit status 1).
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.accounts import passwords
from engine.accounts.assign import (
    ASSIGN_FILE, AssignError, AssignLine, compile_assign, load_assign, parse_assign_line,
)
from engine.accounts.files import atomic_write, atomic_write_all, file_lock, make_dir, read_whole
from engine.accounts.limits import NONE as NO_LIMITS, Limits, read_limits
from engine.accounts.store import parse_qmail_default, safe_ext
from engine.accounts.vpasswd import (
    BOUNCE_MAIL, NO_IMAP, NO_PASSWD_CHNG, NO_POP, NO_RELAY, NO_SMTP, NO_WEBMAIL, VPASSWD,
    VPASSWD_CDB, VPASSWD_LOCK, QuotaError, VUser, format_quota, hash_subdir, normalize_quota,
    malformed_lines, parse_vpasswd, unread_lines, valid_domain_name, valid_user_name,
    vpasswd_cdb, vpasswd_text,
)
from engine.config.cdb import CdbError, CdbFile, newmrh
from engine.config.control import read_list
from engine.config.domains import ascii_lower
from engine.config.settings import Settings, SettingsError, load_settings
from engine.privilege import acting_as

VDELIVERMAIL = "/home/vpopmail/bin/vdelivermail"
# vadddomain stops adding to rcpthosts at 50 lines and uses morercpthosts.
RCPTHOSTS_MAX = 50
DIR_MODE = 0o700
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
_TARGET = re.compile(r"^[^\s@]+@[^\s@]+$")
# A catch-all address goes on .qmail-default's `|` line, which qmail-local
# runs with sh -c: only characters the shell takes literally.
_CATCHALL_TARGET = re.compile(r"^[A-Za-z0-9._+=%-]+@[A-Za-z0-9.-]+$")


class AdminError(Exception):
    """Bad input for an admin command (unknown domain, existing user, bad address, ...)."""


def _settings(root: os.PathLike | str) -> Settings:
    """ROOT/qrelay.toml's settings (engine/config/settings.py: `[accounts]`,
    `[auth] max_password_bytes`), read once per command."""
    try:
        return load_settings(root)
    except SettingsError as exc:
        raise AdminError(str(exc)) from None


# -- shared checks ---------------------------------------------------------
def check_root(root: os.PathLike | str) -> Path:
    base = Path(root)
    if not base.is_dir():
        raise AdminError(f"{root}: no such qrelay root (create it with `qrelay init {root}`)")
    if not (base / "control").is_dir():
        raise AdminError(f"{root}: not a qrelay root (no control/ directory)")
    return base.absolute()


def split_address(address: str) -> tuple[str, str]:
    """(local part, lower-cased domain) of `user@domain`, or AdminError."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AdminError(f"{address!r}: not a full email address (user@domain)")
    return local, ascii_lower(domain)


def _check_user(local: str, address: str) -> str:
    name = ascii_lower(local)
    why = valid_user_name(name)
    if why:
        raise AdminError(f"{address}: {why}")
    return name


@dataclass(frozen=True, slots=True)
class DomainRef:
    name: str
    directory: Path
    uid: int
    gid: int

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid


@contextlib.contextmanager
def _in_tree(ref: DomainRef):
    """Work in a domain's tree as its owner (engine.privilege.acting_as): the
    tree is that user's (the run user's, by default), and a link it put there
    (a .vpasswd.lock or a maildirsize to /etc/shadow, a user directory to /etc)
    must lead root nowhere that user could not write itself. Not root: nothing
    changes. A tree its owner cannot reach is an AdminError saying so (its
    deliveries, made as that owner, could not reach it either)."""
    with acting_as(ref.uid, ref.gid):
        try:
            yield
        except PermissionError as exc:
            raise AdminError(f"{exc.filename}: {exc.strerror} as uid {ref.uid}, the owner of "
                             f"{ref.name}, who delivers its mail: every directory above "
                             f"{ref.directory} must be searchable by it (chmod o+x)") from None


def find_domain(root: Path, domain: str) -> DomainRef:
    """A vpopmail domain by its users/assign `+DOMAIN-` line (as vget_assign)."""
    try:
        assignment = load_assign(root).wildcard(ascii_lower(domain) + "-")
    except AssignError as exc:
        raise AdminError(str(exc)) from None
    if assignment is None:
        raise AdminError(f"{domain}: no such domain (add it with `qrelay domain add`)")
    directory = Path(assignment.home)
    if not ((directory / VPASSWD).exists() or (directory / VPASSWD_CDB).exists()):
        raise AdminError(f"{domain}: {directory} is not a vpopmail domain directory (no vpasswd)")
    return DomainRef(ascii_lower(domain), directory, assignment.uid, assignment.gid)


def read_users(directory: Path) -> list[VUser]:
    """A domain's users from vpasswd (the master copy), else from vpasswd.cdb."""
    got = read_whole(directory / VPASSWD)
    if got is not None:
        return list(parse_vpasswd(got[0].decode("utf-8", "surrogateescape")))
    got = read_whole(directory / VPASSWD_CDB)
    if got is None:
        return []
    try:
        text = "".join((k + b":" + v + b"\n").decode("utf-8", "surrogateescape")
                       for k, v in CdbFile(got[0]).items())
    except CdbError as exc:
        raise AdminError(str(exc)) from None
    return list(parse_vpasswd(text))


def write_users(ref: DomainRef, users: Iterable[VUser]) -> None:
    """vpasswd then vpasswd.cdb (what lookups read), both written before either
    replaces its old file: a write that fails leaves both as they were. The
    lines of the old vpasswd that read_users could not read stay (at the end)."""
    users = list(users)
    got = read_whole(ref.directory / VPASSWD)
    unread = unread_lines(got[0].decode("utf-8", "surrogateescape")) if got is not None else []
    atomic_write_all([(ref.directory / VPASSWD,
                       vpasswd_text(users, unread).encode("utf-8", "surrogateescape")),
                      (ref.directory / VPASSWD_CDB, vpasswd_cdb(users))],
                     mode=SECRET_MODE, owner=ref.owner)


def rebuild_cdb(root: os.PathLike | str, domain: str) -> tuple[DomainRef, int, list[str]]:
    """vmkpasswd: vpasswd.cdb (what lookups read) built again from vpasswd, so a
    hand edit of vpasswd takes effect. Returns the domain, how many users the
    cdb holds and vpasswd's malformed lines (vpasswd.malformed_lines)."""
    ref = find_domain(check_root(root), domain)
    with _in_tree(ref), file_lock(ref.directory / VPASSWD_LOCK, ref.owner):
        got = read_whole(ref.directory / VPASSWD)
        if got is None:
            raise AdminError(f"{ref.name}: {ref.directory / VPASSWD} is missing: "
                             "nothing to build vpasswd.cdb from")
        text = got[0].decode("utf-8", "surrogateescape")
        users = list(parse_vpasswd(text))
        atomic_write(ref.directory / VPASSWD_CDB, vpasswd_cdb(users), mode=SECRET_MODE,
                     owner=ref.owner)
    return ref, len({ascii_lower(u.name) for u in users}), malformed_lines(text)


# -- control files ---------------------------------------------------------
def _read_text(path: Path) -> str:
    got = read_whole(path)
    return "" if got is None else got[0].decode("utf-8", "surrogateescape")


def _append_line(path: Path, line: str) -> None:
    text = _read_text(path)
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write(path, (text + line + "\n").encode("utf-8", "surrogateescape"), mode=PUBLIC_MODE)


def _remove_lines(path: Path, drop) -> bool:
    """Rewrite path without the lines drop(line) is true for; False when nothing changed."""
    got = read_whole(path)
    if got is None:
        return False
    lines = got[0].decode("utf-8", "surrogateescape").split("\n")
    kept = [line for line in lines if not drop(line.rstrip(" \t"))]
    if len(kept) == len(lines):
        return False
    atomic_write(path, "\n".join(kept).encode("utf-8", "surrogateescape"), mode=PUBLIC_MODE)
    return True


def _read_assign_lines(root: Path) -> list[str]:
    """users/assign without its `.` end line (a missing file is an empty one).
    A line qmail-newu would refuse is an AdminError now, before the caller
    writes anything (users/cdb could not be compiled afterwards)."""
    text = _read_text(root / ASSIGN_FILE)
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("."):
            for n, kept in enumerate(lines[:i], 1):
                try:
                    parse_assign_line(kept, n)
                except AssignError as exc:
                    raise AdminError(f"{root / ASSIGN_FILE}: {exc}; fix it by hand") from None
            return lines[:i]
    if text.strip():
        raise AdminError(f"{root / ASSIGN_FILE}: bad format (no `.` line at the end); fix it by hand")
    return []


def _write_assign(root: Path, lines: list[str]) -> None:
    body = "".join(line + "\n" for line in lines) + ".\n"
    atomic_write(root / ASSIGN_FILE, body.encode("utf-8", "surrogateescape"), mode=PUBLIC_MODE)
    try:
        compile_assign(root)
    except AssignError as exc:
        raise AdminError(str(exc)) from None


def newu(root: os.PathLike | str) -> int:
    """qmail-newu: users/assign → users/cdb; the number of assignments."""
    base = check_root(root)
    if not (base / ASSIGN_FILE).is_file():
        raise AdminError(f"{base / ASSIGN_FILE}: no such file")
    # Under the lock `domain add`/`del` hold: a users/cdb compiled from the
    # users/assign read before one of them wrote it would undo its change.
    with file_lock(base / "users" / "assign.lock"):
        try:
            return compile_assign(base)
        except AssignError as exc:
            raise AdminError(f"{base / ASSIGN_FILE}: {exc}") from None


# -- domains ---------------------------------------------------------------
def _run_user_name(root: Path) -> str:
    from engine.config.settings import SettingsError, load_settings
    try:
        return load_settings(root).run.user
    except SettingsError:
        return ""


def domain_owner(root: Path, uid: int | None = None, gid: int | None = None) -> tuple[int, int]:
    """(uid, gid) for a new domain: the first non-root choice (see the module docstring)."""
    if uid is not None or gid is not None:
        if uid is None or gid is None:
            raise AdminError("give both --uid and --gid")
        if uid == 0:
            raise AdminError("refusing uid 0: qmail never delivers as root")
        return uid, gid
    candidates = []
    if os.geteuid() == 0:
        try:
            st = os.stat(root / "domains")
            candidates.append((st.st_uid, st.st_gid))
        except FileNotFoundError:
            pass
        candidates += _domain_owners(root)
        for name in (_run_user_name(root), "vpopmail"):
            if not name:
                continue        # `[run] user = ""`: the receivers run as root
            try:
                pw = pwd.getpwnam(name)
                candidates.append((pw.pw_uid, pw.pw_gid))
            except KeyError:
                pass
    else:
        candidates.append((os.getuid(), os.getgid()))
    for cand in candidates:
        if cand[0] != 0:
            return cand
    raise AdminError("no user to own the domain: qmail never delivers as root; "
                     "create a vpopmail user (useradd -r vpopmail) or pass --uid and --gid")


def _domain_owners(root: Path) -> list[tuple[int, int]]:
    """Owners of the vpopmail domains in users/assign, the most common first."""
    try:
        domains = list_domains(root)
    except (AdminError, OSError):
        return []               # add_domain reports a broken users/assign
    return [owner for owner, _ in Counter((d.uid, d.gid) for d in domains).most_common()]


def receivers_cannot_read(root: os.PathLike | str, ref: DomainRef) -> str | None:
    """A one-line warning when `ref` belongs to another uid than `[run] user`,
    whose receivers then cannot read its vpasswd (engine.privilege's
    foreign_domains, which `qrelay run` reports at start); else None."""
    from engine.privilege import PrivilegeError, run_user
    try:
        user = run_user(_run_user_name(Path(root)))
    except PrivilegeError:
        return None             # `qrelay run` creates it (or refuses), and says so
    if user is None or user.uid == ref.uid:
        return None             # receivers run as root, as whoever runs qrelay, or as its owner
    try:
        cure = f'[run] user = "{pwd.getpwuid(ref.uid).pw_name}" in qrelay.toml'
    except KeyError:
        cure = f"the domain belongs to {user.name} (--uid {user.uid} --gid {user.gid})"
    return (f"{ref.name} belongs to uid {ref.uid}, but the receivers run as {user.name} "
            f"(uid {user.uid}) and cannot read its vpasswd: RCPT checks, AUTH and POP3 "
            f"for it fail with temporary errors until {cure}")


def qmail_default_line(argument: str) -> str:
    return f"| {VDELIVERMAIL} '' {argument}\n"


def add_domain(root: os.PathLike | str, domain: str, *, uid: int | None = None,
               gid: int | None = None) -> DomainRef:
    """vadddomain: ROOT/domains/DOMAIN with vpasswd, vpasswd.cdb, .qmail-default; rcpthosts,
    virtualdomains, users/assign (+ users/cdb) updated."""
    base = check_root(root)
    name = _new_domain_name(domain)
    owner = domain_owner(base, uid, gid)
    (base / "users").mkdir(mode=0o755, exist_ok=True)
    with file_lock(base / "users" / "assign.lock"):
        lines = _unused_domain_lines(base, name)
        domains = base / "domains"
        make_dir(domains, 0o755, owner)
        directory = domains / name
        if directory.exists():
            raise AdminError(f"{directory}: exists; remove it or pick another domain")
        make_dir(directory, DIR_MODE, owner)
        ref = DomainRef(name, directory, *owner)
        try:
            with _in_tree(ref):
                write_users(ref, [])
                atomic_write(directory / ".qmail-default",
                             qmail_default_line("bounce-no-mailbox").encode(), mode=SECRET_MODE,
                             owner=owner)
        except (OSError, AdminError):
            # Not added (a full disk, a ROOT its owner cannot reach): the
            # directory left would make the retry refuse.
            with contextlib.suppress(OSError, AdminError):
                _remove_domain_directory(ref)
            with contextlib.suppress(OSError):
                directory.rmdir()   # unreachable by its owner, so still empty: rmdir takes only that
            raise
        line = AssignLine(True, f"{name}-", name, str(owner[0]), str(owner[1]), str(directory), "-", "")
        _add_domain_lines(base, name, lines + [line.text()])
    return ref


def _new_domain_name(domain: str) -> str:
    """DOMAIN lower-cased, or AdminError when it is no domain name."""
    name = ascii_lower(domain)
    why = valid_domain_name(name)
    if why:
        raise AdminError(f"{domain}: {why}")
    return name


def _unused_domain_lines(base: Path, name: str) -> list[str]:
    """users/assign's lines (under its lock), or AdminError when `name` is a
    domain already (an assign line or a virtualdomains entry)."""
    lines = _read_assign_lines(base)
    if any(ascii_lower(line).startswith(f"+{name}-:") for line in lines):
        raise AdminError(f"{name}: domain exists (users/assign has +{name}-)")
    vdoms = read_list(base / "control" / "virtualdomains", []) or []
    if any(ascii_lower(v.split(":", 1)[0]) == name for v in vdoms):
        raise AdminError(f"{name}: already in control/virtualdomains")
    return lines


def _add_domain_lines(base: Path, name: str, assign_lines: list[str]) -> None:
    """A new (or alias) domain's lines: users/assign (+ users/cdb), virtualdomains
    `NAME:NAME`, rcpthosts (or morercpthosts); out of locals."""
    _write_assign(base, assign_lines)
    _append_line(base / "control" / "virtualdomains", f"{name}:{name}")
    _remove_lines(base / "control" / "locals", lambda x: ascii_lower(x) == name)
    _add_rcpthost(base, name)


def _add_rcpthost(base: Path, name: str) -> None:
    control = base / "control"
    hosts = read_list(control / "rcpthosts", []) or []
    more = read_list(control / "morercpthosts", []) or []
    if any(ascii_lower(h) == name for h in hosts + more):
        return
    if len(hosts) >= RCPTHOSTS_MAX:
        _append_line(control / "morercpthosts", name)
        newmrh(control)
    else:
        _append_line(control / "rcpthosts", name)


def delete_domain(root: os.PathLike | str, domain: str) -> tuple[DomainRef, str | None]:
    """vdeldomain. A real domain: it, its alias domains (same directory) and
    its tree. An alias domain: its own lines alone, the real domain's
    directory untouched. Returns (the domain, the real domain it was an alias
    of, or None)."""
    base = check_root(root)
    real = _alias_of(base, ascii_lower(domain))
    if real is None:
        ref = find_domain(base, domain)
    else:
        # Its own lines only, so its directory need not be a domain's any
        # more: an alias left behind by its real domain's removal goes too.
        a = load_assign(base).wildcard(ascii_lower(domain) + "-")
        ref = DomainRef(ascii_lower(domain), Path(a.home), a.uid, a.gid)
    with file_lock(base / "users" / "assign.lock"):
        lines = _read_assign_lines(base)
        names = set()
        kept = []
        for line in lines:
            try:
                entry = parse_assign_line(line)
            except AssignError:
                kept.append(line)
                continue
            name = ascii_lower(entry.local[:-1]) if entry.wild and entry.local.endswith("-") else None
            if name is not None and (name == ref.name if real else
                                     Path(entry.home) == ref.directory):
                names.add(name)
                continue
            kept.append(line)
        _write_assign(base, kept)
        _remove_domain_names(base / "control", names)
    if real is None:
        _remove_domain_directory(ref)
    return ref, real


def _remove_domain_directory(ref: DomainRef) -> None:
    """vdeldomain's rm -rf of DOMDIR, as its owner (_in_tree): the tree and
    often the directory above it (~vpopmail/domains) are that user's, and a
    link swapped in for one of them must not lead root's rm -rf to another
    tree of the same name (/var/www/example.com). Root removes only the
    emptied DOMDIR itself (its parent may be another owner's): rmdir removes
    nothing but an empty directory, wherever a link leads."""
    directory = ref.directory
    with _in_tree(ref):
        if directory.is_symlink():
            directory.unlink()      # vdeldomain: a linked domain loses the link, not the tree
            return
        # Out of deliveries' way first (as `user del` does): one whose cached
        # users/cdb still routes here finds no directory and is deferred,
        # instead of writing into a tree being removed.
        doomed = directory.with_name(f".{directory.name}.deleted.{os.getpid()}")
        try:
            os.rename(directory, doomed)
            directory = doomed
        except PermissionError:
            pass                    # a parent the owner may not write: removed in place
        try:
            for top, dirs, files in os.walk(directory, topdown=False, onerror=_raise):
                for name in files:
                    os.unlink(os.path.join(top, name))
                for name in dirs:
                    path = os.path.join(top, name)
                    os.unlink(path) if os.path.islink(path) else os.rmdir(path)
        except PermissionError as exc:
            # Something in the tree is not the owner's (a mkdir by hand as root).
            raise AdminError(
                f"{exc.filename}: {exc.strerror} as uid {ref.uid}, the owner of {ref.name}: "
                f"{directory} holds files it may not remove (chown -R {ref.uid}:{ref.gid} "
                f"{directory}, then remove what is left)") from None
    directory.rmdir()


def _raise(exc: OSError) -> None:
    raise exc


def _alias_of(base: Path, name: str) -> str | None:
    """The real domain when `name`'s `+NAME-` line names another (vaddaliasdomain)."""
    try:
        assignment = load_assign(base).wildcard(name + "-")
    except AssignError as exc:
        raise AdminError(str(exc)) from None
    user = ascii_lower(assignment.user) if assignment is not None else name
    return user if user != name else None


def _remove_domain_names(control: Path, names: set[str]) -> None:
    """Take domain names out of virtualdomains, rcpthosts and morercpthosts (+ its cdb)."""
    _remove_lines(control / "virtualdomains", lambda x: ascii_lower(x.split(":", 1)[0]) in names)
    _remove_lines(control / "rcpthosts", lambda x: ascii_lower(x) in names)
    if _remove_lines(control / "morercpthosts", lambda x: ascii_lower(x) in names):
        newmrh(control)


def add_alias_domain(root: os.PathLike | str, alias: str, domain: str) -> tuple[DomainRef, str]:
    """vaddaliasdomain: ALIAS reaches DOMAIN's mailboxes (`+ALIAS-:DOMAIN:UID:GID:DIR:-::`,
    virtualdomains `ALIAS:ALIAS`, rcpthosts); no directory of its own. Returns
    the alias and the real domain (DOMAIN's, when DOMAIN is an alias itself)."""
    base = check_root(root)
    name = _new_domain_name(alias)
    ref = find_domain(base, domain)
    real = _alias_of(base, ref.name) or ref.name      # an alias of an alias is one of the real one
    with file_lock(base / "users" / "assign.lock"):
        lines = _unused_domain_lines(base, name)
        line = AssignLine(True, f"{name}-", real, str(ref.uid), str(ref.gid), str(ref.directory),
                          "-", "")
        _add_domain_lines(base, name, lines + [line.text()])
    return DomainRef(name, ref.directory, ref.uid, ref.gid), real


@dataclass(frozen=True, slots=True)
class DomainInfo:
    name: str
    directory: str
    uid: int
    gid: int
    alias_of: str | None    # the real domain when this is an alias domain (vaddaliasdomain)


def list_domains(root: os.PathLike | str) -> list[DomainInfo]:
    """Every vpopmail domain (a users/assign `+NAME-` line whose home has a vpasswd)."""
    base = check_root(root)
    try:
        table = load_assign(base)
    except AssignError as exc:
        raise AdminError(str(exc)) from None
    out = []
    for prefix, a in sorted(table.wildcards().items()):
        if not prefix.endswith("-") or not prefix[:-1]:
            continue
        d = Path(a.home)
        if not ((d / VPASSWD).exists() or (d / VPASSWD_CDB).exists()):
            continue
        name = prefix[:-1]
        out.append(DomainInfo(name, a.home, a.uid, a.gid, None if a.user == name else a.user))
    return out


def set_catchall(root: os.PathLike | str, domain: str, target: str) -> str:
    """DOMDIR/.qmail-default for unknown users: `bounce`, `delete` or an address."""
    base = check_root(root)
    ref = find_domain(base, domain)
    if target == "bounce":
        argument = "bounce-no-mailbox"
    elif target == "delete":
        argument = "delete"
    elif _CATCHALL_TARGET.match(target) and not target.startswith("-"):
        argument = target
    else:
        raise AdminError(f"{target!r}: give an address (user@domain, letters, digits and "
                         f"._+=%- only: the shell reads this line), `bounce` or `delete`")
    line = qmail_default_line(argument)
    with _in_tree(ref):
        atomic_write(ref.directory / ".qmail-default", line.encode("utf-8"), mode=SECRET_MODE,
                     owner=ref.owner)
    return line.rstrip("\n")


# -- users -----------------------------------------------------------------
def _make_maildir(user_dir: Path | str, owner: tuple[int, int]) -> None:
    """USER/ and USER/Maildir/{cur,new,tmp}, mode 0700, owned by the domain (str paths: an
    import makes 50,000 of these)."""
    base = os.fspath(user_dir)
    maildir = base + "/Maildir"
    for d in (base, maildir, maildir + "/cur", maildir + "/new", maildir + "/tmp"):
        make_dir(d, DIR_MODE, owner)


def _user_dir(ref: DomainRef, index: int, name: str) -> Path:
    """Where the index-th user of a domain goes (hash directories past 99 users, as bigdir.c)."""
    sub = hash_subdir(index)
    return ref.directory / sub / name if sub else ref.directory / name


def _make_hash_dirs(ref: DomainRef, user_dir: Path, made: set[str] | None = None) -> None:
    """The hash directories between the domain directory and user_dir."""
    parent = user_dir.parent
    chain = []
    while parent != ref.directory and ref.directory in parent.parents:
        chain.append(parent)
        parent = parent.parent
    for d in reversed(chain):
        key = os.fspath(d)
        if made is None or key not in made:
            make_dir(key, DIR_MODE, ref.owner)
            if made is not None:
                made.add(key)


def _check_password(password: str, limit: int) -> None:
    """`limit`: [auth] max_password_bytes (a longer password could never log in)."""
    if not password:
        raise AdminError("empty password")
    if "\0" in password or "\n" in password:
        raise AdminError("a password cannot contain NUL or newline characters")
    if len(password.encode("utf-8", "surrogateescape")) > limit:
        raise AdminError(f"a password is at most {limit} bytes ([auth] max_password_bytes): "
                         "a longer one could never log in")


def _clear_field(password: str, keep: bool) -> str | None:
    if not keep:
        return None
    if ":" in password:
        # the 8th field is the rest of the line; vpopmail itself splits on ':'
        raise AdminError("with keep_cleartext a password cannot contain ':' (vpasswd's separator)")
    return password


def _quota(quota: str | None) -> str:
    if quota is None:
        return "NOQUOTA"
    try:
        return normalize_quota(quota)
    except QuotaError as exc:
        raise AdminError(str(exc)) from None


def _default_quota(ref: DomainRef) -> str:
    """vadduser's quota for a user added without one: the domain limits'
    default_quota / default_maxmsgcount (engine.accounts.limits), else NOQUOTA."""
    limits = _domain_limits(ref)
    return format_quota(limits.default_quota or None, limits.default_maxmsgcount or None)


def _domain_limits(ref: DomainRef) -> Limits:
    try:
        return read_limits(str(ref.directory))
    except OSError as exc:
        raise AdminError(f"{ref.directory}: cannot read the domain limits: {exc.strerror}") from None


def add_user(root: os.PathLike | str, address: str, password: str, *, quota: str | None = None,
             gecos: str | None = None) -> VUser:
    """vadduser: Maildir, vpasswd line (uid 1, gid 0, quota), vpasswd.cdb."""
    base = check_root(root)
    local, domain = split_address(address)
    name = _check_user(local, address)
    settings = _settings(base)
    _check_password(password, settings.auth.max_password_bytes)
    quota_field = _quota(quota)
    keep = settings.accounts.keep_cleartext
    clear = _clear_field(password, keep)
    ref = find_domain(base, domain)
    if quota is None:
        quota_field = _default_quota(ref)
    gecos_text = (gecos if gecos is not None else name).replace(":", "").replace("\n", " ")[:48]
    crypted = passwords.hash_password(password)
    with _in_tree(ref), file_lock(ref.directory / VPASSWD_LOCK, ref.owner):
        users = read_users(ref.directory)
        if any(ascii_lower(u.name) == name for u in users):
            raise AdminError(f"{name}@{domain}: user exists")
        user_dir = _user_dir(ref, len(users), name)
        if user_dir.exists():
            raise AdminError(f"{user_dir}: exists but is not in vpasswd; remove it first")
        _make_hash_dirs(ref, user_dir)
        try:
            _make_maildir(user_dir, ref.owner)
            user = VUser(name, crypted, 1, 0, gecos_text, str(user_dir), quota_field, clear)
            write_users(ref, users + [user])
        except OSError:
            _remove_unlisted(ref, [(name, user_dir)])
            raise
    return user


def _remove_unlisted(ref: DomainRef, made: list[tuple[str, Path]]) -> None:
    """After a failed add (a full disk): remove the (name, directory) trees just
    made whose name vpasswd does not hold, so the retry does not refuse them
    as leftovers. Best effort: the error being raised is what the operator hears."""
    with contextlib.suppress(OSError, AdminError):
        listed = {ascii_lower(u.name) for u in read_users(ref.directory)}
        for name, user_dir in made:
            if name not in listed:
                shutil.rmtree(user_dir, ignore_errors=True)


def find_user(root: os.PathLike | str, address: str) -> tuple[Path, DomainRef, str]:
    base = check_root(root)
    local, domain = split_address(address)
    return base, find_domain(base, domain), ascii_lower(local)


def real_address(root: os.PathLike | str, address: str) -> str:
    """`user@domain` lower-cased, an alias domain replaced by its real one
    (vget_assign): the one spelling of a mailbox's addresses."""
    local, _, domain = ascii_lower(address).rpartition("@")
    return f"{local}@{_alias_of(Path(root), domain) or domain}"


def delete_user(root: os.PathLike | str, address: str) -> VUser:
    """vdeluser: the vpasswd line and the user's directory tree."""
    base, ref, name = find_user(root, address)
    default = parse_qmail_default(_read_text(ref.directory / ".qmail-default"))
    # The catch-all's address and the user's, each through its real domain
    # (vget_assign): joe@ALIAS and Joe@REAL are the same mailbox.
    catchall = default.argument.rstrip("/") if default.vdelivermail else None
    if catchall and "@" in catchall and not catchall.startswith("/"):
        catchall = real_address(base, catchall)
    real = _alias_of(base, ref.name) or ref.name
    with _in_tree(ref):
        return _delete_user(ref, name, catchall, real)


def _delete_user(ref: DomainRef, name: str, catchall: str | None, real: str) -> VUser:
    with file_lock(ref.directory / VPASSWD_LOCK, ref.owner):
        users = read_users(ref.directory)
        user = next((u for u in users if ascii_lower(u.name) == name), None)
        if user is None:
            raise AdminError(f"{name}@{ref.name}: no such user")
        if catchall and catchall in (user.directory.rstrip("/"), f"{name}@{real}"):
            raise AdminError(f"{name}@{ref.name}: is the domain's catch-all; change it first "
                             f"(qrelay domain catchall)")
        # every line with the name, as auth_deluser: a second one would be the user again
        write_users(ref, [u for u in users if ascii_lower(u.name) != name])
        user_dir = Path(user.directory)
        # Only ever remove a tree inside the domain directory, whatever vpasswd says.
        if not (user.directory and user_dir.is_dir()
                and ref.directory.resolve() in user_dir.resolve().parents):
            return user
        # Out of deliveries' way first: one still in flight (or reading a
        # vpasswd up to a second old) finds no directory and asks vpasswd
        # again, instead of writing into a tree being removed (a message that
        # vanishes with it, or an rmtree that fails half done).
        doomed = user_dir.with_name(f".{user_dir.name}.deleted.{os.getpid()}")
        os.rename(user_dir, doomed)
    shutil.rmtree(doomed)
    return user


def set_password(root: os.PathLike | str, address: str, password: str) -> VUser:
    """vpasswd: field 2 (and field 8 per keep_cleartext; a stale cleartext is never kept).

    The administrator may change any password: NO_PASSWD_CHNG is about users
    changing their own (qmailadmin, webmail), which is not this command.
    """
    base, ref, name = find_user(root, address)
    settings = _settings(base)
    _check_password(password, settings.auth.max_password_bytes)
    clear = _clear_field(password, settings.accounts.keep_cleartext)
    crypted = passwords.hash_password(password)
    return _update_users(ref, name, lambda u: replace(u, crypted=crypted, clear=clear))[0]


def _update_users(ref: DomainRef, name: str | None, change) -> list[VUser]:
    """Rewrite the vpasswd line of user `name` (None: of every user) as
    change(old), under the domain's lock; the new lines."""
    with _in_tree(ref), file_lock(ref.directory / VPASSWD_LOCK, ref.owner):
        users = read_users(ref.directory)
        changed = []
        for i, u in enumerate(users):
            if name is None or ascii_lower(u.name) == name:
                users[i] = change(u)
                changed.append(users[i])
        if name is not None and not changed:
            raise AdminError(f"{name}@{ref.name}: no such user")
        if changed:
            write_users(ref, users)
    return changed


def set_quota(root: os.PathLike | str, address: str, quota: str) -> VUser:
    """vsetuserquota: field 7, then Maildir/maildirsize deleted and, unless the
    quota is NOQUOTA, rebuilt from the messages there (vdelivermail's next
    check would rebuild it too; doing it now makes `user show` right at once)."""
    from engine.delivery.local import quota as maildirquota
    _, ref, name = find_user(root, address)
    field_7 = _quota(quota)
    user = _update_users(ref, name, lambda u: replace(u, quota=field_7))[0]
    if not user.directory:
        return user             # no directory yet (vdelivermail makes it): no maildirsize
    maildir = Path(user.directory) / "Maildir"
    with _in_tree(ref):         # made as the owner, whose deliveries append to it
        (maildir / "maildirsize").unlink(missing_ok=True)
        limit = maildirquota.parse_quota(field_7)
        if limit is not None and maildir.is_dir():
            maildirquota.rebuild(str(maildir), limit)
    return user


# vmoduser's flags that qrelay acts on, by the name `qrelay user mod` gives them.
MOD_FLAGS = {"no-passwd-change": NO_PASSWD_CHNG, "no-pop": NO_POP, "no-imap": NO_IMAP,
             "no-webmail": NO_WEBMAIL, "no-smtp": NO_SMTP, "bounce-mail": BOUNCE_MAIL,
             "no-relay": NO_RELAY}


def set_flags(root: os.PathLike | str, target: str, *, on: int = 0, off: int = 0,
              clear: bool = False) -> list[VUser]:
    """vmoduser: the gid flag bits of TARGET, one address or (a domain) all its
    users: `clear` (-x) first, then `on` set and `off` cleared."""
    base = check_root(root)
    if "@" in target:
        _, ref, name = find_user(base, target)
    else:
        ref, name = find_domain(base, target), None

    def change(u: VUser) -> VUser:
        gid = 0 if clear else u.gid
        return replace(u, gid=(gid | on) & ~off)
    return _update_users(ref, name, change)


def list_users(root: os.PathLike | str, domain: str) -> list[VUser]:
    base = check_root(root)
    ref = find_domain(base, domain)
    return sorted(read_users(ref.directory), key=lambda u: u.name)


@dataclass(frozen=True, slots=True)
class UserReport:
    address: str
    user: VUser
    maildir: str
    usage_bytes: int
    usage_count: int
    usage_source: str      # "maildirsize" or "walk"
    scheme: str | None     # password scheme, None when unknown/empty
    limits: Limits = NO_LIMITS   # the domain's (their flags count at login unless V_OVERRIDE)


def maildir_usage(maildir: Path) -> tuple[int, int, str]:
    """(bytes, messages, source): maildirsize's sum when present, else what a
    rebuild of it would count (vdelivermail's scan: every folder but .Trash,
    no trashed message)."""
    from engine.delivery.local import quota as maildirquota
    got = read_whole(maildir / "maildirsize")
    if got is not None:
        size = count = 0
        for line in got[0].decode("ascii", "replace").split("\n")[1:]:
            parts = line.split()
            if len(parts) >= 2:
                try:
                    size += int(parts[0])
                    count += int(parts[1])
                except ValueError:
                    continue
        return size, count, "maildirsize"
    usage, _ = maildirquota.scan(str(maildir))
    return usage.bytes, usage.count, "walk"


def show_user(root: os.PathLike | str, address: str) -> UserReport:
    _, ref, name = find_user(root, address)
    user = next((u for u in read_users(ref.directory) if ascii_lower(u.name) == name), None)
    if user is None:
        raise AdminError(f"{name}@{ref.name}: no such user")
    # An empty dir field is no directory yet, not the current one.
    size, count, source = (maildir_usage(Path(user.directory) / "Maildir") if user.directory
                           else (0, 0, "walk"))
    return UserReport(f"{user.name}@{ref.name}", user, user.maildir, size, count, source,
                      passwords.scheme(user.crypted), _domain_limits(ref))


@dataclass(slots=True)
class ImportReport:
    added: int = 0
    domains: int = 0
    workers: int = 0
    per_domain: dict = field(default_factory=dict)


def _hash_chunk(pws: list[str]) -> list[str]:
    return [passwords.hash_password(p) for p in pws]


class PasswordHasher:
    """Hash many passwords on every core while the caller does other work.

    libxcrypt releases the GIL, so threads run in parallel (and beside the
    caller's mkdir calls); with the pure-Python libpass backend processes are
    used instead. `results()` waits and returns the hashes in input order.
    """

    def __init__(self, pws: list[str], workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._pool = None
        if len(pws) < 64 or self.workers == 1:
            self.workers = 1
            self._done = _hash_chunk(pws)
            self._futures = []
            return
        size = max(1, len(pws) // (self.workers * 8))
        pool_cls = ThreadPoolExecutor if passwords.backend() == "libxcrypt" else ProcessPoolExecutor
        self._pool = pool_cls(max_workers=self.workers)
        self._futures = [self._pool.submit(_hash_chunk, pws[i:i + size]) for i in range(0, len(pws), size)]
        self._done = []

    def results(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """The hashes; `progress(n)` hears how many are done while it waits."""
        if self._pool is not None:
            try:
                for f in self._futures:
                    self._done.extend(f.result())
                    if progress is not None:
                        progress(len(self._done))
            finally:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
        return self._done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def hash_many(pws: list[str], workers: int | None = None) -> tuple[list[str], int]:
    hasher = PasswordHasher(pws, workers)
    return hasher.results(), hasher.workers


def import_users(root: os.PathLike | str, lines: Iterable[str], *, source: str = "-",
                 workers: int | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> ImportReport:
    """Bulk vadduser from `address:password[:quota]` lines (blank and `#` lines skipped).

    Every line is checked before anything is written; the first bad one is the
    error (with its line number and how many more are bad). Passwords are then
    hashed on all cores while the Maildirs are made, and each domain's vpasswd
    is written once. A password cannot contain `:` here (as with chpasswd).
    `progress(what, done, total)` hears how far each step is.
    """
    tell = progress or (lambda what, done, total: None)
    base = check_root(root)
    settings = _settings(base)
    keep = settings.accounts.keep_cleartext
    limit = settings.auth.max_password_bytes
    refs: dict[str, DomainRef] = {}
    existing: dict[str, set[str]] = {}
    defaults: dict[str, str] = {}       # each domain's default quota
    wanted: dict[str, list[tuple[str, str, str]]] = {}
    seen: set[tuple[str, str]] = set()
    errors: list[str] = []
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            address, sep, rest = line.partition(":")
            if not sep:
                raise AdminError("expected address:password[:quota]")
            password, _, quota = rest.partition(":")
            local, domain = split_address(address)
            name = _check_user(local, address)
            _check_password(password, limit)
            _clear_field(password, keep)
            if domain not in refs:
                refs[domain] = find_domain(base, domain)
                existing[domain] = {ascii_lower(u.name) for u in read_users(refs[domain].directory)}
                defaults[domain] = _default_quota(refs[domain])
            quota_field = _quota(quota) if quota else defaults[domain]
            if name in existing[domain]:
                raise AdminError(f"{name}@{domain}: user exists")
            if (domain, name) in seen:
                raise AdminError(f"{name}@{domain}: listed twice")
            seen.add((domain, name))
            wanted.setdefault(domain, []).append((name, password, quota_field))
        except AdminError as exc:
            errors.append(f"{source}:{n}: {exc}")
    if errors:
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise AdminError(errors[0] + more)
    report = ImportReport()
    hasher = PasswordHasher([pw for entries in wanted.values() for _, pw, _ in entries], workers)
    report.workers = hasher.workers
    try:
        with contextlib.ExitStack() as locks:
            planned: dict[str, tuple[list[VUser], list[tuple[str, str, str, Path]]]] = {}
            leftovers: list[Path] = []
            for domain in sorted(wanted):  # one order for every importer: no lock cycles
                ref = refs[domain]
                with _in_tree(ref):
                    locks.enter_context(file_lock(ref.directory / VPASSWD_LOCK, ref.owner))
                users = read_users(ref.directory)
                names = {ascii_lower(u.name) for u in users}
                dirs = []
                for i, (name, password, quota_field) in enumerate(wanted[domain]):
                    if name in names:
                        raise AdminError(f"{name}@{domain}: user exists (added meanwhile); nothing written")
                    user_dir = _user_dir(ref, len(users) + i, name)
                    if os.path.lexists(user_dir):  # a leftover tree must not hand old mail to a new user
                        leftovers.append(user_dir)
                    dirs.append((name, password, quota_field, user_dir))
                planned[domain] = (users, dirs)
            if leftovers:
                # All of them at once: an import killed part way leaves thousands,
                # and naming one per run would take as many runs to find them.
                more = f" (and {len(leftovers) - 1} more)" if len(leftovers) > 1 else ""
                raise AdminError(f"{leftovers[0]}{more}: exists but is not in vpasswd; remove "
                                 f"{'them' if more else 'it'} first; nothing written")
            total = len(seen)
            n = 0
            maildirs: dict[str, list[tuple[str, Path]]] = {}  # made, per domain not yet written
            try:
                for domain, (_, dirs) in planned.items():
                    made: set[str] = set()
                    with _in_tree(refs[domain]):
                        for name, _, _, user_dir in dirs:
                            _make_hash_dirs(refs[domain], user_dir, made)
                            maildirs.setdefault(domain, []).append((name, user_dir))
                            _make_maildir(user_dir, refs[domain].owner)
                            n += 1
                            tell("Maildirs made", n, total)
                hashes = iter(hasher.results(lambda done: tell("passwords hashed", done, total)))
                crypted = {domain: [next(hashes) for _ in wanted[domain]] for domain in wanted}
                for k, domain in enumerate(sorted(wanted)):
                    tell("domains' vpasswd written", k, len(wanted))
                    users, dirs = planned[domain]
                    new = [VUser(name, h, 1, 0, name, str(user_dir), quota_field,
                                 password if keep else None)
                           for (name, password, quota_field, user_dir), h in zip(dirs, crypted[domain])]
                    with _in_tree(refs[domain]):
                        write_users(refs[domain], users + new)
                    del maildirs[domain]
                    report.per_domain[domain] = len(new)
                    report.added += len(new)
            except OSError:
                # A full disk part way: the Maildirs of the users not written
                # would make the retry refuse them all as leftovers.
                for domain, made_dirs in maildirs.items():
                    with _in_tree(refs[domain]):
                        _remove_unlisted(refs[domain], made_dirs)
                raise
    finally:
        hasher.close()
    report.domains = len(wanted)
    return report


# -- aliases ---------------------------------------------------------------
def _alias_path(ref: DomainRef, local: str, address: str) -> Path:
    name = ascii_lower(local)
    if not name or not re.match(r"^[!#$&'*+\-.0-9=?A-Z^_`a-z{|}~]+$", name) or name.startswith("."):
        raise AdminError(f"{address}: bad alias name")
    if name == "default":
        raise AdminError(f"{address}: the domain's catch-all is set with `qrelay domain catchall`")
    return ref.directory / f".qmail-{safe_ext(name)}"


def add_alias(root: os.PathLike | str, address: str, targets: Iterable[str]) -> tuple[Path, list[str]]:
    """valias -i: `&TARGET` lines in DOMDIR/.qmail-LOCAL (existing lines kept, duplicates skipped)."""
    base = check_root(root)
    local, domain = split_address(address)
    ref = find_domain(base, domain)
    path = _alias_path(ref, local, address)
    targets = list(targets)
    if not targets:
        raise AdminError("give at least one target address")
    for t in targets:
        if not _TARGET.match(t) or t.startswith(("|", "/", ".", "&", "#", "+")):
            raise AdminError(f"{t!r}: a target must be an address (user@domain)")
    with _in_tree(ref), file_lock(ref.directory / VPASSWD_LOCK, ref.owner):
        lines = [line for line in _read_text(path).split("\n") if line]
        for t in targets:
            if f"&{t}" not in lines:
                lines.append(f"&{t}")
        atomic_write(path, "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"),
                     mode=SECRET_MODE, owner=ref.owner)
    return path, lines


def delete_alias(root: os.PathLike | str, address: str) -> Path:
    base = check_root(root)
    local, domain = split_address(address)
    ref = find_domain(base, domain)
    path = _alias_path(ref, local, address)
    try:
        with _in_tree(ref):
            os.unlink(path)
    except FileNotFoundError:
        raise AdminError(f"{address}: no such alias") from None
    return path


def list_aliases(root: os.PathLike | str, domain: str) -> list[tuple[str, list[str]]]:
    """(alias address, lines) for every `.qmail-NAME` of the domain but `.qmail-default`."""
    base = check_root(root)
    ref = find_domain(base, domain)
    out = []
    for entry in sorted(os.scandir(ref.directory), key=lambda e: e.name):
        if not entry.name.startswith(".qmail-") or entry.name == ".qmail-default" or not entry.is_file():
            continue
        name = entry.name[len(".qmail-"):].replace(":", ".")
        lines = [line for line in _read_text(Path(entry.path)).split("\n") if line]
        out.append((f"{name}@{ref.name}", lines))
    return out
