# cython: language_level=3
"""A local delivery's file work in C: the durable steps of a Maildir
delivery with the GIL released once, and the small reads before them with
the GIL kept while the kernel answers from its caches.

A Maildir delivery is about ten system calls (open, write, fsync, close,
link, unlink; open, fsync, close of new/). Made one by one from Python, each
releases and takes back the GIL; with a delivery worker's threads all doing
that, a hand-over often wakes or puts to sleep another thread (a futex call
and a context switch: a third of a busy worker's CPU went to those). Here
the steps of one delivery run back to back without the GIL, and the new/
fsync with them when no other delivery is linking into that new/.

``write_linked(tmp, new, parts, syncdir=None)``
    Create ``tmp`` (O_EXCL, mode 0600), write the concatenation of ``parts``
    (a list of bytes), fsync, close, and move it to ``new`` without ever
    replacing a file there: renameat2(RENAME_NOREPLACE), one call where
    Maildir's link + unlink are two, or those two where the filesystem
    cannot (EINVAL; ENOSYS on an old kernel); then, given ``syncdir`` (new's
    directory), fsync that as ``fsync_dir`` does.
    Returns ``(0, 0)`` on success, else ``(step, errno)`` with ``step`` one of
    ``OPEN``, ``WRITE``, ``FSYNC``, ``CLOSE``, ``LINK``, ``UNLINK``,
    ``SYNCDIR``; on any failure neither ``tmp`` nor ``new`` is left behind (a
    failed ``OPEN`` touched nothing, so a ``tmp`` that existed before stays).

``fsync_dir(path)``
    open(O_RDONLY|O_DIRECTORY), fsync, close: 0, or the errno of the first
    step that failed.

``mode_uid(path)``
    os.stat's ``(st_mode, st_uid)``, or the OSError os.stat raises.

``stat_keys(paths)``
    For each path of a tuple, os.stat's ``st_dev, st_ino, st_mode, st_uid,
    st_size, st_mtime_ns, st_ctime_ns`` as seven native int64s (struct
    ``7q``; all zero if the stat fails, whatever the reason), in one bytes
    object: what a delivery plan keeps, and compares, to know that files
    and directories have not changed (compact, and one comparison).

``read_file(path, flags=0)``
    open(O_RDONLY | flags), fstat and, for a regular file, the whole content:
    ``(0, 0, st_mode, data or None)``, else ``(OPEN | READ, errno, st_mode, None)``.

Paths are bytes (os.fsencode); one with a NUL byte is a ValueError, as in
the os module (C would cut the path there). Nothing here decides what a
failure means: engine.delivery.local does.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno, EINTR, EAGAIN, ENOENT, ENOTDIR, EACCES
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memset
from posix.stat cimport struct_stat, fstat as c_fstat, stat as c_stat, S_ISREG
from posix.types cimport off_t


cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *path, int flags, ...)
    int O_WRONLY, O_CREAT, O_EXCL, O_CLOEXEC, O_RDONLY, O_DIRECTORY

cdef extern from "<stdio.h>" nogil:
    # glibc >= 2.28 (Python.h defines _GNU_SOURCE)
    int c_renameat2 "renameat2"(int olddirfd, const char *old, int newdirfd, const char *new,
                                unsigned int flags)
    unsigned int RENAME_NOREPLACE

cdef extern from "<fcntl.h>" nogil:
    int AT_FDCWD

cdef extern from "<errno.h>" nogil:
    int EINVAL, ENOSYS, EOPNOTSUPP

cdef extern from "<fcntl.h>" nogil:
    int O_PATH

cdef extern from "<linux/openat2.h>" nogil:
    struct open_how:
        unsigned long long flags
        unsigned long long mode
        unsigned long long resolve
    unsigned long long RESOLVE_CACHED

cdef extern from "<sys/syscall.h>" nogil:
    long SYS_openat2

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t c_preadv2 "preadv2"(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    int RWF_NOWAIT

cdef extern from "<unistd.h>" nogil:
    ssize_t c_write "write"(int fd, const void *buf, size_t n)
    int c_fsync "fsync"(int fd)
    int c_close "close"(int fd)
    int c_link "link"(const char *old, const char *new)
    int c_unlink "unlink"(const char *path)
    long c_syscall "syscall"(long number, ...)
    ssize_t c_pread "pread"(int fd, void *buf, size_t n, off_t offset)


cdef enum:
    S_OPEN = 1
    S_WRITE, S_FSYNC, S_CLOSE, S_LINK, S_UNLINK, S_SYNCDIR, S_READ

OPEN, WRITE, FSYNC, CLOSE, LINK, UNLINK, SYNCDIR, READ = (
    S_OPEN, S_WRITE, S_FSYNC, S_CLOSE, S_LINK, S_UNLINK, S_SYNCDIR, S_READ)


cdef int _write_all(int fd, const char *buf, Py_ssize_t n) noexcept nogil:
    cdef ssize_t got
    while n > 0:
        got = c_write(fd, buf, <size_t>n)
        if got < 0:
            if errno == EINTR:
                continue
            return errno
        buf += got
        n -= got
    return 0


cdef int _fsync_dir(const char *path) noexcept nogil:
    """0, or the errno of the first of open, fsync, close that failed."""
    cdef int fd, err = 0
    fd = c_open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if fd < 0:
        return errno
    if c_fsync(fd) != 0:
        err = errno
    if c_close(fd) != 0 and not err:
        err = errno
    return err


cdef int _write_linked(const char *tmp, const char *new, const char **bufs,
                       Py_ssize_t *lens, Py_ssize_t count, const char *syncdir,
                       int *err) noexcept nogil:
    """The failed step (0: none), its errno in *err."""
    cdef int fd, step = 0
    cdef Py_ssize_t i
    fd = c_open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    if fd < 0:
        err[0] = errno
        return S_OPEN
    for i in range(count):
        err[0] = _write_all(fd, bufs[i], lens[i])
        if err[0]:
            step = S_WRITE
            break
    if not step and c_fsync(fd) != 0:
        err[0], step = errno, S_FSYNC
    if c_close(fd) != 0 and not step:
        err[0], step = errno, S_CLOSE
    if step:
        c_unlink(tmp)
        return step
    if c_renameat2(AT_FDCWD, tmp, AT_FDCWD, new, RENAME_NOREPLACE) != 0:
        if errno != EINVAL and errno != ENOSYS:
            err[0] = errno
            c_unlink(tmp)
            return S_LINK
        if c_link(tmp, new) != 0:
            err[0] = errno
            c_unlink(tmp)
            return S_LINK
        if c_unlink(tmp) != 0:
            err[0] = errno
            c_unlink(new)
            c_unlink(tmp)
            return S_UNLINK
    if syncdir != NULL:
        err[0] = _fsync_dir(syncdir)
        if err[0]:
            # Not known to be durable: taken back (a retry delivers it again).
            c_unlink(new)
            return S_SYNCDIR
    return 0


cdef _check_path(bytes path):
    if b"\0" in path:
        raise ValueError("embedded null byte")


def write_linked(bytes tmp, bytes new, list parts, bytes syncdir=None):
    _check_path(tmp)
    _check_path(new)
    if syncdir is not None:
        _check_path(syncdir)
    cdef Py_ssize_t count = len(parts), i
    cdef const char **bufs = <const char **>malloc(count * sizeof(char *) + 1)
    cdef Py_ssize_t *lens = <Py_ssize_t *>malloc(count * sizeof(Py_ssize_t) + 1)
    cdef const char *ctmp = tmp
    cdef const char *cnew = new
    cdef const char *cdir = NULL if syncdir is None else <const char *>syncdir
    cdef int err = 0, step = 0
    cdef bytes part
    if bufs == NULL or lens == NULL:
        free(bufs)
        free(lens)
        raise MemoryError()
    try:
        # `parts` (a list the caller keeps) holds every bytes object alive;
        # bytes never move or change, so their buffers are safe without the GIL.
        for i in range(count):
            part = parts[i]
            bufs[i] = part
            lens[i] = len(part)
        with nogil:
            step = _write_linked(ctmp, cnew, bufs, lens, count, cdir, &err)
        return (step, err)
    finally:
        free(bufs)
        free(lens)


def fsync_dir(bytes path):
    _check_path(path)
    cdef const char *cpath = path
    cdef int err
    with nogil:
        err = _fsync_dir(cpath)
    return err


# --- small reads on a delivery's path, the GIL kept while nothing blocks ------------
#
# Before a delivery writes anything it stats its home and reads its .qmail
# files: ten quick calls, each a GIL hand-over from Python's os module. Here
# they run with the GIL held when the kernel can answer from its caches
# (openat2's RESOLVE_CACHED: the whole path in the dentry cache, or EAGAIN;
# preadv2's RWF_NOWAIT: the data in the page cache, or EAGAIN), and release
# it only for a call that may wait for the disk. A kernel without these
# (before 5.12; EINVAL or ENOSYS) always takes the second way.

cdef bint _cached_ok = True


def use_cached(bint on):
    """Whether to try the caches first (the default; False always releases
    the GIL, as on an old kernel): the previous setting. For tests."""
    global _cached_ok
    was = _cached_ok
    _cached_ok = on
    return was


cdef int _open_cached(const char *path, int flags) noexcept:
    """An fd opened from the caches with the GIL held; -1 with errno set for a
    definite failure; -2 when the answer needs I/O (or a kernel that cannot
    say): open again without the GIL."""
    global _cached_ok
    cdef open_how how
    cdef long fd
    if not _cached_ok:
        return -2
    memset(&how, 0, sizeof(how))
    how.flags = <unsigned long long>(flags | O_CLOEXEC)
    how.resolve = RESOLVE_CACHED
    fd = c_syscall(SYS_openat2, <long>AT_FDCWD, path, &how, <size_t>sizeof(how))
    if fd >= 0:
        return <int>fd
    if errno == ENOENT or errno == ENOTDIR or errno == EACCES:
        return -1
    if errno == ENOSYS or errno == EINVAL:
        _cached_ok = False
    return -2


cdef ssize_t _pread_cached(int fd, char *buf, size_t n, off_t offset) noexcept:
    cdef iovec iov
    cdef ssize_t got
    iov.iov_base = buf
    iov.iov_len = n
    got = c_preadv2(fd, &iov, 1, offset, RWF_NOWAIT)
    if got >= 0 or (errno != EAGAIN and errno != EOPNOTSUPP and errno != EINVAL):
        return got
    with nogil:
        while True:
            got = c_pread(fd, buf, n, offset)
            if got >= 0 or errno != EINTR:
                break
    return got


cdef int _stat(const char *cpath, struct_stat *st) noexcept:
    """stat(2) from the caches with the GIL held, else with it released: 0,
    or -1 with errno set."""
    cdef int fd = _open_cached(cpath, O_PATH), rc
    if fd >= 0:
        rc = c_fstat(fd, st)
        c_close(fd)
        return rc
    if fd == -1:
        return -1
    with nogil:
        rc = c_stat(cpath, st)
    return rc


def mode_uid(bytes path):
    """os.stat(path)'s (st_mode, st_uid); OSError as os.stat raises it."""
    _check_path(path)
    cdef struct_stat st
    if _stat(path, &st) != 0:
        raise _os_error(errno, path)
    return (st.st_mode, st.st_uid)


cdef void _stat_key(bytes path, long long *key):
    """key[0:7] = path's dev, ino, mode, uid, size, mtime_ns, ctime_ns (zeros
    if the stat fails)."""
    cdef struct_stat st
    if _stat(path, &st) != 0:
        memset(key, 0, 7 * sizeof(long long))
        return
    key[0] = <long long>st.st_dev
    key[1] = <long long>st.st_ino
    key[2] = <long long>st.st_mode
    key[3] = <long long>st.st_uid
    key[4] = <long long>st.st_size
    key[5] = <long long>st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec
    key[6] = <long long>st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec


def stat_keys(tuple paths not None):
    """For each path, os.stat's dev, ino, mode, uid, size, mtime_ns and
    ctime_ns as struct `7q` (zeros if the stat fails), all in one bytes."""
    cdef Py_ssize_t n = len(paths), i
    for p in paths:
        if not isinstance(p, bytes):
            raise TypeError("stat_keys: paths must be bytes")
        _check_path(p)
    out = PyBytes_FromStringAndSize(NULL, n * 7 * sizeof(long long))
    cdef long long *keys = <long long *><char *>out
    for i in range(n):
        _stat_key(<bytes>paths[i], keys + 7 * i)
    return out


def read_file(bytes path, int flags=0):
    """open(path, O_RDONLY | flags), fstat, and the whole content if it is a
    regular file: ``(0, 0, st_mode, data)``; ``(0, 0, st_mode, None)`` for
    anything else; ``(OPEN, errno, 0, None)`` if the open failed;
    ``(READ, errno, st_mode, None)`` if the fstat or a read did (the open
    worked: the file is there but unreadable)."""
    _check_path(path)
    cdef const char *cpath = path
    cdef struct_stat st
    cdef int fd = _open_cached(cpath, O_RDONLY | flags)
    cdef size_t cap, size = 0
    cdef ssize_t got
    cdef char *buf = NULL
    cdef char *grown
    if fd == -2:
        with nogil:
            while True:
                fd = c_open(cpath, O_RDONLY | O_CLOEXEC | flags)
                if fd >= 0 or errno != EINTR:
                    break
    if fd < 0:
        return (S_OPEN, errno, 0, None)
    try:
        if c_fstat(fd, &st) != 0:
            return (S_READ, errno, 0, None)
        if not S_ISREG(st.st_mode):
            return (0, 0, st.st_mode, None)
        cap = <size_t>st.st_size + 1 if st.st_size < (1 << 20) else (1 << 20)
        buf = <char *>malloc(cap)
        if buf == NULL:
            raise MemoryError()
        while True:
            got = _pread_cached(fd, buf + size, cap - size, <off_t>size)
            if got < 0:
                if errno == EINTR:
                    continue
                return (S_READ, errno, st.st_mode, None)
            if got == 0:
                break
            size += <size_t>got
            if size == cap:
                grown = <char *>realloc(buf, cap * 2)
                if grown == NULL:
                    raise MemoryError()
                buf, cap = grown, cap * 2
        return (0, 0, st.st_mode, PyBytes_FromStringAndSize(buf, <Py_ssize_t>size))
    finally:
        free(buf)
        c_close(fd)


cdef _os_error(int err, bytes path):
    import os
    return OSError(err, os.strerror(err), os.fsdecode(path))
