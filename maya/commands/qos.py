"""`tandem qos set|show`: a volume's I/O limits, changed online."""

from __future__ import annotations

from typing import Any

import click

from maya.client import ApiClient
from maya.commands.common import api_command, console, print_json
from maya.validation import parse_rate

FLAGS = (
    ("iops_limit", "total_iops"),
    ("read_iops_limit", "read_iops"),
    ("write_iops_limit", "write_iops"),
    ("bps_limit", "total_bps"),
    ("read_bps_limit", "read_bps"),
    ("write_bps_limit", "write_bps"),
    ("rebuild_rate", "rebuild_bps"),
)


@click.group()
def qos() -> None:
    """Per-volume QoS limits (applied online: initiators stay connected)."""


def _text(doc: dict[str, Any]) -> str:
    set_ = [f"{k}={v}" for k, v in doc.items() if v and k != "burst_seconds"]
    return ", ".join(set_) or "unlimited"


@qos.command("set")
@click.argument("volume")
@click.option("--iops-limit", default=None, help="Total IOPS (0 = unlimited).")
@click.option("--read-iops-limit", default=None)
@click.option("--write-iops-limit", default=None)
@click.option("--bps-limit", default=None, help="Total bytes per second, e.g. 100M.")
@click.option("--read-bps-limit", default=None)
@click.option("--write-bps-limit", default=None)
@click.option(
    "--burst",
    type=click.FloatRange(0, 60),
    default=None,
    help="Seconds of rate an idle volume may save up for a burst.",
)
@click.option("--rebuild-rate", default=None, help="Rebuild bandwidth, e.g. 50M (separate).")
@api_command
def set_(
    api: ApiClient, as_json: bool, volume: str, burst: float | None, **limits: str | None
) -> None:
    """Change some limits of VOLUME; the others stay as they are."""
    doc = api.get(f"/v1/volumes/{volume}/qos")
    for flag, key in FLAGS:
        if limits.get(flag) is not None:
            doc[key] = parse_rate(limits[flag])  # type: ignore[arg-type]
    if burst is not None:
        doc["burst_seconds"] = burst
    out = api.put(f"/v1/volumes/{volume}/qos", doc)
    if as_json:
        print_json(out)
        return
    how = "applied" if out["applied"] else "recorded (applied when its target runs)"
    console.print(f"{volume}: {_text(out['qos'])} — {how}")


@qos.command("show")
@click.argument("volume")
@api_command
def show(api: ApiClient, as_json: bool, volume: str) -> None:
    """Show VOLUME's limits."""
    doc = api.get(f"/v1/volumes/{volume}/qos")
    print_json(doc) if as_json else console.print(f"{volume}: {_text(doc)}")
