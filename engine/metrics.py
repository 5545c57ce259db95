"""The counters every process of `qrelay run` keeps, for /metrics.

Other code calls only the named functions below (`metrics.auth_result("ok")`,
`metrics.delivery_result("remote", "K", 1.5)`), never prometheus_client itself:
the names, labels and buckets live here, once.

prometheus-client in multiprocess mode: the supervisor calls `enable(DIR)`
before it forks (DIR = ROOT/run/metrics, emptied first), so every process of
the tree — receivers, spool writer, scheduler, delivery workers — writes its
own values into mmap'd files `<type>_<pid>.db` there, and the status service
(engine.status) sums them at each scrape. A process that exits leaves its
counter files behind (their totals still count); its live gauges are dropped
by the status service (prometheus_client's mark_process_dead). Without
`enable` (tests, tools) the values stay in the process.

Hot paths call these: each is one dict lookup of a cached labelled child and
one in-memory or mmap write (about 1 µs; bench/bench_metrics.py measures the
calls), and never raises — a broken metric must not cost a message.
Label values come from this code's own vocabulary (a client's words, like an
AUTH mechanism, are mapped onto a fixed set), so no client can grow the
number of series.
"""
from __future__ import annotations

import asyncio
import atexit
import bisect
import multiprocessing.util
import os
from pathlib import Path

# The delivery latency buckets (seconds from queueing to delivery): a local
# Maildir write, a remote hop, then qmail's retry schedule (400 s, 1600 s ...).
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                   900.0, 3600.0, 14400.0, 86400.0, 604800.0)
# qmail's result letters (engine.delivery.channels): K delivered, Z deferred, D failed.
RESULT_WORDS = {"K": "delivered", "Z": "deferred", "D": "bounced"}
AUTH_MECHANISMS = frozenset({"plain", "login", "cram-md5", "apop", "user", "xoauth2"})
ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR = Path("run") / "metrics"     # under ROOT


def enable(directory: Path | str) -> None:
    """Multiprocess mode for this process and every process forked (or
    started with this environment) afterwards: values go to DIRECTORY, which
    is emptied first (a previous run's files would add to this run's
    totals). Call before forking, in the process that holds ROOT's lock."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink(missing_ok=True)
    os.environ[ENV_DIR] = str(path)
    from prometheus_client import values
    values.MmapedDict = _reserved_mmaped_dict()
    # Chosen by prometheus_client at its import from the environment; set it
    # here as well, so it does not matter who imported it first.
    values.ValueClass = values.MultiProcessValue()
    _forget()
    _bound.clear()
    _series.clear()


def _reserved_mmaped_dict() -> type:
    """prometheus_client's MmapedDict, with the disk space of its file taken
    (posix_fallocate) before any of it is mapped. The library makes the file
    with truncate, a hole, and a store into a hole of a mapped file on a full
    disk is SIGBUS: a receiver restarted while the spool's disk was full died
    at its first count, again and again, instead of answering 451. A
    reservation that fails raises OSError, which the callers below drop."""
    from prometheus_client import mmap_dict
    from prometheus_client.mmap_dict import MmapedDict
    initial = getattr(mmap_dict, "_INITIAL_MMAP_SIZE", 1 << 16)   # its first size

    class ReservedMmapedDict(MmapedDict):
        def __init__(self, filename: str, read_mode: bool = False) -> None:
            if not read_mode:
                fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    size = os.fstat(fd).st_size
                    try:
                        os.posix_fallocate(fd, 0, max(size, initial))
                    except OSError:
                        if size == 0:    # made here: no headerless file for the status page
                            os.unlink(filename)
                        raise
                finally:
                    os.close(fd)
            super().__init__(filename, read_mode)

        def _init_value(self, key: str) -> None:
            # An entry is its key, at most 11 bytes of length and padding, and two doubles.
            need = self._used + len(key.encode("utf-8")) + 32
            capacity = self._capacity
            while need > capacity:
                capacity *= 2
            if capacity > self._capacity:    # the library grows the file with truncate
                os.posix_fallocate(self._f.fileno(), 0, capacity)
            super()._init_value(key)
    return ReservedMmapedDict


class _Series:
    """The metric objects of this process, made on first use (after the fork
    and after `enable`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram
        self.received = Counter("qrelay_messages_received",
                                "Messages at the end of DATA: queued, or a 4xx from the spool",
                                ("protocol", "result"), registry=None)
        self.sessions = Counter("qrelay_sessions", "Client connections, by what became of them",
                                ("protocol", "result"), registry=None)
        self.active = Gauge("qrelay_sessions_active", "Client connections open now",
                            ("protocol",), registry=None, multiprocess_mode="livesum")
        self.tls = Counter("qrelay_tls", "TLS handshakes by outcome", ("protocol", "result"),
                           registry=None)
        self.auth = Counter("qrelay_auth", "Authentication attempts by outcome",
                            ("protocol", "mechanism", "result"), registry=None)
        self.deliveries = Counter("qrelay_deliveries", "Delivery results per recipient",
                                  ("channel", "result"), registry=None)
        self.latency = Histogram("qrelay_delivery_latency_seconds",
                                 "Seconds from queueing to delivery, per delivered recipient",
                                 ("channel",), buckets=LATENCY_BUCKETS, registry=None)
        self.spool = Counter("qrelay_spool_commits", "Messages committed by the spool writer",
                             ("result",), registry=None)
        self.connections = Counter("qrelay_remote_connections",
                                   "Outbound SMTP connections opened", ("result",), registry=None)


# Values are added up in this dict and written to the metric objects (their
# mmap'd files) at most FLUSH_SECONDS later, by a timer on the running event
# loop: the hot path is a dict update (a fraction of a µs), not a locked mmap
# write per event. Without a running loop (a thread, a tool) a call writes at
# once. Key: (attribute of _Series, label values..., "inc" | "observe").
# This is process state by nature (one set of counters per process): forgotten
# in a forked child, flushed at the process's exit.
FLUSH_SECONDS = 0.25
_pending: dict[tuple[str, ...], float] = {}
_observed: dict[tuple[str, ...], list[float]] = {}   # histogram key -> [sum, count per bucket...]
_bound: dict[tuple[str, ...], object] = {}
_series: list[_Series] = []
_timer: list[object] = []
_exit_hook: list[object] = []


def _child(key: tuple[str, ...]):
    found = _bound.get(key)
    if found is None:
        if not _series:
            _series.append(_Series())
        attr, *labels, _method = key
        found = _bound[key] = getattr(_series[0], attr).labels(*labels)
    return found


def flush() -> None:
    """Write what was added up to the metric objects (the timer calls this)."""
    _timer.clear()
    pending, observed = dict(_pending), dict(_observed)
    _pending.clear()
    _observed.clear()
    try:
        for key, amount in pending.items():
            _child(key).inc(amount)
        for key, counts in observed.items():
            _write_observations(_child(key), counts)
    except Exception:   # noqa: BLE001 - a metric must never fail its caller
        pass


def _write_observations(histogram, counts: list[float]) -> None:
    # One write per bucket that moved instead of two per observation, through
    # prometheus_client's own fields (the same since 0.4); should they change,
    # the observations are dropped rather than the caller failed.
    buckets = getattr(histogram, "_buckets", None)
    if buckets is None or len(buckets) != len(counts) - 1:
        return
    histogram._sum.inc(counts[0])
    for bucket, n in zip(buckets, counts[1:]):
        if n:
            bucket.inc(n)


def _later() -> bool:
    """Arrange a flush on the running loop; False if there is none."""
    if _timer:
        return True
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    _timer.append(loop.call_later(FLUSH_SECONDS, flush))
    if not _exit_hook:
        # A child of the supervisor ends through multiprocessing, which runs
        # its finalizers, not atexit's: the last sums are written either way.
        _exit_hook.append(multiprocessing.util.Finalize(None, flush, exitpriority=100))
    return True


def _add(key: tuple[str, ...], amount: float = 1.0) -> None:
    pending = _pending
    if key in pending:
        pending[key] += amount
    elif _later():
        pending[key] = amount
    else:
        try:
            _child(key).inc(amount)
        except Exception:   # noqa: BLE001
            pass


def _observe(key: tuple[str, ...], value: float) -> None:
    counts = _observed.get(key)
    if counts is None:
        if not _later():
            try:
                _child(key).observe(value)
            except Exception:   # noqa: BLE001
                pass
            return
        counts = _observed[key] = [0.0] * (len(LATENCY_BUCKETS) + 2)
    counts[0] += value
    counts[1 + bisect.bisect_left(LATENCY_BUCKETS, value)] += 1


def _forget() -> None:
    # In a forked child: the parent's sums are the parent's to write.
    _pending.clear()
    _observed.clear()
    _timer.clear()
    _exit_hook.clear()


os.register_at_fork(after_in_child=_forget)
atexit.register(flush)


# --- receivers (SMTP, POP3) -------------------------------------------------------

def session_opened(protocol: str = "smtp") -> None:
    """A client connection taken (and open until session_closed)."""
    _add(("sessions", protocol, "accepted", "inc"))
    _add(("active", protocol, "inc"))


def session_closed(protocol: str = "smtp") -> None:
    _add(("active", protocol, "inc"), -1.0)


def session_refused(why: str, protocol: str = "smtp") -> None:
    """A connection turned away: "limit" (too many), "denied" (tcprules), "rbl"."""
    _add(("sessions", protocol, why, "inc"))


def message_received(result: str = "queued", protocol: str = "smtp") -> None:
    """A message at the end of DATA: "queued" (250), "tempfail" (451 from the
    spool) or "refused" (552: stored, it is over the spool writer's frame limit)."""
    _add(("received", protocol, result, "inc"))


def tls_result(outcome: str, protocol: str = "smtp") -> None:
    """A TLS handshake: "ok", "failed", ... (the caller's fixed words)."""
    _add(("tls", protocol, outcome, "inc"))


def auth_result(outcome: str, mechanism: str = "", protocol: str = "smtp") -> None:
    """An authentication attempt: outcome "ok", "failed", "aborted", ...;
    `mechanism` may be the client's word: outside the known set it is "other"."""
    mech = mechanism.lower()
    if mech not in AUTH_MECHANISMS:
        mech = "other" if mech else ""
    _add(("auth", protocol, mech, outcome, "inc"))


# --- delivery (scheduler, workers) --------------------------------------------------

def delivery_result(channel: str, status: str, age: float) -> None:
    """One recipient's attempt: qmail's letter (K, Z, D); `age` = seconds
    since the message was queued (observed for delivered recipients)."""
    _add(("deliveries", channel, RESULT_WORDS.get(status, "deferred"), "inc"))
    if status == "K":
        _observe(("latency", channel, "observe"), age if age > 0.0 else 0.0)


def remote_connection(ok: bool) -> None:
    """An outbound SMTP connection opened (or not: refused, timed out)."""
    _add(("connections", "ok" if ok else "failed", "inc"))


# --- spool writer ----------------------------------------------------------------

def spool_commit(result: str) -> None:
    """A message the spool writer committed ("ok") or could not ("write_error", "error")."""
    _add(("spool", result, "inc"))
