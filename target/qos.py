"""Per-volume QoS: token buckets in front of the replicator (an nbdkit-style filter).

Limits on read, write and total IOPS and bytes per second, each a token bucket that
refills at its rate and holds up to `burst_seconds` of it, so an idle volume may burst.
A request waits here, before it is passed on, until every bucket that applies to it has
tokens; a request larger than a bucket's depth is let through once the bucket is full
and leaves it in debt, so big requests are slowed but never starved. Limits change online
(`set_limits`): waiting requests re-check at once, initiators stay connected.

Reads count against read and total; writes, unmap and write-zeroes against write and
total (unmap and write-zeroes move no data, so they cost IOPS but no bytes). Flush and
block status are not limited. With no limit set a request costs one attribute check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from target.blockdev import BlockDevice, Extent

LIMITS = ("read_iops", "write_iops", "total_iops", "read_bps", "write_bps", "total_bps")


@dataclass(frozen=True)
class QosLimits:
    """0 means unlimited. Rates are per second; bps is bytes per second."""

    read_iops: int = 0
    write_iops: int = 0
    total_iops: int = 0
    read_bps: int = 0
    write_bps: int = 0
    total_bps: int = 0
    burst_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in LIMITS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = unlimited)")
        if not 0 <= self.burst_seconds <= 60:
            raise ValueError("burst_seconds must be between 0 and 60")

    @property
    def unlimited(self) -> bool:
        return not any(getattr(self, name) for name in LIMITS)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QosLimits:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QoS field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


class TokenBucket:
    """`rate` tokens per second, at most `depth` banked; rate 0 = unlimited."""

    def __init__(self, rate: float, burst_seconds: float, now: float) -> None:
        self.rate = rate
        self.depth = rate * burst_seconds
        self.tokens = self.depth
        self.last = now

    def reconfigure(self, rate: float, burst_seconds: float, now: float) -> None:
        if self.rate <= 0:  # was unlimited: start full
            self.rate, self.depth, self.last = rate, rate * burst_seconds, now
            self.tokens = self.depth
            return
        self._refill(now)
        self.rate, self.depth = rate, rate * burst_seconds
        self.tokens = min(self.tokens, self.depth)

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.depth, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def delay(self, n: float, now: float) -> float:
        """Seconds until a request of n tokens may go (0: now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        need = min(n, self.depth)  # bigger than the bucket: wait until it is full
        return max(0.0, (need - self.tokens) / self.rate)

    def take(self, n: float) -> None:
        if self.rate > 0:
            self.tokens -= n


class QosDevice:
    """A BlockDevice that admits requests at the configured rates."""

    def __init__(
        self,
        inner: BlockDevice,
        limits: QosLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self._clock = clock
        self.limits = limits or QosLimits()
        now = clock()
        self._buckets = {
            name: TokenBucket(getattr(self.limits, name), self.limits.burst_seconds, now)
            for name in LIMITS
        }
        # One queue per direction: requests are admitted in arrival order, and a read
        # waiting for read tokens does not hold up writes.
        self._queues = {"read": asyncio.Lock(), "write": asyncio.Lock()}
        self._changed = asyncio.Event()
        self.throttled = {"read": 0, "write": 0}  # requests that had to wait
        self.throttled_seconds = {"read": 0.0, "write": 0.0}

    def set_limits(self, limits: QosLimits) -> None:
        now = self._clock()
        for name, bucket in self._buckets.items():
            bucket.reconfigure(getattr(limits, name), limits.burst_seconds, now)
        self.limits = limits
        # Wake every waiting request so it re-checks against the new rates.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def status(self) -> dict[str, Any]:
        return {
            **self.limits.as_dict(),
            "throttled_requests": dict(self.throttled),
            "throttled_seconds": {k: round(v, 3) for k, v in self.throttled_seconds.items()},
        }

    async def _admit(self, kind: str, nbytes: int) -> None:
        if self.limits.unlimited:
            return
        iops = (self._buckets[f"{kind}_iops"], self._buckets["total_iops"])
        bps = (self._buckets[f"{kind}_bps"], self._buckets["total_bps"])
        async with self._queues[kind]:
            started = None
            while True:
                now = self._clock()
                wait = max(*(b.delay(1, now) for b in iops), *(b.delay(nbytes, now) for b in bps))
                if wait <= 0:
                    break
                if started is None:
                    started = now
                    self.throttled[kind] += 1
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), wait)
                except TimeoutError:
                    pass
            for b in iops:
                b.take(1)
            for b in bps:
                b.take(nbytes)
            if started is not None:
                self.throttled_seconds[kind] += self._clock() - started

    # --- BlockDevice ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def readonly(self) -> bool:
        return self.inner.readonly

    async def read(self, offset: int, length: int) -> bytes:
        await self._admit("read", length)
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._admit("write", len(data))
        await self.inner.write(offset, data, fua)

    async def unmap(self, offset: int, length: int) -> None:
        await self._admit("write", 0)
        await self.inner.unmap(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        await self._admit("write", 0)
        await self.inner.write_zeroes(offset, length, may_unmap)

    async def flush(self) -> None:
        await self.inner.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.inner.block_status(offset, length)
