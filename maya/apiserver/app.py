"""The apiserver's REST API (FastAPI; the schema is served at /openapi.json).

Every handler is a coroutine: they all run on the event loop's thread, like the control
loop, so the SQLite store is never used from two threads (FastAPI runs plain functions
in a thread pool).

Reads are open; every mutating call, and the agents' assignments (they carry CHAP
secrets), need the bearer token. Errors are `{"detail": "<one clear line>"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from maya.apiserver import casvolume, nodes, volumes
from maya.apiserver.auth import token_checker
from maya.apiserver.cluster import Cluster
from maya.apiserver.metrics import ClusterCollector, RequestMetrics
from maya.apiserver.models import (
    Assignments,
    NodeReport,
    NodeView,
    Qos,
    Resize,
    SnapshotCreate,
    VolumeCreate,
    VolumeStats,
    VolumeView,
)
from maya.apiserver.reconciler import Reconciler
from maya.apiserver.settings import Settings
from maya.apiserver.targets import stats_between
from maya.validation import check_node_name

WAIT = Query(0.0, ge=0, le=300, description="seconds to wait for the volume to leave Pending")


def make_app(settings: Settings, run_reconciler: bool = True) -> FastAPI:
    cluster = Cluster(settings)
    reconciler = Reconciler(cluster)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Whoever made the app closes the cluster (the ASGI lifespan may run many times).
        task = asyncio.create_task(reconciler.run()) if run_reconciler else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="Tandem apiserver",
        version="1",
        description="Tandem's control plane: volumes, nodes, QoS, snapshots.",
        lifespan=lifespan,
    )
    app.state.cluster = cluster
    app.state.reconciler = reconciler
    auth = token_checker(settings.token)
    mutating = [Depends(auth)]
    registry = CollectorRegistry()
    requests = RequestMetrics(registry)
    registry.register(ClusterCollector(cluster))  # type: ignore[arg-type]
    app.middleware("http")(requests.middleware)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        lines = []
        for err in errors[:3]:
            where = ".".join(str(x) for x in err["loc"] if x != "body")
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{where}: {msg}" if where else msg)
        return JSONResponse(
            status_code=422,
            content={
                "detail": "; ".join(lines),
                "errors": jsonable_encoder(errors, exclude={"ctx"}),
            },
        )

    # --- service ------------------------------------------------------------------------

    @app.get("/v1/health", tags=["service"])
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "cluster_id": cluster.store.cluster_id,
            "revision": cluster.store.revision,
            "colocate_replicas": settings.colocate_replicas,
            "node_timeout": settings.node_timeout,
            "replace_after": settings.replace_after,
        }

    @app.get("/metrics", tags=["service"])
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # --- volumes ------------------------------------------------------------------------

    @app.get("/v1/volumes", response_model=list[VolumeView], tags=["volumes"])
    async def list_volumes() -> list[dict[str, Any]]:
        return [volumes.view(cluster, v) for v in cluster.store.volumes()]

    @app.post(
        "/v1/volumes",
        status_code=201,
        response_model=VolumeView,
        dependencies=mutating,
        tags=["volumes"],
    )
    async def create_volume(body: VolumeCreate, wait: float = WAIT) -> dict[str, Any]:
        return await volumes.create(cluster, body, wait)

    @app.get("/v1/volumes/{name}", response_model=VolumeView, tags=["volumes"])
    async def get_volume(name: str) -> dict[str, Any]:
        return volumes.view(cluster, volumes.get_row(cluster, name))

    @app.delete(
        "/v1/volumes/{name}",
        status_code=202,
        response_model=VolumeView,
        dependencies=mutating,
        tags=["volumes"],
    )
    async def delete_volume(name: str) -> dict[str, Any]:
        return await volumes.delete(cluster, name)

    @app.get("/v1/volumes/{name}/stats", response_model=VolumeStats, tags=["volumes"])
    async def volume_stats(name: str) -> dict[str, Any]:
        vol = volumes.get_row(cluster, name)
        obs = cluster.observation(vol)
        samples = list(obs.samples) if obs else []
        rates: dict[str, Any] = {
            "interval_seconds": None,
            "read_iops": 0.0,
            "write_iops": 0.0,
            "read_bps": 0.0,
            "write_bps": 0.0,
            "read_latency_ms": None,
            "write_latency_ms": None,
        }
        if len(samples) == 2:
            rates = stats_between(samples[0], samples[1])
        last = samples[-1][1] if samples else {}
        totals = {
            k: int(last.get(k, 0)) for k in ("read_ops", "write_ops", "read_bytes", "write_bytes")
        }
        return {"name": name, **rates, "totals": totals}

    @app.post(
        "/v1/volumes/{name}/resize",
        response_model=VolumeView,
        dependencies=mutating,
        tags=["volumes"],
    )
    async def resize_volume(name: str, body: Resize) -> dict[str, Any]:
        return await volumes.resize(cluster, name, int(body.size))

    @app.get("/v1/volumes/{name}/qos", response_model=Qos, tags=["qos"])
    async def get_qos(name: str) -> dict[str, Any]:
        return volumes.get_row(cluster, name).spec["qos"]

    @app.put("/v1/volumes/{name}/qos", dependencies=mutating, tags=["qos"])
    async def put_qos(name: str, body: Qos) -> dict[str, Any]:
        return await volumes.set_qos(cluster, name, body)

    # --- snapshots (passed through to the target) ---------------------------------------

    @app.get("/v1/volumes/{name}/snapshots", tags=["snapshots"])
    async def list_snapshots(name: str) -> Any:
        return await volumes.snapshot_call(cluster, name, "GET", "")

    @app.post(
        "/v1/volumes/{name}/snapshots", status_code=201, dependencies=mutating, tags=["snapshots"]
    )
    async def create_snapshot(name: str, body: SnapshotCreate) -> Any:
        return await volumes.snapshot_call(cluster, name, "POST", "", {"name": body.name})

    @app.delete(
        "/v1/volumes/{name}/snapshots/{snapshot}", dependencies=mutating, tags=["snapshots"]
    )
    async def delete_snapshot(name: str, snapshot: str) -> Any:
        return await volumes.snapshot_call(cluster, name, "DELETE", "/" + _segment(snapshot))

    @app.post(
        "/v1/volumes/{name}/snapshots/{snapshot}/revert",
        dependencies=mutating,
        tags=["snapshots"],
    )
    async def revert_snapshot(name: str, snapshot: str) -> Any:
        return await volumes.snapshot_call(cluster, name, "POST", f"/{_segment(snapshot)}/revert")

    # --- nodes --------------------------------------------------------------------------

    @app.get("/v1/nodes", response_model=list[NodeView], tags=["nodes"])
    async def list_nodes() -> list[dict[str, Any]]:
        return [nodes.node_view(cluster, n.name) for n in cluster.store.nodes()]

    @app.get("/v1/nodes/{name}", response_model=NodeView, tags=["nodes"])
    async def get_node(name: str) -> dict[str, Any]:
        return nodes.node_view(cluster, name)

    @app.put("/v1/nodes/{name}", dependencies=mutating, tags=["nodes"])
    async def put_node(name: str, body: NodeReport) -> dict[str, Any]:
        _node_name(name)
        return await nodes.put_report(cluster, name, body)

    @app.delete("/v1/nodes/{name}", dependencies=mutating, tags=["nodes"])
    async def delete_node(name: str) -> dict[str, Any]:
        return await nodes.delete_node(cluster, name)

    @app.get(
        "/v1/nodes/{name}/assignments",
        response_model=Assignments,
        dependencies=mutating,
        tags=["nodes"],
    )
    async def get_assignments(
        name: str,
        since: int = Query(-1, ge=-1, le=2**62, description="answer when the revision passes"),
        wait: float = Query(0.0, ge=0, le=300, description="seconds to wait for a change"),
    ) -> dict[str, Any]:
        return await nodes.wait_assignments(cluster, name, since, wait)

    app.include_router(casvolume.make_router(cluster, auth))
    _document_errors(app)
    return app


def _document_errors(app: FastAPI) -> None:
    """Make the schema say what errors look like here: one line in `detail` (the 422
    handler above replaces FastAPI's list of validation errors)."""
    default = app.openapi

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = default()
            doc["components"]["schemas"]["HTTPValidationError"] = {
                "title": "Error",
                "type": "object",
                "properties": {
                    "detail": {"type": "string", "description": "what is wrong, in one line"},
                    "errors": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["detail"],
            }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


def _segment(name: str) -> str:
    return quote(name, safe="")


def _node_name(name: str) -> None:
    try:
        check_node_name(name)
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
