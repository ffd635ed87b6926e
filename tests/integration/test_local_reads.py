"""A target reads a replica on its host from the replica's head file itself (SHARE's offer
in replica/protocol.py), only while the replica's page says that file alone answers reads
as the replica would: never after a snapshot (the old head is a snapshot layer then), nor
while a fault is armed on the replica; everything else goes through the replica."""

from __future__ import annotations

import os
import re
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbd
import pytest

from tests.integration.test_replica_shm import SHM, sealed_memfd, unix
from tests.procs import HOST, Cluster, http_json

BLOCK = 4096
KiB = 1024


pytestmark = pytest.mark.usefixtures("native_only")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, replicas=1, sockets=frozenset({0}), replica_args=("--debug-api",))
    try:
        c.start()
        c.wait_modes(["RW"])
        yield c
    finally:
        c.stop()


def local_reads(c: Cluster) -> int:
    return int(c.status()["engine_counters"]["members"]["local_reads"])


def replica_reads(c: Cluster) -> int:
    text = httpx.get(f"http://{HOST}:{c.replica_ports[0][1]}/metrics", timeout=10).text
    m = re.search(r'^tandem_replica_ops_total\{op="read",volume="vol"\} (\S+)$', text, re.M)
    assert m, text[-2000:]
    return int(float(m.group(1)))


def test_share_offers_the_head_file_and_a_sealed_page(cluster: Cluster) -> None:
    r = unix(cluster)
    shm = sealed_memfd(SHM)
    resp = r.share(shm)
    os.close(shm)
    assert resp.status == 0 and len(resp.payload) == 16
    head, page, gen, _ = struct.unpack("<4I", resp.payload)
    pid = struct.unpack("3i", r.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    assert os.readlink(f"/proc/{pid}/fd/{head}").endswith("layer-000001.img")
    assert os.readlink(f"/proc/{pid}/fd/{page}").startswith("/memfd:")
    fd = os.open(f"/proc/{pid}/fd/{page}", os.O_RDONLY)
    try:
        assert stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size == 4096
        words = struct.unpack("<2I", os.pread(fd, 8, 0))
        assert words == (gen, 1)  # the generation offered; readable (one layer, no fault)
    finally:
        os.close(fd)
    r.sock.close()


def test_reads_come_from_the_file_and_stop_at_a_snapshot(cluster: Cluster) -> None:
    h = nbd.NBD()
    h.connect_uri(cluster.uri)
    try:
        model = bytearray(os.urandom(256 * KiB))
        h.pwrite(bytes(model), 0)
        h.trim(16 * KiB, 16 * KiB)
        model[16 * KiB : 32 * KiB] = bytes(16 * KiB)
        h.zero(4 * KiB, 100 * KiB)
        model[100 * KiB : 104 * KiB] = bytes(4 * KiB)
        local0, remote0 = local_reads(cluster), replica_reads(cluster)
        for off in range(0, 256 * KiB, 8 * KiB):
            assert h.pread(8 * KiB, off) == model[off : off + 8 * KiB], off
        assert local_reads(cluster) - local0 == 32
        assert replica_reads(cluster) == remote0  # none reached the replica
        # A large read goes to the replica (its thread copies beside ours).
        assert h.pread(256 * KiB, 0) == model
        assert replica_reads(cluster) == remote0 + 1

        # A snapshot makes the head file a snapshot layer: the next writes go to a new head
        # the target has no fd of. Reading the old file now would return the old data.
        http_json(f"{cluster.api}/v1/volume/snapshots", "POST", {"name": "s1"})
        new = os.urandom(8 * KiB)
        h.pwrite(new, 8 * KiB)
        model[8 * KiB : 16 * KiB] = new
        local1, remote1 = local_reads(cluster), replica_reads(cluster)
        for off in range(0, 64 * KiB, 8 * KiB):
            assert h.pread(8 * KiB, off) == model[off : off + 8 * KiB], off
        assert local_reads(cluster) == local1
        assert replica_reads(cluster) == remote1 + 8
    finally:
        h.shutdown()


def fault(c: Cluster, name: str, action: str, arg: float = 0.0, count: int | None = None) -> None:
    body = {"name": name, "action": action, "arg": arg, "count": count}
    http_json(f"http://{HOST}:{c.replica_ports[0][1]}/v1/debug/faults", "PUT", body)


def test_an_armed_fault_sends_reads_through_the_replica(cluster: Cluster) -> None:
    h = nbd.NBD()
    h.connect_uri(cluster.uri)
    try:
        data = os.urandom(BLOCK)
        h.pwrite(data, 0)
        assert h.pread(BLOCK, 0) == data
        local0 = local_reads(cluster)
        fault(cluster, "replica.read", "delay", 0.5, count=1)
        t0 = time.monotonic()
        assert h.pread(BLOCK, 0) == data
        assert time.monotonic() - t0 >= 0.45  # the replica held it: the fault took effect
        assert local_reads(cluster) == local0
        assert http_json(f"http://{HOST}:{cluster.replica_ports[0][1]}/v1/debug/faults") == {}
        # Used up: the file is readable here again.
        assert h.pread(BLOCK, 0) == data
        assert local_reads(cluster) == local0 + 1
    finally:
        h.shutdown()


def test_reads_go_on_locally_from_the_other_replica_and_from_a_rebuilt_one(
    tmp_path: Path,
) -> None:
    # Replica 2 over TCP: no local reads from it, and the write quorum of 2 with one lost.
    c = Cluster(tmp_path, replicas=3, sockets=frozenset({0, 1}))
    try:
        c.start()
        c.wait_modes(["RW", "RW", "RW"])
        h = nbd.NBD()
        h.connect_uri(c.uri)
        try:
            data = os.urandom(64 * KiB)
            h.pwrite(data, 0)
            c.replicas[0].kill9()
            for _ in range(20):
                assert h.pread(64 * KiB, 0) == data
            c.wait_modes(["ERR", "RW", "RW"])
            local0 = local_reads(c)
            assert h.pread(64 * KiB, 0) == data
            assert local_reads(c) == local0 + 1  # from replica 1's file
            # Replica 0 comes back and is rebuilt (paused for it, its head file the same):
            # with replica 1 gone, its file serves the reads.
            more = os.urandom(64 * KiB)
            h.pwrite(more, 64 * KiB)
            c.start_replica(0)
            c.wait_modes(["RW", "RW", "RW"])
            c.replicas[1].kill9()
            h.pwrite(more, 64 * KiB)  # the target notices replica 1 gone
            c.wait_modes(["RW", "ERR", "RW"])
            local1 = local_reads(c)
            for off in (0, 64 * KiB):
                assert h.pread(64 * KiB, off) == (data if off == 0 else more)
            assert local_reads(c) == local1 + 2
        finally:
            h.shutdown()
    finally:
        c.stop()
