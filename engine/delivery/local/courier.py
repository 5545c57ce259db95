"""Local delivery: qmail-lspawn + qmail-local (+ vdelivermail) for one process.

`deliver_one()` does one recipient, synchronously, with no event loop: the
users/assign look-up (qmail-getpw as the fallback), the home and .qmail
checks, the Delivered-To loop check, then every line of the chosen .qmail
top to bottom (spec §3.3–3.5), and returns a `LocalResult` with qmail's
letter (K/Z/D) and report text (what qmail-lspawn would have sent
qmail-send: program output, then `did F+W+P` or the error, cut at 3000
bytes). `LocalDelivery.deliver()` is the async courier the scheduler calls:
a thin wrapper that runs `deliver_one` per recipient in a bounded thread
pool, so no file or program I/O ever runs on the event loop.

Forwards are never queued here. qmail-local queues one new message per
delivery (all `&addr` targets, envelope sender NEWSENDER, body = its
Delivered-To line + the message) only after every other line succeeded; a
native vdelivermail line forwards at once (one message per address, as its
qmail-inject call does). Both come back as `LocalResult.forwards`: the
caller queues each `Forward` — sender, recipients, `prefix + message` with
the message in spool form (CRLF) — whatever the result's status (a
vdelivermail forward before a failing line has been done, as in vpopmail).

Privileges: this module delivers as whoever runs it. The spawner that picks
a worker by `assignment_for(recipient)` (uid, gid) does the setuid; a uid of
0 is refused here as qmail-lspawn does.

Message bytes: the spool holds CRLF; mailboxes and programs get LF.
"""
from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Protocol

from engine import _fileio
from engine.config.domains import ascii_lower
from engine.delivery.local import mbox
from engine.delivery.local.accounts import AccountsError, Assignment, DeliveryAccounts
from engine.delivery.local.dotqmail import (TEXT_FILE_XBIT, TEXT_LOOP, TEXT_PROG_XBIT,
                                            LocalPermanent, LocalTemporary, candidates,
                                            check_home, dtline, environment, error_temp,
                                            find_dotqmail, forward_sender, has_delivered_to,
                                            parse_lines, rpline, ufline)
from engine.delivery.local.maildir import MaildirError, MaildirWriter
from engine.delivery.local.plans import Plans
from engine.delivery.local.program import DEFAULT_PATH, message_fd, run
from engine.delivery.local.vdelivermail import Learned, Vdelivermail

TRUNCREPORT = 3000
TEXT_TOO_LONG = "\nError report too long, sorry.\n"
TEXT_CDB = "Trouble reading users/cdb in qmail-lspawn.\n"
TEXT_NO_ALIAS = "Unable to find alias user!\n"
TEXT_ROOT = "Not allowed to perform deliveries as root.\n"
TEXT_BUG = "Internal qmail-lspawn bug.\n"
TEXT_CRASHED = "qmail-local crashed.\n"
TEXT_TEMP = "Temporary failure in qmail-lspawn.\n"
TEXT_MAILDIR_CHDIR = "Unable to chdir to maildir. (#4.2.1)\n"
TEXT_MAILDIR_TEMP = "Temporary error on maildir delivery. (#4.3.0)\n"
TEXT_PLANNED = "did 0+0+1\n"    # one vdelivermail line, which delivered

GetPw = Callable[[str], "tuple[str, int, int, str] | None"]   # name -> (name, uid, gid, home)


def system_getpw(name: str) -> tuple[str, int, int, str] | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir


@dataclass(slots=True, frozen=True)
class LocalConfig:
    """What local delivery reads; `load_local_config(root)` fills it from control/."""
    default_delivery: str = "./Maildir/"     # qmail-start's argument (control/defaultdelivery)
    program_timeout: float = 1200.0          # seconds for one `|program` line (qmail: none)
    program_output_max: int = 4096           # bytes kept from one program's output
    path: str = DEFAULT_PATH                 # PATH for programs
    vpopmail_dir: str | None = None          # else derived from the vdelivermail path
    hostname: str | None = None              # Maildir names; None = gethostname()
    getpw: GetPw | None = system_getpw       # qmail-getpw fallback; None = off
    alias_user: str = "alias"
    mbox_lock_timeout: float = 30.0


def load_local_config(root: os.PathLike | str, **overrides) -> LocalConfig:
    """ROOT/control/defaultdelivery (whole file, as qmail-start's argument) + overrides."""
    values = {}
    try:
        text = (Path(root) / "control" / "defaultdelivery").read_text("utf-8", "surrogateescape")
        if text.strip():
            values["default_delivery"] = text
    except FileNotFoundError:
        pass
    values.update(overrides)
    return LocalConfig(**values)


@dataclass(slots=True, frozen=True)
class Forward:
    sender: str
    recipients: tuple[str, ...]
    prefix: bytes        # `Delivered-To: …\r\n`: queue prefix + spool message
    reports_qp: bool     # qmail-local's own (its report ends `qp N`); not vdelivermail's


@dataclass(slots=True, frozen=True)
class LocalResult:
    address: str
    status: str          # "K" | "Z" | "D", as qmail-lspawn reports
    text: str
    forwards: tuple[Forward, ...] = ()


class _NoAlias(Exception):
    pass


# `[delivery] local_active`'s default: no limit.
ACTIVE_DEFAULT = 0


class Waiting(Protocol):
    """What runs a delivery may want to know when it only waits (a |program's
    run, an mbox lock): `stepped_out()` is entered meanwhile. A delivery worker
    that limits how many deliveries run at once starts another one then, so
    slow programs still run side by side up to concurrencylocal, as
    qmail-local processes do."""

    def stepped_out(self) -> AbstractContextManager: ...


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def to_lf(message: bytes) -> bytes:
    """Spool bytes (CRLF) → mailbox bytes (LF). A bare CR is kept."""
    return message.replace(b"\r\n", b"\n")


def _getpw_assignment(config: LocalConfig, local: str) -> Assignment:
    """qmail-getpw: L, then each prefix before a `-` (right to left); else alias."""
    getpw = config.getpw
    if getpw is not None:
        cuts = [len(local)] + [i for i in range(len(local) - 1, -1, -1) if local[i] == "-"]
        for i in cuts:
            name = ascii_lower(local[:i])      # case_lowers: A-Z only
            if not name or len(name) >= 32:
                continue
            pw = getpw(name)
            if pw is None or pw[1] == 0:
                continue
            try:
                mode, uid = _fileio.mode_uid(os.fsencode(pw[3]))
            except OSError:
                continue
            if not stat.S_ISDIR(mode) or uid != pw[1]:
                continue
            rest = local[i + 1:] if i < len(local) else ""
            return Assignment(pw[0], pw[1], pw[2], pw[3], "-" if i < len(local) else "", rest)
        pw = getpw(config.alias_user)
        if pw is not None:
            return Assignment(pw[0], pw[1], pw[2], pw[3], "-", local)
    raise _NoAlias


def assignment_for(config: LocalConfig, accounts, recipient: str) -> Assignment | None:
    """Whose uid/gid delivers to `recipient` (None: nothing to deliver, `<>`).
    Raises AccountsError (users/cdb unreadable) or LookupError (no alias user)."""
    local = recipient[:recipient.rfind("@")] if "@" in recipient else recipient
    if not local:
        return None
    found = accounts.assignment(local)
    if found is not None:
        return found
    try:
        return _getpw_assignment(config, local)
    except _NoAlias:
        raise LookupError(TEXT_NO_ALIAS) from None


class _Report:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        if text:
            self.parts.append(text)

    def result(self, address: str, status: str, forwards=()) -> LocalResult:
        text = "".join(self.parts).split("\0", 1)[0]
        if len(text) > TRUNCREPORT:
            text = text[:TRUNCREPORT] + TEXT_TOO_LONG
        return LocalResult(address, status, text, tuple(forwards))


# A pure function of the line's text, and every mailbox of a vpopmail domain
# runs the same .qmail-default line: shlex cost ~0.2 ms, a fifth of a
# delivery's CPU, on each call. Bounded; holds nothing but parsed text.
@lru_cache(maxsize=256)
def _is_vdelivermail(command: str) -> tuple[str, ...] | None:
    """argv if the program line is a plain call of vdelivermail, else None."""
    if "$" in command or "`" in command or "\\" in command:
        return None
    try:
        lex = shlex.shlex(command, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
    except ValueError:
        return None
    if not tokens or os.path.basename(tokens[0]) != "vdelivermail":
        return None
    if any(t and all(c in "();<>|&" for c in t) for t in tokens):
        return None
    return tuple(tokens)


def deliver_one(config: LocalConfig, accounts, sender: str, recipient: str, message: bytes, *,
                writer: MaildirWriter | None = None, lf: bool = False,
                clock: Callable[[], float] = time.time,
                waiting: Waiting | None = None, plans: Plans | None = None) -> LocalResult:
    """Deliver `message` (spool bytes, CRLF; LF if lf=True) to one local
    recipient (the address after qmail-send's rewrite). Never raises.
    `plans`: delivery plans to use and to keep (engine.delivery.local.plans)."""
    try:
        return _deliver_one(config, accounts, sender, recipient, message if lf else to_lf(message),
                            writer or MaildirWriter(config.hostname), clock, waiting, plans)
    except Exception:       # a bug must cost a retry, never mail
        return LocalResult(recipient, "Z", TEXT_CRASHED)


def _deliver_one(config, accounts, sender, recipient, body, writer, clock, waiting=None,
                 plans: Plans | None = None) -> LocalResult:
    assign = None
    if plans is not None:
        if plans.deliver(accounts, recipient, sender, body, writer, clock):
            return LocalResult(recipient, "K", TEXT_PLANNED)
        started = plans.now_ns()
        try:    # before the look-up, as Vdelivermail's vpasswd table
            assign = accounts.snapshot()[0]
        except AccountsError:
            pass            # _assigned says so
    a, refused = _assigned(config, accounts, recipient)
    if refused is not None:
        return refused
    at = recipient.rfind("@")
    local, host = (recipient[:at], recipient[at + 1:]) if at >= 0 else (recipient, "")
    run_ = _LocalRun(config, accounts, a, sender, local, host, body, writer, clock, waiting)
    result = run_.go(recipient)
    if (assign is not None and run_.learned is not None and result.status == "K"
            and result.text == TEXT_PLANNED and not result.forwards):
        try:
            names = [n for n, _ in candidates(a.dash, a.ext)]
            plans.learn(recipient, started, assign, a.home, run_.dotqmail,
                        names[:names.index(run_.dotqmail)], _enc(run_.dt), run_.learned)
        except Exception:   # the mail is delivered: a plan is never worth a retry
            pass
    return result


def _assigned(config, accounts, recipient: str) -> tuple[Assignment | None, LocalResult | None]:
    """qmail-lspawn's part: (the assignment to run as, None), or (None, the
    result of a recipient for whom nothing runs)."""
    local = recipient[:recipient.rfind("@")] if "@" in recipient else recipient
    if not local:
        return None, LocalResult(recipient, "K", "")
    try:
        a = assignment_for(config, accounts, recipient)
    except AccountsError:
        return None, LocalResult(recipient, "Z", TEXT_CDB)
    except LookupError:
        return None, LocalResult(recipient, "Z", TEXT_NO_ALIAS)
    if a is None:
        return None, LocalResult(recipient, "K", "")
    if a.uid == 0:
        return None, LocalResult(recipient, "Z", TEXT_ROOT)
    if not a.home.startswith("/"):
        return None, LocalResult(recipient, "Z", TEXT_BUG)
    return a, None


class _LocalRun:
    """One qmail-local run."""

    def __init__(self, config, accounts, a: Assignment, sender, local, host, body, writer, clock,
                 waiting: Waiting | None = None):
        self.config, self.accounts, self.a = config, accounts, a
        self.sender, self.local, self.host = sender, local, host
        self.body, self.writer, self.clock = body, writer, clock
        self.waiting = waiting
        self.report = _Report()
        self.forwards: list[Forward] = []
        self._fd: int | None = None
        # A run whose .qmail was one vdelivermail line that put the message
        # into the user's Maildir: how (for a delivery plan).
        self.learned: Learned | None = None
        self.dotqmail: str | None = None
        self.dt = ""

    def go(self, recipient: str) -> LocalResult:
        try:
            status = self._run()
            return self.report.result(recipient, status, self.forwards)
        except LocalTemporary as exc:
            self.report.add(str(exc))
            return self.report.result(recipient, "Z", self.forwards)
        except LocalPermanent as exc:
            self.report.add(str(exc))
            return self.report.result(recipient, "D", self.forwards)
        finally:
            if self._fd is not None:
                os.close(self._fd)

    def _stdin(self) -> int:
        if self._fd is None:
            self._fd = message_fd(self.body)
        return self._fd

    def _run(self) -> str:
        a, home = self.a, self.a.home
        check_home(home)
        dt = self.dt = dtline(self.local, self.host)
        if has_delivered_to(self.body, _enc(dt)):
            raise LocalPermanent(TEXT_LOOP)
        now = self.clock()
        dq = find_dotqmail(home, a.dash, a.ext)
        newsender = forward_sender(home, a.dash, a.ext, self.local, self.host, self.sender)
        self.env = {"PATH": self.config.path}
        self.env.update(environment(user=a.user, home=home, local=self.local, host=self.host,
                                    sender=self.sender, newsender=newsender, ext=a.ext,
                                    default=dq.default, when=now))
        cmds = dq.content.decode("utf-8", "surrogateescape")
        forward_only = dq.forward_only
        if not cmds:
            cmds, forward_only = self.config.default_delivery, False
        header = _enc(rpline(self.sender) + dt)
        counts = [0, 0, 0]
        targets: list[str] = []
        lines = parse_lines(cmds)
        if len(lines) == 1 and dq.path is not None:
            self.dotqmail = dq.path
        for ins in lines:
            kind = ins.kind
            if kind == "list":
                forward_only = True
            elif kind in ("maildir", "mbox"):
                counts[0] += 1
                if forward_only:
                    raise LocalTemporary(TEXT_FILE_XBIT)
                path = os.path.join(home, ins.arg)
                if kind == "maildir":
                    self._maildir(path, header)
                else:
                    with self._waiting():       # the lock may be held for a while
                        mbox.append(path, ins.arg, _enc(ufline(self.sender, now)) + header,
                                    self.body, lock_timeout=self.config.mbox_lock_timeout)
            elif kind == "program":
                counts[2] += 1
                if forward_only:
                    raise LocalTemporary(TEXT_PROG_XBIT)
                if self._program(ins.arg):
                    break           # exit 99: the remaining lines are skipped
            elif kind == "forward":
                counts[1] += 1
                targets.append(ins.arg)
        if targets:
            self.forwards.append(Forward(newsender, tuple(targets), _enc(dt[:-1]) + b"\r\n", True))
        self.report.add(f"did {counts[0]}+{counts[1]}+{counts[2]}\n")
        return "K"

    def _maildir(self, path: str, header: bytes) -> None:
        try:
            self.writer.deliver(path, [header, self.body])
        except MaildirError as exc:
            if exc.kind == "chdir" and not error_temp(exc.errno):
                raise LocalTemporary(TEXT_MAILDIR_CHDIR) from None
            raise LocalTemporary(TEXT_MAILDIR_TEMP) from None

    def _waiting(self):
        return self.waiting.stepped_out() if self.waiting is not None else nullcontext()

    def _run_program(self, command: str, cwd: str, extra: dict):
        env = dict(self.env)
        env.update(extra)
        stdin = self._stdin()
        with self._waiting():
            return run(command, cwd=cwd, env=env, stdin_fd=stdin,
                       timeout=self.config.program_timeout,
                       output_max=self.config.program_output_max)

    def _program(self, command: str) -> bool:
        """Run one `|` line; True = exit 99 (stop). Raises on failure."""
        argv = _is_vdelivermail(command)
        if argv is not None:
            vp_dir = self.config.vpopmail_dir or os.path.dirname(os.path.dirname(argv[0])) or "/"
            outcome = Vdelivermail(list(argv), self.env, self.body, self.accounts, self.writer,
                                   self.a.home, vp_dir, self._run_program, self.clock).run()
            self.report.add(outcome.output)
            for fsender, addr, fdt in outcome.forwards:
                # qmail-inject queues it: qmail-local's report says no qp for it.
                self.forwards.append(Forward(fsender, (addr,), _enc(fdt.rstrip("\n")) + b"\r\n",
                                             False))
            code = outcome.exit_code
            if (self.dotqmail is not None and outcome.learned is not None and code == 0
                    and not outcome.output and not outcome.forwards):
                self.learned = outcome.learned
            status = ("ok" if code == 0 else "stop" if code == 99 else
                      "permanent" if code in (100, 64, 65, 70, 76, 77, 78, 112) else "temporary")
        else:
            got = self._run_program(command, self.a.home, {})
            self.report.add(got.output)
            status = got.status
        if status == "permanent":
            raise LocalPermanent("")
        if status == "temporary":
            raise LocalTemporary("")
        return status == "stop"


class LocalDelivery:
    """The local courier: `await deliver(sender, recipients, message, msgid=…)`.

    `accounts`: a DeliveryAccounts (or any object with its four methods).
    Deliveries run in a bounded thread pool of `max_threads`; one
    MaildirWriter (name counter, shared directory syncs) serves them all.
    `active`: how many a delivery worker runs at once (`[delivery]
    local_active`, engine.delivery.spawner). `plans`: whether deliveries to
    vpopmail mailboxes keep and use delivery plans (engine.delivery.local.plans).
    """

    def __init__(self, config: LocalConfig, accounts, *, max_threads: int = 16,
                 writer: MaildirWriter | None = None, active: int = ACTIVE_DEFAULT,
                 plans: Plans | bool = True) -> None:
        self.config = config
        self.accounts = accounts
        self.plans = plans if isinstance(plans, Plans) else Plans() if plans else None
        self.writer = writer or MaildirWriter(config.hostname)
        self.max_threads = max(1, max_threads)
        self.active = max(0, active)
        self._executor = ThreadPoolExecutor(max_workers=max(1, max_threads),
                                            thread_name_prefix="qrelay-local")

    @classmethod
    def for_root(cls, root: os.PathLike | str, **kwargs) -> LocalDelivery:
        return cls(load_local_config(root), DeliveryAccounts.at(root), **kwargs)

    def assignment_for(self, recipient: str) -> Assignment | None:
        """uid/gid/home that `recipient`'s delivery runs as (None: `<>`, nothing to do).
        Raises AccountsError or LookupError as `assignment_for()`."""
        return assignment_for(self.config, self.accounts, recipient)

    def refusal(self, recipient: str) -> LocalResult:
        """The result of a recipient nothing may run for (no assignment, root,
        users/cdb unreadable), found without running anything; a recipient
        whose look-up now finds a user to run as (it changed since the
        spawner asked) is deferred, for the next try to run as that user."""
        try:
            _, refused = _assigned(self.config, self.accounts, recipient)
        except Exception:       # a bug must cost a retry, never mail
            refused = LocalResult(recipient, "Z", TEXT_CRASHED)
        return refused or LocalResult(recipient, "Z", TEXT_TEMP)

    def deliver_sync(self, sender: str, recipient: str, message: bytes) -> LocalResult:
        return deliver_one(self.config, self.accounts, sender, recipient, message,
                           writer=self.writer, plans=self.plans)

    def deliver_blocking(self, sender: str, recipients: Sequence[str], message: bytes,
                         waiting: Waiting | None = None) -> list[LocalResult]:
        """`deliver()` for a caller that is itself a thread of its own (a spawner
        worker's): one recipient is delivered right here, several in parallel
        in the pool, as `deliver()` does. Never call it from the pool's threads."""
        body = to_lf(bytes(message))
        if len(recipients) == 1:
            return [deliver_one(self.config, self.accounts, sender, recipients[0], body,
                                writer=self.writer, lf=True, waiting=waiting, plans=self.plans)]
        calls = [self._executor.submit(deliver_one, self.config, self.accounts, sender, r, body,
                                       writer=self.writer, lf=True, plans=self.plans)
                 for r in recipients]
        return [c.result() for c in calls]

    async def deliver(self, sender: str, recipients: Sequence[str], message: bytes, *,
                      msgid: int = 0) -> list[LocalResult]:
        """One result per recipient, in order. `message`: spool bytes (CRLF)."""
        body = to_lf(bytes(message))
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(
                    self._executor,
                    partial(deliver_one, self.config, self.accounts, sender, r, body,
                            writer=self.writer, lf=True, plans=self.plans))
                 for r in recipients]
        return list(await asyncio.gather(*calls))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
