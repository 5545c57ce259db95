"""`qrelay doctor`: the reference guide's troubleshooting checklist, run for you.

Each check is a small module with one `check(ctx, report)` function that
reads what it needs and adds to the report:

    controls   control files and qrelay.toml parse (the loaders `qrelay run`
               uses); compiled files older than their source; CRLF endings
    domains    rcpthosts / morercpthosts / locals / virtualdomains /
               users/assign agree (accepted but not delivered, and the reverse)
    perms      owners and modes of assign homes, vpopmail domain, user and
               Maildir directories and .qmail files (qmail-local's own rules);
               vpasswd edited after its vpasswd.cdb, malformed vpasswd lines
    relay      tcp.smtp giving RELAYCLIENT to anyone; the relay table
               (POP-before-SMTP) and vpopmail's open-smtp: size, oldest entry
    queue      size, oldest message, not yet preprocessed, deferred per
               destination with the last error; is a `qrelay run` holding it
    logs       ROOT/log and ROOT/log/smtpd: multilog layout, writable, rotating
    disk       free space and inodes on the spool's filesystem
    tls        servercert.pem loads, the receivers may read it, its names and
               how long it (and clientcert.pem) stays valid
    network    (with DOMAIN) MX records through the configured resolver, a
               connect + greeting + EHLO to each, smtproutes, tcpto, its queue
    route      (with ADDRESS) how the address would be delivered, sending nothing

A `Finding` is a problem: what is wrong, why it matters, the command that
fixes it (one line each). A `Note` is a fact worth seeing (queue size, an MX
and its greeting). `qrelay doctor` exits 0 without findings, 1 with some.

Doctor only reads: it never writes a file, never takes a lock a running
`qrelay run` needs, never sends a message (the network check says QUIT after
EHLO). Every limit it applies is a `[doctor]` setting.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True, frozen=True)
class Finding:
    check: str
    what: str
    why: str
    fix: str = ""

    def line(self) -> str:
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"problem: {self.check}: {self.what}: {self.why}{fix}"


@dataclass(slots=True, frozen=True)
class Note:
    check: str
    text: str
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"ok: {self.check}: {self.text}"


@dataclass(slots=True)
class Report:
    findings: list[Finding] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def problem(self, check: str, what: str, why: str, fix: str = "") -> None:
        self.findings.append(Finding(check, _one_line(what), _one_line(why), _one_line(fix)))

    def note(self, check: str, text: str, **data: Any) -> None:
        self.notes.append(Note(check, _one_line(text), data))

    def as_json(self, root: Path, target: str | None) -> dict:
        return {"root": str(root), "target": target, "problems": len(self.findings),
                "findings": [{"check": f.check, "what": f.what, "why": f.why, "fix": f.fix}
                             for f in self.findings],
                "notes": [{"check": n.check, "text": n.text, **n.data} for n in self.notes]}


@dataclass(slots=True, frozen=True)
class Context:
    root: Path
    settings: Any            # engine.config.settings.Settings (defaults if qrelay.toml is broken)
    now: float

    @property
    def doctor(self) -> Any:
        return self.settings.doctor

    def arg(self, path: Path | str) -> str:
        """A path as a shell word, for a fix command."""
        return shlex.quote(str(path))


def _one_line(text: str) -> str:
    # A remote server's reply or a sender's domain lands here: a control
    # character (ESC, BEL, a C1 CSI) prints as `_`, never to the terminal.
    return "".join(c if c.isprintable() else "_" for c in " ".join(str(text).split()))


def context(root: Path | str, now: float | None = None) -> Context:
    from engine.config.settings import Settings, SettingsError, load_settings
    try:
        settings = load_settings(root)
    except SettingsError:
        settings = Settings()       # the controls check reports it
    return Context(Path(root), settings, time.time() if now is None else now)


def ago(seconds: float) -> str:
    """`3 d 4 h`, `12 min`, `40 s`: an age for a person."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            whole, rest = divmod(s, size)
            if unit == "d" and rest >= 3600:
                return f"{whole} d {rest // 3600} h"
            if unit == "h" and rest >= 60:
                return f"{whole} h {rest // 60} min"
            return f"{whole} {unit}"
    return f"{s} s"


def examine(root: Path | str, target: str | None = None, now: float | None = None) -> Report:
    """Run the checks for ROOT (and DOMAIN or ADDRESS) and return the report."""
    from engine.doctor import (controls, disk, domains, logs, network, perms, queue, relay,
                               route, tls)
    ctx = context(root, now)
    report = Report()
    if target is None:
        checks = [controls, domains, perms, relay, queue, logs, disk, tls]
    elif "@" in target:
        checks = [route]
    else:
        checks = [network]
    for module in checks:
        name = module.__name__.rsplit(".", 1)[1]
        try:
            if target is None:
                module.check(ctx, report)
            else:
                module.check(ctx, report, target)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            report.problem(name, f"the check could not finish ({type(exc).__name__}: {exc})",
                           "the rest of this check's findings are unknown",
                           f"qrelay doctor {ctx.arg(ctx.root)}")
    return report
