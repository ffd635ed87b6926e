"""`tandem node list`."""

from __future__ import annotations

import click
from rich.table import Table

from maya.client import ApiClient
from maya.commands.common import api_command, console, dash, print_json
from maya.scheduler import ZONE
from maya.validation import format_size


@click.group()
def node() -> None:
    """Nodes (registered agents) and their storage pools."""


@node.command("list")
@api_command
def list_(api: ApiClient, as_json: bool) -> None:
    """List nodes, their pools' free space and their processes."""
    nodes = api.get("/v1/nodes")
    if as_json:
        print_json(nodes)
        return
    table = Table(box=None)
    for col in ("NAME", "READY", "ADDRESS", "ZONE", "POOLS (free/capacity)", "PROCESSES", "SEEN"):
        table.add_column(col)
    for n in nodes:
        pools = ", ".join(
            f"{p['name']} {format_size(p['free'])}/{format_size(p['capacity'])}" for p in n["pools"]
        )
        seen = n["last_heartbeat_seconds"]
        table.add_row(
            n["name"],
            "[green]yes[/]" if n["ready"] else "[red]no[/]",
            n["address"],
            dash(n["labels"].get(ZONE)),
            pools,
            str(len(n["processes"])),
            "-" if seen is None else f"{seen:.0f}s ago",
        )
    console.print(table)
