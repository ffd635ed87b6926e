"""Free TCP ports for the processes an agent runs (each agent picks its own)."""

from __future__ import annotations

import socket


def free_port(host: str, taken: set[int]) -> int:
    """A port nothing listens on at `host` now and that this agent has not handed out."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
    raise OSError(f"no free port on {host}")
