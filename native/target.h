/* The target side of the engine, shared by its parts: the volume (target.c: members, the
 * fan-out write rule, reads, range locks, QoS, stability) and the frontends that submit
 * volume I/O to it (nbd_server.c; Python's EngineDevice through tandem_vol_submit).
 * See native/ENGINE.md, "Target side". Engine thread only. */
#ifndef TANDEM_TARGET_H
#define TANDEM_TARGET_H
#include "engine.h"

#define TBLOCK 4096u
#define MAX_MEMBERS TANDEM_MAX_MEMBERS

struct pool;
struct peer;
#define VBUF_HOLDERS 4
enum { POISON_PEERS = 1, POISON_FOREVER = 2 };

/* A payload shared by a request and the sends that carry it (refcounted). */
struct vbuf {
    int refs;
    size_t len;
    uint8_t *data; /* inl, memory someone else keeps alive (external), or pool slots */
    struct pool *pool;     /* the volume's shared memory the data lives in, or NULL */
    uint32_t slot, nslots; /* ... which slots */
    /* A replica dropped with it in flight may still read or write it when it runs again: the
     * slots come back only once every such replica process exited (struct peer). */
    int poisoned; /* POISON_PEERS: until the processes in held exited; POISON_FOREVER */
    struct peer *held[VBUF_HOLDERS];
    uint8_t inl[];
};

struct vbuf *vbuf_new(size_t len);
struct vbuf *vbuf_external(void *data, size_t len);
/* A payload for volume I/O of len bytes: in the memory the volume shares with replicas on
 * this host when one shares it and there is room (they read and write it in place, not
 * through their socket), else like vbuf_new. */
struct vbuf *vol_payload(struct engine *e, size_t len);
static inline struct vbuf *vbuf_get(struct vbuf *b)
{
    b->refs++;
    return b;
}
void vbuf_put(struct vbuf *b);

/* One volume request (a BlockDevice call): submitted by a frontend, completed by calling
 * `done` from the loop (never inside vio_submit). */
struct vio;
typedef void (*vio_done_fn)(struct vio *v);

struct vio {
    /* set by the submitter */
    int op;       /* TANDEM_VIO_* */
    int flags;    /* TANDEM_VIO_FUA | TANDEM_VIO_NO_HOLE */
    int frontend; /* stats slot */
    uint64_t offset;
    uint32_t length;
    struct vbuf *buf; /* WRITE: the payload (the vio holds a reference); READ: the data */
    vio_done_fn done;
    /* the result */
    int status; /* 0 or an errno */
    char *msg;  /* malloc'ed error message, or NULL */

    /* internal (target.c) */
    struct io dio;    /* the deferred completion */
    struct list link; /* a wait list: QoS, range lock, stability */
    struct list slink; /* holding its range (vol->shared) */
    uint64_t lo, hi;   /* block-rounded range of a mutation */
    int state;
    int npend;  /* member requests outstanding */
    int ntargets;
    int tries;  /* reads: members tried */
    int local;  /* reads: tried a local replica's file */
    uint64_t t0_ns;
    uint32_t targets; /* member slots the request went to */
    int res[MAX_MEMBERS];
    char *rmsg[MAX_MEMBERS];
    uint64_t rgen[MAX_MEMBERS]; /* connection generation each went out on */
    char *last; /* reads: the last failure */
};

/* Start a request (QoS, range lock, fan-out or read); v->done runs when it is over. */
void vio_submit(struct engine *e, struct vio *v);
/* Release what the vio holds (buf, messages); the memory of v is the caller's. */
void vio_release(struct vio *v);
/* 1 when the volume takes no writes (fewer RW members than its quorum). */
int vol_readonly(struct engine *e);
uint64_t vol_size(struct engine *e);

/* nbd_server.c */
struct conn *nbd_conn_new(struct engine *e, uint64_t id, int fd, int flags, uint64_t size,
                          int frontend, const void *pre, size_t prelen);
void nbd_reply(struct engine *e, struct conn *c, void *data, size_t len, int end);
void nbd_stop(struct engine *e, struct conn *c);

/* iscsi_server.c */
struct conn *iscsi_conn_new(struct engine *e, uint64_t id, int fd,
                            const struct tandem_iscsi_params *p, const void *pre, size_t prelen);
void iscsi_result(struct engine *e, struct conn *c, uint64_t tag, int status, void *data,
                  size_t len, const void *sense, size_t slen, int64_t wanted, int slow);
void iscsi_pdus(struct engine *e, struct conn *c, uint64_t tag, const uint8_t *pdus, size_t len,
                int flags, uint32_t recv_length, int slow);
void iscsi_set_slow(struct engine *e, struct conn *c, int slow);
void iscsi_abort(struct engine *e, struct conn *c, uint64_t id, int64_t lun, int status);
void iscsi_stop(struct engine *e, struct conn *c);

/* target.c: the commands */
int target_setup(struct engine *e, uint64_t size, int replica_count, int quorum,
                 double timeout, double timeout_last, const char *name, int shm_fd,
                 uint64_t shm_size);
void target_attach(struct engine *e, int slot, int fd, int mode, int current, int shared,
                   const uint32_t *local, const char *address, uint64_t id);
void target_mode(struct engine *e, int slot, int mode, int current, const char *why,
                 uint64_t id);
void target_map(struct engine *e, int slot, uint8_t *map, uint64_t count, uint64_t region,
                int track, uint64_t id);
int target_tracking(struct engine *e, int slot);
void target_stable(struct engine *e, uint64_t seq);
void target_lock(struct engine *e, uint64_t id, uint64_t *ranges, int n);
void target_unlock(struct engine *e, uint64_t id);
void target_qos(struct engine *e, const double *limits, double burst);
void target_submit(struct engine *e, uint64_t id, int frontend, int op, int flags,
                   uint64_t offset, uint32_t length, const void *data);
void target_stop(struct engine *e);
void target_free(struct engine *e);

/* An event answering a command (TANDEM_EV_DONE). */
void eng_done(struct engine *e, uint64_t id, int status);

#endif
