"""qmail-send's activity log: its line formats, TAI64N stamps, multilog rotation.

Owns `ROOT/log/` (the directory `multilog t s<max_bytes> n<max_files>` would
own under qmail): the file `current` and the rotated `@<tai64n>.s` files.
Every line is stamped `@<24 hex digits> ` as multilog's `t` action does, and
the variable parts of each line go through qmail's "logsafe" (spec §6.6) so
one address or remote reply can never forge a line.

As multilog, `current` is mode 0644 while written and 0744 after a clean
close (by the last of the processes writing it); one found still 0644 at start was left by a crash and is renamed
`@<tai64n>.u` (kept, counted among the rotated files).

Lines are buffered and written when `flush()` is called (the scheduler
flushes once per pass of its loop): 20,000 messages make ~120,000 lines and
neither a write nor an fsync per line is affordable. Rotation happens at a
line boundary, so a rotated file always ends with a whole line; it is
fsync'd before it is renamed, as multilog does.

This module must never raise into the scheduler because the disk is full: a
failed write is retried at the next flush, and lines beyond the buffer bound
are dropped and counted (delivery matters more than its log); once lines are
written again, one `warning:` line says how many were lost.

`[log] format = "json"` (`fmt="json"`) writes the same events, one JSON
object per line, for log shippers: `{"time": "<RFC 3339 UTC>", "event":
"delivery", "delivery": 42, "status": "success", "text": "..."}` — the
event's fields as values (numbers as numbers, texts unmangled: JSON's
escaping already keeps a line from being forged), in the same files with the
same rotation. A worded line (`info: supervisor: …`, `alert: …`) becomes
`{"event": "info", "text": "supervisor: …"}` (any other line's first word is its
event too: `pop3d: …` → `{"event": "pop3d", …}`).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.privilege import open_own_file

# TAI64 label of the Unix epoch: 2^62 + 10 (the TAI-UTC offset in 1970;
# multilog ignores later leap seconds, and so do we to match its output).
TAI64_EPOCH = (1 << 62) + 10

# logsafe (qmail-send qsutil.c): LF -> '/', bytes < 33, > 126 and '%' -> '_'.
_LOGSAFE = bytes(
    0x2F if b == 0x0A else 0x5F if (b < 33 or b > 126 or b == 0x25) else b
    for b in range(256)
)

CURRENT = "current"
LOG_FORMATS = ("qmail", "json")


def tai64n_label_ns(t_ns: int) -> str:
    """`@` + TAI64N of a Unix time in nanoseconds, with multilog's +500 ns."""
    sec, ns = divmod(t_ns, 1_000_000_000)
    # multilog stamps usec*1000 + 500: keep that rounding so lines look alike.
    nano = (ns // 1000) * 1000 + 500
    return f"@{TAI64_EPOCH + sec:016x}{nano:08x}"


def tai64n_label(t: float) -> str:
    """`@` + TAI64N label of Unix time `t` (seconds, float), as multilog writes it."""
    sec = int(t // 1)
    usec = int(round((t - sec) * 1_000_000))
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    return tai64n_label_ns(sec * 1_000_000_000 + usec * 1000)


def logsafe(value: str | bytes) -> str:
    """qmail's logsafe of a variable part of a line (address, remote text)."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return raw.translate(_LOGSAFE).decode("ascii")


def format_line(t: float, text: str) -> str:
    """One complete log line as it lands in `current` (text must already be logsafe)."""
    return f"{tai64n_label(t)} {text}\n"


def rfc3339_ns(t_ns: int) -> str:
    """`2026-12-04T00:17:17.123456Z`: a JSON line's time (UTC, microseconds)."""
    sec, ns = divmod(t_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns // 1000:06d}Z"


def json_safe(value: Any) -> Any:
    # Bytes from the wire arrive as surrogate escapes: a JSON parser may
    # refuse a lone surrogate, so they become U+FFFD.
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def json_line(t_ns: int, event: str, fields: dict[str, Any]) -> bytes:
    """One JSON log line: time, event, then the event's fields."""
    record = {"time": rfc3339_ns(t_ns), "event": event}
    for key, value in fields.items():
        record[key] = json_safe(value)
    return (json.dumps(record, separators=(",", ":")) + "\n").encode("ascii")


class QmailSendLog:
    """qmail-send's log lines, written to `log_dir/current` with multilog rotation.

    max_bytes: multilog's `s` (a file is rotated at the first line end once it
    holds max_bytes - 2000 bytes, or before a line that would take it past
    max_bytes); max_files: multilog's `n` (at most n - 1 rotated files kept).
    owner: (uid, gid) given to every file this writer creates: the root
    supervisor shares the directory with children that run as `[run] user`.
    """

    def __init__(self, log_dir: Path | str, *, max_bytes: int = 99999, max_files: int = 10,
                 max_buffered_lines: int = 200_000,
                 clock_ns: Callable[[], int] = time.time_ns, fmt: str = "qmail",
                 owner: tuple[int, int] | None = None) -> None:
        if fmt not in LOG_FORMATS:
            raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
        self.dir = Path(log_dir)
        self.json = fmt == "json"
        self.owner = owner
        # multilog's own bounds on s and n.
        self.max_bytes = min(max(max_bytes, 4096), 16_777_215)
        self.max_files = max(max_files, 2)
        self.max_buffered_lines = max_buffered_lines
        self.clock_ns = clock_ns
        self.dropped = 0
        self._dropped_told = 0              # of those, already reported in the log
        self._lines: list[bytes] = []
        self._done = 0                      # of _lines, written whole (in a flush)
        self._fd: int | None = None
        self._writers: int | None = None    # `lock`, held shared while writing
        self._ino = 0
        self._size = 0
        self._last_label_ns = 0
        self._opened_once = False
        self.dir.mkdir(parents=True, exist_ok=True)

    # --- generic ---------------------------------------------------------
    def _append(self, data: bytes) -> None:
        if len(self._lines) >= self.max_buffered_lines:
            self.dropped += 1
            return
        self._lines.append(data)

    def line(self, text: str) -> None:
        """Buffer one line whose variable parts are already logsafe (a worded
        line, `alert: …`: in JSON its first word is the event)."""
        if self.json:
            # `alert: …`, `pop3d: …`: the first word is the event.
            word, sep, rest = text.partition(": ")
            if sep and word.replace("-", "").replace("_", "").isalnum() and word.isascii():
                self.event(word, text=rest)
            else:
                self.event("line", text=text)
            return
        self._append(f"{tai64n_label_ns(self.clock_ns())} {text}\n".encode("ascii", "replace"))

    def event(self, name: str, **fields: Any) -> None:
        """One JSON line (json format only): the event and its fields."""
        self._append(json_line(self.clock_ns(), name, fields))

    # --- qmail-send's lines (spec §6.6) ----------------------------------
    # Each method writes qmail's line, or in json the same event's fields.
    def new_msg(self, msgid: int) -> None:
        if self.json:
            return self.event("new_msg", msg=msgid)
        self.line(f"new msg {msgid}")

    def info_msg(self, msgid: int, size: int, sender: str, qp: int, uid: int) -> None:
        if self.json:
            return self.event("info_msg", msg=msgid, bytes=size, sender=sender, qp=qp, uid=uid)
        self.line(f"info msg {msgid}: bytes {size} from <{logsafe(sender)}> qp {qp} uid {uid}")

    def starting_delivery(self, number: int, msgid: int, channel: str, recipient: str) -> None:
        if self.json:
            return self.event("starting_delivery", delivery=number, msg=msgid, channel=channel,
                              recipient=recipient)
        self.line(f"starting delivery {number}: msg {msgid} to {channel} {logsafe(recipient)}")

    def delivery(self, number: int, status: str, text: str) -> None:
        """status is K, Z or D (qmail's report letters)."""
        word = {"K": "success", "Z": "deferral", "D": "failure"}[status]
        if self.json:
            return self.event("delivery", delivery=number, status=word, text=text)
        self.line(f"delivery {number}: {word}: {logsafe(text)}")

    def status(self, channels: Sequence[tuple[str, int, int]], exiting: bool = False) -> None:
        """`status: local 0/10 remote 3/20`: (name, running, limit) per channel."""
        if self.json:
            return self.event("status", exitasap=exiting, **{
                name: {"running": running, "limit": limit} for name, running, limit in channels})
        counts = " ".join(f"{name} {running}/{limit}" for name, running, limit in channels)
        tail = " exitasap" if exiting else ""
        self.line(f"status: {counts}{tail}")

    def bounce_msg(self, msgid: int, qp: int) -> None:
        if self.json:
            return self.event("bounce_msg", msg=msgid, qp=qp)
        self.line(f"bounce msg {msgid} qp {qp}")

    def end_msg(self, msgid: int) -> None:
        if self.json:
            return self.event("end_msg", msg=msgid)
        self.line(f"end msg {msgid}")

    def triple_bounce(self, msgid: int) -> None:
        if self.json:
            return self.event("triple_bounce", msg=msgid)
        self.line(f"triple bounce: discarding bounce/{msgid}")

    def double_bounce_discarded(self, msgid: int) -> None:
        if self.json:
            return self.event("double_bounce", msg=msgid)
        self.line(f"double bounce: discarding bounce/{msgid}")

    def warning(self, text: str) -> None:
        if self.json:
            return self.event("warning", text=text)
        self.line(f"warning: {readable(text)}")

    def alert(self, text: str) -> None:
        if self.json:
            return self.event("alert", text=text)
        self.line(f"alert: {readable(text)}")

    def exiting(self) -> None:
        if self.json:
            return self.event("exiting")
        self.line("status: exiting")

    # --- output ----------------------------------------------------------
    def flush(self) -> None:
        """Write every buffered line, rotating at line ends; never raises OSError."""
        if not self._lines:
            return
        try:
            self._write_lines()
            if self.dropped != self._dropped_told:
                # The log takes lines again: say how many it lost meanwhile.
                lost, self._dropped_told = self.dropped - self._dropped_told, self.dropped
                self.warning(f"{lost} log lines dropped while the log could not be written")
                self._write_lines()
        except OSError:
            # Disk full or similar: keep the lines (bounded) and retry next flush.
            pass

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            try:
                # Finished (0744) only if no other process still writes it,
                # and the `current` of now (another may have rotated it).
                if self._writers is not None:
                    fcntl.flock(self._writers, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._reopen_if_rotated()
                os.fchmod(self._fd, 0o744)
            except OSError:
                pass
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._writers is not None:
            os.close(self._writers)
            self._writers = None

    def _create(self, path: Path, flags: int) -> int:
        # Root (the supervisor, lspawn) writes here too, in a directory the run user owns.
        fd = open_own_file(path, flags | os.O_CREAT, 0o644)
        if self.owner is not None:
            try:
                os.fchown(fd, *self.owner)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _open(self) -> None:
        path = self.dir / CURRENT
        if not self._opened_once:
            self._opened_once = True
            self._join_writers(path)
        self._fd = self._create(path, os.O_WRONLY | os.O_APPEND)
        # multilog: 0644 while in use, 0744 once cleanly finished.
        os.fchmod(self._fd, 0o644)
        st = os.fstat(self._fd)
        self._size, self._ino = st.st_size, st.st_ino

    def _join_writers(self, path: Path) -> None:
        """Hold `lock` shared for as long as this process writes. The first
        writer (no other holds it) adopts what a crash left: a `current` still
        0644 becomes `@<now>.u`, as multilog does; one closed cleanly (0744) is
        appended to. A later writer leaves `current` to the ones writing it."""
        self._writers = self._create(self.dir / "lock", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(self._writers, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._writers, fcntl.LOCK_SH)
            return
        try:
            st = os.lstat(path)
            if not st.st_mode & 0o100 and st.st_size > 0:
                os.rename(path, self.dir / f"{self._next_label()}.u")
                self._prune()
        except FileNotFoundError:
            pass
        finally:
            fcntl.flock(self._writers, fcntl.LOCK_SH)

    def _reopen_if_rotated(self) -> None:
        """Another process rotated `current`: write to the new one."""
        try:
            moved = os.lstat(self.dir / CURRENT).st_ino != self._ino
        except FileNotFoundError:
            moved = True
        if moved:
            os.close(self._fd)
            self._fd = None         # the next flush tries again if the open fails
            self._open()
        else:
            self._size = os.fstat(self._fd).st_size

    def _write_lines(self) -> None:
        if self._fd is None:
            self._open()
        else:
            self._reopen_if_rotated()
        lines = self._lines
        soft_limit = self.max_bytes - 2000
        size = self._size
        n = len(lines)
        chunk_start = i = 0
        self._done = 0
        try:
            while i < n:
                line = lines[i]
                if size > 0 and size + len(line) > self.max_bytes:
                    self._emit(chunk_start, i)
                    self._rotate()
                    size, chunk_start = 0, i
                    continue
                size += len(line)
                i += 1
                if size >= soft_limit:
                    self._emit(chunk_start, i)
                    self._rotate()
                    size, chunk_start = 0, i
            self._emit(chunk_start, n)
        finally:
            # Only lines known to be written leave the buffer.
            del lines[:self._done]

    def _emit(self, start: int, end: int) -> None:
        """Write self._lines[start:end]; self._done = the lines written whole."""
        lines = self._lines
        view = memoryview(b"".join(lines[start:end]))
        sent = 0
        try:
            while sent < len(view):
                written = os.write(self._fd, view[sent:])
                sent += written
                self._size += written
        finally:
            # A write the disk filled part way: the line it cut keeps only its
            # unwritten rest, so the retry finishes it (as multilog retries its
            # write) instead of tearing it and writing the lines before it twice.
            i = start
            while i < end and sent >= len(lines[i]):
                sent -= len(lines[i])
                i += 1
            if sent:
                lines[i] = lines[i][sent:]
            self._done = i

    def _rotate(self) -> None:
        assert self._fd is not None
        rotating = self._create(self.dir / "lock.rotate", os.O_RDWR | os.O_CLOEXEC)
        try:
            # One process rotates at a time; one that finds `current` already
            # rotated by another just writes to the new one.
            fcntl.flock(rotating, fcntl.LOCK_EX)
            os.fsync(self._fd)
            current = self.dir / CURRENT
            try:
                mine = os.lstat(current).st_ino == self._ino
            except FileNotFoundError:
                mine = False
            if mine:
                os.rename(current, self.dir / f"{self._next_label()}.s")
                # Finished only once renamed (a refused rename leaves `current`
                # in use, 0644); through the descriptor: a name here may be a link.
                os.fchmod(self._fd, 0o744)
            os.close(self._fd)
            self._fd = None
            self._open()
            if mine:
                self._prune()
        finally:
            os.close(rotating)

    def _next_label(self) -> str:
        now = self.clock_ns()
        # Labels must be unique and increasing even within one clock tick.
        if now <= self._last_label_ns:
            now = self._last_label_ns + 1000
        self._last_label_ns = now
        return tai64n_label_ns(now)

    def _prune(self) -> None:
        rotated = sorted(p for p in os.listdir(self.dir) if p.startswith("@"))
        while len(rotated) >= self.max_files:
            try:
                os.unlink(self.dir / rotated.pop(0))
            except FileNotFoundError:
                pass


def readable(reason: object) -> str:
    """A whole worded line (an alert, another part's warning) as one printable
    ASCII log line: spaces kept, a LF as '/' (logsafe's choice), other
    controls and non-ASCII as '_'."""
    return "".join("/" if c == "\n" else c if " " <= c < "\x7f" else "_" for c in str(reason))


class LogHandler(logging.Handler):
    """`logging` records of qrelay's other processes (the supervisor, the
    receivers) into the same ROOT/log, beside qmail-send's lines:
    `warning: supervisor: receiver-0 (pid 4242) exited with status 111;
    restarting`. Written at once: these are rare, and a record must not sit in
    a buffer a fork would copy."""

    def __init__(self, log: QmailSendLog, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            word = ("info" if record.levelno < logging.WARNING else
                    "warning" if record.levelno < logging.ERROR else "alert")
            name = record.name.removeprefix("qrelay.")
            if self.log.json:
                self.log.event(word, source=name, text=record.getMessage())
            else:
                self.log.line(f"{word}: {name}: {readable(record.getMessage())}")
            self.log.flush()
        except Exception:
            self.handleError(record)


def tcpserver_safe(value: str) -> str:
    """tcpserver's safecats: at most 100 characters (then `...`); bytes below
    33 or above 126, `%` and `:` become `?` (a host name can never add a field)."""
    out = "".join("?" if c < "!" or c > "~" or c in "%:" else c for c in value[:100])
    return out + "..." if len(value) > 100 else out


class SmtpdLog(QmailSendLog):
    """ROOT/log/smtpd: what `tcpserver -v … rblsmtpd … qmail-smtpd 2>&1 |
    multilog t ./log/smtpd` would hold. The receivers write it together (the
    multilog format, rotation and several-writer rules of QmailSendLog).

    tcpserver's lines keep its exact words; where tcpserver prints the pid of
    the child it forked, N is the connection's number (engine.smtp.connlimit:
    unique for the life of `qrelay run`). qrelay's own lines say why a client
    was refused: `smtpd: pid N from IP: [COMMAND <arg>: ]reply`.

    `on_first_line` (if set) is called when a line lands in an empty buffer:
    the receiver then schedules one flush (~0.1 s later, in a thread of its
    own so a rotation's fsync never stalls the event loop), so lines cost no
    write each on the hot path. flush() may run in that thread while the
    loop adds lines (list appends and the flush's `del lines[:done]` are each
    atomic); flushes themselves are serialised by a lock."""

    on_first_line: Callable[[], None] | None = None

    def __init__(self, log_dir: Path | str, **kwargs: Any) -> None:
        super().__init__(log_dir, **kwargs)
        self._flush_lock = threading.Lock()
        self._stamp_sec = -1
        self._stamp = ""

    @property
    def pending(self) -> int:
        """Lines buffered, not yet written."""
        return len(self._lines)

    def _append(self, data: bytes) -> None:
        super()._append(data)
        if len(self._lines) == 1 and self.on_first_line is not None:
            self.on_first_line()

    def line(self, text: str) -> None:
        # QmailSendLog.line with the stamp's seconds part formatted once per
        # second: several lines per connection, so this is the hot path.
        if self.json:
            return super().line(text)
        lines = self._lines
        if len(lines) >= self.max_buffered_lines:
            self.dropped += 1
            return
        sec, ns = divmod(self.clock_ns(), 1_000_000_000)
        if sec != self._stamp_sec:
            self._stamp_sec = sec
            self._stamp = f"@{TAI64_EPOCH + sec:016x}"
        lines.append(f"{self._stamp}{ns // 1000 * 1000 + 500:08x} {text}\n".encode("ascii", "replace"))
        if len(lines) == 1 and self.on_first_line is not None:
            self.on_first_line()

    def flush(self) -> None:
        with self._flush_lock:
            super().flush()

    def tcpserver_status(self, count: int, limit: int) -> None:
        if self.json:
            return self.event("tcpserver_status", connections=count, limit=limit)
        self.line(f"tcpserver: status: {count}/{limit}")

    def tcpserver_pid(self, number: int, remoteip: str) -> None:
        if self.json:
            return self.event("tcpserver_pid", pid=number, remoteip=remoteip)
        self.line(f"tcpserver: pid {number} from {remoteip}")

    def tcpserver_ok(self, number: int, local: tuple[str, str, int],
                     remote: tuple[str, str, str, int], deny: bool = False) -> None:
        """`ok`/`deny N localhost:localip:localport remotehost:remoteip:remoteinfo:remoteport`
        (empty host or info when unknown, as tcpserver -H -R prints them)."""
        lhost, lip, lport = local
        rhost, rip, rinfo, rport = remote
        word = "deny" if deny else "ok"
        if self.json:
            return self.event(f"tcpserver_{word}", pid=number, localhost=lhost, localip=lip,
                              localport=lport, remotehost=rhost, remoteip=rip,
                              remoteinfo=rinfo, remoteport=rport)
        self.line(f"tcpserver: {word} {number} {tcpserver_safe(lhost)}:{lip}:{lport} "
                  f"{tcpserver_safe(rhost)}:{rip}:{tcpserver_safe(rinfo)}:{rport}")

    def tcpserver_end(self, number: int, status: int) -> None:
        """status: a wait status as tcpserver prints it (0, 256 = exit 1, 25600 = deny)."""
        if self.json:
            return self.event("tcpserver_end", pid=number, status=status)
        self.line(f"tcpserver: end {number} status {status}")

    def rblsmtpd(self, remoteip: str, number: int, reply: str) -> None:
        if self.json:
            return self.event("rblsmtpd", remoteip=remoteip, pid=number, reply=reply)
        self.line(f"rblsmtpd: {remoteip} pid {number}: {_printable(reply)}")

    def smtpd(self, number: int, remoteip: str, reply: str, command: str = "") -> None:
        """One refusal: `smtpd: pid N from IP: RCPT <addr>: 553 …` (every byte
        outside 32..126 of command and reply becomes `_`: no line can be forged)."""
        if self.json:
            return self.event("smtpd", pid=number, remoteip=remoteip, command=command,
                              reply=reply)
        what = f"{_printable(command)}: " if command else ""
        self.line(f"smtpd: pid {number} from {remoteip}: {what}{_printable(reply)}")


def _printable(text: str) -> str:
    # Spaces stay (these lines are read by people); controls, DEL and
    # non-ASCII become '_', so a client's bytes can never start a new line.
    return text if text.isascii() and text.isprintable() else "".join(
        c if " " <= c <= "~" else "_" for c in text)
