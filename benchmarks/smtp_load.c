/* A lean closed-loop SMTP AUTH PLAIN load generator (Linux, epoll, one thread).
 *
 * Why: the Python generator (smtp_auth_load.py) costs about as much CPU per session as
 * the server it measures, so on a small machine it, not the server, sets the rate.  This
 * one speaks only what the AUTH PLAIN scenario needs, at a fraction of that cost.
 *
 * C sessions are kept in flight; each is one fresh TCP connection to 127.0.0.1:PORT:
 *   220 greeting, EHLO -> 250 (multi-line), AUTH PLAIN <base64 \0user\0pass> -> 235,
 *   QUIT -> 221, then wait for the server to close first (its TIME_WAIT, not ours).
 * With --mail FILE, each session also sends one message after the 235: MAIL FROM
 * (--sender) -> 250, RCPT TO (--rcpt) -> 250, DATA -> 354, the file's bytes (already
 * dot-stuffed, ending CRLF.CRLF) -> 250, before the QUIT.
 * Any other reply, a close or reset mid-session, or a step over --timeout is an error
 * (the first few are printed on stderr).  Sessions started during the warm-up are not
 * counted; none is started after warm-up + duration; the run ends when the last one does.
 * Prints one JSON object (the keys benchmarks/workers.py reads from smtp_auth_load.py).
 * Exit status: 0 no error, 1 errors, 2 usage.
 *
 *   cc -O2 -o smtp_load smtp_load.c
 *   ./smtp_load --port 2525 -c 64 -d 8 -w 1 --user bench --password benchpass
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum stage { GREETING, EHLO, AUTH, MAIL, RCPT, DATA, BODY, QUIT, CLOSING };
static const char *STAGE[] = {"greeting", "ehlo", "auth", "mail", "rcpt", "data", "data-end",
                              "quit", "eof-wait"};
static const int EXPECT[] = {220, 250, 235, 250, 250, 354, 250, 221};

struct session {
    int fd;
    enum stage stage;
    double started, auth_sent, auth_s, session_s, deadline;
    size_t len;
    char buf[4096];
};

struct samples { double *v; size_t n, cap; };

static struct sockaddr_in target;
static char auth_line[1024], mail_line[600], rcpt_line[600];
static char *message;  /* --mail: the message as sent after the 354; NULL: no mail */
static size_t message_len;
static double timeout_s = 10.0, t_measure;
static long errors, ok, warmup_sessions, started_total, max_errors = 1000;
static struct samples session_ms, auth_ms;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void add(struct samples *s, double x) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 65536;
        if (!(s->v = realloc(s->v, s->cap * sizeof *s->v))) { perror("realloc"); exit(2); }
    }
    s->v[s->n++] = x;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of sorted samples, like smtp_auth_load.py's. */
static double pct(const struct samples *s, double p) {
    size_t rank = (size_t)(p / 100.0 * s->n + 0.999999999);
    return s->n ? s->v[(rank ? rank : 1) - 1] : 0.0;
}

static void summary(const char *name, struct samples *s, const char *tail) {
    double sum = 0;
    qsort(s->v, s->n, sizeof *s->v, cmp);
    for (size_t i = 0; i < s->n; i++) sum += s->v[i];
    printf("\"%s\": {\"n\": %zu, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"max\": %.3f, "
           "\"mean\": %.3f}%s", name, s->n, pct(s, 50), pct(s, 90), pct(s, 99),
           s->n ? s->v[s->n - 1] : 0.0, s->n ? sum / s->n : 0.0, tail);
}

static void base64(const unsigned char *in, size_t n, char *out) {
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        *out++ = A[v >> 18 & 63];
        *out++ = A[v >> 12 & 63];
        *out++ = i + 1 < n ? A[v >> 6 & 63] : '=';
        *out++ = i + 2 < n ? A[v & 63] : '=';
    }
    *out = 0;
}

/* Ends a session; a non-NULL `why` makes it an error (the first 5 are printed). */
static void finish(struct session *s, const char *why, const char *detail) {
    close(s->fd);
    s->fd = -1;
    if (s->started < t_measure) { warmup_sessions++; return; }
    if (why) {
        if (++errors <= 5)
            fprintf(stderr, "smtp_load: error at %s: %s%s%.*s\n", STAGE[s->stage], why,
                    detail ? ": " : "", detail ? (int)strcspn(detail, "\r\n") : 0,
                    detail ? detail : "");
        return;
    }
    ok++;
    add(&session_ms, 1000.0 * s->session_s);
    add(&auth_ms, 1000.0 * s->auth_s);
}

static void start(struct session *s, int ep) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { perror("socket"); exit(2); }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->fd = fd;
    s->stage = GREETING;
    s->len = 0;
    s->started = now();
    s->deadline = s->started + timeout_s;
    started_total++;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) { perror("epoll_ctl"); exit(2); }
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS)
        finish(s, "connect failed", strerror(errno));  /* the slot starts again later */
}

static int send_bytes(struct session *s, const char *data, size_t n) {
    /* A few KB on a fresh loopback socket: the kernel takes it all, or it is an error. */
    return write(s->fd, data, n) == (ssize_t)n ? 0 : -1;
}

static int send_line(struct session *s, const char *line) {
    return send_bytes(s, line, strlen(line));
}

/* Acts on a complete reply's code: sends the next command; returns NULL or an error. */
static const char *reply(struct session *s, int code) {
    if (s->stage == CLOSING) return "data after 221";
    if (code != EXPECT[s->stage]) return "unexpected reply";
    double t = now();
    s->deadline = t + timeout_s;
    switch (s->stage) {
    case GREETING: s->stage = EHLO; return send_line(s, "EHLO loadgen.test\r\n") ? "write" : NULL;
    case EHLO: s->stage = AUTH; s->auth_sent = t; return send_line(s, auth_line) ? "write" : NULL;
    case AUTH: s->auth_s = t - s->auth_sent;
        if (message) { s->stage = MAIL; return send_line(s, mail_line) ? "write" : NULL; }
        s->stage = QUIT; return send_line(s, "QUIT\r\n") ? "write" : NULL;
    case MAIL: s->stage = RCPT; return send_line(s, rcpt_line) ? "write" : NULL;
    case RCPT: s->stage = DATA; return send_line(s, "DATA\r\n") ? "write" : NULL;
    case DATA: s->stage = BODY; return send_bytes(s, message, message_len) ? "write" : NULL;
    case BODY: s->stage = QUIT; return send_line(s, "QUIT\r\n") ? "write" : NULL;
    default: s->stage = CLOSING; s->session_s = t - s->started;  /* QUIT -> 221 */
        s->deadline = t + (timeout_s < 1.0 ? timeout_s : 1.0); return NULL;
    }
}

/* Reads what arrived; returns 1 when the session ended (ok or error). */
static int readable(struct session *s) {
    ssize_t n = read(s->fd, s->buf + s->len, sizeof s->buf - s->len - 1);
    if (n == 0 || (n < 0 && errno != EAGAIN)) {
        if (s->stage == CLOSING && (n == 0 || errno == ECONNRESET)) finish(s, NULL, NULL);
        else finish(s, n == 0 ? "connection closed" : "connection error",
                    n == 0 ? NULL : strerror(errno));
        return 1;
    }
    if (n < 0) return 0;
    s->len += n;
    s->buf[s->len] = 0;
    char *line = s->buf, *eol;
    while ((eol = strstr(line, "\r\n"))) {  /* "250-more" lines, then "250 last" */
        char sep = eol - line > 3 ? line[3] : ' ';
        if (eol - line < 3 || line[0] < '2' || line[0] > '5' || (sep != ' ' && sep != '-')) {
            finish(s, "malformed reply", line);
            return 1;
        }
        if (sep == ' ') {
            const char *why = eol + 2 != s->buf + s->len ? "more than one reply at once"
                                                          : reply(s, atoi(line));
            if (why) { finish(s, why, line); return 1; }
            s->len = 0;
            return 0;
        }
        line = eol + 2;
    }
    if (s->len == sizeof s->buf - 1) { finish(s, "reply too long", NULL); return 1; }
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: smtp_load --port PORT [--host 127.x.y.z] [-c CONCURRENCY] "
            "[-d SECONDS] [-w WARMUP] [--user U] [--password P] [--timeout S] [--max-errors N]\n"
            "       [--mail MESSAGE-FILE [--sender ADDRESS] [--rcpt ADDRESS]]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *user = "bench", *password = "benchpass";
    const char *mail_file = NULL, *sender = "bench-sender@example.com";
    const char *rcpt = "bench-rcpt@example.com";
    int port = 0, concurrency = 16;
    double duration = 5.0, warmup = 1.0;
    static struct option opts[] = {
        {"port", 1, 0, 'p'}, {"host", 1, 0, 'H'}, {"concurrency", 1, 0, 'c'},
        {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'w'}, {"user", 1, 0, 'u'},
        {"password", 1, 0, 'P'}, {"timeout", 1, 0, 't'}, {"max-errors", 1, 0, 'm'},
        {"mail", 1, 0, 'M'}, {"sender", 1, 0, 'S'}, {"rcpt", 1, 0, 'R'}, {0}};
    for (int o; (o = getopt_long(argc, argv, "p:H:c:d:w:u:P:t:m:M:S:R:", opts, NULL)) != -1;) {
        switch (o) {
        case 'p': port = atoi(optarg); break;
        case 'H': host = optarg; break;
        case 'c': concurrency = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'u': user = optarg; break;
        case 'P': password = optarg; break;
        case 't': timeout_s = atof(optarg); break;
        case 'm': max_errors = atol(optarg); break;
        case 'M': mail_file = optarg; break;
        case 'S': sender = optarg; break;
        case 'R': rcpt = optarg; break;
        default: usage();
        }
    }
    target.sin_family = AF_INET;
    target.sin_port = htons(port);
    if (port <= 0 || port > 65535 || concurrency < 1 || duration <= 0 || warmup < 0
        || inet_pton(AF_INET, host, &target.sin_addr) != 1) usage();
    if ((ntohl(target.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "smtp_load: %s is not a loopback address\n", host);
        return 2;
    }
    unsigned char plain[512];
    size_t ul = strlen(user), pl = strlen(password);
    if (ul + pl + 2 > sizeof plain) usage();
    plain[0] = 0;
    memcpy(plain + 1, user, ul);
    plain[1 + ul] = 0;
    memcpy(plain + 2 + ul, password, pl);
    strcpy(auth_line, "AUTH PLAIN ");
    base64(plain, ul + pl + 2, auth_line + strlen(auth_line));
    strcat(auth_line, "\r\n");
    if (strlen(sender) > 500 || strlen(rcpt) > 500) usage();
    snprintf(mail_line, sizeof mail_line, "MAIL FROM:<%s>\r\n", sender);
    snprintf(rcpt_line, sizeof rcpt_line, "RCPT TO:<%s>\r\n", rcpt);
    if (mail_file) {
        FILE *f = fopen(mail_file, "rb");
        if (!f || fseek(f, 0, SEEK_END) || (message_len = ftell(f)) < 5
            || message_len > 65536 || fseek(f, 0, SEEK_SET)
            || !(message = malloc(message_len))
            || fread(message, 1, message_len, f) != message_len
            || memcmp(message + message_len - 5, "\r\n.\r\n", 5)) {
            fprintf(stderr, "smtp_load: %s: not a readable message ending CRLF.CRLF"
                    " (at most 64 KB)\n", mail_file);
            return 2;
        }
        fclose(f);
    }

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct session *all = calloc(concurrency, sizeof *all);
    struct epoll_event events[256];
    double t0 = now();
    t_measure = t0 + warmup;
    double t_stop = t_measure + duration, t_end = t0;
    int live = 0;
    for (int i = 0; i < concurrency; i++, live++) start(&all[i], ep);
    while (live) {
        int n = epoll_wait(ep, events, 256, 100);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 2; }
        double t = now();
        for (int i = 0; i < n; i++) {
            struct session *s = events[i].data.ptr;
            if (s->fd >= 0 && readable(s)) t_end = now();
        }
        for (int i = 0; i < concurrency; i++) {
            struct session *s = &all[i];
            if (s->fd >= 0 && t > s->deadline) {
                if (s->stage == CLOSING) finish(s, NULL, NULL);  /* 221 came: ok */
                else finish(s, "timeout", NULL);
                t_end = t;
            }
            if (s->fd == -1) {  /* ended: start the next one, or retire the slot (-2) */
                if (t < t_stop && errors < max_errors) start(s, ep);
                else { s->fd = -2; live--; }
            }
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec
                 + ru.ru_stime.tv_usec / 1e6;
    double elapsed = t_end > t_measure ? t_end - t_measure : 1e-9;
    long measured = ok + errors;
    printf("{\"tool\": \"smtp_load.c\", \"config\": {\"host\": \"%s\", \"port\": %d, "
           "\"mech\": \"PLAIN\", \"mode\": \"%s\", \"message_bytes\": %zu, "
           "\"concurrency\": %d, \"duration_s\": %g, \"warmup_s\": %g, \"timeout_s\": %g}, ",
           host, port, message ? "mail" : "auth", message_len, concurrency, duration, warmup,
           timeout_s);
    printf("\"elapsed_s\": %.3f, \"sessions_measured\": %ld, \"sessions_warmup\": %ld, "
           "\"ok\": %ld, \"errors\": %ld, \"aborted\": %s, \"handshakes_per_s\": %.2f, "
           "\"latency_ms\": {", elapsed, measured, warmup_sessions, ok, errors,
           errors >= max_errors ? "true" : "false", ok / elapsed);
    summary("session", &session_ms, ", ");
    summary("auth", &auth_ms, "}, ");
    printf("\"client_cpu_s\": %.3f, \"client_cpu_pct_of_one_core\": %.1f, "
           "\"client_cpu_ms_per_session\": %.4f, \"exit_status\": %d}\n", cpu,
           100.0 * cpu / (t_end - t0 > 0 ? t_end - t0 : 1e-9),
           started_total ? 1000.0 * cpu / started_total : 0.0, errors ? 1 : 0);
    return errors ? 1 : 0;
}
