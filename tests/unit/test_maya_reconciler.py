"""The apiserver's control loop against stand-in agents and a stand-in target API.

Agents are simulated by node reports; the target by an object that answers like
target/api.py. The real thing (processes, namespaces) is tests/integration/test_maya_nodes.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fastapi import HTTPException

from maya.apiserver import nodes, volumes
from maya.apiserver.cluster import Cluster
from maya.apiserver.models import NodeReport, VolumeCreate
from maya.apiserver.reconciler import Reconciler
from maya.apiserver.settings import Settings

G = 1 << 30


class FakeResponse:
    def __init__(self, status: int, body: Any = None) -> None:
        self.status_code, self._body = status, body or {}
        self.content = b"x"

    def json(self) -> Any:
        return self._body


class FakeTarget:
    """Replica membership like the real target: members by address and mode."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name
        self.members = {a: "RW" for a in addresses}
        self.calls: list[tuple[str, str]] = []
        self.qos: dict[str, Any] = {}
        self.answers: dict[tuple[str, str], FakeResponse] = {}
        self.starting = False

    async def status(self, api: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "starting": self.starting,
            "readonly": sum(m == "RW" for m in self.members.values()) < 2,
            "quorum": 2,
            "replicas": [{"address": a, "mode": m} for a, m in self.members.items()],
            "qos": self.qos,
            "rebuild_rate": 0,
        }

    async def counters(self, api: str) -> dict[str, float]:
        return {"read_ops": time.monotonic() * 100}

    async def add_replica(self, api: str, address: str) -> FakeResponse:
        self.calls.append(("add", address))
        self.members[address] = "WO"
        return FakeResponse(202)

    async def remove_replica(self, api: str, address: str) -> FakeResponse:
        self.calls.append(("remove", address))
        del self.members[address]
        return FakeResponse(200)

    async def request(
        self, api: str, method: str, path: str, body: Any = None, timeout: Any = None
    ) -> FakeResponse:
        self.calls.append((method, path))
        if path == "/v1/volume/qos":
            self.qos = body
        return self.answers.get((method, path), FakeResponse(200, {}))

    async def close(self) -> None:
        pass


def report(cluster: Cluster, node: str, running: dict[str, dict[str, str]], rev: int) -> None:
    doc = NodeReport(
        address=node,
        pools=[{"name": "p", "path": "/p", "capacity": 100 * G}],  # type: ignore[list-item]
        processes=[
            {
                "id": pid,
                "volume": "v",
                "role": "target" if pid.startswith("t-") else "replica",
                "state": "running",
                "addresses": addrs,
            }  # type: ignore[misc]
            for pid, addrs in running.items()
        ],
        applied_revision=rev,
    )
    asyncio.get_event_loop().run_until_complete(nodes.put_report(cluster, node, doc))


def report_all(cluster: Cluster, skip: tuple[str, ...] = ()) -> None:
    """Each node reports its processes of volume v: replicas at NODE:1, targets at NODE:9."""
    by_node: dict[str, dict[str, dict[str, str]]] = {}
    for p in cluster.store.procs(volume="v", state="active"):
        kind = {"data": f"{p.node}:1"} if p.role == "replica" else {"api": f"{p.node}:9"}
        by_node.setdefault(p.node, {})[p.id] = kind
    for node, procs in by_node.items():
        if node not in skip:
            report(cluster, node, procs, cluster.store.revision)


def test_lost_node_replica_is_replaced_and_rebuilt_through_the_target() -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    cluster = Cluster(Settings(db=":memory:", token="t", node_timeout=1, replace_after=2))
    run = loop.run_until_complete
    for n in ("n1", "n2", "n3", "n4"):
        report(cluster, n, {}, 0)
    # Three nodes with room for the volume, the fourth only after it is "replaced".
    cluster.node_seen["n4"] = -1e9
    run(volumes.create(cluster, VolumeCreate(name="v", size="1G")))
    report_all(cluster)
    rev = cluster.store.revision
    fake = FakeTarget("v", ["n1:1", "n2:1", "n3:1"])
    cluster.targets = fake  # type: ignore[assignment]
    rec = Reconciler(cluster)
    run(rec.once())
    view = volumes.view(cluster, cluster.store.volume("v"))  # type: ignore[arg-type]
    assert view["phase"] == "Healthy"

    # The node without the target goes silent: Degraded at once, replaced after a while.
    target_node = view["target"]["node"]
    lost = next(n for n in ("n1", "n2", "n3") if n != target_node)
    report(cluster, "n4", {}, rev)
    cluster.node_seen[lost] = time.monotonic() - 1.5
    run(rec.once())
    view = volumes.view(cluster, cluster.store.volume("v"))  # type: ignore[arg-type]
    assert view["phase"] == "Degraded" and lost in view["message"]
    assert not any(c[0] == "remove" for c in fake.calls)
    fake.members[f"{lost}:1"] = "ERR"
    cluster.node_seen[lost] = time.monotonic() - 3
    run(rec.once())
    view = volumes.view(cluster, cluster.store.volume("v"))  # type: ignore[arg-type]
    placed = {r["node"]: r["state"] for r in view["replicas"]}
    # The lost node's process is forgotten (its agent removes it when it returns).
    assert lost not in placed and placed["n4"] == "Scheduled"
    assert ("remove", f"{lost}:1") in fake.calls  # the ERR member, no longer placed
    assert "ReplicaReplaced" in [e["type"] for e in view["events"]]
    # A target that still counts the replaced replica RW (its deadline not yet passed) has
    # three RW members, but only two placed ones: not Healthy.
    fake.members[f"{lost}:1"] = "RW"
    run(rec.once())
    view = volumes.view(cluster, cluster.store.volume("v"))  # type: ignore[arg-type]
    assert view["phase"] == "Degraded", view
    assert f"replaced, still in the target: {lost}:1" in view["message"]
    fake.members[f"{lost}:1"] = "ERR"
    run(rec.once())
    assert f"{lost}:1" not in fake.members

    # The new replica starts and reports its address: the target is told to add it.
    new = next(r["id"] for r in view["replicas"] if r["node"] == "n4")
    report(cluster, "n4", {new: {"data": "n4:1"}}, cluster.store.revision)
    run(rec.once())
    assert ("add", "n4:1") in fake.calls
    run(rec.once())  # the next look at the target sees it rebuilding
    assert volumes.phase(cluster, cluster.store.volume("v")).phase == "Rebuilding"  # type: ignore[arg-type]
    fake.members["n4:1"] = "RW"
    run(rec.once())
    view = volumes.view(cluster, cluster.store.volume("v"))  # type: ignore[arg-type]
    assert view["phase"] == "Healthy"
    loop.run_until_complete(cluster.close())
    loop.close()


def test_replacement_waits_while_the_volume_is_not_writable() -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    cluster = Cluster(Settings(db=":memory:", token="t", node_timeout=1, replace_after=1))
    for n in ("n1", "n2", "n3", "n4"):
        report(cluster, n, {}, 0)
    loop.run_until_complete(
        volumes.create(cluster, VolumeCreate(name="v", size="1G", replica_count=3))
    )
    report_all(cluster)
    nodes_ = [p.node for p in cluster.store.procs(volume="v", role="replica")]
    fake = FakeTarget("v", [f"{n}:1" for n in nodes_])
    for n in nodes_[1:]:
        fake.members[f"{n}:1"] = "ERR"  # below quorum
    cluster.targets = fake  # type: ignore[assignment]
    lost = nodes_[1]
    cluster.node_seen[lost] = time.monotonic() - 10
    loop.run_until_complete(Reconciler(cluster).once())
    view = volumes.view(cluster, cluster.store.volume("v"))  # type: ignore[arg-type]
    assert view["phase"] == "ReadOnly"
    assert "ReplaceWaiting" in [e["type"] for e in view["events"]]
    assert lost in [r["node"] for r in view["replicas"]]
    assert not [c for c in fake.calls if c[0] in ("add", "remove")]
    loop.run_until_complete(cluster.close())
    loop.close()


def test_a_target_still_selecting_its_replicas_is_pending_not_readonly() -> None:
    # Its API answers while it selects; every member is ERR until then. `volume create
    # --wait` must not return that as ReadOnly.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    cluster = Cluster(Settings(db=":memory:", token="t"))
    for n in ("n1", "n2", "n3"):
        report(cluster, n, {}, 0)
    loop.run_until_complete(
        volumes.create(cluster, VolumeCreate(name="v", size="1G", replica_count=3))
    )
    report_all(cluster)
    nodes_ = [p.node for p in cluster.store.procs(volume="v", role="replica")]
    fake = FakeTarget("v", [f"{n}:1" for n in nodes_])
    fake.members = dict.fromkeys(fake.members, "ERR")
    fake.starting = True
    cluster.targets = fake  # type: ignore[assignment]
    loop.run_until_complete(Reconciler(cluster).once())
    view = volumes.view(cluster, cluster.store.volume("v"))  # type: ignore[arg-type]
    assert view["phase"] == "Pending" and "selecting" in view["message"]
    fake.starting = False  # selected, but below quorum: now it is ReadOnly
    loop.run_until_complete(Reconciler(cluster).once())
    view = volumes.view(cluster, cluster.store.volume("v"))  # type: ignore[arg-type]
    assert view["phase"] == "ReadOnly"
    loop.run_until_complete(cluster.close())
    loop.close()


def test_qos_missing_on_the_target_is_reapplied() -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    cluster = Cluster(Settings(db=":memory:", token="t"))
    for n in ("n1", "n2", "n3"):
        report(cluster, n, {}, 0)
    body = VolumeCreate(name="v", size="1G", qos={"total_iops": 700})  # type: ignore[arg-type]
    loop.run_until_complete(volumes.create(cluster, body))
    report_all(cluster)
    fake = FakeTarget("v", ["n1:1", "n2:1", "n3:1"])
    cluster.targets = fake  # type: ignore[assignment]
    loop.run_until_complete(Reconciler(cluster).once())
    assert fake.qos["total_iops"] == 700
    loop.run_until_complete(cluster.close())
    loop.close()


def running_volume() -> tuple[asyncio.AbstractEventLoop, Cluster, FakeTarget]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    cluster = Cluster(Settings(db=":memory:", token="t"))
    for n in ("n1", "n2", "n3"):
        report(cluster, n, {}, 0)
    loop.run_until_complete(volumes.create(cluster, VolumeCreate(name="v", size="1G")))
    report_all(cluster)
    fake = FakeTarget("v", ["n1:1", "n2:1", "n3:1"])
    cluster.targets = fake  # type: ignore[assignment]
    loop.run_until_complete(Reconciler(cluster).once())
    return loop, cluster, fake


@pytest.mark.parametrize(
    "answer,status,message",
    [
        (FakeResponse(404, {"detail": "Not Found"}), 501, "does not support online resize yet"),
        (FakeResponse(501, {"detail": "later"}), 501, "does not support online resize yet"),
        (FakeResponse(400, {"detail": "too big"}), 409, "target refused the resize: too big"),
        (FakeResponse(500, {"detail": "boom"}), 409, "target refused the resize: boom"),
    ],
)
def test_resize_answers_of_the_target(answer: FakeResponse, status: int, message: str) -> None:
    loop, cluster, fake = running_volume()
    fake.answers[("POST", "/v1/volume/resize")] = answer
    with pytest.raises(HTTPException) as e:
        loop.run_until_complete(volumes.resize(cluster, "v", 2 * G))
    assert e.value.status_code == status and message in e.value.detail
    assert cluster.store.volume("v").size == G  # type: ignore[union-attr]
    loop.run_until_complete(cluster.close())
    loop.close()


def test_resize_records_the_size_the_target_took() -> None:
    loop, cluster, fake = running_volume()
    rev = cluster.store.revision
    view = loop.run_until_complete(volumes.resize(cluster, "v", 2 * G))
    assert view["size"] == 2 * G and cluster.store.revision == rev + 1
    assert ("POST", "/v1/volume/resize") in fake.calls
    with pytest.raises(HTTPException, match="capacity"):
        loop.run_until_complete(volumes.resize(cluster, "v", 200 * G))
    loop.run_until_complete(cluster.close())
    loop.close()


@pytest.mark.parametrize(
    "answer,status,detail",
    [
        (FakeResponse(200, {"snapshots": []}), None, None),
        (FakeResponse(404, {"detail": "Not Found"}), 501, "does not support snapshots yet"),
        (FakeResponse(501, {"detail": "not yet"}), 501, "not yet"),
        (FakeResponse(404, {"detail": "no snapshot 's1'"}), 404, "no snapshot 's1'"),
        (FakeResponse(409, {"detail": "exists"}), 409, "exists"),
    ],
)
def test_snapshot_answers_of_the_target(
    answer: FakeResponse, status: int | None, detail: str | None
) -> None:
    loop, cluster, fake = running_volume()
    for key in (("GET", "/v1/volume/snapshots"), ("DELETE", "/v1/volume/snapshots/s1")):
        fake.answers[key] = answer
        call = volumes.snapshot_call(
            cluster, "v", key[0], key[1].removeprefix("/v1/volume/snapshots")
        )
        if status is None:
            assert loop.run_until_complete(call) == answer.json()
            continue
        with pytest.raises(HTTPException) as e:
            loop.run_until_complete(call)
        assert e.value.status_code == status and detail in e.value.detail
    loop.run_until_complete(cluster.close())
    loop.close()
