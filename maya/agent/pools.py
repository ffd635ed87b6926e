"""Storage pools: directories an agent keeps replica data in, and their capacity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maya.validation import parse_rate


@dataclass
class Pool:
    name: str
    path: Path
    limit: int | None = None  # bytes this pool may hold; default: the filesystem's size

    def report(self) -> dict[str, Any]:
        self.path.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(self.path)
        total = st.f_blocks * st.f_frsize
        return {
            "name": self.name,
            "path": str(self.path),
            "capacity": min(total, self.limit) if self.limit is not None else total,
            "available": st.f_bavail * st.f_frsize,
        }

    def holds(self, path: Path) -> bool:
        """True when path is strictly inside this pool (the agent deletes nothing else)."""
        pool, p = self.path.resolve(), path.resolve()
        return p != pool and pool in p.parents


def parse_pool(text: str, index: int = 0) -> Pool:
    """`[NAME=]DIR[:CAPACITY]`, e.g. `/srv/tandem`, `fast=/nvme/tandem:500G`."""
    name, sep, rest = text.partition("=")
    if not sep:
        name, rest = "", text
    path, limit = rest, None
    if ":" in rest:
        path, _, capacity = rest.rpartition(":")
        limit = parse_rate(capacity)
    if not path:
        raise ValueError(f"invalid pool {text!r}: give [NAME=]DIR[:CAPACITY]")
    p = Path(path).expanduser().resolve()
    return Pool(
        name or (p.name if index == 0 else f"{p.name}-{index}") or "pool",
        p,
        limit,
    )
