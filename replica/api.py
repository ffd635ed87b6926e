"""The replica's REST control API: state, health and Prometheus metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from replica.server import ReplicaServer


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


def _counter(name: str, doc: str, vol: str, value: int) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=["volume"])
    fam.add_metric([vol], value)
    return fam


def make_app(server: ReplicaServer) -> FastAPI:
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

    return app
