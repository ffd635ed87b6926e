/* Shared by the libFuzzer harnesses of the engine's protocol decoders (native/fuzz/README.md):
 * one engine per process, a replica store on unlinked temp files, and the exchange of one
 * input over a socketpair while answering the engine's events the way Python would. */
#ifndef TANDEM_FUZZ_COMMON_H
#define TANDEM_FUZZ_COMMON_H
#include <stddef.h>
#include <stdint.h>

#include "tandem.h"

#define FZ_STORE_SIZE (2u << 20) /* 512 blocks, 2 write-intent regions of 1 MiB */
#define FZ_EPOCH 1

/* Print "tandem fuzz harness: ..." and abort (libFuzzer saves the input as a crash). */
void fz_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* The engine (started once) and the replica store it serves (size FZ_STORE_SIZE, epoch
 * FZ_EPOCH, three layers: two snapshots and the head, with data in parts of each). */
tandem_engine *fz_engine(void);
void fz_store_setup(tandem_engine *e);
/* Hand the store to the engine again (what NativeReplicaServer._push_store does after a
 * paused control request). */
void fz_store_push(tandem_engine *e);

/* The volume the frontend harnesses (NBD, iSCSI) submit to: size FZ_STORE_SIZE, one member
 * (slot 0, RW, quorum 1) whose data connection is a replica connection (FZ_MEMBER_CONN) of
 * this same engine serving the store, OPENed with its epoch first as
 * target/native_device.py does. Calls fz_store_setup, and returns once a first flush went
 * through the volume. */
#define FZ_MEMBER_CONN 1
void fz_volume_setup(tandem_engine *e);

/* What a harness does with the events of its connections. */
struct fz_handler {
    /* An up-call; ev->data is freed by the caller after this returns. */
    void (*upcall)(tandem_engine *e, const struct tandem_event *ev);
    /* TANDEM_EV_PAUSED with id (a pause the harness asked for). */
    void (*paused)(tandem_engine *e, uint64_t id);
    /* Bytes the engine sent on the input's connection (a protocol checker), or NULL. */
    void (*received)(const uint8_t *p, size_t n);
    /* Called on every turn of fz_exchange's loop (input_sent: the whole input was written,
     * or the engine closed its end), e.g. to answer up-calls held back until then; or NULL. */
    void (*tick)(tandem_engine *e, int input_sent);
};

/* Drain the event queue once; returns the number of events handled. Every CONN_CLOSED
 * event's conn id is recorded (fz_closed). MEMBER_DOWN aborts: the harnesses' members are
 * healthy replicas in the same engine, so a drop means the two sides disagree. */
int fz_drain(tandem_engine *e, const struct fz_handler *h);
/* 1 once TANDEM_EV_CONN_CLOSED for conn was seen (forgets it). */
int fz_closed(uint64_t conn);
/* Wait (draining events) until cond(arg) or the hang deadline (fz_die). */
void fz_wait(tandem_engine *e, const struct fz_handler *h, int (*cond)(void *), void *arg,
             const char *what);

/* Write data into our end of the socketpair (in chunks, reading what comes back and
 * answering events meanwhile), shut our write side down, read until EOF, then wait until
 * the engine reports connection `conn` closed. A hang (FUZZ_HANG_SECONDS, default 10) is a
 * finding: fz_die. Closes `ours`. */
void fz_exchange(tandem_engine *e, const struct fz_handler *h, uint64_t conn, int ours,
                 const uint8_t *data, size_t len);

/* A connected AF_UNIX stream pair; sv[1] (the engine's) stays blocking. */
void fz_socketpair(int sv[2]);

/* Little helpers. */
uint64_t fz_now_ns(void);
void fz_put_le32(uint8_t *p, uint32_t v);
void fz_put_le64(uint8_t *p, uint64_t v);
void fz_put_be16(uint8_t *p, uint16_t v);
void fz_put_be32(uint8_t *p, uint32_t v);

#endif
