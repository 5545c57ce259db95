"""Command-line plumbing shared by the bench tools: one-line errors, exit 2.

An operator typing a wrong flag gets one line naming it, never a usage dump
or a traceback; scripts can rely on exit status 2 for "bad invocation".
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or an unusable target: reported as one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is a single `prog: error: ...` line and exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USAGE)


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` → (host, port); UsageError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise UsageError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or default_host
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"port out of range in {text!r}")
    return host, number


def positive_int(text: str) -> int:
    return int_at_least(text, 1)


def nonneg_int(text: str) -> int:
    return int_at_least(text, 0)


def int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}: {text!r}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def percent(text: str) -> float:
    value = nonneg_float(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100: {text!r}")
    return value


def write_json_atomic(path: str, text: str) -> None:
    """Readers polling the file never see half of it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_writable(option: str, path: str) -> None:
    """UsageError unless write_json_atomic(path) can work: a tool writing its
    result at the end finds out before the run, not after it."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: Is a directory")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8"):
            pass
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror}") from None


def run_main(main: Callable[[], int]) -> NoReturn:
    """A tool's `__main__`: exit with main()'s status; Ctrl-C is status 130 and
    a closed stdout (`| head`) status 1, neither with a traceback."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        os._exit(1)


def install_uvloop():
    """The fastest event loop available: uvloop, else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        import asyncio
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
