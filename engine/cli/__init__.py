"""The `qrelay` command: qmail's admin tools under one roof.

One module per family of subcommands; each registers itself on the group in
engine/cli/base.py when imported here. A new family is a new module plus one
line below.
"""
from __future__ import annotations

import io
import sys

from engine.cli.base import DEFAULT_ROOT, cli
from engine.cli import accounts, control, doctor, importqmail, inject, queue, relay, run, surgery  # noqa: F401  (they register)

__all__ = ["DEFAULT_ROOT", "cli", "main"]


def main() -> None:
    # Names read from vpasswd, .qmail files or the spool hold whatever bytes
    # vpopmail or a client gave them (decoded with surrogateescape): they are
    # printed as those bytes in every locale, as the C locale already does,
    # not ended in a UnicodeEncodeError under a strict one (en_US.UTF-8).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    cli(prog_name="qrelay")
