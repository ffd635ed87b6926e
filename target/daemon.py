"""The target process: one volume, its frontends and its REST API."""

from __future__ import annotations

import asyncio
import logging
import signal

from native import choose_engine
from replica.client import parse_address
from replica.webserver import WebServer
from target.api import make_app
from target.volume import Volume, VolumeOptions

log = logging.getLogger("tandem.target")


async def serve_target(opts: VolumeOptions, nbd: str | None, iscsi: str | None, api: str) -> None:
    # Handlers first: a SIGTERM that arrives while starting still means a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    kind, why = choose_engine(opts.engine)
    log.info("target engine: %s (%s)", kind, why)
    opts.engine = kind
    volume = Volume(opts)
    ahost, aport = parse_address(api)
    web = WebServer(make_app(volume), ahost, aport)
    await web.start()
    starting = asyncio.create_task(volume.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        starting.result()
        lines = [f"volume {opts.name}: api http://{ahost}:{web.port}"]
        if nbd is not None:
            host, port = parse_address(nbd)
            port = await volume.serve_nbd(host, port)
            lines.append(f"nbd://{host}:{port}/{opts.name}")
        if iscsi is not None:
            host, port = parse_address(iscsi)
            port = await volume.serve_iscsi(host, port)
            assert opts.iscsi is not None
            lines.append(f"iscsi://{host}:{port}/{opts.iscsi.iqn}/0")
        print(" ".join(lines), flush=True)
        await stop.wait()
    else:
        starting.cancel()
    stopping.cancel()
    log.info("stopping target for %s", opts.name)
    await volume.close()
    await web.close()
