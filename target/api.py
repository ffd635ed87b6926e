"""The target's REST control API: volume state, replica membership, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field

from replica.client import parse_address
from target.blockdev import BlockError
from target.replicator import Mode
from target.volume import Volume


class AddReplica(BaseModel):
    address: str = Field(description="HOST:PORT of the replica's data protocol")


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
                rb.add_metric([self.volume.name, m.address], m.rebuild["done"])
        yield rb


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
        except BlockError as e:
            raise HTTPException(502, f"cannot add replica: {e}") from e
        return m.status()

    @app.delete("/v1/volume/replicas/{address}")
    async def remove_replica(address: str) -> dict[str, Any]:
        try:
            await volume.replicator.remove_replica(address)
        except KeyError as e:
            raise HTTPException(404, f"no replica {address}") from e
        return volume.status()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(volume.registry), media_type=CONTENT_TYPE_LATEST)

    return app
