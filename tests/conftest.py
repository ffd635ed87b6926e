from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Cluster

# The replica engine of the replica processes tests start, from TANDEM_ENGINE: auto, native
# or python for every test; both (the default) runs these suites once on each engine and the
# rest on auto. E.g. the whole suite on the native engine: TANDEM_ENGINE=native pytest -q
REPLICA_SUITES = {
    "test_replica_server.py",
    "test_faults.py",
    "test_nbd_clients.py",
    "test_replica_socket.py",
}
ENGINE_CHOICES = ("auto", "native", "python", "both")


def engine_choice() -> str:
    choice = os.environ.get("TANDEM_ENGINE", "both")
    if choice not in ENGINE_CHOICES:
        raise pytest.UsageError(f"TANDEM_ENGINE={choice!r}: one of {', '.join(ENGINE_CHOICES)}")
    return choice


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "replica_engine" not in metafunc.fixturenames:
        return
    if engine_choice() == "both" and Path(str(metafunc.module.__file__)).name in REPLICA_SUITES:
        metafunc.parametrize("replica_engine", ["python", "native"], indirect=True)


@pytest.fixture(autouse=True)
def replica_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The replica engine this test's replica processes use (through TANDEM_ENGINE)."""
    engine = getattr(request, "param", None) or engine_choice()
    if engine == "both":
        engine = "auto"
    if engine == "native":
        import native

        if (why := native.engine_unavailable()) is not None:
            pytest.skip(f"native replica engine: {why}")
    monkeypatch.setenv("TANDEM_ENGINE", engine)
    return engine


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


@pytest.fixture
def native_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """For suites of the native engine only (pytestmark = usefixtures("native_only")): skip
    where it cannot run, and start every process of the test on it."""
    import native

    if (why := native.engine_unavailable()) is not None:
        pytest.skip(f"native engine: {why}")
    monkeypatch.setenv("TANDEM_ENGINE", "native")


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
