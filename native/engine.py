"""The engine's Python side: start and stop it, queue commands, drain its events on the
asyncio loop and turn the ones answering a request into futures (native/ENGINE.md).

The engine runs on its own thread; every method here only queues a command (thread-safe,
non-blocking) except `close()`, which waits for the engine's in-flight I/O and joins it.
Buffers handed to the engine (block maps, intent bitmaps) are kept alive here until the
engine is gone or told to use others.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from native import engine_unavailable, ffi, lib

EV_PAUSED = 1
EV_UPCALL = 2
EV_CONN_CLOSED = 3
EV_PROTO_ERROR = 4
EV_FAULT_DROP = 5
EV_FAULT_USED = 6
EV_LOG = 7
EV_DONE = 8
EV_IO_DONE = 9
EV_MEMBER_DOWN = 10

CONN_REPLICA_SERVER = 1
CONN_NBD = 2
CONN_ISCSI = 4

# iSCSI up-call kinds (Upcall.op) and answer flags
ISCSI_UP_SCSI, ISCSI_UP_TMF, ISCSI_UP_TEXT, ISCSI_UP_LOGOUT = 1, 2, 3, 4
ISCSI_CLOSE = 1

# the target side: member modes, volume request ops and flags, NBD connection flags
MODE_ERR, MODE_WO, MODE_RW = 0, 1, 2
VIO_READ, VIO_WRITE, VIO_FLUSH, VIO_UNMAP, VIO_WRITE_ZEROES = 1, 2, 3, 4, 5
VIO_FUA, VIO_NO_HOLE, VIO_LOCKED = 1, 2, 4
NBD_STRUCTURED, NBD_META_CONTEXT, NBD_READONLY = 1, 2, 4
FRONTENDS = ("nbd", "iscsi", "internal")  # stats slots
STAT_OPS = ("read", "write", "flush", "unmap", "write_zeroes")
MAX_MEMBERS = 32

EPOCH_KEEP = 0
EPOCH_SET = 1
EPOCH_CLEAR = 2

# replica/faults.py actions and the engine's fault slots (slot 6 is "replica.*")
FAULT_ACTIONS = {"delay": 1, "fail": 2, "hang": 3, "drop": 4, "crash": 5}
FAULT_SLOTS = ("read", "write", "flush", "unmap", "write_zeroes", "checksum", "*")

_BATCH = 256


# IORING_FEAT_NO_IOWAIT (Linux 6.15): the engine's sleeps are not counted as iowait.
NO_IOWAIT_FEATURE = 1 << 17
NO_OFFER = 0xFFFFFFFF  # in place of a fd number: no local reads (tandem.h TANDEM_NO_OFFER)


class LocalOffer(NamedTuple):
    """A replica on this host, as its data connection found it: its pid (from the unix
    socket) and SHARE's offer of local reads, the fd numbers in its process of its head
    file and of its page of (generation, readable), and the generation they hold; the fd
    numbers are NO_OFFER when it made none."""

    pid: int
    head_fd: int = NO_OFFER
    page_fd: int = NO_OFFER
    generation: int = 0


@dataclass(slots=True)
class Upcall:
    """A request the engine hands to Python."""

    conn: int
    op: int
    tag: int
    flags: int
    offset: int
    length: int
    payload: bytes


class EngineHandler:
    """What the engine's owner hears about; override what matters."""

    def on_upcall(self, up: Upcall) -> None:
        raise NotImplementedError

    def on_conn_closed(self, conn: int) -> None:
        pass

    def on_proto_error(self, conn: int, message: str) -> None:
        pass

    def on_fault_drop(self, conn: int, op: str) -> None:
        pass

    def on_fault_used(self, slot: int) -> None:
        pass

    def on_log(self, level: int, message: str) -> None:
        pass

    def on_member_down(self, slot: int, seq: int, was: int, gen: int, why: str) -> None:
        """The engine dropped a member (or did as told): seq > 0 when a generation bump
        must cover it before writes are acknowledged again (tandem_vol_stable)."""


@dataclass(slots=True)
class IoResult:
    """What a volume request submitted by Python came to."""

    status: int  # 0 or an errno
    data: bytes  # the bytes read, or the error message


class Engine:
    def __init__(self, handler: EngineHandler) -> None:
        why = engine_unavailable()
        if why is not None:
            raise OSError(errno.ENOSYS, why)
        err = ffi.new("int *")
        eng = lib.tandem_engine_new(err)
        if eng == ffi.NULL:
            code = -err[0] or errno.EIO
            raise OSError(code, f"cannot start the engine: {os.strerror(code)}")
        self._eng: Any = eng
        self.handler = handler
        self._events = ffi.new("struct tandem_event[]", _BATCH)
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._efd = lib.tandem_engine_event_fd(eng)
        self._shared: list[Any] = []  # ffi.from_buffer views the engine points into
        self._stats_ptr = lib.tandem_replica_stats(eng)
        self._final_stats: dict[str, Any] | None = None
        self._tstats_ptr = lib.tandem_target_stats(eng)
        self._final_tstats: dict[str, Any] | None = None
        self._poll_ptr = lib.tandem_engine_poll_stats(eng)
        self._final_poll: dict[str, Any] | None = None
        self._maps: dict[int, Any] = {}  # member slot -> the map view the engine uses
        self._keep: dict[int, Any] = {}  # request id -> buffers it needs until answered

    # --- lifecycle ----------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drain events on this loop from now on."""
        self._loop = loop
        loop.add_reader(self._efd, self.drain)

    @property
    def running(self) -> bool:
        return self._eng is not None

    def close(self) -> None:
        """Close every connection, let in-flight I/O finish, stop the thread. Idempotent."""
        if self._eng is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._efd)
        self.drain()
        self._final_stats = self.replica_stats()
        self._final_tstats = self.target_stats()
        self._final_poll = self.poll_stats()
        eng, self._eng = self._eng, None
        lib.tandem_engine_free(eng)  # joins the engine thread (cffi releases the GIL)
        self.release_shared()
        for view in self._maps.values():
            ffi.release(view)
        self._maps.clear()
        self._keep.clear()
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(OSError(errno.ESHUTDOWN, "the engine stopped"))
        self._futures.clear()

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise OSError(-rc, f"engine {what}: {os.strerror(-rc)}")

    @property
    def _live(self) -> Any:
        if self._eng is None:
            raise OSError(errno.ESHUTDOWN, "the engine stopped")
        return self._eng

    # --- events -------------------------------------------------------------------------------

    def drain(self) -> None:
        """Handle every queued event (the event fd became readable)."""
        if self._eng is None:
            return
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass
        while self._eng is not None:
            n = lib.tandem_engine_events(self._eng, self._events, _BATCH)
            for i in range(n):
                self._dispatch(self._events[i])
            if n < _BATCH:
                break

    def _dispatch(self, ev: Any) -> None:
        data = b""
        if ev.data != ffi.NULL:
            data = bytes(ffi.buffer(ev.data, ev.data_len))
            lib.tandem_free(ev.data)
        kind = ev.type
        h = self.handler
        if kind == EV_UPCALL:
            h.on_upcall(Upcall(ev.conn, ev.op, ev.tag, ev.flags, ev.offset, ev.length, data))
        elif kind == EV_PAUSED:
            fut = self._futures.pop(ev.id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == EV_CONN_CLOSED:
            h.on_conn_closed(ev.conn)
        elif kind == EV_PROTO_ERROR:
            h.on_proto_error(ev.conn, data.decode("utf-8", "replace"))
        elif kind == EV_FAULT_DROP:
            h.on_fault_drop(ev.conn, data.decode())
        elif kind == EV_FAULT_USED:
            h.on_fault_used(ev.id)
        elif kind == EV_LOG:
            h.on_log(ev.status, data.decode("utf-8", "replace"))
        elif kind == EV_DONE:
            self._keep.pop(ev.id, None)
            fut = self._futures.pop(ev.id, None)
            if fut is not None and not fut.done():
                if ev.status:
                    fut.set_exception(OSError(ev.status, os.strerror(ev.status)))
                else:
                    fut.set_result(None)
        elif kind == EV_IO_DONE:
            self._keep.pop(ev.id, None)
            fut = self._futures.pop(ev.id, None)
            if fut is not None and not fut.done():
                fut.set_result(IoResult(ev.status, data))
        elif kind == EV_MEMBER_DOWN:
            why = data.decode("utf-8", "replace")
            h.on_member_down(ev.id, ev.tag, ev.op, ev.conn, why)

    # --- commands -----------------------------------------------------------------------------

    async def pause(self) -> None:
        """Hold new I/O and wait until in-flight I/O is done (resume() ends it)."""
        assert self._loop is not None, "attach() first"
        rid = next(self._ids)
        fut = self._loop.create_future()
        self._futures[rid] = fut
        self._check(lib.tandem_engine_pause(self._live, rid), "pause")
        await fut

    def resume(self) -> None:
        self._check(lib.tandem_engine_resume(self._live), "resume")

    def add_conn(self, conn: int, fd: int, kind: int) -> None:
        """Hand over a connected socket (blocking mode); the engine closes it."""
        if self._eng is None:
            os.close(fd)
            raise OSError(errno.ESHUTDOWN, "the engine stopped")
        rc = lib.tandem_conn_add(self._eng, conn, fd, kind)
        if rc < 0:
            os.close(fd)
            self._check(rc, "add connection")

    def close_conn(self, conn: int) -> None:
        if self._eng is not None:
            lib.tandem_conn_close(self._eng, conn)

    def reply(
        self,
        conn: int,
        data: bytes,
        epoch_action: int = EPOCH_KEEP,
        epoch: int = 0,
        end: bool = True,
    ) -> None:
        """Answer an up-call: `data` is sent in order with the rest, then (end) the
        connection goes on with its next request. end=False sends an answer Python finished
        later, outside the up-call (the connection already went on)."""
        if self._eng is None:
            return
        self._check(
            lib.tandem_conn_reply(self._eng, conn, data, len(data), epoch_action, epoch, int(end)),
            "reply",
        )

    # --- the replica side ---------------------------------------------------------------------

    def release_shared(self) -> None:
        """Let go of the buffers shared with the engine (block maps, intent bitmaps), so
        Python may resize or replace them: only while paused, and hand the engine the new
        ones (replica_setup, set_layers) before resuming."""
        for view in self._shared:
            ffi.release(view)
        self._shared.clear()

    def replica_setup(
        self,
        size: int,
        epoch: int,
        intent_fd: int,
        marked: bytearray,
        touch: Any,
        region: int,
        clock0: float,
    ) -> None:
        m = ffi.from_buffer("uint8_t[]", marked)
        t = ffi.from_buffer("uint32_t[]", touch)
        self._shared += [m, t]
        self._check(
            lib.tandem_replica_setup(
                self._live, size, epoch, intent_fd, m, t, len(marked), region, clock0
            ),
            "replica setup",
        )

    def set_layers(self, fds: Sequence[int], head: bytearray, base: bytearray) -> None:
        """The layer files (bottom..head) and block maps; only while paused (or before any
        connection)."""
        h = ffi.from_buffer("uint8_t[]", head)
        b = ffi.from_buffer("uint8_t[]", base)
        self._shared += [h, b]
        self._check(
            lib.tandem_replica_set_layers(self._live, list(fds), len(fds), h, b), "set layers"
        )

    def set_epoch(self, epoch: int) -> None:
        self._check(lib.tandem_replica_set_epoch(self._live, epoch), "set epoch")

    def set_fault(self, slot: int, action: int, arg: float, remaining: int | None) -> None:
        rem = -1 if remaining is None else remaining
        self._check(lib.tandem_replica_set_fault(self._live, slot, action, arg, rem), "fault")

    def io(
        self, op: int, offset: int, length: int, data: bytes | None = None, flags: int = 0
    ) -> bytes:
        """One READ/WRITE/UNMAP/WRITE_ZEROES of the replica store (see `iov`); returns what
        a READ read."""
        if op == 1:  # READ
            out = bytearray(length)
            self.iov([(op, offset, length, flags, 0)], out)
            return bytes(out)
        self.iov([(op, offset, length, flags, 0)], data)
        return b""

    def iov(
        self, ios: list[tuple[int, int, int, int, int]], buf: bytes | bytearray | None = None
    ) -> None:
        """READs, WRITEs, UNMAPs and WRITE_ZEROES, each (op, offset, length, flags, at), of
        the replica store on Python's behalf, through the engine (ordered with the
        connections' requests, intent-logged, mapped) and all at once: a WRITE's data is
        buf[at:at + length], a READ reads into there (buf then a bytearray). Blocks until
        all are done; OSError(errno) of the first that failed."""
        arr = ffi.new("struct tandem_io[]", len(ios))
        base = ffi.from_buffer(buf) if buf else ffi.NULL
        for io, (op, offset, length, flags, at) in zip(arr, ios, strict=True):
            io.op, io.offset, io.length, io.flags = op, offset, length, flags
            if op in (1, 2) and length:  # READ, WRITE
                if at < 0 or at + length > len(buf or b""):
                    raise ValueError(f"piece {at}+{length} is outside the buffer")
                io.buf = base + at
        rc = lib.tandem_replica_iov(self._live, arr, len(ios))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def set_poll(self, microseconds: int) -> None:
        """Poll for this long after a completion before sleeping, while requests come one at
        a time (0: never). See tandem_engine_set_poll."""
        if microseconds < 0:
            raise ValueError("the poll time cannot be negative")
        lib.tandem_engine_set_poll(self._live, microseconds * 1000)

    @property
    def ring_features(self) -> int:
        """The IORING_FEAT_* bits of the engine's ring (NO_IOWAIT_FEATURE among them)."""
        return int(lib.tandem_engine_ring_features(self._live))

    def poll_stats(self) -> dict[str, Any]:
        """Polls that found work, polls that gave up and slept, seconds spent polling."""
        if self._eng is None:
            return dict(self._final_poll or {"hits": 0, "misses": 0, "seconds": 0.0})
        p = self._poll_ptr
        return {"hits": p.hits, "misses": p.misses, "seconds": p.ns / 1e9}

    def replica_stats(self) -> dict[str, Any]:
        """The engine's replica counters (a snapshot; the last one once closed)."""
        if self._eng is None:
            return dict(self._final_stats or {})
        s = self._stats_ptr
        return {
            "ops": list(s.ops),
            "errors": s.errors,
            "bytes_read": s.bytes_read,
            "bytes_written": s.bytes_written,
            "requests": s.requests,
            "upcalls": s.upcalls,
            "pauses": s.pauses,
            "file_writes": s.file_writes,
        }

    # --- the target side ----------------------------------------------------------------------

    def _request(self) -> tuple[int, asyncio.Future[Any]]:
        assert self._loop is not None, "attach() first"
        rid = next(self._ids)
        fut = self._loop.create_future()
        self._futures[rid] = fut
        return rid, fut

    def _forget(self, rid: int) -> None:
        self._futures.pop(rid, None)
        self._keep.pop(rid, None)

    def vol_setup(
        self,
        size: int,
        replica_count: int,
        quorum: int,
        timeout: float,
        timeout_last: float,
        name: str,
        shm_fd: int = -1,
        shm_size: int = 0,
    ) -> None:
        rc = lib.tandem_vol_setup(
            self._live,
            size,
            replica_count,
            quorum,
            timeout,
            timeout_last,
            name.encode(),
            shm_fd,
            shm_size,
        )
        self._check(rc, "volume setup")

    def member_attach(
        self,
        slot: int,
        fd: int,
        mode: int,
        current: bool,
        shared: bool,
        address: str,
        offer: LocalOffer | None = None,
    ) -> asyncio.Future[None]:
        """Hand over a member's data connection (the engine closes fd); done once the member
        receives writes. offer: a replica on this host (open_data_socket), else None."""
        if self._eng is None:
            os.close(fd)
            raise OSError(errno.ESHUTDOWN, "the engine stopped")
        rid, fut = self._request()
        li = ffi.new("uint32_t[4]", list(offer)) if offer else ffi.NULL
        rc = lib.tandem_member_attach(
            self._eng, slot, fd, mode, int(current), int(shared), li, address.encode(), rid
        )
        if rc < 0:
            self._forget(rid)
            os.close(fd)
            self._check(rc, "attach member")
        return fut

    def member_mode(
        self, slot: int, mode: int, current: bool, why: str = ""
    ) -> asyncio.Future[None]:
        rid, fut = self._request()
        rc = lib.tandem_member_mode(self._live, slot, mode, int(current), why.encode(), rid)
        if rc < 0:
            self._forget(rid)
            self._check(rc, "member mode")
        return fut

    def member_map(
        self, slot: int, bits: bytearray | None, region: int, track: bool = True
    ) -> asyncio.Future[None]:
        """The member's region map (None forgets the slot); the previous one is let go once
        the engine stopped using it."""
        rid, fut = self._request()
        old = self._maps.pop(slot, None)
        view = ffi.from_buffer("uint8_t[]", bits) if bits is not None else ffi.NULL
        if bits is not None:
            self._maps[slot] = view
        if old is not None:
            self._keep[rid] = old  # released with the answer (cffi views die with their object)
        count = len(bits) if bits is not None else 0
        rc = lib.tandem_member_map(self._live, slot, view, count, region, int(track), rid)
        if rc < 0:
            self._forget(rid)
            self._check(rc, "member map")
        return fut

    def member_tracking(self, slot: int) -> bool:
        return self._eng is not None and bool(lib.tandem_member_tracking(self._eng, slot))

    def vol_stable(self, seq: int) -> None:
        if self._eng is not None:
            self._check(lib.tandem_vol_stable(self._eng, seq), "stable")

    def lock(self, ranges: Sequence[tuple[int, int]]) -> tuple[int, asyncio.Future[None]]:
        """An exclusive lock over [start, end) ranges: (id for unlock(), granted future)."""
        rid, fut = self._request()
        flat = [v for r in ranges for v in r]
        rc = lib.tandem_vol_lock(self._live, rid, flat or [0, 0], len(ranges))
        if rc < 0:
            self._forget(rid)
            self._check(rc, "lock")
        return rid, fut

    def unlock(self, rid: int) -> None:
        self._futures.pop(rid, None)
        if self._eng is not None:
            self._check(lib.tandem_vol_unlock(self._eng, rid), "unlock")

    def qos(self, limits: Sequence[float], burst_seconds: float) -> None:
        self._check(lib.tandem_vol_qos(self._live, list(limits), burst_seconds), "qos")

    def submit(
        self,
        frontend: int,
        op: int,
        offset: int,
        length: int,
        data: bytes | None = None,
        flags: int = 0,
    ) -> asyncio.Future[IoResult]:
        """A volume request (the volume's write rule, reads, QoS, stats)."""
        rid, fut = self._request()
        buf = ffi.NULL
        if data is not None:
            buf = ffi.from_buffer(data)
            self._keep[rid] = (data, buf)  # alive until the engine answered
        rc = lib.tandem_vol_submit(self._live, rid, frontend, op, flags, offset, length, buf)
        if rc < 0:
            self._forget(rid)
            self._check(rc, "submit")
        return fut

    def nbd_add(
        self, conn: int, fd: int, flags: int, size: int, frontend: int, pre: bytes = b""
    ) -> None:
        """Hand over an NBD client socket (blocking mode) after the handshake."""
        if self._eng is None:
            os.close(fd)
            raise OSError(errno.ESHUTDOWN, "the engine stopped")
        rc = lib.tandem_nbd_add(self._eng, conn, fd, flags, size, frontend, pre, len(pre))
        if rc < 0:
            os.close(fd)
            self._check(rc, "add NBD connection")

    def nbd_stop(self, conn: int) -> None:
        if self._eng is not None:
            lib.tandem_nbd_stop(self._eng, conn)

    # --- iSCSI (native/iscsi_server.c) -------------------------------------------------------

    def iscsi_add(self, conn: int, fd: int, params: dict[str, Any], pre: bytes = b"") -> None:
        """Hand over a logged-in iSCSI connection (blocking mode); params: the fields of
        struct tandem_iscsi_params."""
        if self._eng is None:
            os.close(fd)
            raise OSError(errno.ESHUTDOWN, "the engine stopped")
        p = ffi.new("struct tandem_iscsi_params *", params)
        rc = lib.tandem_iscsi_add(self._eng, conn, fd, p, pre, len(pre))
        if rc < 0:
            os.close(fd)
            self._check(rc, "add iSCSI connection")

    def iscsi_result(
        self,
        conn: int,
        tag: int,
        status: int,
        data: bytes,
        sense: bytes,
        wanted: int | None,
        slow: bool | None = None,
    ) -> None:
        """The result of an up-called SCSI command."""
        if self._eng is None:
            return
        rc = lib.tandem_iscsi_result(
            self._eng,
            conn,
            tag,
            status,
            data,
            len(data),
            sense,
            len(sense),
            -1 if wanted is None else wanted,
            -1 if slow is None else int(slow),
        )
        self._check(rc, "iSCSI result")

    def iscsi_pdus(
        self,
        conn: int,
        tag: int,
        pdus: bytes,
        flags: int = 0,
        recv_length: int = 0,
        slow: bool | None = None,
    ) -> None:
        """Answer a TMF/Text/Logout up-call with encoded PDUs (sequence numbers and
        digests are the engine's to fill in)."""
        if self._eng is None:
            return
        rc = lib.tandem_iscsi_pdus(
            self._eng, conn, tag, pdus, len(pdus), flags, recv_length,
            -1 if slow is None else int(slow),
        )  # fmt: skip
        self._check(rc, "iSCSI PDUs")

    def iscsi_slow(self, conn: int, slow: bool) -> None:
        if self._eng is not None:
            self._check(lib.tandem_iscsi_slow(self._eng, conn, int(slow)), "iSCSI slow mode")

    def iscsi_abort(self, conn: int, lun: int | None, status: int | None) -> asyncio.Future[None]:
        """Abort the connection's tasks (on lun, or all), answering each with status (or
        not at all); done once those executing are over."""
        rid, fut = self._request()
        rc = lib.tandem_iscsi_abort(
            self._live, conn, rid, -1 if lun is None else lun, -1 if status is None else status
        )
        if rc < 0:
            self._forget(rid)
            self._check(rc, "iSCSI abort")
        return fut

    def iscsi_stop(self, conn: int) -> None:
        if self._eng is not None:
            lib.tandem_iscsi_stop(self._eng, conn)

    def target_stats(self) -> dict[str, Any]:
        """The engine's target-side counters (a snapshot; the last one once closed)."""
        if self._eng is None:
            return dict(self._final_tstats or {})
        s = self._tstats_ptr
        fe = {}
        for i, name in enumerate(FRONTENDS):
            fe[name] = {
                op: {
                    "ops": s.fe[i][j].ops,
                    "bytes": s.fe[i][j].bytes,
                    "errors": s.fe[i][j].errors,
                    "lat": list(s.fe[i][j].lat),
                    "lat_sum": s.fe[i][j].lat_sum,
                }
                for j, op in enumerate(STAT_OPS)
            }
        return {
            "frontends": fe,
            "requests": s.requests,
            "upcalls": s.upcalls,
            "throttled": list(s.throttled),
            "throttled_seconds": list(s.throttled_seconds),
            "member_requests": s.member_requests,
            "member_shared": s.member_shared,
            "local_reads": s.local_reads,
            "shm_leaked": s.shm_leaked,
            "drops": s.drops,
            "drop_seq": s.drop_seq,
            "stable_seq": s.stable_seq,
            "frontend_requests": dict(zip(FRONTENDS, s.fe_requests, strict=False)),
            "frontend_upcalls": dict(zip(FRONTENDS, s.fe_upcalls, strict=False)),
        }
