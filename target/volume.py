"""One volume's stack in a target process: replicator -> QoS -> per-frontend stats -> frontends.

On the native engine (`engine="native"`) the replicator's data path, QoS, the stats and the
NBD transmission phase run in the engine (target/native_volume.py has the parts); the
frontends see the same BlockDevice interface (EngineDevice)."""

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
    engine: str = "python"  # or "native" (native.choose_engine picks)
    poll_us: int = 0  # native engine: poll this long before sleeping at queue depth 1


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
        args = (opts.name, opts.size, opts.replicas, opts.replica_count)
        kw: dict[str, Any] = {
            "timeout": opts.replica_timeout,
            "timeout_last": opts.replica_timeout_last,
            "rebuild_rate": opts.rebuild_rate,
        }
        self.engine: Any = None  # native.engine.Engine on the native engine
        self.frontends: dict[str, Any] = {}  # StatsDevice, or EngineDevice (native)
        if opts.engine == "native":
            from target.native_replicator import NativeReplicator
            from target.native_volume import NativeMetrics, NativeQos, start_engine

            self.engine, self._events = start_engine(opts.poll_us)
            self.replicator: Replicator = NativeReplicator(self.engine, *args, **kw)
            self._events.replicator = self.replicator  # type: ignore[assignment]
            self.qos: Any = NativeQos(self.engine, opts.qos)
            self.registry.register(NativeMetrics(self.name, self.frontends, self.engine))  # type: ignore[arg-type]
        else:
            self.replicator = Replicator(*args, **kw)
            # One QoS layer under both frontends: the limits are the volume's, not per frontend.
            self.qos = QosDevice(self.replicator, opts.qos)
            self._metrics = VolumeMetrics(self.registry)
        self.nbd: Any = None  # NbdServer, or NativeNbdServer
        self.iscsi: IscsiServer | None = None

    @property
    def size(self) -> int:
        return self.replicator.size

    def _device(self, frontend: str) -> Any:
        if self.engine is not None:
            from target.native_device import EngineDevice
            from target.native_volume import FrontendStats

            stats = FrontendStats(self.engine, frontend)
            dev: Any = EngineDevice(self.replicator, frontend, stats)  # type: ignore[arg-type]
        else:
            dev = StatsDevice(self.qos, self._metrics, self.name, frontend)
        self.frontends[frontend] = dev
        return dev

    async def start(self, wait: float | None = None) -> None:
        await self.replicator.start(wait)

    async def serve_nbd(self, host: str, port: int) -> int:
        description = f"Tandem volume {self.name}"
        if self.engine is not None:
            from target.native_nbd import NativeNbdServer

            self.nbd = NativeNbdServer(self._device("nbd"), self.name, description=description)
            self._events.nbd = self.nbd
        else:
            self.nbd = NbdServer(self._device("nbd"), self.name, description=description)
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
        if self.engine is not None:
            from target.native_iscsi import NativeIscsiServer

            server = NativeIscsiServer(
                [config], engine=self.engine, public_portal=opts.public_portal
            )
            self._events.iscsi = server
            # a new capacity is a unit attention: those connections go slow
            self.replicator.on_resize.append(lambda _size: server.refresh_slow())
            self.iscsi = server
        else:
            self.iscsi = IscsiServer([config], public_portal=opts.public_portal)
        await self.iscsi.start(host, port)
        assert self.iscsi.port is not None
        return self.iscsi.port

    async def close(self) -> None:
        for server in (self.nbd, self.iscsi):
            if server is not None:
                await server.close()
        await self.replicator.close()
        if self.engine is not None:
            self.engine.close()  # after the replicator: its last requests went through it

    def engine_counters(self) -> dict[str, dict[str, Any]]:
        """Per frontend: requests the engine parsed, and how many of them went up to Python
        (steady-state READ/WRITE should add none); requests to members, how many of them had
        their data in shared memory, and the bytes of it never reused (a replica dropped
        with such requests in flight might still write there)."""
        st = self.engine.target_stats()
        return {
            **{
                fe: {
                    "requests": st["frontend_requests"][fe],
                    "upcalls": st["frontend_upcalls"][fe],
                }
                for fe in ("nbd", "iscsi")
            },
            "members": {
                "requests": st["member_requests"],
                "shared": st["member_shared"],
                "leaked_bytes": st["shm_leaked"],
                "local_reads": st["local_reads"],
            },
            "poll": self.engine.poll_stats(),
        }

    def status(self) -> dict[str, Any]:
        st = self.replicator.status()
        return {
            "name": self.name,
            "size": self.size,
            **st,
            "iqn": self.opts.iscsi.iqn if self.opts.iscsi else None,
            "qos": self.qos.status(),
            "rebuild_rate": self.replicator.limiter.rate,
            "engine": self.opts.engine,
            **({"engine_counters": self.engine_counters()} if self.engine is not None else {}),
            "stats": {
                frontend: {
                    op: {"ops": t[0], "bytes": t[1], "errors": t[2]} for op, t in dev.totals.items()
                }
                for frontend, dev in self.frontends.items()
            },
        }
