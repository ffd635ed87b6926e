"""The node agent: runs what the apiserver assigns to this node, reports what it runs.

- Registers the node (address, labels, pools) and heartbeats its report: pools'
  capacity and every process's state, addresses, restarts and last error.
- Long-polls its assignments and converges: starts assigned processes it does not run
  (ports picked here, once, and kept), stops and removes everything it runs that is no
  longer assigned (the process, its data directory, its log), targets before replicas.
- Survives its own restart: processes outlive it and are adopted again (records.py).
  It only removes what it created for the same cluster (the apiserver's cluster id), so
  pointing it at another apiserver never deletes data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from maya.agent import launch
from maya.agent.pools import Pool
from maya.agent.ports import free_port
from maya.agent.records import ProcRecord, RecordStore
from maya.agent.supervisor import Child, is_ours
from replica.transport import unlink_socket

log = logging.getLogger("tandem.agent")

POLL_WAIT = 20.0  # seconds the apiserver may hold an assignments request


@dataclass
class AgentConfig:
    apiserver: str
    token: str | None
    node: str
    address: str  # where this node's processes listen and are reached
    state_dir: Path
    pools: list[Pool]
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat: float = 5.0
    agent_url: str | None = None
    stop_children_on_exit: bool = False  # `tandem up`: Ctrl-C stops everything
    replica_sockets: bool = True  # replicas serve a unix socket for a target on this host


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        if not cfg.pools:
            raise ValueError("an agent needs at least one pool (--pool DIR)")
        self.cfg = cfg
        self.records = RecordStore(cfg.state_dir / "procs")
        self.log_dir = cfg.state_dir / "logs"
        self.recs: dict[str, ProcRecord] = {r.id: r for r in self.records.load()}
        self.children: dict[str, Child] = {}
        self.applied = 0
        self.cluster_id: str | None = None
        headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else {}
        self.http = httpx.AsyncClient(base_url=cfg.apiserver, headers=headers, timeout=10.0)
        self._dirty = asyncio.Event()
        self._apply_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._taken = {p for r in self.recs.values() for p in r.ports.values()}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        for rec in self.recs.values():
            if is_ours(rec):
                self._child(rec).start(adopt=True)
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._watch_loop()),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cfg.stop_children_on_exit:
            await self._stop_all()
        else:
            for child in self.children.values():
                await child.detach()
        await self.http.aclose()

    async def _stop_all(self) -> None:
        # Targets first: they close their replicas cleanly before those stop.
        for role in ("target", "replica"):
            await asyncio.gather(*(c.stop() for c in self.children.values() if c.rec.role == role))
        for rec in self.recs.values():
            rec.pid = None
            self.records.save(rec)

    # --- reporting ----------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        procs = []
        for rec in self.recs.values():
            child = self.children.get(rec.id)
            procs.append(
                {
                    "id": rec.id,
                    "volume": rec.volume,
                    "role": rec.role,
                    "state": child.state if child else "stopped",
                    "pid": rec.pid if child and child.active else None,
                    "restarts": rec.restarts,
                    "addresses": launch.addresses(rec, self.cfg.address),
                    "error": child.error if child else None,
                }
            )
        return {
            "address": self.cfg.address,
            "agent_url": self.cfg.agent_url,
            "labels": self.cfg.labels,
            "pools": [p.report() for p in self.cfg.pools],
            "processes": procs,
            "applied_revision": self.applied,
            "version": "1",
        }

    def changed(self) -> None:
        self._dirty.set()

    async def send_report(self) -> None:
        self._dirty.clear()
        r = await self.http.put(f"/v1/nodes/{self.cfg.node}", json=self.report())
        if r.status_code >= 400:
            raise RuntimeError(f"apiserver refused the node report: {_detail(r)}")

    async def _heartbeat_loop(self) -> None:
        failing = False
        while True:
            try:
                await self.send_report()
                if failing:
                    log.info("apiserver %s reachable again", self.cfg.apiserver)
                failing = False
            except (httpx.HTTPError, RuntimeError) as e:
                if not failing:
                    log.warning("cannot report to %s: %s", self.cfg.apiserver, e)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.cfg.heartbeat)
            await asyncio.sleep(0.05)  # coalesce bursts of changes into one report

    # --- assignments --------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        since = -1
        while True:
            try:
                r = await self.http.get(
                    f"/v1/nodes/{self.cfg.node}/assignments",
                    params={"since": since, "wait": POLL_WAIT if since >= 0 else 0},
                    timeout=POLL_WAIT + 10,
                )
                if r.status_code == 404:  # not registered (yet): report, then ask again
                    await self.send_report()
                    await asyncio.sleep(0.2)
                    continue
                if r.status_code >= 400:
                    raise RuntimeError(_detail(r))
                doc = r.json()
                await self.apply(doc)
                since = doc["revision"]
            except (httpx.HTTPError, RuntimeError, OSError) as e:
                log.debug("assignments: %s", e)
                await asyncio.sleep(1.0)

    async def apply(self, doc: dict[str, Any]) -> None:
        async with self._apply_lock:
            self.cluster_id = doc["cluster_id"]
            wanted = {p["id"]: p for p in doc["processes"]}
            stale = [r for r in self.recs.values() if r.id not in wanted]
            for role in ("target", "replica"):
                gone = [r for r in stale if r.role == role]
                for rec in gone:
                    if rec.cluster_id != self.cluster_id:
                        log.error(
                            "not removing %s of volume %s: it belongs to cluster %s, "
                            "this apiserver is %s",
                            rec.id,
                            rec.volume,
                            rec.cluster_id,
                            self.cluster_id,
                        )
                        continue
                await asyncio.gather(
                    *(self._remove(r) for r in gone if r.cluster_id == self.cluster_id)
                )
            for spec in wanted.values():
                self._ensure(spec)
            self.applied = doc["revision"]
        self.changed()

    def _ensure(self, spec: dict[str, Any]) -> None:
        rec = self.recs.get(spec["id"])
        if rec is None:
            rec = self._new_record(spec)
        elif rec.spec != spec:
            rec.spec = spec  # used at the next (re)start; running processes are not bounced
            self.records.save(rec)
        child = self.children.get(rec.id)
        if child is None or not child.active:
            self._child(rec).start()

    def _new_record(self, spec: dict[str, Any]) -> ProcRecord:
        host = self.cfg.address
        role = spec["role"]
        if role == "replica":
            pool = self._pool(spec["pool"])
            ports = {"data": free_port(host, self._taken), "api": free_port(host, self._taken)}
            data_dir = str(pool.path / f"{spec['volume']}-{spec['id']}")
        else:
            ports = {"api": free_port(host, self._taken)}
            for kind in ("nbd", "iscsi"):
                if kind in spec["frontends"]:
                    wanted = spec.get("ports", {}).get(kind)
                    ports[kind] = wanted or free_port(host, self._taken)
            data_dir = None
        log_path = self.log_dir / spec["volume"] / f"{role}-{spec['id']}.log"
        rec = ProcRecord(
            id=spec["id"],
            volume=spec["volume"],
            role=role,
            cluster_id=self.cluster_id or "",
            spec=spec,
            ports=ports,
            log=str(log_path),
            data_dir=data_dir,
        )
        self.records.save(rec)
        self.recs[rec.id] = rec
        return rec

    def _pool(self, name: str) -> Pool:
        for p in self.cfg.pools:
            if p.name == name:
                return p
        raise RuntimeError(f"no pool named {name!r} on this node")

    def _child(self, rec: ProcRecord) -> Child:
        child = Child(
            rec,
            lambda r: launch.command(r, self.cfg.address, self.cfg.replica_sockets),
            self.records.save,
            self.changed,
            self.cfg.address,
            launch.main_port(rec),
        )
        self.children[rec.id] = child
        return child

    async def _remove(self, rec: ProcRecord) -> None:
        """Stop the process and delete what it had: data directory, log, record."""
        child = self.children.pop(rec.id, None)
        if child is not None:
            await child.stop()
        elif is_ours(rec):
            child = self._child(rec)
            self.children.pop(rec.id)
            await child.stop()
        if rec.data_dir:
            path = Path(rec.data_dir)
            if any(p.holds(path) for p in self.cfg.pools):
                await asyncio.to_thread(shutil.rmtree, path, True)
                unlink_socket(launch.replica_socket(rec))  # left behind by a killed replica
            else:
                log.error("not deleting %s: outside every pool", path)
        logfile = Path(rec.log)
        with contextlib.suppress(FileNotFoundError):
            logfile.unlink()
        with contextlib.suppress(OSError):
            logfile.parent.rmdir()  # the volume's log directory, once empty
        self.records.delete(rec)
        self.recs.pop(rec.id, None)
        for port in rec.ports.values():
            self._taken.discard(port)
        log.info("removed %s %s of volume %s", rec.role, rec.id, rec.volume)


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail"))
    except ValueError:
        return f"HTTP {r.status_code}"


def default_node_name() -> str:
    return socket.gethostname()


async def wait_registered(agent: Agent, timeout: float) -> None:
    """Until the apiserver has taken this node's report (for `tandem up`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await agent.send_report()
            return
        except (httpx.HTTPError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
