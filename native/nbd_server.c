/* NBD's transmission phase in the engine, on a connection Python handed over after its
 * handshake (target/frontends/nbd/protocol.py negotiates; this continues where it stops).
 * The reference is the Python server (target/frontends/nbd/server.py with protocol.py's
 * request validation): the same checks in the same order, the same errors and messages,
 * simple and structured replies as negotiated.
 *
 * - READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE and DISC here;
 *   BLOCK_STATUS and command types this file does not know go up to Python (the 28-byte
 *   request header; Python's codec validates it and Python answers with the reply bytes).
 * - Many requests in flight: replies go out as requests complete; parsing stops at 128 in
 *   flight or 64 MiB of unsent replies (TCP backpressure).
 * - A FLUSH waits for the writes this connection received before it.
 * - A write longer than the maximum block size is discarded as it arrives and refused.
 * - EOF, DISC or a bad magic: stop reading, answer what is in flight, close. */
#include "target.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668E33EFu
#define REQ_HDR 28
#define MAX_BLOCK_SIZE (32u << 20)
#define MAX_IN_FLIGHT 128
#define MAX_QUEUED (64u << 20)
#define NBD_RBUF (256u << 10)
#define MAX_STRING 4096

enum {
    CMD_READ = 0,
    CMD_WRITE = 1,
    CMD_DISC = 2,
    CMD_FLUSH = 3,
    CMD_TRIM = 4,
    CMD_CACHE = 5,
    CMD_WRITE_ZEROES = 6,
    CMD_BLOCK_STATUS = 7,
};
enum {
    F_FUA = 1,
    F_NO_HOLE = 2,
    F_DF = 4,
    F_REQ_ONE = 8,
    F_FAST_ZERO = 16,
    F_KNOWN = 31,
};
enum {
    NBD_EPERM = 1,
    NBD_EIO = 5,
    NBD_ENOMEM = 12,
    NBD_EINVAL = 22,
    NBD_ENOSPC = 28,
    NBD_EOVERFLOW = 75,
    NBD_ENOTSUP = 95,
    NBD_ESHUTDOWN = 108,
};
enum { REPLY_TYPE_NONE = 0, REPLY_TYPE_OFFSET_DATA = 1, REPLY_TYPE_ERROR = 0x8001 };
#define REPLY_FLAG_DONE 1

struct nconn {
    struct conn *c;
    struct engine *e;
    int structured, meta, readonly;
    uint64_t size;
    int frontend;
    int ninflight;
    uint64_t seq;
    struct list writes;  /* WRITE/TRIM/WRITE_ZEROES in flight, in arrival order */
    struct list flushes; /* FLUSHes waiting for the writes before them */
    int stopping;
    int pumping, repump;
    int nupcalls; /* with Python */
    uint64_t skip; /* payload bytes of an oversize write still to discard */
    uint8_t skip_handle[8];
    uint32_t skip_len;
    struct ncmd *big; /* a write whose payload is being received straight into its buffer */
};

struct ncmd {
    struct vio v; /* first: the volume request */
    struct nconn *nc;
    uint8_t handle[8];
    uint16_t type, flags;
    uint64_t offset;
    uint32_t length;
    uint64_t seq;
    struct list wlink;
    int phase;
    uint8_t rh[40];
    char *emsg;
    struct sendbuf sb;
};

/* A reply with no command behind it (refusals). */
struct nreply {
    struct sendbuf sb;
    uint8_t rh[32];
    char *msg;
};

static void be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static void be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t ld64(const uint8_t *p) { return (uint64_t)ld32(p) << 32 | ld32(p + 4); }

static int nbd_error(int code)
{
    switch (code) {
    case EPERM:
    case EROFS:
    case EACCES:
        return NBD_EPERM;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EINVAL:
    case ERANGE:
        return NBD_EINVAL;
    case ENOMEM:
        return NBD_ENOMEM;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case EOPNOTSUPP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    }
    return NBD_EIO;
}

/* protocol.py _clean_string: no NULs, at most 4096 bytes, not cut inside a UTF-8 sequence. */
static size_t clean_string(char *s)
{
    size_t n = 0;
    for (size_t i = 0; s[i]; i++)
        if (s[i])
            s[n++] = s[i];
    s[n] = 0;
    if (n > MAX_STRING) {
        n = MAX_STRING;
        size_t k = n;
        while (k > 0 && ((uint8_t)s[k - 1] & 0xC0) == 0x80)
            k--;
        if (k > 0 && ((uint8_t)s[k - 1] & 0x80)) {
            uint8_t lead = (uint8_t)s[k - 1];
            size_t want = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
            if (n - (k - 1) < want)
                n = k - 1;
        }
        s[n] = 0;
    }
    return n;
}

/* An error reply into h (32 bytes); *msg_len: bytes of the message that follow it. */
static size_t put_error(const struct nconn *nc, uint8_t *h, const uint8_t *handle, int code,
                        char *msg, size_t *msg_len)
{
    if (!code)
        code = NBD_EIO; /* an error must not look like success */
    *msg_len = 0;
    if (!nc->structured) {
        be32(h, SIMPLE_REPLY_MAGIC);
        be32(h + 4, (uint32_t)code);
        memcpy(h + 8, handle, 8);
        return 16;
    }
    size_t n = msg ? clean_string(msg) : 0;
    be32(h, STRUCTURED_REPLY_MAGIC);
    be16(h + 4, REPLY_FLAG_DONE);
    be16(h + 6, REPLY_TYPE_ERROR);
    memcpy(h + 8, handle, 8);
    be32(h + 16, (uint32_t)(6 + n));
    be32(h + 20, (uint32_t)code);
    be16(h + 24, (uint16_t)n);
    *msg_len = n;
    return 26;
}

static void nreply_release(struct sendbuf *b)
{
    struct nreply *r = container_of(b, struct nreply, sb);
    free(r->msg);
    free(r);
}

static void send_refusal(struct nconn *nc, const uint8_t *handle, int code, const char *f, ...)
    __attribute__((format(printf, 4, 5)));

static void send_refusal(struct nconn *nc, const uint8_t *handle, int code, const char *f, ...)
{
    struct nreply *r = calloc(1, sizeof(*r));
    if (!r) {
        conn_abort(nc->c);
        return;
    }
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof(buf), f, ap);
    va_end(ap);
    r->msg = strdup(buf);
    size_t mlen;
    size_t hl = put_error(nc, r->rh, handle, code, r->msg, &mlen);
    r->sb.iov[0].iov_base = r->rh;
    r->sb.iov[0].iov_len = hl;
    r->sb.iov[1].iov_base = r->msg;
    r->sb.iov[1].iov_len = r->msg ? mlen : 0;
    r->sb.niov = 2;
    r->sb.release = nreply_release;
    conn_send(nc->c, &r->sb);
}

/* --- commands ------------------------------------------------------------------------------ */

static void nc_pump(struct nconn *nc);
static void flush_kick(struct nconn *nc);

static void ncmd_release(struct sendbuf *b)
{
    struct ncmd *cmd = container_of(b, struct ncmd, sb);
    vio_release(&cmd->v);
    free(cmd->emsg);
    free(cmd);
}

static void nc_maybe_finish(struct nconn *nc)
{
    struct conn *c = nc->c;
    if (nc->stopping && !nc->ninflight && !c->dbuf && c->state == CONN_OPEN)
        conn_finish(c);
}

/* The command is over: reply (status 0: success), release its slot. */
static void ncmd_complete(struct ncmd *cmd, int status, char *msg)
{
    struct nconn *nc = cmd->nc;
    struct conn *c = nc->c;
    if (!list_empty(&cmd->wlink))
        list_del(&cmd->wlink);
    if (status) {
        int code = nbd_error(status);
        if (code == NBD_ENOTSUP && !(cmd->flags & F_FAST_ZERO))
            code = NBD_EINVAL; /* the doc keeps ENOTSUP for fast-zero refusals */
        cmd->emsg = msg;
        size_t mlen;
        size_t hl = put_error(nc, cmd->rh, cmd->handle, code, cmd->emsg, &mlen);
        cmd->sb.iov[0].iov_base = cmd->rh;
        cmd->sb.iov[0].iov_len = hl;
        cmd->sb.iov[1].iov_base = cmd->emsg;
        cmd->sb.iov[1].iov_len = cmd->emsg ? mlen : 0;
        cmd->sb.niov = 2;
    } else if (cmd->type == CMD_READ && cmd->length) {
        uint8_t *h = cmd->rh;
        size_t hl;
        if (nc->structured) {
            be32(h, STRUCTURED_REPLY_MAGIC);
            be16(h + 4, REPLY_FLAG_DONE);
            be16(h + 6, REPLY_TYPE_OFFSET_DATA);
            memcpy(h + 8, cmd->handle, 8);
            be32(h + 16, 8 + cmd->length);
            be64(h + 20, cmd->offset);
            hl = 28;
        } else {
            be32(h, SIMPLE_REPLY_MAGIC);
            be32(h + 4, 0);
            memcpy(h + 8, cmd->handle, 8);
            hl = 16;
        }
        cmd->sb.iov[0].iov_base = h;
        cmd->sb.iov[0].iov_len = hl;
        cmd->sb.iov[1].iov_base = cmd->v.buf->data;
        cmd->sb.iov[1].iov_len = cmd->length;
        cmd->sb.niov = 2;
    } else {
        uint8_t *h = cmd->rh;
        size_t hl = 16;
        if (cmd->type == CMD_READ && nc->structured) {
            /* an empty read: OFFSET_DATA must carry data, so just "done" */
            be32(h, STRUCTURED_REPLY_MAGIC);
            be16(h + 4, REPLY_FLAG_DONE);
            be16(h + 6, REPLY_TYPE_NONE);
            memcpy(h + 8, cmd->handle, 8);
            be32(h + 16, 0);
            hl = 20;
        } else {
            be32(h, SIMPLE_REPLY_MAGIC);
            be32(h + 4, 0);
            memcpy(h + 8, cmd->handle, 8);
        }
        cmd->sb.iov[0].iov_base = h;
        cmd->sb.iov[0].iov_len = hl;
        cmd->sb.niov = 1;
    }
    cmd->sb.release = ncmd_release;
    conn_send(c, &cmd->sb);
    nc->ninflight--;
    flush_kick(nc);
    if (!nc->stopping)
        nc_pump(nc);
    nc_maybe_finish(nc);
    conn_put(c);
}

static void ncmd_vio_done(struct vio *v)
{
    struct ncmd *cmd = container_of(v, struct ncmd, v);
    if (v->status) {
        char *msg = v->msg;
        v->msg = NULL;
        ncmd_complete(cmd, v->status, msg);
        return;
    }
    if ((cmd->type == CMD_TRIM || cmd->type == CMD_WRITE_ZEROES) && !cmd->phase &&
        (cmd->flags & F_FUA)) {
        cmd->phase = 1; /* then a flush, like the Python server */
        vio_release(v);
        memset(v, 0, sizeof(*v));
        v->op = TANDEM_VIO_FLUSH;
        v->frontend = cmd->nc->frontend;
        v->done = ncmd_vio_done;
        vio_submit(cmd->nc->e, v);
        return;
    }
    ncmd_complete(cmd, 0, NULL);
}

static void ncmd_start_vio(struct ncmd *cmd, int op, int flags)
{
    struct vio *v = &cmd->v;
    v->op = op;
    v->flags = flags;
    v->frontend = cmd->nc->frontend;
    v->offset = op == TANDEM_VIO_FLUSH ? 0 : cmd->offset;
    v->length = op == TANDEM_VIO_FLUSH ? 0 : cmd->length;
    v->done = ncmd_vio_done;
    vio_submit(cmd->nc->e, v);
}

/* Start FLUSHes whose earlier writes (on this connection) are done. */
static void flush_kick(struct nconn *nc)
{
    while (!list_empty(&nc->flushes)) {
        struct ncmd *f = container_of(nc->flushes.next, struct ncmd, wlink);
        if (!list_empty(&nc->writes) &&
            container_of(nc->writes.next, struct ncmd, wlink)->seq < f->seq)
            return;
        list_del(&f->wlink);
        ncmd_start_vio(f, TANDEM_VIO_FLUSH, 0);
    }
}

static int is_write(int type)
{
    return type == CMD_WRITE || type == CMD_TRIM || type == CMD_WRITE_ZEROES;
}

/* A valid command: run it. */
static void ncmd_run(struct nconn *nc, struct ncmd *cmd)
{
    struct conn *c = nc->c;
    nc->ninflight++;
    conn_get(c);
    cmd->seq = ++nc->seq;
    if (is_write(cmd->type)) {
        list_add_tail(&nc->writes, &cmd->wlink);
        /* Read-only can start after the handshake (lost write quorum): refuse here. */
        if (vol_readonly(nc->e)) {
            ncmd_complete(cmd, EROFS, strdup("volume is read-only"));
            return;
        }
        if (!cmd->length) {
            ncmd_complete(cmd, 0, NULL);
            return;
        }
    }
    switch (cmd->type) {
    case CMD_READ:
        if (!cmd->length) {
            ncmd_complete(cmd, 0, NULL);
            return;
        }
        ncmd_start_vio(cmd, TANDEM_VIO_READ, 0);
        return;
    case CMD_WRITE:
        ncmd_start_vio(cmd, TANDEM_VIO_WRITE, (cmd->flags & F_FUA) ? TANDEM_VIO_FUA : 0);
        return;
    case CMD_FLUSH:
        list_add_tail(&nc->flushes, &cmd->wlink);
        flush_kick(nc);
        return;
    case CMD_TRIM:
        ncmd_start_vio(cmd, TANDEM_VIO_UNMAP, 0);
        return;
    case CMD_WRITE_ZEROES:
        /* FAST_ZERO is always honoured: zeroing sends no payload to the replicas */
        ncmd_start_vio(cmd, TANDEM_VIO_WRITE_ZEROES,
                       (cmd->flags & F_NO_HOLE) ? TANDEM_VIO_NO_HOLE : 0);
        return;
    default: /* CMD_CACHE: a hint; there is no cache to warm */
        ncmd_complete(cmd, 0, NULL);
        return;
    }
}

static int allowed_flags(int type)
{
    switch (type) {
    case CMD_READ:
        return F_FUA | F_DF;
    case CMD_WRITE:
    case CMD_FLUSH:
    case CMD_TRIM:
    case CMD_CACHE:
        return F_FUA;
    case CMD_WRITE_ZEROES:
        return F_FUA | F_NO_HOLE | F_FAST_ZERO;
    }
    return -1; /* BLOCK_STATUS, unknown: Python's */
}

static void upcall(struct nconn *nc, const uint8_t *hdr, uint16_t type, uint16_t flags,
                   uint64_t offset, uint32_t length)
{
    struct conn *c = nc->c;
    struct tandem_event ev = {.type = TANDEM_EV_UPCALL,
                              .conn = c->id,
                              .tag = ld64(hdr + 8),
                              .offset = offset,
                              .length = length,
                              .op = (uint8_t)type,
                              .flags = (uint8_t)flags};
    ev.data = malloc(REQ_HDR);
    if (!ev.data) {
        conn_abort(c);
        return;
    }
    memcpy(ev.data, hdr, REQ_HDR);
    ev.data_len = REQ_HDR;
    nc->ninflight++;
    nc->nupcalls++;
    conn_get(c);
    nc->e->tstats.upcalls++;
    nc->e->tstats.fe_upcalls[nc->frontend]++;
    eng_event(nc->e, &ev);
}

/* A framed request (protocol.py _validate, then the server's _perform). `buf` (a WRITE's
 * payload) becomes the command's. */
static void nc_request(struct nconn *nc, const uint8_t *hdr, struct vbuf *buf)
{
    uint16_t flags = (uint16_t)(hdr[4] << 8 | hdr[5]);
    uint16_t type = (uint16_t)(hdr[6] << 8 | hdr[7]);
    uint64_t offset = ld64(hdr + 16);
    uint32_t length = ld32(hdr + 24);
    const uint8_t *handle = hdr + 8;
    nc->e->tstats.requests++;
    nc->e->tstats.fe_requests[nc->frontend]++;
    int allowed = allowed_flags(type);
    if (allowed < 0) {
        vbuf_put(buf);
        upcall(nc, hdr, type, flags, offset, length);
        return;
    }
    int code = 0;
    char msg[160];
    if (flags & ~F_KNOWN) {
        code = NBD_EINVAL;
        snprintf(msg, sizeof(msg), "unknown command flags 0x%x", flags & ~F_KNOWN);
    } else if (flags & ~allowed) {
        code = NBD_EINVAL;
        snprintf(msg, sizeof(msg), "command flags 0x%x not valid for command %d",
                 flags & ~allowed, type);
    } else if ((flags & F_DF) && !nc->structured) {
        code = NBD_EINVAL;
        snprintf(msg, sizeof(msg), "NBD_CMD_FLAG_DF needs structured replies");
    } else if (is_write(type) && nc->readonly) {
        code = NBD_EPERM;
        snprintf(msg, sizeof(msg), "export is read-only");
    } else if (type == CMD_FLUSH) {
        if (offset || length) {
            code = NBD_EINVAL;
            snprintf(msg, sizeof(msg), "flush offset and length must be zero");
        }
    } else if ((type == CMD_READ || type == CMD_CACHE) && length > MAX_BLOCK_SIZE) {
        code = NBD_EINVAL;
        snprintf(msg, sizeof(msg), "length %u exceeds the maximum block size %u", length,
                 MAX_BLOCK_SIZE);
    } else if (offset > nc->size || length > nc->size - offset) {
        /* the doc: ENOSPC for writes past the end, EINVAL for everything else */
        code = (type == CMD_WRITE || type == CMD_WRITE_ZEROES) ? NBD_ENOSPC : NBD_EINVAL;
        snprintf(msg, sizeof(msg), "range %llu+%u is beyond the export size %llu",
                 (unsigned long long)offset, length, (unsigned long long)nc->size);
    }
    if (code) {
        vbuf_put(buf);
        send_refusal(nc, handle, code, "%s", msg);
        return;
    }
    struct ncmd *cmd = calloc(1, sizeof(*cmd));
    if (!cmd) {
        vbuf_put(buf);
        conn_abort(nc->c);
        return;
    }
    cmd->nc = nc;
    memcpy(cmd->handle, handle, 8);
    cmd->type = type;
    cmd->flags = flags;
    cmd->offset = offset;
    cmd->length = length;
    cmd->v.buf = buf;
    list_init(&cmd->wlink);
    ncmd_run(nc, cmd);
}

static void proto_error(struct nconn *nc, const char *f, ...) __attribute__((format(printf, 2, 3)));

/* Stop reading and tell Python why (it logs it); what is in flight is still answered. */
static void proto_error(struct nconn *nc, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    conn_proto_vevent(nc->c, f, ap);
    va_end(ap);
    nc->stopping = 1;
}

static int can_parse(const struct nconn *nc)
{
    const struct conn *c = nc->c;
    return !nc->stopping && c->state == CONN_OPEN && !c->dbuf && nc->ninflight < MAX_IN_FLIGHT &&
           c->sqbytes < MAX_QUEUED;
}

static void nc_pump(struct nconn *nc)
{
    struct conn *c = nc->c;
    if (nc->pumping) { /* a command completed inside the loop: it goes on by itself */
        nc->repump = 1;
        return;
    }
    nc->pumping = 1;
    conn_get(c);
    do {
    nc->repump = 0;
    while (can_parse(nc)) {
        size_t avail = c->rend - c->rpos;
        if (nc->skip) {
            size_t n = avail < nc->skip ? avail : (size_t)nc->skip;
            c->rpos += n;
            nc->skip -= n;
            if (nc->skip)
                break;
            send_refusal(nc, nc->skip_handle, NBD_EINVAL,
                         "write of %u bytes exceeds the maximum block size", nc->skip_len);
            continue;
        }
        if (avail < REQ_HDR)
            break;
        const uint8_t *h = c->rbuf + c->rpos;
        uint32_t magic = ld32(h);
        if (magic != REQUEST_MAGIC) {
            proto_error(nc, "bad request magic 0x%x", magic);
            break;
        }
        uint16_t type = (uint16_t)(h[6] << 8 | h[7]);
        uint32_t length = ld32(h + 24);
        if (type == CMD_WRITE) {
            if (length > MAX_BLOCK_SIZE) {
                /* the doc allows a hard disconnect; discarding keeps the stream in sync */
                nc->e->tstats.requests++;
                nc->e->tstats.fe_requests[nc->frontend]++;
                memcpy(nc->skip_handle, h + 8, 8);
                nc->skip_len = length;
                nc->skip = length;
                c->rpos += REQ_HDR;
                continue;
            }
            size_t need = REQ_HDR + (size_t)length;
            if (avail < need && need <= c->rcap)
                break; /* the rest is on its way */
            struct vbuf *buf = vol_payload(nc->e, length);
            if (!buf) {
                conn_abort(c);
                break;
            }
            uint8_t hdr[REQ_HDR];
            memcpy(hdr, h, REQ_HDR);
            c->rpos += REQ_HDR;
            if (avail >= need) {
                memcpy(buf->data, c->rbuf + c->rpos, length);
                c->rpos += length;
                nc_request(nc, hdr, buf);
                continue;
            }
            /* larger than the receive buffer: straight into the payload's buffer */
            struct ncmd *big = calloc(1, sizeof(*big));
            if (!big) {
                vbuf_put(buf);
                conn_abort(c);
                break;
            }
            memcpy(big->rh, hdr, REQ_HDR);
            big->v.buf = buf;
            nc->big = big;
            if (conn_recv_direct(c, buf->data, length)) {
                nc->big = NULL;
                nc_request(nc, big->rh, buf);
                free(big);
                continue;
            }
            break;
        }
        uint8_t hdr[REQ_HDR];
        memcpy(hdr, h, REQ_HDR);
        c->rpos += REQ_HDR;
        if (type == CMD_DISC) {
            nc->stopping = 1; /* soft: what is in flight is answered, the rest ignored */
            break;
        }
        nc_request(nc, hdr, NULL);
    }
    } while (nc->repump);
    nc->pumping = 0;
    nc_maybe_finish(nc);
    conn_arm_recv(c);
    conn_put(c);
}

static void nc_on_data(struct conn *c) { nc_pump(c->proto); }

static void nc_on_direct(struct conn *c)
{
    struct nconn *nc = c->proto;
    struct ncmd *big = nc->big;
    nc->big = NULL;
    conn_get(c);
    if (big) {
        nc_request(nc, big->rh, big->v.buf);
        free(big);
    }
    nc_pump(nc);
    conn_put(c);
}

static void nc_on_eof(struct conn *c, int err)
{
    struct nconn *nc = c->proto;
    nc->stopping = 1;
    if (c->dbuf && nc->big) { /* the peer left in the middle of a payload */
        c->dbuf = NULL;
        vbuf_put(nc->big->v.buf);
        free(nc->big);
        nc->big = NULL;
    }
    if (err) {
        conn_abort(c);
        return;
    }
    conn_get(c);
    nc_maybe_finish(nc);
    conn_put(c);
}

static void nc_on_sent(struct conn *c)
{
    struct nconn *nc = c->proto;
    if (c->state == CONN_OPEN && !nc->stopping)
        nc_pump(nc);
}

static void nc_on_destroy(struct conn *c)
{
    struct nconn *nc = c->proto;
    if (nc->big) {
        vbuf_put(nc->big->v.buf);
        free(nc->big);
    }
    struct tandem_event ev = {.type = TANDEM_EV_CONN_CLOSED, .conn = c->id};
    eng_event(nc->e, &ev);
    free(nc);
}

static const struct conn_ops nbd_conn_ops = {
    .on_data = nc_on_data,
    .on_direct = nc_on_direct,
    .on_eof = nc_on_eof,
    .on_sent = nc_on_sent,
    .on_destroy = nc_on_destroy,
};

struct conn *nbd_conn_new(struct engine *e, uint64_t id, int fd, int flags, uint64_t size,
                          int frontend, const void *pre, size_t prelen)
{
    if (prelen > NBD_RBUF)
        return NULL;
    struct nconn *nc = calloc(1, sizeof(*nc));
    if (!nc)
        return NULL;
    struct conn *c = conn_new(e, id, fd, &nbd_conn_ops, nc, NBD_RBUF);
    if (!c) {
        free(nc);
        return NULL;
    }
    c->kind = TANDEM_CONN_NBD;
    nc->c = c;
    nc->e = e;
    nc->structured = !!(flags & TANDEM_NBD_STRUCTURED);
    nc->meta = !!(flags & TANDEM_NBD_META_CONTEXT);
    nc->readonly = !!(flags & TANDEM_NBD_READONLY);
    nc->size = size;
    nc->frontend = frontend;
    list_init(&nc->writes);
    list_init(&nc->flushes);
    if (prelen) { /* what Python read past the handshake */
        memcpy(c->rbuf, pre, prelen);
        c->rend = prelen;
    }
    nc_pump(nc);
    return c;
}

void nbd_reply(struct engine *e, struct conn *c, void *data, size_t len, int end)
{
    (void)e;
    struct nconn *nc = c->proto;
    if (len) {
        struct nreply *r = calloc(1, sizeof(*r));
        if (!r) {
            free(data);
            conn_abort(c);
        } else {
            r->msg = data; /* Python's bytes: whole replies */
            r->sb.iov[0].iov_base = data;
            r->sb.iov[0].iov_len = len;
            r->sb.niov = 1;
            r->sb.release = nreply_release;
            conn_send(c, &r->sb);
        }
    } else {
        free(data);
    }
    if (!end || !nc->nupcalls)
        return;
    nc->nupcalls--;
    nc->ninflight--;
    if (!nc->stopping)
        nc_pump(nc);
    nc_maybe_finish(nc);
    conn_put(c);
}

void nbd_stop(struct engine *e, struct conn *c)
{
    (void)e;
    struct nconn *nc = c->proto;
    nc->stopping = 1;
    conn_get(c);
    if (e->stopping) { /* Python will not answer its up-calls any more */
        while (nc->nupcalls) {
            nc->nupcalls--;
            nc->ninflight--;
            conn_put(c);
        }
    }
    nc_maybe_finish(nc);
    conn_put(c);
}
