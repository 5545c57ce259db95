"""`qrelay run`: the supervisor in the foreground (engine/run.py does the work)."""
from __future__ import annotations

import click

from engine.cli.base import ROOT, cli, discard_output
from engine.smtp.listeners import SCHEMES
from engine.home import HomeError, init_home

# Receiver processes at most: each costs a Python process and a row of the
# shared connection table (engine.smtp.connlimit, 64 KiB), sized before any start.
MAX_PROCS = 1024


@cli.command()
@ROOT
@click.option("--listen", "listen", multiple=True, metavar="[SCHEME://]HOST:PORT",
              help="address to serve on (repeatable; default smtp://0.0.0.0:25; port 0 = any "
                   "free port); SCHEME: " + ", ".join(SCHEMES))
@click.option("--procs", type=click.IntRange(min=1, max=MAX_PROCS), default=None,
              help="receiver processes (default: the number of CPUs)")
@click.option("--dev", is_flag=True, help="create ROOT with `qrelay init` defaults if it does not exist")
@click.option("--port-file", type=click.Path(dir_okay=False), default=None,
              help="write the bound port(s), one per line, to this file once listening")
def run(root: str, listen: tuple[str, ...], procs: int | None, dev: bool, port_file: str | None) -> None:
    """Run qrelay in the foreground: SMTP receivers, the scheduler and its deliveries, until SIGTERM.

    \b
    Reads:  ROOT/control/* (qmail's control files), control/tcp.smtp.cdb
            (else control/tcp.smtp), ROOT/qrelay.toml, users/cdb (else
            users/assign), the vpopmail domains' vpasswd and .qmail files,
            control/servercert.pem (certificate + key: STARTTLS, and the
            submissions/pop3s listeners, which refuse to start without it);
            changes are picked up on HUP, or once they have held for
            reload_poll_seconds.
    Writes: ROOT/queue/ (the spool; queue/lock/sendmutex is held while it
            runs, so a second `qrelay run` on ROOT refuses to start),
            the mailboxes of local deliveries, ROOT/run/metrics/ (every
            process's counters, emptied at start; served with the status
            page by an `http://` listener, loopback only by default).
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
        # The line is for a person: a stdout closed (>&-) or that nobody reads
        # any more (`| head -1`) is never a reason to stop.
        if sys.stdout is not None:
            try:
                click.echo(f"qrelay: listening on {where} (root {root}); stop with Ctrl-C or kill -TERM {pid}")
                sys.stdout.flush()
            except BrokenPipeError:
                discard_output(sys.stdout)
        if port_file:
            tmp = port_file + ".tmp"
            try:
                with open(tmp, "w") as f:
                    f.write("".join(f"{a.port}\n" for a in bound))
                os.replace(tmp, port_file)
            except OSError as exc:   # nothing has started yet: serve closes what it opened
                raise click.ClickException(
                    f"cannot write --port-file {port_file}: {exc.strerror}") from None

    try:
        status = serve(base, addresses, procs or os.cpu_count() or 1, announce)
    except (ConfigError, ListenError, AlreadyRunning) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)
