"""The iSCSI PDU codec: every PDU type round trips, digests and padding, AHS, and a decoder
that answers garbage only with PduError (never another exception)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from target.frontends.iscsi import pdu as p

SAMPLES: list[p.Pdu] = [
    p.ScsiCommand(
        immediate=True,
        final=False,
        read=True,
        write=True,
        attr=1,
        lun=p.encode_lun(3),
        itt=0x1234,
        edtl=4096,
        cmdsn=77,
        expstatsn=5,
        cdb=bytes(range(16)),
        data=b"abcde",
    ),
    p.ScsiResponse(
        itt=9,
        response=1,
        status=2,
        bidi_overflow=True,
        underflow=True,
        snack_tag=3,
        statsn=4,
        expcmdsn=5,
        maxcmdsn=6,
        expdatasn=7,
        bidi_residual=8,
        residual=9,
        data=b"\0\x02ab",
    ),
    p.TaskManagementRequest(
        immediate=True,
        function=p.TmfFunction.LOGICAL_UNIT_RESET,
        lun=p.encode_lun(1),
        itt=1,
        rtt=2,
        cmdsn=3,
        expstatsn=4,
        refcmdsn=5,
        expdatasn=6,
    ),
    p.TaskManagementResponse(
        itt=1, response=p.TmfResponse.NO_TASK, statsn=2, expcmdsn=3, maxcmdsn=4
    ),
    p.LoginRequest(
        transit=True,
        cont=False,
        csg=1,
        nsg=3,
        version_max=0,
        version_min=0,
        isid=bytes.fromhex("400001370000"),
        tsih=7,
        itt=8,
        cid=9,
        cmdsn=10,
        expstatsn=11,
        data=b"InitiatorName=iqn.x\0",
    ),
    p.LoginResponse(
        transit=False,
        cont=True,
        csg=0,
        nsg=0,
        version_max=0,
        version_active=0,
        isid=bytes(6),
        tsih=3,
        itt=4,
        statsn=5,
        expcmdsn=6,
        maxcmdsn=7,
        status_class=2,
        status_detail=1,
        data=b"A=B\0",
    ),
    p.TextRequest(
        final=False,
        cont=True,
        lun=bytes(8),
        itt=1,
        ttt=2,
        cmdsn=3,
        expstatsn=4,
        data=b"SendTargets=All\0",
    ),
    p.TextResponse(
        final=True,
        cont=False,
        itt=1,
        ttt=p.RESERVED_TAG,
        statsn=3,
        expcmdsn=4,
        maxcmdsn=5,
        data=b"TargetName=iqn.t\0",
    ),
    p.DataOut(
        final=True,
        lun=p.encode_lun(0),
        itt=5,
        ttt=6,
        expstatsn=7,
        datasn=8,
        offset=9,
        data=b"x" * 13,
    ),
    p.DataIn(
        final=True,
        ack=False,
        overflow=True,
        has_status=True,
        status=0x02,
        itt=1,
        ttt=2,
        statsn=3,
        expcmdsn=4,
        maxcmdsn=5,
        datasn=6,
        offset=7,
        residual=8,
        data=b"y" * 3,
    ),
    p.LogoutRequest(immediate=True, reason=1, itt=4, cid=5, cmdsn=6, expstatsn=7),
    p.LogoutResponse(
        response=2, itt=3, statsn=4, expcmdsn=5, maxcmdsn=6, time2wait=7, time2retain=8
    ),
    p.Snack(type=1, lun=bytes(8), itt=1, ttt=2, expstatsn=3, begrun=4, runlength=5),
    p.R2T(
        lun=bytes(8), itt=1, ttt=2, statsn=3, expcmdsn=4, maxcmdsn=5, r2tsn=6, offset=7, length=8
    ),
    p.AsyncMessage(
        lun=bytes(8),
        statsn=2,
        expcmdsn=3,
        maxcmdsn=4,
        event=1,
        vcode=0,
        param1=5,
        param2=6,
        param3=7,
    ),
    p.NopOut(
        immediate=True, lun=bytes(8), itt=1, ttt=p.RESERVED_TAG, cmdsn=2, expstatsn=3, data=b"ping"
    ),
    p.NopIn(lun=bytes(8), itt=p.RESERVED_TAG, ttt=9, statsn=2, expcmdsn=3, maxcmdsn=4),
    p.Reject(
        reason=p.RejectReason.DATA_DIGEST,
        statsn=1,
        expcmdsn=2,
        maxcmdsn=3,
        datasn=4,
        data=bytes(48),
    ),
]


def decode_all(
    data: bytes,
    header_digest: bool = False,
    data_digest: bool = False,
    limit: int = p.MAX_DATA_SEGMENT,
) -> list[p.Pdu]:
    decoder = p.Decoder(limit)
    decoder.header_digest, decoder.data_digest = header_digest, data_digest
    decoder.feed(data)
    out = []
    while (pdu := decoder.next_pdu()) is not None:
        out.append(pdu)
    assert decoder.buffered == 0
    return out


def test_every_pdu_type_is_covered() -> None:
    assert {type(s) for s in SAMPLES} == set(p.PDU_TYPES.values())


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("digests", [(False, False), (True, True)])
def test_round_trip(sample: p.Pdu, digests: tuple[bool, bool]) -> None:
    wire = p.encode_bytes(sample, *digests)
    length = len(sample.data)
    expected_len = 48 + 4 * digests[0] + length + p.pad4(length) + 4 * (digests[1] and length > 0)
    assert len(wire) == expected_len
    assert wire[0] & 0x3F == sample.OPCODE
    (decoded,) = decode_all(wire, *digests)
    assert decoded == sample


def test_extended_cdb_and_bidi_read_length_ahs() -> None:
    cmd = p.ScsiCommand(itt=1, cdb=bytes(range(32)), bidi_read_length=4096, read=True, write=True)
    wire = p.encode_bytes(cmd, header_digest=True)
    assert wire[4] == (20 + 8) // 4  # TotalAHSLength in words: 17+3 padded, 5+3
    (decoded,) = decode_all(wire, header_digest=True)
    assert decoded.cdb == bytes(range(32)) and decoded.bidi_read_length == 4096


@pytest.mark.parametrize("length", range(9))
def test_data_segment_padding(length: int) -> None:
    wire = p.encode_bytes(p.NopOut(itt=1, data=b"z" * length), data_digest=True)
    assert len(wire) % 4 == 0
    assert wire[48 + length : 48 + length + p.pad4(length)] == bytes(p.pad4(length))
    (decoded,) = decode_all(wire, data_digest=True)
    assert decoded.data == b"z" * length


def test_digest_is_crc32c_least_significant_byte_first() -> None:
    assert p.digest(b"123456789") == (0xE3069283).to_bytes(4, "little")


def test_byte_at_a_time_feeding() -> None:
    wire = b"".join(p.encode_bytes(s, True, True) for s in SAMPLES)
    decoder = p.Decoder(p.MAX_DATA_SEGMENT)
    decoder.header_digest = decoder.data_digest = True
    out = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        while (pdu := decoder.next_pdu()) is not None:
            out.append(pdu)
    assert out == SAMPLES


def test_header_digest_error_is_fatal() -> None:
    wire = bytearray(p.encode_bytes(SAMPLES[0], header_digest=True))
    wire[20] ^= 1
    decoder = p.Decoder()
    decoder.header_digest = True
    decoder.feed(wire)
    with pytest.raises(p.HeaderDigestError) as err:
        decoder.next_pdu()
    assert err.value.fatal
    with pytest.raises(p.HeaderDigestError):  # the stream stays broken
        decoder.next_pdu()


def test_data_digest_error_rejects_one_pdu() -> None:
    bad = bytearray(p.encode_bytes(SAMPLES[8], data_digest=True))
    bad[50] ^= 0xFF
    good = p.encode_bytes(SAMPLES[15], data_digest=True)
    decoder = p.Decoder(p.MAX_DATA_SEGMENT)
    decoder.data_digest = True
    decoder.feed(bytes(bad) + good)
    with pytest.raises(p.DataDigestError) as err:
        decoder.next_pdu()
    assert not err.value.fatal
    assert err.value.reason == p.RejectReason.DATA_DIGEST
    assert err.value.header == bytes(bad[:48])
    assert isinstance(err.value.pdu, p.DataOut) and err.value.pdu.itt == 5
    assert decoder.next_pdu() == SAMPLES[15]


def test_oversize_segment_is_skipped_without_buffering() -> None:
    big = p.encode_bytes(p.DataOut(itt=1, data=b"q" * 10000))
    small = p.encode_bytes(p.NopOut(itt=2, data=b"hi"))
    decoder = p.Decoder(8192)
    decoder.feed(big[:100])
    with pytest.raises(p.SegmentTooLong) as err:
        decoder.next_pdu()
    assert err.value.reason == p.RejectReason.PROTOCOL_ERROR and not err.value.fatal
    for i in range(100, len(big), 1000):  # the rest of the segment arrives in pieces
        decoder.feed(big[i : i + 1000])
        assert decoder.next_pdu() is None
        assert decoder.buffered == 0
    decoder.feed(small)
    assert decoder.next_pdu() == p.NopOut(itt=2, data=b"hi")


def test_unknown_opcode_and_bad_ahs_are_rejected_and_skipped() -> None:
    unknown = bytearray(p.encode_bytes(p.NopOut(itt=1, data=b"abc")))
    unknown[0] = 0x1C
    bad_ahs = bytearray(p.encode_bytes(p.ScsiCommand(itt=2, cdb=bytes(24))))
    bad_ahs[48:50] = (200).to_bytes(2, "big")  # AHSLength beyond TotalAHSLength
    decoder = p.Decoder()
    decoder.feed(bytes(unknown) + bytes(bad_ahs) + p.encode_bytes(SAMPLES[15]))
    with pytest.raises(p.PduError) as err:
        decoder.next_pdu()
    assert err.value.reason == p.RejectReason.COMMAND_NOT_SUPPORTED
    with pytest.raises(p.PduError) as err:
        decoder.next_pdu()
    assert err.value.reason == p.RejectReason.INVALID_PDU_FIELD
    assert decoder.next_pdu() == SAMPLES[15]


def test_lun_encoding() -> None:
    for lun in (0, 1, 255, 256, 0x3FFF):
        assert p.decode_lun(p.encode_lun(lun)) == lun
    assert p.encode_lun(5) == bytes((0, 5, 0, 0, 0, 0, 0, 0))
    assert p.decode_lun(bytes.fromhex("c000000000000000")) > 0xFFFF  # unsupported format


# ---------------------------------------------------------------------------- fuzzing


def _drain(decoder: p.Decoder) -> int:
    n = 0
    while True:
        try:
            pdu = decoder.next_pdu()
        except p.PduError as e:
            assert isinstance(e.reason, int)
            if e.fatal:
                return n
            continue
        if pdu is None:
            return n
        p.encode(pdu)  # whatever decodes also encodes
        n += 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans(), st.booleans(), st.integers(1, 200))
def test_decoder_survives_garbage(data: bytes, hd: bool, dd: bool, chunk: int) -> None:
    decoder = p.Decoder(512)
    decoder.header_digest, decoder.data_digest = hd, dd
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        _drain(decoder)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.booleans(),
)
def test_decoder_survives_mutated_pdus(
    sample: p.Pdu, edits: list[tuple[int, int]], digests: bool
) -> None:
    wire = bytearray(p.encode_bytes(sample, digests, digests) * 2)
    for pos, value in edits:
        if pos < len(wire):
            wire[pos] = value
    decoder = p.Decoder(64)
    decoder.header_digest = decoder.data_digest = digests
    decoder.feed(bytes(wire))
    _drain(decoder)


def test_fields_survive_replace() -> None:
    # Dataclass copies keep the opcode binding (used when the session echoes PDUs).
    cmd = dataclasses.replace(SAMPLES[0], itt=99)
    assert decode_all(p.encode_bytes(cmd))[0].itt == 99
