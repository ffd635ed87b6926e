"""Sans-IO codec for the server side of the NBD protocol.

Pure code over bytes and state, in the style of h11: no sockets, no clocks, no tasks.
The server sends `greeting()`, then `feed()`s whatever bytes arrive and pulls events with
`next_event()` until it returns None (more bytes needed):

- `OptionRequest`: a handshake option. Answer it with `answer_option()` (which needs the
  export's current size and read-only state) before pulling the next event.
- `Command`: a valid transmission request; run it on the device, then send
  `reply_ok()` / `reply_read()` / `reply_block_status()` / `reply_error()`.
- `InvalidCommand`: a request refused by the codec (bad flag, out of range, ...); send
  `reply_error(ev.handle, ev.error, ev.message)` without touching the device.
- `Disconnect`: the session ends (NBD_OPT_ABORT, NBD_CMD_DISC, or a request the server must
  answer by terminating, such as NBD_OPT_EXPORT_NAME for an unknown export).

A violation that makes the byte stream unparseable (bad magic, unknown client flags) raises
`ProtocolError` from `next_event()`; the server drops the connection. No other exception
is raised for any input. After `next_event()` returns None at most one incomplete message
is buffered (28 bytes + MAX_PAYLOAD for a write); over-long option data and write payloads
are discarded as they arrive instead of being buffered.

Implemented: fixed newstyle handshake only (no oldstyle, no TLS, no extended headers),
NBD_OPT_EXPORT_NAME/ABORT/LIST/STARTTLS/INFO/GO/STRUCTURED_REPLY/LIST_META_CONTEXT/
SET_META_CONTEXT, one export, the `base:allocation` metadata context, and commands READ,
WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS. Constants follow the NBD
project's doc/proto.md.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from target.blockdev import STATE_HOLE, STATE_ZERO, Extent

# -- magic numbers ------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", also the magic of every option request
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server) and client flags ---------------------------------------------

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
HANDSHAKE_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# -- transmission flags ---------------------------------------------------------------------

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# -- options --------------------------------------------------------------------------------

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10

# -- option replies -------------------------------------------------------------------------

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
NBD_REP_ERR_UNSUP = _REP_ERR + 1
NBD_REP_ERR_POLICY = _REP_ERR + 2
NBD_REP_ERR_INVALID = _REP_ERR + 3
NBD_REP_ERR_PLATFORM = _REP_ERR + 4
NBD_REP_ERR_TLS_REQD = _REP_ERR + 5
NBD_REP_ERR_UNKNOWN = _REP_ERR + 6
NBD_REP_ERR_SHUTDOWN = _REP_ERR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
NBD_REP_ERR_TOO_BIG = _REP_ERR + 9

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# -- commands and command flags -------------------------------------------------------------

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# FUA is valid on every command once NBD_FLAG_SEND_FUA is advertised (the doc says the
# server MUST accept it, even by ignoring it); the others only where documented.
_ALLOWED_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_CACHE: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
}
_KNOWN_FLAGS = (
    NBD_CMD_FLAG_FUA
    | NBD_CMD_FLAG_NO_HOLE
    | NBD_CMD_FLAG_DF
    | NBD_CMD_FLAG_REQ_ONE
    | NBD_CMD_FLAG_FAST_ZERO
)
WRITE_COMMANDS = frozenset({NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES})

# -- structured replies ---------------------------------------------------------------------

NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- error values (NBD's own, not the host's errno) -----------------------------------------

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# -- limits ---------------------------------------------------------------------------------

MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 32 * 1024 * 1024  # also the largest READ/WRITE/CACHE length accepted
MAX_OPTION_DATA = 64 * 1024  # longer option payloads are discarded and refused (TOO_BIG)
MAX_STRING = 4096  # the doc's hard limit for names and messages
MAX_BLOCK_STATUS_DESCRIPTORS = 65536  # the doc lets a server return fewer extents
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # the context id handed out by SET_META_CONTEXT

REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke the protocol so badly that the connection must be dropped."""


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"  # greeting sent, waiting for the 32-bit client flags
    OPTIONS = "options"  # option haggling
    AWAIT_ANSWER = "await-answer"  # an OptionRequest was returned and is not answered yet
    TRANSMISSION = "transmission"
    CLOSED = "closed"  # soft or mandated disconnect; input is ignored
    ERROR = "error"  # ProtocolError raised; input is ignored


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionRequest:
    """One handshake option. `data` is empty when `length` exceeds MAX_OPTION_DATA."""

    option: int
    length: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Command:
    """A transmission request that passed validation (flags, bounds, negotiation)."""

    handle: int
    type: int
    flags: int
    offset: int
    length: int
    data: bytes = b""  # the payload of NBD_CMD_WRITE

    @property
    def fua(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_FUA)


@dataclass(frozen=True, slots=True)
class InvalidCommand:
    """A request the codec refused; the server replies `error` and skips the device."""

    handle: int
    type: int
    flags: int
    offset: int
    length: int
    error: int
    message: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The session ends here; `soft` is True when the client asked for it."""

    reason: str
    soft: bool


Event = OptionRequest | Command | InvalidCommand | Disconnect


# -- pure encoders (also the client side used by tests and tools) ----------------------------


def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_request(
    cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
) -> bytes:
    return REQUEST_HEADER.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def encode_info_request(name: str, info: Iterable[int] = ()) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = name.encode()
    items = list(info)
    return _U32.pack(len(raw)) + raw + _U16.pack(len(items)) + b"".join(_U16.pack(i) for i in items)


def encode_meta_context_request(name: str, queries: Iterable[str]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    raw = name.encode()
    qs = [q.encode() for q in queries]
    return (
        _U32.pack(len(raw)) + raw + _U32.pack(len(qs)) + b"".join(_U32.pack(len(q)) + q for q in qs)
    )


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def structured_chunk(
    handle: int, chunk_type: int, payload: bytes, flags: int = NBD_REPLY_FLAG_DONE
) -> bytes:
    header = STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, chunk_type, handle, len(payload))
    return header + payload


def nbd_error(code: int) -> int:
    """Map a host errno (from BlockError.errno) to an NBD error value."""
    if code in (errno.EPERM, errno.EROFS, errno.EACCES):
        return NBD_EPERM
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NBD_ENOSPC
    if code in (errno.EINVAL, errno.ERANGE):
        return NBD_EINVAL
    if code == errno.ENOMEM:
        return NBD_ENOMEM
    if code == errno.EOVERFLOW:
        return NBD_EOVERFLOW
    if code in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return NBD_ENOTSUP
    if code == errno.ESHUTDOWN:
        return NBD_ESHUTDOWN
    return NBD_EIO


def _clean_string(text: str, limit: int = MAX_STRING) -> bytes:
    """UTF-8 without NULs, cut to `limit` bytes on a character boundary (doc's string rules)."""
    raw = text.replace("\0", "").encode(errors="replace")[:limit]
    return raw.decode(errors="ignore").encode()


class _Invalid(Exception):
    """Internal: an option payload is malformed (answered with NBD_REP_ERR_INVALID)."""


class _Reader:
    """Bounds-checked cursor over an option payload."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _Invalid("option data is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise _Invalid("string longer than 4096 bytes")
        try:
            text = self.take(n).decode()
        except UnicodeDecodeError:
            raise _Invalid("string is not valid UTF-8") from None
        if "\0" in text:
            raise _Invalid("string contains NUL")
        return text

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _Invalid("trailing bytes in option data")


# -- the codec ------------------------------------------------------------------------------


class ServerCodec:
    """Server side of one NBD connection, serving a single export."""

    def __init__(self, export_name: str, description: str = "", multi_conn: bool = True) -> None:
        self.export_name = export_name
        self.description = description
        self.multi_conn = multi_conn
        self.state = State.CLIENT_FLAGS
        self.client_flags = 0
        self.structured = False  # NBD_OPT_STRUCTURED_REPLY acknowledged
        self.meta_context = False  # base:allocation selected by SET_META_CONTEXT
        # Fixed when transmission starts (INFO reports them too):
        self.size = 0
        self.readonly = False
        self.export_flags = 0
        self._buf = bytearray()
        self._skip = 0  # bytes still to discard (over-long option or write payload)
        self._after_skip: Event | None = None  # returned once the discarding is done
        self._pending: OptionRequest | None = None
        self._error: ProtocolError | None = None
        self._disconnect: Disconnect | None = None  # returned once, then None forever

    # -- input --

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a message."""
        return len(self._buf)

    def greeting(self) -> bytes:
        """What the server sends first: NBDMAGIC, IHAVEOPT, handshake flags."""
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HANDSHAKE_FLAGS)

    def feed(self, data: bytes) -> None:
        if self.state in (State.CLOSED, State.ERROR) or not data:
            return
        if self._skip and not self._buf:
            # Discard straight away so an oversize payload is never held in memory.
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data

    def next_event(self) -> Event | None:
        """The next event, or None if more bytes are needed. Raises ProtocolError."""
        if self.state is State.ERROR:
            assert self._error is not None
            raise self._error
        if self.state is State.CLOSED:
            ev, self._disconnect = self._disconnect, None
            return ev
        if self.state is State.AWAIT_ANSWER:
            raise RuntimeError("answer_option() must be called before the next event")
        if self._skip:
            n = min(self._skip, len(self._buf))
            del self._buf[:n]
            self._skip -= n
            if self._skip:
                return None
        if self._after_skip is not None:
            ev, self._after_skip = self._after_skip, None
            if isinstance(ev, OptionRequest):
                self._pending = ev
                self.state = State.AWAIT_ANSWER
            return ev
        try:
            if self.state is State.CLIENT_FLAGS:
                return self._parse_client_flags()
            if self.state is State.OPTIONS:
                return self._parse_option()
            return self._parse_request()
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: ProtocolError) -> None:
        self.state = State.ERROR
        self._error = exc
        self._buf.clear()

    def _close(self, reason: str, soft: bool) -> None:
        self.state = State.CLOSED
        self._disconnect = Disconnect(reason, soft)
        self._buf.clear()
        self._skip = 0

    def _parse_client_flags(self) -> Event | None:
        if len(self._buf) < 4:
            return None
        (flags,) = _U32.unpack_from(self._buf)
        del self._buf[:4]
        if flags & ~KNOWN_CLIENT_FLAGS:
            # The doc: the server MUST drop the connection on unknown client flags.
            raise ProtocolError(f"unknown client flags {flags:#x}")
        # Fixed newstyle is honoured even if the client did not set the bit (the doc allows
        # it); NO_ZEROES only changes the NBD_OPT_EXPORT_NAME reply.
        self.client_flags = flags
        self.state = State.OPTIONS
        return self._parse_option()

    def _parse_option(self) -> Event | None:
        if len(self._buf) < OPTION_HEADER.size:
            return None
        magic, option, length = OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            del self._buf[: OPTION_HEADER.size]
            self._skip = length
            self._after_skip = OptionRequest(option, length, b"")
            return self.next_event()
        end = OPTION_HEADER.size + length
        if len(self._buf) < end:
            return None
        data = bytes(self._buf[OPTION_HEADER.size : end])
        del self._buf[:end]
        self._pending = OptionRequest(option, length, data)
        self.state = State.AWAIT_ANSWER
        return self._pending

    def _parse_request(self) -> Event | None:
        buf = self._buf
        if len(buf) < REQUEST_HEADER.size:
            return None
        magic, flags, cmd, handle, offset, length = REQUEST_HEADER.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if cmd == NBD_CMD_WRITE:
            if length > MAX_BLOCK_SIZE:
                # The doc allows a hard disconnect here; discarding the payload as it arrives
                # keeps the stream in sync without buffering it, and the client gets EINVAL.
                del buf[: REQUEST_HEADER.size]
                self._skip = length
                message = f"write of {length} bytes exceeds the maximum block size"
                self._after_skip = InvalidCommand(
                    handle, cmd, flags, offset, length, NBD_EINVAL, message
                )
                return self.next_event()
            end = REQUEST_HEADER.size + length
            if len(buf) < end:
                return None
            with memoryview(buf) as view:
                data = bytes(view[REQUEST_HEADER.size : end])
            del buf[:end]
        else:
            del buf[: REQUEST_HEADER.size]
            data = b""
        if cmd == NBD_CMD_DISC:
            self._close("client sent NBD_CMD_DISC", soft=True)
            return self.next_event()
        problem = self._validate(cmd, flags, offset, length)
        if problem is not None:
            return InvalidCommand(handle, cmd, flags, offset, length, *problem)
        return Command(handle, cmd, flags, offset, length, data)

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return NBD_EINVAL, f"unknown command type {cmd}"
        if flags & ~_KNOWN_FLAGS:
            return NBD_EINVAL, f"unknown command flags {flags & ~_KNOWN_FLAGS:#x}"
        if flags & ~allowed:
            return NBD_EINVAL, f"command flags {flags & ~allowed:#x} not valid for command {cmd}"
        if flags & NBD_CMD_FLAG_DF and not self.structured:
            return NBD_EINVAL, "NBD_CMD_FLAG_DF needs structured replies"
        if cmd in WRITE_COMMANDS and self.readonly:
            return NBD_EPERM, "export is read-only"
        if cmd == NBD_CMD_FLUSH:
            if offset or length:
                return NBD_EINVAL, "flush offset and length must be zero"
            return None
        if cmd == NBD_CMD_BLOCK_STATUS:
            if not self.meta_context:
                return NBD_EINVAL, "no metadata context was negotiated"
            if length == 0:
                return NBD_EINVAL, "block status length must not be zero"
        if cmd in (NBD_CMD_READ, NBD_CMD_CACHE) and length > MAX_BLOCK_SIZE:
            return NBD_EINVAL, f"length {length} exceeds the maximum block size {MAX_BLOCK_SIZE}"
        if offset + length > self.size:
            # The doc: ENOSPC for writes past the end, EINVAL for everything else.
            code = NBD_ENOSPC if cmd in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else NBD_EINVAL
            return code, f"range {offset}+{length} is beyond the export size {self.size}"
        return None

    # -- handshake answers --

    def answer_option(self, request: OptionRequest, *, size: int, readonly: bool) -> bytes:
        """Bytes answering `request`; may start transmission or close the session."""
        if self.state is not State.AWAIT_ANSWER or request is not self._pending:
            raise RuntimeError("no such option request is waiting for an answer")
        self._pending = None
        self.state = State.OPTIONS
        opt = request.option
        if request.length > MAX_OPTION_DATA:
            if opt == NBD_OPT_EXPORT_NAME:
                self._close("export name too long", soft=False)
                return b""
            return option_reply(opt, NBD_REP_ERR_TOO_BIG, b"option data too large")
        try:
            return self._answer(opt, request.data, size, readonly)
        except _Invalid as exc:
            if opt == NBD_OPT_EXPORT_NAME:
                self._close(f"bad NBD_OPT_EXPORT_NAME: {exc}", soft=False)
                return b""
            return option_reply(opt, NBD_REP_ERR_INVALID, _clean_string(str(exc)))

    def _is_ours(self, name: str) -> bool:
        return name in ("", self.export_name)

    def _transmission_flags(self, readonly: bool) -> int:
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE
        if self.structured:
            flags |= NBD_FLAG_SEND_DF
        if self.multi_conn:
            flags |= NBD_FLAG_CAN_MULTI_CONN
        if readonly:
            flags |= NBD_FLAG_READ_ONLY
        else:
            flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
        return flags

    def _start_transmission(self, size: int, readonly: bool) -> None:
        self.size = size
        self.readonly = readonly
        self.export_flags = self._transmission_flags(readonly)
        self.state = State.TRANSMISSION

    def _answer(self, opt: int, data: bytes, size: int, readonly: bool) -> bytes:
        if opt == NBD_OPT_EXPORT_NAME:
            name = _Reader(data).string(len(data))
            if not self._is_ours(name):
                # This option cannot return an error: the doc mandates terminating.
                self._close(f"unknown export {name!r}", soft=False)
                return b""
            self._start_transmission(size, readonly)
            zeroes = b"" if self.client_flags & NBD_FLAG_C_NO_ZEROES else bytes(124)
            return struct.pack(">QH", size, self.export_flags) + zeroes
        if opt == NBD_OPT_ABORT:
            # Any data is ignored, as the doc asks.
            self._close("client sent NBD_OPT_ABORT", soft=True)
            return option_reply(opt, NBD_REP_ACK)
        if opt == NBD_OPT_LIST:
            if data:
                raise _Invalid("NBD_OPT_LIST takes no data")
            name = _clean_string(self.export_name)
            entry = _U32.pack(len(name)) + name + _clean_string(self.description)
            return option_reply(opt, NBD_REP_SERVER, entry) + option_reply(opt, NBD_REP_ACK)
        if opt == NBD_OPT_STARTTLS:
            if data:
                raise _Invalid("NBD_OPT_STARTTLS takes no data")
            return option_reply(opt, NBD_REP_ERR_POLICY, b"TLS is not configured on this server")
        if opt in (NBD_OPT_INFO, NBD_OPT_GO):
            return self._answer_info(opt, data, size, readonly)
        if opt == NBD_OPT_STRUCTURED_REPLY:
            if data:
                raise _Invalid("NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            return option_reply(opt, NBD_REP_ACK)
        if opt in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
            return self._answer_meta_context(opt, data)
        return option_reply(opt, NBD_REP_ERR_UNSUP, b"option not supported")

    def _answer_info(self, opt: int, data: bytes, size: int, readonly: bool) -> bytes:
        r = _Reader(data)
        name = r.string(r.u32())
        requests = {r.u16() for _ in range(r.u16())}
        r.end()
        if not self._is_ours(name):
            return option_reply(opt, NBD_REP_ERR_UNKNOWN, _clean_string(f"no export {name!r}"))
        flags = self._transmission_flags(readonly)
        out = [
            option_reply(opt, NBD_REP_INFO, struct.pack(">HQH", NBD_INFO_EXPORT, size, flags)),
            # Always sent: the maximum is tighter than the doc's default (unlimited).
            option_reply(
                opt,
                NBD_REP_INFO,
                struct.pack(
                    ">HIII",
                    NBD_INFO_BLOCK_SIZE,
                    MIN_BLOCK_SIZE,
                    PREFERRED_BLOCK_SIZE,
                    MAX_BLOCK_SIZE,
                ),
            ),
        ]
        if NBD_INFO_NAME in requests:
            raw = _clean_string(self.export_name)
            out.append(option_reply(opt, NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + raw))
        if NBD_INFO_DESCRIPTION in requests and self.description:
            raw = _clean_string(self.description)
            out.append(option_reply(opt, NBD_REP_INFO, _U16.pack(NBD_INFO_DESCRIPTION) + raw))
        out.append(option_reply(opt, NBD_REP_ACK))
        if opt == NBD_OPT_GO:
            self._start_transmission(size, readonly)
        return b"".join(out)

    def _answer_meta_context(self, opt: int, data: bytes) -> bytes:
        setting = opt == NBD_OPT_SET_META_CONTEXT
        if setting:
            self.meta_context = False  # the doc: replaced even when the option fails
        if setting and not self.structured:
            return option_reply(
                opt, NBD_REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first"
            )
        r = _Reader(data)
        name = r.string(r.u32())
        queries = [r.string(r.u32()) for _ in range(r.u32())]
        r.end()
        if not self._is_ours(name):
            return option_reply(opt, NBD_REP_ERR_UNKNOWN, _clean_string(f"no export {name!r}"))
        if setting:
            # Only an exact name selects; "base:" and unknown namespaces select nothing.
            found = BASE_ALLOCATION in queries
            context_id = BASE_ALLOCATION_ID
        else:
            # An empty list means "everything"; "base:" is the namespace wildcard.
            found = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
            context_id = 0  # reserved in LIST replies
        out = []
        if found:
            payload = _U32.pack(context_id) + BASE_ALLOCATION.encode()
            out.append(option_reply(opt, NBD_REP_META_CONTEXT, payload))
        out.append(option_reply(opt, NBD_REP_ACK))
        if setting:
            self.meta_context = found
        return b"".join(out)

    # -- transmission replies --

    def reply_ok(self, handle: int) -> bytes:
        """Success without payload (a simple reply is valid in both modes)."""
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(self, handle: int, error: int, message: str = "") -> bytes:
        """An error; structured (with the message) once structured replies are negotiated."""
        if error == 0:
            error = NBD_EIO  # an error reply must not look like success
        if not self.structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        msg = _clean_string(message)
        payload = struct.pack(">IH", error, len(msg)) + msg
        return structured_chunk(handle, NBD_REPLY_TYPE_ERROR, payload)

    def reply_read(self, handle: int, offset: int, data: bytes) -> bytes:
        """The data of a successful read (one OFFSET_DATA chunk when structured)."""
        if not self.structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle) + data
        if not data:
            # OFFSET_DATA must carry at least one byte; an empty read is just "done".
            return structured_chunk(handle, NBD_REPLY_TYPE_NONE, b"")
        header = STRUCTURED_HEADER.pack(
            STRUCTURED_REPLY_MAGIC,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            handle,
            8 + len(data),
        )
        return header + offset.to_bytes(8, "big") + data

    def reply_block_status(
        self,
        handle: int,
        offset: int,
        length: int,
        extents: Iterable[Extent],
        req_one: bool = False,
    ) -> bytes:
        """base:allocation descriptors for [offset, offset+length) from device extents.

        Extents are clipped to the request, merged when their flags agree and cut at the
        first gap; if nothing usable remains the whole range is reported as status 0,
        which the doc says is always safe.
        """
        if not self.meta_context:
            raise RuntimeError("base:allocation was not negotiated")
        end = offset + length
        pos = offset
        descriptors: list[list[int]] = []
        for ext in extents:
            ext_end = ext.offset + ext.length
            if ext.length <= 0 or ext_end <= pos:
                continue
            if ext.offset > pos or pos >= end:
                break
            stop = min(ext_end, end)
            flags = ext.flags & (STATE_HOLE | STATE_ZERO)
            if descriptors and descriptors[-1][1] == flags:
                descriptors[-1][0] += stop - pos
            elif len(descriptors) < MAX_BLOCK_STATUS_DESCRIPTORS:
                descriptors.append([stop - pos, flags])
            else:
                break
            pos = stop
        if not descriptors:
            descriptors = [[length, 0]]
        if req_one:
            descriptors = descriptors[:1]
        payload = _U32.pack(BASE_ALLOCATION_ID) + b"".join(
            struct.pack(">II", n, f) for n, f in descriptors
        )
        return structured_chunk(handle, NBD_REPLY_TYPE_BLOCK_STATUS, payload)
