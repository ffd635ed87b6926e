"""deploy/ applies to a real API server: a server-side dry run and a real apply without
errors, a second apply changes nothing, and the provisioner's ServiceAccount may do what
the provisioner does and nothing more (the provisioner tests run with exactly it)."""

from __future__ import annotations

import json

import pytest

from tests.kube.conftest import SYSTEM_NS, Deployment
from tests.kube.testenv import ControlPlane

pytestmark = [
    pytest.mark.timeout(120, func_only=True),
    # The test cluster's certificate is self-signed (its kubeconfig says to skip the check).
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]

OBJECTS = [
    "namespace/tandem-system",
    "serviceaccount/tandem-provisioner",
    "clusterrole.rbac.authorization.k8s.io/tandem-provisioner",
    "clusterrolebinding.rbac.authorization.k8s.io/tandem-provisioner",
    "role.rbac.authorization.k8s.io/tandem-provisioner-leader-election",
    "rolebinding.rbac.authorization.k8s.io/tandem-provisioner-leader-election",
    "deployment.apps/tandem-apiserver",
    "service/tandem-apiserver",
    "daemonset.apps/tandem-agent",
    "deployment.apps/tandem-provisioner",
    "storageclass.storage.k8s.io/tandem",
]


def test_manifests_apply_cleanly(kube: ControlPlane, deployed: Deployment) -> None:
    for result in (deployed.dry_run, deployed.applied):
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for obj in OBJECTS:
        assert (
            f"{obj} " in deployed.dry_run.stdout and "(server dry run)" in deployed.dry_run.stdout
        )
        assert f"{obj} " in deployed.applied.stdout
    again = kube.kubectl("apply", "-f", str(deployed.applied.args[-1]))
    assert all(line.endswith(" unchanged") for line in again.stdout.splitlines()), again.stdout

    sc = json.loads(kube.kubectl("get", "storageclass", "tandem", "-o", "json").stdout)
    assert sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert sc["provisioner"] == "tandem.io/iscsi" and sc["allowVolumeExpansion"] is True
    for kind, name in (
        ("deployment", "tandem-apiserver"),
        ("deployment", "tandem-provisioner"),
        ("daemonset", "tandem-agent"),
    ):
        doc = json.loads(kube.kubectl("-n", SYSTEM_NS, "get", kind, name, "-o", "json").stdout)
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][0] in ("apiserver", "agent", "provisioner")
    provisioner = json.loads(
        kube.kubectl(
            "-n", SYSTEM_NS, "get", "deployment", "tandem-provisioner", "-o", "json"
        ).stdout
    )
    assert provisioner["spec"]["replicas"] == 2  # one acts, one stands by (leader election)


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        ("watch", "persistentvolumeclaims", True),
        ("patch", "persistentvolumeclaims/status", True),
        ("create", "persistentvolumes", True),
        ("delete", "persistentvolumes", True),
        ("watch", "storageclasses.storage.k8s.io", True),
        ("get", "nodes", True),
        ("get", "secrets", True),
        ("create", "events", True),
        ("get", "leases.coordination.k8s.io", True),
        ("update", "leases.coordination.k8s.io", True),
        # what it never needs
        ("delete", "persistentvolumeclaims", False),
        ("update", "persistentvolumes", False),
        ("list", "secrets", False),
        ("create", "storageclasses.storage.k8s.io", False),
        ("list", "nodes", False),
        ("create", "pods", False),
        ("delete", "events", False),
    ],
)
def test_provisioner_service_account_may_do_exactly_its_job(
    kube: ControlPlane, deployed: Deployment, verb: str, resource: str, allowed: bool
) -> None:
    resource, _, sub = resource.partition("/")
    r = kube.kubectl(
        "auth",
        "can-i",
        verb,
        resource,
        *([f"--subresource={sub}"] if sub else []),
        "-n",
        SYSTEM_NS,
        check=False,
        kubeconfig=deployed.provisioner_kubeconfig,
    )
    assert r.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, r.stdout, r.stderr)


def test_leases_only_in_the_provisioners_namespace(
    kube: ControlPlane, deployed: Deployment
) -> None:
    r = kube.kubectl(
        "auth",
        "can-i",
        "update",
        "leases.coordination.k8s.io",
        "-n",
        "default",
        check=False,
        kubeconfig=deployed.provisioner_kubeconfig,
    )
    assert r.stdout.strip() == "no"
