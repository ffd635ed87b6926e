/* libFuzzer harness: the NBD transmission-phase decoder (native/nbd_server.c) and the volume
 * it submits to (native/target.c).
 *
 * One engine for the whole run holds both sides of a one-replica volume: the replica store
 * (fz_store_setup) served on one end of a socketpair, whose other end is the volume's only
 * member (OPENed with the store's epoch first, as target/native_device.py does, then
 * attached RW; quorum 1: fz_volume_setup). So NBD requests run the whole data path: NBD decoder -> volume
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

#define SIMPLE_REPLY_MAGIC 0x67446698u
#define STRUCTURED_REPLY_MAGIC 0x668E33EFu
#define NBD_EINVAL 22
#define FIRST_NBD_CONN 1000

static tandem_engine *E;
static int structured; /* of the connection under test */

/* --- the NBD connection under test ------------------------------------------------------------ */

/* Python's codec refuses what it does not run (as an InvalidCommand's error reply). */
static void on_upcall(tandem_engine *e, const struct tandem_event *ev)
{
    if (ev->conn == FZ_MEMBER_CONN)
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
    fz_volume_setup(E);
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
