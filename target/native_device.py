"""A BlockDevice over the native engine's volume, for what Python executes itself on the native
engine: the iSCSI frontend (until its data path moves into the engine) and NBD's block
status. Requests go into the engine's fan-out like the engine's own NBD requests (the write
rule, reads, range locks, QoS, stats under the frontend's name); block status and the
volume's state come from the replicator (Python's control connections)."""

from __future__ import annotations

import contextvars
import errno
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from native import engine as ne
from target.blockdev import (
    BlockError,
    Extent,
    MediumError,
    NoSpace,
    OutOfRange,
)

if TYPE_CHECKING:
    from target.native_replicator import NativeReplicator
    from target.native_volume import FrontendStats


def error_for(status: int, message: str) -> BlockError:
    """The BlockError the Python replicator raises for the same failure."""
    from target.replicator import QuorumError

    if status == errno.EROFS:
        return QuorumError(message)
    if status == errno.ENOSPC:
        return NoSpace(message)
    if status == errno.EINVAL:
        return OutOfRange(message)
    if status == errno.EIO:
        return MediumError(message)
    return BlockError(message, status)


async def engine_io(
    engine: ne.Engine,
    frontend: int,
    op: int,
    offset: int,
    length: int,
    data: bytes | None = None,
    flags: int = 0,
) -> bytes:
    """One volume request through the engine; the bytes read (reads), else b""."""
    try:
        res = await engine.submit(frontend, op, offset, length, data, flags)
    except OSError as e:
        raise MediumError(f"engine: {e.strerror}", e.errno or errno.EIO) from e
    if res.status:
        raise error_for(res.status, res.data.decode("utf-8", "replace"))
    return res.data


# The byte ranges the current task holds exclusively in the engine (EngineDevice.exclusive).
_held: contextvars.ContextVar[tuple[tuple[int, int], ...]] = contextvars.ContextVar(
    "engine_exclusive", default=()
)


class EngineDevice:
    """The volume as one frontend sees it, over the engine."""

    def __init__(self, replicator: NativeReplicator, frontend: str, stats: FrontendStats) -> None:
        self.replicator = replicator
        self.engine = replicator.engine
        self.frontend = frontend
        self._fe = ne.FRONTENDS.index(frontend)
        self.stats = stats

    @property
    def size(self) -> int:
        return self.replicator.size

    @property
    def readonly(self) -> bool:
        return self.replicator.readonly

    @property
    def totals(self) -> dict[str, list[int]]:
        return self.stats.totals

    # Bounds are checked in the engine (after QoS, counted as errors: like the Python stack).

    async def read(self, offset: int, length: int) -> bytes:
        return await engine_io(self.engine, self._fe, ne.VIO_READ, offset, length)

    @asynccontextmanager
    async def exclusive(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold [start, end) against every other write, the engine's own frontends' too
        (COMPARE AND WRITE on the native engine: iSCSI writes run in C); this task's writes
        inside it go through."""
        rid, granted = self.engine.lock([(start, end)])
        token = None
        try:
            await granted
            token = _held.set((*_held.get(), (start, end)))
            yield
        finally:
            if token is not None:
                _held.reset(token)
            self.engine.unlock(rid)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        flags = ne.VIO_FUA if fua else 0
        end = offset + len(data)
        if any(s <= offset and end <= e for s, e in _held.get()):
            flags |= ne.VIO_LOCKED
        await engine_io(self.engine, self._fe, ne.VIO_WRITE, offset, len(data), bytes(data), flags)

    async def flush(self) -> None:
        await engine_io(self.engine, self._fe, ne.VIO_FLUSH, 0, 0)

    async def unmap(self, offset: int, length: int) -> None:
        await engine_io(self.engine, self._fe, ne.VIO_UNMAP, offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        flags = 0 if may_unmap else ne.VIO_NO_HOLE
        await engine_io(self.engine, self._fe, ne.VIO_WRITE_ZEROES, offset, length, None, flags)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """From a current replica over Python's control connection, counted here."""
        t0 = time.perf_counter()
        try:
            extents = await self.replicator.block_status(offset, length)
        except BlockError:
            self.stats.block_status_error()
            raise
        self.stats.block_status_done(time.perf_counter() - t0)
        return extents
