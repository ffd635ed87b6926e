"""Unit tests of the sans-IO NBD codec: handshake, commands, replies, and fuzzing.

Replies are decoded here with literal layouts and magic numbers from the NBD protocol
document (not with the codec's own structs), so a wrong constant fails a test.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from target.blockdev import STATE_HOLE, STATE_ZERO, Extent
from target.frontends.nbd import protocol as p
from target.frontends.nbd.protocol import (
    Command,
    Disconnect,
    InvalidCommand,
    OptionRequest,
    ProtocolError,
    ServerCodec,
    State,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
    encode_request,
)

SIZE = 1 << 20
MiB = 1 << 20


# -- helpers: a minimal client side ---------------------------------------------------------


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) for each option reply in `data`; must consume it all."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == 0x3E889045565A9
        pos += 20
        out.append((opt, rtype, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def parse_simple(data: bytes) -> tuple[int, int, bytes]:
    magic, error, handle = struct.unpack_from(">IIQ", data)
    assert magic == 0x67446698
    return error, handle, data[16:]


def parse_chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, handle, payload) for each structured chunk in `data`."""
    out = []
    pos = 0
    while pos < len(data):
        magic, flags, ctype, handle, length = struct.unpack_from(">IHHQI", data, pos)
        assert magic == 0x668E33EF
        pos += 20
        out.append((flags, ctype, handle, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def new_codec(client_flags: int = 3, **kw: object) -> ServerCodec:
    codec = ServerCodec("vol", kw.pop("description", "test volume"), **kw)  # type: ignore[arg-type]
    codec.feed(struct.pack(">I", client_flags))
    assert codec.next_event() is None
    assert codec.state is State.OPTIONS
    return codec


def option(
    codec: ServerCodec, opt: int, data: bytes = b"", size: int = SIZE, readonly: bool = False
) -> bytes:
    codec.feed(encode_option(opt, data))
    ev = codec.next_event()
    assert isinstance(ev, OptionRequest)
    assert ev.option == opt
    return codec.answer_option(ev, size=size, readonly=readonly)


def transmission(
    structured: bool = True, meta: bool = True, readonly: bool = False, size: int = SIZE
) -> ServerCodec:
    codec = new_codec()
    if structured:
        assert parse_option_replies(option(codec, p.NBD_OPT_STRUCTURED_REPLY))[-1][1] == 1
    if meta:
        data = encode_meta_context_request("vol", ["base:allocation"])
        option(codec, p.NBD_OPT_SET_META_CONTEXT, data)
        assert codec.meta_context
    replies = parse_option_replies(
        option(codec, p.NBD_OPT_GO, encode_info_request("vol"), size=size, readonly=readonly)
    )
    assert replies[-1][1] == 1  # ACK
    assert codec.state is State.TRANSMISSION
    return codec


def events(codec: ServerCodec, data: bytes) -> list[object]:
    codec.feed(data)
    out = []
    while (ev := codec.next_event()) is not None:
        out.append(ev)
    return out


def one_event(codec: ServerCodec, data: bytes) -> object:
    evs = events(codec, data)
    assert len(evs) == 1, evs
    return evs[0]


# -- constants against the protocol document ------------------------------------------------


def test_constants_match_the_protocol_document() -> None:
    assert p.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert p.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    expected = {
        "NBD_OPT_EXPORT_NAME": 1, "NBD_OPT_ABORT": 2, "NBD_OPT_LIST": 3,
        "NBD_OPT_STARTTLS": 5, "NBD_OPT_INFO": 6, "NBD_OPT_GO": 7,
        "NBD_OPT_STRUCTURED_REPLY": 8, "NBD_OPT_LIST_META_CONTEXT": 9,
        "NBD_OPT_SET_META_CONTEXT": 10, "NBD_REP_ACK": 1, "NBD_REP_SERVER": 2,
        "NBD_REP_INFO": 3, "NBD_REP_META_CONTEXT": 4, "NBD_REP_ERR_UNSUP": 2**31 + 1,
        "NBD_REP_ERR_POLICY": 2**31 + 2, "NBD_REP_ERR_INVALID": 2**31 + 3,
        "NBD_REP_ERR_UNKNOWN": 2**31 + 6, "NBD_REP_ERR_TOO_BIG": 2**31 + 9,
        "NBD_FLAG_HAS_FLAGS": 1, "NBD_FLAG_READ_ONLY": 2, "NBD_FLAG_SEND_FLUSH": 4,
        "NBD_FLAG_SEND_FUA": 8, "NBD_FLAG_SEND_TRIM": 32, "NBD_FLAG_SEND_WRITE_ZEROES": 64,
        "NBD_FLAG_SEND_DF": 128, "NBD_FLAG_CAN_MULTI_CONN": 256, "NBD_FLAG_SEND_CACHE": 1024,
        "NBD_FLAG_SEND_FAST_ZERO": 2048, "NBD_CMD_READ": 0, "NBD_CMD_WRITE": 1,
        "NBD_CMD_DISC": 2, "NBD_CMD_FLUSH": 3, "NBD_CMD_TRIM": 4, "NBD_CMD_CACHE": 5,
        "NBD_CMD_WRITE_ZEROES": 6, "NBD_CMD_BLOCK_STATUS": 7, "NBD_CMD_FLAG_FUA": 1,
        "NBD_CMD_FLAG_NO_HOLE": 2, "NBD_CMD_FLAG_DF": 4, "NBD_CMD_FLAG_REQ_ONE": 8,
        "NBD_CMD_FLAG_FAST_ZERO": 16, "NBD_REPLY_TYPE_NONE": 0, "NBD_REPLY_TYPE_OFFSET_DATA": 1,
        "NBD_REPLY_TYPE_OFFSET_HOLE": 2, "NBD_REPLY_TYPE_BLOCK_STATUS": 5,
        "NBD_REPLY_TYPE_ERROR": 32769, "NBD_EPERM": 1, "NBD_EIO": 5, "NBD_EINVAL": 22,
        "NBD_ENOSPC": 28, "NBD_ENOTSUP": 95, "NBD_ESHUTDOWN": 108,
        "NBD_INFO_EXPORT": 0, "NBD_INFO_NAME": 1, "NBD_INFO_DESCRIPTION": 2,
        "NBD_INFO_BLOCK_SIZE": 3,
    }  # fmt: skip
    assert {name: getattr(p, name) for name in expected} == expected


# -- handshake ------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    assert ServerCodec("vol").greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    codec = ServerCodec("vol")
    codec.feed(struct.pack(">I", flags))
    with pytest.raises(ProtocolError):
        codec.next_event()
    assert codec.state is State.ERROR
    codec.feed(encode_option(p.NBD_OPT_LIST))  # ignored from now on
    with pytest.raises(ProtocolError):
        codec.next_event()
    assert codec.buffered == 0


def test_client_flags_arrive_byte_by_byte() -> None:
    codec = ServerCodec("vol")
    for byte in b"\x00\x00\x00":
        codec.feed(bytes([byte]))
        assert codec.next_event() is None
        assert codec.state is State.CLIENT_FLAGS
    codec.feed(b"\x01")
    assert codec.next_event() is None
    assert codec.state is State.OPTIONS


@pytest.mark.parametrize("name", ["vol", ""])
@pytest.mark.parametrize("client_flags", [0, 1, 3])
def test_export_name_enters_transmission(name: str, client_flags: int) -> None:
    codec = new_codec(client_flags)
    out = option(codec, p.NBD_OPT_EXPORT_NAME, name.encode(), size=12345)
    size, flags = struct.unpack_from(">QH", out)
    assert size == 12345
    # The 124 zero bytes are left out only when the client set NBD_FLAG_C_NO_ZEROES.
    assert out[10:] == (b"" if client_flags & 2 else bytes(124))
    assert flags == 1 | 4 | 8 | 32 | 64 | 256 | 1024 | 2048
    assert codec.state is State.TRANSMISSION
    assert codec.size == 12345


def test_export_name_unknown_terminates_the_session() -> None:
    codec = new_codec()
    assert option(codec, p.NBD_OPT_EXPORT_NAME, b"other") == b""
    ev = codec.next_event()
    assert isinstance(ev, Disconnect) and not ev.soft
    assert codec.next_event() is None
    codec.feed(b"more bytes")
    assert codec.buffered == 0


def test_export_name_invalid_utf8_terminates_the_session() -> None:
    codec = new_codec()
    assert option(codec, p.NBD_OPT_EXPORT_NAME, b"\xff\xfe") == b""
    assert isinstance(codec.next_event(), Disconnect)


def test_abort_is_acknowledged_and_ends_the_session() -> None:
    codec = new_codec()
    out = option(codec, p.NBD_OPT_ABORT, b"ignored data")
    assert parse_option_replies(out) == [(2, 1, b"")]
    ev = codec.next_event()
    assert isinstance(ev, Disconnect) and ev.soft
    assert codec.state is State.CLOSED


def test_list_returns_the_export_with_its_description() -> None:
    codec = new_codec()
    replies = parse_option_replies(option(codec, p.NBD_OPT_LIST))
    assert [r[:2] for r in replies] == [(3, 2), (3, 1)]
    entry = replies[0][2]
    (n,) = struct.unpack_from(">I", entry)
    assert entry[4 : 4 + n] == b"vol"
    assert entry[4 + n :] == b"test volume"
    assert codec.state is State.OPTIONS


def test_list_with_data_is_invalid() -> None:
    codec = new_codec()
    assert parse_option_replies(option(codec, p.NBD_OPT_LIST, b"x"))[0][1] == 2**31 + 3


def test_starttls_is_refused_by_policy() -> None:
    codec = new_codec()
    [(opt, rtype, msg)] = parse_option_replies(option(codec, p.NBD_OPT_STARTTLS))
    assert (opt, rtype) == (5, 2**31 + 2)
    assert b"TLS" in msg
    [(_, rtype, _)] = parse_option_replies(option(codec, p.NBD_OPT_STARTTLS, b"x"))
    assert rtype == 2**31 + 3
    assert codec.state is State.OPTIONS


def info_items(replies: list[tuple[int, int, bytes]]) -> dict[int, bytes]:
    items = {}
    for _, rtype, payload in replies:
        if rtype == 3:
            (kind,) = struct.unpack_from(">H", payload)
            assert kind not in items
            items[kind] = payload[2:]
    return items


def test_info_reports_export_block_size_name_and_description() -> None:
    codec = new_codec()
    data = encode_info_request("", [p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION, 999])
    replies = parse_option_replies(option(codec, p.NBD_OPT_INFO, data, size=5 * MiB))
    assert replies[-1][:2] == (6, 1)
    items = info_items(replies)
    assert struct.unpack(">QH", items[0]) == (5 * MiB, 1 | 4 | 8 | 32 | 64 | 256 | 1024 | 2048)
    assert struct.unpack(">III", items[3]) == (1, 4096, 32 * MiB)
    assert items[1] == b"vol"
    assert items[2] == b"test volume"
    assert set(items) == {0, 1, 2, 3}
    assert codec.state is State.OPTIONS  # INFO does not start transmission


def test_info_without_requests_omits_name_and_description() -> None:
    codec = new_codec()
    replies = parse_option_replies(option(codec, p.NBD_OPT_INFO, encode_info_request("vol")))
    assert set(info_items(replies)) == {0, 3}


def test_info_read_only_and_single_connection_flags() -> None:
    codec = new_codec(multi_conn=False)
    replies = parse_option_replies(
        option(codec, p.NBD_OPT_INFO, encode_info_request("vol"), readonly=True)
    )
    _, flags = struct.unpack(">QH", info_items(replies)[0])
    assert flags & 2  # READ_ONLY
    assert not flags & 256  # CAN_MULTI_CONN
    assert not flags & (32 | 64 | 2048)  # no TRIM / WRITE_ZEROES / FAST_ZERO when read-only
    assert flags & (1 | 4 | 8)


def test_info_unknown_export() -> None:
    codec = new_codec()
    replies = parse_option_replies(option(codec, p.NBD_OPT_INFO, encode_info_request("nope")))
    assert len(replies) == 1
    assert replies[0][1] == 2**31 + 6


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 10) + b"vol" + b"\x00\x00",  # name length beyond the data
        encode_info_request("vol")[:-1],  # missing the request count
        encode_info_request("vol", [1])[:-1],  # truncated request list
        encode_info_request("vol") + b"\x00",  # trailing byte
        struct.pack(">I", 2) + b"\xff\xff" + b"\x00\x00",  # not UTF-8
        struct.pack(">I", 1) + b"\x00" + b"\x00\x00",  # NUL in the name
    ],
)
def test_info_and_go_malformed_are_invalid(data: bytes) -> None:
    for opt in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
        codec = new_codec()
        replies = parse_option_replies(option(codec, opt, data))
        assert [r[:2] for r in replies] == [(opt, 2**31 + 3)]
        assert codec.state is State.OPTIONS


def test_go_enters_transmission_and_takes_pipelined_requests() -> None:
    codec = new_codec()
    codec.feed(encode_option(p.NBD_OPT_GO, encode_info_request("vol")))
    codec.feed(encode_request(p.NBD_CMD_READ, 7, 0, 512))  # sent before the reply arrived
    ev = codec.next_event()
    assert isinstance(ev, OptionRequest)
    with pytest.raises(RuntimeError):
        codec.next_event()  # the option must be answered first
    out = codec.answer_option(ev, size=SIZE, readonly=False)
    assert parse_option_replies(out)[-1][:2] == (7, 1)
    assert not out.endswith(bytes(124))
    assert codec.state is State.TRANSMISSION
    assert codec.next_event() == Command(7, p.NBD_CMD_READ, 0, 0, 512)


def test_go_unknown_export_stays_in_options() -> None:
    codec = new_codec()
    replies = parse_option_replies(option(codec, p.NBD_OPT_GO, encode_info_request("x")))
    assert replies == [(7, 2**31 + 6, replies[0][2])]
    assert codec.state is State.OPTIONS


def test_structured_reply_negotiation_adds_df() -> None:
    codec = new_codec()
    assert parse_option_replies(option(codec, p.NBD_OPT_STRUCTURED_REPLY)) == [(8, 1, b"")]
    assert codec.structured
    replies = parse_option_replies(option(codec, p.NBD_OPT_INFO, encode_info_request("vol")))
    _, flags = struct.unpack(">QH", info_items(replies)[0])
    assert flags & 128  # SEND_DF only with structured replies


def test_structured_reply_with_data_is_invalid() -> None:
    codec = new_codec()
    assert parse_option_replies(option(codec, p.NBD_OPT_STRUCTURED_REPLY, b"x"))[0][1] == (
        2**31 + 3
    )
    assert not codec.structured


def meta(codec: ServerCodec, opt: int, queries: list[str], name: str = "vol") -> list[tuple]:
    return parse_option_replies(option(codec, opt, encode_meta_context_request(name, queries)))


def test_set_meta_context_needs_structured_replies() -> None:
    codec = new_codec()
    assert meta(codec, p.NBD_OPT_SET_META_CONTEXT, ["base:allocation"])[0][1] == 2**31 + 3
    assert not codec.meta_context


def test_set_meta_context_selects_base_allocation_only() -> None:
    codec = new_codec()
    option(codec, p.NBD_OPT_STRUCTURED_REPLY)
    replies = meta(
        codec, p.NBD_OPT_SET_META_CONTEXT, ["qemu:dirty-bitmap:x", "base:allocation", "base:"]
    )
    assert [r[:2] for r in replies] == [(10, 4), (10, 1)]
    context_id, name = struct.unpack(">I", replies[0][2][:4])[0], replies[0][2][4:]
    assert name == b"base:allocation"
    assert context_id != 0
    assert codec.meta_context
    # A later SET replaces the selection: "base:" alone selects nothing.
    assert [r[:2] for r in meta(codec, p.NBD_OPT_SET_META_CONTEXT, ["base:"])] == [(10, 1)]
    assert not codec.meta_context


def test_set_meta_context_failure_clears_selection() -> None:
    codec = new_codec()
    option(codec, p.NBD_OPT_STRUCTURED_REPLY)
    meta(codec, p.NBD_OPT_SET_META_CONTEXT, ["base:allocation"])
    assert codec.meta_context
    assert meta(codec, p.NBD_OPT_SET_META_CONTEXT, ["base:allocation"], "nope")[0][1] == (2**31 + 6)
    assert not codec.meta_context


@pytest.mark.parametrize(
    ("queries", "found"),
    [([], True), (["base:"], True), (["base:allocation"], True), (["x-foo:bar"], False)],
)
def test_list_meta_context(queries: list[str], found: bool) -> None:
    codec = new_codec()
    option(codec, p.NBD_OPT_STRUCTURED_REPLY)
    replies = meta(codec, p.NBD_OPT_LIST_META_CONTEXT, queries)
    expected = [(9, 4, struct.pack(">I", 0) + b"base:allocation")] if found else []
    assert replies == [*expected, (9, 1, b"")]
    assert not codec.meta_context  # listing selects nothing


@pytest.mark.parametrize(
    "data",
    [
        b"",
        encode_meta_context_request("vol", ["base:allocation"])[:-1],
        encode_meta_context_request("vol", []) + b"x",
        struct.pack(">I", 3) + b"vol" + struct.pack(">I", 2) + struct.pack(">I", 1) + b"a",
    ],
)
def test_meta_context_malformed_is_invalid(data: bytes) -> None:
    codec = new_codec()
    option(codec, p.NBD_OPT_STRUCTURED_REPLY)
    for opt in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT):
        assert parse_option_replies(option(codec, opt, data))[0][1] == 2**31 + 3


@pytest.mark.parametrize("opt", [4, 9999, 11, 0])
def test_unknown_options_are_unsupported(opt: int) -> None:
    codec = new_codec()
    replies = parse_option_replies(option(codec, opt, b"some data"))
    assert [r[:2] for r in replies] == [(opt, 2**31 + 1)]
    assert codec.state is State.OPTIONS


def test_oversize_option_is_discarded_without_buffering() -> None:
    codec = new_codec()
    length = p.MAX_OPTION_DATA + 1000
    codec.feed(struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_LIST, length))
    chunk = b"\xaa" * 4096
    sent = 0
    while sent + len(chunk) < length:
        codec.feed(chunk)
        sent += len(chunk)
        assert codec.next_event() is None
        assert codec.buffered <= len(chunk)
    codec.feed(b"\xaa" * (length - sent) + encode_option(p.NBD_OPT_LIST))
    ev = codec.next_event()
    assert ev == OptionRequest(p.NBD_OPT_LIST, length, b"")
    [(_, rtype, _)] = parse_option_replies(codec.answer_option(ev, size=SIZE, readonly=False))
    assert rtype == 2**31 + 9  # TOO_BIG
    # The stream is still in sync: the next option is parsed normally.
    ev = codec.next_event()
    assert ev == OptionRequest(p.NBD_OPT_LIST, 0, b"")


def test_oversize_export_name_terminates() -> None:
    codec = new_codec()
    codec.feed(encode_option(p.NBD_OPT_EXPORT_NAME, b"v" * (p.MAX_OPTION_DATA + 1)))
    ev = codec.next_event()
    assert isinstance(ev, OptionRequest)
    assert codec.answer_option(ev, size=SIZE, readonly=False) == b""
    assert isinstance(codec.next_event(), Disconnect)


def test_bad_option_magic_is_fatal() -> None:
    codec = new_codec()
    codec.feed(struct.pack(">QII", 0x1234, p.NBD_OPT_LIST, 0))
    with pytest.raises(ProtocolError):
        codec.next_event()


def test_answer_option_rejects_a_stale_request() -> None:
    codec = new_codec()
    with pytest.raises(RuntimeError):
        codec.answer_option(OptionRequest(3, 0, b""), size=SIZE, readonly=False)


# -- transmission: request decoding ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length"),
    [
        (p.NBD_CMD_READ, 0, 0, 4096),
        (p.NBD_CMD_READ, p.NBD_CMD_FLAG_DF | p.NBD_CMD_FLAG_FUA, 100, 1),
        (p.NBD_CMD_READ, 0, SIZE - 1, 1),
        (p.NBD_CMD_READ, 0, 0, 0),
        (p.NBD_CMD_FLUSH, 0, 0, 0),
        (p.NBD_CMD_FLUSH, p.NBD_CMD_FLAG_FUA, 0, 0),
        (p.NBD_CMD_TRIM, p.NBD_CMD_FLAG_FUA, 4096, 8192),
        (p.NBD_CMD_CACHE, 0, 0, SIZE),
        (p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_FLAG_NO_HOLE | p.NBD_CMD_FLAG_FAST_ZERO, 0, SIZE),
        (p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_FLAG_FUA, 1, 2),
        (p.NBD_CMD_BLOCK_STATUS, p.NBD_CMD_FLAG_REQ_ONE, 0, SIZE),
        (p.NBD_CMD_BLOCK_STATUS, 0, 512, SIZE - 512),
    ],
)
def test_commands_decode(cmd: int, flags: int, offset: int, length: int) -> None:
    codec = transmission()
    ev = one_event(codec, encode_request(cmd, 0xDEADBEEFCAFEF00D, offset, length, flags))
    assert ev == Command(0xDEADBEEFCAFEF00D, cmd, flags, offset, length, b"")


def test_request_wire_layout() -> None:
    raw = encode_request(p.NBD_CMD_READ, 0x0102030405060708, 0x1112131415161718, 0x21222324, 5)
    assert raw.hex() == "25609513000500000102030405060708111213141516171821222324"


def test_write_payload_split_across_feeds() -> None:
    codec = transmission()
    payload = bytes(range(256)) * 40
    raw = encode_request(p.NBD_CMD_WRITE, 5, 100, len(payload), p.NBD_CMD_FLAG_FUA, payload)
    for i in range(len(raw) - 1):
        codec.feed(raw[i : i + 1])
        assert codec.next_event() is None
    ev = one_event(codec, raw[-1:])
    assert ev == Command(5, p.NBD_CMD_WRITE, 1, 100, len(payload), payload)
    assert isinstance(ev, Command) and ev.fua
    assert codec.buffered == 0


def test_many_requests_in_one_feed() -> None:
    codec = transmission()
    raw = b"".join(
        encode_request(p.NBD_CMD_WRITE, i, i * 10, 3, 0, b"abc") + encode_request(0, i, 0, 9)
        for i in range(100)
    )
    evs = events(codec, raw)
    assert len(evs) == 200
    assert all(isinstance(e, Command) for e in evs)
    assert codec.buffered == 0


def test_disconnect_ends_parsing() -> None:
    codec = transmission()
    evs = events(codec, encode_request(p.NBD_CMD_DISC, 1) + b"garbage after disc")
    assert len(evs) == 1
    assert isinstance(evs[0], Disconnect) and evs[0].soft
    assert codec.buffered == 0


def test_bad_request_magic_is_fatal() -> None:
    codec = transmission()
    raw = bytearray(encode_request(p.NBD_CMD_READ, 1, 0, 512))
    raw[0] ^= 0xFF
    codec.feed(bytes(raw))
    with pytest.raises(ProtocolError):
        codec.next_event()


def invalid(codec: ServerCodec, raw: bytes) -> InvalidCommand:
    ev = one_event(codec, raw)
    assert isinstance(ev, InvalidCommand), ev
    return ev


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (p.NBD_CMD_READ, 0x20),  # unknown flag bits
        (p.NBD_CMD_READ, 0x8000),
        (p.NBD_CMD_WRITE, 0x40),
        (p.NBD_CMD_READ, p.NBD_CMD_FLAG_REQ_ONE),  # flags on the wrong command
        (p.NBD_CMD_READ, p.NBD_CMD_FLAG_NO_HOLE),
        (p.NBD_CMD_WRITE, p.NBD_CMD_FLAG_DF),
        (p.NBD_CMD_WRITE, p.NBD_CMD_FLAG_NO_HOLE),
        (p.NBD_CMD_TRIM, p.NBD_CMD_FLAG_FAST_ZERO),
        (p.NBD_CMD_FLUSH, p.NBD_CMD_FLAG_NO_HOLE),
        (p.NBD_CMD_CACHE, p.NBD_CMD_FLAG_DF),
        (p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_FLAG_REQ_ONE),
        (p.NBD_CMD_BLOCK_STATUS, p.NBD_CMD_FLAG_DF),
        (p.NBD_CMD_BLOCK_STATUS, p.NBD_CMD_FLAG_FAST_ZERO),
    ],
)
def test_invalid_flags_get_einval(cmd: int, flags: int) -> None:
    codec = transmission()
    data = b"x" * 16 if cmd == p.NBD_CMD_WRITE else b""
    ev = invalid(codec, encode_request(cmd, 9, 0, 16 if cmd != 3 else 0, flags, data))
    assert (ev.handle, ev.error) == (9, p.NBD_EINVAL)
    # The payload of a refused write was consumed: the next request decodes.
    assert isinstance(one_event(codec, encode_request(p.NBD_CMD_READ, 10, 0, 1)), Command)


def test_df_needs_structured_replies() -> None:
    codec = transmission(structured=False, meta=False)
    ev = invalid(codec, encode_request(p.NBD_CMD_READ, 1, 0, 512, p.NBD_CMD_FLAG_DF))
    assert ev.error == p.NBD_EINVAL


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "error"),
    [
        (p.NBD_CMD_READ, SIZE, 1, p.NBD_EINVAL),
        (p.NBD_CMD_READ, SIZE - 1, 2, p.NBD_EINVAL),
        (p.NBD_CMD_READ, 2**64 - 1, 0xFFFFFFFF, p.NBD_EINVAL),
        (p.NBD_CMD_READ, 0, p.MAX_BLOCK_SIZE + 1, p.NBD_EINVAL),
        (p.NBD_CMD_CACHE, 0, p.MAX_BLOCK_SIZE + 1, p.NBD_EINVAL),
        (p.NBD_CMD_CACHE, SIZE, 1, p.NBD_EINVAL),
        (p.NBD_CMD_TRIM, SIZE - 4096, 8192, p.NBD_EINVAL),
        (p.NBD_CMD_WRITE_ZEROES, SIZE, 1, p.NBD_ENOSPC),
        (p.NBD_CMD_BLOCK_STATUS, SIZE, 1, p.NBD_EINVAL),
        (p.NBD_CMD_BLOCK_STATUS, 0, 0, p.NBD_EINVAL),
        (p.NBD_CMD_FLUSH, 1, 0, p.NBD_EINVAL),
        (p.NBD_CMD_FLUSH, 0, 1, p.NBD_EINVAL),
        (8, 0, 0, p.NBD_EINVAL),  # unknown command types carry no payload
        (0xFFFF, 0, 100, p.NBD_EINVAL),
    ],
)
def test_out_of_range_and_unknown_commands(cmd: int, offset: int, length: int, error: int) -> None:
    codec = transmission(size=SIZE)
    ev = invalid(codec, encode_request(cmd, 3, offset, length))
    assert (ev.handle, ev.type, ev.error) == (3, cmd, error)
    assert isinstance(one_event(codec, encode_request(p.NBD_CMD_FLUSH, 4)), Command)


def test_write_beyond_the_end_consumes_its_payload() -> None:
    codec = transmission()
    ev = invalid(codec, encode_request(p.NBD_CMD_WRITE, 3, SIZE - 2, 4, 0, b"abcd"))
    assert ev.error == p.NBD_ENOSPC  # the doc's SHOULD for writes past the end
    assert one_event(codec, encode_request(p.NBD_CMD_READ, 4, 0, 2)) == Command(4, 0, 0, 0, 2)


def test_oversize_write_is_drained_and_refused() -> None:
    codec = transmission()
    length = p.MAX_BLOCK_SIZE + 1
    codec.feed(encode_request(p.NBD_CMD_WRITE, 77, 0, length))
    chunk = bytes(256 * 1024)
    left = length
    while left > len(chunk):
        codec.feed(chunk)
        left -= len(chunk)
        assert codec.next_event() is None
        assert codec.buffered <= len(chunk)  # discarded, not held
    evs = events(codec, bytes(left) + encode_request(p.NBD_CMD_READ, 78, 0, 1))
    assert isinstance(evs[0], InvalidCommand)
    assert (evs[0].handle, evs[0].error) == (77, p.NBD_EINVAL)
    assert evs[1] == Command(78, p.NBD_CMD_READ, 0, 0, 1)


def test_maximum_size_write_is_accepted() -> None:
    codec = transmission(size=64 * MiB)
    payload = b"\x5a" * p.MAX_BLOCK_SIZE
    ev = one_event(codec, encode_request(p.NBD_CMD_WRITE, 1, 0, len(payload), 0, payload))
    assert isinstance(ev, Command) and ev.data == payload


def test_block_status_without_meta_context() -> None:
    codec = transmission(structured=True, meta=False)
    assert invalid(codec, encode_request(p.NBD_CMD_BLOCK_STATUS, 1, 0, 512)).error == 22


@pytest.mark.parametrize("cmd", [p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES])
def test_read_only_export_refuses_writes_with_eperm(cmd: int) -> None:
    codec = transmission(readonly=True)
    data = b"abcd" if cmd == p.NBD_CMD_WRITE else b""
    ev = invalid(codec, encode_request(cmd, 1, 0, 4, 0, data))
    assert ev.error == p.NBD_EPERM
    assert isinstance(one_event(codec, encode_request(p.NBD_CMD_READ, 2, 0, 4)), Command)


# -- transmission: replies ------------------------------------------------------------------


def test_simple_replies() -> None:
    codec = transmission(structured=False, meta=False)
    assert codec.reply_ok(0x42).hex() == "67446698000000000000000000000042"
    assert parse_simple(codec.reply_error(7, p.NBD_ENOSPC, "full")) == (28, 7, b"")
    assert parse_simple(codec.reply_read(8, 100, b"hello")) == (0, 8, b"hello")
    # An "error" of 0 would read as success (and a payload would follow): never send it.
    assert parse_simple(codec.reply_error(9, 0))[0] == p.NBD_EIO


def test_structured_read_reply_is_one_offset_data_chunk() -> None:
    codec = transmission()
    [(flags, ctype, handle, payload)] = parse_chunks(codec.reply_read(5, 4096, b"data"))
    assert (flags, ctype, handle) == (1, 1, 5)
    assert payload == (4096).to_bytes(8, "big") + b"data"
    assert parse_chunks(codec.reply_read(6, 0, b"")) == [(1, 0, 6, b"")]


def test_structured_error_reply_carries_the_message() -> None:
    codec = transmission()
    [(flags, ctype, handle, payload)] = parse_chunks(codec.reply_error(5, p.NBD_EIO, "boom"))
    assert (flags, ctype, handle) == (1, 32769, 5)
    assert payload == struct.pack(">IH", 5, 4) + b"boom"
    [(_, _, _, payload)] = parse_chunks(codec.reply_error(5, p.NBD_EIO, "é" * 5000 + "\0"))
    (n,) = struct.unpack_from(">H", payload, 4)
    assert n <= 4096 and len(payload) == 6 + n
    payload[6:].decode()  # still valid UTF-8 after cutting


def block_status(codec: ServerCodec, offset: int, length: int, extents, req_one=False):
    [(flags, ctype, handle, payload)] = parse_chunks(
        codec.reply_block_status(11, offset, length, extents, req_one)
    )
    assert (flags, ctype, handle) == (1, 5, 11)
    (context_id,) = struct.unpack_from(">I", payload)
    assert context_id == p.BASE_ALLOCATION_ID
    return [struct.unpack_from(">II", payload, i) for i in range(4, len(payload), 8)]


def test_block_status_reply_merges_and_clips() -> None:
    codec = transmission()
    hz = STATE_HOLE | STATE_ZERO
    extents = [
        Extent(0, 4096, hz),
        Extent(4096, 4096, 0),
        Extent(8192, 4096, 0),
        Extent(12288, 8192, hz | 0x80),  # unknown bits are dropped
    ]
    assert block_status(codec, 1000, 15000, extents) == [(3096, 3), (8192, 0), (3712, 3)]
    assert block_status(codec, 1000, 15000, extents, req_one=True) == [(3096, 3)]
    assert block_status(codec, 4096, 100, extents, req_one=True) == [(100, 0)]


def test_block_status_reply_stops_at_a_gap_and_never_returns_nothing() -> None:
    codec = transmission()
    assert block_status(codec, 0, 8192, [Extent(0, 100, 3), Extent(200, 100, 0)]) == [(100, 3)]
    assert block_status(codec, 0, 8192, []) == [(8192, 0)]
    assert block_status(codec, 0, 8192, [Extent(500, 100, 0)]) == [(8192, 0)]
    assert block_status(codec, 0, 8192, [Extent(0, 0, 1)]) == [(8192, 0)]


def test_block_status_reply_needs_the_context() -> None:
    with pytest.raises(RuntimeError):
        transmission(meta=False).reply_block_status(1, 0, 1, [])


@pytest.mark.parametrize(
    ("code", "expected"),
    [(1, 1), (30, 1), (13, 1), (5, 5), (22, 22), (28, 28), (122, 28), (27, 28), (12, 12),
     (75, 75), (95, 95), (108, 108), (2, 5), (110, 5)],
)  # fmt: skip
def test_errno_mapping(code: int, expected: int) -> None:
    assert p.nbd_error(code) == expected


# -- fuzzing --------------------------------------------------------------------------------

# Largest incomplete message the codec may hold after next_event() returned None.
BOUND = max(16 + p.MAX_OPTION_DATA, 28 + p.MAX_BLOCK_SIZE)

EVENT_TYPES = (OptionRequest, Command, InvalidCommand, Disconnect)


def drive(codec: ServerCodec, chunks: list[bytes]) -> list[object]:
    """Feed chunks, answering options; only ProtocolError may escape (and it ends the run)."""
    seen: list[object] = []
    fed = 0
    try:
        for chunk in chunks:
            codec.feed(chunk)
            fed += len(chunk)
            while (ev := codec.next_event()) is not None:
                assert isinstance(ev, EVENT_TYPES)
                seen.append(ev)
                if isinstance(ev, OptionRequest):
                    out = codec.answer_option(ev, size=SIZE, readonly=False)
                    assert isinstance(out, bytes)
                    if ev.option != p.NBD_OPT_EXPORT_NAME:
                        assert parse_option_replies(out)  # well-formed, never empty
                elif isinstance(ev, Command):
                    assert ev.offset + ev.length <= SIZE
                    assert ev.flags & ~0x1F == 0
                    if ev.type == p.NBD_CMD_WRITE:
                        assert len(ev.data) == ev.length
            assert codec.buffered <= min(fed, BOUND)
            if codec.state in (State.CLOSED, State.ERROR):
                assert codec.buffered == 0
    except ProtocolError:
        assert codec.state is State.ERROR
        assert codec.buffered == 0
    return seen


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def valid_stream() -> bytes:
    """A plausible client session touching every option and command."""
    parts = [
        struct.pack(">I", 3),
        encode_option(p.NBD_OPT_LIST),
        encode_option(p.NBD_OPT_STARTTLS),
        encode_option(p.NBD_OPT_STRUCTURED_REPLY),
        encode_option(p.NBD_OPT_LIST_META_CONTEXT, encode_meta_context_request("vol", [])),
        encode_option(
            p.NBD_OPT_SET_META_CONTEXT, encode_meta_context_request("", ["base:allocation"])
        ),
        encode_option(p.NBD_OPT_INFO, encode_info_request("vol", [1, 2, 3])),
        encode_option(p.NBD_OPT_GO, encode_info_request("vol", [3])),
        encode_request(p.NBD_CMD_WRITE, 1, 4096, 8, p.NBD_CMD_FLAG_FUA, b"12345678"),
        encode_request(p.NBD_CMD_READ, 2, 4096, 8, p.NBD_CMD_FLAG_DF),
        encode_request(p.NBD_CMD_FLUSH, 3),
        encode_request(p.NBD_CMD_TRIM, 4, 0, 4096),
        encode_request(p.NBD_CMD_CACHE, 5, 0, 4096),
        encode_request(p.NBD_CMD_WRITE_ZEROES, 6, 0, 4096, p.NBD_CMD_FLAG_NO_HOLE),
        encode_request(p.NBD_CMD_BLOCK_STATUS, 7, 0, SIZE, p.NBD_CMD_FLAG_REQ_ONE),
        encode_request(p.NBD_CMD_DISC, 8),
    ]
    return b"".join(parts)


def test_valid_stream_yields_the_expected_events() -> None:
    codec = ServerCodec("vol")
    evs = drive(codec, [valid_stream()])
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["OptionRequest"] * 7 + ["Command"] * 7 + ["Disconnect"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_fuzz_random_bytes_from_the_start(data: bytes, cuts: list[int]) -> None:
    drive(ServerCodec("vol"), chunked(data, cuts))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_fuzz_random_bytes_in_each_phase(data: bytes, cuts: list[int]) -> None:
    drive(new_codec(), chunked(data, cuts))
    drive(transmission(), chunked(data, cuts))
    drive(transmission(structured=False, meta=False), chunked(data, cuts))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("u32"), st.integers(0, 10_000), st.sampled_from([0, 1, 2**31, 2**32 - 1])),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(mutation, min_size=1, max_size=4), cuts=st.lists(st.integers(0, 9999)))
def test_fuzz_mutated_valid_streams(mutations: list[tuple], cuts: list[int]) -> None:
    data = bytearray(valid_stream())
    for kind, where, arg in mutations:
        pos = where % (len(data) + 1)
        if kind == "flip" and pos < len(data):
            data[pos] ^= arg
        elif kind == "insert":
            data[pos:pos] = arg
        elif kind == "delete":
            del data[pos : pos + arg]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "u32":
            data[pos : pos + 4] = arg.to_bytes(4, "big")
    drive(ServerCodec("vol"), chunked(bytes(data), cuts))


request = st.tuples(
    st.sampled_from([0, 1, 3, 4, 5, 6, 7]),
    st.integers(0, SIZE),
    st.integers(0, 4096),
    st.integers(0, 0x1F),
    st.integers(0, 2**64 - 1),
)


@settings(max_examples=200, deadline=None)
@given(reqs=st.lists(request, max_size=20), cuts=st.lists(st.integers(0, 100_000), max_size=10))
def test_fuzz_requests_decode_or_get_einval(reqs: list[tuple], cuts: list[int]) -> None:
    """Every request yields exactly one Command or InvalidCommand with its handle, in order."""
    codec = transmission()
    raw = b""
    for cmd, offset, length, flags, handle in reqs:
        if cmd == p.NBD_CMD_FLUSH:
            offset = length = 0
        data = bytes(length) if cmd == p.NBD_CMD_WRITE else b""
        raw += encode_request(cmd, handle, offset, length, flags, data)
    evs = drive(codec, chunked(raw, cuts))
    assert [e.handle for e in evs] == [r[4] for r in reqs]  # type: ignore[attr-defined]
    allowed = {0: 5, 1: 1, 3: 1, 4: 1, 5: 1, 6: 19, 7: 9}  # per command, from the doc
    for ev, (cmd, offset, length, flags, _) in zip(evs, reqs, strict=True):
        if cmd == p.NBD_CMD_FLUSH:
            offset = length = 0  # as encoded above
        ok = offset + length <= SIZE and not flags & ~allowed[cmd]
        ok = ok and not (cmd == p.NBD_CMD_BLOCK_STATUS and length == 0)
        assert isinstance(ev, Command if ok else InvalidCommand), ev
