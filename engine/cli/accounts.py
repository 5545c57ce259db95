"""vpopmail's vadddomain / vadduser / vsetuserquota / vmoduser / valias and
qmail-newu (engine/accounts owns these; bad input is one line and exit status 2)."""
from __future__ import annotations

import click

from engine.cli.base import ROOT, BadInput, Progress, cli, reload_running

# The largest uid/gid: a 32-bit uid_t, whose all-ones value is chown's "leave it".
MAX_ID = (1 << 32) - 2


def _accounts_call(fn, *args, **kwargs):
    """Run an engine.accounts.admin function; its errors become one CLI line."""
    from engine.accounts.admin import AdminError
    try:
        return fn(*args, **kwargs)
    except AdminError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise click.ClickException(f"{where}{exc.strerror or exc}") from None


def _read_new_password() -> str:
    """The first line of stdin when it is not a terminal; else asked twice, hidden."""
    import sys
    stdin = sys.stdin
    if stdin is None:
        raise BadInput("no standard input to read the password from")
    if stdin.isatty():
        return click.prompt("New password", hide_input=True, confirmation_prompt=True, err=True)
    line = stdin.readline()
    if not line:
        raise BadInput("no password on standard input (give it as the first line)")
    return line.rstrip("\r\n")


@cli.group()
def domain() -> None:
    """vpopmail domains: add, alias, del, list, catchall, mkpasswd."""


@domain.command("add")
@ROOT
@click.argument("name", metavar="DOMAIN")
@click.option("--uid", type=click.IntRange(min=0, max=MAX_ID), default=None,
              help="owner uid (default: see below)")
@click.option("--gid", type=click.IntRange(min=0, max=MAX_ID), default=None, help="owner gid")
def domain_add(root: str, name: str, uid: int | None, gid: int | None) -> None:
    """Add DOMAIN (vadddomain): ROOT/domains/DOMAIN, rcpthosts, virtualdomains, users/assign.

    Writes ROOT/domains/DOMAIN/ (vpasswd, vpasswd.cdb, .qmail-default),
    control/rcpthosts, control/virtualdomains, users/assign and users/cdb.

    The domain's uid/gid: --uid/--gid; else, as root, the owner of ROOT/domains,
    else that of the vpopmail domains already in users/assign, else `[run] user`
    (qrelay: the receivers read the domain's vpasswd as it), else the vpopmail
    user; not as root, yours. Never root (qmail does not deliver as root). A
    domain the receivers cannot read is added with a warning.
    """
    from engine.accounts.admin import add_domain, receivers_cannot_read
    ref = _accounts_call(add_domain, root, name, uid=uid, gid=gid)
    reload_running(root)
    click.echo(f"qrelay: added domain {ref.name} ({ref.directory}, uid {ref.uid}, gid {ref.gid})")
    warning = receivers_cannot_read(root, ref)
    if warning:
        click.echo(f"qrelay: warning: {warning}", err=True)
    # vadddomain makes a postmaster user; here the operator says where it goes.
    click.echo(f"qrelay: postmaster@{ref.name} needs a mailbox or an alias (RFC 5321): "
               f"qrelay alias add {root} postmaster@{ref.name} ADDRESS")


@domain.command("del")
@ROOT
@click.argument("name", metavar="DOMAIN")
def domain_del(root: str, name: str) -> None:
    """Delete DOMAIN, its alias domains and every mailbox in it (vdeldomain).

    Removes ROOT/domains/DOMAIN/ and the domain's lines in control/rcpthosts,
    control/morercpthosts, control/virtualdomains, users/assign and users/cdb.
    An alias domain (`qrelay domain alias`) loses only its own lines: the
    real domain and its mailboxes stay.
    """
    from engine.accounts.admin import delete_domain
    ref, real = _accounts_call(delete_domain, root, name)
    reload_running(root)
    if real is not None:
        click.echo(f"qrelay: deleted alias domain {ref.name} (of {real}, whose mailboxes stay)")
    else:
        click.echo(f"qrelay: deleted domain {ref.name} ({ref.directory})")


@domain.command("alias")
@ROOT
@click.argument("alias", metavar="ALIAS")
@click.argument("name", metavar="DOMAIN")
def domain_alias(root: str, alias: str, name: str) -> None:
    """Make ALIAS another name of DOMAIN (vaddaliasdomain): joe@ALIAS reaches joe@DOMAIN.

    Writes users/assign (`+ALIAS-:DOMAIN:…` with DOMAIN's directory),
    users/cdb, control/virtualdomains and control/rcpthosts (or
    morercpthosts); ALIAS gets no directory. `qrelay domain del ALIAS` undoes it.
    """
    from engine.accounts.admin import add_alias_domain
    ref, real = _accounts_call(add_alias_domain, root, alias, name)
    reload_running(root)
    click.echo(f"qrelay: added alias domain {ref.name} of {real} ({ref.directory})")


@domain.command("list")
@ROOT
def domain_list(root: str) -> None:
    """List vpopmail domains: name, directory, uid:gid (and `alias of REAL`).

    Reads ROOT/users/cdb (else users/assign) and each domain's vpasswd; writes nothing.
    """
    from engine.accounts.admin import list_domains
    for d in _accounts_call(list_domains, root):
        alias = f"\talias of {d.alias_of}" if d.alias_of else ""
        click.echo(f"{d.name}\t{d.directory}\t{d.uid}:{d.gid}{alias}")


@domain.command("catchall")
@ROOT
@click.argument("name", metavar="DOMAIN")
@click.argument("target", metavar="ADDRESS|bounce|delete")
def domain_catchall(root: str, name: str, target: str) -> None:
    """What happens to mail for unknown users of DOMAIN (.qmail-default).

    Writes the domain directory's .qmail-default: vdelivermail with
    `bounce-no-mailbox`, `delete`, or the ADDRESS that gets the mail.
    """
    from engine.accounts.admin import set_catchall
    line = _accounts_call(set_catchall, root, name, target)
    click.echo(f"qrelay: {name} .qmail-default: {line}")


@domain.command("mkpasswd")
@ROOT
@click.argument("name", metavar="DOMAIN")
def domain_mkpasswd(root: str, name: str) -> None:
    """Rebuild DOMAIN's vpasswd.cdb from its vpasswd (vmkpasswd).

    Lookups (RCPT checks, delivery, AUTH, POP3) read vpasswd.cdb, as vpopmail
    does, so a hand edit of vpasswd takes effect only after this. Malformed
    vpasswd lines are named on stderr (exit 1): their users have no mailbox.
    Reads the domain's vpasswd; writes its vpasswd.cdb (under .vpasswd.lock).
    """
    from engine.accounts.admin import rebuild_cdb
    ref, count, malformed = _accounts_call(rebuild_cdb, root, name)
    for line in malformed:
        click.echo(f"qrelay: {ref.directory}/vpasswd {line}", err=True)
    click.echo(f"qrelay: {ref.name}: vpasswd.cdb rebuilt with {count} users")
    if malformed:
        raise SystemExit(1)


@cli.group()
def user() -> None:
    """vpopmail mailboxes: add, del, passwd, quota, mod, list, show, import."""


@user.command("add")
@ROOT
@click.argument("address", metavar="USER@DOMAIN")
@click.option("--quota", default=None, metavar="QUOTA", help="e.g. 10MB, 10485760S, 1000C, 10MB,1000C")
def user_add(root: str, address: str, quota: str | None) -> None:
    """Add a mailbox (vadduser). The password: stdin's first line, or asked twice on a terminal.

    Writes the domain's vpasswd and vpasswd.cdb and USER/Maildir/{cur,new,tmp}
    under the domain directory.
    """
    from engine.accounts.admin import add_user, check_root, find_domain, split_address
    base = _accounts_call(check_root, root)
    _, domain_name = _accounts_call(split_address, address)
    _accounts_call(find_domain, base, domain_name)  # bad input is reported before the prompt
    u = _accounts_call(add_user, root, address, _read_new_password(), quota=quota)
    click.echo(f"qrelay: added {address.lower()} ({u.maildir}, quota {u.quota})")


@user.command("del")
@ROOT
@click.argument("address", metavar="USER@DOMAIN")
def user_del(root: str, address: str) -> None:
    """Delete a mailbox and its mail (vdeluser).

    Writes the domain's vpasswd and vpasswd.cdb; removes the user's directory.
    """
    from engine.accounts.admin import delete_user, list_aliases, real_address, split_address
    u = _accounts_call(delete_user, root, address)
    gone = address.lower()
    click.echo(f"qrelay: deleted {gone} ({u.directory})")
    # As vdeluser, the domain's aliases stay: say which still forward here
    # (their mail now bounces or goes to the catch-all), under either name
    # of the domain (an alias domain's is the real one's mailbox).
    mailbox = _accounts_call(real_address, root, gone)

    def forwards_here(line: str) -> bool:
        target = line.lstrip("&").strip().lower()
        return (target.rpartition("@")[0] == mailbox.rpartition("@")[0]     # the cheap test first
                and _accounts_call(real_address, root, target) == mailbox)
    still = [alias for alias, lines in _accounts_call(list_aliases, root, split_address(gone)[1])
             if any(forwards_here(line) for line in lines)]
    if still:
        click.echo(f"qrelay: note: {', '.join(still)} still forward{'s' if len(still) == 1 else ''}"
                   f" to {gone} (qrelay alias del {root} ALIAS)", err=True)


@user.command("passwd")
@ROOT
@click.argument("address", metavar="USER@DOMAIN")
def user_passwd(root: str, address: str) -> None:
    """Set a mailbox's password (vpasswd): stdin's first line, or asked twice on a terminal.

    Writes the domain's vpasswd and vpasswd.cdb.
    """
    from engine.accounts.admin import find_user, set_password
    _accounts_call(find_user, root, address)  # bad input before the prompt
    _accounts_call(set_password, root, address, _read_new_password())
    click.echo(f"qrelay: password changed for {address.lower()}")


@user.command("quota")
@ROOT
@click.argument("address", metavar="USER@DOMAIN")
@click.argument("quota", metavar="QUOTA")
def user_quota(root: str, address: str, quota: str) -> None:
    """Set a mailbox's quota (vsetuserquota): 10MB, 10485760S, 1000C, 10MB,1000C or NOQUOTA.

    Writes the domain's vpasswd and vpasswd.cdb; deletes Maildir/maildirsize
    and, unless NOQUOTA, rebuilds it from the messages there.
    """
    from engine.accounts.admin import set_quota
    u = _accounts_call(set_quota, root, address, quota)
    click.echo(f"qrelay: quota of {address.lower()} is {u.quota}")


def _flag_options(command):
    from engine.accounts.admin import MOD_FLAGS
    for name in reversed(MOD_FLAGS):
        positive = name[3:] if name.startswith("no-") else f"no-{name}"
        command = click.option(f"--{name}/--{positive}", name.replace("-", "_"), default=None,
                               help=f"set (--{name}) or clear (--{positive}) that flag")(command)
    return command


@user.command("mod")
@ROOT
@click.argument("target", metavar="USER@DOMAIN|DOMAIN")
@click.option("--clear", "clear_all", is_flag=True, help="clear every flag first (vmoduser -x)")
@_flag_options
def user_mod(root: str, target: str, clear_all: bool, **flags: bool | None) -> None:
    """Set or clear a mailbox's flags (vmoduser), or those of every mailbox of DOMAIN.

    --no-pop and --no-smtp refuse POP3 logins and SMTP AUTH whatever the
    password, --bounce-mail bounces the mail that arrives (vdelivermail),
    --no-relay keeps a POP3 login from opening POP-before-SMTP relaying:
    e.g. `qrelay user mod ROOT joe@example.com --no-pop --no-smtp` suspends an
    account, `--pop --smtp` lifts it. Writes the domain's vpasswd and
    vpasswd.cdb; a running `qrelay run` sees it within a second.
    """
    from engine.accounts.admin import MOD_FLAGS, set_flags
    on = off = 0
    for name, bit in MOD_FLAGS.items():
        value = flags[name.replace("-", "_")]
        if value is True:
            on |= bit
        elif value is False:
            off |= bit
    if not (on or off or clear_all):
        raise BadInput("nothing to change: give a flag option or --clear (see --help)")
    for u in _accounts_call(set_flags, root, target, on=on, off=off, clear=clear_all):
        domain = target.rpartition("@")[2].lower()
        click.echo(f"{u.name}@{domain}\t{','.join(u.flag_names) or '-'}")


@user.command("list")
@ROOT
@click.argument("name", metavar="DOMAIN")
def user_list(root: str, name: str) -> None:
    """List DOMAIN's mailboxes: address, quota, flags.

    Reads the domain's vpasswd; writes nothing.
    """
    from engine.accounts.admin import list_users
    for u in _accounts_call(list_users, root, name):
        flags = ",".join(u.flag_names) or "-"
        click.echo(f"{u.name}@{name.lower()}\t{u.quota}\t{flags}")


@user.command("show")
@ROOT
@click.argument("address", metavar="USER@DOMAIN")
def user_show(root: str, address: str) -> None:
    """Show a mailbox: directory, Maildir, quota, usage, flags.

    Reads the domain's vpasswd and the Maildir (maildirsize if present); writes nothing.
    """
    from engine.accounts.admin import show_user
    r = _accounts_call(show_user, root, address)
    u = r.user
    limit = []
    if u.quota_bytes:
        limit.append(f"{r.usage_bytes * 100 // u.quota_bytes}% of bytes")
    if u.quota_count:
        limit.append(f"{r.usage_count * 100 // u.quota_count}% of messages")
    click.echo(f"address:   {r.address}")
    click.echo(f"directory: {u.directory}")
    click.echo(f"maildir:   {r.maildir}")
    click.echo(f"quota:     {u.quota}")
    click.echo(f"usage:     {r.usage_bytes} bytes, {r.usage_count} messages ({r.usage_source})"
               + (f", {', '.join(limit)}" if limit else ""))
    click.echo(f"flags:     {','.join(u.flag_names) or '-'} (gid {u.gid})")
    if r.limits.flags:
        from engine.accounts.vpasswd import V_OVERRIDE, flag_names
        added = ",".join(flag_names(r.limits.flags & ~u.gid)) or "-"
        note = "not applied: v_override" if u.gid & V_OVERRIDE else "added at login"
        click.echo(f"limits:    {added} ({r.limits.source}; {note})")
    click.echo(f"password:  {r.scheme or 'none/unknown'}{', cleartext kept' if u.clear else ''}")
    from engine.accounts import lastauth
    last = lastauth.read(u.directory)
    if last is None:
        click.echo("last login: never (no lastauth)")
    else:
        import time
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last[1]))
        click.echo(f"last login: {when} from {last[0] or '?'}")


@user.command("import")
@ROOT
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--workers", type=click.IntRange(min=1), default=None, help="hashing workers (default: CPUs)")
def user_import(root: str, file: str, workers: int | None) -> None:
    """Add many mailboxes from FILE (`address:password[:quota]` lines; `-` = stdin).

    Writes each domain's vpasswd and vpasswd.cdb and the new Maildirs.

    Every line is checked first; nothing is written if one is bad. One vpasswd
    write per domain.
    """
    import sys
    import time
    from engine.accounts.admin import import_users
    start = time.monotonic()
    if file == "-" and sys.stdin is None:      # descriptor 0 closed (<&-)
        raise BadInput("-: standard input is closed")
    try:
        stream = click.open_file(file, "r", encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise BadInput(f"{file}: {exc.strerror}") from None
    with stream:
        report = _accounts_call(import_users, root, stream, source=file, workers=workers,
                                progress=Progress("user import"))
    took = time.monotonic() - start
    click.echo(f"qrelay: imported {report.added} mailboxes into {report.domains} domains "
               f"in {took:.1f} s ({report.workers} hashing workers)")


@cli.group()
def alias() -> None:
    """Aliases (.qmail-NAME files in the domain directory): add, del, list."""


@alias.command("add")
@ROOT
@click.argument("address", metavar="NAME@DOMAIN")
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
def alias_add(root: str, address: str, targets: tuple[str, ...]) -> None:
    """Forward NAME@DOMAIN to each TARGET (valias -i; one `&TARGET` line each).

    Writes .qmail-NAME in the domain directory (existing lines kept).
    """
    from engine.accounts.admin import add_alias
    path, lines = _accounts_call(add_alias, root, address, targets)
    click.echo(f"qrelay: {address.lower()} → {', '.join(x[1:] for x in lines)} ({path.name})")


@alias.command("del")
@ROOT
@click.argument("address", metavar="NAME@DOMAIN")
def alias_del(root: str, address: str) -> None:
    """Remove an alias (its .qmail-NAME file in the domain directory)."""
    from engine.accounts.admin import delete_alias
    path = _accounts_call(delete_alias, root, address)
    click.echo(f"qrelay: deleted alias {address.lower()} ({path.name})")


@alias.command("list")
@ROOT
@click.argument("name", metavar="DOMAIN")
def alias_list(root: str, name: str) -> None:
    """List DOMAIN's aliases and their lines.

    Reads the domain directory's .qmail-* files; writes nothing.
    """
    from engine.accounts.admin import list_aliases
    for address, lines in _accounts_call(list_aliases, root, name):
        click.echo(f"{address}\t{' '.join(lines)}")


@cli.command()
@ROOT
def newu(root: str) -> None:
    """Compile users/assign into users/cdb (qmail-newu).

    Reads ROOT/users/assign; writes ROOT/users/cdb (atomically). When both
    exist, the cdb is what deliveries read, as in qmail.
    """
    from engine.accounts.admin import newu as compile_users
    count = _accounts_call(compile_users, root)
    click.echo(f"qrelay: wrote {root}/users/cdb ({count} assignments)")
