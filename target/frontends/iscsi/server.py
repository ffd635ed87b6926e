"""The iSCSI portal: accepts connections, runs their logins, and keeps the session table
(TSIH allocation, session reinstatement, the sessions task management reaches across).

Usage:
    server = IscsiServer([TargetConfig("iqn.2026-11.io.tandem:vol", scsi_target)])
    await server.start("0.0.0.0", 3260)   # port 0 picks a free port: see server.port
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from target.frontends.iscsi.chap import Credentials
from target.frontends.iscsi.config import TargetConfig, normalize_name
from target.frontends.iscsi.connection import Connection
from target.frontends.iscsi.login import OUT_OF_RESOURCES, LoginFailure, LoginMachine, LoginResult
from target.frontends.iscsi.negotiation import TargetLimits
from target.frontends.iscsi.session import Session

__all__ = ["IscsiServer", "TargetConfig"]

log = logging.getLogger(__name__)

DEFAULT_CMD_WINDOW = 128


class IscsiServer:
    """Serves `targets` on one portal group.

    `public_portal` (host, port) is what SendTargets advertises instead of the address
    each initiator connected to. `cmd_window` bounds the commands in flight per session.
    `nop_interval` seconds of silence make the target send a NOP-In; an initiator silent
    for `nop_timeout` after it is dropped (None disables the probe)."""

    def __init__(
        self,
        targets: Iterable[TargetConfig],
        *,
        portal_group_tag: int = 1,
        public_portal: tuple[str, int] | None = None,
        limits: TargetLimits | None = None,
        cmd_window: int = DEFAULT_CMD_WINDOW,
        nop_interval: float | None = 5.0,
        nop_timeout: float = 15.0,
        login_timeout: float = 30.0,
        discovery_chap: tuple[str, str] | None = None,
        discovery_mutual_chap: tuple[str, str] | None = None,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.targets: dict[str, TargetConfig] = {}
        for target in targets:
            if target.name in self.targets:
                raise ValueError(f"target {target.iqn} defined twice")
            self.targets[target.name] = target
        if not 0 <= portal_group_tag <= 0xFFFF:
            raise ValueError("portal group tag must fit 16 bits")
        self.portal_group_tag = portal_group_tag
        self.public_portal = public_portal
        self.limits = limits or TargetLimits()
        self.cmd_window = cmd_window
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_timeout = login_timeout
        self.discovery_chap = Credentials(*discovery_chap) if discovery_chap else None
        self.discovery_mutual_chap = (
            Credentials(*discovery_mutual_chap) if discovery_mutual_chap else None
        )
        self.shutdown_timeout = shutdown_timeout
        self.host: str | None = None
        self.port: int | None = None  # the bound port, known after start()
        self._server: asyncio.Server | None = None
        self._connections: dict[Connection, asyncio.Task[None]] = {}
        self._sessions: dict[tuple[str, bytes, str], Session] = {}  # (initiator, ISID, target)
        self._by_tsih: dict[int, Session] = {}
        self._last_tsih = 0
        self._closing = False

    # What serves a connection and a session (target/native_iscsi.py swaps them).
    connection_class: type[Connection] = Connection
    session_class: type[Session] = Session

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "0.0.0.0", port: int = 3260) -> None:
        self._server = await asyncio.start_server(self._accept, host, port)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        log.info(
            "iSCSI portal listening on %s:%s (%s)",
            self.host,
            self.port,
            ", ".join(t.iqn for t in self.targets.values()),
        )

    async def close(self) -> None:
        """Stop listening, close every connection (commands already running on the SCSI
        target finish first), and wait for the sessions to end."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        conns = dict(self._connections)
        for conn in conns:
            conn.close()
        if conns:
            _, pending = await asyncio.wait(conns.values(), timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        conn = self.connection_class(self, reader, writer)
        self._connections[conn] = task
        try:
            await conn.run()
        finally:
            del self._connections[conn]

    # ------------------------------------------------------------------ sessions

    @property
    def sessions(self) -> list[Session]:
        return list(self._by_tsih.values())

    def new_login(self) -> LoginMachine:
        return LoginMachine(
            self.targets,
            portal_group_tag=self.portal_group_tag,
            limits=self.limits,
            discovery_chap=self.discovery_chap,
            discovery_mutual_chap=self.discovery_mutual_chap,
            cmd_window=self.cmd_window,
            session_exists=self._session_exists,
        )

    def _session_exists(self, initiator: str, isid: bytes, tsih: int) -> bool:
        session = self._by_tsih.get(tsih)
        return (
            session is not None
            and not session.discovery
            and session.isid == isid
            and normalize_name(session.initiator) == normalize_name(initiator)
        )

    def _new_tsih(self) -> int:
        for _ in range(0xFFFF):
            self._last_tsih = self._last_tsih % 0xFFFF + 1  # 1..65535; 0 means "new"
            if self._last_tsih not in self._by_tsih:
                return self._last_tsih
        raise LoginFailure(OUT_OF_RESOURCES, "no free TSIH")

    async def open_session(self, conn: Connection, login: LoginResult) -> Session:
        """The session a completed login joins: a new one, or (same initiator, ISID and
        target as a live session) its replacement. With TSIH 0 that is a session
        reinstatement (the old I_T nexus is lost); with the old TSIH, a connection
        reinstatement (the nexus lives on)."""
        options = {
            "portal_group_tag": self.portal_group_tag,
            "cmd_window": self.cmd_window,
            "max_data_transfer": self.limits.max_data_transfer,
        }
        if login.target is None:
            session = self.session_class(self, login, self._new_tsih(), **options)  # type: ignore[arg-type]
            self._by_tsih[session.tsih] = session
            return session
        key = (normalize_name(login.initiator_name), login.isid, login.target.name)
        old = self._sessions.get(key)
        same = old is not None and login.tsih != 0 and login.tsih == old.tsih
        if old is not None:
            log.info("%r replaces %r", conn, old)
            if old.conn is not None:
                old.conn.abort()
            await old.end(nexus_lost=not same)
        tsih = login.tsih if same else self._new_tsih()
        session = self.session_class(self, login, tsih, **options)  # type: ignore[arg-type]
        self._sessions[key] = session
        self._by_tsih[tsih] = session
        return session

    def forget(self, session: Session) -> None:
        if self._by_tsih.get(session.tsih) is session:
            del self._by_tsih[session.tsih]
        if session.target is not None:
            key = (normalize_name(session.initiator), session.isid, session.target.name)
            if self._sessions.get(key) is session:
                del self._sessions[key]

    def sessions_for(self, target: TargetConfig) -> list[Session]:
        return [s for s in self._by_tsih.values() if s.target is target]

    def all_targets(self) -> Iterable[TargetConfig]:
        return self.targets.values()
