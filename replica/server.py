"""The replica server: serves one ReplicaStore over the replica data protocol.

Store calls are synchronous and run on the event loop thread (page-cache I/O takes
microseconds; a thread hop would cost more). Only fsync-bound work (FLUSH, FUA) is handed
to a worker thread, so one connection's flush never stalls the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from native import crc32c
from replica import faults
from replica import protocol as p
from replica.block import BlockError, check_range
from replica.protocol import Op, Request, Status
from replica.rebuild import Puller
from replica.store import MAX_ATTRS_BYTES, Fenced, ReplicaStore, StoreError, current_boot_id
from replica.transport import listen_unix, tune, unlink_socket

log = logging.getLogger("tandem.replica")

# Data ops that fault injection can touch, by the name used in fault specs.
_FAULT_OPS = {
    op.value: op.name.lower()
    for op in (Op.READ, Op.WRITE, Op.FLUSH, Op.UNMAP, Op.WRITE_ZEROES, Op.CHECKSUM)
}
_FAULT_OPS[Op.READV] = "read"  # a vectored read is a read to the fault hooks


class ReplicaStats:
    """Counters the REST API and /metrics report (plain ints: cheap on the I/O path)."""

    def __init__(self) -> None:
        self.ops: dict[str, int] = {op.name: 0 for op in Op}
        self.errors = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.connections = 0


class ReplicaServer:
    def __init__(self, store: ReplicaStore) -> None:
        self.store = store
        self.stats = ReplicaStats()
        self.state = "open"
        self._server: asyncio.Server | None = None
        self._unix: asyncio.Server | None = None
        self.socket_path: str | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self.puller = Puller(store)
        self.port = 0

    async def start(self, host: str, port: int, socket_path: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("replica data protocol on %s:%d", host, self.port)
        if socket_path:
            sock = listen_unix(socket_path)
            self._unix = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
            self.socket_path = socket_path
            log.info("replica data protocol on unix socket %s", socket_path)

    async def close(self) -> None:
        for server in (self._server, self._unix):
            if server is not None:
                server.close()
        for conn in list(self._conns):
            conn.abort()
        for server in (self._server, self._unix):
            if server is not None:
                await server.wait_closed()
        unlink_socket(self.socket_path)
        self.puller.close()
        self.state = "closed"

    def info(self) -> dict[str, Any]:
        m = self.store.meta
        return {
            "volume": m.volume,
            "uuid": m.uuid,
            "size": m.size,
            "block_size": m.block_size,
            "generation": m.generation,
            "epoch": m.epoch,
            "dirty": m.dirty,
            "was_dirty": self.store.was_dirty,
            "lost_cache": self.store.lost_cache,
            "chain": [layer.file for layer in m.chain],
            "snapshots": self.store.snapshots(),
            "dirty_regions": self.store.dirty_regions(),
            "state": self.state,
            "socket": self.socket_path,  # for a target on this host (replica/transport.py)
            "boot_id": current_boot_id(),
        }


class _Connection(asyncio.Protocol):
    def __init__(self, server: ReplicaServer) -> None:
        self.server = server
        self.store = server.store
        self.decoder = p.RequestDecoder()
        self.epoch: int | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._held: Request | None = None  # a request a delay/hang fault holds back

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername"))
        if (sock := transport.get_extra_info("socket")) is not None:
            with contextlib.suppress(OSError):
                tune(sock)
        self.server._conns.add(self)
        self.server.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        self.server.stats.connections -= 1

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        self._pump()

    def _pump(self) -> None:
        """Handle every complete request, in order, unless a delay fault holds one."""
        if self._held is not None:
            return
        try:
            while (req := self.decoder.next()) is not None:
                if faults._faults and req.op in _FAULT_OPS and self._inject(req):
                    return
                self._handle(req)
        except p.ProtocolError as e:
            log.warning("closing %s: %s", self.peer, e)
            self._send(p.encode_error(0, Status.EPROTO, str(e)))
            assert self.transport is not None
            self.transport.close()

    def _inject(self, req: Request) -> bool:
        """Apply an armed I/O fault; True when the connection must stop processing for now."""
        name = _FAULT_OPS[req.op]
        f = faults.io_fault("replica", name)
        if f is None or self.transport is None:
            return False
        if f.action == "drop":
            log.warning("fault: dropping connection %s at %s", self.peer, name)
            self.transport.abort()
            return True
        if f.action == "fail":
            self._send(p.encode_error(req.tag, int(f.arg), f"injected fault on {name}"))
            return False  # answered; go on with the next request
        # delay / hang: hold this request (and, to keep order, everything behind it)
        self._held = req
        self.transport.pause_reading()
        loop = asyncio.get_running_loop()
        if f.action == "delay":
            loop.call_later(f.arg, self._release)
        else:
            loop.call_later(0.1, self._release_when_cleared, name)
        return True

    def _release_when_cleared(self, name: str) -> None:
        armed = faults._faults.get(f"replica.{name}") or faults._faults.get("replica.*")
        if armed is not None and armed.action == "hang":
            asyncio.get_running_loop().call_later(0.1, self._release_when_cleared, name)
        else:
            self._release()

    def _release(self) -> None:
        req, self._held = self._held, None
        if req is None or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._handle(req)
        self._pump()

    def _handle(self, req: Request) -> None:
        stats = self.server.stats
        refusal = p.validate(req, self.store.size)
        if refusal is None and req.op in p.MUTATING:
            refusal = self._check_epoch()
        if refusal is not None:
            stats.errors += 1
            self._send(p.encode_error(req.tag, *refusal))
            return
        op = Op(req.op)
        stats.ops[op.name] += 1
        try:
            if op == Op.READ:
                data = self.store.read(req.offset, req.length)
                stats.bytes_read += len(data)
                self._send(p.encode_response(req.tag, 0, data))
            elif op == Op.READV:
                ranges = p.decode_ranges(req.payload, req.length, self.store.size)
                data = b"".join(self.store.read(off, n) for off, n in ranges)
                stats.bytes_read += len(data)
                self._send(p.encode_response(req.tag, 0, data))
            elif op == Op.WRITE:
                self.store.write(req.offset, req.payload)
                stats.bytes_written += req.length
                if req.flags & p.FLAG_FUA:
                    self._flush_then_reply(req.tag)
                else:
                    self._send(p.encode_response(req.tag))
            elif op == Op.FLUSH:
                self._flush_then_reply(req.tag)
            elif op == Op.UNMAP:
                self.store.unmap(req.offset, req.length)
                self._send(p.encode_response(req.tag))
            elif op == Op.WRITE_ZEROES:
                punch = not req.flags & p.FLAG_NO_HOLE
                self.store.write_zeroes(req.offset, req.length, punch=punch)
                self._send(p.encode_response(req.tag))
            elif op == Op.CHECKSUM:
                crc = crc32c(self.store.read(req.offset, req.length))
                self._send(p.encode_response(req.tag, 0, crc.to_bytes(4, "little")))
            elif op == Op.BLOCK_STATUS:
                ext = self.store.block_status(req.offset, req.length)
                body = json.dumps([[e.offset, e.length, e.flags] for e in ext]).encode()
                self._send(p.encode_response(req.tag, 0, body))
            else:
                self._control(op, req)
        except BlockError as e:
            stats.errors += 1
            self._send(p.encode_error(req.tag, e.errno, str(e)))
        except (ValueError, TypeError, KeyError, StoreError) as e:
            stats.errors += 1
            self._send(p.encode_error(req.tag, Status.EINVAL, f"bad request: {e}"))

    def _check_epoch(self) -> tuple[int, str] | None:
        if self.epoch is None:
            return Status.EPERM, "connection has not opened the replica (send OPEN first)"
        try:
            self.store.check_epoch(self.epoch)
        except Fenced as e:
            return Status.ESTALE, str(e)
        return None

    def _control(self, op: Op, req: Request) -> None:
        """Rare ops: their synchronous metadata writes may block the loop briefly."""
        if op == Op.PING:
            self._send(p.encode_response(req.tag, 0, req.payload))
        elif op == Op.INFO:
            self._send(p.encode_response(req.tag, 0, json.dumps(self.server.info()).encode()))
        elif op == Op.OPEN:
            epoch = _int_field(req.json(), "epoch")
            self.store.begin(epoch)
            self.epoch = epoch
            log.info("opened by %s with epoch %d", self.peer, epoch)
            self._send(p.encode_response(req.tag, 0, json.dumps(self.server.info()).encode()))
        elif op == Op.SET_GENERATION:
            self.store.set_generation(_int_field(req.json(), "generation"))
            self._send(p.encode_response(req.tag))
        elif op == Op.CLOSE:
            self.store.end_session()
            self.epoch = None
            self._send(p.encode_response(req.tag))
        elif op == Op.ATTRS:
            self._send(p.encode_response(req.tag, 0, json.dumps(self.store.attrs()).encode()))
        elif op == Op.SET_ATTRS:
            if len(req.payload) > MAX_ATTRS_BYTES:
                raise ValueError("attributes too large")
            self.store.set_attrs(req.json())
            self._send(p.encode_response(req.tag))
        elif op == Op.COPY_FROM:
            self._copy_from(req)
        elif op == Op.RESIZE:
            self.store.resize(_int_field(req.json(), "size"))
            self._send(p.encode_response(req.tag))
        elif op == Op.SNAPSHOT:
            name = req.json().get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("snapshot needs a name")
            self.store.snapshot(name)
            self._send(p.encode_response(req.tag))

    def _copy_from(self, req: Request) -> None:
        """Pull ranges from another replica in the background; the connection goes on with
        other requests (the target keeps writes away from the ranges meanwhile)."""
        body = req.json()
        source = body.get("source")
        raw = body.get("ranges")
        if not isinstance(source, str) or not isinstance(raw, list):
            raise ValueError("COPY_FROM needs a source address and a list of ranges")
        ranges = []
        for r in raw:
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)):
                raise ValueError(f"bad range {r!r}")
            check_range(self.store.size, r[0], r[1])
            ranges.append((r[0], r[1]))

        async def run() -> None:
            try:
                stats = await self.server.puller.copy(
                    source, ranges, bool(body.get("compare_first"))
                )
                self._send(p.encode_response(req.tag, 0, json.dumps(stats).encode()))
            except BlockError as e:
                self._send(p.encode_error(req.tag, e.errno, str(e)))
            except Exception as e:  # a bug must not leave the target waiting for an answer
                log.exception("COPY_FROM from %s failed", source)
                self._send(p.encode_error(req.tag, Status.EIO, f"copy failed: {e!r}"))

        task = asyncio.ensure_future(run())
        self.server._tasks.add(task)
        task.add_done_callback(self.server._tasks.discard)

    def _flush_then_reply(self, tag: int) -> None:
        async def run() -> None:
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.store.flush)
                self.store.flushed(started)  # on the loop thread, like every write
                self._send(p.encode_response(tag))
            except BlockError as e:
                self._send(p.encode_error(tag, e.errno, str(e)))

        task = asyncio.ensure_future(run())
        self.server._tasks.add(task)
        task.add_done_callback(self.server._tasks.discard)


def _int_field(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer")
    return value
