"""Queue health: size, oldest message, not yet preprocessed, deferred per
destination with the last error (engine.queue.health, one read pass), and
whether a `qrelay run` holds the root at all. Read-only, like `qrelay qread`:
safe beside a running instance."""
from __future__ import annotations

import os

from engine.doctor import Context, Report, ago
from engine.doctor.disk import _size


def check(ctx: Context, report: Report) -> None:
    from contextlib import ExitStack

    from engine.queue import SpoolError
    from engine.queue.health import queue_health
    from engine.queue.spool import owners_spool
    from engine.run import running_instance
    root = ctx.root
    arg = ctx.arg(root)
    index = root / "queue" / "index"
    if index.is_dir() and not os.access(index, os.R_OK | os.X_OK) \
            and index.stat().st_uid != os.geteuid():
        # The run user's (`qrelay run` as root gives it queue/), not whoever runs doctor.
        report.note("queue", f"{index}: not checked: uid {os.geteuid()} may not read it "
                    f"(it belongs to uid {index.stat().st_uid}); run qrelay doctor as root")
        return
    if not (index / "data.mdb").exists():
        report.note("queue", "empty (nothing was ever queued here)", messages=0)
        return
    with ExitStack() as stack:
        try:
            spool = stack.enter_context(owners_spool(root / "queue", ctx.settings.spool,
                                                     readonly=True))
        except (SpoolError, OSError) as exc:
            report.problem("queue", f"the spool cannot be opened ({exc})",
                           "nothing can be received or delivered", f"qrelay qstat {arg}")
            return
        health = queue_health(spool, ctx.doctor.top_destinations)
        quarantined = len(spool.quarantined())
        index_used, index_map = spool.index.usage()
    oldest = f", the oldest {ago(ctx.now - health.oldest_birth)} old" if health.oldest_birth else ""
    report.note("queue", f"{health.messages} messages{oldest}; "
                f"{health.not_preprocessed} not yet preprocessed"
                + (f", {health.held} on hold (qrelay release)" if health.held else "")
                + f"; recipients: {health.pending} due, {health.deferred} deferred over "
                f"{health.destination_count} destinations",
                messages=health.messages, not_preprocessed=health.not_preprocessed,
                oldest_birth=health.oldest_birth, pending=health.pending,
                deferred=health.deferred, destinations=health.destination_count,
                bouncing=health.bouncing, held=health.held)
    for d in health.destinations:
        report.note("queue", f"deferred: {d.domain}: {d.deferred} recipients, last error: "
                    f"{d.last_error.strip() or '(none)'}", domain=d.domain,
                    deferred=d.deferred, last_error=d.last_error, next_try=d.next_try)
        if d.deferred >= ctx.doctor.deferred_warn:
            report.problem("queue", f"{d.deferred} recipients deferred for {d.domain} "
                           f"({d.last_error.strip() or 'no error text'})",
                           "their mail waits and bounces once queuelifetime runs out",
                           f"qrelay doctor {arg} {d.domain}")
    running = running_instance(root)
    if running is None and health.messages:
        report.problem("queue", f"{health.messages} messages are queued and no qrelay run "
                       "holds this root", "nothing is delivered until it runs",
                       f"qrelay run {arg} (or: systemctl start qrelay)")
    if health.oldest_todo_birth is not None and \
            ctx.now - health.oldest_todo_birth > ctx.doctor.todo_max_age:
        report.problem("queue", f"{health.not_preprocessed} messages not yet preprocessed, the "
                       f"oldest for {ago(ctx.now - health.oldest_todo_birth)}",
                       "the scheduler is not running or cannot keep up: this mail is not even "
                       "tried (qmail's todo backlog)",
                       f"tail {ctx.arg(root / 'log' / 'current')} (then: qrelay run {arg})")
    lifetime = _queuelifetime(ctx)
    if health.oldest_birth is not None and ctx.now - health.oldest_birth > lifetime + 86400:
        report.problem("queue", f"a message is {ago(ctx.now - health.oldest_birth)} old, more "
                       f"than a day past queuelifetime ({ago(lifetime)})",
                       "it should have been bounced: the scheduler is not running or stuck",
                       f"qrelay qread {arg} | head")
    if health.unreadable:
        report.problem("queue", f"{health.unreadable} unreadable records in the spool index",
                       "those messages are quarantined by the scheduler at its next start",
                       f"qrelay qread {arg}")
    if index_used * 100 > index_map * ctx.doctor.index_max_percent:
        report.problem("queue", f"the spool index holds {_size(index_used)} of its "
                       f"{_size(index_map)} map ({100 * index_used / index_map:.0f} %)",
                       "when the map is full every message is refused with 451 and no delivery "
                       "can be recorded",
                       f"raise [spool] index_map_bytes in {ctx.arg(root / 'qrelay.toml')}, "
                       f"then restart qrelay run")
    if quarantined:
        report.problem("queue", f"{quarantined} corrupt messages in "
                       f"{root / 'queue' / 'quarantine'}",
                       "they were taken out of the queue and will not be delivered",
                       f"ls -l {ctx.arg(root / 'queue' / 'quarantine')}")


def _queuelifetime(ctx: Context) -> int:
    from engine.config.control import ControlError, read_int
    try:
        return read_int(ctx.root / "control" / "queuelifetime", 604800)
    except ControlError:
        return 604800
