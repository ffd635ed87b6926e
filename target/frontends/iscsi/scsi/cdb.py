"""CDB field decoding (SPC-4 4.2): big-endian fields, LBA/length of the block commands, and
the generic check that every bit the command does not use is zero.
"""

from __future__ import annotations

from target.frontends.iscsi.scsi.sense import invalid_cdb


def be(buf: bytes, start: int, length: int) -> int:
    return int.from_bytes(buf[start : start + length], "big")


def check_usage(cdb: bytes, usage: bytes) -> None:
    """Reject any CDB bit outside the command's usage mask (reserved bits, unsupported
    options, NACA and LINK in the control byte) with INVALID FIELD IN CDB pointing at it."""
    for i in range(1, len(usage)):
        bad = cdb[i] & ~usage[i]
        if bad:
            raise invalid_cdb(i, bad.bit_length() - 1)


def lba_and_length(cdb: bytes) -> tuple[int, int]:
    """LOGICAL BLOCK ADDRESS and TRANSFER LENGTH of a 6/10/12/16-byte block command.

    The 6-byte form has a 21-bit LBA and a transfer length of 0 meaning 256 blocks
    (SBC-3 5.15/5.37); the others carry the length as is."""
    size = len(cdb)
    if size == 6:
        length = cdb[4]
        return be(cdb, 1, 3) & 0x1FFFFF, 256 if length == 0 else length
    if size == 10:
        return be(cdb, 2, 4), be(cdb, 7, 2)
    if size == 12:
        return be(cdb, 2, 4), be(cdb, 6, 4)
    return be(cdb, 2, 8), be(cdb, 10, 4)


def length_field(cdb: bytes) -> int:
    """Byte offset of the TRANSFER LENGTH field, for sense field pointers."""
    return {6: 4, 10: 7, 12: 6}.get(len(cdb), 10)
