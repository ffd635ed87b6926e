"""Fixtures of the Kubernetes tests: one control plane for this package (built into the
cache directory first, stopped at the end whatever happens), deploy/ applied to it as a user
would, a Tandem lab (apiserver + 3 agents), a namespace per test and provisioner processes
that run with the provisioner's ServiceAccount from deploy/ (so its RBAC is what they get).
"""

from __future__ import annotations

import base64
import random
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kube.kubelab import Cluster, Provisioner, wait
from tests.kube.testenv import ControlPlane, build, built, cache_dir
from tests.mayalab import Lab

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEM_NS = "tandem-system"
ZONE = "topology.kubernetes.io/zone"
ZONES = ("a", "b", "c")


@pytest.fixture(scope="package")
def kube(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    cache = cache_dir()
    if built(cache):
        build(cache)
    else:  # minutes: show the build's progress instead of sitting silent
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            build(cache, show_progress=True)
    env = ControlPlane(cache)
    failed_before = request.session.testsfailed
    try:
        env.up()
        yield env
    finally:
        if request.session.testsfailed > failed_before:
            print(env.logs())
        env.down()


@pytest.fixture(scope="package")
def cluster(kube: ControlPlane) -> Cluster:
    return Cluster(kube)


@dataclass
class Deployment:
    dry_run: subprocess.CompletedProcess[str]
    applied: subprocess.CompletedProcess[str]
    provisioner_kubeconfig: Path  # authenticates as the provisioner's ServiceAccount


@pytest.fixture(scope="package")
def deployed(kube: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """deploy/ as the README says: the namespace, the token Secret, a server-side dry run,
    the real apply."""
    kube.kubectl("apply", "-f", str(DEPLOY / "00-namespace.yaml"))
    kube.kubectl(
        "-n",
        SYSTEM_NS,
        "create",
        "secret",
        "generic",
        "tandem-apiserver-token",
        f"--from-literal=token={random.randbytes(24).hex()}",
    )
    dry_run = kube.kubectl("apply", "--dry-run=server", "-f", str(DEPLOY), check=False)
    applied = kube.kubectl("apply", "-f", str(DEPLOY), check=False)

    def sa_token() -> str | None:
        sa = kube.kubectl("-n", SYSTEM_NS, "get", "sa", "tandem-provisioner", "-o", "json")
        secrets = re.findall(r'"name": "(tandem-provisioner-token-[a-z0-9]+)"', sa.stdout)
        if not secrets:
            return None
        data = kube.kubectl(
            "-n", SYSTEM_NS, "get", "secret", secrets[0], "-o", "jsonpath={.data.token}"
        ).stdout
        return base64.b64decode(data).decode() if data else None

    token = wait(sa_token, 30, "the provisioner's ServiceAccount token")
    path = kube.kubeconfig_for_token(
        token, tmp_path_factory.mktemp("sa") / "provisioner.kubeconfig"
    )
    return Deployment(dry_run, applied, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """3 Tandem nodes (node0-2 in zones a-c) on 127.0.0.1; replicas on distinct nodes."""
    lab = Lab(
        tmp_path_factory.mktemp("lab"),
        nodes=3,
        netns=False,
        labels=lambda i: {ZONE: ZONES[i]},
    )
    failed_before = request.session.testsfailed
    try:
        lab.start()
        yield lab
    finally:
        if request.session.testsfailed > failed_before:
            print(lab.logs())
        lab.close()


def _slug(text: str, n: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-")


@pytest.fixture
def ns(kube: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"{_slug(request.node.name.removeprefix('test_'), 40)}-{random.randrange(16**4):04x}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


class Provisioners:
    """Starts `tandem provisioner` processes for one test under one name of their own (so
    tests' classes and Leases never meet); stops them after the test."""

    def __init__(self, name: str, deployment: Deployment, lab: Lab, log_dir: Path) -> None:
        self.name, self.deployment, self.lab, self.log_dir = name, deployment, lab, log_dir
        self.started: list[Provisioner] = []

    def start(self, identity: str = "p0", env: dict[str, str] | None = None) -> Provisioner:
        p = Provisioner(
            self.name,
            self.deployment.provisioner_kubeconfig,
            self.lab,
            self.log_dir,
            identity,
            SYSTEM_NS,
            env,
        )
        self.started.append(p.start())
        return p

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-5000:]}" for p in self.started)


@pytest.fixture
def provisioners(
    request: pytest.FixtureRequest, deployed: Deployment, lab: Lab, tmp_path: Path
) -> Iterator[Provisioners]:
    name = f"tandem.io/{_slug(request.node.name.removeprefix('test_'), 40)}"
    ps = Provisioners(name, deployed, lab, tmp_path)
    try:
        yield ps
    finally:
        ps.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(ps.logs())
