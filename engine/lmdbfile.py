"""What LMDB does not check when it opens a file: that the file holds the pages
its meta page names, and that its lock file has disk blocks.

LMDB reads pages through a map; a data.mdb cut short (a copy or a restore
stopped half way, a damaged disk) opens fine, and the first read of a page past
the end is SIGBUS, which kills the process, and again at each restart. It makes
lock.mdb with ftruncate (a hole) and writes it through a shared map: on a full
disk the first store is SIGBUS too. The spool index (engine.queue.index) and
the embedded relay table (engine.relay.embedded) ask here first.
"""
from __future__ import annotations

import os

import lmdb

# mdb.c: the lock file is MDB_txninfo (two 64-byte cache lines and the first
# reader slot) and a 64-byte MDB_reader for every other reader.
_LOCK_HEAD, _READER_SLOT = 128, 64


def truncation(env: lmdb.Environment, data: os.PathLike | str) -> str | None:
    """Why `env`'s data file `data` cannot be read safely: `... is truncated (N
    bytes; its pages need M)`, or None when it holds every page. OSError if it
    cannot be looked at."""
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.stat(data).st_size
    if size < need:
        return f"{data} is truncated ({size} bytes; its pages need {need})"
    return None


def reserve_lock_file(directory: os.PathLike | str, max_readers: int) -> None:
    """Give `directory`/lock.mdb the disk blocks LMDB will write through its map
    (for `max_readers`, as passed to lmdb.open) before lmdb.open maps it: on a
    full disk lmdb.Error (`path: No space left on device`) here, as lmdb.open
    says its own failures, not SIGBUS in every start that follows. Makes
    `directory` if missing, as lmdb.open would."""
    path = os.path.join(directory, "lock.mdb")
    try:
        os.makedirs(directory, 0o755, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.posix_fallocate(fd, 0, _LOCK_HEAD + max_readers * _READER_SLOT)
        finally:
            os.close(fd)
    except OSError as exc:
        raise lmdb.Error(f"{exc.filename or path}: {exc.strerror}") from None
