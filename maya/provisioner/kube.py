"""The Kubernetes API as plain JSON, over the official client's configuration and transport.

The official `kubernetes` client loads the kubeconfig or the in-cluster service account
(with token refresh) and does TLS; requests go through `ApiClient.call_api` with
`_preload_content=False`, so objects stay the API server's own JSON. That keeps the
provisioner independent of the client's generated models, which lag or lead the server's
API level (fields a 1.20 server omits, or sends, break their validation).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @classmethod
    def from_api(cls, e: ApiException) -> KubeError:
        message = str(e.reason or "")
        reason = ""
        try:
            doc = json.loads(e.body or b"{}")
            message, reason = doc.get("message", message), doc.get("reason", "")
        except (ValueError, TypeError):
            pass
        return cls(int(e.status or 0), reason, message)


class Kube:
    def __init__(self, kubeconfig: str | None = None) -> None:
        cfg = k8s.Configuration()
        try:
            if kubeconfig:
                k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
            else:
                k8s_config.load_incluster_config(client_configuration=cfg)
        except (k8s_config.ConfigException, yaml.YAMLError) as e:
            where = kubeconfig or "the pod's service account (no --kubeconfig given)"
            raise ValueError(f"Kubernetes configuration from {where}: {e}") from None
        if not cfg.verify_ssl:
            # The kubeconfig asked for it (insecure-skip-tls-verify); one warning per request
            # would bury the log.
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        self.server = cfg.host
        self.api = k8s.ApiClient(cfg)
        self.api.user_agent = "tandem-provisioner"  # who wrote what, in managedFields

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Sequence[tuple[str, str]] = (),
        content_type: str = "application/json",
        timeout: float | tuple[float, float] = 30.0,
    ) -> Any:
        resp = self._call(method, path, body, query, content_type, timeout)
        try:
            return json.loads(resp.data) if resp.data else {}
        finally:
            resp.release_conn()

    def _call(
        self,
        method: str,
        path: str,
        body: Any,
        query: Sequence[tuple[str, str]],
        content_type: str,
        timeout: float | tuple[float, float],
    ) -> Any:
        try:
            return self.api.call_api(
                path,
                method,
                query_params=list(query),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=timeout,
            )
        except ApiException as e:
            raise KubeError.from_api(e) from None

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type=MERGE_PATCH)

    def delete(self, path: str) -> bool:
        """True when deleted now, False when it was already gone."""
        try:
            self.request("DELETE", path)
        except KubeError as e:
            if e.status == 404:
                return False
            raise
        return True

    def watch(
        self, path: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[dict[str, Any]]:
        """Watch events after `resource_version` until the server ends the watch (after
        about `timeout_seconds`); bookmarks keep the version fresh on quiet resources."""
        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        # The read timeout outlives the server's own end of the watch: a silent, dead
        # connection is noticed instead of blocking forever.
        resp = self._call("GET", path, None, query, "application/json", (10, timeout_seconds + 30))
        try:
            for line in iter_resp_lines(resp):
                yield json.loads(line)
        finally:
            resp.release_conn()


def obj_key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
