"""The apiserver's control loop: observe targets, heal placement, collect garbage.

Every poll interval, for each volume:
- ask its target for its state and I/O counters (phase, rebuild progress, stats);
- a target whose node has been silent longer than `replace_after` is placed on another
  node (one holding a replica if possible; the replicas' epochs fence the old one out);
- a replica whose node has been silent that long is replaced by a new one on another
  node, but only while the volume is writable: then a quorum of current replicas exists
  to rebuild it from (never replace replicas of a volume that has no current data);
- converge the target's replica set with the placement through its API: ERR members
  that are no longer placed are removed, placed replicas it lacks are added (the target
  rebuilds them), so a replacement is rebuilt while the volume stays online;
- re-apply QoS limits the target does not have (e.g. changed while it restarted).
Processes being removed, and volumes being deleted, are forgotten once their node's agent
reports them gone (or the node is silent: its agent cleans up when it returns, as it
stops and removes everything it is no longer assigned).
"""

from __future__ import annotations

import asyncio
import logging
import time

from maya import scheduler
from maya.apiserver import volumes
from maya.apiserver.cluster import Cluster, TargetObservation
from maya.apiserver.models import Qos
from maya.apiserver.store import ProcRow, VolumeRow
from maya.apiserver.targets import TargetUnreachable

log = logging.getLogger("tandem.apiserver")


class Reconciler:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.store = cluster.store

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except Exception:
                log.exception("reconcile pass failed")
            await asyncio.sleep(self.cluster.settings.poll_interval)

    async def once(self) -> None:
        before = self.store.revision
        vols = self.store.volumes()
        await asyncio.gather(*(self._volume(v) for v in vols if v.state == "active"))
        for v in vols:
            if v.state == "deleting":
                self._collect_deleted(v)
        self._collect_removed()
        if self.store.revision != before:
            await self.cluster.notify()

    def event(self, vol: str, kind: str, message: str) -> None:
        """Record an event unless it repeats the volume's last one."""
        last = self.store.events(vol, 1)
        if last and last[0]["type"] == kind and last[0]["message"] == message:
            return
        with self.store.tx():
            self.store.add_event(vol, kind, message)
        log.info("volume %s: %s: %s", vol, kind, message)

    async def _volume(self, vol: VolumeRow) -> None:
        try:
            target = self.cluster.target_proc(vol.name)
            obs = await self._observe(vol, target)
            if target is not None:
                self._relocate_target(vol, target)
            self._replace_replicas(vol, obs)
            if obs is not None and obs.status is not None:
                await self._converge_members(vol, obs)
                await self._converge_qos(vol, obs)
            self._record_phase(vol)
        except Exception:
            log.exception("reconciling volume %s failed", vol.name)

    async def _observe(self, vol: VolumeRow, target: ProcRow | None) -> TargetObservation | None:
        if target is None:
            self.cluster.observations.pop(vol.name, None)
            return None
        obs = self.cluster.observations.get(vol.name)
        if obs is None or obs.proc_id != target.id:
            obs = self.cluster.observations[vol.name] = TargetObservation(target.id)
        api = self.cluster.address(target.id, "api")
        if api is None:
            obs.status, obs.error = None, "target not started"
            return obs
        try:
            status = await self.cluster.targets.status(api)
            if status.get("name") != vol.name:
                raise TargetUnreachable(f"{api} serves volume {status.get('name')!r}")
        except TargetUnreachable as e:
            obs.status, obs.error = None, str(e)
            return obs
        obs.status, obs.reached, obs.error = status, True, None
        try:  # only for rates: a failed scrape costs a sample, not the volume's state
            obs.samples.append((time.monotonic(), await self.cluster.targets.counters(api)))
        except (TargetUnreachable, ValueError) as e:
            log.debug("volume %s: no I/O counters: %s", vol.name, e)
        return obs

    def _lost(self, node: str) -> bool:
        return self.cluster.node_silence(node) > self.cluster.settings.replace_after

    def _relocate_target(self, vol: VolumeRow, target: ProcRow) -> None:
        if not self._lost(target.node):
            return
        replicas = self.store.procs(volume=vol.name, role="replica", state="active")
        try:
            node = scheduler.pick_target(
                self.cluster.scheduler_nodes(), [r.node for r in replicas if r.node != target.node]
            )
        except scheduler.SchedulingError as e:
            self.event(vol.name, "TargetStuck", f"target's node {target.node} is lost: {e}")
            return
        with self.store.tx():
            rev = self.store.bump()
            self.store.remove_proc(target.id, rev)
            self.store.add_proc(vol.name, "target", node, "")
            self.store.add_event(
                vol.name, "TargetMoved", f"target's node {target.node} is lost; now on {node}"
            )
        log.warning("volume %s: target moved from %s to %s", vol.name, target.node, node)

    def _replace_replicas(self, vol: VolumeRow, obs: TargetObservation | None) -> None:
        replicas = self.store.procs(volume=vol.name, role="replica", state="active")
        lost = [r for r in replicas if self._lost(r.node)]
        if not lost:
            return
        status = obs.status if obs else None
        if status is None or status.get("readonly"):
            nodes = ", ".join(sorted({r.node for r in lost}))
            self.event(
                vol.name,
                "ReplaceWaiting",
                f"replica(s) on lost node(s) {nodes} are replaced once the volume is "
                "writable again (a quorum of current replicas to rebuild from)",
            )
            return
        for r in lost:
            others = [p.node for p in replicas if p.id != r.id]
            try:
                [(node, pool)] = scheduler.pick_replicas(
                    self.cluster.scheduler_nodes(),
                    vol.size,
                    1,
                    vol.spec.get("topology"),
                    self.cluster.settings.colocate_replicas,
                    existing=[*others, r.node],
                )
            except scheduler.SchedulingError as e:
                self.event(
                    vol.name, "ReplaceBlocked", f"cannot replace replica on lost node {r.node}: {e}"
                )
                continue
            with self.store.tx():
                rev = self.store.bump()
                self.store.remove_proc(r.id, rev)
                new = self.store.add_proc(vol.name, "replica", node, pool)
                self.store.add_event(
                    vol.name,
                    "ReplicaReplaced",
                    f"replica {r.id} on lost node {r.node} replaced by {new.id} on {node}",
                )
            log.warning("volume %s: replica on %s replaced on %s", vol.name, r.node, node)
            replicas = [p for p in replicas if p.id != r.id] + [new]

    async def _converge_members(self, vol: VolumeRow, obs: TargetObservation) -> None:
        assert obs.status is not None
        api = self.cluster.target_api(vol.name)
        if api is None:
            return
        replicas = self.store.procs(volume=vol.name, role="replica", state="active")
        placed = [a for a in (self.cluster.address(r.id, "data") for r in replicas) if a]
        members = {m["address"]: m for m in obs.status.get("replicas", [])}
        count = len(members)
        for address, m in members.items():
            # Only failed members: an RW one we cannot place is never cut off by us.
            if address in placed or m["mode"] != "ERR":
                continue
            r = await self.cluster.targets.remove_replica(api, address)
            if r.status_code < 300 or r.status_code == 404:
                count -= 1
                self.event(vol.name, "ReplicaRemoved", f"target let go of {address}")
        for address in placed:
            if address in members or count >= vol.replica_count:
                continue
            r = await self.cluster.targets.add_replica(api, address)
            # 502: added, but not reachable yet; the target keeps retrying it.
            if r.status_code < 300 or r.status_code == 502:
                count += 1
                self.event(vol.name, "ReplicaAdded", f"target rebuilds the replica at {address}")
            else:
                self.event(vol.name, "ReplicaAddFailed", f"{address}: {volumes._detail(r)}")

    async def _converge_qos(self, vol: VolumeRow, obs: TargetObservation) -> None:
        assert obs.status is not None
        want = Qos(**vol.spec["qos"])
        have = obs.status.get("qos") or {}
        limits = want.io_limits()
        same = all(have.get(k) == v for k, v in limits.items())
        if same and obs.status.get("rebuild_rate", want.rebuild_bps) == want.rebuild_bps:
            return
        api = self.cluster.target_api(vol.name)
        if api is not None and await volumes.apply_qos(self.cluster, api, want):
            obs.status = {**obs.status, "qos": limits, "rebuild_rate": want.rebuild_bps}

    def _record_phase(self, vol: VolumeRow) -> None:
        now = volumes.phase(self.cluster, vol)
        before = self.cluster.phases.get(vol.name)
        self.cluster.phases[vol.name] = now
        if before is None or before.phase != now.phase:
            text = f"{before.phase if before else 'new'} -> {now.phase}"
            self.event(vol.name, "Phase", f"{text}: {now.message}" if now.message else text)

    def _gone(self, proc: ProcRow, rev: int | None) -> bool:
        """The process is stopped and cleaned up, or its node is silent (see module doc)."""
        node = self.store.node(proc.node)
        if node is None or not self.cluster.node_ready(proc.node):
            return True
        report = node.report
        running = {p["id"] for p in report.get("processes", [])}
        return report.get("applied_revision", 0) >= (rev or 0) and proc.id not in running

    def _collect_deleted(self, vol: VolumeRow) -> None:
        if all(self._gone(p, vol.deleted_rev) for p in self.store.procs(volume=vol.name)):
            with self.store.tx():
                self.store.delete_volume(vol.name)
            self.cluster.observations.pop(vol.name, None)
            self.cluster.phases.pop(vol.name, None)
            log.info("volume %s deleted", vol.name)

    def _collect_removed(self) -> None:
        for p in self.store.procs(state="removing"):
            if self._gone(p, p.removed_rev):
                with self.store.tx():
                    self.store.delete_proc(p.id)
