"""The seam between the iSCSI transport and the SCSI command set.

The iSCSI layer (pdu, login, session, server) moves CDBs and data; the SCSI layer
(`ScsiTarget` and its logical units) executes them over a BlockDevice. Neither knows the
other's internals: they meet only in the types below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

# SCSI status codes (SAM-5).
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus: which initiator port, through which target port (for reservations,
    unit attentions and REPORT/PERSISTENT RESERVE transport IDs)."""

    initiator: str  # the initiator's iSCSI name, e.g. iqn.1994-05.com.redhat:abc
    isid: bytes  # 6 bytes from the login; initiator port = name + ",i,0x" + isid hex
    target: str  # the target's iSCSI name
    tpgt: int = 1  # target portal group tag

    @property
    def initiator_port(self) -> str:
        return f"{self.initiator},i,0x{self.isid.hex()}"


@dataclass(slots=True)
class ScsiResult:
    """What a command produced. `data` is the full Data-In the command generated; the iSCSI
    layer truncates it to the initiator's expected length and reports the residual."""

    status: int = GOOD
    data: bytes = b""
    sense: bytes = b""  # fixed-format sense data when status is CHECK_CONDITION


class StateStore(Protocol):
    """Small durable key-value state for a volume (persistent reservations, mode pages).
    The volume keeps it on its replicas, so it survives target restarts and moves."""

    async def get(self, key: str) -> Any | None: ...

    async def put(self, key: str, value: Any) -> None: ...


class ScsiTarget(Protocol):
    """What the iSCSI session calls. `execute` never raises for bad input: malformed CDBs,
    unknown opcodes, unknown LUNs and I/O failures all come back as CHECK CONDITION."""

    def luns(self) -> list[int]: ...

    async def execute(
        self, lun: int, cdb: bytes, nexus: Nexus, data_out: bytes = b""
    ) -> ScsiResult:
        """Run one command. data_out holds all the data the initiator sent for it (the
        iSCSI layer collected immediate, unsolicited and solicited Data-Out first)."""
        ...

    def expected_data_out(self, cdb: bytes) -> int | None:
        """Bytes of Data-Out this CDB transfers per its own fields, or None if unknown/invalid
        (the iSCSI layer then trusts the PDU's ExpectedDataTransferLength)."""
        ...

    def nexus_lost(self, nexus: Nexus) -> None:
        """The session of this nexus ended (logout, connection loss, reinstatement)."""
        ...

    async def reset_lun(self, lun: int, nexus: Nexus) -> None:
        """LOGICAL UNIT RESET (after the iSCSI layer aborted the LUN's tasks): clear
        SPC-2 reservations and raise the reset unit attention for every other nexus."""
        ...

    async def reset_target(self, nexus: Nexus) -> None:
        """TARGET WARM RESET: reset_lun for every LUN."""
        ...
