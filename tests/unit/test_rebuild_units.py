"""Pieces of the rebuild: window grouping, region maps, range merging, rate limiting, and
the puller's fallback for a source without READV."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from replica import protocol as p
from replica.client import ReplicaClient
from replica.server import ReplicaServer
from replica.store import ReplicaStore
from target.rebuild import Progress, RateLimiter, windows
from target.regions import RegionMap, merge_ranges

MiB = 1 << 20


def test_windows_group_pieces_by_aligned_window() -> None:
    got = list(windows([(100, 50), (MiB - 10, 20), (5 * MiB, 2 * MiB)], window=MiB))
    assert got == [
        (0, MiB, [(100, 150), (MiB - 10, MiB)]),
        (MiB, 2 * MiB, [(MiB, MiB + 10)]),
        (5 * MiB, 6 * MiB, [(5 * MiB, 6 * MiB)]),
        (6 * MiB, 7 * MiB, [(6 * MiB, 7 * MiB)]),
    ]


def test_region_map_marks_block_granular_ranges() -> None:
    m = RegionMap(64 * MiB)
    assert m.region == 4096
    m.mark(4097, 10)
    m.mark(8192, 4096)  # adjacent: merges
    m.mark(10 * MiB, 1)
    assert m.ranges() == [(4096, 8192), (10 * MiB, 4096)]
    big = RegionMap(1 << 46)
    assert big.count <= 1 << 22 and big.region * big.count >= 1 << 46


def test_merge_ranges() -> None:
    assert merge_ranges([(10, 5), (0, 10), (20, 0), (14, 4)]) == [(0, 18)]


def test_rate_limiter_holds_the_rate() -> None:
    async def run() -> float:
        lim = RateLimiter(4 * MiB)
        t0 = time.monotonic()
        for _ in range(12):
            await lim.take(MiB)  # 12 MiB at 4 MiB/s with 1 s of burst: about 2 s
        return time.monotonic() - t0

    elapsed = asyncio.run(run())
    assert 1.6 < elapsed < 3.0, elapsed


def test_progress_eta() -> None:
    p = Progress("full", total=100)
    p.started -= 10
    p.done = 50
    d = p.as_dict()
    assert d["percent"] == 50.0 and 9 < d["eta_seconds"] < 11


def test_batches_bound_bytes_and_windows() -> None:
    from target.rebuild import batches

    ws = list(windows([(i * MiB, 4096) for i in range(10)], window=MiB))
    got = list(batches(iter(ws), max_bytes=1 << 30, max_windows=4))
    assert [len(b) for b in got] == [4, 4, 2]
    big = list(windows([(0, 10 * MiB)], window=MiB))
    assert [len(b) for b in batches(iter(big), max_bytes=3 * MiB)] == [3, 3, 3, 1]


def test_a_source_without_readv_is_read_piece_by_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source of an older release answers READV "unknown op" (ENOTSUP): the puller reads
    its pieces one by one instead of failing the source (the target would drop it)."""
    validate = p.validate
    refused: list[int] = []

    def old_release(req: p.Request, size: int) -> tuple[int, str] | None:
        if req.op == p.Op.READV:
            refused.append(req.tag)
            return p.Status.ENOTSUP, f"unknown op {req.op}"
        return validate(req, size)

    monkeypatch.setattr(p, "validate", old_release)
    size = 8 << 20

    async def scenario() -> None:
        stores = [ReplicaStore.create(tmp_path / n, size, "v") for n in ("src", "dst")]
        servers = [ReplicaServer(s) for s in stores]
        for srv in servers:
            await srv.start("127.0.0.1", 0)
        try:
            src = f"127.0.0.1:{servers[0].port}"
            ranges = [(i * 12288, 4096) for i in range(300)]
            for i, (off, n) in enumerate(ranges):
                if i % 3:
                    stores[0].write(off, bytes([i % 251 + 1]) * n)
            c = ReplicaClient(f"127.0.0.1:{servers[1].port}")
            await c.connect()
            await c.open(1)
            for copy in range(2):
                stats = await c.copy_from(src, ranges)
                assert stats["pieces"] == len(ranges)
                assert stats["unmapped"] == 100 * 4096
                if copy == 0:
                    assert 1 <= len(refused) <= 3  # the groups already in flight
                    first = len(refused)
            assert len(refused) == first  # the second copy went one by one at once
            for off, n in ranges:
                assert stores[1].read(off, n) == stores[0].read(off, n)
            c.close()
        finally:
            for srv in servers:
                await srv.close()
            for st in stores:
                st.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_copy_that_does_not_read_back_as_the_source_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every piece is read back and compared with the source's data: a destination that
    stores something else (here: one byte flipped per write) fails the copy, whether the
    piece went alone (large) or in a READV group (small)."""
    from replica.rebuild import CopyMismatch, Puller

    size = 16 << 20

    async def scenario() -> None:
        src_store = ReplicaStore.create(tmp_path / "src", size, "v")
        dst_store = ReplicaStore.create(tmp_path / "dst", size, "v")
        server = ReplicaServer(src_store)
        await server.start("127.0.0.1", 0)
        src_store.write(0, b"\x11" * (size // 2))
        real = dst_store.write

        def lying_write(offset: int, data: bytes | bytearray | memoryview) -> None:
            bad = bytearray(data)
            bad[len(bad) // 2] ^= 0xFF
            real(offset, bad)

        monkeypatch.setattr(dst_store, "write", lying_write)
        puller = Puller(dst_store)
        try:
            address = f"127.0.0.1:{server.port}"
            for ranges in ([(0, 1 << 20)], [(i * 8192, 4096) for i in range(40)]):
                with pytest.raises(CopyMismatch):
                    await puller.copy(address, ranges)
            monkeypatch.setattr(dst_store, "write", real)
            stats = await puller.copy(address, [(0, 1 << 20)])  # an honest store copies
            assert stats["copied"] == 1 << 20
        finally:
            puller.close()
            await server.close()
            src_store.close()
            dst_store.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
