"""A replica whose disk hangs (tests/stalldisk.py: reads and writes that reach it wait in the
kernel until resumed), while the target reads that replica's file itself (local reads, native
engine). The volume goes on from the other replicas within the replica deadline, the stuck
replica comes back once its disk does, and the target still stops promptly and cleanly."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.procs import Cluster
from tests.stalldisk import StallDisk, missing

KiB = 1024
TIMEOUT = 2.0
WHY_NOT = missing()

pytestmark = [
    pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT)),
    pytest.mark.usefixtures("native_only"),
]


@pytest.fixture
def stuck(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, StallDisk]]:
    """Replica 0 on a disk that can hang; 0 and 1 on this host's unix sockets (their files
    are read by the target), a third (if any) over TCP."""
    replicas = getattr(request, "param", 3)
    with contextlib.ExitStack() as undo:  # each step runs even when one before it fails
        disk = StallDisk(tmp_path / "disk", tmp_path / "r0", 256 << 20)
        undo.callback(disk.close)
        disk.start()
        c = Cluster(tmp_path, replicas=replicas, sockets=frozenset({0, 1}), timeout=TIMEOUT)
        undo.callback(c.stop)
        undo.callback(lambda: disk.paused and disk.resume())  # else replica 0 cannot exit
        c.start()
        c.wait_modes(["RW"] * replicas)
        yield c, disk


def local_reads(c: Cluster) -> int:
    return int(c.status()["engine_counters"]["members"]["local_reads"])


def hang(c: Cluster, disk: StallDisk) -> None:
    """Replica 0's head file out of the page cache, then its disk stuck."""
    (head,) = (c.base / "r0").glob("layer-*.img")
    disk.drop_cache(head)
    disk.pause()


def test_reads_and_writes_go_on_past_a_stuck_disk_and_it_comes_back(
    stuck: tuple[Cluster, StallDisk],
) -> None:
    """Three replicas, a write quorum of two: replica 0 can be dropped."""
    c, disk = stuck
    h = nbd.NBD()
    h.connect_uri(c.uri)
    try:
        model = bytearray(os.urandom(1 << 20))
        h.pwrite(bytes(model), 0)
        h.flush()
        local0 = local_reads(c)
        assert h.pread(8 * KiB, 0) == model[: 8 * KiB]
        assert local_reads(c) == local0 + 1  # from replica 0's file, here

        hang(c, disk)
        t0 = time.monotonic()
        assert h.pread(8 * KiB, 64 * KiB) == model[64 * KiB : 72 * KiB]
        took = time.monotonic() - t0
        # It waited for the stuck read of the file here until the deadline, then asked a
        # replica (replica 0 itself first, perhaps: then its deadline passes too).
        assert TIMEOUT * 0.9 <= took < 2 * TIMEOUT + 1.5, took
        local1 = local_reads(c)
        t0 = time.monotonic()
        for off in range(128 * KiB, 1 << 20, 32 * KiB):
            assert h.pread(8 * KiB, off) == model[off : off + 8 * KiB], off
        assert time.monotonic() - t0 < 1.5  # no deadline more
        assert local_reads(c) == local1 + 28  # from replica 1's file now, not replica 0's

        # Writes: replica 0 takes them into its page cache, but its flush hangs: dropped.
        new = os.urandom(64 * KiB)
        h.pwrite(new, 0)
        model[: 64 * KiB] = new
        h.flush()
        c.wait_modes(["ERR", "RW", "RW"], timeout=3 * TIMEOUT)
        assert h.pread(64 * KiB, 0) == new

        # The disk comes back: so does replica 0, rebuilt, and its file serves reads again.
        disk.resume()
        c.wait_modes(["RW", "RW", "RW"], timeout=60)
        c.replicas[1].kill9()
        h.pwrite(new, 64 * KiB)  # the target notices replica 1 gone
        model[64 * KiB : 128 * KiB] = new
        c.wait_modes(["RW", "ERR", "RW"])
        local2 = local_reads(c)
        for off in range(0, 1 << 20, 64 * KiB):
            assert h.pread(64 * KiB, off) == model[off : off + 64 * KiB], off
        assert local_reads(c) == local2 + 16
    finally:
        h.shutdown()


@pytest.mark.parametrize("stuck", [2, 3], indirect=True, ids=["bare-quorum", "spare"])
def test_the_target_stops_promptly_with_a_read_stuck_on_the_disk(
    stuck: tuple[Cluster, StallDisk],
) -> None:
    """With two replicas both are needed for writes, so each has the long deadline (6x):
    the stop must not wait that long for replica 0's CLOSE either."""
    c, disk = stuck
    assert c.target is not None
    h = nbd.NBD()
    h.connect_uri(c.uri)
    data = os.urandom(64 * KiB)
    h.pwrite(data, 0)
    h.flush()
    hang(c, disk)
    got: list[object] = []

    def read() -> None:
        try:
            got.append(h.pread(8 * KiB, 32 * KiB))
        except nbd.Error as e:
            got.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        # The read is stuck in the kernel now. No read has gone to a replica's socket yet,
        # so its fallback asks replica 1 first (round robin from slot 0), not replica 0.
        time.sleep(0.3)
        t0 = time.monotonic()
        rc = c.target.stop(timeout=20)
        took = time.monotonic() - t0
    finally:
        reader.join(30)
    # The stop waits for the read (its deadline: then replica 1 answers it) and for replica
    # 0's CLOSE (one deadline), not for the read of the file here, which may never end.
    assert rc == 0 and took < 3 * TIMEOUT + 3, (rc, took, c.target.output()[-2000:])
    assert len(got) == 1
    assert isinstance(got[0], nbd.Error) or got[0] == data[32 * KiB : 40 * KiB]
