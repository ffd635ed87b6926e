"""`tandem apiserver`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from maya.paths import default_data_dir, load_or_create_token
from replica.client import parse_address


@click.command()
@click.option("--listen", default="127.0.0.1:5656", show_default=True, help="HOST:PORT.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the token (and by default the database) live [default: $TANDEM_HOME or "
    "~/.local/share/tandem].",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SQLite database [default: DATA_DIR/maya.db].",
)
@click.option(
    "--colocate-replicas",
    is_flag=True,
    help="Relax anti-affinity: replicas of a volume may share a node (one-node setups only).",
)
@click.option(
    "--node-timeout",
    type=click.FloatRange(0.1),
    default=15.0,
    show_default=True,
    help="Seconds without a heartbeat before a node is NotReady.",
)
@click.option(
    "--replace-after",
    type=click.FloatRange(0.1),
    default=60.0,
    show_default=True,
    help="Seconds a node may be silent before its replicas/targets move elsewhere.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.05),
    default=2.0,
    show_default=True,
    help="Seconds between looks at every volume's target.",
)
def apiserver(
    listen: str,
    data_dir: Path | None,
    db: Path | None,
    colocate_replicas: bool,
    node_timeout: float,
    replace_after: float,
    poll_interval: float,
) -> None:
    """Run the control plane's API server (volumes, nodes, scheduling, healing)."""
    from maya.apiserver.daemon import serve_apiserver
    from maya.apiserver.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        host, port = parse_address(listen)
        data_dir = (data_dir or default_data_dir()).expanduser()
        settings = Settings(
            db=db or data_dir / "maya.db",
            token=load_or_create_token(data_dir / "apiserver.token"),
            colocate_replicas=colocate_replicas,
            node_timeout=node_timeout,
            replace_after=replace_after,
            poll_interval=poll_interval,
        )
        asyncio.run(serve_apiserver(settings, host, port))
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
