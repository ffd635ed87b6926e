"""The replica wire codec: round trips, validation, and random/malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replica import protocol as p
from replica.protocol import Op, Status


def test_request_round_trip_in_pieces() -> None:
    wire = p.encode_request(Op.WRITE, 7, 4096, 5, p.FLAG_FUA, b"hello") + p.encode_request(
        Op.READ, 8, 0, 512
    )
    dec = p.RequestDecoder()
    out = []
    for i in range(len(wire)):  # one byte at a time: framing must not depend on chunking
        dec.feed(wire[i : i + 1])
        while (r := dec.next()) is not None:
            out.append(r)
    assert [(r.op, r.tag, r.offset, r.length, r.flags, r.payload) for r in out] == [
        (Op.WRITE, 7, 4096, 5, p.FLAG_FUA, b"hello"),
        (Op.READ, 8, 0, 512, 0, b""),
    ]


def test_response_round_trip() -> None:
    dec = p.ResponseDecoder()
    dec.feed(p.encode_response(3, 0, b"data") + p.encode_error(4, Status.EIO, "disk on fire"))
    a, b = dec.next(), dec.next()
    assert a is not None and (a.tag, a.status, a.payload) == (3, 0, b"data")
    assert b is not None and (b.tag, b.status, b.message) == (4, Status.EIO, "disk on fire")
    assert dec.next() is None


def test_bad_magic_is_a_protocol_error() -> None:
    dec = p.RequestDecoder()
    dec.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 16)
    with pytest.raises(p.ProtocolError, match="magic"):
        dec.next()


def test_oversize_payload_is_refused_before_buffering() -> None:
    dec = p.RequestDecoder()
    dec.feed(p.REQ.pack(p.REQ_MAGIC, Op.WRITE, 0, 0, 1, 0, 1 << 30, 1 << 30))
    with pytest.raises(p.ProtocolError, match="exceeds"):
        dec.next()


@pytest.mark.parametrize(
    ("req", "status"),
    [
        (p.Request(99, 1), Status.ENOTSUP),
        (p.Request(Op.READ, 1, offset=1 << 20, length=4096), Status.EINVAL),
        (p.Request(Op.READ, 1, flags=0x80), Status.EINVAL),
        (p.Request(Op.WRITE, 1, length=10, payload=b"short"), Status.EINVAL),
        (p.Request(Op.OPEN, 1, payload=b"{not json"), Status.EINVAL),
        (p.Request(Op.OPEN, 1, payload=b"[1]"), Status.EINVAL),
        # shared memory is the native engine's: the Python server refuses it clearly
        (p.Request(Op.SHARE, 1, length=1 << 20, payload=b"\x03\0\0\0"), Status.ENOTSUP),
        (p.Request(Op.READ, 1, length=4096, flags=p.FLAG_SHM, payload=bytes(8)), Status.EINVAL),
    ],
)
def test_validate_refuses(req: p.Request, status: int) -> None:
    refusal = p.validate(req, 1 << 20)
    assert refusal is not None and refusal[0] == status


def _readv(
    ranges: list[tuple[int, int]], length: int | None = None, extra: bytes = b""
) -> p.Request:
    total = sum(n for _, n in ranges) if length is None else length
    return p.Request(Op.READV, 1, length=total, payload=p.encode_ranges(ranges) + extra)


@pytest.mark.parametrize(
    ("req", "why"),
    [
        (_readv([]), "1 to 1024 entries"),
        (_readv([(0, 4096)], extra=b"x"), "1 to 1024 entries"),
        (_readv([(0, 1)] * (p.READV_MAX_RANGES + 1)), "1 to 1024 entries"),
        (_readv([(0, 0)]), "zero length"),
        (p.Request(Op.READV, 1, length=1, payload=p.READV_ENTRY.pack(0, 1, 7)), "reserved"),
        (_readv([(4096, 1 << 20)]), "beyond size"),
        (_readv([(0, 10), (20, 10)], length=30), "not the sum"),
        (_readv([(0, 4096)], length=p.MAX_PAYLOAD + 1), "exceeds the limit"),
    ],
)
def test_validate_refuses_bad_readv(req: p.Request, why: str) -> None:
    refusal = p.validate(req, 1 << 20)
    assert refusal is not None and refusal[0] == Status.EINVAL and why in refusal[1]


def test_readv_ranges_round_trip() -> None:
    ranges = [(0, 1), (4096, 4096), (12345, 678), (0, 1)]  # overlapping is allowed
    req = _readv(ranges)
    assert p.validate(req, 1 << 20) is None
    assert p.decode_ranges(req.payload, req.length, 1 << 20) == ranges


def test_validate_accepts_in_range() -> None:
    assert p.validate(p.Request(Op.READ, 1, offset=4096, length=4096), 8192) is None
    assert p.validate(p.Request(Op.OPEN, 1, payload=b'{"epoch": 3}'), 8192) is None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=12))
def test_random_bytes_give_requests_or_a_protocol_error(chunks: list[bytes]) -> None:
    dec = p.RequestDecoder()
    try:
        for c in chunks:
            dec.feed(c)
            while (r := dec.next()) is not None:
                p.validate(r, 1 << 30)  # must not raise either
    except p.ProtocolError:
        pass
    assert len(dec._buf) <= sum(map(len, chunks))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
)
def test_well_framed_mutations_validate_cleanly(
    op: int, flags: int, tag: int, offset: int, length: int, payload: bytes
) -> None:
    dec = p.RequestDecoder()
    dec.feed(p.encode_request(op, tag, offset, length, flags, payload))
    req = dec.next()
    assert req is not None and req.tag == tag
    refusal = p.validate(req, 1 << 30)
    if refusal is None:
        assert Op(op) is not None
        if op in (Op.READ, Op.WRITE, Op.UNMAP, Op.WRITE_ZEROES):
            assert offset + length <= 1 << 30


def test_header_layout_is_stable() -> None:
    # The C engine reads these offsets directly: a change here is a wire format change.
    assert p.REQ.size == 32 and p.RESP.size == 24
    raw = p.encode_request(Op.READ, 0x0102030405060708, 0x10, 0x20)
    assert struct.unpack_from("<Q", raw, 8)[0] == 0x0102030405060708
    assert raw[:4] == b"TNDQ"
    assert p.encode_response(1)[:4] == b"TNDR"
