"""A small in-memory SCSI disk behind the ScsiTarget seam, for the iSCSI transport tests.

It knows enough SPC/SBC for libiscsi's tools and qemu (INQUIRY with a few VPD pages, READ
CAPACITY 10/16, REPORT LUNS, MODE SENSE, READ/WRITE 6/10/16, SYNCHRONIZE CACHE); anything
else is CHECK CONDITION / INVALID COMMAND OPERATION CODE. Tests can slow commands down
(`delay`), hold them (`gate`), and read the peak number of concurrent commands.
"""

from __future__ import annotations

import asyncio

from target.frontends.iscsi.scsi.types import CHECK_CONDITION, GOOD, Nexus, ScsiResult

BLOCK = 512
READS = {0x08: "6", 0x28: "10", 0x88: "16"}
WRITES = {0x0A: "6", 0x2A: "10", 0x8A: "16"}


def sense(key: int, asc: int, ascq: int) -> ScsiResult:
    data = bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))
    return ScsiResult(CHECK_CONDITION, sense=data)


def lba_and_blocks(cdb: bytes) -> tuple[int, int]:
    op = cdb[0]
    if op in (0x08, 0x0A):
        lba = int.from_bytes(cdb[1:4], "big") & 0x1FFFFF
        return lba, cdb[4] or 256
    if op in (0x28, 0x2A):
        return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
    return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")


class FakeScsiTarget:
    def __init__(self, size: int = 16 * 1024 * 1024, serial: str = "fake0001") -> None:
        self.disk = bytearray(size)
        self.serial = serial
        self.delay = 0.0
        self.gate: asyncio.Event | None = None  # commands wait for it when set
        self.active = 0
        self.peak = 0
        self.executed: list[bytes] = []  # CDBs, in the order execute() was called
        self.lost: list[Nexus] = []
        self.resets: list[tuple[str, int | None]] = []

    @property
    def blocks(self) -> int:
        return len(self.disk) // BLOCK

    def luns(self) -> list[int]:
        return [0]

    def expected_data_out(self, cdb: bytes) -> int | None:
        if cdb[0] in WRITES:
            return lba_and_blocks(cdb)[1] * BLOCK
        if cdb[0] in READS or cdb[0] in (0x00, 0x12, 0x25, 0x9E, 0xA0, 0x1A, 0x5A, 0x35):
            return 0
        return None

    def nexus_lost(self, nexus: Nexus) -> None:
        self.lost.append(nexus)

    async def reset_lun(self, lun: int, nexus: Nexus) -> None:
        self.resets.append(("lun", lun))

    async def reset_target(self, nexus: Nexus) -> None:
        self.resets.append(("target", None))

    async def execute(
        self, lun: int, cdb: bytes, nexus: Nexus, data_out: bytes = b""
    ) -> ScsiResult:
        self.executed.append(bytes(cdb))
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            return self._execute(lun, cdb, data_out)
        finally:
            self.active -= 1

    def _execute(self, lun: int, cdb: bytes, data_out: bytes) -> ScsiResult:
        op = cdb[0]
        if op == 0xA0:  # REPORT LUNS
            data = (8).to_bytes(4, "big") + bytes(4) + bytes(8)
            return ScsiResult(GOOD, data[: int.from_bytes(cdb[6:10], "big")])
        if op == 0x12:
            return self._inquiry(lun, cdb)
        if lun != 0:
            return sense(0x05, 0x25, 0x00)  # LOGICAL UNIT NOT SUPPORTED
        if op in (0x00, 0x35, 0x91):  # TEST UNIT READY, SYNCHRONIZE CACHE 10/16
            return ScsiResult(GOOD)
        if op == 0x03:  # REQUEST SENSE
            return ScsiResult(GOOD, bytes((0x70, 0, 0, 0, 0, 0, 0, 10)) + bytes(10))
        if op == 0x25:  # READ CAPACITY 10
            last = min(self.blocks - 1, 0xFFFFFFFF)
            return ScsiResult(GOOD, last.to_bytes(4, "big") + BLOCK.to_bytes(4, "big"))
        if op == 0x9E and cdb[1] & 0x1F == 0x10:  # READ CAPACITY 16
            data = (self.blocks - 1).to_bytes(8, "big") + BLOCK.to_bytes(4, "big") + bytes(20)
            return ScsiResult(GOOD, data[: int.from_bytes(cdb[10:14], "big")])
        if op == 0x1A:  # MODE SENSE 6: header only
            return ScsiResult(GOOD, bytes((3, 0, 0, 0))[: cdb[4]])
        if op == 0x5A:  # MODE SENSE 10
            return ScsiResult(GOOD, bytes((0, 6, 0, 0, 0, 0, 0, 0))[: int.from_bytes(cdb[7:9])])
        if op in READS or op in WRITES:
            lba, count = lba_and_blocks(cdb)
            if lba + count > self.blocks:
                return sense(0x05, 0x21, 0x00)  # LBA OUT OF RANGE
            start = lba * BLOCK
            if op in READS:
                return ScsiResult(GOOD, bytes(self.disk[start : start + count * BLOCK]))
            whole = min(len(data_out), count * BLOCK) // BLOCK * BLOCK  # short data: full blocks
            self.disk[start : start + whole] = data_out[:whole]
            return ScsiResult(GOOD)
        return sense(0x05, 0x20, 0x00)  # INVALID COMMAND OPERATION CODE

    def _inquiry(self, lun: int, cdb: bytes) -> ScsiResult:
        alloc = int.from_bytes(cdb[3:5], "big")
        qualifier = 0 if lun == 0 else 0x7F
        if cdb[1] & 1:
            page = cdb[2]
            if page == 0x00:
                body = bytes((0x00, 0x80, 0x83))
            elif page == 0x80:
                body = self.serial.encode()
            elif page == 0x83:
                ident = b"TANDEM  " + self.serial.encode()
                body = bytes((0x02, 0x01, 0x00, len(ident))) + ident  # T10 vendor ID
            else:
                return sense(0x05, 0x24, 0x00)  # INVALID FIELD IN CDB
            data = bytes((qualifier, page)) + len(body).to_bytes(2, "big") + body
            return ScsiResult(GOOD, data[:alloc])
        data = bytes((qualifier, 0, 0x05, 0x02, 31, 0, 0, 0x02))
        data += b"TANDEM  " + b"FAKE DISK".ljust(16) + b"0001"
        return ScsiResult(GOOD, data[:alloc])


def test_fake_reads_back_what_it_wrote() -> None:
    scsi = FakeScsiTarget(size=1024 * 1024)
    nexus = Nexus("iqn.x", bytes(6), "iqn.t")
    write = bytes((0x2A, 0)) + (3).to_bytes(4, "big") + bytes((0, 0, 2, 0))
    read = bytes((0x28, 0)) + (3).to_bytes(4, "big") + bytes((0, 0, 2, 0))
    assert asyncio.run(scsi.execute(0, write, nexus, b"x" * 1024)).status == GOOD
    assert asyncio.run(scsi.execute(0, read, nexus)).data == b"x" * 1024
    assert scsi.expected_data_out(write) == 1024


def test_fake_rejects_unknown_opcode() -> None:
    result = asyncio.run(
        FakeScsiTarget().execute(0, bytes(16).replace(b"\0", b"\xff", 1), Nexus("i", bytes(6), "t"))
    )
    assert result.status == CHECK_CONDITION and result.sense[12] == 0x20
