"""Restart backoff, one schedule for every restarted thing (supervised children,
delivery workers): the first restart after 0.1 s, doubling to 10 s while it
keeps dying quickly, back to 0.1 s once it has run 30 s."""
from __future__ import annotations

import time
from collections.abc import Callable

START = 0.1
MAX = 10.0
# A process that ran this long before dying is restarted at once (backoff reset).
HEALTHY_AFTER = 30.0


class Backoff:
    __slots__ = ("delay", "started_at", "clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.delay = START
        self.started_at = 0.0

    def started(self) -> None:
        self.started_at = self.clock()

    def died(self) -> float:
        """The wait before the next start; the one after it doubles."""
        if self.clock() - self.started_at >= HEALTHY_AFTER:
            self.delay = START
        delay, self.delay = self.delay, min(MAX, self.delay * 2)
        return delay
