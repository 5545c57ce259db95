"""vpopmail's USERDIR/lastauth: the address of a user's last login, its mtime the time.

vchkpw writes it after every successful login (POP3, SMTP AUTH, IMAP: vpopmail's
auth logging, on by default); qmailadmin and `vuserinfo` show it, and sites
find unused accounts by its mtime. `record` does the same for qrelay's POP3
and SMTP AUTH: best effort (a user directory the receivers cannot write is
skipped, as vpopmail ignores its fopen failing), no fsync (losing the last
login's address in a crash costs nothing). It blocks on the disk: call it in
a worker thread, never on an event loop.
"""
from __future__ import annotations

import os

from engine.privilege import open_own_file

LASTAUTH = "lastauth"
# An address is what vchkpw writes; a longer file is cut here.
MAX_READ = 256


def record(user_dir: str, ip: str) -> bool:
    """Write `ip` as USERDIR/lastauth (its mtime is now); False if it could not be."""
    if not os.path.isabs(user_dir):
        return False            # no directory in vpasswd (a relative one is no better)
    try:
        # O_NONBLOCK: a FIFO the directory's owner put there fails at once
        # (ENXIO) instead of holding this thread in open() for good.
        fd = os.open(os.path.join(user_dir, LASTAUTH), os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        os.write(fd, ip.encode("ascii", "replace"))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read(user_dir: str) -> tuple[str, float] | None:
    """(address, time) of the last login, or None when there was none (or
    it is not a plain file). `qrelay user show` calls this as root in a
    directory the domain's owner writes: engine.privilege.open_own_file
    follows no link and waits on no FIFO, and no more than MAX_READ bytes
    are read."""
    if not user_dir:
        return None             # no directory yet, not the current one
    try:
        fd = open_own_file(os.path.join(user_dir, LASTAUTH), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:             # none, or a link or a special file (NotRegularFile)
        return None
    try:
        mtime = os.fstat(fd).st_mtime
        raw = os.read(fd, MAX_READ)
    except OSError:
        return None
    finally:
        os.close(fd)
    return raw.decode("ascii", "replace").strip(), mtime
