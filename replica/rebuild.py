"""The replica side of a rebuild: pull ranges from a current replica (COPY_FROM).

The target decides what to copy and holds those ranges locked against writes; the data
itself moves replica to replica, never through the target. Per piece (at most PIECE bytes):
the source's block status decides what moves (holes become local UNMAPs, so nothing stale
survives; only allocated extents cross the network), then the piece is verified: the local
copy read back must equal the source's data, byte for byte (a compare costs less than the
two CRC32Cs it replaced, a third of the puller's CPU in a full rebuild). Many pieces are in
flight at once on one pipelined connection to the source.

Small pieces (an incremental catch-up is mostly scattered 4 KiB writes) move in groups: one
vectored READ (READV) from the source, one batch of local writes, one batch of reads back
to compare, per GROUP pieces, instead of a round trip and two store calls per piece.

With `compare_first` a piece whose checksum already matches is left alone: a crash resync
mostly finds the replicas equal and then only reads.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from native import crc32c
from replica import protocol as p
from replica.block import STATE_HOLE, BlockError
from replica.client import ReplicaClient
from replica.store import ReplicaStore

log = logging.getLogger("tandem.replica.rebuild")

T = TypeVar("T")
PIECE = 4 << 20
IN_FLIGHT = 64
SMALL = 64 << 10  # pieces up to this size skip the block-status round trip
GROUP = 128  # small pieces per READV
GROUP_BYTES = 1 << 20


class SourceError(BlockError):
    """The source replica failed or could not be reached: the target may try another."""

    errno = errno.EREMOTEIO


class CopyMismatch(BlockError):
    """The copy does not match the source after it was made."""

    errno = errno.EIO


async def _ask(request: Awaitable[T]) -> T:
    """A request to the source: any failure of it is the source's (SourceError)."""
    try:
        return await request
    except BlockError as e:
        raise SourceError(f"source replica: {e}") from e


def pieces(ranges: list[tuple[int, int]], piece: int = PIECE) -> Iterator[tuple[int, int]]:
    for off, n in ranges:
        pos, end = off, off + n
        while pos < end:
            stop = min(end, (pos // piece + 1) * piece)
            yield pos, stop - pos
            pos = stop


def grouped(todo: Iterator[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """The pieces as work items: a large piece alone, small ones in groups (one READV)."""
    group: list[tuple[int, int]] = []
    size = 0
    for off, n in todo:
        if n > SMALL:
            yield [(off, n)]
            continue
        group.append((off, n))
        size += n
        if len(group) >= min(GROUP, p.READV_MAX_RANGES) or size >= GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


class Puller:
    """Keeps one connection per source address and copies ranges from it into the store."""

    def __init__(self, store: ReplicaStore) -> None:
        self.store = store
        self._sources: dict[str, ReplicaClient] = {}
        self._no_readv: set[str] = set()  # sources of an older release (no READV)

    async def _source(self, address: str) -> ReplicaClient:
        client = self._sources.get(address)
        if client is None or not client.connected:
            client = ReplicaClient(address, timeout=30.0)
            try:
                await client.connect()
            except BlockError as e:
                raise SourceError(f"source {address}: {e}") from e
            self._sources[address] = client
        return client

    async def copy(
        self, address: str, ranges: list[tuple[int, int]], compare_first: bool = False
    ) -> dict[str, Any]:
        src = await self._source(address)
        if not compare_first:
            # One write-intent sync for every region the copy will touch, instead of one per
            # region as scattered pieces reach them (most of an incremental catch-up's time).
            # On the native engine this pauses it (a coroutine); the store does it at once.
            prepared = self.store.prepare_writes(ranges)
            if asyncio.iscoroutine(prepared):
                await prepared
        stats = {"copied": 0, "unmapped": 0, "compared": 0, "pieces": 0}
        # Compared pieces go one by one: the checksum round trip decides whether each moves.
        todo = ([piece] for piece in pieces(ranges)) if compare_first else grouped(pieces(ranges))
        failure: list[BaseException] = []

        async def worker() -> None:
            for item in todo:
                if failure:
                    return
                try:
                    if len(item) == 1:
                        await self._piece(src, *item[0], compare_first, stats)
                    else:
                        await self._group(src, item, stats)
                except BaseException as e:
                    failure.append(e)
                    return

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        if failure:
            raise failure[0]
        return stats

    async def _group(
        self, src: ReplicaClient, group: list[tuple[int, int]], stats: dict[str, int]
    ) -> None:
        """Small pieces: one READV, then their local writes and read-back at once."""
        if src.address in self._no_readv:
            for off, n in group:
                await self._piece(src, off, n, False, stats)
            return
        try:
            data = await src.readv(group)
        except BlockError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise SourceError(f"source replica: {e}") from e
            log.info("source %s has no READV: reading its pieces one by one", src.address)
            self._no_readv.add(src.address)
            await self._group(src, group, stats)
            return
        stats["pieces"] += len(group)
        self._put(group, data, stats)

    def _put(self, ranges: list[tuple[int, int]], data: bytes, stats: dict[str, int]) -> None:
        """Store pieces whose data came back to back, and verify they read back as it."""
        unmapped = self.store.put_pieces(ranges, data)
        stats["unmapped"] += unmapped
        stats["copied"] += len(data) - unmapped
        if self.store.read_pieces(ranges) != data:
            raise CopyMismatch(f"{len(ranges)} pieces from {ranges[0][0]} differ after the copy")

    async def _piece(
        self, src: ReplicaClient, off: int, n: int, compare_first: bool, stats: dict[str, int]
    ) -> None:
        stats["pieces"] += 1
        if compare_first:
            stats["compared"] += n
            if await _ask(src.checksum(off, n)) == crc32c(self.store.read(off, n)):
                return
        if n <= SMALL:
            # A small piece: one read, no block status (zeros become a hole: put_pieces).
            data = await _ask(src.read(off, n))
            self._put([(off, n)], data, stats)
            return
        expect = bytearray(n)  # what the piece must read as afterwards (holes: zeros)
        for e in await _ask(src.block_status(off, n)):
            lo, hi = max(e.offset, off), min(e.offset + e.length, off + n)
            if hi <= lo:
                continue
            if e.flags & STATE_HOLE:
                self.store.unmap(lo, hi - lo)
                stats["unmapped"] += hi - lo
            else:
                data = await _ask(src.read(lo, hi - lo))
                self.store.write(lo, data)
                expect[lo - off : hi - off] = data
                stats["copied"] += hi - lo
        # Verified against the source's data itself (the range is locked, so it is current).
        if self.store.read(off, n) != expect:
            raise CopyMismatch(f"piece {off}+{n} differs from the source after the copy")

    def close(self) -> None:
        for client in self._sources.values():
            client.close()
        self._sources.clear()
