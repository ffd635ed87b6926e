"""The replica process over its data protocol: fencing, errors, garbage, restart checks."""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from native import engine_unavailable as native_unavailable
from replica import protocol as p
from replica.client import ReplicaClient, ReplicaError
from tests.procs import HOST, Proc, free_port, http_json, wait_port


def start_replica(tmp_path: Path, name: str = "r", *extra: str) -> tuple[Proc, int, int]:
    data, api = free_port(), free_port()
    proc = Proc(
        f"replica-{name}",
        [
            "replica",
            "serve",
            "--dir",
            str(tmp_path / name),
            "--size",
            "16M",
            "--volume",
            "v",
            "--listen",
            f"{HOST}:{data}",
            "--api",
            f"{HOST}:{api}",
            *extra,
        ],
        tmp_path,
    )
    proc.start()
    wait_port(data, proc.proc)
    return proc, data, api


@pytest.fixture
def replica(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc, data, api = start_replica(tmp_path)
    yield proc, data, api
    proc.stop()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_newer_epoch_fences_older_target(replica) -> None:  # type: ignore[no-untyped-def]
    _proc, data, _api = replica

    async def scenario() -> None:
        old, new = ReplicaClient(f"{HOST}:{data}"), ReplicaClient(f"{HOST}:{data}")
        await old.connect()
        await new.connect()
        await old.open(1)
        await old.write(0, b"a" * 4096)
        await new.open(2)
        with pytest.raises(ReplicaError, match="epoch"):
            await old.write(0, b"b" * 4096)
        with pytest.raises(ReplicaError):
            await old.open(1)  # cannot go back either
        await new.write(0, b"c" * 4096)
        assert await old.read(0, 4096) == b"c" * 4096  # reads stay allowed
        old.close()
        new.close()

    run(scenario())


def test_errors_carry_codes_and_connection_survives(replica) -> None:  # type: ignore[no-untyped-def]
    _proc, data, _api = replica

    async def scenario() -> None:
        c = ReplicaClient(f"{HOST}:{data}")
        await c.connect()
        with pytest.raises(ReplicaError) as e:
            await c.write(0, b"x")  # not opened
        assert e.value.errno == p.Status.EPERM
        with pytest.raises(Exception, match="beyond size"):
            await c.read(16 << 20, 4096)
        resp = await c._submit(77)  # unknown op: an error, connection stays up
        assert resp.status == p.Status.ENOTSUP
        await c.ping()
        c.close()

    run(scenario())


def test_readv_answers_ranges_back_to_back_and_refuses_bad_ones(replica) -> None:  # type: ignore[no-untyped-def]
    _proc, data, _api = replica

    async def scenario() -> None:
        c = ReplicaClient(f"{HOST}:{data}")
        await c.connect()
        await c.open(1)
        await c.write(8192, bytes(range(256)) * 64)
        await c.write(1 << 20, b"\x07" * 10_000)
        ranges = [(8192 + 100, 50), (0, 4096), (1 << 20, 10_000), (8192, 16), (15 << 20, 9)]
        want = b"".join([await c.read(off, n) for off, n in ranges])
        assert await c.readv(ranges) == want
        assert await c.readv([(8192, 1)] * p.READV_MAX_RANGES) == b"\x00" * p.READV_MAX_RANGES
        entries = "READV payload must be 1 to 1024 entries of 16 bytes"
        bad = [  # the same answer from both engines
            (0, b"", entries),
            (1, p.encode_ranges([(0, 1)]) + b"\0", entries),
            (4096, p.encode_ranges([(16 << 20, 4096)]), "range 16777216+4096 beyond size"),
            (8192, p.encode_ranges([(0, 4096)]), "READV length 8192 is not the sum of its"),
            (1, p.READV_ENTRY.pack(0, 1, 1), "READV entry 0+1: zero length or reserved"),
            (p.MAX_PAYLOAD + 1, p.encode_ranges([(0, 1)]), "exceeds the limit"),
        ]
        for length, payload, why in bad:
            resp = await c._submit(p.Op.READV, 0, length, payload=payload)
            assert resp.status == p.Status.EINVAL, (length, payload, resp.message)
            assert why in resp.message, resp.message
        assert await c.readv([(8192, 4)]) == bytes(range(4))  # the connection survived
        c.close()

    run(scenario())


def test_copy_from_of_scattered_small_pieces(replica, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An incremental catch-up: many scattered pieces (grouped into READVs), some of them
    zeros on the source (holes here afterwards), some unaligned, over stale data."""
    _proc, data, _api = replica
    src_proc, src_port, _ = start_replica(tmp_path, "src")

    async def scenario() -> None:
        src, dst = ReplicaClient(f"{HOST}:{src_port}"), ReplicaClient(f"{HOST}:{data}")
        for c in (src, dst):
            await c.connect()
            await c.open(1)
        rng = random.Random(5)
        blocks = sorted(rng.sample(range(4096), 700))
        ranges = []
        for i, b in enumerate(blocks):
            off, n = b * 4096, 4096
            if i % 7 == 3:
                off, n = off + 100, 1000  # unaligned
            if i % 5 != 0:  # every fifth stays zeros on the source
                await src.write(off, rng.randbytes(n))
            await dst.write(b * 4096, b"stale" * 800)
            ranges.append((off, n))
        stats = await dst.copy_from(f"{HOST}:{src_port}", ranges)
        assert stats["pieces"] == len(ranges)
        assert stats["unmapped"] == sum(n for i, (_, n) in enumerate(ranges) if i % 5 == 0)
        assert stats["copied"] + stats["unmapped"] == sum(n for _, n in ranges)
        for off, n in ranges:
            assert await dst.read(off, n) == await src.read(off, n), (off, n)
        # Outside the copied pieces the stale data stays: nothing else was touched.
        assert await dst.read(blocks[3] * 4096, 100) == (b"stale" * 20)
        for c in (src, dst):
            c.close()

    try:
        run(scenario())
    finally:
        src_proc.stop()


def cachestat_works() -> bool:
    """cachestat(2) (Linux 6.5; seccomp may refuse it): without it every write is pieces."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    rng, out = (ctypes.c_uint64 * 2)(0, 4096), (ctypes.c_uint64 * 5)()
    with open(__file__, "rb") as f:
        return libc.syscall(451, f.fileno(), rng, out, 0) == 0


@pytest.mark.skipif(native_unavailable() is not None, reason=str(native_unavailable()))
@pytest.mark.skipif(not cachestat_works(), reason="no cachestat(2) here")
@pytest.mark.skipif("TANDEM_ENGINE_URING_WRITES" in os.environ, reason="writes through io_uring")
def test_native_large_writes_over_cached_pages_take_one_call(tmp_path: Path) -> None:
    """A large write goes to the file in 64 KiB pieces where it would create page-cache
    folios (small folios keep later small writes cheap), in one call where every page is
    cached already (no folio is created; the pieces only cost calls)."""
    proc, data, api = start_replica(tmp_path, "r", "--engine", "native")

    def file_writes() -> int:
        text = httpx.get(f"http://{HOST}:{api}/metrics", timeout=10).text
        m = re.search(r'^tandem_replica_file_writes_total\{volume="v"\} (\S+)$', text, re.M)
        assert m, text[-2000:]
        return int(float(m.group(1)))

    async def scenario() -> None:
        c = ReplicaClient(f"{HOST}:{data}")
        await c.connect()
        await c.open(1)
        first, again = random.randbytes(1 << 20), random.randbytes(1 << 20)
        n0 = file_writes()
        await c.write(2 << 20, first)  # a sparse file: nothing cached, 16 pieces
        n1 = file_writes()
        await c.write(2 << 20, again)  # every page cached now: one call
        n2 = file_writes()
        await c.write((2 << 20) + (512 << 10), first)  # half of it never written: pieces
        n3 = file_writes()
        assert (n1 - n0, n2 - n1, n3 - n2) == (16, 1, 16)
        want = again[: 512 << 10] + first
        assert await c.read(2 << 20, len(want)) == want
        c.close()

    try:
        run(scenario())
    finally:
        proc.stop()


def test_garbage_is_rejected_without_crashing(replica) -> None:  # type: ignore[no-untyped-def]
    proc, data, api = replica
    for junk in (
        b"GET / HTTP/1.0\r\n\r\n" + b"\0" * 64,
        b"\xff" * 100_000,
        p.REQ.pack(p.REQ_MAGIC, 2, 0, 0, 1, 0, 1 << 30, 1 << 30),
    ):
        with socket.create_connection((HOST, data)) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            dec = p.ResponseDecoder()
            dec.feed(reply)
            r = dec.next()
            assert r is not None and r.status == p.Status.EPROTO
    assert proc.alive()
    assert http_json(f"http://{HOST}:{api}/v1/replica")["state"] == "open"

    async def still_works() -> None:
        c = ReplicaClient(f"{HOST}:{data}")
        await c.connect()
        await c.ping()
        c.close()

    run(still_works())


def test_size_mismatch_refused_with_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "r"
    port = free_port()
    first = Proc(
        "first",
        [
            "replica",
            "serve",
            "--dir",
            str(d),
            "--size",
            "16M",
            "--listen",
            f"{HOST}:{port}",
            "--api",
            f"{HOST}:{free_port()}",
        ],
        tmp_path,
    ).start()
    wait_port(port, first.proc)
    assert first.stop() == 0
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "maya",
            "replica",
            "serve",
            "--dir",
            str(d),
            "--size",
            "32M",
            "--listen",
            f"{HOST}:{free_port()}",
            "--api",
            f"{HOST}:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0
    assert "size" in res.stderr and "16777216" in res.stderr, res.stderr
