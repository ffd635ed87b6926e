"""Write-intent regions: where a replica may differ from its peers after a crash.

A replica crashes (or its target does) with writes in flight or not yet flushed: its peers
may hold writes it lacks, or the other way round, even though all carry the same
generation. To resynchronise only what may differ (not the whole volume, as Jiva did),
every replica keeps a coarse bitmap of regions with writes that are not known durable:

- Before the first write to an unmarked region, the region is marked and the mark made
  durable (pwrite + fdatasync of `intent.bin`): about 0.1 ms, once per region, not per
  write. A region stays marked while it is being written, so a steady workload pays nothing.
- After a flush, regions written last more than CLEAR_AFTER seconds before the flush began
  are cleared (their writes are durable here). Clearing is lazy and not synced: a lost
  clear only means a region is resynchronised needlessly.
- A clean end of session (all data synced) clears every mark.

A target restarting after a crash resynchronises the union of the current replicas'
marked regions from one of them; a replica returning after an outage catches up on the
regions the target saw written while it was away plus its own marked regions.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from array import array
from pathlib import Path

MIN_REGION = 1 << 20
MAX_REGIONS = 1 << 16
CLEAR_AFTER = 5.0  # seconds a region must be idle before a flush clears it
_HEADER = struct.Struct("<8sQQ")  # magic, region size, region count
_MAGIC = b"TNDINT01"


def region_size(size: int) -> int:
    """A power of two >= 1 MiB giving at most MAX_REGIONS regions."""
    region = MIN_REGION
    while size > region * MAX_REGIONS:
        region *= 2
    return region


class WriteIntent:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.region = region_size(size)
        self.count = -(-size // self.region)
        self.marked = bytearray(self.count)
        self._touch = array("I", bytes(4 * self.count))  # monotonic second of the last write
        self._clock0 = time.monotonic()
        self._last_clear = 0.0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._load()

    def _load(self) -> None:
        raw = os.pread(self._fd, _HEADER.size + self.count, 0)
        if len(raw) < _HEADER.size:
            if raw:  # torn or foreign: assume every region may differ
                self.marked[:] = b"\x01" * self.count
            return
        magic, region, count = _HEADER.unpack_from(raw)
        body = raw[_HEADER.size :]
        if magic != _MAGIC or region != self.region or count != self.count or len(body) < count:
            self.marked[:] = b"\x01" * self.count  # another geometry: be conservative
        else:
            self.marked[:] = body

    def _save(self, sync: bool) -> None:
        os.pwrite(self._fd, _HEADER.pack(_MAGIC, self.region, self.count) + self.marked, 0)
        if sync:
            os.fdatasync(self._fd)

    def _now(self) -> int:
        return int(time.monotonic() - self._clock0) + 1

    def before_write(self, offset: int, length: int) -> None:
        """Call before a write/unmap/zero of [offset, offset+length) reaches the data file."""
        self.before_writes([(offset, length)])

    def before_writes(self, ranges: list[tuple[int, int]]) -> None:
        """before_write for many (offset, length) ranges with one sync: a rebuild about to
        copy scattered pieces marks their regions at once, not one fdatasync per region."""
        now = self._now()
        undo: list[tuple[int, bytes]] = []
        for offset, length in ranges:
            r0 = offset // self.region
            r1 = max(r0 + 1, -(-(offset + length) // self.region))
            self._touch[r0:r1] = array("I", [now]) * (r1 - r0)
            if self.marked.find(0, r0, r1) != -1:
                undo.append((r0, bytes(self.marked[r0:r1])))
                self.marked[r0:r1] = b"\x01" * (r1 - r0)
        if undo:
            try:
                self._save(sync=True)
            except OSError:
                # The marks are not durable: the next write there must mark and sync again
                # (the engine shares this bitmap and would take them as done).
                for r0, old in reversed(undo):
                    self.marked[r0 : r0 + len(old)] = old
                raise

    def flushed(self, flush_started: float) -> None:
        """After a flush that began at monotonic time flush_started completed: clear regions
        whose last write is older than the flush by CLEAR_AFTER (lazily, at most once a
        second: the scan is O(regions))."""
        now = time.monotonic()
        if now - self._last_clear < 1.0 or not any(self.marked):
            return
        self._last_clear = now
        horizon = int(flush_started - self._clock0) + 1 - CLEAR_AFTER
        changed = False
        touch, marked = self._touch, self.marked
        r = marked.find(1)
        while r != -1:
            if touch[r] < horizon:
                marked[r] = 0
                changed = True
            r = marked.find(1, r + 1)
        if changed:
            self._save(sync=False)

    def clear_all(self) -> None:
        """Every write is durable (clean end of session)."""
        if any(self.marked):
            self.marked[:] = bytes(self.count)
            self._save(sync=True)

    def ranges(self) -> list[tuple[int, int]]:
        """Marked regions as merged (offset, length) byte ranges."""
        out: list[tuple[int, int]] = []
        r = self.marked.find(1)
        while r != -1:
            end = self.marked.find(0, r)
            end = self.count if end == -1 else end
            start = r * self.region
            out.append((start, min(end * self.region, self.size) - start))
            r = self.marked.find(1, end) if end < self.count else -1
        return out

    def engine_view(self) -> tuple[int, bytearray, array, float]:
        """The file, region bitmap, last-write clocks and clock origin that the native engine
        shares (it follows the same rules, see native/replica_server.c)."""
        return self._fd, self.marked, self._touch, self._clock0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
