"""Crashes at every named step of a rebuild, of the target and of the rebuilding replica.
After restarting the crashed process: no acknowledged write is lost, the volume returns to
full redundancy by itself and the replicas hold identical data. A replica is current only
after its rebuild completed: before that its generation stays old."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.test_fault_matrix import replica_checksums
from tests.procs import HOST, Cluster, http_json
from tests.workload import VerifyingWriter

SIZE = 32 << 20
TARGET_POINTS = [
    "rebuild.after_wo",
    "rebuild.mid_copy",
    "rebuild.before_generation",
    "rebuild.after_generation",
]
REPLICA_POINTS = ["generation.before_persist", "generation.after_persist"]


def wait_exit(proc: Any, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while proc.alive():
        assert time.monotonic() < deadline, f"{proc.name} did not crash"
        time.sleep(0.05)
    return proc.proc.returncode


def missed_writes(c: Cluster, seed: int) -> VerifyingWriter:
    """Write, kill replica 0, write more (it misses those), flush."""
    w = VerifyingWriter(c.uri, SIZE, seed=seed).start()
    time.sleep(0.5)
    c.replicas[0].kill9()
    time.sleep(1.0)
    w.stop()
    assert w.errors == 0
    return w


def check_healed(c: Cluster, w: VerifyingWriter) -> None:
    c.wait_modes(["RW", "RW", "RW"], timeout=60)
    w.verify()
    sums = replica_checksums(c)
    assert sums[0] == sums[1] == sums[2], "replicas differ"


@pytest.mark.parametrize("point", TARGET_POINTS)
def test_target_crash_during_rebuild(make_cluster: Any, point: str) -> None:
    c: Cluster = make_cluster(size=SIZE, timeout=1.0, env={"TANDEM_CRASH_AT": point})
    c.start()
    w = missed_writes(c, seed=len(point))
    c.start_replica(0)  # it returns: the target rebuilds it and crashes at `point`
    assert c.target is not None
    assert wait_exit(c.target) == 137
    gens = [
        http_json(f"http://{HOST}:{api}/v1/replica")["generation"] for _, api in c.replica_ports
    ]
    if point == "rebuild.after_generation":
        assert gens[0] == gens[1] == gens[2]  # complete and recorded: current
    else:
        assert gens[0] < gens[1] == gens[2]  # incomplete: stays stale, never read from
    c.env = None  # the restarted target runs normally
    c.start_target()
    check_healed(c, w)


@pytest.mark.parametrize("point", REPLICA_POINTS)
def test_replica_crash_at_its_generation_update(make_cluster: Any, point: str) -> None:
    c: Cluster = make_cluster(size=SIZE, timeout=1.0).start()
    w = missed_writes(c, seed=len(point) + 7)
    c.env = {"TANDEM_CRASH_AT": point}
    c.start_replica(0)  # rebuilt, then dies while recording the current generation
    assert wait_exit(c.replicas[0]) == 137
    c.env = None
    c.start_replica(0)
    check_healed(c, w)
