"""The apiserver fuzzed from its own OpenAPI schema (schemathesis): never a 5xx.

Every operation gets generated requests, with the bearer token so that mutating calls
reach the code behind the auth check (and without, for the auth path itself). The
answers must not be server errors and must match the documented response schemas. The
run is bounded (few examples per operation; waits capped at 0) to stay well under a
minute.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from maya.apiserver.app import make_app
from maya.apiserver.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore")  # starlette notes on its TestClient

TOKEN = "fuzz-token"
app = make_app(Settings(db=":memory:", token=TOKEN, max_wait=0), run_reconciler=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases every run: a failure is reproducible
)
def test_no_server_errors(case: schemathesis.Case) -> None:
    checks = [not_a_server_error, response_schema_conformance]
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks)
    case.call_and_validate(checks=[not_a_server_error])
