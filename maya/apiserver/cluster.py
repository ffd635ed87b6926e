"""The apiserver's view of the cluster: durable desired state plus what it observes.

Observed state is in memory and rebuilt after a restart: node liveness from heartbeats
(a node counts as seen when the apiserver starts, so a restart never looks like every
node vanished), the processes each agent reports, and each target's last status.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from maya import scheduler
from maya.apiserver.settings import Settings
from maya.apiserver.store import ProcRow, Store, VolumeRow
from maya.apiserver.targets import TargetClient


@dataclass
class TargetObservation:
    proc_id: str
    status: dict[str, Any] | None = None  # last GET /v1/volume, None when unreachable
    reached: bool = False  # answered at least once
    error: str | None = None
    samples: deque[tuple[float, dict[str, float]]] = field(default_factory=lambda: deque(maxlen=2))


@dataclass
class VolumePhase:
    phase: str
    message: str | None = None
    readonly: bool | None = None


class Cluster:
    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store(settings.db)
        self.targets = TargetClient()
        self.started = time.monotonic()
        self.node_seen: dict[str, float] = {}
        self.reports: dict[str, dict[str, Any]] = {}  # process id -> the agent's report of it
        self.observations: dict[str, TargetObservation] = {}  # volume -> its target's
        self.phases: dict[str, VolumePhase] = {}
        self.changed = asyncio.Condition()  # notified when the revision moves
        self.closing = False  # long polls answer at once (the web server waits for them)
        for node in self.store.nodes():
            self.index_reports(node.name, node.report)

    async def close(self) -> None:
        await self.targets.close()
        self.store.close()

    # --- nodes --------------------------------------------------------------------------

    def node_silence(self, name: str) -> float:
        """Seconds since the node's last heartbeat (or since this apiserver started)."""
        return time.monotonic() - self.node_seen.get(name, self.started)

    def node_ready(self, name: str) -> bool:
        return self.node_silence(name) < self.settings.node_timeout

    def index_reports(self, node: str, report: dict[str, Any]) -> None:
        for pid in [p for p, r in self.reports.items() if r.get("node") == node]:
            del self.reports[pid]
        for proc in report.get("processes", []):
            self.reports[proc["id"]] = {**proc, "node": node}

    def address(self, proc_id: str, kind: str) -> str | None:
        report = self.reports.get(proc_id)
        return report.get("addresses", {}).get(kind) if report else None

    def scheduler_nodes(self) -> list[scheduler.Node]:
        """Nodes as the scheduler sees them: readiness, labels, pools' unreserved bytes."""
        reserved: dict[tuple[str, str], int] = {}
        targets: dict[str, int] = {}
        sizes = {v.name: v.size for v in self.store.volumes()}
        for p in self.store.procs(state="active"):
            if p.role == "replica":
                key = (p.node, p.pool)
                reserved[key] = reserved.get(key, 0) + sizes.get(p.volume, 0)
            else:
                targets[p.node] = targets.get(p.node, 0) + 1
        out = []
        for row in self.store.nodes():
            pools = [
                scheduler.Pool(
                    p["name"], max(0, p["capacity"] - reserved.get((row.name, p["name"]), 0))
                )
                for p in row.report.get("pools", [])
            ]
            out.append(
                scheduler.Node(
                    row.name,
                    labels=self.labels(row.name, row.report),
                    ready=self.node_ready(row.name),
                    pools=pools,
                    targets=targets.get(row.name, 0),
                )
            )
        return out

    @staticmethod
    def labels(name: str, report: dict[str, Any]) -> dict[str, str]:
        return {scheduler.HOSTNAME: name, **report.get("labels", {})}

    def reserved(self, node: str, pool: str) -> int:
        sizes = {v.name: v.size for v in self.store.volumes()}
        return sum(
            sizes.get(p.volume, 0)
            for p in self.store.procs(node=node, state="active", role="replica")
            if p.pool == pool
        )

    # --- revisions ----------------------------------------------------------------------

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # --- volumes ------------------------------------------------------------------------

    def target_proc(self, volume: str) -> ProcRow | None:
        procs = self.store.procs(volume=volume, role="target", state="active")
        return procs[0] if procs else None

    def target_api(self, volume: str) -> str | None:
        proc = self.target_proc(volume)
        return self.address(proc.id, "api") if proc else None

    def observation(self, vol: VolumeRow) -> TargetObservation | None:
        proc = self.target_proc(vol.name)
        obs = self.observations.get(vol.name)
        if proc is None or obs is None or obs.proc_id != proc.id:
            return None
        return obs
