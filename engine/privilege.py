"""Who qrelay's processes run as: root only where it must be.

qmail runs qmail-smtpd as qmaild and qmail-remote as qmailr; qrelay has one
unprivileged identity, `[run] user` (default `qrelay`, a system user that
`qrelay init` creates when run as root). Started as root, `qrelay run`
binds its ports, gives the spool and the log directories to that user, and
every child that reads what the network sends or talks to remote hosts —
receivers, the spool writer, the scheduler and its remote delivery workers —
becomes that user before it opens anything. The supervisor keeps root to
bind and to restart its children; so does the local spawner (engine.delivery.
lspawn's service), which accepts nothing but delivery jobs from the scheduler
and runs each one as its mailbox owner, never as root.

Not started as root, nothing changes: every process is the user who started it.
"""
from __future__ import annotations

import errno
import grp
import os
import pwd
import shlex
import shutil
import stat
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "qrelay"
# What the run user owns under ROOT (everything else stays root's: control/,
# users/, the domains' trees belong to their mailbox owners): the spool, the
# logs, the embedded relay table (engine.relay.RELAY_DIR), run/ (the metrics'
# multiprocess files, engine.metrics.METRICS_DIR).
OWNED_DIRS = ("queue", "log", "relay", "run")


class PrivilegeError(Exception):
    """The run user is missing or cannot be become / cannot reach ROOT."""


@dataclass(slots=True, frozen=True)
class RunUser:
    name: str
    uid: int
    gid: int

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid


def run_user(name: str, create_default: bool = False) -> RunUser | None:
    """The user to become, or None when there is nothing to drop (not root, or
    `[run] user` set to the empty string by an operator who wants root).
    `create_default`: the default user (`qrelay`) is created when missing."""
    if os.geteuid() != 0 or not name:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if create_default and name == DEFAULT_USER:
            return ensure_system_user(name)
        raise PrivilegeError(
            f"[run] user {name!r} does not exist: create it (`qrelay init` as root creates "
            f"{DEFAULT_USER!r}; or useradd --system {name}), or name another in qrelay.toml"
        ) from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"[run] user {name!r} is root: name an unprivileged user")
    return RunUser(name, entry.pw_uid, entry.pw_gid)


def become(user: RunUser | None) -> None:
    """Drop to `user` for good, and give up gaining privileges by exec
    (PR_SET_NO_NEW_PRIVS): what parses the network never runs a set-uid
    program with more rights than the run user. None: nothing to do."""
    if user is not None:
        drop_to(user.uid, user.gid)
        no_new_privileges()


def no_new_privileges() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): this process and what it execs never gain
    privileges from a set-uid or set-gid file or file capabilities. For good,
    inherited by children; a kernel without it (before 3.5) is left as it is."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)      # PR_SET_NO_NEW_PRIVS


def drop_to(uid: int, gid: int) -> None:
    """Become uid/gid for good (no supplementary groups); refuses root, as
    qmail-lspawn does. Every change of user in qrelay goes through here."""
    if uid == 0:
        raise PermissionError("refusing to run as root")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


@contextmanager
def acting_as(uid: int, gid: int):
    """For the duration, act as uid/gid (effective ids, no supplementary
    groups), then be root again. For a root tool (qstat, qrelay hold, doctor,
    relayclients, a delivery worker before it drops for good) that opens
    files another user owns: root following a link that user swapped in
    (lock.mdb -> /etc/shadow) would write wherever it points; that user
    cannot make itself write anywhere it could not already. The real and saved
    ids stay root, so the process is no more that user's to signal or trace.
    Not root, or uid 0: nothing changes."""
    if os.geteuid() != 0 or uid == 0:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups([])
    os.setegid(gid)
    try:
        os.seteuid(uid)
        try:
            yield
        finally:
            os.seteuid(0)
    finally:
        os.setegid(egid)
        os.setgroups(groups)


def acting_as_owner(path: Path | str):
    """acting_as the owner of `path` (a directory the run user owns: queue/,
    relay/); nothing changes when it is missing or root's."""
    try:
        st = os.stat(path)
    except OSError:
        return acting_as(0, 0)
    return acting_as(st.st_uid, st.st_gid)


class NotRegularFile(OSError):
    """What open_own_file found is a link or a special file."""


def open_own_file(path: Path | str, flags: int, mode: int = 0o600) -> int:
    """Open (with O_CREAT in `flags`, create) a file as root may in a directory
    the run user owns: no link is followed, and only a regular file with one
    link is kept, so a symlink, a hard link or a FIFO put in its place never
    makes root write to, truncate or chown another file, or block.
    NotRegularFile otherwise; any other OSError as os.open raises it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(errno.ELOOP, "a symbolic link", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise NotRegularFile(errno.EPERM, "not a regular file of its own (a link or a "
                                 "special file)", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def give_tree(root: Path, user: RunUser) -> None:
    """OWNED_DIRS of ROOT (and everything in them) to `user`: a root that
    ran as root before, or files a root tool created meanwhile (`qrelay
    relayclients add` before the first start), work after the switch. A walk
    of a few thousand entries at most (segments, not one file per message).

    Root walks a tree the run user may have changed: fwalk follows no symlink,
    even one swapped in for a directory during the walk, and a file with
    other hard links (one the run user linked in from elsewhere, where
    fs.protected_hardlinks is off) is left as it is. ROOT/NAME itself may be
    a link root made (a queue moved to another disk, as qmail boxes do): the
    tree it leads to is handed over; a link anyone else owns is refused."""
    for name in OWNED_DIRS:
        top = root / name
        try:
            top.mkdir(mode=0o755, exist_ok=True)
        except FileExistsError:     # a file (or a dangling link) where the directory goes
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(top)) from None
        if top.is_symlink():
            owner = top.lstat().st_uid
            if owner != 0:
                raise PrivilegeError(f"{top} is a link owned by uid {owner}, not root: make it "
                                     f"a directory, or a link of root's (ln -sfn DIR {top})")
            top = top.resolve(strict=True)   # fwalk follows no link, not even its top
            blocked = _unreachable_parent(top.parent, user)
            if blocked is not None:
                raise PrivilegeError(f"[run] user {user.name!r} cannot reach {top} ({root / name} "
                                     f"leads there): {blocked} is not searchable by it "
                                     f"(chmod o+x {blocked})")
        for _, _, filenames, dirfd in os.fwalk(top):
            for entry in [".", *filenames]:
                st = os.stat(entry, dir_fd=dirfd, follow_symlinks=False)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    continue
                if (st.st_uid, st.st_gid) != user.owner:
                    os.chown(entry, user.uid, user.gid, dir_fd=dirfd, follow_symlinks=False)


def check_reachable(root: Path, user: RunUser) -> None:
    """Refuse to start when `user` could not reach ROOT (a parent directory
    not searchable by others): every child would fail on its first file."""
    blocked = _unreachable_parent(root.resolve(), user)
    if blocked is not None:
        raise PrivilegeError(
            f"[run] user {user.name!r} cannot reach {root}: {blocked} is not searchable "
            f"by it (chmod o+x {blocked}, or put ROOT elsewhere)")


def check_installation(user: RunUser) -> None:
    """Refuse to start when `user` could not read qrelay's own files: the
    interpreter's library, the installed packages, the engine. Services import
    modules after they change users (lazily, as code paths are first taken);
    a Python under /root (pyenv) would make each such import fail later."""
    import sysconfig

    import engine
    paths = sysconfig.get_paths()
    for where in (paths["stdlib"], paths["purelib"], os.path.dirname(engine.__file__)):
        blocked = _unreachable_parent(Path(where).resolve(), user)
        if blocked is not None:
            raise PrivilegeError(
                f"[run] user {user.name!r} cannot read qrelay's installation ({where}): "
                f"{blocked} is not searchable by it; install qrelay where every user can "
                f"read it (a system python3, /usr/local or /opt), or set [run] user")


def _unreachable_parent(path: Path, user: RunUser) -> Path | None:
    for directory in [*reversed(path.parents), path]:
        if not _allowed(directory.stat(), user, 0o1):
            return directory
    return None


def _allowed(st: os.stat_result, user: RunUser, what: int) -> bool:
    """Do the mode bits give `user` `what` (4 read, 2 write, 1 search/exec)?"""
    if st.st_uid == user.uid:
        return bool(st.st_mode & (what << 6))
    if st.st_gid == user.gid:
        return bool(st.st_mode & (what << 3))
    return bool(st.st_mode & what)


def check_readable(path: Path, user: RunUser) -> None:
    """Refuse to start when a file the run user's processes read (the TLS
    certificate) exists but is not readable by `user`."""
    fix = readable_fix(path, user)
    if fix:
        raise PrivilegeError(f"[run] user {user.name!r} cannot read {path}: {fix}")


def readable_fix(path: Path, user: RunUser) -> str | None:
    """The command that lets `user` read `path`; None when it can (or path is missing)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if _allowed(st, user, 0o4):
        return None
    try:
        group = grp.getgrgid(user.gid).gr_name     # nobody's is nogroup on Debian
    except KeyError:
        group = str(user.gid)
    where = shlex.quote(str(path))
    return f"chgrp {group} {where} && chmod 640 {where}"


def ensure_system_user(name: str = DEFAULT_USER, home: str = "/nonexistent") -> RunUser:
    """The system user `name` (created with useradd when missing: no login
    shell, no home directory). Root only."""
    try:
        entry = pwd.getpwnam(name)
        return RunUser(name, entry.pw_uid, entry.pw_gid)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = shutil.which("nologin") or "/usr/sbin/nologin"
    try:
        group_missing = not _group_exists(name)
        argv = [useradd, "--system", "--no-create-home", "--home-dir", home,
                "--shell", nologin, "--comment", "qrelay mail transfer agent"]
        argv += ["--user-group"] if group_missing else ["--gid", name]
        done = subprocess.run([*argv, name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrivilegeError(f"cannot create the system user {name!r}: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise PrivilegeError(f"cannot create the system user {name!r}: "
                             f"{why[-1] if why else f'useradd exited {done.returncode}'}")
    entry = pwd.getpwnam(name)
    return RunUser(name, entry.pw_uid, entry.pw_gid)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def foreign_domains(root: Path, user: RunUser) -> list[tuple[str, int]]:
    """The vpopmail domains (users/assign `+` lines with a vpasswd) that belong
    to another uid than `user`: the receivers, running as `user`, cannot read
    their vpasswd, so RCPT checks, SMTP AUTH and POP3 for them fail (temporarily).
    Local delivery to them still works (the local spawner runs as the owner)."""
    from engine.accounts.admin import AdminError, list_domains
    try:
        domains = list_domains(root)
    except (AdminError, OSError):
        return []           # check_services reports a broken users/assign
    return [(d.name, d.uid) for d in domains if d.uid != user.uid]
