"""Sense keys, additional sense codes and fixed-format sense data (SPC-4 4.5.3).

Command handlers raise `ScsiError`; the logical unit turns it into CHECK CONDITION with
the sense bytes built here. Only fixed format (response code 70h) is produced: the control
mode page reports D_SENSE=0 and does not let it change.
"""

from __future__ import annotations

import errno

from replica.block import BlockError

# Sense keys (SPC-4 table 27).
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# Additional sense code and qualifier pairs (SPC-4 table 28).
NO_ADDITIONAL_SENSE = (0x00, 0x00)
WRITE_ERROR = (0x0C, 0x00)
INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = (0x26, 0x04)
WRITE_PROTECTED = (0x27, 0x00)
SOFTWARE_WRITE_PROTECTED = (0x27, 0x02)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)
POWER_ON_RESET = (0x29, 0x00)
BUS_DEVICE_RESET_FUNCTION_OCCURRED = (0x29, 0x03)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)
INSUFFICIENT_REGISTRATION_RESOURCES = (0x55, 0x04)

FIXED_SENSE_LEN = 18


def fixed_sense(
    key: int,
    code: tuple[int, int],
    *,
    info: int | None = None,
    sks: bytes | None = None,
) -> bytes:
    """Fixed-format current sense data; VALID is set when INFORMATION is given."""
    sense = bytearray(FIXED_SENSE_LEN)
    sense[0] = 0x70 | (0x80 if info is not None else 0)
    sense[2] = key & 0x0F
    if info is not None:
        sense[3:7] = (info & 0xFFFFFFFF).to_bytes(4, "big")
    sense[7] = FIXED_SENSE_LEN - 8  # ADDITIONAL SENSE LENGTH
    sense[12], sense[13] = code
    if sks is not None:
        sense[15:18] = sks
    return bytes(sense)


def field_pointer(byte: int, bit: int | None = None, *, in_cdb: bool = True) -> bytes:
    """SENSE KEY SPECIFIC bytes for ILLEGAL REQUEST: SKSV, C/D, BPV, bit and byte pointer."""
    flags = 0x80 | (0x40 if in_cdb else 0)
    if bit is not None:
        flags |= 0x08 | (bit & 0x07)
    return bytes([flags]) + (byte & 0xFFFF).to_bytes(2, "big")


class ScsiError(Exception):
    """A command ends with CHECK CONDITION and this sense data."""

    def __init__(
        self,
        key: int,
        code: tuple[int, int],
        *,
        info: int | None = None,
        sks: bytes | None = None,
    ) -> None:
        super().__init__(f"sense key {key:#x}, ASC/ASCQ {code[0]:#04x}/{code[1]:#04x}")
        self.key = key
        self.code = code
        self.info = info
        self.sks = sks

    def sense(self) -> bytes:
        return fixed_sense(self.key, self.code, info=self.info, sks=self.sks)


class ReservationConflict(Exception):
    """The command conflicts with a reservation: status RESERVATION CONFLICT, no sense."""


def invalid_cdb(byte: int, bit: int | None = None) -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, sks=field_pointer(byte, bit))


def invalid_param(byte: int, bit: int | None = None) -> ScsiError:
    sks = field_pointer(byte, bit, in_cdb=False)
    return ScsiError(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST, sks=sks)


def param_list_length_error() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def lba_out_of_range() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


def invalid_opcode() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE, sks=field_pointer(0, 7))


def short_data_out() -> ScsiError:
    """The Data-Out the transport delivered does not fit what the CDB describes."""
    return ScsiError(ILLEGAL_REQUEST, INVALID_FIELD_IN_COMMAND_IU)


def device_error(exc: BlockError, *, writing: bool) -> ScsiError:
    """Map a failed block-device call to the sense an initiator can act on."""
    code = getattr(exc, "errno", errno.EIO)
    if code == errno.EROFS:
        # The volume is below its write quorum: writes are refused, reads still work.
        return ScsiError(DATA_PROTECT, WRITE_PROTECTED)
    if code == errno.ENOSPC:
        return ScsiError(DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    if code == errno.EINVAL:
        return lba_out_of_range()
    return ScsiError(MEDIUM_ERROR, WRITE_ERROR if writing else UNRECOVERED_READ_ERROR)
