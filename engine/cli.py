"""The `qrelay` command: qmail's admin tools under one roof.

Every subcommand reports bad input as a one-line error and a non-zero exit
status, never a traceback.
"""
from __future__ import annotations

import click

from engine import __version__
from engine.home import HomeError, init_home


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="qrelay")
def cli() -> None:
    """qrelay: a fast, crash-safe mail transfer agent that reads qmail's files."""


@cli.command()
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--me", help="this host's name (control/me); default: the system host name")
@click.option("--force", is_flag=True, help="overwrite the control files of an existing root")
def init(root: str, me: str | None, force: bool) -> None:
    """Create a qmail-style home at ROOT."""
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
@click.argument("root", type=click.Path(file_okay=False))
def qstat(root: str) -> None:
    """Count queued messages (qmail-qstat's two lines)."""
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
@click.argument("root", type=click.Path(file_okay=False))
def qread(root: str) -> None:
    """List queued messages and recipients (qmail-qread's format)."""
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
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT",
              help="address to accept SMTP on (repeatable; default 0.0.0.0:25; port 0 = any free port)")
@click.option("--procs", type=click.IntRange(min=1), default=None,
              help="receiver processes (default: the number of CPUs)")
@click.option("--dev", is_flag=True, help="create ROOT with `qrelay init` defaults if it does not exist")
@click.option("--port-file", type=click.Path(dir_okay=False), default=None,
              help="write the bound port(s), one per line, to this file once listening")
def run(root: str, listen: tuple[str, ...], procs: int | None, dev: bool, port_file: str | None) -> None:
    """Run qrelay in the foreground: SMTP receivers (and, later, delivery) until SIGTERM."""
    import logging
    import os
    import sys
    from pathlib import Path

    from engine.config.smtp import ConfigError
    from engine.smtp.listeners import ListenError, parse_listen
    from engine.run import serve

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
    except (ConfigError, ListenError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)


@cli.command()
@click.argument("root", type=click.Path(file_okay=False))
def flush(root: str) -> None:
    """Retry every deferred recipient now (qmail's `kill -ALRM qmail-send`)."""
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
    pid = signal_running_scheduler(base)
    woke = f"; woke the scheduler (pid {pid})" if pid else "; no scheduler running"
    click.echo(f"qrelay: {moved} deferred recipients due now{woke}")


@cli.command()
@click.argument("root", type=click.Path(file_okay=False))
def newmrh(root: str) -> None:
    """Compile control/morercpthosts into morercpthosts.cdb (qmail-newmrh)."""
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
@click.argument("root", type=click.Path(file_okay=False))
def tcprules(root: str) -> None:
    """Compile control/tcp.smtp into tcp.smtp.cdb (ucspi-tcp's tcprules)."""
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


def main() -> None:
    cli(prog_name="qrelay")


if __name__ == "__main__":
    main()
