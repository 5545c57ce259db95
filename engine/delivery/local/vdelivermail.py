"""vpopmail's vdelivermail (5.4.33), understood natively: no external binary.

A `.qmail-default` line `| /home/vpopmail/bin/vdelivermail '' ARG` is run
here, in the delivering process, with the same inputs the program would get
(EXT, HOST, RPLINE, DTLINE, SENDER, the message) and the same answer: an exit
code (0, 99, 100, 111) and stdout text (vpopmail spec §3). Order of
operations (§3.2): loop check for EXT@HOST; vpasswd look-up of EXT in the
domain; found → locked-account bounce, recreate a missing directory, the
user's own `.qmail` (§3.4) or their Maildir with the vpasswd quota (§3.5);
not found → ARG: `delete`, `bounce-no-mailbox`, a user directory, or one
delivery line (§3.3).

Differences from the C program, on purpose:
- Maildir writes go through MaildirWriter: a unique name (plus `,S=size`),
  fsync of the file and of new/ (vdelivermail's `TIME.PID.HOST` can collide,
  and it syncs nothing by default);
- a forward is not piped to qmail-inject: it is returned as a `Forward`
  (sender, address, `Delivered-To:` line) for the caller to queue; its
  `Delivered-To:` is EXT@HOST whatever the virtualdomains prefix
  (vdelivermail's is right only when the prefix is the domain);
- no VALIAS, QMAIL_EXT, spamassassin, maildrop or domain-quota builds; an
  empty vpasswd directory field is not auto-created (it bounces with
  vdelivermail's `#5.9.8` text, as when creation fails);
- a blank line in a user's `.qmail` is skipped (vpopmail hands qmail-inject
  an empty address); an unreadable vpasswd or users/cdb defers with
  `system error` (vpopmail: exit 111, no text).

It never writes outside the domain's and its users' directories.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from engine import _fileio
from engine.accounts.vpasswd import VDELIVER_DOMAIN_CHARS, VDELIVER_USER_CHARS
from engine.config.domains import ascii_lower
from engine.delivery.local import quota as maildirquota
from engine.delivery.local.dotqmail import has_delivered_to
from engine.delivery.local.maildir import MaildirError, MaildirWriter
from engine.delivery.local.program import classify

TEXT_NO_USER = "Sorry, no mailbox here by that name. (#5.1.1)\n"
TEXT_OVER_QUOTA = "user is over quota\n"
TEXT_LOOP = "mail is looping\n"
TEXT_SYSTEM = "system error\n"
BOUNCE_MAIL = 0x10


@dataclass(slots=True, frozen=True)
class Learned:
    """What a run that put the message into a vpasswd user's own Maildir
    decided from, for a delivery plan (engine.delivery.local.plans): the
    domain's vpasswd snapshot it looked the user up in (DeliveryAccounts.
    snapshot, taken before the look-up), the user's directory (no `.qmail`
    in it), and what every later message needs again."""
    vpasswd: object             # the snapshot, compared by identity
    domain_dir: str             # whose vpasswd it is
    user_dir: str
    maildir: str                # as MaildirWriter.deliver takes it
    email: str                  # the Delivered-To address
    quota: str | None           # vpasswd's field; None: MAILDIR/maildirsize's line 1
    loops: tuple[bytes, ...]    # loop_line()s a message must not carry


@dataclass(slots=True)
class VdeliverOutcome:
    exit_code: int
    output: str
    forwards: list[tuple[str, str, str]] = field(default_factory=list)  # (sender, address, dt line)
    maildirs: int = 0
    learned: Learned | None = None


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


RunProgram = Callable[[str, str, dict], "object"]   # (command, cwd, extra env) -> ProgramRun


@dataclass
class Vdelivermail:
    """One run. `accounts`: a DeliveryAccounts."""

    argv: list[str]
    env: dict[str, str]
    message: bytes                  # LF line ends, as the program would read it
    accounts: object
    writer: MaildirWriter
    home: str                       # qmail-local's home (cwd of the program)
    vpopmail_dir: str
    run_program: RunProgram
    clock: Callable[[], float] = time.time
    out: list[str] = field(default_factory=list)
    forwards: list[tuple[str, str, str]] = field(default_factory=list)
    maildirs: int = 0
    _header: bytes | None = None
    _vpasswd: object = None
    _own_qmail_absent: bool = False
    _delivered: tuple[str, str] | None = None
    _learned: Learned | None = None

    def run(self) -> VdeliverOutcome:
        try:
            self._main()
            code = 0
        except _Exit as exc:
            code = exc.code
        return VdeliverOutcome(code, "".join(self.out), self.forwards, self.maildirs,
                               self._learned if code == 0 else None)

    def say(self, text: str) -> None:
        self.out.append(text)

    # --- main, get_arguments ----------------------------------------------------------
    def _main(self) -> None:
        if len(self.argv) != 3:
            self.say("vdelivermail: invalid syntax in .qmail-default file\n")
            raise _Exit(111)
        self.arg = self.argv[2]
        if "EXT" not in self.env:
            self.say("vdelivermail: no EXT environment varilable\n")
            raise _Exit(100)
        if "HOST" not in self.env:
            self.say("vdelivermail: no HOST environment varilable\n")
            raise _Exit(100)
        # lowerit(): tolower(), ASCII only (no Unicode case folding)
        self.user = ascii_lower(self.env["EXT"])
        self.domain = ascii_lower(self.env["HOST"])
        if any(ch not in VDELIVER_USER_CHARS for ch in self.user):
            self.say("invalid username\n")
            raise _Exit(100)
        if any(ch not in VDELIVER_DOMAIN_CHARS for ch in self.domain):
            self.say("invalid domain name\n")
            raise _Exit(100)
        # vget_assign: an alias domain's HOST becomes the real domain.
        self.domain_dir = self.home
        try:
            assigned = self.accounts.domain_assignment(self.domain)
        except Exception:           # users/cdb unreadable: try again later
            self.say(TEXT_SYSTEM)
            raise _Exit(111) from None
        if assigned is not None:
            self.domain = assigned.user.lower()
            self.domain_dir = assigned.home
        self.cwd = self.home
        self.size = len(self.message)
        if self._looping(f"{self.user}@{self.domain}"):
            self.say(TEXT_LOOP)
            raise _Exit(100)
        try:
            # before the look-up: a vpasswd re-read meanwhile makes the plan
            # learned from this run never match, rather than match wrongly
            self._vpasswd = self.accounts.snapshot(self.domain_dir)[1]
            vpw = self.accounts.vpop_user(self.domain_dir, self.user)
        except Exception:
            self.say(TEXT_SYSTEM)
            raise _Exit(111) from None
        if vpw is not None:
            self._checkuser(vpw)
        else:
            self._usernotfound()

    def _checkuser(self, vpw, fresh: bool = False) -> None:
        """`fresh`: vpw was read from vpasswd as it is now, not from the cache."""
        if vpw.gid & BOUNCE_MAIL:
            self.say(f"vdelivermail: account is locked email bounced {self.user}@{self.domain}\n")
            raise _Exit(100)
        if not vpw.directory:
            self.say("Auto creation of maildir failed. (#5.9.8)\n")
            raise _Exit(100)
        if not _exists(vpw.directory):
            if not fresh:
                # The cached vpasswd may predate a `user del`, which removes
                # the line, then the tree: only a user vpasswd has now gets
                # a new directory, never a mailbox nobody owns any more.
                try:
                    vpw = self.accounts.vpop_user(self.domain_dir, self.user, fresh=True)
                except Exception:
                    self.say(TEXT_SYSTEM)
                    raise _Exit(111) from None
                if vpw is None:
                    self._usernotfound()
                else:
                    self._checkuser(vpw, fresh=True)
                return
            try:
                os.makedirs(vpw.directory, 0o700, exist_ok=True)
                for sub in ("cur", "new", "tmp"):
                    os.makedirs(os.path.join(vpw.directory, "Maildir", sub), 0o700, exist_ok=True)
            except OSError:
                self.say("Auto re-creation of maildir failed. (#5.9.9)\n")
                raise _Exit(100) from None
        if self._forward_deliver(vpw.directory):
            raise _Exit(0)
        maildir = os.path.join(vpw.directory, "Maildir") + "/"
        # An empty field is deliver_mail's "no quota given": line 1 of maildirsize.
        quota = vpw.quota or None
        self._finish(self._deliver(maildir, quota))
        if not fresh and self._own_qmail_absent and self._delivered and self.maildirs == 1:
            self._learned = Learned(self._vpasswd, self.domain_dir, vpw.directory,
                                    *self._delivered, quota,
                                    (loop_line(f"{self.user}@{self.domain}"), loop_line(maildir)))

    def _usernotfound(self) -> None:
        arg = self.arg
        if arg == "delete":
            raise _Exit(0)
        if arg == "bounce-no-mailbox":
            self.say(self._msg_file(".no-user.msg") or TEXT_NO_USER)
            raise _Exit(100)
        target = arg
        if arg.startswith("/"):
            if not arg.endswith("/"):
                arg += "/"
            self.say(f"user does not exist, but will deliver to {arg}\n")
            if self._forward_deliver(arg):
                raise _Exit(0)
            target = arg + "Maildir/"
        # 5.4.33: deliver_mail(target, ""): the quota is the target maildirsize's
        self._finish(self._deliver(target, None, not_found_target=True))

    def _finish(self, ret: int) -> None:
        if ret == 0:
            return
        if ret == -1:
            self.say("\n")
            raise _Exit(100)
        if ret == -3:
            self.say(TEXT_LOOP)
            raise _Exit(100)
        self.say(TEXT_SYSTEM)
        raise _Exit(111)

    def _msg_file(self, name: str) -> str | None:
        for path in (os.path.join(self.domain_dir, name),
                     os.path.join(self.vpopmail_dir, "domains", name)):
            try:
                with open(path, "rb") as f:
                    return f.read().decode("utf-8", "replace")
            except OSError:
                continue
        return None

    # --- check_forward_deliver ---------------------------------------------------------------
    def _forward_deliver(self, directory: str) -> bool:
        """USERDIR/.qmail: True if it had at least one line (all delivered)."""
        step, err, _, raw = _fileio.read_file(os.fsencode(os.path.join(directory, ".qmail")),
                                              os.O_NONBLOCK)
        self._own_qmail_absent = step == _fileio.OPEN and err == errno.ENOENT
        if step or raw is None:
            return False
        self.cwd = directory
        lines = raw.decode("utf-8", "surrogateescape").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        found = False
        for line in lines:
            found = True
            if line:            # vpopmail hands a blank line to qmail-inject as an
                self._finish(self._deliver(line[:499], None))   # empty address; we skip it
        return found

    # --- deliver_mail --------------------------------------------------------------------------
    def _deliver(self, address: str, quota: str | None, not_found_target: bool = False) -> int:
        """0 ok, -1 over quota (text said), -2 system error, -3 looping."""
        if address.startswith("#"):
            return 0
        if self._looping(address[1:] if address.startswith("&") else address):
            return -3
        if self.size == 0:
            return 0
        if address.startswith("|"):
            prog = address.lstrip(" ").lstrip("|")
            run = self.run_program(prog, self.cwd, {"SHELL": "/bin/sh"})
            self.say(run.output)
            status = classify(run.exit_code) if run.exit_code is not None else "temporary"
            if status == "stop":
                raise _Exit(99)
            if status == "permanent":
                raise _Exit(100)
            if status == "temporary":
                raise _Exit(111)
            return 0
        if address[:1] in (".", "/"):
            if not address.endswith("/"):
                self.say(f"can't handle mbox delivery for {address}")
                raise _Exit(111)
            return self._maildir(address, quota, not_found_target)
        target = address[1:] if address.startswith("&") else address
        self.forwards.append((self.env.get("SENDER", ""), target, self._forward_dt(target)))
        return 0

    def _forward_dt(self, address: str) -> str:
        dt = self.env.get("DTLINE")
        if dt is None or len(dt) < 15:
            return f"Delivered-To: {address}\n"
        dt = dt[14:]
        at = dt.find("@")
        ext = self.env["EXT"]
        if at >= 0 and ext and dt[:at].endswith("-" + ext):
            # DTLINE is `PREFIX-EXT@HOST`: the address sent to is EXT@HOST,
            # whatever virtualdomains made PREFIX (vdelivermail assumes it is
            # HOST and cuts len(HOST)+1 characters: `m-joe@alias.com`).
            dt = dt[at - len(ext):]
        elif at >= 0:
            dt = dt[len(dt) - at - 1:]
        return "Delivered-To: " + dt

    def _maildir(self, address: str, quota_arg: str | None, not_found_target: bool) -> int:
        maildir = address if address.startswith("/") else os.path.join(self.cwd, address)
        maildir = maildir.rstrip("/")
        if quota_arg is None:
            q = maildirquota.maildirsize_quota(maildir)
        else:
            q = maildirquota.parse_quota(quota_arg)
        # `./Maildir/` joined to the user directory reads `…/joe/./Maildir`: the
        # user is the directory above Maildir once the `.` is gone.
        email = "" if not_found_target else maildir_to_email(
            address if address.startswith("/") else os.path.normpath(maildir) + "/")
        if not email:
            email = f"{self.user}@{self.domain}"
        if q is not None:
            try:
                over, usage = maildirquota.check(maildir, q, self.size, self.clock)
            except OSError:
                self.say(f"can not open new email file errno=2 file={address}tmp/\n")
                return -2
            if over:
                self.say(self._msg_file(".over-quota.msg") or TEXT_OVER_QUOTA)
                self._quota_warning(maildir, email)
                return -1
            if usage.percent(q) >= maildirquota.WARN_PERCENT:
                self._quota_warning(maildir, email)
        header = (self.env.get("RPLINE", "") + f"Delivered-To: {email}\n").encode(
            "utf-8", "surrogateescape")
        try:
            self.writer.deliver(maildir, [header, self.message], size_suffix=True)
        except MaildirError as exc:
            if exc.errno == errno.EDQUOT:
                # deliver_to_maildir's -1: vexiterr(100, "user is over quota"),
                # without the empty line that follows an .over-quota.msg
                self.say(TEXT_OVER_QUOTA)
                raise _Exit(100)
            self.say(_write_error(exc))
            return -2
        self.maildirs += 1
        self._delivered = (maildir, email)
        if q is not None:
            try:
                maildirquota.add(maildir, len(header) + self.size)
            except OSError:
                pass        # the next rebuild counts it
        return 0

    def _quota_warning(self, maildir: str, email: str) -> None:
        text = self._msg_file(".quotawarn.msg")
        if text is None:
            return
        stamp = os.path.join(maildir, "quotawarn")
        now = self.clock()
        try:
            if os.stat(stamp).st_mtime + 86400 > now:
                return
        except OSError:
            pass
        try:
            with open(stamp, "wb"):
                pass
            date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now))
            head = f"Delivered-To: {email}\nDate: {date}\n".encode()
            body = text.encode("utf-8", "surrogateescape")
            self.writer.deliver(maildir, [head, body], size_suffix=True)
            # counted as any delivery is (deliver_to_maildir appends it too)
            maildirquota.add(maildir, len(head) + len(body))
        except (OSError, MaildirError):
            pass

    # --- is_looping --------------------------------------------------------------------------
    def _looping(self, target: str) -> bool:
        """is_looping(): $DTLINE or a header line equal to `Delivered-To: T`
        (case-insensitive); the header ends at the first empty line."""
        want = loop_line(target)
        dt = self.env.get("DTLINE")
        if dt is not None and dt.lower().encode("utf-8", "surrogateescape") == want:
            return True
        if self._header is None:
            self._header = header_lower(self.message)
        return has_delivered_to(self._header, want)


def loop_line(target: str) -> bytes:
    """The header line is_looping() looks for, lower-case."""
    return ("delivered-to: " + target + "\n").lower().encode("utf-8", "surrogateescape")


def header_lower(message: bytes) -> bytes:
    """The message up to its first empty line, lower-case (is_looping() reads no further)."""
    end = message.find(b"\n\n")
    return (message if end < 0 else message[:end + 2]).lower()


def _exists(path: str) -> bool:
    """os.path.exists without a GIL hand-over (engine._fileio)."""
    try:
        _fileio.mode_uid(os.fsencode(path))
    except (OSError, ValueError):
        return False
    return True


def maildir_to_email(path: str) -> str:
    """vpopmail's maildir_to_email():
    `.../domains/[h/]dom.com/[h/]joe/Maildir/` → `joe@dom.com` ("" if not of that shape)."""
    last = path.rfind("/Maildir/")
    if last < 0:
        return ""
    start = path.rfind("/", 0, last) + 1
    user = path[start:last]
    d = path.rfind("/domains/")
    if d < 0:
        return ""
    rest = path[d + len("/domains/"):]
    while len(rest) > 1 and rest[1] == "/":
        rest = rest[2:]
    domain = rest.split("/", 1)[0]
    return f"{user}@{domain}"


def _write_error(exc: MaildirError) -> str:
    """vdelivermail's line for a failed Maildir step (deliver_mail's printf)."""
    err = exc.errno or 0
    if exc.step == "open":
        return f"can not open new email file errno={err} file={exc.tmp}\n"
    if exc.step == "link":
        return f"rename failed {exc.tmp} {exc.new} errno = {err}\n"
    return f"write failed errno = {err}\n"     # write, fsync, close, the new/ sync
