"""Sockets of the replica data protocol: TCP, and a unix socket for a target on the same host.

A replica started with `--socket PATH` also serves the protocol on that unix socket and says
so in INFO, with the host's boot id. A target that reads the same boot id (the same running
kernel) talks to it through the socket instead of loopback TCP: no TCP stack per message
(measured here: half the CPU per 4 KiB message at depth 32, and with 1 MiB socket buffers
about twice the throughput for 1 MiB payloads). The TCP address stays the replica's identity
and what other replicas pull rebuild data from.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

BUFFER = 1 << 20  # unix socket buffers: a 1 MiB payload goes in one send, not many wake-ups


def tune(sock: socket.socket) -> None:
    """Options for a data connection: no Nagle on TCP, large buffers on a unix socket."""
    if sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    elif sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _listening(family: int, addr: object) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        if family == socket.AF_UNIX:
            os.chmod(str(addr), 0o660)  # owner and group may connect
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening socket like asyncio's create_server makes (SO_REUSEADDR, non-blocking)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    return _listening(family, addr)


def listen_unix(path: str) -> socket.socket:
    """A non-blocking listening unix socket at path. A stale one (its server crashed: nobody
    answers) is replaced; a live one or any other file there is an error."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale
        else:
            raise OSError(f"{path} is in use by another process")
        finally:
            probe.close()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _listening(socket.AF_UNIX, path)


def unlink_socket(path: str | None) -> None:
    if path:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
