"""One volume's stack on the native engine (target/volume.py assembles it when the engine is
native): the engine, its replicator, QoS and per-frontend stats kept in the engine, the
events the engine sends up routed to their owners.

The engine enforces QoS and counts every request it runs per frontend (ops, bytes, errors,
latency buckets); Python adds what it runs itself (block status) and publishes both with
the same metric families as target/stats.py."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from native import engine as ne
from native.metrics import poll_families
from target.qos import LIMITS, QosLimits
from target.stats import _BUCKETS, OPS

if TYPE_CHECKING:
    from target.native_iscsi import NativeIscsiServer
    from target.native_nbd import NativeNbdServer
    from target.native_replicator import NativeReplicator

log = logging.getLogger("tandem.engine")


class TargetEvents(ne.EngineHandler):
    """Routes the engine's events: member drops to the replicator, up-calls and connection
    ends to the NBD or iSCSI server (by connection id), log lines to logging."""

    def __init__(self) -> None:
        self.replicator: NativeReplicator | None = None
        self.nbd: NativeNbdServer | None = None
        self.iscsi: NativeIscsiServer | None = None

    def _server(self, conn: int) -> Any:
        from target.native_iscsi import CONN_ID_BASE

        return self.iscsi if conn > CONN_ID_BASE else self.nbd

    def on_member_down(self, slot: int, seq: int, was: int, gen: int, why: str) -> None:
        if self.replicator is not None:
            self.replicator.member_down(slot, seq, was, gen, why)

    def on_upcall(self, up: ne.Upcall) -> None:
        server = self._server(up.conn)
        if server is not None:
            server.upcall(up)

    def on_conn_closed(self, conn: int) -> None:
        server = self._server(conn)
        if server is not None:
            server.conn_closed(conn)

    def on_proto_error(self, conn: int, message: str) -> None:
        server = self._server(conn)
        if server is not None:
            server.proto_error(conn, message)

    def on_log(self, level: int, message: str) -> None:
        log.log(level, "%s", message)


def start_engine(poll_us: int = 0) -> tuple[ne.Engine, TargetEvents]:
    events = TargetEvents()
    engine = ne.Engine(events)
    engine.set_poll(poll_us)
    engine.attach(asyncio.get_running_loop())
    return engine, events


class FrontendStats:
    """One frontend's counters: the engine's, plus the block status Python serves."""

    def __init__(self, engine: ne.Engine, frontend: str) -> None:
        self.engine = engine
        self.frontend = frontend
        self._bs = [0, 0]  # ops, errors
        self._bs_lat = [0] * (len(_BUCKETS) + 1)
        self._bs_sum = 0.0

    def block_status_done(self, seconds: float) -> None:
        self._bs[0] += 1
        self._bs_sum += seconds
        i = next((k for k, b in enumerate(_BUCKETS) if seconds <= b), len(_BUCKETS))
        self._bs_lat[i] += 1

    def block_status_error(self) -> None:
        self._bs[1] += 1

    def ops(self) -> dict[str, dict[str, Any]]:
        """Per op: ops, bytes, errors, latency counts per bucket (not cumulative), sum."""
        fe = self.engine.target_stats().get("frontends", {}).get(self.frontend, {})
        out = {}
        for op in OPS:
            if op == "block_status":
                out[op] = {
                    "ops": self._bs[0],
                    "bytes": 0,
                    "errors": self._bs[1],
                    "lat": list(self._bs_lat),
                    "lat_sum": self._bs_sum,
                }
            else:
                zero = {"ops": 0, "bytes": 0, "errors": 0, "lat": [0] * 14, "lat_sum": 0.0}
                out[op] = fe.get(op, zero)
        return out

    @property
    def totals(self) -> dict[str, list[int]]:
        """What StatsDevice.totals holds: op -> [ops, bytes, errors]."""
        return {op: [s["ops"], s["bytes"], s["errors"]] for op, s in self.ops().items()}


class NativeQos:
    """target/qos.py's QosDevice interface (limits, status, set_limits) over the engine's
    token buckets."""

    def __init__(self, engine: ne.Engine, limits: QosLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or QosLimits()
        self.set_limits(self.limits)

    def set_limits(self, limits: QosLimits) -> None:
        self.engine.qos([float(getattr(limits, name)) for name in LIMITS], limits.burst_seconds)
        self.limits = limits

    @property
    def throttled(self) -> dict[str, int]:
        t = self.engine.target_stats().get("throttled", [0, 0])
        return {"read": t[0], "write": t[1]}

    @property
    def throttled_seconds(self) -> dict[str, float]:
        t = self.engine.target_stats().get("throttled_seconds", [0.0, 0.0])
        return {"read": t[0], "write": t[1]}

    def status(self) -> dict[str, Any]:
        return {
            **self.limits.as_dict(),
            "throttled_requests": dict(self.throttled),
            "throttled_seconds": {k: round(v, 3) for k, v in self.throttled_seconds.items()},
        }


class NativeMetrics:
    """The tandem_volume_* I/O families of target/stats.py, from the counters above."""

    def __init__(
        self, volume: str, frontends: dict[str, Any], engine: ne.Engine | None = None
    ) -> None:
        self.volume = volume
        self.frontends = frontends  # name -> EngineDevice (with .stats)
        self.engine = engine

    def collect(self) -> Any:
        labels = ["volume", "frontend", "op"]
        ops = CounterMetricFamily("tandem_volume_ops", "I/O requests", labels=labels)
        nbytes = CounterMetricFamily("tandem_volume_bytes", "Bytes transferred", labels=labels)
        errors = CounterMetricFamily("tandem_volume_errors", "Failed requests", labels=labels)
        latency = HistogramMetricFamily(
            "tandem_volume_latency_seconds", "Request latency", labels=labels
        )
        for frontend, dev in self.frontends.items():
            for op, s in dev.stats.ops().items():
                key = [self.volume, frontend, op]
                ops.add_metric(key, s["ops"])
                nbytes.add_metric(key, s["bytes"])
                errors.add_metric(key, s["errors"])
                cum, buckets = 0, []
                for bound, n in zip([*_BUCKETS, float("inf")], s["lat"], strict=False):
                    cum += n
                    buckets.append((floatToGoString(bound), cum))
                latency.add_metric(key, buckets, s["lat_sum"])
        yield ops
        yield nbytes
        yield errors
        yield latency
        if self.engine is not None:
            st = self.engine.target_stats()
            requests = CounterMetricFamily(
                "tandem_engine_frontend_requests",
                "Frontend requests the native engine parsed",
                labels=["volume", "frontend"],
            )
            upcalls = CounterMetricFamily(
                "tandem_engine_frontend_upcalls",
                "Of them, requests the engine handed to Python",
                labels=["volume", "frontend"],
            )
            for fe in ("nbd", "iscsi"):
                requests.add_metric([self.volume, fe], st["frontend_requests"][fe])
                upcalls.add_metric([self.volume, fe], st["frontend_upcalls"][fe])
            yield requests
            yield upcalls
            members = CounterMetricFamily(
                "tandem_engine_member_requests",
                "Requests the native engine sent to replicas",
                labels=["volume"],
            )
            members.add_metric([self.volume], st["member_requests"])
            shared = CounterMetricFamily(
                "tandem_engine_member_shared_requests",
                "Of them, requests whose data went through memory shared with the replica",
                labels=["volume"],
            )
            shared.add_metric([self.volume], st["member_shared"])
            leaked = GaugeMetricFamily(
                "tandem_engine_shared_memory_set_aside_bytes",
                "Shared memory set aside until the replicas dropped with requests in it exit",
                labels=["volume"],
            )
            leaked.add_metric([self.volume], st["shm_leaked"])
            local = CounterMetricFamily(
                "tandem_engine_local_reads",
                "Reads served from the head file of a replica on this host, not through it",
                labels=["volume"],
            )
            local.add_metric([self.volume], st["local_reads"])
            yield members
            yield shared
            yield leaked
            yield local
            yield from poll_families("tandem_engine", self.volume, self.engine.poll_stats())

    def stats(self) -> dict[str, Any]:
        return {
            frontend: {
                op: {"ops": t[0], "bytes": t[1], "errors": t[2]}
                for op, t in dev.stats.totals.items()
            }
            for frontend, dev in self.frontends.items()
        }
