"""Kubernetes events on claims and volumes (what `kubectl describe` shows).

Like client-go's recorder, the same event repeated within ten minutes bumps the count of
the first one instead of adding another, so a claim retried with backoff keeps one line.
Recording never fails the operation it reports on: errors are logged.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from maya.provisioner.kube import Kube, KubeError

log = logging.getLogger(__name__)

NORMAL, WARNING = "Normal", "Warning"
AGGREGATE_SECONDS = 600.0
API_VERSIONS = {"PersistentVolumeClaim": "v1", "PersistentVolume": "v1"}


class EventRecorder:
    def __init__(self, kube: Kube, component: str, identity: str) -> None:
        self.kube, self.component, self.identity = kube, component, identity
        self._seen: dict[tuple[str, str, str, str], tuple[float, str, str, int]] = {}
        self._lock = threading.Lock()

    def event(self, obj: dict[str, Any], kind: str, type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"  # where cluster-scoped objects' go
        log.info("%s %s: %s %s", kind, meta["name"], reason, message)
        key = (meta.get("uid", ""), type_, reason, message)
        now = _now()
        with self._lock:
            self._prune()
            seen = self._seen.get(key)
        try:
            if seen is not None:
                _, name, ns, count = seen
                try:
                    self.kube.patch(
                        f"/api/v1/namespaces/{ns}/events/{name}",
                        {"count": count + 1, "lastTimestamp": now},
                    )
                    with self._lock:
                        self._seen[key] = (time.monotonic(), name, ns, count + 1)
                    return
                except KubeError as e:
                    if e.status != 404:
                        raise
            name = f"{meta['name']}.{time.time_ns():x}"
            self.kube.create(
                f"/api/v1/namespaces/{namespace}/events",
                {
                    "metadata": {"name": name, "namespace": namespace},
                    "involvedObject": {
                        "kind": kind,
                        "apiVersion": API_VERSIONS.get(kind, "v1"),
                        "namespace": meta.get("namespace"),
                        "name": meta["name"],
                        "uid": meta.get("uid"),
                        "resourceVersion": meta.get("resourceVersion"),
                    },
                    "reason": reason,
                    "message": message,
                    "type": type_,
                    "source": {"component": f"{self.component}_{self.identity}"},
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                    "count": 1,
                    "reportingComponent": self.component,
                    "reportingInstance": self.identity,
                },
            )
            with self._lock:
                self._seen[key] = (time.monotonic(), name, namespace, 1)
        except Exception as e:
            log.warning("could not record event %s on %s %s: %s", reason, kind, meta["name"], e)

    def _prune(self) -> None:
        cutoff = time.monotonic() - AGGREGATE_SECONDS
        for key in [k for k, v in self._seen.items() if v[0] < cutoff]:
            del self._seen[key]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
