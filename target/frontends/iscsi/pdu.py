"""Sans-IO codec for iSCSI PDUs (RFC 7143 section 11).

A PDU is a 48-byte Basic Header Segment (BHS), optional Additional Header Segments (AHS),
an optional header digest, a data segment padded to 4 bytes and an optional data digest
(both digests CRC32C, sent least significant byte first). `encode` turns a PDU object into
buffers for `writelines`; `Decoder` is fed bytes and hands out PDU objects, or raises a
`PduError` saying how to answer (Reject reason, or drop the connection when the stream can
no longer be framed).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from native import crc32c

BHS_LEN = 48
DIGEST_LEN = 4
RESERVED_TAG = 0xFFFFFFFF  # "no task" ITT / "no response wanted" TTT
MAX_DATA_SEGMENT = (1 << 24) - 1
LOGIN_DATA_SEGMENT = 8192  # MaxRecvDataSegmentLength before anything is negotiated


class Op(IntEnum):
    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TMF_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TMF_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


class RejectReason(IntEnum):
    DATA_DIGEST = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_REJECT = 0x06  # too many immediate commands
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    OUT_OF_RESOURCES = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    COMPLETE = 0
    NO_TASK = 1
    NO_LUN = 2
    TASK_ALLEGIANT = 3
    REASSIGN_UNSUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTH_FAILED = 6
    REJECTED = 255


def pad4(n: int) -> int:
    """Bytes of padding after a segment of n bytes."""
    return -n & 3


def digest(*parts: bytes | bytearray | memoryview) -> bytes:
    crc = 0
    for part in parts:
        crc = crc32c(part, crc)
    return crc.to_bytes(4, "little")


def encode_lun(lun: int) -> bytes:
    """SAM LUN field: peripheral addressing below 256, flat space addressing up to 16383."""
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    if lun < 0x4000:
        return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)
    return lun.to_bytes(8, "big")


def decode_lun(field: bytes) -> int:
    """The LUN number of a SAM LUN field. Formats we don't address map to a number no
    logical unit has, so the SCSI layer answers LOGICAL UNIT NOT SUPPORTED."""
    method = field[0] >> 6
    if not any(field[2:]):
        if method == 0 and field[0] == 0:
            return field[1]
        if method == 1:
            return ((field[0] & 0x3F) << 8) | field[1]
    return int.from_bytes(field, "big") | (1 << 64)


# ---------------------------------------------------------------------------- PDUs

Fields = tuple[Any, ...]  # bytes 8-47 of a BHS, unpacked
Ahs = list[tuple[int, bytes]]  # (AHSType, AHS-specific bytes)


@dataclass(slots=True, kw_only=True)
class Pdu:
    """Fields common to every PDU. Subclasses add their own and say how bytes 1-3 and
    8-47 of the BHS are laid out (`_REST`: a struct for bytes 8-47)."""

    OPCODE: ClassVar[int]
    _REST: ClassVar[struct.Struct]

    immediate: bool = False
    itt: int = RESERVED_TAG
    data: bytes | bytearray | memoryview = b""

    def header(self) -> bytes:
        """The BHS this PDU encodes to (the data of a Reject refusing it)."""
        return bytes(encode(self)[0][:BHS_LEN])

    def _head(self) -> tuple[int, int, int]:
        """Bytes 1, 2 and 3 of the BHS."""
        return 0x80, 0, 0

    def _values(self) -> tuple[object, ...]:
        raise NotImplementedError

    def _ahs(self) -> bytes:
        return b""

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        raise NotImplementedError


@dataclass(slots=True, kw_only=True)
class ScsiCommand(Pdu):
    OPCODE = Op.SCSI_CMD
    _REST = struct.Struct(">8sIIII16s")
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 0  # task attribute (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA)
    lun: bytes = bytes(8)
    edtl: int = 0  # expected data transfer length
    cmdsn: int = 0
    expstatsn: int = 0
    cdb: bytes = bytes(16)
    bidi_read_length: int | None = None  # from the bidirectional read AHS

    def _head(self) -> tuple[int, int, int]:
        flags = (0x80 if self.final else 0) | (0x40 if self.read else 0)
        return flags | (0x20 if self.write else 0) | (self.attr & 7), 0, 0

    def _values(self) -> tuple[object, ...]:
        cdb = self.cdb[:16].ljust(16, b"\0")
        return self.lun, self.itt, self.edtl, self.cmdsn, self.expstatsn, cdb

    def _ahs(self) -> bytes:
        out = b""
        if len(self.cdb) > 16:
            extra = self.cdb[16:]
            out += _ahs_entry(AHS_EXTENDED_CDB, b"\0" + extra)
        if self.bidi_read_length is not None:
            length = self.bidi_read_length.to_bytes(4, "big")
            out += _ahs_entry(AHS_BIDI_READ_LENGTH, b"\0" + length)
        return out

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        cdb, bidi = v[5], None
        for kind, body in ahs:
            if kind == AHS_EXTENDED_CDB and len(body) > 1:
                cdb = cdb + body[1:]
            elif kind == AHS_BIDI_READ_LENGTH and len(body) == 5:
                bidi = int.from_bytes(body[1:5], "big")
            else:
                raise ValueError(f"unexpected AHS type {kind} length {len(body)}")
        return cls(
            final=bool(b1 & 0x80), read=bool(b1 & 0x40), write=bool(b1 & 0x20), attr=b1 & 7,
            lun=v[0], itt=v[1], edtl=v[2], cmdsn=v[3], expstatsn=v[4], cdb=cdb,
            bidi_read_length=bidi,
        )  # fmt: skip


@dataclass(slots=True, kw_only=True)
class ScsiResponse(Pdu):
    OPCODE = Op.SCSI_RSP
    _REST = struct.Struct(">8xIIIIIIII")
    response: int = 0  # 0: command completed at target
    status: int = 0
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    overflow: bool = False
    underflow: bool = False
    snack_tag: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    expdatasn: int = 0
    bidi_residual: int = 0
    residual: int = 0

    def _head(self) -> tuple[int, int, int]:
        flags = 0x80 | (0x10 if self.bidi_overflow else 0) | (0x08 if self.bidi_underflow else 0)
        flags |= (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0)
        return flags, self.response, self.status

    def _values(self) -> tuple[object, ...]:
        return (self.itt, self.snack_tag, self.statsn, self.expcmdsn, self.maxcmdsn,
                self.expdatasn, self.bidi_residual, self.residual)  # fmt: skip

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(
            response=b2, status=b3, bidi_overflow=bool(b1 & 0x10), bidi_underflow=bool(b1 & 0x08),
            overflow=bool(b1 & 0x04), underflow=bool(b1 & 0x02), itt=v[0], snack_tag=v[1],
            statsn=v[2], expcmdsn=v[3], maxcmdsn=v[4], expdatasn=v[5], bidi_residual=v[6],
            residual=v[7],
        )  # fmt: skip


@dataclass(slots=True, kw_only=True)
class TaskManagementRequest(Pdu):
    OPCODE = Op.TMF_REQ
    _REST = struct.Struct(">8sIIIIII8x")
    function: int = TmfFunction.ABORT_TASK
    lun: bytes = bytes(8)
    rtt: int = RESERVED_TAG  # referenced task tag
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0

    def _head(self) -> tuple[int, int, int]:
        return 0x80 | (self.function & 0x7F), 0, 0

    def _values(self) -> tuple[object, ...]:
        return (self.lun, self.itt, self.rtt, self.cmdsn, self.expstatsn, self.refcmdsn,
                self.expdatasn)  # fmt: skip

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(function=b1 & 0x7F, lun=v[0], itt=v[1], rtt=v[2], cmdsn=v[3],
                   expstatsn=v[4], refcmdsn=v[5], expdatasn=v[6])  # fmt: skip


@dataclass(slots=True, kw_only=True)
class TaskManagementResponse(Pdu):
    OPCODE = Op.TMF_RSP
    _REST = struct.Struct(">8xI4xIII12x")
    response: int = TmfResponse.COMPLETE
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _head(self) -> tuple[int, int, int]:
        return 0x80, self.response, 0

    def _values(self) -> tuple[object, ...]:
        return self.itt, self.statsn, self.expcmdsn, self.maxcmdsn

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(response=b2, itt=v[0], statsn=v[1], expcmdsn=v[2], maxcmdsn=v[3])


@dataclass(slots=True, kw_only=True)
class LoginRequest(Pdu):
    OPCODE = Op.LOGIN_REQ
    _REST = struct.Struct(">6sHIH2xII16x")
    immediate: bool = True  # login requests are always immediate
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    def _head(self) -> tuple[int, int, int]:
        flags = (0x80 if self.transit else 0) | (0x40 if self.cont else 0)
        return flags | ((self.csg & 3) << 2) | (self.nsg & 3), self.version_max, self.version_min

    def _values(self) -> tuple[object, ...]:
        return self.isid, self.tsih, self.itt, self.cid, self.cmdsn, self.expstatsn

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(
            transit=bool(b1 & 0x80), cont=bool(b1 & 0x40), csg=(b1 >> 2) & 3, nsg=b1 & 3,
            version_max=b2, version_min=b3, isid=v[0], tsih=v[1], itt=v[2], cid=v[3],
            cmdsn=v[4], expstatsn=v[5],
        )  # fmt: skip


@dataclass(slots=True, kw_only=True)
class LoginResponse(Pdu):
    OPCODE = Op.LOGIN_RSP
    _REST = struct.Struct(">6sHI4xIIIBB10x")
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0

    def _head(self) -> tuple[int, int, int]:
        flags = (0x80 if self.transit else 0) | (0x40 if self.cont else 0)
        return flags | ((self.csg & 3) << 2) | (self.nsg & 3), self.version_max, self.version_active

    def _values(self) -> tuple[object, ...]:
        return (self.isid, self.tsih, self.itt, self.statsn, self.expcmdsn, self.maxcmdsn,
                self.status_class, self.status_detail)  # fmt: skip

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(
            transit=bool(b1 & 0x80), cont=bool(b1 & 0x40), csg=(b1 >> 2) & 3, nsg=b1 & 3,
            version_max=b2, version_active=b3, isid=v[0], tsih=v[1], itt=v[2], statsn=v[3],
            expcmdsn=v[4], maxcmdsn=v[5], status_class=v[6], status_detail=v[7],
        )  # fmt: skip


@dataclass(slots=True, kw_only=True)
class TextRequest(Pdu):
    OPCODE = Op.TEXT_REQ
    _REST = struct.Struct(">8sIIII16x")
    final: bool = True
    cont: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0

    def _head(self) -> tuple[int, int, int]:
        return (0x80 if self.final else 0) | (0x40 if self.cont else 0), 0, 0

    def _values(self) -> tuple[object, ...]:
        return self.lun, self.itt, self.ttt, self.cmdsn, self.expstatsn

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(final=bool(b1 & 0x80), cont=bool(b1 & 0x40), lun=v[0], itt=v[1], ttt=v[2],
                   cmdsn=v[3], expstatsn=v[4])  # fmt: skip


@dataclass(slots=True, kw_only=True)
class TextResponse(Pdu):
    OPCODE = Op.TEXT_RSP
    _REST = struct.Struct(">8sIIIII12x")
    final: bool = True
    cont: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _head(self) -> tuple[int, int, int]:
        return (0x80 if self.final else 0) | (0x40 if self.cont else 0), 0, 0

    def _values(self) -> tuple[object, ...]:
        return self.lun, self.itt, self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(final=bool(b1 & 0x80), cont=bool(b1 & 0x40), lun=v[0], itt=v[1], ttt=v[2],
                   statsn=v[3], expcmdsn=v[4], maxcmdsn=v[5])  # fmt: skip


@dataclass(slots=True, kw_only=True)
class DataOut(Pdu):
    OPCODE = Op.DATA_OUT
    _REST = struct.Struct(">8sII4xI4xII4x")
    final: bool = False
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    expstatsn: int = 0
    datasn: int = 0
    offset: int = 0

    def _head(self) -> tuple[int, int, int]:
        return 0x80 if self.final else 0, 0, 0

    def _values(self) -> tuple[object, ...]:
        return self.lun, self.itt, self.ttt, self.expstatsn, self.datasn, self.offset

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(final=bool(b1 & 0x80), lun=v[0], itt=v[1], ttt=v[2], expstatsn=v[3],
                   datasn=v[4], offset=v[5])  # fmt: skip


@dataclass(slots=True, kw_only=True)
class DataIn(Pdu):
    OPCODE = Op.DATA_IN
    _REST = struct.Struct(">8sIIIIIIII")
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    has_status: bool = False
    status: int = 0
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    offset: int = 0
    residual: int = 0

    def _head(self) -> tuple[int, int, int]:
        flags = (0x80 if self.final else 0) | (0x40 if self.ack else 0)
        flags |= (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0)
        return flags | (0x01 if self.has_status else 0), 0, self.status

    def _values(self) -> tuple[object, ...]:
        return (self.lun, self.itt, self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn,
                self.datasn, self.offset, self.residual)  # fmt: skip

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(
            final=bool(b1 & 0x80), ack=bool(b1 & 0x40), overflow=bool(b1 & 0x04),
            underflow=bool(b1 & 0x02), has_status=bool(b1 & 0x01), status=b3, lun=v[0],
            itt=v[1], ttt=v[2], statsn=v[3], expcmdsn=v[4], maxcmdsn=v[5], datasn=v[6],
            offset=v[7], residual=v[8],
        )  # fmt: skip


@dataclass(slots=True, kw_only=True)
class LogoutRequest(Pdu):
    OPCODE = Op.LOGOUT_REQ
    _REST = struct.Struct(">8xIH2xII16x")
    reason: int = 0  # 0 close session, 1 close connection, 2 remove connection for recovery
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0

    def _head(self) -> tuple[int, int, int]:
        return 0x80 | (self.reason & 0x7F), 0, 0

    def _values(self) -> tuple[object, ...]:
        return self.itt, self.cid, self.cmdsn, self.expstatsn

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(reason=b1 & 0x7F, itt=v[0], cid=v[1], cmdsn=v[2], expstatsn=v[3])


@dataclass(slots=True, kw_only=True)
class LogoutResponse(Pdu):
    OPCODE = Op.LOGOUT_RSP
    _REST = struct.Struct(">8xI4xIII4xHH4x")
    response: int = 0  # 0 closed, 1 CID not found, 2 recovery not supported, 3 cleanup failed
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0

    def _head(self) -> tuple[int, int, int]:
        return 0x80, self.response, 0

    def _values(self) -> tuple[object, ...]:
        return (self.itt, self.statsn, self.expcmdsn, self.maxcmdsn, self.time2wait,
                self.time2retain)  # fmt: skip

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(response=b2, itt=v[0], statsn=v[1], expcmdsn=v[2], maxcmdsn=v[3],
                   time2wait=v[4], time2retain=v[5])  # fmt: skip


@dataclass(slots=True, kw_only=True)
class Snack(Pdu):
    OPCODE = Op.SNACK
    _REST = struct.Struct(">8sII4xI8xII")
    type: int = 0
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG  # or SNACK Tag
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0

    def _head(self) -> tuple[int, int, int]:
        return 0x80 | (self.type & 0x0F), 0, 0

    def _values(self) -> tuple[object, ...]:
        return self.lun, self.itt, self.ttt, self.expstatsn, self.begrun, self.runlength

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(type=b1 & 0x0F, lun=v[0], itt=v[1], ttt=v[2], expstatsn=v[3], begrun=v[4],
                   runlength=v[5])  # fmt: skip


@dataclass(slots=True, kw_only=True)
class R2T(Pdu):
    OPCODE = Op.R2T
    _REST = struct.Struct(">8sIIIIIIII")
    lun: bytes = bytes(8)
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    offset: int = 0
    length: int = 0  # desired data transfer length

    def _values(self) -> tuple[object, ...]:
        return (self.lun, self.itt, self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn,
                self.r2tsn, self.offset, self.length)  # fmt: skip

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(lun=v[0], itt=v[1], ttt=v[2], statsn=v[3], expcmdsn=v[4], maxcmdsn=v[5],
                   r2tsn=v[6], offset=v[7], length=v[8])  # fmt: skip


@dataclass(slots=True, kw_only=True)
class AsyncMessage(Pdu):
    OPCODE = Op.ASYNC
    _REST = struct.Struct(">8sI4xIIIBBHHH4x")
    lun: bytes = bytes(8)
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    event: int = 0  # 1: target requests logout, 2: dropping connection, 3: all connections
    vcode: int = 0
    param1: int = 0
    param2: int = 0
    param3: int = 0

    def _values(self) -> tuple[object, ...]:
        return (self.lun, self.itt, self.statsn, self.expcmdsn, self.maxcmdsn, self.event,
                self.vcode, self.param1, self.param2, self.param3)  # fmt: skip

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(lun=v[0], itt=v[1], statsn=v[2], expcmdsn=v[3], maxcmdsn=v[4], event=v[5],
                   vcode=v[6], param1=v[7], param2=v[8], param3=v[9])  # fmt: skip


@dataclass(slots=True, kw_only=True)
class NopOut(Pdu):
    OPCODE = Op.NOP_OUT
    _REST = struct.Struct(">8sIIII16x")
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    cmdsn: int = 0
    expstatsn: int = 0

    def _values(self) -> tuple[object, ...]:
        return self.lun, self.itt, self.ttt, self.cmdsn, self.expstatsn

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(lun=v[0], itt=v[1], ttt=v[2], cmdsn=v[3], expstatsn=v[4])


@dataclass(slots=True, kw_only=True)
class NopIn(Pdu):
    OPCODE = Op.NOP_IN
    _REST = struct.Struct(">8sIIIII12x")
    lun: bytes = bytes(8)
    ttt: int = RESERVED_TAG
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0

    def _values(self) -> tuple[object, ...]:
        return self.lun, self.itt, self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(lun=v[0], itt=v[1], ttt=v[2], statsn=v[3], expcmdsn=v[4], maxcmdsn=v[5])


@dataclass(slots=True, kw_only=True)
class Reject(Pdu):
    OPCODE = Op.REJECT
    _REST = struct.Struct(">8xI4xIIII8x")
    reason: int = RejectReason.PROTOCOL_ERROR
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0  # DataSN/R2TSN, for SNACK rejects

    def _head(self) -> tuple[int, int, int]:
        return 0x80, self.reason, 0

    def _values(self) -> tuple[object, ...]:
        return self.itt, self.statsn, self.expcmdsn, self.maxcmdsn, self.datasn

    @classmethod
    def _build(cls, b1: int, b2: int, b3: int, v: Fields, ahs: Ahs) -> Pdu:
        return cls(reason=b2, itt=v[0], statsn=v[1], expcmdsn=v[2], maxcmdsn=v[3], datasn=v[4])


PDU_TYPES: dict[int, type[Pdu]] = {
    cls.OPCODE: cls
    for cls in (
        ScsiCommand, ScsiResponse, TaskManagementRequest, TaskManagementResponse, LoginRequest,
        LoginResponse, TextRequest, TextResponse, DataOut, DataIn, LogoutRequest,
        LogoutResponse, Snack, R2T, AsyncMessage, NopOut, NopIn, Reject,
    )
}  # fmt: skip

AHS_EXTENDED_CDB = 1
AHS_BIDI_READ_LENGTH = 2


def _ahs_entry(kind: int, body: bytes) -> bytes:
    """One AHS: AHSLength (the body's length), AHSType, body, padded to 4 bytes."""
    entry = len(body).to_bytes(2, "big") + bytes((kind,)) + body
    return entry + bytes(pad4(len(entry)))


def _parse_ahs(raw: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < 4:
            raise ValueError("truncated AHS")
        length = int.from_bytes(raw[pos : pos + 2], "big")
        end = pos + 3 + length
        if length == 0 or end > len(raw):
            raise ValueError(f"AHS length {length} does not fit TotalAHSLength {len(raw)}")
        out.append((raw[pos + 2], raw[pos + 3 : end]))
        pos = end + pad4(3 + length)
    return out


# ---------------------------------------------------------------------------- encoding


def encode(
    pdu: Pdu, header_digest: bool = False, data_digest: bool = False
) -> list[bytes | bytearray | memoryview]:
    """Buffers making up the PDU on the wire (header, data and pad left uncopied)."""
    ahs = pdu._ahs()
    data = pdu.data
    length = len(data)
    if length > MAX_DATA_SEGMENT:
        raise ValueError(f"data segment of {length} bytes is too long")
    header = bytearray(BHS_LEN + len(ahs))
    b1, b2, b3 = pdu._head()
    header[0] = pdu.OPCODE | (0x40 if pdu.immediate else 0)
    header[1], header[2], header[3], header[4] = b1, b2, b3, len(ahs) // 4
    header[5:8] = length.to_bytes(3, "big")
    pdu._REST.pack_into(header, 8, *pdu._values())
    header[BHS_LEN:] = ahs
    parts: list[bytes | bytearray | memoryview] = [header]
    if header_digest:
        parts.append(digest(header))
    if length:
        parts.append(data)
        pad = bytes(pad4(length))
        if pad:
            parts.append(pad)
        if data_digest:
            parts.append(digest(data, pad))
    return parts


def encode_bytes(pdu: Pdu, header_digest: bool = False, data_digest: bool = False) -> bytes:
    return b"".join(encode(pdu, header_digest, data_digest))


# ---------------------------------------------------------------------------- decoding


class PduError(Exception):
    """A PDU the target cannot take. `header` is its BHS (the data of a Reject), `reason`
    the Reject reason, `pdu` whatever could be decoded (e.g. which task a Data-Out with a
    bad data digest belonged to). `fatal` means the byte stream can no longer be framed:
    drop the connection."""

    fatal = False

    def __init__(
        self,
        message: str,
        reason: int = RejectReason.PROTOCOL_ERROR,
        header: bytes = b"",
        pdu: Pdu | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.header = header
        self.pdu = pdu
        self.opcode = header[0] & 0x3F if header else None


class HeaderDigestError(PduError):
    fatal = True  # the lengths in the header cannot be trusted (RFC 7143 7.8)


class DataDigestError(PduError):
    pass


class SegmentTooLong(PduError):
    pass


class StreamBroken(PduError):
    fatal = True


class Decoder:
    """Frames PDUs out of a byte stream. Feed bytes, then call `next_pdu()` until it returns
    None. A non-fatal PduError consumes the bad PDU, so decoding continues after it."""

    def __init__(self, max_data_segment: int = LOGIN_DATA_SEGMENT) -> None:
        self.header_digest = False
        self.data_digest = False
        self.max_data_segment = max_data_segment  # our MaxRecvDataSegmentLength
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversize segment still to be thrown away
        self._broken: PduError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def peek_header(self) -> bytes:
        """What has arrived of the next BHS (up to 48 bytes), before it is complete."""
        return bytes(self._buf[:BHS_LEN])

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = memoryview(data)[n:]
        if len(data):
            self._buf += data

    def next_pdu(self) -> Pdu | None:
        if self._broken is not None:
            raise self._broken
        buf = self._buf
        if len(buf) < BHS_LEN:
            return None
        ahs_len = buf[4] * 4
        length = int.from_bytes(buf[5:8], "big")
        header_end = BHS_LEN + ahs_len
        digest_end = header_end + (DIGEST_LEN if self.header_digest else 0)
        if len(buf) < digest_end:
            return None
        header = bytes(buf[:header_end])
        bhs = header[:BHS_LEN]
        if self.header_digest and buf[header_end:digest_end] != digest(header):
            self._broken = HeaderDigestError("header digest mismatch", header=bhs)
            raise self._broken
        padded = length + pad4(length)
        tail = padded + (DIGEST_LEN if self.data_digest and length else 0)
        if length > self.max_data_segment:
            # Throw the segment away as it arrives instead of buffering it.
            del buf[:digest_end]
            take = min(tail, len(buf))
            del buf[:take]
            self._skip = tail - take
            raise SegmentTooLong(
                f"data segment of {length} bytes exceeds MaxRecvDataSegmentLength "
                f"{self.max_data_segment}",
                header=bhs,
            )
        total = digest_end + tail
        if len(buf) < total:
            return None
        with memoryview(buf) as view:
            segment = view[digest_end : digest_end + padded]
            data = bytes(segment[:length])
            bad_digest = (
                self.data_digest
                and length > 0
                and view[digest_end + padded : total] != digest(segment)
            )
            segment.release()
        del buf[:total]
        return self._parse(bhs, header[BHS_LEN:], data, bad_digest)

    def _parse(self, bhs: bytes, ahs: bytes, data: bytes, bad_digest: bool) -> Pdu:
        opcode = bhs[0] & 0x3F
        cls = PDU_TYPES.get(opcode)
        if cls is None:
            raise PduError(
                f"unknown opcode 0x{opcode:02x}", RejectReason.COMMAND_NOT_SUPPORTED, bhs
            )
        try:
            entries = _parse_ahs(ahs) if ahs else []
            pdu = cls._build(bhs[1], bhs[2], bhs[3], cls._REST.unpack_from(bhs, 8), entries)
        except ValueError as e:
            raise PduError(str(e), RejectReason.INVALID_PDU_FIELD, bhs) from None
        pdu.immediate = bool(bhs[0] & 0x40)
        pdu.data = data
        if bad_digest:
            raise DataDigestError("data digest mismatch", RejectReason.DATA_DIGEST, bhs, pdu)
        return pdu
