"""`tandem target ...` commands."""

from __future__ import annotations

import asyncio
import logging

import click

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
@click.option("--nbd", default="127.0.0.1:10809", show_default=True, help="NBD listen address.")
@click.option("--api", default="127.0.0.1:9501", show_default=True, help="REST API address.")
def serve(
    name: str,
    size: str,
    replicas: tuple[str, ...],
    replica_count: int | None,
    replica_timeout: float,
    nbd: str,
    api: str,
) -> None:
    """Serve a replicated volume over NBD."""
    from target.daemon import serve_target

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        nbytes = parse_size(size)
        if replica_count is not None and replica_count < len(replicas):
            raise ValueError("--replica-count is smaller than the number of --replica")
        asyncio.run(
            serve_target(name, nbytes, list(replicas), nbd, api, replica_count, replica_timeout)
        )
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
