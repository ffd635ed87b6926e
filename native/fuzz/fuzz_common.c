/* See fuzz_common.h. Everything here runs on the fuzzer's thread; the engine runs on its
 * own, driven only through the public interface (tandem.h), as Python drives it. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fuzz_common.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u
#define NBLOCKS (FZ_STORE_SIZE / BLOCK)
#define REGION (1u << 20) /* replica/intent.py region_size(FZ_STORE_SIZE) */
#define NREGIONS ((FZ_STORE_SIZE + REGION - 1) / REGION)
#define NLAYERS 3

void fz_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("tandem fuzz harness: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

uint64_t fz_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void fz_put_le32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
void fz_put_le64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

void fz_put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

void fz_put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint64_t hang_ns(void)
{
    static uint64_t ns;
    if (!ns) {
        const char *s = getenv("FUZZ_HANG_SECONDS");
        double sec = s && *s ? atof(s) : 10.0;
        ns = (uint64_t)((sec > 0 ? sec : 10.0) * 1e9);
    }
    return ns;
}

/* --- the engine and the store ------------------------------------------------------------ */

static tandem_engine *engine;

tandem_engine *fz_engine(void)
{
    if (engine)
        return engine;
    int rc = tandem_uring_probe();
    if (rc)
        fz_die("io_uring is not usable here: %s", strerror(-rc));
    int err = 0;
    engine = tandem_engine_new(&err);
    if (!engine)
        fz_die("tandem_engine_new: %s", strerror(-err));
    return engine;
}

/* The store (replica/store.py and intent.py as NativeReplicaServer hands them over); the
 * engine keeps pointers to the maps and bitmaps, so they live as long as the process. */
static int layer_fd[NLAYERS];
static int intent_fd = -1;
static uint8_t head_map[NBLOCKS], base_map[NBLOCKS];
static uint8_t marked[NREGIONS];
static uint32_t touch_clock[NREGIONS];
static double clock0;

static int open_tmp(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        fz_die("create %s: %s", path, strerror(errno));
    if (unlink(path))
        fz_die("unlink %s: %s", path, strerror(errno));
    return fd;
}

static void fill(int fd, uint32_t b0, uint32_t b1, uint8_t byte)
{
    static uint8_t blk[BLOCK];
    for (uint32_t b = b0; b < b1; b++) {
        memset(blk, byte, sizeof(blk));
        memcpy(blk, &b, sizeof(b)); /* every block distinct */
        if (pwrite(fd, blk, BLOCK, (off_t)b * BLOCK) != (ssize_t)BLOCK)
            fz_die("fill layer: %s", strerror(errno));
    }
}

static const char *tmp_base(void)
{
    const char *d = getenv("FUZZ_STORE_DIR");
    if (d && *d)
        return d;
    if (access("/dev/shm", W_OK) == 0)
        return "/dev/shm"; /* tmpfs: no disk I/O per input */
    d = getenv("TMPDIR");
    return d && *d ? d : "/tmp";
}

void fz_store_setup(tandem_engine *e)
{
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s/tandem-fuzz-XXXXXX", tmp_base());
    if (!mkdtemp(dir))
        fz_die("mkdtemp %s: %s", dir, strerror(errno));
    /* The files are unlinked at once: nothing to clean up however the process ends. */
    static const char *const names[NLAYERS] = {"snap-0.img", "snap-1.img", "head.img"};
    for (int i = 0; i < NLAYERS; i++) {
        layer_fd[i] = open_tmp(dir, names[i]);
        if (ftruncate(layer_fd[i], FZ_STORE_SIZE))
            fz_die("ftruncate: %s", strerror(errno));
    }
    intent_fd = open_tmp(dir, "intent.bin");
    rmdir(dir);
    /* Layer 0 holds blocks [0, 128), layer 1 [64, 256) (so base says 2 there), the head
     * [200, 300): reads go through every layer and holes. */
    fill(layer_fd[0], 0, 128, 'A');
    fill(layer_fd[1], 64, 256, 'B');
    fill(layer_fd[2], 200, 300, 'H');
    for (uint32_t b = 0; b < NBLOCKS; b++) {
        base_map[b] = b >= 64 && b < 256 ? 2 : b < 64 ? 1 : 0;
        head_map[b] = b >= 200 && b < 300;
    }
    /* Snapshot layers are read-only in the store: reopen them so (as there) a write that
     * strays to one fails instead of corrupting it. */
    for (int i = 0; i < NLAYERS - 1; i++) {
        char p[64];
        snprintf(p, sizeof(p), "/proc/self/fd/%d", layer_fd[i]);
        int ro = open(p, O_RDONLY | O_CLOEXEC);
        if (ro < 0)
            fz_die("reopen %s read-only: %s", p, strerror(errno));
        close(layer_fd[i]);
        layer_fd[i] = ro;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    clock0 = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    fz_store_push(e);
}

void fz_store_push(tandem_engine *e)
{
    if (tandem_replica_setup(e, FZ_STORE_SIZE, FZ_EPOCH, intent_fd, marked, touch_clock,
                             NREGIONS, REGION, clock0) ||
        tandem_replica_set_layers(e, layer_fd, NLAYERS, head_map, base_map) ||
        tandem_replica_set_epoch(e, FZ_EPOCH))
        fz_die("handing the store to the engine failed");
}

/* --- events -------------------------------------------------------------------------------- */

#define MAX_CLOSED 64
static uint64_t closed_ids[MAX_CLOSED];
static int nclosed;

int fz_closed(uint64_t conn)
{
    for (int i = 0; i < nclosed; i++) {
        if (closed_ids[i] == conn) {
            closed_ids[i] = closed_ids[--nclosed];
            return 1;
        }
    }
    return 0;
}

int fz_drain(tandem_engine *e, const struct fz_handler *h)
{
    uint64_t v;
    ssize_t n = read(tandem_engine_event_fd(e), &v, sizeof(v)); /* non-blocking eventfd */
    (void)n;
    struct tandem_event evs[64];
    int total = 0, got;
    while ((got = tandem_engine_events(e, evs, 64)) > 0) {
        for (int i = 0; i < got; i++) {
            struct tandem_event *ev = &evs[i];
            switch (ev->type) {
            case TANDEM_EV_UPCALL:
                if (!h || !h->upcall)
                    fz_die("unexpected up-call (op %u) on connection %llu", ev->op,
                           (unsigned long long)ev->conn);
                h->upcall(e, ev);
                break;
            case TANDEM_EV_PAUSED:
                if (!h || !h->paused)
                    fz_die("unexpected PAUSED event");
                h->paused(e, ev->id);
                break;
            case TANDEM_EV_CONN_CLOSED:
                if (nclosed == MAX_CLOSED)
                    fz_die("too many connections closed and not waited for");
                closed_ids[nclosed++] = ev->conn;
                break;
            case TANDEM_EV_MEMBER_DOWN:
                fz_die("member %llu dropped: %.*s", (unsigned long long)ev->id,
                       (int)ev->data_len, ev->data ? (const char *)ev->data : "");
            case TANDEM_EV_DONE:
                if (ev->status)
                    fz_die("command %llu failed: %s", (unsigned long long)ev->id,
                           strerror(ev->status));
                break;
            default: /* LOG, PROTO_ERROR, FAULT_*: what Python logs */
                break;
            }
            tandem_free(ev->data);
        }
        total += got;
    }
    return total;
}

void fz_wait(tandem_engine *e, const struct fz_handler *h, int (*cond)(void *), void *arg,
             const char *what)
{
    uint64_t deadline = fz_now_ns() + hang_ns();
    struct pollfd p = {.fd = tandem_engine_event_fd(e), .events = POLLIN};
    for (;;) {
        fz_drain(e, h);
        if (cond(arg))
            return;
        if (fz_now_ns() > deadline)
            fz_die("hang: no %s within %.1f s", what, (double)hang_ns() / 1e9);
        poll(&p, 1, 50);
    }
}

#define REQ_MAGIC 0x51444E54u /* the replica protocol's */
#define RESP_SIZE 24
#define OP_OPEN 8

/* --- the volume and its member (fz_volume_setup) ------------------------------------------ */

static void member_upcall(tandem_engine *e, const struct tandem_event *ev)
{
    if (ev->conn != FZ_MEMBER_CONN || ev->op != OP_OPEN)
        fz_die("unexpected up-call op %u on connection %llu while setting up", ev->op,
               (unsigned long long)ev->conn);
    static const char js[] = "{\"epoch\": 1}";
    uint8_t buf[RESP_SIZE + sizeof(js) - 1];
    fz_put_le32(buf, 0x52444E54u);
    fz_put_le32(buf + 4, 0);
    fz_put_le64(buf + 8, ev->tag);
    fz_put_le32(buf + 16, sizeof(js) - 1);
    fz_put_le32(buf + 20, 0);
    memcpy(buf + RESP_SIZE, js, sizeof(js) - 1);
    if (tandem_conn_reply(e, ev->conn, buf, sizeof(buf), TANDEM_EPOCH_SET, FZ_EPOCH, 1))
        fz_die("tandem_conn_reply failed");
}

static const struct fz_handler setup_handler = {.upcall = member_upcall};

struct recv_state {
    int fd;
    uint8_t buf[256];
    size_t have, want;
};

static int got_response(void *arg)
{
    struct recv_state *r = arg;
    while (r->have < r->want) {
        ssize_t n = recv(r->fd, r->buf + r->have, r->want - r->have, MSG_DONTWAIT);
        if (n <= 0)
            return 0;
        r->have += (size_t)n;
        if (r->have >= RESP_SIZE && r->want == RESP_SIZE) {
            uint32_t plen;
            memcpy(&plen, r->buf + 16, 4);
            if (plen > sizeof(r->buf) - RESP_SIZE)
                fz_die("OPEN answer too long");
            r->want = RESP_SIZE + plen;
        }
    }
    return 1;
}


static void setup_member(tandem_engine *e)
{
    if (tandem_vol_setup(e, FZ_STORE_SIZE, 1, 1, 30.0, 30.0, "fuzz", -1, 0))
        fz_die("tandem_vol_setup failed");
    int sv[2];
    fz_socketpair(sv); /* sv[0]: the volume's end, sv[1]: the replica server's */
    if (tandem_conn_add(e, FZ_MEMBER_CONN, sv[1], TANDEM_CONN_REPLICA_SERVER))
        fz_die("tandem_conn_add failed");
    static const char js[] = "{\"epoch\": 1}";
    uint8_t req[32 + sizeof(js) - 1];
    fz_put_le32(req, REQ_MAGIC);
    req[4] = OP_OPEN;
    req[5] = 0;
    req[6] = req[7] = 0;
    fz_put_le64(req + 8, 1);
    fz_put_le64(req + 16, 0);
    fz_put_le32(req + 24, 0);
    fz_put_le32(req + 28, sizeof(js) - 1);
    memcpy(req + 32, js, sizeof(js) - 1);
    if (send(sv[0], req, sizeof(req), MSG_NOSIGNAL) != (ssize_t)sizeof(req))
        fz_die("send OPEN: %s", strerror(errno));
    struct recv_state r = {.fd = sv[0], .want = RESP_SIZE};
    fz_wait(e, &setup_handler, got_response, &r, "answer to OPEN");
    uint32_t status;
    memcpy(&status, r.buf + 4, 4);
    if (status)
        fz_die("OPEN failed: %u", status);
    /* The member's socket goes to the engine in blocking mode. */
    int fl = fcntl(sv[0], F_GETFL);
    if (fl < 0 || fcntl(sv[0], F_SETFL, fl & ~O_NONBLOCK))
        fz_die("blocking mode: %s", strerror(errno));
    if (tandem_member_attach(e, 0, sv[0], TANDEM_MODE_RW, 1, 0, NULL, "in-process-replica", 1))
        fz_die("tandem_member_attach failed");
}

void fz_volume_setup(tandem_engine *e)
{
    fz_store_setup(e);
    setup_member(e);
    /* Commands run in order: a flush through the volume (Python's own I/O, frontend 2)
     * completes once the member is attached, and proves the whole path works. */
    uint64_t id = 77;
    if (tandem_vol_submit(e, id, 2, TANDEM_VIO_FLUSH, 0, 0, 0, NULL))
        fz_die("tandem_vol_submit failed");
    int done_seen = 0;
    for (uint64_t deadline = fz_now_ns() + 10000000000ull; !done_seen;) {
        struct tandem_event evs[16];
        int n = tandem_engine_events(e, evs, 16);
        for (int i = 0; i < n; i++) {
            if (evs[i].type == TANDEM_EV_IO_DONE && evs[i].id == id) {
                if (evs[i].status)
                    fz_die("the first flush through the volume failed: %.*s",
                           (int)evs[i].data_len, evs[i].data ? (char *)evs[i].data : "");
                done_seen = 1;
            } else if (evs[i].type == TANDEM_EV_DONE && evs[i].status) {
                fz_die("attaching the member failed: %s", strerror(evs[i].status));
            } else if (evs[i].type == TANDEM_EV_MEMBER_DOWN) {
                fz_die("the member dropped while setting up");
            }
            tandem_free(evs[i].data);
        }
        if (!n) {
            if (fz_now_ns() > deadline)
                fz_die("hang: setting up the volume");
            struct pollfd p = {.fd = tandem_engine_event_fd(e), .events = POLLIN};
            poll(&p, 1, 50);
        }
    }
}

/* --- one input over a socketpair ------------------------------------------------------------ */

void fz_socketpair(int sv[2])
{
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
        fz_die("socketpair: %s", strerror(errno));
    int fl = fcntl(sv[0], F_GETFL);
    if (fl < 0 || fcntl(sv[0], F_SETFL, fl | O_NONBLOCK)) /* ours only: a separate file */
        fz_die("O_NONBLOCK: %s", strerror(errno));
}

/* Chunk sizes from the input itself (deterministic), so the engine sees requests split at
 * odd places at least some of the time: header and payload boundaries in the receive
 * buffer, partial headers at its end. */
static size_t chunk_len(const uint8_t *data, size_t len, size_t off, unsigned *state)
{
    *state = *state * 1103515245u + 12345u + (off < len ? data[off] : 0);
    unsigned r = (*state >> 16) & 7;
    size_t want = r == 0 ? 1 : r == 1 ? 7 : r == 2 ? 29 : r < 5 ? 512 : 65536;
    return want < len - off ? want : len - off;
}

void fz_exchange(tandem_engine *e, const struct fz_handler *h, uint64_t conn, int ours,
                 const uint8_t *data, size_t len)
{
    uint64_t deadline = fz_now_ns() + hang_ns();
    size_t off = 0;
    int wr_done = 0, rd_eof = 0, closed = 0;
    unsigned st = (unsigned)len;
    static uint8_t rbuf[1 << 16];
    size_t received = 0;
    while (!rd_eof || !closed) {
        if (!wr_done && off == len) {
            shutdown(ours, SHUT_WR);
            wr_done = 1;
        }
        struct pollfd p[2] = {
            {.fd = tandem_engine_event_fd(e), .events = POLLIN},
            {.fd = rd_eof && wr_done ? -1 : ours,
             .events = (short)((rd_eof ? 0 : POLLIN) | (wr_done ? 0 : POLLOUT))},
        };
        poll(p, 2, 50);
        fz_drain(e, h);
        if (h && h->tick)
            h->tick(e, wr_done);
        if (!closed && fz_closed(conn))
            closed = 1;
        if (!wr_done && (p[1].revents & (POLLOUT | POLLERR | POLLHUP))) {
            for (int k = 0; k < 64 && off < len; k++) {
                size_t n = chunk_len(data, len, off, &st);
                ssize_t w = send(ours, data + off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (w > 0) {
                    off += (size_t)w;
                    if (n < 64)
                        break; /* a small piece: give the engine a chance to see it alone */
                    continue;
                }
                if (w < 0 && (errno == EAGAIN || errno == EINTR))
                    break;
                /* the engine closed its end (protocol error): the rest is not read */
                off = len;
                break;
            }
        }
        if (!rd_eof) {
            for (;;) {
                ssize_t r = recv(ours, rbuf, sizeof(rbuf), MSG_DONTWAIT);
                if (r > 0) {
                    received += (size_t)r;
                    if (h && h->received)
                        h->received(rbuf, (size_t)r);
                    continue;
                }
                if (r == 0 || (errno != EAGAIN && errno != EINTR))
                    rd_eof = 1; /* EOF, or ECONNRESET: it closed with our bytes unread */
                break;
            }
        }
        if (fz_now_ns() > deadline)
            fz_die("hang: connection %llu after %.1f s: %zu of %zu input bytes written%s, "
                   "%zu bytes received, %s, %s",
                   (unsigned long long)conn, (double)hang_ns() / 1e9, off, len,
                   wr_done ? " (write side shut down)" : "", received,
                   rd_eof ? "EOF read" : "no EOF from the engine",
                   closed ? "connection closed" : "engine still holds the connection");
    }
    close(ours);
}
