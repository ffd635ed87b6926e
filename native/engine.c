/* The engine core: one thread running one io_uring loop; connections with receive buffers
 * and send queues (sendmsg over iovecs, partial sends resumed); timers; a command queue in
 * (Python -> engine, woken through an eventfd the loop reads) and an event queue out
 * (engine -> Python, an eventfd Python's asyncio loop watches). See native/ENGINE.md. */
#include "engine.h"
#include "target.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SQ_ENTRIES 1024
#define CQ_ENTRIES 8192
#define LINGER_NS (2ull * 1000000000ull)
#define MAX_LAYERS 255

enum {
    CMD_STOP = 1,
    CMD_PAUSE,
    CMD_RESUME,
    CMD_CONN_ADD,
    CMD_CONN_CLOSE,
    CMD_CONN_REPLY,
    CMD_R_SETUP,
    CMD_R_LAYERS,
    CMD_R_EPOCH,
    CMD_R_FAULT,
    CMD_R_IO,
    CMD_T_SETUP,
    CMD_T_ATTACH,
    CMD_T_MODE,
    CMD_T_MAP,
    CMD_T_STABLE,
    CMD_T_LOCK,
    CMD_T_UNLOCK,
    CMD_T_QOS,
    CMD_T_SUBMIT,
    CMD_NBD_STOP,
    CMD_ISCSI_RESULT,
    CMD_ISCSI_PDUS,
    CMD_ISCSI_SLOW,
    CMD_ISCSI_ABORT,
    CMD_ISCSI_STOP,
};

struct cmd {
    struct cmd *next;
    int type;
    uint64_t id;
    int fd, kind;
    void *data;
    size_t len;
    int epoch_action;
    uint64_t epoch;
    /* replica setup */
    uint64_t size, region;
    int intent_fd;
    uint8_t *marked;
    uint32_t *touch;
    uint32_t count;
    double clock0;
    /* layers */
    int n;
    int fds[MAX_LAYERS];
    uint8_t *head, *base;
    /* faults */
    int slot, action;
    double arg;
    int64_t remaining;
    /* a request (target submit, NBD/iSCSI parameters) */
    int op, flags;
    uint64_t offset;
    uint32_t length;
    /* store I/O on Python's behalf: n of them */
    struct sync_io *sync;
    struct tandem_io *ios;
    /* the target side */
    int mode, current, track, frontend, quorum;
    int shared;        /* attach: the replica SHAREd the volume's memory */
    uint32_t local[4]; /* attach: SHARE's offer of local reads (local[0] = pid, 0: none) */
    uint64_t shm_size; /* setup: bytes of the memfd in fd */
    double t1, t2, limits[6];
    uint64_t mcount;
    uint8_t *map;
    const void *ptr;
    /* iSCSI */
    struct tandem_iscsi_params ip;
    void *data2;
    size_t len2;
    int64_t wanted;
    int status, slow;
    uint64_t req; /* ISCSI_ABORT: the id its TANDEM_EV_DONE answers */
    int64_t lun;  /* ISCSI_ABORT: -1 for every LUN */
};

/* --- clocks and timers --------------------------------------------------------------------- */

uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void timer_arm(struct engine *e, struct timer *t, uint64_t delay_ns)
{
    timer_cancel(t);
    t->when = mono_ns() + delay_ns;
    struct list *pos = e->timers.next;
    while (pos != &e->timers && container_of(pos, struct timer, link)->when <= t->when)
        pos = pos->next;
    list_add_tail(pos, &t->link); /* before pos: keeps the list sorted */
    t->armed = 1;
}

void timer_cancel(struct timer *t)
{
    if (t->armed) {
        list_del(&t->link);
        t->armed = 0;
    }
}

static void run_timers(struct engine *e)
{
    uint64_t now = mono_ns();
    while (!list_empty(&e->timers)) {
        struct timer *t = container_of(e->timers.next, struct timer, link);
        if (t->when > now)
            break;
        timer_cancel(t);
        t->fn(e, t);
    }
}

/* --- SQEs ---------------------------------------------------------------------------------- */

struct io_uring_sqe *eng_sqe(struct engine *e, struct io *io, unsigned need)
{
    if (io_uring_sq_space_left(&e->ring) < need)
        io_uring_submit(&e->ring);
    struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);
    while (!sqe) {
        io_uring_submit(&e->ring);
        sqe = io_uring_get_sqe(&e->ring);
    }
    io_uring_sqe_set_data(sqe, io);
    e->nios++;
    return sqe;
}

void eng_defer(struct engine *e, struct io *io, int res)
{
    if (e->ndefer == e->capdefer) {
        size_t cap = e->capdefer ? e->capdefer * 2 : 64;
        void *q = realloc(e->defer, cap * sizeof(*e->defer));
        if (!q)
            abort(); /* a completion cannot be dropped */
        e->defer = q;
        e->capdefer = cap;
    }
    e->defer[e->ndefer].io = io;
    e->defer[e->ndefer].res = res;
    e->ndefer++;
}

static void run_deferred(struct engine *e)
{
    /* Completions may defer more: take them in order, one at a time. */
    for (size_t i = 0; i < e->ndefer; i++) {
        struct io *io = e->defer[i].io;
        int res = e->defer[i].res;
        io->done(e, io, res);
    }
    e->ndefer = 0;
}

/* --- events -------------------------------------------------------------------------------- */

void eng_event(struct engine *e, const struct tandem_event *ev)
{
    pthread_mutex_lock(&e->lock);
    if (e->evn == e->evcap) {
        size_t cap = e->evcap ? e->evcap * 2 : 256;
        struct tandem_event *q = realloc(e->evq, cap * sizeof(*q));
        if (!q) { /* out of memory: drop the event rather than the engine */
            pthread_mutex_unlock(&e->lock);
            free(ev->data);
            return;
        }
        e->evq = q;
        e->evcap = cap;
    }
    int was_empty = e->evn == 0;
    e->evq[e->evn++] = *ev;
    pthread_mutex_unlock(&e->lock);
    if (was_empty) {
        uint64_t one = 1;
        ssize_t n = write(e->evt_efd, &one, sizeof(one));
        (void)n;
    }
}

/* An event carrying a formatted message (at most 511 bytes). */
static void text_event(struct engine *e, struct tandem_event *ev, const char *fmt, va_list ap)
{
    char buf[512];
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof(buf))
        n = sizeof(buf) - 1;
    ev->data = malloc((size_t)n + 1);
    if (ev->data) {
        memcpy(ev->data, buf, (size_t)n);
        ev->data_len = (uint32_t)n;
    }
    eng_event(e, ev);
}

void eng_log(struct engine *e, int level, const char *fmt, ...)
{
    struct tandem_event ev = {.type = TANDEM_EV_LOG, .status = level};
    va_list ap;
    va_start(ap, fmt);
    text_event(e, &ev, fmt, ap);
    va_end(ap);
}

void conn_proto_vevent(struct conn *c, const char *fmt, va_list ap)
{
    struct tandem_event ev = {.type = TANDEM_EV_PROTO_ERROR, .conn = c->id};
    text_event(c->e, &ev, fmt, ap);
}

void conn_proto_event(struct conn *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    conn_proto_vevent(c, fmt, ap);
    va_end(ap);
}

/* --- connections --------------------------------------------------------------------------- */

static void recv_done(struct engine *e, struct io *io, int res);
static void send_done(struct engine *e, struct io *io, int res);
static void linger_expired(struct engine *e, struct timer *t);
static void conn_try_close(struct conn *c);
static void cancel_done(struct engine *e, struct io *io, int res);

struct conn *conn_new(struct engine *e, uint64_t id, int fd, const struct conn_ops *ops,
                      void *proto, size_t rcap)
{
    struct conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->rbuf = malloc(rcap);
    if (!c->rbuf) {
        free(c);
        return NULL;
    }
    c->e = e;
    c->id = id;
    c->fd = fd;
    c->ops = ops;
    c->proto = proto;
    c->rcap = rcap;
    c->rio.done = recv_done;
    c->sio.done = send_done;
    c->cancel_io.done = cancel_done;
    c->sqtail = &c->sq;
    c->linger.fn = linger_expired;
    list_init(&c->linger.link);
    list_init(&c->flink);
    list_add_tail(&e->conns, &c->link);
    return c;
}

struct conn *conn_find_any(struct engine *e, uint64_t id)
{
    for (struct list *p = e->conns.next; p != &e->conns; p = p->next) {
        struct conn *c = container_of(p, struct conn, link);
        if (c->id == id)
            return c;
    }
    return NULL;
}

struct conn *conn_find(struct engine *e, uint64_t id)
{
    for (struct list *p = e->conns.next; p != &e->conns; p = p->next) {
        struct conn *c = container_of(p, struct conn, link);
        if (c->id == id && c->state != CONN_DEAD)
            return c;
    }
    return NULL;
}

void conn_get(struct conn *c) { c->refs++; }

static void conn_destroy(struct conn *c)
{
    timer_cancel(&c->linger);
    if (c->in_flushq)
        list_del(&c->flink);
    list_del(&c->link);
    c->ops->on_destroy(c);
    free(c->rbuf);
    free(c);
}

void conn_put(struct conn *c)
{
    if (--c->refs == 0 && c->state == CONN_DEAD && c->fd < 0 && !c->recv_armed &&
        !c->send_armed && !c->cancel_armed)
        conn_destroy(c);
}

void conn_arm_recv(struct conn *c)
{
    if (c->recv_armed || c->eof || c->state == CONN_DEAD)
        return;
    void *p;
    size_t n;
    c->recv_direct = c->dbuf != NULL;
    if (c->dbuf) {
        p = c->dbuf + c->dhave;
        n = c->dwant - c->dhave;
    } else {
        if (c->state == CONN_LINGER || c->rpos == c->rend)
            c->rpos = c->rend = 0;
        if (c->rpos && c->rcap - c->rend < c->rcap / 4) {
            memmove(c->rbuf, c->rbuf + c->rpos, c->rend - c->rpos);
            c->rend -= c->rpos;
            c->rpos = 0;
        }
        p = c->rbuf + c->rend;
        n = c->rcap - c->rend;
        if (!n)
            return; /* full: the handler holds its bytes (a barrier); it re-arms later */
    }
    struct io_uring_sqe *sqe = eng_sqe(c->e, &c->rio, 1);
    /* A large payload lands whole in its own buffer: one completion, not one per segment. */
    io_uring_prep_recv(sqe, c->fd, p, n, c->recv_direct ? MSG_WAITALL : 0);
    c->recv_armed = 1;
}

int conn_recv_direct(struct conn *c, uint8_t *buf, size_t want)
{
    size_t have = c->rend - c->rpos;
    if (have > want)
        have = want;
    memcpy(buf, c->rbuf + c->rpos, have);
    c->rpos += have;
    if (have == want)
        return 1;
    c->dbuf = buf;
    c->dwant = want;
    c->dhave = have;
    return 0;
}

static void drop_sq(struct conn *c)
{
    struct sendbuf *b = c->sq;
    c->sq = NULL;
    c->sqtail = &c->sq;
    c->sqbytes = c->sqoff = 0;
    while (b) {
        struct sendbuf *next = b->next;
        b->release(b);
        b = next;
    }
}

static void go_dead(struct conn *c)
{
    if (c->state == CONN_DEAD)
        return;
    c->state = CONN_DEAD;
    timer_cancel(&c->linger);
    if (c->in_flushq) {
        list_del(&c->flink);
        c->in_flushq = 0;
    }
    /* The kernel may still read queued buffers while a send is in flight: release them
     * only once it completed (send_done), or now if none is. */
    if (!c->send_armed)
        drop_sq(c);
    conn_try_close(c);
}

static void cancel_done(struct engine *e, struct io *io, int res)
{
    (void)e;
    (void)res;
    struct conn *c = container_of(io, struct conn, cancel_io);
    c->cancel_armed = 0;
    c->refs++;
    conn_try_close(c);
    conn_put(c);
}

/* Close the fd once no SQE refers to it (cancelling those that do). */
static void conn_try_close(struct conn *c)
{
    if (c->fd < 0)
        return;
    if (c->recv_armed || c->send_armed) {
        if (!c->cancel_armed) {
            struct io_uring_sqe *sqe = eng_sqe(c->e, &c->cancel_io, 1);
            io_uring_prep_cancel_fd(sqe, c->fd, IORING_ASYNC_CANCEL_ALL);
            c->cancel_armed = 1;
        }
        return; /* their completions call back here */
    }
    close(c->fd);
    c->fd = -1;
}

void conn_abort(struct conn *c)
{
    go_dead(c);
}

static void start_linger(struct conn *c)
{
    if (c->eof) {
        go_dead(c);
        return;
    }
    shutdown(c->fd, SHUT_WR);
    c->state = CONN_LINGER;
    timer_arm(c->e, &c->linger, LINGER_NS);
    conn_arm_recv(c);
}

void conn_finish(struct conn *c)
{
    if (c->state != CONN_OPEN)
        return;
    c->state = CONN_FINISHING;
    if (!c->sq && !c->send_armed)
        start_linger(c);
}

static void linger_expired(struct engine *e, struct timer *t)
{
    (void)e;
    struct conn *c = container_of(t, struct conn, linger);
    c->refs++;
    go_dead(c);
    conn_put(c);
}

void conn_send(struct conn *c, struct sendbuf *b)
{
    if (c->state == CONN_DEAD || c->state == CONN_LINGER) {
        b->release(b);
        return;
    }
    b->next = NULL;
    *c->sqtail = b;
    c->sqtail = &b->next;
    for (int i = 0; i < b->niov; i++)
        c->sqbytes += b->iov[i].iov_len;
    if (!c->send_armed && !c->in_flushq) {
        list_add_tail(&c->e->flushq, &c->flink);
        c->in_flushq = 1;
    }
}

/* A sendmsg takes no more buffers once it has this many bytes: small replies still go many
 * to a call, a large one goes alone. Measured (A/B, 1 MiB NBD reads at qd8): 12-15% faster
 * than sending all queued replies (up to 64 iovecs, several MiB) in one call, which holds
 * the socket so long that the peer's ACKs pile up in its backlog for this thread to process;
 * cutting large payloads into 256 KiB pieces as well was slower again. */
#define SEND_BATCH (256u << 10)

static void conn_submit_send(struct conn *c)
{
    int n = 0;
    size_t skip = c->sqoff, bytes = 0;
    for (struct sendbuf *b = c->sq; b && n < 64 && bytes < SEND_BATCH; b = b->next) {
        for (int i = 0; i < b->niov && n < 64 && bytes < SEND_BATCH; i++) {
            size_t l = b->iov[i].iov_len;
            if (skip >= l) {
                skip -= l;
                continue;
            }
            c->siov[n].iov_base = (char *)b->iov[i].iov_base + skip;
            c->siov[n].iov_len = l - skip;
            bytes += l - skip;
            skip = 0;
            n++;
        }
    }
    if (!n) { /* only empty buffers queued */
        drop_sq(c);
        return;
    }
    memset(&c->msg, 0, sizeof(c->msg));
    c->msg.msg_iov = c->siov;
    c->msg.msg_iovlen = (size_t)n;
    struct io_uring_sqe *sqe = eng_sqe(c->e, &c->sio, 1);
    io_uring_prep_sendmsg(sqe, c->fd, &c->msg, MSG_NOSIGNAL);
    c->send_armed = 1;
}

static void flush_sends(struct engine *e)
{
    while (!list_empty(&e->flushq)) {
        struct conn *c = container_of(e->flushq.next, struct conn, flink);
        list_del(&c->flink);
        c->in_flushq = 0;
        if (c->state != CONN_DEAD && c->sq && !c->send_armed)
            conn_submit_send(c);
    }
}

static void recv_done(struct engine *e, struct io *io, int res)
{
    (void)e;
    struct conn *c = container_of(io, struct conn, rio);
    c->recv_armed = 0;
    c->refs++;
    if (c->state == CONN_DEAD) {
        conn_try_close(c);
    } else if (res > 0) {
        if (c->state == CONN_LINGER) {
            c->rpos = c->rend = 0; /* discard */
        } else if (c->recv_direct) {
            c->dhave += (size_t)res;
            if (c->dhave == c->dwant) {
                c->dbuf = NULL;
                c->ops->on_direct(c);
            }
        } else {
            c->rend += (size_t)res;
            if (c->dbuf) {
                /* A direct receive began while this one was armed on rbuf: its bytes
                 * (the start of them) are here. */
                size_t n = c->rend - c->rpos;
                if (n > c->dwant - c->dhave)
                    n = c->dwant - c->dhave;
                memcpy(c->dbuf + c->dhave, c->rbuf + c->rpos, n);
                c->rpos += n;
                c->dhave += n;
                if (c->dhave == c->dwant) {
                    c->dbuf = NULL;
                    c->ops->on_direct(c);
                }
            } else {
                c->ops->on_data(c);
            }
        }
    } else if (res == -EINTR || res == -EAGAIN || res == -ENOBUFS) {
        /* retry below */
    } else {
        c->eof = 1;
        if (c->state == CONN_LINGER)
            go_dead(c);
        else
            c->ops->on_eof(c, res < 0 ? -res : 0);
    }
    if (c->state == CONN_DEAD)
        conn_try_close(c);
    else
        conn_arm_recv(c);
    conn_put(c);
}

static void send_done(struct engine *e, struct io *io, int res)
{
    (void)e;
    struct conn *c = container_of(io, struct conn, sio);
    c->send_armed = 0;
    c->refs++;
    if (c->state != CONN_DEAD && res < 0 && res != -EAGAIN && res != -EINTR) {
        if (!c->eof) {
            c->eof = 1;
            c->ops->on_eof(c, -res);
        }
        go_dead(c);
    }
    if (c->state == CONN_DEAD) {
        drop_sq(c);
        conn_try_close(c);
        conn_put(c);
        return;
    }
    if (res > 0) {
        size_t left = (size_t)res + c->sqoff;
        while (c->sq) {
            struct sendbuf *b = c->sq;
            size_t tot = 0;
            for (int i = 0; i < b->niov; i++)
                tot += b->iov[i].iov_len;
            if (left < tot)
                break;
            left -= tot;
            c->sqbytes -= tot;
            c->sq = b->next;
            if (!c->sq)
                c->sqtail = &c->sq;
            b->release(b);
        }
        c->sqoff = left;
    }
    if (c->sq) {
        conn_submit_send(c);
    } else {
        c->ops->on_sent(c);
        if (c->state == CONN_FINISHING && !c->sq && !c->send_armed)
            start_linger(c);
    }
    conn_put(c);
}

/* --- commands ------------------------------------------------------------------------------ */

static int push_cmd(struct engine *e, struct cmd *cmd)
{
    cmd->next = NULL;
    pthread_mutex_lock(&e->lock);
    int was_empty = e->cmd_head == NULL;
    *e->cmd_tail = cmd;
    e->cmd_tail = &cmd->next;
    pthread_mutex_unlock(&e->lock);
    if (was_empty) {
        uint64_t one = 1;
        if (write(e->cmd_efd, &one, sizeof(one)) < 0)
            return -errno;
    }
    return 0;
}

static struct cmd *new_cmd(int type)
{
    struct cmd *c = calloc(1, sizeof(*c));
    if (c)
        c->type = type;
    return c;
}

static void run_cmd(struct engine *e, struct cmd *cmd)
{
    switch (cmd->type) {
    case CMD_STOP:
        e->stopping = 1;
        replica_stop(e);
        target_stop(e);
        for (struct list *p = e->conns.next; p != &e->conns;) {
            struct conn *c = container_of(p, struct conn, link);
            c->refs++;
            if (c->kind == TANDEM_CONN_NBD && c->state != CONN_DEAD)
                nbd_stop(e, c);
            if (c->kind == TANDEM_CONN_ISCSI)
                iscsi_stop(e, c);
            conn_abort(c);
            p = p->next;
            conn_put(c);
        }
        break;
    case CMD_PAUSE:
        replica_pause(e, cmd->id);
        break;
    case CMD_RESUME:
        replica_resume(e);
        break;
    case CMD_CONN_ADD: {
        struct conn *c = NULL;
        if (!e->stopping && cmd->kind == TANDEM_CONN_REPLICA_SERVER && e->rs) {
            c = replica_conn_new(e, cmd->id, cmd->fd);
            if (c)
                c->kind = TANDEM_CONN_REPLICA_SERVER;
        } else if (!e->stopping && cmd->kind == TANDEM_CONN_NBD && e->vol) {
            c = nbd_conn_new(e, cmd->id, cmd->fd, cmd->flags, cmd->size, cmd->frontend,
                             cmd->data, cmd->len);
        } else if (!e->stopping && cmd->kind == TANDEM_CONN_ISCSI && e->vol) {
            c = iscsi_conn_new(e, cmd->id, cmd->fd, &cmd->ip, cmd->data, cmd->len);
        }
        if (!c) {
            close(cmd->fd);
            struct tandem_event ev = {.type = TANDEM_EV_CONN_CLOSED, .conn = cmd->id};
            eng_event(e, &ev);
        }
        break;
    }
    case CMD_CONN_CLOSE: {
        struct conn *c = conn_find(e, cmd->id);
        if (c) {
            c->refs++;
            conn_abort(c);
            conn_put(c);
        }
        break;
    }
    case CMD_CONN_REPLY: {
        struct conn *c = conn_find_any(e, cmd->id);
        if (c && c->kind == TANDEM_CONN_NBD) {
            /* even to a dead connection: the up-call holds it until answered */
            c->refs++;
            nbd_reply(e, c, cmd->data, cmd->len, cmd->kind);
            cmd->data = NULL;
            conn_put(c);
        } else if (c && c->state != CONN_DEAD && c->kind == TANDEM_CONN_REPLICA_SERVER) {
            c->refs++;
            replica_reply(e, c, cmd->data, cmd->len, cmd->epoch_action, cmd->epoch, cmd->kind);
            cmd->data = NULL; /* the handler owns it now */
            conn_put(c);
        }
        break;
    }
    case CMD_NBD_STOP: {
        struct conn *c = conn_find(e, cmd->id);
        if (c && c->kind == TANDEM_CONN_NBD)
            nbd_stop(e, c);
        break;
    }
    case CMD_ISCSI_RESULT:
    case CMD_ISCSI_PDUS: {
        /* even to a dead connection: the up-call holds it until answered */
        struct conn *c = conn_find_any(e, cmd->id);
        if (c && c->kind == TANDEM_CONN_ISCSI) {
            c->refs++;
            if (cmd->type == CMD_ISCSI_RESULT) {
                iscsi_result(e, c, cmd->epoch, cmd->status, cmd->data, cmd->len, cmd->data2,
                             cmd->len2, cmd->wanted, cmd->slow);
                cmd->data = NULL; /* the handler's now */
            } else {
                iscsi_pdus(e, c, cmd->epoch, cmd->data, cmd->len, cmd->flags, cmd->length,
                           cmd->slow);
            }
            conn_put(c);
        }
        break;
    }
    case CMD_ISCSI_SLOW:
    case CMD_ISCSI_ABORT:
    case CMD_ISCSI_STOP: {
        struct conn *c = conn_find(e, cmd->id);
        if (!c || c->kind != TANDEM_CONN_ISCSI) {
            if (cmd->type == CMD_ISCSI_ABORT)
                eng_done(e, cmd->req, 0); /* gone: nothing left to abort */
            break;
        }
        c->refs++;
        if (cmd->type == CMD_ISCSI_SLOW)
            iscsi_set_slow(e, c, cmd->slow);
        else if (cmd->type == CMD_ISCSI_ABORT)
            iscsi_abort(e, c, cmd->req, cmd->lun, cmd->status);
        else
            iscsi_stop(e, c);
        conn_put(c);
        break;
    }
    case CMD_T_SETUP:
        target_setup(e, cmd->size, cmd->n, cmd->quorum, cmd->t1, cmd->t2, cmd->data, cmd->fd,
                     cmd->shm_size);
        break;
    case CMD_T_ATTACH:
        target_attach(e, cmd->slot, cmd->fd, cmd->mode, cmd->current, cmd->shared, cmd->local,
                      cmd->data,
                      cmd->id);
        break;
    case CMD_T_MODE:
        target_mode(e, cmd->slot, cmd->mode, cmd->current, cmd->data, cmd->id);
        break;
    case CMD_T_MAP:
        target_map(e, cmd->slot, cmd->map, cmd->mcount, cmd->region, cmd->track, cmd->id);
        break;
    case CMD_T_STABLE:
        target_stable(e, cmd->epoch);
        break;
    case CMD_T_LOCK:
        target_lock(e, cmd->id, cmd->data, cmd->n);
        break;
    case CMD_T_UNLOCK:
        target_unlock(e, cmd->id);
        break;
    case CMD_T_QOS:
        target_qos(e, cmd->limits, cmd->t1);
        break;
    case CMD_T_SUBMIT:
        target_submit(e, cmd->id, cmd->frontend, cmd->op, cmd->flags, cmd->offset, cmd->length,
                      cmd->ptr);
        break;
    case CMD_R_SETUP:
        replica_setup(e, cmd->size, cmd->epoch, cmd->intent_fd, cmd->marked, cmd->touch,
                      cmd->count, cmd->region, cmd->clock0);
        break;
    case CMD_R_LAYERS:
        replica_set_layers(e, cmd->fds, cmd->n, cmd->head, cmd->base);
        break;
    case CMD_R_EPOCH:
        replica_set_epoch(e, cmd->epoch);
        break;
    case CMD_R_FAULT:
        replica_set_fault(e, cmd->slot, cmd->action, cmd->arg, cmd->remaining);
        break;
    case CMD_R_IO:
        for (int i = 0; i < cmd->n; i++)
            replica_io(e, &cmd->ios[i], cmd->sync);
        break;
    }
    free(cmd->data);
    free(cmd->data2);
    free(cmd);
}

static void run_cmds(struct engine *e)
{
    pthread_mutex_lock(&e->lock);
    struct cmd *list = e->cmd_head;
    e->cmd_head = NULL;
    e->cmd_tail = &e->cmd_head;
    pthread_mutex_unlock(&e->lock);
    while (list) {
        struct cmd *next = list->next;
        run_cmd(e, list);
        list = next;
    }
}

static void arm_cmd_read(struct engine *e)
{
    struct io_uring_sqe *sqe = eng_sqe(e, &e->cmd_io, 1);
    e->nios--; /* not counted (the completion loop knows): it stays armed for good */
    io_uring_prep_read(sqe, e->cmd_efd, &e->cmd_efd_val, sizeof(e->cmd_efd_val), 0);
    e->cmd_armed = 1;
}

static void cmd_read_done(struct engine *e, struct io *io, int res)
{
    (void)io;
    (void)res;
    e->cmd_armed = 0;
    run_cmds(e);
    arm_cmd_read(e);
}

/* --- the loop ------------------------------------------------------------------------------ */

static int ring_init(struct engine *e)
{
    unsigned flag_sets[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int rc = -EINVAL;
    for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        p.flags = flag_sets[i] | IORING_SETUP_CQSIZE;
        p.cq_entries = CQ_ENTRIES;
        rc = io_uring_queue_init_params(SQ_ENTRIES, &e->ring, &p);
        if (rc == 0) {
            e->ring_features = p.features;
            return 0;
        }
        if (rc != -EINVAL)
            break;
    }
    return rc;
}

void engine_note_depth(struct engine *e, int n)
{
    e->depth16 += (n * 16 - e->depth16) / 8;
}

/* Poll the ring a while after the last completion instead of sleeping, while requests come
 * about one at a time: the next (a local replica's answer, the initiator's next request)
 * usually comes within tens of microseconds, and waking a sleeping thread costs about as
 * much on a VM. Each turn yields the CPU: with a pause instead, the pollers took the CPU
 * from the initiator and the replica they wait for (NBD qd1 on 2 cores: 20-32k IOPS with
 * a pause, 38-42k yielding). Not under load: there the loop finds work without sleeping
 * anyway (and polling cost qd32 reads 10%). Never past the next timer (due). Returns 1
 * when there is work. */
static int poll_ring(struct engine *e, uint64_t due)
{
    uint64_t budget = __atomic_load_n(&e->poll_ns, __ATOMIC_RELAXED);
    if (!budget || e->depth16 > 24)
        return 0;
    uint64_t start = mono_ns(), now = start;
    uint64_t until = e->last_busy + budget < due ? e->last_busy + budget : due; /* a timer */
    if (now >= until)
        return 0; /* no completion lately (woken by a timer, or polling just turned on) */
    int found = 0;
    while (now < until) {
        io_uring_submit_and_get_events(&e->ring);
        if (io_uring_cq_ready(&e->ring) || __atomic_load_n(&e->cmd_head, __ATOMIC_RELAXED)) {
            found = 1;
            break;
        }
        /* not a pause: a thread on this CPU that has work (the initiator, the replica)
         * runs now instead of waiting for this poll to end */
        sched_yield();
        now = mono_ns();
    }
    now = mono_ns();
    e->poll.ns += now - start;
    if (found)
        e->poll.hits++;
    else
        e->poll.misses++;
    return found;
}

#ifndef IORING_ENTER_NO_IOWAIT /* Linux 6.15; liburing before 2.10 lacks the names */
#define IORING_ENTER_NO_IOWAIT (1U << 7)
#endif
#ifndef IORING_FEAT_NO_IOWAIT
#define IORING_FEAT_NO_IOWAIT (1U << 17)
#endif

/* Submit what is queued and sleep until a completion or the timeout (ts, or none): what
 * io_uring_submit_and_wait_timeout does, but not counted as iowait where the kernel lets us
 * say so (IORING_ENTER_NO_IOWAIT). The kernel counts a thread sleeping on its ring with a
 * request pending as waiting for IO, and this loop always has one (a receive, the command
 * eventfd): an idle volume kept the machine's IO pressure (PSI) near 100% and a CPU in
 * iowait, which monitoring reads as a stalled disk. Its sleeps wait for sockets far more
 * than for disks. (The flag also ends the cpufreq boost iowait gives; the loop polls at
 * queue depth 1 instead, see poll_ring.) The submission is liburing's own: publish the
 * tail, then enter. */
static void ring_wait(struct engine *e, struct __kernel_timespec *ts)
{
    unsigned need = IORING_FEAT_NO_IOWAIT | IORING_FEAT_EXT_ARG;
    if ((e->ring_features & need) != need) {
        struct io_uring_cqe *cqe;
        io_uring_submit_and_wait_timeout(&e->ring, &cqe, 1, ts, NULL);
        return;
    }
    struct io_uring_sq *sq = &e->ring.sq;
    if (sq->sqe_head != sq->sqe_tail) {
        sq->sqe_head = sq->sqe_tail;
        io_uring_smp_store_release(sq->ktail, sq->sqe_tail);
    }
    unsigned submit = sq->sqe_tail - IO_URING_READ_ONCE(*sq->khead);
    struct io_uring_getevents_arg arg = {.ts = (uint64_t)(uintptr_t)ts};
    unsigned flags = IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG | IORING_ENTER_NO_IOWAIT;
    /* errors (ETIME, EINTR, EBUSY, EAGAIN) are dropped, as the loop did liburing's: it
     * reaps what is there and comes back */
    syscall(__NR_io_uring_enter, e->ring.ring_fd, submit, 1, flags, &arg, sizeof(arg));
}

static void *engine_main(void *arg)
{
    struct engine *e = arg;
    int rc = ring_init(e);
    pthread_mutex_lock(&e->lock);
    e->init_done = 1;
    e->init_err = rc;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
    if (rc)
        return NULL;
    e->cmd_io.done = cmd_read_done;
    arm_cmd_read(e);

    struct io_uring_cqe *cqes[256];
    for (;;) {
        if (__atomic_load_n(&e->cmd_head, __ATOMIC_RELAXED))
            run_cmds(e);
        run_deferred(e);
        flush_sends(e);
        if (e->stopping && e->nios == e->nabandoned && !e->ndefer && list_empty(&e->conns))
            break;
        uint64_t due = UINT64_MAX; /* the next timer */
        if (!list_empty(&e->timers))
            due = container_of(e->timers.next, struct timer, link)->when;
        if (due <= mono_ns()) {
            io_uring_submit(&e->ring);
        } else if (!poll_ring(e, due)) {
            struct __kernel_timespec ts, *tsp = NULL;
            if (due != UINT64_MAX) {
                uint64_t now = mono_ns();
                uint64_t d = due > now ? due - now : 0;
                ts.tv_sec = (long long)(d / 1000000000ull);
                ts.tv_nsec = (long long)(d % 1000000000ull);
                tsp = &ts;
            }
            ring_wait(e, tsp);
        }
        for (;;) {
            unsigned n = io_uring_peek_batch_cqe(&e->ring, cqes, 256);
            if (!n)
                break;
            struct {
                struct io *io;
                int res;
            } done[256];
            for (unsigned i = 0; i < n; i++) {
                done[i].io = io_uring_cqe_get_data(cqes[i]);
                done[i].res = cqes[i]->res;
            }
            io_uring_cq_advance(&e->ring, n);
            e->last_busy = __atomic_load_n(&e->poll_ns, __ATOMIC_RELAXED) ? mono_ns() : 0;
            for (unsigned i = 0; i < n; i++) {
                if (done[i].io != &e->cmd_io)
                    e->nios--;
                done[i].io->done(e, done[i].io, done[i].res);
            }
            if (n < 256)
                break;
        }
        run_timers(e);
    }
    io_uring_queue_exit(&e->ring);
    free(e->defer);
    return NULL;
}

/* --- the public interface ------------------------------------------------------------------ */

tandem_engine *tandem_engine_new(int *err)
{
    struct engine *e = calloc(1, sizeof(*e));
    if (!e) {
        *err = -ENOMEM;
        return NULL;
    }
    /* Payload buffers (up to 32 MiB) come from the heap and are reused: above glibc's
     * default mmap threshold every 1 MiB request paid an mmap, page faults that zero the
     * pages, and an munmap (about a tenth of the CPU of 1 MiB reads, measured). */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    e->cmd_tail = &e->cmd_head;
    const char *w = getenv("TANDEM_ENGINE_URING_WRITES");
    e->sync_writes = !(w && *w == '1');
    list_init(&e->conns);
    list_init(&e->flushq);
    list_init(&e->timers);
    e->cmd_efd = eventfd(0, EFD_CLOEXEC);
    e->evt_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->cmd_efd < 0 || e->evt_efd < 0) {
        *err = -errno;
        goto fail;
    }
    /* The engine thread takes no signals: they stay with Python's main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        *err = -rc;
        goto fail;
    }
    pthread_mutex_lock(&e->lock);
    while (!e->init_done)
        pthread_cond_wait(&e->cond, &e->lock);
    pthread_mutex_unlock(&e->lock);
    if (e->init_err) {
        pthread_join(e->thread, NULL);
        *err = e->init_err;
        goto fail;
    }
    *err = 0;
    return e;
fail:
    if (e->cmd_efd >= 0)
        close(e->cmd_efd);
    if (e->evt_efd >= 0)
        close(e->evt_efd);
    free(e);
    return NULL;
}

void tandem_engine_free(tandem_engine *e)
{
    if (!e)
        return;
    struct cmd *cmd = new_cmd(CMD_STOP);
    if (cmd && push_cmd(e, cmd) == 0) {
        pthread_join(e->thread, NULL);
    } else {
        free(cmd);
        abort(); /* cannot stop the thread safely */
    }
    while (e->cmd_head) {
        struct cmd *c = e->cmd_head;
        e->cmd_head = c->next;
        if ((c->type == CMD_CONN_ADD || c->type == CMD_T_ATTACH || c->type == CMD_T_SETUP) &&
            c->fd >= 0)
            close(c->fd);
        free(c->data);
        free(c->data2);
        free(c);
    }
    for (size_t i = 0; i < e->evn; i++)
        free(e->evq[i].data);
    free(e->evq);
    replica_free(e);
    target_free(e);
    close(e->cmd_efd);
    close(e->evt_efd);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->cond);
    free(e);
}

int tandem_engine_event_fd(tandem_engine *e) { return e->evt_efd; }

int tandem_engine_events(tandem_engine *e, struct tandem_event *out, int max)
{
    pthread_mutex_lock(&e->lock);
    size_t n = e->evn < (size_t)max ? e->evn : (size_t)max;
    if (n) {
        memcpy(out, e->evq, n * sizeof(*out));
        memmove(e->evq, e->evq + n, (e->evn - n) * sizeof(*out));
        e->evn -= n;
    }
    pthread_mutex_unlock(&e->lock);
    return (int)n;
}

void tandem_free(void *p) { free(p); }

int tandem_engine_pause(tandem_engine *e, uint64_t id)
{
    struct cmd *c = new_cmd(CMD_PAUSE);
    if (!c)
        return -ENOMEM;
    c->id = id;
    return push_cmd(e, c);
}

int tandem_engine_resume(tandem_engine *e)
{
    struct cmd *c = new_cmd(CMD_RESUME);
    return c ? push_cmd(e, c) : -ENOMEM;
}

int tandem_conn_add(tandem_engine *e, uint64_t conn, int fd, int kind)
{
    struct cmd *c = new_cmd(CMD_CONN_ADD);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    c->fd = fd;
    c->kind = kind;
    return push_cmd(e, c);
}

int tandem_conn_close(tandem_engine *e, uint64_t conn)
{
    struct cmd *c = new_cmd(CMD_CONN_CLOSE);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    return push_cmd(e, c);
}

int tandem_conn_reply(tandem_engine *e, uint64_t conn, const void *data, size_t len,
                      int epoch_action, uint64_t epoch, int end)
{
    struct cmd *c = new_cmd(CMD_CONN_REPLY);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    c->data = malloc(len ? len : 1);
    if (!c->data) {
        free(c);
        return -ENOMEM;
    }
    memcpy(c->data, data, len);
    c->len = len;
    c->epoch_action = epoch_action;
    c->epoch = epoch;
    c->kind = end;
    return push_cmd(e, c);
}

int tandem_replica_setup(tandem_engine *e, uint64_t size, uint64_t epoch, int intent_fd,
                         uint8_t *marked, uint32_t *touch, uint32_t count, uint64_t region,
                         double clock0)
{
    struct cmd *c = new_cmd(CMD_R_SETUP);
    if (!c)
        return -ENOMEM;
    c->size = size;
    c->epoch = epoch;
    c->intent_fd = intent_fd;
    c->marked = marked;
    c->touch = touch;
    c->count = count;
    c->region = region;
    c->clock0 = clock0;
    return push_cmd(e, c);
}

int tandem_replica_set_layers(tandem_engine *e, const int *fds, int n, uint8_t *head,
                              uint8_t *base)
{
    if (n < 1 || n > MAX_LAYERS)
        return -EINVAL;
    struct cmd *c = new_cmd(CMD_R_LAYERS);
    if (!c)
        return -ENOMEM;
    memcpy(c->fds, fds, (size_t)n * sizeof(int));
    c->n = n;
    c->head = head;
    c->base = base;
    return push_cmd(e, c);
}

int tandem_replica_set_epoch(tandem_engine *e, uint64_t epoch)
{
    struct cmd *c = new_cmd(CMD_R_EPOCH);
    if (!c)
        return -ENOMEM;
    c->epoch = epoch;
    return push_cmd(e, c);
}

int tandem_replica_set_fault(tandem_engine *e, int slot, int action, double arg,
                             int64_t remaining)
{
    if (slot < 0 || slot >= TANDEM_FAULT_SLOTS || action < 0 || action > TANDEM_FAULT_CRASH)
        return -EINVAL;
    struct cmd *c = new_cmd(CMD_R_FAULT);
    if (!c)
        return -ENOMEM;
    c->slot = slot;
    c->action = action;
    c->arg = arg;
    c->remaining = remaining;
    return push_cmd(e, c);
}

int tandem_replica_iov(tandem_engine *e, struct tandem_io *ios, int n)
{
    if (n <= 0)
        return n ? -EINVAL : 0;
    struct sync_io sy;
    if (sem_init(&sy.done, 0, 0))
        return -errno;
    sy.remaining = n;
    struct cmd *c = new_cmd(CMD_R_IO);
    if (!c) {
        sem_destroy(&sy.done);
        return -ENOMEM;
    }
    c->ios = ios;
    c->n = n;
    c->sync = &sy;
    push_cmd(e, c); /* queued even if waking the engine failed: it checks every turn */
    while (sem_wait(&sy.done) && errno == EINTR)
        ;
    sem_destroy(&sy.done);
    for (int i = 0; i < n; i++)
        if (ios[i].status)
            return -ios[i].status;
    return 0;
}

struct tandem_replica_stats *tandem_replica_stats(tandem_engine *e) { return &e->rstats; }

void tandem_engine_set_poll(tandem_engine *e, uint64_t ns)
{
    __atomic_store_n(&e->poll_ns, ns, __ATOMIC_RELAXED);
}

struct tandem_poll_stats *tandem_engine_poll_stats(tandem_engine *e) { return &e->poll; }

unsigned tandem_engine_ring_features(tandem_engine *e) { return e->ring_features; }

/* --- the target side ----------------------------------------------------------------------- */

static char *dupstr(const char *s)
{
    return strdup(s ? s : "");
}

int tandem_vol_setup(tandem_engine *e, uint64_t size, int replica_count, int quorum,
                     double timeout, double timeout_last, const char *name, int shm_fd,
                     uint64_t shm_size)
{
    struct cmd *c = new_cmd(CMD_T_SETUP);
    if (!c)
        return -ENOMEM;
    /* our own copy: the caller may close its fd (and the number be reused) before the
     * engine thread maps it */
    c->fd = shm_fd >= 0 ? fcntl(shm_fd, F_DUPFD_CLOEXEC, 0) : -1;
    c->shm_size = shm_size;
    c->size = size;
    c->n = replica_count;
    c->quorum = quorum;
    c->t1 = timeout;
    c->t2 = timeout_last;
    c->data = dupstr(name);
    if (!c->data) {
        if (c->fd >= 0)
            close(c->fd);
        free(c);
        return -ENOMEM;
    }
    return push_cmd(e, c);
}

int tandem_member_attach(tandem_engine *e, int slot, int fd, int mode, int current, int shared,
                         const uint32_t *local, const char *address, uint64_t id)
{
    if (slot < 0 || slot >= TANDEM_MAX_MEMBERS)
        return -EINVAL;
    struct cmd *c = new_cmd(CMD_T_ATTACH);
    if (!c)
        return -ENOMEM;
    c->slot = slot;
    c->fd = fd;
    c->mode = mode;
    c->current = current;
    c->shared = shared;
    if (local)
        memcpy(c->local, local, sizeof(c->local));
    c->id = id;
    c->data = dupstr(address);
    if (!c->data) {
        free(c);
        return -ENOMEM;
    }
    return push_cmd(e, c);
}

int tandem_member_mode(tandem_engine *e, int slot, int mode, int current, const char *why,
                       uint64_t id)
{
    if (slot < 0 || slot >= TANDEM_MAX_MEMBERS)
        return -EINVAL;
    struct cmd *c = new_cmd(CMD_T_MODE);
    if (!c)
        return -ENOMEM;
    c->slot = slot;
    c->mode = mode;
    c->current = current;
    c->id = id;
    c->data = dupstr(why);
    if (!c->data) {
        free(c);
        return -ENOMEM;
    }
    return push_cmd(e, c);
}

int tandem_member_map(tandem_engine *e, int slot, uint8_t *map, uint64_t count, uint64_t region,
                      int track, uint64_t id)
{
    if (slot < 0 || slot >= TANDEM_MAX_MEMBERS)
        return -EINVAL;
    struct cmd *c = new_cmd(CMD_T_MAP);
    if (!c)
        return -ENOMEM;
    c->slot = slot;
    c->map = map;
    c->mcount = count;
    c->region = region;
    c->track = track;
    c->id = id;
    return push_cmd(e, c);
}

int tandem_member_tracking(tandem_engine *e, int slot)
{
    /* a flag the engine thread writes: read without a command */
    return target_tracking(e, slot);
}

int tandem_vol_stable(tandem_engine *e, uint64_t seq)
{
    struct cmd *c = new_cmd(CMD_T_STABLE);
    if (!c)
        return -ENOMEM;
    c->epoch = seq;
    return push_cmd(e, c);
}

int tandem_vol_lock(tandem_engine *e, uint64_t id, const uint64_t *ranges, int n)
{
    if (n < 0)
        return -EINVAL;
    struct cmd *c = new_cmd(CMD_T_LOCK);
    if (!c)
        return -ENOMEM;
    c->id = id;
    c->n = n;
    c->data = malloc(sizeof(uint64_t) * 2 * (size_t)(n ? n : 1));
    if (!c->data) {
        free(c);
        return -ENOMEM;
    }
    memcpy(c->data, ranges, sizeof(uint64_t) * 2 * (size_t)n);
    return push_cmd(e, c);
}

int tandem_vol_unlock(tandem_engine *e, uint64_t id)
{
    struct cmd *c = new_cmd(CMD_T_UNLOCK);
    if (!c)
        return -ENOMEM;
    c->id = id;
    return push_cmd(e, c);
}

int tandem_vol_qos(tandem_engine *e, const double *limits, double burst_seconds)
{
    struct cmd *c = new_cmd(CMD_T_QOS);
    if (!c)
        return -ENOMEM;
    for (int i = 0; i < 6; i++)
        c->limits[i] = limits[i] > 0 ? limits[i] : 0;
    c->t1 = burst_seconds;
    return push_cmd(e, c);
}

int tandem_vol_submit(tandem_engine *e, uint64_t id, int frontend, int op, int flags,
                      uint64_t offset, uint32_t length, const void *data)
{
    struct cmd *c = new_cmd(CMD_T_SUBMIT);
    if (!c)
        return -ENOMEM;
    c->id = id;
    c->frontend = frontend;
    c->op = op;
    c->flags = flags;
    c->offset = offset;
    c->length = length;
    c->ptr = data;
    return push_cmd(e, c);
}

int tandem_nbd_add(tandem_engine *e, uint64_t conn, int fd, int flags, uint64_t size,
                   int frontend, const void *pre, size_t prelen)
{
    struct cmd *c = new_cmd(CMD_CONN_ADD);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    c->fd = fd;
    c->kind = TANDEM_CONN_NBD;
    c->flags = flags;
    c->size = size;
    c->frontend = frontend;
    if (prelen) {
        c->data = malloc(prelen);
        if (!c->data) {
            free(c);
            return -ENOMEM;
        }
        memcpy(c->data, pre, prelen);
        c->len = prelen;
    }
    return push_cmd(e, c);
}

int tandem_nbd_stop(tandem_engine *e, uint64_t conn)
{
    struct cmd *c = new_cmd(CMD_NBD_STOP);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    return push_cmd(e, c);
}

struct tandem_target_stats *tandem_target_stats(tandem_engine *e) { return &e->tstats; }

int tandem_iscsi_add(tandem_engine *e, uint64_t conn, int fd,
                     const struct tandem_iscsi_params *params, const void *pre, size_t prelen)
{
    struct cmd *c = new_cmd(CMD_CONN_ADD);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    c->fd = fd;
    c->kind = TANDEM_CONN_ISCSI;
    c->ip = *params;
    if (prelen) {
        c->data = malloc(prelen);
        if (!c->data) {
            free(c);
            return -ENOMEM;
        }
        memcpy(c->data, pre, prelen);
        c->len = prelen;
    }
    return push_cmd(e, c);
}

static void *dup_bytes(const void *p, size_t n)
{
    void *d = malloc(n ? n : 1);
    if (d && n)
        memcpy(d, p, n);
    return d;
}

int tandem_iscsi_result(tandem_engine *e, uint64_t conn, uint64_t tag, int status,
                        const void *data, size_t len, const void *sense, size_t slen,
                        int64_t wanted, int slow)
{
    struct cmd *c = new_cmd(CMD_ISCSI_RESULT);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    c->epoch = tag;
    c->status = status;
    c->data = dup_bytes(data, len);
    c->len = len;
    c->data2 = dup_bytes(sense, slen);
    c->len2 = slen;
    c->wanted = wanted;
    c->slow = slow;
    if (!c->data || !c->data2) {
        free(c->data);
        free(c->data2);
        free(c);
        return -ENOMEM;
    }
    return push_cmd(e, c);
}

int tandem_iscsi_pdus(tandem_engine *e, uint64_t conn, uint64_t tag, const void *pdus,
                      size_t len, int flags, uint32_t recv_length, int slow)
{
    struct cmd *c = new_cmd(CMD_ISCSI_PDUS);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    c->epoch = tag;
    c->data = dup_bytes(pdus, len);
    if (!c->data) {
        free(c);
        return -ENOMEM;
    }
    c->len = len;
    c->flags = flags;
    c->length = recv_length;
    c->slow = slow;
    return push_cmd(e, c);
}

int tandem_iscsi_slow(tandem_engine *e, uint64_t conn, int slow)
{
    struct cmd *c = new_cmd(CMD_ISCSI_SLOW);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    c->slow = slow;
    return push_cmd(e, c);
}

int tandem_iscsi_abort(tandem_engine *e, uint64_t conn, uint64_t id, int64_t lun, int status)
{
    struct cmd *c = new_cmd(CMD_ISCSI_ABORT);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    c->req = id;
    c->lun = lun;
    c->status = status;
    return push_cmd(e, c);
}

int tandem_iscsi_stop(tandem_engine *e, uint64_t conn)
{
    struct cmd *c = new_cmd(CMD_ISCSI_STOP);
    if (!c)
        return -ENOMEM;
    c->id = conn;
    return push_cmd(e, c);
}
