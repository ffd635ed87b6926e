"""A replica on the target's host reached through its unix socket (replica/transport.py):
used by itself when the replica serves one, the same volume behaviour as over TCP (I/O,
a replica killed and rebuilt), TCP again when the socket does not answer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from replica.client import ReplicaClient
from tests.procs import HOST, ROOT, Cluster

MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, sockets=frozenset({0, 1}))
    try:
        yield c.start()
    finally:
        c.stop()


def transports(c: Cluster) -> list[str]:
    by_addr = {r["address"]: r["transport"] for r in c.status()["replicas"]}
    return [by_addr[a] for a in c.replica_addresses]


async def checksums(address: str, size: int) -> list[int]:
    client = ReplicaClient(address)
    await client.connect()
    try:
        return [await client.checksum(off, 16 * MiB) for off in range(0, size, 16 * MiB)]
    finally:
        client.close()


def write_read(uri: str, seed: int) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        data = {off: os.urandom(64 << 10) for off in range(seed * MiB, (seed + 4) * MiB, MiB)}
        for off, d in data.items():
            h.pwrite(d, off)
        h.flush()
        for off, d in data.items():
            assert h.pread(len(d), off) == d
    finally:
        h.shutdown()


def shared(c: Cluster) -> list[bool | None]:
    by_addr = {r["address"]: r.get("shared_memory") for r in c.status()["replicas"]}
    return [by_addr[a] for a in c.replica_addresses]


def test_local_replicas_go_through_their_sockets(cluster: Cluster) -> None:
    c = cluster
    c.wait_modes(["RW", "RW", "RW"])
    assert transports(c) == ["unix", "unix", "tcp"]
    # A native target shares its payload memory with the native replicas on its socket (the
    # Python engines do not: data goes through the socket).
    native = c.status()["engine"] == "native"
    assert shared(c) == ([True, True, False] if native else [None, None, None])
    out = subprocess.run(
        [sys.executable, "-m", "maya", "target", "status", "--api", c.api],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    rows = [next(ln for ln in out.splitlines() if a in ln) for a in c.replica_addresses]
    assert ["shared memory" in row for row in rows] == [native, native, False], out
    write_read(c.uri, 1)
    if native:
        assert c.status()["engine_counters"]["members"]["shared"] > 0
    # Replica 0 killed: dropped, restarted, rebuilt over its socket again, data intact.
    c.replicas[0].kill9()
    c.wait_modes(["ERR", "RW", "RW"])
    write_read(c.uri, 10)
    c.start_replica(0)
    c.wait_modes(["RW", "RW", "RW"])
    assert transports(c) == ["unix", "unix", "tcp"]
    # Every replica holds the same bytes (checksums asked of each replica directly).
    sums = [asyncio.run(checksums(f"{HOST}:{d}", c.size)) for d, _ in c.replica_ports]
    assert sums[0] == sums[1] == sums[2]
    assert c.target is not None
    c.target.stop()
    # A socket that no longer answers: the target falls back to TCP by itself.
    os.unlink(c.socket_path(1))
    c.start_target()
    c.wait_modes(["RW", "RW", "RW"])
    assert transports(c) == ["unix", "tcp", "tcp"]
    write_read(c.uri, 20)
    # A clean stop removes the socket file.
    c.replicas[0].stop()
    assert not c.socket_path(0).exists()


def serve_on(tmp_path: Path, name: str, socket_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maya", "replica", "serve", "--dir", str(tmp_path / name),
         "--size", "16M", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0",
         "--socket", str(socket_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_socket_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.sock"
    path.write_text("not a socket")
    r = serve_on(tmp_path, "r", path)
    assert r.returncode != 0
    assert "exists and is not a socket" in r.stderr
    assert path.read_text() == "not a socket"


def test_a_live_socket_is_not_taken_over_a_stale_one_is(cluster: Cluster) -> None:
    """A second replica given the socket of a running one refuses to start (it would cut
    the first off from its target); the socket a killed replica left is replaced."""
    c = cluster
    c.wait_modes(["RW", "RW", "RW"])
    r = serve_on(c.base, "intruder", c.socket_path(0))
    assert r.returncode != 0 and "is in use by another process" in r.stderr
    assert transports(c)[0] == "unix"
    write_read(c.uri, 2)  # replica 0 still serves through it
    c.replicas[1].kill9()
    assert c.socket_path(1).is_socket()  # left behind
    c.start_replica(1)
    c.wait_modes(["RW", "RW", "RW"])
    assert transports(c) == ["unix", "unix", "tcp"]


def test_a_socket_answered_by_another_replica_is_not_used(tmp_path: Path) -> None:
    """Replica 0's socket file is replaced by replica 1's (renamed over it): replica 0 still
    names that path, but the replica answering there is not replica 0, so the target keeps to
    TCP for it, and each replica gets its own writes, nobody else's."""
    c = Cluster(tmp_path, sockets=frozenset({0, 1}))
    try:
        for i in range(3):
            c.start_replica(i)
        os.rename(c.socket_path(1), c.socket_path(0))
        c.start_target()
        c.wait_modes(["RW", "RW", "RW"])
        assert transports(c) == ["tcp", "tcp", "tcp"]  # 1's own path is gone: TCP too
        assert c.target is not None
        assert "another replica answers at" in c.target.output()
        write_read(c.uri, 3)
        sums = [asyncio.run(checksums(f"{HOST}:{d}", c.size)) for d, _ in c.replica_ports]
        assert sums[0] == sums[1] == sums[2]
        assert sums[0][0] != sums[0][1]  # the writes are in the first 16 MiB, the next is zeros
    finally:
        c.stop()
