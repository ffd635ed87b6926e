/* iSCSI's full feature phase in the engine, on a connection Python handed over after its login
 * (target/native_iscsi.py). The reference is the Python session
 * (target/frontends/iscsi/session.py, transfer.py, cmdsn.py, pdu.py's Decoder): the same
 * checks in the same order, the same Rejects, the same sense for transport failures.
 *
 * - Framing: BHS + AHS + header digest + padded data + data digest (CRC32C); a bad header
 *   digest drops the connection, a bad data digest or an oversize segment is rejected.
 * - The CmdSN window (ExpCmdSN/MaxCmdSN over `depth` running commands, early arrivals held,
 *   immediate delivery beside it), StatSN in send order.
 * - Write data: immediate, unsolicited (FirstBurstLength) and R2T-solicited bursts
 *   (MaxBurstLength, MaxOutstandingR2T), with the Python transfer's failure rules.
 * - READ/WRITE 6/10/16 and SYNCHRONIZE CACHE 10/16 on LUN 0 run here once their CDB passed
 *   every check sbc.py makes; anything else (another CDB, a check that fails, slow mode)
 *   goes up as (BHS+AHS, Data-Out) and Python's ScsiTarget result comes back
 *   (tandem_iscsi_result). Data-In is split by the initiator's MaxRecvDataSegmentLength with
 *   the status collapsed into the last one.
 * - NOP-Out/NOP-In (and keepalive probes), Reject, SNACK (rejected at ERL 0) here; TMF, Text
 *   and Logout go up whole once the tasks they abort are over; Python answers with PDUs
 *   whose StatSN/ExpCmdSN/MaxCmdSN (and digests) the engine fills in. */
#include "target.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ISCSI_RBUF (1u << 20) /* > 2 x the largest PDU we accept: a whole PDU always fits */
#define BHS 48
#define RESERVED 0xFFFFFFFFu
#define MAX_IMMEDIATE 32
#define MAX_QUEUED (16u << 20)
#define HASH_SIZE 256
#define WIN_SLOTS 1024 /* > any window depth */
#define BLK 512u
#define MAX_TRANSFER_BLOCKS 16384u

enum {
    OP_NOP_OUT = 0x00,
    OP_SCSI_CMD = 0x01,
    OP_TMF_REQ = 0x02,
    OP_LOGIN_REQ = 0x03,
    OP_TEXT_REQ = 0x04,
    OP_DATA_OUT = 0x05,
    OP_LOGOUT_REQ = 0x06,
    OP_SNACK = 0x10,
    OP_NOP_IN = 0x20,
    OP_SCSI_RSP = 0x21,
    OP_DATA_IN = 0x25,
    OP_R2T = 0x31,
    OP_REJECT = 0x3F,
};
enum {
    RJ_DATA_DIGEST = 0x02,
    RJ_PROTOCOL_ERROR = 0x04,
    RJ_COMMAND_NOT_SUPPORTED = 0x05,
    RJ_IMMEDIATE_REJECT = 0x06,
    RJ_TASK_IN_PROGRESS = 0x07,
    RJ_INVALID_PDU_FIELD = 0x09,
};
enum { K_SCSI = TANDEM_ISCSI_UP_SCSI, K_TMF = TANDEM_ISCSI_UP_TMF, K_TEXT = TANDEM_ISCSI_UP_TEXT,
       K_LOGOUT = TANDEM_ISCSI_UP_LOGOUT, K_NOP = 9 };
enum { T_HELD, T_COLLECT, T_EXEC, T_UP, T_WAIT };
#define CHECK_CONDITION 0x02

/* Sense (key, ASC, ASCQ) of transport failures (transfer.py) and volume errors (sense.py). */
#define S_DATA_PHASE 0x0B, 0x4B, 0x00
#define S_INVALID_TTT 0x0B, 0x4B, 0x01
#define S_TOO_MUCH 0x0B, 0x4B, 0x02
#define S_DATA_OFFSET 0x0B, 0x4B, 0x05
#define S_CRC 0x0B, 0x47, 0x05
#define S_INVALID_IU 0x05, 0x0E, 0x03

struct iconn;

/* Something waiting for aborted tasks to be over (a TMF, a logout, Python's abort). */
struct waiter {
    int pending;
    void (*done)(struct iconn *ic, struct waiter *w);
};

struct burst {
    uint32_t ttt, start, end, next_offset, next_datasn;
    int done;
};

struct itask {
    struct vio v; /* first: the volume request of the fast path */
    struct iconn *ic;
    struct itask *hnext; /* ITT hash (SCSI tasks) */
    struct list link;    /* ic->tasks (SCSI) or ic->others */
    uint64_t id;         /* up-call tag */
    int kind, state, immediate, ordered, aborted, abort_status, in_hash;
    struct waiter *waiter; /* told when this aborted task is over */
    struct waiter wait;    /* a TMF/logout waiting for the tasks it aborts */
    int found;             /* TMF: ABORT TASK found its task (or its CmdSN) */
    uint32_t itt, cmdsn;
    uint8_t bhs[BHS];
    uint8_t *extra; /* SCSI: AHS; others: the data segment */
    uint32_t extra_len;
    /* SCSI */
    int rd, wr;
    uint32_t edtl;
    uint64_t lun;
    int has_bidi;
    uint32_t bidi_len;
    /* write transfer (transfer.py WriteTransfer) */
    struct vbuf *buf;
    uint32_t xlen, next_offset, r2tsn;
    int xerr;
    uint8_t sk, asc, ascq;
    int has_unsol;
    struct burst unsol;
    struct burst *bursts;
    int nbursts;
};

struct wslot {
    struct itask *t;
    uint32_t cmdsn;
    uint8_t used, hole;
};

struct iconn {
    struct conn *c;
    struct engine *e;
    struct tandem_iscsi_params p;
    uint32_t statsn, expcmdsn, next_ttt;
    int depth, running, nimmediate;
    int slow, logging_out, stopping, pumping, repump;
    uint64_t next_id;
    uint64_t skip;
    /* a Data-Out segment being received straight into its command's buffer */
    struct {
        int active, done;
        uint8_t bhs[BHS];
        struct vbuf *buf; /* held: the command may end meanwhile */
        uint8_t *dst;
        uint32_t len, tail; /* tail: pad and data digest still to come through rbuf */
    } direct;
    int advancing; /* inside win_advance: an abort must not advance the window again */
    int nupcalls; /* up-calls Python has not answered */
    int nexec;    /* tasks executing (volume I/O or up-call) */
    struct itask *hash[HASH_SIZE];
    struct list tasks;  /* SCSI tasks */
    struct list others; /* TMF/Text/Logout in progress */
    struct wslot win[WIN_SLOTS];
    /* keepalive */
    struct timer nop;
    uint64_t last_rx, nop_sent;
    uint32_t nop_tag;
    int nop_waiting;
};

/* One outgoing PDU. */
struct opdu {
    struct sendbuf sb;
    struct vbuf *data;
    uint8_t hdr[BHS + 4];
    uint8_t tail[8];
};

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t ld64(const uint8_t *p) { return (uint64_t)ld32(p) << 32 | ld32(p + 4); }

static void le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t rd_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* pdu.py decode_lun; formats we do not address map to numbers no LUN has. */
static uint64_t decode_lun(const uint8_t *f)
{
    int rest = 0;
    for (int i = 2; i < 8; i++)
        rest |= f[i];
    if (!rest) {
        if (f[0] == 0)
            return f[1];
        if ((f[0] >> 6) == 1)
            return (uint64_t)(f[0] & 0x3F) << 8 | f[1];
    }
    return UINT64_MAX;
}

static uint32_t maxcmdsn(const struct iconn *ic)
{
    return ic->expcmdsn - 1 + (uint32_t)(ic->depth - ic->running);
}

/* --- output -------------------------------------------------------------------------------- */

static void opdu_release(struct sendbuf *b)
{
    struct opdu *o = container_of(b, struct opdu, sb);
    if (o->data)
        vbuf_put(o->data);
    free(o);
}

/* Queue a target PDU: bhs (48 bytes, data segment length filled here), its data (a
 * reference is taken). `status` takes a StatSN; a Data-In without status leaves it 0. */
static void send_pdu(struct iconn *ic, const uint8_t *bhs, int status, struct vbuf *vb,
                     const uint8_t *data, uint32_t dlen)
{
    struct conn *c = ic->c;
    if (c->state != CONN_OPEN && c->state != CONN_FINISHING)
        return;
    struct opdu *o = malloc(sizeof(*o));
    if (!o) {
        conn_abort(c);
        return;
    }
    uint8_t *h = o->hdr;
    memcpy(h, bhs, BHS);
    h[4] = 0;
    h[5] = (uint8_t)(dlen >> 16);
    h[6] = (uint8_t)(dlen >> 8);
    h[7] = (uint8_t)dlen;
    int opcode = h[0] & 0x3F;
    if (status) {
        put32(h + 24, ic->statsn);
        ic->statsn++;
    } else if (opcode != OP_DATA_IN) {
        put32(h + 24, ic->statsn);
    }
    put32(h + 28, ic->expcmdsn);
    put32(h + 32, maxcmdsn(ic));
    size_t hl = BHS;
    if (ic->p.header_digest) {
        le32(h + BHS, tandem_crc32c(0, h, BHS));
        hl += 4;
    }
    o->sb.iov[0].iov_base = h;
    o->sb.iov[0].iov_len = hl;
    o->sb.niov = 1;
    o->data = NULL;
    if (dlen) {
        o->data = vbuf_get(vb);
        o->sb.iov[1].iov_base = (void *)data;
        o->sb.iov[1].iov_len = dlen;
        uint32_t pad = -dlen & 3;
        memset(o->tail, 0, 4);
        size_t tl = pad;
        if (ic->p.data_digest) {
            uint32_t crc = tandem_crc32c(0, data, dlen);
            if (pad)
                crc = tandem_crc32c(crc, o->tail, pad);
            le32(o->tail + pad, crc);
            tl += 4;
        }
        o->sb.iov[2].iov_base = o->tail;
        o->sb.iov[2].iov_len = tl;
        o->sb.niov = tl ? 3 : 2;
    }
    o->sb.release = opdu_release;
    conn_send(c, &o->sb);
}

static void send_copy(struct iconn *ic, const uint8_t *bhs, int status, const uint8_t *data,
                      uint32_t dlen)
{
    struct vbuf *vb = NULL;
    if (dlen) {
        vb = vbuf_new(dlen);
        if (!vb) {
            conn_abort(ic->c);
            return;
        }
        memcpy(vb->data, data, dlen);
    }
    send_pdu(ic, bhs, status, vb, vb ? vb->data : NULL, dlen);
    if (vb)
        vbuf_put(vb);
}

static void send_reject(struct iconn *ic, int reason, const uint8_t *bhs)
{
    uint8_t h[BHS] = {0};
    h[0] = OP_REJECT;
    h[1] = 0x80;
    h[2] = (uint8_t)reason;
    put32(h + 16, RESERVED);
    send_copy(ic, h, 1, bhs, BHS);
}

static void send_status(struct iconn *ic, uint32_t itt, int status)
{
    uint8_t h[BHS] = {0};
    h[0] = OP_SCSI_RSP;
    h[1] = 0x80;
    h[3] = (uint8_t)status;
    put32(h + 16, itt);
    send_pdu(ic, h, 1, NULL, NULL, 0);
}

static void fixed_sense(uint8_t *s, uint8_t key, uint8_t asc, uint8_t ascq)
{
    memset(s, 0, 18);
    s[0] = 0x70;
    s[2] = key & 0x0F;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
}

/* --- tasks --------------------------------------------------------------------------------- */

static void pump(struct iconn *ic);
static void deliver(struct iconn *ic, struct itask *t, int ordered);

static struct itask **hash_slot(struct iconn *ic, uint32_t itt)
{
    return &ic->hash[(itt ^ (itt >> 8)) & (HASH_SIZE - 1)];
}

static struct itask *find_task(struct iconn *ic, uint32_t itt)
{
    for (struct itask *t = *hash_slot(ic, itt); t; t = t->hnext)
        if (t->itt == itt)
            return t;
    return NULL;
}

static void unhash(struct iconn *ic, struct itask *t)
{
    if (!t->in_hash)
        return;
    for (struct itask **pp = hash_slot(ic, t->itt); *pp; pp = &(*pp)->hnext) {
        if (*pp == t) {
            *pp = t->hnext;
            break;
        }
    }
    t->in_hash = 0;
}

static void task_free(struct itask *t)
{
    if (!list_empty(&t->link))
        list_del(&t->link);
    unhash(t->ic, t);
    vio_release(&t->v);
    if (t->buf)
        vbuf_put(t->buf);
    free(t->bursts);
    free(t->extra);
    free(t);
}

static void maybe_finish(struct iconn *ic)
{
    struct conn *c = ic->c;
    if (ic->stopping && !ic->nexec && !ic->nupcalls && c->state == CONN_OPEN)
        conn_finish(c);
}

/* The task gives back its window slot (before its status goes out, so the status carries
 * the wider window) and leaves the task table. session.py _finish. */
static void task_finish(struct iconn *ic, struct itask *t)
{
    if (t->ordered) {
        ic->running--;
        t->ordered = 0;
    } else if (t->immediate && t->state != T_HELD) {
        ic->nimmediate--;
        t->immediate = 0;
    }
    unhash(ic, t);
}

/* An aborted task is over: tell whoever waits for it. */
static void task_over(struct iconn *ic, struct itask *t)
{
    struct waiter *w = t->waiter;
    t->waiter = NULL;
    if (w && --w->pending == 0)
        w->done(ic, w);
}

/* --- the CmdSN window (cmdsn.py CommandWindow) --------------------------------------------- */

static int win_offset(const struct iconn *ic, uint32_t cmdsn, uint32_t *off)
{
    uint32_t o = cmdsn - ic->expcmdsn;
    if (o >= (uint32_t)(ic->depth - ic->running))
        return 0;
    *off = o;
    return 1;
}

static void win_advance(struct iconn *ic, struct itask *first)
{
    /* A delivered TMF may abort the next held command (win_abort_pending): that marks a
     * hole this loop skips, instead of a nested advance delivering later commands (and
     * freeing tasks the TMF's scan holds) in the middle of the TMF. */
    ic->advancing++;
    ic->expcmdsn++;
    if (first) {
        ic->running++;
        deliver(ic, first, 1);
    }
    for (;;) {
        struct wslot *s = &ic->win[ic->expcmdsn % WIN_SLOTS];
        if (!s->used || s->cmdsn != ic->expcmdsn)
            break;
        struct itask *t = s->t;
        int hole = s->hole;
        memset(s, 0, sizeof(*s));
        ic->expcmdsn++;
        if (!hole && t) {
            ic->running++;
            deliver(ic, t, 1);
        }
    }
    ic->advancing--;
}

/* -1: outside the window or a duplicate (drop it); 0: held; 1: delivered. */
static int win_receive(struct iconn *ic, struct itask *t)
{
    uint32_t off;
    if (!win_offset(ic, t->cmdsn, &off))
        return -1;
    struct wslot *s = &ic->win[t->cmdsn % WIN_SLOTS];
    if (s->used && s->cmdsn == t->cmdsn)
        return -1;
    if (off) {
        s->used = 1;
        s->hole = 0;
        s->cmdsn = t->cmdsn;
        s->t = t;
        t->state = T_HELD;
        return 0;
    }
    win_advance(ic, t);
    return 1;
}

static int win_is_pending(struct iconn *ic, uint32_t cmdsn)
{
    uint32_t off;
    return win_offset(ic, cmdsn, &off);
}

/* ABORT TASK of a command not delivered yet: it counts as received and aborted. */
static void win_abort_pending(struct iconn *ic, uint32_t cmdsn)
{
    uint32_t off;
    if (!win_offset(ic, cmdsn, &off))
        return;
    struct wslot *s = &ic->win[cmdsn % WIN_SLOTS];
    if (s->used && s->cmdsn == cmdsn && s->t) {
        task_free(s->t);
        s->t = NULL;
    }
    if (!off && !ic->advancing) {
        memset(s, 0, sizeof(*s));
        win_advance(ic, NULL);
        return;
    }
    s->used = 1;
    s->hole = 1;
    s->t = NULL;
    s->cmdsn = cmdsn;
}

static void win_complete(struct iconn *ic, struct itask *t)
{
    if (t->ordered) {
        ic->running--;
        t->ordered = 0;
    }
}

/* --- responses (session.py _respond) ------------------------------------------------------- */

/* Send a SCSI command's Data-In and status. data: `produced` bytes (may be NULL); wanted:
 * the Data-Out its CDB transfers, or -1 when unknown. */
static void respond(struct iconn *ic, struct itask *t, int status, struct vbuf *data,
                    uint32_t produced, const uint8_t *sense, uint32_t slen, int64_t wanted)
{
    task_finish(ic, t);
    if (t->aborted) {
        if (t->abort_status >= 0)
            send_status(ic, t->itt, t->abort_status);
        return;
    }
    int bidi = t->rd && t->wr;
    uint8_t rsp[BHS] = {0};
    rsp[0] = OP_SCSI_RSP;
    rsp[1] = 0x80;
    rsp[3] = (uint8_t)status;
    put32(rsp + 16, t->itt);
    uint8_t oflags = 0; /* O/U bits */
    uint32_t residual = 0;
    if (t->wr && wanted >= 0 && (uint64_t)wanted != t->edtl) {
        oflags = (uint64_t)t->edtl < (uint64_t)wanted ? 0x04 : 0x02;
        residual = (uint32_t)((uint64_t)wanted > t->edtl ? (uint64_t)wanted - t->edtl
                                                         : t->edtl - (uint64_t)wanted);
    }
    uint32_t sent = 0;
    if (bidi || !t->wr) {
        uint32_t expected = bidi ? t->bidi_len : t->edtl;
        uint8_t f = 0;
        uint32_t r = produced > expected ? produced - expected : expected - produced;
        if (produced > expected)
            f = 0x04;
        else if (produced < expected)
            f = 0x02;
        if (bidi) {
            rsp[1] |= (uint8_t)(f << 2); /* bidi O 0x10, U 0x08 */
            put32(rsp + 40, r);
        } else {
            oflags = f;
            residual = r;
        }
        sent = produced < expected ? produced : expected;
    }
    rsp[1] |= oflags;
    put32(rsp + 44, residual);
    uint32_t seg = ic->p.initiator_recv_length, burst = ic->p.max_burst_length;
    uint32_t npdus = 0;
    int collapse = sent && !bidi && !slen;
    uint32_t off = 0, datasn = 0;
    while (off < sent) {
        uint32_t burst_end = sent - off > burst ? off + burst : sent;
        while (off < burst_end) {
            uint32_t size = burst_end - off < seg ? burst_end - off : seg;
            uint8_t h[BHS] = {0};
            h[0] = OP_DATA_IN;
            int final = off + size == burst_end;
            int last = off + size == sent;
            h[1] = final ? 0x80 : 0;
            memcpy(h + 8, t->bhs + 8, 8);
            put32(h + 16, t->itt);
            put32(h + 20, RESERVED);
            put32(h + 36, datasn);
            put32(h + 40, off);
            int with_status = 0;
            if (last && collapse) {
                h[1] |= 0x80 | 0x01 | oflags;
                h[3] = (uint8_t)status;
                put32(h + 44, residual);
                with_status = 1;
            }
            send_pdu(ic, h, with_status, data, data->data + off, size);
            off += size;
            datasn++;
            npdus++;
        }
    }
    if (collapse)
        return;
    put32(rsp + 36, npdus);
    if (slen) {
        struct vbuf *sb = vbuf_new(2 + slen);
        if (!sb) {
            conn_abort(ic->c);
            return;
        }
        sb->data[0] = (uint8_t)(slen >> 8);
        sb->data[1] = (uint8_t)slen;
        memcpy(sb->data + 2, sense, slen);
        send_pdu(ic, rsp, 1, sb, sb->data, 2 + slen);
        vbuf_put(sb);
    } else {
        send_pdu(ic, rsp, 1, NULL, NULL, 0);
    }
}

static void respond_sense(struct iconn *ic, struct itask *t, uint8_t key, uint8_t asc,
                          uint8_t ascq, int64_t wanted)
{
    uint8_t s[18];
    fixed_sense(s, key, asc, ascq);
    respond(ic, t, CHECK_CONDITION, NULL, 0, s, sizeof(s), wanted);
}

/* The task is over (responded or suppressed): free it, let the connection go on. */
static void task_done(struct iconn *ic, struct itask *t, int was_exec)
{
    struct conn *c = ic->c;
    if (was_exec)
        ic->nexec--;
    if (t->aborted)
        task_over(ic, t);
    task_free(t);
    if (!ic->stopping)
        pump(ic);
    maybe_finish(ic);
    (void)c;
}

/* The Data-Out a WRITE(6/10/16) CDB transfers (opcodes.py _blocks), -1 for other CDBs. */
static int64_t write_wanted(const uint8_t *cdb)
{
    switch (cdb[0]) {
    case 0x0A:
        return (int64_t)(cdb[4] ? cdb[4] : 256) * BLK;
    case 0x2A:
        return (int64_t)((uint32_t)cdb[7] << 8 | cdb[8]) * BLK;
    case 0x8A:
        return (int64_t)ld32(cdb + 10) * BLK;
    }
    return -1;
}

/* --- the fast path ------------------------------------------------------------------------- */

/* sbc.py read/write/synchronize_cache with opcodes.py's usage masks: 1 when this CDB is
 * fully checked and runs here; the volume request goes into t->v. */
static int fast_cdb(struct iconn *ic, struct itask *t, int64_t *wanted)
{
    const uint8_t *cdb = t->bhs + 32;
    uint8_t op = cdb[0];
    uint64_t lba;
    uint32_t blocks;
    int write = 0, sync = 0, fua = 0;
    *wanted = -1;
    if (ic->slow || t->lun != 0 || t->extra_len || t->has_bidi)
        return 0;
    switch (op) {
    case 0x08: /* READ(6) */
    case 0x0A: /* WRITE(6) */
        if ((cdb[1] & ~0x1F) || cdb[5])
            return 0;
        lba = (uint64_t)(cdb[1] & 0x1F) << 16 | (uint64_t)cdb[2] << 8 | cdb[3];
        blocks = cdb[4] ? cdb[4] : 256;
        write = op == 0x0A;
        break;
    case 0x28: /* READ(10) */
    case 0x2A: /* WRITE(10) */
        write = op == 0x2A;
        if ((cdb[1] & ~(write ? 0x1A : 0x1E)) || (cdb[6] & ~0x1F) || cdb[9])
            return 0;
        lba = ld32(cdb + 2);
        blocks = (uint32_t)cdb[7] << 8 | cdb[8];
        fua = write && (cdb[1] & 0x08);
        break;
    case 0x88: /* READ(16) */
    case 0x8A: /* WRITE(16) */
        write = op == 0x8A;
        if ((cdb[1] & ~(write ? 0x1A : 0x1E)) || (cdb[14] & ~0x1F) || cdb[15])
            return 0;
        lba = ld64(cdb + 2);
        blocks = ld32(cdb + 10);
        fua = write && (cdb[1] & 0x08);
        break;
    case 0x35: /* SYNCHRONIZE CACHE(10) */
        if ((cdb[1] & ~0x06) || (cdb[6] & ~0x1F) || cdb[9])
            return 0;
        lba = ld32(cdb + 2);
        blocks = (uint32_t)cdb[7] << 8 | cdb[8];
        sync = 1;
        break;
    case 0x91: /* SYNCHRONIZE CACHE(16) */
        if ((cdb[1] & ~0x06) || (cdb[14] & ~0x1F) || cdb[15])
            return 0;
        lba = ld64(cdb + 2);
        blocks = ld32(cdb + 10);
        sync = 1;
        break;
    default:
        return 0;
    }
    uint64_t capacity = vol_size(ic->e) / BLK;
    if (lba > capacity || blocks > capacity - lba)
        return 0; /* LBA OUT OF RANGE: Python's sense */
    struct vio *v = &t->v;
    memset(v, 0, sizeof(*v));
    v->frontend = ic->p.frontend;
    if (sync) {
        if (t->rd || t->wr)
            return 0;
        v->op = TANDEM_VIO_FLUSH;
        return 1;
    }
    if (!blocks || blocks > MAX_TRANSFER_BLOCKS)
        return 0;
    uint64_t want = (uint64_t)blocks * BLK;
    if (!write) {
        if (!t->rd || t->wr)
            return 0;
        v->op = TANDEM_VIO_READ;
        v->offset = lba * BLK;
        v->length = (uint32_t)want;
        return 1;
    }
    if (!t->wr || t->rd || vol_readonly(ic->e))
        return 0;
    /* sbc.py _write_data: the whole blocks of the Data-Out, a fraction is refused */
    uint32_t len = t->edtl >= want ? (uint32_t)want : t->edtl;
    if (len % BLK || !len)
        return 0;
    *wanted = (int64_t)want;
    v->op = TANDEM_VIO_WRITE;
    v->flags = fua ? TANDEM_VIO_FUA : 0;
    v->offset = lba * BLK;
    v->length = len;
    v->buf = vbuf_get(t->buf);
    return 1;
}

static void io_error_sense(int status, int writing, uint8_t *k, uint8_t *a, uint8_t *q)
{
    *q = 0;
    switch (status) {
    case EROFS:
        *k = 0x07, *a = 0x27;
        return;
    case ENOSPC:
        *k = 0x07, *a = 0x27, *q = 0x07;
        return;
    case EINVAL:
        *k = 0x05, *a = 0x21;
        return;
    }
    *k = 0x03;
    *a = writing ? 0x0C : 0x11;
}

static void fast_done(struct vio *v)
{
    struct itask *t = container_of(v, struct itask, v);
    struct iconn *ic = t->ic;
    struct conn *c = ic->c;
    int64_t wanted = v->op == TANDEM_VIO_WRITE ? write_wanted(t->bhs + 32) : -1;
    if (v->status) {
        uint8_t k, a, q;
        io_error_sense(v->status, v->op != TANDEM_VIO_READ, &k, &a, &q);
        respond_sense(ic, t, k, a, q, wanted);
    } else if (v->op == TANDEM_VIO_READ) {
        respond(ic, t, 0, v->buf, v->length, NULL, 0, -1);
    } else {
        respond(ic, t, 0, NULL, 0, NULL, 0, wanted);
    }
    task_done(ic, t, 1);
    conn_put(c);
}

static void upcall(struct iconn *ic, struct itask *t, const uint8_t *data, uint32_t dlen,
                   int flags)
{
    struct conn *c = ic->c;
    uint32_t hl = BHS + (t->kind == K_SCSI ? t->extra_len : 0);
    struct tandem_event ev = {.type = TANDEM_EV_UPCALL,
                              .conn = c->id,
                              .tag = t->id,
                              .op = (uint8_t)t->kind,
                              .flags = (uint8_t)flags,
                              .offset = hl,
                              .length = dlen};
    ev.data = malloc((size_t)hl + dlen + 1);
    if (!ev.data) {
        conn_abort(c);
        return;
    }
    memcpy(ev.data, t->bhs, BHS);
    if (hl > BHS)
        memcpy((uint8_t *)ev.data + BHS, t->extra, hl - BHS);
    if (dlen)
        memcpy((uint8_t *)ev.data + hl, data, dlen);
    ev.data_len = hl + dlen;
    t->state = T_UP;
    ic->nupcalls++;
    conn_get(c);
    ic->e->tstats.upcalls++;
    ic->e->tstats.fe_upcalls[ic->p.frontend]++;
    eng_event(ic->e, &ev);
}

/* All Data-Out is in: run the command. */
static void execute(struct iconn *ic, struct itask *t)
{
    struct conn *c = ic->c;
    if (t->xerr) {
        /* residuals as session.py computes them; only the CDBs this file knows */
        respond_sense(ic, t, t->sk, t->asc, t->ascq, t->extra_len ? -1 : write_wanted(t->bhs + 32));
        task_done(ic, t, 0);
        return;
    }
    int64_t wanted;
    ic->nexec++;
    if (fast_cdb(ic, t, &wanted)) {
        t->state = T_EXEC;
        t->v.done = fast_done;
        conn_get(c);
        vio_submit(ic->e, &t->v);
        return;
    }
    vio_release(&t->v);
    upcall(ic, t, t->buf ? t->buf->data : NULL, t->buf ? t->xlen : 0, 0);
}

/* --- write transfers (transfer.py WriteTransfer) ------------------------------------------- */

static void xfail(struct itask *t, uint8_t k, uint8_t a, uint8_t q)
{
    if (!t->xerr) {
        t->xerr = 1;
        t->sk = k, t->asc = a, t->ascq = q;
    }
}

static int xcomplete(const struct itask *t)
{
    if (t->has_unsol && !t->unsol.done)
        return 0;
    if (t->nbursts)
        return 0;
    return t->xerr || t->next_offset >= t->xlen;
}

static void send_r2ts(struct iconn *ic, struct itask *t)
{
    if (t->xerr || (t->has_unsol && !t->unsol.done))
        return;
    if (!t->bursts && t->next_offset < t->xlen) {
        t->bursts = calloc(ic->p.max_outstanding_r2t, sizeof(struct burst));
        if (!t->bursts) {
            conn_abort(ic->c);
            return;
        }
    }
    while (t->next_offset < t->xlen && t->nbursts < (int)ic->p.max_outstanding_r2t) {
        uint32_t size = t->xlen - t->next_offset;
        if (size > ic->p.max_burst_length)
            size = ic->p.max_burst_length;
        ic->next_ttt++;
        if (ic->next_ttt == RESERVED)
            ic->next_ttt = 0;
        struct burst *b = &t->bursts[t->nbursts++];
        *b = (struct burst){ic->next_ttt, t->next_offset, t->next_offset + size, t->next_offset,
                            0, 0};
        uint8_t h[BHS] = {0};
        h[0] = OP_R2T;
        h[1] = 0x80;
        memcpy(h + 8, t->bhs + 8, 8);
        put32(h + 16, t->itt);
        put32(h + 20, b->ttt);
        put32(h + 36, t->r2tsn++);
        put32(h + 40, t->next_offset);
        put32(h + 44, size);
        send_pdu(ic, h, 0, NULL, NULL, 0);
        t->next_offset += size;
    }
}

/* The started task looks at its transfer again (session.py _execute's loop). */
static void xprogress(struct iconn *ic, struct itask *t)
{
    if (t->state != T_COLLECT)
        return;
    send_r2ts(ic, t);
    if (xcomplete(t))
        execute(ic, t);
}

static int xinit(struct iconn *ic, struct itask *t, const uint8_t *imm, uint32_t n, int follows)
{
    uint32_t length = t->edtl;
    if (length > ic->p.max_data_transfer) {
        xfail(t, S_INVALID_IU); /* refused before allocating */
        length = 0;
    }
    t->xlen = length;
    /* no zeroing: a command runs only once every byte arrived (or failed, and then its
     * data is not used) */
    t->buf = vol_payload(ic->e, length ? length : 1);
    if (!t->buf)
        return -1;
    if (n && !t->xerr) {
        if (!ic->p.immediate_data || n > (length < ic->p.first_burst_length ? length
                                                                          : ic->p.first_burst_length))
            xfail(t, S_TOO_MUCH);
        else
            memcpy(t->buf->data, imm, n);
    }
    t->next_offset = n;
    if (follows && !ic->p.initial_r2t) {
        uint32_t end = ic->p.first_burst_length < t->edtl ? ic->p.first_burst_length : t->edtl;
        t->has_unsol = 1;
        t->unsol = (struct burst){RESERVED, n, end, n, 0, n >= end};
    }
    return 0;
}

/* One Data-Out for the task; 1 when the task should look at its transfer again. */
static int xdata(struct iconn *ic, struct itask *t, const uint8_t *h, const uint8_t *data,
                 uint32_t len, int digest_ok)
{
    (void)ic;
    int had = t->xerr;
    uint32_t ttt = ld32(h + 20), datasn = ld32(h + 36), offset = ld32(h + 40);
    int final = h[1] & 0x80;
    struct burst *b = NULL;
    int bi = -1;
    if (ttt == RESERVED) {
        if (!t->has_unsol || t->unsol.done) {
            xfail(t, S_TOO_MUCH);
            return !had;
        }
        b = &t->unsol;
    } else {
        for (int i = 0; i < t->nbursts; i++)
            if (t->bursts[i].ttt == ttt) {
                b = &t->bursts[i];
                bi = i;
            }
        if (!b) {
            xfail(t, S_INVALID_TTT);
            return !had;
        }
    }
    if (!digest_ok)
        xfail(t, S_CRC);
    else if (datasn != b->next_datasn)
        xfail(t, S_DATA_PHASE);
    else if (offset != b->next_offset)
        xfail(t, S_DATA_OFFSET);
    else if ((uint64_t)offset + len > b->end)
        xfail(t, S_TOO_MUCH);
    else if (!t->xerr && data != t->buf->data + offset) /* unless received in place */
        memcpy(t->buf->data + offset, data, len);
    b->next_datasn++;
    b->next_offset = offset + len;
    int closed = 0;
    if (bi < 0) {
        if (final) {
            b->done = closed = 1;
            uint32_t upto = b->next_offset < b->end ? b->next_offset : b->end;
            if (upto > t->next_offset)
                t->next_offset = upto;
        }
    } else if (final || b->next_offset >= b->end) {
        if (b->next_offset < b->end)
            xfail(t, S_DATA_PHASE);
        t->bursts[bi] = t->bursts[--t->nbursts];
        closed = 1;
    }
    return closed || (t->xerr && !had);
}

/* --- aborting (session.py abort_tasks) ----------------------------------------------------- */

/* Abort one task: held ones vanish, ones waiting for data end now, executing ones are
 * waited for (w) and answer nothing, or `status`. */
static void abort_task(struct iconn *ic, struct itask *t, struct waiter *w, int status)
{
    if (t->aborted)
        return;
    if (t->state == T_HELD) {
        struct wslot *s = &ic->win[t->cmdsn % WIN_SLOTS];
        if (!t->immediate && s->used && s->t == t) {
            s->t = NULL;
            win_abort_pending(ic, t->cmdsn);
        }
        task_free(t);
        return;
    }
    t->aborted = 1;
    t->abort_status = status;
    if (t->state == T_COLLECT) {
        task_finish(ic, t);
        if (status >= 0)
            send_status(ic, t->itt, status);
        task_free(t);
        return;
    }
    /* executing: over when its result comes */
    unhash(ic, t);
    if (w) {
        w->pending++;
        t->waiter = w;
    }
}

/* lun: UINT64_MAX - 1 for every task. */
static void abort_matching(struct iconn *ic, uint64_t lun, struct waiter *w, int status)
{
    for (struct list *p = ic->tasks.next; p != &ic->tasks;) {
        struct itask *t = container_of(p, struct itask, link);
        p = p->next;
        if (lun == UINT64_MAX - 1 || t->lun == lun)
            abort_task(ic, t, w, status);
    }
}

/* --- PDUs from the initiator --------------------------------------------------------------- */

static void other_waited(struct iconn *ic, struct waiter *w)
{
    struct itask *t = container_of(w, struct itask, wait);
    if (t->kind == K_TMF)
        upcall(ic, t, t->extra, t->extra_len, t->found);
    else
        upcall(ic, t, t->extra, t->extra_len, 0);
}

static void deliver_tmf(struct iconn *ic, struct itask *t)
{
    int fn = t->bhs[1] & 0x7F;
    uint64_t lun = decode_lun(t->bhs + 8);
    t->wait.pending = 1; /* held until the scan is over */
    t->wait.done = other_waited;
    switch (fn) {
    case 1: { /* ABORT TASK */
        uint32_t rtt = ld32(t->bhs + 20), ref = ld32(t->bhs + 32);
        struct itask *x = find_task(ic, rtt);
        if (x) {
            abort_task(ic, x, &t->wait, -1);
            t->found = 1;
        } else if (win_is_pending(ic, ref)) {
            win_abort_pending(ic, ref);
            t->found = 1;
        }
        break;
    }
    case 2: /* ABORT TASK SET */
    case 4: /* CLEAR TASK SET */
    case 5: /* LOGICAL UNIT RESET */
        if (lun == 0) /* the LUN this engine serves; Python answers others NO LUN */
            abort_matching(ic, lun, &t->wait, -1);
        break;
    case 6: /* TARGET WARM RESET */
    case 7: /* TARGET COLD RESET */
        abort_matching(ic, UINT64_MAX - 1, &t->wait, -1);
        break;
    }
    if (--t->wait.pending == 0)
        other_waited(ic, &t->wait);
}

static void deliver_logout(struct iconn *ic, struct itask *t)
{
    int reason = t->bhs[1] & 0x7F;
    uint16_t cid = (uint16_t)(t->bhs[20] << 8 | t->bhs[21]);
    t->wait.pending = 1;
    t->wait.done = other_waited;
    if (reason == 0 || (reason == 1 && cid == ic->p.cid)) {
        ic->logging_out = 1;
        abort_matching(ic, UINT64_MAX - 1, &t->wait, -1);
    }
    if (--t->wait.pending == 0)
        other_waited(ic, &t->wait);
}

static void answer_nop(struct iconn *ic, struct itask *t)
{
    win_complete(ic, t);
    uint8_t h[BHS] = {0};
    h[0] = OP_NOP_IN;
    h[1] = 0x80;
    memcpy(h + 8, t->bhs + 8, 8);
    put32(h + 16, t->itt);
    put32(h + 20, RESERVED);
    uint32_t n = t->extra_len < ic->p.initiator_recv_length ? t->extra_len
                                                            : ic->p.initiator_recv_length;
    send_copy(ic, h, 1, t->extra, n);
    task_free(t);
}

/* A request's turn came (CmdSN order, or at once when immediate). */
static void deliver(struct iconn *ic, struct itask *t, int ordered)
{
    t->ordered = ordered;
    switch (t->kind) {
    case K_SCSI:
        if (!ordered)
            ic->nimmediate++;
        if (t->buf) {
            t->state = T_COLLECT;
            xprogress(ic, t);
        } else {
            t->state = T_COLLECT;
            execute(ic, t);
        }
        return;
    case K_NOP:
        answer_nop(ic, t);
        return;
    case K_TMF:
        list_add_tail(&ic->others, &t->link);
        t->state = T_WAIT;
        deliver_tmf(ic, t);
        return;
    case K_TEXT:
        list_add_tail(&ic->others, &t->link);
        upcall(ic, t, t->extra, t->extra_len, 0);
        return;
    case K_LOGOUT:
        list_add_tail(&ic->others, &t->link);
        t->state = T_WAIT;
        deliver_logout(ic, t);
        return;
    }
}

static struct itask *task_new(struct iconn *ic, int kind, const uint8_t *h)
{
    struct itask *t = calloc(1, sizeof(*t));
    if (!t) {
        conn_abort(ic->c);
        return NULL;
    }
    t->ic = ic;
    t->kind = kind;
    t->id = ++ic->next_id;
    t->abort_status = -1;
    list_init(&t->link);
    memcpy(t->bhs, h, BHS);
    t->itt = ld32(h + 16);
    t->cmdsn = ld32(h + 24);
    t->immediate = !!(h[0] & 0x40);
    return t;
}

/* A numbered request: now when immediate, else through the window (or dropped). */
static void ordered_request(struct iconn *ic, struct itask *t)
{
    if (t->immediate) {
        deliver(ic, t, 0);
        return;
    }
    if (win_receive(ic, t) < 0)
        task_free(t); /* outside the window, or a duplicate: dropped */
}

static void scsi_command(struct iconn *ic, const uint8_t *h, const uint8_t *ahs, uint32_t ahslen,
                         const uint8_t *data, uint32_t dlen)
{
    ic->e->tstats.requests++;
    ic->e->tstats.fe_requests[ic->p.frontend]++;
    /* pdu.py ScsiCommand._build: extended CDB and bidirectional read length AHSs only */
    int has_bidi = 0;
    uint32_t bidi_len = 0;
    int ext = 0;
    for (uint32_t pos = 0; pos < ahslen;) {
        if (ahslen - pos < 4) {
            send_reject(ic, RJ_INVALID_PDU_FIELD, h);
            return;
        }
        uint32_t len = (uint32_t)ahs[pos] << 8 | ahs[pos + 1];
        uint32_t end = pos + 3 + len;
        if (!len || end > ahslen) {
            send_reject(ic, RJ_INVALID_PDU_FIELD, h);
            return;
        }
        int kind = ahs[pos + 2];
        if (kind == 1 && len > 1) {
            ext = 1;
        } else if (kind == 2 && len == 5) {
            has_bidi = 1;
            bidi_len = ld32(ahs + pos + 4);
        } else {
            send_reject(ic, RJ_INVALID_PDU_FIELD, h);
            return;
        }
        pos = end + (-(3 + len) & 3);
    }
    if (ic->logging_out)
        return;
    uint32_t itt = ld32(h + 16);
    if (itt == RESERVED) {
        send_reject(ic, RJ_INVALID_PDU_FIELD, h);
        return;
    }
    if (find_task(ic, itt)) {
        send_reject(ic, RJ_TASK_IN_PROGRESS, h);
        return;
    }
    if ((h[0] & 0x40) && ic->nimmediate >= MAX_IMMEDIATE) {
        send_reject(ic, RJ_IMMEDIATE_REJECT, h);
        return;
    }
    struct itask *t = task_new(ic, K_SCSI, h);
    if (!t)
        return;
    t->rd = !!(h[1] & 0x40);
    t->wr = !!(h[1] & 0x20);
    t->edtl = ld32(h + 20);
    t->lun = decode_lun(h + 8);
    t->has_bidi = has_bidi;
    t->bidi_len = bidi_len;
    if (ahslen) {
        t->extra = malloc(ahslen);
        if (!t->extra) {
            free(t);
            conn_abort(ic->c);
            return;
        }
        memcpy(t->extra, ahs, ahslen);
        t->extra_len = ahslen;
    }
    (void)ext;
    if (t->wr && xinit(ic, t, data, dlen, !(h[1] & 0x80)) < 0) {
        task_free(t);
        conn_abort(ic->c);
        return;
    }
    t->in_hash = 1;
    struct itask **slot = hash_slot(ic, itt);
    t->hnext = *slot;
    *slot = t;
    list_add_tail(&ic->tasks, &t->link);
    ordered_request(ic, t);
}

static void data_out(struct iconn *ic, const uint8_t *h, const uint8_t *data, uint32_t dlen,
                     int digest_ok)
{
    struct itask *t = find_task(ic, ld32(h + 16));
    if (!t || !t->buf || (t->state != T_HELD && t->state != T_COLLECT))
        return; /* the command ended (aborted, or failed early): its data goes nowhere */
    if (xdata(ic, t, h, data, dlen, digest_ok))
        xprogress(ic, t);
}

static void whole_request(struct iconn *ic, int kind, const uint8_t *h, const uint8_t *data,
                          uint32_t dlen);

static void nop_out(struct iconn *ic, const uint8_t *h, const uint8_t *data, uint32_t dlen)
{
    if (ld32(h + 16) == RESERVED) {
        /* an answer to our NOP-In (or a ping that wants none): no CmdSN, no reply */
        if (ld32(h + 20) != RESERVED && ic->nop_waiting && ld32(h + 20) == ic->nop_tag)
            ic->nop_waiting = 0;
        return;
    }
    whole_request(ic, K_NOP, h, data, dlen);
}

/* A request kept whole (its data copied) and run in CmdSN order. */
static void whole_request(struct iconn *ic, int kind, const uint8_t *h, const uint8_t *data,
                          uint32_t dlen)
{
    struct itask *t = task_new(ic, kind, h);
    if (!t)
        return;
    if (dlen) {
        t->extra = malloc(dlen);
        if (!t->extra) {
            free(t);
            conn_abort(ic->c);
            return;
        }
        memcpy(t->extra, data, dlen);
        t->extra_len = dlen;
    }
    ordered_request(ic, t);
}

static void handle_pdu(struct iconn *ic, const uint8_t *h, const uint8_t *ahs, uint32_t ahslen,
                       const uint8_t *data, uint32_t dlen, int bad_digest)
{
    int op = h[0] & 0x3F;
    switch (op) {
    case OP_NOP_OUT:
    case OP_SCSI_CMD:
    case OP_TMF_REQ:
    case OP_LOGIN_REQ:
    case OP_TEXT_REQ:
    case OP_DATA_OUT:
    case OP_LOGOUT_REQ:
    case OP_SNACK:
    case 0x20: case 0x21: case 0x22: case 0x23: case 0x24: case 0x25: case 0x26: case 0x31:
    case 0x32: case 0x3F:
        break;
    default:
        send_reject(ic, RJ_COMMAND_NOT_SUPPORTED, h);
        return;
    }
    if (op != OP_SCSI_CMD && ahslen) { /* pdu.py parses every AHS, only SCSI uses them */
        for (uint32_t pos = 0; pos < ahslen;) {
            uint32_t len = ahslen - pos < 4 ? 0 : (uint32_t)ahs[pos] << 8 | ahs[pos + 1];
            uint32_t end = pos + 3 + len;
            if (!len || end > ahslen) {
                send_reject(ic, RJ_INVALID_PDU_FIELD, h);
                return;
            }
            pos = end + (-(3 + len) & 3);
        }
    }
    if (bad_digest) {
        send_reject(ic, RJ_DATA_DIGEST, h);
        if (op == OP_DATA_OUT)
            data_out(ic, h, data, dlen, 0); /* fails its command */
        return; /* anything else is not considered received */
    }
    switch (op) {
    case OP_SCSI_CMD:
        scsi_command(ic, h, ahs, ahslen, data, dlen);
        return;
    case OP_DATA_OUT:
        data_out(ic, h, data, dlen, 1);
        return;
    case OP_NOP_OUT:
        nop_out(ic, h, data, dlen);
        return;
    case OP_TMF_REQ:
        whole_request(ic, K_TMF, h, data, dlen);
        return;
    case OP_TEXT_REQ:
        whole_request(ic, K_TEXT, h, data, dlen);
        return;
    case OP_LOGOUT_REQ:
        whole_request(ic, K_LOGOUT, h, data, dlen);
        return;
    case OP_SNACK:
    case OP_LOGIN_REQ:
        send_reject(ic, RJ_PROTOCOL_ERROR, h); /* no SNACK at ERL 0 */
        return;
    default:
        send_reject(ic, RJ_COMMAND_NOT_SUPPORTED, h); /* a target's PDU */
        return;
    }
}

#define DIRECT_MIN (64u << 10)

/* A large Data-Out segment for a command collecting data goes straight into the command's
 * buffer at its offset (no copy out of rbuf); 1 if started. The checks of xdata() still run
 * once it is in: data that breaks them fails the command, so where it landed is unused. */
static int direct_start(struct iconn *ic, const uint8_t *h, size_t dstart, uint32_t dlen,
                        size_t tail)
{
    struct conn *c = ic->c;
    if ((h[0] & 0x3F) != OP_DATA_OUT || dlen < DIRECT_MIN || h[4])
        return 0;
    struct itask *t = find_task(ic, ld32(h + 16));
    uint32_t off = ld32(h + 40);
    if (!t || !t->buf || t->xerr || (t->state != T_HELD && t->state != T_COLLECT) ||
        off > t->xlen || dlen > t->xlen - off)
        return 0;
    memcpy(ic->direct.bhs, h, BHS);
    ic->direct.buf = vbuf_get(t->buf);
    ic->direct.dst = t->buf->data + off;
    ic->direct.len = dlen;
    ic->direct.tail = (uint32_t)(tail - dlen);
    ic->direct.active = 1;
    ic->direct.done = 0;
    c->rpos += dstart;
    if (conn_recv_direct(c, ic->direct.dst, dlen))
        ic->direct.done = 1;
    return 1;
}

/* The segment is in and its pad and digest are in rbuf: take it like any Data-Out. */
static void direct_finish(struct iconn *ic)
{
    struct conn *c = ic->c;
    const uint8_t *rest = c->rbuf + c->rpos;
    uint32_t pad = -ic->direct.len & 3;
    int ok = 1;
    if (ic->p.data_digest) {
        uint32_t crc = tandem_crc32c(0, ic->direct.dst, ic->direct.len);
        if (pad)
            crc = tandem_crc32c(crc, rest, pad);
        ok = rd_le32(rest + pad) == crc;
    }
    c->rpos += ic->direct.tail;
    ic->direct.active = 0;
    struct vbuf *b = ic->direct.buf;
    ic->direct.buf = NULL;
    struct itask *t = find_task(ic, ld32(ic->direct.bhs + 16));
    if (!ok)
        send_reject(ic, RJ_DATA_DIGEST, ic->direct.bhs);
    if (t && t->buf == b) /* still the command it was received for */
        data_out(ic, ic->direct.bhs, ic->direct.dst, ic->direct.len, ok);
    vbuf_put(b);
}

static void direct_drop(struct iconn *ic)
{
    if (!ic->direct.active)
        return;
    ic->c->dbuf = NULL;
    vbuf_put(ic->direct.buf);
    ic->direct.buf = NULL;
    ic->direct.active = 0;
}

static int can_parse(const struct iconn *ic)
{
    const struct conn *c = ic->c;
    return !ic->stopping && c->state == CONN_OPEN && c->sqbytes < MAX_QUEUED;
}

static void pump(struct iconn *ic)
{
    struct conn *c = ic->c;
    if (ic->pumping) {
        ic->repump = 1;
        return;
    }
    ic->pumping = 1;
    conn_get(c);
    do {
        ic->repump = 0;
        while (can_parse(ic)) {
            size_t avail = c->rend - c->rpos;
            if (ic->direct.active) {
                if (!ic->direct.done || avail < ic->direct.tail)
                    break;
                direct_finish(ic);
                continue;
            }
            if (ic->skip) { /* an oversize segment, thrown away as it arrives */
                size_t n = avail < ic->skip ? avail : (size_t)ic->skip;
                c->rpos += n;
                ic->skip -= n;
                if (ic->skip)
                    break;
                continue;
            }
            if (avail < BHS)
                break;
            const uint8_t *h = c->rbuf + c->rpos;
            uint32_t ahslen = (uint32_t)h[4] * 4;
            uint32_t dlen = (uint32_t)h[5] << 16 | (uint32_t)h[6] << 8 | h[7];
            size_t hend = BHS + ahslen;
            size_t dstart = hend + (ic->p.header_digest ? 4 : 0);
            if (avail < dstart)
                break;
            if (ic->p.header_digest && rd_le32(h + hend) != tandem_crc32c(0, h, hend)) {
                /* the lengths cannot be trusted (RFC 7143 7.8): drop the connection */
                conn_proto_event(ic->c, "header digest mismatch: dropping the connection");
                ic->stopping = 1;
                conn_abort(c);
                break;
            }
            size_t padded = dlen + (-dlen & 3);
            size_t tail = padded + (ic->p.data_digest && dlen ? 4 : 0);
            if (dlen > ic->p.target_recv_length) {
                uint8_t bhs[BHS];
                memcpy(bhs, h, BHS);
                c->rpos += dstart;
                avail -= dstart;
                size_t take = tail < avail ? tail : avail;
                c->rpos += take;
                ic->skip = tail - take;
                send_reject(ic, RJ_PROTOCOL_ERROR, bhs);
                continue;
            }
            if (avail < dstart + tail) {
                if (direct_start(ic, h, dstart, dlen, tail))
                    continue;
                break;
            }
            const uint8_t *data = h + dstart;
            int bad = ic->p.data_digest && dlen &&
                      rd_le32(data + padded) != tandem_crc32c(0, data, padded);
            c->rpos += dstart + tail;
            handle_pdu(ic, h, h + BHS, ahslen, data, dlen, bad);
        }
    } while (ic->repump);
    ic->pumping = 0;
    maybe_finish(ic);
    conn_arm_recv(c);
    conn_put(c);
}

/* --- the connection ------------------------------------------------------------------------ */

static void ic_on_data(struct conn *c)
{
    struct iconn *ic = c->proto;
    ic->last_rx = mono_ns();
    pump(ic);
}

static void ic_on_direct(struct conn *c)
{
    struct iconn *ic = c->proto;
    ic->last_rx = mono_ns();
    ic->direct.done = 1;
    pump(ic);
}

static void ic_on_eof(struct conn *c, int err)
{
    struct iconn *ic = c->proto;
    ic->stopping = 1;
    direct_drop(ic); /* the peer left in the middle of a segment */
    timer_cancel(&ic->nop);
    if (err) {
        conn_abort(c);
        return;
    }
    conn_get(c);
    maybe_finish(ic);
    conn_put(c);
}

static void ic_on_sent(struct conn *c)
{
    struct iconn *ic = c->proto;
    if (c->state == CONN_OPEN && !ic->stopping)
        pump(ic);
}

static void free_all_tasks(struct iconn *ic)
{
    for (int i = 0; i < WIN_SLOTS; i++)
        if (ic->win[i].used && ic->win[i].t) {
            struct itask *t = ic->win[i].t;
            ic->win[i].t = NULL;
            if (list_empty(&t->link) || t->kind == K_SCSI)
                task_free(t);
        }
    while (!list_empty(&ic->tasks))
        task_free(container_of(ic->tasks.next, struct itask, link));
    while (!list_empty(&ic->others))
        task_free(container_of(ic->others.next, struct itask, link));
}

static void ic_on_destroy(struct conn *c)
{
    struct iconn *ic = c->proto;
    timer_cancel(&ic->nop);
    if (ic->direct.buf)
        vbuf_put(ic->direct.buf);
    free_all_tasks(ic);
    struct tandem_event ev = {.type = TANDEM_EV_CONN_CLOSED, .conn = c->id};
    eng_event(ic->e, &ev);
    free(ic);
}

static const struct conn_ops iscsi_conn_ops = {
    .on_data = ic_on_data,
    .on_direct = ic_on_direct,
    .on_eof = ic_on_eof,
    .on_sent = ic_on_sent,
    .on_destroy = ic_on_destroy,
};

/* connection.py _keepalive: probe an idle initiator, drop one that stopped answering. */
static void nop_tick(struct engine *e, struct timer *tm)
{
    struct iconn *ic = container_of(tm, struct iconn, nop);
    struct conn *c = ic->c;
    uint64_t interval = (uint64_t)(ic->p.nop_interval * 1e9);
    uint64_t timeout = (uint64_t)(ic->p.nop_timeout * 1e9);
    if (c->state != CONN_OPEN || ic->stopping)
        return;
    uint64_t now = mono_ns();
    if (ic->nop_waiting) {
        uint64_t since = ic->nop_sent > ic->last_rx ? ic->nop_sent : ic->last_rx;
        if (now - since >= timeout) {
            eng_log(e, 30, "iSCSI connection %llu: initiator stopped answering: dropping it",
                    (unsigned long long)c->id);
            ic->stopping = 1;
            c->refs++;
            conn_abort(c);
            conn_put(c);
            return;
        }
    } else if (now - ic->last_rx >= interval) {
        ic->nop_tag = (ic->nop_tag + 1) % RESERVED;
        ic->nop_waiting = 1;
        ic->nop_sent = now;
        uint8_t h[BHS] = {0};
        h[0] = OP_NOP_IN;
        h[1] = 0x80;
        put32(h + 16, RESERVED);
        put32(h + 20, ic->nop_tag);
        send_pdu(ic, h, 0, NULL, NULL, 0);
    }
    timer_arm(e, tm, (interval < timeout ? interval : timeout) / 2);
}

struct conn *iscsi_conn_new(struct engine *e, uint64_t id, int fd,
                            const struct tandem_iscsi_params *p, const void *pre, size_t prelen)
{
    /* a whole PDU must fit in the receive buffer twice over (see pump) */
    if (prelen > ISCSI_RBUF / 2 || p->target_recv_length > ISCSI_RBUF / 2 - 4096 ||
        p->frontend < 0 || p->frontend >= TANDEM_FRONTENDS ||
        p->cmd_window < 1 || p->cmd_window > WIN_SLOTS / 2)
        return NULL;
    struct iconn *ic = calloc(1, sizeof(*ic));
    if (!ic)
        return NULL;
    struct conn *c = conn_new(e, id, fd, &iscsi_conn_ops, ic, ISCSI_RBUF);
    if (!c) {
        free(ic);
        return NULL;
    }
    c->kind = TANDEM_CONN_ISCSI;
    ic->c = c;
    ic->e = e;
    ic->p = *p;
    if (!ic->p.max_outstanding_r2t)
        ic->p.max_outstanding_r2t = 1;
    if (ic->p.initiator_recv_length < 512)
        ic->p.initiator_recv_length = 512;
    if (!ic->p.max_burst_length)
        ic->p.max_burst_length = 262144;
    ic->statsn = p->statsn;
    ic->expcmdsn = p->expcmdsn;
    ic->depth = (int)p->cmd_window;
    ic->slow = 1; /* until Python says the nexus has no unit attention pending */
    ic->last_rx = mono_ns();
    list_init(&ic->tasks);
    list_init(&ic->others);
    ic->nop.fn = nop_tick;
    list_init(&ic->nop.link);
    if (p->nop_interval > 0 && p->nop_timeout > 0) {
        double d = p->nop_interval < p->nop_timeout ? p->nop_interval : p->nop_timeout;
        timer_arm(e, &ic->nop, (uint64_t)(d / 2 * 1e9));
    }
    if (prelen) {
        memcpy(c->rbuf, pre, prelen);
        c->rend = prelen;
    }
    pump(ic);
    return c;
}

/* --- Python's answers ---------------------------------------------------------------------- */

static struct itask *find_upcall(struct iconn *ic, uint64_t tag)
{
    for (struct list *p = ic->tasks.next; p != &ic->tasks; p = p->next) {
        struct itask *t = container_of(p, struct itask, link);
        if (t->id == tag && t->state == T_UP)
            return t;
    }
    for (struct list *p = ic->others.next; p != &ic->others; p = p->next) {
        struct itask *t = container_of(p, struct itask, link);
        if (t->id == tag && t->state == T_UP)
            return t;
    }
    return NULL;
}

static void upcall_over(struct iconn *ic)
{
    struct conn *c = ic->c;
    ic->nupcalls--;
    if (!ic->stopping && c->state == CONN_OPEN)
        pump(ic);
    maybe_finish(ic);
    conn_put(c);
}

void iscsi_result(struct engine *e, struct conn *c, uint64_t tag, int status, void *data,
                  size_t len, const void *sense, size_t slen, int64_t wanted, int slow)
{
    (void)e;
    struct iconn *ic = c->proto;
    struct itask *t = find_upcall(ic, tag);
    if (!t || t->kind != K_SCSI) {
        free(data);
        return;
    }
    if (slow >= 0)
        ic->slow = slow;
    struct vbuf *vb = NULL;
    if (len) {
        vb = vbuf_new(len);
        if (!vb)
            conn_abort(c);
        else
            memcpy(vb->data, data, len);
    }
    free(data);
    conn_get(c);
    respond(ic, t, status, vb, vb ? (uint32_t)len : 0, sense, (uint32_t)slen, wanted);
    if (vb)
        vbuf_put(vb);
    task_done(ic, t, 1);
    upcall_over(ic);
    conn_put(c);
}

void iscsi_pdus(struct engine *e, struct conn *c, uint64_t tag, const uint8_t *pdus, size_t len,
                int flags, uint32_t recv_length, int slow)
{
    (void)e;
    struct iconn *ic = c->proto;
    struct itask *t = find_upcall(ic, tag);
    if (!t || t->kind == K_SCSI)
        return;
    if (slow >= 0)
        ic->slow = slow;
    if (recv_length >= 512)
        ic->p.initiator_recv_length = recv_length;
    conn_get(c);
    win_complete(ic, t);
    for (size_t pos = 0; pos + BHS <= len;) {
        const uint8_t *h = pdus + pos;
        uint32_t dlen = (uint32_t)h[5] << 16 | (uint32_t)h[6] << 8 | h[7];
        size_t ahs = (size_t)h[4] * 4;
        size_t total = BHS + ahs + dlen + (-dlen & 3);
        if (pos + total > len)
            break;
        /* every PDU Python answers with carries a status (session.py status=True) */
        send_copy(ic, h, 1, h + BHS + ahs, dlen);
        pos += total;
    }
    task_free(t);
    if (flags & TANDEM_ISCSI_CLOSE) {
        ic->stopping = 1;
        if (c->state == CONN_OPEN)
            conn_finish(c);
    }
    upcall_over(ic);
    conn_put(c);
}

void iscsi_set_slow(struct engine *e, struct conn *c, int slow)
{
    (void)e;
    struct iconn *ic = c->proto;
    ic->slow = slow;
}

/* Python's waiter for an abort on this connection (another session's TMF). */
struct pyabort {
    struct waiter w;
    uint64_t id;
};

static void pyabort_done(struct iconn *ic, struct waiter *w)
{
    struct pyabort *a = container_of(w, struct pyabort, w);
    eng_done(ic->e, a->id, 0);
    free(a);
}

void iscsi_abort(struct engine *e, struct conn *c, uint64_t id, int64_t lun, int status)
{
    struct iconn *ic = c->proto;
    struct pyabort *a = calloc(1, sizeof(*a));
    if (!a) {
        eng_done(e, id, ENOMEM);
        return;
    }
    a->id = id;
    a->w.pending = 1;
    a->w.done = pyabort_done;
    conn_get(c);
    abort_matching(ic, lun < 0 ? UINT64_MAX - 1 : (uint64_t)lun, &a->w, status);
    if (--a->w.pending == 0)
        pyabort_done(ic, &a->w);
    conn_put(c);
}

void iscsi_stop(struct engine *e, struct conn *c)
{
    struct iconn *ic = c->proto;
    ic->stopping = 1;
    timer_cancel(&ic->nop);
    conn_get(c);
    if (e->stopping) { /* Python will not answer its up-calls any more */
        while (ic->nupcalls) {
            ic->nupcalls--;
            conn_put(c);
        }
        ic->nexec = 0;
    }
    maybe_finish(ic);
    conn_put(c);
}
