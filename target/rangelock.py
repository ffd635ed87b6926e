"""Byte-range locking between volume I/O (shared) and rebuild copies (exclusive).

A rebuild copies a chunk from a current replica to a rebuilding one. A write to that chunk
in flight at the same time could land on the rebuilding replica before the copy of older
data does and be overwritten by it. The copy therefore holds the chunk exclusively: it waits
for overlapping writes in flight and holds new ones back until the chunk is copied.
Writes among themselves never wait for each other here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class RangeLock:
    def __init__(self) -> None:
        self._shared: dict[int, tuple[int, int]] = {}
        self._next = 0
        self._exclusive: tuple[int, int] | None = None
        self._exclusive_done = asyncio.Event()
        self._shared_changed = asyncio.Event()

    @asynccontextmanager
    async def shared(self, start: int, end: int) -> AsyncIterator[None]:
        rng = (start, end)
        while self._exclusive is not None and _overlaps(rng, self._exclusive):
            await self._exclusive_done.wait()
        self._next += 1
        key = self._next
        self._shared[key] = rng
        try:
            yield
        finally:
            del self._shared[key]
            if self._exclusive is not None:
                self._shared_changed.set()

    @asynccontextmanager
    async def exclusive(self, start: int, end: int) -> AsyncIterator[None]:
        rng = (start, end)
        while self._exclusive is not None:
            await self._exclusive_done.wait()
        self._exclusive = rng
        self._exclusive_done.clear()
        try:
            while any(_overlaps(rng, r) for r in self._shared.values()):
                self._shared_changed.clear()
                await self._shared_changed.wait()
            yield
        finally:
            self._exclusive = None
            self._exclusive_done.set()
