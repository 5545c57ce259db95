# cython: language_level=3
"""Durable file steps for Maildir delivery, each run in C with the GIL
released once.

A Maildir delivery is about ten system calls (open, write, fsync, close,
link, unlink; open, fsync, close of new/). Made one by one from Python, each
releases and takes back the GIL; with a delivery worker's threads all doing
that, a hand-over often wakes or puts to sleep another thread (a futex call
and a context switch: a third of a busy worker's CPU went to those). Here
the steps of one delivery run back to back without the GIL; fewer threads
at once (engine.delivery.spawner's `active`) does the rest.

``write_linked(tmp, new, parts)``
    Create ``tmp`` (O_EXCL, mode 0600), write the concatenation of ``parts``
    (a list of bytes), fsync, close, and move it to ``new`` without ever
    replacing a file there: renameat2(RENAME_NOREPLACE), one call where
    Maildir's link + unlink are two, or those two where the filesystem
    cannot (EINVAL; ENOSYS on an old kernel).
    Returns ``(0, 0)`` on success, else ``(step, errno)`` with ``step`` one of
    ``OPEN``, ``WRITE``, ``FSYNC``, ``CLOSE``, ``LINK``, ``UNLINK``; on any
    failure neither ``tmp`` nor ``new`` is left behind (a failed ``OPEN``
    touched nothing, so a ``tmp`` that existed before stays).

``fsync_dir(path)``
    open(O_RDONLY|O_DIRECTORY), fsync, close: 0, or the errno of the first
    step that failed.

Paths are bytes (os.fsencode); one with a NUL byte is a ValueError, as in
the os module (C would cut the path there). Nothing here decides what a
failure means: engine.delivery.local.maildir does.
"""
from libc.errno cimport errno, EINTR
from libc.stdlib cimport malloc, free


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
    int EINVAL, ENOSYS

cdef extern from "<unistd.h>" nogil:
    ssize_t c_write "write"(int fd, const void *buf, size_t n)
    int c_fsync "fsync"(int fd)
    int c_close "close"(int fd)
    int c_link "link"(const char *old, const char *new)
    int c_unlink "unlink"(const char *path)


cdef enum:
    S_OPEN = 1
    S_WRITE, S_FSYNC, S_CLOSE, S_LINK, S_UNLINK

OPEN, WRITE, FSYNC, CLOSE, LINK, UNLINK = S_OPEN, S_WRITE, S_FSYNC, S_CLOSE, S_LINK, S_UNLINK


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


cdef int _write_linked(const char *tmp, const char *new, const char **bufs,
                       Py_ssize_t *lens, Py_ssize_t count, int *err) noexcept nogil:
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
    if not step and c_renameat2(AT_FDCWD, tmp, AT_FDCWD, new, RENAME_NOREPLACE) == 0:
        return 0
    if not step and errno != EINVAL and errno != ENOSYS:
        err[0], step = errno, S_LINK
    elif not step and c_link(tmp, new) != 0:
        err[0], step = errno, S_LINK
    elif not step and c_unlink(tmp) != 0:
        err[0], step = errno, S_UNLINK
        c_unlink(new)
    if step:
        c_unlink(tmp)
    return step


cdef _check_path(bytes path):
    if b"\0" in path:
        raise ValueError("embedded null byte")


def write_linked(bytes tmp, bytes new, list parts):
    _check_path(tmp)
    _check_path(new)
    cdef Py_ssize_t count = len(parts), i
    cdef const char **bufs = <const char **>malloc(count * sizeof(char *) + 1)
    cdef Py_ssize_t *lens = <Py_ssize_t *>malloc(count * sizeof(Py_ssize_t) + 1)
    cdef const char *ctmp = tmp
    cdef const char *cnew = new
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
            step = _write_linked(ctmp, cnew, bufs, lens, count, &err)
        return (step, err)
    finally:
        free(bufs)
        free(lens)


def fsync_dir(bytes path):
    _check_path(path)
    cdef const char *cpath = path
    cdef int fd, err = 0
    with nogil:
        fd = c_open(cpath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0:
            err = errno
        else:
            if c_fsync(fd) != 0:
                err = errno
            if c_close(fd) != 0 and not err:
                err = errno
    return err
