/* The target side's volume: target/replicator.py's data path in C (see its module docstring
 * and native/ENGINE.md, "Target side").
 *
 * - Members: one data connection per replica (the client side of replica/protocol.py), which
 *   Python connected and OPENed with the member's fencing key before handing it over; Python
 *   keeps its own control connection to each.
 * - Writes (WRITE, UNMAP, WRITE_ZEROES, FLUSH) go to every RW and WO member at once. A request
 *   is over when every member answered or was dropped; it succeeded when a quorum of RW
 *   members wrote it. A member that fails (error, broken connection, missed deadline) is
 *   dropped at once: mode ERR, connection closed, and if it was RW its region map (Python's
 *   buffer) is cleared and from then on marked for every write it misses, starting with the
 *   ones that failed on it. Dropping a current member makes the volume unstable and tells
 *   Python (TANDEM_EV_MEMBER_DOWN with a sequence number); no write is acknowledged until
 *   Python bumped the generation of the survivors and said so (tandem_vol_stable).
 * - Every member refusing a request (EINVAL from all) is a bad request, not a failure.
 * - Reads go to one RW member, round robin; a failed one is dropped and the next tried.
 * - The bare quorum of RW members gets the long deadline (timeout_last).
 * - Range locks: Python takes exclusive locks over lists of ranges (rebuild copies, resize,
 *   snapshots); a write overlapping one waits; the lock is granted once the overlapping
 *   writes in flight are over.
 * - QoS token buckets (target/qos.py): read/write/total IOPS and bytes per second with a
 *   burst, one arrival-ordered queue per direction, limits changed online.
 * - Stats per frontend and op (target/stats.py). */
#include "target.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define REQ_MAGIC 0x51444E54u
#define RESP_MAGIC 0x52444E54u
#define REQ_SIZE 32
#define RESP_SIZE 24
#define MAX_PAYLOAD (32u << 20)
#define MCONN_RBUF (256u << 10)
#define MAX_MSG 4096

enum { OP_READ = 1, OP_WRITE = 2, OP_FLUSH = 3, OP_UNMAP = 4, OP_WRITE_ZEROES = 5 };
enum { FLAG_FUA = 1, FLAG_NO_HOLE = 2, FLAG_SHM = 4 };
/* Shared memory: slots of 64 KiB, one or more per payload (a small payload touches only the
 * pages it uses: the memfd's pages exist once written). */
#define SHM_SLOT (64u << 10)
#define SHM_MAX_SLOTS 4096u
enum { VS_NEW, VS_QOS, VS_LOCK, VS_RUN, VS_STABLE, VS_DONE };
enum { R_PENDING = -1, R_DOWN = -2 };

/* --- payload buffers ----------------------------------------------------------------------- */

/* The memory shared with the replicas on this host (a memfd Python made and names to them),
 * cut in slots; refcounted by the volume and every buffer in it, as buffers may outlive the
 * volume. */
struct pool {
    int refs;
    uint8_t *base;
    uint32_t nslots;
    uint64_t *leaked; /* the stats counter (NULL once the volume is gone) */
    uint64_t used[SHM_MAX_SLOTS / 64]; /* bit set: slot taken */
    struct list peers; /* struct peer, watched */
    struct list held;  /* struct held */
};

/* A replica process on this host that maps the pool. A connection to it that is dropped with
 * requests in flight leaves their slots to it: it may still read or write them when it runs
 * again. They come back once the process exited (its pidfd polls readable): then nobody but
 * us maps them. This rests on: its io-wq workers being its threads (IORING_FEAT_NATIVE_WORKERS,
 * Linux 5.12; before, kernel threads that borrowed its memory could outlive it), no I/O of
 * its pinning the pages past its exit (the replica uses no O_DIRECT, registered buffers or
 * zero-copy sends on them), and the pid being the replica's: the socket's peer credentials
 * name the process that listens, and the replica listens itself. */
struct peer {
    struct list link; /* pool->peers while watched */
    int refs;         /* connections, buffers, held slots, the armed poll */
    uint32_t pid;
    int pidfd;
    int dead;
    struct pool *pool;
    struct io io, cancel;
};

/* Slots whose buffer is gone, kept until every peer in `by` exited. */
struct held {
    struct list link; /* pool->held */
    uint32_t slot, nslots;
    struct peer *by[VBUF_HOLDERS];
};

static void slots_set(struct pool *p, uint32_t first, uint32_t n, int used);

static void peer_put(struct peer *pe)
{
    if (pe && --pe->refs == 0) {
        if (pe->pidfd >= 0)
            close(pe->pidfd);
        free(pe);
    }
}

static void pool_put(struct pool *p)
{
    if (--p->refs == 0) {
        while (!list_empty(&p->held)) { /* the engine is gone: nothing to give them to */
            struct held *h = container_of(p->held.next, struct held, link);
            list_del(&h->link);
            for (int i = 0; i < VBUF_HOLDERS; i++)
                peer_put(h->by[i]);
            free(h);
        }
        munmap(p->base, (size_t)p->nslots * SHM_SLOT);
        free(p);
    }
}

/* The last reference to a poisoned buffer went: keep its slots until its holders exited. */
static void pool_hold(struct vbuf *b)
{
    struct pool *p = b->pool;
    struct held *h = b->poisoned == POISON_PEERS ? calloc(1, sizeof(*h)) : NULL;
    int alive = 0;
    for (int i = 0; i < VBUF_HOLDERS; i++) {
        struct peer *pe = b->held[i];
        b->held[i] = NULL;
        if (pe && h && !pe->dead)
            h->by[alive++] = pe;
        else
            peer_put(pe);
    }
    if (h && !alive) { /* they all exited already */
        free(h);
        slots_set(p, b->slot, b->nslots, 0);
        return;
    }
    if (p->leaked)
        *p->leaked += (uint64_t)b->nslots * SHM_SLOT;
    if (!h)
        return; /* kept for good: a holder we cannot watch (or no memory to remember it) */
    h->slot = b->slot;
    h->nslots = b->nslots;
    list_add_tail(&p->held, &h->link);
}

/* A peer exited: give back what only it held. */
static void peer_exited(struct engine *e, struct io *io, int res)
{
    (void)e;
    struct peer *pe = container_of(io, struct peer, io);
    list_del(&pe->link);
    struct pool *p = pe->pool;
    pe->pool = NULL;
    if (res >= 0 && p) {
        pe->dead = 1;
        struct list *l = p->held.next;
        while (l != &p->held) {
            struct held *h = container_of(l, struct held, link);
            l = l->next;
            int left = 0;
            for (int i = 0; i < VBUF_HOLDERS; i++) {
                if (h->by[i] == pe) {
                    h->by[i] = NULL;
                    peer_put(pe);
                }
                left += h->by[i] != NULL;
            }
            if (left)
                continue;
            list_del(&h->link);
            slots_set(p, h->slot, h->nslots, 0);
            if (p->leaked)
                *p->leaked -= (uint64_t)h->nslots * SHM_SLOT;
            free(h);
        }
    }
    if (p)
        pool_put(p);
    peer_put(pe);
}

static void peer_cancelled(struct engine *e, struct io *io, int res)
{
    (void)e;
    (void)res;
    peer_put(container_of(io, struct peer, cancel));
}

/* The watched peer with this pid, or a new one: watched, or already dead when no process has
 * the pid any more. NULL when it cannot be watched: then what a dropped connection to it held
 * is kept for good. */
static struct peer *peer_find(struct engine *e, struct pool *p, uint32_t pid)
{
    for (struct list *l = p->peers.next; l != &p->peers; l = l->next) {
        struct peer *pe = container_of(l, struct peer, link);
        struct pollfd pf = {.fd = pe->pidfd, .events = POLLIN};
        /* not one that exited, its poll not done yet, with the pid taken by a new process */
        if (pe->pid == pid && poll(&pf, 1, 0) == 0) {
            pe->refs++;
            return pe;
        }
    }
    if (!pid || !(e->ring_features & IORING_FEAT_NATIVE_WORKERS))
        return NULL;
    int fd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
    if (fd < 0 && errno != ESRCH)
        return NULL;
    struct peer *pe = calloc(1, sizeof(*pe));
    if (!pe) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    pe->pid = pid;
    pe->pidfd = fd;
    if (fd < 0) { /* no such process any more: what it held is free */
        pe->refs = 1;
        pe->dead = 1;
        return pe;
    }
    pe->refs = 2; /* the caller's and the poll's */
    pe->pool = p;
    p->refs++;
    pe->io.done = peer_exited;
    pe->cancel.done = peer_cancelled;
    list_add_tail(&p->peers, &pe->link);
    io_uring_prep_poll_add(eng_sqe(e, &pe->io, 1), fd, POLLIN);
    return pe;
}

/* The engine stops: stop watching (the polls complete with -ECANCELED). */
static void peers_unwatch(struct engine *e, struct pool *p)
{
    for (struct list *l = p->peers.next; l != &p->peers; l = l->next) {
        struct peer *pe = container_of(l, struct peer, link);
        pe->refs++;
        io_uring_prep_poll_remove(eng_sqe(e, &pe->cancel, 1), (uint64_t)(uintptr_t)&pe->io);
    }
}

/* A connection to peer pe (NULL: not known) was dropped with b in flight. */
static void vbuf_hold(struct vbuf *b, struct peer *pe)
{
    if (b->poisoned == POISON_FOREVER)
        return;
    for (int i = 0; pe && i < VBUF_HOLDERS; i++) {
        if (b->held[i] == pe)
            return;
        if (!b->held[i]) {
            b->held[i] = pe;
            pe->refs++;
            b->poisoned = POISON_PEERS;
            return;
        }
    }
    b->poisoned = POISON_FOREVER;
}

static int slot_used(const struct pool *p, uint32_t i) { return (p->used[i / 64] >> (i % 64)) & 1; }

static void slots_set(struct pool *p, uint32_t first, uint32_t n, int used)
{
    for (uint32_t i = first; i < first + n; i++) {
        if (used)
            p->used[i / 64] |= 1ull << (i % 64);
        else
            p->used[i / 64] &= ~(1ull << (i % 64));
    }
}

/* First fit of n free slots in a row; skips whole taken words. */
static int64_t slots_find(const struct pool *p, uint32_t n)
{
    uint32_t words = (p->nslots + 63) / 64;
    if (n == 1) { /* the common case (payloads up to 64 KiB): the first clear bit */
        for (uint32_t w = 0; w < words; w++) {
            if (p->used[w] != ~0ull) {
                uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(~p->used[w]);
                return i < p->nslots ? (int64_t)i : -1;
            }
        }
        return -1;
    }
    uint32_t run = 0;
    for (uint32_t i = 0; i < p->nslots; i++) {
        if (i % 64 == 0 && run == 0 && p->used[i / 64] == ~0ull) {
            i += 63;
            continue;
        }
        if (slot_used(p, i)) {
            run = 0;
        } else if (++run == n) {
            return (int64_t)(i + 1 - n);
        }
    }
    return -1;
}

struct vbuf *vbuf_new(size_t len)
{
    struct vbuf *b = malloc(sizeof(*b) + len);
    if (!b)
        return NULL;
    memset(b, 0, sizeof(*b));
    b->refs = 1;
    b->len = len;
    b->data = b->inl;
    return b;
}

struct vbuf *vbuf_external(void *data, size_t len)
{
    struct vbuf *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->refs = 1;
    b->len = len;
    b->data = data;
    return b;
}

static struct vbuf *vbuf_pool(struct pool *p, size_t len)
{
    uint32_t n = (uint32_t)((len + SHM_SLOT - 1) / SHM_SLOT);
    int64_t first = n <= p->nslots ? slots_find(p, n) : -1;
    if (first < 0)
        return NULL;
    struct vbuf *b = vbuf_external(p->base + (size_t)first * SHM_SLOT, len);
    if (!b)
        return NULL;
    slots_set(p, (uint32_t)first, n, 1);
    b->pool = p;
    b->slot = (uint32_t)first;
    b->nslots = n;
    p->refs++;
    return b;
}

void vbuf_put(struct vbuf *b)
{
    if (!b || --b->refs)
        return;
    if (b->pool) {
        if (b->poisoned)
            pool_hold(b);
        else
            slots_set(b->pool, b->slot, b->nslots, 0);
        pool_put(b->pool);
    }
    free(b);
}

/* --- state --------------------------------------------------------------------------------- */

struct mconn;

struct member {
    int used;
    int mode;
    int shared; /* its data connection SHAREd the pool */
    int current; /* dropping it needs a generation bump */
    char addr[256];
    struct mconn *mc;
    uint64_t gen; /* connection generation */
    uint8_t *map;
    uint64_t map_count, region;
    int track;
    struct lfile *lf; /* local reads: the replica's head file and page, or NULL */
};

struct xlock {
    struct list link;
    uint64_t id;
    int n;
    int granted;
    uint64_t *lo, *hi; /* sorted, disjoint */
};

struct bucket {
    double rate, depth, tokens, last;
};

enum { B_READ_IOPS, B_WRITE_IOPS, B_TOTAL_IOPS, B_READ_BPS, B_WRITE_BPS, B_TOTAL_BPS };

struct vol {
    struct engine *e;
    int nactive; /* requests submitted and not yet finished */
    uint64_t size;
    int replica_count, quorum;
    double timeout, timeout_last;
    char name[256];
    struct member m[MAX_MEMBERS];
    unsigned rr;
    uint64_t drop_seq, stable_seq;
    struct list stable_wait;
    struct list lock_wait;
    struct list shared;
    struct list xlocks; /* granted, or waiting for the writes in flight */
    struct list xwait;  /* waiting for another exclusive lock */
    struct pool *pool;  /* shared memory, or NULL */
    /* QoS */
    struct bucket qb[6];
    double burst;
    int limited;
    struct list qwait[2];
    struct timer qtimer[2];
    double qstarted[2];
    int qwaiting[2];
    struct tandem_target_stats *st;
};

/* A data connection to a member (the client side of the replica protocol). */
struct msub;

struct mconn {
    struct conn *c;
    struct vol *vol;
    int slot;
    uint64_t gen;
    int dead;
    char *why; /* why it was closed */
    struct list inflight; /* requests in the order they were sent */
    struct timer dl;
    uint64_t deadline_ns;
    double deadline_s;
    struct msub **tags;
    uint32_t ntags, cap, *freetags, nfree;
    /* a response whose payload is being received straight into a buffer */
    struct msub *rx;
    struct vbuf *rxbuf;
    uint8_t *rxmsg;
    uint32_t rxstatus, rxlen;
    uint64_t rxtag;
    struct peer *peer; /* the replica process, when it shares the pool */
};

/* One request of a vio to one member. */
struct msub {
    struct list link;
    struct vio *v;
    struct mconn *mc;
    int slot;
    uint32_t tag;
    int refs; /* the result to come, the send queue */
    uint64_t sent_ns;
    struct vbuf *buf;
    int shm;       /* its data is in the pool: buf at offset shm_off */
    uint64_t shm_off;
    struct io fio; /* a deferred failure */
    char *fmsg;
    uint8_t hdr[REQ_SIZE + 8]; /* + the pool offset of a shared-memory READ/WRITE */
    struct sendbuf sb;
};

static void vio_start(struct vol *vol, struct vio *v);
static void fan_out(struct vol *vol, struct vio *v);
static void fan_done(struct vol *vol, struct vio *v);
static void msub_send(struct vol *vol, struct vio *v, int slot, uint64_t now);
static void read_next(struct vol *vol, struct vio *v);
static void local_close(struct member *m);
static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static void member_drop(struct vol *vol, int slot, const char *why);
static void update_deadlines(struct vol *vol);
static void locks_changed(struct vol *vol);

static char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static char *fmt(const char *f, ...)
{
    char buf[MAX_MSG];
    va_list ap;
    va_start(ap, f);
    int n = vsnprintf(buf, sizeof(buf), f, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof(buf))
        n = sizeof(buf) - 1;
    char *m = malloc((size_t)n + 1);
    if (m) {
        memcpy(m, buf, (size_t)n);
        m[n] = 0;
    }
    return m;
}

void eng_done(struct engine *e, uint64_t id, int status)
{
    struct tandem_event ev = {.type = TANDEM_EV_DONE, .id = id, .status = status};
    eng_event(e, &ev);
}

static int count_rw(const struct vol *vol)
{
    int n = 0;
    for (int i = 0; i < MAX_MEMBERS; i++)
        n += vol->m[i].used && vol->m[i].mode == TANDEM_MODE_RW;
    return n;
}

static int any_shared(const struct vol *vol)
{
    for (int i = 0; i < MAX_MEMBERS; i++)
        if (vol->m[i].used && vol->m[i].shared && vol->m[i].mc && !vol->m[i].mc->dead)
            return 1;
    return 0;
}

struct vbuf *vol_payload(struct engine *e, size_t len)
{
    struct vol *vol = e->vol;
    if (vol && vol->pool && len && any_shared(vol)) {
        struct vbuf *b = vbuf_pool(vol->pool, len);
        if (b)
            return b;
    }
    return vbuf_new(len);
}

int vol_readonly(struct engine *e)
{
    struct vol *vol = e->vol;
    return !vol || count_rw(vol) < vol->quorum;
}

uint64_t vol_size(struct engine *e) { return e->vol ? e->vol->size : 0; }

static int unstable(const struct vol *vol) { return vol->drop_seq > vol->stable_seq; }

static char *quorum_message(const struct vol *vol)
{
    return fmt("volume %s is read-only: %d of %d replicas are current, %d needed for writes",
               vol->name, count_rw(vol), vol->replica_count, vol->quorum);
}

/* --- completion and stats ------------------------------------------------------------------ */

static const double lat_bounds[TANDEM_LAT_BUCKETS - 1] = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5};

static void count(struct vol *vol, struct vio *v)
{
    if (v->frontend < 0 || v->frontend >= TANDEM_FRONTENDS)
        return;
    struct tandem_op_stats *s = &vol->st->fe[v->frontend][v->op - 1];
    if (v->status) {
        s->errors++;
        return;
    }
    double lat = (double)(mono_ns() - v->t0_ns) / 1e9;
    int b = 0;
    while (b < TANDEM_LAT_BUCKETS - 1 && lat > lat_bounds[b])
        b++;
    s->lat[b]++;
    s->lat_sum += lat;
    s->ops++;
    if (v->op == TANDEM_VIO_READ || v->op == TANDEM_VIO_WRITE)
        s->bytes += v->length;
}

static void vio_deferred(struct engine *e, struct io *io, int res)
{
    (void)e;
    (void)res;
    struct vio *v = container_of(io, struct vio, dio);
    v->done(v);
}

/* The request is over (status, msg set): count it, hand it back from the loop. */
static void vio_finish(struct vol *vol, struct vio *v)
{
    vol->nactive--;
    v->state = VS_DONE;
    count(vol, v);
    v->dio.done = vio_deferred;
    eng_defer(vol->e, &v->dio, 0);
}

static void vio_fail(struct vol *vol, struct vio *v, int status, char *msg)
{
    v->status = status;
    free(v->msg);
    v->msg = msg;
    vio_finish(vol, v);
}

void vio_release(struct vio *v)
{
    free(v->msg);
    v->msg = NULL;
    free(v->last);
    v->last = NULL;
    for (int i = 0; i < MAX_MEMBERS; i++) {
        if (v->rmsg[i]) {
            free(v->rmsg[i]);
            v->rmsg[i] = NULL;
        }
    }
    vbuf_put(v->buf);
    v->buf = NULL;
}

/* --- QoS (target/qos.py) ------------------------------------------------------------------- */

static void b_refill(struct bucket *b, double now)
{
    if (now > b->last) {
        b->tokens += (now - b->last) * b->rate;
        if (b->tokens > b->depth)
            b->tokens = b->depth;
    }
    b->last = now;
}

static void b_reconfigure(struct bucket *b, double rate, double burst, double now)
{
    if (b->rate <= 0) { /* was unlimited: start full */
        b->rate = rate;
        b->depth = rate * burst;
        b->last = now;
        b->tokens = b->depth;
        return;
    }
    b_refill(b, now);
    b->rate = rate;
    b->depth = rate * burst;
    if (b->tokens > b->depth)
        b->tokens = b->depth;
}

static double b_delay(struct bucket *b, double n, double now)
{
    if (b->rate <= 0)
        return 0;
    b_refill(b, now);
    double need = n < b->depth ? n : b->depth;
    double d = (need - b->tokens) / b->rate;
    return d > 0 ? d : 0;
}

static void b_take(struct bucket *b, double n)
{
    if (b->rate > 0)
        b->tokens -= n;
}

static int q_kind(const struct vio *v) { return v->op == TANDEM_VIO_READ ? 0 : 1; }

static double q_bytes(const struct vio *v)
{
    return (v->op == TANDEM_VIO_READ || v->op == TANDEM_VIO_WRITE) ? (double)v->length : 0;
}

static void qos_process(struct vol *vol, int k)
{
    struct bucket *iops[2] = {&vol->qb[k ? B_WRITE_IOPS : B_READ_IOPS], &vol->qb[B_TOTAL_IOPS]};
    struct bucket *bps[2] = {&vol->qb[k ? B_WRITE_BPS : B_READ_BPS], &vol->qb[B_TOTAL_BPS]};
    while (!list_empty(&vol->qwait[k])) {
        struct vio *v = container_of(vol->qwait[k].next, struct vio, link);
        double now = mono_s(), n = q_bytes(v), wait = 0;
        for (int i = 0; i < 2; i++) {
            double d = b_delay(iops[i], 1, now);
            if (d > wait)
                wait = d;
            d = b_delay(bps[i], n, now);
            if (d > wait)
                wait = d;
        }
        if (wait > 0) {
            if (!vol->qwaiting[k]) {
                vol->qwaiting[k] = 1;
                vol->qstarted[k] = now;
                vol->st->throttled[k]++;
            }
            timer_arm(vol->e, &vol->qtimer[k], (uint64_t)(wait * 1e9) + 1);
            return;
        }
        for (int i = 0; i < 2; i++) {
            b_take(iops[i], 1);
            b_take(bps[i], n);
        }
        if (vol->qwaiting[k]) {
            vol->qwaiting[k] = 0;
            vol->st->throttled_seconds[k] += now - vol->qstarted[k];
        }
        list_del(&v->link);
        vio_start(vol, v);
    }
}

static void qtimer_read(struct engine *e, struct timer *t)
{
    (void)t;
    qos_process(e->vol, 0);
}

static void qtimer_write(struct engine *e, struct timer *t)
{
    (void)t;
    qos_process(e->vol, 1);
}

void target_qos(struct engine *e, const double *limits, double burst)
{
    struct vol *vol = e->vol;
    if (!vol)
        return;
    double now = mono_s();
    vol->limited = 0;
    for (int i = 0; i < 6; i++) {
        b_reconfigure(&vol->qb[i], limits[i], burst, now);
        vol->limited |= limits[i] > 0;
    }
    vol->burst = burst;
    qos_process(vol, 0);
    qos_process(vol, 1);
}

/* --- range locks (target/rangelock.py) ----------------------------------------------------- */

static int xl_overlaps(const struct xlock *x, uint64_t lo, uint64_t hi)
{
    int a = 0, b = x->n; /* the first range ending after lo */
    while (a < b) {
        int mid = (a + b) / 2;
        if (x->hi[mid] <= lo)
            a = mid + 1;
        else
            b = mid;
    }
    return a < x->n && x->lo[a] < hi;
}

static int xl_overlaps_xl(const struct xlock *a, const struct xlock *b)
{
    if (a->n > b->n) {
        const struct xlock *t = a;
        a = b;
        b = t;
    }
    for (int i = 0; i < a->n; i++)
        if (xl_overlaps(b, a->lo[i], a->hi[i]))
            return 1;
    return 0;
}

static int blocked_by_xlock(struct vol *vol, uint64_t lo, uint64_t hi)
{
    for (struct list *p = vol->xlocks.next; p != &vol->xlocks; p = p->next)
        if (xl_overlaps(container_of(p, struct xlock, link), lo, hi))
            return 1;
    return 0;
}

static void xl_try_grant(struct vol *vol, struct xlock *x)
{
    if (x->granted)
        return;
    for (struct list *p = vol->shared.next; p != &vol->shared; p = p->next) {
        struct vio *v = container_of(p, struct vio, slink);
        if (xl_overlaps(x, v->lo, v->hi))
            return;
    }
    x->granted = 1;
    eng_done(vol->e, x->id, 0);
}

static void xl_free(struct xlock *x)
{
    free(x->lo);
    free(x->hi);
    free(x);
}

static int cmp_u64_pair(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

void target_lock(struct engine *e, uint64_t id, uint64_t *ranges, int n)
{
    struct vol *vol = e->vol;
    struct xlock *x = calloc(1, sizeof(*x));
    if (!vol || !x) {
        free(x);
        eng_done(e, id, vol ? ENOMEM : ESHUTDOWN);
        return;
    }
    qsort(ranges, (size_t)n, 2 * sizeof(uint64_t), cmp_u64_pair);
    x->id = id;
    x->lo = malloc(sizeof(uint64_t) * (size_t)(n ? n : 1));
    x->hi = malloc(sizeof(uint64_t) * (size_t)(n ? n : 1));
    if (!x->lo || !x->hi) {
        xl_free(x);
        eng_done(e, id, ENOMEM);
        return;
    }
    for (int i = 0; i < n; i++) {
        if (ranges[2 * i + 1] <= ranges[2 * i])
            continue; /* empty */
        x->lo[x->n] = ranges[2 * i];
        x->hi[x->n] = ranges[2 * i + 1];
        x->n++;
    }
    for (struct list *p = vol->xlocks.next; p != &vol->xlocks; p = p->next) {
        if (xl_overlaps_xl(container_of(p, struct xlock, link), x)) {
            list_add_tail(&vol->xwait, &x->link);
            return;
        }
    }
    list_add_tail(&vol->xlocks, &x->link); /* from here on, overlapping writes wait */
    xl_try_grant(vol, x);
}

void target_unlock(struct engine *e, uint64_t id)
{
    struct vol *vol = e->vol;
    if (!vol)
        return;
    struct list *lists[2] = {&vol->xlocks, &vol->xwait};
    for (int l = 0; l < 2; l++) {
        for (struct list *p = lists[l]->next; p != lists[l]; p = p->next) {
            struct xlock *x = container_of(p, struct xlock, link);
            if (x->id == id) {
                list_del(&x->link);
                xl_free(x);
                locks_changed(vol);
                return;
            }
        }
    }
}

/* An exclusive lock went away: waiting locks and writes may go. */
static void locks_changed(struct vol *vol)
{
    for (struct list *p = vol->xwait.next; p != &vol->xwait;) {
        struct xlock *x = container_of(p, struct xlock, link);
        p = p->next;
        int busy = 0;
        for (struct list *q = vol->xlocks.next; q != &vol->xlocks && !busy; q = q->next)
            busy = xl_overlaps_xl(container_of(q, struct xlock, link), x);
        if (!busy) {
            list_del(&x->link);
            list_add_tail(&vol->xlocks, &x->link);
            xl_try_grant(vol, x);
        }
    }
    for (struct list *p = vol->lock_wait.next; p != &vol->lock_wait;) {
        struct vio *v = container_of(p, struct vio, link);
        p = p->next;
        if (!blocked_by_xlock(vol, v->lo, v->hi)) {
            list_del(&v->link);
            list_add_tail(&vol->shared, &v->slink);
            fan_out(vol, v);
        }
    }
}

static void release_range(struct vol *vol, struct vio *v)
{
    if (list_empty(&v->slink))
        return;
    list_del(&v->slink);
    for (struct list *p = vol->xlocks.next; p != &vol->xlocks; p = p->next) {
        struct xlock *x = container_of(p, struct xlock, link);
        if (!x->granted)
            xl_try_grant(vol, x);
    }
}

/* --- the request path ---------------------------------------------------------------------- */

void vio_submit(struct engine *e, struct vio *v)
{
    struct vol *vol = e->vol;
    v->t0_ns = mono_ns();
    v->status = 0;
    v->msg = NULL;
    v->last = NULL;
    v->tries = 0;
    v->local = 0;
    v->targets = 0;
    list_init(&v->link);
    list_init(&v->slink);
    if (!vol || e->stopping) {
        v->state = VS_DONE;
        v->status = ESHUTDOWN;
        v->msg = fmt(vol ? "the engine stopped" : "the volume is not set up");
        v->dio.done = vio_deferred;
        eng_defer(e, &v->dio, 0);
        return;
    }
    engine_note_depth(e, ++vol->nactive);
    if (vol->limited && v->op != TANDEM_VIO_FLUSH) {
        int k = q_kind(v);
        v->state = VS_QOS;
        list_add_tail(&vol->qwait[k], &v->link);
        if (vol->qwait[k].next == &v->link)
            qos_process(vol, k);
        return;
    }
    vio_start(vol, v);
}

static void vio_start(struct vol *vol, struct vio *v)
{
    if (v->op != TANDEM_VIO_FLUSH &&
        (v->offset > vol->size || v->length > vol->size - v->offset)) {
        vio_fail(vol, v, EINVAL,
                 fmt("range %llu+%u is outside the device (size %llu)",
                     (unsigned long long)v->offset, v->length, (unsigned long long)vol->size));
        return;
    }
    if (v->op == TANDEM_VIO_READ) {
        v->state = VS_RUN;
        if (!v->buf || v->buf->len < v->length) {
            vbuf_put(v->buf);
            v->buf = vol_payload(vol->e, v->length);
            if (!v->buf) {
                vio_fail(vol, v, ENOMEM, fmt("out of memory"));
                return;
            }
        }
        read_next(vol, v);
        return;
    }
    if (count_rw(vol) < vol->quorum) {
        vio_fail(vol, v, EROFS, quorum_message(vol));
        return;
    }
    if (v->length && v->op != TANDEM_VIO_FLUSH) {
        uint64_t end = v->offset + v->length;
        v->lo = v->offset / TBLOCK * TBLOCK;
        v->hi = (end + TBLOCK - 1) / TBLOCK * TBLOCK;
        /* LOCKED: Python's write under its own exclusive lock (COMPARE AND WRITE) */
        if (!(v->flags & TANDEM_VIO_LOCKED) && blocked_by_xlock(vol, v->lo, v->hi)) {
            v->state = VS_LOCK;
            list_add_tail(&vol->lock_wait, &v->link);
            return;
        }
        list_add_tail(&vol->shared, &v->slink);
    }
    fan_out(vol, v);
}

static void mark(struct member *m, uint64_t off, uint64_t len)
{
    if (!m->track || !m->map || !m->region || !len)
        return;
    uint64_t r0 = off / m->region, r1 = (off + len + m->region - 1) / m->region;
    if (r1 < r0 + 1)
        r1 = r0 + 1;
    if (r1 > m->map_count)
        r1 = m->map_count;
    if (r0 < r1)
        memset(m->map + r0, 1, r1 - r0);
}

static void fan_out(struct vol *vol, struct vio *v)
{
    v->state = VS_RUN;
    v->npend = 1; /* a guard while sending */
    v->ntargets = 0;
    v->targets = 0;
    uint64_t now = mono_ns();
    for (int i = 0; i < MAX_MEMBERS; i++) {
        struct member *m = &vol->m[i];
        if (!m->used)
            continue;
        if (m->mode != TANDEM_MODE_ERR && m->mc && !m->mc->dead) {
            v->res[i] = R_PENDING;
            v->rgen[i] = m->gen;
            v->targets |= 1u << i;
            v->ntargets++;
            v->npend++;
            msub_send(vol, v, i, now);
        } else if (v->op != TANDEM_VIO_FLUSH) {
            mark(m, v->offset, v->length); /* it misses this write */
        }
    }
    if (--v->npend == 0)
        fan_done(vol, v);
}

/* --- member requests ----------------------------------------------------------------------- */

static void msub_put(struct msub *s)
{
    if (--s->refs == 0) {
        vbuf_put(s->buf);
        free(s->fmsg);
        free(s);
    }
}

static void msub_release(struct sendbuf *b) { msub_put(container_of(b, struct msub, sb)); }

/* Tags from 1: a replica answers a request it could not parse with tag 0 (then closes). */
static int tag_alloc(struct mconn *mc, struct msub *s)
{
    uint32_t idx;
    if (mc->nfree) {
        idx = mc->freetags[--mc->nfree];
    } else {
        if (mc->ntags == mc->cap) {
            uint32_t cap = mc->cap ? mc->cap * 2 : 64;
            struct msub **t = realloc(mc->tags, cap * sizeof(*t));
            if (!t)
                return -1;
            mc->tags = t;
            uint32_t *f = realloc(mc->freetags, cap * sizeof(*f));
            if (!f)
                return -1;
            mc->freetags = f;
            mc->cap = cap;
            if (!mc->ntags)
                mc->tags[mc->ntags++] = NULL; /* tag 0: never a request's */
        }
        idx = mc->ntags++;
    }
    mc->tags[idx] = s;
    s->tag = idx;
    return 0;
}

static void vio_member_result(struct vol *vol, struct vio *v, int slot, int status, char *msg,
                              uint64_t gen);

static void msub_result(struct msub *s, int status, char *msg)
{
    struct mconn *mc = s->mc;
    struct vio *v = s->v;
    struct conn *c = mc->c;
    struct vol *vol = mc->vol;
    int slot = s->slot;
    uint64_t gen = mc->gen;
    list_del(&s->link);
    if (s->tag < mc->ntags && mc->tags[s->tag] == s) {
        mc->tags[s->tag] = NULL;
        mc->freetags[mc->nfree++] = s->tag;
    }
    s->v = NULL;
    msub_put(s);
    vio_member_result(vol, v, slot, status, msg, gen);
    conn_put(c);
}

static void mc_deadline(struct engine *e, struct timer *t);

static void msub_send(struct vol *vol, struct vio *v, int slot, uint64_t now)
{
    struct member *m = &vol->m[slot];
    struct mconn *mc = m->mc;
    struct msub *s = calloc(1, sizeof(*s));
    if (!s || tag_alloc(mc, s) < 0) {
        free(s);
        /* as if the member failed it */
        vio_member_result(vol, v, slot, R_DOWN, fmt("replica %s: out of memory", m->addr),
                          m->gen);
        return;
    }
    s->v = v;
    s->mc = mc;
    s->slot = slot;
    s->refs = 2;
    s->sent_ns = now;
    list_init(&s->link);
    uint8_t op = 0, flags = 0;
    switch (v->op) {
    case TANDEM_VIO_READ:
        op = OP_READ;
        break;
    case TANDEM_VIO_WRITE:
        op = OP_WRITE;
        flags = (v->flags & TANDEM_VIO_FUA) ? FLAG_FUA : 0;
        break;
    case TANDEM_VIO_FLUSH:
        op = OP_FLUSH;
        break;
    case TANDEM_VIO_UNMAP:
        op = OP_UNMAP;
        break;
    case TANDEM_VIO_WRITE_ZEROES:
        op = OP_WRITE_ZEROES;
        flags = (v->flags & TANDEM_VIO_NO_HOLE) ? FLAG_NO_HOLE : 0;
        break;
    }
    uint32_t magic = REQ_MAGIC, plen = 0, length = v->length;
    uint64_t tag = s->tag, offset = v->offset;
    uint16_t res = 0;
    if (v->op == TANDEM_VIO_FLUSH) {
        offset = 0;
        length = 0;
    }
    struct vbuf *b = v->buf;
    if (b && b->pool && m->shared && (v->op == TANDEM_VIO_READ || v->op == TANDEM_VIO_WRITE)) {
        /* the replica reads or writes the data in place: the payload is where */
        s->shm = 1;
        s->shm_off = (uint64_t)(b->data - b->pool->base);
        s->buf = vbuf_get(b);
        flags |= FLAG_SHM;
        plen = 8;
        vol->st->member_shared++;
    } else if (v->op == TANDEM_VIO_WRITE) {
        plen = v->length;
    }
    memcpy(s->hdr, &magic, 4);
    s->hdr[4] = op;
    s->hdr[5] = flags;
    memcpy(s->hdr + 6, &res, 2);
    memcpy(s->hdr + 8, &tag, 8);
    memcpy(s->hdr + 16, &offset, 8);
    memcpy(s->hdr + 24, &length, 4);
    memcpy(s->hdr + 28, &plen, 4);
    s->sb.iov[0].iov_base = s->hdr;
    s->sb.iov[0].iov_len = REQ_SIZE;
    s->sb.niov = 1;
    if (s->shm) {
        memcpy(s->hdr + REQ_SIZE, &s->shm_off, 8);
        s->sb.iov[0].iov_len = REQ_SIZE + 8;
    } else if (plen) {
        s->buf = vbuf_get(v->buf);
        s->sb.iov[1].iov_base = v->buf->data;
        s->sb.iov[1].iov_len = plen;
        s->sb.niov = 2;
    }
    s->sb.release = msub_release;
    conn_get(mc->c);
    int first = list_empty(&mc->inflight);
    list_add_tail(&mc->inflight, &s->link);
    /* A timer left armed while idle (it is not cancelled per answer) may be due later than
     * this request's deadline: after the deadline was shortened, it would drop a hung
     * member late. One due sooner is fine: it re-arms itself for the oldest request. */
    if (first && (!mc->dl.armed || mc->dl.when > now + mc->deadline_ns))
        timer_arm(vol->e, &mc->dl, mc->deadline_ns);
    vol->st->member_requests++;
    conn_send(mc->c, &s->sb);
}

static void msub_failed(struct engine *e, struct io *io, int res)
{
    (void)e;
    (void)res;
    struct msub *s = container_of(io, struct msub, fio);
    char *msg = s->fmsg;
    s->fmsg = NULL;
    msub_result(s, R_DOWN, msg);
}

/* Close a data connection: its requests in flight fail (from the loop) with `why`. */
static void mconn_kill(struct mconn *mc, const char *why)
{
    if (mc->dead)
        return;
    struct vol *vol = mc->vol;
    mc->dead = 1;
    mc->why = fmt("%s", why);
    timer_cancel(&mc->dl);
    struct conn *c = mc->c;
    conn_get(c);
    conn_abort(c);
    const char *addr = vol->m[mc->slot].addr;
    while (!list_empty(&mc->inflight)) {
        struct msub *s = container_of(mc->inflight.next, struct msub, link);
        list_del(&s->link);
        if (s->shm)
            vbuf_hold(s->buf, mc->peer); /* the replica may still read or write it */
        s->fmsg = fmt("replica %s: %s", addr, why);
        s->fio.done = msub_failed;
        eng_defer(vol->e, &s->fio, 0);
    }
    conn_put(c);
}

/* --- membership ---------------------------------------------------------------------------- */

/* Drop a member (mode ERR, connection closed with `reason` for its requests in flight); `why`
 * is what Python hears. */
static void member_drop2(struct vol *vol, int slot, const char *why, const char *reason)
{
    struct member *m = &vol->m[slot];
    struct mconn *mc = m->mc;
    m->mc = NULL;
    if (m->mode == TANDEM_MODE_ERR) {
        if (mc)
            mconn_kill(mc, reason);
        return;
    }
    int was = m->mode;
    int bump = m->current || was == TANDEM_MODE_RW;
    m->mode = TANDEM_MODE_ERR;
    local_close(m);
    m->current = 0;
    if (was == TANDEM_MODE_RW && m->map) {
        /* it was complete: from now on the map says exactly what it misses */
        memset(m->map, 0, m->map_count);
        __atomic_store_n(&m->track, 1, __ATOMIC_RELEASE);
    }
    uint64_t seq = 0;
    if (bump) {
        seq = ++vol->drop_seq;
        vol->st->drop_seq = seq;
    }
    vol->st->drops++;
    /* What it misses is in its map from the drop on, not once each write's other members
     * answer (a slow one can take its whole deadline): Python reads the map as soon as the
     * member rejoins. Every write in flight it has not done (pending, failed or refused). */
    for (struct list *p = vol->shared.next; p != &vol->shared; p = p->next) {
        struct vio *v = container_of(p, struct vio, slink);
        if ((v->targets & (1u << slot)) && v->res[slot] != 0)
            mark(m, v->offset, v->length);
    }
    uint64_t gen = m->gen;
    if (mc)
        mconn_kill(mc, reason);
    update_deadlines(vol);
    struct tandem_event ev = {.type = TANDEM_EV_MEMBER_DOWN,
                              .id = (uint64_t)slot,
                              .tag = seq,
                              .op = (uint8_t)was,
                              .conn = gen};
    size_t n = strlen(why);
    ev.data = malloc(n ? n : 1);
    if (ev.data) {
        memcpy(ev.data, why, n);
        ev.data_len = (uint32_t)n;
    }
    eng_event(vol->e, &ev);
}

static void member_drop(struct vol *vol, int slot, const char *why)
{
    /* why is "replica ADDR: reason": the connection's requests fail with the same */
    const char *reason = why;
    const char *addr = vol->m[slot].addr;
    size_t n = strlen(addr);
    if (!strncmp(why, "replica ", 8) && !strncmp(why + 8, addr, n) && !strncmp(why + 8 + n, ": ", 2))
        reason = why + 10 + n;
    member_drop2(vol, slot, why, reason);
}

static void mc_set_deadline(struct mconn *mc, double seconds)
{
    uint64_t ns = (uint64_t)(seconds * 1e9);
    if (ns == mc->deadline_ns)
        return;
    mc->deadline_ns = ns;
    mc->deadline_s = seconds;
    if (mc->dead || list_empty(&mc->inflight))
        return;
    struct msub *s = container_of(mc->inflight.next, struct msub, link);
    uint64_t now = mono_ns(), due = s->sent_ns + ns;
    timer_arm(mc->vol->e, &mc->dl, due > now ? due - now : 0);
}

/* The bare quorum gets the long deadline: losing one of them fails the volume. */
static void update_deadlines(struct vol *vol)
{
    int last = count_rw(vol) <= vol->quorum;
    for (int i = 0; i < MAX_MEMBERS; i++) {
        struct member *m = &vol->m[i];
        if (m->used && m->mc && !m->mc->dead)
            mc_set_deadline(m->mc, last && m->mode == TANDEM_MODE_RW ? vol->timeout_last
                                                                     : vol->timeout);
    }
}

static void mc_deadline(struct engine *e, struct timer *t)
{
    struct mconn *mc = container_of(t, struct mconn, dl);
    if (mc->dead || list_empty(&mc->inflight))
        return;
    struct msub *s = container_of(mc->inflight.next, struct msub, link);
    uint64_t now = mono_ns(), due = s->sent_ns + mc->deadline_ns;
    if (now < due) {
        timer_arm(e, t, due - now);
        return;
    }
    struct vol *vol = mc->vol;
    struct member *m = &vol->m[mc->slot];
    char reason[128];
    snprintf(reason, sizeof(reason), "request missed its %gs deadline", mc->deadline_s);
    if (m->mc == mc) {
        char *why = fmt("replica %s: %s", m->addr, reason);
        member_drop2(vol, mc->slot, why ? why : reason, reason);
        free(why);
    } else {
        mconn_kill(mc, reason);
    }
}

/* --- results ------------------------------------------------------------------------------- */

static void mutation_finish(struct vol *vol, struct vio *v)
{
    if (!v->status && count_rw(vol) < vol->quorum) {
        vio_fail(vol, v, EROFS, quorum_message(vol));
        return;
    }
    vio_finish(vol, v);
}

static void mutation_done(struct vol *vol, struct vio *v)
{
    /* No write is acknowledged until the survivors of a drop carry a new generation. */
    if (unstable(vol) && !vol->e->stopping) {
        v->state = VS_STABLE;
        list_add_tail(&vol->stable_wait, &v->link);
        return;
    }
    mutation_finish(vol, v);
}

static int is_error(int r) { return r != 0 && r != R_PENDING; }

static void fan_done(struct vol *vol, struct vio *v)
{
    int ok = 0, nerr = 0, refused = 0, nospc = 1;
    const char *first = NULL, *first_refusal = NULL;
    for (int i = 0; i < MAX_MEMBERS; i++) {
        if (!(v->targets & (1u << i)))
            continue;
        if (v->res[i] == EINVAL) {
            refused++;
            if (!first_refusal)
                first_refusal = v->rmsg[i] ? v->rmsg[i] : "refused";
        }
    }
    if (refused && refused == v->ntargets) {
        /* every member refused the request itself: a bad request, not failing members */
        v->status = EINVAL;
        v->msg = fmt("%s", first_refusal);
        release_range(vol, v);
        mutation_done(vol, v);
        return;
    }
    for (int i = 0; i < MAX_MEMBERS; i++) {
        if (!(v->targets & (1u << i)))
            continue;
        struct member *m = &vol->m[i];
        if (is_error(v->res[i])) {
            nerr++;
            if (v->res[i] != ENOSPC)
                nospc = 0;
            const char *msg = v->rmsg[i] ? v->rmsg[i] : "replica failed";
            if (!first)
                first = msg;
            if (m->mc && m->gen == v->rgen[i] && m->mode != TANDEM_MODE_ERR)
                member_drop(vol, i, msg); /* failed, or refused what its peers accepted */
            if (v->op != TANDEM_VIO_FLUSH)
                mark(m, v->offset, v->length);
        } else if (m->used && m->mode == TANDEM_MODE_RW) {
            ok++;
        }
    }
    if (ok < vol->quorum) {
        if (nerr && nospc) {
            v->status = ENOSPC;
            v->msg = fmt("no space left on replicas: %s", first);
        } else {
            v->status = EIO;
            v->msg = fmt("write reached %d of %d replicas, quorum is %d%s%s", ok,
                         vol->replica_count, vol->quorum, first ? ": " : "", first ? first : "");
        }
    }
    release_range(vol, v);
    mutation_done(vol, v);
}

/* --- local reads ----------------------------------------------------------------------------
 * A replica on this host offers, in SHARE's answer, its head file and a page of two words:
 * a generation, bumped when its head file changes, and "readable", 1 while that file alone
 * holds the volume (one layer, not paused, no fault armed). While both say so, a read picked
 * for the member is a pread of the file here: the replica's hop (two wakeups and a copy
 * through the pool) is skipped. It sees every acknowledged write: the replica wrote it to
 * the page cache (or punched the hole) before answering. A failed or short read, or one
 * not done within the member's deadline, asks the replica (or another) instead. Only small
 * reads: a large one is mostly its copy, and the replica's thread doing it beside ours (two
 * cores) is faster (1 MiB reads 0.7-0.9x as fast done here). */
#define LOCAL_MAX (64u << 10)

/* The file and page, kept open while a read of them is in flight (the fd number must not be
 * reused by another member's file before the kernel has taken it). */
struct lfile {
    int refs, fd;
    const uint32_t *w; /* [0] generation, [1] readable */
    uint32_t gen;
};

/* One local read: its own io and reference to the buffer, so a read given up at its
 * deadline may still complete into memory nobody else uses. The engine's stop does not wait
 * for a read given up (nabandoned): on a stuck disk it may never end. One still in flight
 * at stop is given up at its deadline. If it never ends, its buffer (and the pool around it)
 * stays allocated: it holds a reference. The thread's exit does not wait for it where the
 * read waits on the page with no thread behind it (async buffered reads: ext4, xfs,
 * btrfs); where io_uring hands it to an io-wq worker instead (filesystems without them),
 * the thread's exit still waits in the kernel for that worker. */
struct lread {
    struct io io;
    struct timer dl;
    struct vio *v; /* NULL once given up */
    struct vol *vol;
    int slot;
    struct lfile *lf;
    struct vbuf *buf;
};

static void lfile_put(struct lfile *lf)
{
    if (!lf || --lf->refs)
        return;
    munmap((void *)lf->w, 4096);
    close(lf->fd);
    free(lf);
}

static void local_close(struct member *m)
{
    lfile_put(m->lf);
    m->lf = NULL;
}

static int proc_fd(uint32_t pid, uint32_t num)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%u/fd/%u", pid, num);
    /* non-blocking: the number may name a FIFO by now (checked after); then blocking again,
     * as io_uring returns EAGAIN instead of reading a file opened O_NONBLOCK */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0 && fcntl(fd, F_SETFL, 0) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* As the replica checks our pool (replica_server.c share): the page must be a memfd of our
 * user sealed against shrinking, so mapping it cannot SIGBUS; the file a regular file
 * holding the whole volume. Otherwise no local reads, silently: the socket path works. */
static void local_open(struct vol *vol, struct member *m, const uint32_t *li)
{
    local_close(m);
    if (!li || !li[0] || li[1] == TANDEM_NO_OFFER)
        return;
    int fd = proc_fd(li[0], li[1]), pfd = proc_fd(li[0], li[2]);
    char path[64], link[64] = "";
    snprintf(path, sizeof(path), "/proc/self/fd/%d", pfd);
    ssize_t ln = pfd >= 0 ? readlink(path, link, sizeof(link) - 1) : -1;
    struct stat fs, ps;
    int seals = pfd >= 0 ? fcntl(pfd, F_GET_SEALS) : -1;
    void *w = MAP_FAILED;
    struct lfile *lf = NULL;
    if (fd >= 0 && ln > 7 && !strncmp(link, "/memfd:", 7) && fstat(fd, &fs) == 0 &&
        S_ISREG(fs.st_mode) && (uint64_t)fs.st_size >= vol->size && fstat(pfd, &ps) == 0 &&
        ps.st_uid == geteuid() && ps.st_size >= 4096 && seals >= 0 && (seals & F_SEAL_SHRINK) &&
        (lf = calloc(1, sizeof(*lf))) &&
        (w = mmap(NULL, 4096, PROT_READ, MAP_SHARED, pfd, 0)) != MAP_FAILED) {
        lf->refs = 1;
        lf->fd = fd;
        lf->w = w;
        lf->gen = li[3];
        m->lf = lf;
        fd = -1;
        lf = NULL;
    }
    free(lf);
    if (fd >= 0)
        close(fd);
    if (pfd >= 0)
        close(pfd);
}

static int local_ok(const struct member *m)
{
    const struct lfile *lf = m->lf;
    return lf && __atomic_load_n(&lf->w[1], __ATOMIC_ACQUIRE) == 1 &&
           __atomic_load_n(&lf->w[0], __ATOMIC_ACQUIRE) == lf->gen;
}

/* Ask the replica after all. After a deadline the late pread still holds the buffer, so
 * read_next takes a fresh one (it does whenever the buffer has another reference). */
static void local_fallback(struct vol *vol, struct vio *v, const char *why)
{
    free(v->last);
    v->last = fmt("%s", why);
    v->tries--; /* not the member's failure */
    read_next(vol, v);
}

static void local_done(struct engine *e, struct io *io, int res)
{
    struct lread *lr = container_of(io, struct lread, io);
    struct vio *v = lr->v;
    struct vol *vol = lr->vol;
    timer_cancel(&lr->dl);
    lfile_put(lr->lf);
    vbuf_put(lr->buf);
    free(lr);
    if (!v) {
        e->nabandoned--;
        return; /* given up at its deadline */
    }
    if (res == (int)v->length) {
        vol->st->local_reads++;
        vio_finish(vol, v);
    } else {
        char why[96];
        snprintf(why, sizeof(why), "local read %s", res < 0 ? strerror(-res) : "short");
        local_fallback(vol, v, why);
    }
}

static void local_deadline(struct engine *e, struct timer *t)
{
    struct lread *lr = container_of(t, struct lread, dl);
    struct vio *v = lr->v;
    struct member *m = &lr->vol->m[lr->slot];
    lr->v = NULL;
    e->nabandoned++;
    if (m->lf == lr->lf)
        local_close(m); /* its disk is slow or stuck: the member's reads go to it, with its
                         * deadline, until it is attached again */
    local_fallback(lr->vol, v, "local read timed out");
}

static int local_read(struct vol *vol, struct vio *v, int slot)
{
    struct member *m = &vol->m[slot];
    struct lread *lr = malloc(sizeof(*lr));
    if (!lr)
        return -1;
    lr->io.done = local_done;
    list_init(&lr->dl.link);
    lr->dl.armed = 0;
    lr->dl.fn = local_deadline;
    lr->v = v;
    lr->vol = vol;
    lr->slot = slot;
    lr->lf = m->lf;
    lr->lf->refs++;
    lr->buf = v->buf;
    lr->buf->refs++;
    v->local = 1;
    timer_arm(vol->e, &lr->dl, (uint64_t)(vol->timeout * 1e9));
    io_uring_prep_read(eng_sqe(vol->e, &lr->io, 1), lr->lf->fd, lr->buf->data, v->length,
                       v->offset);
    return 0;
}

static void read_next(struct vol *vol, struct vio *v)
{
    int n = 0;
    for (int i = 0; i < MAX_MEMBERS; i++)
        n += vol->m[i].used;
    while (v->tries < n) {
        int pick = -1, local = 0; /* a member whose file is read here, first */
        for (int i = 0; i < MAX_MEMBERS && !v->local && v->length <= LOCAL_MAX; i++) {
            struct member *m = &vol->m[i];
            if (m->used && m->mode == TANDEM_MODE_RW && m->mc && !m->mc->dead && local_ok(m)) {
                pick = i;
                local = 1;
                break;
            }
        }
        for (int k = 1; k <= MAX_MEMBERS && pick < 0; k++) {
            int i = (int)((vol->rr + (unsigned)k) % MAX_MEMBERS);
            struct member *m = &vol->m[i];
            if (m->used && m->mode == TANDEM_MODE_RW && m->mc && !m->mc->dead) {
                pick = i;
                break;
            }
        }
        if (pick < 0)
            break;
        v->tries++;
        if (v->buf->refs > 1 || v->buf->poisoned) {
            /* a dropped connection (or replica) may still be receiving into it: use another */
            vbuf_put(v->buf);
            v->buf = vol_payload(vol->e, v->length);
            if (!v->buf) {
                vio_fail(vol, v, ENOMEM, fmt("out of memory"));
                return;
            }
        }
        if (local && local_read(vol, v, pick) == 0)
            return;
        vol->rr = (unsigned)pick;
        v->targets = 1u << pick;
        v->ntargets = 1;
        v->npend = 1;
        v->res[pick] = R_PENDING;
        msub_send(vol, v, pick, mono_ns());
        return;
    }
    char *msg = fmt("no replica could serve the read%s%s", v->last ? ": " : "",
                    v->last ? v->last : "");
    vio_fail(vol, v, EIO, msg);
}

static void vio_member_result(struct vol *vol, struct vio *v, int slot, int status, char *msg,
                              uint64_t gen)
{
    struct member *m = &vol->m[slot];
    if (v->op == TANDEM_VIO_READ) {
        v->npend = 0;
        if (status == 0) {
            free(msg);
            vio_finish(vol, v);
        } else if (status == EINVAL) {
            vio_fail(vol, v, EINVAL, msg); /* the request is bad, not the member */
        } else {
            free(v->last);
            v->last = msg;
            if (m->mc && m->gen == gen && m->mode != TANDEM_MODE_ERR)
                member_drop(vol, slot, msg ? msg : "read failed");
            read_next(vol, v);
        }
        return;
    }
    v->res[slot] = status;
    free(v->rmsg[slot]);
    v->rmsg[slot] = msg;
    v->rgen[slot] = gen;
    /* A failing member is dropped at once (refusals wait: all refusing is a bad request);
     * the drop marks what it missed, this write included (member_drop2). */
    if (status != 0 && status != EINVAL && m->mc && m->gen == gen &&
        m->mode != TANDEM_MODE_ERR)
        member_drop(vol, slot, msg ? msg : "write failed");
    if (--v->npend == 0)
        fan_done(vol, v);
}

/* --- data connections to members: responses ------------------------------------------------ */

static void mc_fail(struct mconn *mc, const char *why)
{
    struct vol *vol = mc->vol;
    struct member *m = &vol->m[mc->slot];
    if (mc->dead)
        return;
    if (m->mc == mc) {
        char *full = fmt("replica %s: %s", m->addr, why);
        member_drop2(vol, mc->slot, full ? full : why, why);
        free(full);
    } else {
        mconn_kill(mc, why);
    }
}

static struct msub *mc_lookup(struct mconn *mc, uint64_t tag)
{
    return tag < mc->ntags ? mc->tags[tag] : NULL;
}

/* A response with its payload (an error message, or nothing of interest). */
static void mc_answer(struct mconn *mc, uint64_t tag, uint32_t status, const uint8_t *p,
                      uint32_t len)
{
    struct msub *s = mc_lookup(mc, tag);
    if (!s)
        return; /* not ours (nothing else is sent on this connection) */
    struct member *m = &mc->vol->m[mc->slot];
    char *msg = NULL;
    if (status) {
        if (len > MAX_MSG)
            len = MAX_MSG;
        msg = fmt("replica %s: %.*s", m->addr, (int)len, (const char *)p);
    } else if (s->v->op == TANDEM_VIO_READ) {
        status = EIO; /* a read answered with the wrong length */
        msg = fmt("replica %s: read returned %u bytes, not %u", m->addr, len, s->v->length);
    }
    msub_result(s, (int)status, msg);
}

static void mc_pump(struct mconn *mc)
{
    struct conn *c = mc->c;
    while (!mc->dead && c->state == CONN_OPEN && !c->dbuf) {
        size_t avail = c->rend - c->rpos;
        if (avail < RESP_SIZE)
            break;
        const uint8_t *h = c->rbuf + c->rpos;
        uint32_t magic, status, plen;
        uint64_t tag;
        memcpy(&magic, h, 4);
        memcpy(&status, h + 4, 4);
        memcpy(&tag, h + 8, 8);
        memcpy(&plen, h + 16, 4);
        if (magic != RESP_MAGIC) {
            char why[64];
            snprintf(why, sizeof(why), "protocol error: bad response magic 0x%x", magic);
            mc_fail(mc, why);
            break;
        }
        if (plen > MAX_PAYLOAD) {
            mc_fail(mc, "protocol error: response payload exceeds the limit");
            break;
        }
        if (tag == 0) { /* the replica could not parse what it was sent: it closes */
            char why[96];
            snprintf(why, sizeof(why), "protocol error answered by the replica (status %u)",
                     status);
            mc_fail(mc, why);
            break;
        }
        struct msub *s = mc_lookup(mc, tag);
        if (s && s->shm && status == 0 && plen == 0) { /* read or written in place */
            c->rpos += RESP_SIZE;
            msub_result(s, 0, NULL);
            continue;
        }
        if (s && status == 0 && s->v->op == TANDEM_VIO_READ && plen == s->v->length) {
            c->rpos += RESP_SIZE;
            struct vbuf *b = s->v->buf;
            if (conn_recv_direct(c, b->data, plen)) {
                msub_result(s, 0, NULL);
            } else {
                mc->rx = s;
                mc->rxbuf = vbuf_get(b); /* kept until the receive is over, whatever happens */
            }
            continue;
        }
        if (avail - RESP_SIZE >= plen) {
            c->rpos += RESP_SIZE + plen;
            mc_answer(mc, tag, status, h + RESP_SIZE, plen);
            continue;
        }
        if ((size_t)RESP_SIZE + plen <= c->rcap)
            break; /* the rest is on its way */
        c->rpos += RESP_SIZE;
        mc->rxmsg = malloc(plen);
        if (!mc->rxmsg) {
            mc_fail(mc, "out of memory");
            break;
        }
        mc->rxtag = tag;
        mc->rxstatus = status;
        mc->rxlen = plen;
        if (conn_recv_direct(c, mc->rxmsg, plen)) {
            uint8_t *m = mc->rxmsg;
            mc->rxmsg = NULL;
            mc_answer(mc, tag, status, m, plen);
            free(m);
        }
    }
}

static void mc_on_data(struct conn *c)
{
    struct mconn *mc = c->proto;
    conn_get(c);
    mc_pump(mc);
    conn_put(c);
}

static void mc_on_direct(struct conn *c)
{
    struct mconn *mc = c->proto;
    conn_get(c);
    if (mc->rx) {
        struct msub *s = mc->rx;
        mc->rx = NULL;
        vbuf_put(mc->rxbuf);
        mc->rxbuf = NULL;
        if (!mc->dead)
            msub_result(s, 0, NULL);
    } else if (mc->rxmsg) {
        uint8_t *m = mc->rxmsg;
        mc->rxmsg = NULL;
        if (!mc->dead)
            mc_answer(mc, mc->rxtag, mc->rxstatus, m, mc->rxlen);
        free(m);
    }
    mc_pump(mc);
    conn_put(c);
}

static void mc_on_eof(struct conn *c, int err)
{
    struct mconn *mc = c->proto;
    conn_get(c);
    if (err) {
        char why[160];
        snprintf(why, sizeof(why), "connection lost: %s", strerror(err));
        mc_fail(mc, why);
    } else {
        mc_fail(mc, "connection lost");
    }
    conn_put(c);
}

static void mc_on_sent(struct conn *c) { (void)c; }

static void mc_on_destroy(struct conn *c)
{
    struct mconn *mc = c->proto;
    timer_cancel(&mc->dl);
    vbuf_put(mc->rxbuf);
    free(mc->rxmsg);
    free(mc->tags);
    free(mc->freetags);
    free(mc->why);
    peer_put(mc->peer);
    free(mc);
}

static const struct conn_ops member_conn_ops = {
    .on_data = mc_on_data,
    .on_direct = mc_on_direct,
    .on_eof = mc_on_eof,
    .on_sent = mc_on_sent,
    .on_destroy = mc_on_destroy,
};

/* --- commands ------------------------------------------------------------------------------ */

static struct vol *vol_get(struct engine *e, int slot)
{
    if (!e->vol || slot < 0 || slot >= MAX_MEMBERS)
        return NULL;
    return e->vol;
}

/* Map the volume's shared memory (once); without it everything goes through sockets. */
static void pool_map(struct vol *vol, int fd, uint64_t size)
{
    uint64_t n = size / SHM_SLOT;
    if (vol->pool || fd < 0 || n == 0)
        return;
    if (n > SHM_MAX_SLOTS)
        n = SHM_MAX_SLOTS;
    struct pool *p = calloc(1, sizeof(*p));
    if (!p)
        return;
    p->base = mmap(NULL, n * SHM_SLOT, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p->base == MAP_FAILED) {
        free(p);
        return;
    }
    p->refs = 1;
    p->nslots = (uint32_t)n;
    p->leaked = &vol->st->shm_leaked;
    list_init(&p->peers);
    list_init(&p->held);
    vol->pool = p;
}

int target_setup(struct engine *e, uint64_t size, int replica_count, int quorum,
                 double timeout, double timeout_last, const char *name, int shm_fd,
                 uint64_t shm_size)
{
    struct vol *vol = e->vol;
    if (!vol) {
        vol = calloc(1, sizeof(*vol));
        if (!vol)
            return -ENOMEM;
        vol->e = e;
        vol->st = &e->tstats;
        list_init(&vol->stable_wait);
        list_init(&vol->lock_wait);
        list_init(&vol->shared);
        list_init(&vol->xlocks);
        list_init(&vol->xwait);
        for (int k = 0; k < 2; k++) {
            list_init(&vol->qwait[k]);
            list_init(&vol->qtimer[k].link);
        }
        vol->qtimer[0].fn = qtimer_read;
        vol->qtimer[1].fn = qtimer_write;
        e->vol = vol;
    }
    vol->size = size;
    vol->replica_count = replica_count;
    vol->quorum = quorum;
    vol->timeout = timeout;
    vol->timeout_last = timeout_last;
    snprintf(vol->name, sizeof(vol->name), "%s", name ? name : "");
    pool_map(vol, shm_fd, shm_size);
    if (shm_fd >= 0)
        close(shm_fd); /* the engine's own copy (tandem_vol_setup dup()ed it) */
    update_deadlines(vol);
    return 0;
}

void target_attach(struct engine *e, int slot, int fd, int mode, int current, int shared,
                   const uint32_t *local, const char *address, uint64_t id)
{
    struct vol *vol = vol_get(e, slot);
    struct mconn *mc = vol && !e->stopping ? calloc(1, sizeof(*mc)) : NULL;
    struct conn *c = mc ? conn_new(e, 0, fd, &member_conn_ops, mc, MCONN_RBUF) : NULL;
    if (!c) {
        free(mc);
        close(fd);
        eng_done(e, id, vol ? ENOMEM : ESHUTDOWN);
        return;
    }
    c->kind = TANDEM_CONN_MEMBER;
    struct member *m = &vol->m[slot];
    if (m->mc) {
        struct mconn *old = m->mc;
        m->mc = NULL;
        mconn_kill(old, "connection replaced");
    }
    m->used = 1;
    m->shared = shared && vol->pool;
    local_open(vol, m, m->shared ? local : NULL);
    mc->peer = m->shared ? peer_find(e, vol->pool, local ? local[0] : 0) : NULL;
    snprintf(m->addr, sizeof(m->addr), "%s", address ? address : "?");
    m->gen++;
    mc->c = c;
    mc->vol = vol;
    mc->slot = slot;
    mc->gen = m->gen;
    list_init(&mc->inflight);
    list_init(&mc->dl.link);
    mc->dl.fn = mc_deadline;
    mc->deadline_ns = (uint64_t)(vol->timeout * 1e9);
    mc->deadline_s = vol->timeout;
    c->id = ((uint64_t)1 << 63) | ((uint64_t)slot << 32) | (m->gen & 0xffffffffu);
    m->mc = mc;
    m->mode = mode == TANDEM_MODE_RW ? TANDEM_MODE_RW : TANDEM_MODE_WO;
    m->current = current || m->mode == TANDEM_MODE_RW;
    update_deadlines(vol);
    conn_arm_recv(c);
    eng_done(e, id, 0);
}

void target_mode(struct engine *e, int slot, int mode, int current, const char *why,
                 uint64_t id)
{
    struct vol *vol = vol_get(e, slot);
    if (!vol) {
        eng_done(e, id, e->vol ? EINVAL : ESHUTDOWN);
        return;
    }
    struct member *m = &vol->m[slot];
    int status = 0;
    if (mode == TANDEM_MODE_ERR) {
        member_drop2(vol, slot, why ? why : "dropped", "closed");
    } else if (m->mode == TANDEM_MODE_ERR || !m->mc) {
        status = ENOTCONN; /* dropped meanwhile: Python hears of it (MEMBER_DOWN) */
    } else {
        m->mode = mode == TANDEM_MODE_RW ? TANDEM_MODE_RW : TANDEM_MODE_WO;
        m->current = current || m->mode == TANDEM_MODE_RW;
        update_deadlines(vol);
    }
    eng_done(e, id, status);
}

void target_map(struct engine *e, int slot, uint8_t *map, uint64_t count, uint64_t region,
                int track, uint64_t id)
{
    struct vol *vol = vol_get(e, slot);
    if (!vol) {
        eng_done(e, id, e->vol ? EINVAL : ESHUTDOWN);
        return;
    }
    struct member *m = &vol->m[slot];
    if (!map) { /* forget the slot */
        if (m->mc) {
            struct mconn *mc = m->mc;
            m->mc = NULL;
            mconn_kill(mc, "closed");
        }
        local_close(m);
        memset(m, 0, sizeof(*m));
        update_deadlines(vol);
        eng_done(e, id, 0);
        return;
    }
    if (map != m->map) {
        int keep = m->track && m->map && m->region == region;
        if (keep)
            memcpy(map, m->map, count < m->map_count ? count : m->map_count);
        m->map = map;
        m->map_count = count;
        m->region = region;
        __atomic_store_n(&m->track, keep, __ATOMIC_RELEASE);
        m->used = 1;
    }
    if (!track)
        __atomic_store_n(&m->track, 0, __ATOMIC_RELEASE);
    eng_done(e, id, 0);
}

int target_tracking(struct engine *e, int slot)
{
    struct vol *vol = vol_get(e, slot);
    return vol ? __atomic_load_n(&vol->m[slot].track, __ATOMIC_ACQUIRE) : 0;
}

void target_stable(struct engine *e, uint64_t seq)
{
    struct vol *vol = e->vol;
    if (!vol)
        return;
    if (seq > vol->stable_seq) {
        vol->stable_seq = seq;
        vol->st->stable_seq = seq;
    }
    if (unstable(vol))
        return;
    while (!list_empty(&vol->stable_wait)) {
        struct vio *v = container_of(vol->stable_wait.next, struct vio, link);
        list_del(&v->link);
        mutation_finish(vol, v);
    }
}

/* --- requests on Python's behalf ----------------------------------------------------------- */

struct pyio {
    struct vio v;
    struct engine *e;
    uint64_t id;
};

static void pyio_done(struct vio *v)
{
    struct pyio *p = container_of(v, struct pyio, v);
    struct tandem_event ev = {.type = TANDEM_EV_IO_DONE, .id = p->id, .status = v->status};
    if (v->status) {
        if (v->msg) {
            ev.data = v->msg;
            ev.data_len = (uint32_t)strlen(v->msg);
            v->msg = NULL;
        }
    } else if (v->op == TANDEM_VIO_READ && v->length) {
        ev.data = malloc(v->length);
        if (ev.data) {
            memcpy(ev.data, v->buf->data, v->length);
            ev.data_len = v->length;
        } else {
            ev.status = ENOMEM;
        }
    }
    eng_event(p->e, &ev);
    vio_release(v);
    free(p);
}

void target_submit(struct engine *e, uint64_t id, int frontend, int op, int flags,
                   uint64_t offset, uint32_t length, const void *data)
{
    struct pyio *p = calloc(1, sizeof(*p));
    if (!p || op < TANDEM_VIO_READ || op > TANDEM_VIO_WRITE_ZEROES) {
        free(p);
        struct tandem_event ev = {.type = TANDEM_EV_IO_DONE, .id = id,
                                  .status = p ? EINVAL : ENOMEM};
        eng_event(e, &ev);
        return;
    }
    p->e = e;
    p->id = id;
    struct vio *v = &p->v;
    v->op = op;
    v->flags = flags;
    v->frontend = frontend;
    v->offset = offset;
    v->length = length;
    v->done = pyio_done;
    if (op == TANDEM_VIO_WRITE) {
        v->buf = vbuf_external((void *)data, length);
        if (!v->buf) {
            free(p);
            struct tandem_event ev = {.type = TANDEM_EV_IO_DONE, .id = id, .status = ENOMEM};
            eng_event(e, &ev);
            return;
        }
    }
    e->tstats.requests++;
    if (e->stopping) {
        v->t0_ns = mono_ns();
        v->status = ESHUTDOWN;
        v->msg = fmt("the engine stopped");
        pyio_done(v);
        return;
    }
    vio_submit(e, v);
}

/* --- stopping ------------------------------------------------------------------------------ */

static void fail_list(struct vol *vol, struct list *l)
{
    while (!list_empty(l)) {
        struct vio *v = container_of(l->next, struct vio, link);
        list_del(&v->link);
        release_range(vol, v);
        vio_fail(vol, v, ESHUTDOWN, fmt("the engine stopped"));
    }
}

void target_stop(struct engine *e)
{
    struct vol *vol = e->vol;
    if (!vol)
        return;
    for (int k = 0; k < 2; k++) {
        timer_cancel(&vol->qtimer[k]);
        fail_list(vol, &vol->qwait[k]);
    }
    fail_list(vol, &vol->lock_wait);
    fail_list(vol, &vol->stable_wait);
    struct list *lists[2] = {&vol->xlocks, &vol->xwait};
    for (int l = 0; l < 2; l++) {
        while (!list_empty(lists[l])) {
            struct xlock *x = container_of(lists[l]->next, struct xlock, link);
            list_del(&x->link);
            xl_free(x);
        }
    }
    for (int i = 0; i < MAX_MEMBERS; i++) {
        struct member *m = &vol->m[i];
        if (m->mc) {
            struct mconn *mc = m->mc;
            m->mc = NULL;
            mconn_kill(mc, "closed");
        }
        local_close(m);
        m->map = NULL;
        m->track = 0;
    }
    if (vol->pool)
        peers_unwatch(e, vol->pool);
}

void target_free(struct engine *e)
{
    if (e->vol && e->vol->pool) {
        e->vol->pool->leaked = NULL;
        pool_put(e->vol->pool);
    }
    free(e->vol);
    e->vol = NULL;
}
