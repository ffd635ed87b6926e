"""The replicator: the block interface over N replicas, in tandem.

Rules (DESIGN.md, principle 4):
- A write goes to every RW and WO replica in parallel. It is acknowledged once every one of
  them has answered or been dropped, and only if a quorum (RF//2+1 of the configured
  replica count) of RW replicas wrote it. Otherwise the caller gets an error: a write is
  never acknowledged below quorum.
- A replica that fails a request or misses the per-request deadline is marked ERR and
  dropped. Before any further write is acknowledged, the generation of the remaining RW
  replicas is bumped (one synchronous metadata write each), so a dropped replica can never
  later pass for current: it holds an older generation than every replica that took writes
  it missed.
- Reads go to one RW replica (round robin); on error that replica is dropped and another
  tried. Below quorum the volume is read-only but keeps serving reads.
- At start the target connects to the replicas and waits until it reaches a quorum of them
  (fewer could all be stale). The replicas with the highest generation are current; the rest
  are stale (ERR) and never serve reads or act as a rebuild source. The target opens the
  current ones with a new epoch (fencing out any older target) and bumps their generation.
- A replica added back (API) is rebuilt: it joins as WO (takes writes, serves no reads),
  receives a copy of every chunk from a current replica under a range lock, and only then
  gets the current generation and turns RW.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from replica.client import ReplicaClient, ReplicaDown
from target.blockdev import (
    BlockError,
    Extent,
    MediumError,
    NoSpace,
    ReadOnlyError,
    check_range,
)
from target.rangelock import RangeLock

log = logging.getLogger("tandem.replicator")

BLOCK = 4096
REBUILD_CHUNK = 1024 * 1024


class Mode(StrEnum):
    RW = "RW"
    WO = "WO"
    ERR = "ERR"


@dataclass
class Member:
    address: str
    mode: Mode = Mode.ERR
    client: ReplicaClient | None = None
    error: str | None = "not connected"
    generation: int | None = None
    rebuild: dict[str, Any] | None = None
    since: float = field(default_factory=time.time)

    def status(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "mode": self.mode.value,
            "error": self.error,
            "generation": self.generation,
            "rebuild": self.rebuild,
        }


class QuorumError(ReadOnlyError):
    """Not enough current replicas to accept writes."""


class Replicator:
    def __init__(
        self,
        volume: str,
        size: int,
        addresses: list[str],
        replica_count: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        if size <= 0 or size % BLOCK:
            raise ValueError(f"volume size must be a positive multiple of {BLOCK}")
        self.volume = volume
        self._size = size
        self.timeout = timeout
        self.members = [Member(a) for a in addresses]
        self.replica_count = replica_count or len(addresses)
        self.quorum = self.replica_count // 2 + 1
        self.epoch = 0
        self.generation = 0
        self._rr = 0
        self._membership = asyncio.Lock()
        self._stable = asyncio.Event()  # clear while a generation bump is in progress
        self._stable.set()
        self._ranges = RangeLock()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- BlockDevice ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self.count(Mode.RW) < self.quorum

    def count(self, mode: Mode) -> int:
        return sum(1 for m in self.members if m.mode == mode)

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        return await self._read_any(lambda c: c.read(offset, length))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self._size, offset, length)
        return await self._read_any(lambda c: c.block_status(offset, length))

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        check_range(self._size, offset, len(data))
        await self._mutate(offset, len(data), lambda c: c.write(offset, data, fua))

    async def unmap(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        await self._mutate(offset, length, lambda c: c.unmap(offset, length))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        check_range(self._size, offset, length)
        await self._mutate(offset, length, lambda c: c.write_zeroes(offset, length, may_unmap))

    async def flush(self) -> None:
        await self._mutate(0, 0, lambda c: c.flush(), locked=False)

    # --- the write rule ---------------------------------------------------------------

    async def _mutate(self, offset: int, length: int, op: Any, locked: bool = True) -> None:
        if self.readonly:
            raise QuorumError(self._quorum_message())
        start, end = offset // BLOCK * BLOCK, -(-(offset + length) // BLOCK) * BLOCK
        if locked:
            async with self._ranges.shared(start, end):
                await self._fan_out(op)
        else:
            await self._fan_out(op)
        # A generation bump in progress means some replica just missed writes: no write is
        # acknowledged until the survivors carry the new generation.
        if not self._stable.is_set():
            await self._stable.wait()
        if self.readonly:
            raise QuorumError(self._quorum_message())

    async def _fan_out(self, op: Any) -> None:
        targets = [m for m in self.members if m.mode in (Mode.RW, Mode.WO) and m.client]
        results = await asyncio.gather(*(op(m.client) for m in targets), return_exceptions=True)
        ok = 0
        errors: list[BaseException] = []
        for m, r in zip(targets, results, strict=True):
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                errors.append(r)
                await self._drop(m, r)
            elif m.mode == Mode.RW:
                ok += 1
        if ok < self.quorum:
            if errors and all(getattr(e, "errno", 0) == errno.ENOSPC for e in errors):
                raise NoSpace(f"no space left on replicas: {errors[0]}")
            detail = f": {errors[0]}" if errors else ""
            raise MediumError(
                f"write reached {ok} of {self.replica_count} replicas, quorum is "
                f"{self.quorum}{detail}"
            )

    async def _read_any(self, op: Any) -> Any:
        last: BaseException | None = None
        for _ in range(len(self.members)):
            readers = [m for m in self.members if m.mode == Mode.RW and m.client]
            if not readers:
                break
            self._rr = (self._rr + 1) % len(readers)
            m = readers[self._rr]
            try:
                return await op(m.client)
            except ReplicaDown as e:
                last = e
                await self._drop(m, e)
            except BlockError as e:
                if e.errno == errno.EINVAL:
                    raise
                last = e
                await self._drop(m, e)
        raise MediumError(f"no replica could serve the read{': ' + str(last) if last else ''}")

    def _quorum_message(self) -> str:
        return (
            f"volume {self.volume} is read-only: {self.count(Mode.RW)} of "
            f"{self.replica_count} replicas are current, {self.quorum} needed for writes"
        )

    # --- membership -------------------------------------------------------------------

    async def _drop(self, m: Member, why: BaseException | str) -> None:
        """Mark m ERR and bump the generation of the remaining RW replicas."""
        if m.mode == Mode.ERR:
            if not self._stable.is_set():
                await self._stable.wait()
            return
        was_rw = m.mode == Mode.RW
        m.mode, m.error, m.since = Mode.ERR, str(why), time.time()
        if m.client is not None:
            m.client.close()
            m.client = None
        log.warning("replica %s dropped: %s", m.address, why)
        if was_rw:
            await self._bump_generation()
        if self.readonly:
            log.error("%s", self._quorum_message())

    async def _bump_generation(self) -> None:
        self._stable.clear()
        try:
            async with self._membership:
                while True:
                    self.generation += 1
                    rw = [m for m in self.members if m.mode == Mode.RW and m.client]
                    gen = self.generation
                    results = await asyncio.gather(
                        *(m.client.set_generation(gen) for m in rw if m.client),
                        return_exceptions=True,
                    )
                    failed = [(m, r) for m, r in zip(rw, results, strict=True) if r is not None]
                    for m, r in failed:
                        m.mode, m.error = Mode.ERR, f"generation update failed: {r}"
                        if m.client:
                            m.client.close()
                            m.client = None
                    for m in rw:
                        if m.mode == Mode.RW:
                            m.generation = gen
                    if not failed:
                        break
        finally:
            self._stable.set()

    async def start(self, wait: float | None = None) -> None:
        """Connect, find the current replicas, open them with a new epoch.

        Waits (retrying) until a quorum of replicas answers, because fewer could all be
        stale. `wait=None` waits forever; otherwise raises QuorumError after `wait` seconds.
        """
        deadline = None if wait is None else time.monotonic() + wait
        infos: dict[str, dict[str, Any]] = {}
        while True:
            await self._probe_all(infos)
            if len(infos) >= self.quorum:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise QuorumError(
                    f"only {len(infos)} of {self.replica_count} replicas reachable; "
                    f"{self.quorum} needed to tell current replicas from stale ones"
                )
            log.warning(
                "waiting for replicas: %d of %d reachable, need %d",
                len(infos),
                self.replica_count,
                self.quorum,
            )
            await asyncio.sleep(0.5)
        top = max(info["generation"] for info in infos.values())
        self.epoch = max(info["epoch"] for info in infos.values()) + 1
        self.generation = top
        current = []
        for m in self.members:
            info = infos.get(m.address)
            if info is None:
                continue
            if info["generation"] < top:
                self._set_err(m, f"stale: generation {info['generation']} < {top}")
                continue
            current.append(m)
        opened = await asyncio.gather(
            *(self._open(m) for m in current),
            return_exceptions=True,
        )
        for m, r in zip(current, opened, strict=True):
            if isinstance(r, BaseException):
                self._set_err(m, f"open failed: {r}")
            else:
                m.mode, m.error = Mode.RW, None
        # Replicas not opened now miss every write from here on.
        await self._bump_generation()
        log.info(
            "volume %s: epoch %d, generation %d, %d of %d replicas current%s",
            self.volume,
            self.epoch,
            self.generation,
            self.count(Mode.RW),
            self.replica_count,
            " (read-only)" if self.readonly else "",
        )

    async def _probe_all(self, infos: dict[str, dict[str, Any]]) -> None:
        """Connect to and INFO every replica not reached yet; adds to infos."""
        targets = [m for m in self.members if m.address not in infos]
        results = await asyncio.gather(*(self._probe(m) for m in targets), return_exceptions=True)
        for m, r in zip(targets, results, strict=True):
            if isinstance(r, BaseException):
                m.error = str(r)
            else:
                infos[m.address] = r

    async def _probe(self, m: Member) -> dict[str, Any]:
        client = ReplicaClient(m.address, self.timeout)
        await client.connect()
        try:
            info = await client.info()
            if info["size"] != self._size:
                raise BlockError(
                    f"replica {m.address} has size {info['size']}, volume has {self._size}"
                )
            if info.get("volume") and info["volume"] != self.volume:
                raise BlockError(f"replica {m.address} belongs to volume {info['volume']!r}")
        except BaseException:
            client.close()
            raise
        m.client, m.generation = client, info["generation"]
        return info

    async def _open(self, m: Member) -> None:
        assert m.client is not None
        await m.client.open(self.epoch)

    def _set_err(self, m: Member, why: str) -> None:
        m.mode, m.error = Mode.ERR, why
        if m.client is not None:
            m.client.close()
            m.client = None

    async def close(self) -> None:
        """Clean shutdown: replicas flush and record a clean close."""
        for t in list(self._tasks):
            t.cancel()
        live = [m for m in self.members if m.client and m.mode == Mode.RW]
        await asyncio.gather(
            *(m.client.close_session() for m in live if m.client), return_exceptions=True
        )
        for m in self.members:
            if m.client:
                m.client.close()
                m.client = None

    def status(self) -> dict[str, Any]:
        return {
            "replica_count": self.replica_count,
            "quorum": self.quorum,
            "epoch": self.epoch,
            "generation": self.generation,
            "readonly": self.readonly,
            "replicas": [m.status() for m in self.members],
        }

    # --- adding a replica back: rebuild -------------------------------------------------

    def find(self, address: str) -> Member | None:
        return next((m for m in self.members if m.address == address), None)

    async def add_replica(self, address: str) -> Member:
        """Add (or re-add) a replica; it is rebuilt in the background and then turns RW."""
        m = self.find(address)
        if m is not None and m.mode != Mode.ERR:
            raise ValueError(f"replica {address} is already {m.mode.value}")
        if m is None:
            if len(self.members) >= self.replica_count:
                raise ValueError(
                    f"volume already has {self.replica_count} replicas; remove one first"
                )
            m = Member(address)
            self.members.append(m)
        await self._probe(m)
        assert m.client is not None
        await m.client.open(self.epoch)
        m.mode, m.error, m.since = Mode.WO, None, time.time()
        task = asyncio.create_task(self._rebuild(m))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return m

    async def remove_replica(self, address: str) -> None:
        m = self.find(address)
        if m is None:
            raise KeyError(address)
        await self._drop(m, "removed by request")
        self.members.remove(m)

    async def _rebuild(self, m: Member) -> None:
        total = self._size
        m.rebuild = {"done": 0, "total": total, "started": time.time()}
        try:
            for start in range(0, total, REBUILD_CHUNK):
                if m.mode != Mode.WO or m.client is None:
                    return
                end = min(start + REBUILD_CHUNK, total)
                async with self._ranges.exclusive(start, end):
                    await self._copy_chunk(m, start, end)
                m.rebuild["done"] = end
            assert m.client is not None
            await m.client.flush()
            async with self._membership:
                await m.client.set_generation(self.generation)
                m.generation = self.generation
                m.mode, m.rebuild = Mode.RW, None
            log.info("replica %s rebuilt and RW", m.address)
        except (BlockError, OSError) as e:
            if m.mode != Mode.ERR:
                await self._drop(m, f"rebuild failed: {e}")

    async def _copy_chunk(self, m: Member, start: int, end: int) -> None:
        assert m.client is not None
        extents = await self._read_any(lambda c: c.block_status(start, end - start))
        for e in extents:
            if e.flags & 1:  # hole on the source: make sure nothing stale remains
                await m.client.unmap(e.offset, e.length)
            else:
                data = await self._read_any(lambda c, e=e: c.read(e.offset, e.length))
                await m.client.write(e.offset, data)
