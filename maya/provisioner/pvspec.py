"""The PersistentVolume for a provisioned Tandem volume (pure)."""

from __future__ import annotations

from typing import Any

from maya.provisioner.parameters import ClaimRequest, ClassParameters
from maya.provisioner.quantity import format_bytes
from maya.provisioner.topology import Placement

PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
VOLUME_LABEL = "tandem.io/volume"  # the Tandem volume's name, on the PV


def volume_name(pvc: dict[str, Any]) -> str:
    """The PV's and the Tandem volume's name: `pvc-<uid>`, as Kubernetes provisioners do
    (one name per claim ever, so looking it up first makes provisioning idempotent)."""
    return f"pvc-{pvc['metadata']['uid']}"


def persistent_volume(
    pvc: dict[str, Any],
    storage_class: dict[str, Any],
    volume: dict[str, Any],
    params: ClassParameters,
    request: ClaimRequest,
    placement: Placement,
    provisioner: str,
) -> dict[str, Any]:
    meta = pvc["metadata"]
    iscsi: dict[str, Any] = {
        "targetPortal": volume["target_portal"],
        "iqn": volume["iqn"],
        "lun": volume["lun"],
        "readOnly": False,
    }
    if not request.block:
        iscsi["fsType"] = params.fs_type
    if params.chap_secret is not None:
        namespace, name = params.chap_secret
        iscsi["chapAuthSession"] = True
        iscsi["secretRef"] = {"name": name, "namespace": namespace}
    spec: dict[str, Any] = {
        "capacity": {"storage": format_bytes(volume["size"])},
        "accessModes": request.access_modes,
        "persistentVolumeReclaimPolicy": storage_class.get("reclaimPolicy") or "Delete",
        "storageClassName": storage_class["metadata"]["name"],
        "volumeMode": "Block" if request.block else "Filesystem",
        "claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion"),
        },
        "iscsi": iscsi,
    }
    if storage_class.get("mountOptions"):
        spec["mountOptions"] = list(storage_class["mountOptions"])
    affinity = placement.node_affinity()
    if affinity is not None:
        spec["nodeAffinity"] = affinity
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": volume_name(pvc),
            "annotations": {PROVISIONED_BY: provisioner},
            "labels": {VOLUME_LABEL: volume["name"]},
        },
        "spec": spec,
    }
