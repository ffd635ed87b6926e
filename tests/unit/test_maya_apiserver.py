"""The apiserver's REST API in-process: placement, bad input, auth, OpenEBS routes.

Nodes are registered through the API as an agent would; no agent runs, so volumes stay
Pending. Every refused request must leave nothing behind: no volume, no process, no
revision change (agents would otherwise be woken for nothing).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # starlette's note on its httpx-based TestClient
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from maya.apiserver.app import make_app
from maya.apiserver.settings import Settings
from maya.paths import load_or_create_token

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
G = 1 << 30


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = make_app(Settings(db=":memory:", token=TOKEN), run_reconciler=False)
    with TestClient(app) as c:
        yield c


def register(c: TestClient, name: str, capacity: int = 100 * G, **labels: str) -> None:
    report = {
        "address": f"10.0.0.{len(name)}",
        "labels": labels,
        "pools": [{"name": "p", "path": "/pool", "capacity": capacity}],
    }
    r = c.put(f"/v1/nodes/{name}", json=report, headers=AUTH)
    assert r.status_code == 200, r.text


def state(c: TestClient) -> tuple[Any, ...]:
    cluster = c.app.state.cluster  # type: ignore[attr-defined]
    return (
        [v.name for v in cluster.store.volumes()],
        [p.id for p in cluster.store.procs()],
        cluster.store.revision,
    )


def refused(c: TestClient, body: dict[str, Any], status: int, match: str) -> None:
    before = state(c)
    r = c.post("/v1/volumes", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert match in r.json()["detail"], r.json()["detail"]
    assert state(c) == before  # nothing half-created


@pytest.fixture
def three(client: TestClient) -> TestClient:
    for n in ("n1", "n2", "n3"):
        register(client, n)
    return client


def test_create_places_replicas_on_three_nodes_and_target_next_to_one(three: TestClient) -> None:
    r = three.post("/v1/volumes", json={"name": "v1", "size": "10G"}, headers=AUTH)
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["phase"] == "Pending" and v["size"] == 10 * G and v["replica_count"] == 3
    assert sorted(x["node"] for x in v["replicas"]) == ["n1", "n2", "n3"]
    assert v["target"]["node"] in ("n1", "n2", "n3")
    assert v["iqn"] == "iqn.2026-11.io.tandem:v1" and v["lun"] == 0
    assert [e["type"] for e in v["events"]] == ["Created"]
    assert three.get("/v1/volumes").json()[0]["name"] == "v1"
    nodes = {n["name"]: n for n in three.get("/v1/nodes").json()}
    assert all(n["pools"][0]["free"] == 90 * G for n in nodes.values())


@pytest.mark.parametrize(
    "size,match",
    [
        ("1x", "invalid size '1x'"),
        ("10 apples", "invalid size"),
        (0, "at least 1MiB"),
        (-4096, "at least 1MiB"),
        (4097 * 1024, "multiple of 4096"),
        ("2P", "at most 1PiB"),
        (True, "invalid size"),
    ],
)
def test_invalid_sizes(three: TestClient, size: Any, match: str) -> None:
    refused(three, {"name": "v", "size": size}, 422, match)


@pytest.mark.parametrize("name", ["Bad", "a_b", "-a", "a-", "a" * 64, "", "a.b", "ä"])
def test_invalid_names(three: TestClient, name: str) -> None:
    refused(three, {"name": name, "size": "1G"}, 422, "name")


def test_duplicate_volume(three: TestClient) -> None:
    assert three.post("/v1/volumes", json={"name": "v", "size": "1G"}, headers=AUTH).is_success
    refused(three, {"name": "v", "size": "2G"}, 409, "volume 'v' already exists")
    assert three.get("/v1/volumes/v").json()["size"] == G  # the first one is untouched


def test_unknown_node(three: TestClient) -> None:
    refused(three, {"name": "v", "size": "1G", "node": "n9"}, 422, "unknown node 'n9'")


def test_too_few_nodes(three: TestClient) -> None:
    refused(
        three,
        {"name": "v", "size": "1G", "replica_count": 4},
        409,
        "too few nodes: 4 replicas need 4 ready nodes with distinct hostnames, 3 available",
    )


def test_too_little_capacity(three: TestClient) -> None:
    refused(three, {"name": "v", "size": "200G"}, 409, "too little capacity: no pool has 200GiB")
    # Reserved space counts: two 60G volumes do not fit in 100G pools.
    assert three.post("/v1/volumes", json={"name": "a", "size": "60G"}, headers=AUTH).is_success
    refused(three, {"name": "b", "size": "60G"}, 409, "too little capacity")


def test_unready_nodes_do_not_count(three: TestClient) -> None:
    cluster = three.app.state.cluster  # type: ignore[attr-defined]
    cluster.node_seen["n3"] = -1e9  # silent since long ago
    refused(three, {"name": "v", "size": "1G"}, 409, "3 replicas need 3 ready nodes")
    refused(three, {"name": "v", "size": "1G", "replica_count": 1, "node": "n3"}, 409, "not ready")


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"replica_count": 0}, "replica_count"),
        ({"replica_count": 10}, "replica_count"),
        ({"frontends": []}, "frontends"),
        ({"frontends": ["nbd", "nbd"]}, "listed twice"),
        ({"frontends": ["fc"]}, "frontends"),
        ({"chap": {"user": "u", "secret": "short"}}, "secret"),
        ({"chap": {"user": "u", "secret": "x" * 12, "mutual_user": "t"}}, "go together"),
        ({"qos": {"total_iops": -1}}, "total_iops"),
        ({"qos": {"iops": 5}}, "iops"),
        ({"topology": {"bad key!": ["a"]}}, "topology key"),
        ({"topology": {"zone": []}}, "lists no values"),
        ({"ports": {"nbd": 70000}}, "ports.nbd"),
        ({"allowed_initiators": ["has space"]}, "initiator"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_other_bad_fields(three: TestClient, extra: dict[str, Any], match: str) -> None:
    refused(three, {"name": "v", "size": "1G", **extra}, 422, match)


def test_port_already_requested(three: TestClient) -> None:
    body = {"name": "a", "size": "1G", "ports": {"nbd": 10809}}
    assert three.post("/v1/volumes", json=body, headers=AUTH).is_success
    refused(three, {**body, "name": "b"}, 409, "nbd port 10809 is already requested by")


def test_mutating_calls_need_the_token(three: TestClient) -> None:
    before = state(three)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        r = three.post("/v1/volumes", json={"name": "v", "size": "1G"}, headers=headers)
        assert r.status_code in (401, 403)
        assert three.delete("/v1/volumes/v", headers=headers).status_code in (401, 403)
        assert three.put("/v1/nodes/x", json={"address": "a"}, headers=headers).status_code in (
            401,
            403,
        )
        assert three.get("/v1/nodes/n1/assignments", headers=headers).status_code in (401, 403)
    assert state(three) == before
    assert three.get("/v1/volumes").status_code == 200  # reads are open


def test_token_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "d" / "apiserver.token"
    token = load_or_create_token(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(token) >= 32 and load_or_create_token(path) == token


def test_chap_secret_never_shown_but_given_to_the_target_node(three: TestClient) -> None:
    chap = {
        "user": "alice",
        "secret": "s3cret-s3cret",
        "mutual_user": "tgt",
        "mutual_secret": "m" * 12,
    }
    r = three.post("/v1/volumes", json={"name": "v", "size": "1G", "chap": chap}, headers=AUTH)
    assert r.json()["chap"] == {"user": "alice", "mutual_user": "tgt"}
    assert "s3cret" not in three.get("/v1/volumes/v").text


def test_unknown_volume_and_node_are_404(three: TestClient) -> None:
    assert three.get("/v1/volumes/nope").status_code == 404
    assert three.delete("/v1/volumes/nope", headers=AUTH).status_code == 404
    assert three.get("/v1/nodes/nope").status_code == 404
    assert three.get("/v1/nodes/nope/assignments", headers=AUTH).status_code == 404
    r = three.post("/v1/volumes/nope/resize", json={"size": "2G"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["detail"] == "no volume 'nope'"


def test_operations_that_need_a_running_target_say_so(three: TestClient) -> None:
    three.post("/v1/volumes", json={"name": "v", "size": "1G"}, headers=AUTH)
    for method, path, body in (
        ("POST", "/v1/volumes/v/resize", {"size": "2G"}),
        ("GET", "/v1/volumes/v/snapshots", None),
        ("POST", "/v1/volumes/v/snapshots", {"name": "s1"}),
        ("DELETE", "/v1/volumes/v/snapshots/s1", None),
        ("POST", "/v1/volumes/v/snapshots/s1/revert", None),
    ):
        r = three.request(method, path, json=body, headers=AUTH)
        assert r.status_code == 409, (path, r.text)
        assert "no running target" in r.json()["detail"]
    r = three.post("/v1/volumes/v/resize", json={"size": "512M"}, headers=AUTH)
    assert r.status_code == 422 and "only growing" in r.json()["detail"]
    assert three.get("/v1/volumes/v").json()["size"] == G


def test_qos_is_recorded_and_given_to_the_target(three: TestClient) -> None:
    three.post("/v1/volumes", json={"name": "v", "size": "1G"}, headers=AUTH)
    r = three.put(
        "/v1/volumes/v/qos", json={"total_iops": 1000, "rebuild_bps": 1 << 20}, headers=AUTH
    )
    assert r.status_code == 200 and r.json()["applied"] is False  # no target yet
    assert three.get("/v1/volumes/v/qos").json()["total_iops"] == 1000
    assert three.put("/v1/volumes/v/qos", json={"total_iops": -5}, headers=AUTH).status_code == 422


def test_assignments_give_each_agent_its_processes(three: TestClient) -> None:
    three.post("/v1/volumes", json={"name": "v", "size": "1G"}, headers=AUTH)
    v = three.get("/v1/volumes/v").json()
    target_node = v["target"]["node"]
    doc = three.get(f"/v1/nodes/{target_node}/assignments", headers=AUTH).json()
    # The target waits until its replicas run; only the replica is assigned so far.
    assert [p["role"] for p in doc["processes"]] == ["replica"]
    assert doc["processes"][0]["size"] == G


def test_delete_marks_deleting(three: TestClient) -> None:
    three.post("/v1/volumes", json={"name": "v", "size": "1G"}, headers=AUTH)
    rev = state(three)[2]
    r = three.delete("/v1/volumes/v", headers=AUTH)
    assert r.status_code == 202 and r.json()["phase"] == "Deleting"
    assert state(three)[2] == rev + 1
    for n in ("n1", "n2", "n3"):
        assert three.get(f"/v1/nodes/{n}/assignments", headers=AUTH).json()["processes"] == []
    assert three.post("/v1/volumes/v/resize", json={"size": "2G"}, headers=AUTH).status_code == 409


def test_node_names_are_checked(client: TestClient) -> None:
    r = client.put("/v1/nodes/Bad_Node", json={"address": "x"}, headers=AUTH)
    assert r.status_code == 422 and "invalid node name" in r.json()["detail"]
    register(client, "host-1.example.com")
    assert client.delete("/v1/nodes/host-1.example.com", headers=AUTH).status_code == 200


def test_node_with_processes_cannot_be_deleted(three: TestClient) -> None:
    three.post("/v1/volumes", json={"name": "v", "size": "1G"}, headers=AUTH)
    r = three.delete("/v1/nodes/n1", headers=AUTH)
    assert r.status_code == 409 and "still has processes of: v" in r.json()["detail"]


def test_openebs_volume_routes(three: TestClient) -> None:
    body = {
        "apiVersion": "v1alpha1",
        "kind": "CASVolume",
        "metadata": {
            "name": "pvc-1",
            "namespace": "apps",
            "labels": {"openebs.io/replica-count": "2"},
        },
        "spec": {"capacity": "5Gi", "fsType": "ext4"},
    }
    c = three.app.state.cluster  # type: ignore[attr-defined]
    c.settings.max_wait = 0  # no agent: do not wait for a portal
    r = three.post("/latest/volumes/", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["kind"] == "CASVolume"
    assert doc["spec"]["capacity"] == "5Gi" and doc["spec"]["replicas"] == "2"
    assert doc["spec"]["iqn"] == "iqn.2026-11.io.tandem:pvc-1" and doc["spec"]["lun"] == 0
    assert doc["spec"]["casType"] == "tandem" and doc["spec"]["fsType"] == "ext4"
    assert "targetPortal" in doc["spec"]
    ns = {"namespace": "apps"}
    assert three.get("/latest/volumes/pvc-1", headers=ns).json()["metadata"]["namespace"] == "apps"
    assert three.get("/latest/volumes/pvc-1", headers={"namespace": "other"}).status_code == 404
    assert [i["metadata"]["name"] for i in three.get("/latest/volumes/").json()["items"]] == [
        "pvc-1"
    ]
    assert three.get("/latest/volumes/", headers={"namespace": "x"}).json()["items"] == []
    bad = {**body, "spec": {"capacity": "5 bananas"}}
    r = three.post("/latest/volumes/", json={**bad, "metadata": {"name": "pvc-2"}}, headers=AUTH)
    assert r.status_code == 422 and "invalid size" in r.json()["detail"]
    assert three.post("/latest/volumes/", json=body, headers=AUTH).status_code == 409
    assert (
        three.delete("/latest/volumes/pvc-1", headers={"namespace": "x", **AUTH}).status_code == 404
    )
    r = three.delete("/latest/volumes/pvc-1", headers={**ns, **AUTH})
    assert r.status_code == 200 and r.json()["status"]["phase"] == "Deleting"


def test_metrics_and_health(three: TestClient) -> None:
    three.post("/v1/volumes", json={"name": "v", "size": "1G"}, headers=AUTH)
    text = three.get("/metrics").text
    assert 'tandem_volume_status{phase="Pending",volume="v"} 1.0' in text
    assert 'tandem_apiserver_requests_total{method="POST",route="/v1/volumes",status="201"}' in text
    assert 'tandem_node_ready{node="n1"} 1.0' in text
    assert three.get("/v1/health").json()["colocate_replicas"] is False
