/* libFuzzer harness: the replica data protocol decoder (native/replica_server.c).
 *
 * The input is the byte stream a client sends on one connection (replica/protocol.py:
 * 32-byte little-endian request headers + payloads). One engine serves a store of
 * FZ_STORE_SIZE bytes (three layers, write-intent log) for the whole run; each input gets
 * a fresh connection (a socketpair handed over as NativeReplicaServer does), is written,
 * the write side shut down, and everything the engine answers read until EOF. Up-calls are
 * answered like NativeReplicaServer: OPEN sets the connection's epoch (from the payload's
 * first number, default FZ_EPOCH; the store's epoch itself never changes, so inputs stay
 * independent), CLOSE clears it, INFO/ATTRS answer, every op that Python runs paused
 * (CLOSE, SNAPSHOT, RESIZE, unknown ops) pauses the engine, hands it the store again and
 * resumes before answering. Checks: the sanitizers, no hang, and every byte received is
 * a well-framed response. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz_common.h"

#define RESP_MAGIC 0x52444E54u
#define RESP_SIZE 24
#define MAX_PAYLOAD (32u << 20)

enum {
    OP_PING = 6,
    OP_INFO = 7,
    OP_OPEN = 8,
    OP_SET_GENERATION = 9,
    OP_CLOSE = 10,
    OP_ATTRS = 14,
    OP_SET_ATTRS = 15,
    OP_COPY_FROM = 17,
};

static tandem_engine *E;

/* --- answers to up-calls --------------------------------------------------------------------- */

static void reply(uint64_t conn, uint64_t tag, uint32_t status, const char *payload, int action,
                  uint64_t epoch)
{
    size_t plen = strlen(payload);
    uint8_t *buf = malloc(RESP_SIZE + plen);
    if (!buf)
        fz_die("out of memory");
    fz_put_le32(buf, RESP_MAGIC);
    fz_put_le32(buf + 4, status);
    fz_put_le64(buf + 8, tag);
    fz_put_le32(buf + 16, (uint32_t)plen);
    fz_put_le32(buf + 20, 0);
    memcpy(buf + RESP_SIZE, payload, plen);
    if (tandem_conn_reply(E, conn, buf, RESP_SIZE + plen, action, epoch, 1))
        fz_die("tandem_conn_reply failed");
    free(buf);
}

/* The answer replica/server.py would give, roughly (the engine only forwards it). */
static void answer(const struct tandem_event *ev)
{
    const char *p = ev->data;
    size_t n = ev->data_len;
    switch (ev->op) {
    case OP_OPEN: {
        uint64_t epoch = FZ_EPOCH;
        for (size_t i = 0; i < n; i++) {
            if (p[i] >= '0' && p[i] <= '9') {
                epoch = 0;
                for (; i < n && p[i] >= '0' && p[i] <= '9' && epoch < (1ull << 50); i++)
                    epoch = epoch * 10 + (uint64_t)(p[i] - '0');
                break;
            }
        }
        if (epoch < FZ_EPOCH) {
            reply(ev->conn, ev->tag, ESTALE, "epoch is older than the replica's", 0, 0);
            return;
        }
        char js[64];
        snprintf(js, sizeof(js), "{\"epoch\": %llu}", (unsigned long long)epoch);
        reply(ev->conn, ev->tag, 0, js, TANDEM_EPOCH_SET, epoch);
        return;
    }
    case OP_CLOSE:
        reply(ev->conn, ev->tag, 0, "", TANDEM_EPOCH_CLEAR, 0);
        return;
    case OP_INFO:
        reply(ev->conn, ev->tag, 0, "{\"size\": 2097152, \"epoch\": 1}", TANDEM_EPOCH_KEEP, 0);
        return;
    case OP_ATTRS:
        reply(ev->conn, ev->tag, 0, "{}", TANDEM_EPOCH_KEEP, 0);
        return;
    case OP_SET_GENERATION:
    case OP_SET_ATTRS:
    case OP_COPY_FROM:
        reply(ev->conn, ev->tag, EINVAL, "payload must be a JSON object", TANDEM_EPOCH_KEEP, 0);
        return;
    default:
        if (ev->op > OP_COPY_FROM) {
            char m[32];
            snprintf(m, sizeof(m), "unknown op %u", ev->op);
            reply(ev->conn, ev->tag, EOPNOTSUPP, m, TANDEM_EPOCH_KEEP, 0);
        } else {
            reply(ev->conn, ev->tag, EINVAL, "refused by the fuzz harness", TANDEM_EPOCH_KEEP, 0);
        }
        return;
    }
}

static int no_pause(uint8_t op)
{
    return op == OP_INFO || op == OP_OPEN || op == OP_SET_GENERATION || op == OP_ATTRS ||
           op == OP_SET_ATTRS || op == OP_PING || op == OP_COPY_FROM;
}

/* Up-calls waiting for the engine to pause (one per connection: they are barriers). */
static struct tandem_event held[8];
static int nheld;
static uint64_t pause_ids;

static void on_upcall(tandem_engine *e, const struct tandem_event *ev)
{
    if (no_pause(ev->op)) {
        answer(ev);
        return;
    }
    if (nheld == 8)
        fz_die("more than 8 up-calls waiting for a pause");
    held[nheld] = *ev;
    held[nheld].data = NULL; /* the caller frees it; answers do not need the payload */
    held[nheld].data_len = 0;
    held[nheld].id = ++pause_ids;
    nheld++;
    if (tandem_engine_pause(e, pause_ids))
        fz_die("tandem_engine_pause failed");
}

static void on_paused(tandem_engine *e, uint64_t id)
{
    for (int i = 0; i < nheld; i++) {
        if (held[i].id != id)
            continue;
        struct tandem_event ev = held[i];
        held[i] = held[--nheld];
        fz_store_push(e); /* as after a control request that ran paused */
        if (tandem_engine_resume(e))
            fz_die("tandem_engine_resume failed");
        answer(&ev);
        return;
    }
    fz_die("PAUSED for a pause nobody asked for (%llu)", (unsigned long long)id);
}

/* --- the response stream must stay framed ----------------------------------------------------- */

static uint8_t rhdr[RESP_SIZE];
static size_t rhave;
static uint64_t rskip;

static void on_received(const uint8_t *p, size_t n)
{
    while (n) {
        if (rskip) {
            size_t k = n < rskip ? n : (size_t)rskip;
            p += k;
            n -= k;
            rskip -= k;
            continue;
        }
        size_t k = RESP_SIZE - rhave;
        if (k > n)
            k = n;
        memcpy(rhdr + rhave, p, k);
        rhave += k;
        p += k;
        n -= k;
        if (rhave < RESP_SIZE)
            break;
        rhave = 0;
        uint32_t magic, plen, reserved;
        memcpy(&magic, rhdr, 4);
        memcpy(&plen, rhdr + 16, 4);
        memcpy(&reserved, rhdr + 20, 4);
        if (magic != RESP_MAGIC || reserved != 0 || plen > MAX_PAYLOAD)
            fz_die("the engine sent a malformed response header (magic 0x%x, payload %u, "
                   "reserved %u)",
                   magic, plen, reserved);
        rskip = plen;
    }
}

static const struct fz_handler handler = {
    .upcall = on_upcall,
    .paused = on_paused,
    .received = on_received,
};

/* --- libFuzzer ------------------------------------------------------------------------------ */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    E = fz_engine();
    fz_store_setup(E);
    return 0;
}

static int nothing_held(void *arg)
{
    (void)arg;
    return nheld == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint64_t ids;
    uint64_t conn = ++ids;
    int sv[2];
    fz_socketpair(sv);
    rhave = 0;
    rskip = 0;
    if (tandem_conn_add(E, conn, sv[1], TANDEM_CONN_REPLICA_SERVER))
        fz_die("tandem_conn_add failed");
    fz_exchange(E, &handler, conn, sv[0], data, size);
    if (rhave || rskip)
        fz_die("the response stream ended inside a response (%zu header bytes, %llu payload "
               "bytes missing)",
               rhave, (unsigned long long)rskip);
    if (nheld) /* the connection died with an up-call out: still resume the engine */
        fz_wait(E, &handler, nothing_held, NULL, "PAUSED event");
    return 0;
}
