/* LD_PRELOAD shim for bench_spool.py: every sync made SLOWSYNC_MS slower.
 *
 * Emulates a slow disk for the whole process, including LMDB's own syncs:
 * fsync, fdatasync, msync, sync_file_range, and writes to descriptors opened
 * with O_SYNC/O_DSYNC (LMDB writes its meta page through such a descriptor).
 * Build: cc -shared -fPIC -O2 -o spool_slowsync.so spool_slowsync.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void slow(void) {
    static long ms = -1;
    if (ms < 0) {
        const char *s = getenv("SLOWSYNC_MS");
        ms = s ? atol(s) : 5;
    }
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

static int is_sync_fd(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return fl >= 0 && (fl & (O_SYNC | O_DSYNC));
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    slow();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    slow();
    return real(fd);
}

int msync(void *addr, size_t len, int flags) {
    static int (*real)(void *, size_t, int);
    if (!real) real = dlsym(RTLD_NEXT, "msync");
    if (flags & MS_SYNC) slow();
    return real(addr, len, flags);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite");
    if (is_sync_fd(fd)) slow();
    return real(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
    if (is_sync_fd(fd)) slow();
    return real(fd, buf, n, off);
}

ssize_t write(int fd, const void *buf, size_t n) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "write");
    if (is_sync_fd(fd)) slow();
    return real(fd, buf, n);
}
