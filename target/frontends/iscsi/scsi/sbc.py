"""Block commands (SBC-3) of a thin-provisioned disk over a BlockDevice.

Writes that must see the medium unchanged between reading and writing (COMPARE AND WRITE,
ORWRITE) hold their range exclusively in the logical unit's range lock; every other write
holds it shared, so it waits for such a command and the command waits for it.

A WRITE whose Data-Out is shorter than its TRANSFER LENGTH (the initiator's Expected Data
Transfer Length was smaller) writes the whole blocks it got and nothing more: the iSCSI
layer reports the rest as residual overflow (RFC 7143 11.4.5.2), which is what iSCSI
initiators and libiscsi's residual tests expect. A fraction of a block is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from target.blockdev import STATE_HOLE
from target.frontends.iscsi.scsi import limits
from target.frontends.iscsi.scsi.cdb import be, lba_and_length, length_field
from target.frontends.iscsi.scsi.command import Command, truncate
from target.frontends.iscsi.scsi.limits import BLOCK_SIZE
from target.frontends.iscsi.scsi.sense import (
    MISCOMPARE,
    MISCOMPARE_DURING_VERIFY,
    ScsiError,
    invalid_cdb,
    invalid_param,
    lba_out_of_range,
    param_list_length_error,
    short_data_out,
)

if TYPE_CHECKING:
    from target.frontends.iscsi.scsi.logical_unit import ScsiLogicalUnit

ZERO_BLOCK = bytes(BLOCK_SIZE)
MAPPED, DEALLOCATED = 0, 1  # GET LBA STATUS provisioning status
# GET LBA STATUS looks at most this far ahead of the starting LBA in one command.
LBA_STATUS_WINDOW = 1 << 21


def first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where `a` and `b` differ (they are known to differ)."""
    step = BLOCK_SIZE
    for start in range(0, min(len(a), len(b)), step):
        if a[start : start + step] != b[start : start + step]:
            for i in range(start, start + step):
                if a[i] != b[i]:
                    return i
    return min(len(a), len(b))


def _miscompare(offset: int) -> ScsiError:
    return ScsiError(MISCOMPARE, MISCOMPARE_DURING_VERIFY, info=offset)


def _check_transfer(cdb: bytes, blocks: int) -> None:
    if blocks > limits.MAX_TRANSFER_BLOCKS:
        raise invalid_cdb(length_field(cdb))


def _write_data(data_out: bytes, blocks: int) -> bytes:
    """The whole blocks of Data-Out to write for a TRANSFER LENGTH of `blocks`."""
    want = blocks * BLOCK_SIZE
    if len(data_out) >= want:
        return data_out[:want]
    if len(data_out) % BLOCK_SIZE:
        raise short_data_out()
    return data_out


def _fua(cdb: bytes) -> bool:
    return len(cdb) > 6 and bool(cdb[1] & 0x08)


# -- READ / WRITE -------------------------------------------------------------------------------


async def read(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    lba, blocks = lba_and_length(cmd.cdb)
    _check_transfer(cmd.cdb, blocks)
    lu.check_range(lba, blocks)
    if blocks == 0:
        return b""
    # FUA on a read asks for the medium, not a cache: the device has no cache of its own.
    return await lu.read(lba, blocks)


async def write(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    lba, blocks = lba_and_length(cmd.cdb)
    _check_transfer(cmd.cdb, blocks)
    lu.check_range(lba, blocks)
    lu.check_writable()
    data = _write_data(cmd.data_out, blocks)
    if data:
        await lu.write(lba, data, fua=_fua(cmd.cdb))
    return b""


async def write_and_verify(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    lba, blocks = lba_and_length(cmd.cdb)
    _check_transfer(cmd.cdb, blocks)
    lu.check_range(lba, blocks)
    lu.check_writable()
    data = _write_data(cmd.data_out, blocks)
    if data:
        # The write completes only once a quorum of replicas stored it durably, which is the
        # verification this volume can give; BYTCHK adds nothing to it.
        await lu.write(lba, data, fua=True)
    return b""


async def verify(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk == 0b10:
        raise invalid_cdb(1, 2)
    lba, blocks = lba_and_length(cdb)
    if bytchk:
        _check_transfer(cdb, blocks)
    lu.check_range(lba, blocks)
    if blocks == 0:
        return b""
    if bytchk == 0:
        # Medium verification: every block must be readable.
        step = limits.MAX_TRANSFER_BLOCKS
        for start in range(lba, lba + blocks, step):
            await lu.read(start, min(step, lba + blocks - start))
        return b""
    want = blocks * BLOCK_SIZE if bytchk == 0b01 else BLOCK_SIZE
    if len(cmd.data_out) < want:
        raise short_data_out()
    expected = cmd.data_out[:want]
    if bytchk == 0b11:
        expected = expected * blocks  # one block compared against every block of the range
    medium = await lu.read(lba, blocks)
    if medium != expected:
        raise _miscompare(first_difference(medium, expected))
    return b""


# -- PRE-FETCH, SYNCHRONIZE CACHE ------------------------------------------------------------


def _lba_count_10_16(cdb: bytes) -> tuple[int, int]:
    if len(cdb) == 10:
        return be(cdb, 2, 4), be(cdb, 7, 2)
    return be(cdb, 2, 8), be(cdb, 10, 4)


async def prefetch(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    lba, blocks = _lba_count_10_16(cmd.cdb)
    lu.check_range(lba, blocks)
    # No cache to load: GOOD rather than CONDITION MET (SBC-3 5.9).
    return b""


async def synchronize_cache(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    lba, blocks = _lba_count_10_16(cmd.cdb)
    lu.check_range(lba, blocks)
    # IMMED is honoured by finishing early enough: the flush completes before GOOD either way.
    await lu.flush()
    return b""


# -- WRITE SAME, UNMAP, GET LBA STATUS -------------------------------------------------------


async def write_same(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    ten = len(cdb) == 10
    if cdb[1] & 0x10:
        raise invalid_cdb(1, 4)  # ANCHOR: no anchored state (ANC_SUP=0)
    unmap = bool(cdb[1] & 0x08)
    ndob = not ten and bool(cdb[1] & 0x01)
    lba, blocks = _lba_count_10_16(cdb)
    capacity = lu.blocks
    if blocks == 0:
        # WSNZ=0: zero blocks means up to the last LBA, within MAXIMUM WRITE SAME LENGTH.
        if lba >= capacity:
            raise lba_out_of_range()
        blocks = capacity - lba
    if blocks > limits.MAX_WRITE_SAME_BLOCKS:
        raise invalid_cdb(7 if ten else 10)
    lu.check_range(lba, blocks)
    lu.check_writable()
    if ndob:
        pattern = ZERO_BLOCK
    elif len(cmd.data_out) != BLOCK_SIZE:
        raise short_data_out()  # exactly one block of Data-Out, no more and no less
    else:
        pattern = cmd.data_out
    if unmap:
        # UNMAP=1 lets the device server unmap each block instead of writing it (SBC-3
        # 5.41); they then read back as zeros (LBPRZ=1), whatever the block sent.
        await lu.unmap(lba, blocks)
        return b""
    if pattern == ZERO_BLOCK:
        await lu.write_zeroes(lba, blocks)
        return b""
    step = limits.WRITE_SAME_CHUNK_BLOCKS
    for start in range(lba, lba + blocks, step):
        count = min(step, lba + blocks - start)
        await lu.write(start, pattern * count, fua=False)
    return b""


async def unmap(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    plen = be(cmd.cdb, 7, 2)
    if plen == 0:
        return b""
    lu.check_writable()
    if plen < 8 or len(cmd.data_out) < plen:
        raise param_list_length_error()
    params = cmd.data_out[:plen]
    # A descriptor list longer than the parameter list is cut to what arrived, and an
    # incomplete last descriptor is ignored (SBC-3 5.28.2).
    size = min(be(params, 2, 2), plen - 8)
    count = size // 16
    if count > limits.MAX_UNMAP_DESCRIPTORS:
        raise invalid_param(2)
    capacity = lu.blocks
    ranges: list[tuple[int, int]] = []
    total = 0
    for i in range(count):
        at = 8 + 16 * i
        lba, blocks = be(params, at, 8), be(params, at + 8, 4)
        if lba + blocks > capacity:
            raise lba_out_of_range()
        total += blocks
        if total > limits.MAX_UNMAP_BLOCKS:
            raise invalid_param(at + 8)
        if blocks:
            ranges.append((lba, blocks))
    for lba, blocks in ranges:
        await lu.unmap(lba, blocks)
    return b""


async def get_lba_status(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    lba, alloc = be(cdb, 2, 8), be(cdb, 10, 4)
    capacity = lu.blocks
    if lba >= capacity:
        raise lba_out_of_range()
    limit = max(1, (alloc - 8) // 16)
    window = min(capacity - lba, LBA_STATUS_WINDOW)
    extents = await lu.block_status(lba, window)
    descs: list[list[int]] = []  # [lba, blocks, status]
    end = lba
    for ext in extents:
        first = max(ext.offset // BLOCK_SIZE, end)
        last = min(-(-(ext.offset + ext.length) // BLOCK_SIZE), lba + window)
        if last <= first:
            continue
        status = DEALLOCATED if ext.flags & STATE_HOLE else MAPPED
        if descs and descs[-1][2] == status and descs[-1][0] + descs[-1][1] == first:
            descs[-1][1] += last - first
        else:
            if len(descs) == limit:
                break
            descs.append([first, last - first, status])
        end = last
    body = b"".join(
        start.to_bytes(8, "big") + count.to_bytes(4, "big") + bytes([status, 0, 0, 0])
        for start, count, status in descs
    )
    return truncate((len(body) + 4).to_bytes(4, "big") + bytes(4) + body, alloc)


# -- COMPARE AND WRITE, ORWRITE ---------------------------------------------------------------


async def compare_and_write(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    lba, blocks = be(cdb, 2, 8), cdb[13]
    if blocks > limits.MAX_COMPARE_AND_WRITE_BLOCKS:
        raise invalid_cdb(13)
    lu.check_range(lba, blocks)
    if blocks:
        lu.check_writable()
    size = blocks * BLOCK_SIZE
    if len(cmd.data_out) != 2 * size:
        # The Data-Out holds the verify and write data of NUMBER OF LOGICAL BLOCKS blocks;
        # any other amount means the field does not say what the initiator meant.
        raise invalid_cdb(13)
    if blocks == 0:
        return b""
    verify_data, write_data = cmd.data_out[:size], cmd.data_out[size:]
    async with lu.exclusive(lba, blocks):
        current = await lu.read(lba, blocks)
        if current != verify_data:
            raise _miscompare(first_difference(current, verify_data))
        await lu.write(lba, write_data, fua=_fua(cdb), locked=True)
    return b""


async def orwrite(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    lba, blocks = lba_and_length(cdb)
    _check_transfer(cdb, blocks)
    lu.check_range(lba, blocks)
    if blocks == 0:
        return b""
    lu.check_writable()
    size = blocks * BLOCK_SIZE
    if len(cmd.data_out) < size:
        raise short_data_out()  # a partial OR would leave a half-done update
    async with lu.exclusive(lba, blocks):
        current = await lu.read(lba, blocks)
        merged = int.from_bytes(current, "big") | int.from_bytes(cmd.data_out[:size], "big")
        await lu.write(lba, merged.to_bytes(size, "big"), fua=_fua(cdb), locked=True)
    return b""


# -- capacity, START STOP UNIT, READ DEFECT DATA ---------------------------------------------


async def read_capacity10(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    if not cdb[8] & 0x01 and be(cdb, 2, 4):
        raise invalid_cdb(2)  # a LOGICAL BLOCK ADDRESS needs PMI (SBC-3 5.16.1)
    last = max(lu.blocks - 1, 0)
    return min(last, 0xFFFFFFFF).to_bytes(4, "big") + BLOCK_SIZE.to_bytes(4, "big")


async def read_capacity16(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    if not cdb[14] & 0x01 and be(cdb, 2, 8):
        raise invalid_cdb(2)
    data = bytearray(32)
    data[0:8] = max(lu.blocks - 1, 0).to_bytes(8, "big")
    data[8:12] = BLOCK_SIZE.to_bytes(4, "big")
    data[13] = limits.PHYSICAL_BLOCK_EXPONENT
    data[14] = 0x80 | 0x40  # LBPME, LBPRZ: thin provisioned, unmapped blocks read as zeros
    return truncate(bytes(data), be(cdb, 10, 4))


async def start_stop_unit(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    power_condition, loej = cmd.cdb[4] >> 4, cmd.cdb[4] & 0x02
    if power_condition == 0 and loej:
        raise invalid_cdb(4, 1)  # nothing to load or eject: the medium is not removable
    # Stopping and power conditions are accepted; the volume keeps serving I/O.
    return b""


async def read_defect_data10(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    # Empty primary and grown defect lists, in the format asked for.
    flags = cmd.cdb[2] & 0x1F
    return truncate(bytes([0, flags, 0, 0]), be(cmd.cdb, 7, 2))


async def read_defect_data12(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    flags = cmd.cdb[1] & 0x1F
    return truncate(bytes([0, flags]) + bytes(6), be(cmd.cdb, 6, 4))
