"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS: block-to-block copies between logical
units of the target, and the parameter list checks."""

from __future__ import annotations

from target.frontends.iscsi.scsi.target import ScsiTarget
from target.frontends.iscsi.scsi.types import CHECK_CONDITION, GOOD, RESERVATION_CONFLICT
from tests.unit.scsi_memdev import (
    BS,
    Harness,
    MemDevice,
    async_test,
    cdb10,
    inquiry,
    nexus,
    parse_sense,
    pr_out,
    pr_params,
)

COPY_ABORTED = 0x0A


def xcopy_cdb(length: int) -> bytes:
    return bytes([0x83, 0]) + bytes(8) + length.to_bytes(4, "big") + b"\0\0"


def rcr_cdb(action: int, list_id: int = 0, alloc: int = 1024) -> bytes:
    return bytes([0x84, action, list_id]) + bytes(7) + alloc.to_bytes(4, "big") + b"\0\0"


def cscd(designator: bytes, code_set: int = 1, kind: int = 3, byte1: int = 0) -> bytes:
    desc = bytearray(32)
    desc[0], desc[1] = 0xE4, byte1
    desc[4], desc[5], desc[7] = code_set, kind, len(designator)
    desc[8 : 8 + len(designator)] = designator
    desc[29:32] = BS.to_bytes(3, "big")
    return bytes(desc)


def segment(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, kind: int = 2) -> bytes:
    return (
        bytes([kind, 0, 0, 0x18])
        + src.to_bytes(2, "big")
        + dst.to_bytes(2, "big")
        + bytes(2)
        + blocks.to_bytes(2, "big")
        + src_lba.to_bytes(8, "big")
        + dst_lba.to_bytes(8, "big")
    )


def params(targets: list[bytes], segments: list[bytes], list_id: int = 1, usage: int = 0) -> bytes:
    cscds, segs = b"".join(targets), b"".join(segments)
    header = bytes([list_id, usage << 3]) + len(cscds).to_bytes(2, "big") + bytes(4)
    header += len(segs).to_bytes(4, "big") + bytes(4)
    return header + cscds + segs


async def naa_of(h: Harness, lun: int = 0) -> bytes:
    page = await h.ok(inquiry(1, 0x83), lun=lun)
    assert page[4 + 1] & 0x0F == 3  # the first designator is the NAA one
    return page[8 : 8 + page[7]]


@async_test
async def test_copy_within_the_logical_unit() -> None:
    h = await Harness().start()
    data = bytes(range(256)) * 2 * 64
    await h.ok(cdb10(0x2A, 0, 64), data)
    me = cscd(await naa_of(h))
    plist = params([me], [segment(0, 0, 64, 0, 1000), segment(0, 0, 8, 0, 2000)])
    await h.ok(xcopy_cdb(len(plist)), plist)
    assert h.dev.data[1000 * BS : 1064 * BS] == data
    assert h.dev.data[2000 * BS : 2008 * BS] == data[: 8 * BS]
    status = await h.ok(rcr_cdb(0x00, 1))
    assert status[:4] == (8).to_bytes(4, "big")
    assert status[4] == 0x01 and status[5:7] == b"\x00\x02" and status[7] == 0
    assert int.from_bytes(status[8:12], "big") == 72 * BS
    # Results are per I_T nexus and go when it does.
    assert (await h.fail(rcr_cdb(0x00, 1), who=h.b)).code == (0x05, 0x24, 0x00)
    h.target.nexus_lost(h.a)
    await h.run(bytes(6))
    assert (await h.fail(rcr_cdb(0x00, 1))).code == (0x05, 0x24, 0x00)
    # LIST ID USAGE 10b: nothing is kept.
    plist = params([me], [segment(0, 0, 1, 0, 3000)], list_id=7, usage=0b10)
    await h.ok(xcopy_cdb(len(plist)), plist)
    assert (await h.fail(rcr_cdb(0x00, 7))).code == (0x05, 0x24, 0x00)
    await h.ok(xcopy_cdb(0))


@async_test
async def test_copy_between_logical_units() -> None:
    a, b = MemDevice(1 << 20), MemDevice(1 << 20)
    target = ScsiTarget({0: a, 1: b}, volume="v", serial="S0")
    n = nexus()
    for lun in (0, 1):
        await target.execute(lun, bytes(6), n)
    b.data[:BS] = b"q" * BS
    # LUN 1 by its NAA designator, LUN 0 by its (short enough) T10 vendor ID designator.
    page1 = (await target.execute(1, inquiry(1, 0x83), n)).data
    source = cscd(page1[8 : 8 + page1[7]])
    page0 = (await target.execute(0, inquiry(1, 0x83), n)).data
    at = 8 + page0[7]
    assert page0[at + 1] & 0x0F == 1 and page0[at + 4 : at + 4 + page0[at + 3]] == b"TANDEM  S0"
    destination = cscd(b"TANDEM  S0", code_set=2, kind=1)
    plist = params([source, destination], [segment(0, 1, 1, 0, 5)])
    res = await target.execute(1, xcopy_cdb(len(plist)), n, plist)
    assert res.status == GOOD, parse_sense(res.sense)
    assert a.data[5 * BS : 6 * BS] == b"q" * BS


@async_test
async def test_parameter_list_checks() -> None:
    h = await Harness().start()
    me = cscd(await naa_of(h))
    good = params([me], [segment(0, 0, 8, 0, 100)])
    for length in (8, 16 + 31, len(good) - 1):
        assert (await h.fail(xcopy_cdb(length), good[:length])).code == (0x05, 0x1A, 0x00)
    assert (await h.fail(xcopy_cdb(len(good)), good[:-4])).code == (0x05, 0x1A, 0x00)
    three = params([me] * 3, [segment(0, 0, 8, 0, 100)])
    assert (await h.fail(xcopy_cdb(len(three)), three)).code == (0x05, 0x26, 0x06)
    many = params([me], [segment(0, 0, 1, 0, 100)] * 17)
    assert (await h.fail(xcopy_cdb(len(many)), many)).code == (0x05, 0x26, 0x08)
    fc = bytearray(me)
    fc[0] = 0xE0
    other = params([bytes(fc)], [segment(0, 0, 8, 0, 100)])
    assert (await h.fail(xcopy_cdb(len(other)), other)).code == (0x05, 0x26, 0x07)
    stream = params([me], [segment(0, 0, 8, 0, 100, kind=3)])
    assert (await h.fail(xcopy_cdb(len(stream)), stream)).code == (0x05, 0x26, 0x09)
    usage01 = params([me], [segment(0, 0, 8, 0, 100)], usage=0b01)
    assert (await h.fail(xcopy_cdb(len(usage01)), usage01)).code == (0x05, 0x26, 0x00)
    tape = params([cscd(await naa_of(h), byte1=0x01)], [segment(0, 0, 8, 0, 100)])
    assert (await h.fail(xcopy_cdb(len(tape)), tape)).code == (0x05, 0x26, 0x00)
    big = bytearray(good)
    big[16 + 29 : 16 + 32] = (4096).to_bytes(3, "big")
    assert (await h.fail(xcopy_cdb(len(big)), bytes(big))).code == (0x05, 0x26, 0x00)
    operating = await h.ok(rcr_cdb(0x03))
    assert int.from_bytes(operating[:4], "big") == len(operating) - 4
    assert operating[8:10] == b"\x00\x02" and operating[10:12] == b"\x00\x10"
    assert operating[44:] == bytes([0x02, 0xE4])
    assert (await h.fail(rcr_cdb(0x01))).code == (0x05, 0x24, 0x00)


@async_test
async def test_copy_aborted() -> None:
    h = await Harness().start()
    me = cscd(await naa_of(h))
    cases = [
        params([me], [segment(0, 1, 8, 0, 100)]),  # no CSCD descriptor 1
        params([cscd(b"\x30" + bytes(7))], [segment(0, 0, 8, 0, 100)]),  # unknown LU
        params([cscd(await naa_of(h), byte1=0x20)], [segment(0, 0, 8, 0, 100)]),  # NUL
        params([me], [segment(0, 0, 2048, 0, h.blocks - 1)]),  # beyond the end
        params([me], [segment(0, 0, 8, h.blocks, 0)]),
    ]
    for plist in cases:
        res = await h.run(xcopy_cdb(len(plist)), plist)
        assert res.status == CHECK_CONDITION and parse_sense(res.sense).key == COPY_ABORTED
    status = await h.ok(rcr_cdb(0x00, 1))
    assert status[4] == 0x02  # the last one: completed with errors


@async_test
async def test_copy_respects_reservations_and_write_protection() -> None:
    h = await Harness().start()
    me = cscd(await naa_of(h))
    plist = params([me], [segment(0, 0, 1, 0, 100)])
    await h.run(pr_out(0), pr_params(sakey=5))
    await h.run(pr_out(1, 3), pr_params(rkey=5))  # EXCLUSIVE ACCESS held by a
    assert (await h.run(xcopy_cdb(len(plist)), plist, who=h.b)).status == RESERVATION_CONFLICT
    await h.ok(xcopy_cdb(len(plist)), plist)
    h.dev.readonly = True
    assert (await h.fail(xcopy_cdb(len(plist)), plist)).code == (0x07, 0x27, 0x00)
