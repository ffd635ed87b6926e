/* Tandem's C hot path: the public interface (what Python calls through cffi).
 *
 * The text between the cffi markers is also the cffi cdef (native/build.py reads it), so
 * it must stay plain declarations: no macros, no includes. */
#ifndef TANDEM_H
#define TANDEM_H
#include <stddef.h>
#include <stdint.h>

/* cffi:begin */

/* CRC32C of buf, continuing from crc (0 to start). */
uint32_t tandem_crc32c(uint32_t crc, const void *buf, size_t len);
/* 1 when the SSE4.2 instruction is used. */
int tandem_crc32c_hw(void);
/* 0 when an io_uring can be set up here, else -errno. */
int tandem_uring_probe(void);

/* --- the engine (native/ENGINE.md) ------------------------------------------------------ */

typedef struct engine tandem_engine;

/* Events the engine hands to Python (drained with tandem_engine_events). */
enum {
    TANDEM_EV_PAUSED = 1,      /* id: the pause request; in-flight I/O drained */
    TANDEM_EV_UPCALL = 2,      /* conn, tag, op, flags, offset, length, data: a request for Python */
    TANDEM_EV_CONN_CLOSED = 3, /* conn: the engine closed the socket and forgot the connection */
    TANDEM_EV_PROTO_ERROR = 4, /* conn, data: the stream is not the protocol; closing it */
    TANDEM_EV_FAULT_DROP = 5,  /* conn, op: a drop fault closed the connection */
    TANDEM_EV_FAULT_USED = 6,  /* id: fault slot whose count was consumed by one */
    TANDEM_EV_LOG = 7,         /* status: logging level (20 info, 30 warning), data: text */
    /* the target side */
    TANDEM_EV_DONE = 8,        /* id, status (0 or errno): a command with a result took effect */
    TANDEM_EV_IO_DONE = 9,     /* id, status, data (read bytes, or the error message) */
    TANDEM_EV_MEMBER_DOWN = 10, /* id: member slot, tag: drop sequence (0: no generation bump
                                   needed), op: the mode it had, conn: its data connection,
                                   data: why */
};

struct tandem_event {
    uint32_t type;
    int32_t status;
    uint64_t id;
    uint64_t conn;
    uint64_t tag;
    uint64_t offset;
    uint32_t length;
    uint8_t op;
    uint8_t flags;
    uint16_t reserved;
    void *data; /* malloc'ed, or NULL; Python copies it and calls tandem_free */
    uint32_t data_len;
};

/* Connection kinds handed to tandem_conn_add. */
enum {
    TANDEM_CONN_REPLICA_SERVER = 1, /* serves the replica data protocol (replica/protocol.py) */
    TANDEM_CONN_NBD = 2,            /* an NBD client in transmission (tandem_nbd_add) */
    TANDEM_CONN_MEMBER = 3,         /* a target's data connection to a replica (tandem_member_attach) */
    TANDEM_CONN_ISCSI = 4,          /* an iSCSI connection in full feature phase (tandem_iscsi_add) */
};

/* Epoch actions of tandem_conn_reply. */
enum {
    TANDEM_EPOCH_KEEP = 0,
    TANDEM_EPOCH_SET = 1,
    TANDEM_EPOCH_CLEAR = 2,
};

/* Fault actions (replica/faults.py) and slots (the op names; slot 6 is "replica.*"). */
enum {
    TANDEM_FAULT_NONE = 0,
    TANDEM_FAULT_DELAY = 1,
    TANDEM_FAULT_FAIL = 2,
    TANDEM_FAULT_HANG = 3,
    TANDEM_FAULT_DROP = 4,
    TANDEM_FAULT_CRASH = 5,
};
enum {
    TANDEM_FAULT_SLOT_READ = 0,
    TANDEM_FAULT_SLOT_WRITE = 1,
    TANDEM_FAULT_SLOT_FLUSH = 2,
    TANDEM_FAULT_SLOT_UNMAP = 3,
    TANDEM_FAULT_SLOT_WRITE_ZEROES = 4,
    TANDEM_FAULT_SLOT_CHECKSUM = 5,
    TANDEM_FAULT_SLOT_ANY = 6,
    TANDEM_FAULT_SLOTS = 7,
};

/* Counters of the replica side, written by the engine thread, read by Python at any time. */
struct tandem_replica_stats {
    uint64_t ops[32]; /* by op code, as replica/protocol.py Op */
    uint64_t errors;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t requests; /* every framed request */
    uint64_t upcalls;  /* requests handed to Python */
    uint64_t pauses;
    uint64_t file_writes; /* write calls to the layer files (a large write: one, or pieces) */
};

/* Polling: after a completion the engine thread polls its ring for up to this long before
 * it sleeps, while requests come about one at a time (queue depth 1; see poll_ring in
 * engine.c for how that is judged). Cuts a wakeup (several us on a VM) from each request at
 * the cost of that CPU. 0 (the default) never polls. Thread-safe, takes effect at once. */
struct tandem_poll_stats {
    uint64_t hits;   /* polls that found work */
    uint64_t misses; /* polls that gave up and slept */
    uint64_t ns;     /* time spent polling */
};
void tandem_engine_set_poll(tandem_engine *e, uint64_t ns);
struct tandem_poll_stats *tandem_engine_poll_stats(tandem_engine *e);
/* The IORING_FEAT_* bits of the engine's ring, as the kernel reported them. */
unsigned tandem_engine_ring_features(tandem_engine *e);

/* Start an engine (its thread and io_uring). NULL with *err = -errno on failure. */
tandem_engine *tandem_engine_new(int *err);
/* Stop: close every connection, wait for in-flight I/O, join the thread, free. */
void tandem_engine_free(tandem_engine *e);
/* Readable when events are queued (an eventfd: read it, then drain). */
int tandem_engine_event_fd(tandem_engine *e);
/* Move up to max queued events to out; returns how many. */
int tandem_engine_events(tandem_engine *e, struct tandem_event *out, int max);
void tandem_free(void *p);

/* Commands: thread-safe, asynchronous, applied by the engine thread in the order given.
 * Each returns 0, or -errno when it could not be queued. */

/* Hold new I/O, let in-flight I/O finish, then report TANDEM_EV_PAUSED with id. */
int tandem_engine_pause(tandem_engine *e, uint64_t id);
int tandem_engine_resume(tandem_engine *e);
/* Adopt a connected socket (blocking mode) as connection `conn` of the given kind. */
int tandem_conn_add(tandem_engine *e, uint64_t conn, int fd, int kind);
/* Close a connection at once (unsent replies are dropped). */
int tandem_conn_close(tandem_engine *e, uint64_t conn);
/* Python's answer to an up-call: bytes to send in order with the rest, the connection's new
 * epoch, and (end != 0) the end of the up-call: the connection goes on with its next
 * request. end == 0 sends an answer Python finished later, outside any up-call. */
int tandem_conn_reply(tandem_engine *e, uint64_t conn, const void *data, size_t len,
                      int epoch_action, uint64_t epoch, int end);

/* The replica store the replica connections serve. `marked` (count bytes), `touch` (count
 * uint32) are replica/intent.py's region bitmap and last-write clocks, clock0 its monotonic
 * origin; Python keeps every buffer alive and unmoved until the engine is freed. */
int tandem_replica_setup(tandem_engine *e, uint64_t size, uint64_t epoch, int intent_fd,
                         uint8_t *marked, uint32_t *touch, uint32_t count, uint64_t region,
                         double clock0);
/* The layer files (bottom..head) and block maps (replica/store.py _head/_base); change them
 * only while paused. */
int tandem_replica_set_layers(tandem_engine *e, const int *fds, int n, uint8_t *head,
                              uint8_t *base);
/* The replica's current epoch (store.meta.epoch) after Python changed it. */
int tandem_replica_set_epoch(tandem_engine *e, uint64_t epoch);
/* Arm (or with TANDEM_FAULT_NONE, clear) the fault of a slot; remaining < 0: unlimited. */
int tandem_replica_set_fault(tandem_engine *e, int slot, int action, double arg,
                             int64_t remaining);
/* A READ, WRITE, UNMAP or WRITE_ZEROES of the replica store on Python's behalf. */
struct tandem_io {
    int op;          /* as replica/protocol.py Op */
    int flags;       /* FLAG_NO_HOLE for WRITE_ZEROES */
    uint64_t offset;
    uint32_t length;
    void *buf;       /* the data to write, or room for the data read */
    int status;      /* out: 0 or errno */
};
/* Runs n of them (e.g. the pieces of a rebuild pulling data in) at once, ordered,
 * intent-logged and mapped like the requests of the connections, without the epoch check.
 * Blocks the caller until all are done. 0, or -errno of the first that failed. */
int tandem_replica_iov(tandem_engine *e, struct tandem_io *ios, int n);
/* The replica counters (valid until the engine is freed). */
struct tandem_replica_stats *tandem_replica_stats(tandem_engine *e);

/* --- the target side (native/ENGINE.md "Target side") ----------------------------------- */

/* Member modes (target/replicator.py Mode) and volume I/O ops. */
enum {
    TANDEM_MODE_ERR = 0,
    TANDEM_MODE_WO = 1,
    TANDEM_MODE_RW = 2,
};
enum {
    TANDEM_VIO_READ = 1,
    TANDEM_VIO_WRITE = 2,
    TANDEM_VIO_FLUSH = 3,
    TANDEM_VIO_UNMAP = 4,
    TANDEM_VIO_WRITE_ZEROES = 5,
};
/* Volume I/O flags. */
enum {
    TANDEM_VIO_FUA = 1,
    TANDEM_VIO_NO_HOLE = 2,
    TANDEM_VIO_LOCKED = 4, /* the submitter holds an exclusive lock over the range */
};
/* NBD connection flags (what the handshake negotiated). */
enum {
    TANDEM_NBD_STRUCTURED = 1,
    TANDEM_NBD_META_CONTEXT = 2,
    TANDEM_NBD_READONLY = 4,
};
enum {
    TANDEM_MAX_MEMBERS = 32,
    TANDEM_FRONTENDS = 4, /* stats slots: 0 nbd, 1 iscsi, 2 internal (Python's own I/O) */
    TANDEM_STAT_OPS = 5,  /* read, write, flush, unmap, write_zeroes */
    TANDEM_LAT_BUCKETS = 14, /* target/stats.py _BUCKETS, then +Inf */
};

struct tandem_op_stats {
    uint64_t ops;    /* successful requests */
    uint64_t bytes;
    uint64_t errors; /* failed requests */
    uint64_t lat[14]; /* TANDEM_LAT_BUCKETS: successful requests by latency, not cumulative */
    double lat_sum;  /* seconds */
};

/* Counters of the target side, written by the engine thread, read by Python at any time. */
struct tandem_target_stats {
    struct tandem_op_stats fe[4][5]; /* [TANDEM_FRONTENDS][TANDEM_STAT_OPS] */
    uint64_t requests;  /* frontend requests the engine parsed (NBD) or was handed (submit) */
    uint64_t upcalls;   /* of them, handed to Python */
    uint64_t throttled[2];         /* QoS: read, write requests that had to wait */
    double throttled_seconds[2];   /* and how long they waited */
    uint64_t member_requests;      /* requests sent to replicas */
    uint64_t drops;                /* members dropped */
    uint64_t drop_seq;             /* drops that need a generation bump, so far */
    uint64_t stable_seq;           /* ... of which Python's bumps covered */
    uint64_t fe_requests[4];       /* [TANDEM_FRONTENDS]: requests (NBD, SCSI commands) parsed */
    uint64_t fe_upcalls[4];        /* ... of them handed to Python */
    uint64_t member_shared;        /* member requests whose data went through shared memory */
    uint64_t shm_leaked;           /* bytes of it set aside: a dropped replica may use it */
    uint64_t local_reads;          /* reads served from a local replica's head file */
};

/* The volume: size, quorum base, deadlines (seconds; the bare quorum of RW members gets
 * timeout_last), name (for messages). Call again to change any of them. shm_fd (or -1): a
 * memfd of shm_size bytes, mapped at the first call only (the caller keeps the fd open for
 * replicas to SHARE): payloads of volume I/O live there while a member shares it, and such
 * members read and write them in place instead of through their socket. */
int tandem_vol_setup(tandem_engine *e, uint64_t size, int replica_count, int quorum,
                     double timeout, double timeout_last, const char *name, int shm_fd,
                     uint64_t shm_size);
/* Hand over member slot's data connection: a connected socket (blocking mode) that already
 * OPENed the replica with the member's fencing key; mode RW or WO; current: dropping it needs
 * a generation bump (RW members always do); shared: the replica SHAREd the volume's memory
 * on this connection. local (or NULL): {replica pid, then what SHARE answered: its head
 * file's fd number, its local-read page's fd number, generation}: the engine then reads that
 * file itself while the page says so (replica/protocol.py SHARE); TANDEM_NO_OFFER in place of
 * the fd numbers: no local reads. The pid also tells when memory the replica may still use
 * after its connection was dropped comes back: once it exited. Replaces the slot's previous
 * connection. TANDEM_EV_DONE id once the member receives writes. */
#define TANDEM_NO_OFFER 0xffffffffu
int tandem_member_attach(tandem_engine *e, int slot, int fd, int mode, int current, int shared,
                         const uint32_t *local, const char *address, uint64_t id);
/* Change a member's mode: RW/WO, or ERR (drop it: close its connection, like a failure).
 * current as above. TANDEM_EV_DONE id. */
int tandem_member_mode(tandem_engine *e, int slot, int mode, int current, const char *why,
                       uint64_t id);
/* The member's region map, shared with Python (target/regions.py): `count` bytes, one per
 * region of `region` bytes. The engine marks it for every write the member misses while it
 * is ERR and tracking; tracking starts, on a cleared map, when an RW member is dropped.
 * Replacing a map carries its marks over when the region size is the same, else tracking
 * stops; track = 0 stops tracking; map NULL forgets the slot. TANDEM_EV_DONE id once the
 * engine no longer uses the previous map. */
int tandem_member_map(tandem_engine *e, int slot, uint8_t *map, uint64_t count, uint64_t region,
                      int track, uint64_t id);
/* 1 while the engine marks the member's map (a returning member can be rebuilt from it). */
int tandem_member_tracking(tandem_engine *e, int slot);
/* Python bumped the generation of every current member, covering the drops up to seq:
 * writes are acknowledged again once every drop is covered. */
int tandem_vol_stable(tandem_engine *e, uint64_t seq);
/* Exclusive range lock over n [start, end) byte ranges (ranges has 2n values): engine writes
 * overlapping them wait; TANDEM_EV_DONE id once overlapping writes in flight are done. */
int tandem_vol_lock(tandem_engine *e, uint64_t id, const uint64_t *ranges, int n);
int tandem_vol_unlock(tandem_engine *e, uint64_t id);
/* QoS limits (target/qos.py): read, write, total IOPS; read, write, total bytes/s; 0 = none. */
int tandem_vol_qos(tandem_engine *e, const double *limits, double burst_seconds);
/* A volume request on Python's behalf (a BlockDevice call): TANDEM_EV_IO_DONE id. data: the
 * bytes to write (Python keeps them alive until done); reads come back in the event. */
int tandem_vol_submit(tandem_engine *e, uint64_t id, int frontend, int op, int flags,
                      uint64_t offset, uint32_t length, const void *data);
/* Adopt an NBD client socket (blocking mode) after the handshake: flags TANDEM_NBD_*, the
 * export size it was told, the bytes Python already read past the handshake. */
int tandem_nbd_add(tandem_engine *e, uint64_t conn, int fd, int flags, uint64_t size,
                   int frontend, const void *pre, size_t prelen);
/* Stop reading from an NBD connection, answer what is in flight, then close it. */
int tandem_nbd_stop(tandem_engine *e, uint64_t conn);
struct tandem_target_stats *tandem_target_stats(tandem_engine *e);

/* --- iSCSI's full feature phase (native/iscsi_server.c) --------------------------------- */

/* Up-call kinds (tandem_event.op) of an iSCSI connection: the event's data is the request's
 * BHS (+ AHS for SCSI; `offset` is their length) then the Data-Out or the data segment. */
enum {
    TANDEM_ISCSI_UP_SCSI = 1,   /* a SCSI command for ScsiTarget: answer with tandem_iscsi_result */
    TANDEM_ISCSI_UP_TMF = 2,    /* flags: 1 when ABORT TASK found its task; tandem_iscsi_pdus */
    TANDEM_ISCSI_UP_TEXT = 3,
    TANDEM_ISCSI_UP_LOGOUT = 4,
};
/* tandem_iscsi_pdus flags */
enum {
    TANDEM_ISCSI_CLOSE = 1, /* close the connection once these PDUs are sent */
};

/* What the login negotiated, and where the session's numbering stands. */
struct tandem_iscsi_params {
    uint32_t statsn;     /* the next StatSN */
    uint32_t expcmdsn;   /* the session's ExpCmdSN */
    uint32_t cmd_window; /* commands in flight (MaxCmdSN = ExpCmdSN - 1 + window - running) */
    uint32_t initiator_recv_length; /* the initiator's MaxRecvDataSegmentLength: what we send */
    uint32_t target_recv_length;    /* ours: what we accept */
    uint32_t max_burst_length;
    uint32_t first_burst_length;
    uint32_t max_outstanding_r2t;
    uint32_t max_data_transfer; /* a command's Data-Out beyond this is refused */
    uint8_t header_digest;
    uint8_t data_digest;
    uint8_t initial_r2t;
    uint8_t immediate_data;
    uint16_t cid;
    uint16_t reserved;
    int32_t frontend; /* stats slot */
    double nop_interval; /* seconds of silence before a NOP-In probe; 0: none */
    double nop_timeout;  /* an initiator silent this long after a probe is dropped */
};

/* Adopt a logged-in iSCSI connection (blocking mode) with the bytes Python read past the
 * login. It starts in slow mode (every SCSI command up) until Python says otherwise. */
int tandem_iscsi_add(tandem_engine *e, uint64_t conn, int fd,
                     const struct tandem_iscsi_params *params, const void *pre, size_t prelen);
/* The result of an up-called SCSI command: status, Data-In, sense, the Data-Out its CDB
 * transfers (-1: unknown), slow mode afterwards (-1: unchanged). */
int tandem_iscsi_result(tandem_engine *e, uint64_t conn, uint64_t tag, int status,
                        const void *data, size_t len, const void *sense, size_t slen,
                        int64_t wanted, int slow);
/* The answer to a TMF/Text/Logout up-call: encoded PDUs (no digests; StatSN, ExpCmdSN and
 * MaxCmdSN are filled in), flags TANDEM_ISCSI_*, the initiator's new
 * MaxRecvDataSegmentLength (0: unchanged), slow mode (-1: unchanged). */
int tandem_iscsi_pdus(tandem_engine *e, uint64_t conn, uint64_t tag, const void *pdus,
                      size_t len, int flags, uint32_t recv_length, int slow);
/* Send every SCSI command of the connection up (1) or run READ/WRITE/SYNC in C (0). */
int tandem_iscsi_slow(tandem_engine *e, uint64_t conn, int slow);
/* Abort the connection's tasks on lun (-1: all), answering each with status (-1: none);
 * TANDEM_EV_DONE id once those executing are over. */
int tandem_iscsi_abort(tandem_engine *e, uint64_t conn, uint64_t id, int64_t lun, int status);
/* Stop reading, finish what is in flight, then close. */
int tandem_iscsi_stop(tandem_engine *e, uint64_t conn);

/* --- a tiny pipelined replica-protocol client for benchmarks (native/bench_replica.py) --- */

struct tandem_bench_result {
    uint64_t ops;
    uint64_t errors;
    uint64_t bytes;
    double seconds;
    double lat_us_sum;
    double lat_us_max;
};

/* Connect to host:port, OPEN with epoch (when write), then keep qd requests of bs bytes
 * at random bs-aligned offsets below span in flight for `seconds`. 0 or -errno. */
int tandem_bench_run(const char *host, int port, int write, uint32_t bs, int qd,
                     double seconds, uint64_t span, uint64_t epoch, uint64_t seed,
                     struct tandem_bench_result *out);

/* cffi:end */

#endif
