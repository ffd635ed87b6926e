"""Byte-range locking between volume I/O (shared) and rebuild copies (exclusive).

A rebuild copies a window from a current replica to a rebuilding one. A write to that window
in flight at the same time could land on the rebuilding replica before the copy of older
data does and be overwritten by it. The copy therefore holds its windows exclusively: it
waits for overlapping writes in flight and holds new ones back until the windows are copied.
One exclusive lock covers a whole batch of windows (a sorted list of disjoint ranges), so
checking a write against it is a binary search, however many windows the batch holds.
Writes among themselves never wait for each other here.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Ranges:
    """Sorted, disjoint [start, end) ranges with a logarithmic overlap test."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        ordered = sorted(r for r in ranges if r[1] > r[0])
        self.starts = [a for a, _ in ordered]
        self.ends = [b for _, b in ordered]

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.ends, start)  # the first range ending after `start`
        return i < len(self.starts) and self.starts[i] < end

    def overlaps_any(self, other: _Ranges) -> bool:
        small, big = (self, other) if len(self.starts) <= len(other.starts) else (other, self)
        return any(big.overlaps(a, b) for a, b in zip(small.starts, small.ends, strict=True))


class RangeLock:
    def __init__(self) -> None:
        self._shared: dict[int, tuple[int, int]] = {}
        self._exclusive: dict[int, _Ranges] = {}
        self._keys = itertools.count()
        self._changed = asyncio.Event()

    async def _wait(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def busy(self) -> bool:
        return bool(self._shared or self._exclusive)

    @asynccontextmanager
    async def shared(self, start: int, end: int) -> AsyncIterator[None]:
        while self._exclusive and any(x.overlaps(start, end) for x in self._exclusive.values()):
            await self._wait()
        key = next(self._keys)
        self._shared[key] = (start, end)
        try:
            yield
        finally:
            del self._shared[key]
            if self._exclusive:
                self._notify()

    def exclusive(self, start: int, end: int):  # type: ignore[no-untyped-def]
        return self.exclusive_many([(start, end)])

    @asynccontextmanager
    async def exclusive_many(self, ranges: list[tuple[int, int]]) -> AsyncIterator[None]:
        mine = _Ranges(ranges)
        while any(mine.overlaps_any(x) for x in self._exclusive.values()):
            await self._wait()
        key = next(self._keys)
        self._exclusive[key] = mine  # from here on, new overlapping writes wait
        try:
            while any(mine.overlaps(a, b) for a, b in self._shared.values()):
                await self._wait()
            yield
        finally:
            del self._exclusive[key]
            self._notify()
