"""Copying data between replicas: rebuild of a returning or new replica, resync after a crash.

A copy works chunk by chunk. Per chunk the source's block status decides what moves: holes
become an UNMAP on the destination (so nothing stale survives there), data is read and
written; only allocated extents cross the network. The chunk is then verified: both
replicas compute the CRC32C of the chunk locally and the checksums must match. The caller
holds the chunk's range exclusively for all of it, so no write races the copy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from replica.block import STATE_HOLE, BlockError, Extent

CHUNK = 1024 * 1024
WORKERS = 4


class CopySource(Protocol):
    async def read(self, offset: int, length: int) -> bytes: ...
    async def block_status(self, offset: int, length: int) -> list[Extent]: ...
    async def checksum(self, offset: int, length: int) -> int: ...


class CopyTarget(CopySource, Protocol):
    async def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...
    async def unmap(self, offset: int, length: int) -> None: ...


class VerifyError(BlockError):
    """A copied chunk's checksum differs between source and destination."""


@dataclass
class Progress:
    kind: str  # "full", "incremental" or "resync"
    total: int
    done: int = 0
    copied: int = 0  # bytes of data actually moved (holes are not)
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        left = self.total - self.done
        return {
            "kind": self.kind,
            "done_bytes": self.done,
            "total_bytes": self.total,
            "copied_bytes": self.copied,
            "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
            "rate_bytes_per_second": round(rate),
            "eta_seconds": round(left / rate, 1)
            if rate > 0 and left
            else (0 if not left else None),
        }


class RateLimiter:
    """Token bucket in bytes per second (0 = unlimited) with one second of burst."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._last = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= min(n, self.rate):
                self._tokens -= n
                return
            await asyncio.sleep((min(n, self.rate) - self._tokens) / self.rate)


def chunks(ranges: list[tuple[int, int]], chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Cut (offset, length) ranges into chunk-aligned (start, end) pieces."""
    for off, n in ranges:
        pos, end = off, off + n
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            yield pos, stop
            pos = stop


async def copy_chunk(
    src: CopySource, dst: CopyTarget, start: int, end: int, limiter: RateLimiter
) -> int:
    """Make dst's [start, end) equal to src's and verify it; returns bytes of data moved."""
    moved = 0
    for e in await src.block_status(start, end - start):
        lo, hi = max(e.offset, start), min(e.offset + e.length, end)
        if hi <= lo:
            continue
        if e.flags & STATE_HOLE:
            await dst.unmap(lo, hi - lo)
        else:
            await limiter.take(hi - lo)
            await dst.write(lo, await src.read(lo, hi - lo))
            moved += hi - lo
    a, b = await asyncio.gather(src.checksum(start, end - start), dst.checksum(start, end - start))
    if a != b:
        raise VerifyError(f"chunk {start}+{end - start}: checksum {b:#x} differs from {a:#x}")
    return moved


async def run_workers(
    pieces: Iterator[tuple[int, int]],
    work: Callable[[int, int], Awaitable[None]],
    workers: int = WORKERS,
) -> None:
    """Run work(start, end) for every piece, `workers` at a time; the first error cancels all."""

    async def worker() -> None:
        for start, end in pieces:  # a shared iterator: each piece is taken once
            await work(start, end)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
