/* The engine core's internal interface, shared by the protocol handlers (replica_server.c,
 * and in phase 2 the target side): the io_uring loop, connections with receive buffers and
 * send queues, timers, and the command/event queues to Python. See native/ENGINE.md.
 *
 * Threading: everything here is touched by the engine thread only, except `lock` and what
 * it guards (the command and event queues) and the stats Python reads. */
#ifndef TANDEM_ENGINE_H
#define TANDEM_ENGINE_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <liburing.h>
#include <pthread.h>
#include <semaphore.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "tandem.h"

struct engine;
struct conn;

/* --- intrusive doubly linked lists -------------------------------------------------------- */

struct list {
    struct list *prev, *next;
};

static inline void list_init(struct list *l) { l->prev = l->next = l; }
static inline int list_empty(const struct list *l) { return l->next == l; }
static inline void list_add_tail(struct list *head, struct list *n)
{
    n->prev = head->prev;
    n->next = head;
    head->prev->next = n;
    head->prev = n;
}
static inline void list_del(struct list *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = n->next = n;
}
#define container_of(p, T, m) ((T *)((char *)(p) - offsetof(T, m)))

/* --- I/O completions ---------------------------------------------------------------------- */

/* Every SQE's user_data points at a struct io (embedded in its owner); `done` runs on the
 * engine thread with the CQE's result. */
struct io {
    void (*done)(struct engine *e, struct io *io, int res);
};

/* An SQE for io (counted as in flight until its CQE). Never NULL: submits to make room.
 * need > 1 reserves room for a linked chain of that many SQEs first. */
struct io_uring_sqe *eng_sqe(struct engine *e, struct io *io, unsigned need);

/* Complete io with res from the loop (as if a CQE arrived), after the current callback:
 * for work done synchronously, so completions never run inside their submitter. */
void eng_defer(struct engine *e, struct io *io, int res);

/* --- timers ------------------------------------------------------------------------------- */

struct timer {
    struct list link;
    uint64_t when; /* CLOCK_MONOTONIC ns */
    void (*fn)(struct engine *e, struct timer *t);
    int armed;
};

uint64_t mono_ns(void);
/* How many requests are in flight as one arrives: the loop polls instead of sleeping only
 * while this stays about 1 (poll_ring in engine.c). */
void engine_note_depth(struct engine *e, int n);
double mono_s(void);
void timer_arm(struct engine *e, struct timer *t, uint64_t delay_ns);
void timer_cancel(struct timer *t);

/* --- connections -------------------------------------------------------------------------- */

/* A queued piece of output: up to 3 iovecs sent in order; release() once sent or dropped. */
struct sendbuf {
    struct sendbuf *next;
    int niov;
    struct iovec iov[3];
    void (*release)(struct sendbuf *b);
};

struct conn_ops {
    /* New bytes in rbuf[rpos, rend): consume what forms whole messages (advance rpos). */
    void (*on_data)(struct conn *c);
    /* A direct receive (conn_recv_direct) has its bytes. */
    void (*on_direct)(struct conn *c);
    /* The peer closed (err 0) or the socket failed (err = errno); recv is over. */
    void (*on_eof)(struct conn *c, int err);
    /* The send queue became empty. */
    void (*on_sent)(struct conn *c);
    /* The connection is gone (fd closed, nothing in flight): free the handler's state. */
    void (*on_destroy)(struct conn *c);
};

enum conn_state {
    CONN_OPEN,      /* receiving and sending */
    CONN_FINISHING, /* handler done: send what is queued, then shut down and linger */
    CONN_LINGER,    /* write side shut down; discarding input until EOF or a timeout */
    CONN_DEAD,      /* closing the fd; queued output dropped */
};

struct conn {
    struct engine *e;
    uint64_t id;
    int fd;
    int kind; /* TANDEM_CONN_* */
    int state;
    const struct conn_ops *ops;
    void *proto;
    struct list link; /* engine's connections */
    int refs;         /* holders besides the engine (e.g. requests in flight) */

    /* receive: bytes [rpos, rend) of rbuf are unconsumed */
    uint8_t *rbuf;
    size_t rcap, rpos, rend;
    uint8_t *dbuf; /* direct receive target (large payloads) */
    size_t dwant, dhave;
    struct io rio;
    int recv_armed, recv_direct, eof;

    /* send */
    struct sendbuf *sq, **sqtail;
    size_t sqoff;   /* bytes of sq's head already sent */
    size_t sqbytes; /* bytes queued */
    struct io sio;
    int send_armed;
    struct msghdr msg;
    struct iovec siov[64];
    struct list flink; /* in the engine's flush queue */
    int in_flushq;

    struct timer linger;
    struct io cancel_io;
    int cancel_armed;
};

/* The handler's view. */
void conn_send(struct conn *c, struct sendbuf *b);
/* Copy what rbuf holds into buf and receive the rest of `want` bytes straight into it;
 * returns 1 if complete already (on_direct is then NOT called), else 0. */
int conn_recv_direct(struct conn *c, uint8_t *buf, size_t want);
/* (Re)arm receiving if there is room and no receive is pending. */
void conn_arm_recv(struct conn *c);
/* Graceful close: send what is queued, shut down, discard input until EOF, close. */
void conn_finish(struct conn *c);
/* Close now, dropping queued output. */
void conn_abort(struct conn *c);
void conn_get(struct conn *c);
void conn_put(struct conn *c);
struct conn *conn_find(struct engine *e, uint64_t id);
/* Also a dead connection (not destroyed yet). */
struct conn *conn_find_any(struct engine *e, uint64_t id);

/* --- events to Python --------------------------------------------------------------------- */

/* Queue an event (data, if any, becomes Python's to free) and wake Python. */
void eng_event(struct engine *e, const struct tandem_event *ev);
/* A TANDEM_EV_LOG line. */
void eng_log(struct engine *e, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* TANDEM_EV_PROTO_ERROR for c: Python logs why the connection is being closed. */
void conn_proto_event(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void conn_proto_vevent(struct conn *c, const char *fmt, va_list ap);

/* --- the engine --------------------------------------------------------------------------- */

struct cmd;
struct rstore;
struct vol;

struct engine {
    struct io_uring ring;
    pthread_t thread;
    unsigned nios; /* SQEs whose CQE is outstanding (the command read excluded) */
    unsigned nabandoned; /* of those, given up (a read stuck on a disk): not waited for at stop */
    unsigned ring_features; /* IORING_FEAT_* */

    pthread_mutex_t lock; /* guards the two queues and init */
    pthread_cond_t cond;
    int init_done, init_err;
    struct cmd *cmd_head, **cmd_tail;
    int cmd_efd;
    uint64_t cmd_efd_val;
    struct io cmd_io;
    int cmd_armed;
    struct tandem_event *evq;
    size_t evn, evcap;
    int evt_efd;

    struct {
        struct io *io;
        int res;
    } *defer;
    size_t ndefer, capdefer;
    int sync_writes; /* file writes with pwritev on the loop (see replica_server.c) */
    uint64_t poll_ns;   /* poll this long after the last completion before sleeping */
    uint64_t last_busy; /* when the loop last had a completion (while polling is on) */
    int depth16;        /* requests in flight as one arrives, x16, a moving average */
    struct tandem_poll_stats poll;

    struct list conns;
    struct list flushq;
    struct list timers;
    int stopping;

    struct rstore *rs; /* the replica side's store (replica_server.c) */
    struct tandem_replica_stats rstats;

    struct vol *vol; /* the target side's volume (target.c) */
    struct tandem_target_stats tstats;
};

/* replica_server.c */
struct conn *replica_conn_new(struct engine *e, uint64_t id, int fd);
void replica_reply(struct engine *e, struct conn *c, void *data, size_t len, int epoch_action,
                   uint64_t epoch, int end);
/* A batch of store requests on Python's behalf (tandem_replica_iov): done is posted when
 * the last of them finished. */
struct sync_io {
    sem_t done;
    int remaining;
};
void replica_io(struct engine *e, struct tandem_io *io, struct sync_io *sy);
int replica_setup(struct engine *e, uint64_t size, uint64_t epoch, int intent_fd,
                  uint8_t *marked, uint32_t *touch, uint32_t count, uint64_t region,
                  double clock0);
void replica_set_layers(struct engine *e, const int *fds, int n, uint8_t *head, uint8_t *base);
void replica_set_epoch(struct engine *e, uint64_t epoch);
void replica_set_fault(struct engine *e, int slot, int action, double arg, int64_t remaining);
void replica_pause(struct engine *e, uint64_t id);
void replica_resume(struct engine *e);
void replica_stop(struct engine *e);
void replica_free(struct engine *e);

/* core constructor for handlers */
struct conn *conn_new(struct engine *e, uint64_t id, int fd, const struct conn_ops *ops,
                      void *proto, size_t rcap);

#endif
