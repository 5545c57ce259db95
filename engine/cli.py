"""The `qrelay` command: qmail's admin tools under one roof.

Every subcommand reports bad input as a one-line error and a non-zero exit
status, never a traceback. ROOT, the first argument of every command that
has one, may be left out: it defaults to $QRELAY_ROOT, else /var/qrelay.
"""
from __future__ import annotations

import os

import click

from engine import __version__
from engine.home import DEFAULT_ROOT, HomeError, default_root, init_home



class _RootFirstCommand(click.Command):
    """A command whose first argument is an optional ROOT (`_ROOT`).

    Click fills positional arguments left to right, so `qrelay domain add
    example.com` would take the domain for ROOT. Before parsing, this counts
    the positional words: fewer than ROOT plus the other arguments need means
    ROOT was left out, and default_root() is put in front. For a variable
    argument list (`alias add [ROOT] NAME@DOMAIN TARGET...`) the first word is
    ROOT unless it has an `@` (and is not a directory)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing and not any(a in ctx.help_option_names for a in args):
            args = self._with_root(ctx, list(args))
        return super().parse_args(ctx, args)

    def _with_root(self, ctx: click.Context, args: list[str]) -> list[str]:
        arguments = [p for p in self.params if isinstance(p, click.Argument)]
        if len(arguments) < 2 or arguments[0].name != "root":
            return args     # ROOT alone (or none): click's default does it
        try:
            # The parser hands positional words to the arguments in order
            # (ROOT first); collected back, they are the words as given.
            values, extra, _ = self.make_parser(ctx).parse_args(args=list(args))
        except click.UsageError:
            return args     # click reports it
        words: list[str] = []
        for p in arguments:
            value = values.get(p.name)
            if isinstance(value, (tuple, list)):
                words.extend(value)
            elif isinstance(value, str):      # not None/UNSET: a word was there
                words.append(value)
        words.extend(extra)
        others = arguments[1:]
        least = sum(p.nargs if p.nargs > 0 else int(p.required) for p in others)
        if any(p.nargs < 0 for p in others):
            given = len(words) > least and ("@" not in words[0] or os.path.isdir(words[0]))
        else:
            given = len(words) > sum(p.nargs for p in others)
        return args if given else [default_root(), *args]

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        if any(p.name == "root" for p in self.params if isinstance(p, click.Argument)):
            formatter.write_paragraph()
            formatter.write_text(f"ROOT defaults to $QRELAY_ROOT, else {DEFAULT_ROOT} "
                                 f"(here: {default_root()}).")


class _Group(click.Group):
    command_class = _RootFirstCommand
    group_class = type      # subgroups (domain, user, alias) are _Group too


# ROOT: optional, first; see _RootFirstCommand.
_ROOT = click.argument("root", type=click.Path(file_okay=False), required=False,
                       default=default_root)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="qrelay")
def cli() -> None:
    """qrelay: a fast, crash-safe mail transfer agent that reads qmail's files.

    ROOT, the first argument of a command, is a qmail-style home (control/,
    users/, queue/, log/); left out, it is $QRELAY_ROOT, else /var/qrelay.
    `qrelay COMMAND --help` says what each command reads and writes.
    """


@cli.command()
@_ROOT
@click.option("--me", help="this host's name (control/me); default: the system host name")
@click.option("--force", is_flag=True, help="overwrite the control files of an existing root")
def init(root: str, me: str | None, force: bool) -> None:
    """Create a qmail-style home at ROOT.

    Writes ROOT/control/ (me, rcpthosts, defaultdomain, locals,
    concurrencyremote, queuelifetime, databytes, smtproutes, tcp.smtp) and
    creates users/, queue/ and log/. Refuses a ROOT that has control/ already;
    --force rewrites those control files and nothing else.
    """
    try:
        path = init_home(root, me=me, force=force)
    except (HomeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"qrelay: initialised {path}")


def _open_spool_readonly(root: str):
    """The spool of ROOT opened read-only, or a one-line CLI error."""
    from pathlib import Path

    from engine.config.settings import SettingsError, load_settings
    from engine.queue import Spool, SpoolError
    base = Path(root)
    if not base.is_dir():
        raise click.ClickException(f"{root}: no such qrelay root")
    if not (base / "queue").is_dir():
        raise click.ClickException(f"{root}: not a qrelay root (no queue/ directory)")
    if not (base / "queue" / "index" / "data.mdb").exists():
        return None  # nothing was ever queued here
    try:
        settings = load_settings(base)
        return Spool(base / "queue", settings.spool, readonly=True)
    except (SpoolError, SettingsError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@_ROOT
def qstat(root: str) -> None:
    """Count queued messages (qmail-qstat's two lines).

    Reads ROOT/queue (read-only: safe beside a running `qrelay run`); writes nothing.
    """
    from engine.queue.tools import format_qstat
    from engine.queue import SpoolStats
    spool = _open_spool_readonly(root)
    if spool is None:
        click.echo(format_qstat(SpoolStats(0, 0)), nl=False)
        return
    try:
        click.echo(format_qstat(spool.stats()), nl=False)
    finally:
        spool.close()


@cli.command()
@_ROOT
def qread(root: str) -> None:
    """List queued messages and recipients (qmail-qread's format).

    Reads ROOT/queue (read-only: safe beside a running `qrelay run`); writes nothing.
    """
    from engine.queue.tools import format_qread
    spool = _open_spool_readonly(root)
    if spool is None:
        return
    try:
        for block in format_qread(spool.iter_messages()):
            click.echo(block, nl=False)
    finally:
        spool.close()


@cli.command()
@_ROOT
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT",
              help="address to accept SMTP on (repeatable; default 0.0.0.0:25; port 0 = any free port)")
@click.option("--procs", type=click.IntRange(min=1), default=None,
              help="receiver processes (default: the number of CPUs)")
@click.option("--dev", is_flag=True, help="create ROOT with `qrelay init` defaults if it does not exist")
@click.option("--port-file", type=click.Path(dir_okay=False), default=None,
              help="write the bound port(s), one per line, to this file once listening")
def run(root: str, listen: tuple[str, ...], procs: int | None, dev: bool, port_file: str | None) -> None:
    """Run qrelay in the foreground: SMTP receivers, the scheduler and its deliveries, until SIGTERM.

    \b
    Reads:  ROOT/control/* (qmail's control files), control/tcp.smtp.cdb
            (else control/tcp.smtp), ROOT/qrelay.toml, users/cdb (else
            users/assign), the vpopmail domains' vpasswd and .qmail files;
            changes are picked up on HUP or within reload_poll_seconds.
    Writes: ROOT/queue/ (the spool; queue/lock/sendmutex is held while it
            runs, so a second `qrelay run` on ROOT refuses to start),
            the mailboxes of local deliveries.
    Logs:   ROOT/log/current: qmail-send's lines (deliveries, bounces) and
            the supervisor's and spool writer's (`info: supervisor: ...`);
            ROOT/log/smtpd/current: the receivers' (tcpserver's connection
            lines, every refusal with its reason). Both are multilog
            directories (tai64nlocal < ROOT/log/smtpd/current). The
            supervisor's lines also go to stderr.

    \b
    Signals to this process (the supervisor):
      TERM, INT  stop accepting; messages in DATA finish (shutdown_grace),
                 idle clients get a 421; exit 0
      HUP        reload the control files, tcp.smtp and qrelay.toml
      ALRM       retry every deferred recipient now (like `qrelay flush`)
    """
    import logging
    import os
    import sys
    from pathlib import Path

    from engine.smtp.config import ConfigError
    from engine.smtp.listeners import ListenError, parse_listen
    from engine.run import AlreadyRunning, serve

    base = Path(root)
    if dev and not (base / "control").exists():
        try:
            init_home(base)
        except (HomeError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    if not base.is_dir():
        raise click.ClickException(f"{root}: no such qrelay root (create it with `qrelay init {root}`)")
    try:
        addresses = [parse_listen(a) for a in (listen or ("0.0.0.0:25",))]
    except ListenError as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

    def announce(bound) -> None:
        where = ", ".join(str(a) for a in bound)
        pid = os.getpid()
        click.echo(f"qrelay: listening on {where} (root {root}); stop with Ctrl-C or kill -TERM {pid}")
        sys.stdout.flush()
        if port_file:
            tmp = port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(f"{a.port}\n" for a in bound))
            os.replace(tmp, port_file)

    try:
        status = serve(base, addresses, procs or os.cpu_count() or 1, announce)
    except (ConfigError, ListenError, AlreadyRunning) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)


@cli.command()
@_ROOT
def flush(root: str) -> None:
    """Retry every deferred recipient now (qmail's `kill -ALRM qmail-send`).

    Writes ROOT/queue (every deferred recipient marked due; works with nothing
    running), then sends ALRM to the `qrelay run` holding ROOT's queue lock so
    its scheduler starts at once.
    """
    # The spool is marked first, so a flush works with nothing running; then a
    # running scheduler is woken by SIGALRM. (engine/delivery owns this command.)
    from pathlib import Path

    from engine.config.settings import SettingsError, load_settings
    from engine.delivery.service import signal_running_scheduler
    from engine.queue import Spool, SpoolError
    base = Path(root)
    if not (base / "queue").is_dir():
        raise click.ClickException(f"{root}: not a qrelay root (no queue/ directory)")
    moved = 0
    if (base / "queue" / "index" / "data.mdb").exists():
        try:
            spool = Spool(base / "queue", load_settings(base).spool)
            try:
                moved = spool.reschedule_all()
            finally:
                spool.close()
        except (SpoolError, SettingsError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    # The running instance is the holder of the root's lock (never a pid file):
    # its supervisor gets ALRM and forwards it to the scheduler.
    pid = signal_running_scheduler(base)
    woke = f"; woke the scheduler (qrelay run pid {pid})" if pid else "; no scheduler running"
    click.echo(f"qrelay: {moved} deferred recipients due now{woke}")


@cli.command()
@_ROOT
def newmrh(root: str) -> None:
    """Compile control/morercpthosts into morercpthosts.cdb (qmail-newmrh).

    Reads ROOT/control/morercpthosts; writes ROOT/control/morercpthosts.cdb
    (atomically). Only the cdb is read by `qrelay run`, as in qmail.
    """
    from pathlib import Path

    from engine.config.cdb import CdbError, newmrh as compile_morercpthosts
    control = Path(root) / "control"
    if not (control / "morercpthosts").is_file():
        raise click.ClickException(f"{control / 'morercpthosts'}: no such file")
    try:
        count = compile_morercpthosts(control)
    except (CdbError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"qrelay: wrote {control / 'morercpthosts.cdb'} ({count} domains)")


@cli.command()
@_ROOT
def tcprules(root: str) -> None:
    """Compile control/tcp.smtp into tcp.smtp.cdb (ucspi-tcp's tcprules).

    Reads ROOT/control/tcp.smtp; writes ROOT/control/tcp.smtp.cdb (atomically).
    When the cdb exists, `qrelay run` reads it and not the text file.
    """
    from pathlib import Path

    from engine.config.cdb import CdbError
    from engine.config.tcprules import RULES_CDB, RULES_TEXT, TcpRulesError, compile_rules
    control = Path(root) / "control"
    try:
        text = (control / RULES_TEXT).read_bytes().decode("utf-8", "surrogateescape")
        count = compile_rules(text, control / RULES_CDB)
    except TcpRulesError as exc:
        raise click.ClickException(f"{control / RULES_TEXT}: {exc}") from None
    except (CdbError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"qrelay: wrote {control / RULES_CDB} ({count} keys)")


# -- accounts: vpopmail's vadddomain / vadduser / valias and qmail-newu ------
# (engine/accounts owns these; bad input is one line and exit status 2)

class _BadInput(click.ClickException):
    """One line `Error: ...` on stderr, exit status 2 (bad input, like a usage error)."""
    exit_code = 2


def _accounts_call(fn, *args, **kwargs):
    """Run an engine.accounts.admin function; its errors become one CLI line."""
    from engine.accounts.admin import AdminError
    try:
        return fn(*args, **kwargs)
    except AdminError as exc:
        raise _BadInput(str(exc)) from None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise click.ClickException(f"{where}{exc.strerror or exc}") from None


def _read_new_password() -> str:
    """The first line of stdin when it is not a terminal; else asked twice, hidden."""
    import sys
    stdin = sys.stdin
    if stdin is None:
        raise _BadInput("no standard input to read the password from")
    if stdin.isatty():
        return click.prompt("New password", hide_input=True, confirmation_prompt=True, err=True)
    line = stdin.readline()
    if not line:
        raise _BadInput("no password on standard input (give it as the first line)")
    return line.rstrip("\r\n")


@cli.group()
def domain() -> None:
    """vpopmail domains: add, del, list, catchall."""


@domain.command("add")
@_ROOT
@click.argument("name", metavar="DOMAIN")
@click.option("--uid", type=click.IntRange(min=0), default=None, help="owner uid (default: see below)")
@click.option("--gid", type=click.IntRange(min=0), default=None, help="owner gid")
def domain_add(root: str, name: str, uid: int | None, gid: int | None) -> None:
    """Add DOMAIN (vadddomain): ROOT/domains/DOMAIN, rcpthosts, virtualdomains, users/assign.

    Writes ROOT/domains/DOMAIN/ (vpasswd, vpasswd.cdb, .qmail-default),
    control/rcpthosts, control/virtualdomains, users/assign and users/cdb.

    The domain's uid/gid: --uid/--gid, else the owner of ROOT/domains, else the
    vpopmail user, else yours; never root (qmail does not deliver as root).
    """
    from engine.accounts.admin import add_domain
    ref = _accounts_call(add_domain, root, name, uid=uid, gid=gid)
    click.echo(f"qrelay: added domain {ref.name} ({ref.directory}, uid {ref.uid}, gid {ref.gid})")


@domain.command("del")
@_ROOT
@click.argument("name", metavar="DOMAIN")
def domain_del(root: str, name: str) -> None:
    """Delete DOMAIN, its alias domains and every mailbox in it (vdeldomain).

    Removes ROOT/domains/DOMAIN/ and the domain's lines in control/rcpthosts,
    control/morercpthosts, control/virtualdomains, users/assign and users/cdb.
    """
    from engine.accounts.admin import delete_domain
    ref = _accounts_call(delete_domain, root, name)
    click.echo(f"qrelay: deleted domain {ref.name} ({ref.directory})")


@domain.command("list")
@_ROOT
def domain_list(root: str) -> None:
    """List vpopmail domains: name, directory, uid:gid (and `alias of REAL`).

    Reads ROOT/users/cdb (else users/assign) and each domain's vpasswd; writes nothing.
    """
    from engine.accounts.admin import list_domains
    for d in _accounts_call(list_domains, root):
        alias = f"\talias of {d.alias_of}" if d.alias_of else ""
        click.echo(f"{d.name}\t{d.directory}\t{d.uid}:{d.gid}{alias}")


@domain.command("catchall")
@_ROOT
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


@cli.group()
def user() -> None:
    """vpopmail mailboxes: add, del, passwd, list, show, import."""


@user.command("add")
@_ROOT
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
@_ROOT
@click.argument("address", metavar="USER@DOMAIN")
def user_del(root: str, address: str) -> None:
    """Delete a mailbox and its mail (vdeluser).

    Writes the domain's vpasswd and vpasswd.cdb; removes the user's directory.
    """
    from engine.accounts.admin import delete_user
    u = _accounts_call(delete_user, root, address)
    click.echo(f"qrelay: deleted {address.lower()} ({u.directory})")


@user.command("passwd")
@_ROOT
@click.argument("address", metavar="USER@DOMAIN")
def user_passwd(root: str, address: str) -> None:
    """Set a mailbox's password (vpasswd): stdin's first line, or asked twice on a terminal.

    Writes the domain's vpasswd and vpasswd.cdb.
    """
    from engine.accounts.admin import find_user, set_password
    _accounts_call(find_user, root, address)  # bad input before the prompt
    _accounts_call(set_password, root, address, _read_new_password())
    click.echo(f"qrelay: password changed for {address.lower()}")


@user.command("list")
@_ROOT
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
@_ROOT
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
    click.echo(f"password:  {r.scheme or 'none/unknown'}{', cleartext kept' if u.clear is not None else ''}")


@user.command("import")
@_ROOT
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--workers", type=click.IntRange(min=1), default=None, help="hashing workers (default: CPUs)")
def user_import(root: str, file: str, workers: int | None) -> None:
    """Add many mailboxes from FILE (`address:password[:quota]` lines; `-` = stdin).

    Writes each domain's vpasswd and vpasswd.cdb and the new Maildirs.

    Every line is checked first; nothing is written if one is bad. One vpasswd
    write per domain.
    """
    import time
    from engine.accounts.admin import import_users
    start = time.monotonic()
    try:
        stream = click.open_file(file, "r", encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise _BadInput(f"{file}: {exc.strerror}") from None
    with stream:
        report = _accounts_call(import_users, root, stream, source=file, workers=workers)
    took = time.monotonic() - start
    click.echo(f"qrelay: imported {report.added} mailboxes into {report.domains} domains "
               f"in {took:.1f} s ({report.workers} hashing workers)")


@cli.group()
def alias() -> None:
    """Aliases (.qmail-NAME files in the domain directory): add, del, list."""


@alias.command("add")
@_ROOT
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
@_ROOT
@click.argument("address", metavar="NAME@DOMAIN")
def alias_del(root: str, address: str) -> None:
    """Remove an alias (its .qmail-NAME file in the domain directory)."""
    from engine.accounts.admin import delete_alias
    path = _accounts_call(delete_alias, root, address)
    click.echo(f"qrelay: deleted alias {address.lower()} ({path.name})")


@alias.command("list")
@_ROOT
@click.argument("name", metavar="DOMAIN")
def alias_list(root: str, name: str) -> None:
    """List DOMAIN's aliases and their lines.

    Reads the domain directory's .qmail-* files; writes nothing.
    """
    from engine.accounts.admin import list_aliases
    for address, lines in _accounts_call(list_aliases, root, name):
        click.echo(f"{address}\t{' '.join(lines)}")


@cli.command()
@_ROOT
def newu(root: str) -> None:
    """Compile users/assign into users/cdb (qmail-newu).

    Reads ROOT/users/assign; writes ROOT/users/cdb (atomically). When both
    exist, the cdb is what deliveries read, as in qmail.
    """
    from engine.accounts.admin import newu as compile_users
    count = _accounts_call(compile_users, root)
    click.echo(f"qrelay: wrote {root}/users/cdb ({count} assignments)")


# -- local injection: qmail-inject (engine/inject.py owns this) -------------

class _InjectFailure(click.ClickException):
    """One line `Error: ...`, with qmail-inject's exit status (100 or 111)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.exit_code = status


class _InjectCommand(click.Command):
    # qmail-inject's usage errors are permanent (100) and one line.
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _InjectFailure(f"usage: {exc.format_message()}", 100) from None


def _split_root(words: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """[ROOT] RECIPIENT...: the first word is ROOT when it is a path (has a `/`
    and no `@`) or a directory with control/; else ROOT is $QRELAY_ROOT or /var/qrelay."""
    import os

    if words:
        first = words[0]
        if ("/" in first and "@" not in first) or os.path.isdir(os.path.join(first, "control")):
            return first, words[1:]
    return default_root(), words


@cli.command(cls=_InjectCommand)
@click.argument("words", nargs=-1, metavar="[ROOT] [RECIPIENT]...")
@click.option("-f", "sender", metavar="SENDER", help="envelope sender ('' or '<>' = null sender)")
@click.option("-t", "headers", is_flag=True,
              help="also send to the header's To/Cc/Bcc (qmail-inject -H); Bcc is removed")
@click.option("-n", "print_only", is_flag=True,
              help="print the envelope sender and the message instead of queueing it")
def inject(words: tuple[str, ...], sender: str | None, headers: bool, print_only: bool) -> None:
    """Queue the message on stdin (qmail-inject).

    Recipients: the RECIPIENT arguments, else the header's To/Cc/Bcc. Added when
    missing: Date, Message-ID, From (QMAILUSER/USER/LOGNAME @ control/defaulthost),
    and addresses are qualified with defaulthost/defaultdomain. Envelope sender:
    -f, else QMAILSUSER or the user @ defaulthost. Reads ROOT/control, writes
    through the spool writer (ROOT/queue/writer.sock) or the spool directly.
    ROOT: a path first argument, else $QRELAY_ROOT, else /var/qrelay. Exit 0 once
    the message is durable; 100 permanent error; 111 temporary (try again).
    """
    import sys
    from pathlib import Path

    from engine.inject import InjectError, inject as inject_message, load_spool_settings, read_message
    root, recipients = _split_root(words)
    base = Path(root)
    try:
        limit = 0
        if (base / "control").is_dir():
            limit = load_spool_settings(base).smtp.max_message_bytes
        data = read_message(sys.stdin.buffer, limit)
        prepared, _ = inject_message(base, data, sender=sender, arguments=recipients,
                                     header_recipients=True if headers else None,
                                     queue=not print_only)
    except InjectError as exc:
        raise _InjectFailure(str(exc), exc.status) from None
    if print_only:
        out = sys.stdout.buffer
        out.write(b"Return-Path: <" + prepared.sender.encode("utf-8", "surrogateescape") + b">\n")
        for rcpt in prepared.recipients:
            out.write(b"Recipient: " + rcpt.encode("utf-8", "surrogateescape") + b"\n")
        out.write(prepared.message.replace(b"\r\n", b"\n"))
        out.flush()


def main() -> None:
    cli(prog_name="qrelay")


if __name__ == "__main__":
    main()
