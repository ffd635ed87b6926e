"""The target process: one volume, its frontends and its REST API."""

from __future__ import annotations

import asyncio
import logging
import signal

from replica.client import parse_address
from replica.webserver import WebServer
from target.api import make_app
from target.volume import Volume

log = logging.getLogger("tandem.target")


async def serve_target(
    name: str,
    size: int,
    replicas: list[str],
    nbd: str,
    api: str,
    replica_count: int | None,
    replica_timeout: float,
) -> None:
    # Handlers first: a SIGTERM that arrives while starting still means a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    volume = Volume(name, size, replicas, replica_count, replica_timeout)
    ahost, aport = parse_address(api)
    web = WebServer(make_app(volume), ahost, aport)
    await web.start()
    starting = asyncio.create_task(volume.start())
    await asyncio.wait(
        [starting, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if not stop.is_set():
        starting.result()
        host, port = parse_address(nbd)
        port = await volume.serve_nbd(host, port)
        print(
            f"volume {name}: nbd://{host}:{port}/{name} api http://{ahost}:{web.port}", flush=True
        )
        await stop.wait()
    else:
        starting.cancel()
    log.info("stopping target for %s", name)
    await volume.close()
    await web.close()
