"""flood's result as data (--json) and as tables (the end-of-run summary),
plus the live progress line. One dict feeds both, so they never disagree.
"""
from __future__ import annotations

import sys
import time

from .client import FloodStats


def build_report(stats: FloodStats, target: str, settings: dict, requested: int) -> dict:
    elapsed = max(stats.finished - stats.started, 1e-9) if stats.started else 0.0
    replies = sorted(({"stage": s, "code": c, "text": t, "count": n}
                      for (s, c, t), n in stats.replies.items()),
                     key=lambda r: (-r["count"], r["code"], r["stage"]))
    return {
        "tool": "flood.py",
        "target": target,
        "settings": settings,
        "elapsed_s": round(elapsed, 4),
        "messages": {
            "requested": requested,
            "attempted": stats.attempted,
            "sent": stats.sent,
            "accepted": stats.accepted,
            "tempfailed": stats.tempfailed,
            "permfailed": stats.permfailed,
            "conn_failed": stats.conn_failed,
            "unfinished": stats.unfinished,
        },
        "recipients": {"accepted": stats.rcpt_accepted, "rejected": stats.rcpt_rejected},
        "connections": {"opened": stats.connections, "errors": dict(stats.conn_errors)},
        "tls": {"handshakes": stats.tls_handshakes, "resumed": stats.tls_resumed},
        "replies": replies,
        "rate": {
            "accepted_per_s": round(stats.accepted / elapsed, 1) if elapsed else 0.0,
            "attempted_per_s": round(stats.attempted / elapsed, 1) if elapsed else 0.0,
            "mbytes_per_s": round(stats.bytes_sent / elapsed / 1e6, 3) if elapsed else 0.0,
        },
        "latency_ms": {
            "connect": stats.connect_latency.summary_ms(),
            "transaction": stats.txn_latency.summary_ms(),
        },
    }


def print_summary(report: dict, file=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape  # server texts and names are not markup
    from rich.table import Table

    console = Console(file=file or sys.stdout, highlight=False)
    m = report["messages"]
    rate = report["rate"]
    head = Table(title=f"flood → {escape(report['target'])}", box=box.SIMPLE_HEAVY,
                 show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column(justify="right")
    rows = [
        ("attempted", f"{m['attempted']:,}"),
        ("sent (DATA complete)", f"{m['sent']:,}"),
        ("accepted", f"[green]{m['accepted']:,}[/]"),
        ("temp-failed (4xx)", _warn(m["tempfailed"])),
        ("perm-failed (5xx)", _warn(m["permfailed"])),
        ("connection errors", _warn(m["conn_failed"])),
    ]
    if m["unfinished"]:
        rows.append(("cut at end of --duration", f"{m['unfinished']:,}"))
    rows += [
        ("recipients accepted / rejected",
         f"{report['recipients']['accepted']:,} / {report['recipients']['rejected']:,}"),
        ("connections opened", f"{report['connections']['opened']:,}"),
    ]
    if report["tls"]["handshakes"]:
        rows.append(("TLS handshakes / resumed",
                     f"{report['tls']['handshakes']:,} / {report['tls']['resumed']:,}"))
    rows += [
        ("elapsed", f"{report['elapsed_s']:.3f} s"),
        ("messages/s (accepted)", f"[bold cyan]{rate['accepted_per_s']:,.1f}[/]"),
        ("attempts/s", f"{rate['attempted_per_s']:,.1f}"),
        ("MB/s", f"{rate['mbytes_per_s']:.2f}"),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)

    lat = Table(title="latency (ms)", box=box.SIMPLE_HEAVY, title_justify="left")
    for col in ("", "n", "p50", "p90", "p99", "max"):
        lat.add_column(col, justify="right" if col else "left")
    for name, key in (("connect→greeting", "connect"), ("MAIL→end of DATA", "transaction")):
        s = report["latency_ms"][key]
        lat.add_row(name, f"{s['n']:,}", f"{s['p50']:.2f}", f"{s['p90']:.2f}",
                    f"{s['p99']:.2f}", f"{s['max']:.2f}")
    console.print(lat)

    if report["replies"]:
        rep = Table(title="4xx/5xx replies", box=box.SIMPLE_HEAVY, title_justify="left")
        for col in ("stage", "code", "text", "count"):
            rep.add_column(col, justify="right" if col in ("code", "count") else "left")
        for r in report["replies"]:
            style = "yellow" if r["code"] < 500 else "red"
            rep.add_row(r["stage"], f"[{style}]{r['code']}[/]", escape(r["text"]), f"{r['count']:,}")
        console.print(rep)
    errors = report["connections"]["errors"]
    if errors:
        ce = Table(title="connection errors", box=box.SIMPLE_HEAVY, title_justify="left")
        ce.add_column("error")
        ce.add_column("count", justify="right")
        for kind, n in sorted(errors.items(), key=lambda kv: -kv[1]):
            ce.add_row(escape(kind), f"[red]{n:,}[/]")
        console.print(ce)


def _warn(n: int) -> str:
    return f"[red]{n:,}[/]" if n else "0"


class ProgressLine:
    """A live line on stderr: rich when stderr is a terminal, else one plain
    line per second (so logs of CI runs show progress too); nothing if quiet."""

    def __init__(self, target: str, total: int, quiet: bool):
        self.target = target
        self.total = total
        self.quiet = quiet
        self.live = None
        self.t0 = time.monotonic()
        self.last_t = self.t0
        self.last_attempted = 0
        self.last_plain = self.t0  # plain lines: first after a second of running
        self.rate = 0.0
        if quiet:
            return
        from rich.console import Console
        console = Console(file=sys.stderr)
        self.plain = not console.is_terminal
        if not self.plain:
            from rich.live import Live
            self.live = Live(console=console, auto_refresh=False, transient=True)
            self.live.start()

    def update(self, snap: dict, open_conns: int) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        dt = now - self.last_t
        if dt >= 0.2:
            self.rate = (snap["accepted"] - self.last_attempted) / dt
            self.last_attempted = snap["accepted"]
            self.last_t = now
        total = f"/{self.total:,}" if self.total else ""
        errors = snap["errors"]
        line = (f"flood → {self.target}  {snap['attempted']:,}{total} msgs  "
                f"{snap['accepted']:,} ok  {self.rate:,.0f} msg/s  "
                f"errors {errors:,} (4xx {snap['tempfailed']:,}, 5xx {snap['permfailed']:,}, "
                f"conn {snap['conn_failed']:,})  conns {open_conns}  {now - self.t0:.1f}s")
        if self.live is not None:
            from rich.text import Text
            style = "red" if errors else "green"
            self.live.update(Text(line, style=style), refresh=True)
        elif now - self.last_plain >= 1.0:
            self.last_plain = now
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
