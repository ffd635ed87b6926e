"""The routes OpenEBS tooling calls (maya-apiserver's `/latest/volumes/`), CASVolume-shaped.

POST answers once the target's portal is known (up to CAS_WAIT seconds), as OpenEBS's
provisioner uses the portal from the answer. The `namespace` header scopes GET and DELETE
like maya-apiserver's: a volume of another namespace is not found.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException
from pydantic import BaseModel, Field, ValidationError

from maya.apiserver import volumes
from maya.apiserver.cluster import Cluster
from maya.apiserver.models import VolumeCreate
from maya.validation import format_size

CAS_WAIT = 30.0
REPLICA_KEYS = ("openebs.io/replica-count", "tandem.io/replica-count")


class CasMetadata(BaseModel):
    name: str = Field(max_length=253)
    namespace: str | None = Field(None, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class CasSpec(BaseModel):
    capacity: str | int = Field(description="e.g. 5G or 5Gi")
    replicas: str | int | None = Field(None, description="replica count (default 3)")
    fsType: str | None = Field(None, max_length=32)  # the CASVolume field name


class CasVolumeIn(BaseModel):
    apiVersion: str | None = None
    kind: str | None = None
    metadata: CasMetadata
    spec: CasSpec


def cas_document(view: dict[str, Any], fs_type: str = "") -> dict[str, Any]:
    portal = view["target_portal"]
    host, _, port = (portal or "").rpartition(":")
    return {
        "apiVersion": "v1alpha1",
        "kind": "CASVolume",
        "metadata": {
            "name": view["name"],
            "namespace": view["namespace"],
            "labels": view["labels"],
            "annotations": {"openebs.io/cas-type": "tandem", "tandem.io/uid": view["uid"]},
        },
        "spec": {
            "capacity": format_size(view["size"]).removesuffix("B"),  # 5GiB -> 5Gi
            "targetPortal": portal or "",
            "targetIP": host,
            "targetPort": port,
            "iqn": view["iqn"] or "",
            "lun": view["lun"] or 0,
            "replicas": str(view["replica_count"]),
            "casType": "tandem",
            "fsType": fs_type or view["labels"].get("tandem.io/fs-type", ""),
            "nbdURI": view["nbd_uri"] or "",
        },
        "status": {
            "phase": view["phase"],
            "reason": "" if view["phase"] in ("Healthy", "Rebuilding") else view["phase"],
            "message": view["message"] or "",
        },
    }


def make_router(cluster: Cluster, auth: Any) -> APIRouter:
    router = APIRouter(prefix="/latest/volumes", tags=["openebs"])

    def visible(name: str, namespace: str | None) -> dict[str, Any]:
        vol = volumes.get_row(cluster, name)
        if namespace and vol.namespace != namespace:
            raise HTTPException(404, f"no volume {name!r} in namespace {namespace!r}")
        return volumes.view(cluster, vol)

    @router.post("/", dependencies=[Depends(auth)])
    async def create(
        body: CasVolumeIn, namespace: str | None = Header(None, max_length=63)
    ) -> dict[str, Any]:
        meta = body.metadata
        replicas: Any = body.spec.replicas
        for key in REPLICA_KEYS:
            replicas = replicas or meta.labels.get(key) or meta.annotations.get(key)
        labels = dict(meta.labels)
        if body.spec.fsType:
            labels["tandem.io/fs-type"] = body.spec.fsType
        try:
            req = VolumeCreate(
                name=meta.name,
                size=body.spec.capacity,
                replica_count=int(replicas or 3),
                namespace=meta.namespace or namespace or "default",
                labels=labels,
            )
        except (ValidationError, ValueError) as e:
            raise HTTPException(422, _first_error(e)) from e
        view = await volumes.create(cluster, req, wait=CAS_WAIT)
        return cas_document(view)

    @router.get("/")
    async def list_volumes(namespace: str | None = Header(None, max_length=63)) -> dict[str, Any]:
        items = [
            cas_document(volumes.view(cluster, v))
            for v in cluster.store.volumes()
            if not namespace or v.namespace == namespace
        ]
        return {"apiVersion": "v1alpha1", "kind": "CASVolumeList", "items": items}

    @router.get("/{name}")
    async def read(
        name: str, namespace: str | None = Header(None, max_length=63)
    ) -> dict[str, Any]:
        return cas_document(visible(name, namespace))

    @router.delete("/{name}", dependencies=[Depends(auth)])
    async def delete(
        name: str, namespace: str | None = Header(None, max_length=63)
    ) -> dict[str, Any]:
        visible(name, namespace)
        return cas_document(await volumes.delete(cluster, name))

    return router


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        return f"{where}: {msg}" if where else msg
    return str(e)
