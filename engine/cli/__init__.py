"""The `qrelay` command: qmail's admin tools under one roof.

One module per family of subcommands; each registers itself on the group in
engine/cli/base.py when imported here. A new family is a new module plus one
line below.
"""
from __future__ import annotations

from engine.cli.base import DEFAULT_ROOT, cli
from engine.cli import accounts, control, doctor, importqmail, inject, queue, relay, run, surgery  # noqa: F401  (they register)

__all__ = ["DEFAULT_ROOT", "cli", "main"]


def main() -> None:
    cli(prog_name="qrelay")
