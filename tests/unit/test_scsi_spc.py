"""Primary commands of the SCSI target: INQUIRY and VPD, REPORT LUNS, REQUEST SENSE, unit
attentions, MODE SENSE/SELECT, REPORT SUPPORTED OPERATION CODES, CDB validation."""

from __future__ import annotations

import pytest

from target.frontends.iscsi.scsi import opcodes
from target.frontends.iscsi.scsi.state import InMemoryStateStore
from target.frontends.iscsi.scsi.target import ScsiTarget
from target.frontends.iscsi.scsi.types import CHECK_CONDITION, GOOD
from tests.unit.scsi_memdev import (
    BS,
    Harness,
    MemDevice,
    async_test,
    cdb10,
    cdb16,
    inquiry,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    nexus,
    parse_sense,
    read6,
    report_luns,
    rsoc,
)

ILLEGAL = 0x05
INVALID_CDB = (ILLEGAL, 0x24, 0x00)
INVALID_PARAM = (ILLEGAL, 0x26, 0x00)
PARAM_LEN = (ILLEGAL, 0x1A, 0x00)
INVALID_OPCODE = (ILLEGAL, 0x20, 0x00)
LU_NOT_SUPPORTED = (ILLEGAL, 0x25, 0x00)
UA = 0x06


def vpd_body(data: bytes) -> bytes:
    assert int.from_bytes(data[2:4], "big") == len(data) - 4
    return data[4:]


# -- INQUIRY ---------------------------------------------------------------------------------


@async_test
async def test_standard_inquiry() -> None:
    h = await Harness().start()
    data = await h.ok(inquiry(alloc=260))
    assert len(data) == 96 and data[4] == len(data) - 5
    assert data[0] == 0x00  # qualifier 0, direct access
    assert data[2] == 0x06 and data[3] & 0x0F == 2 and data[3] & 0x10  # SPC-4, HISUP
    assert data[7] & 0x02  # CMDQUE
    assert data[5] & 0x30 == 0  # TPGS 0
    assert data[8:16] == b"TANDEM  " and data[16:32] == b"VOLUME".ljust(16)
    descriptors = {int.from_bytes(data[i : i + 2], "big") for i in range(58, 74, 2)}
    assert {0x0460, 0x04C0} <= descriptors
    assert data[36:58] == bytes(22) and data[74:] == bytes(22)


@async_test
async def test_inquiry_allocation_length_truncates() -> None:
    h = await Harness().start()
    full = await h.ok(inquiry(alloc=512))
    for alloc in (0, 1, 5, 36, 95, 96, 255, 256, 511):
        assert await h.ok(inquiry(alloc=alloc)) == full[:alloc]


@async_test
async def test_inquiry_field_checks() -> None:
    h = await Harness().start()
    s = await h.fail(inquiry(evpd=0, page=0x80))
    assert s.code == INVALID_CDB and s.sks == bytes([0xC0, 0, 2])
    s = await h.fail(inquiry(evpd=0x02))  # CMDDT
    assert s.code == INVALID_CDB and s.sks == bytes([0xC8 | 1, 0, 1])
    s = await h.fail(inquiry(evpd=1, page=0x86))
    assert s.code == INVALID_CDB


@async_test
async def test_vpd_pages() -> None:
    h = await Harness().start()
    supported = vpd_body(await h.ok(inquiry(1, 0x00)))
    assert list(supported) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for page in supported:
        data = await h.ok(inquiry(1, page))
        assert data[0] == 0 and data[1] == page
        vpd_body(data)
    serial = vpd_body(await h.ok(inquiry(1, 0x80)))
    assert serial and all(0x20 <= c <= 0x7E for c in serial)

    limits = await h.ok(inquiry(1, 0xB0))
    assert len(limits) == 64 and limits[3] == 0x3C
    assert limits[4] & 1 == 0  # WSNZ
    assert limits[5] == 255  # MAXIMUM COMPARE AND WRITE LENGTH
    assert int.from_bytes(limits[6:8], "big") == 8
    assert int.from_bytes(limits[8:12], "big") == 16384
    assert int.from_bytes(limits[20:24], "big") == 1 << 20
    assert int.from_bytes(limits[24:28], "big") == 4095
    assert int.from_bytes(limits[28:32], "big") == 8
    assert int.from_bytes(limits[36:44], "big") == 1 << 15

    bdc = await h.ok(inquiry(1, 0xB1))
    assert int.from_bytes(bdc[4:6], "big") == 1 and bdc[3] == 0x3C
    lbp = vpd_body(await h.ok(inquiry(1, 0xB2)))
    assert lbp[1] & 0xE0 == 0xE0  # LBPU, LBPWS, LBPWS10
    assert lbp[1] & 0x04 and not lbp[1] & 0x02  # LBPRZ, no ANC_SUP
    assert lbp[2] & 0x07 == 2  # thin provisioned


def designators(page: bytes) -> list[tuple[int, int, int, bytes]]:
    body, out = vpd_body(page), []
    i = 0
    while i < len(body):
        length = body[i + 3]
        out.append(
            (
                body[i] & 0x0F,
                (body[i + 1] >> 4) & 3,
                body[i + 1] & 0x0F,
                body[i + 4 : i + 4 + length],
            )
        )
        i += 4 + length
    assert i == len(body)
    return out


@async_test
async def test_device_identification_is_stable() -> None:
    h = await Harness().start()
    ids = designators(await h.ok(inquiry(1, 0x83)))
    naa = [d for d in ids if d[2] == 3]
    assert len(naa) == 1 and naa[0][1] == 0 and naa[0][3][0] >> 4 == 3 and len(naa[0][3]) == 8
    assert any(d[2] == 1 and d[3].startswith(b"TANDEM  ") for d in ids)  # T10 vendor ID
    assert (1, 1, 4, (1).to_bytes(4, "big")) in ids  # relative target port 1
    names = [d[3].rstrip(b"\0") for d in ids if d[2] == 8]
    assert b"iqn.2026-11.io.tandem:vol,t,0x0001" in names
    assert b"iqn.2026-11.io.tandem:vol" in names

    # Another target process for the same volume reports the same LU identifiers.
    again = await Harness().start()
    lu_ids = [d for d in designators(await again.ok(inquiry(1, 0x83))) if d[1] == 0]
    assert lu_ids == [d for d in ids if d[1] == 0]
    assert await again.ok(inquiry(1, 0x80)) == await h.ok(inquiry(1, 0x80))


@async_test
async def test_given_identifiers() -> None:
    target = ScsiTarget({0: MemDevice(1 << 20), 3: MemDevice(1 << 20)}, volume="v",
                        serial="SER123", naa=0x6001405ABCDEF0123456789ABCDEF012)  # fmt: skip
    await target.start()
    n = nexus()
    serial = (await target.execute(0, inquiry(1, 0x80), n)).data
    assert serial[4:] == b"SER123"
    page = (await target.execute(0, inquiry(1, 0x83), n)).data
    assert (1, 0, 3, bytes.fromhex("6001405ABCDEF0123456789ABCDEF012")) in designators(page)
    other = (await target.execute(3, inquiry(1, 0x80), n)).data
    assert other[4:] != b"SER123"
    with pytest.raises(ValueError):
        ScsiTarget({0: MemDevice(BS)}, volume="v", naa=b"\x00" * 8)


# -- unknown LUNs, REPORT LUNS, REQUEST SENSE ------------------------------------------------


@async_test
async def test_unknown_lun() -> None:
    h = await Harness().start()
    data = await h.ok(inquiry(), lun=5)
    assert data[0] == 0x7F
    assert (await h.fail(bytes(6), lun=5)).code == LU_NOT_SUPPORTED
    assert (await h.fail(read6(0, 1), lun=5)).code == LU_NOT_SUPPORTED
    luns = await h.ok(report_luns(), lun=5)
    assert luns[:4] == (8).to_bytes(4, "big") and luns[8:16] == bytes(8)
    sense = parse_sense(await h.ok(bytes([0x03, 0, 0, 0, 18, 0]), lun=5))
    assert sense.code == LU_NOT_SUPPORTED
    assert (await h.fail(inquiry(1, 0x80), lun=5)).code == INVALID_CDB


@async_test
async def test_report_luns() -> None:
    target = ScsiTarget({0: MemDevice(BS), 1: MemDevice(BS), 300: MemDevice(BS)}, volume="v")
    n = nexus()
    data = (await target.execute(1, report_luns(), n)).data
    assert int.from_bytes(data[:4], "big") == 24
    assert data[8:16] == bytes(8)
    assert data[16:18] == b"\x00\x01"
    assert data[24:26] == bytes([0x40 | 1, 300 & 0xFF])
    assert (await target.execute(0, report_luns(select=1), n)).data == bytes(8)
    assert (await target.execute(0, report_luns(select=2), n)).data == data
    assert (await target.execute(0, report_luns(alloc=10), n)).data == data[:10]
    bad = await target.execute(0, report_luns(select=3), n)
    assert bad.status == CHECK_CONDITION and parse_sense(bad.sense).code == INVALID_CDB
    bad = await target.execute(0, report_luns(alloc=3), n)
    assert parse_sense(bad.sense).code == INVALID_CDB
    with pytest.raises(ValueError):
        ScsiTarget({16384: MemDevice(BS)}, volume="v")


@async_test
async def test_request_sense() -> None:
    h = await Harness().start()
    sense = parse_sense(await h.ok(bytes([0x03, 0, 0, 0, 252, 0])))
    assert sense.code == (0, 0, 0)
    assert await h.ok(bytes([0x03, 0, 0, 0, 8, 0])) == bytes([0x70, 0, 0, 0, 0, 0, 0, 10])
    assert (await h.fail(bytes([0x03, 1, 0, 0, 18, 0]))).code == INVALID_CDB  # DESC


# -- unit attentions -----------------------------------------------------------------------


@async_test
async def test_new_nexus_gets_power_on_unit_attention() -> None:
    h = Harness()
    n = nexus("iqn.new", 9)
    # INQUIRY and REPORT LUNS neither stop nor clear it.
    assert (await h.run(inquiry(), who=n)).status == GOOD
    assert (await h.run(report_luns(), who=n)).status == GOOD
    s = await h.fail(bytes(6), who=n)
    assert s.code == (UA, 0x29, 0x00)
    assert (await h.run(bytes(6), who=n)).status == GOOD
    # After the nexus is lost it is new again; REQUEST SENSE reports and clears the UA.
    h.target.nexus_lost(n)
    sense = parse_sense(await h.ok(bytes([0x03, 0, 0, 0, 18, 0]), who=n))
    assert sense.code == (UA, 0x29, 0x00)
    assert (await h.run(bytes(6), who=n)).status == GOOD


@async_test
async def test_unit_attention_before_unsupported_opcode() -> None:
    h = Harness()
    assert (await h.fail(bytes([0xFF] + [0] * 15))).code == (UA, 0x29, 0x00)
    assert (await h.fail(bytes([0xFF] + [0] * 15))).code == INVALID_OPCODE


@async_test
async def test_lun_reset_and_capacity_unit_attentions() -> None:
    h = await Harness().start()
    await h.target.reset_lun(0, h.a)
    for who in (h.a, h.b):  # every I_T nexus, the one that reset included
        assert (await h.fail(bytes(6), who=who)).code == (UA, 0x29, 0x03)
        assert (await h.run(bytes(6), who=who)).status == GOOD
    h.dev.resize(32 << 20)
    h.target.capacity_changed()
    assert (await h.fail(cdb16(0x88, 0, 1), who=h.b)).code == (UA, 0x2A, 0x09)
    data = await h.ok(bytes([0x25] + [0] * 9), who=h.b)
    assert int.from_bytes(data[:4], "big") == (32 << 20) // BS - 1
    await h.target.reset_target(h.a)
    assert (await h.fail(bytes(6), who=h.a)).code == (UA, 0x29, 0x03)  # reset supersedes
    assert (await h.run(bytes(6), who=h.a)).status == GOOD


# -- MODE SENSE / MODE SELECT --------------------------------------------------------------


def mode_pages(data: bytes, header: int, desc: int) -> dict[int, bytes]:
    pages, i = {}, header + desc
    while i < len(data):
        pages[data[i] & 0x3F] = data[i : i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    assert i == len(data)
    return pages


@async_test
async def test_mode_sense6_all_pages() -> None:
    h = await Harness().start()
    data = await h.ok(mode_sense6(0x3F))
    assert data[0] == len(data) - 1 and data[1] == 0
    assert data[2] == 0x10  # DPOFUA, not write protected
    assert data[3] == 8
    assert int.from_bytes(data[4:8], "big") == h.blocks
    assert int.from_bytes(data[9:12], "big") == BS
    pages = mode_pages(data, 4, 8)
    assert sorted(pages) == [0x08, 0x0A, 0x1C]
    assert pages[0x08][2] & 0x04  # WCE
    control = pages[0x0A]
    assert control[2] & 0x04 == 0  # D_SENSE
    assert control[3] >> 4 in (0, 1) and (control[3] >> 1) & 3 != 2
    header = bytes([3 + 8 + len(control), 0, 0x10, 8])
    assert await h.ok(mode_sense6(0x0A)) == header + data[4:12] + control
    assert await h.ok(mode_sense6(0x3F, alloc=4)) == data[:4]
    assert await h.ok(mode_sense6(0x3F, sub=0xFF)) == data


@async_test
async def test_mode_sense_page_control_and_descriptors() -> None:
    h = await Harness().start()
    changeable = mode_pages(await h.ok(mode_sense6(0x3F, pc=1, dbd=True)), 4, 0)
    assert changeable[0x08][2:] == bytes([0x04]) + bytes(17)
    assert changeable[0x0A][2:] == bytes([0, 0, 0x08]) + bytes(7)
    assert changeable[0x1C][2:] == bytes(10)
    default = await h.ok(mode_sense6(0x08, pc=2, dbd=True))
    assert default[4 + 2] & 0x04
    saved = await h.ok(mode_sense6(0x08, pc=3, dbd=True))
    assert saved == default
    ten = await h.ok(mode_sense10(0x3F))
    assert int.from_bytes(ten[:2], "big") == len(ten) - 2 and ten[3] == 0x10
    assert int.from_bytes(ten[6:8], "big") == 8
    long = await h.ok(mode_sense10(0x08, llbaa=True))
    assert long[4] & 1 and int.from_bytes(long[6:8], "big") == 16
    assert int.from_bytes(long[8:16], "big") == h.blocks
    assert int.from_bytes(long[20:24], "big") == BS
    for bad in (mode_sense6(0x01), mode_sense6(0x08, sub=1), mode_sense10(0x05)):
        assert (await h.fail(bad)).code == INVALID_CDB


@async_test
async def test_mode_select_write_cache_enable() -> None:
    h = await Harness().start()
    caching = bytearray((await h.ok(mode_sense6(0x08, dbd=True)))[4:])
    caching[0] &= 0x3F  # PS is reserved in MODE SELECT
    caching[2] &= ~0x04
    params = bytes(4) + caching
    await h.ok(mode_select6(len(params)), params)
    page = await h.ok(mode_sense6(0x08, dbd=True))
    assert not page[4 + 2] & 0x04
    # The other nexus learns that mode parameters changed; the changer does not.
    assert (await h.fail(bytes(6), who=h.b)).code == (UA, 0x2A, 0x01)
    assert (await h.run(bytes(6))).status == GOOD
    # WCE=0: plain writes go to stable storage.
    await h.ok(cdb10(0x2A, 0, 1), bytes(BS))
    assert h.dev.log[-1] == ("write_fua", 0, BS)
    # Not saved: a new target for the same volume starts with the default again.
    other = ScsiTarget({0: h.dev}, volume="vol", state=h.store)
    await other.start()
    await other.execute(0, bytes(6), h.a)  # the power-on unit attention
    data = (await other.execute(0, mode_sense6(0x08, dbd=True), h.a)).data
    assert data[4 + 2] & 0x04


@async_test
async def test_mode_select_saved_survives_restart() -> None:
    store = InMemoryStateStore()
    h = await Harness(store=store).start()
    caching = bytearray((await h.ok(mode_sense6(0x08, dbd=True)))[4:])
    caching[0] &= 0x3F
    caching[2] &= ~0x04
    params = bytes(8) + caching
    await h.ok(mode_select10(len(params), save=True), params)
    again = await Harness(store=store).start()
    page = await again.ok(mode_sense6(0x08, dbd=True))
    assert not page[6] & 0x04
    assert not (await again.ok(mode_sense6(0x08, pc=3, dbd=True)))[6] & 0x04


@async_test
async def test_mode_select_software_write_protect() -> None:
    h = await Harness().start()
    control = bytearray((await h.ok(mode_sense6(0x0A, dbd=True)))[4:])
    control[0] &= 0x3F
    control[4] |= 0x08
    params = bytes(4) + control
    await h.ok(mode_select6(len(params)), params)
    data = await h.ok(mode_sense6(0x0A))
    assert data[2] & 0x80 and data[12 + 4] & 0x08  # WP and SWP
    assert (await h.fail(cdb10(0x2A, 0, 1), bytes(BS))).code == (0x07, 0x27, 0x02)
    await h.ok(cdb10(0x28, 0, 1))
    control[4] &= ~0x08
    params = bytes(4) + control
    await h.ok(mode_select6(len(params)), params)
    await h.ok(cdb10(0x2A, 0, 1), bytes(BS))


@async_test
async def test_mode_select_validation() -> None:
    h = await Harness().start()
    control = bytearray((await h.ok(mode_sense6(0x0A, dbd=True)))[4:])
    control[0] &= 0x3F
    await h.ok(mode_select6(0))  # nothing to do
    assert (await h.fail(mode_select6(16, pf=False), bytes(16))).code == INVALID_CDB
    assert (await h.fail(mode_select6(2), bytes(2))).code == PARAM_LEN
    assert (await h.fail(mode_select6(16), bytes(4))).code == PARAM_LEN  # short Data-Out
    changed = bytearray(control)
    changed[2] |= 0x04  # D_SENSE is not changeable
    s = await h.fail(mode_select6(4 + len(changed)), bytes(4) + changed)
    assert s.code == INVALID_PARAM and s.sks == bytes([0x80 | 0x08 | 2, 0, 6])
    bad_len = bytearray(control)
    bad_len[1] = 8
    assert (await h.fail(mode_select6(14), bytes(4) + bad_len[:10])).code == INVALID_PARAM
    unknown = bytes([0x19, 6]) + bytes(6)
    assert (await h.fail(mode_select6(12), bytes(4) + unknown)).code == INVALID_PARAM
    bad_medium = bytes([0, 1, 0, 0]) + control
    assert (await h.fail(mode_select6(len(bad_medium)), bad_medium)).code == INVALID_PARAM
    block = bytes([0, 0, 0, 8]) + bytes(4) + bytes([0, 0, 0x10, 0])  # 4096-byte blocks
    assert (await h.fail(mode_select6(12 + len(control)), block + control)).code == INVALID_PARAM
    good = bytes([0, 0, 0, 8]) + bytes(4) + bytes([0, 0, 0x02, 0]) + control
    await h.ok(mode_select6(len(good)), good)


# -- REPORT SUPPORTED OPERATION CODES ------------------------------------------------------


@async_test
async def test_report_supported_opcodes_all() -> None:
    h = await Harness().start()
    data = await h.ok(rsoc())
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    seen = set()
    for i in range(4, len(data), 8):
        op, sa, flags = data[i], int.from_bytes(data[i + 2 : i + 4], "big"), data[i + 5]
        length = int.from_bytes(data[i + 6 : i + 8], "big")
        assert not flags & 0x02 and length in (6, 10, 12, 16)
        assert bool(flags & 1) == (op in opcodes.WITH_SERVICE_ACTIONS) or sa == 0
        seen.add((op, sa if flags & 1 else None))
    assert {(0x28, None), (0x89, None), (0x9E, 0x10), (0x9E, 0x12), (0x5F, 7), (0xA3, 0x0C)} <= seen
    timed = await h.ok(rsoc(rctd=True))
    for i in range(4, len(timed), 20):
        assert timed[i + 5] & 0x02 and timed[i + 8 : i + 10] == b"\x00\x0a"
    assert len(timed) - 4 == (len(data) - 4) // 8 * 20


@async_test
async def test_report_supported_opcodes_one_command() -> None:
    h = await Harness().start()
    one = await h.ok(rsoc(1, 0x28))
    assert one[1] & 0x07 == 3 and int.from_bytes(one[2:4], "big") == 10
    assert one[4] == 0x28 and one[5] & 0x18 == 0x18  # DPO and FUA are honoured
    assert (await h.ok(rsoc(1, 0x89)))[5] & 0x18 == 0x18
    assert (await h.ok(rsoc(1, 0x2F)))[5] & 0x10 == 0x10
    s = await h.fail(rsoc(1, 0x9E, 0x10))  # has service actions: option 1 is wrong
    assert s.code == INVALID_CDB and s.sks[1:] != b"\x00\x01"
    one = await h.ok(rsoc(2, 0x9E, 0x10))
    assert one[1] & 0x07 == 3 and one[4:6] == bytes([0x9E, 0x1F])
    assert (await h.fail(rsoc(2, 0x28))).code == INVALID_CDB
    assert (await h.ok(rsoc(2, 0x9E, 0x05)))[1] & 0x07 == 1  # unsupported service action
    assert (await h.ok(rsoc(1, 0x04)))[1] & 0x07 == 1  # unsupported operation code
    assert (await h.ok(rsoc(3, 0x28, 7)))[4] == 0x28
    assert (await h.ok(rsoc(3, 0x5E, 2)))[4] == 0x5E
    timed = await h.ok(rsoc(1, 0x35, rctd=True))
    assert timed[1] & 0x80 and timed[14:16] == b"\x00\x0a"
    assert (await h.fail(rsoc(5))).code == INVALID_CDB
    for spec in opcodes.specs():
        option = 2 if spec.service_action is not None else 1
        data = await h.ok(rsoc(option, spec.opcode, spec.service_action or 0))
        assert data[4:] == spec.usage and data[4] == spec.opcode


@async_test
async def test_report_supported_task_management_functions() -> None:
    h = await Harness().start()
    cdb = bytes([0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0])
    data = await h.ok(cdb)
    assert data == bytes([0xDA, 0, 0, 0])
    repd = bytes([0xA3, 0x0D, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0])
    assert (await h.ok(repd))[3] == 0x0C
    unknown_sa = bytes([0xA3, 0x05]) + bytes(10)
    s = await h.fail(unknown_sa)
    assert s.code == INVALID_CDB and s.sks == bytes([0xC8 | 4, 0, 1])


# -- CDB validation, TEST UNIT READY, START STOP UNIT --------------------------------------


@async_test
async def test_generic_cdb_checks() -> None:
    h = await Harness().start()
    assert (await h.fail(bytes([0x04] + [0] * 5))).code == INVALID_OPCODE  # FORMAT UNIT
    assert (await h.fail(bytes([0xC0] + [0] * 15))).code == INVALID_OPCODE
    assert (await h.fail(b"")).code == INVALID_OPCODE
    s = await h.fail(bytes([0, 0, 0, 0, 0, 0x04]))  # NACA
    assert s.code == INVALID_CDB and s.sks == bytes([0xC8 | 2, 0, 5])
    assert (await h.fail(bytes([0, 0, 1, 0, 0, 0]))).code == INVALID_CDB  # reserved byte
    assert (await h.fail(bytes([0x28, 0, 0]))).code == INVALID_CDB  # CDB cut short
    # The transport pads every CDB to 16 bytes; the padding is not looked at.
    assert (await h.run(bytes(6) + b"\xff" * 10)).status == GOOD
    await h.ok(bytes(6))
    res = await h.target.execute(0, bytes([0x9E, 0x1F]) + bytes(14), h.a)
    assert parse_sense(res.sense).sks == bytes([0xC8 | 4, 0, 1])


@async_test
async def test_start_stop_unit() -> None:
    h = await Harness().start()
    await h.ok(bytes([0x1B, 1, 0, 0, 0x01, 0]))
    await h.ok(bytes([0x1B, 0, 0, 0, 0x00, 0]))
    await h.ok(bytes([0x1B, 0, 0, 0, 0x32, 0]))  # power condition: LOEJ ignored
    assert (await h.fail(bytes([0x1B, 1, 0, 0, 0x02, 0]))).code == INVALID_CDB  # eject
    assert (await h.fail(bytes([0x1B, 0, 0, 0, 0x08, 0]))).code == INVALID_CDB


def test_expected_data_out() -> None:
    target = ScsiTarget({0: MemDevice(1 << 20)}, volume="v")
    assert target.expected_data_out(cdb10(0x2A, 0, 3)) == 3 * BS
    assert target.expected_data_out(bytes([0x0A, 0, 0, 0, 0, 0])) == 256 * BS
    assert target.expected_data_out(cdb10(0x28, 0, 3)) == 0
    assert target.expected_data_out(cdb10(0x2F, 0, 4, 0x02)) == 4 * BS
    assert target.expected_data_out(cdb10(0x2F, 0, 4, 0x06)) == BS
    assert target.expected_data_out(cdb10(0x41, 0, 4)) == BS
    assert target.expected_data_out(cdb16(0x93, 0, 4, 0x01)) == 0
    assert target.expected_data_out(bytes([0x89, 0] + [0] * 11 + [3, 0, 0])) == 6 * BS
    assert target.expected_data_out(bytes([0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0])) == 24
    assert target.expected_data_out(bytes([0x15, 0x10, 0, 0, 28, 0])) == 28
    assert target.expected_data_out(bytes([0xFF] * 16)) is None
    assert target.expected_data_out(bytes([0x9E, 0x07] + [0] * 14)) is None
    assert target.expected_data_out(b"") is None
    assert target.expected_data_out(b"\x2a") is None
