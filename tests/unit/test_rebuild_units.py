"""Pure pieces of the rebuild: window grouping, region maps, range merging, rate limiting."""

from __future__ import annotations

import asyncio
import time

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
