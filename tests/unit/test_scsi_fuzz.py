"""Random CDBs and Data-Out never make `execute` raise, and always come back as a status the
transport can send with well-formed fixed-format sense data."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from target.frontends.iscsi.scsi import opcodes
from target.frontends.iscsi.scsi.types import (
    CHECK_CONDITION,
    CONDITION_MET,
    GOOD,
    RESERVATION_CONFLICT,
    ScsiResult,
)
from tests.unit.scsi_memdev import Harness

KNOWN = sorted({spec.opcode for spec in opcodes.specs()})


def cdbs() -> st.SearchStrategy[bytes]:
    opcode = st.one_of(st.sampled_from(KNOWN), st.integers(0, 255))
    rest = st.binary(min_size=0, max_size=31)
    # Mostly small numbers in the fields, so that commands get past the range checks.
    small = st.lists(st.integers(0, 3), min_size=0, max_size=31).map(bytes)
    return st.builds(lambda op, body: bytes([op]) + body, opcode, st.one_of(rest, small))


def data_outs() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(b""),
        st.binary(max_size=64),
        st.sampled_from([bytes(512), b"\x01" * 512, bytes(1024), bytes(24)]),
        st.binary(min_size=500, max_size=2100),
    )


def check(res: ScsiResult) -> None:
    assert res.status in (GOOD, CHECK_CONDITION, RESERVATION_CONFLICT, CONDITION_MET)
    if res.status == CHECK_CONDITION:
        sense = res.sense
        assert len(sense) == 18 and sense[0] & 0x7F == 0x70 and sense[7] == 10
        # No HARDWARE ERROR: that would be an exception inside the target (the device here
        # never fails), and no MEDIUM ERROR either.
        assert sense[2] & 0x0F in (0x5, 0x6, 0x7, 0xE), sense.hex()
        assert not res.data
    else:
        assert res.sense == b""
    if res.status != GOOD:
        assert res.data == b""
    assert len(res.data) <= 1 << 24


FUZZ = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.lists(st.tuples(cdbs(), data_outs(), st.sampled_from([0, 0, 0, 1])), max_size=8))
def test_random_commands(commands: list[tuple[bytes, bytes, int]]) -> None:
    async def run() -> None:
        h = await Harness(size=1 << 20).start()
        for i, (cdb, data, lun) in enumerate(commands):
            who = h.a if i % 2 else h.b
            res = await h.target.execute(lun, cdb, who, data)
            check(res)
            expected = h.target.expected_data_out(cdb)
            assert expected is None or expected >= 0

    asyncio.run(run())


@FUZZ
@given(st.binary(min_size=0, max_size=32), data_outs())
def test_random_bytes_on_a_fresh_nexus(cdb: bytes, data: bytes) -> None:
    async def run() -> None:
        h = Harness(size=1 << 20)
        check(await h.target.execute(0, cdb, h.a, data))
        check(await h.target.execute(0, cdb, h.a, data))

    asyncio.run(run())
