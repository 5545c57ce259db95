/* POP3 login load for bench_pop3.py: the same dialogue as its Python client
 * (greeting; USER, PASS, QUIT in one write; three replies; close), on
 * CONCURRENCY connections at a time in one epoll loop. It shares the CPUs with
 * the receivers it measures, and in C it takes a fraction of what an asyncio
 * client does per login.
 *
 *   pop3_logins PORT PREFIX DOMAIN PASSWORD USERS CONCURRENCY CLIENTS INDEX PER [FROM_MS TO_MS]
 *
 * Worker w (w = INDEX, INDEX + CLIENTS, ... < CONCURRENCY) logs in PER times,
 * as PREFIX(w), PREFIX(w + CONCURRENCY), ... in turn (never two sessions on
 * one mailbox). With FROM_MS and TO_MS it logs in until TO_MS after its start
 * instead, and also counts the logins that ended between FROM_MS and TO_MS:
 * a rate taken between two moments of the steady state, not including the
 * start (every connection at once) nor the ragged end (the last workers
 * alone, some receivers idle).
 * Prints "FAILED LOGINS IN_WINDOW", then the first failure. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct worker {
    int fd, w, done, users_seen, greeted, got;
    char buf[512];
};

static struct sockaddr_in addr;
static const char *prefix, *domain, *password;
static int users, concurrency, per, failures, epfd;
static char first_failure[256];

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void fail(const char *why) {
    if (failures++ == 0)
        snprintf(first_failure, sizeof first_failure, "%s", why);
}

static void start(struct worker *k) {
    k->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (k->fd < 0) { perror("socket"); exit(1); }
    if (connect(k->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        perror("connect"); exit(1);
    }
    k->greeted = k->got = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = k};
    epoll_ctl(epfd, EPOLL_CTL_ADD, k->fd, &ev);
}

static int lines(const char *p, int n) {
    int c = 0;
    for (int i = 0; i + 1 < n; i++)
        if (p[i] == '\r' && p[i + 1] == '\n') c++;
    return c;
}

/* Returns 1 when the session is over (replies read, or failed). */
static int step(struct worker *k) {
    int n = read(k->fd, k->buf + k->got, sizeof k->buf - 1 - k->got);
    if (n < 0 && errno == EAGAIN) return 0;
    if (n <= 0) { fail("closed before the replies"); return 1; }
    k->got += n;
    k->buf[k->got] = 0;
    if (!k->greeted) {
        char *end = strstr(k->buf, "\r\n");
        if (!end) return 0;
        if (strncmp(k->buf, "+OK", 3) != 0) { fail(k->buf); return 1; }
        int u = k->w + (k->users_seen % ((users - k->w + concurrency - 1) / concurrency)) * concurrency;
        char req[512];
        int len = snprintf(req, sizeof req, "USER %s%d@%s\r\nPASS %s\r\nQUIT\r\n", prefix, u, domain, password);
        if (write(k->fd, req, len) != len) { fail("short write"); return 1; }
        k->greeted = 1;
        int rest = k->got - (int)(end + 2 - k->buf);
        memmove(k->buf, end + 2, rest);
        k->got = rest;
        k->buf[k->got] = 0;
    }
    if (lines(k->buf, k->got) < 3) return 0;
    char *second = strstr(k->buf, "\r\n") + 2;          /* PASS's reply */
    if (strncmp(second, "+OK \r\n", 6) != 0) {
        char *end = strstr(second, "\r\n");
        *end = 0;
        fail(second);
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 10 && argc != 12) { fprintf(stderr, "usage: see the source\n"); return 2; }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[1]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    prefix = argv[2]; domain = argv[3]; password = argv[4];
    users = atoi(argv[5]); concurrency = atoi(argv[6]);
    int clients = atoi(argv[7]), index = atoi(argv[8]);
    per = atoi(argv[9]);
    double t0 = now_ms(), from = -1, to = -1;
    if (argc == 12) {
        from = t0 + atof(argv[10]);
        to = t0 + atof(argv[11]);
    }
    long logins = 0, in_window = 0;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    int nworkers = 0;
    struct worker *ws = calloc(concurrency, sizeof *ws);
    for (int w = index; w < concurrency; w += clients) {
        ws[nworkers].w = w;
        start(&ws[nworkers++]);
    }
    int active = nworkers;
    struct epoll_event evs[64];
    while (active > 0) {
        int n = epoll_wait(epfd, evs, 64, -1);
        if (n < 0 && errno == EINTR) continue;
        for (int i = 0; i < n; i++) {
            struct worker *k = evs[i].data.ptr;
            if (!step(k)) continue;
            close(k->fd);           /* closing removes it from the epoll set */
            k->users_seen++;
            logins++;
            double t = to < 0 ? 0 : now_ms();
            if (to >= 0 && t >= from && t < to) in_window++;
            if (to < 0 ? ++k->done < per : t < to) start(k);
            else active--;
        }
    }
    printf("%d %ld %ld\n%s\n", failures, logins, in_window, first_failure);
    return 0;
}
