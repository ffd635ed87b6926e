/* libFuzzer harness: the NBD transmission-phase decoder (native/nbd_server.c) and the volume
 * it submits to (native/target.c).
 *
 * One engine for the whole run holds both sides of a one-replica volume: the replica store
 * (fz_store_setup) served on one end of a socketpair, whose other end is the volume's only
 * member (OPENed with the store's epoch first, as target/native_device.py does, then
 * attached RW; quorum 1). So NBD requests run the whole data path: NBD decoder -> volume
 * fan-out -> replica protocol -> replica store -> back.
 *
 * Input: byte 0 selects what the handshake negotiated (bit 0 structured replies, bit 1 a
 * meta context, bit 2 read-only) and bit 3 a volume that lost its write quorum (the member
 * is WO for this input: writes fail with EROFS, reads find no replica), byte 1 how many of the following bytes Python had already
 * read past the handshake (handed over with tandem_nbd_add); the rest of the input is the
 * transmission-phase stream (28-byte big-endian requests + write payloads) sent on the
 * socket after the hand-over. Up-calls (BLOCK_STATUS, unknown commands) get an EINVAL
 * error reply, as Python's codec gives for what it refuses. Checks: the sanitizers, no
 * hang, and the member is never dropped (it is a healthy replica in the same process: a
 * drop means the volume sent it something it refused or the two sides disagree). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_common.h"

#define REQ_MAGIC 0x51444E54u /* the replica protocol's */
#define RESP_SIZE 24
#define OP_OPEN 8
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668E33EFu
#define NBD_EINVAL 22
#define MEMBER_CONN 1 /* the replica side's connection of the member */
#define FIRST_NBD_CONN 1000

static tandem_engine *E;
static int structured; /* of the connection under test */

/* --- the member: the replica side's OPEN answered like Python's, then attached -------------- */

static void member_upcall(tandem_engine *e, const struct tandem_event *ev)
{
    if (ev->conn != MEMBER_CONN || ev->op != OP_OPEN)
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
    if (tandem_vol_setup(e, FZ_STORE_SIZE, 1, 1, 30.0, 30.0, "fuzz"))
        fz_die("tandem_vol_setup failed");
    int sv[2];
    fz_socketpair(sv); /* sv[0]: the volume's end, sv[1]: the replica server's */
    if (tandem_conn_add(e, MEMBER_CONN, sv[1], TANDEM_CONN_REPLICA_SERVER))
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
    if (tandem_member_attach(e, 0, sv[0], TANDEM_MODE_RW, 1, "in-process-replica", 1))
        fz_die("tandem_member_attach failed");
}

/* --- the NBD connection under test ------------------------------------------------------------ */

/* Python's codec refuses what it does not run (as an InvalidCommand's error reply). */
static void on_upcall(tandem_engine *e, const struct tandem_event *ev)
{
    if (ev->conn == MEMBER_CONN)
        fz_die("up-call op %u from the member's replica connection", ev->op);
    if (!ev->data || ev->data_len != 28)
        fz_die("NBD up-call without its 28-byte request header (%u bytes)", ev->data_len);
    const uint8_t *handle = (const uint8_t *)ev->data + 8;
    uint8_t r[32];
    size_t n;
    if (structured) {
        static const char msg[] = "refused by the fuzz harness";
        uint8_t s[26 + sizeof(msg) - 1];
        fz_put_be32(s, STRUCTURED_REPLY_MAGIC);
        fz_put_be16(s + 4, 1); /* DONE */
        fz_put_be16(s + 6, 0x8001); /* ERROR */
        memcpy(s + 8, handle, 8);
        fz_put_be32(s + 16, 6 + sizeof(msg) - 1);
        fz_put_be32(s + 20, NBD_EINVAL);
        fz_put_be16(s + 24, sizeof(msg) - 1);
        memcpy(s + 26, msg, sizeof(msg) - 1);
        if (tandem_conn_reply(e, ev->conn, s, sizeof(s), 0, 0, 1))
            fz_die("tandem_conn_reply failed");
        return;
    }
    fz_put_be32(r, SIMPLE_REPLY_MAGIC);
    fz_put_be32(r + 4, NBD_EINVAL);
    memcpy(r + 8, handle, 8);
    n = 16;
    if (tandem_conn_reply(e, ev->conn, r, n, 0, 0, 1))
        fz_die("tandem_conn_reply failed");
}

static const struct fz_handler handler = {.upcall = on_upcall};

/* --- libFuzzer ------------------------------------------------------------------------------ */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    E = fz_engine();
    fz_store_setup(E);
    setup_member(E);
    /* Commands run in order: a flush through the volume (Python's own I/O, frontend 2)
     * completes once the member is attached, and proves the whole path works. */
    uint64_t id = 77;
    if (tandem_vol_submit(E, id, 2, TANDEM_VIO_FLUSH, 0, 0, 0, NULL))
        fz_die("tandem_vol_submit failed");
    int done_seen = 0;
    for (uint64_t deadline = fz_now_ns() + 10000000000ull; !done_seen;) {
        struct tandem_event evs[16];
        int n = tandem_engine_events(E, evs, 16);
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
            struct pollfd p = {.fd = tandem_engine_event_fd(E), .events = POLLIN};
            poll(&p, 1, 50);
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint64_t ids = FIRST_NBD_CONN;
    if (size < 2)
        return 0;
    int flags = 0;
    if (data[0] & 1)
        flags |= TANDEM_NBD_STRUCTURED;
    if (data[0] & 2)
        flags |= TANDEM_NBD_META_CONTEXT;
    if (data[0] & 4)
        flags |= TANDEM_NBD_READONLY;
    structured = !!(flags & TANDEM_NBD_STRUCTURED);
    int degraded = data[0] & 8; /* the volume lost its write quorum (member demoted to WO) */
    size_t pre = data[1];
    data += 2;
    size -= 2;
    if (pre > size)
        pre = size;
    uint64_t conn = ++ids;
    int sv[2];
    fz_socketpair(sv);
    /* Commands run in order: the mode changes take effect before and after the connection
     * (fz_drain aborts if one fails). Writes are then refused (EROFS) and reads fail (no RW
     * member): the volume's error paths. */
    if (degraded && tandem_member_mode(E, 0, TANDEM_MODE_WO, 1, "fuzz: degraded", 2))
        fz_die("tandem_member_mode failed");
    if (tandem_nbd_add(E, conn, sv[1], flags, FZ_STORE_SIZE, 0, data, pre))
        fz_die("tandem_nbd_add failed");
    fz_exchange(E, &handler, conn, sv[0], data + pre, size - pre);
    if (degraded && tandem_member_mode(E, 0, TANDEM_MODE_RW, 1, "fuzz: healthy", 3))
        fz_die("tandem_member_mode failed");
    return 0;
}
