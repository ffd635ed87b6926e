"""QoS token buckets and the QosDevice layer (real time, small numbers)."""

from __future__ import annotations

import asyncio
import time

import pytest

from target.qos import QosDevice, QosLimits, TokenBucket
from tests.unit.memdev import MemDevice

MiB = 1 << 20


def test_bucket_bursts_then_paces() -> None:
    b = TokenBucket(100, 1.0, now=0.0)
    for _ in range(100):  # a full second banked
        assert b.delay(1, 0.0) == 0
        b.take(1)
    assert b.delay(1, 0.0) == pytest.approx(0.01)
    assert b.delay(1, 0.01) == pytest.approx(0.0, abs=1e-9)


def test_bucket_larger_request_waits_for_a_full_bucket_then_goes_into_debt() -> None:
    b = TokenBucket(1000, 0.1, now=0.0)  # depth 100
    assert b.delay(500, 0.0) == 0  # full: it may go
    b.take(500)
    assert b.tokens == -400
    assert b.delay(1, 0.0) == pytest.approx(0.401)


def test_bucket_reconfigure_clamps_savings_and_unlimited_starts_full() -> None:
    b = TokenBucket(1000, 1.0, now=0.0)
    b.reconfigure(10, 1.0, now=0.0)
    assert b.tokens == 10
    u = TokenBucket(0, 1.0, now=0.0)
    assert u.delay(10**9, 0.0) == 0
    u.reconfigure(50, 1.0, now=5.0)
    assert u.tokens == 50


def test_limits_validation() -> None:
    with pytest.raises(ValueError, match="read_iops"):
        QosLimits(read_iops=-1)
    with pytest.raises(ValueError, match="burst"):
        QosLimits(burst_seconds=61)
    with pytest.raises(ValueError, match="unknown QoS"):
        QosLimits.from_dict({"iops": 5})
    assert QosLimits().unlimited
    assert not QosLimits(total_bps=1).unlimited


async def _timed(coros: list) -> float:  # type: ignore[type-arg]
    t0 = time.monotonic()
    await asyncio.gather(*coros)
    return time.monotonic() - t0


def test_iops_limit_paces_requests() -> None:
    async def main() -> None:
        dev = QosDevice(MemDevice(MiB), QosLimits(total_iops=500, burst_seconds=0))
        elapsed = await _timed([dev.read(0, 4096) for _ in range(101)])
        assert 0.18 < elapsed < 0.4  # 100 intervals of 2 ms
        assert dev.throttled["read"] > 0

    asyncio.run(main())


def test_bytes_limit_counts_bytes_and_unmap_costs_no_bytes() -> None:
    async def main() -> None:
        dev = QosDevice(MemDevice(4 * MiB), QosLimits(write_bps=4 * MiB, burst_seconds=0))
        elapsed = await _timed([dev.write(i * MiB // 2, bytes(MiB // 2)) for i in range(5)])
        assert 0.4 < elapsed < 0.8  # 2 MiB beyond the first request at 4 MiB/s
        t = await _timed([dev.unmap(0, MiB) for _ in range(20)])
        assert t < 0.8  # after the debt is paid, discards are free of bytes

    asyncio.run(main())


def test_unlimited_is_a_pass_through() -> None:
    async def main() -> None:
        mem = MemDevice(MiB)
        dev = QosDevice(mem)
        await dev.write(0, b"x" * 4096, fua=True)
        assert await dev.read(0, 4) == b"xxxx"
        await dev.flush()
        assert dev.size == MiB and not dev.readonly
        assert [op for op, *_ in mem.log] == ["write_fua", "read", "flush"]  # FUA kept
        assert dev.throttled == {"read": 0, "write": 0}

    asyncio.run(main())


def test_new_limits_apply_to_waiting_requests_at_once() -> None:
    async def main() -> None:
        dev = QosDevice(MemDevice(MiB), QosLimits(read_iops=1, burst_seconds=0))
        await dev.read(0, 512)  # leaves the bucket a second in debt
        waiting = asyncio.create_task(dev.read(0, 512))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        t0 = time.monotonic()
        dev.set_limits(QosLimits(read_iops=10000))
        await waiting
        assert time.monotonic() - t0 < 0.2

    asyncio.run(main())


def test_reads_waiting_do_not_hold_up_writes() -> None:
    async def main() -> None:
        dev = QosDevice(MemDevice(MiB), QosLimits(read_iops=2, burst_seconds=0))
        reads = [asyncio.create_task(dev.read(0, 512)) for _ in range(3)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await asyncio.gather(*(dev.write(0, b"y" * 512) for _ in range(20)))
        assert time.monotonic() - t0 < 0.2
        dev.set_limits(QosLimits())
        await asyncio.gather(*reads)

    asyncio.run(main())
