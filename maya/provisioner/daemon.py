"""`tandem provisioner` put together: metrics endpoint, leader election, the control loops."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

from prometheus_client import start_http_server

from maya.client import ApiClient
from maya.provisioner.controller import Config, Provisioner
from maya.provisioner.events import EventRecorder
from maya.provisioner.kube import Kube
from maya.provisioner.leader import LeaseElector
from maya.provisioner.metrics import ProvisionerMetrics

log = logging.getLogger(__name__)


@dataclass
class Options:
    config: Config
    kubeconfig: str | None
    apiserver: str
    token: str | None
    lease_namespace: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 5658


def lease_name(provisioner: str) -> str:
    """A Lease name (a DNS subdomain) from the provisioner's name: tandem.io-iscsi."""
    return provisioner.replace("/", "-").replace("_", "-").lower()


def serve(opts: Options) -> int:
    """Run until SIGTERM/SIGINT (0) or until leadership is lost (1: the caller exits, and
    a fresh start joins the election again, as client-go's leaders do)."""
    cfg = opts.config
    kube = Kube(opts.kubeconfig)
    metrics = ProvisionerMetrics()
    server, _ = start_http_server(opts.metrics_port, opts.metrics_host, metrics.registry)
    log.info(
        "provisioner %s (identity %s): Kubernetes %s, Tandem %s, metrics on %s:%d",
        cfg.name,
        cfg.identity,
        kube.server,
        opts.apiserver,
        opts.metrics_host,
        server.server_port,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    elector = LeaseElector(
        kube,
        opts.lease_namespace,
        lease_name(cfg.name),
        cfg.identity,
        opts.lease_duration,
        opts.renew_deadline,
        opts.retry_period,
    )
    elector.on_change = lambda leading: metrics.leader.set(1 if leading else 0)
    provisioner = Provisioner(
        kube,
        lambda: ApiClient(opts.apiserver, opts.token, timeout=60),
        cfg,
        EventRecorder(kube, cfg.name, cfg.identity),
        metrics,
        elector.is_leader,
    )

    def lead() -> None:
        threading.Thread(target=provisioner.run, args=(stop,), name="loops", daemon=True).start()

    stopped = elector.run(lead, stop)
    if stopped:
        elector.release()
    server.shutdown()
    return 0 if stopped else 1
