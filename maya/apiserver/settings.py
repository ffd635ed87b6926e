"""How an apiserver behaves: where state lives, timeouts, the placement policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Settings:
    db: Path | str  # SQLite file, or ":memory:"
    token: str
    # Relaxed anti-affinity: replicas of one volume may share a node. Only for one-node
    # setups (`tandem up`); a real cluster keeps the hard rule.
    colocate_replicas: bool = False
    node_timeout: float = 15.0  # no heartbeat for this long: the node is NotReady
    replace_after: float = 60.0  # a process on a node silent this long is placed elsewhere
    poll_interval: float = 2.0  # how often targets are asked for their state
    max_wait: float = 120.0  # cap on ?wait= and the agents' long poll

    def __post_init__(self) -> None:
        if self.node_timeout <= 0 or self.poll_interval <= 0:
            raise ValueError("node timeout and poll interval must be positive")
        if self.replace_after < self.node_timeout:
            raise ValueError("replace-after must be at least the node timeout")
