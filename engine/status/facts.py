"""What the status service shows: queue facts from the spool (read-only),
counter totals from the metrics directory, recent deliveries from the log.

Owns no state that matters: everything here is read from files other
processes own, and cached so a page kept open (or a scraper) costs little:
- the O(1) counts (messages, not preprocessed) at most once per
  `[status] cache_seconds`;
- the queue summary (qshape's destinations × age, `Spool.shape`; the oldest
  message and the deferred destinations with their last error,
  engine.queue.health as `qrelay doctor` reads them) at most once per
  cache_seconds and never more often than 10 × the time the last one took,
  in a thread, while the previous one is served;
- the tail of ROOT/log/current (qmail-send's `starting delivery` and
  `delivery` lines), at most 256 KB per read.
It never writes the spool, the log or the metrics files, except that it
drops the live-gauge files of processes that are gone (mark_process_dead).
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.log import TAI64_EPOCH

LOG_TAIL_BYTES = 256 * 1024
# Rates are the counters' change over about this many seconds.
RATE_WINDOW = 5.0
_WORDS = {"success": "delivered", "deferral": "deferred", "failure": "bounced"}
_STARTING = re.compile(r"starting delivery (\d+): msg (\d+) to (\S+) (.*)$")
_RESULT = re.compile(r"delivery (\d+): (success|deferral|failure): (.*)$")


@dataclass(slots=True)
class QueueSummary:
    """The open recipients, counted (at `taken`)."""
    taken: float = 0.0               # unix time the scan started
    seconds: float = 0.0             # how long it took
    oldest_birth: float | None = None
    recipients: dict[str, int] = field(default_factory=dict)   # pending, deferred
    age_buckets: list[str] = field(default_factory=list)       # qshape's columns
    shape: list[dict] = field(default_factory=list)     # top destinations × age buckets
    deferred: list[dict] = field(default_factory=list)  # top deferred destinations


def summarize(spool: Any, now: float, top: int) -> QueueSummary:
    """qshape's table (Spool.shape: messages per destination by age) and
    doctor's queue health (engine.queue.health: the oldest message, deferred
    destinations with their last error): two lean passes over the index."""
    from engine.queue.health import queue_health
    started = time.monotonic()
    shape = spool.shape(now, top)
    health = queue_health(spool, top)
    bounds = list(shape.buckets)
    return QueueSummary(
        taken=now, seconds=time.monotonic() - started, oldest_birth=health.oldest_birth,
        recipients={"pending": health.pending, "deferred": health.deferred},
        age_buckets=[f"{b}m" for b in bounds] + [f"{bounds[-1]}m+"],
        shape=[{"destination": d, "total": total, "ages": list(row)}
               for d, total, row in shape.rows],
        deferred=[{"destination": d.domain, "count": d.deferred, "next_try": d.next_try,
                   "last_error": d.last_error.strip()} for d in health.destinations])


class SpoolReader:
    """ROOT's spool opened read-only when it exists (a fresh root has none
    until the first message), kept open; reopened after an error."""

    def __init__(self, root: Path, settings: Any) -> None:
        self.queue = root / "queue"
        self.settings = settings
        self.spool: Any = None

    def get(self) -> Any:
        if self.spool is None and (self.queue / "index" / "data.mdb").exists():
            from engine.queue import Spool
            self.spool = Spool(self.queue, self.settings.spool, readonly=True,
                               warn=lambda text: None)
        return self.spool

    def counts(self) -> dict:
        """Messages and not preprocessed: O(1) (the tables' entry counts)."""
        spool = self.get()
        if spool is None:
            return {"messages": 0, "not_preprocessed": 0}
        try:
            stats = spool.stats()
        except Exception:
            self.close()
            raise
        return {"messages": stats.messages, "not_preprocessed": stats.not_preprocessed}

    def summary(self, now: float, top: int) -> QueueSummary:
        spool = self.get()
        if spool is None:
            return QueueSummary(taken=now)
        try:
            return summarize(spool, now, top)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


def tai64n_time(label: str) -> float:
    """Unix time of a `@4000...` multilog stamp (0.0 if it is not one)."""
    try:
        return int(label[1:17], 16) - TAI64_EPOCH + int(label[17:25], 16) / 1e9
    except ValueError:
        return 0.0


def _tail_lines(path: Path, limit: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return []
    lines = data.decode("ascii", "replace").split("\n")
    return lines[1:] if size > limit else lines


def _json_event(line: str) -> dict | None:
    """A line of `[log] format = "json"` as its object, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _rfc3339_time(text: object) -> float:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


def recent_deliveries(log_dir: Path, count: int) -> list[dict]:
    """The last `count` delivery results of qmail-send's log (either format),
    newest first: ROOT/log/current, and the newest rotated file when current
    is short."""
    lines = _tail_lines(log_dir / "current", LOG_TAIL_BYTES)
    if sum("delivery" in ln for ln in lines) < 2 * count:
        rotated = sorted(glob.glob(str(log_dir / "@*.s")))
        if rotated:
            lines = _tail_lines(Path(rotated[-1]), LOG_TAIL_BYTES) + lines
    started: dict[str, tuple[str, str, str]] = {}
    results: deque[dict] = deque(maxlen=count)
    for line in lines:
        if len(started) > 10_000:     # starts whose result is not in the tail
            started.clear()
        if line.startswith("{"):
            event = _json_event(line)
            if event is None:
                continue
            if event.get("event") == "delivery":
                msgid, channel, rcpt = started.pop(str(event.get("delivery")), ("", "", ""))
                results.append({"time": _rfc3339_time(event.get("time")), "msgid": msgid,
                                "channel": channel, "recipient": rcpt,
                                "result": _WORDS.get(str(event.get("status")), "deferred"),
                                "text": " ".join(str(event.get("text", "")).split())})
            elif event.get("event") == "starting_delivery":
                started[str(event.get("delivery"))] = (str(event.get("msg", "")),
                                                       str(event.get("channel", "")),
                                                       str(event.get("recipient", "")))
            continue
        stamp, _, text = line.partition(" ")
        m = _RESULT.match(text)
        if m:
            number, word, said = m.groups()
            msgid, channel, rcpt = started.pop(number, ("", "", ""))
            # The log's text is logsafe'd (qmail-send: space -> _, LF -> /): readable again.
            results.append({"time": tai64n_time(stamp), "msgid": msgid, "channel": channel,
                            "recipient": rcpt, "result": _WORDS[word],
                            "text": " ".join(said.replace("_", " ").replace("/", " ").split())})
            continue
        m = _STARTING.match(text)
        if m:
            number, msgid, channel, rcpt = m.groups()
            started[number] = (msgid, channel, rcpt)
    return list(reversed(results))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_dead_gauges(directory: Path) -> int:
    """mark_process_dead for every process whose live-gauge file is left
    (a restarted receiver): its open sessions are no longer open."""
    from prometheus_client import multiprocess
    dropped = 0
    for path in directory.glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if pid.isdigit() and not alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), str(directory))
            dropped += 1
    return dropped


def collect_metrics(directory: Path) -> list:
    """Every process's metric families, summed (prometheus_client's
    MultiProcessCollector). A file that cannot be read, one a process is
    making (empty for a moment) or a damaged one, is left out: it must not
    take every other process's numbers with it."""
    from prometheus_client.multiprocess import MultiProcessCollector
    files = [str(p) for p in sorted(directory.glob("*.db"))]
    try:
        return list(MultiProcessCollector.merge(files))
    except Exception:   # noqa: BLE001 - find the files that spoil it (rare: read twice)
        pass
    readable = []
    for name in files:
        try:
            MultiProcessCollector.merge([name])
        except Exception:   # noqa: BLE001
            continue
        readable.append(name)
    return list(MultiProcessCollector.merge(readable))


def counter_totals(families: Any) -> dict:
    """The numbers the page shows, from the collected metric families."""
    totals: dict[str, float] = {"received": 0.0, "tempfail": 0.0, "delivered": 0.0,
                                "deferred": 0.0, "bounced": 0.0, "sessions": 0.0,
                                "sessions_active": 0.0}
    channels: dict[str, dict[str, float]] = {}
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "qrelay_messages_received_total":
                key = "received" if labels.get("result") == "queued" else "tempfail"
                totals[key] += value
            elif name == "qrelay_deliveries_total":
                result = labels.get("result", "")
                if result in ("delivered", "deferred", "bounced"):
                    totals[result] += value
                    per = channels.setdefault(labels.get("channel", ""), {})
                    per[result] = per.get(result, 0.0) + value
            elif name == "qrelay_sessions_total" and labels.get("result") == "accepted":
                totals["sessions"] += value
            elif name == "qrelay_sessions_active":
                totals["sessions_active"] += value
    totals_out: dict[str, Any] = dict(totals)
    totals_out["by_channel"] = channels
    return totals_out


class Rates:
    """Per-second rates of the counters, from samples taken at each refresh."""

    KEYS = ("received", "delivered", "deferred", "bounced", "sessions")

    def __init__(self) -> None:
        self.samples: deque[tuple[float, dict]] = deque(maxlen=120)

    def add(self, mono: float, totals: dict) -> dict[str, float]:
        self.samples.append((mono, {k: totals.get(k, 0.0) for k in self.KEYS}))
        base = self.samples[0]
        for sample in self.samples:
            if mono - sample[0] <= RATE_WINDOW:
                break
            base = sample
        span = mono - base[0]
        if span <= 0:
            return {k: 0.0 for k in self.KEYS}
        latest = self.samples[-1][1]
        # A counter that went down (the run restarted) counts from zero.
        return {k: max(0.0, latest[k] - base[1][k]) / span for k in self.KEYS}
