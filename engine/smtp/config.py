"""The receiver's configuration snapshot: qmail-smtpd's control files + tcp.smtp.

Owns reading, once, everything qmail-smtpd reads per connection (spec §1.1,
§2) into a frozen `SmtpConfig`, and a cheap fingerprint so a receiver can poll
for changes and swap the snapshot whole. Nothing here runs per command.

    control/me              required (qmail-smtpd refuses without it too)
    control/smtpgreeting    default me
    control/localiphost     default me
    control/databytes       default 0 = unlimited; negative or not a number = refused
    control/timeoutsmtpd    default 1200; 0 becomes 1; negative or not a number = refused
    control/concurrencyincoming   default settings.smtp.max_connections; below 1
                            or not a number = refused
    control/rcpthosts       REQUIRED — deliberate difference: qmail without it
                            is an open relay; qrelay refuses to start
    control/morercpthosts.cdb     optional (the text file is only the source
                            for qmail-newmrh, as in qmail)
    control/badmailfrom     optional
    control/tcp.smtp.cdb, else control/tcp.smtp, else every client allowed;
                            a rule's DATABYTES must fit a spool frame as databytes must
    ROOT/qrelay.toml        qrelay's own settings

Every problem is a ConfigError with a one-line reason naming the file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from engine.config.cdb import CdbError
from engine.config.control import ControlError, read_line, read_number, scan_ulong
from engine.config.settings import (SETTINGS_FILE, Settings, SettingsError, SpoolSettings,
                                    load_settings)
from engine.config.tcprules import RULES_CDB, RULES_TEXT, TcpRules, TcpRulesError
from engine.accounts.store import Accounts
from engine.smtp.policy import RecipientPolicy

DEFAULT_TIMEOUT = 1200

# Every file load_smtp_config reads (relative to ROOT), for the fingerprint.
WATCHED_FILES = (
    "control/me", "control/smtpgreeting", "control/localiphost", "control/databytes",
    "control/timeoutsmtpd", "control/concurrencyincoming", "control/rcpthosts",
    "control/morercpthosts.cdb", "control/badmailfrom",
    f"control/{RULES_CDB}", f"control/{RULES_TEXT}", "qrelay.toml",
    # engine.tls's: a new certificate reaches the receivers by the same HUP.
    "control/servercert.pem", "control/tlsserverciphers",
)


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line naming the file."""


@dataclass(slots=True, frozen=True)
class SmtpConfig:
    root: Path
    me: str
    greeting: str
    localiphost: str
    databytes: int             # 0 = unlimited (then settings.smtp.max_message_bytes bounds memory)
    timeout: int               # timeoutsmtpd, default 1200, <=0 -> 1
    concurrencyincoming: int   # control/concurrencyincoming else settings.smtp.max_connections
    rules: TcpRules
    settings: Settings
    policy: RecipientPolicy
    # The mailboxes RCPT is checked against ([smtp] reject_unknown_mailboxes);
    # a live view that rereads the account files when they change.
    mailboxes: Accounts | None = None


def load_smtp_config(root: os.PathLike | str, spool: SpoolSettings | None = None) -> SmtpConfig:
    """Read the snapshot; raises ConfigError with a one-line reason. `spool`
    (a reload): the [spool] settings the receiver's spool writer started
    with, kept whatever qrelay.toml says now (the writer reads them at start)."""
    root = Path(root)
    control = root / "control"
    try:
        settings = load_settings(root)
    except SettingsError as exc:
        raise ConfigError(str(exc)) from exc
    if spool is not None:
        settings = dataclasses.replace(settings, spool=spool)
    try:
        me = read_line(control / "me")
        if me is None:
            raise ConfigError("control/me is missing")
        if not me:
            raise ConfigError("control/me is empty")
        greeting = read_line(control / "smtpgreeting", me) or me
        localiphost = read_line(control / "localiphost", me) or me
        # Strict: qmail reads `10MB` as 10 bytes; a limit must not change silently.
        databytes = read_number(control / "databytes", 0)
        _check_frame_room(databytes, settings, started=spool is not None)
        # Strict too: qmail reads `1m` as 1 second, `5k` as 5 connections.
        timeout = read_number(control / "timeoutsmtpd", DEFAULT_TIMEOUT)
        if timeout <= 0:
            timeout = 1
        concurrency = read_number(control / "concurrencyincoming", settings.smtp.max_connections,
                                  minimum=1)
        try:
            policy = RecipientPolicy.load(control)
        except FileNotFoundError:
            raise ConfigError("control/rcpthosts is missing: refusing to run as an open relay") from None
        except CdbError as exc:
            raise ConfigError(f"control/morercpthosts.cdb: {exc}") from exc
        try:
            rules = TcpRules.load(control)
        except TcpRulesError as exc:
            raise ConfigError(f"control/{_rules_name(control)}: {exc}") from exc
        # A rule's DATABYTES replaces control/databytes for its clients
        # (SmtpSession._start reads it the same way): the same frame check.
        for key, rule in rules.items():
            value = rule.env.get("DATABYTES")
            limit = scan_ulong(value.encode("utf-8", "surrogateescape")) if value else None
            if limit:
                _check_frame_room(limit, settings, started=spool is not None,
                                  source=f"control/{_rules_name(control)} rule {key!r}: DATABYTES")
    except ControlError as exc:
        raise ConfigError(str(exc)) from exc
    return SmtpConfig(
        root=root, me=me, greeting=greeting, localiphost=localiphost, databytes=databytes,
        timeout=timeout, concurrencyincoming=concurrency, rules=rules, settings=settings,
        policy=policy,
        mailboxes=Accounts(root) if settings.smtp.reject_unknown_mailboxes else None,
    )


def _check_frame_room(databytes: int, settings: Settings, started: bool = False,
                      source: str = "control/databytes") -> None:
    """Through the single spool writer a message travels in one frame of at
    most [spool] max_frame_bytes with its envelope: a size limit above that
    would have every message between the two read whole, then refused (552)."""
    if not settings.spool.single_writer:
        return
    smtp = settings.smtp
    limit = databytes or smtp.max_message_bytes
    # Each recipient is at most a command line; the sender and the Received
    # line fit in the rest.
    need = limit + smtp.max_recipients * (smtp.max_line_length + 16) + (1 << 20)
    frame = settings.spool.max_frame_bytes
    if need > frame:
        what = (f"{source} {databytes}" if databytes
                else f"{SETTINGS_FILE}: [smtp] max_message_bytes {limit}")
        raise ConfigError(f"{what} does not fit in a spool frame: [spool] max_frame_bytes = {frame}"
                          f" in {SETTINGS_FILE} must be at least {need} (the message,"
                          " max_recipients recipients and the envelope"
                          + ("; [spool] is read when qrelay run starts)" if started else ")"))


def _rules_name(control: Path) -> str:
    return RULES_CDB if (control / RULES_CDB).exists() else RULES_TEXT


def config_fingerprint(root: os.PathLike | str) -> tuple:
    """(path, inode, size, mtime_ns) of each watched file, None where absent.

    A few stat() calls: cheap enough to poll every second. The inode catches
    an atomic rename that keeps size and mtime.
    """
    root = Path(root)
    out = []
    for name in WATCHED_FILES:
        try:
            st = os.stat(root / name)
        except OSError:
            out.append((name, None))
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)
