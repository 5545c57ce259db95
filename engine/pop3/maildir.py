"""A Maildir as one POP3 session sees it: qmail-pop3d's list, fixed for the session.

Owns (spec vpopmail-pop3-auth.md §1.6):
- the scan: first `tmp/` entries not starting with `.` whose atime is older
  than 36 hours are unlinked (maildir_clean); then `new/` and `cur/` are
  listed — entries not starting with `.` whose mtime (whole seconds) is before
  now, so a file stamped this second or in the future is left for the next
  session — ordered by mtime (ties: by name), new and cur mixed; size =
  st_size (the stored LF bytes, not the octets sent);
- the UIDL: the name after `new/`/`cur/` cut at the first `:`, so it survives
  the move to `cur/`;
- the commit at QUIT: deleted messages unlinked, the others still in `new/`
  renamed to `cur/NAME:2,` (a failed rename is ignored, as in qmail); what was
  unlinked is appended to a Maildir++ `maildirsize` as `-bytes -count`, as
  vpopmail's qmail-maildir++ patch does (counted as the quota counts it: a
  trashed `:2,…T` message not at all, a `,S=` name by that size), so vdelivermail's quota check sees
  the room at once. The directories changed are fsync'd before QUIT's +OK
  (qmail never syncs), so a crash cannot bring deleted messages back to a
  client told they are gone. Nothing is changed before QUIT, so a dropped
  connection changes nothing;
- the lock qmail-pop3d lacks: an exclusive flock(2) on the Maildir directory
  itself for the life of the session (no file is created). A second session
  on the same mailbox — in this process or any other — gets MailboxBusy
  instead of the same list, so two sessions can never RETR and DELE the same
  messages. The kernel drops the lock with the descriptor, so a killed
  receiver never leaves a mailbox locked.

Every function here blocks on the file system: sessions call them from an
executor, never on the event loop — except opening a message to send it.
"""
from __future__ import annotations

import fcntl
import heapq
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from engine.accounts.files import fsync_dir

# qmail's maildir_clean: tmp/ files untouched for 36 hours are abandoned deliveries.
TMP_MAX_AGE = 129600


class MailboxError(Exception):
    """`reply` is qmail-pop3d's -ERR text for it."""

    def __init__(self, reply: str, why: str = "") -> None:
        super().__init__(reply)
        self.reply = reply
        self.why = why          # the system's reason, for the log only


class MailboxBusy(MailboxError):
    """Another session holds this Maildir."""


NO_MAILDIR = "this user has no $HOME/Maildir"
SCAN_FAILED = "unable to scan $HOME/Maildir"
IN_USE = "[IN-USE] this mailbox is in use by another session"


@dataclass(slots=True)
class Message:
    name: str          # "new/X" or "cur/X", relative to the Maildir
    size: int
    deleted: bool = False

    @property
    def uidl(self) -> str:
        return self.name[4:].split(":", 1)[0]


class Mailbox:
    """A locked Maildir and its message list (see the module docstring)."""

    def __init__(self, path: str, lock_fd: int, messages: list[Message]) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self.messages = messages

    @classmethod
    def open(cls, path: str, max_messages: int, *, now: float | None = None) -> "Mailbox":
        """Lock and scan the Maildir at `path`; raises MailboxError."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise MailboxError(NO_MAILDIR, exc.strerror or "") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MailboxBusy(IN_USE) from None
            now = time.time() if now is None else now
            clean_tmp(path, now)
            messages = scan(path, int(now), max_messages)
        except OSError as exc:
            os.close(fd)
            raise MailboxError(SCAN_FAILED, exc.strerror or "") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, messages)

    def file(self, message: Message) -> str:
        return os.path.join(self.path, message.name)

    def has_changes(self) -> bool:
        """Whether QUIT has anything to do: a deletion, or a message still in new/."""
        return any(m.deleted or m.name.startswith("new/") for m in self.messages)

    def commit(self) -> list[tuple[str, str]]:
        """QUIT: unlink the deleted, move the rest out of new/. Returns the
        unlinks that failed, (name, the system's reason): each gets
        qmail-pop3d's -ERR line, and the log says why."""
        # Imported here: the package would bring local delivery into every receiver.
        from engine.delivery.local import quota
        failed: list[tuple[str, str]] = []
        freed = unlinked = 0
        changed: set[str] = set()     # new, cur
        for m in self.messages:
            if m.deleted:
                try:
                    os.unlink(self.file(m))
                except OSError as exc:
                    failed.append((m.name, exc.strerror or str(exc)))
                else:
                    changed.add(m.name[:3])
                    if quota.counted(m.name):    # what the quota counted, as it counted it
                        size = quota.name_size(m.name)
                        freed += m.size if size is None else size
                        unlinked += 1
            elif m.name.startswith("new/"):
                try:
                    os.rename(self.file(m), os.path.join(self.path, "cur", m.name[4:] + ":2,"))
                except OSError:
                    pass  # qmail: "if it fails, bummer"
                else:
                    changed.update(("new", "cur"))
        for sub in sorted(changed):
            try:
                fsync_dir(os.path.join(self.path, sub))
            except OSError:
                pass  # done, only not yet on disk: qmail's state, and no better answer to give
        if unlinked:
            try:
                quota.add(self.path, -freed, -unlinked)   # no maildirsize: nothing to do
            except OSError:
                pass  # its next rebuild counts right
        return failed

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def clean_tmp(path: str, now: float) -> None:
    tmp = os.path.join(path, "tmp")
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return  # qmail ignores a missing tmp/ here
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.stat().st_atime < now - TMP_MAX_AGE:
                os.unlink(entry.path)
        except OSError:
            pass


def scan(path: str, now_sec: int, max_messages: int) -> list[Message]:
    """The oldest `max_messages` of new/ and cur/, in mtime order; raises
    OSError when either cannot be read. Only those are ever held, however
    many the Maildir has (a catch-all never emptied: millions)."""
    def entries() -> Iterator[tuple[int, str, int]]:
        for sub in ("new", "cur"):
            with os.scandir(os.path.join(path, sub)) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        st = entry.stat()
                    except OSError:
                        continue  # gone since listed (another reader, a cleaner)
                    mtime = int(st.st_mtime)
                    if mtime < now_sec:
                        yield mtime, f"{sub}/{entry.name}", st.st_size

    return [Message(name, size) for _, name, size in heapq.nsmallest(max_messages, entries())]
