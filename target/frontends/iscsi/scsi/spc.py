"""Primary commands (SPC-4): INQUIRY, MODE SENSE/SELECT, REPORT LUNS, REQUEST SENSE,
TEST UNIT READY, RESERVE/RELEASE and PERSISTENT RESERVE IN/OUT.

Every handler takes the logical unit and the command, returns the Data-In (already cut to
the allocation length) and raises ScsiError or ReservationConflict to fail. The usage masks
in `opcodes` have already rejected reserved bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from target.frontends.iscsi.scsi import inquiry as inq
from target.frontends.iscsi.scsi import mode_pages
from target.frontends.iscsi.scsi.cdb import be
from target.frontends.iscsi.scsi.command import Command, truncate
from target.frontends.iscsi.scsi.limits import BLOCK_SIZE
from target.frontends.iscsi.scsi.sense import (
    MODE_PARAMETERS_CHANGED,
    NO_ADDITIONAL_SENSE,
    NO_SENSE,
    UNIT_ATTENTION,
    fixed_sense,
    invalid_cdb,
    invalid_param,
    param_list_length_error,
)
from target.frontends.iscsi.scsi.types import Nexus
from target.frontends.iscsi.scsi.unit_attention import nexus_key

if TYPE_CHECKING:
    from target.frontends.iscsi.scsi.logical_unit import ScsiLogicalUnit


# -- also answered for LUNs that do not exist -------------------------------------------------


def inquiry_data(identity: inq.Identity | None, cdb: bytes, nexus: Nexus) -> bytes:
    evpd, page, alloc = cdb[1] & 0x01, cdb[2], be(cdb, 3, 2)
    if not evpd:
        if page:
            raise invalid_cdb(2)
        return truncate(inq.standard(identity), alloc)
    if identity is None:
        raise invalid_cdb(1, 0)  # no vital product data without a logical unit
    return truncate(inq.vpd(page, identity, nexus), alloc)


def report_luns_data(luns: list[int], cdb: bytes) -> bytes:
    select, alloc = cdb[2], be(cdb, 6, 4)
    if alloc < 4:
        raise invalid_cdb(6)
    if select == 0x01:
        luns = []  # well known logical units only: there are none
    elif select not in (0x00, 0x02):
        raise invalid_cdb(2)
    body = b"".join(_lun_entry(lun) for lun in sorted(luns))
    return truncate(len(body).to_bytes(4, "big") + bytes(4) + body, alloc)


def _lun_entry(lun: int) -> bytes:
    """Peripheral device addressing below 256, flat space addressing above (SAM-5 4.7)."""
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


def request_sense_data(cdb: bytes, sense: bytes) -> bytes:
    if cdb[1] & 0x01:
        raise invalid_cdb(1, 0)  # DESC: descriptor format sense is not offered
    return truncate(sense, cdb[4])


# -- logical unit commands -------------------------------------------------------------------


async def test_unit_ready(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    return b""


async def request_sense(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    code = lu.uas.pop(nexus_key(cmd.nexus))
    if code is None:
        sense = fixed_sense(NO_SENSE, NO_ADDITIONAL_SENSE)
    else:
        sense = fixed_sense(UNIT_ATTENTION, code)
    return request_sense_data(cmd.cdb, sense)


async def inquiry(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    return inquiry_data(lu.identity, cmd.cdb, cmd.nexus)


async def report_luns(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    return report_luns_data(lu.lun_list(), cmd.cdb)


async def mode_sense6(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    return _mode_sense(lu, cmd.cdb, ten=False)


async def mode_sense10(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    return _mode_sense(lu, cmd.cdb, ten=True)


def _mode_sense(lu: ScsiLogicalUnit, cdb: bytes, *, ten: bool) -> bytes:
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    alloc = be(cdb, 7, 2) if ten else cdb[4]
    body = mode_pages.pages(code, subpage, pc, lu.mode, lu.saved_mode)
    blocks = lu.blocks
    if dbd:
        desc = b""
    elif llbaa:
        desc = blocks.to_bytes(8, "big") + bytes(4) + BLOCK_SIZE.to_bytes(4, "big")
    else:
        desc = min(blocks, 0xFFFFFFFF).to_bytes(4, "big") + b"\0" + BLOCK_SIZE.to_bytes(3, "big")
    # DEVICE-SPECIFIC PARAMETER: WP when writes are refused, DPOFUA since both are honoured.
    dsp = (0x80 if lu.write_protected else 0) | 0x10
    if ten:
        header = (6 + len(desc) + len(body)).to_bytes(2, "big")
        header += bytes([0, dsp, 0x01 if llbaa and desc else 0, 0])
        header += len(desc).to_bytes(2, "big")
    else:
        header = bytes([3 + len(desc) + len(body), 0, dsp, len(desc)])
    return truncate(header + desc + body, alloc)


async def mode_select6(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    await _mode_select(lu, cmd, ten=False)
    return b""


async def mode_select10(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    await _mode_select(lu, cmd, ten=True)
    return b""


async def _mode_select(lu: ScsiLogicalUnit, cmd: Command, *, ten: bool) -> None:
    cdb = cmd.cdb
    save = bool(cdb[1] & 0x01)
    plen = be(cdb, 7, 2) if ten else cdb[4]
    if plen == 0:
        return
    if not cdb[1] & 0x10:
        raise invalid_cdb(1, 4)  # PF=0: only the standard page format is understood
    if len(cmd.data_out) < plen:
        raise param_list_length_error()
    params = cmd.data_out[:plen]
    header = 8 if ten else 4
    if plen < header:
        raise param_list_length_error()
    medium = 2 if ten else 1
    if params[medium]:
        raise invalid_param(medium)
    desc_len = be(params, 6, 2) if ten else params[3]
    long_lba = ten and bool(params[4] & 0x01)
    size = 16 if long_lba else 8
    if desc_len not in (0, size):
        raise invalid_param(6 if ten else 3)
    if header + desc_len > plen:
        raise param_list_length_error()
    if desc_len:
        length_at = header + (12 if long_lba else 5)
        width = 4 if long_lba else 3
        if be(params, length_at, width) != BLOCK_SIZE:
            raise invalid_param(length_at)
    new = mode_pages.select(params, header + desc_len, lu.mode)
    if new != lu.mode:
        lu.mode = new
        lu.uas.establish(MODE_PARAMETERS_CHANGED, exclude=nexus_key(cmd.nexus))
    if save:
        await lu.save_mode(new)


async def reserve(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    lu.reservations.reserve(cmd.nexus)
    return b""


async def release(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    lu.reservations.release(cmd.nexus)
    return b""


async def persistent_reserve_in(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    return truncate(lu.reservations.persistent_reserve_in(cmd.cdb), be(cmd.cdb, 7, 2))


async def persistent_reserve_out(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    await lu.reservations.persistent_reserve_out(cmd.nexus, cmd.cdb, cmd.data_out)
    return b""
