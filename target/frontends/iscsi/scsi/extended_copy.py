"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): the copy manager.

It copies between logical units of this target only: each copy source/destination (CSCD)
is an identification descriptor (E4h) naming a logical unit by one of its device
identification designators, and each segment is a block-to-block copy (segment type 02h),
the subset VMware's full-copy offload uses. The data never leaves the target.

Copies run to completion before the command returns. With LIST ID USAGE 00b the outcome is
kept for RECEIVE COPY RESULTS (COPY STATUS) until the I_T nexus goes away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from target.frontends.iscsi.scsi import limits
from target.frontends.iscsi.scsi.cdb import be
from target.frontends.iscsi.scsi.command import Command, truncate
from target.frontends.iscsi.scsi.limits import BLOCK_SIZE
from target.frontends.iscsi.scsi.reservations import Access
from target.frontends.iscsi.scsi.sense import (
    ILLEGAL_REQUEST,
    ScsiError,
    field_pointer,
    invalid_cdb,
    invalid_param,
    param_list_length_error,
)
from target.frontends.iscsi.scsi.unit_attention import nexus_key

if TYPE_CHECKING:
    from target.frontends.iscsi.scsi.logical_unit import ScsiLogicalUnit

COPY_ABORTED = 0x0A
UNREACHABLE_COPY_TARGET = (0x08, 0x04)
TOO_MANY_TARGET_DESCRIPTORS = (0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE = (0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS = (0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE = (0x26, 0x09)

IDENTIFICATION_DESCRIPTOR = 0xE4
BLOCK_TO_BLOCK = 0x02
HEADER = 16
CSCD_SIZE = 32
SEGMENT_SIZE = 28

# RECEIVE COPY RESULTS service actions.
COPY_STATUS = 0x00
OPERATING_PARAMETERS = 0x03

MAX_TARGET_DESCRIPTORS = 2
MAX_SEGMENT_DESCRIPTORS = 16
MAX_DESCRIPTOR_LIST_LENGTH = 1024
MAX_SEGMENT_BLOCKS = 0xFFFF  # what the segment's NUMBER OF BLOCKS field can hold


@dataclass
class CopyOutcome:
    """What COPY STATUS reports for one list identifier of one I_T nexus."""

    ok: bool
    segments: int
    transferred: int  # bytes


@dataclass(frozen=True)
class _Segment:
    at: int  # offset of the descriptor in the parameter list
    source: int
    destination: int
    blocks: int
    source_lba: int
    destination_lba: int


def _copy_aborted(code: tuple[int, int] = (0, 0)) -> ScsiError:
    return ScsiError(COPY_ABORTED, code)


def _illegal(code: tuple[int, int], at: int) -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, code, sks=field_pointer(at, in_cdb=False))


def _parse_cscd(params: bytes, at: int) -> bytes:
    """An identification CSCD descriptor: the designator (code set, type, value) it names."""
    # Byte 1: LU ID TYPE (ignored: the designator names the logical unit), NUL, device type.
    kind = params[at + 1]
    if kind & 0x20:
        raise _copy_aborted(UNREACHABLE_COPY_TARGET)  # NUL: no null devices here
    if kind & 0x1F:
        raise invalid_param(at + 1, 4)  # only direct-access block devices
    length = params[at + 7]
    if length > 16:
        raise invalid_param(at + 7)
    block_length = be(params, at + 29, 3)
    if block_length not in (0, BLOCK_SIZE):
        raise invalid_param(at + 29)
    code_set, designator_type = params[at + 4] & 0x0F, params[at + 5] & 0x3F
    return bytes([code_set, designator_type]) + params[at + 8 : at + 8 + length]


async def extended_copy(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    plen = be(cdb, 10, 4)
    if plen == 0:
        return b""
    if plen < HEADER or len(cmd.data_out) < plen:
        raise param_list_length_error()
    params = cmd.data_out[:plen]
    list_id, usage = params[0], (params[1] >> 3) & 0x03
    if usage == 0b01:
        raise invalid_param(1, 4)
    cscd_len, segment_len, inline_len = be(params, 2, 2), be(params, 8, 4), be(params, 12, 4)
    if HEADER + cscd_len + segment_len + inline_len > plen:
        raise param_list_length_error()
    if cscd_len + segment_len > MAX_DESCRIPTOR_LIST_LENGTH:
        raise param_list_length_error()
    if inline_len:
        raise invalid_param(12)  # no segment type here carries inline data

    targets: list[bytes] = []
    at, end = HEADER, HEADER + cscd_len
    while at < end:
        if len(targets) == MAX_TARGET_DESCRIPTORS:
            raise _illegal(TOO_MANY_TARGET_DESCRIPTORS, at)
        if params[at] != IDENTIFICATION_DESCRIPTOR:
            raise _illegal(UNSUPPORTED_TARGET_DESCRIPTOR_TYPE, at)
        if at + CSCD_SIZE > end:
            raise param_list_length_error()
        targets.append(_parse_cscd(params, at))
        at += CSCD_SIZE

    segments: list[_Segment] = []
    at, end = end, end + segment_len
    while at < end:
        if len(segments) == MAX_SEGMENT_DESCRIPTORS:
            raise _illegal(TOO_MANY_SEGMENT_DESCRIPTORS, at)
        if params[at] != BLOCK_TO_BLOCK:
            raise _illegal(UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE, at)
        if at + SEGMENT_SIZE > end:
            raise param_list_length_error()
        if be(params, at + 2, 2) != SEGMENT_SIZE - 4:
            raise invalid_param(at + 2)
        segments.append(
            _Segment(
                at,
                be(params, at + 4, 2),
                be(params, at + 6, 2),
                be(params, at + 10, 2),
                be(params, at + 12, 8),
                be(params, at + 20, 8),
            )
        )
        at += SEGMENT_SIZE

    outcome = CopyOutcome(ok=False, segments=0, transferred=0)
    if usage == 0b00:
        lu.copy_results[(nexus_key(cmd.nexus), list_id)] = outcome
    for segment in segments:
        await _copy_segment(lu, cmd, targets, segment)
        outcome.segments += 1
        outcome.transferred += segment.blocks * BLOCK_SIZE
    outcome.ok = True
    return b""


async def _copy_segment(
    lu: ScsiLogicalUnit, cmd: Command, targets: list[bytes], segment: _Segment
) -> None:
    if segment.source >= len(targets) or segment.destination >= len(targets):
        raise _copy_aborted(UNREACHABLE_COPY_TARGET)
    source = lu.copy_target(targets[segment.source])
    destination = lu.copy_target(targets[segment.destination])
    if source is None or destination is None:
        raise _copy_aborted(UNREACHABLE_COPY_TARGET)
    if segment.blocks == 0:
        return
    if (
        segment.source_lba + segment.blocks > source.blocks
        or segment.destination_lba + segment.blocks > destination.blocks
    ):
        raise _copy_aborted()
    # The copy acts for the initiator that sent it: its reservations apply on both sides.
    source.reservations.check(cmd.nexus, Access.READ)
    destination.reservations.check(cmd.nexus, Access.WRITE)
    destination.check_writable()
    step = limits.MAX_TRANSFER_BLOCKS
    for done in range(0, segment.blocks, step):
        count = min(step, segment.blocks - done)
        data = await source.read(segment.source_lba + done, count)
        await destination.write(segment.destination_lba + done, data, fua=False)


async def receive_copy_results(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    action, list_id, alloc = cdb[1] & 0x1F, cdb[2], be(cdb, 10, 4)
    if action == OPERATING_PARAMETERS:
        data = bytearray(44)
        data[8:10] = MAX_TARGET_DESCRIPTORS.to_bytes(2, "big")
        data[10:12] = MAX_SEGMENT_DESCRIPTORS.to_bytes(2, "big")
        data[12:16] = MAX_DESCRIPTOR_LIST_LENGTH.to_bytes(4, "big")
        data[16:20] = (MAX_SEGMENT_BLOCKS * BLOCK_SIZE).to_bytes(4, "big")
        data[34:36] = (1).to_bytes(2, "big")  # TOTAL CONCURRENT COPIES
        data[36] = 1  # MAXIMUM CONCURRENT COPIES
        data[37] = limits.PHYSICAL_BLOCK_EXPONENT + 9  # DATA SEGMENT GRANULARITY (log2)
        implemented = bytes([BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR])
        data[43] = len(implemented)
        data += implemented
        data[0:4] = (len(data) - 4).to_bytes(4, "big")
        return truncate(bytes(data), alloc)
    if action == COPY_STATUS:
        outcome = lu.copy_results.get((nexus_key(cmd.nexus), list_id))
        if outcome is None:
            raise invalid_cdb(2)  # no copy with this list identifier
        status = 0x01 if outcome.ok else 0x02  # completed without / with errors
        data = (8).to_bytes(4, "big") + bytes([status])
        data += outcome.segments.to_bytes(2, "big") + bytes([0])  # TRANSFER COUNT in bytes
        data += min(outcome.transferred, 0xFFFFFFFF).to_bytes(4, "big")
        return truncate(data, alloc)
    raise invalid_cdb(1, 4)
