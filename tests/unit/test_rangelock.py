"""Range locks: copies wait for overlapping writes in flight and hold new ones back."""

from __future__ import annotations

import asyncio

from target.rangelock import RangeLock


def test_exclusive_waits_for_overlapping_writes_and_blocks_new_ones() -> None:
    async def scenario() -> list[str]:
        lock, log = RangeLock(), []
        release_write = asyncio.Event()

        async def write(name: str, a: int, b: int, hold: asyncio.Event | None = None) -> None:
            async with lock.shared(a, b):
                log.append(f"{name} in")
                if hold is not None:
                    await hold.wait()
            log.append(f"{name} out")

        async def copy() -> None:
            async with lock.exclusive_many([(0, 10), (100, 110)]):
                log.append("copy in")
                await asyncio.sleep(0.01)
            log.append("copy out")

        w1 = asyncio.create_task(write("w1", 5, 6, release_write))
        await asyncio.sleep(0)
        c = asyncio.create_task(copy())
        await asyncio.sleep(0.01)
        assert "copy in" not in log  # waits for w1, which overlaps
        w2 = asyncio.create_task(write("w2", 105, 106))  # overlaps the copy: held back
        w3 = asyncio.create_task(write("w3", 50, 60))  # between the ranges: goes on
        await asyncio.sleep(0.01)
        assert "w3 out" in log and "w2 in" not in log
        release_write.set()
        await asyncio.gather(w1, c, w2, w3)
        return log

    log = asyncio.run(scenario())
    assert log.index("w1 out") < log.index("copy in") < log.index("copy out") < log.index("w2 in")


def test_disjoint_exclusive_batches_run_together_overlapping_ones_queue() -> None:
    async def scenario() -> list[str]:
        lock, log = RangeLock(), []

        async def copy(name: str, ranges: list[tuple[int, int]]) -> None:
            async with lock.exclusive_many(ranges):
                log.append(f"{name} in")
                await asyncio.sleep(0.01)
                log.append(f"{name} out")

        await asyncio.gather(
            copy("a", [(0, 10), (20, 30)]), copy("b", [(10, 20)]), copy("c", [(25, 26)])
        )
        return log

    log = asyncio.run(scenario())
    assert log.index("b in") < log.index("a out")  # disjoint: concurrent
    assert log.index("a out") < log.index("c in")  # overlaps a: after it
