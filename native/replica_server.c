/* The replica side of the engine: serves the replica data protocol (replica/protocol.py) on
 * connections Python accepted, over the same layer files and block maps as the Python
 * ReplicaStore (replica/store.py), whose rules it follows exactly:
 *
 * - READ resolves each 4 KiB block through the maps: head[b] -> the head file, else
 *   base[b]-1 -> that snapshot layer, else zeros (no I/O). CHECKSUM is a READ + CRC32C.
 * - WRITE goes to the head in whole blocks: edge blocks of an unaligned write are read
 *   through the chain and patched (read-modify-write), then one writev; head[b] = 1.
 * - UNMAP / WRITE_ZEROES: partial edge blocks are written as zeros (unless punching and no
 *   layer holds them); whole blocks a snapshot holds are written as zeros, whole blocks only
 *   the head holds are punched (IORING_OP_FALLOCATE) or, with NO_HOLE, written as zeros.
 * - FLUSH / FUA: IORING_OP_FSYNC (datasync) of the head, then the lazy write-intent clear.
 * - Write intent (replica/intent.py): before the first write to an unmarked region the region
 *   is marked and intent.bin rewritten + fdatasync'ed; the write waits for that. Writes of
 *   intent.bin are serialised (one in flight) so an older image never lands after a newer.
 * - Ordering: requests that touch data are kept in arrival order per store; one waits for
 *   every earlier one it conflicts with (overlapping block ranges, at least one a mutation;
 *   a FLUSH waits for every earlier mutation; nothing waits for a FLUSH).
 * - Every other op (INFO OPEN SET_GENERATION CLOSE SNAPSHOT ATTRS SET_ATTRS RESIZE, and op
 *   codes the engine does not know) goes up to Python once the connection's earlier
 *   requests completed; the connection reads nothing else until Python's reply
 *   (tandem_conn_reply), which may set the connection's epoch.
 * - Fault injection (replica/faults.py), checked on each data request before anything else:
 *   delay / hang hold the request and everything behind it on its connection, fail answers
 *   with the errno, drop closes the connection, crash exits like SIGKILL (137).
 *
 * File I/O goes through io_uring (page-cache hits complete inline at submission). The only
 * blocking syscalls on the loop are rare: lseek(SEEK_DATA/SEEK_HOLE) to re-learn the head
 * map after a failed write, and the eventfd writes that wake Python. */
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 4096u
#define REQ_MAGIC 0x51444E54u
#define RESP_MAGIC 0x52444E54u
#define MAX_PAYLOAD (32u << 20)
#define REQ_SIZE 32
#define RESP_SIZE 24
#define RBUF_SIZE (256u << 10)
#define CONN_MAX_INFLIGHT 1024
#define CONN_MAX_QUEUED (64u << 20)
#define ZERO_CHUNK (1u << 20)
#define CLEAR_AFTER 5.0
#define HANG_POLL_NS (100ull * 1000000ull)
#define MAX_MSG 4096
#define FLAG_FUA 1u
#define FLAG_NO_HOLE 2u
#define FLAG_SHM 4u
#define SHM_MAX (1u << 30)
#define CRASH_EXIT 137

enum {
    OP_READ = 1,
    OP_WRITE = 2,
    OP_FLUSH = 3,
    OP_UNMAP = 4,
    OP_WRITE_ZEROES = 5,
    OP_PING = 6,
    OP_INFO = 7,
    OP_OPEN = 8,
    OP_SET_GENERATION = 9,
    OP_CLOSE = 10,
    OP_BLOCK_STATUS = 11,
    OP_SNAPSHOT = 12,
    OP_CHECKSUM = 13,
    OP_ATTRS = 14,
    OP_SET_ATTRS = 15,
    OP_READV = 18,
    OP_SHARE = 19,
};

/* READV: the payload is entries of (offset u64, length u32, reserved u32); see protocol.py */
#define READV_ENTRY 16u
#define READV_MAX_RANGES 1024u

static const char *const fault_names[] = {"read",         "write",    "flush", "unmap",
                                          "write_zeroes", "checksum", "*"};

struct reqhdr {
    uint32_t magic;
    uint8_t op;
    uint8_t flags;
    uint16_t reserved;
    uint64_t tag;
    uint64_t offset;
    uint32_t length;
    uint32_t plen;
} __attribute__((packed));

_Static_assert(sizeof(struct reqhdr) == REQ_SIZE, "request header is 32 bytes");

struct fault {
    int action;
    double arg;
    int64_t remaining; /* < 0: until cleared */
};

struct frame {
    struct reqhdr h;
    uint8_t *payload; /* malloc'ed (or NULL when empty) */
};

/* --- the store ----------------------------------------------------------------------------- */

struct rstore {
    struct engine *e;
    uint64_t size, nblocks, epoch;
    int nlayers;
    int fds[255];
    uint8_t *head, *base;
    int can_punch;

    /* write intent (replica/intent.py), shared with Python's WriteIntent */
    int ifd;
    uint8_t *marked;
    uint32_t *touch;
    uint32_t icount;
    uint64_t iregion;
    double clock0;
    uint64_t *markseq; /* per region: the mark's sequence number (0: durable at load) */
    uint32_t *ibusyr;  /* per region: mutations started and not yet answered */
    uint64_t mark_seq, durable_seq, isub_seq;
    int ibusy, iwant_write, iwant_sync, isub_sync, iparts, ierr;
    uint8_t *ibuf;
    struct io iwio, isio;
    double last_clear;
    struct list iwait;

    /* ordering and pausing */
    struct list active; /* requests touching data, in arrival order */
    int nwaiting;
    int kicking, rekick;
    int running; /* started requests (their I/O in flight) */
    int paused, pause_pending;
    uint64_t pause_id;

    struct fault faults[TANDEM_FAULT_SLOTS];
    int nfaults;
    uint8_t *zeros;
    struct tandem_replica_stats *st;

    /* Local reads (SHARE's answer): a sealed memfd page a target on this host maps, words
     * LW_GEN (bumped when the engine is handed another head file or layer count) and
     * LW_READABLE (1 while the head file alone holds the volume's data and nothing else
     * would answer a read differently: one layer, not paused, no fault armed; files change
     * only while paused). Created at the first SHARE. */
    int lfd;
    uint32_t *lw;
    dev_t hdev; /* the head file the generation belongs to */
    ino_t hino;
};

enum { LW_GEN, LW_READABLE };

/* --- connections --------------------------------------------------------------------------- */

struct rconn {
    struct conn *c;
    struct rstore *s;
    int has_epoch;
    uint64_t epoch;
    int ninflight;          /* this connection's requests not yet answered */
    struct frame *pending;  /* a control request waiting for ninflight == 0, or a held one */
    int held;               /* pending is held by a delay/hang fault */
    int hold_action, hold_slot;
    struct timer hold;
    int upcall_out; /* a control request is with Python */
    int failing;    /* protocol error: answer what is in flight, then close */
    int eof;
    int pumping, repump;
    struct reqhdr bighdr; /* a request whose payload is received straight into bigbuf */
    uint8_t *bigbuf;
    uint8_t *shm; /* the peer's memory mapped by SHARE (FLAG_SHM requests' data), or NULL */
    uint32_t shm_len;
};

/* A reply not tied to a request object (errors, PING, Python's answers). */
struct sreply {
    struct sendbuf sb;
    uint8_t hdr[RESP_SIZE];
    void *payload;
};

static void sreply_release(struct sendbuf *b)
{
    struct sreply *r = container_of(b, struct sreply, sb);
    free(r->payload);
    free(r);
}

static void put_resp_header(uint8_t *h, uint32_t status, uint64_t tag, uint32_t plen)
{
    uint32_t magic = RESP_MAGIC, zero = 0;
    memcpy(h, &magic, 4);
    memcpy(h + 4, &status, 4);
    memcpy(h + 8, &tag, 8);
    memcpy(h + 16, &plen, 4);
    memcpy(h + 20, &zero, 4);
}

/* Send a reply owning payload (malloc'ed or NULL). */
static void send_reply(struct conn *c, uint64_t tag, uint32_t status, void *payload,
                       uint32_t len)
{
    struct sreply *r = malloc(sizeof(*r));
    if (!r) {
        free(payload);
        conn_abort(c); /* cannot answer: the client must not wait forever */
        return;
    }
    put_resp_header(r->hdr, status, tag, len);
    r->payload = payload;
    r->sb.niov = 2;
    r->sb.iov[0].iov_base = r->hdr;
    r->sb.iov[0].iov_len = RESP_SIZE;
    r->sb.iov[1].iov_base = payload;
    r->sb.iov[1].iov_len = len;
    r->sb.release = sreply_release;
    conn_send(c, &r->sb);
}

static char *vformat(uint32_t *len, const char *fmt, va_list ap)
{
    char buf[MAX_MSG];
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof(buf))
        n = sizeof(buf) - 1;
    char *m = malloc((size_t)n + 1);
    if (m)
        memcpy(m, buf, (size_t)n + 1);
    *len = m ? (uint32_t)n : 0;
    return m;
}

static void send_error(struct rconn *rc, uint64_t tag, uint32_t status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void send_error(struct rconn *rc, uint64_t tag, uint32_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    uint32_t len;
    char *m = vformat(&len, fmt, ap);
    va_end(ap);
    send_reply(rc->c, tag, status, m, len);
}

/* --- requests ------------------------------------------------------------------------------ */

enum { K_READ, K_MUT, K_FLUSH };
enum { S_WAIT, S_INTENT, S_RUN };

struct rop {
    struct list alink, wlink;
    struct rconn *rc;      /* NULL: a request on Python's behalf (sync) */
    struct sync_io *sync;
    struct tandem_io *io;  /* ... and its part of that batch */
    int borrowed;          /* data is the caller's (sync WRITE): not ours to free */
    struct rstore *s;
    struct reqhdr h;
    uint64_t lo, hi; /* block-rounded byte range, for ordering */
    int kind, state;
    int pending; /* sub-I/Os in flight */
    int err;     /* first error, -errno */
    const char *what;
    int phase;
    uint64_t need; /* write-intent sequence this request waits to be durable */
    uint64_t ir0, ir1; /* the write-intent regions it holds busy (ir0 == ir1: none) */
    double fstart;
    uint8_t *data;  /* WRITE payload or READ/CHECKSUM buffer */
    uint8_t *edges; /* two blocks for read-modify-write */
    uint8_t *vec;   /* READV: its range entries (the request payload) */
    uint8_t *resp;  /* response payload (owned unless it is data) */
    uint32_t resp_len;
    uint32_t status;
    uint8_t rhdr[RESP_SIZE];
    struct sendbuf sb;
};

enum { SUB_READ, SUB_WRITE, SUB_FSYNC, SUB_PUNCH, SUB_ZEDGE };

struct sub {
    struct io io;
    struct rop *op;
    int type, phase, fd;
    uint64_t pos;
    size_t total, done;
    struct iovec iov[3];
    int niov;
    uint64_t b0, b1;     /* head-map blocks this sub-I/O sets (write) or clears (punch) */
    uint32_t zlo, zhi;   /* SUB_ZEDGE: bytes of the block to zero */
    uint8_t blk[];       /* SUB_ZEDGE: the block */
};

static void op_continue(struct rop *op);
static void op_complete(struct rop *op);
static void order_kick(struct rstore *s);
static void rc_pump(struct rconn *rc);
static void rc_after_op(struct rconn *rc);
static void intent_kick(struct rstore *s);

/* One request of a batch on Python's behalf finished: the last one wakes the caller. */
static void sync_done(struct sync_io *sy, struct tandem_io *io, int status)
{
    io->status = status;
    if (--sy->remaining == 0)
        sem_post(&sy->done);
}

static int io_status(int err)
{
    return (err == ENOSPC || err == EDQUOT) ? ENOSPC : EIO;
}

static void op_fail(struct rop *op, int res, const char *what)
{
    if (!op->err) {
        op->err = res;
        op->what = what;
    }
}

static inline int source(const struct rstore *s, uint64_t b)
{
    if (s->head[b])
        return s->nlayers - 1;
    if (s->base[b])
        return s->base[b] - 1;
    return -1;
}

static void sub_done(struct engine *e, struct io *io, int res);

static struct sub *sub_new(struct rop *op, int type, size_t extra)
{
    struct sub *sb = calloc(1, sizeof(*sb) + extra);
    if (!sb) {
        op_fail(op, -ENOMEM, "allocate");
        return NULL;
    }
    sb->io.done = sub_done;
    sb->op = op;
    sb->type = type;
    op->pending++;
    return sb;
}

/* Large writes go to the file in pieces of at most WRITE_PIECE, cut at multiples of it: the
 * page cache sizes a folio by the write that creates it, and ext4 walks the whole folio on
 * every later write into it (a 4 KiB write into a file filled with 1 MiB writes cost 16.8 us
 * of CPU here, with 64 KiB writes 3.6 us; filling costs 15% more). As replica/store.py, but
 * a write over pages all cached goes whole (all_cached). */
#define WRITE_PIECE (64u << 10)

#ifndef __NR_cachestat
#define __NR_cachestat 451 /* Linux 6.5; x86-64 and the generic syscall table */
#endif
struct cachestat_range {
    uint64_t off, len;
};
struct cachestat_out {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

/* Whether every page of [pos, pos + len) is in the page cache: then a write creates no
 * folio and can go in one call (16 calls for 1 MiB cost 35% more CPU than one, in a file
 * of 64 KiB folios). Without cachestat (older kernel, seccomp), never. */
static int all_cached(int fd, uint64_t pos, size_t len)
{
    static int unsupported;
    if (unsupported)
        return 0;
    struct cachestat_range r = {pos, len};
    struct cachestat_out cs;
    if (syscall(__NR_cachestat, fd, &r, &cs, 0) < 0) {
        unsupported = errno == ENOSYS || errno == EPERM;
        return 0;
    }
    return cs.nr_cache == ((pos + len + 4095) >> 12) - (pos >> 12);
}

/* pwritev in WRITE_PIECE pieces (or whole where cached): the bytes written (short when a
 * piece was), or -1. Counts its calls in *calls. */
static ssize_t pwrite_pieces(int fd, const struct iovec *iov, int niov, uint64_t pos,
                             uint64_t *calls)
{
    size_t total = 0, inoff = 0;
    int i = 0;
    for (int k = 0; k < niov; k++)
        total += iov[k].iov_len;
    if (total > WRITE_PIECE - pos % WRITE_PIECE && niov <= IOV_MAX && all_cached(fd, pos, total)) {
        ++*calls;
        return pwritev(fd, iov, niov, (off_t)pos);
    }
    total = 0;
    while (i < niov) {
        struct iovec part[3];
        int n = 0;
        size_t room = WRITE_PIECE - (pos + total) % WRITE_PIECE, want = 0;
        while (i < niov && room && n < 3) {
            size_t take = iov[i].iov_len - inoff < room ? iov[i].iov_len - inoff : room;
            part[n].iov_base = (uint8_t *)iov[i].iov_base + inoff;
            part[n++].iov_len = take;
            inoff += take;
            room -= take;
            want += take;
            if (inoff == iov[i].iov_len) {
                i++;
                inoff = 0;
            }
        }
        ++*calls;
        ssize_t w = n == 1 ? pwrite(fd, part[0].iov_base, part[0].iov_len, (off_t)(pos + total))
                           : pwritev(fd, part, n, (off_t)(pos + total));
        if (w < 0)
            return total ? (ssize_t)total : -1;
        total += (size_t)w;
        if ((size_t)w < want)
            return (ssize_t)total;
    }
    return (ssize_t)total;
}

/* A file write done on the loop thread: see "Writes" in native/ENGINE.md for why. */
static void sub_write_now(struct engine *e, struct sub *sb, const struct iovec *iov, int niov,
                          uint64_t pos)
{
    ssize_t n = pwrite_pieces(sb->fd, iov, niov, pos, &sb->op->s->st->file_writes);
    eng_defer(e, &sb->io, n < 0 ? -errno : (int)n);
}

static void sub_submit(struct sub *sb)
{
    struct engine *e = sb->op->s->e;
    if (e->sync_writes) {
        if (sb->type == SUB_ZEDGE && sb->phase == 1) {
            struct iovec v = {sb->blk + sb->done, BLOCK - sb->done};
            sub_write_now(e, sb, &v, 1, sb->pos + sb->done);
            return;
        }
        if (sb->type == SUB_WRITE && sb->done == 0) {
            sub_write_now(e, sb, sb->iov, sb->niov, sb->pos);
            return;
        }
    }
    if (sb->type == SUB_WRITE || (sb->type == SUB_ZEDGE && sb->phase == 1))
        sb->op->s->st->file_writes++;
    struct io_uring_sqe *sqe = eng_sqe(e, &sb->io, 1);
    switch (sb->type) {
    case SUB_READ:
        io_uring_prep_read(sqe, sb->fd, (uint8_t *)sb->iov[0].iov_base + sb->done,
                           (unsigned)(sb->total - sb->done), sb->pos + sb->done);
        break;
    case SUB_ZEDGE:
        if (sb->phase == 0)
            io_uring_prep_read(sqe, sb->fd, sb->blk + sb->done, (unsigned)(BLOCK - sb->done),
                               sb->pos + sb->done);
        else
            io_uring_prep_write(sqe, sb->fd, sb->blk + sb->done, (unsigned)(BLOCK - sb->done),
                                sb->pos + sb->done);
        break;
    case SUB_WRITE:
        if (sb->done == 0 && sb->niov > 1) {
            io_uring_prep_writev(sqe, sb->fd, sb->iov, (unsigned)sb->niov, sb->pos);
        } else {
            /* one buffer, or resuming a short write: skip what was written */
            size_t skip = sb->done;
            int i = 0;
            while (skip >= sb->iov[i].iov_len) {
                skip -= sb->iov[i].iov_len;
                i++;
            }
            if (skip || i) {
                sb->iov[i].iov_base = (uint8_t *)sb->iov[i].iov_base + skip;
                sb->iov[i].iov_len -= skip;
                memmove(sb->iov, sb->iov + i, (size_t)(sb->niov - i) * sizeof(sb->iov[0]));
                sb->niov -= i;
                sb->pos += sb->done;
                sb->total -= sb->done;
                sb->done = 0;
            }
            if (sb->niov == 1)
                io_uring_prep_write(sqe, sb->fd, sb->iov[0].iov_base,
                                    (unsigned)sb->iov[0].iov_len, sb->pos);
            else
                io_uring_prep_writev(sqe, sb->fd, sb->iov, (unsigned)sb->niov, sb->pos);
        }
        break;
    case SUB_FSYNC:
        io_uring_prep_fsync(sqe, sb->fd, IORING_FSYNC_DATASYNC);
        break;
    case SUB_PUNCH:
        io_uring_prep_fallocate(sqe, sb->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                (off_t)sb->pos, (off_t)sb->total);
        break;
    }
}

/* Read [off, off+len) through the layer chain into buf (holes become zeros, no I/O). */
static void read_through(struct rop *op, uint8_t *buf, uint64_t off, uint64_t len)
{
    struct rstore *s = op->s;
    uint64_t end = off + len, b0 = off / BLOCK, b1 = (end + BLOCK - 1) / BLOCK;
    uint64_t b = b0;
    while (b < b1) {
        int src = source(s, b);
        uint64_t j = b + 1;
        while (j < b1 && source(s, j) == src)
            j++;
        uint64_t start = b * BLOCK > off ? b * BLOCK : off;
        uint64_t stop = j * BLOCK < end ? j * BLOCK : end;
        if (src < 0) {
            memset(buf + (start - off), 0, stop - start);
        } else {
            struct sub *sb = sub_new(op, SUB_READ, 0);
            if (!sb)
                return;
            sb->fd = s->fds[src];
            sb->pos = start;
            sb->total = stop - start;
            sb->iov[0].iov_base = buf + (start - off);
            sb->iov[0].iov_len = stop - start;
            sb->niov = 1;
            sub_submit(sb);
        }
        b = j;
    }
}

static void zero_writes(struct rop *op, uint64_t b0, uint64_t b1)
{
    struct rstore *s = op->s;
    int fd = s->fds[s->nlayers - 1];
    for (uint64_t b = b0; b < b1;) {
        uint64_t n = b1 - b;
        if (n > ZERO_CHUNK / BLOCK)
            n = ZERO_CHUNK / BLOCK;
        struct sub *sb = sub_new(op, SUB_WRITE, 0);
        if (!sb)
            return;
        sb->fd = fd;
        sb->pos = b * BLOCK;
        sb->total = n * BLOCK;
        sb->iov[0].iov_base = s->zeros;
        sb->iov[0].iov_len = n * BLOCK;
        sb->niov = 1;
        sb->b0 = b;
        sb->b1 = b + n;
        sub_submit(sb);
        b += n;
    }
}

/* Head-only blocks [b0, b1) must read as zeros: punch, or write zeros over the head's runs. */
static void zero_head_runs(struct rop *op, uint64_t b0, uint64_t b1)
{
    struct rstore *s = op->s;
    for (uint64_t b = b0; b < b1;) {
        if (!s->head[b]) {
            b++;
            continue;
        }
        uint64_t j = b + 1;
        while (j < b1 && s->head[j])
            j++;
        zero_writes(op, b, j);
        b = j;
    }
}

static void discard_head(struct rop *op, uint64_t b0, uint64_t b1)
{
    struct rstore *s = op->s;
    if (!s->can_punch) {
        zero_head_runs(op, b0, b1);
        return;
    }
    struct sub *sb = sub_new(op, SUB_PUNCH, 0);
    if (!sb)
        return;
    sb->fd = s->fds[s->nlayers - 1];
    sb->pos = b0 * BLOCK;
    sb->total = (b1 - b0) * BLOCK;
    sb->b0 = b0;
    sb->b1 = b1;
    sub_submit(sb);
}

/* A partial block of an UNMAP/WRITE_ZEROES: read it through the chain, zero [lo, hi), write. */
static void zero_edge(struct rop *op, uint64_t b, uint32_t lo, uint32_t hi)
{
    struct rstore *s = op->s;
    struct sub *sb = sub_new(op, SUB_ZEDGE, BLOCK);
    if (!sb)
        return;
    sb->pos = b * BLOCK;
    sb->b0 = b;
    sb->b1 = b + 1;
    sb->zlo = lo;
    sb->zhi = hi;
    int src = source(s, b);
    if (src < 0) {
        memset(sb->blk, 0, BLOCK);
        sb->phase = 1;
        sb->fd = s->fds[s->nlayers - 1];
    } else {
        sb->fd = s->fds[src];
    }
    sub_submit(sb);
}

static void zero_start(struct rop *op)
{
    struct rstore *s = op->s;
    int punch = op->h.op == OP_UNMAP || !(op->h.flags & FLAG_NO_HOLE);
    uint64_t off = op->h.offset, end = off + op->h.length;
    op->what = "zero";
    uint64_t c0 = (off + BLOCK - 1) / BLOCK, c1 = end / BLOCK;
    uint64_t edges[2][2];
    int nedges = 0;
    if (c0 > c1) {
        edges[nedges][0] = off;
        edges[nedges++][1] = end;
    } else {
        if (off < c0 * BLOCK) {
            edges[nedges][0] = off;
            edges[nedges++][1] = c0 * BLOCK;
        }
        if (c1 * BLOCK < end) {
            edges[nedges][0] = c1 * BLOCK;
            edges[nedges++][1] = end;
        }
    }
    for (int i = 0; i < nedges; i++) {
        uint64_t b = edges[i][0] / BLOCK;
        if (punch && !s->head[b] && !s->base[b])
            continue; /* already reads as zeros; don't allocate */
        zero_edge(op, b, (uint32_t)(edges[i][0] - b * BLOCK), (uint32_t)(edges[i][1] - b * BLOCK));
    }
    if (c0 < c1) {
        if (!punch) {
            zero_writes(op, c0, c1); /* NO_HOLE: must stay allocated */
        } else {
            for (uint64_t b = c0; b < c1;) {
                int below = s->base[b] != 0;
                uint64_t j = b + 1;
                while (j < c1 && (s->base[j] != 0) == below)
                    j++;
                if (below) {
                    /* a snapshot holds these: a hole in the head would expose its old data */
                    zero_writes(op, b, j);
                } else {
                    int any = 0;
                    for (uint64_t k = b; k < j && !any; k++)
                        any = s->head[k];
                    if (any)
                        discard_head(op, b, j);
                }
                b = j;
            }
        }
    }
}

/* WRITE, phase 0: read the edge blocks an unaligned write patches. */
static void write_start(struct rop *op)
{
    uint64_t off = op->h.offset, len = op->h.length, end = off + len;
    op->what = "write";
    op->phase = 0;
    if (!len)
        return;
    uint64_t b0 = off / BLOCK, b1 = (end + BLOCK - 1) / BLOCK;
    uint64_t lead = off - b0 * BLOCK;
    if (!lead && !(end % BLOCK))
        return;
    op->edges = malloc(2 * BLOCK);
    if (!op->edges) {
        op_fail(op, -ENOMEM, "write");
        return;
    }
    uint64_t rest = len;
    if (lead) {
        uint64_t take = BLOCK - lead < len ? BLOCK - lead : len;
        rest = len - take;
        read_through(op, op->edges, b0 * BLOCK, BLOCK);
    }
    if (rest % BLOCK)
        read_through(op, op->edges + BLOCK, (b1 - 1) * BLOCK, BLOCK);
}

/* WRITE, phase 1: patch the edges and write whole blocks with one writev. */
static void write_issue(struct rop *op)
{
    struct rstore *s = op->s;
    uint64_t off = op->h.offset, len = op->h.length, end = off + len;
    op->phase = 1;
    if (!len)
        return;
    uint64_t b0 = off / BLOCK, b1 = (end + BLOCK - 1) / BLOCK;
    uint64_t lead = off - b0 * BLOCK;
    struct sub *sb = sub_new(op, SUB_WRITE, 0);
    if (!sb)
        return;
    sb->fd = s->fds[s->nlayers - 1];
    sb->pos = b0 * BLOCK;
    sb->total = (b1 - b0) * BLOCK;
    sb->b0 = b0;
    sb->b1 = b1;
    uint8_t *p = op->data;
    uint64_t rest = len;
    int n = 0;
    if (lead) {
        uint64_t take = BLOCK - lead < len ? BLOCK - lead : len;
        memcpy(op->edges + lead, p, take);
        sb->iov[n].iov_base = op->edges;
        sb->iov[n++].iov_len = BLOCK;
        p += take;
        rest -= take;
    }
    uint64_t whole = rest / BLOCK * BLOCK;
    if (whole) {
        sb->iov[n].iov_base = p;
        sb->iov[n++].iov_len = whole;
    }
    if (rest > whole) {
        memcpy(op->edges + BLOCK, p + whole, rest - whole);
        sb->iov[n].iov_base = op->edges + BLOCK;
        sb->iov[n++].iov_len = BLOCK;
    }
    sb->niov = n;
    sub_submit(sb);
}

static void fsync_head(struct rop *op)
{
    struct rstore *s = op->s;
    struct sub *sb = sub_new(op, SUB_FSYNC, 0);
    if (!sb)
        return;
    sb->fd = s->fds[s->nlayers - 1];
    op->fstart = mono_s();
    sub_submit(sb);
}

/* --- write intent -------------------------------------------------------------------------- */

static uint32_t intent_now(const struct rstore *s)
{
    return (uint32_t)(int64_t)(mono_s() - s->clock0) + 1;
}

static void intent_kick(struct rstore *s)
{
    if (s->ibusy || (!s->iwant_write && !s->iwant_sync) || s->ifd < 0)
        return;
    static const char magic[8] = {'T', 'N', 'D', 'I', 'N', 'T', '0', '1'};
    uint64_t region = s->iregion, count = s->icount;
    memcpy(s->ibuf, magic, 8);
    memcpy(s->ibuf + 8, &region, 8);
    memcpy(s->ibuf + 16, &count, 8);
    memcpy(s->ibuf + 24, s->marked, s->icount);
    s->isub_seq = s->mark_seq;
    s->isub_sync = s->iwant_sync;
    s->iwant_write = s->iwant_sync = 0;
    s->ierr = 0;
    s->ibusy = 1;
    s->iparts = s->isub_sync ? 2 : 1;
    struct io_uring_sqe *sqe = eng_sqe(s->e, &s->iwio, (unsigned)s->iparts);
    io_uring_prep_write(sqe, s->ifd, s->ibuf, 24 + s->icount, 0);
    if (s->isub_sync) {
        sqe->flags |= IOSQE_IO_LINK;
        sqe = eng_sqe(s->e, &s->isio, 1);
        io_uring_prep_fsync(sqe, s->ifd, IORING_FSYNC_DATASYNC);
    }
}

static void op_exec(struct rop *op);

static void check_paused(struct rstore *s)
{
    if (s->pause_pending && s->running == 0 && !s->ibusy) {
        s->pause_pending = 0;
        struct tandem_event ev = {.type = TANDEM_EV_PAUSED, .id = s->pause_id};
        eng_event(s->e, &ev);
    }
}

static void intent_write_done(struct engine *e, struct io *io, int res);
static void intent_sync_done(struct engine *e, struct io *io, int res);

static void intent_part_done(struct rstore *s, int res, int is_write)
{
    if (res < 0 && !s->ierr)
        s->ierr = res;
    if (is_write && res >= 0 && (uint32_t)res != 24 + s->icount && !s->ierr)
        s->ierr = -EIO;
    if (--s->iparts)
        return;
    s->ibusy = 0;
    if (s->isub_sync) {
        if (!s->ierr && s->isub_seq > s->durable_seq)
            s->durable_seq = s->isub_seq;
        for (struct list *p = s->iwait.next; p != &s->iwait;) {
            struct rop *op = container_of(p, struct rop, wlink);
            p = p->next;
            if (op->need <= s->durable_seq) {
                list_del(&op->wlink);
                op->state = S_RUN;
                op_exec(op);
            } else if (s->ierr && op->need <= s->isub_seq) {
                list_del(&op->wlink);
                op->state = S_RUN;
                op_fail(op, s->ierr, "record write intent");
                op_complete(op);
            }
        }
    } else if (s->ierr) {
        s->iwant_write = 1; /* a lazy clear that failed: try again with the next write */
    }
    if (!list_empty(&s->iwait))
        s->iwant_sync = 1; /* waiters for a later mark: one more round */
    if (s->iwant_sync)
        intent_kick(s);
    check_paused(s);
}

static void intent_write_done(struct engine *e, struct io *io, int res)
{
    (void)e;
    intent_part_done(container_of(io, struct rstore, iwio), res, 1);
}

static void intent_sync_done(struct engine *e, struct io *io, int res)
{
    (void)e;
    intent_part_done(container_of(io, struct rstore, isio), res, 0);
}

/* Before a mutation of [off, off+len) reaches the head: returns 1 if it must wait for
 * its regions' marks to be durable (it is then on s->iwait). */
static int intent_prepare(struct rstore *s, struct rop *op)
{
    if (s->ifd < 0 || !op->h.length)
        return 0;
    uint64_t off = op->h.offset, end = off + op->h.length;
    uint64_t r0 = off / s->iregion, r1 = (end + s->iregion - 1) / s->iregion;
    if (r1 < r0 + 1)
        r1 = r0 + 1;
    if (r1 > s->icount)
        r1 = s->icount;
    uint32_t now = intent_now(s);
    uint64_t need = 0;
    op->ir0 = r0;
    op->ir1 = r1;
    for (uint64_t r = r0; r < r1; r++) {
        s->ibusyr[r]++;
        s->touch[r] = now;
        if (!s->marked[r]) {
            s->marked[r] = 1;
            s->markseq[r] = ++s->mark_seq;
            s->iwant_sync = 1;
        }
        if (s->markseq[r] > need)
            need = s->markseq[r];
    }
    if (need <= s->durable_seq)
        return 0;
    op->need = need;
    op->state = S_INTENT;
    list_add_tail(&s->iwait, &op->wlink);
    s->iwant_sync = 1;
    intent_kick(s);
    return 1;
}

/* A flush that started at flush_started completed: clear regions idle since well before. */
static void intent_flushed(struct rstore *s, double flush_started)
{
    if (s->ifd < 0)
        return;
    double now = mono_s();
    if (now - s->last_clear < 1.0)
        return;
    int any = 0;
    for (uint32_t r = 0; r < s->icount && !any; r++)
        any = s->marked[r];
    if (!any)
        return;
    s->last_clear = now;
    double horizon = (double)(int64_t)(flush_started - s->clock0) + 1 - CLEAR_AFTER;
    int changed = 0;
    for (uint32_t r = 0; r < s->icount; r++) {
        /* a mark not yet durable belongs to a write still waiting for it */
        if (s->marked[r] && !s->ibusyr[r] && (double)s->touch[r] < horizon &&
            s->markseq[r] <= s->durable_seq) {
            s->marked[r] = 0;
            changed = 1;
        }
    }
    if (changed) {
        s->iwant_write = 1;
        intent_kick(s);
    }
}

/* --- ordering ------------------------------------------------------------------------------ */

static int conflicts(const struct rop *a, const struct rop *b)
{
    if (a->kind == K_FLUSH)
        return 0;
    if (b->kind == K_FLUSH)
        return a->kind == K_MUT;
    if (a->kind == K_READ && b->kind == K_READ)
        return 0;
    return a->lo < b->hi && b->lo < a->hi;
}

/* A request on Python's behalf (op->rc == NULL) waits only for conflicting requests that
 * already started, and starts even while paused: the Python caller is blocked until it is
 * done, so it must never wait for a resume (only Python could send that), and Python is not
 * changing the store meanwhile (it is single-threaded, and blocked). */
static int must_wait(struct rstore *s, struct rop *op)
{
    for (struct list *p = s->active.next; p != &op->alink; p = p->next) {
        struct rop *a = container_of(p, struct rop, alink);
        if ((op->rc || a->state != S_WAIT) && conflicts(a, op))
            return 1;
    }
    return 0;
}

static int may_start(struct rstore *s, struct rop *op)
{
    return (!s->paused || !op->rc) && !must_wait(s, op);
}

static void op_start(struct rop *op)
{
    struct rstore *s = op->s;
    op->state = S_RUN;
    s->running++;
    if (op->kind == K_MUT && intent_prepare(s, op))
        return;
    op_exec(op);
}

static void order_kick(struct rstore *s)
{
    if (s->kicking) {
        s->rekick = 1;
        return;
    }
    s->kicking = 1;
    do {
        s->rekick = 0;
        if (!s->nwaiting)
            break;
        for (struct list *p = s->active.next; p != &s->active;) {
            struct rop *op = container_of(p, struct rop, alink);
            p = p->next;
            if (op->state == S_WAIT && may_start(s, op)) {
                s->nwaiting--;
                op_start(op);
            }
        }
    } while (s->rekick);
    s->kicking = 0;
}

static void order_add(struct rstore *s, struct rop *op)
{
    list_add_tail(&s->active, &op->alink);
    op->state = S_WAIT;
    if (!s->kicking && may_start(s, op)) {
        op_start(op);
    } else {
        s->nwaiting++;
        order_kick(s);
    }
}

/* --- executing requests -------------------------------------------------------------------- */

static void block_status(struct rop *op)
{
    struct rstore *s = op->s;
    uint64_t off = op->h.offset, end = off + op->h.length;
    uint64_t b0 = off / BLOCK, b1 = (end + BLOCK - 1) / BLOCK;
    size_t cap = 256, len = 0;
    char *out = malloc(cap);
    if (!out) {
        op_fail(op, -ENOMEM, "block status");
        return;
    }
    out[len++] = '[';
    for (uint64_t b = b0; b < b1;) {
        int v = s->head[b] || s->base[b];
        uint64_t j = b + 1;
        while (j < b1 && (s->head[j] || s->base[j]) == v)
            j++;
        uint64_t start = b * BLOCK > off ? b * BLOCK : off;
        uint64_t stop = j * BLOCK < end ? j * BLOCK : end;
        if (cap - len < 64) {
            cap *= 2;
            char *n = realloc(out, cap);
            if (!n) {
                free(out);
                op_fail(op, -ENOMEM, "block status");
                return;
            }
            out = n;
        }
        len += (size_t)snprintf(out + len, cap - len, "%s[%llu, %llu, %d]", b > b0 ? ", " : "",
                                (unsigned long long)start, (unsigned long long)(stop - start),
                                v ? 0 : 3);
        b = j;
    }
    out[len++] = ']';
    op->resp = (uint8_t *)out;
    op->resp_len = (uint32_t)len;
}

static void op_exec(struct rop *op)
{
    switch (op->h.op) {
    case OP_READV:
        op->what = "read";
        op->data = malloc(op->h.length);
        if (!op->data) {
            op_fail(op, -ENOMEM, "read");
            break;
        }
        for (uint32_t i = 0, at = 0; i < op->h.plen / READV_ENTRY && !op->err; i++) {
            uint64_t off;
            uint32_t len;
            memcpy(&off, op->vec + i * READV_ENTRY, 8);
            memcpy(&len, op->vec + i * READV_ENTRY + 8, 4);
            read_through(op, op->data + at, off, len);
            at += len;
        }
        break;
    case OP_READ:
    case OP_CHECKSUM:
        op->what = "read";
        if (op->h.length) {
            if (!op->data) /* unless it goes to shared memory */
                op->data = malloc(op->h.length);
            if (!op->data)
                op_fail(op, -ENOMEM, "read");
            else
                read_through(op, op->data, op->h.offset, op->h.length);
        }
        break;
    case OP_WRITE:
        write_start(op);
        break;
    case OP_FLUSH:
        op->what = "flush";
        fsync_head(op);
        break;
    case OP_UNMAP:
    case OP_WRITE_ZEROES:
        if (op->h.length)
            zero_start(op);
        break;
    case OP_BLOCK_STATUS:
        block_status(op);
        break;
    }
    if (!op->pending)
        op_continue(op);
}

/* All sub-I/Os of the current phase are done: next phase, or the answer. */
static void op_continue(struct rop *op)
{
    struct rstore *s = op->s;
    if (op->err) {
        op_complete(op);
        return;
    }
    switch (op->h.op) {
    case OP_READ:
    case OP_READV:
        s->st->bytes_read += op->h.length;
        if (op->h.flags & FLAG_SHM)
            break; /* the data is in the peer's memory: an empty answer */
        op->resp = op->data;
        op->resp_len = op->h.length;
        op->data = NULL;
        break;
    case OP_CHECKSUM: {
        uint32_t crc = tandem_crc32c(0, op->data, op->h.length);
        op->resp = malloc(4);
        if (!op->resp) {
            op_fail(op, -ENOMEM, "checksum");
            break;
        }
        memcpy(op->resp, &crc, 4);
        op->resp_len = 4;
        break;
    }
    case OP_WRITE:
        if (op->phase == 0) {
            write_issue(op);
            if (op->pending)
                return;
            if (op->err)
                break;
        }
        if (op->phase == 1) {
            s->st->bytes_written += op->h.length;
            if (op->h.flags & FLAG_FUA) {
                op->phase = 2;
                op->what = "flush";
                fsync_head(op);
                if (op->pending)
                    return;
                break;
            }
        } else if (op->phase == 2) {
            intent_flushed(s, op->fstart);
        }
        break;
    case OP_FLUSH:
        intent_flushed(s, op->fstart);
        break;
    }
    op_complete(op);
}

static void relearn_head(struct rstore *s, uint64_t b0, uint64_t b1)
{
    if (b1 <= b0)
        return;
    int fd = s->fds[s->nlayers - 1];
    memset(s->head + b0, 0, b1 - b0);
    off_t pos = (off_t)(b0 * BLOCK), end = (off_t)(b1 * BLOCK);
    while (pos < end) {
        off_t d = lseek(fd, pos, SEEK_DATA);
        if (d < 0 || d >= end)
            return;
        off_t h = lseek(fd, d, SEEK_HOLE);
        if (h < 0 || h > end)
            h = end;
        uint64_t s0 = (uint64_t)d / BLOCK, s1 = ((uint64_t)h + BLOCK - 1) / BLOCK;
        memset(s->head + s0, 1, s1 - s0);
        pos = h;
    }
}

static void op_release(struct sendbuf *b)
{
    struct rop *op = container_of(b, struct rop, sb);
    if (!op->borrowed)
        free(op->data);
    free(op->edges);
    free(op->vec);
    free(op->resp);
    free(op);
}

/* A mutation is answered: its regions may be cleared by a flush that starts from now on.
 * Not before: one still in flight, or done after a flush's fsync began, may not be on disk
 * when that flush completes (mutations run beside other requests' flushes). */
static void intent_release(struct rstore *s, struct rop *op)
{
    if (op->ir0 == op->ir1 || !s->ibusyr)
        return;
    uint32_t now = intent_now(s);
    for (uint64_t r = op->ir0; r < op->ir1; r++) {
        s->ibusyr[r]--;
        s->touch[r] = now;
    }
    op->ir0 = op->ir1 = 0;
}

static void op_complete(struct rop *op)
{
    struct rstore *s = op->s;
    struct rconn *rc = op->rc;
    list_del(&op->alink);
    s->running--;
    intent_release(s, op);
    uint32_t status = 0;
    if (op->err) {
        int err = -op->err;
        if (rc)
            s->st->errors++;
        if (op->kind == K_MUT)
            relearn_head(s, op->lo / BLOCK, op->hi / BLOCK);
        status = op->err == -ENOMEM ? EIO : (uint32_t)io_status(err);
        free(op->resp);
        char buf[MAX_MSG];
        const char *what = op->what ? op->what : "request";
        if (!strcmp(what, "flush") || !strcmp(what, "record write intent"))
            snprintf(buf, sizeof(buf), "%s: %s", what, strerror(err));
        else
            snprintf(buf, sizeof(buf), "%s %llu+%u: %s", what,
                     (unsigned long long)op->h.offset, op->h.length, strerror(err));
        uint32_t len = (uint32_t)strlen(buf);
        char *m = malloc(len ? len : 1);
        if (m)
            memcpy(m, buf, len);
        else
            len = 0;
        op->resp = (uint8_t *)m;
        op->resp_len = len;
    }
    if (!rc) { /* on Python's behalf: hand over the result and wake the caller */
        if (!status && op->h.op == OP_READ && op->resp_len)
            memcpy(op->io->buf, op->resp, op->resp_len);
        sync_done(op->sync, op->io, (int)status);
        op_release(&op->sb);
        order_kick(s);
        check_paused(s);
        return;
    }
    put_resp_header(op->rhdr, status, op->h.tag, op->resp_len);
    op->sb.niov = 2;
    op->sb.iov[0].iov_base = op->rhdr;
    op->sb.iov[0].iov_len = RESP_SIZE;
    op->sb.iov[1].iov_base = op->resp;
    op->sb.iov[1].iov_len = op->resp_len;
    op->sb.release = op_release;
    struct conn *c = rc->c;
    conn_send(c, &op->sb);
    rc->ninflight--;
    order_kick(s);
    check_paused(s);
    rc_after_op(rc);
    conn_put(c);
}

static void sub_done(struct engine *e, struct io *io, int res)
{
    (void)e;
    struct sub *sb = container_of(io, struct sub, io);
    struct rop *op = sb->op;
    struct rstore *s = op->s;
    if (res == -EINTR || res == -EAGAIN) {
        sub_submit(sb);
        return;
    }
    switch (sb->type) {
    case SUB_READ:
        if (res > 0) {
            sb->done += (size_t)res;
            if (sb->done < sb->total) {
                sub_submit(sb);
                return;
            }
        } else if (res == 0) { /* past EOF: reads as zeros, like a sparse file */
            memset((uint8_t *)sb->iov[0].iov_base + sb->done, 0, sb->total - sb->done);
        } else {
            op_fail(op, res, op->what);
        }
        break;
    case SUB_ZEDGE:
        if (sb->phase == 0) {
            if (res > 0 && sb->done + (size_t)res < BLOCK) {
                sb->done += (size_t)res;
                sub_submit(sb);
                return;
            }
            if (res < 0) {
                op_fail(op, res, "write");
                break;
            }
            if (res >= 0 && sb->done + (size_t)res < BLOCK)
                memset(sb->blk + sb->done + res, 0, BLOCK - sb->done - (size_t)res);
            memset(sb->blk + sb->zlo, 0, sb->zhi - sb->zlo);
            sb->phase = 1;
            sb->done = 0;
            sb->fd = s->fds[s->nlayers - 1];
            sub_submit(sb);
            return;
        }
        if (res > 0) {
            sb->done += (size_t)res;
            if (sb->done < BLOCK) {
                sub_submit(sb);
                return;
            }
            s->head[sb->b0] = 1;
        } else {
            op_fail(op, res ? res : -EIO, "write");
        }
        break;
    case SUB_WRITE:
        if (res > 0) {
            sb->done += (size_t)res;
            if (sb->done < sb->total) {
                sub_submit(sb);
                return;
            }
            memset(s->head + sb->b0, 1, sb->b1 - sb->b0);
        } else {
            op_fail(op, res ? res : -EIO, op->what);
        }
        break;
    case SUB_FSYNC:
        if (res < 0)
            op_fail(op, res, "flush");
        break;
    case SUB_PUNCH:
        if (res == 0) {
            memset(s->head + sb->b0, 0, sb->b1 - sb->b0);
        } else if (res == -EOPNOTSUPP || res == -ENOSYS) {
            if (s->can_punch) {
                s->can_punch = 0;
                eng_log(s->e, 20, "hole punching unsupported, unmap writes zeros");
            }
            zero_head_runs(op, sb->b0, sb->b1);
        } else {
            op_fail(op, res, op->what);
        }
        break;
    }
    free(sb);
    if (--op->pending == 0)
        op_continue(op);
}

/* --- connections: framing, dispatch, up-calls ---------------------------------------------- */

static int fault_slot(uint8_t op)
{
    switch (op) {
    case OP_READ:
    case OP_READV: /* a vectored read is a read to the fault hooks */
        return TANDEM_FAULT_SLOT_READ;
    case OP_WRITE:
        return TANDEM_FAULT_SLOT_WRITE;
    case OP_FLUSH:
        return TANDEM_FAULT_SLOT_FLUSH;
    case OP_UNMAP:
        return TANDEM_FAULT_SLOT_UNMAP;
    case OP_WRITE_ZEROES:
        return TANDEM_FAULT_SLOT_WRITE_ZEROES;
    case OP_CHECKSUM:
        return TANDEM_FAULT_SLOT_CHECKSUM;
    }
    return -1;
}

static struct fault *fault_lookup(struct rstore *s, int slot)
{
    if (s->faults[slot].action)
        return &s->faults[slot];
    if (s->faults[TANDEM_FAULT_SLOT_ANY].action)
        return &s->faults[TANDEM_FAULT_SLOT_ANY];
    return NULL;
}

/* What the engine executes; every other op (the control ops, and any it does not know)
 * goes up to Python, which validates and answers it like replica/server.py. */
static int in_engine(uint8_t op)
{
    return op == OP_READ || op == OP_WRITE || op == OP_FLUSH || op == OP_UNMAP ||
           op == OP_WRITE_ZEROES || op == OP_PING || op == OP_BLOCK_STATUS ||
           op == OP_CHECKSUM || op == OP_READV;
}

static struct frame *frame_new(const struct reqhdr *h, const uint8_t *payload, uint8_t *owned)
{
    struct frame *f = malloc(sizeof(*f));
    if (!f) {
        free(owned);
        return NULL;
    }
    f->h = *h;
    if (owned || !h->plen) {
        f->payload = owned;
    } else {
        f->payload = malloc(h->plen);
        if (!f->payload) {
            free(f);
            return NULL;
        }
        memcpy(f->payload, payload, h->plen);
    }
    return f;
}

static void upcall(struct rconn *rc, struct frame *f)
{
    struct tandem_event ev = {
        .type = TANDEM_EV_UPCALL,
        .conn = rc->c->id,
        .tag = f->h.tag,
        .offset = f->h.offset,
        .length = f->h.length,
        .op = f->h.op,
        .flags = f->h.flags,
        .data = f->payload,
        .data_len = f->h.plen,
    };
    free(f);
    rc->upcall_out = 1;
    rc->s->st->upcalls++;
    eng_event(rc->s->e, &ev);
}

/* Checks a READV as replica/protocol.py decode_ranges does (same order, same messages: a
 * refusal is written to why, and 0 returned); sets [lo, hi) to the span its entries cover
 * (the ordering range: a write anywhere in it waits for the read, conservative and simple). */
static int readv_span(const struct rstore *s, const struct reqhdr *h, const uint8_t *vec,
                      uint64_t *lo, uint64_t *hi, char *why, size_t cap)
{
    uint32_t n = h->plen / READV_ENTRY;
    if (h->length > MAX_PAYLOAD) {
        snprintf(why, cap, "read of %u bytes exceeds the limit", h->length);
        return 0;
    }
    if (h->plen % READV_ENTRY || !n || n > READV_MAX_RANGES) {
        snprintf(why, cap, "READV payload must be 1 to %u entries of %u bytes",
                 READV_MAX_RANGES, READV_ENTRY);
        return 0;
    }
    uint64_t total = 0, a = UINT64_MAX, b = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off;
        uint32_t len, reserved;
        memcpy(&off, vec + i * READV_ENTRY, 8);
        memcpy(&len, vec + i * READV_ENTRY + 8, 4);
        memcpy(&reserved, vec + i * READV_ENTRY + 12, 4);
        if (!len || reserved) {
            snprintf(why, cap, "READV entry %llu+%u: zero length or reserved bits set",
                     (unsigned long long)off, len);
            return 0;
        }
        if (off > s->size || len > s->size - off) {
            snprintf(why, cap, "range %llu+%u beyond size %llu", (unsigned long long)off, len,
                     (unsigned long long)s->size);
            return 0;
        }
        total += len;
        a = off < a ? off : a;
        b = off + len > b ? off + len : b;
    }
    if (total != h->length) {
        snprintf(why, cap, "READV length %u is not the sum of its ranges (%llu)", h->length,
                 (unsigned long long)total);
        return 0;
    }
    *lo = a;
    *hi = b;
    return 1;
}

/* Whether a target may read the head file itself (see struct rstore, LW_READABLE). */
static void local_update(struct rstore *s)
{
    if (s->lw)
        __atomic_store_n(&s->lw[LW_READABLE], !s->paused && s->nlayers == 1 && !s->nfaults,
                         __ATOMIC_RELEASE);
}

static int local_page(struct rstore *s)
{
    if (s->lw)
        return 0;
    int fd = memfd_create("tandem-replica-local", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -1;
    void *m = MAP_FAILED;
    if (ftruncate(fd, 4096) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0 ||
        (m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
        close(fd);
        return -1;
    }
    s->lfd = fd;
    s->lw = m;
    s->lw[LW_GEN] = 1;
    local_update(s);
    return 0;
}

/* SHARE: map the connecting process's shared memory (a target on this host) for this
 * connection. The payload names the memory by the peer's own fd number, opened through
 * /proc/PEER/fd: the peer can only name what it holds, and only a memfd owned by its own
 * user and sealed against shrinking and growing is taken (never a file with a name), so a
 * peer can neither make this process write a file nor pull the memory from under it. */
static void share(struct rconn *rc, const struct reqhdr *h, const uint8_t *p)
{
    struct rstore *s = rc->s;
    int fd = rc->c->fd;
    struct sockaddr_storage sa;
    socklen_t sl = sizeof(sa);
    struct ucred cr;
    socklen_t cl = sizeof(cr);
    uint32_t num;
    if (rc->shm) {
        send_error(rc, h->tag, EINVAL, "memory is already shared on this connection");
    } else if (h->plen != 4) {
        send_error(rc, h->tag, EINVAL, "SHARE carries a 4-byte fd number, not %u bytes",
                   h->plen);
    } else if (h->length == 0 || h->length > SHM_MAX) {
        send_error(rc, h->tag, EINVAL, "shared memory of %u bytes (1 byte to %u)", h->length,
                   SHM_MAX);
    } else if (getsockname(fd, (struct sockaddr *)&sa, &sl) < 0 || sa.ss_family != AF_UNIX ||
               getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0 || cr.pid <= 0) {
        send_error(rc, h->tag, EOPNOTSUPP, "shared memory needs a unix socket connection");
    } else {
        memcpy(&num, p, 4);
        char path[64];
        snprintf(path, sizeof(path), "/proc/%d/fd/%u", (int)cr.pid, num);
        char link[64] = "";
        ssize_t ln = readlink(path, link, sizeof(link) - 1);
        int memfd = ln > 7 && !strncmp(link, "/memfd:", 7); /* not a file with a name */
        int mfd = memfd ? open(path, O_RDWR | O_CLOEXEC) : -1;
        struct stat st;
        int seals = -1; /* -1 (a file that cannot be sealed) must not pass as "all seals" */
        void *m = MAP_FAILED;
        if (ln < 0) {
            send_error(rc, h->tag, EINVAL, "cannot open the shared memory: %s", strerror(errno));
        } else if (!memfd) {
            send_error(rc, h->tag, EINVAL, "fd %u is not shared memory of the peer's user", num);
        } else if (mfd < 0) {
            send_error(rc, h->tag, EINVAL, "cannot open the shared memory: %s", strerror(errno));
        } else if (fstat(mfd, &st) < 0 || st.st_uid != cr.uid ||
                   (seals = fcntl(mfd, F_GET_SEALS)) < 0 ||
                   (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) {
            /* checked on the file opened (the peer may have swapped its fd since readlink):
             * only a memfd created sealable can carry these seals, and sealed against
             * shrinking no holder can cut the mapping short (a SIGBUS here) */
            send_error(rc, h->tag, EINVAL, "fd %u is not shared memory of the peer's user", num);
        } else if ((uint64_t)st.st_size < h->length) {
            send_error(rc, h->tag, EINVAL, "shared memory has %lld bytes, not %u",
                       (long long)st.st_size, h->length);
        } else if ((m = mmap(NULL, h->length, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0)) ==
                   MAP_FAILED) {
            send_error(rc, h->tag, EINVAL, "cannot map the shared memory: %s", strerror(errno));
        } else {
            rc->shm = m;
            rc->shm_len = h->length;
            /* The answer offers local reads: the head file's and the page's fd numbers (for
             * /proc/SELF/fd) and the generation they belong to. */
            uint32_t *a = s->nlayers && local_page(s) == 0 ? malloc(16) : NULL;
            if (a) {
                a[0] = (uint32_t)s->fds[s->nlayers - 1];
                a[1] = (uint32_t)s->lfd;
                a[2] = __atomic_load_n(&s->lw[LW_GEN], __ATOMIC_RELAXED);
                a[3] = 0;
            }
            send_reply(rc->c, h->tag, 0, a, a ? 16 : 0);
        }
        if (mfd >= 0)
            close(mfd);
        if (rc->shm)
            return;
    }
    s->st->errors++;
}

static void dispatch(struct rconn *rc, const struct reqhdr *h, const uint8_t *payload,
                     uint8_t *owned)
{
    struct rstore *s = rc->s;
    struct conn *c = rc->c;
    uint8_t op = h->op;
    if (op == OP_SHARE) {
        share(rc, h, payload ? payload : owned);
        free(owned);
        return;
    }
    if (!in_engine(op)) { /* Python validates and answers; a barrier on this connection */
        struct frame *f = frame_new(h, payload, owned);
        if (!f) {
            conn_abort(c);
            return;
        }
        if (rc->ninflight)
            rc->pending = f;
        else
            upcall(rc, f);
        return;
    }
    if (h->flags & ~(FLAG_FUA | FLAG_NO_HOLE | FLAG_SHM)) {
        s->st->errors++;
        send_error(rc, h->tag, EINVAL, "unknown flags 0x%x", h->flags);
        free(owned);
        return;
    }
    uint8_t *shm = NULL; /* FLAG_SHM: where the data is (WRITE) or goes (READ) */
    if (h->flags & FLAG_SHM) {
        uint64_t off = 0;
        const char *bad = NULL;
        if (op != OP_READ && op != OP_WRITE)
            bad = "shared memory is for READ and WRITE only";
        else if (!rc->shm)
            bad = "no shared memory on this connection (send SHARE first)";
        else if (h->plen != 8)
            bad = "a shared-memory request carries an 8-byte offset";
        if (!bad) {
            memcpy(&off, payload ? payload : owned, 8);
            if (off > rc->shm_len || h->length > rc->shm_len - off)
                bad = "range beyond the shared memory";
        }
        if (bad) {
            s->st->errors++;
            send_error(rc, h->tag, EINVAL, "%s", bad);
            free(owned);
            return;
        }
        shm = rc->shm + off;
    }
    uint64_t lo = h->offset, hi = h->offset + h->length;
    if (op == OP_READV) {
        char why[160];
        if (!readv_span(s, h, payload ? payload : owned, &lo, &hi, why, sizeof(why))) {
            s->st->errors++;
            send_error(rc, h->tag, EINVAL, "%s", why);
            free(owned);
            return;
        }
    } else if (op != OP_FLUSH && op != OP_PING) {
        if (h->offset > s->size || h->length > s->size - h->offset) {
            s->st->errors++;
            send_error(rc, h->tag, EINVAL, "range %llu+%u beyond size %llu",
                       (unsigned long long)h->offset, h->length, (unsigned long long)s->size);
            free(owned);
            return;
        }
        if ((op == OP_READ || op == OP_CHECKSUM) && h->length > MAX_PAYLOAD) {
            s->st->errors++;
            send_error(rc, h->tag, EINVAL, "read of %u bytes exceeds the limit", h->length);
            free(owned);
            return;
        }
        if (op == OP_WRITE && !shm && h->length != h->plen) {
            s->st->errors++;
            send_error(rc, h->tag, EINVAL, "write length differs from its payload");
            free(owned);
            return;
        }
    }
    int mutating = op == OP_WRITE || op == OP_FLUSH || op == OP_UNMAP || op == OP_WRITE_ZEROES;
    if (mutating) {
        if (!rc->has_epoch) {
            s->st->errors++;
            send_error(rc, h->tag, EPERM,
                       "connection has not opened the replica (send OPEN first)");
            free(owned);
            return;
        }
        if (rc->epoch != s->epoch) {
            s->st->errors++;
            send_error(rc, h->tag, ESTALE, "epoch %llu is not the replica's current epoch %llu",
                       (unsigned long long)rc->epoch, (unsigned long long)s->epoch);
            free(owned);
            return;
        }
    }
    s->st->ops[op]++;
    if (op == OP_PING) {
        uint8_t *p = owned;
        if (!p && h->plen) {
            p = malloc(h->plen);
            if (!p) {
                conn_abort(c);
                return;
            }
            memcpy(p, payload, h->plen);
        }
        send_reply(c, h->tag, 0, p, h->plen);
        return;
    }
    struct rop *r = calloc(1, sizeof(*r));
    if (!r) {
        free(owned);
        conn_abort(c);
        return;
    }
    r->rc = rc;
    r->s = s;
    r->h = *h;
    list_init(&r->wlink);
    if (shm) {
        r->data = shm; /* in place: never freed here */
        r->borrowed = 1;
        free(owned);
    } else if (op == OP_WRITE || op == OP_READV) {
        uint8_t **keep = op == OP_WRITE ? &r->data : &r->vec;
        if (owned) {
            *keep = owned;
        } else if (h->plen) {
            *keep = malloc(h->plen);
            if (!*keep) {
                free(r);
                conn_abort(c);
                return;
            }
            memcpy(*keep, payload, h->plen);
        }
    } else {
        free(owned);
    }
    if (op == OP_FLUSH) {
        r->kind = K_FLUSH;
    } else {
        r->kind = (op == OP_READ || op == OP_CHECKSUM || op == OP_BLOCK_STATUS ||
                   op == OP_READV)
                      ? K_READ
                      : K_MUT;
        r->lo = lo / BLOCK * BLOCK;
        r->hi = (hi + BLOCK - 1) / BLOCK * BLOCK;
    }
    rc->ninflight++;
    conn_get(c);
    order_add(s, r);
}

static void hold_expired(struct engine *e, struct timer *t);

/* A complete request: fault injection first (as replica/server.py), then dispatch. */
static void handle_frame(struct rconn *rc, const struct reqhdr *h, const uint8_t *payload,
                         uint8_t *owned)
{
    struct rstore *s = rc->s;
    s->st->requests++;
    int slot;
    if (s->nfaults && (slot = fault_slot(h->op)) >= 0) {
        struct fault *f = fault_lookup(s, slot);
        if (f) {
            int action = f->action;
            double arg = f->arg;
            if (f->remaining > 0) {
                struct tandem_event ev = {.type = TANDEM_EV_FAULT_USED,
                                          .id = (uint64_t)(f - s->faults)};
                eng_event(s->e, &ev);
                if (--f->remaining == 0) {
                    f->action = TANDEM_FAULT_NONE;
                    s->nfaults--;
                    local_update(s);
                }
            }
            switch (action) {
            case TANDEM_FAULT_CRASH:
                _exit(CRASH_EXIT);
            case TANDEM_FAULT_DROP: {
                struct tandem_event ev = {.type = TANDEM_EV_FAULT_DROP, .conn = rc->c->id};
                const char *name = fault_names[slot];
                ev.data = malloc(strlen(name));
                if (ev.data) {
                    memcpy(ev.data, name, strlen(name));
                    ev.data_len = (uint32_t)strlen(name);
                }
                eng_event(s->e, &ev);
                free(owned);
                rc->failing = 1;
                conn_abort(rc->c);
                return;
            }
            case TANDEM_FAULT_FAIL:
                send_error(rc, h->tag, (uint32_t)(int)arg, "injected fault on %s",
                           fault_names[slot]);
                free(owned);
                return;
            case TANDEM_FAULT_DELAY:
            case TANDEM_FAULT_HANG: {
                struct frame *fr = frame_new(h, payload, owned);
                if (!fr) {
                    conn_abort(rc->c);
                    return;
                }
                rc->pending = fr;
                rc->held = 1;
                rc->hold_action = action;
                rc->hold_slot = slot;
                uint64_t ns = action == TANDEM_FAULT_DELAY ? (uint64_t)(arg * 1e9) : HANG_POLL_NS;
                timer_arm(s->e, &rc->hold, ns);
                return;
            }
            }
        }
    }
    dispatch(rc, h, payload, owned);
}

static void hold_expired(struct engine *e, struct timer *t)
{
    (void)e;
    struct rconn *rc = container_of(t, struct rconn, hold);
    struct rstore *s = rc->s;
    if (rc->hold_action == TANDEM_FAULT_HANG) {
        struct fault *f = fault_lookup(s, rc->hold_slot);
        if (f && f->action == TANDEM_FAULT_HANG) {
            timer_arm(s->e, &rc->hold, HANG_POLL_NS);
            return;
        }
    }
    struct conn *c = rc->c;
    struct frame *f = rc->pending;
    rc->pending = NULL;
    rc->held = 0;
    conn_get(c);
    if (f && c->state == CONN_OPEN)
        dispatch(rc, &f->h, f->payload, f->payload);
    else if (f)
        free(f->payload);
    free(f);
    rc_pump(rc);
    conn_put(c);
}

static void proto_error(struct rconn *rc, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void proto_error(struct rconn *rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    uint32_t len;
    char *m = vformat(&len, fmt, ap);
    va_end(ap);
    if (m) {
        struct tandem_event ev = {.type = TANDEM_EV_PROTO_ERROR, .conn = rc->c->id};
        ev.data = malloc(len ? len : 1);
        if (ev.data) {
            memcpy(ev.data, m, len);
            ev.data_len = len;
        }
        eng_event(rc->s->e, &ev);
    }
    rc->s->st->errors++;
    send_reply(rc->c, 0, EPROTO, m, len);
    rc->failing = 1;
}

static int rc_idle(const struct rconn *rc)
{
    return !rc->ninflight && !rc->upcall_out && !rc->held && !rc->pending && !rc->c->dbuf;
}

static void rc_maybe_finish(struct rconn *rc)
{
    if ((rc->eof || rc->failing) && rc->c->state == CONN_OPEN && rc_idle(rc))
        conn_finish(rc->c);
}

static int can_parse(const struct rconn *rc)
{
    const struct conn *c = rc->c;
    return !rc->held && !rc->upcall_out && !rc->pending && !rc->failing &&
           c->state == CONN_OPEN && !c->dbuf && rc->ninflight < CONN_MAX_INFLIGHT &&
           c->sqbytes < CONN_MAX_QUEUED;
}

static void big_done(struct rconn *rc)
{
    uint8_t *buf = rc->bigbuf;
    rc->bigbuf = NULL;
    handle_frame(rc, &rc->bighdr, buf, buf);
}

static void rc_pump(struct rconn *rc)
{
    struct conn *c = rc->c;
    if (rc->pumping) {
        rc->repump = 1;
        return;
    }
    rc->pumping = 1;
    conn_get(c);
    int parsed = 0;
    do {
        rc->repump = 0;
        while (can_parse(rc)) {
            size_t avail = c->rend - c->rpos;
            if (avail < REQ_SIZE)
                break;
            struct reqhdr h;
            memcpy(&h, c->rbuf + c->rpos, REQ_SIZE);
            if (h.magic != REQ_MAGIC) {
                proto_error(rc, "bad request magic 0x%x", h.magic);
                break;
            }
            if (h.plen > MAX_PAYLOAD) {
                proto_error(rc, "payload of %u bytes exceeds the %u limit", h.plen, MAX_PAYLOAD);
                break;
            }
            size_t total = REQ_SIZE + (size_t)h.plen;
            if (total > c->rcap) {
                if (rc->eof) /* the peer closed: this payload can never arrive */
                    break;   /* rc_maybe_finish finishes the connection */
                uint8_t *buf = malloc(h.plen);
                if (!buf) {
                    conn_abort(c);
                    break;
                }
                c->rpos += REQ_SIZE;
                parsed++;
                rc->bighdr = h;
                rc->bigbuf = buf;
                if (conn_recv_direct(c, buf, h.plen))
                    big_done(rc);
                continue;
            }
            if (avail < total)
                break;
            c->rpos += total;
            parsed++;
            handle_frame(rc, &h, c->rbuf + c->rpos - h.plen, NULL);
        }
    } while (rc->repump);
    if (parsed)
        engine_note_depth(c->e, parsed > rc->ninflight ? parsed : rc->ninflight);
    rc->pumping = 0;
    rc_maybe_finish(rc);
    conn_arm_recv(c);
    conn_put(c);
}

static void rc_after_op(struct rconn *rc)
{
    if (rc->pending && !rc->held && !rc->ninflight) {
        struct frame *f = rc->pending;
        rc->pending = NULL;
        upcall(rc, f);
        return;
    }
    rc_pump(rc);
}

static void rc_on_data(struct conn *c) { rc_pump(c->proto); }

static void rc_on_direct(struct conn *c)
{
    struct rconn *rc = c->proto;
    big_done(rc);
    rc_pump(rc);
}

static void rc_on_eof(struct conn *c, int err)
{
    struct rconn *rc = c->proto;
    rc->eof = 1;
    if (err) {
        conn_abort(c);
        return;
    }
    if (c->dbuf) { /* the peer left in the middle of a payload */
        c->dbuf = NULL;
        free(rc->bigbuf);
        rc->bigbuf = NULL;
    }
    rc_pump(rc);
}

static void rc_on_sent(struct conn *c)
{
    struct rconn *rc = c->proto;
    if (c->state == CONN_OPEN && !rc->pumping)
        rc_pump(rc);
}

static void rc_on_destroy(struct conn *c)
{
    struct rconn *rc = c->proto;
    timer_cancel(&rc->hold);
    if (rc->pending) {
        free(rc->pending->payload);
        free(rc->pending);
    }
    free(rc->bigbuf);
    if (rc->shm) /* every request using it is over: they hold the connection */
        munmap(rc->shm, rc->shm_len);
    struct tandem_event ev = {.type = TANDEM_EV_CONN_CLOSED, .conn = c->id};
    eng_event(rc->s->e, &ev);
    free(rc);
}

static const struct conn_ops replica_conn_ops = {
    .on_data = rc_on_data,
    .on_direct = rc_on_direct,
    .on_eof = rc_on_eof,
    .on_sent = rc_on_sent,
    .on_destroy = rc_on_destroy,
};

struct conn *replica_conn_new(struct engine *e, uint64_t id, int fd)
{
    struct rconn *rc = calloc(1, sizeof(*rc));
    if (!rc)
        return NULL;
    struct conn *c = conn_new(e, id, fd, &replica_conn_ops, rc, RBUF_SIZE);
    if (!c) {
        free(rc);
        return NULL;
    }
    rc->c = c;
    rc->s = e->rs;
    rc->hold.fn = hold_expired;
    list_init(&rc->hold.link);
    conn_arm_recv(c);
    return c;
}

void replica_reply(struct engine *e, struct conn *c, void *data, size_t len, int epoch_action,
                   uint64_t epoch, int end)
{
    (void)e;
    struct rconn *rc = c->proto;
    if (len) { /* Python's bytes are whole encoded responses: send them as they are */
        struct sreply *r = malloc(sizeof(*r));
        if (!r) {
            free(data);
            conn_abort(c);
            return;
        }
        r->payload = data;
        r->sb.niov = 1;
        r->sb.iov[0].iov_base = data;
        r->sb.iov[0].iov_len = len;
        r->sb.release = sreply_release;
        conn_send(c, &r->sb);
    } else {
        free(data);
    }
    if (!end)
        return;
    if (epoch_action == TANDEM_EPOCH_SET) {
        rc->has_epoch = 1;
        rc->epoch = epoch;
    } else if (epoch_action == TANDEM_EPOCH_CLEAR) {
        rc->has_epoch = 0;
    }
    rc->upcall_out = 0;
    rc_pump(rc);
}

void replica_io(struct engine *e, struct tandem_io *io, struct sync_io *sy)
{
    struct rstore *s = e->rs;
    int op = io->op;
    uint64_t offset = io->offset;
    uint32_t length = io->length;
    int bad = op != OP_READ && op != OP_WRITE && op != OP_UNMAP && op != OP_WRITE_ZEROES;
    if (!s || e->stopping || bad || offset > s->size || length > s->size - offset) {
        sync_done(sy, io, !s || e->stopping ? ESHUTDOWN : EINVAL);
        return;
    }
    struct rop *r = calloc(1, sizeof(*r));
    if (!r) {
        sync_done(sy, io, ENOMEM);
        return;
    }
    r->sync = sy;
    r->io = io;
    r->s = s;
    r->h.op = (uint8_t)op;
    r->h.flags = (uint8_t)io->flags;
    r->h.offset = offset;
    r->h.length = length;
    list_init(&r->wlink);
    if (op == OP_WRITE) {
        r->data = io->buf;
        r->borrowed = 1; /* the caller blocks until we are done with it */
    }
    r->kind = op == OP_READ ? K_READ : K_MUT;
    r->lo = offset / BLOCK * BLOCK;
    r->hi = (offset + length + BLOCK - 1) / BLOCK * BLOCK;
    order_add(s, r);
}

/* --- store setup, pause, faults ------------------------------------------------------------ */

int replica_setup(struct engine *e, uint64_t size, uint64_t epoch, int intent_fd,
                  uint8_t *marked, uint32_t *touch, uint32_t count, uint64_t region,
                  double clock0)
{
    struct rstore *s = e->rs;
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s)
            return -ENOMEM;
        s->zeros = calloc(1, ZERO_CHUNK);
        if (!s->zeros) {
            free(s);
            return -ENOMEM;
        }
        s->e = e;
        s->st = &e->rstats;
        s->can_punch = 1;
        s->ifd = -1;
        list_init(&s->active);
        list_init(&s->iwait);
        s->iwio.done = intent_write_done;
        s->isio.done = intent_sync_done;
        e->rs = s;
    }
    s->size = size;
    s->nblocks = size / BLOCK;
    s->epoch = epoch;
    if (intent_fd >= 0 && count) {
        if (count != s->icount || !s->markseq) {
            /* a new geometry (resize): only ever while paused, so no intent I/O in flight */
            free(s->markseq);
            free(s->ibusyr);
            free(s->ibuf);
            s->markseq = calloc(count, sizeof(uint64_t));
            s->ibusyr = calloc(count, sizeof(uint32_t));
            s->ibuf = malloc(24 + (size_t)count);
            if (!s->markseq || !s->ibusyr || !s->ibuf) {
                free(s->markseq);
                free(s->ibusyr);
                free(s->ibuf);
                s->markseq = NULL;
                s->ibusyr = NULL;
                s->ibuf = NULL;
                s->ifd = -1;
                s->icount = 0;
                return -ENOMEM;
            }
        }
        s->ifd = intent_fd;
        s->marked = marked;
        s->touch = touch;
        s->icount = count;
        s->iregion = region;
        s->clock0 = clock0;
    }
    return 0;
}

void replica_set_layers(struct engine *e, const int *fds, int n, uint8_t *head, uint8_t *base)
{
    struct rstore *s = e->rs;
    if (!s)
        return;
    /* Another head file (or chain): a target's fd names the old head, so its generation
     * ends. The same head (a resync, a resize) keeps it: its reads stay local. */
    struct stat st;
    int known = n > 0 && fstat(fds[n - 1], &st) == 0;
    if (!known || n != s->nlayers || st.st_dev != s->hdev || st.st_ino != s->hino) {
        if (s->lw) {
            __atomic_store_n(&s->lw[LW_READABLE], 0, __ATOMIC_RELEASE);
            __atomic_add_fetch(&s->lw[LW_GEN], 1, __ATOMIC_RELEASE);
        }
        s->hdev = known ? st.st_dev : 0;
        s->hino = known ? st.st_ino : 0;
    }
    memcpy(s->fds, fds, (size_t)n * sizeof(int));
    s->nlayers = n;
    s->head = head;
    s->base = base;
    local_update(s);
}

void replica_set_epoch(struct engine *e, uint64_t epoch)
{
    if (e->rs)
        e->rs->epoch = epoch;
}

void replica_set_fault(struct engine *e, int slot, int action, double arg, int64_t remaining)
{
    struct rstore *s = e->rs;
    if (!s)
        return;
    struct fault *f = &s->faults[slot];
    if (f->action)
        s->nfaults--;
    f->action = action;
    f->arg = arg;
    f->remaining = remaining;
    if (f->action)
        s->nfaults++;
    local_update(s); /* a fault must meet the target's reads too */
}

void replica_pause(struct engine *e, uint64_t id)
{
    struct rstore *s = e->rs;
    if (!s) {
        struct tandem_event ev = {.type = TANDEM_EV_PAUSED, .id = id};
        eng_event(e, &ev);
        return;
    }
    e->rstats.pauses++;
    s->paused = 1;
    local_update(s);
    s->pause_pending = 1;
    s->pause_id = id;
    check_paused(s);
}

void replica_resume(struct engine *e)
{
    struct rstore *s = e->rs;
    if (!s || e->stopping)
        return;
    s->paused = 0;
    s->pause_pending = 0;
    local_update(s);
    order_kick(s);
}

/* The engine stops: requests not started never will; drop them. */
void replica_stop(struct engine *e)
{
    struct rstore *s = e->rs;
    if (!s)
        return;
    s->paused = 1;
    s->pause_pending = 0;
    local_update(s);
    for (struct list *p = s->active.next; p != &s->active;) {
        struct rop *op = container_of(p, struct rop, alink);
        p = p->next;
        if (op->state != S_WAIT)
            continue;
        list_del(&op->alink);
        s->nwaiting--;
        if (!op->rc) {
            sync_done(op->sync, op->io, ESHUTDOWN);
            op_release(&op->sb);
            continue;
        }
        op->rc->ninflight--;
        struct conn *c = op->rc->c;
        op_release(&op->sb);
        conn_put(c);
    }
}

void replica_free(struct engine *e)
{
    struct rstore *s = e->rs;
    if (!s)
        return;
    free(s->markseq);
    free(s->ibusyr);
    free(s->ibuf);
    free(s->zeros);
    if (s->lw) {
        munmap(s->lw, 4096);
        close(s->lfd);
    }
    free(s);
    e->rs = NULL;
}
