"""The native engines poll their rings for a while after each completion while requests
come one at a time (`--poll-us`, default 50), never under load and never with 0: seen in the
target's status and in both /metrics."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import nbd
import pytest

from native import engine_unavailable
from tests.procs import HOST, Cluster

pytestmark = pytest.mark.skipif(
    engine_unavailable() is not None, reason=f"native engine: {engine_unavailable()}"
)

BLOCK = 4096


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Cluster]]:
    clusters: list[Cluster] = []

    def make(env: dict[str, str]) -> Cluster:
        c = Cluster(tmp_path, replicas=1, sockets=frozenset({0}), env=env)
        clusters.append(c)
        c.start()
        c.wait_modes(["RW"])
        return c

    try:
        yield make
    finally:
        for c in clusters:
            c.stop()


def one_at_a_time(uri: str, n: int) -> None:
    """n writes and n reads, each waiting for the one before (queue depth 1)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        data = os.urandom(BLOCK)
        for i in range(n):
            h.pwrite(data, (i % 64) * BLOCK)
            assert h.pread(BLOCK, (i % 64) * BLOCK) == data
    finally:
        h.shutdown()


def thirty_two_at_a_time(uri: str, n: int) -> None:
    """n writes with 32 in flight all along (writes: a read the target serves from the
    replica's file itself, at once, and this client cannot keep 32 of those in flight)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        bufs = [nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK))) for _ in range(32)]
        issued = 0
        while issued < n or h.aio_in_flight():
            while issued < n and h.aio_in_flight() < 32:
                h.aio_pwrite(bufs[issued % 32], (issued % 1024) * BLOCK)
                issued += 1
            h.poll(-1)
    finally:
        h.shutdown()


def polls(metrics: str, family: str) -> dict[str, float]:
    found = {}
    for result in ("hit", "miss"):
        m = re.search(rf'^{family}_polls_total{{result="{result}",volume="vol"}} (\S+)$',
                      metrics, re.M)  # fmt: skip
        assert m, (family, metrics[-3000:])
        found[result] = float(m.group(1))
    m = re.search(rf'^{family}_poll_seconds_total{{volume="vol"}} (\S+)$', metrics, re.M)
    assert m, (family, metrics[-3000:])
    found["seconds"] = float(m.group(1))
    return found


def engine_polls(c: Cluster) -> tuple[dict[str, float], dict[str, float]]:
    """(target's, replica's) polls from /metrics; the target's status agrees."""
    target = polls(httpx.get(f"{c.api}/metrics", timeout=10).text, "tandem_engine")
    replica_api = f"http://{HOST}:{c.replica_ports[0][1]}/metrics"
    replica = polls(httpx.get(replica_api, timeout=10).text, "tandem_replica_engine")
    status = c.status()["engine_counters"]["poll"]
    assert status["hits"] >= target["hit"] and status["misses"] >= target["miss"], status
    return target, replica


def test_engines_poll_at_queue_depth_1_and_not_under_load(
    start: Callable[[dict[str, str]], Cluster],
) -> None:
    c = start({"TANDEM_ENGINE": "native"})
    assert c.status()["engine"] == "native"
    t0, r0 = engine_polls(c)
    one_at_a_time(c.uri, 300)
    t1, r1 = engine_polls(c)
    # Each request: the target polls for its replica's answer and for the next request,
    # the replica for the next request; most polls find work within 50 us.
    assert t1["hit"] - t0["hit"] >= 100, (t0, t1)
    assert r1["hit"] - r0["hit"] >= 100, (r0, r1)
    assert t1["seconds"] > t0["seconds"] and r1["seconds"] > r0["seconds"]
    # Under load (32 in flight) the engines stop polling: the loop finds work without it,
    # and on a small machine polling would take the CPU the other side needs.
    thirty_two_at_a_time(c.uri, 4000)
    t2, r2 = engine_polls(c)
    target_polls = t2["hit"] + t2["miss"] - t1["hit"] - t1["miss"]
    replica_polls = r2["hit"] + r2["miss"] - r1["hit"] - r1["miss"]
    assert target_polls < 400 and replica_polls < 400, (t1, t2, r1, r2)


def test_poll_us_0_never_polls(start: Callable[[dict[str, str]], Cluster]) -> None:
    c = start({"TANDEM_ENGINE": "native", "TANDEM_POLL_US": "0"})
    one_at_a_time(c.uri, 100)
    target, replica = engine_polls(c)
    assert target == {"hit": 0, "miss": 0, "seconds": 0} == replica
