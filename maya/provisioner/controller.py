"""The provisioner's control loops: claims -> volumes + PVs, released PVs -> deletion, grown
claims -> expansion.

Informers keep claims, PVs and StorageClasses cached and queue the keys of what changed
(plus everything every `resync` seconds, for what a lost watch event or an unreachable
Tandem apiserver left undone); workers take keys off the queue, never two the same key at
once, and compare what is with what should be:

- A Pending claim of ours (its class names us, the PV controller annotated it, and under
  WaitForFirstConsumer a node was selected) gets a Tandem volume `pvc-<uid>` and a PV of
  that name. Idempotent: the claim is read fresh and the PV and the volume looked up first,
  so a restart, a repeated event or a second worker never makes two volumes.
- A Released PV of ours with reclaim policy Delete: its volume is deleted, then the PV.
- A bound claim of ours requesting more than its PV holds: the volume is resized, then the
  PV's capacity and the claim's status.capacity follow.

Every outcome is an event on the claim (on the PV for deletion) and a metric.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maya.client import ApiClient, ApiError
from maya.provisioner import parameters, topology
from maya.provisioner.events import NORMAL, WARNING, EventRecorder
from maya.provisioner.informer import Informer
from maya.provisioner.kube import Kube, KubeError, obj_key
from maya.provisioner.metrics import ProvisionerMetrics
from maya.provisioner.parameters import ProvisioningError
from maya.provisioner.pvspec import PROVISIONED_BY, VOLUME_LABEL, persistent_volume, volume_name
from maya.provisioner.quantity import format_bytes, parse_bytes
from maya.provisioner.workqueue import WorkQueue
from maya.validation import format_size
from replica.faults import crash_point

log = logging.getLogger(__name__)

# Set by the PV controller on claims it leaves to an external provisioner (1.20 sets the
# beta one only; newer releases set both).
STORAGE_PROVISIONER = (
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
)
CLASS_ANNOTATION = "volume.beta.kubernetes.io/storage-class"
CLAIMS = "/api/v1/persistentvolumeclaims"
PVS = "/api/v1/persistentvolumes"
CLASSES = "/apis/storage.k8s.io/v1/storageclasses"


@dataclass
class Config:
    name: str = "tandem.io/iscsi"
    identity: str = "provisioner"
    workers: int = 4
    resync: float = 300.0
    create_wait: float = 30.0  # seconds a create call waits for the volume to leave Pending


class Requeue(Exception):
    """Not an error: look again after `delay` seconds."""

    def __init__(self, delay: float, why: str) -> None:
        super().__init__(why)
        self.delay = delay


class Provisioner:
    def __init__(
        self,
        kube: Kube,
        tandem: Callable[[], ApiClient],
        config: Config,
        recorder: EventRecorder,
        metrics: ProvisionerMetrics,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.kube, self.config = kube, config
        self._tandem = tandem
        self._local = threading.local()
        self.recorder, self.metrics, self.is_leader = recorder, metrics, is_leader
        self.name = config.name
        self.queue = WorkQueue()
        self.claims = Informer(kube, CLAIMS, self._on_claim)
        self.pvs = Informer(kube, PVS, self._on_pv)
        self.classes = Informer(kube, CLASSES, self._on_class)
        self._started: dict[tuple[str, str], float] = {}  # (operation, uid) -> first attempt
        self._refused: dict[str, tuple[str, str]] = {}  # claim uid -> (claim rv, class rv)

    @property
    def tandem(self) -> ApiClient:
        """One client per worker thread."""
        api = getattr(self._local, "api", None)
        if api is None:
            api = self._local.api = self._tandem()
        return api

    # --- running ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        informers = (self.classes, self.pvs, self.claims)
        for inf in informers:
            threading.Thread(target=inf.run, args=(stop,), name=inf.path, daemon=True).start()
        while not all(inf.synced.is_set() for inf in informers):  # classes known before claims
            if stop.wait(0.1):
                return
        log.info("caches synced; %d worker(s) start", self.config.workers)
        for i in range(self.config.workers):
            threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True).start()
        while not stop.wait(self.config.resync):
            self.resync()
        self.queue.shut_down()

    def resync(self) -> None:
        for pvc in self.claims.items():
            self.queue.add(("claim", obj_key(pvc)))
        for pv in self.pvs.items():
            if self._ours(pv):
                self.queue.add(("pv", obj_key(pv)))

    def _worker(self) -> None:
        while (item := self.queue.get()) is not None:
            kind, key = item  # type: ignore[misc]
            try:
                if not self.is_leader():
                    continue  # about to stop: act no more
                if kind == "claim":
                    self.sync_claim(key)
                else:
                    self.sync_pv(key)
                self.queue.forget(item)
            except Requeue as r:
                log.debug("%s %s: again in %.1fs: %s", kind, key, r.delay, r)
                self.queue.add_after(item, r.delay)
            except Exception as e:  # noted where it happened; back off and try again
                delay = self.queue.add_rate_limited(item)
                log.warning("%s %s: %s (retry in %.1fs)", kind, key, e, delay)
            finally:
                self.queue.done(item)

    def _on_claim(self, kind: str, pvc: dict[str, Any]) -> None:
        if kind == "DELETED":
            uid = pvc["metadata"].get("uid", "")
            self._refused.pop(uid, None)
            for op in ("provision", "expand"):
                self._started.pop((op, uid), None)
            return
        self.queue.add(("claim", obj_key(pvc)))

    def _on_pv(self, kind: str, pv: dict[str, Any]) -> None:
        if kind != "DELETED" and self._ours(pv):
            self.queue.add(("pv", obj_key(pv)))

    def _on_class(self, kind: str, sc: dict[str, Any]) -> None:
        # A claim can name a class made after it: look at its claims again.
        if kind == "ADDED" and sc.get("provisioner") == self.name and self.claims.synced.is_set():
            for pvc in self.claims.items():
                if _class_name(pvc) == sc["metadata"]["name"]:
                    self.queue.add(("claim", obj_key(pvc)))

    def _ours(self, pv: dict[str, Any]) -> bool:
        annotations = pv["metadata"].get("annotations") or {}
        return annotations.get(PROVISIONED_BY) == self.name

    # --- claims -------------------------------------------------------------------------

    def sync_claim(self, key: str) -> None:
        pvc = self.claims.get(key)
        if pvc is None or pvc["metadata"].get("deletionTimestamp"):
            return
        sc = self.classes.get(_class_name(pvc) or "")
        if sc is None or sc.get("provisioner") != self.name:
            return
        if (pvc.get("spec") or {}).get("volumeName"):
            if (pvc.get("status") or {}).get("phase") == "Bound":
                self.expand(pvc, sc)
            return
        annotations = pvc["metadata"].get("annotations") or {}
        if not any(annotations.get(a) == self.name for a in STORAGE_PROVISIONER):
            return  # the PV controller has not handed it to us (yet)
        if (pvc.get("status") or {}).get("phase", "Pending") != "Pending":
            return
        if sc.get("volumeBindingMode") == "WaitForFirstConsumer" and not topology.selected_node(
            pvc
        ):
            return  # the scheduler picks a node first
        refused = (
            pvc["metadata"].get("resourceVersion", ""),
            sc["metadata"].get("resourceVersion", ""),
        )
        if self._refused.get(pvc["metadata"]["uid"]) == refused:
            return  # refused before, and neither claim nor class changed since
        self.provision(pvc, sc)

    def provision(self, pvc: dict[str, Any], sc: dict[str, Any]) -> None:
        meta = pvc["metadata"]
        ns, uid = meta["namespace"], meta["uid"]
        name = volume_name(pvc)
        # Fresh from the API server, not the cache: never make a volume for a claim that is
        # gone, bound, or already has its PV (a stale event after a delete would leak one).
        fresh = self.kube.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{meta['name']}")
        if (
            fresh is None
            or fresh["metadata"]["uid"] != uid
            or (fresh.get("spec") or {}).get("volumeName")
            or fresh["metadata"].get("deletionTimestamp")
        ):
            return
        if self.kube.get(f"{PVS}/{name}") is not None:
            return
        started = self._started.setdefault(("provision", uid), time.monotonic())
        try:
            params = parameters.class_parameters(sc.get("parameters"), ns)
            request = parameters.claim_request(fresh)
            body = self._volume_body(fresh, name, params, request)
            candidates = self._placements(sc, fresh)
            vol = self.tandem_volume(name)
            if vol is None:
                self.recorder.event(
                    fresh,
                    "PersistentVolumeClaim",
                    NORMAL,
                    "Provisioning",
                    f'External provisioner is provisioning volume for claim "{ns}/{meta["name"]}"',
                )
                vol = self._create(body, candidates)
                crash_point("provisioner.after_volume_create")
        except ProvisioningError as e:
            self._provision_failed(fresh, sc, e)
            return
        except ApiError as e:
            err = ProvisioningError(_api_text(e), permanent=False, reason=_api_reason(e))
            self._provision_failed(fresh, sc, err)
            return
        except KubeError as e:  # e.g. the CHAP Secret or the selected node unreadable
            err = ProvisioningError(f"Kubernetes API: {e}", permanent=False, reason="KubernetesApi")
            self._provision_failed(fresh, sc, err)
            return
        if vol.get("phase") == "Failed":
            err = ProvisioningError(
                f"volume {name} failed: {vol.get('message')}",
                permanent=False,
                reason="VolumeFailed",
            )
            self._provision_failed(fresh, sc, err)
            return
        if vol.get("phase") == "Deleting":
            raise Requeue(_patience(started), f"volume {name} is still being deleted")
        if vol.get("phase") == "Pending" or not vol.get("target_portal"):
            raise Requeue(_patience(started), f"volume {name} is still starting")
        placement = _used_placement(candidates, vol)
        pv = persistent_volume(fresh, sc, vol, params, request, placement, self.name)
        try:
            self.kube.create(PVS, pv)
        except KubeError as e:
            if e.status != 409:  # 409: made before (we restarted after creating it)
                self.metrics.failure("provision", "KubernetesApi")
                self.recorder.event(
                    fresh,
                    "PersistentVolumeClaim",
                    WARNING,
                    "ProvisioningFailed",
                    f"volume {name} is ready but its PersistentVolume could not be made: {e}",
                )
                raise
        self._started.pop(("provision", uid), None)
        self.metrics.success("provision", time.monotonic() - started)
        self.recorder.event(
            fresh,
            "PersistentVolumeClaim",
            NORMAL,
            "ProvisioningSucceeded",
            f"Successfully provisioned volume {name}: {format_size(vol['size'])}, "
            f"{vol['replica_count']} replica(s), portal {vol['target_portal']} {vol['iqn']}",
        )

    def _provision_failed(
        self, pvc: dict[str, Any], sc: dict[str, Any], e: ProvisioningError
    ) -> None:
        self.metrics.failure("provision", e.reason)
        self.recorder.event(
            pvc,
            "PersistentVolumeClaim",
            WARNING,
            "ProvisioningFailed",
            f"failed to provision volume with StorageClass {sc['metadata']['name']!r}: {e}",
        )
        if e.permanent:
            meta = pvc["metadata"]
            self._refused[meta["uid"]] = (
                meta.get("resourceVersion", ""),
                sc["metadata"].get("resourceVersion", ""),
            )
            return
        raise e  # retried with backoff

    def _volume_body(
        self,
        pvc: dict[str, Any],
        name: str,
        params: parameters.ClassParameters,
        request: parameters.ClaimRequest,
    ) -> dict[str, Any]:
        meta = pvc["metadata"]
        body: dict[str, Any] = {
            "name": name,
            "size": request.size,
            "replica_count": params.replica_count,
            "frontends": params.frontends,
            "qos": params.qos,
            "namespace": meta["namespace"],
            "labels": {
                "tandem.io/provisioner": self.name.replace("/", "-"),
                "tandem.io/pvc-namespace": meta["namespace"],
                "tandem.io/pvc-name": meta["name"],
                "tandem.io/pvc-uid": meta["uid"],
            },
        }
        if params.chap_secret is not None:
            ns, secret_name = params.chap_secret
            secret = self.kube.get(f"/api/v1/namespaces/{ns}/secrets/{secret_name}")
            if secret is None:
                raise ProvisioningError(
                    f"CHAP Secret {ns}/{secret_name} not found", permanent=False, reason="NoSecret"
                )
            body["chap"] = parameters.chap_credentials(secret, params.chap_secret)
        return body

    def _placements(self, sc: dict[str, Any], pvc: dict[str, Any]) -> list[topology.Placement]:
        selected = topology.selected_node(pvc)
        labels: dict[str, str] | None = None
        tandem_nodes: set[str] = set()
        if selected is not None:
            node = self.kube.get(f"/api/v1/nodes/{selected}")
            labels = (node or {}).get("metadata", {}).get("labels") if node else None
            tandem_nodes = {n["name"] for n in self.tandem.get("/v1/nodes") if n.get("ready")}
        return topology.candidates(sc, pvc, labels, tandem_nodes)

    def tandem_volume(self, name: str) -> dict[str, Any] | None:
        try:
            return self.tandem.get(f"/v1/volumes/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def _create(self, body: dict[str, Any], candidates: list[topology.Placement]) -> dict[str, Any]:
        """Create the volume in the first placement that fits; a 409 for the name means it
        exists (a racing attempt made it): look it up."""
        last: ApiError | None = None
        for placement in candidates:
            doc = {**body, "topology": placement.topology}
            if placement.node is not None:
                doc["node"] = placement.node
            try:
                return self.tandem.post(
                    "/v1/volumes",
                    doc,
                    params={"wait": self.config.create_wait},
                    timeout=self.config.create_wait + 30,
                )
            except ApiError as e:
                if e.status == 409:
                    vol = self.tandem_volume(body["name"])
                    if vol is not None:
                        return vol
                    last = e  # cannot be placed here: the next candidate
                    continue
                raise
        assert last is not None
        raise last

    # --- deletion -----------------------------------------------------------------------

    def sync_pv(self, key: str) -> None:
        pv = self.pvs.get(key)
        if pv is None or not self._ours(pv):
            return
        if not _released_for_delete(pv):
            return
        fresh = self.kube.get(f"{PVS}/{key}")  # a destructive step: decide on fresh state
        if fresh is None or not self._ours(fresh) or not _released_for_delete(fresh):
            return
        if fresh["metadata"].get("deletionTimestamp"):
            return  # deleted already; pv-protection's finalizer is what keeps it visible
        uid = fresh["metadata"]["uid"]
        started = self._started.setdefault(("delete", uid), time.monotonic())
        volume = (fresh["metadata"].get("labels") or {}).get(VOLUME_LABEL) or key
        try:
            # 202 while its processes and data are removed, 404 once gone: only then the PV.
            try:
                self.tandem.delete(f"/v1/volumes/{volume}")
            except ApiError as e:
                if e.status != 404:
                    raise
            else:
                raise Requeue(_patience(started), f"volume {volume} is being deleted")
            deleted = self.kube.delete(f"{PVS}/{key}")
        except Requeue:
            raise
        except (ApiError, KubeError) as e:
            self.metrics.failure(
                "delete", _api_reason(e) if isinstance(e, ApiError) else "KubernetesApi"
            )
            text = _api_text(e) if isinstance(e, ApiError) else str(e)
            self.recorder.event(fresh, "PersistentVolume", WARNING, "VolumeFailedDelete", text)
            raise
        self._started.pop(("delete", uid), None)
        if not deleted:
            return  # someone else removed it meanwhile: nothing of ours to report
        self.metrics.success("delete", time.monotonic() - started)
        self.recorder.event(
            fresh,
            "PersistentVolume",
            NORMAL,
            "VolumeDeleted",
            f"deleted volume {volume} and its PersistentVolume",
        )

    # --- expansion ----------------------------------------------------------------------

    def expand(self, pvc: dict[str, Any], sc: dict[str, Any]) -> None:
        pv_name = pvc["spec"]["volumeName"]
        pv = self.pvs.get(pv_name) or self.kube.get(f"{PVS}/{pv_name}")
        if pv is None or not self._ours(pv):
            return
        meta = pvc["metadata"]
        uid = meta["uid"]
        try:
            requested = parameters.volume_size(str(pvc["spec"]["resources"]["requests"]["storage"]))
        except (ProvisioningError, KeyError):
            return  # the API server only lets valid sizes through; nothing to grow to
        current = parse_bytes(pv["spec"]["capacity"]["storage"])
        status = (pvc.get("status") or {}).get("capacity", {}).get("storage")
        if requested <= current:
            if status is not None and parse_bytes(status) < requested:
                self._claim_capacity(pvc, current)  # an expansion stopped half-way
            return
        if not sc.get("allowVolumeExpansion"):
            return  # the API server refuses such claims; nothing to do if one got through
        started = self._started.setdefault(("expand", uid), time.monotonic())
        volume = (pv["metadata"].get("labels") or {}).get(VOLUME_LABEL) or pv_name
        self.recorder.event(
            pvc,
            "PersistentVolumeClaim",
            NORMAL,
            "Resizing",
            f"External resizer is resizing volume {pv_name}",
        )
        try:
            self._claim_conditions(pvc, [_condition("Resizing")])
            self.tandem.post(f"/v1/volumes/{volume}/resize", {"size": requested}, timeout=180)
            self.kube.patch(
                f"{PVS}/{pv_name}", {"spec": {"capacity": {"storage": format_bytes(requested)}}}
            )
        except ApiError as e:
            self.metrics.failure("expand", _api_reason(e))
            self.recorder.event(
                pvc, "PersistentVolumeClaim", WARNING, "VolumeResizeFailed", _api_text(e)
            )
            if e.status == 422:  # e.g. shrinking: the API server forbids it, so rarely seen
                return
            raise
        except KubeError as e:
            self.metrics.failure("expand", "KubernetesApi")
            self.recorder.event(pvc, "PersistentVolumeClaim", WARNING, "VolumeResizeFailed", str(e))
            raise
        self._claim_capacity(pvc, requested)
        self._started.pop(("expand", uid), None)
        self.metrics.success("expand", time.monotonic() - started)
        self.recorder.event(
            pvc,
            "PersistentVolumeClaim",
            NORMAL,
            "VolumeResizeSuccessful",
            f"resize volume {pv_name} to {format_size(requested)} succeeded "
            "(a filesystem on it grows when resized on the node)",
        )

    def _claim_capacity(self, pvc: dict[str, Any], size: int) -> None:
        meta = pvc["metadata"]
        self.kube.patch(
            f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}/status",
            {"status": {"capacity": {"storage": format_bytes(size)}, "conditions": None}},
        )

    def _claim_conditions(self, pvc: dict[str, Any], conditions: list[dict[str, Any]]) -> None:
        meta = pvc["metadata"]
        self.kube.patch(
            f"/api/v1/namespaces/{meta['namespace']}/persistentvolumeclaims/{meta['name']}/status",
            {"status": {"conditions": conditions}},
        )


def _class_name(pvc: dict[str, Any]) -> str | None:
    name = (pvc.get("spec") or {}).get("storageClassName")
    if name is None:
        name = (pvc["metadata"].get("annotations") or {}).get(CLASS_ANNOTATION)
    return name


def _released_for_delete(pv: dict[str, Any]) -> bool:
    return (pv.get("status") or {}).get("phase") == "Released" and (
        pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete"
    )


def _used_placement(
    candidates: list[topology.Placement], vol: dict[str, Any]
) -> topology.Placement:
    """The candidate the volume was made with (it may have been made before a restart)."""
    for p in candidates:
        if p.topology == (vol.get("topology") or {}) and (
            p.node is None or p.node == vol.get("node")
        ):
            return p
    return candidates[0]


def _patience(started: float) -> float:
    """Seconds until the next look at something in progress: soon at first, then less
    often (a volume whose node is down may take long)."""
    return min(0.5 + (time.monotonic() - started) / 4, 10.0)


def _condition(kind: str) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"type": kind, "status": "True", "lastTransitionTime": now}


def _api_reason(e: ApiError) -> str:
    if e.status == 0:
        return "TandemUnreachable"
    if e.status == 409 and "cannot place" in e.detail:
        return "PlacementFailed"
    if e.status in (400, 422):
        return "Rejected"
    return f"TandemApi{e.status}"


def _api_text(e: ApiError) -> str:
    if e.status == 0:
        return f"the Tandem apiserver is unreachable: {e.detail}"
    return f"the Tandem apiserver refused: {e.detail}"
