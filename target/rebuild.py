"""Planning the copies of a rebuild (the target's side; replica/rebuild.py moves the data).

What a replica must copy is cut into 1 MiB windows, the unit of locking: while a window is
copied, writes to it wait (target/rangelock.py), so none races the copy. Windows are
grouped into batches, one COPY_FROM request each, which the rebuilding replica executes by
pulling from a current replica and verifying every piece by checksum.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

CHUNK = 1024 * 1024  # the locking window
BATCH_BYTES = 64 << 20  # data per COPY_FROM request
BATCH_WINDOWS = 4096  # windows locked per request
WORKERS = 2
T = TypeVar("T")


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


def batches(
    items: Iterator[tuple[int, int, list[tuple[int, int]]]],
    max_bytes: int = BATCH_BYTES,
    max_windows: int = BATCH_WINDOWS,
) -> Iterator[list[tuple[int, int, list[tuple[int, int]]]]]:
    """Group windows into batches: one COPY_FROM request each, so a catch-up of scattered
    blocks costs a few round trips, not one per block."""
    batch: list[tuple[int, int, list[tuple[int, int]]]] = []
    size = 0
    for w in items:
        batch.append(w)
        size += sum(b - a for a, b in w[2])
        if size >= max_bytes or len(batch) >= max_windows:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def copy_deadline(nbytes: int) -> float:
    """How long a replica may take to pull nbytes (generous: a slow disk is not a failure)."""
    return 30.0 + nbytes / (20 << 20)


async def run_workers(
    items: Iterator[T],
    work: Callable[[T], Awaitable[None]],
    workers: int = WORKERS,
) -> None:
    """Run work(item) for every item, `workers` at a time; the first error cancels all."""

    async def worker() -> None:
        for item in items:  # a shared iterator: each item is taken once
            await work(item)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
