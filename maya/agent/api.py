"""The agent's own small REST API: health, the processes it runs, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from maya.agent.agent import Agent

STATES = ("starting", "running", "backoff", "stopped")


class _Collector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Any:
        report = self.agent.report()
        counts = GaugeMetricFamily(
            "tandem_agent_processes", "Processes by role and state", labels=["role", "state"]
        )
        for role in ("target", "replica"):
            for state in STATES:
                n = sum(1 for p in report["processes"] if p["role"] == role and p["state"] == state)
                counts.add_metric([role, state], n)
        yield counts
        restarts = CounterMetricFamily(
            "tandem_agent_process_restarts",
            "Times a process exited and was started again",
            labels=["volume", "role", "id"],
        )
        for p in report["processes"]:
            restarts.add_metric([p["volume"], p["role"], p["id"]], p["restarts"])
        yield restarts
        applied = GaugeMetricFamily(
            "tandem_agent_applied_revision", "Last assignments revision applied"
        )
        applied.add_metric([], report["applied_revision"])
        yield applied


def make_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="Tandem agent", version="1")
    registry = CollectorRegistry()
    registry.register(_Collector(agent))  # type: ignore[arg-type]

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "node": agent.cfg.node, "apiserver": agent.cfg.apiserver}

    @app.get("/v1/processes")
    def processes() -> list[dict[str, Any]]:
        return agent.report()["processes"]

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
