"""`tandem agent`."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import click

from maya.paths import default_data_dir, read_token
from replica.client import parse_address


def parse_labels(items: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid label {item!r}: use KEY=VALUE")
        labels[key] = value
    return labels


@click.command()
@click.option(
    "--apiserver",
    envvar="TANDEM_APISERVER",
    default="http://127.0.0.1:5656",
    show_default=True,
    help="The apiserver's URL.",
)
@click.option("--node", default=None, help="Node name [default: the host name].")
@click.option(
    "--pool",
    "pools",
    multiple=True,
    required=True,
    help="[NAME=]DIR[:CAPACITY] a storage pool; repeat for more.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="KEY=VALUE node label, e.g. topology.kubernetes.io/zone=a; repeat.",
)
@click.option(
    "--listen",
    default="127.0.0.1:5657",
    show_default=True,
    help="HOST:PORT of the agent's API; the host is where its processes listen.",
)
@click.option(
    "--address",
    default=None,
    help="Address others reach this node's processes at [default: the --listen host].",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the agent keeps its records and logs [default: DATA_DIR/agent].",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The apiserver's token [default: $TANDEM_TOKEN or DATA_DIR/apiserver.token].",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(0.05),
    default=5.0,
    show_default=True,
    help="Seconds between heartbeats.",
)
@click.option(
    "--replica-sockets/--no-replica-sockets",
    default=True,
    show_default=True,
    help="Replicas also serve a unix socket, which a target on this host uses instead of "
    "TCP. Off where nodes are simulated on one kernel (network namespaces): the socket "
    "would go around their network.",
)
@click.option(
    "--stop-children",
    is_flag=True,
    help="Stop the volumes' processes when the agent stops (default: leave them).",
)
def agent(
    apiserver: str,
    node: str | None,
    pools: tuple[str, ...],
    labels: tuple[str, ...],
    listen: str,
    address: str | None,
    state_dir: Path | None,
    token_file: Path | None,
    heartbeat: float,
    replica_sockets: bool,
    stop_children: bool,
) -> None:
    """Run a node agent: runs the targets and replicas the apiserver places on this node."""
    from maya.agent.agent import AgentConfig, default_node_name
    from maya.agent.daemon import serve_agent
    from maya.agent.pools import parse_pool
    from maya.paths import token_path
    from maya.validation import check_node_name

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        host, port = parse_address(listen)
        if address is None and host in ("0.0.0.0", "::", ""):
            raise ValueError("--listen on every address needs --address (how others reach us)")
        name = check_node_name(node or default_node_name())
        data_dir = default_data_dir()
        token = read_token(token_file or token_path(data_dir))
        if token is None:
            raise ValueError(
                "no apiserver token: set TANDEM_TOKEN or give --token-file "
                f"(looked in {token_file or token_path(data_dir)})"
            )
        cfg = AgentConfig(
            apiserver=apiserver.rstrip("/"),
            token=token,
            node=name,
            address=address or host,
            state_dir=(state_dir or data_dir / "agent").expanduser().resolve(),
            pools=[parse_pool(p, i) for i, p in enumerate(pools)],
            labels=parse_labels(labels),
            heartbeat=heartbeat,
            replica_sockets=replica_sockets,
            stop_children_on_exit=stop_children,
        )
        if len({p.name for p in cfg.pools}) != len(cfg.pools):
            raise ValueError("two pools have the same name: name them, e.g. fast=/nvme/tandem")
        os.environ.setdefault("TANDEM_AGENT_NODE", name)
        asyncio.run(serve_agent(cfg, host, port))
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
