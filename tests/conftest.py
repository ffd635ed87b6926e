from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Cluster


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[type[Cluster]]:
    """Factory for clusters of real processes; every one is stopped after the test."""
    made: list[Cluster] = []

    def make(**kw: object) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", **kw)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make  # type: ignore[misc]
    failed = getattr(request.node, "rep_call", None)
    for c in made:
        c.stop()
        if failed is not None and failed.failed:
            print(c.logs())


@pytest.fixture
def cluster(make_cluster) -> Cluster:  # type: ignore[no-untyped-def]
    """3 replicas + target, 64 MiB volume."""
    return make_cluster().start()
