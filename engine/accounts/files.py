"""Reading and replacing account files whole: never half-read, never half-written.

Every file this package writes (users/assign, users/cdb, vpasswd, vpasswd.cdb,
.qmail files, control/rcpthosts, control/virtualdomains) is replaced with
`atomic_write`: a temporary file in the same directory, written, fsync'd,
renamed over the old name, then the directory fsync'd so the rename itself
survives a crash. A reader that opened the old file keeps reading the old inode
to its end, so `read_whole` sees either the old or the new content.

`FileKey` is what a cache compares to notice a replaced file: inode, size and
mtime (any one changing means re-read). Writers here always rename, so the
inode alone would do; size and mtime catch an editor writing in place.

Locking (`admin_lock`) serialises our own read-modify-write cycles and, through
POSIX record locks on the same lock files vpopmail uses (`.vpasswd.lock`,
users/`assign.lock`), cooperates with vpopmail's tools on a shared tree.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple


class FileKey(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int


def file_key(st: os.stat_result) -> FileKey:
    return FileKey(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def stat_key(path: os.PathLike | str) -> FileKey | None:
    """The key of path now, or None when it does not exist."""
    try:
        return file_key(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_whole(path: os.PathLike | str, *,
               follow_links: bool = True) -> tuple[bytes, FileKey] | None:
    """(content, key of the inode read) or None when path does not exist.

    The key comes from fstat on the descriptor that was read, so it describes
    exactly the content returned even if the file is replaced meanwhile.

    Only a regular file is read (else OSError EINVAL): these files sit in
    trees their owners write (a domain's vpasswd, a Maildir's maildirsize),
    and a FIFO put there would block root's `qrelay user show` for ever, a
    link to /dev/zero fill its memory. `follow_links=False`: a link as the
    last component is refused too (OSError ELOOP).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        chunks = []
        while True:
            chunk = os.read(fd, max(st.st_size, 65536))
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks), file_key(st)
    finally:
        os.close(fd)


def fsync_dir(directory: os.PathLike | str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: os.PathLike | str, data: bytes, *, mode: int = 0o644,
                 owner: tuple[int, int] | None = None, sync_dir: bool = True) -> None:
    """Replace path with data: same-directory temp file, fsync, rename, fsync the directory.

    mode is set exactly (not through the umask). owner (uid, gid) is applied
    before the rename when given and we may (root, or already that owner).
    On any error the temp file is removed and the old file is untouched.
    """
    atomic_write_all([(path, data)], mode=mode, owner=owner, sync_dir=sync_dir)


def atomic_write_all(files: list[tuple[os.PathLike | str, bytes]], *, mode: int = 0o644,
                     owner: tuple[int, int] | None = None, sync_dir: bool = True) -> None:
    """atomic_write for files that belong together (vpasswd and vpasswd.cdb):
    every temp file is written and fsync'd before the first rename, so a
    write that fails (a full disk, a quota) leaves every old file as it was,
    not one file new and the other old."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            staged.append((tmp, path))
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fchmod(fd, mode)
                if owner is not None:
                    chown_if_allowed(fd, owner)
                os.fsync(fd)
            except OSError as exc:
                if exc.filename is not None:
                    raise
                # os.write and os.fsync name no file: "No space left on device"
                # alone would not tell the operator which file failed
                raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
            finally:
                os.close(fd)
        while staged:
            tmp, path = staged[0]
            os.replace(tmp, path)
            del staged[0]
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    if sync_dir:
        for directory in dict.fromkeys(Path(path).parent for path, _ in files):
            fsync_dir(directory)


def chown_if_allowed(target: int | os.PathLike | str, owner: tuple[int, int]) -> None:
    """chown to owner when running as root; otherwise leave our own uid (we may not give files away)."""
    if os.geteuid() != 0:
        return
    uid, gid = owner
    if isinstance(target, int):
        os.fchown(target, uid, gid)
    else:
        os.chown(target, uid, gid, follow_symlinks=False)


def make_dir(path: os.PathLike | str, mode: int, owner: tuple[int, int] | None) -> bool:
    """mkdir with an exact mode and owner; False when it already existed. The
    mode and owner are set through the new directory's descriptor, never by a
    name another user could have swapped for a link meanwhile."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            chown_if_allowed(fd, owner)
    finally:
        os.close(fd)
    return True


@contextlib.contextmanager
def file_lock(lock_path: os.PathLike | str, owner: tuple[int, int] | None = None) -> Iterator[None]:
    """Hold an exclusive POSIX record lock (fcntl, as vpopmail's file_lock.c) on lock_path."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None:
            chown_if_allowed(fd, owner)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
