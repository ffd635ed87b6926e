"""The full feature phase of one iSCSI session (RFC 7143 sections 4, 7 and 11).

The connection's read loop hands every PDU to `Session.receive`, which never blocks: it
orders non-immediate requests through the CmdSN window, starts one asyncio task per SCSI
command and answers NOP, text, task management and logout requests. A command task
collects the command's Data-Out (sending R2Ts as the rules allow), runs it on the SCSI
target, and sends its Data-In and status.

Aborting a command that is still waiting for data cancels it at once; a command already
executing on the SCSI target is left to finish (so the layers below never see an I/O torn
in half) and its response is suppressed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from target.frontends.iscsi.cmdsn import CommandWindow
from target.frontends.iscsi.config import TargetConfig
from target.frontends.iscsi.discovery import send_targets
from target.frontends.iscsi.negotiation import (
    LOGIN_IDENTITY,
    NEGOTIATED,
    NOT_UNDERSTOOD,
    REJECT,
    SECURITY_KEYS,
    TARGET_ONLY,
    TextError,
    encode_text,
    parse_number,
    parse_text,
)
from target.frontends.iscsi.pdu import (
    R2T,
    RESERVED_TAG,
    DataDigestError,
    DataOut,
    LoginRequest,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    PduError,
    Reject,
    RejectReason,
    ScsiCommand,
    ScsiResponse,
    Snack,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    TmfFunction,
    TmfResponse,
    decode_lun,
)
from target.frontends.iscsi.scsi.types import (
    CHECK_CONDITION,
    TASK_ABORTED,
    Nexus,
    ScsiResult,
    ScsiTarget,
)
from target.frontends.iscsi.transfer import (
    INTERNAL_TARGET_FAILURE,
    WriteTransfer,
    data_in,
    fixed_sense,
)

if TYPE_CHECKING:
    from target.frontends.iscsi.connection import Connection
    from target.frontends.iscsi.login import LoginResult

log = logging.getLogger(__name__)

Numbered = ScsiCommand | NopOut | TaskManagementRequest | TextRequest | LogoutRequest

MAX_IMMEDIATE = 32  # immediate SCSI commands in flight, on top of the CmdSN window
LOGOUT_CLOSED, LOGOUT_NO_CID, LOGOUT_NO_RECOVERY = 0, 1, 2


class SessionRegistry(Protocol):
    """What a session needs from the server: the other sessions of its target (task
    management reaches across them) and every target (SendTargets)."""

    def sessions_for(self, target: TargetConfig) -> list[Session]: ...

    def all_targets(self) -> Iterable[TargetConfig]: ...

    def forget(self, session: Session) -> None: ...


class ScsiTask:
    __slots__ = (
        "aborted", "cmd", "executing", "finished", "lun", "ordered", "runner", "transfer", "wake"
    )  # fmt: skip

    def __init__(self, cmd: ScsiCommand, transfer: WriteTransfer | None) -> None:
        self.cmd = cmd
        self.lun = decode_lun(cmd.lun)
        self.transfer = transfer
        self.ordered = False  # holds a slot of the CmdSN window
        self.runner: asyncio.Task[None] | None = None  # None: held until its CmdSN is due
        self.executing = False  # in the SCSI target's hands: an abort waits, never cancels
        self.aborted = False  # no status goes out
        self.finished = False
        # Set when Data-Out arrives that the runner may be waiting for (writes only).
        self.wake = asyncio.Event() if transfer is not None else None


class _TextExchange:
    """A text request or response spread over several PDUs (C bit and TTT)."""

    __slots__ = ("incoming", "outgoing", "ttt")

    def __init__(self) -> None:
        self.incoming = bytearray()
        self.outgoing: list[bytes] = []
        self.ttt = RESERVED_TAG


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Done callback: mark an exception as seen (it was logged, or is irrelevant)."""
    if not future.cancelled():
        future.exception()


class Session:
    def __init__(
        self,
        registry: SessionRegistry,
        login: LoginResult,
        tsih: int,
        *,
        portal_group_tag: int,
        cmd_window: int,
        max_data_transfer: int = 16 << 20,
    ) -> None:
        self.registry = registry
        self.tsih = tsih
        self.max_data_transfer = max_data_transfer
        self.discovery = login.session_type == "Discovery"
        self.target = login.target
        self.initiator = login.initiator_name
        self.isid = login.isid
        self.cid = login.cid
        self.scsi: ScsiTarget | None = login.target.scsi if login.target else None
        self.nexus = Nexus(
            initiator=login.initiator_name,
            isid=login.isid,
            target=login.target.iqn if login.target else "",
            tpgt=portal_group_tag,
        )
        self.window: CommandWindow[Callable[[], None]] = CommandWindow(login.cmdsn, cmd_window)
        self.tasks: dict[int, ScsiTask] = {}
        self.conn: Connection | None = None
        self.ended = False
        self.logging_out = False
        self._immediate = 0
        self._next_ttt = 0
        self._text = _TextExchange()
        self._jobs: set[asyncio.Task[Any]] = set()
        self._ending: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Session tsih={self.tsih} {self.initiator} isid={self.isid.hex()}>"

    # ------------------------------------------------------------------ plumbing

    def attach(self, conn: Connection) -> None:
        self.conn = conn

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        job = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._job_done)
        return job

    def _job_done(self, job: asyncio.Task[Any]) -> None:
        self._jobs.discard(job)
        if not job.cancelled() and job.exception() is not None:
            log.error("%r: task failed", self, exc_info=job.exception())
            if self.conn is not None:
                self.conn.abort()  # state is unknown: end the session rather than guess

    def new_ttt(self) -> int:
        self._next_ttt = (self._next_ttt + 1) & 0xFFFFFFFF
        if self._next_ttt == RESERVED_TAG:
            self._next_ttt = 0
        return self._next_ttt

    def _send(self, pdu: Pdu, status: bool = False) -> None:
        if self.conn is not None and not self.ended:
            self.conn.send(pdu, status=status)

    def reject(self, reason: int, header: bytes) -> None:
        self._send(Reject(reason=reason, data=header[:48]), status=True)

    def _reject_pdu(self, pdu: Pdu, reason: int) -> None:
        self.reject(reason, pdu.header())

    def _ordered(self, pdu: Numbered, run: Callable[[bool], None]) -> bool:
        """Run an immediate request now, a non-immediate one in CmdSN order (run(True) means
        it holds a window slot to give back). False if it was dropped."""
        if pdu.immediate:
            run(False)
            return True
        ready = self.window.receive(pdu.cmdsn, partial(run, True))
        if ready is None:
            log.debug(
                "%r: CmdSN %d outside [%d, %d]: dropped",
                self,
                pdu.cmdsn,
                self.window.expcmdsn,
                self.window.maxcmdsn,
            )
            return False
        for item in ready:
            item()
        return True

    # ------------------------------------------------------------------ dispatch

    def receive(self, pdu: Pdu) -> None:
        """Handle one PDU from the initiator. Never blocks."""
        if self.ended:
            return
        if isinstance(pdu, DataOut):
            self._data_out(pdu)
        elif isinstance(pdu, ScsiCommand):
            self._command(pdu)
        elif isinstance(pdu, NopOut):
            self._nop_out(pdu)
        elif isinstance(pdu, TaskManagementRequest):
            self._ordered(pdu, partial(self._start_job, self._task_management, pdu))
        elif isinstance(pdu, TextRequest):
            self._ordered(pdu, partial(self._text_request, pdu))
        elif isinstance(pdu, LogoutRequest):
            self._ordered(pdu, partial(self._start_job, self._logout, pdu))
        elif isinstance(pdu, (Snack, LoginRequest)):
            self._reject_pdu(pdu, RejectReason.PROTOCOL_ERROR)  # no SNACK at ERL 0
        else:
            self._reject_pdu(pdu, RejectReason.COMMAND_NOT_SUPPORTED)  # a target's PDU

    def bad_pdu(self, error: PduError) -> None:
        """A PDU the decoder could not take (the connection survives it)."""
        self.reject(error.reason, error.header)
        if isinstance(error, DataDigestError) and isinstance(error.pdu, DataOut):
            self._data_out(error.pdu, digest_ok=False)  # fails its command
        # A command with a bad digest is not considered received (its CmdSN stays open).

    def _start_job(
        self, handler: Callable[[Any, bool], Coroutine[Any, Any, None]], pdu: Pdu, ordered: bool
    ) -> None:
        self._spawn(handler(pdu, ordered))

    # ------------------------------------------------------------------ SCSI commands

    def _command(self, cmd: ScsiCommand) -> None:
        if self.discovery or self.scsi is None:
            self._reject_pdu(cmd, RejectReason.PROTOCOL_ERROR)
            return
        if self.logging_out:
            return
        if cmd.itt == RESERVED_TAG:
            self._reject_pdu(cmd, RejectReason.INVALID_PDU_FIELD)
            return
        if cmd.itt in self.tasks:
            self._reject_pdu(cmd, RejectReason.TASK_IN_PROGRESS)
            return
        if cmd.immediate and self._immediate >= MAX_IMMEDIATE:
            self._reject_pdu(cmd, RejectReason.IMMEDIATE_REJECT)
            return
        transfer = None
        if cmd.write:
            assert self.conn is not None
            transfer = WriteTransfer(
                cmd.edtl, cmd.data, not cmd.final, self.conn.params, self.max_data_transfer
            )
        task = ScsiTask(cmd, transfer)
        self.tasks[cmd.itt] = task
        if not self._ordered(cmd, partial(self._start, task)):
            del self.tasks[cmd.itt]

    def _start(self, task: ScsiTask, ordered: bool) -> None:
        task.ordered = ordered
        if not ordered:
            self._immediate += 1
        task.runner = self._spawn(self._run(task))
        task.runner.add_done_callback(lambda _: self._finish(task))

    def _finish(self, task: ScsiTask) -> None:
        """Give back the task's window slot (before its status goes out, so the status
        carries the wider window) and forget it."""
        if task.finished:
            return
        task.finished = True
        if task.ordered:
            self.window.complete()
        elif task.runner is not None:
            self._immediate -= 1
        if self.tasks.get(task.cmd.itt) is task:
            del self.tasks[task.cmd.itt]

    async def _run(self, task: ScsiTask) -> None:
        try:
            result = await self._execute(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%r: command %s failed", self, task.cmd.cdb[:1].hex())
            result = ScsiResult(CHECK_CONDITION, sense=fixed_sense(*INTERNAL_TARGET_FAILURE))
        self._finish(task)
        if not task.aborted:
            await self._respond(task, result)

    async def _execute(self, task: ScsiTask) -> ScsiResult:
        assert self.scsi is not None
        data_out = b""
        transfer = task.transfer
        if transfer is not None:
            while not transfer.complete:
                for r2t in transfer.r2ts(self.new_ttt):
                    self._send(
                        R2T(
                            itt=task.cmd.itt,
                            lun=task.cmd.lun,
                            ttt=r2t.ttt,
                            r2tsn=r2t.r2tsn,
                            offset=r2t.offset,
                            length=r2t.length,
                        )
                    )
                if transfer.complete:
                    break
                assert task.wake is not None
                task.wake.clear()
                await task.wake.wait()
            if transfer.error is not None:
                return ScsiResult(CHECK_CONDITION, sense=fixed_sense(*transfer.error))
            data_out = transfer.data()
        task.executing = True
        try:
            return await self.scsi.execute(task.lun, task.cmd.cdb, self.nexus, data_out)
        finally:
            task.executing = False

    def _data_out(self, pdu: DataOut, digest_ok: bool = True) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None or task.transfer is None:
            return  # the command ended (aborted, or failed early): its data goes nowhere
        if task.transfer.data_out(pdu, digest_ok) and task.wake is not None:
            task.wake.set()

    async def _respond(self, task: ScsiTask, result: ScsiResult) -> None:
        conn = self.conn
        if conn is None or self.ended:
            return
        cmd = task.cmd
        rsp = ScsiResponse(itt=cmd.itt, status=result.status)
        bidi = cmd.read and cmd.write
        if cmd.write and self.scsi is not None:
            wanted = self.scsi.expected_data_out(cmd.cdb)
            if wanted is not None and wanted != cmd.edtl:
                rsp.overflow, rsp.underflow = cmd.edtl < wanted, cmd.edtl > wanted
                rsp.residual = abs(wanted - cmd.edtl)
        pdus = []
        if bidi or not cmd.write:
            expected = (cmd.bidi_read_length or 0) if bidi else cmd.edtl
            produced = len(result.data)
            over, under = produced > expected, produced < expected
            if bidi:
                rsp.bidi_overflow, rsp.bidi_underflow = over, under
                rsp.bidi_residual = abs(produced - expected)
            else:
                rsp.overflow, rsp.underflow = over, under
                rsp.residual = abs(produced - expected)
            sent = min(produced, expected)
            if sent:
                params = conn.params
                pdus = data_in(
                    memoryview(result.data)[:sent],
                    itt=cmd.itt,
                    lun=cmd.lun,
                    max_segment=params.initiator_recv_length,
                    max_burst=params.max_burst_length,
                )
        if pdus and not bidi and not result.sense:
            # Collapse the status into the last Data-In (S bit).
            last = pdus.pop()
            last.final = last.has_status = True
            last.status = result.status
            last.overflow, last.underflow, last.residual = rsp.overflow, rsp.underflow, rsp.residual
            for pdu in pdus:
                conn.send(pdu)
            conn.send(last, status=True)
        else:
            for pdu in pdus:
                conn.send(pdu)
            rsp.expdatasn = len(pdus)
            if result.sense:
                rsp.data = len(result.sense).to_bytes(2, "big") + result.sense
            conn.send(rsp, status=True)
        await conn.drain()

    # ------------------------------------------------------------------ aborting

    async def abort_tasks(self, tasks: Iterable[ScsiTask], status: int | None = None) -> None:
        """Abort these tasks of this session: cancel those still waiting for data, wait for
        those the SCSI target is executing (so no I/O is torn in half), and answer none of
        them (or answer each with `status`: how another initiator learns its commands were
        cleared)."""
        waits: list[asyncio.Future[Any]] = []
        aborted: list[ScsiTask] = []
        for task in list(tasks):
            if self.tasks.get(task.cmd.itt) is not task:
                continue
            if task.runner is None:  # still held for its CmdSN: it was never started
                del self.tasks[task.cmd.itt]
                _, ready = self.window.abort_pending(task.cmd.cmdsn)
                for item in ready:
                    item()
                continue
            aborted.append(task)
            task.aborted = True
            if not task.executing:
                task.runner.cancel()
            waits.append(task.runner)
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)
        if status is not None:
            for task in aborted:
                self._send(ScsiResponse(itt=task.cmd.itt, status=status), status=True)

    async def _abort_everywhere(self, lun: int | None) -> None:
        """Abort the tasks of every session of this target (on one LUN, or all)."""
        assert self.target is not None
        for session in self.registry.sessions_for(self.target):
            tasks = [t for t in session.tasks.values() if lun is None or t.lun == lun]
            other = None if session is self else TASK_ABORTED
            await session.abort_tasks(tasks, status=other)

    async def _task_management(self, pdu: TaskManagementRequest, ordered: bool) -> None:
        try:
            response = await self._tmf_function(pdu)
        finally:
            if ordered:
                self.window.complete()
        self._send(TaskManagementResponse(itt=pdu.itt, response=response), status=True)
        if pdu.function == TmfFunction.TARGET_COLD_RESET and response == TmfResponse.COMPLETE:
            # A cold reset ends every session of the target (RFC 7143 11.5.1), after the
            # response has gone out.
            assert self.conn is not None and self.target is not None
            await self.conn.drain()
            for session in self.registry.sessions_for(self.target):
                if session.conn is not None:
                    session.conn.abort()

    async def _tmf_function(self, pdu: TaskManagementRequest) -> int:
        fn = pdu.function
        if self.scsi is None:
            return TmfResponse.NOT_SUPPORTED
        lun = decode_lun(pdu.lun)
        if fn == TmfFunction.ABORT_TASK:
            task = self.tasks.get(pdu.rtt)
            if task is not None:
                await self.abort_tasks([task])
                return TmfResponse.COMPLETE
            if self.window.is_pending(pdu.refcmdsn):
                # Not arrived yet: it counts as received and aborted (RFC 7143 11.5.1).
                _, ready = self.window.abort_pending(pdu.refcmdsn)
                for item in ready:
                    item()
                return TmfResponse.COMPLETE
            return TmfResponse.NO_TASK
        if fn in (
            TmfFunction.ABORT_TASK_SET,
            TmfFunction.CLEAR_TASK_SET,
            TmfFunction.LOGICAL_UNIT_RESET,
        ):
            if lun not in self.scsi.luns():
                return TmfResponse.NO_LUN
            if fn == TmfFunction.ABORT_TASK_SET:
                await self.abort_tasks([t for t in self.tasks.values() if t.lun == lun])
            else:
                await self._abort_everywhere(lun)
                if fn == TmfFunction.LOGICAL_UNIT_RESET:
                    await self.scsi.reset_lun(lun, self.nexus)
            return TmfResponse.COMPLETE
        if fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            await self._abort_everywhere(None)
            await self.scsi.reset_target(self.nexus)
            return TmfResponse.COMPLETE
        if fn == TmfFunction.TASK_REASSIGN:
            return TmfResponse.REASSIGN_UNSUPPORTED  # needs ErrorRecoveryLevel 2
        return TmfResponse.NOT_SUPPORTED

    # ------------------------------------------------------------------ NOP, text, logout

    def _nop_out(self, pdu: NopOut) -> None:
        if pdu.itt == RESERVED_TAG:
            # An answer to our NOP-In (or a ping that wants no answer): no CmdSN, no reply.
            if pdu.ttt != RESERVED_TAG and self.conn is not None:
                self.conn.nop_answered(pdu.ttt)
            return

        def answer(ordered: bool) -> None:
            if ordered:
                self.window.complete()
            assert self.conn is not None
            data = pdu.data[: self.conn.params.initiator_recv_length]
            self._send(NopIn(itt=pdu.itt, lun=pdu.lun, data=data), status=True)

        self._ordered(pdu, answer)

    def _text_request(self, pdu: TextRequest, ordered: bool) -> None:
        try:
            self._text_exchange(pdu)
        finally:
            if ordered:
                self.window.complete()

    def _text_exchange(self, pdu: TextRequest) -> None:
        assert self.conn is not None
        ex = self._text
        if pdu.ttt != RESERVED_TAG:
            if pdu.ttt != ex.ttt:
                self._reject_pdu(pdu, RejectReason.PROTOCOL_ERROR)
                return
            if ex.outgoing:  # the initiator asks for the next part of our answer
                self._text_part(pdu, ex)
                return
        else:
            ex = self._text = _TextExchange()  # a new exchange replaces any unfinished one
        ex.incoming += pdu.data
        if len(ex.incoming) > 64 * 1024:
            self._text = _TextExchange()
            self._reject_pdu(pdu, RejectReason.PROTOCOL_ERROR)
            return
        if pdu.cont:  # more request text follows: ask for it
            ex.ttt = self.new_ttt()
            self._send(TextResponse(itt=pdu.itt, lun=pdu.lun, final=False, ttt=ex.ttt), status=True)
            return
        try:
            pairs = parse_text(ex.incoming)
            if len({k for k, _ in pairs}) != len(pairs):
                raise TextError("a key appears twice")
        except TextError as e:
            log.info("%r: bad text request: %s", self, e)
            self._text = _TextExchange()
            self._reject_pdu(pdu, RejectReason.PROTOCOL_ERROR)
            return
        text = encode_text(self._text_answers(pairs))
        size = self.conn.params.initiator_recv_length
        ex.incoming.clear()
        ex.outgoing = [text[i : i + size] for i in range(0, len(text), size)] or [b""]
        ex.ttt = self.new_ttt() if len(ex.outgoing) > 1 else RESERVED_TAG
        self._text_part(pdu, ex)

    def _text_part(self, pdu: TextRequest, ex: _TextExchange) -> None:
        part = ex.outgoing.pop(0)
        last = not ex.outgoing
        ttt = RESERVED_TAG if last else ex.ttt
        self._send(
            TextResponse(itt=pdu.itt, lun=pdu.lun, final=last, cont=not last, ttt=ttt, data=part),
            status=True,
        )
        if last:
            self._text = _TextExchange()

    def _text_answers(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        assert self.conn is not None
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answers += send_targets(
                    value,
                    self.registry.all_targets(),
                    self.initiator,
                    self.conn.portal(),
                    discovery=self.discovery,
                    session_target=self.target,
                )
            elif key == "MaxRecvDataSegmentLength":  # declarative, may change in FFP
                try:
                    n = parse_number(value)
                except ValueError:
                    n = 0
                if 512 <= n < 1 << 24:
                    self.conn.params = replace(self.conn.params, initiator_recv_length=n)
                else:
                    answers.append((key, REJECT))
            elif key in NEGOTIATED or key in LOGIN_IDENTITY or key in SECURITY_KEYS:
                answers.append((key, REJECT))  # login-only keys
            elif key in TARGET_ONLY or key in ("HeaderDigest", "DataDigest"):
                answers.append((key, REJECT))
            else:
                answers.append((key, NOT_UNDERSTOOD))
        return answers

    async def _logout(self, pdu: LogoutRequest, ordered: bool) -> None:
        conn = self.conn
        assert conn is not None
        if pdu.reason == 2:
            response = LOGOUT_NO_RECOVERY  # connection recovery needs ErrorRecoveryLevel 2
        elif pdu.reason == 1 and pdu.cid != self.cid:
            response = LOGOUT_NO_CID
        elif pdu.reason in (0, 1):
            response = LOGOUT_CLOSED
            self.logging_out = True
            await self.abort_tasks(list(self.tasks.values()))
        else:
            if ordered:
                self.window.complete()
            self._reject_pdu(pdu, RejectReason.INVALID_PDU_FIELD)
            return
        if ordered:
            self.window.complete()
        self._send(LogoutResponse(itt=pdu.itt, response=response), status=True)
        if response == LOGOUT_CLOSED:
            await conn.drain()
            conn.close()

    # ------------------------------------------------------------------ ending

    async def end(self, nexus_lost: bool = True) -> None:
        """The session is over (logout, connection lost, reinstatement): abort its tasks and
        tell the SCSI target its I_T nexus is gone. Concurrent callers share one ending
        (the first one says whether the nexus is lost)."""
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._end(nexus_lost))
            self._ending.add_done_callback(_retrieve)
        await asyncio.shield(self._ending)

    async def _end(self, nexus_lost: bool) -> None:
        await self.abort_tasks(list(self.tasks.values()))
        self.ended = True
        jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)
        self.registry.forget(self)
        if self.scsi is not None and nexus_lost:
            try:
                self.scsi.nexus_lost(self.nexus)
            except Exception:
                log.exception("%r: nexus_lost failed", self)
