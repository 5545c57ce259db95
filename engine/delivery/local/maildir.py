"""Durable Maildir delivery (qmail-local's maildir_child, made crash-safe).

Steps, and why: write the file under `tmp/` with a name no other delivery can
choose, fsync it, link it into `new/` (the commit point: a reader never sees
a partial file in new/), unlink the tmp name, and fsync `new/` so the link
itself survives a crash. Only then is the delivery reported done. qmail
stops after the link (it relies on synchronous directory updates); we do
not.

Name (Maildir spec, D. J. Bernstein's "modern" form): `<sec>.M<usec>P<pid>Q<n>.<host>`
with a per-process counter `n`, so two deliveries in one process and one
second never collide; `,S=<size>` (Maildir++) is appended when asked, which
is what vdelivermail's quota code counts. `/` and `:` in the host name are
written as `\\057` and `\\072`.

Directory syncs are shared (`DirSync`): deliveries that linked into the same
`new/` while one fsync of it was running wait for the next fsync, which
covers all of them at once, instead of each paying for its own. Under
concurrency that turns N directory fsyncs into about two.

With the default fsync, the steps of one delivery run in C with the GIL
released once (engine._fileio): the worker's threads otherwise hand the GIL
over at every system call, each time a futex wake and a context switch when
another thread waits for it. A delivery that finds no other one linking
into its new/ (DirSync.claim) fsyncs new/ in that same call; one that finds
another goes through DirSync.sync as above. There the link and unlink are
one renameat2(RENAME_NOREPLACE) where the filesystem has it: the same
guarantee (a name in new/ is never replaced), one call.

This module never reports success before both fsyncs returned, and never
deletes a file in new/ or cur/ except the one it has just linked when the
fsync of new/ failed (the delivery is then reported as deferred and retried:
at least once, never lost).
"""
from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from engine import _fileio


class MaildirError(Exception):
    """`kind`: "chdir" (Maildir missing: qmail's exit 2), "write" (any other).
    For "write", `step` says which file step failed ("open" the tmp/ file,
    "write" it — write, fsync, close —, "link" it into new/, "sync" new/) and
    `tmp`/`new` name the files: vdelivermail's texts differ by step."""

    def __init__(self, kind: str, err: int | None, what: str, *, step: str = "",
                 tmp: str = "", new: str = "") -> None:
        super().__init__(what)
        self.kind = kind
        self.errno = err
        self.step = step
        self.tmp = tmp
        self.new = new


def _safe_host(host: str) -> str:
    return host.replace("/", "\\057").replace(":", "\\072")


@dataclass(slots=True)
class _DirState:
    cond: threading.Condition = field(default_factory=threading.Condition)
    linked: int = 0       # links announced so far
    synced: int = 0       # every link with a number <= synced is durable
    syncing: bool = False
    users: int = 0


_UNSHARED = _DirState()     # claim()'s answer when every caller syncs for itself


class DirSync:
    """fsync a directory after a link, sharing one fsync among concurrent callers."""

    def __init__(self, fsync=os.fsync, *, share: bool = True) -> None:
        self._fsync = fsync
        self._share = share     # False: every caller pays its own fsync (bench baseline)
        self._lock = threading.Lock()
        self._dirs: dict[str, _DirState] = {}
        self.fsyncs = 0       # directory fsyncs actually done (for bench and tests)
        self.requests = 0

    def _enter(self, path: str) -> _DirState:
        with self._lock:
            st = self._dirs.get(path)
            if st is None:
                st = self._dirs[path] = _DirState()
            st.users += 1
            self.requests += 1
            return st

    def _leave(self, path: str, st: _DirState) -> None:
        with self._lock:
            st.users -= 1
            if st.users == 0 and self._dirs.get(path) is st:
                del self._dirs[path]

    def claim(self, path: str) -> _DirState | None:
        """For a caller that links into `path` and fsyncs it itself, in one
        step (engine._fileio.write_linked's `syncdir`): a state to hand to
        done(), if no other caller links or syncs there now (any that comes
        meanwhile waits for this fsync as for any other); else None: link,
        then sync()."""
        with self._lock:
            if not self._share:
                self.requests += 1
                return _UNSHARED
            if path in self._dirs:
                return None
            self.requests += 1
            st = self._dirs[path] = _DirState(linked=1, syncing=True, users=1)
            return st

    def done(self, path: str, st: _DirState, synced: bool, tried: bool) -> None:
        """After a claim: whether the fsync was made and worked (`synced`),
        or at least tried."""
        if tried:
            with self._lock:
                self.fsyncs += 1
        if st is _UNSHARED:
            return
        with st.cond:
            st.syncing = False
            if synced:
                st.synced = max(st.synced, 1)
            st.cond.notify_all()
        self._leave(path, st)

    def sync(self, path: str) -> None:
        """Return once an fsync of `path` that started after this call began has
        finished. Raises OSError if the fsync that was to cover us failed."""
        if not self._share:
            with self._lock:
                self.requests += 1
            self._fsync_dir(path)
            return
        st = self._enter(path)
        try:
            with st.cond:
                st.linked += 1
                mine = st.linked
                while st.synced < mine:
                    if st.syncing:
                        st.cond.wait()
                        continue
                    st.syncing = True
                    target = st.linked
                    error: OSError | None = None
                    st.cond.release()
                    try:
                        self._fsync_dir(path)
                    except OSError as exc:
                        error = exc
                    finally:
                        st.cond.acquire()
                        st.syncing = False
                        st.cond.notify_all()
                    if error is not None:
                        raise error
                    st.synced = max(st.synced, target)
        finally:
            self._leave(path, st)

    def _fsync_dir(self, path: str) -> None:
        if self._fsync is os.fsync:
            err = _fileio.fsync_dir(os.fsencode(path))
            if err:
                raise OSError(err, os.strerror(err), path)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._fsync(fd)
            finally:
                os.close(fd)
        with self._lock:
            self.fsyncs += 1


# The Maildir spec's per-process delivery counter (Q<n>): shared by every
# writer in the process, so two writers can never pick the same name; after
# a fork the pid differs, so continuing the parent's count stays unique.
_DELIVERIES = itertools.count(1)

# This process's pid for the names, kept (getpid is a system call, one per
# delivery otherwise) and renewed in a forked child.
_PID = os.getpid()


def _renew_pid() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


class MaildirWriter:
    """Share one per process: it holds the DirSync that lets concurrent
    deliveries into one Maildir share directory fsyncs."""

    def __init__(self, hostname: str | None = None, *, dirsync: DirSync | None = None,
                 clock=time.time, fsync=os.fsync) -> None:
        self.host = _safe_host(hostname if hostname is not None else socket.gethostname())
        self.dirsync = dirsync if dirsync is not None else DirSync(fsync)
        self._clock = clock
        self._fsync = fsync

    def unique_name(self) -> str:
        now = self._clock()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{_PID}Q{next(_DELIVERIES)}.{self.host}"

    def _names(self, maildir: str, parts: list[bytes], size_suffix: bool) -> tuple[str, str, str]:
        """A new message's name, its tmp/ path and its new/ path."""
        name = self.unique_name()
        if size_suffix:
            name += f",S={sum(len(p) for p in parts)}"
        return name, os.path.join(maildir, "tmp", name), os.path.join(maildir, "new", name)

    def deliver(self, maildir: str, parts: list[bytes], *, size_suffix: bool = False) -> str:
        """Write the concatenation of `parts` as one new message; return its name
        under new/. Raises MaildirError; on error nothing is left in tmp/ or new/."""
        maildir = maildir.rstrip("/") or "/"
        if self._fsync is os.fsync:
            return self._deliver_c(maildir, parts, size_suffix)
        _check_maildir(maildir)
        for attempt in range(3):
            name, tmp, new = self._names(maildir, parts, size_suffix)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                # Only a clock stepped back (same second, usec, pid and a
                # wrapped counter) or a stale file: take the next name.
                if attempt == 2:
                    raise MaildirError("write", errno.EEXIST, f"{tmp} exists", step="open",
                                       tmp=tmp, new=new) from None
            except OSError as exc:
                raise MaildirError("write", exc.errno, f"open {tmp}: {exc.strerror}", step="open",
                                   tmp=tmp, new=new) from None
        linked = False
        step = "write"
        try:
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                self._fsync(fd)
            finally:
                os.close(fd)
            step = "link"
            os.link(tmp, new)
            linked = True
            os.unlink(tmp)
            step = "sync"
            self.dirsync.sync(os.path.join(maildir, "new"))
        except OSError as exc:
            _unlink_quietly(tmp)
            if linked:
                # Not known to be durable: take it back rather than report a
                # delivery a crash could lose (the retry delivers it again).
                _unlink_quietly(new)
            raise MaildirError("write", exc.errno, f"{exc.strerror}", step=step, tmp=tmp,
                               new=new) from None
        return name

    def _deliver_c(self, maildir: str, parts: list[bytes], size_suffix: bool) -> str:
        """deliver()'s file steps in engine._fileio, the same steps and errors;
        when no other delivery here is linking into this new/, its fsync is
        made in the same call (one GIL hand-over, not two)."""
        data = [p if type(p) is bytes else bytes(p) for p in parts]
        newdir = os.path.join(maildir, "new")
        claim = self.dirsync.claim(newdir)
        step, err = -1, 0
        try:
            syncdir = None if claim is None else os.fsencode(newdir)
            for attempt in range(3):
                name, tmp, new = self._names(maildir, parts, size_suffix)
                step, err = _fileio.write_linked(os.fsencode(tmp), os.fsencode(new), data, syncdir)
                if step != _fileio.OPEN or err != errno.EEXIST:
                    break
                # Only a clock stepped back (same second, usec, pid and a wrapped
                # counter) or a stale file: take the next name.
        finally:
            if claim is not None:
                self.dirsync.done(newdir, claim, step == 0, step in (0, _fileio.SYNCDIR))
        if step == _fileio.OPEN and err in (errno.ENOENT, errno.ENOTDIR):
            # the Maildir itself missing is "chdir"; vdelivermail names the tmp/ file
            _check_maildir(maildir, err, tmp=tmp, new=new)
        if step == _fileio.OPEN:
            why = f"{tmp} exists" if err == errno.EEXIST else f"open {tmp}: {os.strerror(err)}"
            raise MaildirError("write", err, why, step="open", tmp=tmp, new=new)
        if step:
            raise MaildirError("write", err, os.strerror(err), step=_STEPS[step], tmp=tmp, new=new)
        if claim is None:
            try:
                self.dirsync.sync(newdir)
            except OSError as exc:
                # Not known to be durable: take it back (see deliver()).
                _unlink_quietly(new)
                raise MaildirError("write", exc.errno, f"{exc.strerror}", step="sync", tmp=tmp,
                                   new=new) from None
        return name


# engine._fileio's failed step -> MaildirError.step
_STEPS = {_fileio.WRITE: "write", _fileio.FSYNC: "write", _fileio.CLOSE: "write",
          _fileio.LINK: "link", _fileio.UNLINK: "link", _fileio.SYNCDIR: "sync"}


def _check_maildir(maildir: str, open_err: int | None = None, *, tmp: str = "",
                   new: str = "") -> None:
    """MaildirError "chdir" unless `maildir` is a directory (qmail-local's
    chdir, exit 2). After a failed open of `tmp` (errno `open_err`) the error
    is also that "open" step, which is where vdelivermail (no chdir) fails."""
    if not os.path.isdir(maildir):
        try:
            os.stat(maildir)
            err = open_err
        except OSError as exc:
            err = exc.errno
        raise MaildirError("chdir", err, f"{maildir} is not a directory",
                           step="open" if tmp else "", tmp=tmp, new=new)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
