"""`qrelay doctor`: the troubleshooting checklist, run against a root (engine/doctor)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click

from engine.cli.base import ROOT, BadInput, cli
from engine.home import default_root

_DOMAIN = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})?\.)*[A-Za-z0-9_-]{1,63}\.?$"
                     r"|^\[[0-9A-Fa-f:.IPv6]+\]$")


def _target_error(target: str) -> str | None:
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in target):
        return "contains spaces or control characters"
    local, at, domain = target.rpartition("@")
    if at and not local:
        return "has nothing before the @"
    if not _DOMAIN.match(domain) or len(domain) > 253:
        return f"{domain!r} is not a domain name"
    return None


@cli.command()
@ROOT
@click.argument("target", required=False, metavar="[DOMAIN|ADDRESS]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: findings and notes.")
def doctor(root: str, target: str | None, as_json: bool) -> None:
    """Find what is wrong with a qrelay (or qmail + vpopmail) box, and how to fix it.

    Without DOMAIN or ADDRESS: control files parse; rcpthosts, locals,
    virtualdomains and users/assign agree; owners and modes of homes,
    Maildirs and .qmail files; the relay table; the queue (size, oldest,
    not yet preprocessed, deferred per destination with the last error);
    log rotation; disk space; TLS certificates. With a DOMAIN: its MX records through
    [delivery] dns_servers, a connect, greeting and EHLO to each (then QUIT,
    nothing sent), smtproutes, tcpto, its deferred mail. With an ADDRESS:
    how it would be delivered (assign entry, .qmail file, mailbox, or the
    hosts in order), sending nothing.

    One line per finding: what is wrong, why it matters, the command that
    fixes it. Exit status 0: no problem found; 1: findings; 2: bad input.

    Reads ROOT (control/, users/, domains, queue/ read-only, log/); writes
    nothing. [doctor] in qrelay.toml sets its limits (connect_timeout ...).
    """
    from engine.doctor import examine
    # `qrelay doctor /var/qrelay`: one word that names a directory is ROOT,
    # not a domain (ROOT is optional, so click handed it to TARGET).
    if target is not None and root == default_root() and "@" not in target and (
            "/" in target or os.path.isdir(target)):
        root, target = target, None
    # pathlib's is_dir, not os.path's: a root this user may not reach is
    # "Permission denied" (one line, from the command), not "no such root".
    if not Path(root).is_dir():
        raise BadInput(f"{root}: no such qrelay root")
    if not (Path(root) / "control").is_dir():
        raise BadInput(f"{root}: not a qrelay root (no control/ directory)")
    if target is not None:
        why = _target_error(target)
        if why:
            raise BadInput(f"{target!r} is neither a domain nor an address: {why}")
    report = examine(root, target)
    if as_json:
        click.echo(json.dumps(report.as_json(os.path.abspath(root), target), indent=1))
    else:
        for note in report.notes:
            click.echo(note.line())
        for finding in report.findings:
            click.echo(finding.line())
        n = len(report.findings)
        click.echo(f"doctor: {n} problem{'s' if n != 1 else ''} found" if n
                   else "doctor: no problems found")
    raise SystemExit(1 if report.findings else 0)
