"""Copying data between replicas: rebuild of a returning or new replica, resync after a crash.

A copy works window by window (1 MiB, aligned), each holding the pieces to copy. Per window
the source's block status decides what moves: holes become an UNMAP on the destination (so
nothing stale survives there), data is read and written; only allocated extents cross the
network. The window is then verified: both replicas compute the CRC32C of the whole window
locally and the checksums must match. The caller holds the window's range exclusively for
all of it, so no write races the copy.
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


def windows(
    ranges: list[tuple[int, int]], window: int = CHUNK
) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """Group (offset, length) ranges by aligned window: (start, end, pieces) per window
    touched, pieces being the (start, end) parts of the ranges inside it."""
    current: tuple[int, int, list[tuple[int, int]]] | None = None
    for off, n in sorted(ranges):
        pos, stop = off, off + n
        while pos < stop:
            w0 = pos // window * window
            piece_end = min(stop, w0 + window)
            if current is not None and current[0] == w0:
                current[2].append((pos, piece_end))
            else:
                if current is not None:
                    yield current
                current = (w0, w0 + window, [(pos, piece_end)])
            pos = piece_end
    if current is not None:
        yield current


async def _copy_pieces(
    src: CopySource,
    dst: CopyTarget,
    start: int,
    end: int,
    pieces: list[tuple[int, int]],
    limiter: RateLimiter,
) -> int:
    """Make dst equal src on the pieces of window [start, end): holes on the source become
    UNMAPs, data is read and written; the pieces move concurrently."""
    extents = await src.block_status(start, end - start)
    jobs = []
    moved = 0
    for p0, p1 in pieces:
        for e in extents:
            lo, hi = max(e.offset, p0), min(e.offset + e.length, p1)
            if hi <= lo:
                continue
            if e.flags & STATE_HOLE:
                jobs.append(dst.unmap(lo, hi - lo))
            else:
                await limiter.take(hi - lo)
                jobs.append(_move(src, dst, lo, hi - lo))
                moved += hi - lo
    await asyncio.gather(*jobs)
    return moved


async def _move(src: CopySource, dst: CopyTarget, offset: int, length: int) -> None:
    await dst.write(offset, await src.read(offset, length))


async def _same(src: CopySource, dst: CopyTarget, start: int, end: int) -> bool:
    a, b = await asyncio.gather(src.checksum(start, end - start), dst.checksum(start, end - start))
    return a == b


async def copy_window(
    src: CopySource,
    dst: CopyTarget,
    start: int,
    end: int,
    pieces: list[tuple[int, int]],
    limiter: RateLimiter,
) -> int:
    """Copy the pieces of a window, then verify the whole window by checksum. If the rest of
    the window turns out to differ too (the premise of an incremental copy broken), copy the
    whole window and verify again. Returns the bytes of data moved."""
    moved = await _copy_pieces(src, dst, start, end, pieces, limiter)
    if await _same(src, dst, start, end):
        return moved
    if pieces != [(start, end)]:
        moved += await _copy_pieces(src, dst, start, end, [(start, end)], limiter)
        if await _same(src, dst, start, end):
            return moved
    raise VerifyError(f"window {start}+{end - start}: checksums differ after the copy")


async def run_workers(
    items: Iterator[tuple[int, int, list[tuple[int, int]]]],
    work: Callable[[int, int, list[tuple[int, int]]], Awaitable[None]],
    workers: int = WORKERS,
) -> None:
    """Run work(start, end, pieces) for every window, `workers` at a time; the first error
    cancels all."""

    async def worker() -> None:
        for start, end, pieces in items:  # a shared iterator: each window is taken once
            await work(start, end, pieces)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
