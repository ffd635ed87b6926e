"""The supported commands: one table drives dispatch, CDB validation (each command's CDB
usage mask), reservation conflict classes, the Data-Out size the transport should expect,
and REPORT SUPPORTED OPERATION CODES / REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from target.frontends.iscsi.scsi import extended_copy, sbc, spc
from target.frontends.iscsi.scsi.cdb import be, lba_and_length
from target.frontends.iscsi.scsi.command import Command, truncate
from target.frontends.iscsi.scsi.limits import BLOCK_SIZE
from target.frontends.iscsi.scsi.reservations import PR_IN_ACTIONS, PR_OUT_ACTIONS, Access
from target.frontends.iscsi.scsi.sense import invalid_cdb

if TYPE_CHECKING:
    from target.frontends.iscsi.scsi.logical_unit import ScsiLogicalUnit

Handler = Callable[["ScsiLogicalUnit", Command], Awaitable[bytes]]

SERVICE_ACTION_IN_16 = 0x9E
MAINTENANCE_IN = 0xA3
PERSISTENT_RESERVE_IN = 0x5E
PERSISTENT_RESERVE_OUT = 0x5F
THIRD_PARTY_COPY_OUT = 0x83
THIRD_PARTY_COPY_IN = 0x84
# Operation codes whose CDB byte 1 bits 4:0 select a service action.
WITH_SERVICE_ACTIONS = (
    SERVICE_ACTION_IN_16,
    MAINTENANCE_IN,
    PERSISTENT_RESERVE_IN,
    PERSISTENT_RESERVE_OUT,
    THIRD_PARTY_COPY_OUT,
    THIRD_PARTY_COPY_IN,
)
# Commands a unit attention does not stop (SPC-4 5.14): REQUEST SENSE reports it instead.
INQUIRY = 0x12
REPORT_LUNS = 0xA0
REQUEST_SENSE = 0x03


def _none(cdb: bytes) -> int:
    return 0


def _blocks(cdb: bytes) -> int:
    return lba_and_length(cdb)[1] * BLOCK_SIZE


def _verify(cdb: bytes) -> int:
    bytchk = (cdb[1] >> 1) & 0x03
    if bytchk == 0b01:
        return _blocks(cdb)
    return BLOCK_SIZE if bytchk == 0b11 else 0


def _write_same(cdb: bytes) -> int:
    return 0 if len(cdb) == 16 and cdb[1] & 0x01 else BLOCK_SIZE


def _field(start: int, size: int) -> Callable[[bytes], int]:
    return lambda cdb: be(cdb, start, size)


@dataclass(frozen=True)
class CommandSpec:
    opcode: int
    service_action: int | None
    name: str
    usage: bytes  # CDB USAGE DATA (SPC-4 6.35.3): the bits this command looks at
    access: Access
    handler: Handler
    data_out: Callable[[bytes], int] = _none
    timeout: int = 30  # RECOMMENDED COMMAND TIMEOUT, seconds

    @property
    def length(self) -> int:
        return len(self.usage)


# -- REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS -----------------------------

RSOC_ALL, RSOC_OPCODE, RSOC_SERVICE_ACTION, RSOC_EITHER = 0, 1, 2, 3
SUPPORTED, NOT_SUPPORTED = 0b011, 0b001


def _timeouts(spec: CommandSpec) -> bytes:
    """Command timeouts descriptor (SPC-4 6.35.4): nominal and recommended, in seconds."""
    return b"\x00\x0a\x00\x00" + (0).to_bytes(4, "big") + spec.timeout.to_bytes(4, "big")


async def report_supported_operation_codes(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    cdb = cmd.cdb
    rctd, option = bool(cdb[2] & 0x80), cdb[2] & 0x07
    opcode, action, alloc = cdb[3], be(cdb, 4, 2), be(cdb, 6, 4)
    if option == RSOC_ALL:
        body = bytearray()
        for spec in sorted(_SPECS, key=lambda s: (s.opcode, s.service_action or 0)):
            servactv = spec.service_action is not None
            body += bytes([spec.opcode, 0]) + (spec.service_action or 0).to_bytes(2, "big")
            body += bytes([0, (0x02 if rctd else 0) | (0x01 if servactv else 0)])
            body += spec.length.to_bytes(2, "big")
            if rctd:
                body += _timeouts(spec)
        return truncate(len(body).to_bytes(4, "big") + bytes(body), alloc)
    has_actions = opcode in WITH_SERVICE_ACTIONS
    if option == RSOC_OPCODE:
        if has_actions:
            raise invalid_cdb(2, 2)  # this operation code needs its service action
        spec = _TABLE.get((opcode, None))
    elif option == RSOC_SERVICE_ACTION:
        if not has_actions:
            raise invalid_cdb(2, 2)
        spec = _TABLE.get((opcode, action))
    elif option == RSOC_EITHER:
        spec = _TABLE.get((opcode, action if has_actions else None))
    else:
        raise invalid_cdb(2, 2)
    if spec is None:
        return truncate(bytes([0, NOT_SUPPORTED, 0, 0]), alloc)
    data = bytes([0, (0x80 if rctd else 0) | SUPPORTED]) + spec.length.to_bytes(2, "big")
    data += spec.usage
    if rctd:
        data += _timeouts(spec)
    return truncate(data, alloc)


async def report_supported_tmfs(lu: ScsiLogicalUnit, cmd: Command) -> bytes:
    # ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET: what the
    # iSCSI layer implements (RFC 7143 11.5.1).
    data = bytes([0xDA, 0x00, 0x00, 0x00])
    if cmd.cdb[2] & 0x80:  # REPD: the extended format
        data = bytes([0xDA, 0x00, 0x00, 0x0C]) + bytes(12)
    return truncate(data, be(cmd.cdb, 6, 4))


def _u(*values: int) -> bytes:
    return bytes(values)


_FF4 = (0xFF,) * 4
_FF8 = (0xFF,) * 8

_SPECS: list[CommandSpec] = [
    CommandSpec(0x00, None, "TEST UNIT READY", _u(0x00, 0, 0, 0, 0, 0), Access.ANY,
                spc.test_unit_ready),
    CommandSpec(0x03, None, "REQUEST SENSE", _u(0x03, 0x01, 0, 0, 0xFF, 0), Access.ANY,
                spc.request_sense),
    CommandSpec(0x08, None, "READ(6)", _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0), Access.READ,
                sbc.read),
    CommandSpec(0x0A, None, "WRITE(6)", _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0), Access.WRITE,
                sbc.write, _blocks),
    CommandSpec(0x12, None, "INQUIRY", _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0), Access.ANY,
                spc.inquiry),
    CommandSpec(0x15, None, "MODE SELECT(6)", _u(0x15, 0x11, 0, 0, 0xFF, 0), Access.WRITE,
                spc.mode_select6, _field(4, 1)),
    CommandSpec(0x16, None, "RESERVE(6)", _u(0x16, 0, 0, 0, 0, 0), Access.SPC2, spc.reserve),
    CommandSpec(0x17, None, "RELEASE(6)", _u(0x17, 0, 0, 0, 0, 0), Access.SPC2, spc.release),
    CommandSpec(0x1A, None, "MODE SENSE(6)", _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0),
                Access.WRITE, spc.mode_sense6),
    CommandSpec(0x1B, None, "START STOP UNIT", _u(0x1B, 0x01, 0, 0x0F, 0xF7, 0), Access.WRITE,
                sbc.start_stop_unit),
    CommandSpec(0x25, None, "READ CAPACITY(10)", _u(0x25, 0, *_FF4, 0, 0, 0x01, 0), Access.ANY,
                sbc.read_capacity10),
    CommandSpec(0x28, None, "READ(10)", _u(0x28, 0x1E, *_FF4, 0x1F, 0xFF, 0xFF, 0),
                Access.READ, sbc.read),
    CommandSpec(0x2A, None, "WRITE(10)", _u(0x2A, 0x1A, *_FF4, 0x1F, 0xFF, 0xFF, 0),
                Access.WRITE, sbc.write, _blocks),
    CommandSpec(0x2E, None, "WRITE AND VERIFY(10)", _u(0x2E, 0x12, *_FF4, 0x1F, 0xFF, 0xFF, 0),
                Access.WRITE, sbc.write_and_verify, _blocks),
    CommandSpec(0x2F, None, "VERIFY(10)", _u(0x2F, 0x16, *_FF4, 0x1F, 0xFF, 0xFF, 0),
                Access.READ, sbc.verify, _verify),
    CommandSpec(0x34, None, "PRE-FETCH(10)", _u(0x34, 0x02, *_FF4, 0x1F, 0xFF, 0xFF, 0),
                Access.READ, sbc.prefetch),
    CommandSpec(0x35, None, "SYNCHRONIZE CACHE(10)",
                _u(0x35, 0x06, *_FF4, 0x1F, 0xFF, 0xFF, 0), Access.WRITE, sbc.synchronize_cache,
                timeout=60),
    CommandSpec(0x37, None, "READ DEFECT DATA(10)", _u(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0),
                Access.READ, sbc.read_defect_data10),
    CommandSpec(0x41, None, "WRITE SAME(10)", _u(0x41, 0x18, *_FF4, 0x1F, 0xFF, 0xFF, 0),
                Access.WRITE, sbc.write_same, _write_same, timeout=60),
    CommandSpec(0x42, None, "UNMAP", _u(0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0), Access.WRITE,
                sbc.unmap, _field(7, 2), timeout=60),
    CommandSpec(0x55, None, "MODE SELECT(10)", _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0),
                Access.WRITE, spc.mode_select10, _field(7, 2)),
    CommandSpec(0x56, None, "RESERVE(10)", _u(0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0), Access.SPC2,
                spc.reserve),
    CommandSpec(0x57, None, "RELEASE(10)", _u(0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0), Access.SPC2,
                spc.release),
    CommandSpec(0x5A, None, "MODE SENSE(10)", _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0),
                Access.WRITE, spc.mode_sense10),
    *(
        CommandSpec(0x5E, sa, "PERSISTENT RESERVE IN", _u(0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0),
                    Access.PR, spc.persistent_reserve_in)
        for sa in PR_IN_ACTIONS
    ),
    *(
        CommandSpec(0x5F, sa, "PERSISTENT RESERVE OUT",
                    _u(0x5F, 0x1F, 0xFF, 0, 0, *_FF4, 0), Access.PR, spc.persistent_reserve_out,
                    _field(5, 4))
        for sa in PR_OUT_ACTIONS
    ),
    CommandSpec(0x83, 0x00, "EXTENDED COPY(LID1)", _u(0x83, 0x1F, *(0,) * 8, *_FF4, 0, 0),
                Access.WRITE, extended_copy.extended_copy, _field(10, 4), timeout=120),
    *(
        CommandSpec(0x84, sa, "RECEIVE COPY RESULTS", _u(0x84, 0x1F, 0xFF, *(0,) * 7, *_FF4, 0, 0),
                    Access.WRITE, extended_copy.receive_copy_results)
        for sa in (extended_copy.COPY_STATUS, extended_copy.OPERATING_PARAMETERS)
    ),
    CommandSpec(0x88, None, "READ(16)", _u(0x88, 0x1E, *_FF8, *_FF4, 0x1F, 0), Access.READ,
                sbc.read),
    CommandSpec(0x89, None, "COMPARE AND WRITE", _u(0x89, 0x1A, *_FF8, 0, 0, 0, 0xFF, 0x1F, 0),
                Access.WRITE, sbc.compare_and_write, lambda cdb: 2 * cdb[13] * BLOCK_SIZE),
    CommandSpec(0x8A, None, "WRITE(16)", _u(0x8A, 0x1A, *_FF8, *_FF4, 0x1F, 0), Access.WRITE,
                sbc.write, _blocks),
    CommandSpec(0x8B, None, "ORWRITE(16)", _u(0x8B, 0x1A, *_FF8, *_FF4, 0x1F, 0), Access.WRITE,
                sbc.orwrite, _blocks),
    CommandSpec(0x8E, None, "WRITE AND VERIFY(16)", _u(0x8E, 0x12, *_FF8, *_FF4, 0x1F, 0),
                Access.WRITE, sbc.write_and_verify, _blocks),
    CommandSpec(0x8F, None, "VERIFY(16)", _u(0x8F, 0x16, *_FF8, *_FF4, 0x1F, 0), Access.READ,
                sbc.verify, _verify),
    CommandSpec(0x90, None, "PRE-FETCH(16)", _u(0x90, 0x02, *_FF8, *_FF4, 0x1F, 0), Access.READ,
                sbc.prefetch),
    CommandSpec(0x91, None, "SYNCHRONIZE CACHE(16)", _u(0x91, 0x06, *_FF8, *_FF4, 0x1F, 0),
                Access.WRITE, sbc.synchronize_cache, timeout=60),
    CommandSpec(0x93, None, "WRITE SAME(16)", _u(0x93, 0x19, *_FF8, *_FF4, 0x1F, 0),
                Access.WRITE, sbc.write_same, _write_same, timeout=60),
    CommandSpec(0x9E, 0x10, "READ CAPACITY(16)", _u(0x9E, 0x1F, *_FF8, *_FF4, 0x01, 0),
                Access.ANY, sbc.read_capacity16),
    CommandSpec(0x9E, 0x12, "GET LBA STATUS", _u(0x9E, 0x1F, *_FF8, *_FF4, 0, 0), Access.READ,
                sbc.get_lba_status),
    CommandSpec(0xA0, None, "REPORT LUNS", _u(0xA0, 0, 0xFF, 0, 0, 0, *_FF4, 0, 0), Access.ANY,
                spc.report_luns),
    CommandSpec(0xA3, 0x0C, "REPORT SUPPORTED OPERATION CODES",
                _u(0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, *_FF4, 0, 0), Access.ANY,
                report_supported_operation_codes),
    CommandSpec(0xA3, 0x0D, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
                _u(0xA3, 0x1F, 0x80, 0, 0, 0, *_FF4, 0, 0), Access.ANY, report_supported_tmfs),
    CommandSpec(0xA8, None, "READ(12)", _u(0xA8, 0x1E, *_FF4, *_FF4, 0x1F, 0), Access.READ,
                sbc.read),
    CommandSpec(0xAA, None, "WRITE(12)", _u(0xAA, 0x1A, *_FF4, *_FF4, 0x1F, 0), Access.WRITE,
                sbc.write, _blocks),
    CommandSpec(0xAE, None, "WRITE AND VERIFY(12)", _u(0xAE, 0x12, *_FF4, *_FF4, 0x1F, 0),
                Access.WRITE, sbc.write_and_verify, _blocks),
    CommandSpec(0xAF, None, "VERIFY(12)", _u(0xAF, 0x16, *_FF4, *_FF4, 0x1F, 0), Access.READ,
                sbc.verify, _verify),
    CommandSpec(0xB7, None, "READ DEFECT DATA(12)", _u(0xB7, 0x1F, *_FF4, *_FF4, 0, 0),
                Access.READ, sbc.read_defect_data12),
]  # fmt: skip


_TABLE: dict[tuple[int, int | None], CommandSpec] = {
    (spec.opcode, spec.service_action): spec for spec in _SPECS
}


def lookup(cdb: bytes) -> CommandSpec | None:
    """The command a CDB asks for; None for an unsupported operation code. An unsupported
    service action of a supported code is INVALID FIELD IN CDB pointing at byte 1."""
    opcode = cdb[0]
    if opcode in WITH_SERVICE_ACTIONS:
        if len(cdb) < 2:
            return None
        spec = _TABLE.get((opcode, cdb[1] & 0x1F))
        if spec is None:
            raise invalid_cdb(1, 4)
        return spec
    return _TABLE.get((opcode, None))


def specs() -> list[CommandSpec]:
    return list(_SPECS)
