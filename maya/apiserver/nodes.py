"""Nodes: agents' registration and heartbeats, and the work each agent is given.

An agent PUTs its report (address, labels, pools, the processes it runs and their
addresses) to register and then on every heartbeat, and long-polls its assignments: the
processes the apiserver wants on that node. A new target is assigned once a quorum of
its replicas run and none on a live node is still starting (so a fresh volume starts
whole, not with a rebuild); it carries the addresses of all of them. Once its agent has
it, it stays assigned until the volume is deleted or the target is moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi import HTTPException

from maya.apiserver.cluster import Cluster
from maya.apiserver.models import NodeReport
from maya.apiserver.store import ProcRow
from target.volume import default_iqn


async def put_report(cluster: Cluster, name: str, report: NodeReport) -> dict[str, Any]:
    store = cluster.store
    doc = report.model_dump(mode="json")
    row = store.node(name)
    before = row.report.get("processes", []) if row else []
    old, new = _placement_facts(before), _placement_facts(doc["processes"])
    with store.tx():
        created = store.put_node(name, doc)
        # A replica's address or readiness decides when and how its target is assigned.
        if old != new:
            store.bump()
    cluster.node_seen[name] = time.monotonic()
    cluster.index_reports(name, doc)
    if old != new:
        await cluster.notify()
    return {"name": name, "registered": created, "cluster_id": store.cluster_id}


def _placement_facts(procs: list[dict[str, Any]]) -> dict[str, tuple[Any, Any]]:
    return {p["id"]: (p.get("addresses", {}).get("data"), p.get("state")) for p in procs}


def node_view(cluster: Cluster, name: str) -> dict[str, Any]:
    row = cluster.store.node(name)
    if row is None:
        raise HTTPException(404, f"no node {name!r}")
    sched = {n.name: n for n in cluster.scheduler_nodes()}[name]
    free = {p.name: p.free for p in sched.pools}
    counts: dict[str, int] = {}
    for p in cluster.store.procs(node=name, state="active", role="replica"):
        counts[p.pool] = counts.get(p.pool, 0) + 1
    seen = cluster.node_seen.get(name)
    return {
        "name": name,
        "address": row.report["address"],
        "agent_url": row.report.get("agent_url"),
        "labels": cluster.labels(name, row.report),
        "ready": cluster.node_ready(name),
        "last_heartbeat_seconds": round(time.monotonic() - seen, 1) if seen else None,
        "pools": [
            {
                "name": p["name"],
                "path": p["path"],
                "capacity": p["capacity"],
                "free": free.get(p["name"], 0),
                "available": p.get("available", 0),
                "replicas": counts.get(p["name"], 0),
            }
            for p in row.report.get("pools", [])
        ],
        "processes": row.report.get("processes", []),
    }


async def delete_node(cluster: Cluster, name: str) -> dict[str, Any]:
    store = cluster.store
    if store.node(name) is None:
        raise HTTPException(404, f"no node {name!r}")
    procs = store.procs(node=name)
    if procs:
        vols = sorted({p.volume for p in procs})
        raise HTTPException(409, f"node {name!r} still has processes of: {', '.join(vols)}")
    with store.tx():
        store.delete_node(name)
    cluster.node_seen.pop(name, None)
    cluster.index_reports(name, {})
    return {"name": name, "deleted": True}


def assignments(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    store = cluster.store
    out: list[dict[str, Any]] = []
    volumes = {v.name: v for v in store.volumes()}
    for p in store.procs(node=name, state="active"):
        vol = volumes.get(p.volume)
        if vol is None or vol.state != "active":
            continue
        base = {"id": p.id, "volume": vol.name, "uid": vol.uid, "role": p.role, "size": vol.size}
        if p.role == "replica":
            out.append({**base, "pool": p.pool})
            continue
        replicas = store.procs(volume=vol.name, role="replica", state="active")
        started = p.id in cluster.reports  # never taken back once its agent has it
        if not started and not _replicas_ready(cluster, replicas, vol.replica_count // 2 + 1):
            continue
        addresses = [a for a in (cluster.address(r.id, "data") for r in replicas) if a]
        spec = vol.spec
        qos = spec["qos"]
        out.append(
            {
                **base,
                "replica_count": vol.replica_count,
                "replicas": addresses,
                "frontends": spec["frontends"],
                "iqn": default_iqn(vol.name),
                "chap": spec.get("chap"),
                "allowed_initiators": spec.get("allowed_initiators", []),
                "qos": {k: v for k, v in qos.items() if k != "rebuild_bps"},
                "rebuild_bps": qos.get("rebuild_bps", 0),
                "ports": spec.get("ports", {}),
            }
        )
    return out


def _replicas_ready(cluster: Cluster, replicas: list[ProcRow], quorum: int) -> bool:
    """Start a target once a quorum of its replicas listen and none on a live node is
    still coming up (so a fresh volume starts with every replica, not a rebuild)."""
    states = [(cluster.reports.get(r.id) or {}).get("state") for r in replicas]
    running = sum(1 for s in states if s == "running")
    coming = sum(
        1
        for r, s in zip(replicas, states, strict=True)
        if s in (None, "starting", "stopped") and cluster.node_ready(r.node)
    )
    return running >= quorum and not coming


async def wait_assignments(cluster: Cluster, name: str, since: int, wait: float) -> dict[str, Any]:
    """Long poll: answers when the revision passes `since`, or after `wait` seconds."""
    if cluster.store.node(name) is None:
        raise HTTPException(404, f"no node {name!r}: register it first (PUT /v1/nodes/{name})")
    wait = min(wait, cluster.settings.max_wait)
    if cluster.store.revision <= since and wait > 0:
        async with cluster.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    cluster.changed.wait_for(
                        lambda: cluster.store.revision > since or cluster.closing
                    ),
                    wait,
                )
    return {
        "cluster_id": cluster.store.cluster_id,
        "revision": cluster.store.revision,
        "processes": assignments(cluster, name),
    }
