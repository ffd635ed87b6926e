"""`tandem replica ...` commands."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from replica.sizes import parse_size
from replica.store import StoreError

DEFAULT_POLL_US = 50

# Shared by `tandem target serve` and `tandem replica serve`.
POLL_OPTION = click.option(
    "--poll-us",
    type=click.IntRange(0, 10_000),
    default=DEFAULT_POLL_US,
    show_default=True,
    envvar="TANDEM_POLL_US",
    help="Native engine: after each completion, poll this many microseconds for the next one "
    "before sleeping, while requests come one at a time (queue depth 1; not with many in "
    "flight). "
    "Lower latency for that CPU; 0 never polls.",
)


@click.group()
def replica() -> None:
    """Replica processes: one per volume per node, holding a copy of the volume's data."""


@replica.command()
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Replica directory (created with the volume when empty).",
)
@click.option(
    "--size", required=True, help="Volume size, e.g. 10G (checked against an existing replica)."
)
@click.option(
    "--listen", default="127.0.0.1:9502", show_default=True, help="Data protocol address."
)
@click.option("--api", default="127.0.0.1:9503", show_default=True, help="REST API address.")
@click.option("--volume", default="", help="Volume name recorded in a new replica.")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    help="Also serve the data protocol on this unix socket: a target on the same host uses "
    "it instead of TCP (faster).",
)
@click.option(
    "--debug-api",
    is_flag=True,
    envvar="TANDEM_DEBUG_API",
    help="Enable the fault-injection endpoints (/v1/debug/faults) for tests.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "native", "python"]),
    default="auto",
    show_default=True,
    envvar="TANDEM_ENGINE",
    help="Data path: native (C on io_uring), python (the reference), or auto (native where "
    "io_uring works and the extension is built).",
)
@POLL_OPTION
def serve(
    directory: Path,
    size: str,
    listen: str,
    api: str,
    volume: str,
    socket_path: str | None,
    debug_api: bool,
    engine: str,
    poll_us: int,
) -> None:
    """Serve a replica directory over the replica data protocol."""
    from replica.daemon import serve_replica

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        nbytes = parse_size(size)
        directory.mkdir(parents=True, exist_ok=True)
        asyncio.run(
            serve_replica(
                directory, nbytes, listen, api, volume, debug_api, engine, socket_path, poll_us
            )
        )
    except (StoreError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
