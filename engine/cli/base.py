"""The `qrelay` command group and what its subcommands share.

Every subcommand reports bad input as a one-line error and a non-zero exit
status, never a traceback. ROOT, the first argument of every command that
has one, may be left out: it defaults to $QRELAY_ROOT, else /var/qrelay.
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

from engine import __version__
from engine.home import DEFAULT_ROOT, default_root


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
        with _one_line_usage(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        with _one_line_usage(ctx):      # a value the command itself finds bad
            try:
                return super().invoke(ctx)
            except BrokenPipeError:
                raise                   # click's: the reader is gone, nothing to say
            except OSError as exc:
                # A ROOT (or file in it) this user may not reach: pathlib's
                # is_dir()/is_file() raise EACCES rather than answer False.
                raise click.ClickException(os_error_line(exc)) from None

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

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line_usage(ctx):
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        with _one_line_usage(ctx):      # `No such command`
            return super().resolve_command(ctx, args)


@contextmanager
def _one_line_usage(ctx: click.Context):
    """Click's usage errors (unknown option, missing argument, bad value) as
    one line and exit status 2, like every other bad input, instead of the
    usage text, a hint and the error on three."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise       # a group alone: its help, as click shows it
    except click.UsageError as exc:
        raise BadInput(f"{exc.format_message().rstrip('.')} (see: {ctx.command_path} --help)") from None


def _not_empty(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # An empty word (`"$ROOT"` unset) would be the current directory.
    if value == "":
        raise click.BadParameter("empty (leave ROOT out for $QRELAY_ROOT, else /var/qrelay)")
    return value


# ROOT: optional, first; see _RootFirstCommand.
ROOT = click.argument("root", type=click.Path(file_okay=False), required=False,
                       default=default_root, callback=_not_empty)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="qrelay")
def cli() -> None:
    """qrelay: a fast, crash-safe mail transfer agent that reads qmail's files.

    ROOT, the first argument of a command, is a qmail-style home (control/,
    users/, queue/, log/); left out, it is $QRELAY_ROOT, else /var/qrelay.
    `qrelay COMMAND --help` says what each command reads and writes.
    """



def discard_output(stream) -> None:
    """Point `stream`'s descriptor at /dev/null: what is still buffered for a
    reader that is gone (`| head -1`) goes nowhere at exit, without a second
    BrokenPipeError from the interpreter's own flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: `FILE: reason`."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


class BadInput(click.ClickException):
    """One line `Error: ...` on stderr, exit status 2 (bad input, like a usage error)."""
    exit_code = 2


def reload_running(root: str) -> None:
    """A running `qrelay run` on ROOT reloads now, not at its next settled poll:
    vadddomain and vdeldomain HUP qmail-send, and tcpserver reads a new
    tcp.smtp.cdb at its next connection."""
    import signal
    from engine.delivery.service import signal_running_scheduler
    signal_running_scheduler(root, signal.SIGHUP)


def spool_started(base) -> bool:
    """Was anything ever queued under the root `base` (a Path)? A one-line
    error, not a traceback, when its queue/ may not be looked into: the spool
    belongs to the run user, and other users must ask as root."""
    try:
        return (base / "queue" / "index" / "data.mdb").exists()
    except PermissionError as exc:
        raise click.ClickException(f"{exc.filename}: {exc.strerror} (the spool belongs to "
                                   "qrelay's run user: run this as root or as that user)") from None


@contextmanager
def spool_of(root: str, *, readonly: bool, error: type[click.ClickException] = click.ClickException,
             empty: str | None = None, settings=None):
    """ROOT's spool for a command: opened, used and closed as the spool's owner
    (engine.queue.spool.owners_spool), so a root tool never opens, as root, a
    file the run user could have swapped for a link. Yields None when nothing
    was ever queued there, or raises error(empty) if `empty` is given; a root
    that is not one, or a spool that cannot be opened, is error(one line).
    `settings`: ROOT's, when the caller has read them already (as root)."""
    from engine.config.settings import SettingsError, load_settings
    from engine.queue import SpoolError
    from engine.queue.spool import owners_spool
    base = Path(root)
    if not base.is_dir():
        raise error(f"{root}: no such qrelay root")
    if not (base / "queue").is_dir():
        raise error(f"{root}: not a qrelay root (no queue/ directory)")
    if (base / "queue" / "mess").is_dir() and (base / "queue" / "todo").is_dir():
        # A qmail home turned qrelay root: its mail is not in the spool yet.
        click.echo(f"qrelay: note: {base / 'queue'} holds a qmail queue that is not counted "
                   f"here: qrelay import-qmail {root} {base / 'queue'}", err=True)
    if not spool_started(base):
        if empty is not None:
            raise error(empty)
        yield None
        return
    try:
        if settings is None:
            settings = load_settings(base)      # as root: qrelay.toml may be root's alone
    except SettingsError as exc:
        raise error(str(exc)) from None
    with ExitStack() as stack:
        try:
            spool = stack.enter_context(owners_spool(base / "queue", settings.spool,
                                                     readonly=readonly))
        except (SpoolError, OSError) as exc:
            text = str(exc)
            if os.geteuid() == 0 and "Permission denied" in text:
                st = (base / "queue").stat()
                if st.st_uid != 0:
                    # Root acted as the spool's owner: something in it is root's
                    # (left by an older qrelay run as root); `qrelay run` gives it back.
                    text += (f" (root acts as the owner of {base / 'queue'} here: "
                             f"chown -R {st.st_uid}:{st.st_gid} {base / 'queue'})")
            raise error(text) from None
        yield spool


class Progress:
    """A long command's progress on stderr: `qrelay: COMMAND: N of TOTAL WHAT
    (T s)`, at most once every `every` seconds and not before the first `every`
    (a command done sooner prints only its result). Called as
    `progress(what, done, total)` by the code doing the work."""

    def __init__(self, command: str, every: float = 2.0, clock=None) -> None:
        import time
        self.command = command
        self.every = every
        self.clock = clock or time.monotonic
        self.start = self.last = self.clock()

    def __call__(self, what: str, done: int, total: int) -> None:
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        click.echo(f"qrelay: {self.command}: {done} of {total} {what} ({now - self.start:.0f} s)",
                   err=True)
