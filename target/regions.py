"""A region bitmap over a volume: which parts a replica missed while it was away."""

from __future__ import annotations

MIN_REGION = 4096  # a block: a returning replica copies exactly what it missed
MAX_REGIONS = 1 << 22  # 4 MiB of map per tracked replica; coarser above 16 GiB


class RegionMap:
    """One byte per region (slice assignment marks a range at C speed)."""

    def __init__(self, size: int) -> None:
        region = MIN_REGION
        while size > region * MAX_REGIONS:
            region *= 2
        self.size, self.region = size, region
        self.count = -(-size // region)
        self._bits = bytearray(self.count)

    def mark(self, offset: int, length: int) -> None:
        r0 = offset // self.region
        r1 = max(r0 + 1, -(-(offset + length) // self.region))
        self._bits[r0:r1] = b"\x01" * (r1 - r0)

    def ranges(self) -> list[tuple[int, int]]:
        """Marked regions as merged (offset, length) byte ranges, clipped to the size."""
        out: list[tuple[int, int]] = []
        bits, r = self._bits, self._bits.find(1)
        while r != -1:
            end = bits.find(0, r)
            end = self.count if end == -1 else end
            start = r * self.region
            out.append((start, min(end * self.region, self.size) - start))
            r = bits.find(1, end) if end < self.count else -1
        return out

    def marked_bytes(self) -> int:
        return sum(n for _, n in self.ranges())


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged (offset, length) ranges."""
    out: list[list[int]] = []
    for off, n in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]
