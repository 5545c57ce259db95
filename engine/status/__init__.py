"""The status service of `qrelay run`: what `--listen http://HOST:PORT` serves.

    /             the status page (page.html + status.js + status.css): queue
                  shape, rates, recent deliveries, deferred destinations;
                  it polls /status.json every second
    /status.json  the numbers behind it
    /metrics      Prometheus text format: every process's counters (engine.
                  metrics, summed from ROOT/run/metrics) and the queue's
                  gauges, read from the spool at scrape time

One process of the service table (engine.run), so neither a scrape nor the
page's polling ever runs on a receiver's or the scheduler's event loop; it
only reads (the spool read-only, the log, the metrics files: engine.status.
facts says how cheaply). The listener is on loopback unless `[status]
allow_remote` says otherwise (checked before anything binds: `check_listen`),
and then the Host header must name a loopback address too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from engine.status.facts import (QueueSummary, Rates, SpoolReader, collect_metrics,
                                 counter_totals, drop_dead_gauges, recent_deliveries)
from engine.status.http import HttpServer, Response, text_response

log = logging.getLogger("qrelay.status")

STATIC = {"/": ("page.html", "text/html; charset=utf-8"),
          "/status.js": ("status.js", "text/javascript; charset=utf-8"),
          "/status.css": ("status.css", "text/css; charset=utf-8")}
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusFacts:
    """The cached facts behind /metrics and /status.json (see facts.py)."""

    def __init__(self, root: Path, settings: Any, metrics_dir: Path,
                 clock=time.time, monotonic=time.monotonic) -> None:
        self.root = root
        self.settings = settings.status
        self.metrics_dir = metrics_dir
        self.reader = SpoolReader(root, settings)
        self.clock = clock
        self.monotonic = monotonic
        self.rates = Rates()
        self.summary = QueueSummary()
        self.summary_next = 0.0            # monotonic: when a new scan may start
        self.scanning: asyncio.Task | None = None
        self.counts: dict = {}
        self.counts_at = float("-inf")
        self.status_doc: dict | None = None
        self.status_at = float("-inf")
        self.families: list = []
        self.families_at = float("-inf")
        self.totals: dict = counter_totals([])
        self.rates_now: dict = {}

    # --- the parts, each cached ----------------------------------------------------

    def queue_basics(self, summary: QueueSummary) -> dict:
        """Messages, not preprocessed (read now: O(1)), the oldest message's
        age (its birth from the last scan)."""
        mono = self.monotonic()
        if mono - self.counts_at >= self.settings.cache_seconds:
            try:
                self.counts = self.reader.counts()
            except Exception as exc:   # noqa: BLE001 - the page says so, the service goes on
                self.counts = {"messages": 0, "not_preprocessed": 0, "error": str(exc)}
            self.counts_at = mono
        oldest = summary.oldest_birth
        age = max(0.0, self.clock() - oldest) if oldest is not None and self.counts["messages"] else 0.0
        return {**self.counts, "oldest_age": age}

    async def queue_summary(self) -> QueueSummary:
        """The last summary; a new scan starts (in a thread) when this one is
        older than cache_seconds and 10 × its own duration. The first call
        waits for it; later ones are served the previous one meanwhile."""
        mono = self.monotonic()
        if self.scanning is None and mono >= self.summary_next:
            self.scanning = asyncio.get_running_loop().create_task(self._scan())
        if self.summary.taken == 0.0 and self.scanning is not None:
            await asyncio.shield(self.scanning)
        return self.summary

    async def _scan(self) -> None:
        top = self.settings.top_destinations
        try:
            self.summary = await asyncio.to_thread(self.reader.summary, self.clock(), top)
        except Exception as exc:   # noqa: BLE001
            log.warning("cannot read the queue: %s", exc)
            self.summary = QueueSummary(taken=self.clock())
        finally:
            self.summary_next = self.monotonic() + max(self.settings.cache_seconds,
                                                       10 * self.summary.seconds)
            self.scanning = None

    def metric_families(self) -> list:
        """Every process's counters, summed (cached for cache_seconds)."""
        mono = self.monotonic()
        if mono - self.families_at >= min(self.settings.cache_seconds, 1.0):
            self.families = []
            if self.metrics_dir.is_dir():
                drop_dead_gauges(self.metrics_dir)
                self.families = collect_metrics(self.metrics_dir)
            self.families_at = mono
            totals = counter_totals(self.families)
            self.rates_now = self.rates.add(mono, totals)
            self.totals = totals
        return self.families

    # --- what is served ------------------------------------------------------------

    async def status(self) -> dict:
        mono = self.monotonic()
        if self.status_doc is not None and mono - self.status_at < self.settings.cache_seconds:
            return self.status_doc
        summary = await self.queue_summary()
        self.metric_families()
        now = self.clock()
        self.status_doc = {
            "now": now,
            "root": str(self.root),
            "queue": {**self.queue_basics(summary), "recipients": summary.recipients,
                      "summary_age": max(0.0, now - summary.taken) if summary.taken else None,
                      "summary_seconds": summary.seconds, "age_buckets": summary.age_buckets,
                      "shape": summary.shape, "deferred": summary.deferred},
            "totals": self.totals,
            "rates": self.rates_now,
            "recent": recent_deliveries(self.root / "log", self.settings.recent_deliveries),
        }
        self.status_at = mono
        return self.status_doc

    async def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest
        from prometheus_client.core import GaugeMetricFamily
        summary = await self.queue_summary()
        basics = self.queue_basics(summary)
        families = list(self.metric_families())
        if "error" not in basics:
            # A spool that cannot be read has no size: absent, not 0 (an
            # alert on the queue's size must not see an empty queue).
            families.append(GaugeMetricFamily("qrelay_queue_messages", "Messages in the queue",
                                              value=basics["messages"]))
            families.append(GaugeMetricFamily("qrelay_queue_not_preprocessed",
                                              "Messages queued but not yet preprocessed",
                                              value=basics["not_preprocessed"]))
            families.append(GaugeMetricFamily("qrelay_queue_oldest_message_age_seconds",
                                              "Age of the oldest message in the queue",
                                              value=basics["oldest_age"]))
        open_ = GaugeMetricFamily("qrelay_queue_recipients",
                                  "Open recipients by state (at the last queue scan)",
                                  labels=("state",))
        for state, n in sorted(summary.recipients.items()):
            open_.add_metric((state,), n)
        families.append(open_)
        deferred = GaugeMetricFamily(
            "qrelay_queue_deferred_recipients",
            "Deferred recipients of the destinations with the most (top [status] top_destinations)",
            labels=("destination",))
        for row in summary.deferred:
            deferred.add_metric((_label(row["destination"]),), row["count"])
        families.append(deferred)
        families.append(GaugeMetricFamily("qrelay_queue_scan_seconds",
                                          "Time the last queue scan took", value=summary.seconds))
        return generate_latest(_Families(families))

    async def handle(self, path: str) -> Response:
        if path == "/metrics":
            return Response(200, PROMETHEUS_TYPE, await self.metrics_text())
        if path == "/status.json":
            body = json.dumps(await self.status(), separators=(",", ":")).encode()
            return Response(200, "application/json", body)
        if path in STATIC:
            name, ctype = STATIC[path]
            return Response(200, ctype, (Path(__file__).parent / name).read_bytes())
        return text_response(404, "not found: try /, /status.json or /metrics")

    def close(self) -> None:
        self.reader.close()


def _label(text: str) -> str:
    """A spool string as a label value: bytes that are not UTF-8 (kept by the
    spool surrogate-escaped; the exposition must be UTF-8) shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Families:
    """What generate_latest needs of a registry: collect()."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def check_listen(addresses: list, settings: Any) -> None:
    """Refuse an http listener that is not on loopback unless [status]
    allow_remote; raises ConfigError (one line)."""
    import ipaddress

    from engine.smtp.config import ConfigError
    if settings.status.allow_remote:
        return
    for addr in addresses:
        if addr.scheme != "http":
            continue
        try:
            loopback = ipaddress.ip_address(addr.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(
                f"--listen {addr}: the status page and /metrics are served on loopback only"
                " (e.g. http://127.0.0.1:8080); set [status] allow_remote = true in"
                " qrelay.toml to serve them on another address")


def status_main(root: str, listeners: list) -> None:
    """Body of the status process (forked by the supervisor)."""
    import signal

    import uvloop

    from engine.config.settings import load_settings
    from engine.metrics import METRICS_DIR
    from engine.proctitle import set_title

    set_title("qrelay: status")
    rootp = Path(root)
    settings = load_settings(rootp)
    facts = StatusFacts(rootp, settings, rootp / METRICS_DIR)
    st = settings.status
    server = HttpServer(facts.handle, max_connections=st.max_connections,
                        timeout=st.request_timeout, loopback_only=not st.allow_remote)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        servers = [await loop.create_server(server.protocol, sock=listener.sock, backlog=128)
                   for listener in listeners]
        await stop.wait()
        for s in servers:
            s.close()
        server.close_all()

    try:
        uvloop.run(main())
    finally:
        facts.close()
