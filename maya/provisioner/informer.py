"""A cache of one kind of Kubernetes object kept current by list + watch.

List once (paged), then watch from the list's resourceVersion; when the server ends a
watch (its timeout), watch again from the last version seen (bookmarks keep it fresh);
only a 410 Gone (the version was compacted away) or an error makes it list again. Every
change is handed to `on_event(type, obj)`; objects that vanished while it was not
watching are handed over as DELETED after a relist. No polling: a quiet cluster costs one
open watch per kind.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from maya.provisioner.kube import Kube, KubeError, obj_key

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], None]
PAGE = 500


class _Expired(Exception):
    """The watch's resourceVersion is too old: list again."""


class Informer:
    def __init__(self, kube: Kube, path: str, on_event: Handler, watch_seconds: int = 300):
        self.kube, self.path, self.on_event = kube, path, on_event
        self.watch_seconds = watch_seconds
        self.synced = threading.Event()
        self._items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._items.get(key)

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items.values())

    def run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                version = self._relist()
                backoff = 0.5
                while not stop.is_set():
                    version = self._watch(version, stop)
            except _Expired:
                log.info("%s: watch expired, listing again", self.path)
            except Exception as e:  # the API server may be restarting: list again, later
                log.warning("%s: %s; listing again in %.1fs", self.path, _text(e), backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _relist(self) -> str:
        items: dict[str, dict[str, Any]] = {}
        token = ""
        while True:
            query = [("limit", str(PAGE))] + ([("continue", token)] if token else [])
            doc = self.kube.request("GET", self.path, query=query)
            for obj in doc.get("items") or []:
                items[obj_key(obj)] = obj
            token = (doc.get("metadata") or {}).get("continue") or ""
            if not token:
                break
        version = doc["metadata"]["resourceVersion"]
        with self._lock:
            gone = [obj for key, obj in self._items.items() if key not in items]
            self._items = items
        for obj in gone:
            self.on_event("DELETED", obj)
        for obj in items.values():
            self.on_event("ADDED", obj)
        self.synced.set()
        return version

    def _watch(self, version: str, stop: threading.Event) -> str:
        # Spread the watches' ends so that many clients do not reconnect at once.
        seconds = random.randint(self.watch_seconds, self.watch_seconds * 2)
        for event in self.kube.watch(self.path, version, seconds):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Expired()
                raise KubeError(obj.get("code", 0), obj.get("reason", ""), obj.get("message", ""))
            version = obj["metadata"]["resourceVersion"]
            if kind == "BOOKMARK":
                continue
            key = obj_key(obj)
            with self._lock:
                if kind == "DELETED":
                    self._items.pop(key, None)
                else:
                    self._items[key] = obj
            self.on_event(str(kind), obj)
            if stop.is_set():
                break
        return version


def _text(e: Exception) -> str:
    return str(e) or type(e).__name__
