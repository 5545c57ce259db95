"""The segment directory as the spool sees it: reading message bytes back,
listing and sizing segment files, removing them.

Owns queue/segments/ for reading and removal (each writer process appends
to its own segment through engine.queue.segments.SegmentWriter). It never
removes a file before the index commit that let it go is on disk: a machine
crash could otherwise bring back index records pointing into a deleted file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from engine.queue.index import SpoolIndex
from engine.queue.segments import SegmentReader, parse_segment_name, segment_name
from engine.queue.values import SpoolError


class SegmentFiles:
    """The files of `directory`, read through a SegmentReader keeping up to
    `max_open` of them open."""

    def __init__(self, directory: Path, index: SpoolIndex, max_open: int,
                 warn: Callable[[str], None]):
        self.directory = directory
        self.reader = SegmentReader(directory, max_open)
        self._index = index
        self._warn = warn

    def path(self, segid: int) -> Path:
        return self.directory / segment_name(segid)

    def ids(self) -> list[int]:
        """Ids of the segment files on disk (whatever the index says)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [segid for segid in map(parse_segment_name, names) if segid is not None]

    def remove(self, segids: Iterable[int]) -> None:
        """Unlink these segment files, once the index's last commit is synced
        (the commit that let them go); if it cannot be, they are kept."""
        segids = list(segids)
        if not segids:
            return
        if not self._index.readonly:
            try:
                self._index.sync("sync the spool index")
            except SpoolError as exc:
                self._warn(f"warning: {exc}; segments kept")
                return
        for segid in segids:
            self.reader.forget(segid)
            try:
                os.unlink(self.path(segid))
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._warn(f"warning: cannot remove segment {segid}: {exc}")

    def close(self) -> None:
        self.reader.close()
