"""`qrelay relayclients`: the POP-before-SMTP table (engine.relay) by hand —
list, add, del, and vpopmail's open-smtp file in and out. Safe beside a
running `qrelay run`: every receiver sees a change at once (the hook for an
external POP/IMAP server, e.g. Dovecot's post-login script)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from engine.cli.base import ROOT, BadInput, cli

T = TypeVar("T")

# Seconds a command waits for the relay table's Redis (sessions wait [relay] timeout).
CLI_TIMEOUT = 5.0


class _ListByDefault(type(cli)):  # type: ignore[misc]
    """`relayclients [ROOT]` is `relayclients list [ROOT]`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["list", *args]
        return super().parse_args(ctx, args)


def _with_table(root: str, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """work(table, settings) on ROOT's relay table; store errors are one line."""
    from engine.config.settings import SettingsError, load_settings
    from engine.privilege import acting_as_owner
    from engine.relay import RELAY_DIR, RelayStoreError, open_relay_table
    if not Path(root).is_dir():
        raise BadInput(f"{root}: no such qrelay root")
    if not (Path(root) / "control").is_dir():     # a mistyped ROOT gets no table of its own
        raise BadInput(f"{root}: not a qrelay root (no control/ directory)")
    try:
        settings = load_settings(root)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None

    # A command is no login path: it may wait for Redis longer than a session.
    relay = dataclasses.replace(settings.relay, timeout=max(settings.relay.timeout, CLI_TIMEOUT))
    settings = dataclasses.replace(settings, relay=relay)

    async def run() -> T:
        table = open_relay_table(root, settings)
        try:
            return await work(table, settings)
        finally:
            await table.close()

    # The store's outage warning is for a server's log; here the error says why.
    logging.getLogger("qrelay.relay").addHandler(logging.NullHandler())
    try:
        with acting_as_owner(Path(root) / RELAY_DIR):   # never open the run user's files as root
            return asyncio.run(run())
    except RelayStoreError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def _when(until: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(until))
    return f"until {stamp} UTC ({int(until - now)} s left)"


def _ip(value: str) -> str:
    from engine.relay import normalize_ip
    try:
        return normalize_ip(value)
    except ValueError:
        raise BadInput(f"{value!r} is not an IP address") from None


@cli.group(cls=_ListByDefault)
def relayclients() -> None:
    """POP-before-SMTP: client IPs allowed to relay for a while.

    `qrelay relayclients [ROOT]` lists them. The table is ROOT/relay/ (LMDB),
    or the Redis server of [relay] store in ROOT/qrelay.toml.
    """


@relayclients.command("list")
@ROOT
def relayclients_list(root: str) -> None:
    """List the IPs allowed to relay, each with its expiry.

    Reads the relay table (ROOT/relay/ or [relay] store); writes nothing.
    """
    entries = _with_table(root, lambda table, settings: table.entries())
    now = time.time()
    for ip, until in entries:
        click.echo(f"{ip}\t{_when(until, now)}")


@relayclients.command("add")
@ROOT
@click.argument("ip", metavar="IP")
@click.option("--ttl", type=float, default=None,
              help="seconds (default: [relay] pop_before_smtp_ttl, 10800)")
def relayclients_add(root: str, ip: str, ttl: float | None) -> None:
    """Let IP relay for --ttl seconds from now (a login's grant).

    Writes the relay table (ROOT/relay/ or [relay] store); every receiver of
    a running `qrelay run` sees it at once. An IP already there gets the new expiry.
    """
    from engine.relay import MAX_TTL
    ip = _ip(ip)
    if ttl is not None and not 0 < ttl <= MAX_TTL:
        raise BadInput(f"--ttl {ttl:g}: expected seconds above 0, at most {MAX_TTL}")
    until = _with_table(root, lambda table, settings: table.grant(ip, ttl))
    click.echo(f"qrelay: {ip} may relay {_when(until, time.time())}")


@relayclients.command("del")
@ROOT
@click.argument("ip", metavar="IP")
def relayclients_del(root: str, ip: str) -> None:
    """Stop IP relaying through the table (tcp.smtp's own rules stay).

    Writes the relay table (ROOT/relay/ or [relay] store).
    """
    ip = _ip(ip)
    if _with_table(root, lambda table, settings: table.revoke(ip)):
        click.echo(f"qrelay: removed {ip}")
    else:
        click.echo(f"qrelay: {ip} was not in the relay table")


@relayclients.command("import")
@ROOT
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True))
def relayclients_import(root: str, file: str) -> None:
    """Read vpopmail's open-smtp file (`-` = stdin) into the table.

    Each `IP:allow,RELAYCLIENT="",RBLSMTPD=""<TAB>TIME` line keeps its
    remaining lifetime (TIME + [relay] pop_before_smtp_ttl - now, at most
    pop_before_smtp_ttl); expired
    lines are skipped and counted; malformed lines are reported on stderr
    with their line numbers (exit status 1 if there were any). Reads FILE,
    writes the relay table.
    """
    from engine.relay.opensmtp import parse_open_smtp
    if file == "-" and sys.stdin is None:      # descriptor 0 closed (<&-)
        raise BadInput("-: standard input is closed")
    try:
        data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise BadInput(f"{file}: {exc.strerror or exc}") from None
    lines, bad = parse_open_smtp(data.decode("utf-8", "replace"))
    for number, why in bad:
        click.echo(f"{file}:{number}: {why}", err=True)

    async def load(table: Any, settings: Any) -> tuple[int, int]:
        ttl, now = settings.relay.pop_before_smtp_ttl, table.clock()
        # A login time in the future (a wrong clock, milliseconds) counts as
        # now: no line may keep an IP relaying longer than a login would.
        fresh = [(line.ip, min(line.login_time + ttl - now, ttl)) for line in lines]
        fresh = [(ip, left) for ip, left in fresh if left > 0]
        return await table.grant_many(fresh), len(lines) - len(fresh)

    imported, expired = _with_table(root, load)
    click.echo(f"qrelay: imported {imported}, skipped {expired} expired, "
               f"{len(bad)} malformed")
    if bad:
        sys.exit(1)


@relayclients.command("export")
@ROOT
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="file to write (default: stdout)")
def relayclients_export(root: str, output: str) -> None:
    """Write the table as vpopmail's open-smtp lines.

    Each line's TIME is its expiry minus [relay] pop_before_smtp_ttl (the
    login time vpopmail would have written). Reads the relay table, writes
    --output (atomically) or stdout.
    """
    from engine.accounts.files import atomic_write
    from engine.relay.opensmtp import format_open_smtp
    if not output:
        raise BadInput("--output: an empty file name (- is stdout)")

    async def dump(table: Any, settings: Any) -> str:
        return format_open_smtp(await table.entries(), settings.relay.pop_before_smtp_ttl)

    text = _with_table(root, dump)
    if output == "-":
        click.echo(text, nl=False)
        return
    try:
        atomic_write(output, text.encode(), mode=0o644)
    except OSError as exc:
        raise BadInput(f"{output}: {exc.strerror or exc}") from None
