"""The relay table (POP-before-SMTP): how many clients may relay, and the oldest.

qrelay's own table (engine.relay, `[relay] store`) expires its entries by
itself; it is read with `entries()`, and only when it exists (doctor never
creates one). vpopmail's `open-smtp` (ETC/open-smtp beside the vpopmail
domains users/assign points at, or ROOT/etc/open-smtp) is read too: there,
nothing expires a line but the `clearopensmtp` cron job, so a line older
than `[doctor] relay_max_age` means that job is not running and every IP
that ever logged in may still relay — through the tcp.smtp.cdb it rebuilds.
qrelay reads only control/tcp.smtp(.cdb), so such a line is a problem only
when those rules let its IP relay (a cdb vchkpw built, copied over);
otherwise the file is left over from vpopmail (`relayclients import`).
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from engine.doctor import Context, Report, ago


# Addresses no box ever lets relay on purpose (RFC 5737 / 3849 documentation nets):
# a rule that gives them RELAYCLIENT gives it to the whole Internet.
_STRANGERS = ("192.0.2.1", "198.51.100.77", "203.0.113.200", "2001:db8::25")


def check(ctx: Context, report: Report) -> None:
    _open_relay(ctx, report)
    _relay_table(ctx, report)
    for path in _open_smtp_files(ctx.root):
        _open_smtp(ctx, report, path)


def _open_relay(ctx: Context, report: Report) -> None:
    """tcp.smtp giving RELAYCLIENT to any client: an open relay (the guide's
    classic `:allow,RELAYCLIENT=""`)."""
    from engine.config.tcprules import RULES_TEXT, TcpRules, TcpRulesError
    try:
        rules = TcpRules.load(ctx.root / "control")
    except (TcpRulesError, OSError):
        return          # the controls check reports a broken tcp.smtp
    for ip in _STRANGERS:
        rule = rules.match(ip)
        if rule.allow and "RELAYCLIENT" in rule.env:
            text = ctx.arg(ctx.root / "control" / RULES_TEXT)
            report.problem("relay", f"control/tcp.smtp gives RELAYCLIENT to any client "
                           f"(e.g. {ip})", "this box is an open relay: anyone can send spam "
                           "through it, and it gets blacklisted",
                           f"${{EDITOR:-vi}} {text} (RELAYCLIENT only for your own networks) "
                           f"&& qrelay tcprules {ctx.arg(ctx.root)}")
            return


def _relay_table(ctx: Context, report: Report) -> None:
    try:
        from engine.relay import open_relay_table
    except ImportError:
        return
    from engine.privilege import acting_as_owner
    relay = getattr(ctx.settings, "relay", None)
    if relay is None:
        return
    if not relay.store and not (ctx.root / "relay").exists():
        report.note("relay", "the relay table is empty (no POP3 login has granted relaying yet)")
        return
    lock = ctx.root / "relay" / "lock.mdb"
    if not relay.store and lock.exists() and not os.access(lock, os.R_OK | os.W_OK):
        # LMDB readers write their slot in lock.mdb: the run user's, not ours.
        report.note("relay", f"the relay table: not checked: uid {os.geteuid()} may not use "
                    f"{lock} (it belongs to uid {lock.stat().st_uid}); run qrelay doctor as root")
        return

    async def read() -> list:
        table = open_relay_table(ctx.root, ctx.settings)
        try:
            return await asyncio.wait_for(table.entries(), ctx.doctor.connect_timeout)
        finally:
            await table.close()
    try:
        with acting_as_owner(ctx.root / "relay"):   # never open the run user's files as root
            entries = asyncio.run(read())
    except Exception as exc:  # noqa: BLE001 - a store that cannot be read is the finding
        report.problem("relay", f"the relay table cannot be read ({exc})",
                       "POP-before-SMTP clients are refused relaying while it fails",
                       f"qrelay relayclients list {ctx.arg(ctx.root)}")
        return
    if not entries:
        report.note("relay", "the relay table is empty", entries=0)
        return
    first = min(expiry for _, expiry in entries)
    granted = first - relay.pop_before_smtp_ttl
    report.note("relay", f"the relay table: {len(entries)} clients may relay; the oldest "
                f"entry was granted about {ago(ctx.now - granted)} ago and expires in "
                f"{ago(first - ctx.now)}", entries=len(entries), first_expiry=first)


def _open_smtp_files(root: Path) -> list[Path]:
    from engine.accounts.assign import load_assign
    candidates = [root / "etc" / "open-smtp"]
    try:
        for a in load_assign(root).wildcards().values():
            home = Path(a.home)
            if home.parent.name == "domains":
                candidates.append(home.parent.parent / "etc" / "open-smtp")
    except Exception:  # noqa: BLE001 - the controls check reports a broken assign
        pass
    return [p for p in dict.fromkeys(candidates) if p.is_file()]


def _open_smtp(ctx: Context, report: Report, path: Path) -> None:
    try:
        text = path.read_text("utf-8", "surrogateescape")
    except OSError as exc:
        report.problem("relay", f"{path}: {exc.strerror}", "its relay clients are unknown",
                       f"ls -l {ctx.arg(path)}")
        return
    from engine.config.tcprules import TcpRules, TcpRulesError
    from engine.relay.opensmtp import parse_open_smtp
    # Its relaying lines, read as `qrelay relayclients import` reads them (a
    # time of thousands of digits is far in the future, not a traceback).
    lines = [line for line in parse_open_smtp(text)[0] if line.login_time <= ctx.now]
    if not lines:
        report.note("relay", f"{path}: empty", entries=0)
        return
    oldest = int(min(line.login_time for line in lines))
    report.note("relay", f"{path}: {len(lines)} clients, the oldest since "
                f"{ago(ctx.now - oldest)}", entries=len(lines), oldest=oldest)
    old = [line for line in lines if ctx.now - line.login_time > ctx.doctor.relay_max_age]
    try:
        # vchkpw's tcprules run gives each line's IP a rule of its own
        rules = dict(TcpRules.load(ctx.root / "control").items())
    except (TcpRulesError, OSError):
        rules = None        # the controls check reports a broken tcp.smtp
    if rules is not None and old and not any(
            "RELAYCLIENT" in getattr(rules.get(line.ip), "env", ()) for line in old):
        report.note("relay", f"{path}: its old lines do not let their clients relay here "
                    "(control/tcp.smtp has no rule for them); qrelay does not read it")
        return
    if old:
        oldest = int(min(line.login_time for line in old))
        clear = path.parent.parent / "bin" / "clearopensmtp"
        job = ctx.arg(f"*/30 * * * * {ctx.arg(clear)}")
        report.problem("relay", f"{path} has an entry {ago(ctx.now - oldest)} old",
                       "nothing removes old lines (vpopmail's clearopensmtp cron job is not "
                       "running): every IP that ever logged in may still relay",
                       f"{ctx.arg(clear)} && (crontab -l; echo {job}) | crontab -"
                       if os.path.exists(clear) else f"{ctx.arg(clear)} from cron every 30 minutes")
