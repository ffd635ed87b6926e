"""The native engine in-process: its Python wrapper, and the replica side served from it
(framing, errors, ordering, pause, write intent, stats), over real sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import native
from replica import protocol as p
from replica.block import BlockError
from replica.client import ReplicaClient, ReplicaError
from replica.protocol import Op
from replica.store import INTENT_FILE, ReplicaStore

pytestmark = pytest.mark.skipif(
    native.engine_unavailable() is not None, reason=str(native.engine_unavailable())
)

SIZE = 16 << 20
BLOCK = 4096


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


class Served:
    """A NativeReplicaServer on a fresh store, with helpers to talk to it."""

    def __init__(self, directory: Path) -> None:
        from replica.native_server import NativeReplicaServer

        self.store = ReplicaStore.create(directory, SIZE, "v")
        self.server = NativeReplicaServer(self.store)
        self.clients: list[ReplicaClient] = []

    async def __aenter__(self) -> Served:
        await self.server.start("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            c.close()
        await self.server.close()
        self.store.close(clean=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def client(self, epoch: int | None = 1) -> ReplicaClient:
        c = ReplicaClient(self.address, timeout=20)
        await c.connect()
        if epoch is not None:
            await c.open(epoch)
        self.clients.append(c)
        return c


def served(tmp_path: Path) -> Served:
    return Served(tmp_path / "r")


async def raw(port: int, data: bytes, shut: bool = True, timeout: float = 5) -> bytes:
    """Send bytes on a fresh connection, half-close, and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if shut:
        writer.write_eof()
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 20), timeout):
            out += chunk
    finally:
        writer.close()
    return out


def responses(data: bytes) -> list[p.Response]:
    dec = p.ResponseDecoder()
    dec.feed(data)
    out = []
    while (r := dec.next()) is not None:
        out.append(r)
    return out


# --- the wrapper --------------------------------------------------------------------------


def test_engine_starts_pauses_and_stops_without_a_store() -> None:
    from native.engine import Engine, EngineHandler

    async def scenario() -> None:
        eng = Engine(EngineHandler())
        eng.attach(asyncio.get_running_loop())
        await asyncio.wait_for(eng.pause(), 5)  # nothing in flight: paused at once
        eng.resume()
        eng.close()
        eng.close()  # idempotent
        assert not eng.running
        with pytest.raises(OSError):
            await eng.pause()

    run(scenario())


def test_many_engines_start_and_stop() -> None:
    from native.engine import Engine, EngineHandler

    for _ in range(20):
        Engine(EngineHandler()).close()


def test_add_conn_to_stopped_engine_closes_the_fd() -> None:
    from native.engine import CONN_REPLICA_SERVER, Engine, EngineHandler

    eng = Engine(EngineHandler())
    eng.close()
    a, b = socket.socketpair()
    with pytest.raises(OSError):
        eng.add_conn(1, a.detach(), CONN_REPLICA_SERVER)
    b.settimeout(2)
    assert b.recv(10) == b""  # the engine side was closed
    b.close()


# --- the replica side ---------------------------------------------------------------------


def test_read_write_unaligned_and_holes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            assert await c.read(0, 3 * BLOCK) == bytes(3 * BLOCK)
            await c.write(BLOCK, b"a" * BLOCK)
            await c.write(BLOCK + 100, b"xyz")  # read-modify-write of one block
            await c.write(3 * BLOCK - 10, b"q" * 30)  # crosses a block boundary
            want = bytearray(4 * BLOCK)
            want[BLOCK : 2 * BLOCK] = b"a" * BLOCK
            want[BLOCK + 100 : BLOCK + 103] = b"xyz"
            want[3 * BLOCK - 10 : 3 * BLOCK + 20] = b"q" * 30
            assert await c.read(0, 4 * BLOCK) == want
            assert await c.read(BLOCK + 99, 5) == b"axyza"
            ext = [(e.offset, e.length, e.flags) for e in await c.block_status(0, 5 * BLOCK)]
            assert ext == [(0, BLOCK, 3), (BLOCK, 3 * BLOCK, 0), (4 * BLOCK, BLOCK, 3)]
            assert await c.checksum(0, 4 * BLOCK) == native.crc32c(bytes(want))
            assert s.store.read(0, 4 * BLOCK) == want  # the Python store sees the same files

    run(scenario())


def test_store_batches_on_pythons_behalf_go_through_the_engine(tmp_path: Path) -> None:
    """EngineStore.put_pieces/read_pieces (a rebuild's batches): one engine call each, in
    order with the connections' requests; zero pieces become holes; a bad piece fails the
    batch with a clear error while the others are done."""
    from replica.block import OutOfRange
    from replica.native_server import EngineStore

    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            await c.write(0, b"o" * (8 * BLOCK))
            store = EngineStore(s.server)
            ranges = [(BLOCK, BLOCK), (3 * BLOCK, BLOCK), (5 * BLOCK + 7, 2)]
            data = b"a" * BLOCK + bytes(BLOCK) + b"bc"
            assert store.put_pieces(ranges, data) == BLOCK  # the zero piece was unmapped
            assert store.read_pieces([*ranges, (0, 3)]) == data + b"ooo"
            ext = [(e.offset, e.length, e.flags) for e in await c.block_status(0, 8 * BLOCK)]
            assert (3 * BLOCK, BLOCK, 3) in ext
            assert await c.read(5 * BLOCK + 6, 4) == b"obco"  # the connection sees them
            eng = s.server._engine
            assert eng is not None
            with pytest.raises(OSError):
                eng.iov([(Op.WRITE, 0, BLOCK, 0, 0), (Op.READ, SIZE, BLOCK, 0, 0)], b"z" * BLOCK)
            assert await c.read(0, 2) == b"zz"  # the good one of the failed batch was done
            with pytest.raises(ValueError, match="outside the buffer"):
                eng.iov([(Op.WRITE, 0, BLOCK, 0, 1)], b"z" * BLOCK)
            with pytest.raises(OutOfRange):
                store.read_pieces([(0, 1), (SIZE, 1)])
            assert store.put_pieces([], b"") == 0 and store.read_pieces([]) == b""
            # The Python store does the same.
            assert s.store.read_pieces([*ranges, (0, 3)]) == data + b"zzz"

    run(scenario())


def test_unmap_and_write_zeroes_follow_the_store_rules(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            await c.write(0, b"d" * (16 * BLOCK))
            await c.unmap(2 * BLOCK, 4 * BLOCK)  # whole head-only blocks: punched
            await c.write_zeroes(8 * BLOCK, 2 * BLOCK, may_unmap=False)  # stays allocated
            await c.unmap(12 * BLOCK + 5, 10)  # inside a block: written as zeros
            ext = [(e.offset, e.length, e.flags) for e in await c.block_status(0, 16 * BLOCK)]
            assert ext == [(0, 2 * BLOCK, 0), (2 * BLOCK, 4 * BLOCK, 3), (6 * BLOCK, 10 * BLOCK, 0)]
            data = await c.read(0, 16 * BLOCK)
            assert data[2 * BLOCK : 6 * BLOCK] == bytes(4 * BLOCK)
            assert data[8 * BLOCK : 10 * BLOCK] == bytes(2 * BLOCK)
            assert data[12 * BLOCK + 5 : 12 * BLOCK + 15] == bytes(10)
            assert data[12 * BLOCK + 15] == ord("d")
            # An unmap of never-written partial blocks allocates nothing.
            await c.unmap(100 * BLOCK + 1, 2 * BLOCK)
            ext = await c.block_status(100 * BLOCK, 3 * BLOCK)
            assert [(e.offset, e.length, e.flags) for e in ext] == [(100 * BLOCK, 3 * BLOCK, 3)]

    run(scenario())


def test_snapshot_pauses_and_swaps_layers(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            await c.write(0, b"1" * (4 * BLOCK))
            # Writes in flight around the snapshot: each lands on one side of it, none is lost.
            writes = [c.write(i * BLOCK, bytes([65 + i]) * BLOCK) for i in range(8, 40)]
            await asyncio.gather(*writes[:16], c.snapshot("s1"), *writes[16:])
            assert s.store.snapshots() == ["s1"]
            await c.write(BLOCK, b"2" * BLOCK)
            await c.unmap(2 * BLOCK, BLOCK)  # a snapshot holds it: zeros written, not a hole
            data = await c.read(0, 4 * BLOCK)
            assert data == b"1" * BLOCK + b"2" * BLOCK + bytes(BLOCK) + b"1" * BLOCK
            for i in range(8, 40):
                assert await c.read(i * BLOCK, BLOCK) == bytes([65 + i]) * BLOCK
            ext = [(e.offset, e.length, e.flags) for e in await c.block_status(0, 4 * BLOCK)]
            assert ext == [(0, 4 * BLOCK, 0)]
            assert s.server.stats.ops["SNAPSHOT"] == 1
            with pytest.raises(BlockError, match="already exists"):
                await c.snapshot("s1")

    run(scenario())


def test_pipelined_overlapping_writes_apply_in_arrival_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            want = bytearray(8 * BLOCK)
            futs = []
            rng = random.Random(7)
            for i in range(300):
                off = rng.randrange(0, 8 * BLOCK - 600)
                n = rng.randrange(1, 600)
                data = bytes([i % 251 + 1]) * n
                want[off : off + n] = data
                futs.append(c._submit(Op.WRITE, off, n, 0, data))
            futs.append(c._submit(Op.READ, 0, 8 * BLOCK))
            res = await asyncio.gather(*futs)
            assert all(r.status == 0 for r in res)
            assert res[-1].payload == want  # the read came after every write
            assert await c.read(0, 8 * BLOCK) == want

    run(scenario())


def test_epoch_fencing_and_open_barrier(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client(epoch=None)
            with pytest.raises(ReplicaError) as e:
                await c.write(0, b"x" * BLOCK)
            assert e.value.errno == p.Status.EPERM
            # OPEN is a barrier: the write pipelined right behind it is accepted.
            opened = c._submit(Op.OPEN, payload=b'{"epoch": 3}')
            wrote = c._submit(Op.WRITE, 0, BLOCK, 0, b"y" * BLOCK)
            assert (await opened).status == 0 and (await wrote).status == 0
            newer = await s.client(epoch=4)
            with pytest.raises(ReplicaError) as e:
                await c.write(0, b"z" * BLOCK)
            assert e.value.errno == p.Status.ESTALE
            await newer.write(0, b"n" * BLOCK)
            assert await c.read(0, BLOCK) == b"n" * BLOCK  # reads stay allowed
            await newer.close_session()
            with pytest.raises(ReplicaError) as e:
                await newer.write(0, b"z" * BLOCK)
            assert e.value.errno == p.Status.EPERM  # CLOSE ended the session

    run(scenario())


def test_protocol_errors_answer_and_keep_or_close_the_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            port = s.server.port
            good = p.encode_request(Op.PING, 5, payload=b"hi")
            bad_flags = p.encode_request(Op.READ, 6, 0, BLOCK, flags=0x80)
            beyond = p.encode_request(Op.READ, 7, SIZE, 1)
            unknown = p.encode_request(99, 8)
            big_read = p.encode_request(Op.READ, 9, 0, p.MAX_PAYLOAD + 1)
            out = responses(await raw(port, good + bad_flags + beyond + unknown + big_read))
            by_tag = {r.tag: r for r in out}
            assert by_tag[5].status == 0 and by_tag[5].payload == b"hi"
            assert by_tag[6].status == p.Status.EINVAL and "flags" in by_tag[6].message
            assert by_tag[7].status == p.Status.EINVAL and "beyond size" in by_tag[7].message
            assert by_tag[8].status == p.Status.ENOTSUP
            assert by_tag[9].status == p.Status.EINVAL
            # A bad magic: EPROTO with tag 0, then the connection closes (after the answers
            # to what came before).
            junk = good + b"\xff" * 200_000
            out = responses(await raw(port, junk))
            assert [(r.tag, r.status) for r in out] == [(5, 0), (0, p.Status.EPROTO)]
            oversize = p.REQ.pack(p.REQ_MAGIC, Op.WRITE, 0, 0, 1, 0, 1 << 30, 1 << 30)
            out = responses(await raw(port, oversize, shut=False))
            assert [(r.tag, r.status) for r in out] == [(0, p.Status.EPROTO)]
            assert s.server.stats.errors >= 6
            await asyncio.sleep(0.1)
            assert s.server.stats.connections == 0

    run(scenario())


def test_byte_at_a_time_and_large_payloads(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            big = os.urandom(5 << 20)  # larger than the receive buffer: received in place
            await c.write(BLOCK * 3 + 7, big)  # in 64 KiB pieces, edge blocks at both ends
            assert await c.read(BLOCK * 3 + 7, len(big)) == big
            assert s.store.read(BLOCK * 3, BLOCK + len(big)) == bytes(7) + big + bytes(BLOCK - 7)
            reader, writer = await asyncio.open_connection("127.0.0.1", s.server.port)
            req = p.encode_request(Op.READ, 1, BLOCK * 3 + 7, 100)
            req += p.encode_request(Op.PING, 2, payload=b"p" * 10)
            for i in range(len(req)):  # one byte per segment
                writer.write(req[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
            dec = p.ResponseDecoder()
            got: list[p.Response] = []
            while len(got) < 2:
                dec.feed(await asyncio.wait_for(reader.read(65536), 5))
                while (r := dec.next()) is not None:
                    got.append(r)
            assert got[0].payload == big[:100] and got[1].payload == b"p" * 10
            writer.close()

    run(scenario())


def test_half_close_still_gets_every_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            reqs = b"".join(p.encode_request(Op.READ, i, i * BLOCK, BLOCK) for i in range(1, 200))
            out = responses(await raw(s.server.port, reqs))
            assert sorted(r.tag for r in out) == list(range(1, 200))

    run(scenario())


def test_pause_holds_io_until_resume(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            await c.write(0, b"a" * BLOCK)
            eng = s.server._engine
            assert eng is not None
            await eng.pause()
            read = asyncio.ensure_future(c.read(0, BLOCK))
            await asyncio.sleep(0.3)
            assert not read.done()
            await c.ping()  # no data: not held
            eng.resume()
            assert await asyncio.wait_for(read, 5) == b"a" * BLOCK

    run(scenario())


def test_write_intent_marked_durably_then_cleared_by_close(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            region = s.store.intent.region
            await c.write(3 * region + 5, b"w" * 10)
            await c.unmap(5 * region, BLOCK)
            raw_intent = (tmp_path / "r" / INTENT_FILE).read_bytes()
            magic, reg, count = struct.unpack_from("<8sQQ", raw_intent)
            assert (magic, reg, count) == (b"TNDINT01", region, s.store.intent.count)
            marked = raw_intent[24:]
            assert [i for i, m in enumerate(marked) if m] == [3, 5]
            assert s.server.info()["dirty_regions"] == [(3 * region, region), (5 * region, region)]
            await c.close_session()  # clean end: every mark cleared, durably
            assert not any((tmp_path / "r" / INTENT_FILE).read_bytes()[24:])
            assert s.server.info()["dirty"] is False

    run(scenario())


def test_stats_count_io_in_c_and_no_upcalls_per_io(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            await asyncio.gather(*(c.write(i * BLOCK, b"s" * BLOCK) for i in range(100)))
            await asyncio.gather(*(c.read(i * BLOCK, BLOCK) for i in range(100)))
            await c.flush()
            st = s.server.stats
            assert st.ops["WRITE"] == 100 and st.ops["READ"] == 100 and st.ops["FLUSH"] == 1
            assert st.ops["OPEN"] == 1
            assert st.bytes_written == 100 * BLOCK and st.bytes_read == 100 * BLOCK
            assert st.upcalls == 1  # the OPEN, nothing per I/O
            assert st.connections == 1
            from replica.api import make_app

            make_app(s.server)  # type: ignore[arg-type]  # the API accepts it

    run(scenario())


def test_flush_and_fua_reach_the_disk(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            await c.write(0, b"f" * BLOCK, fua=True)
            await c.flush()
            assert s.server.stats.ops["FLUSH"] == 1
            with open(tmp_path / "r" / s.store.meta.chain[-1].file, "rb") as f:
                assert f.read(BLOCK) == b"f" * BLOCK

    run(scenario())


def test_closing_the_server_with_requests_in_flight(tmp_path: Path) -> None:
    async def scenario() -> None:
        s = served(tmp_path)
        await s.__aenter__()
        c = await s.client()
        futs = [c._submit(Op.WRITE, i * BLOCK, BLOCK, 0, b"c" * BLOCK) for i in range(200)]
        await asyncio.sleep(0)
        await s.server.close()
        await asyncio.gather(*futs, return_exceptions=True)
        c.close()
        s.store.close(clean=True)

    run(scenario())


def test_many_connections_in_parallel(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            clients = [await s.client() for _ in range(8)]

            async def worker(i: int, c: ReplicaClient) -> None:
                for k in range(20):
                    off = (i * 64 + k) * BLOCK
                    await c.write(off, bytes([i + 1]) * BLOCK)
                    assert await c.read(off, BLOCK) == bytes([i + 1]) * BLOCK

            t0 = time.monotonic()
            await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
            assert time.monotonic() - t0 < 20
            assert s.server.stats.connections == 8

    run(scenario())


def test_resize_grows_maps_and_intent_while_paused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            c = await s.client()
            await c.write(SIZE - BLOCK, b"e" * BLOCK)
            with pytest.raises(BlockError, match="beyond size"):
                await c.write(SIZE, b"x" * BLOCK)
            writes = [c.write(i * BLOCK, b"r" * BLOCK) for i in range(64)]
            await asyncio.gather(*writes[:32], c.resize(4 * SIZE), *writes[32:])
            assert s.store.size == 4 * SIZE
            await c.write(3 * SIZE + 5, b"grown")
            assert await c.read(3 * SIZE + 5, 5) == b"grown"
            assert await c.read(SIZE - BLOCK, BLOCK) == b"e" * BLOCK
            assert await c.read(0, 64 * BLOCK) == b"r" * (64 * BLOCK)
            ext = await c.block_status(SIZE, 3 * SIZE)
            assert [(e.offset, e.flags) for e in ext][:2] == [(SIZE, 3), (3 * SIZE, 0)]
            # The engine writes the new intent log (its geometry changed with the size).
            await c.close_session()
            c = await s.client(epoch=2)
            await c.write(3 * SIZE + 5, b"grown")
            raw_intent = (tmp_path / "r" / INTENT_FILE).read_bytes()
            _magic, _region, count = struct.unpack_from("<8sQQ", raw_intent)
            assert count == s.store.intent.count == len(raw_intent) - 24
            marked = [i for i, m in enumerate(raw_intent[24:]) if m]
            assert marked == [3 * SIZE // s.store.intent.region]
            await c.snapshot("after-resize")
            await c.write(3 * SIZE, b"h" * BLOCK)
            assert await c.read(3 * SIZE, BLOCK + 10) == b"h" * BLOCK + bytes(10)

    run(scenario())


def test_clients_vanishing_mid_payload_and_mid_flight(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            port = s.server.port
            opened = p.encode_request(Op.OPEN, 1, payload=b'{"epoch": 1}')
            big = p.encode_request(Op.WRITE, 2, 0, 1 << 20, payload=b"b" * (1 << 20))
            for cut in (10, 32, 5000, 400_000, len(big) - 1):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(opened + big[:cut])
                sock.close()
            writes = b"".join(
                p.encode_request(Op.WRITE, i, i * BLOCK, BLOCK, payload=b"w" * BLOCK)
                for i in range(10, 400)
            )
            for _ in range(5):  # reset with requests in flight and replies unsent
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(opened + writes)
                sock.close()
            deadline = time.monotonic() + 5
            while s.server.stats.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert s.server.stats.connections == 0
            c = await s.client()
            await c.write(0, b"k" * BLOCK)
            assert await c.read(0, BLOCK) == b"k" * BLOCK

    run(scenario())


def test_large_payload_behind_a_control_request(tmp_path: Path) -> None:
    """The pump resumes after Python's answer while a receive is armed on the buffer, and
    finds a payload too large for it: its first bytes are in the buffer, the next ones land
    there too (the receive was armed before), the rest in place."""

    async def scenario() -> None:
        async with served(tmp_path) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.server.port)
            data = os.urandom(1 << 20)
            head = p.encode_request(Op.OPEN, 1, payload=b'{"epoch": 1}')
            head += p.encode_request(Op.WRITE, 2, 0, BLOCK, payload=b"s" * BLOCK)
            head += p.encode_request(Op.INFO, 3)
            big = p.encode_request(Op.WRITE, 4, 7, len(data), payload=data)
            tail = p.encode_request(Op.READ, 5, 7, len(data))
            writer.write(head + big[:1000])
            await writer.drain()
            await asyncio.sleep(0.3)  # INFO answered, the big write's header parsed
            writer.write(big[1000:5000])
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(big[5000:] + tail)
            await writer.drain()
            dec = p.ResponseDecoder()
            got: dict[int, p.Response] = {}
            while len(got) < 5:
                dec.feed(await asyncio.wait_for(reader.read(1 << 20), 5))
                while (r := dec.next()) is not None:
                    got[r.tag] = r
            assert all(r.status == 0 for r in got.values()), got
            assert got[5].payload == data
            writer.close()

    run(scenario())


def test_copy_from_pulls_through_the_engine_while_io_goes_on(tmp_path: Path) -> None:
    """COPY_FROM (rebuild): the puller's store I/O goes through the destination's engine,
    and the connection is not held while it runs."""

    async def scenario() -> None:
        async with Served(tmp_path / "src") as src, Served(tmp_path / "dst") as dst:
            a = await src.client()
            want = bytearray(SIZE)
            rng = random.Random(3)
            for _ in range(200):
                off, n = rng.randrange(SIZE - 70_000), rng.randrange(1, 70_000)
                data = rng.randbytes(n)
                await a.write(off, data)
                want[off : off + n] = data
            await a.unmap(SIZE // 2, SIZE // 8)
            want[SIZE // 2 : SIZE // 2 + SIZE // 8] = bytes(SIZE // 8)
            b = await dst.client()
            await b.write(SIZE - BLOCK, b"stale" * 100)  # overwritten by the copy
            copy = asyncio.ensure_future(b.copy_from(src.address, [(0, SIZE)]))
            others = [await b.read(0, BLOCK) for _ in range(20)]  # not held behind it
            assert len(others) == 20
            stats = await copy
            assert stats["copied"] > 0 and stats["unmapped"] > 0
            assert await b.read(0, SIZE) == want
            ext_src = await a.block_status(0, SIZE)
            ext_dst = await b.block_status(0, SIZE)
            assert [(e.offset, e.length, e.flags) for e in ext_src] == [
                (e.offset, e.length, e.flags) for e in ext_dst
            ]
            assert dst.server.stats.upcalls == 2  # OPEN, COPY_FROM: the data moved in C
            region = dst.store.intent.region
            assert len(dst.server.info()["dirty_regions"]) >= 1
            assert dst.store.intent.marked[(SIZE - 1) // region] == 1

    run(scenario())


def test_copy_from_that_fails_unexpectedly_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the puller (not a BlockError) answers EIO at once: the target must not wait
    for its copy deadline."""

    async def broken(*_args: object, **_kw: object) -> dict[str, int]:
        raise RuntimeError("a bug")

    async def scenario() -> None:
        async with Served(tmp_path / "src") as src, Served(tmp_path / "dst") as dst:
            monkeypatch.setattr(dst.server.puller, "copy", broken)
            b = await dst.client()
            with pytest.raises(ReplicaError, match="a bug") as e:
                await asyncio.wait_for(b.copy_from(src.address, [(0, BLOCK)]), 5)
            assert e.value.errno == p.Status.EIO
            await b.ping()  # the connection goes on

    run(scenario())
