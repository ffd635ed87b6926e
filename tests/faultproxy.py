"""A TCP proxy between the target and a replica that can cut the network: while cut, bytes
stop flowing both ways and new connections hang (no reset, like a dead link); restore()
lets everything flow again. Runs its own event loop on a thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.procs import HOST, free_port


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._gate: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._upstream: dict[asyncio.StreamWriter, int] = {}  # toward the replica: bytes sent

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        self._server = await asyncio.start_server(self._accept, HOST, self.port)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert self._gate is not None
        try:
            while data := await r.read(1 << 16):
                await self._gate.wait()  # a cut link holds the bytes
                if w in self._upstream:
                    self._upstream[w] += len(data)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert self._gate is not None
        await self._gate.wait()
        try:
            ur, uw = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            w.close()
            return
        self._writers |= {w, uw}
        self._upstream[uw] = 0
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))
        self._writers -= {w, uw}
        del self._upstream[uw]

    def cut(self) -> None:
        assert self._gate is not None
        self._loop.call_soon_threadsafe(self._gate.clear)

    def restore(self) -> None:
        assert self._gate is not None
        self._loop.call_soon_threadsafe(self._gate.set)

    def garble(self, data: bytes) -> None:
        """Send data to the replica on the connection that carried the most bytes to it (the
        target's data connection, once volume I/O went through), between what the target
        sends: call it with no I/O in flight, so it lands on a message boundary."""

        async def inject() -> None:
            w = max(self._upstream, key=self._upstream.__getitem__)
            w.write(data)
            await w.drain()

        asyncio.run_coroutine_threadsafe(inject(), self._loop).result(5)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
