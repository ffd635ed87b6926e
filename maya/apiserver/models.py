"""The apiserver's request and response documents (they make its OpenAPI schema)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maya.validation import NAME_PATTERN, parse_rate, parse_size

Frontend = Literal["iscsi", "nbd"]
Phase = Literal["Pending", "Healthy", "Degraded", "Rebuilding", "ReadOnly", "Failed", "Deleting"]

_PRINTABLE = r"^[\x21-\x7e]+$"
_LABEL_KEY = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,251}[A-Za-z0-9])?$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Chap(Strict):
    """CHAP credentials initiators must log in with (RFC 7143); mutual when both pairs."""

    user: str = Field(min_length=1, max_length=255, pattern=_PRINTABLE)
    secret: str = Field(min_length=12, max_length=255, pattern=_PRINTABLE)
    mutual_user: str | None = Field(None, min_length=1, max_length=255, pattern=_PRINTABLE)
    mutual_secret: str | None = Field(None, min_length=12, max_length=255, pattern=_PRINTABLE)

    @model_validator(mode="after")
    def _pairs(self) -> Chap:
        if (self.mutual_user is None) != (self.mutual_secret is None):
            raise ValueError("mutual_user and mutual_secret go together")
        if self.mutual_secret is not None and self.mutual_secret == self.secret:
            raise ValueError("the mutual CHAP secret must differ from the CHAP secret")
        return self


_RATE = 10**12


class Qos(Strict):
    """Per-volume limits, 0 = unlimited; a PUT replaces them all."""

    read_iops: int = Field(0, ge=0, le=_RATE, description="read requests per second")
    write_iops: int = Field(0, ge=0, le=_RATE, description="write requests per second")
    total_iops: int = Field(0, ge=0, le=_RATE, description="all requests per second")
    read_bps: int = Field(0, ge=0, le=_RATE, description="bytes read per second")
    write_bps: int = Field(0, ge=0, le=_RATE, description="bytes written per second")
    total_bps: int = Field(0, ge=0, le=_RATE, description="bytes read+written per second")
    burst_seconds: float = Field(
        1.0, ge=0, le=60, description="seconds of rate an idle volume saves"
    )
    rebuild_bps: int = Field(
        0, ge=0, le=_RATE, description="rebuild bandwidth per rebuilding replica (separate)"
    )

    def io_limits(self) -> dict[str, Any]:
        return self.model_dump(exclude={"rebuild_bps"})


class Ports(Strict):
    """Fixed target ports (default: the node's agent picks free ones)."""

    nbd: int | None = Field(None, ge=1, le=65535)
    iscsi: int | None = Field(None, ge=1, le=65535)


class VolumeCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=63, description="DNS-1123 label")
    size: int | str = Field(description="bytes, or 10G / 10Gi / 10GiB (binary units)")
    replica_count: int = Field(3, ge=1, le=9)
    frontends: list[Frontend] = Field(default_factory=lambda: ["iscsi", "nbd"], min_length=1)
    qos: Qos = Field(default_factory=Qos)
    chap: Chap | None = None
    allowed_initiators: list[str] = Field(
        default_factory=list, max_length=64, description="initiator IQNs; empty = any"
    )
    topology: dict[str, list[str]] = Field(
        default_factory=dict,
        description="node label constraints: every key must have one of its values",
    )
    node: str | None = Field(
        None, max_length=253, description="run the target on this node (e.g. selected-node)"
    )
    ports: Ports = Field(default_factory=Ports)
    namespace: str = Field("default", pattern=NAME_PATTERN, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("size")
    @classmethod
    def _size(cls, v: int | str) -> int:
        return parse_size(v)

    @field_validator("frontends")
    @classmethod
    def _frontends(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a frontend is listed twice")
        return v

    @field_validator("allowed_initiators")
    @classmethod
    def _initiators(cls, v: list[str]) -> list[str]:
        for iqn in v:
            if not iqn or len(iqn) > 223 or not iqn.isprintable() or " " in iqn:
                raise ValueError(f"invalid initiator name {iqn!r}")
        return v

    @field_validator("topology")
    @classmethod
    def _topology(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, values in v.items():
            if not re.match(_LABEL_KEY, key):
                raise ValueError(f"invalid topology key {key!r}")
            if not values:
                raise ValueError(f"topology key {key!r} lists no values")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.match(_LABEL_KEY, key) or len(value) > 253:
                raise ValueError(f"invalid label {key!r}")
        return v


class Resize(Strict):
    size: int | str = Field(description="the new, larger size")

    @field_validator("size")
    @classmethod
    def _size(cls, v: int | str) -> int:
        return parse_size(v)


class SnapshotCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=63)


class RebuildRate(Strict):
    bytes_per_second: int | str

    @field_validator("bytes_per_second")
    @classmethod
    def _rate(cls, v: int | str) -> int:
        return parse_rate(v)


# --- nodes (written by agents) ---------------------------------------------------------


class PoolReport(Strict):
    name: str = Field(min_length=1, max_length=253)
    path: str = Field(max_length=4096)
    capacity: int = Field(ge=0, description="bytes the pool may hold")
    available: int = Field(0, ge=0, description="bytes free on its filesystem now")


class ProcessReport(Strict):
    id: str = Field(max_length=64)
    volume: str = Field(max_length=63)
    role: Literal["replica", "target"]
    state: Literal["starting", "running", "backoff", "stopped", "failed"]
    pid: int | None = None
    restarts: int = Field(0, ge=0)
    addresses: dict[str, str] = Field(
        default_factory=dict, description="data, api, nbd, iscsi: HOST:PORT"
    )
    error: str | None = Field(None, max_length=2000)


class NodeReport(Strict):
    """What an agent sends to register and on every heartbeat."""

    address: str = Field(min_length=1, max_length=253, description="where its processes listen")
    agent_url: str | None = Field(None, max_length=2048)
    labels: dict[str, str] = Field(default_factory=dict)
    pools: list[PoolReport] = Field(default_factory=list, max_length=64)
    processes: list[ProcessReport] = Field(default_factory=list, max_length=10000)
    applied_revision: int = Field(0, ge=0)
    version: str | None = Field(None, max_length=64)


class PoolView(BaseModel):
    name: str
    path: str
    capacity: int
    free: int
    available: int
    replicas: int


class NodeView(BaseModel):
    name: str
    address: str
    agent_url: str | None
    labels: dict[str, str]
    ready: bool
    last_heartbeat_seconds: float | None
    pools: list[PoolView]
    processes: list[dict[str, Any]]


class Assignments(BaseModel):
    cluster_id: str
    revision: int
    processes: list[dict[str, Any]]


# --- volumes -------------------------------------------------------------------------


class ReplicaView(BaseModel):
    id: str
    node: str
    pool: str
    address: str | None
    state: str = Field(description="Scheduled, Starting, Running, NodeLost, Removing, ...")
    mode: str | None = Field(description="RW, WO (rebuilding), ERR; None while unknown")
    error: str | None = None
    rebuild: dict[str, Any] | None = None


class TargetView(BaseModel):
    id: str
    node: str
    state: str
    api: str | None
    error: str | None = None


class EventView(BaseModel):
    time: float
    type: str
    message: str


class VolumeView(BaseModel):
    name: str
    uid: str
    namespace: str
    size: int
    replica_count: int
    phase: Phase
    message: str | None
    readonly: bool | None
    frontends: list[str]
    target_portal: str | None = Field(description="iSCSI portal HOST:PORT")
    iqn: str | None
    lun: int | None
    nbd_uri: str | None
    target: TargetView | None
    replicas: list[ReplicaView]
    qos: Qos
    chap: dict[str, str | None] | None = Field(description="user names only, never secrets")
    allowed_initiators: list[str]
    topology: dict[str, list[str]]
    node: str | None
    labels: dict[str, str]
    created: float
    events: list[EventView]


class VolumeStats(BaseModel):
    name: str
    interval_seconds: float | None
    read_iops: float
    write_iops: float
    read_bps: float
    write_bps: float
    read_latency_ms: float | None
    write_latency_ms: float | None
    totals: dict[str, int]
