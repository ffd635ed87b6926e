"""Block-level vocabulary shared by every layer: extents, block-status flags, I/O errors.

It lives in `replica` (the lowest layer) so the replica store can raise the same errors the
frontends map to NBD errors and SCSI sense, without `replica` importing `target`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

# Block-status flags, the same bits as NBD's base:allocation context.
STATE_HOLE = 1  # not allocated on any layer
STATE_ZERO = 2  # reads as zeros


class BlockError(Exception):
    """An I/O request failed; `errno` says how (frontends map it to NBD errors or SCSI sense)."""

    errno = errno.EIO

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.errno = code


class MediumError(BlockError):
    """The data could not be read or written (replica I/O failure, no replica left)."""

    errno = errno.EIO


class ReadOnlyError(BlockError):
    """Writes are refused: the volume is below its write quorum (or read-only by config)."""

    errno = errno.EROFS


class OutOfRange(BlockError):
    """The request reaches past the end of the device or is malformed."""

    errno = errno.EINVAL


class NoSpace(BlockError):
    """A replica's disk is full."""

    errno = errno.ENOSPC


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with the same allocation state."""

    offset: int
    length: int
    flags: int  # STATE_HOLE | STATE_ZERO bits; 0 = allocated data


def check_range(size: int, offset: int, length: int) -> None:
    """Raise OutOfRange unless [offset, offset+length) lies within a device of `size` bytes."""
    if offset < 0 or length < 0 or offset + length > size:
        raise OutOfRange(f"range {offset}+{length} is outside the device (size {size})")
