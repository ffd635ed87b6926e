"""Reservations: SPC-4 persistent reservations with two I_T nexuses (every service action
and type, conflicts, unit attentions, persistence through the StateStore) and SPC-2
RESERVE/RELEASE, also where the two meet."""

from __future__ import annotations

from typing import Any

import pytest

from target.frontends.iscsi.scsi.state import InMemoryStateStore
from target.frontends.iscsi.scsi.types import GOOD, RESERVATION_CONFLICT, Nexus
from tests.unit.scsi_memdev import (
    BS,
    Harness,
    async_test,
    cdb10,
    inquiry,
    nexus,
    pr_in,
    pr_out,
    pr_params,
    report_luns,
)

WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REGISTER_IGNORE, MOVE = range(8)
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = range(4)
UA = 0x06
K1, K2 = 0x1111, 0x2222

READ = cdb10(0x28, 1, 1)
WRITE = cdb10(0x2A, 1, 1)
MODE_SENSE = bytes([0x1A, 0, 0x3F, 0, 255, 0])


async def prout(h: Harness, who: Nexus, action: int, rtype: int = 0, **params: Any) -> int:
    res = await h.run(pr_out(action, rtype), pr_params(**params), who=who)
    return res.status


async def keys(h: Harness) -> tuple[int, list[int]]:
    data = await h.ok(pr_in(READ_KEYS), who=h.watcher)
    length = int.from_bytes(data[4:8], "big")
    assert length == len(data) - 8
    found = [int.from_bytes(data[i : i + 8], "big") for i in range(8, len(data), 8)]
    return int.from_bytes(data[:4], "big"), found


async def reservation(h: Harness) -> tuple[int, int] | None:
    data = await h.ok(pr_in(READ_RESERVATION), who=h.watcher)
    if int.from_bytes(data[4:8], "big") == 0:
        return None
    assert len(data) == 24
    return int.from_bytes(data[8:16], "big"), data[21] & 0x0F


async def allowed(h: Harness, who: Nexus, cdb: bytes) -> bool:
    res = await h.run(cdb, bytes(BS) if cdb[0] == 0x2A else b"", who=who)
    assert res.status in (GOOD, RESERVATION_CONFLICT), res
    return res.status == GOOD


async def drain_unit_attentions(h: Harness, who: Nexus) -> list[tuple[int, int]]:
    seen = []
    while True:
        res = await h.run(bytes(6), who=who)
        if res.status == GOOD:
            return seen
        seen.append((res.sense[12], res.sense[13]))


# -- registration --------------------------------------------------------------------------


@async_test
async def test_register_flow() -> None:
    h = await Harness().start()
    assert await keys(h) == (0, [])
    assert await prout(h, h.a, REGISTER_IGNORE, sakey=K1) == GOOD
    assert await keys(h) == (1, [K1])
    # Registering again with a wrong (zero) reservation key conflicts.
    assert await prout(h, h.a, REGISTER, sakey=K1 + 1) == RESERVATION_CONFLICT
    assert await prout(h, h.a, REGISTER, rkey=K1, sakey=K2) == GOOD  # change the key
    assert await keys(h) == (2, [K2])
    assert await prout(h, h.b, REGISTER, rkey=5, sakey=K1) == RESERVATION_CONFLICT
    assert await prout(h, h.b, REGISTER, sakey=K2) == GOOD  # the same key, another nexus
    assert await keys(h) == (3, [K2, K2])
    assert await prout(h, h.a, REGISTER, rkey=K2, sakey=0) == GOOD  # unregister
    assert await prout(h, h.a, REGISTER, sakey=0) == GOOD  # unregistered, no key: no-op
    assert await keys(h) == (4, [K2])
    data = await h.ok(
        pr_in(READ_KEYS, alloc=8), who=h.watcher
    )  # truncated; the length still says 8
    assert int.from_bytes(data[4:8], "big") == 8 and len(data) == 8


@async_test
async def test_reserve_release_every_type() -> None:
    h = await Harness().start()
    assert await prout(h, h.a, REGISTER, sakey=K1) == GOOD
    for rtype in (WE, EA, WE_RO, EA_RO, WE_AR, EA_AR):
        assert await prout(h, h.a, RESERVE, rtype, rkey=K1) == GOOD
        expected_key = 0 if rtype in (WE_AR, EA_AR) else K1
        assert await reservation(h) == (expected_key, rtype)
        assert await prout(h, h.a, RESERVE, rtype, rkey=K1) == GOOD  # same again: fine
        other = WE if rtype != WE else EA
        assert await prout(h, h.a, RESERVE, other, rkey=K1) == RESERVATION_CONFLICT
        res = await h.run(pr_out(RELEASE, other), pr_params(rkey=K1))
        assert res.sense[12:14] == b"\x26\x04"  # INVALID RELEASE OF PERSISTENT RESERVATION
        assert await prout(h, h.a, RELEASE, rtype, rkey=K1) == GOOD
        assert await reservation(h) is None
    gen, _ = await keys(h)
    assert gen == 1  # RESERVE and RELEASE do not change the generation
    assert await prout(h, h.a, RESERVE, WE, rkey=K2) == RESERVATION_CONFLICT
    assert await prout(h, h.b, RESERVE, WE, rkey=0) == RESERVATION_CONFLICT  # unregistered


ACCESS = {
    # type: (registered b reads, registered b writes, unregistered b reads, ... writes)
    WE: (True, False, True, False),
    EA: (False, False, False, False),
    WE_RO: (True, True, True, False),
    EA_RO: (True, True, False, False),
    WE_AR: (True, True, True, False),
    EA_AR: (True, True, False, False),
}


@pytest.mark.parametrize("rtype", sorted(ACCESS))
@async_test
async def test_access_per_reservation_type(rtype: int) -> None:
    h = await Harness().start()
    assert await prout(h, h.a, REGISTER_IGNORE, sakey=K1) == GOOD
    assert await prout(h, h.b, REGISTER_IGNORE, sakey=K1) == GOOD
    assert await prout(h, h.a, RESERVE, rtype, rkey=K1) == GOOD
    assert await allowed(h, h.a, READ) and await allowed(h, h.a, WRITE)
    reg_read, reg_write, unreg_read, unreg_write = ACCESS[rtype]
    assert await allowed(h, h.b, READ) == reg_read
    assert await allowed(h, h.b, WRITE) == reg_write
    assert await allowed(h, h.b, MODE_SENSE) == reg_write
    assert await prout(h, h.b, REGISTER, rkey=K1, sakey=0) == GOOD
    assert await allowed(h, h.b, READ) == unreg_read
    assert await allowed(h, h.b, WRITE) == unreg_write
    for always in (bytes(6), inquiry(), report_luns(), bytes([0x25] + [0] * 9), pr_in(0)):
        assert await allowed(h, h.b, always)
    assert await prout(h, h.a, RELEASE, rtype, rkey=K1) == GOOD
    assert await allowed(h, h.b, WRITE)


@pytest.mark.parametrize("rtype", [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR])
@async_test
async def test_holder_unregistering(rtype: int) -> None:
    h = await Harness().start()
    await prout(h, h.a, REGISTER_IGNORE, sakey=K1)
    await prout(h, h.b, REGISTER_IGNORE, sakey=K1)
    assert await prout(h, h.a, RESERVE, rtype, rkey=K1) == GOOD
    assert await prout(h, h.a, REGISTER, rkey=K1, sakey=0) == GOOD
    if rtype in (WE_AR, EA_AR):
        # All registrants hold it: it stays while one is left, and that one can release it.
        assert await reservation(h) == (0, rtype)
        assert await prout(h, h.b, RELEASE, rtype, rkey=K1) == GOOD
        assert (0x2A, 0x04) not in await drain_unit_attentions(h, h.b)
    else:
        assert await reservation(h) is None
        released = (0x2A, 0x04) in await drain_unit_attentions(h, h.b)
        assert released == (rtype in (WE_RO, EA_RO))
    assert await prout(h, h.b, REGISTER, rkey=K1, sakey=0) == GOOD
    assert await keys(h) == (4, [])


@async_test
async def test_release_by_others_and_registrants_only_notice() -> None:
    h = await Harness().start()
    await prout(h, h.a, REGISTER, sakey=K1)
    await prout(h, h.b, REGISTER, sakey=K2)
    await prout(h, h.a, RESERVE, EA_RO, rkey=K1)
    assert await prout(h, h.b, RELEASE, EA_RO, rkey=K2) == GOOD  # not the holder: no-op
    assert await reservation(h) == (K1, EA_RO)
    assert await prout(h, h.b, RELEASE, EA_RO, rkey=K1) == RESERVATION_CONFLICT
    assert await prout(h, h.a, RELEASE, EA_RO, rkey=K1) == GOOD
    assert await drain_unit_attentions(h, h.b) == [(0x2A, 0x04)]
    assert await drain_unit_attentions(h, h.a) == []


@async_test
async def test_clear() -> None:
    h = await Harness().start()
    await prout(h, h.a, REGISTER, sakey=K1)
    await prout(h, h.b, REGISTER, sakey=K2)
    await prout(h, h.a, RESERVE, EA, rkey=K1)
    gen, _ = await keys(h)
    assert await prout(h, h.b, CLEAR, rkey=K1) == RESERVATION_CONFLICT
    assert await prout(h, h.b, CLEAR, rkey=K2) == GOOD
    assert await keys(h) == (gen + 1, [])
    assert await reservation(h) is None
    assert await drain_unit_attentions(h, h.a) == [(0x2A, 0x03)]
    assert await drain_unit_attentions(h, h.b) == []


@async_test
async def test_preempt_registrations_without_reservation() -> None:
    h = await Harness().start()
    third = nexus("iqn.2026-01.test:init3", 3)
    await h.run(bytes(6), who=third)
    await prout(h, h.a, REGISTER, sakey=K1)
    await prout(h, h.b, REGISTER, sakey=K1)  # the same key as a
    await prout(h, third, REGISTER, sakey=K2)
    gen, _ = await keys(h)
    # b preempts key K1: a goes, b keeps its own registration although its key matches.
    assert await prout(h, h.b, PREEMPT, EA, rkey=K1, sakey=K1) == GOOD
    assert await keys(h) == (gen + 1, [K1, K2])
    assert await drain_unit_attentions(h, h.a) == [(0x2A, 0x05)]
    assert await drain_unit_attentions(h, third) == []
    assert await prout(h, h.b, PREEMPT, EA, rkey=K1, sakey=0x9999) == RESERVATION_CONFLICT
    res = await h.run(pr_out(PREEMPT, EA), pr_params(rkey=K1, sakey=0), who=h.b)
    assert res.sense[12:14] == b"\x26\x00"
    assert await prout(h, h.a, PREEMPT, EA, rkey=K1, sakey=K2) == RESERVATION_CONFLICT


@async_test
async def test_preempt_the_reservation_holder() -> None:
    h = await Harness().start()
    await prout(h, h.a, REGISTER, sakey=K1)
    await prout(h, h.b, REGISTER, sakey=K2)
    await prout(h, h.a, RESERVE, WE, rkey=K1)
    gen, _ = await keys(h)
    assert await prout(h, h.b, PREEMPT_ABORT, EA, rkey=K2, sakey=K1) == GOOD
    assert await reservation(h) == (K2, EA)
    assert await keys(h) == (gen + 1, [K2])
    assert await drain_unit_attentions(h, h.a) == [(0x2A, 0x05)]
    assert not await allowed(h, h.a, READ)
    # Preempting a key that is not the holder's only removes registrations.
    await prout(h, h.a, REGISTER, sakey=K1)
    assert await prout(h, h.b, PREEMPT, EA, rkey=K2, sakey=K1) == GOOD
    assert await reservation(h) == (K2, EA)
    assert await keys(h) == (gen + 3, [K2])


@async_test
async def test_preempt_all_registrants_with_zero_key() -> None:
    h = await Harness().start()
    await prout(h, h.a, REGISTER, sakey=K1)
    await prout(h, h.b, REGISTER, sakey=K2)
    await prout(h, h.a, RESERVE, WE_AR, rkey=K1)
    assert await prout(h, h.b, PREEMPT, WE, rkey=K2, sakey=0) == GOOD
    assert await reservation(h) == (K2, WE)
    assert (await keys(h))[1] == [K2]
    assert (0x2A, 0x05) in await drain_unit_attentions(h, h.a)


@async_test
async def test_register_and_move() -> None:
    h = await Harness().start()
    await prout(h, h.a, REGISTER, sakey=K1)
    await prout(h, h.a, RESERVE, WE, rkey=K1)
    name = h.b.initiator_port.upper().replace(",I,0X", ",i,0x").encode() + b"\0"
    name = name.ljust(-(-len(name) // 4) * 4, b"\0")
    tid = bytes([0x40 | 5, 0]) + len(name).to_bytes(2, "big") + name
    params = K1.to_bytes(8, "big") + K2.to_bytes(8, "big") + bytes([0, 0x02, 0, 1])
    params += len(tid).to_bytes(4, "big") + tid
    res = await h.run(pr_out(MOVE, EA, len(params)), params)
    assert res.status == GOOD, res.sense.hex()
    assert await reservation(h) == (K2, EA)
    assert (await keys(h))[1] == [K2]  # the source was unregistered (UNREG)
    assert await allowed(h, h.b, WRITE)
    assert not await allowed(h, h.a, READ)
    # Only the holder may move; a move to itself or to port 2 is refused.
    res = await h.run(pr_out(MOVE, EA, len(params)), params)
    assert res.status == RESERVATION_CONFLICT
    own = K2.to_bytes(8, "big") + K1.to_bytes(8, "big") + bytes([0, 0, 0, 1])
    own += len(tid).to_bytes(4, "big") + tid
    assert (await h.run(pr_out(MOVE, EA, len(own)), own, who=h.b)).sense[12] == 0x26
    port2 = bytearray(own)
    port2[19] = 2
    assert (await h.run(pr_out(MOVE, EA, len(own)), bytes(port2), who=h.b)).sense[12] == 0x26
    short = own[:-4]
    assert (await h.run(pr_out(MOVE, EA, len(short)), short, who=h.b)).sense[12] == 0x1A


@async_test
async def test_read_full_status_and_capabilities() -> None:
    h = await Harness().start()
    await prout(h, h.a, REGISTER, sakey=K1)
    await prout(h, h.b, REGISTER, sakey=K2, all_tg_pt=True)
    await prout(h, h.a, RESERVE, WE_RO, rkey=K1)
    data = await h.ok(pr_in(READ_FULL_STATUS), who=h.watcher)
    assert int.from_bytes(data[4:8], "big") == len(data) - 8
    entries, i = [], 8
    while i < len(data):
        tid_len = int.from_bytes(data[i + 20 : i + 24], "big")
        tid = data[i + 24 : i + 24 + tid_len]
        assert tid[0] == 0x45 and tid_len % 4 == 0 and tid_len >= 20
        name = tid[4:].rstrip(b"\0").decode()
        entries.append((int.from_bytes(data[i : i + 8], "big"), data[i + 12], data[i + 13], name))
        assert int.from_bytes(data[i + 18 : i + 20], "big") == 1
        i += 24 + tid_len
    assert entries == [
        (K1, 0x01, WE_RO, h.a.initiator_port),
        (K2, 0x02, 0, h.b.initiator_port),
    ]
    caps = await h.ok(pr_in(REPORT_CAPABILITIES))
    assert caps[:2] == b"\x00\x08" and caps[2] & 0x10 and caps[2] & 0x01  # CRH, PTPL_C
    assert caps[3] & 0x80 and (caps[3] >> 4) & 7 <= 5
    assert caps[4:6] == b"\xea\x01"


@async_test
async def test_parameter_and_cdb_errors() -> None:
    h = await Harness().start()
    res = await h.run(pr_out(REGISTER, length=20), pr_params(sakey=K1)[:20])
    assert res.sense[12] == 0x1A
    res = await h.run(pr_out(REGISTER), pr_params(sakey=K1)[:16])  # Data-Out short of 24
    assert res.sense[12] == 0x1A
    spec_i_pt = bytearray(pr_params(sakey=K1))
    spec_i_pt[20] = 0x08
    assert (await h.run(pr_out(REGISTER), bytes(spec_i_pt))).sense[12] == 0x26
    await prout(h, h.a, REGISTER, sakey=K1)
    assert (await h.run(pr_out(RESERVE, WE, scope=1), pr_params(rkey=K1))).sense[12] == 0x24
    assert (await h.run(pr_out(RESERVE, 2), pr_params(rkey=K1))).sense[12] == 0x24
    for action in range(4, 0x20):
        res = await h.run(pr_in(action))
        assert res.sense[12] == 0x24 and res.sense[15:18] == bytes([0xCC, 0, 1])
    assert (await h.run(pr_out(8))).sense[12] == 0x24


# -- persistence ---------------------------------------------------------------------------


@async_test
async def test_state_survives_a_new_target() -> None:
    store = InMemoryStateStore()
    h = await Harness(store=store).start()
    await prout(h, h.a, REGISTER, sakey=K1)
    await prout(h, h.b, REGISTER, sakey=K2)
    await prout(h, h.a, RESERVE, EA, rkey=K1)
    before = (await keys(h), await reservation(h))
    again = await Harness(store=store).start()
    assert (await keys(again), await reservation(again)) == before
    assert await allowed(again, again.a, WRITE)
    assert not await allowed(again, again.b, READ)
    assert await prout(again, again.a, RELEASE, EA, rkey=K1) == GOOD
    third = await Harness(store=store).start()
    assert await reservation(third) is None


@async_test
async def test_aptpl_when_restarts_count_as_power_loss() -> None:
    store = InMemoryStateStore()
    h = await Harness(store=store).start()
    await prout(h, h.a, REGISTER, sakey=K1)
    again = Harness(store=store)
    again.target = type(again.target)({0: again.dev}, volume="vol", state=store,
                                      persist_reservations_always=False)  # fmt: skip
    await again.start()
    assert (await keys(again))[1] == []
    await prout(h, h.a, REGISTER, rkey=K1, sakey=K2, aptpl=True)
    assert (await h.ok(pr_in(REPORT_CAPABILITIES)))[3] & 0x01  # PTPL_A
    await again.target.start()
    assert (await keys(again))[1] == [K2]


@async_test
async def test_failed_save_changes_nothing() -> None:
    class FailingStore(InMemoryStateStore):
        async def put(self, key: str, value: Any) -> None:
            raise OSError("replicas unreachable")

    h = await Harness(store=FailingStore()).start()
    res = await h.run(pr_out(REGISTER), pr_params(sakey=K1))
    assert res.status == 0x02 and res.sense[2] == 0x04
    assert await keys(h) == (0, [])


# -- SPC-2 RESERVE / RELEASE -----------------------------------------------------------------


@pytest.mark.parametrize("ten", [False, True])
@async_test
async def test_reserve_release_two_initiators(ten: bool) -> None:
    reserve = bytes([0x56] + [0] * 9) if ten else bytes([0x16] + [0] * 5)
    release = bytes([0x57] + [0] * 9) if ten else bytes([0x17] + [0] * 5)
    h = await Harness().start()
    await h.ok(reserve)
    await h.ok(reserve)  # the holder may reserve again
    assert (await h.run(reserve, who=h.b)).status == RESERVATION_CONFLICT
    await h.ok(release, who=h.b)  # not the holder: nothing happens
    await h.ok(MODE_SENSE)
    assert (await h.run(MODE_SENSE, who=h.b)).status == RESERVATION_CONFLICT
    assert (await h.run(READ, who=h.b)).status == RESERVATION_CONFLICT
    assert (await h.run(pr_in(0), who=h.b)).status == RESERVATION_CONFLICT
    for ok in (bytes(6), inquiry(), report_luns(), bytes([3, 0, 0, 0, 18, 0])):
        await h.ok(ok, who=h.b)
    await h.ok(release)
    await h.ok(reserve, who=h.b)
    await h.ok(release, who=h.b)
    assert (await h.run(bytes([0x16, 0x01, 0, 0, 0, 0]))).sense[12] == 0x24  # extents


@async_test
async def test_reserve_released_by_nexus_loss_and_reset() -> None:
    reserve = bytes([0x16] + [0] * 5)
    h = await Harness().start()
    await h.ok(reserve)
    h.target.nexus_lost(h.a)
    await h.ok(reserve, who=h.b)
    await h.target.reset_lun(0, h.a)
    await drain_unit_attentions(h, h.a)
    await h.ok(reserve)
    await h.target.reset_target(h.b)
    await drain_unit_attentions(h, h.b)
    await h.ok(reserve, who=h.b)


@async_test
async def test_reserve_with_persistent_registrations() -> None:
    reserve, release = bytes([0x16] + [0] * 5), bytes([0x17] + [0] * 5)
    h = await Harness().start()
    await prout(h, h.a, REGISTER, sakey=K1)
    assert (await h.run(reserve, who=h.b)).status == RESERVATION_CONFLICT
    assert (await h.run(reserve)).status == RESERVATION_CONFLICT  # registered, no holder
    await prout(h, h.a, RESERVE, WE, rkey=K1)
    await h.ok(reserve)  # the persistent reservation holder: GOOD, nothing changes (CRH)
    await h.ok(release)
    assert await reservation(h) == (K1, WE)
    assert (await h.run(release, who=h.b)).status == RESERVATION_CONFLICT
    await prout(h, h.a, CLEAR, rkey=K1)
    await h.ok(reserve)
    assert (await h.run(pr_out(REGISTER), pr_params(sakey=K2), who=h.b)).status == (
        RESERVATION_CONFLICT
    )
