"""What every part of an open spool works on; engine.queue.spool builds it
once and hands it to Intake, Ledger and Repair. Owns nothing itself."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from engine.queue.index import SpoolIndex
from engine.queue.segfiles import SegmentFiles


@dataclass(slots=True, frozen=True)
class SpoolCore:
    index: SpoolIndex               # the LMDB index and the one way to write to it
    files: SegmentFiles             # segment files: reading bytes back, removing them
    clock: Callable[[], float]      # "now" wherever a caller does not say
    warn: Callable[[str], None]     # one line per warning (Spool's `warn`)
    pid: int                        # this process: what it wrote is its own to index
