"""Creating a qmail-style home (`qrelay init ROOT`).

The layout is qmail's, so an operator can point qrelay at an existing
/var/qmail and keep every file:

    ROOT/control/   me, rcpthosts, defaultdomain, locals, concurrencyremote,
                    queuelifetime, databytes, smtproutes, tcp.smtp
    ROOT/users/     users/assign (local delivery)
    ROOT/queue/     qrelay's spool
    ROOT/log/       qmail-send style log (multilog layout)
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path

# Where every command looks when no ROOT is given (and $QRELAY_ROOT is unset).
DEFAULT_ROOT = "/var/qrelay"


def default_root(env: Mapping[str, str] | None = None) -> str:
    """ROOT when none is given: $QRELAY_ROOT, else /var/qrelay."""
    env = os.environ if env is None else env
    return env.get("QRELAY_ROOT") or DEFAULT_ROOT

# Values qmail uses when a file is absent; written out so an operator sees them.
DEFAULT_CONTROLS = {
    "concurrencyremote": "20",
    "queuelifetime": "604800",
    "databytes": "0",
    "smtproutes": "",
}

# tcprules text: loopback may relay, IPv4 and IPv6 ("localhost" is ::1 first
# once a listener is on [::1]); everyone else may connect (rcpthosts applies).
DEFAULT_TCP_SMTP = '127.:allow,RELAYCLIENT=""\n::1:allow,RELAYCLIENT=""\n:allow\n'


# Dot-separated labels of letters, digits, `-` and `_` (an IDN in its
# xn-- form).
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


class HomeError(Exception):
    """The root cannot be created as asked."""


def default_me() -> str:
    # gethostname() asks no resolver: `init` must never touch DNS.
    return socket.gethostname() or "localhost"


def init_home(root: Path | str, me: str | None = None, force: bool = False) -> Path:
    """Create ROOT with qmail's control files; refuse an existing root unless force."""
    root = Path(root)
    me = default_me() if me is None else me
    if not _HOST_NAME.fullmatch(me):
        # Anything else (a space, `a..b`, a trailing dot, `:port`) would be
        # matched by no recipient's domain in rcpthosts and locals.
        raise HomeError(f"invalid host name for --me: {me!r}")
    if root.exists() and not root.is_dir():
        raise HomeError(f"{root} exists and is not a directory")
    if (root / "control").exists() and not force:
        raise HomeError(f"{root} is already a qrelay/qmail home (control/ exists); use --force to overwrite")
    control = root / "control"
    made_root = not root.exists()
    for d in (control, root / "users", root / "queue", root / "log"):
        d.mkdir(parents=True, exist_ok=True)
    # Modes of their own, as qmail's installer sets them (hier.c): under
    # root's umask 077 the run user could read neither the root nor control/.
    # A root that existed keeps the mode its operator gave it.
    for d in ((root,) if made_root else ()) + (control, root / "users"):
        os.chmod(d, 0o755)
    files = {
        "me": me,
        "rcpthosts": me,
        "defaultdomain": me.split(".", 1)[1] if "." in me else me,
        "locals": me,
        **DEFAULT_CONTROLS,
    }
    from engine.accounts.files import atomic_write   # (not on every CLI command's import)
    for name, value in files.items():
        atomic_write(control / name, (value + "\n" if value else "").encode(), mode=0o644)
    atomic_write(control / "tcp.smtp", DEFAULT_TCP_SMTP.encode(), mode=0o644)
    return root

