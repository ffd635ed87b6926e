"""The provisioner's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OPERATIONS = ("provision", "delete", "expand")


class ProvisionerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.operations = Counter(
            "tandem_provisioner_operations_total",
            "Finished provisioner operations by result (success or failure; a failure that is "
            "retried counts once per attempt).",
            ["operation", "result"],
            registry=self.registry,
        )
        self.failures = Counter(
            "tandem_provisioner_failures_total",
            "Failed attempts by reason.",
            ["operation", "reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tandem_provisioner_operation_duration_seconds",
            "Seconds from the first attempt to success (retries included).",
            ["operation"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.leader = Gauge(
            "tandem_provisioner_leader",
            "1 while this instance holds the lease and acts, else 0.",
            registry=self.registry,
        )
        for op in OPERATIONS:  # every series exists from the start (rates of 0, not absent)
            for result in ("success", "failure"):
                self.operations.labels(op, result)
            self.duration.labels(op)

    def success(self, operation: str, seconds: float) -> None:
        self.operations.labels(operation, "success").inc()
        self.duration.labels(operation).observe(seconds)

    def failure(self, operation: str, reason: str) -> None:
        self.operations.labels(operation, "failure").inc()
        self.failures.labels(operation, reason).inc()
