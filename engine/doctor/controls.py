"""Do the control files and qrelay.toml parse? Read with the loaders `qrelay
run` itself uses (receivers, scheduler, local delivery), so doctor and run
never disagree; plus what qmail's tools leave behind: a source edited after
its cdb was built (the edit has no effect), CRLF line endings (the CR stays
in the value, spec §10 #17), a qmail queue still in the root."""
from __future__ import annotations

import os
import re
from pathlib import Path

from engine.doctor import Context, Report

# A path named in a loader's message: the file to edit.
_NAMED_FILE = re.compile(r"(\S*(?:control/[\w.+-]+|qrelay\.toml|users/(?:assign|cdb)))")


def _edit(ctx: Context, message: str) -> str:
    m = _NAMED_FILE.search(message)
    if not m:
        return ""
    name = m.group(1).rstrip(":,;")
    path = Path(name) if name.startswith("/") else ctx.root / name[name.find("control/"):] \
        if "control/" in name else ctx.root / name
    return f"${{EDITOR:-vi}} {ctx.arg(path)}"


def check(ctx: Context, report: Report) -> None:
    root = ctx.root
    from engine.accounts.assign import AssignError, load_assign
    from engine.config.settings import SettingsError, load_settings
    from engine.delivery.service import DeliveryConfigError, load_delivery_config
    from engine.smtp.config import ConfigError, load_smtp_config

    seen: set[str] = set()

    def broken(message: str, why: str) -> None:
        if message in seen:
            return
        seen.add(message)
        fix = _edit(ctx, message)
        if "rcpthosts is missing" in message:
            fix = f"cp {ctx.arg(root / 'control/me')} {ctx.arg(root / 'control/rcpthosts')}"
        elif "control/me is missing" in message or "control/me is empty" in message:
            fix = f"hostname -f > {ctx.arg(root / 'control/me')}"
        report.problem("controls", message, why, fix)

    for load, error, why in (
            (load_settings, SettingsError,
             "qrelay run refuses to start (a reload keeps the previous settings)"),
            (load_smtp_config, ConfigError, "qrelay run refuses to start: no mail is received"),
            (load_delivery_config, DeliveryConfigError,
             "the scheduler does not start: nothing is delivered")):
        try:
            load(root)
        except error as exc:
            broken(str(exc), why)
    try:
        load_assign(root)
    except (AssignError, OSError) as exc:
        broken(f"users/assign: {exc}", "every local delivery defers "
               "(Trouble reading users/cdb in qmail-lspawn.)")
    if _assign_text_parses(ctx, report):
        _stale(ctx, report, "users/assign", "users/cdb", "qrelay newu",
               "local delivery reads only users/cdb, as qmail does")
    _stale(ctx, report, "control/morercpthosts", "control/morercpthosts.cdb", "qrelay newmrh",
           "RCPT checks read only morercpthosts.cdb, as qmail-smtpd does")
    _stale(ctx, report, "control/tcp.smtp", "control/tcp.smtp.cdb", "qrelay tcprules",
           "connections are checked against tcp.smtp.cdb, as tcpserver does")
    _crlf(ctx, report)
    qmail_queue = [d for d in ("mess", "todo", "info") if (root / "queue" / d).is_dir()]
    if qmail_queue:
        report.problem("controls", f"{root / 'queue'} holds a qmail queue ({', '.join(qmail_queue)})",
                       "qrelay run refuses to start beside it: two spools would each miss the "
                       "other's mail", f"qrelay import-qmail {ctx.arg(root)} "
                       f"{ctx.arg(root / 'queue')} (with qmail-send stopped)")
    if not seen:
        report.note("controls", "control files, users/assign and qrelay.toml parse")


def _assign_text_parses(ctx: Context, report: Report) -> bool:
    """users/assign as `qrelay newu` reads it: with users/cdb built, load_assign
    reads only the cdb, and an edit newu refuses would go unseen."""
    from engine.accounts.assign import ASSIGN_FILE, AssignError, parse_assign_text
    from engine.accounts.files import read_whole
    path = ctx.root / ASSIGN_FILE
    try:
        got = read_whole(path)
        if got is not None:
            parse_assign_text(got[0].decode("utf-8", "surrogateescape"))
        return True
    except (AssignError, OSError) as exc:
        if not (ctx.root / "users/cdb").exists():
            return False        # load_assign read this text: reported above
        report.problem("controls", f"users/assign: {exc}", "qrelay newu refuses it: its "
                       "changes have no effect (local delivery reads users/cdb)",
                       f"${{EDITOR:-vi}} {ctx.arg(path)} && qrelay newu {ctx.arg(ctx.root)}")
        return False


def _stale(ctx: Context, report: Report, source: str, compiled: str, command: str,
           why: str) -> None:
    try:
        src = os.stat(ctx.root / source)
    except OSError:
        return
    try:
        built = os.stat(ctx.root / compiled).st_mtime_ns
    except OSError:
        if compiled == "control/morercpthosts.cdb":
            report.problem("controls", f"{source} exists but {compiled} was never built",
                           f"its domains are refused (553): {why}",
                           f"{command} {ctx.arg(ctx.root)}")
        return
    if src.st_mtime_ns > built:
        report.problem("controls", f"{source} was changed after {compiled} was built",
                       f"the change has no effect: {why}", f"{command} {ctx.arg(ctx.root)}")


def _crlf(ctx: Context, report: Report) -> None:
    control = ctx.root / "control"
    try:
        names = sorted(os.listdir(control))
    except OSError:
        return
    for name in names:
        if name.endswith((".cdb", ".pem", ".tmp")):
            continue
        path = control / name
        try:
            if not path.is_file() or path.stat().st_size > 1 << 20:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if b"\r\n" in data:
            report.problem("controls", f"control/{name} has CRLF line endings",
                           "the CR becomes part of each value (a host name, a number), "
                           "as in qmail", f"sed -i 's/\\r$//' {ctx.arg(path)}")
