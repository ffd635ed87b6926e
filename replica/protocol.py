"""The replica data protocol: a sans-IO codec (no sockets here).

PROTOCOL
========

One TCP connection carries many requests at once (pipelined); every request carries a
64-bit tag that its response repeats, and responses may come in any order. All integers
are little-endian (both ends are x86/arm hosts; the C engine reads them without swaps).

Request (32-byte header, then `payload_len` bytes of payload):

    offset size field
    0      4    magic        0x51444E54 ("TNDQ" on the wire)
    4      1    op           see Op
    5      1    flags        bit 0 FUA (WRITE: durable before the reply)
    6      2    reserved     0
    8      8    tag          chosen by the client, echoed in the response
    16     8    offset       byte offset in the volume (data ops)
    24     4    length       bytes to read/unmap/zero; for WRITE equal to payload_len
    28     4    payload_len  bytes following the header (WRITE data; JSON for control ops)

Response (24-byte header, then `payload_len` bytes):

    0      4    magic        0x52444E54 ("TNDR")
    4      4    status       0 = OK, else an errno value (Status); payload is a UTF-8 message
    8      8    tag
    16     4    payload_len  READ data; JSON for INFO/OPEN/BLOCK_STATUS; error message
    20     4    reserved     0

Ops: READ, WRITE, FLUSH, UNMAP, WRITE_ZEROES (flags bit 1 NO_HOLE keeps it allocated), PING,
INFO (replica state as JSON), OPEN (JSON {"epoch": N}: a target opens the replica for writing
and fences out older epochs), SET_GENERATION (JSON {"generation": N}), CLOSE (clean close),
BLOCK_STATUS (JSON list of [offset, length, flags]), SNAPSHOT (JSON {"name": ...}),
CHECKSUM (the CRC32C of the range's data as 4 little-endian bytes; rebuild verification),
ATTRS (all volume attributes as a JSON object) and SET_ATTRS (JSON object of keys to set;
null deletes): small durable state kept with the data, e.g. SCSI persistent reservations;
RESIZE (JSON {"size": N}: grow the volume online; a smaller size is refused);
COPY_FROM (JSON {"source": "HOST:PORT", "ranges": [[offset, length], ...],
"compare_first": bool}: pull those ranges from another replica and verify them, the data
moving replica to replica during a rebuild; answers JSON counts; EREMOTEIO when the
source failed, so the target can pick another); READV (a vectored READ: the payload is
1 to READV_MAX_RANGES entries of 16 bytes, offset u64, length u32 (> 0), reserved u32 (0);
the header's length is the sum of the entries' lengths and the response carries their
data back to back: a rebuild pulls scattered small pieces in one round trip each batch);
SHARE (a target on the replica's host, over the unix socket: the payload is a u32, the number
of one of the target's own file descriptors, a memfd of `length` bytes; the replica maps it
through /proc/PEER/fd for this connection, and takes only shared memory owned by the peer's
user). On a connection that SHAREd, READ and WRITE may set flags bit 2 SHM: the payload is
then a u64 offset in that memory where the data is (WRITE, `length` bytes) or is to be put
(READ; the response then carries no data). Payloads then cross no socket: the target
receives an initiator's data into that memory and sends the initiator's reads from it. The
native engine serves SHARE; the pure-Python server answers ENOTSUP, and the target then sends
data through the socket as before. The native engine's answer carries 16 bytes, an offer of
local reads: u32 fd numbers (in the replica's process) of its head layer file and of a page
(a sealed 4 KiB memfd), u32 the generation the file belongs to, u32 0. The page holds two
u32: the generation, bumped when the head file or the layer count changes, and "readable",
1 while the head file alone answers a read as the replica would (one layer, not paused, no
fault armed; layer files change only while paused).
While the page says readable and that generation, the target may pread the file (through
/proc/PID/fd) instead of asking; every acknowledged write is in it by then.

Data ops (WRITE, FLUSH, UNMAP, WRITE_ZEROES, SET_GENERATION, SNAPSHOT) are accepted only on
a connection that sent OPEN with the replica's current epoch; after a newer target opens the
replica, the older target's writes fail with ESTALE. READ, READV, INFO, PING and BLOCK_STATUS
work on any connection (rebuild sources and monitors use them).

Limits: payload_len and READ length at most MAX_PAYLOAD (32 MiB). A header with a bad magic
or an oversize payload cannot be resynchronised: the server answers EPROTO (tag 0 for a bad
magic) and closes the connection. A well-framed request with an unknown op or bad fields is
answered with its tag and an error, and the connection stays up.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

REQ_MAGIC = 0x51444E54
RESP_MAGIC = 0x52444E54
REQ = struct.Struct("<IBBHQQII")
RESP = struct.Struct("<IIQII")
MAX_PAYLOAD = 32 * 1024 * 1024
READV_ENTRY = struct.Struct("<QII")
READV_MAX_RANGES = 1024

FLAG_FUA = 1
FLAG_NO_HOLE = 2
FLAG_SHM = 4  # READ/WRITE data in the memory SHAREd on this connection (native engine)


class Op(IntEnum):
    READ = 1
    WRITE = 2
    FLUSH = 3
    UNMAP = 4
    WRITE_ZEROES = 5
    PING = 6
    INFO = 7
    OPEN = 8
    SET_GENERATION = 9
    CLOSE = 10
    BLOCK_STATUS = 11
    SNAPSHOT = 12
    CHECKSUM = 13
    ATTRS = 14
    SET_ATTRS = 15
    RESIZE = 16
    COPY_FROM = 17
    READV = 18
    SHARE = 19


# Ops that change the replica: only on a connection opened with the current epoch.
MUTATING = frozenset(
    {
        Op.WRITE,
        Op.FLUSH,
        Op.UNMAP,
        Op.WRITE_ZEROES,
        Op.SET_GENERATION,
        Op.CLOSE,
        Op.SNAPSHOT,
        Op.SET_ATTRS,
        Op.RESIZE,
        Op.COPY_FROM,
    }
)
# Ops whose payload is JSON.
JSON_OPS = frozenset(
    {Op.OPEN, Op.SET_GENERATION, Op.SNAPSHOT, Op.SET_ATTRS, Op.RESIZE, Op.COPY_FROM}
)


class Status(IntEnum):
    OK = 0
    EIO = errno.EIO
    EINVAL = errno.EINVAL
    ENOSPC = errno.ENOSPC
    EROFS = errno.EROFS
    EPROTO = errno.EPROTO
    ESTALE = errno.ESTALE
    ENOTSUP = errno.EOPNOTSUPP
    EPERM = errno.EPERM
    EREMOTEIO = errno.EREMOTEIO


class ProtocolError(Exception):
    """The byte stream is not a valid replica protocol stream; the connection must close."""


@dataclass(slots=True)
class Request:
    op: int
    tag: int
    offset: int = 0
    length: int = 0
    flags: int = 0
    payload: bytes = b""

    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None


@dataclass(slots=True)
class Response:
    tag: int
    status: int = 0
    payload: bytes = b""

    @property
    def message(self) -> str:
        return self.payload.decode("utf-8", "replace")


def encode_request(
    op: int, tag: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
) -> bytes:
    return REQ.pack(REQ_MAGIC, op, flags, 0, tag, offset, length, len(payload)) + payload


def encode_json_request(op: int, tag: int, obj: Any) -> bytes:
    return encode_request(op, tag, payload=json.dumps(obj).encode())


def encode_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """READV's payload: the (offset, length) entries."""
    return b"".join(READV_ENTRY.pack(off, n, 0) for off, n in ranges)


def decode_ranges(payload: bytes, length: int, size: int) -> list[tuple[int, int]]:
    """READV's payload back into (offset, length) entries; ValueError says what is wrong."""
    count, rest = divmod(len(payload), READV_ENTRY.size)
    if rest or not 0 < count <= READV_MAX_RANGES:
        raise ValueError(
            f"READV payload must be 1 to {READV_MAX_RANGES} entries of {READV_ENTRY.size} bytes"
        )
    ranges, total = [], 0
    for off, n, reserved in READV_ENTRY.iter_unpack(payload):
        if reserved or not n:
            raise ValueError(f"READV entry {off}+{n}: zero length or reserved bits set")
        if off + n > size:
            raise ValueError(f"range {off}+{n} beyond size {size}")
        ranges.append((off, n))
        total += n
    if total != length:
        raise ValueError(f"READV length {length} is not the sum of its ranges ({total})")
    return ranges


def encode_response(tag: int, status: int = 0, payload: bytes = b"") -> bytes:
    return RESP.pack(RESP_MAGIC, status, tag, len(payload), 0) + payload


def encode_error(tag: int, status: int, message: str) -> bytes:
    return encode_response(tag, status, message.encode()[:4096])


class _Framer:
    """Accumulates bytes and cuts them into header + payload frames."""

    header: struct.Struct

    def __init__(self) -> None:
        self._buf = bytearray()
        self._closed = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def _frame(self) -> tuple[tuple[int, ...], bytes] | None:
        if self._closed or len(self._buf) < self.header.size:
            return None
        fields = self.header.unpack_from(self._buf)
        plen = self._payload_len(fields)
        end = self.header.size + plen
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:  # one copy, not two (slice, then bytes)
            payload = bytes(view[self.header.size : end])
        del self._buf[:end]
        return fields, payload

    def _payload_len(self, fields: tuple[int, ...]) -> int:
        raise NotImplementedError

    def _fail(self, message: str) -> ProtocolError:
        self._closed = True
        self._buf.clear()
        return ProtocolError(message)


class RequestDecoder(_Framer):
    """Server side: bytes in, `Request`s out. Raises ProtocolError when framing is lost."""

    header = REQ

    def _payload_len(self, fields: tuple[int, ...]) -> int:
        magic, _op, _flags, _res, _tag, _off, _length, plen = fields
        if magic != REQ_MAGIC:
            raise self._fail(f"bad request magic {magic:#x}")
        if plen > MAX_PAYLOAD:
            raise self._fail(f"payload of {plen} bytes exceeds the {MAX_PAYLOAD} limit")
        return plen

    def next(self) -> Request | None:
        frame = self._frame()
        if frame is None:
            return None
        (_m, op, flags, _r, tag, offset, length, _p), payload = frame
        return Request(op, tag, offset, length, flags, payload)


class ResponseDecoder(_Framer):
    """Client side: bytes in, `Response`s out."""

    header = RESP

    def _payload_len(self, fields: tuple[int, ...]) -> int:
        magic, _status, _tag, plen, _res = fields
        if magic != RESP_MAGIC:
            raise self._fail(f"bad response magic {magic:#x}")
        if plen > MAX_PAYLOAD:
            raise self._fail(f"response payload of {plen} bytes exceeds the limit")
        return plen

    def next(self) -> Response | None:
        frame = self._frame()
        if frame is None:
            return None
        (_m, status, tag, _p, _r), payload = frame
        return Response(tag, status, payload)


def validate(req: Request, size: int) -> tuple[int, str] | None:
    """Check a framed request's fields; returns (status, message) when it must be refused."""
    try:
        op = Op(req.op)
    except ValueError:
        return Status.ENOTSUP, f"unknown op {req.op}"
    if op == Op.SHARE:
        return Status.ENOTSUP, "shared memory is served by the native engine only"
    if req.flags & ~(FLAG_FUA | FLAG_NO_HOLE):
        return Status.EINVAL, f"unknown flags {req.flags:#x}"
    if op in (Op.READ, Op.WRITE, Op.UNMAP, Op.WRITE_ZEROES, Op.BLOCK_STATUS, Op.CHECKSUM):
        if req.offset + req.length > size:
            return Status.EINVAL, f"range {req.offset}+{req.length} beyond size {size}"
        if op in (Op.READ, Op.CHECKSUM) and req.length > MAX_PAYLOAD:
            return Status.EINVAL, f"read of {req.length} bytes exceeds the limit"
        if op == Op.WRITE and req.length != len(req.payload):
            return Status.EINVAL, "write length differs from its payload"
    if op == Op.READV:
        if req.length > MAX_PAYLOAD:
            return Status.EINVAL, f"read of {req.length} bytes exceeds the limit"
        try:
            decode_ranges(req.payload, req.length, size)
        except ValueError as e:
            return Status.EINVAL, str(e)
    if op in JSON_OPS:
        try:
            obj = req.json()
        except ValueError:
            return Status.EINVAL, "payload is not JSON"
        if not isinstance(obj, dict):
            return Status.EINVAL, "payload must be a JSON object"
    return None
