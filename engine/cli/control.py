"""`qrelay init`, `newmrh`, `tcprules`, `showctl`: create a root, compile and show its control files."""
from __future__ import annotations

import click

from engine.cli.base import ROOT, cli, os_error_line, reload_running
from engine.home import HomeError, init_home


@cli.command()
@ROOT
@click.option("--me", help="this host's name (control/me); default: the system host name")
@click.option("--force", is_flag=True, help="overwrite the control files of an existing root")
def init(root: str, me: str | None, force: bool) -> None:
    """Create a qmail-style home at ROOT.

    Writes ROOT/control/ (me, rcpthosts, defaultdomain, locals,
    concurrencyremote, queuelifetime, databytes, smtproutes, tcp.smtp) and
    creates users/, queue/ and log/. Refuses a ROOT that has control/ already;
    --force rewrites those control files and nothing else.

    As root, also creates the `qrelay` system user (useradd --system, no
    login) when missing and gives it queue/ and log/: `qrelay run` runs
    everything that reads the network as that user ([run] user).
    """
    from engine.privilege import DEFAULT_USER, PrivilegeError, give_tree, run_user
    try:
        path = init_home(root, me=me, force=force)
        user = run_user(DEFAULT_USER, create_default=True)
        if user is not None:
            give_tree(path, user)
    except (HomeError, PrivilegeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    owned = f"; queue/ and log/ belong to {user.name} (uid {user.uid})" if user else ""
    click.echo(f"qrelay: initialised {path}{owned}")


@cli.command()
@ROOT
def newmrh(root: str) -> None:
    """Compile control/morercpthosts into morercpthosts.cdb (qmail-newmrh).

    Reads ROOT/control/morercpthosts; writes ROOT/control/morercpthosts.cdb
    (atomically). Only the cdb is read by `qrelay run`, as in qmail.
    """
    import contextlib
    from pathlib import Path

    from engine.accounts.files import file_lock
    from engine.config.cdb import CdbError, newmrh as compile_morercpthosts
    from engine.config.control import ControlError
    control = Path(root) / "control"
    if not (control / "morercpthosts").is_file():
        raise click.ClickException(f"{control / 'morercpthosts'}: no such file")
    # `domain add`/`del` change morercpthosts and its cdb under this lock: a
    # cdb compiled from the file read before one of them wrote it would
    # drop its domain from what RCPT reads.
    users = Path(root) / "users"
    try:
        with file_lock(users / "assign.lock") if users.is_dir() else contextlib.nullcontext():
            count = compile_morercpthosts(control)
    except (CdbError, ControlError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error_line(exc)) from None
    reload_running(root)
    click.echo(f"qrelay: wrote {control / 'morercpthosts.cdb'} ({count} domains)")


@cli.command()
@ROOT
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
    except CdbError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error_line(exc)) from None
    reload_running(root)
    click.echo(f"qrelay: wrote {control / RULES_CDB} ({count} keys)")


@cli.command()
@ROOT
def showctl(root: str) -> None:
    """Show what each control file makes qrelay do (qmail-showctl).

    Reads ROOT/control/ (and qrelay.toml for the defaults it sets); writes
    nothing. qmail-showctl's lines, `(Default.)` where a file is absent,
    `Oops! …` where qrelay would refuse a file, then the files qrelay reads
    beyond qmail's (tcp.smtp, qmail-tls's, tlsdestinations, …) and `I have
    no idea what this file does.` for each one it ignores.
    """
    from engine.config.showctl import ShowctlError, show
    try:
        click.echo(show(root), nl=False)
    except ShowctlError as exc:
        raise click.ClickException(str(exc)) from None
