"""The target's REST control API: volume state, replica membership, QoS, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field

from replica.client import parse_address
from target.blockdev import BlockError, OutOfRange, ReadOnlyError
from target.qos import QosLimits
from target.replicator import Mode
from target.volume import Volume


class Resize(BaseModel):
    size: int = Field(gt=0, description="new size in bytes: larger, a multiple of 4096")


class Snapshot(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class AddReplica(BaseModel):
    address: str = Field(description="HOST:PORT of the replica's data protocol")


class Qos(BaseModel):
    """Per-volume I/O limits; 0 = unlimited. A PUT replaces all of them."""

    read_iops: int = Field(0, ge=0, description="read requests per second")
    write_iops: int = Field(0, ge=0, description="write/unmap/write-zeroes requests per second")
    total_iops: int = Field(0, ge=0, description="all limited requests per second")
    read_bps: int = Field(0, ge=0, description="bytes read per second")
    write_bps: int = Field(0, ge=0, description="bytes written per second")
    total_bps: int = Field(0, ge=0, description="bytes read and written per second")
    burst_seconds: float = Field(
        1.0, ge=0, le=60, description="seconds of rate an idle volume saves"
    )


class RebuildRate(BaseModel):
    bytes_per_second: int = Field(ge=0, description="rebuild bandwidth limit; 0 = unlimited")


class _ModeCollector:
    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    def collect(self) -> Any:
        r = self.volume.replicator
        g = GaugeMetricFamily(
            "tandem_volume_replicas", "Replicas by mode", labels=["volume", "mode"]
        )
        for mode in Mode:
            g.add_metric([self.volume.name, mode.value], r.count(mode))
        yield g
        ro = GaugeMetricFamily(
            "tandem_volume_readonly", "1 when below write quorum", labels=["volume"]
        )
        ro.add_metric([self.volume.name], int(r.readonly))
        yield ro
        rb = GaugeMetricFamily(
            "tandem_volume_rebuild_done_bytes", "Rebuild progress", labels=["volume", "replica"]
        )
        for m in r.members:
            if m.rebuild:
                rb.add_metric([self.volume.name, m.address], m.rebuild.done)
        yield rb
        qos = self.volume.qos
        thr = CounterMetricFamily(
            "tandem_volume_qos_throttled_seconds",
            "Time requests waited for QoS tokens",
            labels=["volume", "direction"],
        )
        for direction, seconds in qos.throttled_seconds.items():
            thr.add_metric([self.volume.name, direction], seconds)
        yield thr
        lim = GaugeMetricFamily(
            "tandem_volume_qos_limit", "QoS limit (0 = unlimited)", labels=["volume", "limit"]
        )
        for name, value in qos.limits.as_dict().items():
            if name != "burst_seconds":
                lim.add_metric([self.volume.name, name], value)
        yield lim


def make_app(volume: Volume) -> FastAPI:
    app = FastAPI(title="Tandem target", version="1")
    volume.registry.register(_ModeCollector(volume))  # type: ignore[arg-type]

    @app.get("/v1/volume")
    def get_volume() -> dict[str, Any]:
        return volume.status()

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "readonly" if volume.replicator.readonly else "ok"}

    @app.post("/v1/volume/replicas", status_code=202)
    async def add_replica(body: AddReplica) -> dict[str, Any]:
        try:
            parse_address(body.address)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        try:
            m = await volume.replicator.add_replica(body.address)
        except ValueError as e:
            raise HTTPException(409, str(e)) from e
        except (BlockError, OSError) as e:
            raise HTTPException(502, f"cannot add replica: {e}") from e
        return m.status()

    @app.delete("/v1/volume/replicas/{address}")
    async def remove_replica(address: str) -> dict[str, Any]:
        try:
            await volume.replicator.remove_replica(address)
        except KeyError as e:
            raise HTTPException(404, f"no replica {address}") from e
        return volume.status()

    @app.get("/v1/volume/qos")
    def get_qos() -> dict[str, Any]:
        return volume.qos.status()

    @app.put("/v1/volume/qos")
    def put_qos(body: Qos) -> dict[str, Any]:
        # Applies to requests already waiting too: no reconnect needed.
        volume.qos.set_limits(QosLimits(**body.model_dump()))
        return volume.qos.status()

    @app.put("/v1/volume/rebuild-rate")
    def put_rebuild_rate(body: RebuildRate) -> dict[str, Any]:
        volume.replicator.limiter.rate = body.bytes_per_second  # read on every chunk
        return {"bytes_per_second": volume.replicator.limiter.rate}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(volume.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/volume/resize")
    async def resize(body: Resize) -> dict[str, Any]:
        """Grow the volume online; iSCSI initiators get a capacity-changed unit attention,
        NBD clients see the new size when they reconnect."""
        try:
            await volume.replicator.resize(body.size)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        except BlockError as e:
            raise HTTPException(409, f"resize failed: {e}") from e
        return volume.status()

    @app.get("/v1/volume/snapshots")
    async def list_snapshots() -> dict[str, Any]:
        try:
            return {"snapshots": await volume.replicator.snapshots()}
        except BlockError as e:
            raise HTTPException(503, str(e)) from e

    @app.post("/v1/volume/snapshots", status_code=201)
    async def create_snapshot(body: Snapshot) -> dict[str, Any]:
        try:
            await volume.replicator.snapshot(body.name)
        except OutOfRange as e:  # every replica refused it: e.g. the name exists
            raise HTTPException(409, str(e)) from e
        except ReadOnlyError as e:
            raise HTTPException(409, str(e)) from e
        except BlockError as e:
            raise HTTPException(502, str(e)) from e
        return {"name": body.name}

    @app.delete("/v1/volume/snapshots/{name}")
    async def delete_snapshot(name: str) -> None:
        raise HTTPException(501, "deleting snapshots is not supported yet (snapshot internals)")

    @app.post("/v1/volume/snapshots/{name}/revert")
    async def revert_snapshot(name: str) -> None:
        raise HTTPException(
            501, "reverting to a snapshot is not supported yet (snapshot internals)"
        )

    return app
