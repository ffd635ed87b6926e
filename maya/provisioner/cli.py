"""`tandem provisioner`."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from pathlib import Path

import click

from maya.paths import read_token, token_path
from replica.client import parse_address

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_lease_namespace() -> str:
    """$POD_NAMESPACE, else the service account's namespace in a pod, else default."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SA_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


@click.command()
@click.option(
    "--kubeconfig",
    envvar="KUBECONFIG",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Kubeconfig file [default: $KUBECONFIG, else the pod's service account].",
)
@click.option(
    "--apiserver",
    envvar="TANDEM_APISERVER",
    default="http://127.0.0.1:5656",
    show_default=True,
    help="The Tandem apiserver's URL.",
)
@click.option(
    "--name",
    default="tandem.io/iscsi",
    show_default=True,
    help="Provisioner name: StorageClasses with this `provisioner` are served.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The Tandem apiserver's token [default: $TANDEM_TOKEN or DATA_DIR/apiserver.token].",
)
@click.option(
    "--identity",
    default=None,
    help="This instance's name in the Lease [default: HOSTNAME_RANDOM].",
)
@click.option(
    "--lease-namespace",
    default=None,
    help="Namespace of the leader-election Lease [default: $POD_NAMESPACE, the pod's "
    "namespace, or default].",
)
@click.option(
    "--lease-duration",
    type=click.FloatRange(1),
    default=15.0,
    show_default=True,
    help="Seconds a leader's lease lasts without renewal.",
)
@click.option(
    "--renew-deadline",
    type=click.FloatRange(0.2),
    default=10.0,
    show_default=True,
    help="Seconds a leader keeps acting without a successful renewal.",
)
@click.option(
    "--retry-period",
    type=click.FloatRange(0.1),
    default=2.0,
    show_default=True,
    help="Seconds between attempts to acquire or renew the lease.",
)
@click.option(
    "--resync",
    type=click.FloatRange(1),
    default=300.0,
    show_default=True,
    help="Seconds between full passes over every claim and volume.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option(
    "--metrics-listen",
    default="127.0.0.1:5658",
    show_default=True,
    help="HOST:PORT of the Prometheus /metrics endpoint (port 0: any free port).",
)
def provisioner(
    kubeconfig: str | None,
    apiserver: str,
    name: str,
    token_file: Path | None,
    identity: str | None,
    lease_namespace: str | None,
    lease_duration: float,
    renew_deadline: float,
    retry_period: float,
    resync: float,
    workers: int,
    metrics_listen: str,
) -> None:
    """Run the Kubernetes provisioner: PVCs of Tandem StorageClasses become volumes and PVs."""
    from maya.provisioner.controller import Config
    from maya.provisioner.daemon import Options, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError(
                "need --retry-period < --renew-deadline < --lease-duration "
                f"(got {retry_period}, {renew_deadline}, {lease_duration})"
            )
        host, port = parse_address(metrics_listen)
        token = read_token(token_file or token_path())
        if token is None:
            raise ValueError(
                "no Tandem apiserver token: set TANDEM_TOKEN or give --token-file "
                f"(looked in {token_file or token_path()})"
            )
        config = Config(
            name=name,
            identity=identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
            workers=workers,
            resync=resync,
        )
        opts = Options(
            config=config,
            kubeconfig=kubeconfig,
            apiserver=apiserver.rstrip("/"),
            token=token,
            lease_namespace=lease_namespace or default_lease_namespace(),
            lease_duration=lease_duration,
            renew_deadline=renew_deadline,
            retry_period=retry_period,
            metrics_host=host,
            metrics_port=port,
        )
        sys.exit(serve(opts))
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
