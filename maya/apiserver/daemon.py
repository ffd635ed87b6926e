"""The apiserver process: REST API + control loop on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from maya.apiserver.app import make_app
from maya.apiserver.settings import Settings
from replica.webserver import WebServer

log = logging.getLogger("tandem.apiserver")


class Apiserver:
    """A started apiserver (also embedded by `tandem up`)."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        # The web server runs without ASGI lifespan: the control loop is ours to start.
        self.app = make_app(settings, run_reconciler=False)
        self.web = WebServer(self.app, host, port)
        self.port = self.web.port
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.web.start()
        self._task = asyncio.create_task(self.app.state.reconciler.run())

    async def close(self) -> None:
        cluster = self.app.state.cluster
        cluster.closing = True
        await cluster.notify()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.web.close()
        await cluster.close()


async def serve_apiserver(settings: Settings, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Apiserver(settings, host, port)
    await server.start()
    print(f"apiserver: http://{host}:{server.port} db {settings.db}", flush=True)
    await stop.wait()
    log.info("apiserver stopping")
    await server.close()
