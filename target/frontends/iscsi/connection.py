"""One iSCSI TCP connection: the login phase, then the full feature phase of its session.

Every PDU goes out through `send`, which stamps StatSN and the session's command window
and hands the encoded buffers to the transport in one call, so PDUs of concurrent
commands never interleave. Digests start with the first PDU after the login. A NOP-In
probes an idle initiator; one that answers nothing for `nop_timeout` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from target.frontends.iscsi.discovery import portal_address
from target.frontends.iscsi.login import (
    INITIATOR_ERROR,
    INVALID_DURING_LOGIN,
    LoginFailure,
    Status,
)
from target.frontends.iscsi.negotiation import Params
from target.frontends.iscsi.pdu import (
    RESERVED_TAG,
    DataIn,
    Decoder,
    LoginRequest,
    LoginResponse,
    NopIn,
    Op,
    Pdu,
    PduError,
    encode,
)

if TYPE_CHECKING:
    from target.frontends.iscsi.server import IscsiServer
    from target.frontends.iscsi.session import Session

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
WRITE_HIGH_WATER = 4 * 1024 * 1024  # stop reading requests while this much output is queued


class Connection:
    def __init__(
        self,
        server: IscsiServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")
        self.sockname = writer.get_extra_info("sockname")
        self.decoder = Decoder()
        self.params = Params()
        self.statsn = 0
        self.cid = 0
        self.session: Session | None = None
        self._digests = (False, False)
        self._loop = asyncio.get_running_loop()
        self._last_rx = self._loop.time()
        self._nop_tag = 0
        self._nop_waiting: int | None = None  # TTT of our unanswered NOP-In
        self._nop_sent_at = 0.0

    def __repr__(self) -> str:
        return f"<Connection {self.peer}>"

    async def run(self) -> None:
        keepalive: asyncio.Task[None] | None = None
        try:
            session = await self._login()
            if session is None:
                return
            if not session.discovery and self.server.nop_interval:
                keepalive = self._loop.create_task(self._keepalive())
            await self._full_feature(session)
        except (TimeoutError, ConnectionError, OSError):
            pass
        except Exception:
            log.exception("%r failed", self)
        finally:
            if keepalive is not None:
                keepalive.cancel()
                await asyncio.gather(keepalive, return_exceptions=True)
            session = self.session
            if session is not None and session.conn is self:
                await session.end()
            self.abort()

    # ------------------------------------------------------------------ output

    def send(self, pdu: Pdu, status: bool = False) -> None:
        """Queue a target PDU. `status` says it carries a status (it takes a StatSN)."""
        if status:
            pdu.statsn = self.statsn  # type: ignore[attr-defined]
            self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        elif not isinstance(pdu, DataIn):  # a Data-In without status leaves it reserved
            pdu.statsn = self.statsn  # type: ignore[attr-defined]
        session = self.session
        if session is not None:
            pdu.expcmdsn = session.window.expcmdsn  # type: ignore[attr-defined]
            pdu.maxcmdsn = session.window.maxcmdsn  # type: ignore[attr-defined]
        self._write(pdu)

    def _write(self, pdu: Pdu) -> None:
        if self.writer.transport.is_closing():
            return
        self.writer.writelines(encode(pdu, *self._digests))

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()

    def close(self) -> None:
        """Close after what is queued has been sent (logout)."""
        self.writer.close()

    def abort(self) -> None:
        """Drop the connection now."""
        self.writer.transport.abort()

    def portal(self) -> str:
        """The TargetAddress this initiator can reach us at."""
        host, port = self.server.public_portal or self.sockname[:2]
        return portal_address(host, port, self.server.portal_group_tag)

    # ------------------------------------------------------------------ login

    async def _login(self) -> Session | None:
        machine = self.server.new_login()
        deadline = self._loop.time() + self.server.login_timeout
        while True:
            try:
                pdu = await self._next_login_pdu(deadline)
            except PduError as e:
                log.info("%r: bad PDU during login: %s", self, e)
                self._login_failure(e.header, INITIATOR_ERROR)
                return None
            if pdu is None:
                return None
            if not isinstance(pdu, LoginRequest):
                self._login_failure(pdu.header(), INVALID_DURING_LOGIN)
                return None
            rsp = machine.receive(pdu)
            if machine.failed:
                log.info("%r: login failed: %s", self, machine.failure)
                self._write(rsp)
                await self.drain()
                return None
            if not machine.done:
                self._write(rsp)
                continue
            result = machine.result
            assert result is not None
            try:
                session = await self.server.open_session(self, result)
            except LoginFailure as e:
                log.warning("%r: %s", self, e)
                self._login_failure(pdu.header(), e.status)
                return None
            rsp.tsih = session.tsih
            self.statsn = machine.statsn
            self.params = result.params
            self.cid = result.cid
            self._write(rsp)
            # From the next PDU on: negotiated digests and our declared segment length.
            self._digests = (self.params.header_digest, self.params.data_digest)
            self.decoder.header_digest, self.decoder.data_digest = self._digests
            self.decoder.max_data_segment = self.params.target_recv_length
            self.session = session
            session.attach(self)
            log.info(
                "%r: %s session %d of %s%s",
                self,
                result.session_type,
                session.tsih,
                result.initiator_name,
                f" to {session.target.iqn}" if session.target else "",
            )
            return session

    async def _next_login_pdu(self, deadline: float) -> Pdu | None:
        while True:
            pdu = self.decoder.next_pdu()
            if pdu is not None:
                return pdu
            head = self.decoder.peek_header()
            if head and head[0] & 0x3F != Op.LOGIN_REQ:
                # Not a login (an HTTP probe, a port scanner): no need to wait for the rest.
                self._login_failure(head, INVALID_DURING_LOGIN)
                return None
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                log.info("%r: login timed out", self)
                return None
            data = await asyncio.wait_for(self.reader.read(READ_CHUNK), remaining)
            if not data:
                return None
            self.decoder.feed(data)

    def _login_failure(self, header: bytes, status: Status) -> None:
        """Answer a login that cannot go on (the connection is closed after it)."""
        rsp = LoginResponse(status_class=status[0], status_detail=status[1])
        if len(header) >= 48:
            rsp.isid, rsp.itt = header[8:14], int.from_bytes(header[16:20], "big")
        self._write(rsp)

    # ------------------------------------------------------------------ full feature phase

    async def _full_feature(self, session: Session) -> None:
        decoder = self.decoder
        transport = self.writer.transport
        while True:
            while True:
                try:
                    pdu = decoder.next_pdu()
                except PduError as e:
                    if e.fatal:
                        log.warning("%r: %s: dropping the connection", self, e)
                        return
                    log.info("%r: rejected a PDU: %s", self, e)
                    session.bad_pdu(e)
                    continue
                if pdu is None:
                    break
                session.receive(pdu)
            if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await self.drain()  # the initiator is not reading: stop taking requests
            data = await self.reader.read(READ_CHUNK)
            if not data:
                return
            self._last_rx = self._loop.time()
            decoder.feed(data)

    async def _keepalive(self) -> None:
        interval = self.server.nop_interval
        timeout = self.server.nop_timeout
        assert interval
        while True:
            await asyncio.sleep(min(interval, timeout) / 2)
            now = self._loop.time()
            if self._nop_waiting is not None:
                if now - max(self._nop_sent_at, self._last_rx) >= timeout:
                    log.warning("%r: initiator stopped answering: dropping it", self)
                    self.abort()
                    return
            elif now - self._last_rx >= interval:
                self._nop_tag = (self._nop_tag + 1) % RESERVED_TAG
                self._nop_waiting, self._nop_sent_at = self._nop_tag, now
                self.send(NopIn(ttt=self._nop_tag))  # wants a NOP-Out back

    def nop_answered(self, ttt: int) -> None:
        if ttt == self._nop_waiting:
            self._nop_waiting = None
