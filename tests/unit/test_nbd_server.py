"""The NBD server against real clients on 127.0.0.1: nbdinfo, qemu-io, nbdcopy, libnbd's
Python binding, and raw sockets playing a broken client.

The server runs on an asyncio loop in a background thread of the pytest process (libnbd
releases the GIL while it waits). Every test fails if the loop reports an exception
("Task exception was never retrieved" and friends) or the server logs an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from target.blockdev import MediumError, NoSpace
from target.frontends.nbd import protocol as p
from target.frontends.nbd.server import NbdServer
from tests.unit.memdev import MemDevice

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
TOOLS = ("nbdinfo", "nbdcopy", "qemu-io")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason="NBD client tools are not installed"
)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Harness:
    """An NbdServer on its own event loop thread."""

    def __init__(self, device: MemDevice, **kw: Any) -> None:
        self.device = device
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = NbdServer(device, "vol", "test volume", **kw)
        self.call(self.server.start("127.0.0.1", 0))
        self.port = self.server.port
        self.uri = f"nbd://127.0.0.1:{self.port}/vol"

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            gc.collect()  # surfaces "Task exception was never retrieved" now, not later

    def connections(self) -> int:
        async def count() -> int:
            return self.server.connection_count

        return self.call(count())


@pytest.fixture
def make_server() -> Iterator[Callable[..., Harness]]:
    collect = _Collect()
    loggers = [logging.getLogger("target.frontends.nbd"), logging.getLogger("asyncio")]
    for lg in loggers:
        lg.addHandler(collect)
    harnesses: list[Harness] = []

    def make(size: int = 8 * MiB, readonly: bool = False, **kw: Any) -> Harness:
        h = Harness(MemDevice(size, readonly=readonly), **kw)
        harnesses.append(h)
        return h

    try:
        yield make
        for h in harnesses:
            h.close()
        for h in harnesses:
            assert h.loop_errors == []
        assert [r.getMessage() for r in collect.records] == []
    finally:
        for lg in loggers:
            lg.removeHandler(collect)


@pytest.fixture
def srv(make_server: Callable[..., Harness]) -> Harness:
    return make_server()


def run(*args: str, timeout: float = 30) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args}: {res.stderr}"
    return res.stdout


def connect(
    h: Harness,
    structured: bool = True,
    meta: bool = True,
    strict_off: int = 0,
) -> Any:
    handle = nbd.NBD()
    handle.set_request_structured_replies(structured)
    if meta:
        handle.add_meta_context("base:allocation")
    handle.connect_uri(h.uri)
    handle.set_strict_mode(handle.get_strict_mode() & ~strict_off)
    return handle


def nbd_errno(fn: Callable[[], object]) -> int:
    with pytest.raises(nbd.Error) as info:
        fn()
    return getattr(errno, info.value.errno)  # libnbd gives the errno's name


# -- real clients ---------------------------------------------------------------------------


def test_nbdinfo_json_reports_size_and_flags(srv: Harness) -> None:
    info = json.loads(run("nbdinfo", "--json", srv.uri))
    [export] = info["exports"]
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    assert export["export-name"] == "vol"
    assert export["description"] == "test volume"
    assert export["export-size"] == 8 * MiB
    assert export["contexts"] == ["base:allocation"]
    assert export["is_read_only"] is False
    for flag in ("cache", "df", "fast_zero", "flush", "fua", "multi_conn", "trim", "zero"):
        assert export[f"can_{flag}"] is True, flag
    sizes = [export[f"block_size_{k}"] for k in ("minimum", "preferred", "maximum")]
    assert sizes == [1, 4096, 32 * MiB]
    assert run("nbdinfo", "--size", srv.uri).strip() == str(8 * MiB)  # NBD_OPT_GO path


def test_nbdinfo_read_only_single_connection(make_server: Callable[..., Harness]) -> None:
    h = make_server(readonly=True, multi_conn=False)
    [export] = json.loads(run("nbdinfo", "--json", h.uri))["exports"]
    assert export["is_read_only"] is True
    assert export["can_multi_conn"] is False
    assert export["can_trim"] is False
    assert export["can_zero"] is False


def test_nbdinfo_list_and_default_export(srv: Harness) -> None:
    info = json.loads(run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{srv.port}"))
    assert [(e["export-name"], e["description"]) for e in info["exports"]] == [
        ("vol", "test volume")
    ]
    # The empty export name selects the export too; an unknown name is refused.
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{srv.port}/").strip() == str(8 * MiB)
    res = subprocess.run(
        ["nbdinfo", "--size", f"nbd://127.0.0.1:{srv.port}/nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0


def test_nbdinfo_map_shows_holes_and_data(srv: Harness) -> None:
    def extents() -> list[tuple[int, int, int]]:
        out = json.loads(run("nbdinfo", "--map", "--json", srv.uri))
        return [(e["offset"], e["length"], e["type"]) for e in out]

    assert extents() == [(0, 8 * MiB, 3)]
    run("qemu-io", "-f", "raw", srv.uri, "-c", f"write -P 0x11 {MiB + 100} 5000")
    assert extents() == [
        (0, MiB, 3),
        (MiB, 8192, 0),  # 4 KiB blocks touched by the write
        (MiB + 8192, 7 * MiB - 8192, 3),
    ]
    run("qemu-io", "-f", "raw", srv.uri, "-c", f"discard {MiB} 8192")
    assert extents() == [(0, 8 * MiB, 3)]


@pytest.mark.parametrize(("offset", "length"), [(4096, 8192), (1000, 9000), (MiB - 1, 3)])
def test_qemu_io_pattern_write_and_read(srv: Harness, offset: int, length: int) -> None:
    out = run(
        "qemu-io",
        "-f",
        "raw",
        srv.uri,
        "-c",
        f"write -P 0xab {offset} {length}",
        "-c",
        f"read -P 0xab {offset} {length}",
        "-c",
        f"read -P 0 {offset + length} 4096",
        "-c",
        "flush",
    )
    assert "Pattern verification failed" not in out
    assert f"read {length}/{length} bytes at offset {offset}" in out
    data = srv.device.data
    assert data[offset : offset + length] == b"\xab" * length
    assert data[offset - 1] == 0 and data[offset + length] == 0
    assert ("flush", 0, 0) in srv.device.log


def test_qemu_io_zero_and_verify(srv: Harness) -> None:
    out = run(
        "qemu-io",
        "-f",
        "raw",
        srv.uri,
        "-c",
        "write -P 0x77 0 65536",
        "-c",
        "write -z 4096 8192",
        "-c",
        "read -P 0x77 0 4096",
        "-c",
        "read -P 0 4096 8192",
        "-c",
        "read -P 0x77 12288 53248",
    )
    assert "Pattern verification failed" not in out
    assert any(op.startswith("write_zeroes") for op, _, _ in srv.device.log)


@pytest.mark.parametrize("extra", [[], ["--connections=4", "--requests=64"]])
def test_nbdcopy_round_trip(srv: Harness, tmp_path: Path, extra: list[str]) -> None:
    src = tmp_path / "src.img"
    dst = tmp_path / "dst.img"
    payload = bytearray(os.urandom(8 * MiB))
    payload[2 * MiB : 3 * MiB] = bytes(MiB)  # a zero region nbdcopy may send as zeroes
    src.write_bytes(payload)
    run("nbdcopy", *extra, str(src), srv.uri)
    assert srv.device.data == payload
    run("nbdcopy", *extra, srv.uri, str(dst))
    assert dst.read_bytes() == payload


# -- libnbd: every command, flags, bounds, errors ------------------------------------------


def test_libnbd_commands(srv: Harness) -> None:
    h = connect(srv)
    dev = srv.device
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context("base:allocation")
    h.pwrite(b"A" * 5000, 100, nbd.CMD_FLAG_FUA)
    assert h.pread(5000, 100) == b"A" * 5000
    assert ("write_fua", 100, 5000) in dev.log
    h.flush()
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    assert ("write_zeroes_nohole", 0, 4096) in dev.log
    h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
    h.trim(4096, 16384)
    h.cache(4096, 0)
    assert h.pread(100, 0) == bytes(100)

    # Blocks 0-1 hold data (the first write); the zeroing at 8192 and the trim left holes.
    seen: list[tuple[str, int, list[int]]] = []

    def extents(ctx: str, off: int, ext: list[int], err: int) -> int:
        seen.append((ctx, off, list(ext)))
        return 0

    h.block_status(32768, 0, extents)
    assert seen == [("base:allocation", 0, [8192, 0, 24576, 3])]
    seen.clear()
    h.block_status(MiB, 0, extents, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [("base:allocation", 0, [8192, 0])]
    seen.clear()
    h.block_status(100, 4000, extents, nbd.CMD_FLAG_REQ_ONE)
    assert seen == [("base:allocation", 4000, [100, 0])]

    chunks: list[tuple[int, int]] = []

    def chunk(sub: bytes, off: int, status: int, err: int) -> int:
        chunks.append((off, len(sub)))
        return 0

    buf = h.pread_structured(3000, 50, chunk, nbd.CMD_FLAG_DF)
    assert buf == dev.data[50:3050]
    assert chunks == [(50, 3000)]
    h.shutdown()


def test_libnbd_simple_replies(srv: Harness) -> None:
    h = connect(srv, structured=False, meta=False, strict_off=nbd.STRICT_BOUNDS)
    assert not h.get_structured_replies_negotiated()
    h.pwrite(b"xyz" * 1000, 7)
    assert h.pread(3000, 7) == b"xyz" * 1000
    assert nbd_errno(lambda: h.pread(10, 8 * MiB - 5)) == errno.EINVAL
    assert h.pread(3, 7) == b"xyz"  # still in sync after an error reply
    h.shutdown()


def test_out_of_range_requests(make_server: Callable[..., Harness]) -> None:
    srv = make_server(size=64 * MiB)
    h = connect(srv, strict_off=nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE)
    end = 64 * MiB
    assert nbd_errno(lambda: h.pread(2, end - 1)) == errno.EINVAL
    assert nbd_errno(lambda: h.pread(1, end)) == errno.EINVAL
    assert nbd_errno(lambda: h.pwrite(b"ab", end - 1)) == errno.ENOSPC
    assert nbd_errno(lambda: h.zero(8192, end - 4096)) == errno.ENOSPC
    assert nbd_errno(lambda: h.trim(8192, end - 4096)) == errno.EINVAL
    assert nbd_errno(lambda: h.cache(8192, end - 4096)) == errno.EINVAL
    assert nbd_errno(lambda: h.block_status(2, end - 1, lambda *a: 0)) == errno.EINVAL
    # Larger than the advertised maximum block size, although inside the export:
    assert nbd_errno(lambda: h.pread(32 * MiB + 1, 0)) == errno.EINVAL
    assert h.pread(0, 0) == b""  # zero-length requests are answered, not dropped
    h.pwrite(b"", 0)
    assert h.pread(4, end - 4) == bytes(4)
    assert [op for op, _, _ in srv.device.log] == ["read"]  # nothing bad reached the device
    h.shutdown()


def test_unknown_and_misplaced_flags_get_einval(srv: Harness) -> None:
    h = connect(srv, strict_off=nbd.STRICT_FLAGS | nbd.STRICT_COMMANDS)
    assert nbd_errno(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)) == errno.EINVAL
    assert nbd_errno(lambda: h.pread(512, 0, 0x20)) == errno.EINVAL
    assert nbd_errno(lambda: h.pwrite(b"x", 0, nbd.CMD_FLAG_NO_HOLE)) == errno.EINVAL
    assert nbd_errno(lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO)) == errno.EINVAL
    assert nbd_errno(lambda: h.zero(512, 0, nbd.CMD_FLAG_DF)) == errno.EINVAL
    assert h.pread(1, 0) == b"\0"
    assert [op for op, _, _ in srv.device.log] == ["read"]
    h.shutdown()


def test_block_status_without_meta_context(srv: Harness) -> None:
    h = connect(srv, meta=False, strict_off=nbd.STRICT_COMMANDS)
    assert nbd_errno(lambda: h.block_status(512, 0, lambda *a: 0)) == errno.EINVAL
    h.shutdown()


def test_device_turning_read_only_refuses_writes_with_eperm(srv: Harness) -> None:
    h = connect(srv)
    h.pwrite(b"1", 0)
    srv.device.readonly = True  # e.g. the volume lost its write quorum
    assert not h.is_read_only()  # flags stay as negotiated
    assert nbd_errno(lambda: h.pwrite(b"2", 0)) == errno.EPERM
    assert nbd_errno(lambda: h.trim(4096, 0)) == errno.EPERM
    assert nbd_errno(lambda: h.zero(4096, 0)) == errno.EPERM
    assert h.pread(1, 0) == b"1"
    h2 = connect(srv)
    assert h2.is_read_only()  # a new connection sees the state at its handshake
    assert nbd_errno(lambda: h2.pwrite(b"2", 0)) == errno.EPERM  # refused by libnbd itself
    h.shutdown()
    h2.shutdown()


@pytest.mark.parametrize(
    ("op", "error", "expected", "structured"),
    [
        ("write", MediumError("replica gone"), errno.EIO, True),
        ("write", MediumError("replica gone"), errno.EIO, False),
        ("write", NoSpace("replica disk full"), errno.ENOSPC, True),
        ("write", NoSpace("replica disk full"), errno.ENOSPC, False),
        ("read", MediumError("bad sector"), errno.EIO, True),
        ("read", MediumError("bad sector"), errno.EIO, False),  # simple reply, no payload
        ("flush", MediumError("fsync failed"), errno.EIO, True),
        ("flush", MediumError("fsync failed"), errno.EIO, False),
        ("block_status", MediumError("map lost"), errno.EIO, True),
    ],
)
def test_device_errors_map_to_nbd_errors(
    srv: Harness, op: str, error: Exception, expected: int, structured: bool
) -> None:
    srv.device.fail[op] = error  # type: ignore[assignment]
    h = connect(srv, structured=structured, meta=structured)
    calls = {
        "write": lambda: h.pwrite(b"data", 0),
        "read": lambda: h.pread(4, 0),
        "flush": lambda: h.flush(),
        "block_status": lambda: h.block_status(4, 0, lambda *a: 0),
    }
    assert nbd_errno(calls[op]) == expected
    srv.device.fail.clear()
    calls[op]()  # the connection survives a failed command
    h.shutdown()


# -- concurrency, ordering, backpressure ----------------------------------------------------


def wait_all(h: Any, cookies: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    pending = set(cookies)
    while pending:
        # aio_command_completed() retires a cookie: ask about each one until it is done.
        pending = {c for c in pending if not h.aio_command_completed(c)}
        assert time.monotonic() < deadline, "commands did not complete"
        if pending:
            h.poll(100)  # bounded: a signal timeout cannot interrupt libnbd


def test_requests_run_concurrently_up_to_the_bound(make_server: Callable[..., Harness]) -> None:
    srv = make_server(max_in_flight=4)
    srv.device.delay["read"] = 0.02
    h = connect(srv)
    bufs = [nbd.Buffer(4096) for _ in range(40)]
    cookies = [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs)]
    wait_all(h, cookies)
    assert srv.device.peak_concurrency == 4  # concurrent, and never above the bound
    assert sum(1 for op, _, _ in srv.device.log if op == "read") == 40
    h.shutdown()


def test_replies_go_out_in_completion_order(srv: Harness) -> None:
    srv.device.delay["write"] = 0.3
    h = connect(srv)
    order: list[str] = []

    def done(name: str) -> Callable[[int], int]:
        def cb(err: int) -> int:
            order.append(name)
            return 0  # 1 would retire the command before aio_command_completed sees it

        return cb

    w = h.aio_pwrite(b"w" * 4096, 0, completion=done("write"))
    r = h.aio_pread(nbd.Buffer(4096), 8192, completion=done("read"))
    wait_all(h, [w, r])
    assert order == ["read", "write"]
    h.shutdown()


def test_flush_waits_for_writes_received_before_it(srv: Harness) -> None:
    srv.device.delay["write"] = 0.2
    h = connect(srv)
    cookies = [h.aio_pwrite(b"q" * 4096, i * 4096) for i in range(3)]
    cookies.append(h.aio_flush())
    wait_all(h, cookies)
    ops = [op for op, _, _ in srv.device.log]
    assert ops == ["write", "write", "write", "flush"]
    h.shutdown()


def raw_go(port: int, structured: bool = False) -> socket.socket:
    """A raw client through the fixed newstyle handshake and NBD_OPT_GO."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = recv_exact(s, 18)
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    s.sendall(struct.pack(">I", 3))
    if structured:
        s.sendall(p.encode_option(p.NBD_OPT_STRUCTURED_REPLY))
        assert read_option_reply(s)[1] == p.NBD_REP_ACK
    s.sendall(p.encode_option(p.NBD_OPT_GO, p.encode_info_request("vol")))
    while (reply := read_option_reply(s))[1] != p.NBD_REP_ACK:
        assert reply[1] == p.NBD_REP_INFO
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_option_reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == 0x3E889045565A9
    return opt, rtype, recv_exact(s, length)


def read_simple(s: socket.socket, payload: int = 0) -> tuple[int, int, bytes]:
    magic, error, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698
    return error, handle, recv_exact(s, payload) if not error else b""


def assert_closed_by_server(s: socket.socket) -> None:
    """Read until the server closes (a timeout fails the test), then close our end."""
    s.settimeout(10)
    try:
        with contextlib.suppress(ConnectionResetError):
            while s.recv(65536):
                pass
    finally:
        s.close()


def test_backpressure_stops_reading_when_replies_are_not_read(
    make_server: Callable[..., Harness],
) -> None:
    srv = make_server(max_in_flight=4)
    s = raw_go(srv.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    requests = b"".join(p.encode_request(p.NBD_CMD_READ, i, 0, MiB) for i in range(2000))
    s.sendall(requests)  # 56 KB of requests asking for 2 GB of replies, never read
    time.sleep(1.0)
    reads = sum(1 for op, _, _ in srv.device.log if op == "read")
    # In flight (4) plus what the socket buffers absorbed, far from all 2000:
    assert 4 <= reads < 40
    s.close()


def test_backpressure_releases_when_the_client_reads(make_server: Callable[..., Harness]) -> None:
    srv = make_server(max_in_flight=2)
    s = raw_go(srv.port)
    s.sendall(b"".join(p.encode_request(p.NBD_CMD_READ, i, 0, 256 * 1024) for i in range(64)))
    handles = {read_simple(s, 256 * 1024)[1] for _ in range(64)}
    assert handles == set(range(64))
    s.close()


# -- broken clients -------------------------------------------------------------------------


@pytest.fixture
def bystander(srv: Harness) -> Iterator[Any]:
    """A healthy libnbd connection that must survive whatever the broken client does."""
    h = connect(srv)
    h.pwrite(b"healthy", 0)
    yield h
    assert h.pread(7, 0) == b"healthy"
    h.shutdown()


def test_bad_request_magic_drops_only_that_connection(srv: Harness, bystander: Any) -> None:
    s = raw_go(srv.port)
    s.sendall(b"\x00" * 28)
    assert_closed_by_server(s)
    assert bystander.pread(7, 0) == b"healthy"


def test_truncated_request_then_eof(srv: Harness, bystander: Any) -> None:
    s = raw_go(srv.port)
    s.sendall(p.encode_request(p.NBD_CMD_WRITE, 1, 0, 100, 0, b"only part")[:20])
    s.shutdown(socket.SHUT_WR)
    assert_closed_by_server(s)
    s.close()
    s = raw_go(srv.port)
    s.sendall(p.encode_request(p.NBD_CMD_WRITE, 1, 0, 100, 0, b"only part"))
    s.close()
    deadline = time.monotonic() + 5
    while srv.connections() > 1:  # only the bystander is left
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert srv.device.data[:7] == b"healthy"  # the partial write never reached the device


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # unknown client flags
        b"\xff" * 4,
        struct.pack(">I", 3) + bytes(range(256)) * 4,  # valid flags, then no IHAVEOPT magic
    ],
)
def test_garbage_handshake_is_disconnected(srv: Harness, bystander: Any, garbage: bytes) -> None:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    recv_exact(s, 18)
    s.sendall(garbage)
    assert_closed_by_server(s)
    assert bystander.pread(7, 0) == b"healthy"


def test_garbage_in_transmission_is_disconnected(srv: Harness, bystander: Any) -> None:
    s = raw_go(srv.port)
    s.sendall(os.urandom(4096))
    assert_closed_by_server(s)


def test_oversize_write_is_refused_and_the_stream_stays_in_sync(
    srv: Harness, bystander: Any
) -> None:
    s = raw_go(srv.port)
    length = 32 * MiB + 1
    s.sendall(p.encode_request(p.NBD_CMD_WRITE, 5, 0, length))
    s.sendall(b"\xee" * length)
    s.sendall(p.encode_request(p.NBD_CMD_READ, 6, 0, 7))
    assert read_simple(s) == (p.NBD_EINVAL, 5, b"")
    assert read_simple(s, 7) == (0, 6, b"healthy")
    s.close()


def test_unknown_command_gets_einval(srv: Harness) -> None:
    s = raw_go(srv.port, structured=True)
    s.sendall(p.encode_request(42, 9, 0, 0) + p.encode_request(p.NBD_CMD_FLUSH, 10))
    magic, flags, ctype, handle, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (magic, flags, ctype, handle) == (0x668E33EF, 1, p.NBD_REPLY_TYPE_ERROR, 9)
    error, msg_len = struct.unpack(">IH", recv_exact(s, length)[:6])
    assert error == p.NBD_EINVAL and msg_len > 0
    assert read_simple(s) == (0, 10, b"")
    s.sendall(p.encode_request(p.NBD_CMD_DISC, 11))
    assert_closed_by_server(s)


def test_export_name_handshake_with_and_without_zeroes(srv: Harness) -> None:
    for client_flags, tail in ((1, 124), (3, 0)):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", client_flags) + p.encode_option(p.NBD_OPT_EXPORT_NAME, b"vol"))
        size, flags = struct.unpack(">QH", recv_exact(s, 10))
        assert size == 8 * MiB and flags & p.NBD_FLAG_SEND_FLUSH
        assert recv_exact(s, tail) == bytes(tail)
        s.sendall(p.encode_request(p.NBD_CMD_READ, 1, 0, 4))
        assert read_simple(s, 4) == (0, 1, bytes(4))
        s.close()


def test_option_errors_over_the_wire(srv: Harness) -> None:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(p.encode_option(p.NBD_OPT_STARTTLS))
    assert read_option_reply(s)[1] == p.NBD_REP_ERR_POLICY
    s.sendall(p.encode_option(77, b"whatever"))
    assert read_option_reply(s)[1] == p.NBD_REP_ERR_UNSUP
    s.sendall(p.encode_option(p.NBD_OPT_LIST, b"\x00" * (p.MAX_OPTION_DATA + 1)))
    assert read_option_reply(s)[1] == p.NBD_REP_ERR_TOO_BIG
    s.sendall(p.encode_option(p.NBD_OPT_ABORT))
    assert read_option_reply(s)[1] == p.NBD_REP_ACK
    assert_closed_by_server(s)


def test_libnbd_option_mode_list_info_abort(srv: Harness) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(srv.uri)
    names: list[tuple[str, str]] = []
    contexts: list[str] = []

    def on_export(name: str, desc: str) -> int:
        names.append((name, desc))
        return 0

    def on_context(name: str) -> int:
        contexts.append(name)
        return 0

    assert h.opt_list(on_export) == 1
    assert names == [("vol", "test volume")]
    h.opt_list_meta_context(on_context)
    assert contexts == ["base:allocation"]
    h.opt_info()
    assert h.get_size() == 8 * MiB
    assert h.get_canonical_export_name() == "vol"
    assert h.get_export_description() == "test volume"
    h.opt_abort()
    assert h.aio_is_closed() or h.aio_is_dead()


def test_close_disconnects_every_client(srv: Harness) -> None:
    idle = raw_go(srv.port)
    mid_handshake = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    recv_exact(mid_handshake, 18)
    srv.device.delay["write"] = 0.3
    busy = raw_go(srv.port)
    busy.sendall(p.encode_request(p.NBD_CMD_WRITE, 1, 0, 4, 0, b"last"))
    time.sleep(0.1)
    started = time.monotonic()
    srv.call(srv.server.close())
    assert time.monotonic() - started < 5
    # The in-flight write was finished and answered before the connection closed.
    assert read_simple(busy) == (0, 1, b"")
    assert srv.device.data[:4] == b"last"
    for s in (idle, mid_handshake, busy):
        assert_closed_by_server(s)
        s.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2)
