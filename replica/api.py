"""The replica's REST control API: state, health and Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field

from native.metrics import poll_families
from replica import faults
from replica.server import ReplicaServer


class FaultSpec(BaseModel):
    name: str = Field(
        description="replica.<op> (read, write, flush, unmap, write_zeroes) or replica.*"
    )
    action: str = Field(description="delay | fail | hang | drop | crash")
    arg: float = Field(0.0, description="seconds for delay; errno for fail")
    count: int | None = Field(None, ge=1, description="how many requests (default: until cleared)")


class _Collector:
    """Reads the server's plain counters at scrape time (nothing extra per I/O)."""

    def __init__(self, server: ReplicaServer) -> None:
        self.server = server

    def collect(self) -> Any:
        s, m = self.server.stats, self.server.store.meta
        vol = m.volume or ""
        ops = CounterMetricFamily("tandem_replica_ops", "Requests served", labels=["volume", "op"])
        for op, n in s.ops.items():
            ops.add_metric([vol, op.lower()], n)
        yield ops
        yield _counter("tandem_replica_read_bytes", "Bytes read", vol, s.bytes_read)
        yield _counter("tandem_replica_written_bytes", "Bytes written", vol, s.bytes_written)
        yield _counter("tandem_replica_errors", "Requests refused or failed", vol, s.errors)
        g = GaugeMetricFamily("tandem_replica_generation", "Replica generation", labels=["volume"])
        g.add_metric([vol], m.generation)
        yield g
        c = GaugeMetricFamily(
            "tandem_replica_connections", "Open data connections", labels=["volume"]
        )
        c.add_metric([vol], s.connections)
        yield c
        writes = getattr(s, "file_writes", None)  # the native engine's
        if writes is not None:
            yield _counter(
                "tandem_replica_file_writes", "Write calls to the layer files", vol, writes
            )
        poll = getattr(s, "poll", None)  # the native engine's
        if poll is not None:
            yield from poll_families("tandem_replica_engine", vol, poll)


def _counter(name: str, doc: str, vol: str, value: int) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=["volume"])
    fam.add_metric([vol], value)
    return fam


def make_app(server: ReplicaServer, debug: bool = False) -> FastAPI:
    app = FastAPI(title="Tandem replica", version="1")
    registry = CollectorRegistry()
    registry.register(_Collector(server))  # type: ignore[arg-type]
    started = time.time()

    @app.get("/v1/replica")
    def get_replica() -> dict[str, Any]:
        return server.info()

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok" if server.state == "open" else server.state,
            "uptime": time.time() - started,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if debug:
        _debug_routes(app)
    return app


def _debug_routes(app: FastAPI) -> None:
    """Fault injection for tests (only with --debug-api)."""

    @app.get("/v1/debug/faults")
    def get_faults() -> dict[str, Any]:
        return faults.active_faults()

    @app.put("/v1/debug/faults")
    def put_fault(spec: FaultSpec) -> dict[str, Any]:
        try:
            faults.set_fault(spec.name, spec.action, spec.arg, spec.count)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        return faults.active_faults()

    @app.delete("/v1/debug/faults")
    def clear() -> dict[str, Any]:
        faults.clear_faults()
        return {}
