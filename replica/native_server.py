"""The replica server on the native engine: same external behaviour as `ReplicaServer`, data
path in C (native/replica_server.c) on an io_uring thread, no Python per I/O.

Python keeps the rare parts: it accepts connections and hands each socket to the engine at
once; it answers the control requests the engine sends up (INFO, OPEN, SET_GENERATION,
CLOSE, SNAPSHOT, ATTRS, SET_ATTRS) with the very code of the Python server
(`replica.server._Connection._handle`), so both engines validate, fence and answer them the
same way; SNAPSHOT and CLOSE run with the engine paused (in-flight I/O drained, new I/O held)
because they swap layer files and maps or clear the write-intent log the engine shares.
Faults armed through replica/faults.py (environment or debug API) are mirrored into the
engine as they change.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from native import engine as ne
from replica import faults
from replica import protocol as p
from replica.block import check_range
from replica.protocol import Op, Request
from replica.rebuild import Puller
from replica.server import ReplicaServer, ReplicaStats, _Connection
from replica.store import ReplicaStore, io_error, split_pieces
from replica.transport import listen_tcp, listen_unix, tune, unlink_socket

log = logging.getLogger("tandem.replica")

# Control requests that touch nothing the engine shares; every other one (SNAPSHOT swaps
# files and maps, CLOSE clears the intent log, RESIZE grows maps and replaces the intent log,
# and whatever comes next) runs with the engine paused and hands it fresh state after.
# COPY_FROM only starts the puller, whose store I/O goes through the engine (EngineStore).
_NO_PAUSE = frozenset(
    {Op.INFO, Op.OPEN, Op.SET_GENERATION, Op.ATTRS, Op.SET_ATTRS, Op.PING, Op.COPY_FROM}
)


class NativeReplicaStats:
    """The counters the REST API and /metrics read: the engine's plus Python's (control)."""

    def __init__(self, server: NativeReplicaServer) -> None:
        self._server = server
        self.py = ReplicaStats()  # what Python's handling of up-calls counts

    def _c(self) -> dict[str, Any]:
        eng = self._server._engine
        return eng.replica_stats() if eng is not None else {}

    @property
    def ops(self) -> dict[str, int]:
        c = self._c().get("ops") or []
        return {
            op.name: self.py.ops[op.name] + (c[op.value] if op.value < len(c) else 0) for op in Op
        }

    @property
    def errors(self) -> int:
        return self.py.errors + self._c().get("errors", 0)

    @property
    def bytes_read(self) -> int:
        return self._c().get("bytes_read", 0)

    @property
    def bytes_written(self) -> int:
        return self._c().get("bytes_written", 0)

    @property
    def connections(self) -> int:
        return self.py.connections

    @property
    def upcalls(self) -> int:
        """Requests the engine handed to Python (none per I/O in steady state)."""
        return self._c().get("upcalls", 0)

    @property
    def requests(self) -> int:
        return self._c().get("requests", 0)

    @property
    def file_writes(self) -> int:
        """Write calls to the layer files: a large write over cached pages takes one, else
        one per WRITE_PIECE."""
        return self._c().get("file_writes", 0)

    @property
    def poll(self) -> dict[str, Any]:
        """The engine's polling: hits, misses, seconds (Engine.poll_stats)."""
        eng = self._server._engine
        return eng.poll_stats() if eng is not None else {"hits": 0, "misses": 0, "seconds": 0.0}


class _View:
    """What `_Connection` needs of its server: the store, Python's counters, info(), and
    anything else of the server's (its puller, its tasks)."""

    def __init__(self, server: NativeReplicaServer) -> None:
        self._server = server
        self.store = server.store
        self.stats = server.stats.py

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _Capture:
    """A transport for `_Connection._send`: what the handling writes at once is the answer to
    the up-call; what a request finishes later (COPY_FROM) goes out on its own."""

    def __init__(self, server: NativeReplicaServer, conn: int) -> None:
        self.out: list[bytes] = []
        self.late = False
        self._server, self._conn = server, conn

    def write(self, data: bytes) -> None:
        if not self.late:
            self.out.append(bytes(data))
        elif self._server._engine is not None:
            self._server._engine.reply(self._conn, bytes(data), end=False)

    def is_closing(self) -> bool:
        return self.late and self._conn not in self._server._conns


class EngineStore:
    """The store as Python-side data movers (the rebuild puller of COPY_FROM) see it on the
    native engine: reads and mutations go through the engine, so they are ordered with the
    connections' requests and follow its write-intent log and maps; while Python holds the
    engine paused they go straight to the store (the engine is idle then). Everything else
    is the store's."""

    def __init__(self, server: NativeReplicaServer) -> None:
        self._server = server
        self._store = server.store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _engine(self) -> ne.Engine | None:
        eng = self._server._engine
        if eng is None or not eng.running or self._server._paused:
            return None
        return eng

    def _io(self, eng: ne.Engine, what: str, op: int, off: int, n: int, **kw: Any) -> bytes:
        check_range(self._store.size, off, n)
        try:
            return eng.io(op, off, n, **kw)
        except OSError as e:
            raise io_error(e, f"{what} {off}+{n}") from e

    def _iov(
        self,
        eng: ne.Engine,
        what: str,
        ios: list[tuple[int, int, int, int, int]],
        buf: bytes | bytearray,
    ) -> None:
        try:
            eng.iov(ios, buf)
        except OSError as e:
            raise io_error(e, f"{what} of {len(ios)} pieces") from e

    def read(self, offset: int, length: int) -> bytes:
        if (eng := self._engine()) is None:
            return self._store.read(offset, length)
        return self._io(eng, "read", Op.READ, offset, length) if length else b""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if (eng := self._engine()) is None:
            return self._store.write(offset, data)
        if len(data):
            self._io(eng, "write", Op.WRITE, offset, len(data), data=bytes(data))
        return None

    def unmap(self, offset: int, length: int) -> None:
        if (eng := self._engine()) is None:
            return self._store.unmap(offset, length)
        if length:
            self._io(eng, "zero", Op.UNMAP, offset, length, data=b"")
        return None

    def put_pieces(self, ranges: list[tuple[int, int]], data: bytes) -> int:
        """ReplicaStore.put_pieces in one engine call."""
        if (eng := self._engine()) is None:
            return self._store.put_pieces(ranges, data)
        ios, unmapped = [], 0
        for off, n, pos, zero in split_pieces(ranges, data):
            check_range(self._store.size, off, n)
            if zero:
                ios.append((Op.UNMAP, off, n, 0, -1))
                unmapped += n
            else:
                ios.append((Op.WRITE, off, n, 0, pos))
        self._iov(eng, "write", ios, data)
        return unmapped

    def read_pieces(self, ranges: list[tuple[int, int]]) -> bytes:
        """ReplicaStore.read_pieces in one engine call."""
        if (eng := self._engine()) is None:
            return self._store.read_pieces(ranges)
        ios, pos = [], 0
        for off, n in ranges:
            check_range(self._store.size, off, n)
            ios.append((Op.READ, off, n, 0, pos))
            pos += n
        out = bytearray(pos)
        self._iov(eng, "read", ios, out)
        return bytes(out)

    async def prepare_writes(self, ranges: list[tuple[int, int]]) -> None:
        """ReplicaStore.prepare_writes with the engine paused: it owns the intent log."""
        if (eng := self._engine()) is None:
            return self._store.prepare_writes(ranges)
        async with self._server.engine_paused(eng):
            self._store.prepare_writes(ranges)
        return None

    def write_zeroes(self, offset: int, length: int, punch: bool = True) -> None:
        if (eng := self._engine()) is None:
            return self._store.write_zeroes(offset, length, punch)
        flags = 0 if punch else p.FLAG_NO_HOLE
        if length:
            self._io(eng, "zero", Op.WRITE_ZEROES, offset, length, data=b"", flags=flags)
        return None


class _Conn:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.epoch: int | None = None


class NativeReplicaServer(ne.EngineHandler):
    engine_name = "native"

    def __init__(self, store: ReplicaStore, poll_us: int = 0) -> None:
        self.store = store
        self.poll_us = poll_us
        self.stats = NativeReplicaStats(self)
        self.state = "open"
        self.port = 0
        self._engine: ne.Engine | None = None
        self._sock: socket.socket | None = None
        self._unix: socket.socket | None = None
        self.socket_path: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: dict[int, _Conn] = {}
        self._ids = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pause_lock = asyncio.Lock()
        self._paused = False
        self._epoch_pushed = -1
        self.puller = Puller(EngineStore(self))  # type: ignore[arg-type]

    info = ReplicaServer.info  # the same answer, from the same store

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int, socket_path: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._sock = listen_tcp(host, port)
        self.port = self._sock.getsockname()[1]
        if socket_path:
            try:
                self._unix = listen_unix(socket_path)
            except BaseException:
                self._sock.close()
                raise
            self.socket_path = socket_path
        engine = ne.Engine(self)
        try:
            engine.set_poll(self.poll_us)
            engine.attach(loop)
            self._engine = engine
            self._push_store()
            _watch_faults(self._push_faults)
            self._push_faults()
        except BaseException:
            engine.close()
            self._engine = None
            for sock in (self._sock, self._unix):
                if sock is not None:
                    sock.close()
            raise
        for sock in (self._sock, self._unix):
            if sock is not None:
                loop.add_reader(sock.fileno(), self._accept, sock)
        log.info("replica data protocol on %s:%d", host, self.port)
        if socket_path:
            log.info("replica data protocol on unix socket %s", socket_path)

    async def close(self) -> None:
        for sock in (self._sock, self._unix):
            if sock is not None and self._loop is not None:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        self._sock = self._unix = None
        unlink_socket(self.socket_path)
        _unwatch_faults(self._push_faults)
        self.puller.close()
        if self._engine is not None:
            self._engine.close()  # closes every connection, waits for in-flight I/O
        for task in list(self._tasks):
            task.cancel()
        self._conns.clear()
        self.stats.py.connections = 0
        self.state = "closed"

    def _accept(self, listener: socket.socket) -> None:
        assert self._engine is not None
        while True:
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: try again on the next readiness
                log.warning("accept failed: %s", e)
                return
            try:
                sock.setblocking(True)  # io_uring polls for it; O_NONBLOCK would return EAGAIN
                tune(sock)
            except OSError:
                sock.close()
                continue
            self._ids += 1
            cid = self._ids
            self._conns[cid] = _Conn(str(addr) or "unix")
            self.stats.py.connections += 1
            self._engine.add_conn(cid, sock.detach(), ne.CONN_REPLICA_SERVER)

    # --- engine state -------------------------------------------------------------------------

    @asynccontextmanager
    async def engine_paused(self, engine: ne.Engine) -> AsyncIterator[None]:
        """Hold the engine paused (no data request or intent I/O running) while Python
        changes the store, then hand it the store again and resume."""
        async with self._pause_lock:
            await engine.pause()
            self._paused = True
            engine.release_shared()  # so the store may resize its maps
            try:
                yield
            finally:
                self._paused = False
                if engine.running:
                    self._push_store()
                    engine.resume()

    def _push_store(self) -> None:
        """Size, epoch, write-intent log and layers: at start, and after every paused
        control request (they may have replaced any of them)."""
        assert self._engine is not None
        intent = self.store.intent
        fd, marked, touch, clock0 = intent.engine_view()
        self._engine.replica_setup(
            self.store.size, self.store.meta.epoch, fd, marked, touch, intent.region, clock0
        )
        fds, head, base = self.store.engine_view()
        self._engine.set_layers(list(fds), head, base)
        self._engine.set_epoch(self.store.meta.epoch)
        self._epoch_pushed = self.store.meta.epoch

    def _push_epoch(self) -> None:
        epoch = self.store.meta.epoch
        if self._engine is not None and epoch != self._epoch_pushed:
            self._engine.set_epoch(epoch)
            self._epoch_pushed = epoch

    def _push_faults(self) -> None:
        eng = self._engine
        if eng is None or not eng.running:
            return
        for slot, name in enumerate(ne.FAULT_SLOTS):
            f = faults._faults.get(f"replica.{name}")
            if f is None:
                eng.set_fault(slot, 0, 0.0, None)
            else:
                eng.set_fault(slot, ne.FAULT_ACTIONS[f.action], f.arg, f.remaining)

    # --- engine events ------------------------------------------------------------------------

    def on_upcall(self, up: ne.Upcall) -> None:
        task = asyncio.ensure_future(self._control(up))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_conn_closed(self, conn: int) -> None:
        if self._conns.pop(conn, None) is not None:
            self.stats.py.connections -= 1

    def on_proto_error(self, conn: int, message: str) -> None:
        log.warning("closing %s: %s", self._peer(conn), message)

    def on_fault_drop(self, conn: int, op: str) -> None:
        log.warning("fault: dropping connection %s at %s", self._peer(conn), op)

    def on_fault_used(self, slot: int) -> None:
        """The engine used one of a counted fault: count it down here too (as io_fault)."""
        name = f"replica.{ne.FAULT_SLOTS[slot]}"
        f = faults._faults.get(name)
        if f is None or f.remaining is None:
            return
        f.remaining -= 1
        if f.remaining <= 0:
            for k, v in list(faults._faults.items()):
                if v is f:
                    del faults._faults[k]

    def on_log(self, level: int, message: str) -> None:
        log.log(level, "%s: %s", self.store.directory, message)

    def _peer(self, conn: int) -> str:
        c = self._conns.get(conn)
        return c.peer if c is not None else "?"

    # --- control requests ---------------------------------------------------------------------

    async def _control(self, up: ne.Upcall) -> None:
        conn = self._conns.get(up.conn)
        engine = self._engine
        if conn is None or engine is None:
            return  # the connection is gone: nobody to answer
        req = Request(up.op, up.tag, up.offset, up.length, up.flags, up.payload)
        handler = _Connection(_View(self))  # type: ignore[arg-type]
        capture = _Capture(self, up.conn)
        handler.transport = capture  # type: ignore[assignment]
        handler.peer = conn.peer
        handler.epoch = conn.epoch
        try:
            if up.op in set(Op) - _NO_PAUSE:
                async with self.engine_paused(engine):
                    handler._handle(req)
            else:
                handler._handle(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave the connection waiting for an answer
            if not engine.running:
                return  # the server is closing: the connection is gone anyway
            log.exception("control request %s failed", up.op)
            self.stats.py.errors += 1
            capture.out = [p.encode_error(up.tag, p.Status.EIO, f"internal error: {e}")]
        self._push_epoch()
        action, epoch = ne.EPOCH_KEEP, 0
        if handler.epoch != conn.epoch:
            if handler.epoch is None:
                action = ne.EPOCH_CLEAR
            else:
                action, epoch = ne.EPOCH_SET, handler.epoch
            conn.epoch = handler.epoch
        capture.late = True  # what the request sends from now on goes out by itself
        if self._engine is not None:
            self._engine.reply(up.conn, b"".join(capture.out), action, epoch)


# --- mirroring replica/faults.py into engines ----------------------------------------------


class _WatchedFaults(dict):  # type: ignore[type-arg]
    """faults._faults, telling the engines whenever a fault is armed or cleared."""

    listeners: list[Any]

    def _changed(self) -> None:
        for fn in list(self.listeners):
            fn()

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, *args: Any) -> Any:
        out = super().pop(*args)
        self._changed()
        return out

    def clear(self) -> None:
        super().clear()
        self._changed()

    def update(self, *args: Any, **kw: Any) -> None:
        super().update(*args, **kw)
        self._changed()


def _watch_faults(fn: Any) -> None:
    table = faults._faults
    if not isinstance(table, _WatchedFaults):
        watched = _WatchedFaults(table)
        watched.listeners = []
        faults._faults = watched
        table = watched
    table.listeners.append(fn)


def _unwatch_faults(fn: Any) -> None:
    table = faults._faults
    if isinstance(table, _WatchedFaults) and fn in table.listeners:
        table.listeners.remove(fn)
