"""An idle engine is not counted as waiting for IO. The kernel counts a thread sleeping on
its io_uring with a request pending as in iowait, and the engine always has one (a receive,
its command eventfd): before IORING_ENTER_NO_IOWAIT an idle volume kept the machine's IO
pressure near 100%, which monitoring reads as a stalled disk."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import native
from native import engine as ne
from perf.fio import Machine
from replica.client import ReplicaClient
from replica.native_server import NativeReplicaServer
from replica.store import ReplicaStore

pytestmark = [
    pytest.mark.skipif(native.engine_unavailable() is not None, reason="no native engine"),
    pytest.mark.skipif(
        not Path("/proc/pressure/io").exists(), reason="needs pressure stall information (PSI)"
    ),
]


def io_pressure(seconds: float) -> float:
    """The share of the next `seconds` in which some task here waited for IO (the
    benchmark's reading of /proc/pressure/io)."""
    before = Machine.now()
    time.sleep(seconds)
    return Machine.now().since(before)[0] / 100


def test_an_idle_engine_is_not_counted_as_waiting_for_io(tmp_path: Path) -> None:
    # PSI is machine-wide: another process busy with the disk, or idling on an io_uring
    # without the flag, would fail this with no engine bug. Then there is nothing to judge.
    baseline = io_pressure(1)
    if baseline > 0.2:
        pytest.skip(f"the machine is already {baseline:.0%} in IO pressure without the engine")

    async def main() -> float:
        store = ReplicaStore.create(tmp_path / "r", 16 << 20, "v")
        server = NativeReplicaServer(store)
        await server.start("127.0.0.1", 0)
        client = ReplicaClient(f"127.0.0.1:{server.port}", 10)
        try:
            await client.connect()  # a connection's receive is pending too
            await client.info()
            assert server._engine is not None
            if not server._engine.ring_features & ne.NO_IOWAIT_FEATURE:
                pytest.skip("the kernel cannot be told (IORING_ENTER_NO_IOWAIT: Linux 6.15)")
            await asyncio.sleep(0.2)
            # This thread sleeps (not iowait), the engine on its ring: counted as iowait,
            # that is about 100% of the time.
            return await asyncio.to_thread(io_pressure, 2)
        finally:
            client.close()
            await server.close()
            store.close(clean=True)

    share = asyncio.run(asyncio.wait_for(main(), 60))
    assert share < 0.5, f"IO pressure {share:.0%} while the engine sat idle"
