"""A verifying writer for fault tests: writes random 4 KiB blocks through NBD with several
requests in flight, survives disconnects (reconnecting), and records for every block what
was acknowledged and what else might legitimately be there (writes that failed or whose
fate is unknown because the connection broke). verify() then checks every block."""

from __future__ import annotations

import os
import random
import threading
import time

import nbd

BLOCK = 4096


class VerifyingWriter:
    def __init__(self, uri: str, size: int, seed: int, depth: int = 8) -> None:
        self.uri, self.size, self.depth = uri, size, depth
        self.rng = random.Random(seed)
        self.acked: dict[int, bytes] = {}  # block offset -> last acknowledged data
        self.maybe: dict[int, list[bytes]] = {}  # data written after it, fate unknown/failed
        self.acks = self.errors = self.reconnects = 0
        self._in_flight: dict[int, bytes] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # --- bookkeeping --------------------------------------------------------------------

    def _done(self, off: int, data: bytes, err: object) -> int:
        self._in_flight.pop(off, None)
        if err.value == 0:  # type: ignore[attr-defined]
            self.acked[off] = data
            self.maybe.pop(off, None)
            self.acks += 1
        else:
            self.errors += 1
            self.maybe.setdefault(off, []).append(data)
        return 1

    def _lost_in_flight(self) -> None:
        for off, data in self._in_flight.items():
            self.maybe.setdefault(off, []).append(data)
        self._in_flight.clear()

    # --- running ------------------------------------------------------------------------

    def _connect(self) -> nbd.NBD | None:
        while not self._stop.is_set():
            try:
                h = nbd.NBD()
                h.connect_uri(self.uri)
                return h
            except nbd.Error:
                time.sleep(0.2)
        return None

    def _loop(self) -> None:
        try:
            h = self._connect()
            while h is not None and not self._stop.is_set():
                try:
                    while h.aio_in_flight() < self.depth and not self._stop.is_set():
                        off = self.rng.randrange(self.size // BLOCK) * BLOCK
                        if off in self._in_flight:
                            continue  # one write per block at a time keeps the model exact
                        data = os.urandom(BLOCK)
                        self._in_flight[off] = data
                        h.aio_pwrite(
                            data, off, completion=lambda e, o=off, d=data: self._done(o, d, e)
                        )
                    h.poll(100)
                except nbd.Error:
                    self._lost_in_flight()
                    self.reconnects += 1
                    h = self._connect()
            if h is not None:  # drain what is in flight, then flush what was acknowledged
                try:
                    while h.aio_in_flight() > 0:
                        h.poll(1000)
                    h.flush()
                except nbd.Error:
                    self._lost_in_flight()
        except BaseException as e:  # surfaced by stop()
            self.failure = e

    def start(self) -> VerifyingWriter:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "writer did not stop"
        if self.failure is not None:
            raise self.failure

    # --- checking -----------------------------------------------------------------------

    def verify(self, uri: str | None = None) -> int:
        """Every block holds its last acknowledged data, or data of a later write that was
        not acknowledged. Returns the number of blocks checked."""
        h = nbd.NBD()
        h.connect_uri(uri or self.uri)
        blocks = set(self.acked) | set(self.maybe)
        for off in sorted(blocks):
            got = h.pread(BLOCK, off)
            allowed = [
                *([self.acked[off]] if off in self.acked else [bytes(BLOCK)]),
                *self.maybe.get(off, []),
            ]
            assert got in allowed, f"block at {off}: not the acknowledged data (lost write)"
        h.shutdown()
        return len(blocks)
