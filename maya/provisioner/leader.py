"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does.

An instance becomes leader by writing its identity into the Lease when the Lease is free,
expired, or already its own; every write carries the resourceVersion read, so of two
instances racing only one succeeds. The leader renews every `retry_period`; it counts as
leader only while its last renewal is younger than `renew_deadline` (shorter than the lease
duration), so it stops acting before anyone else may take over. Others judge expiry by their
own clock: the lease is free once its record has not changed for `lease_duration` seconds
since they first saw it (no clock skew between machines matters).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from maya.provisioner.kube import Kube, KubeError

log = logging.getLogger(__name__)


class LeaseElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry period < renew deadline < lease duration")
        self.kube, self.identity = kube, identity
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.name = namespace, name
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self.retry_period = retry_period
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # monotonic time of our last successful write
        self.on_change: Callable[[bool], None] = lambda leading: None

    def is_leader(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and time.monotonic() - renewed < self.renew_deadline

    def run(self, on_started: Callable[[], None], stop: threading.Event) -> bool:
        """Wait to become leader, call `on_started`, keep renewing. Returns True when `stop`
        was set, False when leadership was lost (the caller should exit: whatever it
        started must not go on acting)."""
        while not stop.is_set():
            if self._try():
                break
            stop.wait(self.retry_period)
        if stop.is_set():
            return True
        log.info(
            "became leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity
        )
        self.on_change(True)
        on_started()
        while not stop.wait(self.retry_period):
            self._try()
            if not self.is_leader():
                log.error("lost the lease %s/%s: stopping", self.namespace, self.name)
                self.on_change(False)
                return False
        return True

    def release(self) -> None:
        """Give the lease up on a clean shutdown, so another instance takes over at once."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        self.on_change(False)
        try:
            lease = self.kube.get(self.path)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"].update(holderIdentity=None, leaseDurationSeconds=1, renewTime=_now())
            self.kube.replace(self.path, lease)
        except Exception as e:
            log.warning("could not release the lease: %s", e)

    def _try(self) -> bool:
        """Acquire or renew once; True when we hold the lease now."""
        try:
            ok = self._acquire_or_renew()
        except Exception as e:  # the API server may be briefly unreachable: retry
            log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            ok = False
        if ok:
            self._renewed_at = time.monotonic()
        return ok

    def _acquire_or_renew(self) -> bool:
        now = _now()
        duration = max(1, round(self.lease_duration))
        lease = self.kube.get(self.path)
        if lease is None:
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            return self._write(self.kube.create, self.collection, body)
        spec: dict[str, Any] = lease.setdefault("spec", {})
        holder = spec.get("holderIdentity") or ""
        record = (holder, str(spec.get("renewTime")))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        held_by_other = holder and holder != self.identity
        expired = time.monotonic() > self._observed_at + (spec.get("leaseDurationSeconds") or 0)
        if held_by_other and not expired:
            return False
        if holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + 1
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=duration, renewTime=now)
        return self._write(self.kube.replace, self.path, lease)

    @staticmethod
    def _write(call: Callable[[str, dict[str, Any]], Any], path: str, body: dict[str, Any]) -> bool:
        try:
            call(path, body)
        except KubeError as e:
            if e.status == 409:  # another instance wrote first
                return False
            raise
        return True


def _now() -> str:
    # MicroTime: RFC 3339 with exactly six fractional digits.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
