"""The agent process: the agent, its REST API, stopped by SIGTERM/SIGINT.

On a signal the agent exits and leaves its volumes running (a restart adopts them);
`--stop-children` makes it stop them too.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from maya.agent.agent import Agent, AgentConfig
from maya.agent.api import make_app
from replica.webserver import WebServer

log = logging.getLogger("tandem.agent")


async def serve_agent(cfg: AgentConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(cfg)
    web = WebServer(make_app(agent), host, port)
    cfg.agent_url = cfg.agent_url or f"http://{cfg.address}:{web.port}"
    await web.start()
    await agent.start()
    print(f"agent {cfg.node}: api {cfg.agent_url} apiserver {cfg.apiserver}", flush=True)
    await stop.wait()
    log.info("agent stopping (%s its processes)", "with" if cfg.stop_children_on_exit else "not")
    await agent.close()
    await web.close()
