"""The apiserver's calls to volume targets' REST APIs (see target/api.py)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from prometheus_client.parser import text_string_to_metric_families


class TargetUnreachable(Exception):
    pass


class TargetClient:
    def __init__(self, timeout: float = 3.0) -> None:
        self.http = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        await self.http.aclose()

    async def request(
        self, api: str, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> httpx.Response:
        try:
            return await self.http.request(
                method,
                f"http://{api}{path}",
                json=body,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as e:
            raise TargetUnreachable(f"{type(e).__name__}: {e}".rstrip(": ")) from e

    async def status(self, api: str) -> dict[str, Any]:
        r = await self.request(api, "GET", "/v1/volume")
        if r.status_code != 200:
            raise TargetUnreachable(f"GET /v1/volume answered {r.status_code}")
        return r.json()

    async def counters(self, api: str) -> dict[str, float]:
        """I/O totals summed over frontends, for rates (see stats_between)."""
        r = await self.request(api, "GET", "/metrics")
        if r.status_code != 200:
            raise TargetUnreachable(f"GET /metrics answered {r.status_code}")
        return parse_counters(r.text)

    async def add_replica(self, api: str, address: str) -> httpx.Response:
        return await self.request(api, "POST", "/v1/volume/replicas", {"address": address})

    async def remove_replica(self, api: str, address: str) -> httpx.Response:
        return await self.request(api, "DELETE", f"/v1/volume/replicas/{quote(address, safe='')}")


def parse_counters(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    wanted = {
        "tandem_volume_ops_total": "ops",
        "tandem_volume_bytes_total": "bytes",
        "tandem_volume_latency_seconds_sum": "latency_sum",
        "tandem_volume_latency_seconds_count": "latency_count",
    }
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            kind = wanted.get(s.name)
            op = s.labels.get("op")
            if kind is None or op not in ("read", "write"):
                continue
            key = f"{op}_{kind}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def stats_between(
    a: tuple[float, dict[str, float]], b: tuple[float, dict[str, float]]
) -> dict[str, Any]:
    """Rates between two (monotonic time, counters) samples."""
    (t0, c0), (t1, c1) = a, b
    dt = max(t1 - t0, 1e-6)

    def delta(key: str) -> float:
        return max(0.0, c1.get(key, 0.0) - c0.get(key, 0.0))

    def latency(op: str) -> float | None:
        n = delta(f"{op}_latency_count")
        return round(1000 * delta(f"{op}_latency_sum") / n, 3) if n else None

    return {
        "interval_seconds": round(dt, 3),
        "read_iops": round(delta("read_ops") / dt, 1),
        "write_iops": round(delta("write_ops") / dt, 1),
        "read_bps": round(delta("read_bytes") / dt, 1),
        "write_bps": round(delta("write_bytes") / dt, 1),
        "read_latency_ms": latency("read"),
        "write_latency_ms": latency("write"),
    }
