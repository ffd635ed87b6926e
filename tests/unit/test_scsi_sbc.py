"""Block commands of the SCSI target over an in-memory device: READ/WRITE in every size,
VERIFY, WRITE SAME, UNMAP, GET LBA STATUS, COMPARE AND WRITE (and its atomicity), ORWRITE,
capacity, and how device failures surface as sense data."""

from __future__ import annotations

import asyncio

import pytest

from target.blockdev import MediumError, NoSpace
from target.frontends.iscsi.scsi import limits
from target.frontends.iscsi.scsi.types import GOOD
from tests.unit.scsi_memdev import (
    BS,
    Harness,
    async_test,
    caw,
    cdb10,
    cdb12,
    cdb16,
    get_lba_status,
    read6,
    read_capacity16,
    unmap_cdb,
    unmap_params,
    write6,
    write_same10,
    write_same16,
)

ILLEGAL = 0x05
INVALID_CDB = (ILLEGAL, 0x24, 0x00)
INVALID_PARAM = (ILLEGAL, 0x26, 0x00)
PARAM_LEN = (ILLEGAL, 0x1A, 0x00)
OUT_OF_RANGE = (ILLEGAL, 0x21, 0x00)
COMMAND_IU = (ILLEGAL, 0x0E, 0x03)
WRITE_PROTECTED = (0x07, 0x27, 0x00)
MISCOMPARE = (0x0E, 0x1D, 0x00)

READS = {6: 0x08, 10: 0x28, 12: 0xA8, 16: 0x88}
WRITES = {6: 0x0A, 10: 0x2A, 12: 0xAA, 16: 0x8A}


def rw(size: int, write: bool, lba: int, n: int, b1: int = 0) -> bytes:
    op = (WRITES if write else READS)[size]
    if size == 6:
        return write6(lba, n) if write else read6(lba, n)
    return {10: cdb10, 12: cdb12, 16: cdb16}[size](op, lba, n, b1)


def pattern(blocks: int, seed: int = 1) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(blocks * BS))


# -- READ / WRITE --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [6, 10, 12, 16])
@async_test
async def test_read_write_round_trip(size: int) -> None:
    h = await Harness().start()
    data = pattern(4, size)
    await h.ok(rw(size, True, 7, 4), data)
    assert await h.ok(rw(size, False, 7, 4)) == data
    assert h.dev.data[7 * BS : 11 * BS] == data
    last = h.blocks - 2
    if size == 6:
        last = min(last, 0x1FFFFF)
    await h.ok(rw(size, True, last, 2), data[: 2 * BS])
    assert await h.ok(rw(size, False, last, 2)) == data[: 2 * BS]


@pytest.mark.parametrize("size", [10, 12, 16])
@async_test
async def test_fua_dpo_and_protect_fields(size: int) -> None:
    h = await Harness().start()
    await h.ok(rw(size, True, 0, 1, 0x08), bytes(BS))  # FUA
    assert h.dev.log[-1] == ("write_fua", 0, BS)
    await h.ok(rw(size, True, 0, 1, 0x10), bytes(BS))  # DPO
    assert h.dev.log[-1] == ("write", 0, BS)
    await h.ok(rw(size, False, 0, 1, 0x18))
    for protect in (0x20, 0x40, 0x80):
        s = await h.fail(rw(size, False, 0, 1, protect))
        assert s.code == INVALID_CDB and s.sks[2] == 1
        assert (await h.fail(rw(size, True, 0, 1, protect), bytes(BS))).code == INVALID_CDB


@pytest.mark.parametrize("size", [6, 10, 12, 16])
@async_test
async def test_out_of_range(size: int) -> None:
    h = await Harness().start()
    n = h.blocks
    cases = [(n, 1), (n - 1, 2), (n + 1, 0)] if size != 6 else [(n, 1), (n - 1, 2)]
    for lba, count in cases:
        assert (await h.fail(rw(size, False, lba, count))).code == OUT_OF_RANGE
        data = bytes(count * BS)
        assert (await h.fail(rw(size, True, lba, count), data)).code == OUT_OF_RANGE
    if size >= 16:
        assert (await h.fail(rw(size, False, 2**63, 1))).code == OUT_OF_RANGE
        assert (await h.fail(rw(size, False, 2**64 - 1, 1))).code == OUT_OF_RANGE
    elif size >= 10:
        assert (await h.fail(rw(size, False, 2**32 - 1, 1))).code == OUT_OF_RANGE


@async_test
async def test_transfer_lengths() -> None:
    h = await Harness(size=64 << 20).start()
    assert await h.ok(cdb10(0x28, 0, 0)) == b""  # zero blocks: nothing transferred
    await h.ok(cdb10(0x2A, 0, 0))
    assert len(await h.ok(read6(0, 0))) == 256 * BS  # READ(6) length 0 means 256
    await h.ok(write6(0, 0), bytes(256 * BS))
    assert (await h.fail(cdb16(0x88, 0, 16385))).code == INVALID_CDB
    s = await h.fail(cdb10(0x2A, 0, 16385), bytes(16385 * BS))
    assert s.code == INVALID_CDB and s.sks == bytes([0xC0, 0, 7])
    assert len(await h.ok(cdb16(0x88, 0, 16384))) == 16384 * BS


@async_test
async def test_write_data_out_shorter_or_longer_than_cdb() -> None:
    h = await Harness().start()
    await h.ok(cdb10(0x2A, 0, 2), b"a" * 2 * BS)
    # Expected Data Transfer Length of one block for two: the block that came is written.
    await h.ok(cdb10(0x2A, 0, 2), b"b" * BS)
    assert h.dev.data[: 2 * BS] == b"b" * BS + b"a" * BS
    # More Data-Out than the CDB asks for: only the CDB's blocks are written.
    await h.ok(cdb10(0x2A, 0, 1), b"c" * 2 * BS)
    assert h.dev.data[: 2 * BS] == b"c" * BS + b"a" * BS
    # Nothing at all is written for none; a fraction of a block is refused.
    await h.ok(cdb10(0x2A, 0, 1))
    assert (await h.fail(cdb10(0x2A, 0, 1), b"d" * 200)).code == COMMAND_IU
    assert h.dev.data[:BS] == b"c" * BS


@async_test
async def test_write_and_verify() -> None:
    h = await Harness().start()
    for op, build in ((0x2E, cdb10), (0xAE, cdb12), (0x8E, cdb16)):
        data = pattern(3, op)
        await h.ok(build(op, 5, 3, 0x02 | 0x10), data)  # BYTCHK, DPO
        assert h.dev.data[5 * BS : 8 * BS] == data and h.dev.log[-1][0] == "write_fua"
        assert (await h.fail(build(op, 5, 3, 0x20), data)).code == INVALID_CDB
        assert (await h.fail(build(op, h.blocks, 1), bytes(BS))).code == OUT_OF_RANGE
        await h.ok(build(op, 0, 0))


@async_test
async def test_verify() -> None:
    h = await Harness().start()
    data = pattern(8, 3)
    await h.ok(cdb10(0x2A, 16, 8), data)
    for op, build in ((0x2F, cdb10), (0xAF, cdb12), (0x8F, cdb16)):
        await h.ok(build(op, 16, 8))  # BYTCHK=0: medium check only
        await h.ok(build(op, 16, 8, 0x02), data)
        await h.ok(build(op, 16, 8, 0x10 | 0x02), data)  # DPO
        bad = bytearray(data)
        bad[1234] ^= 0x55
        s = await h.fail(build(op, 16, 8, 0x02), bytes(bad))
        assert s.code == MISCOMPARE and s.info == 1234
        await h.ok(build(op, 16, 8), bytes(bad))  # no byte check: data ignored
        assert (await h.fail(build(op, 16, 8, 0x04))).code == INVALID_CDB  # BYTCHK=10b
        assert (await h.fail(build(op, 16, 8, 0x20), data)).code == INVALID_CDB  # VRPROTECT
        assert (await h.fail(build(op, h.blocks - 1, 2))).code == OUT_OF_RANGE
        assert (await h.fail(build(op, 16, 8, 0x02), data[:BS])).code == COMMAND_IU
        await h.ok(build(op, 0, 0))
    await h.ok(cdb10(0x2A, 40, 4), b"z" * 4 * BS)
    await h.ok(cdb10(0x2F, 40, 4, 0x06), b"z" * BS)  # BYTCHK=11b: one block for all
    s = await h.fail(cdb10(0x2F, 39, 4, 0x06), b"z" * BS)
    assert s.code == MISCOMPARE and s.info == 0


@async_test
async def test_prefetch_and_synchronize_cache() -> None:
    h = await Harness().start()
    for cdb in (cdb10(0x34, 0, 256, 0x02, 3), cdb16(0x90, 0, 256, 0x02), cdb10(0x34, 0, 0)):
        res = await h.run(cdb)
        assert res.status == GOOD and res.data == b""
    assert (await h.fail(cdb10(0x34, h.blocks, 1))).code == OUT_OF_RANGE
    assert (await h.fail(cdb16(0x90, 2**63, 1))).code == OUT_OF_RANGE
    await h.ok(cdb10(0x35, 0, 0, 0x02))  # IMMED, whole medium
    assert h.dev.log[-1][0] == "flush"
    await h.ok(cdb16(0x91, 8, 8))
    assert (await h.fail(cdb16(0x91, h.blocks, 1))).code == OUT_OF_RANGE


# -- WRITE SAME ----------------------------------------------------------------------------


@async_test
async def test_write_same_pattern_and_zeroes() -> None:
    h = await Harness().start()
    block = pattern(1, 9)
    await h.ok(write_same10(3, 5000), block)
    assert h.dev.data[3 * BS : 5003 * BS] == block * 5000
    await h.ok(write_same16(h.blocks - 3, 3), block)
    assert h.dev.data[-3 * BS :] == block * 3
    await h.ok(write_same10(3, 16), bytes(BS))  # zeros, no UNMAP: blocks stay mapped
    assert h.dev.log[-1][0].startswith("write_zeroes") and 0 in h.dev.allocated
    await h.ok(write_same16(0, 64, unmap=True), bytes(BS))
    assert h.dev.log[-1][0] == "unmap" and h.dev.data[: 64 * BS] == bytes(64 * BS)
    assert not {0, 1, 2, 3, 4, 5, 6, 7} & h.dev.allocated
    await h.ok(write_same16(64, 8, unmap=True, ndob=True))  # no Data-Out block at all
    assert h.dev.log[-1][0] == "unmap"
    # With UNMAP the blocks are unmapped whatever the pattern, and read back as zeros.
    await h.ok(write_same10(0, 2, unmap=True), b"\x01" * BS)
    assert h.dev.log[-1][0] == "unmap" and h.dev.data[: 2 * BS] == bytes(2 * BS)


@async_test
async def test_write_same_validation() -> None:
    h = await Harness(size=64 << 20).start()
    block = bytes(BS)
    assert (await h.fail(write_same10(0, 1, unmap=True, anchor=True), block)).code == INVALID_CDB
    assert (await h.fail(write_same10(0, 1, anchor=True), block)).code == INVALID_CDB
    assert (await h.fail(cdb10(0x41, 0, 1, 0x20), block)).code == INVALID_CDB  # WRPROTECT
    assert (await h.fail(cdb10(0x41, 0, 1, 0x02), block)).code == INVALID_CDB  # LBDATA
    assert (await h.fail(write_same10(0, 1), block[:256])).code == COMMAND_IU
    assert (await h.fail(write_same10(0, 1, unmap=True), block * 2)).code == COMMAND_IU
    assert (await h.fail(write_same10(h.blocks, 1), block)).code == OUT_OF_RANGE
    assert (await h.fail(write_same16(2**63, 1), block)).code == OUT_OF_RANGE
    # Zero blocks: to the end of the medium, within MAXIMUM WRITE SAME LENGTH (32768).
    assert h.blocks > 32768
    assert (await h.fail(write_same10(0, 0), block)).code == INVALID_CDB
    assert (await h.fail(write_same10(h.blocks - 32769, 0), block)).code == INVALID_CDB
    await h.ok(write_same10(h.blocks - 32768, 0), b"\x07" * BS)
    assert h.dev.data[-BS:] == b"\x07" * BS
    await h.ok(write_same16(h.blocks - 5, 0, unmap=True), block)
    assert h.dev.data[-5 * BS :] == bytes(5 * BS)
    assert (await h.fail(write_same10(h.blocks + 1, 0), block)).code == OUT_OF_RANGE
    assert (await h.fail(write_same10(h.blocks, 0), block)).code == OUT_OF_RANGE
    assert (await h.fail(write_same16(0, 32769), block)).code == INVALID_CDB
    assert (await h.fail(write_same10(0, 65535, unmap=True), block)).code == INVALID_CDB


# -- UNMAP and GET LBA STATUS --------------------------------------------------------------


def lba_status(data: bytes) -> list[tuple[int, int, int]]:
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    return [
        (
            int.from_bytes(data[i : i + 8], "big"),
            int.from_bytes(data[i + 8 : i + 12], "big"),
            data[i + 12] & 0x0F,
        )
        for i in range(8, len(data), 16)
    ]


@async_test
async def test_unmap_and_get_lba_status() -> None:
    h = await Harness().start()
    await h.ok(cdb10(0x2A, 0, 64), b"a" * 64 * BS)
    params = unmap_params((8, 8), (32, 4), (40, 0))
    await h.ok(unmap_cdb(len(params)), params)
    assert h.dev.data[8 * BS : 16 * BS] == bytes(8 * BS)
    assert h.dev.data[32 * BS : 36 * BS] == bytes(4 * BS)  # unaligned: zeroed, still mapped
    assert lba_status(await h.ok(get_lba_status(0))) == [
        (0, 8, 0),
        (8, 8, 1),
        (16, 48, 0),
        (64, h.blocks - 64, 1),
    ]
    assert lba_status(await h.ok(get_lba_status(10)))[0] == (10, 6, 1)
    assert lba_status(await h.ok(get_lba_status(16, alloc=24))) == [(16, 48, 0)]
    assert len(await h.ok(get_lba_status(0, alloc=12))) == 12
    assert lba_status(await h.ok(get_lba_status(h.blocks - 1)))[0] == (h.blocks - 1, 1, 1)
    for lba in (h.blocks, h.blocks + 1, 2**63, 2**64 - 1):
        assert (await h.fail(get_lba_status(lba))).code == OUT_OF_RANGE


@async_test
async def test_unmap_parameter_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    h = await Harness().start()
    await h.ok(unmap_cdb(0))
    await h.ok(unmap_cdb(8), unmap_params())
    await h.ok(unmap_cdb(24), unmap_params((h.blocks, 0)))  # zero blocks at the end: fine
    assert (await h.fail(unmap_cdb(6), bytes(6))).code == PARAM_LEN
    assert (await h.fail(unmap_cdb(24), unmap_params((0, 1))[:16])).code == PARAM_LEN
    s = await h.fail(unmap_cdb(24), unmap_params((h.blocks - 1, 2)))
    assert s.code == OUT_OF_RANGE
    assert (await h.fail(unmap_cdb(24), unmap_params((2**64 - 1, 1)))).code == OUT_OF_RANGE
    big = unmap_params(*[(0, h.blocks)] * ((1 << 20) // h.blocks + 1))  # > 1 Mi blocks in all
    assert (await h.fail(unmap_cdb(len(big)), big)).code == INVALID_PARAM
    monkeypatch.setattr(limits, "MAX_UNMAP_DESCRIPTORS", 2)
    three = unmap_params((0, 1), (1, 1), (2, 1))
    assert (await h.fail(unmap_cdb(len(three)), three)).code == INVALID_PARAM
    monkeypatch.undo()
    assert (
        await h.fail(bytes([0x42, 1] + [0] * 5 + [0, 24, 0]), unmap_params((0, 1)))
    ).code == INVALID_CDB
    # A descriptor list longer than the parameter list is cut to it.
    await h.ok(cdb10(0x2A, 0, 16), b"x" * 16 * BS)
    params = bytearray(unmap_params((0, 8), (8, 8)))
    await h.ok(unmap_cdb(24), bytes(params[:24]))
    assert h.dev.data[8 * BS : 16 * BS] == b"x" * 8 * BS and h.dev.data[:BS] == bytes(BS)


# -- COMPARE AND WRITE, ORWRITE ------------------------------------------------------------


@async_test
async def test_compare_and_write() -> None:
    h = await Harness().start()
    old, new = b"A" * 2 * BS, b"B" * 2 * BS
    await h.ok(cdb16(0x8A, 10, 2), old)
    await h.ok(caw(10, 2, 0x08), old + new)  # FUA
    assert h.dev.data[10 * BS : 12 * BS] == new and h.dev.log[-1][0] == "write_fua"
    wrong = bytearray(new)
    wrong[700] = ord("C")
    s = await h.fail(caw(10, 2), bytes(wrong) + old)
    assert s.code == MISCOMPARE and s.info == 700
    assert h.dev.data[10 * BS : 12 * BS] == new
    await h.ok(caw(10, 0))  # zero blocks: nothing compared, nothing written
    assert (await h.fail(caw(10, 0), bytes(BS))).code == INVALID_CDB
    assert (await h.fail(caw(10, 1), new + old)).code == INVALID_CDB  # Data-Out for 2 blocks
    assert (await h.fail(caw(10, 3), new)).code == INVALID_CDB
    assert (await h.fail(caw(h.blocks - 1, 2), old + new)).code == OUT_OF_RANGE
    assert (await h.fail(caw(2**63, 1), old)).code == OUT_OF_RANGE
    assert (await h.fail(caw(10, 2, 0x20), new + old)).code == INVALID_CDB  # WRPROTECT
    await h.ok(caw(100, 255), bytes(255 * BS) + b"q" * 255 * BS)
    assert h.dev.data[100 * BS : 355 * BS] == b"q" * 255 * BS


@async_test
async def test_compare_and_write_is_atomic_against_writes() -> None:
    h = await Harness().start()
    await h.ok(cdb10(0x2A, 0, 8), b"A" * 8 * BS)
    # The compare reads the range, then a plain write to it arrives before CAW writes.
    h.dev.gate["read"] = asyncio.Event()
    cas = asyncio.create_task(h.run(caw(0, 8), b"A" * 8 * BS + b"B" * 8 * BS))
    await asyncio.sleep(0.01)
    writer = asyncio.create_task(h.run(cdb10(0x2A, 4, 1), b"W" * BS, who=h.b))
    await asyncio.sleep(0.01)
    assert not writer.done()  # held back by the exclusive range
    h.dev.gate.pop("read").set()
    assert (await cas).status == GOOD
    assert (await writer).status == GOOD
    # The write came after the whole compare-and-write, never in the middle of it.
    assert h.dev.data[: 8 * BS] == b"B" * 4 * BS + b"W" * BS + b"B" * 3 * BS
    ops = [op.removesuffix("_fua") for op, *_ in h.dev.log[-3:]]
    assert ops == ["read", "write", "write"]


@async_test
async def test_compare_and_write_waits_for_writes_in_flight() -> None:
    h = await Harness().start()
    await h.ok(cdb10(0x2A, 0, 4), b"A" * 4 * BS)
    h.dev.gate["write"] = asyncio.Event()
    writer = asyncio.create_task(h.run(cdb10(0x2A, 0, 4), b"B" * 4 * BS, who=h.b))
    await asyncio.sleep(0.01)
    cas = asyncio.create_task(h.run(caw(0, 4), b"B" * 4 * BS + b"C" * 4 * BS))
    await asyncio.sleep(0.01)
    assert not cas.done()
    h.dev.gate.pop("write").set()
    assert (await writer).status == GOOD
    assert (await cas).status == GOOD  # it compared against the finished write
    assert h.dev.data[: 4 * BS] == b"C" * 4 * BS


@async_test
async def test_concurrent_compare_and_writes_on_one_block() -> None:
    h = await Harness().start()
    await h.ok(cdb10(0x2A, 0, 1), bytes(BS))
    # Ten initiators race to move block 0 from generation 0 to 1: exactly one wins.
    tasks = [
        h.run(caw(0, 1), bytes(BS) + i.to_bytes(4, "big") * (BS // 4), who=h.a)
        for i in range(1, 11)
    ]
    results = await asyncio.gather(*tasks)
    assert sum(r.status == GOOD for r in results) == 1


@async_test
async def test_orwrite() -> None:
    h = await Harness().start()
    await h.ok(cdb16(0x8A, 0, 4), bytes(4 * BS))
    await h.ok(cdb16(0x8B, 0, 4), b"\xa5" * 4 * BS)
    assert h.dev.data[: 4 * BS] == b"\xa5" * 4 * BS
    await h.ok(cdb16(0x8B, 0, 4, 0x18), b"\x5a" * 4 * BS)  # DPO, FUA
    assert h.dev.data[: 4 * BS] == b"\xff" * 4 * BS and h.dev.log[-1][0] == "write_fua"
    await h.ok(cdb16(0x8B, 0, 0))
    assert (await h.fail(cdb16(0x8B, h.blocks, 1), bytes(BS))).code == OUT_OF_RANGE
    assert (await h.fail(cdb16(0x8B, 0, 1, 0x20), bytes(BS))).code == INVALID_CDB
    assert (await h.fail(cdb16(0x8B, 0, 2), bytes(BS))).code == COMMAND_IU


# -- capacity and the rest -------------------------------------------------------------------


@async_test
async def test_read_capacity() -> None:
    h = await Harness().start()
    data = await h.ok(bytes([0x25] + [0] * 9))
    assert data == (h.blocks - 1).to_bytes(4, "big") + BS.to_bytes(4, "big")
    assert (await h.fail(bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]))).code == INVALID_CDB
    await h.ok(bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0]))  # PMI
    rc16 = await h.ok(read_capacity16())
    assert int.from_bytes(rc16[:8], "big") == h.blocks - 1
    assert int.from_bytes(rc16[8:12], "big") == BS
    assert rc16[12] == 0 and rc16[13] == 3  # no protection, 8 logical per physical block
    assert rc16[14] & 0xC0 == 0xC0 and rc16[14] & 0x3F == 0 and rc16[15] == 0  # LBPME, LBPRZ
    for alloc in range(16):
        assert await h.ok(read_capacity16(alloc)) == rc16[:alloc]

    huge = Harness(size=BS)
    huge.dev._size = (1 << 32) * BS + BS  # only the capacity is looked at
    await huge.start()
    assert (await huge.ok(bytes([0x25] + [0] * 9)))[:4] == b"\xff\xff\xff\xff"
    assert int.from_bytes((await huge.ok(read_capacity16()))[:8], "big") == 1 << 32


@async_test
async def test_read_defect_data() -> None:
    h = await Harness().start()
    assert await h.ok(bytes([0x37, 0, 0x18 | 5, 0, 0, 0, 0, 0, 32, 0])) == bytes([0, 0x1D, 0, 0])
    data = await h.ok(bytes([0xB7, 0x18]) + bytes(4) + (32).to_bytes(4, "big") + b"\0\0")
    assert data == bytes([0, 0x18]) + bytes(6)


# -- failures of the device ------------------------------------------------------------------


@async_test
async def test_read_only_volume_refuses_writes() -> None:
    h = await Harness().start()
    h.dev.readonly = True
    assert (await h.ok(bytes([0x1A, 0, 0x3F, 0, 255, 0])))[2] & 0x80  # WP
    block = bytes(BS)
    for cdb, data in (
        (cdb10(0x2A, 0, 1), block),
        (write6(0, 1), block),
        (cdb16(0x8E, 0, 1), block),
        (write_same10(0, 8, unmap=True), block),
        (write_same16(0, 8), b"\x01" * BS),
        (unmap_cdb(24), unmap_params((0, 8))),
        (caw(0, 1), block + block),
        (cdb16(0x8B, 0, 1), block),
        (write_same10(0, 8), b""),  # refused before the missing Data-Out is noticed
        (cdb10(0x2A, 0, 2), b"x"),
    ):
        assert (await h.fail(cdb, data)).code == WRITE_PROTECTED
    assert await h.ok(cdb10(0x28, 0, 1)) == block
    # The device can become read-only under a write already past the check.
    h.dev.readonly = False
    h.dev.fail["write"] = NoSpace("full")
    assert (await h.fail(cdb10(0x2A, 0, 1), block)).code == (0x07, 0x27, 0x07)


@async_test
async def test_medium_errors() -> None:
    h = await Harness().start()
    h.dev.fail["read"] = MediumError("no replica")
    assert (await h.fail(cdb10(0x28, 0, 1))).code == (0x03, 0x11, 0x00)
    assert (await h.fail(cdb10(0x2F, 0, 1))).code == (0x03, 0x11, 0x00)
    assert (await h.fail(caw(0, 1), bytes(2 * BS))).code == (0x03, 0x11, 0x00)
    h.dev.fail = {"write": MediumError("lost quorum mid-write")}
    assert (await h.fail(cdb10(0x2A, 0, 1), bytes(BS))).code == (0x03, 0x0C, 0x00)
    h.dev.fail = {"flush": MediumError("flush")}
    assert (await h.fail(cdb10(0x35, 0, 0))).code == (0x03, 0x0C, 0x00)
    h.dev.fail = {"unmap": MediumError("unmap")}
    assert (await h.fail(unmap_cdb(24), unmap_params((0, 8)))).code == (0x03, 0x0C, 0x00)
    h.dev.fail = {"block_status": MediumError("map")}
    assert (await h.fail(get_lba_status(0))).code == (0x03, 0x11, 0x00)
    h.dev.fail = {"write": RuntimeError("bug")}  # type: ignore[dict-item]
    assert (await h.fail(cdb10(0x2A, 0, 1), bytes(BS))).code == (0x04, 0x44, 0x00)
