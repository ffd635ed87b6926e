/* libFuzzer harness: iSCSI's full feature phase in the engine (native/iscsi_server.c) and the
 * volume its READ/WRITE/SYNCHRONIZE CACHE run on (native/target.c).
 *
 * The volume is fz_volume_setup's (one RW member that is a replica connection of the same
 * engine), so the fast path runs the whole data path. Per input, one end of a socketpair is
 * handed over with tandem_iscsi_add as a connection that just logged in, with parameters
 * taken from the input's first HDR bytes (what the login negotiated), then the rest of the
 * input is the initiator's byte stream (PDUs).
 *
 *   byte 0   flags: 1 HeaderDigest, 2 DataDigest, 4 ImmediateData, 8 InitialR2T,
 *            0x10 fast mode (tandem_iscsi_slow(0) right after the hand-over: READ/WRITE/SYNC
 *            run in C; else every SCSI command goes up), 0x20 the volume lost its write
 *            quorum (member WO for this input), 0x40 NOP-In probes (2 ms interval, 50 ms
 *            timeout), 0x80 up-calls are answered only once the whole input was sent
 *   byte 1   low nibble: MaxOutstandingR2T - 1; bits 4-5: our MaxRecvDataSegmentLength
 *            (8192, 262144, 65536, 4096)
 *   byte 2   low 3 bits: the CmdSN window depth (128, 1, 2, 3, 8, 32, 256, 512)
 *   3..5     the initiator's MaxRecvDataSegmentLength (24-bit big-endian, at least 512)
 *   6..8     MaxBurstLength (at least 512)
 *   9..11    FirstBurstLength (512 .. min(262144, MaxBurstLength), as negotiation.py)
 *   12..15   ExpCmdSN (the first CmdSN)     16..19 StatSN (the first one the engine sends)
 *   20       how many of the stream's bytes Python had read past the login (`pre`)
 *   21..22   the connection's CID (for Logout reason 1)
 *   23       KiB of zeros appended to the stream (so a Data-Out segment above 64 KiB, which
 *            the engine receives straight into its command's buffer, can be completed)
 *
 * Up-calls are answered as target/native_iscsi.py would, in simple valid forms chosen by the
 * top bits of the request's ITT ((itt >> 24) & 3):
 *   SCSI: 0 GOOD (reads get min(EDTL, 4096) bytes, writes wanted = EDTL); 1 CHECK CONDITION
 *   with INVALID FIELD IN CDB, slow mode on; 2 GOOD with EDTL + 300 bytes of data (overflow;
 *   writes wanted = EDTL + 512); 3 CHECK CONDITION with some data and a 32-byte sense, writes
 *   wanted = EDTL / 2, slow mode off.
 *   TMF/Text/Logout: session.py's answer (TMF response by function and whether ABORT TASK
 *   found its task, a cold reset closes; Text: an empty or one-key final response, 2 also
 *   lowers the initiator's MaxRecvDataSegmentLength to 512; Logout: CLOSED and close,
 *   NO CID, NO RECOVERY, or a Reject of an unknown reason); 3: NativeIscsiServer._refuse
 *   (no PDU, close).
 *
 * Checks: the sanitizers, no hang (fz_exchange), and what the engine sends is iSCSI: 48-byte
 * target BHSs without AHS, correct header and data digests, zero padding, data segments
 * within the initiator's MaxRecvDataSegmentLength, StatSN in send order (each status takes
 * the next one, R2T and NOP-In probes carry the next one), ExpCmdSN never going back and
 * MaxCmdSN - ExpCmdSN + 1 within [0, depth]. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"

#define HDR 24
#define BHS 48
#define RESERVED 0xFFFFFFFFu
#define FIRST_CONN (1ull << 32) /* target/native_iscsi.py CONN_ID_BASE */

static tandem_engine *E;
static struct tandem_iscsi_params P; /* of the connection under test */
static int defer;
static int trace; /* FUZZ_TRACE=1: print the PDUs that come back and the up-calls */

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint32_t be24(const uint8_t *p) { return (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2]; }

/* --- answering up-calls ------------------------------------------------------------------ */

static void answer_scsi(tandem_engine *e, uint64_t conn, uint64_t tag, const uint8_t *bhs)
{
    uint32_t itt = be32(bhs + 16), edtl = be32(bhs + 20);
    int rd = bhs[1] & 0x40, wr = bhs[1] & 0x20;
    static uint8_t data[65536 + 300];
    static int filled;
    if (!filled) {
        for (size_t i = 0; i < sizeof(data); i++)
            data[i] = (uint8_t)(i * 7 + 3);
        filled = 1;
    }
    uint8_t sense[32] = {0x70, 0, 0x05, 0, 0, 0, 0, 24, 0, 0, 0, 0, 0x24, 0x00};
    size_t len = 0, slen = 0;
    int status = 0, slow = -1;
    int64_t wanted = -1;
    switch ((itt >> 24) & 3) {
    case 0:
        len = rd ? (edtl < 4096 ? edtl : 4096) : 0;
        wanted = wr ? (int64_t)edtl : -1;
        break;
    case 1:
        status = 2;
        slen = 18;
        sense[7] = 10;
        slow = 1;
        break;
    case 2:
        len = edtl < 65536 ? edtl + 300 : 65536 + 300;
        wanted = wr ? (int64_t)edtl + 512 : -1;
        break;
    default:
        status = 2;
        len = edtl < 600 ? edtl : 600;
        slen = sizeof(sense);
        wanted = wr ? (int64_t)(edtl / 2) : -1;
        slow = 0;
        break;
    }
    if (tandem_iscsi_result(e, conn, tag, status, data, len, sense, slen, wanted, slow))
        fz_die("tandem_iscsi_result failed");
}

static void put_hdr(uint8_t *h, int opcode, int b1, int b2, const uint8_t *req)
{
    memset(h, 0, BHS);
    h[0] = (uint8_t)opcode;
    h[1] = (uint8_t)b1;
    h[2] = (uint8_t)b2;
    memcpy(h + 16, req + 16, 4); /* ITT */
}

static void answer_pdus(tandem_engine *e, uint64_t conn, uint64_t tag, int op, int flags,
                        const uint8_t *bhs)
{
    uint8_t out[2 * BHS + 64];
    size_t n = BHS;
    int close = 0;
    uint32_t recv_length = 0;
    int pol = (int)(be32(bhs + 16) >> 24) & 3;
    if (pol == 3) { /* NativeIscsiServer._refuse */
        if (tandem_iscsi_pdus(e, conn, tag, "", 0, TANDEM_ISCSI_CLOSE, 0, -1))
            fz_die("tandem_iscsi_pdus failed");
        return;
    }
    switch (op) {
    case TANDEM_ISCSI_UP_TMF: {
        int fn = bhs[1] & 0x7F, lun0 = !memcmp(bhs + 8, "\0\0\0\0\0\0\0\0", 8);
        int r = fn == 1 ? (flags & 1 ? 0 : 1)
                : fn == 2 || fn == 4 || fn == 5 ? (lun0 ? 0 : 2)
                : fn == 6 || fn == 7 ? 0
                : fn == 8 ? 4
                          : 5;
        put_hdr(out, 0x22, 0x80, r, bhs);
        close = fn == 7;
        break;
    }
    case TANDEM_ISCSI_UP_TEXT: {
        static const char kv[] = "TargetAlias=fuzz";
        put_hdr(out, 0x24, 0x80, 0, bhs);
        memcpy(out + 8, bhs + 8, 8);
        fz_put_be32(out + 20, RESERVED);
        if (pol) {
            out[7] = sizeof(kv); /* with its NUL */
            memcpy(out + BHS, kv, sizeof(kv));
            n += (sizeof(kv) + 3) & ~3u;
            memset(out + BHS + sizeof(kv), 0, n - BHS - sizeof(kv));
        }
        if (pol == 2)
            recv_length = 512;
        break;
    }
    case TANDEM_ISCSI_UP_LOGOUT: {
        int reason = bhs[1] & 0x7F;
        uint16_t cid = (uint16_t)(bhs[20] << 8 | bhs[21]);
        if (reason > 2) {
            put_hdr(out, 0x3F, 0x80, 0x09, bhs);
            fz_put_be32(out + 16, RESERVED);
            out[7] = BHS;
            memcpy(out + BHS, bhs, BHS);
            n += BHS;
            break;
        }
        int r = reason == 2 ? 2 : reason == 1 && cid != P.cid ? 1 : 0;
        put_hdr(out, 0x26, 0x80, r, bhs);
        close = r == 0;
        break;
    }
    default:
        fz_die("unknown iSCSI up-call kind %d", op);
    }
    if (tandem_iscsi_pdus(e, conn, tag, out, n, close ? TANDEM_ISCSI_CLOSE : 0, recv_length, -1))
        fz_die("tandem_iscsi_pdus failed");
}

struct held {
    uint64_t conn, tag;
    int op, flags;
    uint8_t bhs[BHS];
};
static struct held *held;
static size_t nheld, cap_held;

static void answer(tandem_engine *e, const struct held *u)
{
    if (u->op == TANDEM_ISCSI_UP_SCSI)
        answer_scsi(e, u->conn, u->tag, u->bhs);
    else
        answer_pdus(e, u->conn, u->tag, u->op, u->flags, u->bhs);
}

static void on_upcall(tandem_engine *e, const struct tandem_event *ev)
{
    if (ev->conn == FZ_MEMBER_CONN)
        fz_die("up-call op %u from the member's replica connection", ev->op);
    if (ev->conn < FIRST_CONN)
        fz_die("up-call from unknown connection %llu", (unsigned long long)ev->conn);
    if (!ev->data || ev->data_len < BHS || ev->offset < BHS || ev->offset > ev->data_len ||
        (uint64_t)ev->offset + ev->length != ev->data_len)
        fz_die("iSCSI up-call op %u: %u bytes, offset %llu, length %u", ev->op, ev->data_len,
               (unsigned long long)ev->offset, ev->length);
    struct held u = {.conn = ev->conn, .tag = ev->tag, .op = ev->op, .flags = ev->flags};
    memcpy(u.bhs, ev->data, BHS);
    if (trace)
        fprintf(stderr, "up-call op %u flags %u ITT %08x CDB %02x, %u bytes of data\n", ev->op,
                ev->flags, be32(u.bhs + 16), u.bhs[32], ev->length);
    int opcode = u.bhs[0] & 0x3F;
    int want = u.op == TANDEM_ISCSI_UP_SCSI     ? 0x01
               : u.op == TANDEM_ISCSI_UP_TMF    ? 0x02
               : u.op == TANDEM_ISCSI_UP_TEXT   ? 0x04
               : u.op == TANDEM_ISCSI_UP_LOGOUT ? 0x06
                                                : -1;
    if (opcode != want)
        fz_die("iSCSI up-call op %u carries opcode 0x%02x", ev->op, opcode);
    if (u.op != TANDEM_ISCSI_UP_SCSI && ev->offset != BHS)
        fz_die("iSCSI up-call op %u with a %llu-byte header", ev->op,
               (unsigned long long)ev->offset);
    if (!defer) {
        answer(e, &u);
        return;
    }
    if (nheld == cap_held) {
        cap_held = cap_held ? 2 * cap_held : 64;
        held = realloc(held, cap_held * sizeof(*held));
        if (!held)
            fz_die("out of memory");
    }
    held[nheld++] = u;
}

static void on_tick(tandem_engine *e, int input_sent)
{
    if (!input_sent || !nheld)
        return;
    for (size_t i = 0; i < nheld; i++)
        answer(e, &held[i]);
    nheld = 0;
}

/* --- what comes back ----------------------------------------------------------------------- */

static struct {
    uint8_t h[BHS + 4];
    size_t hhave, hneed;
    uint32_t dlen, left, crc; /* left: data + pad still to come */
    uint8_t dig[4];
    int dhave, in_digest;
    uint32_t statsn, expcmdsn, max_seg;
    int seen_exp;
    uint64_t pdus;
} rx;

static void rx_reset(void)
{
    memset(&rx, 0, sizeof(rx));
    rx.hneed = BHS + (P.header_digest ? 4 : 0);
    rx.statsn = P.statsn;
    rx.max_seg = P.initiator_recv_length;
}

static void rx_header(void)
{
    const uint8_t *h = rx.h;
    int op = h[0] & 0x3F;
    rx.pdus++;
    if (P.header_digest) {
        uint32_t want = tandem_crc32c(0, h, BHS), got;
        memcpy(&got, h + BHS, 4); /* little-endian on the wire, as on this host */
        if (got != want)
            fz_die("PDU %llu (opcode 0x%02x): header digest %08x, should be %08x",
                   (unsigned long long)rx.pdus, op, got, want);
    }
    if (h[0] & 0xC0)
        fz_die("PDU %llu: byte 0 is 0x%02x", (unsigned long long)rx.pdus, h[0]);
    if (op != 0x20 && op != 0x21 && op != 0x22 && op != 0x24 && op != 0x25 && op != 0x26 &&
        op != 0x31 && op != 0x3F)
        fz_die("PDU %llu: opcode 0x%02x is not one a target sends here", (unsigned long long)rx.pdus,
               op);
    if (h[4])
        fz_die("PDU %llu (opcode 0x%02x) has an AHS", (unsigned long long)rx.pdus, op);
    rx.dlen = be24(h + 5);
    if (trace)
        fprintf(stderr, "<- opcode 0x%02x flags %02x b2 %02x b3 %02x ITT %08x TTT %08x StatSN %u "
                "ExpCmdSN %u MaxCmdSN %u [36] %u [40] %u [44] %u, %u bytes\n", op, h[1], h[2],
                h[3], be32(h + 16), be32(h + 20), be32(h + 24), be32(h + 28), be32(h + 32),
                be32(h + 36), be32(h + 40), be32(h + 44), rx.dlen);
    if (rx.dlen > rx.max_seg)
        fz_die("PDU %llu (opcode 0x%02x): data segment of %u bytes, the initiator takes %u",
               (unsigned long long)rx.pdus, op, rx.dlen, rx.max_seg);
    int data_in = op == 0x25, with_status = data_in ? h[1] & 0x01 : 1;
    if (op == 0x20 && be32(h + 16) == RESERVED)
        with_status = 0; /* a NOP-In probe */
    if (op == 0x31)
        with_status = 0;
    uint32_t statsn = be32(h + 24);
    if (with_status) {
        if (statsn != rx.statsn)
            fz_die("PDU %llu (opcode 0x%02x): StatSN %u, should be %u", (unsigned long long)rx.pdus,
                   op, statsn, rx.statsn);
        rx.statsn++;
    } else if (!data_in && statsn != rx.statsn) {
        fz_die("PDU %llu (opcode 0x%02x, no status): StatSN %u, the next is %u",
               (unsigned long long)rx.pdus, op, statsn, rx.statsn);
    }
    uint32_t exp = be32(h + 28), max = be32(h + 32);
    if (rx.seen_exp && (int32_t)(exp - rx.expcmdsn) < 0)
        fz_die("PDU %llu (opcode 0x%02x): ExpCmdSN went back from %u to %u",
               (unsigned long long)rx.pdus, op, rx.expcmdsn, exp);
    int32_t win = (int32_t)(max + 1 - exp);
    if (win < 0 || (uint32_t)win > P.cmd_window)
        fz_die("PDU %llu (opcode 0x%02x): ExpCmdSN %u, MaxCmdSN %u: window %d of depth %u",
               (unsigned long long)rx.pdus, op, exp, max, win, P.cmd_window);
    rx.expcmdsn = exp;
    rx.seen_exp = 1;
    rx.left = rx.dlen + (-rx.dlen & 3);
    rx.crc = 0;
    rx.dhave = 0;
    rx.in_digest = 0;
}

static void on_received(const uint8_t *p, size_t n)
{
    while (n) {
        if (rx.hhave < rx.hneed) {
            size_t k = rx.hneed - rx.hhave < n ? rx.hneed - rx.hhave : n;
            memcpy(rx.h + rx.hhave, p, k);
            rx.hhave += k, p += k, n -= k;
            if (rx.hhave == rx.hneed) {
                rx_header();
                if (!rx.left && !(P.data_digest && rx.dlen))
                    rx.hhave = 0;
            }
            continue;
        }
        if (rx.left) {
            size_t k = rx.left < n ? rx.left : n;
            uint32_t data_left = rx.left > (-rx.dlen & 3) ? rx.left - (-rx.dlen & 3) : 0;
            for (size_t i = data_left; i < k; i++)
                if (p[i])
                    fz_die("PDU %llu: padding byte 0x%02x", (unsigned long long)rx.pdus, p[i]);
            if (P.data_digest)
                rx.crc = tandem_crc32c(rx.crc, p, k);
            rx.left -= (uint32_t)k, p += k, n -= k;
            if (!rx.left && !P.data_digest)
                rx.hhave = 0;
            continue;
        }
        /* the data digest */
        size_t k = 4 - (size_t)rx.dhave < n ? 4 - (size_t)rx.dhave : n;
        memcpy(rx.dig + rx.dhave, p, k);
        rx.dhave += (int)k, p += k, n -= k;
        if (rx.dhave == 4) {
            uint32_t got;
            memcpy(&got, rx.dig, 4);
            if (got != rx.crc)
                fz_die("PDU %llu (opcode 0x%02x, %u bytes): data digest %08x, should be %08x",
                       (unsigned long long)rx.pdus, rx.h[0] & 0x3F, rx.dlen, got, rx.crc);
            rx.hhave = 0;
        }
    }
}

static const struct fz_handler handler = {
    .upcall = on_upcall, .received = on_received, .tick = on_tick};

/* --- libFuzzer ------------------------------------------------------------------------------ */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (*(const uint8_t *)&(uint16_t){1} != 1)
        fz_die("the digest checks assume a little-endian host");
    const char *t = getenv("FUZZ_TRACE");
    trace = t && *t && *t != '0';
    E = fz_engine();
    fz_volume_setup(E);
    return 0;
}

static uint32_t at_least_512(uint32_t v) { return v < 512 ? 512 : v; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint64_t ids = FIRST_CONN;
    static const uint32_t recv_lengths[4] = {8192, 262144, 65536, 4096};
    static const uint32_t depths[8] = {128, 1, 2, 3, 8, 32, 256, 512};
    if (size < HDR)
        return 0;
    const uint8_t *o = data;
    memset(&P, 0, sizeof(P));
    P.header_digest = o[0] & 1;
    P.data_digest = !!(o[0] & 2);
    P.immediate_data = !!(o[0] & 4);
    P.initial_r2t = !!(o[0] & 8);
    int fast = o[0] & 0x10, degraded = o[0] & 0x20;
    if (o[0] & 0x40) {
        P.nop_interval = 0.002;
        P.nop_timeout = 0.05;
    }
    defer = !!(o[0] & 0x80);
    P.max_outstanding_r2t = 1 + (o[1] & 15);
    P.target_recv_length = recv_lengths[(o[1] >> 4) & 3];
    P.cmd_window = depths[o[2] & 7];
    P.initiator_recv_length = at_least_512(be24(o + 3));
    P.max_burst_length = at_least_512(be24(o + 6));
    uint32_t fbl_max = P.max_burst_length < 262144 ? P.max_burst_length : 262144;
    P.first_burst_length = at_least_512(be24(o + 9));
    if (P.first_burst_length > fbl_max)
        P.first_burst_length = fbl_max;
    P.max_data_transfer = 16u << 20; /* TargetLimits.max_data_transfer */
    P.expcmdsn = be32(o + 12);
    P.statsn = be32(o + 16);
    P.cid = (uint16_t)(o[21] << 8 | o[22]);
    P.frontend = 1; /* iscsi */
    size_t pre = o[20];
    size_t zeros = (size_t)o[23] << 10;
    data += HDR;
    size -= HDR;
    if (pre > size)
        pre = size;

    /* the stream after the hand-over, with its zero tail */
    size_t len = size - pre + zeros;
    uint8_t *stream = malloc(len ? len : 1);
    if (!stream)
        fz_die("out of memory");
    memcpy(stream, data + pre, size - pre);
    memset(stream + size - pre, 0, zeros);

    rx_reset();
    nheld = 0;
    uint64_t conn = ++ids;
    int sv[2];
    fz_socketpair(sv);
    /* Commands run in order: the mode changes take effect before and after the connection. */
    if (degraded && tandem_member_mode(E, 0, TANDEM_MODE_WO, 1, "fuzz: degraded", 2))
        fz_die("tandem_member_mode failed");
    if (tandem_iscsi_add(E, conn, sv[1], &P, data, pre))
        fz_die("tandem_iscsi_add failed");
    if (fast && tandem_iscsi_slow(E, conn, 0))
        fz_die("tandem_iscsi_slow failed");
    fz_exchange(E, &handler, conn, sv[0], stream, len);
    if (nheld)
        fz_die("%zu up-calls still unanswered after the connection closed", nheld);
    if (degraded && tandem_member_mode(E, 0, TANDEM_MODE_RW, 1, "fuzz: healthy", 3))
        fz_die("tandem_member_mode failed");
    free(stream);
    return 0;
}
