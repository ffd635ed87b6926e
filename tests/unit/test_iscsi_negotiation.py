"""Text keys: the key=value codec and each key's RFC 7143 result function."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from target.frontends.iscsi.negotiation import (
    IRRELEVANT,
    NOT_UNDERSTOOD,
    REJECT,
    Negotiation,
    TargetLimits,
    TextError,
    encode_text,
    parse_binary,
    parse_number,
    parse_text,
)


def test_text_round_trip() -> None:
    pairs = [("InitiatorName", "iqn.a:b"), ("HeaderDigest", "CRC32C,None"), ("X-x", "")]
    assert parse_text(encode_text(pairs)) == pairs
    assert parse_text(b"A=1\0\0\0B=2\0") == [("A", "1"), ("B", "2")]  # NUL padding
    assert parse_text(b"") == []


@pytest.mark.parametrize(
    "raw",
    [
        b"A=1",
        b"NoEquals\0",
        b"=value\0",
        b"K\xff=1\0",
        b"A b=1\0",
        b"K=\xc3\x28\0",
        b"K" * 64 + b"=1\0",
        b"K=" + b"v" * 8193 + b"\0",
    ],
)
def test_malformed_text(raw: bytes) -> None:
    with pytest.raises(TextError):
        parse_text(raw)


def test_numbers_and_binary_values() -> None:
    assert parse_number("8192") == 8192
    assert parse_number("0x2000") == 8192
    for bad in ("", "0x", "-1", "1e3", "12a", "0x" + "f" * 17, "٣"):
        with pytest.raises(ValueError):
            parse_number(bad)
    assert parse_binary("0x0aff") == b"\x0a\xff"
    assert parse_binary("0xaff") == b"\x0a\xff"
    assert parse_binary("0bAAE=") == b"\x00\x01"
    for bad in ("abc", "0xzz", "0b!!"):
        with pytest.raises(ValueError):
            parse_binary(bad)


LIMITS = TargetLimits(
    max_recv_data_segment_length=65536,
    max_burst_length=262144,
    first_burst_length=65536,
    initial_r2t=False,
    immediate_data=True,
    max_outstanding_r2t=8,
    default_time2wait=2,
    default_time2retain=20,
)


@pytest.mark.parametrize(
    ("key", "offer", "answer", "attr", "value"),
    [
        # list: first of the initiator's values we support
        ("HeaderDigest", "CRC32C,None", "CRC32C", "header_digest", True),
        ("HeaderDigest", "None,CRC32C", "None", "header_digest", False),
        ("DataDigest", "MD5,CRC32C", "CRC32C", "data_digest", True),
        ("DataDigest", "MD5", REJECT, "data_digest", False),
        # min
        ("MaxBurstLength", "1048576", "262144", "max_burst_length", 262144),
        ("MaxBurstLength", "16384", "16384", "max_burst_length", 16384),
        ("FirstBurstLength", "262144", "65536", "first_burst_length", 65536),
        ("FirstBurstLength", "4096", "4096", "first_burst_length", 4096),
        ("MaxOutstandingR2T", "1", "1", "max_outstanding_r2t", 1),
        ("MaxOutstandingR2T", "64", "8", "max_outstanding_r2t", 8),
        ("MaxConnections", "8", "1", "max_connections", 1),
        ("DefaultTime2Retain", "0", "0", "default_time2retain", 0),
        ("DefaultTime2Retain", "3600", "20", "default_time2retain", 20),
        ("ErrorRecoveryLevel", "2", "0", "error_recovery_level", 0),
        # max
        ("DefaultTime2Wait", "0", "2", "default_time2wait", 2),
        ("DefaultTime2Wait", "10", "10", "default_time2wait", 10),
        # OR
        ("InitialR2T", "Yes", "Yes", "initial_r2t", True),
        ("InitialR2T", "No", "No", "initial_r2t", False),
        ("DataPDUInOrder", "No", "Yes", "data_pdu_in_order", True),
        ("DataSequenceInOrder", "No", "Yes", "data_sequence_in_order", True),
        # AND
        ("ImmediateData", "Yes", "Yes", "immediate_data", True),
        ("ImmediateData", "No", "No", "immediate_data", False),
        # declarative: no answer, each direction kept apart
        ("MaxRecvDataSegmentLength", "262144", None, "initiator_recv_length", 262144),
        ("MaxRecvDataSegmentLength", "0x1000", None, "initiator_recv_length", 4096),
        # illegal values
        ("MaxRecvDataSegmentLength", "511", REJECT, "initiator_recv_length", 8192),
        ("MaxRecvDataSegmentLength", "16777216", REJECT, "initiator_recv_length", 8192),
        ("MaxBurstLength", "100", REJECT, "max_burst_length", 262144),
        ("MaxBurstLength", "lots", REJECT, "max_burst_length", 262144),
        ("ErrorRecoveryLevel", "3", REJECT, "error_recovery_level", 0),
        ("DefaultTime2Wait", "3601", REJECT, "default_time2wait", 2),
        ("MaxConnections", "0", REJECT, "max_connections", 1),
        ("InitialR2T", "yes", REJECT, "initial_r2t", True),
    ],
)
def test_result_functions(
    key: str, offer: str, answer: str | None, attr: str, value: object
) -> None:
    n = Negotiation(LIMITS)
    assert n.answer(key, offer) == answer
    assert getattr(n.params, attr) == value


def test_unknown_and_extension_keys_are_not_understood() -> None:
    n = Negotiation(LIMITS)
    assert n.answer("X-com.example.Fancy", "1") == NOT_UNDERSTOOD
    assert n.answer("X#foo", "1") == NOT_UNDERSTOOD
    assert n.answer("Colour", "blue") == NOT_UNDERSTOOD


def test_markers_are_off() -> None:
    n = Negotiation(LIMITS)
    assert n.answer("IFMarker", "Yes") == "No"
    assert n.answer("OFMarker", "No") == "No"
    assert n.answer("OFMarkInt", "2048") == IRRELEVANT


def test_session_keys_are_irrelevant_in_discovery() -> None:
    n = Negotiation(LIMITS, discovery=True)
    assert n.answer("MaxBurstLength", "1024") == IRRELEVANT
    assert n.answer("InitialR2T", "No") == IRRELEVANT
    assert n.answer("HeaderDigest", "None") == "None"
    assert n.answer("ErrorRecoveryLevel", "0") == "0"


def test_answers_to_nothing_are_ignored() -> None:
    assert Negotiation(LIMITS).answer("MaxBurstLength", NOT_UNDERSTOOD) is None


def test_declaration_and_first_burst_capped_by_max_burst() -> None:
    n = Negotiation(LIMITS)
    assert n.declare_recv_length() == ("MaxRecvDataSegmentLength", "65536")
    n.answer("MaxBurstLength", "16384")
    n.answer("FirstBurstLength", "65536")
    params = n.finish()
    assert params.target_recv_length == 65536
    assert params.first_burst_length == 16384


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_text_parser_only_raises_text_errors(raw: bytes) -> None:
    try:
        pairs = parse_text(raw)
    except TextError:
        return
    assert parse_text(encode_text(pairs)) == pairs


KEYS = ["HeaderDigest", "DataDigest", "MaxRecvDataSegmentLength", "MaxBurstLength",
        "FirstBurstLength", "InitialR2T", "ImmediateData", "MaxOutstandingR2T", "MaxConnections",
        "DefaultTime2Wait", "DefaultTime2Retain", "ErrorRecoveryLevel", "DataPDUInOrder",
        "DataSequenceInOrder", "IFMarker", "OFMarkInt", "X-y", "Nope"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=30)), max_size=10),
       st.booleans())  # fmt: skip
def test_any_offer_gets_an_answer_and_sane_parameters(
    offers: list[tuple[str, str]], discovery: bool
) -> None:
    n = Negotiation(LIMITS, discovery=discovery)
    for key, value in offers:
        answer = n.answer(key, value)
        assert answer is None or isinstance(answer, str)
    params = n.finish()
    assert 512 <= params.initiator_recv_length < 1 << 24
    assert params.first_burst_length <= params.max_burst_length
    assert params.error_recovery_level == 0 and params.max_connections == 1
