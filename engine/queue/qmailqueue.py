"""qmail's queue on disk (spec §5), read and moved into the spool: `qrelay import-qmail`.

Owns reading QMAILQUEUE — mess/S/N, info/S/N, local/S/N, remote/S/N,
todo/N, intd/N, bounce/N (todo/ and intd/ split too with the big-todo
patch) — and removing what was moved. It writes the spool only through
Spool.import_messages, and takes qmail-send's lock/sendmutex for the whole
run, so a qmail-send cannot start meanwhile (and one running makes it refuse).

What each message becomes (spec §5.3, §5.4, §6.2):

    todo/N present (S4)  queued, not yet preprocessed: every recipient of the
                         envelope `u…\\0p…\\0F<sender>\\0T<rcpt>\\0…\\0`; qrelay's
                         scheduler preprocesses it (leftover info/local/remote
                         of an interrupted preprocessing are ignored, as qmail does)
    info/S/N (S5)        birth = the mtime of info (retries and queuelifetime
                         carry over); each `T` of local/ and remote/ a recipient
                         on that channel, due at the file's mtime (qmail's next
                         retry time after a clean stop; a time past is due now);
                         each `D` done: failed with its report if bounce/N names
                         it, else delivered. Nothing left but failures: the
                         message bounces as soon as the scheduler sees it
    nothing left to do   (every recipient done, no bounce/N) removed
    anything else        reported, left in place: mess without an envelope
                         (qmail-queue interrupted), an envelope without mess,
                         a torn file (no final NUL), an unknown record

Crash safety: a message's files are removed only after the spool commit that
holds it, mess/S/N last; the spool remembers each message under a key made
of its number, mtime and size (Spool.import_messages), so a second run after
a crash at any point moves what is left and duplicates nothing.
"""
from __future__ import annotations

import fcntl
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from engine.accounts.files import FileKey, read_whole
from engine.queue.values import ImportedMessage, ImportedRecipient

MESSAGE_DIRS = ("mess", "info", "local", "remote", "todo", "intd", "bounce")


class QmailQueueError(Exception):
    """QMAILQUEUE cannot be imported at all (not a queue, qmail-send running)."""


class NoEnvelope(ValueError):
    """mess/S/N alone: qmail-queue was interrupted, or an import removed the
    rest of a message it had moved (then the spool knows `key`)."""

    def __init__(self, key: bytes, path: str):
        super().__init__("no envelope (neither todo/N nor info/S/N): "
                         "qmail-queue did not finish it")
        self.key = key
        self.path = path


@dataclass(slots=True)
class QmailMessage:
    number: int
    files: list[str]                    # removal order: mess/S/N last
    message: ImportedMessage | None     # None: nothing left to do
    kind: str                           # "queued" | "todo" | "bouncing" | "finished"


@dataclass(slots=True)
class ImportReport:
    moved: int = 0
    todo: int = 0
    bouncing: int = 0
    to_deliver: int = 0                 # recipients
    done: int = 0                       # recipients
    finished: int = 0                   # messages with nothing left to do (removed)
    already: int = 0                    # moved by an earlier run, files removed now
    malformed: list[str] = field(default_factory=list)


def lock_queue(qdir: Path) -> int | None:
    """qmail-send's lock/sendmutex, taken for the import; QmailQueueError if held."""
    path = qdir / "lock" / "sendmutex"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise QmailQueueError(f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QmailQueueError(f"{path} is locked: qmail-send (or qrelay run) is running on "
                              f"this queue; stop it first (svc -d /service/qmail-send)") from None
    return fd


def _records(raw: bytes, what: str) -> list[bytes]:
    """NUL-terminated records; a file not ending in NUL is torn."""
    if not raw.endswith(b"\0"):
        raise ValueError(f"{what} is torn (no final NUL)")
    return raw[:-1].split(b"\0")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _envelope(raw: bytes) -> tuple[int, int, str, list[str]]:
    """todo/intd: u<uid>, p<pid>, F<sender>, then T records, then an empty one."""
    recs = _records(raw, "todo")
    if not recs or recs[-1] != b"":
        raise ValueError("todo is torn (no terminating empty record)")
    uid = pid = 0
    sender = None
    rcpts: list[str] = []
    for rec in recs[:-1]:
        tag, value = rec[:1], rec[1:]
        if tag == b"u" and value.isdigit():
            uid = int(value)
        elif tag == b"p" and value.isdigit():
            pid = int(value)
        elif tag == b"F" and sender is None:
            sender = _text(value)
        elif tag == b"T" and sender is not None:
            rcpts.append(_text(value))
        else:
            raise ValueError(f"todo has an unknown record {rec[:20]!r}")
    if sender is None:
        raise ValueError("todo has no F record")
    return uid, pid, sender, rcpts


def _bounces(raw: bytes) -> dict[str, str]:
    """bounce/N: `<addr>:\\n<report>\\n` blocks, separated by an empty line."""
    out = {}
    for block in _text(raw).split("\n\n"):
        head, _, report = block.partition("\n")
        if head.endswith(":"):
            out[head[:-1].strip("<>")] = report + "\n" if report else ""
    return out


def _failed_text(addr: str, reports: dict[str, str]) -> str | None:
    if addr in reports:
        return reports[addr]
    for shown, text in reports.items():     # qmail strips a virtualdomain prepend
        if addr.endswith("-" + shown):
            return text
    return None


def _read(path: str) -> tuple[bytes, FileKey]:
    # Root reads files qmailq and qmails own (qmail-queue is set-uid qmailq):
    # a link there to /etc/shadow must not become a queued message.
    got = read_whole(path, follow_links=False)
    if got is None:
        raise ValueError(f"{path} vanished while being read")
    return got


class QmailQueue:
    """The queue at `qdir` (qmail's QMAILHOME/queue). Each directory is
    listed once (`index`), so reading a message costs an open per file it
    has, never a stat of a file it may not have (paths are plain strings:
    this runs at thousands of messages a second)."""

    def __init__(self, qdir: Path):
        self.dir = Path(qdir)
        if not (self.dir / "mess").is_dir():
            raise QmailQueueError(f"{qdir}: not a qmail queue (no mess/ directory)")
        self._d = str(self.dir)
        self._entries: dict[str, set[str]] = {}

    def index(self) -> None:
        """List every message directory: name -> {"S/N" and "N" entries}."""
        for name in MESSAGE_DIRS:
            found: set[str] = set()
            base = os.path.join(self._d, name)
            try:
                top = list(os.scandir(base))
            except FileNotFoundError:
                top = []
            for e in top:
                if e.is_dir():
                    found.update(f"{e.name}/{n}" for n in os.listdir(e.path))
                else:
                    found.add(e.name)
            self._entries[name] = found

    def check_removable(self) -> None:
        """QmailQueueError unless this process may remove the files of every
        message directory (a moved message's files go): asked before anything
        moves, so a user who may not (qmails cannot touch qmailq's mess/) is
        refused instead of stopped at the first removal, batch after batch."""
        for name in MESSAGE_DIRS:
            base = os.path.join(self._d, name)
            try:
                top = list(os.scandir(base))
            except FileNotFoundError:
                continue
            holding = [e.path for e in top if e.is_dir() and os.listdir(e.path)]
            if any(not e.is_dir() for e in top):
                holding.append(base)
            for d in holding:
                if not os.access(d, os.W_OK | os.X_OK):
                    raise QmailQueueError(f"{d}: cannot remove the files moved out of it "
                                          f"(permission denied): run this as root")

    def _path(self, name: str, split: str, number: str) -> str | None:
        """name/S/N, or name/N for the unsplit todo/intd/bounce (or big-todo's split)."""
        entries = self._entries[name]
        if f"{split}/{number}" in entries:
            return f"{self._d}/{name}/{split}/{number}"
        if number in entries:
            return f"{self._d}/{name}/{number}"
        return None

    def numbers(self) -> Iterator[tuple[int, str]]:
        """(N, S) of every mess/S/N, by split then number (after index())."""
        out = []
        for entry in self._entries["mess"]:
            split, _, n = entry.partition("/")
            if n.isdigit():
                out.append((_num(split), int(n), split))
        for _s, n, split in sorted(out):
            yield n, split

    def strays(self, seen: set[int]) -> Iterator[tuple[int, str]]:
        """Envelopes (info/, todo/) with no mess/S/N: reported, left alone."""
        for name in ("info", "todo"):
            for entry in sorted(self._entries.get(name, ())):
                n = entry.rpartition("/")[2]
                if n.isdigit() and int(n) not in seen:
                    yield int(n), f"{name}/{entry}"

    def read(self, number: int, split: str, now: float) -> QmailMessage:
        """One message as the spool will hold it; ValueError (why) if malformed."""
        n = str(number)
        paths = {name: self._path(name, split, n) for name in MESSAGE_DIRS[1:]}
        mess = f"{self._d}/mess/{split}/{n}"
        files = [p for name in ("todo", "intd", "info", "local", "remote", "bounce")
                 if (p := paths[name]) is not None] + [mess]
        raw, st = _read(mess)
        data = raw.replace(b"\n", b"\r\n")   # qmail stores LF, the spool CRLF
        key = b"qmail:%d:%d:%d" % (number, st.mtime_ns, st.size)
        if paths["todo"] is not None:
            raw, st = _read(paths["todo"])
            uid, pid, sender, rcpts = _envelope(raw)
            todo = tuple(ImportedRecipient(a, "todo", "todo") for a in rcpts)
            msg = ImportedMessage(key, sender, todo, data, st.mtime_ns / 1e9, pid, uid)
            return QmailMessage(number, files, msg, "todo")
        if paths["info"] is None:
            raise NoEnvelope(key, mess)
        raw, st = _read(paths["info"])
        recs = _records(raw, "info")
        if len(recs) != 1 or not recs[0].startswith(b"F"):
            raise ValueError("info is not one F record")
        sender = _text(recs[0][1:])
        birth = st.mtime_ns / 1e9
        reports = _bounces(_read(paths["bounce"])[0]) if paths["bounce"] else {}
        rcpts: list[ImportedRecipient] = []
        for channel in ("local", "remote"):
            p = paths[channel]
            if p is None:
                continue
            raw, st = _read(p)
            next_try = st.mtime_ns / 1e9
            for rec in _records(raw, channel):
                tag, addr = rec[:1], _text(rec[1:])
                if tag == b"T":
                    rcpts.append(ImportedRecipient(addr, channel,
                                                   "deferred" if next_try > birth else "pending",
                                                   next_try))
                elif tag == b"D":
                    text = _failed_text(addr, reports)
                    rcpts.append(ImportedRecipient(addr, channel, "delivered" if text is None
                                                   else "failed", 0.0, text or ""))
                else:
                    raise ValueError(f"{channel} has an unknown record {rec[:20]!r}")
        if not rcpts and reports:
            # Every recipient done and local/remote gone; the bounce not yet sent.
            rcpts = [ImportedRecipient(a, "remote", "failed", 0.0, t) for a, t in reports.items()]
        unfinished = sum(r.state in ("pending", "deferred") for r in rcpts)
        failed = sum(r.state == "failed" for r in rcpts)
        if not unfinished and not failed:
            return QmailMessage(number, files, None, "finished")
        return QmailMessage(number, files,
                            ImportedMessage(key, sender, tuple(rcpts), data, birth),
                            "bouncing" if failed else "queued")


def _num(name: str) -> int:
    return int(name) if name.isdigit() else 1 << 30


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_files(files: list[str], pool: ThreadPoolExecutor | None = None) -> None:
    """Unlink `files`, in parallel on `pool`: an unlink of a file whose blocks
    are on disk waits for the disk (ms each with online discard), and several
    at once overlap (measured 11x faster with 16 threads)."""
    if pool is None:
        for p in files:
            _unlink(p)
    else:
        list(pool.map(_unlink, files))


def remove_empty_dirs(qdir: Path) -> None:
    """qmail's message directories, if empty (lock/ and pid/ stay)."""
    for name in MESSAGE_DIRS:
        base = qdir / name
        if not base.is_dir():
            continue
        for sub in sorted(base.iterdir()) if base.is_dir() else []:
            if sub.is_dir():
                try:
                    sub.rmdir()
                except OSError:
                    pass
        try:
            base.rmdir()
        except OSError:
            pass


def import_queue(queue: QmailQueue, spool, *, dry_run: bool, batch: int,
                 now: float, report: Callable[[str], None],
                 batch_bytes: int = 32 * 1024 * 1024, unlink_threads: int = 16,
                 progress: Callable[[str, int, int], None] | None = None) -> ImportReport:
    """Move every message of `queue` into `spool` (None with dry_run and no
    spool yet), `batch` messages per spool commit, fewer once they hold
    `batch_bytes` (a batch is in memory until its commit); the files of a batch are
    removed by `unlink_threads` threads, each message's mess/S/N after its
    other files. `report(line)` hears each malformed entry (left in place),
    `progress(what, done, total)` how many messages are read so far."""
    with ThreadPoolExecutor(max(1, unlink_threads)) as pool:
        return _import(queue, spool, dry_run, batch, batch_bytes, now, report, pool,
                       progress or (lambda what, done, total: None))


def _import(queue: QmailQueue, spool, dry_run: bool, batch: int, batch_bytes: int,
            now: float, report: Callable[[str], None], pool: ThreadPoolExecutor,
            progress: Callable[[str, int, int], None]) -> ImportReport:
    out = ImportReport()
    seen: set[int] = set()
    pending: list[QmailMessage] = []
    pending_bytes = 0
    moved_keys: list[bytes] = []     # their files are gone: forgotten with the next batch

    def count(m: QmailMessage) -> None:
        if m.message is None:
            out.finished += 1
            return
        out.moved += 1
        out.todo += m.kind == "todo"
        out.bouncing += m.kind == "bouncing"
        for r in m.message.recipients:
            if r.state in ("delivered", "failed"):
                out.done += 1
            else:
                out.to_deliver += 1

    def flush() -> None:
        nonlocal pending_bytes
        if not pending:
            return
        msgs = [m.message for m in pending if m.message is not None]
        if dry_run:
            known = spool.imported([m.key for m in msgs]) if spool is not None else {}
            for m in pending:
                if m.message is not None and m.message.key in known:
                    out.already += 1
                else:
                    count(m)
        else:
            known = spool.imported([m.key for m in msgs])
            spool.import_messages(msgs, forget=moved_keys)
            moved_keys.clear()
            for m in pending:
                if m.message is not None and m.message.key in known:
                    out.already += 1
                else:
                    count(m)
            # mess/S/N last, so a message whose other files went is still
            # recognised (its key is made from mess) by a run after a crash.
            remove_files([p for m in pending for p in m.files[:-1]], pool)
            remove_files([m.files[-1] for m in pending], pool)
            moved_keys.extend(m.key for m in msgs)
        pending.clear()
        pending_bytes = 0

    queue.index()
    numbers = list(queue.numbers())
    for number, split in numbers:
        progress("messages", len(seen), len(numbers))
        seen.add(number)
        try:
            m = queue.read(number, split, now)
            pending.append(m)
            pending_bytes += len(m.message.data) if m.message is not None else 0
        except NoEnvelope as exc:
            if spool is not None and spool.imported([exc.key]):
                out.already += 1          # moved; a crash came before its mess went
                if not dry_run:
                    remove_files([exc.path])
                    moved_keys.append(exc.key)
                continue
            line = f"#{number} (mess/{split}/{number}): {exc}; left in place"
            out.malformed.append(line)
            report(line)
        except (ValueError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            line = f"#{number} (mess/{split}/{number}): {why}; left in place"
            out.malformed.append(line)
            report(line)
            continue
        if len(pending) >= batch or pending_bytes >= batch_bytes:
            flush()
    flush()
    if moved_keys and not dry_run:
        spool.forget_imported(moved_keys)
    for number, path in queue.strays(seen):
        line = f"#{number} ({path}): no mess/ file; left in place"
        out.malformed.append(line)
        report(line)
    return out
