"""The iSCSI server on the native engine: Python accepts and runs the login (the Python
server's own code), then hands the socket to the engine, which runs the full feature phase
(native/iscsi_server.c): PDU framing, digests, the CmdSN window, R2T/Data-Out, Data-In and
status, NOP, and READ/WRITE/SYNCHRONIZE CACHE on the volume. What it does not run comes up:

- SCSI commands it does not execute (other CDBs, failed checks, slow mode): run here on the
  same ScsiTarget as the Python server, the result goes back to the engine, which sends it.
- TMF, Text and Logout requests, once the engine ended the tasks they abort on their own
  connection: answered with the Python session's rules; task management that reaches other
  sessions asks their engine connections to abort.

Slow mode: while a unit attention is pending for a connection's I_T nexus, or a reservation
exists, or the mode pages ask for more than plain I/O (software write protect, write cache
off), the engine sends every SCSI command of that connection up, so SPC semantics stay
exactly the Python ones. Discovery sessions stay in Python."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from native import engine as ne
from target.frontends.iscsi import pdu as p
from target.frontends.iscsi.config import TargetConfig
from target.frontends.iscsi.connection import Connection
from target.frontends.iscsi.scsi.types import CHECK_CONDITION, TASK_ABORTED, ScsiResult
from target.frontends.iscsi.scsi.unit_attention import nexus_key
from target.frontends.iscsi.server import IscsiServer
from target.frontends.iscsi.session import (
    LOGOUT_CLOSED,
    LOGOUT_NO_CID,
    LOGOUT_NO_RECOVERY,
    Session,
)
from target.frontends.iscsi.transfer import INTERNAL_TARGET_FAILURE, fixed_sense

if TYPE_CHECKING:
    from target.frontends.iscsi.scsi.target import ScsiTarget

log = logging.getLogger("target.frontends.iscsi.connection")

# Connection ids of the engine: iSCSI's live above NBD's (target/native_nbd.py counts from 1).
CONN_ID_BASE = 1 << 32


def decode(raw: bytes) -> p.Pdu:
    """A PDU from the BHS (+ AHS) and data segment the engine sent up."""
    dec = p.Decoder(max_data_segment=p.MAX_DATA_SEGMENT)
    dec.feed(raw)
    pdu = dec.next_pdu()
    assert pdu is not None, "the engine sent up a partial PDU"
    return pdu


def frame(bhs_ahs: bytes, data: bytes) -> bytes:
    """BHS (+ AHS) with its data segment length set to data, data padded."""
    out = bytearray(bhs_ahs)
    out[5:8] = len(data).to_bytes(3, "big")
    return bytes(out) + data + bytes(p.pad4(len(data)))


def needs_slow(scsi: ScsiTarget | None, session: Session) -> bool:
    """Does a command of this session need Python's SPC rules (logical_unit.py execute)
    rather than the engine's READ/WRITE/SYNC?"""
    if scsi is None:
        return True
    lu = scsi.logical_unit(0)
    if lu is None:
        return True
    pending = lu.uas._pending.get(nexus_key(session.nexus))
    if pending is None or pending:  # a new nexus starts with the power-on unit attention
        return True
    res = lu.reservations
    if res.spc2_holder is not None or res.pr.res_type:
        return True
    return bool(lu.mode.swp or not lu.mode.wce)


class NativeSession(Session):
    """A session whose connection the engine serves after the login."""

    conn: NativeConnection | None  # type: ignore[assignment]

    async def _end(self, nexus_lost: bool) -> None:
        conn = self.conn
        if conn is not None and conn.eid is not None:
            conn.abort()  # the engine finishes what is executing, then reports the close
            await conn.closed.wait()
        await super()._end(nexus_lost)
        if isinstance(self.registry, NativeIscsiServer):
            self.registry.refresh_slow()  # its SPC-2 reservation may be gone

    async def _abort_everywhere(self, lun: int | None) -> None:
        """Other sessions' tasks (this connection's were aborted by the engine already)."""
        assert self.target is not None
        waits = []
        for session in self.registry.sessions_for(self.target):
            conn = session.conn
            if session is self or not isinstance(conn, NativeConnection) or conn.eid is None:
                if session is not self:
                    tasks = [t for t in session.tasks.values() if lun is None or t.lun == lun]
                    await session.abort_tasks(tasks, status=TASK_ABORTED)
                continue
            with contextlib.suppress(OSError):
                waits.append(conn.engine.iscsi_abort(conn.eid, lun, TASK_ABORTED))
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)

    async def native_tmf(self, pdu: p.TaskManagementRequest, found: bool) -> int:
        """session.py _tmf_function, the engine having aborted this connection's tasks."""
        fn = pdu.function
        if self.scsi is None:
            return p.TmfResponse.NOT_SUPPORTED
        lun = p.decode_lun(pdu.lun)
        if fn == p.TmfFunction.ABORT_TASK:
            return p.TmfResponse.COMPLETE if found else p.TmfResponse.NO_TASK
        if fn in (
            p.TmfFunction.ABORT_TASK_SET,
            p.TmfFunction.CLEAR_TASK_SET,
            p.TmfFunction.LOGICAL_UNIT_RESET,
        ):
            if lun not in self.scsi.luns():
                return p.TmfResponse.NO_LUN
            if fn != p.TmfFunction.ABORT_TASK_SET:
                await self._abort_everywhere(lun)
                if fn == p.TmfFunction.LOGICAL_UNIT_RESET:
                    await self.scsi.reset_lun(lun, self.nexus)
            return p.TmfResponse.COMPLETE
        if fn in (p.TmfFunction.TARGET_WARM_RESET, p.TmfFunction.TARGET_COLD_RESET):
            await self._abort_everywhere(None)
            await self.scsi.reset_target(self.nexus)
            return p.TmfResponse.COMPLETE
        if fn == p.TmfFunction.TASK_REASSIGN:
            return p.TmfResponse.REASSIGN_UNSUPPORTED
        return p.TmfResponse.NOT_SUPPORTED


class NativeConnection(Connection):
    """Logs in like the Python connection, then hands the socket to the engine."""

    server: NativeIscsiServer  # type: ignore[assignment]

    def __init__(self, server: NativeIscsiServer, *args: Any) -> None:
        super().__init__(server, *args)
        self.engine = server.engine
        self.eid: int | None = None  # the engine's connection id once handed over
        self.closed = asyncio.Event()
        self.slow: bool | None = None  # what the engine was last told
        self._capture: list[p.Pdu] | None = None

    def send(self, pdu: p.Pdu, status: bool = False) -> None:
        if self.eid is None:
            super().send(pdu, status)
        elif self._capture is not None:
            self._capture.append(pdu)  # an answer to the current up-call
        else:
            log.debug("%r: dropped %s sent outside an up-call", self, type(pdu).__name__)

    async def drain(self) -> None:
        if self.eid is None:
            await super().drain()

    def close(self) -> None:
        if self.eid is None:
            super().close()
        else:
            self.engine.iscsi_stop(self.eid)

    def abort(self) -> None:
        if self.eid is None:
            super().abort()
        else:
            self.engine.close_conn(self.eid)

    async def _keepalive(self) -> None:
        return  # the engine probes (NOP-In) once it has the connection

    async def _full_feature(self, session: Session) -> None:
        if session.discovery or not isinstance(session, NativeSession):
            await super()._full_feature(session)
            return
        await self._hand_over(session)
        await self.closed.wait()

    async def _hand_over(self, session: NativeSession) -> None:
        transport = self.writer.transport
        transport.pause_reading()  # nothing more for asyncio: the engine reads from here on
        if transport.get_write_buffer_size():
            await self.writer.drain()  # the login response goes out before the engine's PDUs
        sock = transport.get_extra_info("socket")
        pending = bytes(self.decoder._buf) + bytes(self.reader._buffer)  # read past the login
        self.decoder._buf.clear()
        self.reader._buffer.clear()
        fd = os.dup(sock.fileno())
        transport.abort()  # closes asyncio's descriptor only; the connection lives on in fd
        os.set_blocking(fd, True)  # io_uring polls; O_NONBLOCK would make it return EAGAIN
        server = self.server
        params = self.params
        eid = next(server.ids)
        self.slow = True
        self.engine.iscsi_add(  # raises (fd closed) if the engine cannot take it
            eid,
            fd,
            {
                "statsn": self.statsn,
                "expcmdsn": session.window.expcmdsn,
                "cmd_window": session.window.depth,
                "initiator_recv_length": params.initiator_recv_length,
                "target_recv_length": params.target_recv_length,
                "max_burst_length": params.max_burst_length,
                "first_burst_length": params.first_burst_length,
                "max_outstanding_r2t": params.max_outstanding_r2t,
                "max_data_transfer": min(session.max_data_transfer, 0xFFFFFFFF),
                "header_digest": int(params.header_digest),
                "data_digest": int(params.data_digest),
                "initial_r2t": int(params.initial_r2t),
                "immediate_data": int(params.immediate_data),
                "cid": self.cid,
                "frontend": server.frontend,
                "nop_interval": server.nop_interval or 0.0,
                "nop_timeout": server.nop_timeout if server.nop_interval else 0.0,
            },
            pending,
        )
        self.eid = eid
        server.conns[eid] = self


class NativeIscsiServer(IscsiServer):
    """IscsiServer whose full feature phase runs in the engine."""

    connection_class = NativeConnection  # type: ignore[assignment]
    session_class = NativeSession

    def __init__(
        self, targets: Iterable[TargetConfig], *, engine: ne.Engine, frontend: str = "iscsi",
        **kw: Any,
    ) -> None:  # fmt: skip
        super().__init__(targets, **kw)
        self.engine = engine
        self.frontend = ne.FRONTENDS.index(frontend)
        self.ids = itertools.count(CONN_ID_BASE + 1)
        self.conns: dict[int, NativeConnection] = {}
        self._jobs: set[asyncio.Task[Any]] = set()

    # --- engine events -------------------------------------------------------------------------

    def upcall(self, up: ne.Upcall) -> None:
        conn = self.conns.get(up.conn)
        session = conn.session if conn is not None else None
        if conn is None or not isinstance(session, NativeSession):
            self._refuse(up)
            return
        if up.op == ne.ISCSI_UP_SCSI:
            self._spawn(self._scsi(conn, session, up))
        elif up.op == ne.ISCSI_UP_TMF:
            self._spawn(self._tmf(conn, session, up))
        elif up.op == ne.ISCSI_UP_TEXT:
            self._text(conn, session, up)
        elif up.op == ne.ISCSI_UP_LOGOUT:
            self._logout(conn, session, up)
        else:
            self._refuse(up)

    def _refuse(self, up: ne.Upcall) -> None:
        """Release the engine's hold on an up-call nobody can answer."""
        if up.op == ne.ISCSI_UP_SCSI:
            sense = fixed_sense(*INTERNAL_TARGET_FAILURE)
            self.engine.iscsi_result(up.conn, up.tag, CHECK_CONDITION, b"", sense, None)
        else:
            self.engine.iscsi_pdus(up.conn, up.tag, b"", ne.ISCSI_CLOSE)

    def _spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self._jobs.add(job)
        job.add_done_callback(self._job_done)

    def _job_done(self, job: asyncio.Task[Any]) -> None:
        self._jobs.discard(job)
        if not job.cancelled() and job.exception() is not None:
            log.error("iSCSI up-call failed", exc_info=job.exception())

    def conn_closed(self, cid: int) -> None:
        conn = self.conns.pop(cid, None)
        if conn is not None:
            conn.closed.set()

    def proto_error(self, cid: int, message: str) -> None:
        conn = self.conns.get(cid)
        log.warning("%r: %s", conn, message)

    def refresh_slow(self) -> None:
        """Tell every engine connection whether its commands need Python (a unit attention
        or a reservation appeared or went away)."""
        for cid, conn in list(self.conns.items()):
            session = conn.session
            if session is None:
                continue
            slow = needs_slow(session.scsi, session)
            if slow != conn.slow:
                conn.slow = slow
                self.engine.iscsi_slow(cid, slow)

    # --- up-calls --------------------------------------------------------------------------------

    async def _scsi(self, conn: NativeConnection, session: NativeSession, up: ne.Upcall) -> None:
        try:
            cmd = decode(frame(up.payload[: up.offset], b""))
            assert isinstance(cmd, p.ScsiCommand)
            scsi = session.scsi
            assert scsi is not None
            data_out = up.payload[up.offset :]
            try:
                result = await scsi.execute(p.decode_lun(cmd.lun), cmd.cdb, session.nexus, data_out)
            except Exception:
                log.exception("%r: command %s failed", session, cmd.cdb[:1].hex())
                result = ScsiResult(CHECK_CONDITION, sense=fixed_sense(*INTERNAL_TARGET_FAILURE))
            wanted = scsi.expected_data_out(cmd.cdb) if cmd.write else None
        except BaseException:
            self._refuse(up)
            raise
        # Slow mode first (the command may have changed what any nexus sees): the engine
        # applies it before the result, so no later command runs on stale rules.
        self.refresh_slow()
        self.engine.iscsi_result(
            up.conn, up.tag, result.status, bytes(result.data), result.sense, wanted
        )

    async def _tmf(self, conn: NativeConnection, session: NativeSession, up: ne.Upcall) -> None:
        try:
            pdu = decode(frame(up.payload[: up.offset], up.payload[up.offset :]))
            assert isinstance(pdu, p.TaskManagementRequest)
            response = await session.native_tmf(pdu, bool(up.flags & 1))
        except BaseException:
            self._refuse(up)
            raise
        cold = pdu.function == p.TmfFunction.TARGET_COLD_RESET
        cold = cold and response == p.TmfResponse.COMPLETE
        answer = p.encode_bytes(p.TaskManagementResponse(itt=pdu.itt, response=response))
        self.refresh_slow()  # a reset is a unit attention for every nexus
        self.engine.iscsi_pdus(up.conn, up.tag, answer, ne.ISCSI_CLOSE if cold else 0)
        if cold:
            # A cold reset ends every session of the target (RFC 7143 11.5.1).
            assert session.target is not None
            for other in self.sessions_for(session.target):
                if other is not session and other.conn is not None:
                    other.conn.abort()

    def _text(self, conn: NativeConnection, session: NativeSession, up: ne.Upcall) -> None:
        captured: list[p.Pdu] = []
        conn._capture = captured
        try:
            pdu = decode(frame(up.payload[: up.offset], up.payload[up.offset :]))
            assert isinstance(pdu, p.TextRequest)
            session._text_exchange(pdu)
        except BaseException:
            conn._capture = None
            self._refuse(up)
            raise
        conn._capture = None
        out = b"".join(p.encode_bytes(x) for x in captured)
        self.engine.iscsi_pdus(up.conn, up.tag, out, 0, conn.params.initiator_recv_length)

    def _logout(self, conn: NativeConnection, session: NativeSession, up: ne.Upcall) -> None:
        """session.py _logout; the engine aborted the tasks when the session closes."""
        try:
            pdu = decode(frame(up.payload[: up.offset], up.payload[up.offset :]))
            assert isinstance(pdu, p.LogoutRequest)
        except BaseException:
            self._refuse(up)
            raise
        if pdu.reason == 2:
            response = LOGOUT_NO_RECOVERY
        elif pdu.reason == 1 and pdu.cid != session.cid:
            response = LOGOUT_NO_CID
        elif pdu.reason in (0, 1):
            response = LOGOUT_CLOSED
            session.logging_out = True
        else:
            reject = p.Reject(reason=p.RejectReason.INVALID_PDU_FIELD, data=pdu.header()[:48])
            self.engine.iscsi_pdus(up.conn, up.tag, p.encode_bytes(reject))
            return
        answer = p.encode_bytes(p.LogoutResponse(itt=pdu.itt, response=response))
        flags = ne.ISCSI_CLOSE if response == LOGOUT_CLOSED else 0
        self.engine.iscsi_pdus(up.conn, up.tag, answer, flags)

    async def close(self) -> None:
        await super().close()
        for job in list(self._jobs):
            job.cancel()
