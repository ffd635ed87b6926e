"""Differential test of the two replica engines: the same random, pipelined sequence of
protocol requests (unaligned writes of every size, unmaps, write-zeroes with and without
holes, FUA, flushes, reads, checksums, block status, snapshots in between, bad requests)
goes to a python-engine replica and a native-engine replica; every answer and the final
bytes, allocation and write-intent regions must be the same (and match a model).

The seed is printed; TANDEM_DIFF_SEED=<n> replays one sequence."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

import native
from replica import protocol as p
from replica.client import ReplicaClient
from replica.protocol import Op
from tests.procs import HOST, Proc, free_port, wait_port

pytestmark = pytest.mark.skipif(
    native.engine_unavailable() is not None, reason=str(native.engine_unavailable())
)

SIZE = 8 << 20
BLOCK = 4096


def start_replica(base: Path, engine: str, extra_env: dict[str, str] | None = None) -> Proc:
    data, api = free_port(), free_port()
    proc = Proc(
        f"replica-{engine}",
        [
            "replica",
            "serve",
            "--dir",
            str(base / engine),
            "--size",
            str(SIZE),
            "--listen",
            f"{HOST}:{data}",
            "--api",
            f"{HOST}:{api}",
            "--engine",
            engine,
            "--debug-api",
        ],
        base,
        extra_env,
    )
    proc.data_port, proc.api_port = data, api  # type: ignore[attr-defined]
    proc.start()
    wait_port(data, proc.proc)
    return proc


@pytest.fixture
def pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    procs = [start_replica(tmp_path, "python"), start_replica(tmp_path, "native")]
    yield procs
    for proc in procs:
        proc.stop()


def _range(rng: random.Random, max_len: int) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.3:  # aligned
        n = rng.randrange(1, max_len // BLOCK + 1) * BLOCK
        off = rng.randrange(0, (SIZE - n) // BLOCK + 1) * BLOCK
    elif kind < 0.5:  # tiny, anywhere
        n = rng.randrange(1, 200)
        off = rng.randrange(0, SIZE - n + 1)
    else:
        n = rng.randrange(1, max_len + 1)
        off = rng.randrange(0, SIZE - n + 1)
    if rng.random() < 0.1:  # crowd a few hot spots so requests overlap often
        off = rng.choice([0, 5 * BLOCK + 17, SIZE // 2 - 3, SIZE - n])
    return off, n


class Sequence:
    """Random requests, and a model of the bytes they leave."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.model = bytearray(SIZE)
        self.snapshots = 0
        self.tag = 0

    def next(self) -> tuple[int, int, int, int, bytes]:
        rng, r = self.rng, self.rng.random()
        if r < 0.35:
            off, n = _range(rng, 300_000 if rng.random() < 0.05 else 40_000)
            data = rng.randbytes(n)
            self.model[off : off + n] = data
            return Op.WRITE, off, n, p.FLAG_FUA if rng.random() < 0.05 else 0, data
        if r < 0.45:
            off, n = _range(rng, 200_000)
            self.model[off : off + n] = bytes(n)
            return Op.UNMAP, off, n, 0, b""
        if r < 0.55:
            off, n = _range(rng, 200_000)
            self.model[off : off + n] = bytes(n)
            return Op.WRITE_ZEROES, off, n, p.FLAG_NO_HOLE if rng.random() < 0.4 else 0, b""
        if r < 0.7:
            off, n = _range(rng, 100_000)
            return Op.READ, off, n, 0, b""
        if r < 0.76:
            off, n = _range(rng, 100_000)
            return Op.CHECKSUM, off, n, 0, b""
        if r < 0.84:
            off, n = _range(rng, 2_000_000)
            return Op.BLOCK_STATUS, off, n, 0, b""
        if r < 0.88:
            return Op.FLUSH, 0, 0, 0, b""
        if r < 0.89 and self.snapshots < 4:
            self.snapshots += 1
            return Op.SNAPSHOT, 0, 0, 0, f'{{"name": "s{self.snapshots}"}}'.encode()
        if r < 0.93:
            return Op.PING, 0, 0, 0, rng.randbytes(rng.randrange(0, 100))
        # bad requests: beyond the end, unknown flags, unknown op, length != payload
        bad = rng.randrange(4)
        if bad == 0:
            return Op.READ, SIZE - 10, 20, 0, b""
        if bad == 1:
            return Op.UNMAP, 0, BLOCK, 0x40, b""
        if bad == 2:
            return 42, 0, 0, 0, b""
        return Op.WRITE, 0, 10, 0, b"short"


async def _connect(port: int) -> ReplicaClient:
    c = ReplicaClient(f"{HOST}:{port}", timeout=30)
    await c.connect()
    await c.open(1)
    return c


def _answer(r: p.Response) -> tuple[int, bytes]:
    return r.status, r.payload


async def _run(ports: list[int], seed: int, count: int) -> None:
    clients = [await _connect(port) for port in ports]
    seq = Sequence(seed)
    started = time.monotonic()
    done = 0
    while done < count:
        batch = [seq.next() for _ in range(seq.rng.randrange(1, 24))]
        done += len(batch)
        answers = []
        for c in clients:  # the whole batch is in flight at once on each replica
            futs = [c._submit(op, off, n, fl, data) for op, off, n, fl, data in batch]
            answers.append([_answer(r) for r in await asyncio.gather(*futs)])
        for i, (py, nat) in enumerate(zip(*answers, strict=True)):
            assert py == nat, f"seed {seed}: request {batch[i][:4]} answered {py!r} vs {nat!r}"
    # The final state, through both.
    for c in clients:
        await c.flush()
    full = [await c.read(0, SIZE) for c in clients]
    assert full[0] == full[1], f"seed {seed}: the replicas' bytes differ"
    assert full[0] == seq.model, f"seed {seed}: the bytes differ from the model"
    maps = [[(e.offset, e.length, e.flags) for e in await c.block_status(0, SIZE)] for c in clients]
    assert maps[0] == maps[1], f"seed {seed}: allocation differs"
    sums = [await c.checksum(0, SIZE) for c in clients]
    assert sums[0] == sums[1] == native.crc32c(bytes(seq.model))
    infos = [await c.info() for c in clients]
    for key in ("snapshots", "generation", "epoch", "dirty"):
        assert infos[0][key] == infos[1][key], key
    assert len(infos[0]["chain"]) == len(infos[1]["chain"])
    if time.monotonic() - started < 4:  # before any region could age out of the intent log
        assert infos[0]["dirty_regions"] == infos[1]["dirty_regions"]
    for c in clients:
        await c.close_session()
        c.close()


def _seeds() -> list[int]:
    if env := os.environ.get("TANDEM_DIFF_SEED"):
        return [int(env)]
    return [random.randrange(1 << 30) for _ in range(3)]


@pytest.mark.parametrize("seed", _seeds())
def test_same_requests_same_answers_and_bytes(pair: Any, seed: int) -> None:
    print(f"differential seed {seed} (TANDEM_DIFF_SEED={seed} replays it)")
    ports = [proc.data_port for proc in pair]
    asyncio.run(asyncio.wait_for(_run(ports, seed, 600), 240))
    for proc in pair:
        assert proc.alive(), proc.output()


def test_many_connections_interleaved_disjoint(pair: Any) -> None:
    """Several connections writing disjoint areas at once end up with the same bytes."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")

    async def scenario() -> None:
        results = []
        for proc in pair:
            rng = random.Random(seed)
            clients = [await _connect(proc.data_port) for _ in range(4)]

            async def worker(i: int, c: ReplicaClient, rng: random.Random) -> None:
                area = SIZE // 4
                for _ in range(60):
                    n = rng.randrange(1, 20_000)
                    off = i * area + rng.randrange(0, area - n)
                    if rng.random() < 0.2:
                        await c.unmap(off, n)
                    else:
                        await c.write(off, rng.randbytes(n))

            rngs = [random.Random(rng.random()) for _ in clients]
            pairs = zip(clients, rngs, strict=True)
            await asyncio.gather(*(worker(i, c, r) for i, (c, r) in enumerate(pairs)))
            results.append(await clients[0].read(0, SIZE))
            for c in clients:
                c.close()
        assert results[0] == results[1]

    asyncio.run(asyncio.wait_for(scenario(), 120))
