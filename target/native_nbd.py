"""The NBD server on the native engine: Python accepts and runs the handshake with the sans-IO
codec (target/frontends/nbd/protocol.py), then hands the socket to the engine, which serves
the transmission phase (native/nbd_server.c) with the same validation, errors and replies
as the Python server. BLOCK_STATUS and command types the engine does not know come back up:
Python's codec validates them and `answer` (the Python server's own) runs them; the reply
bytes go back to the engine, which sends them with the rest."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from dataclasses import dataclass
from typing import Any

from native import engine as ne
from replica.transport import listen_tcp
from target.frontends.nbd import protocol as p
from target.frontends.nbd.server import READ_CHUNK, answer
from target.native_device import EngineDevice

log = logging.getLogger("target.frontends.nbd.server")


@dataclass
class _Conn:
    codec: p.ServerCodec
    peer: Any


class NativeNbdServer:
    """Serves `device` (an EngineDevice) as the NBD export `export_name`."""

    def __init__(
        self,
        device: EngineDevice,
        export_name: str,
        description: str = "",
        multi_conn: bool = True,
        *,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.device = device
        self.engine = device.engine
        self.export_name = export_name
        self.description = description
        self.multi_conn = multi_conn
        self.shutdown_timeout = shutdown_timeout
        self.host: str | None = None
        self.port: int | None = None
        self._fe = ne.FRONTENDS.index(device.frontend)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._closed = asyncio.Event()
        self._closing = False

    async def start(self, host: str = "127.0.0.1", port: int = 10809) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        sock = listen_tcp(host, port)
        self._sock = sock
        self.host, self.port = sock.getsockname()[:2]
        loop.add_reader(sock.fileno(), self._accept)
        log.info("NBD export %r listening on %s:%s", self.export_name, self.host, self.port)

    @property
    def connection_count(self) -> int:
        return len(self._handshakes) + len(self._conns)

    async def close(self) -> None:
        """Stop listening, let in-flight commands finish, then drop every connection."""
        self._closing = True
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        for cid in list(self._conns):
            self.engine.nbd_stop(cid)
        if self._conns:
            self._closed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.shutdown_timeout):
                    while self._conns:
                        await self._closed.wait()
                        self._closed.clear()
            for cid in list(self._conns):
                self.engine.close_conn(cid)  # a peer that stopped reading
        for task in list(self._tasks):
            task.cancel()

    # --- the handshake, in Python ----------------------------------------------------------------

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                sock, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next readiness
                log.warning("accept failed: %s", e)
                return
            if self._closing:
                sock.close()
                continue
            task = asyncio.ensure_future(self._handshake(sock, addr))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        codec = p.ServerCodec(self.export_name, self.description, self.multi_conn)
        handed = False
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_sendall(sock, codec.greeting())
            while codec.state is not p.State.TRANSMISSION:
                data = await loop.sock_recv(sock, READ_CHUNK)
                if not data:
                    log.debug("NBD client %s closed the connection", peer)
                    return
                codec.feed(data)
                while codec.state is not p.State.TRANSMISSION:
                    ev = codec.next_event()
                    if ev is None:
                        break
                    if isinstance(ev, p.OptionRequest):
                        # Read the device state now: a volume that lost its write quorum is
                        # exported read-only from here on.
                        out = codec.answer_option(
                            ev, size=self.device.size, readonly=self.device.readonly
                        )
                        if out:
                            await loop.sock_sendall(sock, out)
                    elif isinstance(ev, p.Disconnect):
                        log.debug("NBD client %s: %s", peer, ev.reason)
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)
                        return
            self._hand_over(sock, codec, peer)
            handed = True
        except p.ProtocolError as exc:
            log.warning("NBD client %s broke the protocol: %s", peer, exc)
        except (ConnectionError, OSError) as exc:
            log.debug("NBD connection %s lost: %s", peer, exc)
        finally:
            if not handed:
                sock.close()

    def _hand_over(self, sock: socket.socket, codec: p.ServerCodec, peer: Any) -> None:
        """Transmission starts: the engine takes the socket and what was read past the
        handshake (the codec's buffer: requests sent right after NBD_OPT_GO)."""
        flags = 0
        if codec.structured:
            flags |= ne.NBD_STRUCTURED
        if codec.meta_context:
            flags |= ne.NBD_META_CONTEXT
        if codec.readonly:
            flags |= ne.NBD_READONLY
        pending = bytes(codec._buf)  # nothing else parses them: the engine does
        codec._buf.clear()
        sock.setblocking(True)  # io_uring polls for it; O_NONBLOCK would return EAGAIN
        cid = next(self._ids)
        self._conns[cid] = _Conn(codec, peer)
        self.engine.nbd_add(cid, sock.detach(), flags, codec.size, self._fe, pending)

    # --- engine events ---------------------------------------------------------------------------

    def upcall(self, up: ne.Upcall) -> None:
        conn = self._conns.get(up.conn)
        if conn is None:
            self.engine.reply(up.conn, b"")  # gone: release the engine's hold
            return
        codec = conn.codec
        codec.feed(up.payload)  # the request header: the codec validates it
        try:
            ev = codec.next_event()
        except p.ProtocolError:
            ev = None
        if isinstance(ev, p.InvalidCommand):
            self.engine.reply(up.conn, codec.reply_error(ev.handle, ev.error, ev.message))
        elif isinstance(ev, p.Command):
            task = asyncio.ensure_future(self._run(up.conn, conn, ev))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.engine.reply(up.conn, b"")

    async def _run(self, cid: int, conn: _Conn, cmd: p.Command) -> None:
        reply = await answer(self.device, conn.codec, cmd, [], conn.peer)  # type: ignore[arg-type]
        self.engine.reply(cid, reply)

    def conn_closed(self, cid: int) -> None:
        if self._conns.pop(cid, None) is not None:
            self._closed.set()

    def proto_error(self, cid: int, message: str) -> None:
        conn = self._conns.get(cid)
        log.warning("NBD client %s broke the protocol: %s", conn.peer if conn else "?", message)
