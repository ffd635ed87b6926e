"""An in-memory BlockDevice for tests, with 4 KiB allocation tracking and fault hooks.

Blocks are allocated by writes (any byte touched) and by write_zeroes(may_unmap=False);
unmap and write_zeroes(may_unmap=True) free the blocks they cover whole. Unallocated
blocks read as zeros and report STATE_HOLE | STATE_ZERO. Tests can make operations slow
(`delay`), wait for an event (`gate`), fail (`fail`), and read the log of completed
operations (`log`: "write_fua" for FUA writes, "write_zeroes_nohole" for NO_HOLE zeroing)
and the peak number of concurrent operations (`peak_concurrency`).
"""

from __future__ import annotations

import asyncio

from target.blockdev import (
    STATE_HOLE,
    STATE_ZERO,
    BlockError,
    Extent,
    ReadOnlyError,
    check_range,
)

BLOCK = 4096


class MemDevice:
    def __init__(self, size: int, readonly: bool = False) -> None:
        self._size = size
        self.readonly = readonly
        self.data = bytearray(size)
        self.allocated: set[int] = set()  # indices of 4 KiB blocks holding data
        self.delay: dict[str, float] = {}  # op name -> seconds to sleep before doing it
        self.gate: dict[str, asyncio.Event] = {}  # op name -> event it waits for first
        self.fail: dict[str, BlockError] = {}  # op name -> error to raise
        self.log: list[tuple[str, int, int]] = []  # (op, offset, length) in completion order
        self.active = 0
        self.peak_concurrency = 0

    @property
    def size(self) -> int:
        return self._size

    def resize(self, size: int) -> None:
        self.data.extend(bytes(max(0, size - self._size)))
        del self.data[size:]
        self._size = size

    async def _enter(self, op: str, offset: int, length: int, writing: bool) -> None:
        self.active += 1
        self.peak_concurrency = max(self.peak_concurrency, self.active)
        try:
            if op in self.gate:
                await self.gate[op].wait()
            if op in self.delay:
                await asyncio.sleep(self.delay[op])
            else:
                await asyncio.sleep(0)  # let other tasks in, as a real device would
            if op in self.fail:
                raise self.fail[op]
            if writing and self.readonly:
                raise ReadOnlyError("device is read-only")
            check_range(self._size, offset, length)
        finally:
            self.active -= 1

    def _blocks(self, offset: int, length: int, whole: bool) -> range:
        """Block indices touched by the range (or only those it covers entirely)."""
        if whole:
            return range(-(-offset // BLOCK), (offset + length) // BLOCK)
        if length == 0:
            return range(0)
        return range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)

    async def read(self, offset: int, length: int) -> bytes:
        await self._enter("read", offset, length, writing=False)
        self.log.append(("read", offset, length))
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._enter("write", offset, len(data), writing=True)
        self.data[offset : offset + len(data)] = data
        self.allocated.update(self._blocks(offset, len(data), whole=False))
        self.log.append(("write_fua" if fua else "write", offset, len(data)))

    async def flush(self) -> None:
        await self._enter("flush", 0, 0, writing=False)
        self.log.append(("flush", 0, 0))

    async def unmap(self, offset: int, length: int) -> None:
        await self._enter("unmap", offset, length, writing=True)
        self.data[offset : offset + length] = bytes(length)
        self.allocated.difference_update(self._blocks(offset, length, whole=True))
        self.log.append(("unmap", offset, length))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        await self._enter("write_zeroes", offset, length, writing=True)
        self.data[offset : offset + length] = bytes(length)
        if may_unmap:
            self.allocated.difference_update(self._blocks(offset, length, whole=True))
        else:
            self.allocated.update(self._blocks(offset, length, whole=False))
        self.log.append(("write_zeroes" if may_unmap else "write_zeroes_nohole", offset, length))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._enter("block_status", offset, length, writing=False)
        self.log.append(("block_status", offset, length))
        extents: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            block = pos // BLOCK
            stop = min((block + 1) * BLOCK, end)
            flags = 0 if block in self.allocated else STATE_HOLE | STATE_ZERO
            if extents and extents[-1].flags == flags:
                last = extents[-1]
                extents[-1] = Extent(last.offset, stop - last.offset, flags)
            else:
                extents.append(Extent(pos, stop - pos, flags))
            pos = stop
        return extents
