"""qmail-local's reading of a delivery: which .qmail file, what its lines mean,
and the header lines and environment it hands to each delivery (spec §3.4,
§3.5; notqmail qmail-local.c).

Pure functions over strings plus `find_dotqmail`, which only stats and reads
files under the home directory. It never delivers anything: the courier
(`courier.py`) walks the `Instruction`s this module returns.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import time
from dataclasses import dataclass

from engine import _fileio
from engine.config.domains import ascii_lower

# conf-patrn: a home or .qmail with any of these mode bits is refused.
PATRN = 0o002

TEXT_NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)\n"
TEXT_LOOP = "This message is looping: it already has my Delivered-To line. (#5.4.6)\n"
TEXT_HOME_WRITABLE = "Uh-oh: home directory is writable. (#4.7.0)\n"
TEXT_HOME_STICKY = "Home directory is sticky: user is editing his .qmail file. (#4.2.1)\n"
TEXT_QMAIL_WRITABLE = "Uh-oh: .qmail file is writable. (#4.7.0)\n"
TEXT_BLANK_FIRST = "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n"
TEXT_PROG_XBIT = "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)\n"
TEXT_FILE_XBIT = "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n"

# djb's error_str() texts, which qmail puts into its reports.
_ERROR_STR = {
    errno.ENOMEM: "out of memory", errno.ENOENT: "file does not exist",
    errno.EINTR: "interrupted system call", errno.EIO: "input/output error",
    errno.EACCES: "access denied", errno.EPERM: "permission denied",
    errno.EEXIST: "file already exists", errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory", errno.ENOSPC: "out of disk space",
    errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
    errno.EAGAIN: "temporary failure", errno.ESTALE: "stale NFS file handle",
    errno.ETIMEDOUT: "timed out", errno.ELOOP: "symbolic link loop",
    errno.ENAMETOOLONG: "file name too long", errno.EBADF: "file descriptor not open",
    errno.EMFILE: "too many open files", errno.ENFILE: "file table full",
    errno.EXDEV: "cross-device link", errno.EFBIG: "file too big",
    errno.ENXIO: "device not configured", errno.EBUSY: "device busy",
}


def error_str(err: int | None) -> str:
    if err is None:
        return "unknown error"
    return _ERROR_STR.get(err, os.strerror(err).lower())


def error_temp(err: int | None) -> bool:
    """djb's error_temp(): errors worth retrying rather than reporting as 'absent'."""
    return err in (errno.EINTR, errno.ENOMEM, errno.ETIMEDOUT, errno.EIO, errno.EAGAIN,
                   errno.EMFILE, errno.ENFILE, errno.ESTALE, errno.ENOSPC, errno.EDQUOT,
                   errno.EBUSY, errno.ENXIO)


class LocalTemporary(Exception):
    """A deferral with qmail-local's text (ends in `\\n`)."""


class LocalPermanent(Exception):
    """A failure with qmail-local's text (ends in `\\n`)."""


# --- header lines ---------------------------------------------------------------------
_QUOTE_OK = frozenset(
    "!#$%&'*+-/0123456789=?ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz{|}~.")


def _quote_need(box: str) -> bool:
    if not box:
        return True
    if any(ch not in _QUOTE_OK for ch in box):
        return True
    return box[0] == "." or box[-1] == "." or ".." in box


# A box that is one quoted string already: the receiver keeps `"a b"@c` as
# sent (engine.smtp.policy), where qmail stores `a b@c` and quotes it here.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"\Z', re.S)


def quote2(address: str) -> str:
    """qmail's quote2(): quote the box (text before the last `@`) if RFC 822 needs it."""
    if not address:
        return ""
    box, at, rest = address.rpartition("@")
    if not at:
        box, rest = address, ""
    if _quote_need(box) and not _QUOTED.match(box):
        out = ['"']
        for ch in box:
            if ch in "\r\n\"\\":
                out.append("\\")
            out.append(ch)
        out.append('"')
        box = "".join(out)
    return box + at + rest


def dtline(local: str, host: str) -> str:
    return ("Delivered-To: " + local + "@" + host).replace("\n", "_") + "\n"


def rpline(sender: str) -> str:
    return ("Return-Path: <" + quote2(sender)).replace("\n", "_") + ">\n"


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def myctime(t: float) -> str:
    """qmail's myctime(): `Thu Dec 03 21:58:19 2026\\n` (UTC, day zero-padded)."""
    tm = time.gmtime(int(t))
    return (f"{_DAYS[tm.tm_wday]} {_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:02d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {tm.tm_year}\n")


def ufline(sender: str, t: float) -> str:
    """The mbox `From ` line: spaces, TABs and LFs in the sender become `-`."""
    who = sender.translate(str.maketrans(" \t\n", "---")) if sender else "MAILER-DAEMON"
    return "From " + who + " " + myctime(t)


def has_delivered_to(message: bytes, line: bytes) -> bool:
    """qmail-local's bouncexf(): is `line` (LF-ended) one of the header lines?
    The header ends at the first line of length <= 1 (LF-ended message)."""
    start = 0
    n = len(message)
    while start < n:
        end = message.find(b"\n", start)
        if end < 0:
            return False        # an unterminated last line is not looked at
        if end - start + 1 <= 1:
            return False
        if end - start + 1 == len(line) and message.startswith(line, start):
            return True
        start = end + 1
    return False


# --- environment ---------------------------------------------------------------------
def _cut_host(host: str, upto: int) -> tuple[str, int]:
    i = host.rfind(".", 0, upto)
    if i < 0:
        i = 0
    return host[:i], i


def environment(*, user: str, home: str, local: str, host: str, sender: str,
                newsender: str, ext: str, default: str | None, when: float) -> dict[str, str]:
    """The variables qmail-local adds for programs (qmail-command(8))."""
    env = {"HOST": host, "HOME": home, "USER": user, "LOCAL": local,
           "RECIPIENT": f"{local}@{host}", "DTLINE": dtline(local, host),
           "SENDER": sender, "RPLINE": rpline(sender), "UFLINE": ufline(sender, when),
           "NEWSENDER": newsender}
    x = ext
    env["EXT"] = x
    for name in ("EXT2", "EXT3", "EXT4"):
        dash = x.find("-")
        x = x[dash + 1:] if dash >= 0 else ""
        env[name] = x
    # byte_rchr returns the length when there is no '.', so HOSTn stays whole.
    upto = len(host)
    for name in ("HOST2", "HOST3", "HOST4"):
        i = host.rfind(".", 0, upto)
        if i >= 0:
            upto = i
        env[name] = host[:upto]
    if default is not None:
        env["DEFAULT"] = default
    return env


# --- choosing the .qmail file ------------------------------------------------------------
def safeext(ext: str) -> str:
    """qmail-local's safeext: A-Z lower-cased (case_lowerb, not Unicode), `.` → `:`."""
    return ascii_lower(ext).replace(".", ":")


def candidates(dash: str, ext: str) -> list[tuple[str, str | None]]:
    """(.qmail file name, $DEFAULT or None) in qmail-local's search order."""
    safe = safeext(ext)
    out: list[tuple[str, str | None]] = []
    first = ".qmail" + dash + safe
    default = None
    if len(safe) >= 7 and safe.endswith("default") and len(safe) - 7 <= len(ext):
        default = ext[len(safe) - 7:]
    out.append((first, default))
    for i in range(len(safe), -1, -1):
        if i == 0 or safe[i - 1] == "-":
            out.append((".qmail" + dash + safe[:i] + "default",
                        ext[i:] if i <= len(ext) else None))
    return out


@dataclass(slots=True, frozen=True)
class DotQmail:
    path: str | None          # None: no file found (dash empty → defaultdelivery)
    content: bytes
    forward_only: bool        # owner x bit set
    default: str | None       # $DEFAULT


def check_home(home: str) -> None:
    try:
        mode, _ = _fileio.mode_uid(os.fsencode(home))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            raise LocalTemporary(
                f"Unable to switch to {home}: {error_str(exc.errno)}. (#4.3.0)\n") from None
        raise LocalTemporary(
            f"Unable to stat home directory: {error_str(exc.errno)}. (#4.3.0)\n") from None
    if not stat.S_ISDIR(mode):
        raise LocalTemporary(f"Unable to switch to {home}: not a directory. (#4.3.0)\n")
    if mode & PATRN:
        raise LocalTemporary(TEXT_HOME_WRITABLE)
    if mode & 0o1000:
        raise LocalTemporary(TEXT_HOME_STICKY)


def _open_qmail(home: str, name: str) -> tuple[bytes, bool] | None:
    step, err, mode, content = _fileio.read_file(os.fsencode(os.path.join(home, name)),
                                                 os.O_NONBLOCK)
    if step == _fileio.OPEN:
        if error_temp(err) or err in (errno.EPERM, errno.EACCES):
            raise LocalTemporary(f"Unable to open {name}: {error_str(err)}. (#4.3.0)\n")
        return None
    unreadable = f"Unable to open {name}: {error_str(err)}. (#4.3.0)\n"
    if step and not mode:       # its fstat failed
        raise LocalTemporary(unreadable)
    if not stat.S_ISREG(mode):
        return None
    if mode & PATRN:
        raise LocalTemporary(TEXT_QMAIL_WRITABLE)
    if step:
        raise LocalTemporary(unreadable)
    return content, bool(mode & 0o100)


def find_dotqmail(home: str, dash: str, ext: str) -> DotQmail:
    """qmesearch(): the first existing regular file of `candidates`."""
    for name, default in candidates(dash, ext):
        got = _open_qmail(home, name)
        if got is not None:
            content, xbit = got
            return DotQmail(name, content, xbit, default)
    if dash:
        raise LocalPermanent(TEXT_NO_MAILBOX)
    return DotQmail(None, b"", False, None)


def owner_exists(home: str, dash: str, ext: str, suffix: str) -> bool:
    """qmeox(): does `.qmail<dash><safeext><suffix>` exist (stat)?"""
    name = ".qmail" + dash + safeext(ext) + suffix
    try:
        _fileio.mode_uid(os.fsencode(os.path.join(home, name)))
        return True
    except OSError as exc:
        if error_temp(exc.errno):
            raise LocalTemporary(
                f"Unable to open {name}: {error_str(exc.errno)}. (#4.3.0)\n") from None
        return False


def forward_sender(home: str, dash: str, ext: str, local: str, host: str, sender: str) -> str:
    """NEWSENDER: the envelope sender of forwarded copies (owner/VERP rules)."""
    if sender in ("", "#@[]"):
        return sender
    if not owner_exists(home, dash, ext, "-owner"):
        return sender
    if owner_exists(home, dash, ext, "-owner-default"):
        return f"{local}-owner-@{host}-@[]"
    return f"{local}-owner@{host}"


# --- the lines ------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Instruction:
    kind: str       # "comment" | "program" | "maildir" | "mbox" | "forward" | "list" | "blank"
    arg: str        # program command / path / address


def parse_lines(cmds: str) -> list[Instruction]:
    """qmail-local's loop: trailing spaces/TABs dropped; a blank first line is
    an error (raised), later blank lines are skipped. As there, a line is a
    C string: a NUL ends it (the type is still read from the last character)."""
    if not cmds.endswith("\n"):
        cmds += "\n"
    out: list[Instruction] = []
    for n, whole in enumerate(cmds.split("\n")[:-1]):
        whole = whole.rstrip(" \t")
        line = whole.partition("\0")[0]
        if not line:
            if n == 0:
                raise LocalTemporary(TEXT_BLANK_FIRST)
            continue
        first = line[0]
        if first == "#":
            out.append(Instruction("comment", line))
        elif first in "./":
            out.append(Instruction("maildir" if whole.endswith("/") else "mbox", line))
        elif first == "|":
            out.append(Instruction("program", line[1:]))
        elif first == "+":
            out.append(Instruction("list" if line[1:] == "list" else "comment", line))
        elif first == "&":
            out.append(Instruction("forward", line[1:]))
        else:
            out.append(Instruction("forward", line))
    return out
