"""A StateStore kept in memory (tests, and volumes without durable state).

Values round-trip through JSON, as they would through a store on the replicas, so a caller
that keeps a reference to what it stored cannot change the stored copy by accident.
"""

from __future__ import annotations

import json
from typing import Any


class InMemoryStateStore:
    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self.puts = 0  # number of put() calls, for tests

    async def get(self, key: str) -> Any | None:
        raw = self._data.get(key)
        return None if raw is None else json.loads(raw)

    async def put(self, key: str, value: Any) -> None:
        self._data[key] = json.dumps(value)
        self.puts += 1
