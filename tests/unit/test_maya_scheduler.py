"""Placement rules of maya/scheduler.py."""

from __future__ import annotations

import pytest

from maya.scheduler import (
    HOSTNAME,
    ZONE,
    Node,
    Pool,
    SchedulingError,
    pick_replicas,
    pick_target,
    place_volume,
)

G = 1 << 30


def node(name: str, free: int = 100 * G, zone: str | None = None, **kw: object) -> Node:
    labels = {ZONE: zone} if zone else {}
    return Node(name, labels=labels, pools=[Pool("p", free)], **kw)  # type: ignore[arg-type]


def test_replicas_on_distinct_nodes_most_free_first() -> None:
    nodes = [node("a", 10 * G), node("b", 50 * G), node("c", 30 * G), node("d", 40 * G)]
    chosen = pick_replicas(nodes, G, 3)
    assert [n for n, _ in chosen] == ["b", "d", "c"]


def test_hard_anti_affinity_by_hostname_label() -> None:
    a, b = node("a"), node("b")
    b.labels[HOSTNAME] = "a"  # two node names, one host
    with pytest.raises(SchedulingError, match="too few nodes: 2 replicas need 2"):
        pick_replicas([a, b], G, 2)


def test_spread_across_zones_before_capacity() -> None:
    nodes = [node("a1", 90 * G, "a"), node("a2", 80 * G, "a"), node("b1", 10 * G, "b")]
    assert sorted(n for n, _ in pick_replicas(nodes, G, 2)) == ["a1", "b1"]


def test_unready_nodes_and_topology_constraints_exclude() -> None:
    nodes = [node("a", zone="x"), node("b", zone="y", ready=False), node("c", zone="y")]
    assert pick_replicas(nodes, G, 1, {ZONE: ["y"]}) == [("c", "p")]
    with pytest.raises(SchedulingError, match=r"no ready node matching .*zone in \(z\)"):
        pick_replicas(nodes, G, 1, {ZONE: ["z"]})


def test_capacity_is_checked_per_pool() -> None:
    with pytest.raises(SchedulingError, match="too little capacity: no pool has 2GiB free"):
        pick_replicas([node("a", G), node("b", G)], 2 * G, 1)
    with pytest.raises(SchedulingError, match=r"3 replicas of 2GiB need 3 nodes .* 2 have it"):
        pick_replicas([node("a", 5 * G), node("b", 5 * G), node("c", G)], 2 * G, 3)


def test_colocation_only_when_allowed_and_spreads_over_pools() -> None:
    n = Node("solo", pools=[Pool("p1", 3 * G), Pool("p2", 3 * G)])
    with pytest.raises(SchedulingError, match="too few nodes"):
        pick_replicas([n], G, 3)
    chosen = pick_replicas([n], G, 3, colocate=True)
    assert [x for x, _ in chosen] == ["solo"] * 3
    assert {p for _, p in chosen} == {"p1", "p2"}  # the freest pool each time
    with pytest.raises(SchedulingError, match="capacity"):
        pick_replicas([n], 2 * G, 3, colocate=True)


def test_replacement_avoids_nodes_holding_the_volume() -> None:
    nodes = [node("a"), node("b"), node("c", ready=False), node("d", 5 * G)]
    assert pick_replicas(nodes, G, 1, existing=["a", "b", "c"]) == [("d", "p")]
    with pytest.raises(SchedulingError):
        pick_replicas(nodes[:3], G, 1, existing=["a", "b", "c"])


def test_target_near_a_replica_or_on_the_requested_node() -> None:
    nodes = [node("a", targets=3), node("b", targets=1), node("c")]
    assert pick_target(nodes, ["a", "b"]) == "b"
    assert pick_target(nodes, ["a", "b"], requested="c") == "c"
    with pytest.raises(SchedulingError, match="unknown node 'x'"):
        pick_target(nodes, [], requested="x")
    nodes[2].ready = False
    with pytest.raises(SchedulingError, match="not ready"):
        pick_target(nodes, [], requested="c")


def test_requested_target_node_also_gets_a_replica() -> None:
    nodes = [node("a", 90 * G), node("b", 80 * G), node("c", 10 * G)]
    placement = place_volume(nodes, G, 2, target_node="c")
    assert placement.target == "c"
    assert placement.replicas[0][0] == "c"
