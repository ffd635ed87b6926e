"""Prometheus metrics of the apiserver: its requests, and volumes and nodes in the style
of the OpenEBS volume exporter (IOPS, throughput, latency, replicas by mode, rebuild)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from maya.apiserver import volumes
from maya.apiserver.cluster import Cluster
from maya.apiserver.phase import PHASES
from maya.apiserver.targets import stats_between


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["method", "route", "status"]
        self.count = Counter("tandem_apiserver_requests", "API requests", labels, registry=registry)
        self.latency = Histogram(
            "tandem_apiserver_request_seconds",
            "API request latency",
            ["method", "route"],
            registry=registry,
        )

    async def middleware(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")  # the template: bounded label values
        self.count.labels(request.method, path, str(response.status_code)).inc()
        self.latency.labels(request.method, path).observe(time.perf_counter() - t0)
        return response


class ClusterCollector:
    """Reads the apiserver's observations at scrape time."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def collect(self) -> Any:
        c = self.cluster
        fams = {
            name: GaugeMetricFamily(f"tandem_volume_{name}", doc, labels=["volume"])
            for name, doc in (
                ("size_bytes", "Volume size"),
                ("replica_count", "Configured replicas"),
                ("read_iops", "Reads per second"),
                ("write_iops", "Writes per second"),
                ("read_bytes_per_second", "Read throughput"),
                ("write_bytes_per_second", "Write throughput"),
                ("read_latency_seconds", "Mean read latency over the last poll interval"),
                ("write_latency_seconds", "Mean write latency over the last poll interval"),
            )
        }
        status = GaugeMetricFamily(
            "tandem_volume_status", "1 for the volume's phase", labels=["volume", "phase"]
        )
        modes = GaugeMetricFamily(
            "tandem_volume_replicas_by_mode", "Replicas by mode", labels=["volume", "mode"]
        )
        rebuild = GaugeMetricFamily(
            "tandem_volume_rebuild_percent", "Rebuild progress", labels=["volume", "replica"]
        )
        for vol in c.store.volumes():
            n = vol.name
            fams["size_bytes"].add_metric([n], vol.size)
            fams["replica_count"].add_metric([n], vol.replica_count)
            ph = volumes.phase(c, vol).phase
            for p in PHASES:
                status.add_metric([n, p], 1 if p == ph else 0)
            obs = c.observation(vol)
            if obs is None:
                continue
            if len(obs.samples) == 2:
                s = stats_between(obs.samples[0], obs.samples[1])
                fams["read_iops"].add_metric([n], s["read_iops"])
                fams["write_iops"].add_metric([n], s["write_iops"])
                fams["read_bytes_per_second"].add_metric([n], s["read_bps"])
                fams["write_bytes_per_second"].add_metric([n], s["write_bps"])
                for op in ("read", "write"):
                    if s[f"{op}_latency_ms"] is not None:
                        fams[f"{op}_latency_seconds"].add_metric([n], s[f"{op}_latency_ms"] / 1000)
            members = (obs.status or {}).get("replicas", [])
            for mode in ("RW", "WO", "ERR"):
                modes.add_metric([n, mode], sum(1 for m in members if m["mode"] == mode))
            for m in members:
                if m.get("rebuild"):
                    rebuild.add_metric([n, m["address"]], m["rebuild"].get("percent", 0))
        yield from fams.values()
        yield status
        yield modes
        yield rebuild
        ready = GaugeMetricFamily("tandem_node_ready", "1 when heartbeating", labels=["node"])
        free = GaugeMetricFamily(
            "tandem_pool_free_bytes", "Unreserved pool bytes", labels=["node", "pool"]
        )
        for node in c.scheduler_nodes():
            ready.add_metric([node.name], int(node.ready))
            for pool in node.pools:
                free.add_metric([node.name, pool.name], pool.free)
        yield ready
        yield free
