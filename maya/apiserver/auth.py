"""Bearer-token auth: every mutating call (and the agents' assignments) needs the token."""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="the token in the apiserver's data dir")


def token_checker(token: str):  # type: ignore[no-untyped-def]
    """A FastAPI dependency that refuses requests without `Authorization: Bearer <token>`."""

    def check(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:  # noqa: B008
        if creds is None:
            raise HTTPException(
                401,
                "this call needs the apiserver's bearer token (Authorization: Bearer ...)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check
