"""Volume operations: create (schedule), describe, delete, resize, QoS, snapshots.

Creating a volume only records it, in one transaction (no half-made volume): its
replicas and target, placed by the scheduler, become work for the agents of those nodes.
Operations on a running volume go to its target's REST API.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import HTTPException

from maya import scheduler
from maya.apiserver.cluster import Cluster
from maya.apiserver.models import Qos, VolumeCreate
from maya.apiserver.phase import volume_phase
from maya.apiserver.store import VolumeRow
from maya.apiserver.targets import TargetUnreachable
from maya.validation import format_size
from target.volume import default_iqn


def get_row(cluster: Cluster, name: str) -> VolumeRow:
    vol = cluster.store.volume(name)
    if vol is None:
        raise HTTPException(404, f"no volume {name!r}")
    return vol


def active_row(cluster: Cluster, name: str) -> VolumeRow:
    vol = get_row(cluster, name)
    if vol.state != "active":
        raise HTTPException(409, f"volume {name!r} is being deleted")
    return vol


async def create(cluster: Cluster, req: VolumeCreate, wait: float = 0) -> dict[str, Any]:
    store = cluster.store
    size = int(req.size)
    if store.volume(req.name) is not None:
        raise HTTPException(409, f"volume {req.name!r} already exists")
    if req.node is not None and store.node(req.node) is None:
        raise HTTPException(422, f"unknown node {req.node!r}")
    for other in store.volumes():
        ports = other.spec.get("ports", {})
        for kind in ("nbd", "iscsi"):
            wanted = getattr(req.ports, kind)
            if wanted is not None and ports.get(kind) == wanted:
                raise HTTPException(
                    409, f"{kind} port {wanted} is already requested by volume {other.name!r}"
                )
    try:
        placement = scheduler.place_volume(
            cluster.scheduler_nodes(),
            size,
            req.replica_count,
            req.topology,
            req.node,
            cluster.settings.colocate_replicas,
        )
    except scheduler.SchedulingError as e:
        raise HTTPException(409, f"cannot place volume {req.name!r}: {e}") from e
    spec = req.model_dump(
        mode="json", exclude={"name", "size", "replica_count", "namespace"}, exclude_none=False
    )
    with store.tx():
        store.bump()
        store.add_volume(req.name, req.namespace, size, req.replica_count, spec)
        for node, pool in placement.replicas:
            store.add_proc(req.name, "replica", node, pool)
        store.add_proc(req.name, "target", placement.target, "")
        nodes = ", ".join(n for n, _ in placement.replicas)
        store.add_event(
            req.name,
            "Created",
            f"{format_size(size)}, replicas on {nodes}, target on {placement.target}",
        )
    await cluster.notify()
    vol = get_row(cluster, req.name)
    await wait_for_phase(cluster, vol, wait)
    return view(cluster, vol)


async def wait_for_phase(cluster: Cluster, vol: VolumeRow, wait: float) -> None:
    """Until the volume leaves Pending (or `wait` seconds, capped by the settings)."""
    deadline = time.monotonic() + min(wait, cluster.settings.max_wait)
    while time.monotonic() < deadline:
        if phase(cluster, vol).phase != "Pending":
            return
        await asyncio.sleep(0.1)


def phase(cluster: Cluster, vol: VolumeRow) -> Any:
    procs = cluster.store.procs(volume=vol.name, state="active")
    replicas = [p for p in procs if p.role == "replica"]
    target = next((p for p in procs if p.role == "target"), None)
    return volume_phase(
        vol, replicas, target, cluster.reports, cluster.node_ready, cluster.observation(vol)
    )


def view(cluster: Cluster, vol: VolumeRow) -> dict[str, Any]:
    store = cluster.store
    procs = store.procs(volume=vol.name)
    spec = vol.spec
    obs = cluster.observation(vol)
    status = obs.status if obs else None
    members = {m["address"]: m for m in (status or {}).get("replicas", [])}
    ph = phase(cluster, vol)
    replicas = []
    target = None
    for p in procs:
        report = cluster.reports.get(p.id) or {}
        addrs = report.get("addresses", {})
        if p.state == "removing":
            state = "Removing"
        elif not cluster.node_ready(p.node):
            state = "NodeLost"
        elif report:
            state = str(report.get("state", "unknown")).capitalize()
        else:
            state = "Scheduled"
        if p.role == "target":
            if p.state == "active":
                target = {
                    "id": p.id,
                    "node": p.node,
                    "state": state,
                    "api": addrs.get("api"),
                    "error": report.get("error") or (obs.error if obs else None),
                }
            continue
        member = members.get(addrs.get("data", ""), {})
        replicas.append(
            {
                "id": p.id,
                "node": p.node,
                "pool": p.pool,
                "address": addrs.get("data"),
                "state": state,
                "mode": member.get("mode"),
                "error": member.get("error") if member.get("mode") != "RW" else None,
                "rebuild": member.get("rebuild"),
            }
        )
    tproc = cluster.target_proc(vol.name)
    taddrs = (cluster.reports.get(tproc.id) or {}).get("addresses", {}) if tproc else {}
    iscsi = "iscsi" in spec["frontends"]
    portal = taddrs.get("iscsi") if iscsi else None
    nbd = taddrs.get("nbd") if "nbd" in spec["frontends"] else None
    chap = spec.get("chap")
    return {
        "name": vol.name,
        "uid": vol.uid,
        "namespace": vol.namespace,
        "size": vol.size,
        "replica_count": vol.replica_count,
        "phase": ph.phase,
        "message": ph.message,
        "readonly": ph.readonly,
        "frontends": spec["frontends"],
        "target_portal": portal,
        "iqn": default_iqn(vol.name) if iscsi else None,
        "lun": 0 if iscsi else None,
        "nbd_uri": f"nbd://{nbd}/{vol.name}" if nbd else None,
        "target": target,
        "replicas": replicas,
        "qos": spec["qos"],
        "chap": {"user": chap["user"], "mutual_user": chap.get("mutual_user")} if chap else None,
        "allowed_initiators": spec["allowed_initiators"],
        "topology": spec["topology"],
        "node": spec.get("node"),
        "labels": spec.get("labels", {}),
        "created": vol.created,
        "events": store.events(vol.name, 20),
    }


async def delete(cluster: Cluster, name: str) -> dict[str, Any]:
    store = cluster.store
    vol = get_row(cluster, name)
    if vol.state == "active":
        with store.tx():
            rev = store.bump()
            store.set_volume(name, state="deleting", deleted_rev=rev)
            store.add_event(name, "Deleting", "stopping processes and removing data")
        await cluster.notify()
    return view(cluster, get_row(cluster, name))


def running_target(cluster: Cluster, vol: VolumeRow) -> str:
    obs = cluster.observation(vol)
    api = cluster.target_api(vol.name)
    if api is None or obs is None or obs.status is None:
        raise HTTPException(409, f"volume {vol.name!r} has no running target right now")
    return api


async def resize(cluster: Cluster, name: str, size: int) -> dict[str, Any]:
    store = cluster.store
    vol = active_row(cluster, name)
    if size == vol.size:
        return view(cluster, vol)
    if size < vol.size:
        raise HTTPException(
            422,
            f"cannot shrink volume {name!r} from {format_size(vol.size)} to "
            f"{format_size(size)}: only growing is supported",
        )
    grow = size - vol.size
    nodes = {n.name: n for n in cluster.scheduler_nodes()}
    for p in store.procs(volume=name, role="replica", state="active"):
        node = nodes.get(p.node)
        pool = next((x for x in node.pools if x.name == p.pool), None) if node else None
        if pool is None or pool.free < grow:
            raise HTTPException(
                409, f"too little capacity to grow by {grow} bytes in pool {p.pool} on {p.node}"
            )
    api = running_target(cluster, vol)
    try:
        r = await cluster.targets.request(
            api, "POST", "/v1/volume/resize", {"size": size}, timeout=120
        )
    except TargetUnreachable as e:
        raise HTTPException(409, f"volume {name!r}: target not reachable: {e}") from e
    if r.status_code in (404, 405, 501):
        raise HTTPException(501, "this volume's target does not support online resize yet")
    if r.status_code >= 400:
        raise HTTPException(409, f"target refused the resize: {_detail(r)}")
    with store.tx():
        store.bump()  # agents restart replicas with the new size from now on
        store.set_volume(name, size=size)
        store.add_event(name, "Resized", f"{format_size(vol.size)} -> {format_size(size)}")
    await cluster.notify()
    return view(cluster, get_row(cluster, name))


async def set_qos(cluster: Cluster, name: str, qos: Qos) -> dict[str, Any]:
    """Record the limits (agents start targets with them) and apply them online."""
    store = cluster.store
    vol = active_row(cluster, name)
    spec = {**vol.spec, "qos": qos.model_dump()}
    with store.tx():
        store.bump()
        store.set_volume(name, spec=spec)
        store.add_event(name, "QosChanged", _qos_text(qos))
    await cluster.notify()
    obs = cluster.observation(vol)
    api = cluster.target_api(name)
    applied = False
    if api is not None and obs is not None and obs.status is not None:
        applied = await apply_qos(cluster, api, qos)
    return {"qos": qos.model_dump(), "applied": applied}


async def apply_qos(cluster: Cluster, api: str, qos: Qos) -> bool:
    try:
        a = await cluster.targets.request(api, "PUT", "/v1/volume/qos", qos.io_limits())
        b = await cluster.targets.request(
            api, "PUT", "/v1/volume/rebuild-rate", {"bytes_per_second": qos.rebuild_bps}
        )
    except TargetUnreachable:
        return False
    return a.status_code == 200 and b.status_code == 200


def _qos_text(qos: Qos) -> str:
    parts = [f"{k}={v}" for k, v in qos.model_dump().items() if v and k != "burst_seconds"]
    return ", ".join(parts) or "unlimited"


def _detail(r: Any) -> str:
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = None
    return str(detail or f"HTTP {r.status_code}")


async def snapshot_call(
    cluster: Cluster, name: str, method: str, path: str, body: Any = None
) -> Any:
    """Pass a snapshot operation through to the volume's target."""
    vol = active_row(cluster, name)
    api = running_target(cluster, vol)
    try:
        r = await cluster.targets.request(api, method, "/v1/volume/snapshots" + path, body, 60)
    except TargetUnreachable as e:
        raise HTTPException(409, f"volume {name!r}: target not reachable: {e}") from e
    if r.status_code in (404, 405) and _detail(r) in ("Not Found", "Method Not Allowed"):
        raise HTTPException(501, "this volume's target does not support snapshots yet")
    if r.status_code == 501:
        raise HTTPException(501, _detail(r))
    if r.status_code >= 500:
        raise HTTPException(409, f"target failed: {_detail(r)}")
    if r.status_code >= 400:
        raise HTTPException(r.status_code, _detail(r))
    if r.status_code < 300 and method != "GET":
        with cluster.store.tx():
            cluster.store.add_event(name, "Snapshot", f"{method} snapshots{path}")
    return r.json() if r.content else {}
