"""One logical unit: a BlockDevice presented as an SBC-3 direct-access disk.

`execute` runs a command in the order SAM-5 gives: unit attention first (except for
INQUIRY, REPORT LUNS and REQUEST SENSE), then the CDB checks of the command's usage mask,
then reservation conflicts, then the command itself. It never raises: every failure is a
status with sense data.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from target.blockdev import BlockDevice, BlockError, Extent
from target.frontends.iscsi.scsi import opcodes
from target.frontends.iscsi.scsi.cdb import check_usage
from target.frontends.iscsi.scsi.command import Command
from target.frontends.iscsi.scsi.inquiry import Identity, lu_designators
from target.frontends.iscsi.scsi.limits import BLOCK_SIZE
from target.frontends.iscsi.scsi.mode_pages import ModeState
from target.frontends.iscsi.scsi.reservations import Reservations
from target.frontends.iscsi.scsi.sense import (
    BUS_DEVICE_RESET_FUNCTION_OCCURRED,
    CAPACITY_DATA_HAS_CHANGED,
    DATA_PROTECT,
    HARDWARE_ERROR,
    INTERNAL_TARGET_FAILURE,
    SOFTWARE_WRITE_PROTECTED,
    UNIT_ATTENTION,
    WRITE_PROTECTED,
    ReservationConflict,
    ScsiError,
    device_error,
    fixed_sense,
    invalid_cdb,
    invalid_opcode,
    lba_out_of_range,
)
from target.frontends.iscsi.scsi.types import (
    CHECK_CONDITION,
    RESERVATION_CONFLICT,
    Nexus,
    ScsiResult,
    StateStore,
)
from target.frontends.iscsi.scsi.unit_attention import UnitAttentions, nexus_key
from target.rangelock import RangeLock

if TYPE_CHECKING:
    from target.frontends.iscsi.scsi.extended_copy import CopyOutcome

log = logging.getLogger("tandem.iscsi.scsi")

# Commands that run despite a pending unit attention (SPC-4 5.14).
_UA_EXEMPT = (opcodes.INQUIRY, opcodes.REPORT_LUNS, opcodes.REQUEST_SENSE)


def check_condition(error: ScsiError) -> ScsiResult:
    return ScsiResult(status=CHECK_CONDITION, sense=error.sense())


class ScsiLogicalUnit:
    def __init__(
        self,
        device: BlockDevice,
        lun: int,
        identity: Identity,
        store: StateStore,
        *,
        peers: Callable[[], list[ScsiLogicalUnit]] | None = None,
        persist_reservations_always: bool = True,
    ) -> None:
        """`peers` gives every logical unit of the target (this one included), for REPORT
        LUNS and for EXTENDED COPY between logical units."""
        self.device = device
        self.lun = lun
        self.identity = identity
        self._peers = peers or (lambda: [self])
        self.copy_results: dict[tuple[str, int], CopyOutcome] = {}
        self.uas = UnitAttentions()
        self.reservations = Reservations(
            store, f"scsi/lun{lun}/pr", self.uas, persist_always=persist_reservations_always
        )
        self.mode = ModeState()
        self.saved_mode = ModeState()
        self._store = store
        self._mode_key = f"scsi/lun{lun}/mode"
        self._lock = RangeLock()

    def lun_list(self) -> list[int]:
        return sorted(peer.lun for peer in self._peers())

    def copy_target(self, designator: bytes) -> ScsiLogicalUnit | None:
        """The logical unit of this target one of whose designators is `designator`
        (code set, designator type, value), as an EXTENDED COPY CSCD descriptor names it."""
        for peer in self._peers():
            if designator in lu_designators(peer.identity):
                return peer
        return None

    async def start(self) -> None:
        """Load the persisted reservations and saved mode pages."""
        await self.reservations.load()
        raw = await self._store.get(self._mode_key)
        if raw is not None:
            self.saved_mode = ModeState.from_json(raw)
            self.mode = ModeState(self.saved_mode.wce, self.saved_mode.swp)

    async def save_mode(self, state: ModeState) -> None:
        await self._store.put(self._mode_key, state.to_json())
        self.saved_mode = ModeState(state.wce, state.swp)

    # -- geometry and state --------------------------------------------------------------

    @property
    def blocks(self) -> int:
        return self.device.size // BLOCK_SIZE

    @property
    def write_protected(self) -> bool:
        return self.mode.swp or bool(self.device.readonly)

    def check_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.blocks:
            raise lba_out_of_range()

    def check_writable(self) -> None:
        if self.mode.swp:
            raise ScsiError(DATA_PROTECT, SOFTWARE_WRITE_PROTECTED)
        if self.device.readonly:
            raise ScsiError(DATA_PROTECT, WRITE_PROTECTED)

    # -- data path -----------------------------------------------------------------------

    async def read(self, lba: int, blocks: int) -> bytes:
        try:
            return await self.device.read(lba * BLOCK_SIZE, blocks * BLOCK_SIZE)
        except BlockError as exc:
            raise device_error(exc, writing=False) from exc

    async def write(self, lba: int, data: bytes, *, fua: bool, locked: bool = False) -> None:
        """Write whole blocks; `locked` when the caller holds the range exclusively."""
        start, end = lba * BLOCK_SIZE, lba * BLOCK_SIZE + len(data)
        # With the write cache disabled (WCE=0) every write goes to stable storage.
        fua = fua or not self.mode.wce
        try:
            if locked:
                await self.device.write(start, data, fua=fua)
            else:
                async with self._lock.shared(start, end):
                    await self.device.write(start, data, fua=fua)
        except BlockError as exc:
            raise device_error(exc, writing=True) from exc

    async def write_zeroes(self, lba: int, blocks: int) -> None:
        start, length = lba * BLOCK_SIZE, blocks * BLOCK_SIZE
        try:
            async with self._lock.shared(start, start + length):
                await self.device.write_zeroes(start, length, may_unmap=False)
        except BlockError as exc:
            raise device_error(exc, writing=True) from exc

    async def unmap(self, lba: int, blocks: int) -> None:
        start, length = lba * BLOCK_SIZE, blocks * BLOCK_SIZE
        try:
            async with self._lock.shared(start, start + length):
                await self.device.unmap(start, length)
        except BlockError as exc:
            raise device_error(exc, writing=True) from exc

    async def flush(self) -> None:
        try:
            await self.device.flush()
        except BlockError as exc:
            raise device_error(exc, writing=True) from exc

    async def block_status(self, lba: int, blocks: int) -> list[Extent]:
        try:
            return await self.device.block_status(lba * BLOCK_SIZE, blocks * BLOCK_SIZE)
        except BlockError as exc:
            raise device_error(exc, writing=False) from exc

    @asynccontextmanager
    async def exclusive(self, lba: int, blocks: int) -> AsyncIterator[None]:
        """Hold the range against every other write (COMPARE AND WRITE, ORWRITE)."""
        start = lba * BLOCK_SIZE
        end = start + blocks * BLOCK_SIZE
        async with self._lock.exclusive(start, end):
            # A device with writers of its own (the native engine's iSCSI fast path) locks
            # them out too.
            hold = getattr(self.device, "exclusive", None)
            if hold is None:
                yield
            else:
                async with hold(start, end):
                    yield

    # -- events --------------------------------------------------------------------------

    def nexus_lost(self, nexus: Nexus) -> None:
        key = nexus_key(nexus)
        self.uas.forget(key)
        self.reservations.nexus_lost(key)
        for entry in [e for e in self.copy_results if e[0] == key]:
            del self.copy_results[entry]

    def reset(self) -> None:
        """LOGICAL UNIT RESET: SPC-2 reservations go, every I_T nexus learns of the reset."""
        self.reservations.reset()
        self.uas.establish(BUS_DEVICE_RESET_FUNCTION_OCCURRED)

    def capacity_changed(self) -> None:
        self.uas.establish(CAPACITY_DATA_HAS_CHANGED)

    # -- execution -----------------------------------------------------------------------

    async def execute(self, cdb: bytes, nexus: Nexus, data_out: bytes = b"") -> ScsiResult:
        try:
            return await self._execute(cdb, nexus, data_out)
        except ScsiError as exc:
            return check_condition(exc)
        except ReservationConflict:
            return ScsiResult(status=RESERVATION_CONFLICT)
        except Exception:
            log.exception("LUN %d: command %s failed", self.lun, cdb[:16].hex())
            return check_condition(ScsiError(HARDWARE_ERROR, INTERNAL_TARGET_FAILURE))

    async def _execute(self, cdb: bytes, nexus: Nexus, data_out: bytes) -> ScsiResult:
        key = nexus_key(nexus)
        self.uas.see(key)
        if not cdb:
            raise invalid_opcode()
        if cdb[0] not in _UA_EXEMPT:
            code = self.uas.pop(key)
            if code is not None:
                return ScsiResult(status=CHECK_CONDITION, sense=fixed_sense(UNIT_ATTENTION, code))
        spec = opcodes.lookup(cdb)
        if spec is None:
            raise invalid_opcode()
        if len(cdb) < spec.length:
            raise invalid_cdb(len(cdb))
        cdb = bytes(cdb[: spec.length])
        check_usage(cdb, spec.usage)
        self.reservations.check(nexus, spec.access)
        data = await spec.handler(self, Command(cdb, nexus, data_out))
        return ScsiResult(data=data)
