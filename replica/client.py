"""Client for the replica data protocol: one pipelined TCP connection, tagged requests.

A watchdog enforces the per-request deadline: when the oldest request in flight is older
than `timeout`, the replica is considered failed (slow is failed) and every request in
flight fails with ReplicaDown; the connection is closed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Callable
from typing import Any

from replica import protocol as p
from replica.block import BlockError, Extent, MediumError, NoSpace, OutOfRange
from replica.protocol import Op
from replica.transport import tune

_ERRORS: dict[int, type[BlockError]] = {
    errno.ENOSPC: NoSpace,
    errno.EINVAL: OutOfRange,
}


class ReplicaDown(MediumError):
    """The replica is unreachable, its connection broke, or it missed a deadline."""


class ReplicaError(BlockError):
    """The replica answered with an error status."""


def error_for(status: int, message: str) -> BlockError:
    cls = _ERRORS.get(status, ReplicaError)
    return cls(message, status)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class ReplicaClient(asyncio.Protocol):
    def __init__(self, address: str, timeout: float = 5.0, route: str | None = None) -> None:
        self.address = address
        self.route = route  # a unix socket path to reach it by instead (replica/transport.py)
        self.timeout = timeout
        self._decoder = p.ResponseDecoder()
        self._pending: dict[int, tuple[asyncio.Future[p.Response], float]] = {}
        self._long: dict[int, tuple[asyncio.Future[p.Response], float]] = {}
        self._tag = 0
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed_reason: str | None = "not connected"
        self._closing = False
        # Called once when a live connection breaks by itself (not on close()).
        self.on_lost: Callable[[str], None] | None = None
        self.last_reply = time.monotonic()

    # --- connection -------------------------------------------------------------------

    async def connect(self, connect_timeout: float | None = None) -> None:
        host, port = parse_address(self.address)
        loop = asyncio.get_running_loop()
        try:
            if self.route:
                opening = loop.create_unix_connection(lambda: self, self.route)
            else:
                opening = loop.create_connection(lambda: self, host, port)
            await asyncio.wait_for(opening, connect_timeout or self.timeout)
            if self.route and self._transport is not None:
                tune(self._transport.get_extra_info("socket"))
        except (OSError, TimeoutError) as e:
            via = f" via {self.route}" if self.route else ""
            raise ReplicaDown(f"replica {self.address}{via}: cannot connect: {e}") from e
        self._closed_reason = None
        self._watchdog = asyncio.create_task(self._watch())

    @property
    def connected(self) -> bool:
        return self._closed_reason is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(f"connection lost{': ' + str(exc) if exc else ''}")

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        try:
            while (resp := self._decoder.next()) is not None:
                self.last_reply = time.monotonic()
                entry = self._pending.pop(resp.tag, None) or self._long.pop(resp.tag, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(resp)
        except p.ProtocolError as e:
            self._fail_all(f"protocol error: {e}")

    def close(self) -> None:
        self._closing = True
        self._fail_all("closed")

    def _fail_all(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            if self.on_lost is not None and not self._closing:
                self.on_lost(reason)
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        if self._watchdog is not None and self._watchdog is not _current_task():
            self._watchdog.cancel()
        pending, self._pending = self._pending, {}
        pending.update(self._long)
        self._long = {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(ReplicaDown(f"replica {self.address}: {reason}"))

    async def _watch(self) -> None:
        interval = min(0.1, self.timeout / 4)
        while self._closed_reason is None:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if self._pending:
                _fut, started = next(iter(self._pending.values()))
                if now - started > self.timeout:
                    self._fail_all(f"request missed its {self.timeout:g}s deadline")
            if any(now > due for _fut, due in self._long.values()):
                self._fail_all("a long request missed its deadline")

    # --- requests ---------------------------------------------------------------------

    def _submit(
        self,
        op: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        deadline: float | None = None,
    ) -> asyncio.Future[p.Response]:
        if self._closed_reason is not None or self._transport is None:
            raise ReplicaDown(f"replica {self.address}: {self._closed_reason}")
        self._tag += 1
        tag = self._tag
        fut: asyncio.Future[p.Response] = asyncio.get_running_loop().create_future()
        if deadline is None:
            self._pending[tag] = (fut, time.monotonic())
        else:  # a long request (a rebuild copy) carries its own deadline
            self._long[tag] = (fut, time.monotonic() + deadline)
        self._transport.write(p.encode_request(op, tag, offset, length, flags, payload))
        return fut

    async def request(
        self,
        op: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        deadline: float | None = None,
    ) -> p.Response:
        resp = await self._submit(op, offset, length, flags, payload, deadline)
        if resp.status != 0:
            raise error_for(resp.status, f"replica {self.address}: {resp.message}")
        return resp

    async def _json(self, op: int, obj: Any = None) -> Any:
        payload = json.dumps(obj).encode() if obj is not None else b""
        resp = await self.request(op, payload=payload)
        return json.loads(resp.payload) if resp.payload else None

    async def read(self, offset: int, length: int) -> bytes:
        return (await self.request(Op.READ, offset, length)).payload

    async def readv(self, ranges: list[tuple[int, int]]) -> bytes:
        """The data of every (offset, length) range, back to back, in one request."""
        total = sum(n for _, n in ranges)
        return (await self.request(Op.READV, 0, total, payload=p.encode_ranges(ranges))).payload

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self.request(Op.WRITE, offset, len(data), p.FLAG_FUA if fua else 0, data)

    async def flush(self) -> None:
        await self.request(Op.FLUSH)

    async def unmap(self, offset: int, length: int) -> None:
        await self.request(Op.UNMAP, offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        await self.request(Op.WRITE_ZEROES, offset, length, 0 if may_unmap else p.FLAG_NO_HOLE)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        resp = await self.request(Op.BLOCK_STATUS, offset, length)
        return [Extent(o, n, f) for o, n, f in json.loads(resp.payload)]

    async def checksum(self, offset: int, length: int) -> int:
        """CRC32C of the replica's data in the range (computed on the replica)."""
        resp = await self.request(Op.CHECKSUM, offset, length)
        return int.from_bytes(resp.payload, "little")

    async def copy_from(
        self,
        source: str,
        ranges: list[tuple[int, int]],
        compare_first: bool = False,
        deadline: float = 120.0,
    ) -> dict[str, Any]:
        """Have this replica pull `ranges` from the replica at `source` and verify them."""
        body = {"source": source, "ranges": [list(r) for r in ranges]}
        if compare_first:
            body["compare_first"] = True
        resp = await self.request(
            Op.COPY_FROM, payload=json.dumps(body).encode(), deadline=deadline
        )
        return json.loads(resp.payload)

    async def resize(self, size: int) -> None:
        await self._json(Op.RESIZE, {"size": size})

    async def attrs(self) -> dict[str, Any]:
        return await self._json(Op.ATTRS)

    async def set_attrs(self, changes: dict[str, Any]) -> None:
        await self._json(Op.SET_ATTRS, changes)

    async def ping(self) -> None:
        await self.request(Op.PING)

    async def info(self) -> dict[str, Any]:
        return await self._json(Op.INFO)

    async def open(self, epoch: int) -> dict[str, Any]:
        return await self._json(Op.OPEN, {"epoch": epoch})

    async def set_generation(self, generation: int) -> None:
        await self._json(Op.SET_GENERATION, {"generation": generation})

    async def close_session(self) -> None:
        await self.request(Op.CLOSE)

    async def snapshot(self, name: str) -> None:
        await self._json(Op.SNAPSHOT, {"name": name})


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None
