"""A bounded, mergeable latency histogram (log-linear buckets, ~0.8% error).

A run of millions of messages keeps a few hundred integers, not a list of
floats, and worker processes merge their histograms in the parent.
"""
from __future__ import annotations

# 2**_MANT sub-buckets per power of two: values below 2**_MANT microseconds
# are exact, larger ones are kept to within 1/2**(_MANT-1).
_MANT = 7
_HALF = 1 << (_MANT - 1)


def _bucket(us: int) -> int:
    shift = us.bit_length() - _MANT
    if shift <= 0:
        return us
    return (shift << (_MANT - 1)) + (us >> shift)


def _bounds(b: int) -> tuple[int, int]:
    """(lowest value, width) in microseconds of bucket b."""
    if b < (1 << _MANT):
        return b, 1
    shift = (b >> (_MANT - 1)) - 1
    return (b - (shift << (_MANT - 1))) << shift, 1 << shift


class LatencyHistogram:
    """Latencies in seconds, recorded as microsecond buckets."""

    __slots__ = ("counts", "n", "total_us", "max_us", "min_us")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total_us = 0
        self.max_us = 0
        self.min_us = 0

    def record(self, seconds: float) -> None:
        us = int(seconds * 1e6)
        if us < 0:
            us = 0
        b = _bucket(us)
        counts = self.counts
        counts[b] = counts.get(b, 0) + 1
        if self.n == 0 or us < self.min_us:
            self.min_us = us
        if us > self.max_us:
            self.max_us = us
        self.n += 1
        self.total_us += us

    def merge(self, other: "LatencyHistogram") -> None:
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        if other.n:
            if self.n == 0 or other.min_us < self.min_us:
                self.min_us = other.min_us
            self.max_us = max(self.max_us, other.max_us)
        self.n += other.n
        self.total_us += other.total_us

    def percentile(self, p: float) -> float:
        """Value in seconds below which p percent of the samples lie (0 if empty)."""
        if not self.n:
            return 0.0
        rank = max(1, -(-self.n * p // 100))  # ceil, nearest-rank method
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                lo, width = _bounds(b)
                mid = lo + (width - 1) / 2
                return min(max(mid, self.min_us), self.max_us) / 1e6
        return self.max_us / 1e6

    def summary_ms(self) -> dict:
        """n, mean, p50, p90, p99, max in milliseconds (for --json and the table)."""
        return {
            "n": self.n,
            "mean": round(self.total_us / self.n / 1e3, 3) if self.n else 0.0,
            "p50": round(self.percentile(50) * 1e3, 3),
            "p90": round(self.percentile(90) * 1e3, 3),
            "p99": round(self.percentile(99) * 1e3, 3),
            "max": round(self.max_us / 1e3, 3),
        }

    def to_state(self) -> dict:
        return {"counts": self.counts, "n": self.n, "total_us": self.total_us,
                "max_us": self.max_us, "min_us": self.min_us}

    @classmethod
    def from_state(cls, state: dict) -> "LatencyHistogram":
        h = cls()
        h.counts = {int(k): v for k, v in state["counts"].items()}
        h.n, h.total_us = state["n"], state["total_us"]
        h.max_us, h.min_us = state["max_us"], state["min_us"]
        return h
