"""Prometheus families for engine counters that the target and the replica both have."""

from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily


def poll_families(prefix: str, volume: str, poll: dict[str, Any]) -> list[CounterMetricFamily]:
    """The engine's polling (Engine.poll_stats): polls by result, and the time they took."""
    polls = CounterMetricFamily(
        f"{prefix}_polls",
        "Polls of the engine's ring before sleeping: hit found work, miss slept",
        labels=["volume", "result"],
    )
    polls.add_metric([volume, "hit"], poll["hits"])
    polls.add_metric([volume, "miss"], poll["misses"])
    seconds = CounterMetricFamily(
        f"{prefix}_poll_seconds", "Time the engine spent polling", labels=["volume"]
    )
    seconds.add_metric([volume], poll["seconds"])
    return [polls, seconds]
