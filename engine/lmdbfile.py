"""What LMDB does not check when it opens a file: that the file holds the pages
its meta page names.

LMDB reads pages through a map; a data.mdb cut short (a copy or a restore
stopped half way, a damaged disk) opens fine, and the first read of a page past
the end is SIGBUS, which kills the process, and again at each restart. The spool
index (engine.queue.index) and the embedded relay table (engine.relay.embedded)
ask here first.
"""
from __future__ import annotations

import os

import lmdb


def truncation(env: lmdb.Environment, data: os.PathLike | str) -> str | None:
    """Why `env`'s data file `data` cannot be read safely: `... is truncated (N
    bytes; its pages need M)`, or None when it holds every page. OSError if it
    cannot be looked at."""
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.stat(data).st_size
    if size < need:
        return f"{data} is truncated ({size} bytes; its pages need {need})"
    return None
