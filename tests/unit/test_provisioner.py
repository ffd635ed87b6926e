"""The provisioner's pure parts: quantities, what a claim asks for, topology, the PV, the
work queue. (End to end against a real control plane: tests/kube/.)"""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import pytest

from maya.provisioner import parameters, topology
from maya.provisioner.parameters import ProvisioningError
from maya.provisioner.pvspec import persistent_volume
from maya.provisioner.quantity import format_bytes, parse_bytes
from maya.provisioner.workqueue import WorkQueue

ZONE = "topology.kubernetes.io/zone"
HOST = "kubernetes.io/hostname"


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("64Mi", 64 << 20),
        ("1Gi", 1 << 30),
        ("1G", 10**9),
        ("1.5Gi", 3 << 29),
        ("500M", 5 * 10**8),
        ("1e9", 10**9),
        ("1E3", 1000),
        ("4096", 4096),
        ("100m", 1),  # 0.1 byte rounds up
        ("2k", 2000),
        ("0.5Ki", 512),
    ],
)
def test_quantities_parse_exactly(text: str, n: int) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "Gi", "1GB", "ten", "1.2.3", "1 Gi", "-1Gi", "1Gib"])
def test_bad_quantities_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_quantities_format_exactly() -> None:
    assert format_bytes(64 << 20) == "64Mi"
    assert format_bytes(3 << 29) == "1536Mi"
    assert format_bytes(1000001536) == "976564Ki"
    assert format_bytes(1000) == "1000"
    assert all(parse_bytes(format_bytes(n)) == n for n in (4096, 10**9 + 4096, 1 << 40))


def test_class_parameters_map_to_the_volume() -> None:
    p = parameters.class_parameters(
        {
            "replicaCount": "2",
            "fsType": "xfs",
            "iopsLimit": "1000",
            "readBpsLimit": "50M",
            "bpsLimit": "100Mi",
            "chap": "other/creds",
            "frontend": "iscsi, nbd",
        },
        "ns1",
    )
    assert p.replica_count == 2 and p.fs_type == "xfs"
    assert p.qos == {"total_iops": 1000, "read_bps": 50 << 20, "total_bps": 100 << 20}
    assert p.chap_secret == ("other", "creds") and p.frontends == ["iscsi", "nbd"]
    default = parameters.class_parameters(None, "ns1")
    assert (default.replica_count, default.fs_type, default.frontends) == (3, "ext4", ["iscsi"])
    assert parameters.class_parameters({"chap": "creds"}, "ns1").chap_secret == ("ns1", "creds")


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"replicaCount": "0"}, "replicaCount '0': must be 1 to 9"),
        ({"replicaCount": "10"}, "must be 1 to 9"),
        ({"replicaCount": "-1"}, "must be a whole number"),
        ({"fsType": "zfs"}, "fsType 'zfs': one of ext4"),
        ({"iopsLimit": "1.5"}, "iopsLimit '1.5'"),
        ({"bpsLimit": "fast"}, "bpsLimit 'fast'"),
        ({"frontend": "nbd"}, "must include iscsi"),
        ({"frontend": "fc"}, "iscsi or iscsi,nbd"),
        ({"chap": "Bad_Name"}, "chap 'Bad_Name'"),
        ({"replicas": "3"}, "unknown StorageClass parameter 'replicas'"),
    ],
)
def test_bad_class_parameters_say_what_is_wrong(params: dict[str, str], says: str) -> None:
    with pytest.raises(ProvisioningError, match=None) as e:
        parameters.class_parameters(params, "ns")
    assert says in str(e.value) and e.value.permanent


def pvc(
    size: str = "1Gi",
    modes: tuple[str, ...] = ("ReadWriteOnce",),
    mode: str | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": list(modes),
        "resources": {"requests": {"storage": size}},
    }
    if mode:
        spec["volumeMode"] = mode
    return {
        "metadata": {
            "name": "c",
            "namespace": "ns",
            "uid": "u-1",
            "resourceVersion": "7",
            "annotations": annotations or {},
        },
        "spec": spec,
    }


def test_claim_requests() -> None:
    r = parameters.claim_request(pvc("1G", mode="Block"))
    assert r.size == 1000001536 and r.size % 4096 == 0 and r.size >= 10**9 and r.block
    assert not parameters.claim_request(pvc()).block
    for modes in (("ReadWriteMany",), ("ReadWriteOnce", "ReadOnlyMany"), ()):
        with pytest.raises(ProvisioningError, match="access mode") as e:
            parameters.claim_request(pvc(modes=modes))
        assert e.value.reason == "AccessModeNotSupported"
    selector = pvc()
    selector["spec"]["selector"] = {"matchLabels": {"a": "b"}}
    with pytest.raises(ProvisioningError, match="selector"):
        parameters.claim_request(selector)
    clone = pvc()
    clone["spec"]["dataSource"] = {"kind": "PersistentVolumeClaim", "name": "other"}
    with pytest.raises(ProvisioningError, match="dataSource"):
        parameters.claim_request(clone)
    for size, says in (("1500", "below the smallest"), ("2Ei", "above the largest")):
        with pytest.raises(ProvisioningError, match=says):
            parameters.claim_request(pvc(size))


def test_chap_from_secret_data() -> None:
    def secret(**data: str) -> dict[str, Any]:
        return {
            "data": {
                k.replace("_", "."): base64.b64encode(v.encode()).decode() for k, v in data.items()
            }
        }

    ref = ("ns", "s")
    one_way = secret(node_session_auth_username="alice", node_session_auth_password="p" * 12)
    assert parameters.chap_credentials(one_way, ref) == {"user": "alice", "secret": "p" * 12}
    mutual = {
        "data": {
            **one_way["data"],
            parameters.CHAP_MUTUAL_USER: base64.b64encode(b"tgt").decode(),
            parameters.CHAP_MUTUAL_SECRET: base64.b64encode(b"q" * 12).decode(),
        }
    }
    assert parameters.chap_credentials(mutual, ref)["mutual_user"] == "tgt"
    with pytest.raises(ProvisioningError, match="needs the keys"):
        parameters.chap_credentials({"data": {}}, ref)


def test_topology_candidates() -> None:
    sc: dict[str, Any] = {"metadata": {"name": "sc"}}
    assert topology.candidates(sc, pvc(), None, set()) == [topology.Placement({}, None, None)]

    sc["allowedTopologies"] = [
        {"matchLabelExpressions": [{"key": ZONE, "values": ["a", "b"]}]},
        {"matchLabelExpressions": [{"key": ZONE, "values": ["c"]}]},
    ]
    got = topology.candidates(sc, pvc(), None, set())
    assert [c.topology for c in got] == [{ZONE: ["a", "b"]}, {ZONE: ["c"]}]
    assert got[0].node_affinity() == {
        "required": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": ZONE, "operator": "In", "values": ["a", "b"]}]}
            ]
        }
    }

    # The selected node narrows the class's terms to its own labels.
    claim = pvc(annotations={topology.SELECTED_NODE: "n1"})
    got = topology.candidates(sc, claim, {ZONE: "b", HOST: "n1"}, {"n1"})
    assert got == [topology.Placement({ZONE: ["b"]}, "n1", {ZONE: ["b"]})]
    # Without allowedTopologies: the node's zone; no zone: its hostname, which pins the
    # target but never the replicas (they need distinct hosts).
    del sc["allowedTopologies"]
    got = topology.candidates(sc, claim, {ZONE: "c"}, set())
    assert got == [topology.Placement({ZONE: ["c"]}, None, {ZONE: ["c"]})]
    got = topology.candidates(sc, claim, None, {"n1"})
    assert got == [topology.Placement({}, "n1", {HOST: ["n1"]})]


def test_the_pv() -> None:
    sc = {"metadata": {"name": "fast"}, "reclaimPolicy": "Retain", "mountOptions": ["noatime"]}
    vol = {
        "name": "pvc-u-1",
        "size": 1 << 30,
        "target_portal": "10.0.0.1:3260",
        "iqn": "iqn.x",
        "lun": 0,
    }
    params = parameters.class_parameters({"chap": "creds"}, "ns")
    request = parameters.claim_request(pvc())
    placement = topology.Placement({ZONE: ["a"]}, None, {ZONE: ["a"]})
    pv = persistent_volume(pvc(), sc, vol, params, request, placement, "tandem.io/iscsi")
    assert pv["metadata"]["name"] == "pvc-u-1"
    assert pv["metadata"]["annotations"] == {"pv.kubernetes.io/provisioned-by": "tandem.io/iscsi"}
    assert pv["metadata"]["labels"] == {"tandem.io/volume": "pvc-u-1"}
    spec = pv["spec"]
    assert (
        spec["capacity"] == {"storage": "1Gi"} and spec["persistentVolumeReclaimPolicy"] == "Retain"
    )
    assert spec["claimRef"]["uid"] == "u-1" and spec["mountOptions"] == ["noatime"]
    assert spec["iscsi"] == {
        "targetPortal": "10.0.0.1:3260",
        "iqn": "iqn.x",
        "lun": 0,
        "readOnly": False,
        "fsType": "ext4",
        "chapAuthSession": True,
        "secretRef": {"name": "creds", "namespace": "ns"},
    }
    assert (
        spec["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["key"]
        == ZONE
    )
    block = persistent_volume(
        pvc(mode="Block"),
        sc,
        vol,
        parameters.class_parameters({}, "ns"),
        parameters.claim_request(pvc(mode="Block")),
        topology.Placement({}, None, None),
        "p",
    )
    assert "fsType" not in block["spec"]["iscsi"] and "nodeAffinity" not in block["spec"]
    assert block["spec"]["volumeMode"] == "Block"


def test_work_queue_dedups_and_never_hands_one_item_to_two_workers() -> None:
    q = WorkQueue(base_delay=0.01)
    q.add("a")
    q.add("a")
    q.add("b")
    assert len(q) == 2
    first = q.get()
    assert first == "a"
    q.add("a")  # while being handled: handled again after, not concurrently
    assert q.get() == "b"
    q.done("b")
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    time.sleep(0.05)
    assert got == []  # "a" is still being handled
    q.done("a")
    t.join(1)
    assert got == ["a"]
    q.done("a")

    t0 = time.monotonic()
    assert q.add_rate_limited("c") == pytest.approx(0.01)
    assert q.get() == "c" and time.monotonic() - t0 >= 0.01
    q.done("c")
    assert q.add_rate_limited("c") == pytest.approx(0.02)  # doubles per failure
    q.forget("c")
    assert q.add_rate_limited("c") == pytest.approx(0.01)
    q.shut_down()
    assert q.get() is None  # at once: nothing is waited for after a shutdown
