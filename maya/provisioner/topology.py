"""Where a claim's volume may live: StorageClass allowedTopologies and the selected node
(WaitForFirstConsumer), turned into the volume's placement and the PV's node affinity (pure).

- allowedTopologies, Immediate binding: each term (keys ANDed, values ORed) is a candidate,
  tried in order; the volume's replicas are constrained to the term's labels and the PV
  gets the term as its node affinity.
- selected node (`volume.kubernetes.io/selected-node`): the topology keys are the class's
  allowedTopologies keys, else the node's region and zone labels, else its hostname; the
  values are the selected node's. Replicas are constrained to them, except by hostname
  (replicas of one volume need distinct hosts; the consumer reaches them over the network):
  the hostname pins the volume's target to that node instead, when Tandem runs there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maya.scheduler import HOSTNAME, REGION, ZONE

SELECTED_NODE = "volume.kubernetes.io/selected-node"


@dataclass
class Placement:
    topology: dict[str, list[str]]  # the volume's topology constraints (its replicas)
    node: str | None  # the Tandem node for the target (the selected node), if any
    affinity: dict[str, list[str]] | None  # the PV's node affinity: one term

    def node_affinity(self) -> dict[str, Any] | None:
        if not self.affinity:
            return None
        expressions = [
            {"key": k, "operator": "In", "values": list(v)}
            for k, v in sorted(self.affinity.items())
        ]
        return {"required": {"nodeSelectorTerms": [{"matchExpressions": expressions}]}}


def allowed_terms(storage_class: dict[str, Any]) -> list[dict[str, list[str]]]:
    terms = []
    for term in storage_class.get("allowedTopologies") or []:
        exprs = term.get("matchLabelExpressions") or []
        doc = {e["key"]: list(e.get("values") or []) for e in exprs if e.get("key")}
        if doc:
            terms.append(doc)
    return terms


def selected_node(pvc: dict[str, Any]) -> str | None:
    return ((pvc.get("metadata") or {}).get("annotations") or {}).get(SELECTED_NODE)


def candidates(
    storage_class: dict[str, Any],
    pvc: dict[str, Any],
    node_labels: dict[str, str] | None,
    tandem_nodes: set[str],
) -> list[Placement]:
    """Placements to try in order. `node_labels`: the selected node's labels (None when
    there is no selected node or no Node object); `tandem_nodes`: nodes Tandem runs on."""
    terms = allowed_terms(storage_class)
    selected = selected_node(pvc)
    if selected is None:
        if not terms:
            return [Placement({}, None, None)]
        return [Placement(term, None, term) for term in terms]
    labels = {HOSTNAME: selected, **(node_labels or {})}
    if terms:
        matching = [t for t in terms if all(labels.get(k) in v for k, v in t.items())]
        affinities = [
            {k: [labels[k]] if k in labels else v for k, v in t.items()} for t in matching or terms
        ]
    else:
        keys = [k for k in (REGION, ZONE) if k in labels] or [HOSTNAME]
        affinities = [{k: [labels[k]] for k in keys}]
    target = selected if selected in tandem_nodes else None
    unique: list[dict[str, list[str]]] = []
    for a in affinities:
        if a not in unique:
            unique.append(a)
    return [Placement({k: v for k, v in a.items() if k != HOSTNAME}, target, a) for a in unique]
