"""The block interface every layer of a volume implements.

Frontends (NBD, iSCSI) call it; the replicator implements it over replica clients; a local
adapter implements it over one replica store (tests); QoS and stats wrap it (like nbdkit
filters stacked on a plugin). Offsets and lengths are in bytes; callers check bounds
against `size` before calling, implementations check again and raise OutOfRange.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from replica.block import (
    STATE_HOLE,
    STATE_ZERO,
    BlockError,
    Extent,
    MediumError,
    NoSpace,
    OutOfRange,
    ReadOnlyError,
    check_range,
)

__all__ = [
    "STATE_HOLE",
    "STATE_ZERO",
    "BlockDevice",
    "BlockError",
    "Extent",
    "MediumError",
    "NoSpace",
    "OutOfRange",
    "ReadOnlyError",
    "check_range",
]


@runtime_checkable
class BlockDevice(Protocol):
    """What a frontend needs from a volume. All data methods are coroutines."""

    @property
    def size(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def unmap(self, offset: int, length: int) -> None:
        """Discard the range: it reads as zeros afterwards and frees space where safe."""
        ...

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation state of the range, as consecutive extents covering at least one byte."""
        ...
