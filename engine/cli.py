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


def main() -> None:
    cli(prog_name="qrelay")


if __name__ == "__main__":
    main()
