"""The asyncio NBD server: one export over a BlockDevice, many pipelined connections.

Each connection runs a read loop that feeds the sans-IO codec (protocol.py) and starts one
task per command, so replies go out in completion order. Every reply is handed to the
transport in a single write() call, so two replies never interleave. The number of
commands in flight per connection is bounded: when the bound is reached the read loop
stops reading until a command finishes (TCP backpressure, nothing is dropped).

Usage:
    server = NbdServer(device, "vol")
    await server.start("127.0.0.1", 10809)   # port 0 picks a free port: see server.port
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from target.blockdev import BlockDevice, BlockError, MediumError, ReadOnlyError
from target.frontends.nbd import protocol as p

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
DEFAULT_MAX_IN_FLIGHT = 128


class NbdServer:
    """Serves `device` as the NBD export `export_name` (the empty name selects it too)."""

    def __init__(
        self,
        device: BlockDevice,
        export_name: str,
        description: str = "",
        multi_conn: bool = True,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.device = device
        self.export_name = export_name
        self.description = description
        # Safe by default: flush and FUA act on the whole device, not per connection.
        self.multi_conn = multi_conn
        self.max_in_flight = max_in_flight
        self.shutdown_timeout = shutdown_timeout
        self.host: str | None = None
        self.port: int | None = None  # the bound port, known after start()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closing = False

    async def start(self, host: str = "127.0.0.1", port: int = 10809) -> None:
        self._server = await asyncio.start_server(self._accept, host, port, limit=READ_CHUNK)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        log.info("NBD export %r listening on %s:%s", self.export_name, self.host, self.port)

    async def close(self) -> None:
        """Stop listening, let in-flight commands finish, then drop every connection."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        for conn in conns:
            conn.stop_reading()
        if conns:
            await asyncio.wait([c.task for c in conns])
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(self, reader, writer, task)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)


class _Connection:
    def __init__(
        self,
        server: NbdServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[None],
    ) -> None:
        self.server = server
        self.device = server.device
        self.reader = reader
        self.writer = writer
        self.task = task
        self.peer = writer.get_extra_info("peername")
        self.codec = p.ServerCodec(server.export_name, server.description, server.multi_conn)
        self.slots = asyncio.Semaphore(server.max_in_flight)
        self.commands: set[asyncio.Task[None]] = set()
        self.writes: set[asyncio.Task[None]] = set()  # in-flight WRITE/TRIM/WRITE_ZEROES
        self.read_loop: asyncio.Task[None] | None = None

    def stop_reading(self) -> None:
        if self.read_loop is not None:
            self.read_loop.cancel()

    async def run(self) -> None:
        self.read_loop = asyncio.create_task(self._read_loop())
        try:
            # wait() rather than await: cancelling the read loop must not cancel us.
            await asyncio.wait([self.read_loop])
            if not self.read_loop.cancelled() and self.read_loop.exception() is not None:
                exc = self.read_loop.exception()
                log.error("NBD connection %s failed", self.peer, exc_info=exc)
        finally:
            await self._finish()

    async def _read_loop(self) -> None:
        try:
            self._send(self.codec.greeting())
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    log.debug("NBD client %s closed the connection", self.peer)
                    return
                self.codec.feed(data)
                if not await self._handle_events():
                    return
        except p.ProtocolError as exc:
            log.warning("NBD client %s broke the protocol: %s", self.peer, exc)
        except ConnectionError as exc:
            log.debug("NBD connection %s lost: %s", self.peer, exc)

    async def _handle_events(self) -> bool:
        """Act on every complete message; False when the session is over."""
        codec = self.codec
        while (ev := codec.next_event()) is not None:
            if self.writer.is_closing():
                # The peer is gone: buffered requests could never be answered.
                return False
            if isinstance(ev, p.Command):
                # Backpressure: no more reading while max_in_flight commands run.
                await self.slots.acquire()
                self._start(ev)
            elif isinstance(ev, p.InvalidCommand):
                self._send(codec.reply_error(ev.handle, ev.error, ev.message))
                await self.writer.drain()
            elif isinstance(ev, p.OptionRequest):
                # Read the device state now: a volume that lost its write quorum is exported
                # read-only from here on, but an earlier connection keeps its flags.
                out = codec.answer_option(ev, size=self.device.size, readonly=self.device.readonly)
                self._send(out)
                await self.writer.drain()
            else:
                log.debug("NBD client %s: %s", self.peer, ev.reason)
                return False
        return True

    def _start(self, cmd: p.Command) -> None:
        barrier: list[asyncio.Task[None]] = []
        if cmd.type == p.NBD_CMD_FLUSH:
            # Besides what the doc requires (writes already replied to), a flush also waits
            # for the writes this connection received before it: a barrier is cheap here.
            barrier = list(self.writes)
        task = asyncio.create_task(self._execute(cmd, barrier))
        self.commands.add(task)
        if cmd.type in p.WRITE_COMMANDS:
            self.writes.add(task)
        task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self.commands.discard(task)
        self.writes.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("NBD command failed on %s", self.peer, exc_info=task.exception())

    async def _execute(self, cmd: p.Command, barrier: list[asyncio.Task[None]]) -> None:
        reply = await answer(self.device, self.codec, cmd, barrier, self.peer)
        self._send(reply)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def _send(self, data: bytes) -> None:
        # One write() per reply: the transport queues it whole, so replies never interleave.
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _finish(self) -> None:
        """Stop reading, let in-flight commands reply (the doc asks so on disconnect), close."""
        if self.read_loop is not None and not self.read_loop.done():
            self.read_loop.cancel()
            await asyncio.wait([self.read_loop])
        if self.commands:
            _, pending = await asyncio.wait(self.commands, timeout=self.server.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), self.server.shutdown_timeout)
        except (TimeoutError, ConnectionError, OSError):
            # A peer that stopped reading keeps our buffer full: drop it.
            self.writer.transport.abort()


async def answer(
    dev: BlockDevice,
    codec: p.ServerCodec,
    cmd: p.Command,
    barrier: list[asyncio.Task[None]],
    peer: object = None,
) -> bytes:
    """The reply to a valid command: run it, or the error it ended with."""
    try:
        return await perform(dev, codec, cmd, barrier)
    except BlockError as exc:
        code = p.nbd_error(exc.errno)
        if code == p.NBD_ENOTSUP and not cmd.flags & p.NBD_CMD_FLAG_FAST_ZERO:
            code = p.NBD_EINVAL  # the doc keeps ENOTSUP for fast-zero refusals
        return codec.reply_error(cmd.handle, code, str(exc))
    except Exception:
        log.exception("NBD command %d failed on %s", cmd.type, peer)
        return codec.reply_error(cmd.handle, p.NBD_EIO, "internal server error")


async def perform(
    dev: BlockDevice, codec: p.ServerCodec, cmd: p.Command, barrier: list[asyncio.Task[None]]
) -> bytes:
    """Run a valid command on the device; the reply's bytes (BlockError on failure)."""
    kind, offset, length = cmd.type, cmd.offset, cmd.length
    if kind in p.WRITE_COMMANDS and dev.readonly:
        # Read-only can start after the handshake (lost write quorum): refuse here.
        raise ReadOnlyError("volume is read-only")
    if kind == p.NBD_CMD_READ:
        data = await dev.read(offset, length) if length else b""
        if len(data) != length:
            # Sending it would desynchronise a simple-reply stream.
            raise MediumError(f"device returned {len(data)} bytes, not {length}")
        return codec.reply_read(cmd.handle, offset, data)
    if kind == p.NBD_CMD_WRITE:
        if length:
            await dev.write(offset, cmd.data, fua=cmd.fua)
    elif kind == p.NBD_CMD_FLUSH:
        if barrier:
            await asyncio.wait(barrier)
        await dev.flush()
    elif kind == p.NBD_CMD_TRIM:
        if length:
            await dev.unmap(offset, length)
            if cmd.fua:
                await dev.flush()
    elif kind == p.NBD_CMD_WRITE_ZEROES:
        # FAST_ZERO is always honoured: zeroing sends no payload to the replicas, so it
        # is never slower than the equivalent write.
        if length:
            may_unmap = not cmd.flags & p.NBD_CMD_FLAG_NO_HOLE
            await dev.write_zeroes(offset, length, may_unmap=may_unmap)
            if cmd.fua:
                await dev.flush()
    elif kind == p.NBD_CMD_BLOCK_STATUS:
        extents = await dev.block_status(offset, length)
        req_one = bool(cmd.flags & p.NBD_CMD_FLAG_REQ_ONE)
        return codec.reply_block_status(cmd.handle, offset, length, extents, req_one)
    # NBD_CMD_CACHE: a hint the doc lets us ignore; there is no cache to warm.
    return codec.reply_ok(cmd.handle)
