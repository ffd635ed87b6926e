"""One volume's stack in a target process: replicator -> QoS -> per-frontend stats -> frontends."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from target.frontends.iscsi.scsi.target import ScsiTarget
from target.frontends.iscsi.server import IscsiServer, TargetConfig
from target.frontends.nbd.server import NbdServer
from target.qos import QosDevice, QosLimits
from target.replicator import Replicator
from target.stats import StatsDevice, VolumeMetrics

log = logging.getLogger("tandem.volume")

IQN_PREFIX = "iqn.2026-11.io.tandem:"


def default_iqn(volume: str) -> str:
    return IQN_PREFIX + volume.lower()


@dataclass
class IscsiOptions:
    iqn: str
    chap: tuple[str, str] | None = None
    mutual_chap: tuple[str, str] | None = None
    allowed_initiators: list[str] | None = None
    public_portal: tuple[str, int] | None = None


@dataclass
class VolumeOptions:
    name: str
    size: int
    replicas: list[str]
    replica_count: int | None = None
    replica_timeout: float = 5.0
    replica_timeout_last: float | None = None
    rebuild_rate: int = 0
    iscsi: IscsiOptions | None = field(default=None)
    qos: QosLimits = field(default_factory=QosLimits)


class ReplicatedState:
    """The SCSI layer's durable state (reservations, mode pages), kept on the replicas."""

    def __init__(self, replicator: Replicator) -> None:
        self.replicator = replicator

    async def get(self, key: str) -> Any | None:
        return await self.replicator.get_attr(key)

    async def put(self, key: str, value: Any) -> None:
        await self.replicator.put_attr(key, value)


class Volume:
    def __init__(self, opts: VolumeOptions) -> None:
        self.opts = opts
        self.name = opts.name
        self.registry = CollectorRegistry()
        self.replicator = Replicator(
            opts.name,
            opts.size,
            opts.replicas,
            opts.replica_count,
            timeout=opts.replica_timeout,
            timeout_last=opts.replica_timeout_last,
            rebuild_rate=opts.rebuild_rate,
        )
        # One QoS layer under both frontends: the limits are the volume's, not per frontend.
        self.qos = QosDevice(self.replicator, opts.qos)
        self._metrics = VolumeMetrics(self.registry)
        self.frontends: dict[str, StatsDevice] = {}
        self.nbd: NbdServer | None = None
        self.iscsi: IscsiServer | None = None

    @property
    def size(self) -> int:
        return self.replicator.size

    def _device(self, frontend: str) -> StatsDevice:
        dev = StatsDevice(self.qos, self._metrics, self.name, frontend)
        self.frontends[frontend] = dev
        return dev

    async def start(self, wait: float | None = None) -> None:
        await self.replicator.start(wait)

    async def serve_nbd(self, host: str, port: int) -> int:
        self.nbd = NbdServer(
            self._device("nbd"), self.name, description=f"Tandem volume {self.name}"
        )
        await self.nbd.start(host, port)
        assert self.nbd.port is not None
        return self.nbd.port

    async def serve_iscsi(self, host: str, port: int) -> int:
        opts = self.opts.iscsi or IscsiOptions(default_iqn(self.name))
        scsi = ScsiTarget(
            {0: self._device("iscsi")}, volume=self.name, state=ReplicatedState(self.replicator)
        )
        await scsi.start()
        self.replicator.on_resize.append(lambda _size: scsi.capacity_changed())
        config = TargetConfig(
            opts.iqn,
            scsi,
            alias=self.name,
            chap=opts.chap,
            mutual_chap=opts.mutual_chap,
            allowed_initiators=opts.allowed_initiators,
        )
        self.iscsi = IscsiServer([config], public_portal=opts.public_portal)
        await self.iscsi.start(host, port)
        assert self.iscsi.port is not None
        return self.iscsi.port

    async def close(self) -> None:
        for server in (self.nbd, self.iscsi):
            if server is not None:
                await server.close()
        await self.replicator.close()

    def status(self) -> dict[str, Any]:
        st = self.replicator.status()
        return {
            "name": self.name,
            "size": self.size,
            **st,
            "iqn": self.opts.iscsi.iqn if self.opts.iscsi else None,
            "qos": self.qos.status(),
            "rebuild_rate": self.replicator.limiter.rate,
            "stats": {
                frontend: {
                    op: {"ops": t[0], "bytes": t[1], "errors": t[2]} for op, t in dev.totals.items()
                }
                for frontend, dev in self.frontends.items()
            },
        }
