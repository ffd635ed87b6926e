"""What the Kubernetes tests share: objects in and out of the test cluster, waiting, and
`tandem provisioner` processes."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from maya.provisioner.kube import Kube, KubeError
from tests.kube.testenv import ControlPlane
from tests.mayalab import Lab, free_port

ROOT = Path(__file__).resolve().parents[2]


def wait(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(KubeError, httpx.HTTPError, KeyError):
            last = cond()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r:.2000})")


class Cluster:
    """The test cluster as its admin sees it (objects as JSON dicts)."""

    def __init__(self, env: ControlPlane) -> None:
        self.env = env
        self.api = Kube(str(env.kubeconfig))

    def apply(self, *docs: dict[str, Any]) -> None:
        # Classes (and the rest) before claims: a claim whose class the PV controller has
        # not seen yet waits for its next pass over claims (15 s).
        claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        others = [d for d in docs if d["kind"] != "PersistentVolumeClaim"]
        for items in (others, claims):
            if items:
                doc = {"apiVersion": "v1", "kind": "List", "items": items}
                self.env.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def pvc(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.api.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}")

    def pv(self, name: str) -> dict[str, Any] | None:
        return self.api.get(f"/api/v1/persistentvolumes/{name}")

    def wait_bound(self, ns: str, name: str, timeout: float = 30) -> tuple[dict, dict]:
        def bound() -> dict[str, Any] | None:
            pvc = self.pvc(ns, name)
            return pvc if pvc and pvc.get("status", {}).get("phase") == "Bound" else None

        pvc = wait(bound, timeout, f"claim {ns}/{name} Bound")
        pv = self.pv(pvc["spec"]["volumeName"])
        assert pv is not None and pv["status"]["phase"] == "Bound", pv
        return pvc, pv

    def events(self, ns: str, name: str) -> list[dict[str, Any]]:
        doc = self.api.request(
            "GET",
            f"/api/v1/namespaces/{ns}/events",
            query=[("fieldSelector", f"involvedObject.name={name}")],
        )
        return sorted(doc["items"], key=lambda e: e.get("firstTimestamp") or "")

    def wait_event(
        self, ns: str, name: str, reason: str, source: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """The first event `reason` on ns/name (from component `source` only, if given: the
        PV controller reports some of the same reasons)."""

        def found() -> dict[str, Any] | None:
            for e in self.events(ns, name):
                if e["reason"] == reason and source in (None, e["source"].get("component")):
                    return e
            return None

        return wait(found, timeout, f"event {reason} on {ns}/{name}")

    def delete(self, path: str) -> None:
        self.api.delete(path)


def storage_class(name: str, provisioner: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("reclaimPolicy", "Delete")
    spec.setdefault("volumeBindingMode", "Immediate")
    spec["parameters"] = {k: str(v) for k, v in (spec.get("parameters") or {}).items()}
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": provisioner,
        **spec,
    }


def claim(
    ns: str,
    name: str,
    storage_class: str,
    size: str = "64Mi",
    modes: tuple[str, ...] = ("ReadWriteOnce",),
    block: bool = False,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
        "spec": {
            "accessModes": list(modes),
            "storageClassName": storage_class,
            "volumeMode": "Block" if block else "Filesystem",
            "resources": {"requests": {"storage": size}},
        },
    }


class Provisioner:
    """A `tandem provisioner` process against the test cluster and the Tandem lab."""

    def __init__(
        self,
        name: str,
        kubeconfig: Path,
        lab: Lab,
        log_dir: Path,
        identity: str,
        lease_namespace: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.identity = name, identity
        self.metrics_port = free_port("127.0.0.1")
        self.log = log_dir / f"provisioner-{identity}.log"
        self.args = [
            sys.executable,
            "-m",
            "maya",
            "provisioner",
            "--kubeconfig",
            str(kubeconfig),
            "--apiserver",
            lab.url,
            "--token-file",
            str(lab.home / "apiserver.token"),
            "--name",
            name,
            "--identity",
            identity,
            "--lease-namespace",
            lease_namespace,
            "--lease-duration",
            "3",
            "--renew-deadline",
            "2",
            "--retry-period",
            "0.5",
            "--resync",
            "30",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
        ]
        # The lab's marker in the environment: the lab's cleanup finds strays too.
        self.env = {**lab.env, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Provisioner:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(tandem_provisioner_\w+(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def count(self, operation: str, result: str = "success") -> float:
        key = f'tandem_provisioner_operations_total{{operation="{operation}",result="{result}"}}'
        return self.metrics().get(key, 0.0)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
