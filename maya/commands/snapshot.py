"""`tandem snapshot ...` (passed through to the volume's target)."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from maya.client import ApiClient
from maya.commands.common import api_command, console, dash, print_json


@click.group()
def snapshot() -> None:
    """Volume snapshots."""


@snapshot.command()
@click.argument("volume")
@click.argument("name")
@api_command
def create(api: ApiClient, as_json: bool, volume: str, name: str) -> None:
    """Take a snapshot of VOLUME named NAME."""
    out = api.post(f"/v1/volumes/{volume}/snapshots", {"name": name})
    print_json(out) if as_json else console.print(f"snapshot [bold]{name}[/] of {volume} taken")


@snapshot.command("list")
@click.argument("volume")
@api_command
def list_(api: ApiClient, as_json: bool, volume: str) -> None:
    """List VOLUME's snapshots."""
    out: Any = api.get(f"/v1/volumes/{volume}/snapshots")
    if as_json:
        print_json(out)
        return
    items = out.get("snapshots", out) if isinstance(out, dict) else out
    table = Table(box=None)
    for col in ("NAME", "CREATED", "SIZE"):
        table.add_column(col)
    for s in items or []:
        s = s if isinstance(s, dict) else {"name": s}
        table.add_row(s.get("name", "?"), dash(s.get("created")), dash(s.get("size")))
    console.print(table)


@snapshot.command()
@click.argument("volume")
@click.argument("name")
@api_command
def revert(api: ApiClient, as_json: bool, volume: str, name: str) -> None:
    """Revert VOLUME to snapshot NAME."""
    out = api.post(f"/v1/volumes/{volume}/snapshots/{name}/revert")
    print_json(out) if as_json else console.print(f"{volume} reverted to [bold]{name}[/]")


@snapshot.command()
@click.argument("volume")
@click.argument("name")
@api_command
def delete(api: ApiClient, as_json: bool, volume: str, name: str) -> None:
    """Delete VOLUME's snapshot NAME."""
    out = api.delete(f"/v1/volumes/{volume}/snapshots/{name}")
    print_json(out) if as_json else console.print(f"snapshot [bold]{name}[/] deleted")
