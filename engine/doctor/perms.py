"""Owners and modes of what local delivery touches, by qmail-local's rules.

For every users/assign entry: its home must exist, must not be writable by
others (`Uh-oh: home directory is writable. (#4.7.0)`: every delivery to it
defers) nor sticky, and should belong to the entry's uid/gid (deliveries run
as them). Its `.qmail*` files must not be writable by others (`Uh-oh: .qmail
file is writable. (#4.7.0)`). For a vpopmail domain home, every user of its
vpasswd: the user directory and `Maildir/{cur,new,tmp}` exist, belong to
the domain's uid/gid and are not writable by others. The fix offered is
the guide's chown/chmod; when many paths of one domain share a problem, one
line with `chown -R` / `chmod -R` on the domain directory is offered.
Last, the vpopmail domains whose vpasswd `[run] user` cannot read: the
receivers run as it, and RCPT checks, AUTH and POP3 for those domains defer.
"""
from __future__ import annotations

import os
import shlex
import stat
from collections import defaultdict
from pathlib import Path

from engine.doctor import Context, Report

WRITABLE_HOME = "Uh-oh: home directory is writable. (#4.7.0)"
WRITABLE_QMAIL = "Uh-oh: .qmail file is writable. (#4.7.0)"


def _entries(root: Path):
    """(label, Assignment) of every users/assign entry (the text when present, as
    an operator reads it; else the compiled table's wildcard lines)."""
    from engine.accounts.assign import ASSIGN_FILE, Assignment, load_assign, parse_assign_text
    path = root / ASSIGN_FILE
    if path.is_file():
        for line in parse_assign_text(path.read_text("utf-8", "surrogateescape")):
            yield line.text(), Assignment(line.user, _number(line.uid), _number(line.gid),
                                          line.home, line.dash, line.ext)
        return
    for prefix, a in load_assign(root).wildcards().items():
        yield f"+{prefix}:{a.user}:{a.uid}:{a.gid}:{a.home}:{a.dash}:{a.ext}:", a


def _vpopmail_domain(label: str, a) -> bool:
    """vadddomain's assign line: `+DOMAIN-:DOMAIN:uid:gid:.../DOMAIN:-::` (an
    alias domain's names the real one as user, and its directory)."""
    return (label.startswith("+") and a.dash == "-" and "." in a.user
            and os.path.basename(os.path.normpath(a.home)) == a.user)


def _stale_aliases(entries, home: str) -> list[tuple[str, str, str | None]]:
    """(alias, real domain, the real domain's home or None when it has no
    `+REAL-` line) of the alias domains (vaddaliasdomain's `+ALIAS-:REAL:…`
    lines) with this home whose real domain is not there; [] when it is."""
    homes = {label[1:].split(":", 1)[0]: a.home for label, a in entries if label.startswith("+")}
    out = []
    for label, a in entries:
        name = label[1:].split(":", 1)[0][:-1] if label.startswith("+") else ""
        if a.home != home or not _vpopmail_domain(label, a) or name == a.user:
            continue
        there = homes.get(f"{a.user}-")
        if there == home:
            return []
        out.append((name, a.user, there))
    return out


def _number(text: str) -> int:
    digits = text[:len(text) - len(text.lstrip("0123456789"))]
    return int(digits) if digits else 0


class _Kinds:
    """Problems grouped by (domain home, kind), so one domain with 10,000
    wrongly owned Maildirs is a few lines, not 10,000."""

    def __init__(self, ctx: Context, report: Report) -> None:
        self.ctx, self.report = ctx, report
        self.groups: dict[tuple[str, str], list[tuple[str, str, str]]] = defaultdict(list)

    def add(self, home: str, kind: str, what: str, why: str, fix: str) -> None:
        self.groups[(home, kind)].append((what, why, fix))

    def emit(self, owner_of: dict[str, str]) -> None:
        limit = self.ctx.doctor.max_findings_per_kind
        for (home, kind), items in self.groups.items():
            if len(items) <= limit:
                for what, why, fix in items:
                    self.report.problem("perms", what, why, fix)
                continue
            whole = {"owner": f"chown -R {owner_of.get(home, 'UID:GID')} {self.ctx.arg(home)}",
                     "writable": f"chmod -R o-w {self.ctx.arg(home)}",
                     "missing": f"qrelay user show {self.ctx.arg(self.ctx.root)} USER@DOMAIN "
                                "(then recreate the Maildirs)"}[kind]
            self.report.problem("perms", f"{len(items)} paths under {home}: {items[0][0]} "
                                f"(and {len(items) - 1} more like it)", items[0][1], whole)


def check(ctx: Context, report: Report) -> None:
    from engine.accounts.assign import AssignError
    from engine.accounts.store import Accounts, AccountsError
    accounts = Accounts(ctx.root)
    kinds = _Kinds(ctx, report)
    owner_of: dict[str, str] = {}
    checked_homes = mailboxes = 0
    budget = ctx.doctor.max_mailboxes
    seen: set[str] = set()
    unchecked: list[str] = []
    try:
        entries = list(_entries(ctx.root))
    except (AssignError, OSError):
        return              # the controls check reports a users/assign it cannot read
    for label, a in entries:
        if a is None or not a.home or a.home in seen:
            continue
        seen.add(a.home)
        if a.uid == 0:
            report.problem("perms", f"users/assign {label} delivers as uid 0",
                           "every delivery to it defers (Not allowed to perform deliveries as "
                           "root.)", f"${{EDITOR:-vi}} {ctx.arg(ctx.root / 'users/assign')} && "
                           f"qrelay newu {ctx.arg(ctx.root)}")
        want = (a.uid, a.gid)
        owner_of[a.home] = f"{a.uid}:{a.gid}"
        try:
            st = _stat(a.home)
            if st is None:
                why = f"every delivery to it defers (Unable to switch to {a.home})"
                fix = f"mkdir -p {ctx.arg(a.home)} && chown {a.uid}:{a.gid} {ctx.arg(a.home)}"
                stale = _stale_aliases(entries, a.home)
                if stale:
                    # No domain to make again here: the aliases go, or follow
                    # their real domain to its directory.
                    real, moved = stale[0][1:]
                    why += (f" and {real}, the domain it is an alias of, " +
                            (f"is in {moved}" if moved else
                             f"is gone (users/assign has no +{real}- line)"))
                    root = ctx.arg(ctx.root)
                    fix = " && ".join(
                        f"qrelay domain del {root} {shlex.quote(n)}" +
                        (f" && qrelay domain alias {root} {shlex.quote(n)} {shlex.quote(r)}"
                         if there else "") for n, r, there in stale)
                elif _vpopmail_domain(label, a):
                    # An empty directory would turn the deferrals into bounces (no
                    # .qmail-default: no mailbox here by that name): make the domain.
                    domain, home, owner = shlex.quote(a.user), ctx.arg(a.home), \
                        f"-o {a.uid} -g {a.gid}"
                    why += " and its mailboxes are gone with it (restore them from a backup)"
                    fix = (f"install -d -m 700 {owner} {home} && install -m 600 {owner} "
                           f"/dev/null {home}/vpasswd && qrelay domain mkpasswd "
                           f"{ctx.arg(ctx.root)} {domain} && qrelay domain catchall "
                           f"{ctx.arg(ctx.root)} {domain} bounce")
                report.problem("perms", f"{a.home} (users/assign {label}) does not exist",
                               why, fix)
                continue
            checked_homes += 1
            _check_path(ctx, kinds, a.home, a.home, st, want, is_home=True)
            _check_qmail_files(ctx, kinds, a.home, a.home, want)
            try:
                users = accounts.domain(a.home)
            except AccountsError as exc:
                if isinstance(exc.__cause__, PermissionError):
                    raise exc.__cause__ from None
                report.problem("perms", f"{a.home}: {exc}", "deliveries to this domain defer",
                               f"qrelay user list {ctx.arg(ctx.root)} DOMAIN")
                continue
            if users is None:
                continue
            _vpasswd(ctx, report, a.home, a.user)
            for user in users.users():
                if mailboxes >= budget:
                    break
                mailboxes += 1
                udir = user.directory
                if not udir:
                    # vpopmail would make one at the next delivery; qrelay bounces instead
                    # (engine/delivery/local/vdelivermail.py), and _stat("") is no answer.
                    made = os.path.join(a.home, user.name)
                    vpasswd = ctx.arg(os.path.join(a.home, "vpasswd"))
                    kinds.add(a.home, "missing", f"{a.home}/vpasswd gives user {user.name} "
                              "no directory", "its mail bounces (Auto creation of maildir "
                              "failed. (#5.9.8))",
                              f"${{EDITOR:-vi}} {vpasswd} (6th field: {made}) && (umask 077 && "
                              f"mkdir -p {ctx.arg(made)}/Maildir/{{cur,new,tmp}}) && chown -R "
                              f"{a.uid}:{a.gid} {ctx.arg(made)} && qrelay domain mkpasswd "
                              f"{ctx.arg(ctx.root)} {a.user}")
                    continue
                ust = _stat(udir)
                if ust is None:
                    kinds.add(a.home, "missing", f"{udir} (user {user.name}) does not exist",
                              "vdelivermail cannot deliver to this mailbox",
                              f"(umask 077 && mkdir -p {ctx.arg(os.path.join(udir, 'Maildir'))}/"
                              f"{{cur,new,tmp}}) && chown -R {a.uid}:{a.gid} {ctx.arg(udir)}")
                    continue
                _check_path(ctx, kinds, a.home, udir, ust, want)
                _check_qmail_files(ctx, kinds, a.home, udir, want)
                for sub in ("", "cur", "new", "tmp"):
                    path = os.path.join(udir, "Maildir", sub).rstrip("/")
                    pst = _stat(path)
                    if pst is None:
                        # No Maildir: cur, new and tmp are missing too, one fix makes all four.
                        make = f"{ctx.arg(path)}/{{cur,new,tmp}}) && chown -R" if not sub else \
                            f"{ctx.arg(path)}) && chown"
                        kinds.add(a.home, "missing", f"{path} does not exist",
                                  "deliveries to this mailbox defer (Unable to chdir to maildir)",
                                  f"(umask 077 && mkdir -p {make} {a.uid}:{a.gid} {ctx.arg(path)}")
                        break
                    _check_path(ctx, kinds, a.home, path, pst, want)
        except PermissionError:
            unchecked.append(a.home)    # not root: a 0700 tree of its owner's
            continue
    kinds.emit(owner_of)
    if not kinds.groups:
        report.note("perms", f"{checked_homes} homes and {mailboxes} mailboxes: owners and "
                    "modes as deliveries need them")
    if mailboxes >= budget:
        report.note("perms", f"stopped after {budget} mailboxes ([doctor] max_mailboxes)")
    if unchecked:
        shown = ", ".join(unchecked[:5]) + (f" and {len(unchecked) - 5} more"
                                            if len(unchecked) > 5 else "")
        report.note("perms", f"not checked: uid {os.geteuid()} may not read {shown}; run "
                    "qrelay doctor as root to check them", unchecked=len(unchecked))
    _receivers(ctx, report)


def _vpasswd(ctx: Context, report: Report, home: str, domain: str) -> None:
    """vpasswd edited after vpasswd.cdb was built (lookups read only the cdb,
    as vpopmail's), and vpasswd lines that are no user."""
    from engine.accounts.files import read_whole
    from engine.accounts.vpasswd import VPASSWD, VPASSWD_CDB, malformed_lines
    fix = f"qrelay domain mkpasswd {ctx.arg(ctx.root)} {shlex.quote(domain)}"
    text_path, cdb_path = os.path.join(home, VPASSWD), os.path.join(home, VPASSWD_CDB)
    text, cdb = _stat(text_path), _stat(cdb_path)
    if text is not None and cdb is not None and text.st_mtime_ns > cdb.st_mtime_ns:
        report.problem("perms", f"{text_path} was changed after vpasswd.cdb was built",
                       "the change has no effect: RCPT checks, delivery, AUTH and POP3 read "
                       "only vpasswd.cdb, as vpopmail does", fix)
    got = read_whole(text_path) if text is not None else None
    bad = malformed_lines(got[0].decode("utf-8", "surrogateescape")) if got else []
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        report.problem("perms", f"{text_path} {bad[0]}{more}",
                       "a skipped line is a user without a mailbox or a login",
                       f"${{EDITOR:-vi}} {ctx.arg(text_path)} && {fix}")


def _receivers(ctx: Context, report: Report) -> None:
    """Vpopmail domains whose vpasswd `[run] user` (the receivers) cannot read."""
    from engine.accounts.admin import AdminError, list_domains
    from engine.privilege import PrivilegeError, run_user
    try:
        user = run_user(ctx.settings.run.user)
    except PrivilegeError:
        return              # `qrelay run` refuses to start, naming it
    if user is None:
        return              # not root, or `[run] user = ""`: the receivers run as root
    try:
        domains = list_domains(ctx.root)
    except (AdminError, OSError):
        return              # the controls check reports a broken users/assign
    found = [d for d in domains if d.uid != user.uid]
    if not found:
        return
    owners = sorted({d.uid for d in found})
    names = [d.name for d in found]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    owner = _user_name(owners[0]) if len(owners) == 1 else None
    toml = ctx.arg(ctx.root / "qrelay.toml")
    if owner is not None and len(found) == len(domains):
        fix = f'${{EDITOR:-vi}} {toml} # [run] user = "{owner}", then restart qrelay run'
    elif len({d.directory for d in found}) == 1:
        # Give the one domain to the run user: its tree, then its assign line
        # and those of its alias domains (vaddaliasdomain's share its directory).
        scripts = " ".join(
            "-e " + ctx.arg(f"s#^\\(+{d.name.replace('.', '[.]')}-:[^:]*:\\)[0-9]*:[0-9]*:"
                            f"#\\1{user.uid}:{user.gid}:#") for d in found)
        fix = (f"chown -R {user.uid}:{user.gid} {ctx.arg(found[0].directory)} && sed -i "
               f"{scripts} {ctx.arg(ctx.root / 'users/assign')} && qrelay newu {ctx.arg(ctx.root)}")
    else:
        fix = (f"give each to {user.name}: chown -R {user.uid}:{user.gid} its directory, set "
               f"its users/assign uid:gid to {user.uid}:{user.gid}, then qrelay newu "
               f"{ctx.arg(ctx.root)}")
    report.problem("perms", f"the receivers run as {user.name} (uid {user.uid}) and cannot "
                   f"read the vpasswd of {shown} (uid {', '.join(map(str, owners))})",
                   "RCPT checks, SMTP AUTH and POP3 for them fail with temporary errors "
                   "(451 at RCPT: their mail waits)", fix)


def _user_name(uid: int) -> str | None:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None         # a numeric owner cannot be `[run] user`


def _stat(path: str) -> os.stat_result | None:
    """None when path does not exist; PermissionError when we may not look."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_path(ctx: Context, kinds: _Kinds, group: str, path: str, st: os.stat_result,
                want: tuple[int, int], *, is_home: bool = False) -> None:
    """One directory: writable by others, sticky (a home), owner."""
    where = ctx.arg(path)
    if st.st_mode & 0o002:
        why = (f"every delivery to it defers ({WRITABLE_HOME})" if is_home
               else "any local user can read, replace or remove this mail")
        kinds.add(group, "writable", f"{path} is writable by everyone", why, f"chmod o-w {where}")
    if is_home and st.st_mode & stat.S_ISVTX:
        kinds.add(group, "writable", f"{path} has the sticky bit",
                  "every delivery to it defers (Home directory is sticky: user is editing "
                  "his .qmail file. (#4.2.1))", f"chmod -t {where}")
    if (st.st_uid, st.st_gid) != want:
        kinds.add(group, "owner",
                  f"{path} is owned by {st.st_uid}:{st.st_gid}, users/assign says "
                  f"{want[0]}:{want[1]}",
                  "deliveries run as the assign line's uid and cannot write there",
                  f"chown -R {want[0]}:{want[1]} {where}")


def _check_qmail_files(ctx: Context, kinds: _Kinds, home: str, directory: str,
                       want: tuple[int, int]) -> None:
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it if e.name.startswith(".qmail")]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        st = _stat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            continue
        if st.st_mode & 0o002:
            kinds.add(home, "writable", f"{path} is writable by everyone",
                      f"every delivery through it defers ({WRITABLE_QMAIL})",
                      f"chmod o-w {ctx.arg(path)}")
        # Root's own .qmail files are as qmail's INSTALL.alias makes them
        # (`touch ~alias/.qmail-postmaster` as root): only root can change them.
        if st.st_uid not in (want[0], 0):
            kinds.add(home, "owner", f"{path} is owned by uid {st.st_uid}, users/assign says "
                      f"{want[0]}", "the mailbox owner cannot edit it; anyone owning it "
                      "decides where this mail goes", f"chown {want[0]}:{want[1]} {ctx.arg(path)}")
