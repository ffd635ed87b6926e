"""Byte-range locking between volume I/O (shared) and rebuild copies (exclusive).

A rebuild copies a chunk from a current replica to a rebuilding one. A write to that chunk
in flight at the same time could land on the rebuilding replica before the copy of older
data does and be overwritten by it. The copy therefore holds the chunk exclusively: it waits
for overlapping writes in flight and holds new ones back until the chunk is copied. Several
copies (disjoint chunks) run at once; writes among themselves never wait for each other.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class RangeLock:
    def __init__(self) -> None:
        self._shared: dict[int, tuple[int, int]] = {}
        self._exclusive: dict[int, tuple[int, int]] = {}
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
        rng = (start, end)
        while self._exclusive and any(_overlaps(rng, x) for x in self._exclusive.values()):
            await self._wait()
        key = next(self._keys)
        self._shared[key] = rng
        try:
            yield
        finally:
            del self._shared[key]
            if self._exclusive:
                self._notify()

    @asynccontextmanager
    async def exclusive(self, start: int, end: int) -> AsyncIterator[None]:
        rng = (start, end)
        while any(_overlaps(rng, x) for x in self._exclusive.values()):
            await self._wait()
        key = next(self._keys)
        self._exclusive[key] = rng  # from here on, new overlapping writes wait
        try:
            while any(_overlaps(rng, x) for x in self._shared.values()):
                await self._wait()
            yield
        finally:
            del self._exclusive[key]
            self._notify()
