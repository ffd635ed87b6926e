"""The SCSI target the iSCSI layer talks to (the `ScsiTarget` protocol of types.py).

Wiring, for a volume whose state lives on its replicas:

    scsi = ScsiTarget({0: volume.device}, volume=volume.name, state=volume_state_store)
    await scsi.start()      # loads persistent reservations and saved mode pages
    result = await scsi.execute(lun, cdb, nexus, data_out)

Identifiers are derived from the volume name unless given (pass `naa`/`serial` derived from
the volume's UUID if it has one), so they are the same after a restart or a move.
"""

from __future__ import annotations

import logging

from target.blockdev import BlockDevice
from target.frontends.iscsi.scsi import opcodes
from target.frontends.iscsi.scsi.cdb import check_usage
from target.frontends.iscsi.scsi.inquiry import Identity, derive_naa, derive_serial, normalize_naa
from target.frontends.iscsi.scsi.logical_unit import ScsiLogicalUnit, check_condition
from target.frontends.iscsi.scsi.sense import (
    HARDWARE_ERROR,
    ILLEGAL_REQUEST,
    INTERNAL_TARGET_FAILURE,
    LOGICAL_UNIT_NOT_SUPPORTED,
    ScsiError,
    fixed_sense,
    invalid_cdb,
    invalid_opcode,
)
from target.frontends.iscsi.scsi.spc import inquiry_data, report_luns_data, request_sense_data
from target.frontends.iscsi.scsi.state import InMemoryStateStore
from target.frontends.iscsi.scsi.types import Nexus, ScsiResult, StateStore

log = logging.getLogger("tandem.iscsi.scsi")

MAX_LUN = 16383  # flat space addressing


class ScsiTarget:
    def __init__(
        self,
        luns: dict[int, BlockDevice],
        *,
        volume: str,
        serial: str | None = None,
        naa: bytes | int | None = None,
        state: StateStore | None = None,
        vendor: str = "TANDEM",
        product: str = "VOLUME",
        revision: str = "0001",
        persist_reservations_always: bool = True,
    ) -> None:
        """`luns` maps LUN numbers to devices. `serial` and `naa` identify LUN 0; other
        LUNs get identifiers derived from the volume name and their number.
        `persist_reservations_always` keeps persistent reservations across target restarts
        whatever APTPL says (a restart is a move, not a power loss); False honours APTPL."""
        store = state if state is not None else InMemoryStateStore()
        self._luns: dict[int, ScsiLogicalUnit] = {}
        for lun, device in luns.items():
            if not 0 <= lun <= MAX_LUN:
                raise ValueError(f"LUN {lun} is outside 0..{MAX_LUN}")
            seed = volume if lun == 0 else f"{volume}/lun{lun}"
            identity = Identity(
                vendor=vendor,
                product=product,
                revision=revision,
                serial=serial if serial is not None and lun == 0 else derive_serial(seed),
                naa=normalize_naa(naa) if naa is not None and lun == 0 else derive_naa(seed),
            )
            self._luns[lun] = ScsiLogicalUnit(
                device,
                lun,
                identity,
                store,
                peers=lambda: list(self._luns.values()),
                persist_reservations_always=persist_reservations_always,
            )

    def luns(self) -> list[int]:
        return sorted(self._luns)

    def logical_unit(self, lun: int) -> ScsiLogicalUnit | None:
        return self._luns.get(lun)

    async def start(self) -> None:
        for lu in self._luns.values():
            await lu.start()

    async def execute(
        self, lun: int, cdb: bytes, nexus: Nexus, data_out: bytes = b""
    ) -> ScsiResult:
        lu = self._luns.get(lun)
        try:
            if lu is None:
                return self._no_logical_unit(bytes(cdb), nexus)
            return await lu.execute(bytes(cdb), nexus, bytes(data_out))
        except Exception:
            log.exception("LUN %d: command failed", lun)
            return check_condition(ScsiError(HARDWARE_ERROR, INTERNAL_TARGET_FAILURE))

    def _no_logical_unit(self, cdb: bytes, nexus: Nexus) -> ScsiResult:
        """INQUIRY, REPORT LUNS and REQUEST SENSE answer for any LUN (SPC-4 6.6.2, 6.33,
        6.39); everything else is LOGICAL UNIT NOT SUPPORTED."""
        try:
            if not cdb:
                raise invalid_opcode()
            opcode = cdb[0]
            if opcode not in (opcodes.INQUIRY, opcodes.REPORT_LUNS, opcodes.REQUEST_SENSE):
                raise ScsiError(ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
            spec = opcodes.lookup(cdb)
            assert spec is not None
            if len(cdb) < spec.length:
                raise invalid_cdb(len(cdb))
            cdb = cdb[: spec.length]
            check_usage(cdb, spec.usage)
            if opcode == opcodes.INQUIRY:
                return ScsiResult(data=inquiry_data(None, cdb, nexus))
            if opcode == opcodes.REPORT_LUNS:
                return ScsiResult(data=report_luns_data(self.luns(), cdb))
            sense = fixed_sense(ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
            return ScsiResult(data=request_sense_data(cdb, sense))
        except ScsiError as exc:
            return check_condition(exc)

    def expected_data_out(self, cdb: bytes) -> int | None:
        try:
            spec = opcodes.lookup(cdb) if cdb else None
        except ScsiError:
            return None
        if spec is None or len(cdb) < spec.length:
            return None
        return spec.data_out(bytes(cdb[: spec.length]))

    def nexus_lost(self, nexus: Nexus) -> None:
        for lu in self._luns.values():
            lu.nexus_lost(nexus)

    async def reset_lun(self, lun: int, nexus: Nexus) -> None:
        lu = self._luns.get(lun)
        if lu is not None:
            lu.reset()

    async def reset_target(self, nexus: Nexus) -> None:
        for lu in self._luns.values():
            lu.reset()

    def capacity_changed(self, lun: int | None = None) -> None:
        """The device's size changed (online resize): tell every I_T nexus (2Ah/09h)."""
        for number, lu in self._luns.items():
            if lun is None or lun == number:
                lu.capacity_changed()
