"""`tandem volume ...`: create, list, describe, stats, resize, delete."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from maya.client import ApiClient, ApiError
from maya.commands.common import api_command, console, dash, print_json
from maya.validation import format_size, parse_rate, parse_size

PHASE_STYLE = {
    "Healthy": "green",
    "Rebuilding": "cyan",
    "Degraded": "yellow",
    "ReadOnly": "red",
    "Failed": "bold red",
    "Pending": "blue",
    "Deleting": "magenta",
}


@click.group()
def volume() -> None:
    """Replicated volumes."""


def _pairs(items: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid {what} {item!r}: use KEY=VALUE")
        out[key] = value
    return out


def wait_until(api: ApiClient, name: str, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        vol = api.get(f"/v1/volumes/{name}")
        if done(vol) or time.monotonic() > deadline:
            return vol
        time.sleep(0.3)


@volume.command()
@click.argument("name")
@click.option("--size", required=True, help="e.g. 10G (binary units).")
@click.option("--replicas", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--iops-limit", type=click.IntRange(0), default=0, help="QoS: total IOPS.")
@click.option("--bps-limit", default="0", help="QoS: total bytes per second, e.g. 100M.")
@click.option("--rebuild-rate", default="0", help="Rebuild bandwidth limit, e.g. 50M.")
@click.option(
    "--frontend",
    "frontends",
    multiple=True,
    type=click.Choice(["iscsi", "nbd"]),
    help="Frontends to serve [default: both].",
)
@click.option("--node", default=None, help="Run the target on this node.")
@click.option(
    "--topology",
    multiple=True,
    help="KEY=V1,V2: only nodes whose label KEY is one of the values; repeat.",
)
@click.option("--chap-user", default=None)
@click.option("--chap-secret", default=None, envvar="TANDEM_CHAP_SECRET")
@click.option("--mutual-chap-user", default=None)
@click.option("--mutual-chap-secret", default=None, envvar="TANDEM_MUTUAL_CHAP_SECRET")
@click.option("--allow-initiator", "initiators", multiple=True, help="Initiator IQN; repeat.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE; repeat.")
@click.option("--namespace", default="default", show_default=True)
@click.option("--nbd-port", type=click.IntRange(1, 65535), default=None, help="Fixed NBD port.")
@click.option("--iscsi-port", type=click.IntRange(1, 65535), default=None, help="Fixed iSCSI port.")
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Wait until the volume is serving."
)
@click.option("--timeout", type=float, default=120, show_default=True)
@api_command
def create(
    api: ApiClient,
    as_json: bool,
    name: str,
    size: str,
    replicas: int,
    iops_limit: int,
    bps_limit: str,
    rebuild_rate: str,
    frontends: tuple[str, ...],
    node: str | None,
    topology: tuple[str, ...],
    chap_user: str | None,
    chap_secret: str | None,
    mutual_chap_user: str | None,
    mutual_chap_secret: str | None,
    initiators: tuple[str, ...],
    labels: tuple[str, ...],
    namespace: str,
    nbd_port: int | None,
    iscsi_port: int | None,
    wait: bool,
    timeout: float,
) -> None:
    """Create a volume and print how to connect to it."""
    body: dict[str, Any] = {
        "name": name,
        "size": parse_size(size),
        "replica_count": replicas,
        "qos": {
            "total_iops": iops_limit,
            "total_bps": parse_rate(bps_limit),
            "rebuild_bps": parse_rate(rebuild_rate),
        },
        "topology": {k: v.split(",") for k, v in _pairs(topology, "topology").items()},
        "labels": _pairs(labels, "label"),
        "namespace": namespace,
        "allowed_initiators": list(initiators),
        "ports": {"nbd": nbd_port, "iscsi": iscsi_port},
    }
    if frontends:
        body["frontends"] = list(frontends)
    if node:
        body["node"] = node
    if chap_user or chap_secret:
        body["chap"] = {"user": chap_user, "secret": chap_secret}
        if mutual_chap_user or mutual_chap_secret:
            body["chap"] |= {"mutual_user": mutual_chap_user, "mutual_secret": mutual_chap_secret}
    vol = api.post(
        "/v1/volumes", body, params={"wait": min(timeout, 30) if wait else 0}, timeout=timeout + 10
    )
    if wait:
        vol = wait_until(api, name, lambda v: v["phase"] != "Pending", timeout)
    if as_json:
        print_json(vol)
        return
    console.print(f"volume [bold]{name}[/] created: {_phase(vol)}")
    _connect_lines(vol)


def _phase(vol: dict[str, Any]) -> str:
    style = PHASE_STYLE.get(vol["phase"], "")
    msg = f" ({vol['message']})" if vol.get("message") else ""
    return f"[{style}]{vol['phase']}[/]{msg}"


def _connect_lines(vol: dict[str, Any]) -> None:
    if vol.get("target_portal"):
        console.print(f"  iSCSI  portal {vol['target_portal']}  IQN {vol['iqn']}  LUN {vol['lun']}")
    if vol.get("nbd_uri"):
        console.print(f"  NBD    {vol['nbd_uri']}")


@volume.command("list")
@api_command
def list_(api: ApiClient, as_json: bool) -> None:
    """List volumes."""
    vols = api.get("/v1/volumes")
    if as_json:
        print_json(vols)
        return
    table = Table(box=None)
    for col in ("NAME", "SIZE", "REPLICAS", "PHASE", "TARGET NODE", "PORTAL", "NBD"):
        table.add_column(col)
    for v in vols:
        rw = sum(1 for r in v["replicas"] if r["mode"] == "RW")
        table.add_row(
            v["name"],
            format_size(v["size"]),
            f"{rw}/{v['replica_count']}",
            Text.from_markup(_phase({**v, "message": None})),
            dash((v["target"] or {}).get("node")),
            dash(v["target_portal"]),
            dash(v["nbd_uri"]),
        )
    console.print(table)


def _rebuild_cell(rebuild: dict[str, Any] | None) -> Any:
    if not rebuild:
        return ""
    bar = Table.grid(padding=(0, 1))
    eta = rebuild.get("eta_seconds")
    bar.add_row(
        ProgressBar(total=100, completed=rebuild.get("percent", 0), width=20),
        f"{rebuild.get('percent', 0):.0f}% {rebuild.get('kind', '')}"
        + (f" eta {eta:.0f}s" if eta else ""),
    )
    return bar


@volume.command()
@click.argument("name")
@api_command
def describe(api: ApiClient, as_json: bool, name: str) -> None:
    """Show a volume: how to connect, its replicas and their rebuild progress."""
    v = api.get(f"/v1/volumes/{name}")
    if as_json:
        print_json(v)
        return
    console.print(f"[bold]{v['name']}[/]  {_phase(v)}")
    console.print(
        f"  size {format_size(v['size'])}  replicas {v['replica_count']}  "
        f"frontends {', '.join(v['frontends'])}  namespace {v['namespace']}"
    )
    _connect_lines(v)
    t = v["target"]
    if t:
        console.print(
            f"  target {t['id']} on {t['node']} ({t['state'].lower()})  api {dash(t['api'])}"
            + (f"  [red]{t['error']}[/]" if t.get("error") and v["phase"] != "Healthy" else "")
        )
    qos = {k: x for k, x in v["qos"].items() if x and k != "burst_seconds"}
    console.print("  QoS " + (", ".join(f"{k}={x}" for k, x in qos.items()) or "unlimited"))
    if v.get("chap"):
        console.print(
            f"  CHAP user {v['chap']['user']}"
            + (f", mutual {v['chap']['mutual_user']}" if v["chap"].get("mutual_user") else "")
        )
    table = Table(title="replicas", box=None, title_justify="left")
    for col in ("ID", "NODE", "POOL", "ADDRESS", "STATE", "MODE", "REBUILD"):
        table.add_column(col)
    for r in v["replicas"]:
        table.add_row(
            r["id"],
            r["node"],
            r["pool"],
            dash(r["address"]),
            r["state"],
            dash(r["mode"]),
            _rebuild_cell(r.get("rebuild")),
        )
    console.print(table)
    if v["events"]:
        console.print("events:")
        for e in v["events"][-8:]:
            when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
            console.print(f"  {when} {e['type']}: {e['message']}", markup=False)


def _stats_table(s: dict[str, Any]) -> Table:
    table = Table(
        box=None, title=f"{s['name']} (over {dash(s['interval_seconds'])}s)", title_justify="left"
    )
    for col in ("", "IOPS", "MiB/s", "LATENCY ms"):
        table.add_column(col, justify="right")
    for op in ("read", "write"):
        table.add_row(
            op,
            f"{s[f'{op}_iops']:.0f}",
            f"{s[f'{op}_bps'] / (1 << 20):.2f}",
            dash(s[f"{op}_latency_ms"]),
        )
    return table


@volume.command()
@click.argument("name")
@click.option("--watch", is_flag=True, help="Keep refreshing until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.2), default=2.0, show_default=True)
@api_command
def stats(api: ApiClient, as_json: bool, name: str, watch: bool, interval: float) -> None:
    """I/O rates: IOPS, MiB/s and mean latency over the apiserver's last poll."""
    s = api.get(f"/v1/volumes/{name}/stats")
    if not watch:
        print_json(s) if as_json else console.print(_stats_table(s))
        return
    try:
        if as_json:
            while True:
                click.echo(json.dumps(s))
                time.sleep(interval)
                s = api.get(f"/v1/volumes/{name}/stats")
        with Live(_stats_table(s), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(_stats_table(api.get(f"/v1/volumes/{name}/stats")), refresh=True)
    except KeyboardInterrupt:
        pass


@volume.command()
@click.argument("name")
@click.option("--size", required=True, help="The new, larger size, e.g. 20G.")
@api_command
def resize(api: ApiClient, as_json: bool, name: str, size: str) -> None:
    """Grow a volume online (initiators see it after a rescan)."""
    v = api.post(f"/v1/volumes/{name}/resize", {"size": parse_size(size)}, timeout=180)
    if as_json:
        print_json(v)
    else:
        console.print(f"volume [bold]{name}[/] is now {format_size(v['size'])}")


@volume.command()
@click.argument("name")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until every process and file of it is gone.",
)
@click.option("--timeout", type=float, default=120, show_default=True)
@api_command
def delete(api: ApiClient, as_json: bool, name: str, wait: bool, timeout: float) -> None:
    """Delete a volume: stop its target and replicas and remove their data."""
    v = api.delete(f"/v1/volumes/{name}")
    gone = False
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                v = api.get(f"/v1/volumes/{name}")
            except ApiError as e:
                if e.status != 404:
                    raise
                gone = True
                break
            time.sleep(0.3)
        if not gone:
            raise ApiError(0, f"volume {name!r} still being deleted after {timeout:g}s")
    if as_json:
        print_json({"name": name, "deleted": gone, "phase": None if gone else v["phase"]})
    else:
        console.print(f"volume [bold]{name}[/] " + ("deleted" if gone else "being deleted"))
