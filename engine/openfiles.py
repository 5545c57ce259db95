"""The open-files limit (RLIMIT_NOFILE) and the connections it leaves room for.

Every SMTP or POP3 connection holds a descriptor in its receiver. A receiver
at its limit cannot accept, and libuv then accepts and closes the waiting
connections to drain the backlog: clients are cut off without a reply and
nothing is logged. So `qrelay run` raises the soft limit to the hard one (what
daemontools' softlimit or systemd's LimitNOFILE do for a service), says when
even that is too small for the connection caps, and each receiver refuses a
connection with a reply and a log line before its descriptors run out
(engine.smtp.receiver.Receiver.admit).
"""
from __future__ import annotations

import resource

# Descriptors a receiver needs besides its connections: listeners, the spool
# writer's socket, log files, DNS and Redis sockets, the metrics files
# (about 35 at rest, measured).
RESERVED = 100


def _nr_open() -> int:
    """The kernel's ceiling for any process's limit (an infinite hard limit
    cannot be set as the soft one)."""
    try:
        with open("/proc/sys/fs/nr_open", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_soft_limit() -> int:
    """Raise this process's soft limit to its hard limit (children inherit it);
    returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass   # a container may refuse: the limit stays, and room() follows it
    return soft


def room(soft: int | None = None) -> int:
    """Connections one receiver may hold under the soft limit `soft` (this
    process's when None)."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return soft - min(RESERVED, soft // 2)


def shortfall(soft: int, connections: int) -> str | None:
    """Why `soft` is too small for `connections` at once in one receiver (any
    receiver may get all of them), or None."""
    if room(soft) >= connections:
        return None
    return (f"open files limit {soft} leaves room for {room(soft)} connections per receiver, "
            f"fewer than the {connections} the connection caps allow: the rest get "
            f"'too many connections'; raise it (ulimit -n, or LimitNOFILE= in the systemd unit)")
