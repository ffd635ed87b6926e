"""A volume's phase from what the apiserver observes (pure; see Cluster for the inputs).

Pending     placed, target not answering yet (never has), or still selecting its replicas
Healthy     every configured replica RW, every replica's node ready; only members the
            apiserver placed count (a replaced replica stays a member, RW, until the
            target's deadline for it passes)
Rebuilding  writable, some replica WO (being rebuilt)
Degraded    writable, fewer RW replicas than configured and none rebuilding, or a
            replica's node is silent (the target may not have noticed yet)
ReadOnly    the target answers but is below write quorum
Failed      the target answered before and no longer does, or keeps exiting
Deleting    deleted, processes still being stopped and cleaned up
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maya.apiserver.cluster import TargetObservation, VolumePhase
from maya.apiserver.store import ProcRow, VolumeRow

PHASES = ("Pending", "Healthy", "Degraded", "Rebuilding", "ReadOnly", "Failed", "Deleting")


def volume_phase(
    vol: VolumeRow,
    replicas: list[ProcRow],
    target: ProcRow | None,
    reports: dict[str, dict[str, Any]],
    node_ready: Callable[[str], bool],
    obs: TargetObservation | None,
) -> VolumePhase:
    if vol.state == "deleting":
        return VolumePhase("Deleting", "stopping processes and removing data")
    if target is None:
        return VolumePhase("Failed", "no target placed")
    report = reports.get(target.id)
    status = obs.status if obs else None
    if status is None:
        if not node_ready(target.node):
            phase = "Failed" if obs and obs.reached else "Pending"
            return VolumePhase(phase, f"target's node {target.node} is not ready")
        if report and report.get("state") in ("backoff", "failed") and report.get("restarts"):
            return VolumePhase("Failed", f"target keeps exiting: {report.get('error') or '?'}")
        if obs and obs.reached:
            return VolumePhase("Failed", f"target not answering: {obs.error}")
        missing = [r.node for r in replicas if r.id not in reports]
        if missing:
            return VolumePhase("Pending", f"starting replicas on {', '.join(missing)}")
        return VolumePhase("Pending", f"starting the target on {target.node}")
    if status.get("starting"):
        return VolumePhase("Pending", "the target is selecting its current replicas")
    members = status.get("replicas", [])
    where = {(reports.get(r.id) or {}).get("addresses", {}).get("data"): r.node for r in replicas}
    placed = set(where)  # the data addresses of the replicas placed
    rw = sum(1 for m in members if m["mode"] == "RW" and m["address"] in placed)
    wo = [m for m in members if m["mode"] == "WO"]
    if status.get("readonly"):
        return VolumePhase(
            "ReadOnly",
            f"{rw} of {vol.replica_count} replicas current, below the write quorum "
            f"of {status.get('quorum')}",
            True,
        )
    lost = sorted({r.node for r in replicas if not node_ready(r.node)})
    if rw >= vol.replica_count and not lost:
        return VolumePhase("Healthy", None, False)
    if wo:
        done = sum((m.get("rebuild") or {}).get("done_bytes", 0) for m in wo)
        total = sum((m.get("rebuild") or {}).get("total_bytes", 0) for m in wo)
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        return VolumePhase("Rebuilding", f"rebuilding {len(wo)} replica(s){pct}", False)
    parts = [f"{rw} of {vol.replica_count} replicas RW"]
    gone = [m["address"] for m in members if m["mode"] != "ERR" and m["address"] not in placed]
    down = [
        f"{where.get(m['address'], m['address'])} {m['mode']}"
        for m in members
        if m["mode"] == "ERR"
    ]
    if down:
        parts.append(f"failed: {', '.join(down)}")
    if gone:
        parts.append(f"replaced, still in the target: {', '.join(gone)}")
    if lost:
        parts.append(f"node(s) not ready: {', '.join(lost)}")
    return VolumePhase("Degraded", "; ".join(parts), False)
