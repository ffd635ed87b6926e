"""The provisioner end to end: a real Kubernetes 1.20 control plane (the PV controller binds,
releases and hands expansion over), a real Tandem apiserver with three agents, and
`tandem provisioner` processes running as the ServiceAccount deploy/ makes."""

from __future__ import annotations

import base64
import subprocess
import time
from typing import Any

import httpx
import pytest

from maya.provisioner.pvspec import PROVISIONED_BY, VOLUME_LABEL
from tests.kube.conftest import ZONE, Provisioners
from tests.kube.kubelab import Cluster, claim, storage_class, wait
from tests.mayalab import Lab

# func_only: building the control plane (minutes, once, cold) is not the test's time.
pytestmark = [
    pytest.mark.timeout(120, func_only=True),
    # The test cluster's certificate is self-signed (its kubeconfig says to skip the check).
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]

SELECTED_NODE = "volume.kubernetes.io/selected-node"


def volume(lab: Lab, name: str) -> dict[str, Any] | None:
    r = lab.http.get(f"/v1/volumes/{name}")
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()


def volumes_of_claim(lab: Lab, uid: str) -> list[dict[str, Any]]:
    return [v for v in lab.get("/v1/volumes") if v["labels"].get("tandem.io/pvc-uid") == uid]


def iscsi_url(pv: dict[str, Any], auth: str = "") -> str:
    src = pv["spec"]["iscsi"]
    return f"iscsi://{auth}{src['targetPortal']}/{src['iqn']}/{src['lun']}"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def test_claim_becomes_a_replicated_volume_and_a_bound_pv_with_working_data(
    cluster: Cluster, lab: Lab, ns: str, provisioners: Provisioners
) -> None:
    p = provisioners.start()
    params = {"replicaCount": 3, "iopsLimit": 1000, "bpsLimit": "100M", "fsType": "xfs"}
    cluster.apply(
        storage_class(f"{ns}-sc", provisioners.name, parameters=params),
        claim(ns, "data", f"{ns}-sc", "64Mi"),
    )
    pvc, pv = cluster.wait_bound(ns, "data")
    name = f"pvc-{pvc['metadata']['uid']}"
    assert pv["metadata"]["name"] == name

    vol = volume(lab, name)
    assert vol is not None and vol["phase"] == "Healthy"
    assert vol["size"] == 64 << 20 and vol["replica_count"] == 3
    assert len({r["node"] for r in vol["replicas"]}) == 3  # one per node
    assert vol["qos"]["total_iops"] == 1000 and vol["qos"]["total_bps"] == 100 << 20
    assert vol["namespace"] == ns and vol["labels"]["tandem.io/pvc-name"] == "data"

    spec = pv["spec"]
    assert spec["capacity"] == {"storage": "64Mi"}
    assert spec["accessModes"] == ["ReadWriteOnce"] and spec["volumeMode"] == "Filesystem"
    assert spec["persistentVolumeReclaimPolicy"] == "Delete"
    assert spec["storageClassName"] == f"{ns}-sc"
    assert spec["claimRef"]["uid"] == pvc["metadata"]["uid"]
    assert spec["claimRef"]["namespace"] == ns and spec["claimRef"]["name"] == "data"
    assert spec["iscsi"]["targetPortal"] == vol["target_portal"]
    assert spec["iscsi"]["iqn"] == vol["iqn"] and spec["iscsi"]["lun"] == 0
    assert spec["iscsi"]["fsType"] == "xfs" and "chapAuthSession" not in spec["iscsi"]
    assert "nodeAffinity" not in spec
    assert pv["metadata"]["annotations"][PROVISIONED_BY] == provisioners.name
    assert pv["metadata"]["labels"][VOLUME_LABEL] == name

    events = {e["reason"]: e for e in cluster.events(ns, "data")}
    assert {"Provisioning", "ProvisioningSucceeded"} <= set(events)
    assert events["ProvisioningSucceeded"]["source"]["component"] == f"{provisioners.name}_p0"
    assert name in events["ProvisioningSucceeded"]["message"]

    # The PV's iSCSI source is what an initiator logs in to: data goes in and comes back.
    listing = run("iscsi-ls", "-s", f"iscsi://{spec['iscsi']['targetPortal']}").stdout
    assert vol["iqn"] in listing and "Lun:0" in listing
    url = iscsi_url(pv)
    run("qemu-io", "-f", "raw", url, "-c", "write -P 0x5c 0 1M", "-c", "write -P 0xa7 40M 512k")
    run("qemu-io", "-f", "raw", url, "-c", "read -P 0x5c 0 1M", "-c", "read -P 0xa7 40M 512k")
    assert p.count("provision") == 1 and p.count("provision", "failure") == 0


def test_grown_claim_grows_the_volume_and_the_pv(
    cluster: Cluster, lab: Lab, ns: str, provisioners: Provisioners
) -> None:
    p = provisioners.start()
    cluster.apply(
        storage_class(
            f"{ns}-sc", provisioners.name, parameters={"replicaCount": 2}, allowVolumeExpansion=True
        ),
        claim(ns, "grow", f"{ns}-sc", "32Mi", block=True),
    )
    pvc, pv = cluster.wait_bound(ns, "grow")
    assert pv["spec"]["volumeMode"] == "Block" and "fsType" not in pv["spec"]["iscsi"]
    run("qemu-io", "-f", "raw", iscsi_url(pv), "-c", "write -P 0x3e 31M 1M")

    cluster.api.patch(
        f"/api/v1/namespaces/{ns}/persistentvolumeclaims/grow",
        {"spec": {"resources": {"requests": {"storage": "80Mi"}}}},
    )

    def grown() -> bool:
        pvc = cluster.pvc(ns, "grow")
        return pvc is not None and pvc["status"].get("capacity", {}).get("storage") == "80Mi"

    wait(grown, 30, "the claim's status capacity 80Mi")
    pvc = cluster.pvc(ns, "grow")
    assert pvc is not None and not pvc["status"].get("conditions")
    pv = cluster.pv(pvc["spec"]["volumeName"])
    assert pv is not None and pv["spec"]["capacity"] == {"storage": "80Mi"}
    vol = volume(lab, pv["metadata"]["name"])
    assert vol is not None and vol["size"] == 80 << 20
    info = run("qemu-img", "info", iscsi_url(pv)).stdout
    assert "virtual size: 80 MiB" in info
    run("qemu-io", "-f", "raw", iscsi_url(pv), "-c", "read -P 0x3e 31M 1M", "-c", "write 79M 1M")
    reasons = [e["reason"] for e in cluster.events(ns, "grow")]
    assert "Resizing" in reasons and "VolumeResizeSuccessful" in reasons
    assert p.count("expand") == 1


def test_released_pv_is_deleted_with_its_volume_or_retained(
    cluster: Cluster, lab: Lab, ns: str, provisioners: Provisioners
) -> None:
    p = provisioners.start()
    cluster.apply(
        storage_class(f"{ns}-delete", provisioners.name, parameters={"replicaCount": 1}),
        storage_class(
            f"{ns}-retain",
            provisioners.name,
            parameters={"replicaCount": 1},
            reclaimPolicy="Retain",
        ),
        claim(ns, "gone", f"{ns}-delete"),
        claim(ns, "kept", f"{ns}-retain"),
    )
    _, gone = cluster.wait_bound(ns, "gone")
    _, kept = cluster.wait_bound(ns, "kept")
    assert kept["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    gone_name, kept_name = gone["metadata"]["name"], kept["metadata"]["name"]
    cluster.delete(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/gone")
    cluster.delete(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/kept")

    wait(lambda: cluster.pv(gone_name) is None, 30, "the deleted claim's PV gone")
    assert volume(lab, gone_name) is None  # the volume went first
    # Its processes and data went with it (the agents report none of its processes).
    for node in lab.get("/v1/nodes"):
        assert all(proc["volume"] != gone_name for proc in node["processes"])
    assert p.count("delete") == 1

    wait(
        lambda: (cluster.pv(kept_name) or {}).get("status", {}).get("phase") == "Released",
        30,
        "the retained PV Released",
    )
    time.sleep(1.5)  # the provisioner has seen the Released PV: it must leave it alone
    kept_pv = cluster.pv(kept_name)
    assert kept_pv is not None and kept_pv["status"]["phase"] == "Released"
    kept_vol = volume(lab, kept_name)
    assert kept_vol is not None and kept_vol["phase"] == "Healthy"
    assert p.count("delete") == 1
    # An administrator reclaims it by hand.
    cluster.delete(f"/api/v1/persistentvolumes/{kept_name}")
    lab.http.delete(f"/v1/volumes/{kept_name}").raise_for_status()


def test_refused_requests_leave_an_event_and_nothing_half_made(
    cluster: Cluster, lab: Lab, ns: str, provisioners: Provisioners
) -> None:
    p = provisioners.start()
    name = provisioners.name
    cases = {
        # claim: (class parameters, claim overrides, what the event must say)
        "zero-replicas": ({"replicaCount": 0}, {}, "replicaCount '0': must be 1 to 9"),
        "bad-fs": ({"fsType": "zfs4"}, {}, "fsType 'zfs4': one of ext4"),
        "too-many-replicas": ({"replicaCount": 4}, {}, "too few nodes: 4 replicas need 4"),
        "bad-rate": ({"bpsLimit": "fast"}, {}, "bpsLimit 'fast'"),
        "bad-count": ({"replicaCount": "three"}, {}, "replicaCount 'three': must be a whole"),
        "unknown-param": ({"replicas": 3}, {}, "unknown StorageClass parameter 'replicas'"),
        "tiny": ({}, {"size": "1500"}, "requested storage 1500 is below the smallest"),
        "milli": ({}, {"size": "100m"}, "requested storage 100m is below the smallest"),
        "shared": ({}, {"modes": ("ReadWriteMany",)}, "access mode ReadWriteMany is not"),
        "read-only-many": ({}, {"modes": ("ReadOnlyMany",)}, "access mode ReadOnlyMany"),
    }
    docs = []
    for claim_name, (params, overrides, _) in cases.items():
        docs.append(storage_class(f"{ns}-{claim_name}", name, parameters=params))
        docs.append(claim(ns, claim_name, f"{ns}-{claim_name}", **overrides))
    cluster.apply(*docs)
    for claim_name, (_, _, says) in cases.items():
        event = cluster.wait_event(ns, claim_name, "ProvisioningFailed", f"{name}_p0")
        assert event["type"] == "Warning"
        assert says in event["message"], (claim_name, event["message"])
        assert f"StorageClass '{ns}-{claim_name}'" in event["message"]
    for claim_name in cases:
        pvc = cluster.pvc(ns, claim_name)
        assert pvc is not None and pvc["status"]["phase"] == "Pending"
        uid = pvc["metadata"]["uid"]
        assert cluster.pv(f"pvc-{uid}") is None
        assert volume(lab, f"pvc-{uid}") is None and volumes_of_claim(lab, uid) == []
    assert p.count("provision") == 0 and p.count("provision", "failure") >= len(cases)
    # A refusal that retrying cannot fix is not retried: one event, not a stream.
    time.sleep(1)
    zero = [
        e
        for e in cluster.events(ns, "zero-replicas")
        if e["reason"] == "ProvisioningFailed" and e["source"]["component"] == f"{name}_p0"
    ]
    assert len(zero) == 1 and zero[0]["count"] == 1


def test_topology_from_allowed_topologies_and_the_selected_node(
    cluster: Cluster, lab: Lab, ns: str, provisioners: Provisioners
) -> None:
    provisioners.start()
    # Nodes as the kubelets would register them (none runs here), in the lab's zones.
    cluster.apply(
        *(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": f"node{i}",
                    "labels": {"kubernetes.io/hostname": f"node{i}", ZONE: zone},
                },
            }
            for i, zone in enumerate("abc")
        )
    )

    def term(*pairs: tuple[str, list[str]]) -> dict[str, Any]:
        return {"matchLabelExpressions": [{"key": k, "values": v} for k, v in pairs]}

    cluster.apply(
        storage_class(
            f"{ns}-zone-b",
            provisioners.name,
            parameters={"replicaCount": 1},
            allowedTopologies=[term((ZONE, ["b"]))],
        ),
        # The first term has no node: the second one is used.
        storage_class(
            f"{ns}-fallback",
            provisioners.name,
            parameters={"replicaCount": 1},
            allowedTopologies=[term((ZONE, ["x"])), term((ZONE, ["a", "c"]))],
        ),
        storage_class(
            f"{ns}-wffc",
            provisioners.name,
            parameters={"replicaCount": 1},
            volumeBindingMode="WaitForFirstConsumer",
        ),
        claim(ns, "in-b", f"{ns}-zone-b"),
        claim(ns, "fallback", f"{ns}-fallback"),
        # The scheduler would set the annotation when a pod using the claim lands on node2.
        claim(ns, "on-node2", f"{ns}-wffc", annotations={SELECTED_NODE: "node2"}),
    )

    def affinity(pv: dict[str, Any]) -> list[dict[str, Any]]:
        terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert len(terms) == 1
        return terms[0]["matchExpressions"]

    _, pv = cluster.wait_bound(ns, "in-b")
    assert affinity(pv) == [{"key": ZONE, "operator": "In", "values": ["b"]}]
    vol = volume(lab, pv["metadata"]["name"])
    assert vol is not None and [r["node"] for r in vol["replicas"]] == ["node1"]
    assert vol["topology"] == {ZONE: ["b"]}

    _, pv = cluster.wait_bound(ns, "fallback")
    assert affinity(pv) == [{"key": ZONE, "operator": "In", "values": ["a", "c"]}]
    vol = volume(lab, pv["metadata"]["name"])
    assert vol is not None and vol["replicas"][0]["node"] in ("node0", "node2")

    _, pv = cluster.wait_bound(ns, "on-node2")
    assert affinity(pv) == [{"key": ZONE, "operator": "In", "values": ["c"]}]
    vol = volume(lab, pv["metadata"]["name"])
    assert vol is not None and vol["node"] == "node2"
    assert vol["target"]["node"] == "node2" and vol["replicas"][0]["node"] == "node2"


def test_chap_credentials_from_a_secret(
    cluster: Cluster, lab: Lab, ns: str, provisioners: Provisioners
) -> None:
    provisioners.start()
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "chap", "namespace": ns},
            "type": "kubernetes.io/iscsi-chap",
            "data": {
                "node.session.auth.username": b64("alice"),
                "node.session.auth.password": b64("correct-horse-1"),
            },
        },
        storage_class(
            f"{ns}-sc", provisioners.name, parameters={"replicaCount": 1, "chap": "chap"}
        ),
        claim(ns, "secure", f"{ns}-sc"),
    )
    _, pv = cluster.wait_bound(ns, "secure")
    src = pv["spec"]["iscsi"]
    assert src["chapAuthSession"] is True
    assert src["secretRef"] == {"name": "chap", "namespace": ns}
    vol = volume(lab, pv["metadata"]["name"])
    assert vol is not None and vol["chap"]["user"] == "alice"
    assert run("qemu-img", "info", iscsi_url(pv), check=False).returncode != 0
    info = run("qemu-img", "info", iscsi_url(pv, "alice%correct-horse-1@")).stdout
    assert "virtual size: 64 MiB" in info


def test_provisioner_killed_mid_provisioning_makes_exactly_one_volume(
    cluster: Cluster, lab: Lab, ns: str, provisioners: Provisioners
) -> None:
    # Dies right after the volume exists and before its PV does (a named crash point).
    first = provisioners.start(
        "crashing", env={"TANDEM_CRASH_AT": "provisioner.after_volume_create"}
    )
    cluster.apply(
        storage_class(f"{ns}-sc", provisioners.name, parameters={"replicaCount": 2}),
        claim(ns, "once", f"{ns}-sc"),
    )
    assert first.wait_exit(30) == 137
    pvc = cluster.pvc(ns, "once")
    assert pvc is not None and pvc["status"]["phase"] == "Pending"
    uid = pvc["metadata"]["uid"]
    assert len(volumes_of_claim(lab, uid)) == 1 and cluster.pv(f"pvc-{uid}") is None

    second = provisioners.start("restarted")  # takes over once the dead one's lease expires
    _, pv = cluster.wait_bound(ns, "once")
    made = volumes_of_claim(lab, uid)
    assert [v["name"] for v in made] == [pv["metadata"]["name"]] == [f"pvc-{uid}"]
    assert second.count("provision") == 1
    # The restarted one found the volume made: it did not announce making another.
    provisioning = [e for e in cluster.events(ns, "once") if e["reason"] == "Provisioning"]
    assert [e["source"]["component"] for e in provisioning] == [f"{provisioners.name}_crashing"]


def test_two_provisioners_only_the_leader_acts(
    cluster: Cluster, lab: Lab, ns: str, provisioners: Provisioners
) -> None:
    ps = {i: provisioners.start(i) for i in ("one", "two")}
    lease_path = (
        "/apis/coordination.k8s.io/v1/namespaces/tandem-system/leases/"
        + provisioners.name.replace("/", "-")
    )

    def holder() -> str | None:
        lease = cluster.api.get(lease_path)
        return (lease or {}).get("spec", {}).get("holderIdentity")

    leader_id = wait(holder, 20, "a leader")
    leader, follower = ps[leader_id], next(p for i, p in ps.items() if i != leader_id)
    cluster.apply(
        storage_class(f"{ns}-sc", provisioners.name, parameters={"replicaCount": 1}),
        *(claim(ns, f"c{i}", f"{ns}-sc") for i in range(3)),
    )
    for i in range(3):
        cluster.wait_bound(ns, f"c{i}")
        components = {e["source"]["component"] for e in cluster.events(ns, f"c{i}")}
        components.discard("persistentvolume-controller")
        assert components == {f"{provisioners.name}_{leader_id}"}
    assert leader.count("provision") == 3 and follower.count("provision") == 0
    assert leader.metrics()["tandem_provisioner_leader"] == 1
    assert follower.metrics()["tandem_provisioner_leader"] == 0

    # The leader dies without a word; the other one takes over when the lease runs out.
    leader.kill9()
    wait(lambda: holder() == follower.identity, 20, "the follower leading")
    cluster.apply(claim(ns, "after", f"{ns}-sc"))
    cluster.wait_bound(ns, "after")
    assert follower.count("provision") == 1
    assert len({v["name"] for v in lab.get("/v1/volumes") if v["namespace"] == ns}) == 4
    # Stopped cleanly, a leader gives the lease up at once (no wait for it to run out).
    follower.stop()
    assert holder() is None


def test_metrics_endpoint(provisioners: Provisioners) -> None:
    p = provisioners.start()
    metrics = wait(lambda: p.metrics(), 20, "the metrics endpoint")
    for op in ("provision", "delete", "expand"):
        assert (
            f'tandem_provisioner_operations_total{{operation="{op}",result="success"}}' in metrics
        )
        assert f'tandem_provisioner_operation_duration_seconds_count{{operation="{op}"}}' in metrics
    assert httpx.get(f"http://127.0.0.1:{p.metrics_port}/metrics").status_code == 200
