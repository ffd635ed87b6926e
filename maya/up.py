"""`tandem up`: the embedded local default that `make run` starts.

An apiserver and one agent in this process (one event loop), a default pool under the
data directory, and a demo volume placed through the API like any other: its replicas
and target run as the agent's supervised children. One node cannot give replicas
distinct hosts, so this apiserver runs with anti-affinity relaxed (`colocate_replicas`,
said out loud at start), never a silent fallback. Ctrl-C or SIGTERM stops the target
first, then the replicas (clean close), then the control plane; the database, the
agent's records (ports) and the data stay, so the next `tandem up` serves the same
volume at the same addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from maya.paths import TOKEN_FILE, default_data_dir, load_or_create_token
from maya.validation import format_size, parse_size

if TYPE_CHECKING:
    import httpx

NODE = "local"
SERVING = ("Healthy", "Degraded", "Rebuilding")


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where state and replica data live [default: $TANDEM_HOME or ~/.local/share/tandem].",
)
@click.option("--volume", default="demo", show_default=True, help="Volume name.")
@click.option("--size", default="1G", show_default=True, help="Volume size.")
@click.option("--replicas", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--nbd-port", type=int, default=10809, show_default=True)
@click.option("--iscsi-port", type=int, default=3260, show_default=True)
@click.option("--apiserver-port", type=int, default=5656, show_default=True)
@click.option("--agent-port", type=int, default=5657, show_default=True)
@click.option(
    "--timeout",
    type=float,
    default=120,
    show_default=True,
    help="Seconds to wait for the volume to serve.",
)
def up(
    data_dir: Path | None,
    volume: str,
    size: str,
    replicas: int,
    host: str,
    nbd_port: int,
    iscsi_port: int,
    apiserver_port: int,
    agent_port: int,
    timeout: float,
) -> None:
    """Start a local control plane with a replicated demo volume; print how to connect."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        nbytes = parse_size(size)
        data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        asyncio.run(
            _up(
                data_dir,
                volume,
                nbytes,
                replicas,
                host,
                {"nbd": nbd_port, "iscsi": iscsi_port},
                apiserver_port,
                agent_port,
                timeout,
            )
        )
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e


async def _up(
    data_dir: Path,
    volume: str,
    size: int,
    replicas: int,
    host: str,
    ports: dict[str, int],
    apiserver_port: int,
    agent_port: int,
    timeout: float,
) -> None:
    # Imported here: every `tandem` command (and every process the agent starts) loads
    # this module, and the servers' imports cost a quarter of a second.
    import httpx

    from maya.agent.agent import Agent, AgentConfig, wait_registered
    from maya.agent.api import make_app as make_agent_app
    from maya.agent.pools import Pool
    from maya.apiserver.daemon import Apiserver
    from maya.apiserver.settings import Settings
    from replica.webserver import WebServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    token = load_or_create_token(data_dir / TOKEN_FILE)
    settings = Settings(
        db=data_dir / "maya.db", token=token, colocate_replicas=True, poll_interval=1.0
    )
    click.echo(
        f"one node: replica anti-affinity is relaxed for this setup (the apiserver's "
        f"colocate_replicas setting), so the {replicas} replicas share it"
    )
    api = Apiserver(settings, host, apiserver_port)
    url = f"http://{host}:{api.port}"
    agent = Agent(
        AgentConfig(
            apiserver=url,
            token=token,
            node=NODE,
            address=host,
            state_dir=data_dir / "agent",
            pools=[Pool("default", data_dir / "pool")],
            heartbeat=2.0,
            agent_url=f"http://{host}:{agent_port}",
            stop_children_on_exit=True,
        )
    )
    agent_web = WebServer(make_agent_app(agent), host, agent_port)
    started: list[Any] = []
    try:
        await api.start()
        started.append(api)
        await agent_web.start()
        started.append(agent_web)
        await agent.start()
        started.append(agent)
        await wait_registered(agent, 30)
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as http:
            vol = await _demo_volume(http, volume, size, replicas, ports)
            vol = await _wait_serving(http, volume, timeout, stop)
        if vol is None:
            return  # stopped while starting
        _print_banner(vol, data_dir, url)
        await stop.wait()
        click.echo("\nstopping Tandem...")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # The agent first (target, then replicas), then the control plane.
        for part in reversed(started):
            with contextlib.suppress(Exception):
                await part.close()


async def _demo_volume(
    http: httpx.AsyncClient, name: str, size: int, replicas: int, ports: dict[str, int]
) -> dict[str, Any]:
    r = await http.get(f"/v1/volumes/{name}")
    if r.status_code == 200:
        vol = r.json()
        click.echo(
            f"reusing volume {name!r} ({format_size(vol['size'])}, "
            f"{vol['replica_count']} replicas) from the last start"
        )
        return vol
    body = {"name": name, "size": size, "replica_count": replicas, "ports": ports}
    r = await http.post("/v1/volumes", json=body)
    if r.status_code >= 400:
        raise click.ClickException(f"cannot create volume {name!r}: {r.json().get('detail')}")
    return r.json()


async def _wait_serving(
    http: httpx.AsyncClient, name: str, timeout: float, stop: asyncio.Event
) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        vol = (await http.get(f"/v1/volumes/{name}")).json()
        if vol["phase"] in SERVING and (vol["nbd_uri"] or vol["target_portal"]):
            return vol
        if vol["phase"] in ("Failed", "ReadOnly") or time.monotonic() > deadline:
            raise click.ClickException(f"volume {name!r} is {vol['phase']}: {vol['message']}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    return None


def _print_banner(vol: dict[str, Any], data_dir: Path, url: str) -> None:
    uri, portal, iqn = vol["nbd_uri"], vol["target_portal"], vol["iqn"]
    iscsi_url = f"iscsi://{portal}/{iqn}/0"
    name = vol["name"]
    env = (
        ""
        if data_dir == default_data_dir().expanduser().resolve()
        else (f"\n  export TANDEM_HOME={data_dir}   # so `tandem` finds this apiserver's token")
    )
    click.echo(
        f"""
Tandem is up: volume {name!r}, {format_size(vol["size"])}, {vol["replica_count"]} replica(s), \
data in {data_dir}

  NBD URI   {uri}
  iSCSI     portal {portal}  IQN {iqn}  LUN {vol["lun"]}
  API       {url}   (OpenAPI: /openapi.json, metrics: /metrics)

Try, from another shell:{env}
  tandem volume describe {name}
  nbdinfo {uri}
  nbdcopy image.raw {uri}          # write an image into the volume
  nbdcopy {uri} copy.raw           # and read it back
  qemu-io -f raw {uri} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  iscsi-ls -s iscsi://{portal}
  qemu-img info {iscsi_url}
  iscsiadm -m discovery -t st -p {portal} && iscsiadm -m node -T {iqn} --login
  tandem volume create vol2 --size 10G --replicas {vol["replica_count"]}

Logs in {data_dir / "agent" / "logs"}. Ctrl-C stops everything; the data stays for the next start.
""",
        nl=False,
    )
