"""INQUIRY data: the standard page and the vital product data pages (SPC-4 6.6, 7.8;
SBC-3 6.5).

Identifiers (unit serial number, NAA and T10 vendor ID designators) come from the volume,
not from the process, so they stay the same across target restarts and moves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from target.frontends.iscsi.scsi import limits
from target.frontends.iscsi.scsi.reservations import RELATIVE_TARGET_PORT
from target.frontends.iscsi.scsi.sense import invalid_cdb
from target.frontends.iscsi.scsi.types import Nexus
from target.frontends.iscsi.scsi.unit_attention import target_port_name

DIRECT_ACCESS = 0x00
NO_DEVICE = 0x7F  # peripheral qualifier 011b, device type 1Fh: no logical unit here

SUPPORTED_PAGES = 0x00
UNIT_SERIAL_NUMBER = 0x80
DEVICE_IDENTIFICATION = 0x83
BLOCK_LIMITS = 0xB0
BLOCK_DEVICE_CHARACTERISTICS = 0xB1
LOGICAL_BLOCK_PROVISIONING = 0xB2
VPD_PAGES = (
    SUPPORTED_PAGES,
    UNIT_SERIAL_NUMBER,
    DEVICE_IDENTIFICATION,
    BLOCK_LIMITS,
    BLOCK_DEVICE_CHARACTERISTICS,
    LOGICAL_BLOCK_PROVISIONING,
)

# Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI (no version claimed).
VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0, 0x0960)

ISCSI_PROTOCOL = 0x5
CODE_BINARY, CODE_ASCII, CODE_UTF8 = 1, 2, 3
ASSOC_LU, ASSOC_PORT, ASSOC_DEVICE = 0, 1, 2
T10_VENDOR_ID, NAA, RELATIVE_PORT, SCSI_NAME = 1, 3, 4, 8


def _ascii(text: str, size: int) -> bytes:
    """Left-aligned, space-padded printable ASCII (SPC-4 4.4.1)."""
    clean = "".join(c if " " <= c <= "~" else "_" for c in text)
    return clean.encode("ascii")[:size].ljust(size, b" ")


def derive_naa(seed: str) -> bytes:
    """NAA 3 (locally assigned) designator from a stable seed such as the volume's name."""
    digest = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big")
    return ((0x3 << 60) | (digest & ((1 << 60) - 1))).to_bytes(8, "big")


def derive_serial(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:16]


def normalize_naa(naa: bytes | int) -> bytes:
    if isinstance(naa, int):
        if naa < 0 or naa >= 1 << 128:
            raise ValueError("NAA identifier must fit in 16 bytes")
        naa = naa.to_bytes(8 if naa < 1 << 64 else 16, "big")
    if len(naa) not in (8, 16):
        raise ValueError("NAA identifier must be 8 or 16 bytes")
    if (naa[0] >> 4) not in (2, 3, 5, 6):
        raise ValueError(f"unknown NAA type {naa[0] >> 4}")
    if (naa[0] >> 4 == 6) != (len(naa) == 16):
        raise ValueError("NAA type 6 takes 16 bytes, the others 8")
    return bytes(naa)


@dataclass(frozen=True)
class Identity:
    vendor: str
    product: str
    revision: str
    serial: str
    naa: bytes


def standard(identity: Identity | None) -> bytes:
    """Standard INQUIRY data; `identity` None gives the no-logical-unit answer."""
    data = bytearray(96)
    data[0] = NO_DEVICE if identity is None else DIRECT_ACCESS
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HISUP, RESPONSE DATA FORMAT 2
    data[4] = len(data) - 5
    data[7] = 0x02  # CMDQUE
    ident = identity or Identity("", "", "", "", b"")
    data[8:16] = _ascii(ident.vendor, 8)
    data[16:32] = _ascii(ident.product, 16)
    data[32:36] = _ascii(ident.revision, 4)
    for i, desc in enumerate(VERSION_DESCRIPTORS):
        data[58 + 2 * i : 60 + 2 * i] = desc.to_bytes(2, "big")
    return bytes(data)


def _designator(code_set: int, assoc: int, kind: int, value: bytes, piv: bool = False) -> bytes:
    proto = (ISCSI_PROTOCOL << 4) if piv else 0
    flags = (0x80 if piv else 0) | (assoc << 4) | kind
    return bytes([proto | code_set, flags, 0, len(value)]) + value


def _scsi_name(name: str) -> bytes:
    """SCSI name string: null-terminated UTF-8, padded to a multiple of 4 bytes."""
    raw = name.encode() + b"\0"
    return raw.ljust((len(raw) + 3) // 4 * 4, b"\0")


def lu_designators(identity: Identity) -> list[bytes]:
    """The logical unit's designators as (code set, designator type) + value."""
    vendor_id = _ascii(identity.vendor, 8) + _ascii(identity.serial, len(identity.serial))
    return [
        bytes([CODE_BINARY, NAA]) + identity.naa,
        bytes([CODE_ASCII, T10_VENDOR_ID]) + vendor_id,
    ]


def vpd(code: int, identity: Identity, nexus: Nexus) -> bytes:
    """One VPD page (header included); unsupported pages are INVALID FIELD IN CDB."""
    if code == SUPPORTED_PAGES:
        body = bytes(VPD_PAGES)
    elif code == UNIT_SERIAL_NUMBER:
        body = _ascii(identity.serial, len(identity.serial))
    elif code == DEVICE_IDENTIFICATION:
        port = RELATIVE_TARGET_PORT.to_bytes(4, "big")
        body = b"".join(
            (
                *(_designator(d[0], ASSOC_LU, d[1], d[2:]) for d in lu_designators(identity)),
                _designator(CODE_BINARY, ASSOC_PORT, RELATIVE_PORT, port, piv=True),
                _designator(
                    CODE_UTF8, ASSOC_PORT, SCSI_NAME, _scsi_name(target_port_name(nexus)), piv=True
                ),
                _designator(CODE_UTF8, ASSOC_DEVICE, SCSI_NAME, _scsi_name(nexus.target), piv=True),
            )
        )
    elif code == BLOCK_LIMITS:
        body = _block_limits()
    elif code == BLOCK_DEVICE_CHARACTERISTICS:
        page = bytearray(60)
        page[0:2] = (1).to_bytes(2, "big")  # MEDIUM ROTATION RATE: non-rotating medium
        body = bytes(page)
    elif code == LOGICAL_BLOCK_PROVISIONING:
        # LBPU, LBPWS, LBPWS10 and LBPRZ; no anchored state (ANC_SUP=0); thin provisioned.
        body = bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])
    else:
        raise invalid_cdb(2)
    return bytes([DIRECT_ACCESS, code]) + len(body).to_bytes(2, "big") + body


def _block_limits() -> bytes:
    page = bytearray(60)
    page[0] = 0  # WSNZ=0: WRITE SAME of zero blocks means "to the end of the medium"
    page[1] = limits.MAX_COMPARE_AND_WRITE_BLOCKS
    page[2:4] = limits.BLOCKS_PER_PHYSICAL.to_bytes(2, "big")  # OPTIMAL TRANSFER GRANULARITY
    page[4:8] = limits.MAX_TRANSFER_BLOCKS.to_bytes(4, "big")
    page[8:12] = limits.OPTIMAL_TRANSFER_BLOCKS.to_bytes(4, "big")
    page[12:16] = limits.MAX_TRANSFER_BLOCKS.to_bytes(4, "big")  # MAXIMUM PREFETCH LENGTH
    page[16:20] = limits.MAX_UNMAP_BLOCKS.to_bytes(4, "big")
    page[20:24] = limits.MAX_UNMAP_DESCRIPTORS.to_bytes(4, "big")
    page[24:28] = limits.BLOCKS_PER_PHYSICAL.to_bytes(4, "big")  # OPTIMAL UNMAP GRANULARITY
    page[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
    page[32:40] = limits.MAX_WRITE_SAME_BLOCKS.to_bytes(8, "big")
    # Bytes 40-59 (atomic writes) stay zero: WRITE ATOMIC is not offered.
    return bytes(page)
