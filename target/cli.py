"""`tandem target ...` commands."""

from __future__ import annotations

import asyncio
import logging

import click

from replica.cli import POLL_OPTION
from replica.client import parse_address
from replica.sizes import parse_size


@click.group()
def target() -> None:
    """Volume targets: one per volume, serving NBD and mirroring writes to its replicas."""


@target.command()
@click.option("--volume", "name", required=True, help="Volume name (also the NBD export name).")
@click.option("--size", required=True, help="Volume size, e.g. 10G.")
@click.option(
    "--replica",
    "replicas",
    multiple=True,
    required=True,
    help="HOST:PORT of a replica's data protocol; repeat for each replica.",
)
@click.option(
    "--replica-count",
    type=click.IntRange(1, 16),
    default=None,
    help="Configured replica count (quorum base); default: number of --replica.",
)
@click.option(
    "--replica-timeout",
    type=click.FloatRange(0.1, 600),
    default=5.0,
    show_default=True,
    help="Per-request deadline in seconds; slower replicas are dropped.",
)
@click.option(
    "--replica-timeout-last",
    type=click.FloatRange(0.1, 3600),
    default=None,
    help="Deadline while the RW replicas are down to the bare quorum [default: 6x the above].",
)
@click.option(
    "--rebuild-rate",
    default="0",
    show_default=True,
    help="Rebuild bandwidth limit in bytes per second (e.g. 200M); 0 = unlimited.",
)
@click.option("--iops-limit", type=click.IntRange(0), default=0, help="QoS: total IOPS; 0 = none.")
@click.option("--read-iops-limit", type=click.IntRange(0), default=0, help="QoS: read IOPS.")
@click.option("--write-iops-limit", type=click.IntRange(0), default=0, help="QoS: write IOPS.")
@click.option("--bps-limit", default="0", help="QoS: total bytes per second, e.g. 100M.")
@click.option("--read-bps-limit", default="0", help="QoS: read bytes per second.")
@click.option("--write-bps-limit", default="0", help="QoS: write bytes per second.")
@click.option(
    "--qos-burst",
    type=click.FloatRange(0, 60),
    default=1.0,
    show_default=True,
    help="Seconds of QoS rate an idle volume may bank for a burst.",
)
@click.option("--nbd", default="127.0.0.1:10809", show_default=True, help="NBD listen address.")
@click.option("--no-nbd", is_flag=True, help="Do not serve NBD.")
@click.option("--iscsi", default=None, help="iSCSI portal to listen on, e.g. 127.0.0.1:3260.")
@click.option("--iqn", default=None, help="Target IQN [default: iqn.2026-11.io.tandem:VOLUME].")
@click.option("--chap-user", default=None, help="CHAP user initiators must log in with.")
@click.option("--chap-secret", default=None, envvar="TANDEM_CHAP_SECRET", help="CHAP secret.")
@click.option("--mutual-chap-user", default=None, help="User the target proves (mutual CHAP).")
@click.option(
    "--mutual-chap-secret", default=None, envvar="TANDEM_MUTUAL_CHAP_SECRET", help="Its secret."
)
@click.option(
    "--allow-initiator",
    "allowed",
    multiple=True,
    help="Initiator IQN allowed to log in; repeat. Default: any.",
)
@click.option(
    "--public-portal", default=None, help="HOST:PORT that SendTargets advertises instead."
)
@click.option("--api", default="127.0.0.1:9501", show_default=True, help="REST API address.")
@click.option(
    "--engine",
    type=click.Choice(["auto", "native", "python"]),
    default="auto",
    show_default=True,
    envvar="TANDEM_ENGINE",
    metavar="ENGINE",
    help="Data path: native (C on io_uring), python (the reference), or auto (native where "
    "io_uring works and the extension is built).",
)
@POLL_OPTION
def serve(
    name: str,
    size: str,
    replicas: tuple[str, ...],
    replica_count: int | None,
    replica_timeout: float,
    replica_timeout_last: float | None,
    rebuild_rate: str,
    iops_limit: int,
    read_iops_limit: int,
    write_iops_limit: int,
    bps_limit: str,
    read_bps_limit: str,
    write_bps_limit: str,
    qos_burst: float,
    nbd: str,
    no_nbd: bool,
    iscsi: str | None,
    iqn: str | None,
    chap_user: str | None,
    chap_secret: str | None,
    mutual_chap_user: str | None,
    mutual_chap_secret: str | None,
    allowed: tuple[str, ...],
    public_portal: str | None,
    api: str,
    engine: str,
    poll_us: int,
) -> None:
    """Serve a replicated volume over NBD and/or iSCSI."""
    from target.daemon import serve_target
    from target.qos import QosLimits
    from target.volume import IscsiOptions, VolumeOptions, default_iqn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if replica_count is not None and replica_count < len(replicas):
            raise ValueError("--replica-count is smaller than the number of --replica")
        if no_nbd and iscsi is None:
            raise ValueError("no frontend: give --iscsi or drop --no-nbd")
        if (chap_user is None) != (chap_secret is None):
            raise ValueError("--chap-user and --chap-secret go together")
        if (mutual_chap_user is None) != (mutual_chap_secret is None):
            raise ValueError("--mutual-chap-user and --mutual-chap-secret go together")
        portal = None
        if public_portal:
            phost, pport = parse_address(public_portal)
            portal = (phost, pport)
        opts = VolumeOptions(
            name=name,
            size=parse_size(size),
            replicas=list(replicas),
            replica_count=replica_count,
            replica_timeout=replica_timeout,
            replica_timeout_last=replica_timeout_last,
            rebuild_rate=parse_size(rebuild_rate),
            qos=QosLimits(
                read_iops=read_iops_limit,
                write_iops=write_iops_limit,
                total_iops=iops_limit,
                read_bps=parse_size(read_bps_limit),
                write_bps=parse_size(write_bps_limit),
                total_bps=parse_size(bps_limit),
                burst_seconds=qos_burst,
            ),
            iscsi=IscsiOptions(
                iqn=iqn or default_iqn(name),
                chap=(chap_user, chap_secret) if chap_user and chap_secret else None,
                mutual_chap=(mutual_chap_user, mutual_chap_secret)
                if mutual_chap_user and mutual_chap_secret
                else None,
                allowed_initiators=list(allowed) or None,
                public_portal=portal,
            ),
            engine=engine,
            poll_us=poll_us,
        )
        for address in (*replicas, *([] if no_nbd else [nbd]), *([iscsi] if iscsi else []), api):
            parse_address(address)
        asyncio.run(serve_target(opts, None if no_nbd else nbd, iscsi, api))
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e


@target.command()
@click.option("--api", default="127.0.0.1:9501", show_default=True, help="Target REST API.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(api: str, as_json: bool) -> None:
    """Show a running target's volume: quorum, replicas and their modes, rebuild progress."""
    import json

    import httpx
    from rich.console import Console
    from rich.table import Table

    url = api if api.startswith("http") else f"http://{api}"
    try:
        vol = httpx.get(f"{url}/v1/volume", timeout=10).raise_for_status().json()
    except httpx.HTTPError as e:
        raise click.ClickException(f"cannot reach the target at {url}: {e}") from e
    if as_json:
        click.echo(json.dumps(vol, indent=2))
        return
    state = "read-only (below quorum)" if vol["readonly"] else "read-write"
    console = Console()
    console.print(
        f"volume [bold]{vol['name']}[/] {vol['size']} bytes, {state}; "
        f"epoch {vol['epoch']} generation {vol['generation']}, "
        f"quorum {vol['quorum']} of {vol['replica_count']}"
    )
    table = Table("replica", "via", "mode", "generation", "rebuild", "error")
    for r in vol["replicas"]:
        rb = r.get("rebuild")
        progress = f"{rb['kind']} {rb['percent']}% ETA {rb['eta_seconds']}s" if rb else ""
        color = {"RW": "green", "WO": "yellow", "ERR": "red"}.get(r["mode"], "")
        table.add_row(
            r["address"],
            (r.get("transport") or "") + (" + shared memory" if r.get("shared_memory") else ""),
            f"[{color}]{r['mode']}[/]",
            str(r.get("generation")),
            progress,
            r.get("error") or "",
        )
    console.print(table)
