"""Placement of a volume's replicas and target on nodes (pure: no I/O, no clock).

Rules, in order:
- Only ready nodes whose labels satisfy the volume's topology constraints (every key, one
  of its values: like a StorageClass's allowedTopologies) and that have a pool with room.
- Hard anti-affinity: no two replicas of a volume on nodes with the same hostname label
  (`kubernetes.io/hostname`, the node name when absent). A one-node setup may relax it,
  but only through the explicit `colocate` setting, never as a silent fallback.
- Spread across zones (`topology.kubernetes.io/zone`) when the labels exist: each next
  replica goes to the zone that holds the fewest so far, then to the node with the most
  free capacity (then the fewest replicas of this volume, then the name, for stable ties).
- The target runs on a requested node, else next to one of its replicas (the replica node
  running the fewest targets), so one of the replica connections stays local.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from maya.validation import format_size

HOSTNAME = "kubernetes.io/hostname"
ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"


class SchedulingError(Exception):
    """The request cannot be placed; the message says why."""


@dataclass
class Pool:
    name: str
    free: int  # bytes not yet reserved by replicas


@dataclass
class Node:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    ready: bool = True
    pools: list[Pool] = field(default_factory=list)
    targets: int = 0  # targets running there (for spreading targets)

    @property
    def hostname(self) -> str:
        return self.labels.get(HOSTNAME, self.name)

    @property
    def zone(self) -> str | None:
        return self.labels.get(ZONE)

    def best_pool(self, size: int) -> Pool | None:
        fitting = [p for p in self.pools if p.free >= size]
        return max(fitting, key=lambda p: (p.free, p.name), default=None)


@dataclass
class Placement:
    replicas: list[tuple[str, str]]  # (node, pool)
    target: str


def matches(node: Node, topology: dict[str, list[str]]) -> bool:
    return all(node.labels.get(key) in values for key, values in topology.items())


def _eligible(nodes: list[Node], topology: dict[str, list[str]]) -> list[Node]:
    return [n for n in nodes if n.ready and matches(n, topology)]


def _describe(topology: dict[str, list[str]]) -> str:
    if not topology:
        return ""
    parts = [f"{k} in ({', '.join(v)})" for k, v in sorted(topology.items())]
    return " matching " + " and ".join(parts)


def pick_replicas(
    nodes: list[Node],
    size: int,
    count: int,
    topology: dict[str, list[str]] | None = None,
    colocate: bool = False,
    existing: list[str] | None = None,
    prefer: str | None = None,
) -> list[tuple[str, str]]:
    """`count` (node, pool) pairs for new replicas of `size` bytes.

    `existing` names the nodes already holding replicas of this volume (they count for
    anti-affinity and zone spread); `prefer` is a node to use first if it qualifies (the
    requested target node, for locality). Raises SchedulingError with the reason."""
    topology = topology or {}
    by_name = {n.name: n for n in nodes}
    eligible = _eligible(nodes, topology)
    where = _describe(topology)
    if not eligible:
        raise SchedulingError(f"no ready node{where}")
    used_hosts = Counter(by_name[n].hostname for n in existing or [] if n in by_name)
    used_zones = Counter(by_name[n].zone for n in existing or [] if n in by_name)
    per_node = Counter(existing or [])
    # Work on copies: a pool's free space shrinks as this request takes from it.
    free = {(n.name, p.name): p.free for n in eligible for p in n.pools}
    chosen: list[tuple[str, str]] = []
    for _ in range(count):
        candidates = []
        for n in eligible:
            if not colocate and used_hosts[n.hostname]:
                continue
            pools = [(free[(n.name, p.name)], p.name) for p in n.pools]
            best = max((fp for fp in pools if fp[0] >= size), default=None)
            if best is None:
                continue
            candidates.append((n, best))
        if not candidates:
            raise SchedulingError(
                _shortage(eligible, size, count + len(existing or []), colocate) + where
            )

        def rank(c: tuple[Node, tuple[int, str]]) -> tuple[int, int, int, int, str]:
            n, (pool_free, _) = c
            preferred = 0 if n.name == prefer and not chosen else 1
            zone_load = used_zones[n.zone] if n.zone is not None else 0
            return (preferred, zone_load, per_node[n.name], -pool_free, n.name)

        node, (_, pool) = min(candidates, key=rank)
        chosen.append((node.name, pool))
        free[(node.name, pool)] -= size
        used_hosts[node.hostname] += 1
        used_zones[node.zone] += 1
        per_node[node.name] += 1
    return chosen


def _shortage(eligible: list[Node], size: int, need: int, colocate: bool) -> str:
    hosts = {n.hostname for n in eligible}
    with_room = {n.hostname for n in eligible if n.best_pool(size) is not None}
    if not colocate and len(hosts) < need:
        return (
            f"too few nodes: {need} replicas need {need} ready nodes with distinct hostnames, "
            f"{len(hosts)} available"
        )
    if not with_room:
        largest = max((p.free for n in eligible for p in n.pools), default=0)
        return (
            f"too little capacity: no pool has {format_size(size)} free "
            f"(the most free in one pool: {format_size(largest)})"
        )
    return (
        f"too little capacity: {need} replicas of {format_size(size)} need {need} nodes with "
        f"that much free in a pool, {len(with_room)} have it"
    )


def pick_target(
    nodes: list[Node],
    replica_nodes: list[str],
    requested: str | None = None,
) -> str:
    """The node for a volume's target (see the module docstring)."""
    by_name = {n.name: n for n in nodes}
    if requested is not None:
        node = by_name.get(requested)
        if node is None:
            raise SchedulingError(f"unknown node {requested!r}")
        if not node.ready:
            raise SchedulingError(f"node {requested!r} is not ready")
        return requested
    ready = [by_name[n] for n in dict.fromkeys(replica_nodes) if n in by_name and by_name[n].ready]
    if not ready:
        ready = [n for n in nodes if n.ready]
    if not ready:
        raise SchedulingError("no ready node for the target")
    return min(ready, key=lambda n: (n.targets, n.name)).name


def place_volume(
    nodes: list[Node],
    size: int,
    count: int,
    topology: dict[str, list[str]] | None = None,
    target_node: str | None = None,
    colocate: bool = False,
) -> Placement:
    if target_node is not None:
        pick_target(nodes, [], target_node)  # unknown or unready: say so first
    replicas = pick_replicas(nodes, size, count, topology, colocate, prefer=target_node)
    target = pick_target(nodes, [n for n, _ in replicas], target_node)
    return Placement(replicas, target)
