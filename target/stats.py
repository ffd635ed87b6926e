"""Per-volume I/O statistics: a thin layer over any BlockDevice (like an nbdkit filter).

Counts operations, bytes and errors and records latency histograms into the volume's own
Prometheus registry (several volumes can live in one test process).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from target.blockdev import BlockDevice, BlockError, Extent

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5)


OPS = ("read", "write", "flush", "unmap", "write_zeroes", "block_status")


class VolumeMetrics:
    """The volume's I/O metric families, labelled by frontend (nbd, iscsi) and op."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["volume", "frontend", "op"]
        self.ops = Counter("tandem_volume_ops", "I/O requests", labels, registry=registry)
        self.bytes = Counter("tandem_volume_bytes", "Bytes transferred", labels, registry=registry)
        self.errors = Counter("tandem_volume_errors", "Failed requests", labels, registry=registry)
        self.latency = Histogram(
            "tandem_volume_latency_seconds",
            "Request latency",
            labels,
            buckets=_BUCKETS,
            registry=registry,
        )


class StatsDevice:
    """Counts one frontend's I/O on the way to the device below."""

    def __init__(self, inner: BlockDevice, metrics: VolumeMetrics, volume: str, frontend: str):
        self.inner = inner
        self._m = {
            op: (
                metrics.ops.labels(volume, frontend, op),
                metrics.bytes.labels(volume, frontend, op),
                metrics.errors.labels(volume, frontend, op),
                metrics.latency.labels(volume, frontend, op),
            )
            for op in OPS
        }
        # Plain totals for the REST API (cheaper to read than the registry).
        self.totals: dict[str, list[int]] = {op: [0, 0, 0] for op in OPS}

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def readonly(self) -> bool:
        return self.inner.readonly

    async def _timed(self, op: str, nbytes: int, coro: Any) -> Any:
        ops, byts, errors, latency = self._m[op]
        tot = self.totals[op]
        t0 = time.perf_counter()
        try:
            result = await coro
        except BlockError:
            errors.inc()
            tot[2] += 1
            raise
        latency.observe(time.perf_counter() - t0)
        ops.inc()
        tot[0] += 1
        if nbytes:
            byts.inc(nbytes)
            tot[1] += nbytes
        return result

    async def read(self, offset: int, length: int) -> bytes:
        return await self._timed("read", length, self.inner.read(offset, length))

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._timed("write", len(data), self.inner.write(offset, data, fua))

    async def flush(self) -> None:
        await self._timed("flush", 0, self.inner.flush())

    async def unmap(self, offset: int, length: int) -> None:
        await self._timed("unmap", 0, self.inner.unmap(offset, length))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        await self._timed("write_zeroes", 0, self.inner.write_zeroes(offset, length, may_unmap))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self._timed("block_status", 0, self.inner.block_status(offset, length))
