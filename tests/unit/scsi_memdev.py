"""In-memory BlockDevice for the SCSI unit tests, and a small harness sending CDBs to a
ScsiTarget built over it.

The device is tests/unit/memdev.py's: it tracks allocation per 4 KiB block (so GET LBA
STATUS and WRITE SAME/UNMAP see holes), can be switched read-only, and can fail any
operation with a chosen BlockError or make it wait (for concurrency tests).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from target.frontends.iscsi.scsi.state import InMemoryStateStore
from target.frontends.iscsi.scsi.target import ScsiTarget
from target.frontends.iscsi.scsi.types import CHECK_CONDITION, GOOD, Nexus, ScsiResult
from tests.unit.memdev import MemDevice

PHYS = 4096
BS = 512


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def nexus(name: str = "iqn.2026-01.test:init1", isid: int = 1) -> Nexus:
    return Nexus(name, isid.to_bytes(6, "big"), "iqn.2026-11.io.tandem:vol", 1)


@dataclass
class Sense:
    key: int
    asc: int
    ascq: int
    info: int | None
    sks: bytes

    @property
    def code(self) -> tuple[int, int, int]:
        return self.key, self.asc, self.ascq


def parse_sense(raw: bytes) -> Sense:
    assert raw[0] & 0x7F == 0x70, raw.hex()
    assert raw[7] == len(raw) - 8
    info = int.from_bytes(raw[3:7], "big") if raw[0] & 0x80 else None
    return Sense(raw[2] & 0x0F, raw[12], raw[13], info, raw[15:18])


class Harness:
    """A ScsiTarget over one MemDevice at LUN 0, with helpers for tests."""

    def __init__(self, size: int = 16 << 20, store: InMemoryStateStore | None = None) -> None:
        self.dev = MemDevice(size)
        self.store = store or InMemoryStateStore()
        self.target = ScsiTarget({0: self.dev}, volume="vol", state=self.store)
        self.a = nexus()
        self.b = nexus("iqn.2026-01.test:init2", 2)
        self.watcher = nexus("iqn.2026-01.test:watcher", 3)  # never registers or reserves

    @property
    def blocks(self) -> int:
        return self.dev.size // BS

    async def start(self) -> Harness:
        await self.target.start()
        # Consume the power-on unit attention of both test nexuses.
        for n in (self.a, self.b, self.watcher):
            await self.target.execute(0, bytes(6), n)
        return self

    async def run(
        self, cdb: bytes | list[int], data: bytes = b"", *, who: Nexus | None = None, lun: int = 0
    ) -> ScsiResult:
        return await self.target.execute(lun, bytes(cdb), who or self.a, data)

    async def ok(self, cdb: bytes | list[int], data: bytes = b"", **kw: object) -> bytes:
        res = await self.run(cdb, data, **kw)  # type: ignore[arg-type]
        assert res.status == GOOD, parse_sense(res.sense) if res.sense else res.status
        return res.data

    async def fail(self, cdb: bytes | list[int], data: bytes = b"", **kw: object) -> Sense:
        res = await self.run(cdb, data, **kw)  # type: ignore[arg-type]
        assert res.status == CHECK_CONDITION, res
        return parse_sense(res.sense)


# -- CDB builders ---------------------------------------------------------------------------


def cdb10(op: int, lba: int, n: int, b1: int = 0, group: int = 0) -> bytes:
    return bytes([op, b1]) + lba.to_bytes(4, "big") + bytes([group]) + n.to_bytes(2, "big") + b"\0"


def cdb12(op: int, lba: int, n: int, b1: int = 0) -> bytes:
    return bytes([op, b1]) + lba.to_bytes(4, "big") + n.to_bytes(4, "big") + b"\0\0"


def cdb16(op: int, lba: int, n: int, b1: int = 0) -> bytes:
    return bytes([op, b1]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"


def read6(lba: int, n: int) -> bytes:
    return bytes([0x08]) + lba.to_bytes(3, "big") + bytes([n & 0xFF, 0])


def write6(lba: int, n: int) -> bytes:
    return bytes([0x0A]) + lba.to_bytes(3, "big") + bytes([n & 0xFF, 0])


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return bytes([0x12, evpd, page]) + alloc.to_bytes(2, "big") + b"\0"


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, sub: int = 0) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, sub, alloc, 0])


def mode_sense10(
    page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 1024
) -> bytes:
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return bytes([0x5A, b1, (pc << 6) | page, 0, 0, 0, 0]) + alloc.to_bytes(2, "big") + b"\0"


def mode_select6(length: int, save: bool = False, pf: bool = True) -> bytes:
    return bytes([0x15, (0x10 if pf else 0) | (1 if save else 0), 0, 0, length, 0])


def mode_select10(length: int, save: bool = False) -> bytes:
    return (
        bytes([0x55, 0x10 | (1 if save else 0), 0, 0, 0, 0, 0]) + length.to_bytes(2, "big") + b"\0"
    )


def report_luns(select: int = 0, alloc: int = 4096) -> bytes:
    return bytes([0xA0, 0, select, 0, 0, 0]) + alloc.to_bytes(4, "big") + b"\0\0"


def rsoc(options: int = 0, opcode: int = 0, sa: int = 0, rctd: bool = False) -> bytes:
    b2 = (0x80 if rctd else 0) | options
    return (
        bytes([0xA3, 0x0C, b2, opcode])
        + sa.to_bytes(2, "big")
        + (65535).to_bytes(4, "big")
        + b"\0\0"
    )


def read_capacity16(alloc: int = 32) -> bytes:
    return bytes([0x9E, 0x10]) + bytes(8) + alloc.to_bytes(4, "big") + b"\0\0"


def get_lba_status(lba: int, alloc: int = 4096) -> bytes:
    return bytes([0x9E, 0x12]) + lba.to_bytes(8, "big") + alloc.to_bytes(4, "big") + b"\0\0"


def write_same10(lba: int, n: int, unmap: bool = False, anchor: bool = False) -> bytes:
    return cdb10(0x41, lba, n, (0x08 if unmap else 0) | (0x10 if anchor else 0))


def write_same16(lba: int, n: int, unmap: bool = False, ndob: bool = False) -> bytes:
    return cdb16(0x93, lba, n, (0x08 if unmap else 0) | (0x01 if ndob else 0))


def unmap_cdb(length: int) -> bytes:
    return bytes([0x42, 0, 0, 0, 0, 0, 0]) + length.to_bytes(2, "big") + b"\0"


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    descs = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in ranges)
    return (len(descs) + 6).to_bytes(2, "big") + len(descs).to_bytes(2, "big") + bytes(4) + descs


def caw(lba: int, n: int, b1: int = 0) -> bytes:
    return bytes([0x89, b1]) + lba.to_bytes(8, "big") + bytes([0, 0, 0, n, 0, 0])


def pr_in(action: int, alloc: int = 8192) -> bytes:
    return bytes([0x5E, action, 0, 0, 0, 0, 0]) + alloc.to_bytes(2, "big") + b"\0"


def pr_out(action: int, rtype: int = 0, length: int = 24, scope: int = 0) -> bytes:
    return bytes([0x5F, action, (scope << 4) | rtype, 0, 0]) + length.to_bytes(4, "big") + b"\0"


def pr_params(rkey: int = 0, sakey: int = 0, aptpl: bool = False, all_tg_pt: bool = False) -> bytes:
    flags = (0x01 if aptpl else 0) | (0x04 if all_tg_pt else 0)
    return rkey.to_bytes(8, "big") + sakey.to_bytes(8, "big") + bytes(4) + bytes([flags, 0, 0, 0])
