"""One volume's stack in a target process: replicator -> stats -> frontends."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry

from target.frontends.nbd.server import NbdServer
from target.replicator import Replicator
from target.stats import StatsDevice

log = logging.getLogger("tandem.volume")


class Volume:
    def __init__(
        self,
        name: str,
        size: int,
        replicas: list[str],
        replica_count: int | None = None,
        replica_timeout: float = 5.0,
        replica_timeout_last: float | None = None,
        rebuild_rate: int = 0,
    ) -> None:
        self.name = name
        self.registry = CollectorRegistry()
        self.replicator = Replicator(
            name,
            size,
            replicas,
            replica_count,
            timeout=replica_timeout,
            timeout_last=replica_timeout_last,
            rebuild_rate=rebuild_rate,
        )
        self.device = StatsDevice(self.replicator, name, self.registry)
        self.nbd: NbdServer | None = None

    @property
    def size(self) -> int:
        return self.replicator.size

    async def start(self, wait: float | None = None) -> None:
        await self.replicator.start(wait)

    async def serve_nbd(self, host: str, port: int) -> int:
        self.nbd = NbdServer(self.device, self.name, description=f"Tandem volume {self.name}")
        await self.nbd.start(host, port)
        return self.nbd.port

    async def close(self) -> None:
        if self.nbd is not None:
            await self.nbd.close()
        await self.replicator.close()

    def status(self) -> dict[str, Any]:
        st = self.replicator.status()
        return {
            "name": self.name,
            "size": self.size,
            **st,
            "stats": {
                op: {"ops": t[0], "bytes": t[1], "errors": t[2]}
                for op, t in self.device.totals.items()
            },
        }
