/* LD_PRELOAD shim for bench_mx.py --no-worker-sync: an experiment, NOT durable.
 *
 * In the delivery worker (process name "qrelay: deliver...", as setproctitle
 * sets it) fsync and fdatasync return at once without syncing; every other
 * process syncs as usual. With it, bench_mx shows what the two syncs of each
 * Maildir delivery cost on the machine it runs on, against the same code.
 * Build: cc -shared -fPIC -O2 -o worker_nosync.so worker_nosync.c
 */
#define _GNU_SOURCE
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int in_worker(void) {
    char name[17] = {0};
    prctl(PR_GET_NAME, name);
    return strncmp(name, "qrelay: deliver", 15) == 0;
}

int fsync(int fd) { return in_worker() ? 0 : (int)syscall(SYS_fsync, fd); }
int fdatasync(int fd) { return in_worker() ? 0 : (int)syscall(SYS_fdatasync, fd); }
