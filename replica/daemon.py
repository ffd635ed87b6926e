"""The replica process: store + data server + REST API, stopped cleanly by SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from replica import faults
from replica.api import make_app
from replica.client import parse_address
from replica.server import ReplicaServer
from replica.store import ReplicaStore
from replica.webserver import WebServer

if TYPE_CHECKING:
    from replica.native_server import NativeReplicaServer

from native import choose_engine

log = logging.getLogger("tandem.replica")


async def serve_replica(
    directory: Path,
    size: int,
    listen: str,
    api: str,
    volume: str,
    debug_api: bool = False,
    engine: str = "auto",
    socket_path: str | None = None,
    poll_us: int = 0,
) -> None:
    # Handlers first: a SIGTERM that arrives while starting still means a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    kind, why = choose_engine(engine)
    store = ReplicaStore.open_or_create(directory, size, volume)
    if store.was_dirty:
        log.warning("replica at %s was not closed cleanly (dirty)", directory)
    log.info("replica engine: %s (%s)", kind, why)
    server: ReplicaServer | NativeReplicaServer
    if kind == "native":
        from replica.native_server import NativeReplicaServer

        server = NativeReplicaServer(store, poll_us)
    else:
        server = ReplicaServer(store)
    host, port = parse_address(listen)
    ahost, aport = parse_address(api)
    faults.load_env_faults()
    web = WebServer(make_app(server, debug=debug_api), ahost, aport)
    await server.start(host, port, socket_path)
    await web.start()
    print(
        f"replica {directory}: data {host}:{server.port} api http://{ahost}:{web.port}", flush=True
    )
    await stop.wait()
    log.info("stopping replica at %s", directory)
    await server.close()
    await web.close()
    store.close(clean=True)
