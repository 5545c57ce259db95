"""qmail-send's retry schedule and queuelifetime (spec §6.2, §6.3).

Owns only arithmetic on times: when a job is tried next, and whether a
message is "dying" (past queuelifetime: one last attempt, whose deferrals
become failures). It never reads the clock itself; callers pass `now`, so
tests drive it with an injected clock.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# qmail-send's chanskip[]: local 10, remote 20.
LOCAL_SKIP = 10
REMOTE_SKIP = 20
DEFAULT_QUEUELIFETIME = 604800

DYING_TEXT = "I'm not going to try again; this message has been in the queue too long.\n"


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """Retry parameters: qmail's by default, changeable through settings."""

    queuelifetime: int = DEFAULT_QUEUELIFETIME
    local_skip: int = LOCAL_SKIP
    remote_skip: int = REMOTE_SKIP

    def skip(self, channel: str) -> int:
        return self.local_skip if channel == "local" else self.remote_skip

    def next_try(self, birth: float, now: float, channel: str) -> float:
        """qmail's nextretry(): birth + (isqrt(now - birth) + C)^2.

        `now` is when the job was opened (the attempt that just deferred);
        times are whole seconds in qmail, so the square root is of the
        integer age.
        """
        age = int(now - birth) if now > birth else 0
        n = math.isqrt(age) + self.skip(channel)
        return birth + n * n

    def is_dying(self, birth: float, now: float) -> bool:
        """flagdying: now > birth + queuelifetime, judged when the job is opened."""
        return now > birth + self.queuelifetime

    @staticmethod
    def final_result(status: str, text: str, dying: bool) -> tuple[str, str]:
        """A deferral (Z) of a dying job becomes a failure (D) with qmail's sentence."""
        if dying and status == "Z":
            if text and not text.endswith("\n"):
                text += "\n"
            return "D", text + DYING_TEXT
        return status, text
