"""One SCSI command as the handlers see it."""

from __future__ import annotations

from dataclasses import dataclass

from target.frontends.iscsi.scsi.types import Nexus


@dataclass(slots=True)
class Command:
    cdb: bytes  # exactly the CDB length of the operation code (the transport pads to 16)
    nexus: Nexus
    data_out: bytes = b""


def truncate(data: bytes, allocation_length: int) -> bytes:
    """Data-In never exceeds the ALLOCATION LENGTH of the CDB (SPC-4 4.2.5.6)."""
    return data[:allocation_length]
