"""A small client of the apiserver's REST API (the CLI's; usable from scripts)."""

from __future__ import annotations

import os
from typing import Any

import httpx

from maya.paths import read_token, token_path

DEFAULT_URL = "http://127.0.0.1:5656"


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30):
        self.url = (url or os.environ.get("TANDEM_APISERVER") or DEFAULT_URL).rstrip("/")
        # On the apiserver's host the token file is readable: no flag needed.
        self.token = token or read_token(token_path())
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            r = self.http.request(
                method,
                path,
                json=body,
                params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.ConnectError as e:
            raise ApiError(0, f"cannot reach the apiserver at {self.url}: {e}") from e
        except httpx.HTTPError as e:
            raise ApiError(0, f"apiserver {self.url}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = None
            if r.status_code == 401 and not self.token:
                detail = f"{detail} (set TANDEM_TOKEN; no token file at {token_path()})"
            raise ApiError(r.status_code, str(detail or f"HTTP {r.status_code}"))
        return r.json() if r.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
