"""The replica store (replica/store.py): layer chain, block map, zeroing, snapshots, sessions."""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replica import faults
from replica import store as store_mod
from replica.block import (
    STATE_HOLE,
    STATE_ZERO,
    BlockError,
    Extent,
    MediumError,
    NoSpace,
    OutOfRange,
)
from replica.store import (
    BLOCK,
    Fenced,
    ReplicaStore,
    SizeMismatch,
    StoreError,
)

SIZE = 64 * BLOCK
HOLE = STATE_HOLE | STATE_ZERO


class Crash(Exception):
    """Raised by an armed crash point: the process 'dies' there."""


def crash() -> None:
    raise Crash


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    faults.disarm_all()
    yield
    faults.disarm_all()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplicaStore]:
    s = ReplicaStore.create(tmp_path / "r", SIZE, "vol")
    yield s
    s.close(clean=False)


def reopen(s: ReplicaStore, clean: bool = True) -> ReplicaStore:
    s.close(clean=clean)
    return ReplicaStore.open(s.directory)


def disk_meta(s: ReplicaStore) -> dict[str, Any]:
    return json.loads((s.directory / "volume.json").read_text())


def layer_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("layer-"))


def blocks(*numbers: int) -> bytes:
    """A 0/1 map of SIZE blocks with `numbers` set."""
    out = bytearray(SIZE // BLOCK)
    for n in numbers:
        out[n] = 1
    return bytes(out)


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# --- create / open -----------------------------------------------------------------------------


def test_create_layout(tmp_path: Path) -> None:
    s = ReplicaStore.create(tmp_path / "a" / "b", SIZE, "vol1")
    try:
        meta = disk_meta(s)
        assert meta["volume"] == "vol1" and meta["size"] == SIZE and meta["block_size"] == BLOCK
        assert [layer["file"] for layer in meta["chain"]] == ["layer-000001.img"]
        assert meta["chain"][0]["name"] is None
        assert (meta["generation"], meta["epoch"], meta["dirty"]) == (0, 0, False)
        head = s.directory / "layer-000001.img"
        assert head.stat().st_size == SIZE and head.stat().st_blocks == 0  # sparse
        assert s.size == SIZE and s.snapshots() == [] and not s.was_dirty
        assert s.read(0, SIZE) == bytes(SIZE)
    finally:
        s.close()


def test_uuid_is_unique_and_kept(tmp_path: Path) -> None:
    a = ReplicaStore.create(tmp_path / "a", SIZE)
    b = ReplicaStore.create(tmp_path / "b", SIZE)
    assert a.meta.uuid != b.meta.uuid
    uid = a.meta.uuid
    a = reopen(a)
    assert a.meta.uuid == uid
    a.close()
    b.close()


@pytest.mark.parametrize("size", [0, -BLOCK, 4095, BLOCK + 1, True, 4096.0])
def test_create_rejects_bad_size(tmp_path: Path, size: Any) -> None:
    with pytest.raises(StoreError, match="positive multiple of 4096"):
        ReplicaStore.create(tmp_path / "r", size)


def test_create_refuses_existing_replica(store: ReplicaStore) -> None:
    store.close()
    with pytest.raises(StoreError, match="already exists"):
        ReplicaStore.create(store.directory, SIZE)


def test_create_in_nonempty_dir_drops_stray_layers(tmp_path: Path) -> None:
    (tmp_path / "layer-000001.img").write_bytes(b"left by a crashed create")
    (tmp_path / "notes.txt").write_text("not ours")
    s = ReplicaStore.create(tmp_path, SIZE)
    assert s.read(0, 100) == bytes(100)
    assert (tmp_path / "notes.txt").exists()
    s.close()


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        ReplicaStore.open(tmp_path / "nope")
    with pytest.raises(StoreError, match=r"volume\.json is missing"):
        ReplicaStore.open(tmp_path)
    (tmp_path / "volume.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ReplicaStore.open(tmp_path)
    (tmp_path / "volume.json").write_text('{"format": 1}')
    with pytest.raises(StoreError, match="missing field"):
        ReplicaStore.open(tmp_path)


def test_open_refuses_missing_or_short_layer(store: ReplicaStore) -> None:
    store.snapshot("s1")
    store.close()
    (store.directory / "layer-000001.img").rename(store.directory / "moved")
    with pytest.raises(StoreError, match=r"layer file layer-000001\.img is missing"):
        ReplicaStore.open(store.directory)
    (store.directory / "moved").rename(store.directory / "layer-000001.img")
    os.truncate(store.directory / "layer-000002.img", SIZE - BLOCK)
    with pytest.raises(StoreError, match="bytes, the volume is"):
        ReplicaStore.open(store.directory)
    # A failed open must not keep the directory locked.
    os.truncate(store.directory / "layer-000002.img", SIZE)
    ReplicaStore.open(store.directory).close()


def test_open_or_create(tmp_path: Path) -> None:
    d = tmp_path / "r"
    s = ReplicaStore.open_or_create(d, SIZE, "v")
    s.write(0, b"x" * BLOCK)
    uid = s.meta.uuid
    s.close()
    s = ReplicaStore.open_or_create(d, SIZE, "v")
    assert s.meta.uuid == uid and s.read(0, 1) == b"x"
    s.close()
    msg = re.escape(f"replica at {d} has size {SIZE}, not {2 * SIZE}")
    with pytest.raises(SizeMismatch, match=msg):
        ReplicaStore.open_or_create(d, 2 * SIZE, "v")
    ReplicaStore.open(d).close()  # the mismatch released the lock and changed nothing
    assert issubclass(SizeMismatch, StoreError)


def test_second_open_is_refused_while_open(store: ReplicaStore) -> None:
    with pytest.raises(StoreError, match="already open"):
        ReplicaStore.open(store.directory)
    store.close()
    ReplicaStore.open(store.directory).close()


def test_closed_store_refuses_io(store: ReplicaStore) -> None:
    store.close()
    store.close()  # idempotent
    for call in (
        lambda: store.read(0, 1),
        lambda: store.write(0, b"x"),
        lambda: store.unmap(0, BLOCK),
        lambda: store.flush(),
        lambda: store.block_status(0, BLOCK),
    ):
        with pytest.raises(MediumError, match="closed"):
            call()


def test_layer_open_modes(store: ReplicaStore) -> None:
    store.snapshot("s1")
    store.snapshot("s2")
    modes = [fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in store._fds]
    assert modes == [os.O_RDONLY, os.O_RDONLY, os.O_RDWR]
    store = reopen(store)
    modes = [fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in store._fds]
    assert modes == [os.O_RDONLY, os.O_RDONLY, os.O_RDWR]
    store.close()


def test_orphan_layers_are_removed_at_open(store: ReplicaStore) -> None:
    store.close()
    (store.directory / "layer-000007.img").write_bytes(b"orphan")
    (store.directory / "keep.txt").write_text("not a layer")
    store = ReplicaStore.open(store.directory)
    assert layer_files(store.directory) == ["layer-000001.img"]
    assert (store.directory / "keep.txt").exists()
    store.close()


# --- read / write ------------------------------------------------------------------------------


def test_holes_read_zeros(store: ReplicaStore) -> None:
    assert store.read(0, SIZE) == bytes(SIZE)
    assert store.read(123, 4567) == bytes(4567)
    assert store.read(SIZE, 0) == b""
    store.write(5 * BLOCK, b"\x01" * BLOCK)
    assert store.read(4 * BLOCK, 3 * BLOCK) == bytes(BLOCK) + b"\x01" * BLOCK + bytes(BLOCK)


def test_aligned_write_is_one_pwrite_of_the_caller_buffer(
    store: ReplicaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, data: Any, pos: int) -> int:
        if fd != store.intent._fd:  # the write-intent log is tested on its own
            calls.append((pos, len(data)))
        return real(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = rand(8 * BLOCK)
    store.write(2 * BLOCK, data)
    assert calls == [(2 * BLOCK, 8 * BLOCK)]
    assert store.read(2 * BLOCK, 8 * BLOCK) == data
    assert bytes(store._head) == blocks(*range(2, 10))


def test_large_writes_go_in_pieces_that_make_small_folios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large write reaches the file as writes of at most WRITE_PIECE bytes, cut at multiples
    of it (the page cache sizes folios by the write), whether aligned or with edge blocks."""
    from replica.store import WRITE_PIECE

    store = ReplicaStore.create(tmp_path / "big", 4 * WRITE_PIECE)
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, data: Any, pos: int) -> int:
        if fd != store.intent._fd:
            calls.append((pos, len(data)))
        return real(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    model = bytearray(4 * WRITE_PIECE)
    for off, n in ((0, 3 * WRITE_PIECE), (WRITE_PIECE - 700, 2 * WRITE_PIECE + 1500)):
        calls.clear()
        data = rand(n)
        store.write(off, data)
        model[off : off + n] = data
        assert all(length <= WRITE_PIECE for _, length in calls), calls
        assert all(pos // WRITE_PIECE == (pos + length - 1) // WRITE_PIECE for pos, length in calls)
        assert (
            sum(length for _, length in calls)
            == -(-(off + n) // BLOCK) * BLOCK - off // BLOCK * BLOCK
        )
    assert store.read(0, 4 * WRITE_PIECE) == model
    store.close()


def test_small_and_unaligned_writes(store: ReplicaStore) -> None:
    model = bytearray(SIZE)
    for offset, data in [
        (0, b"a"),
        (4095, b"bc"),  # straddles two blocks
        (10, b"d" * 100),
        (3 * BLOCK + 17, rand(3 * BLOCK + 5, 1)),  # edge + interior + edge
        (SIZE - 3, b"xyz"),  # ends at the device end
    ]:
        store.write(offset, data)
        model[offset : offset + len(data)] = data
        assert store.read(0, SIZE) == model
    assert bytes(store._head) == blocks(0, 1, 3, 4, 5, 6, 63)
    store = reopen(store)
    assert store.read(0, SIZE) == model
    assert bytes(store._head) == blocks(0, 1, 3, 4, 5, 6, 63)
    store.close()


def test_write_accepts_memoryview_and_typed_buffers(store: ReplicaStore) -> None:
    buf = bytearray(rand(3 * BLOCK))
    store.write(100, memoryview(buf)[7 : 7 + 5000])
    assert store.read(100, 5000) == buf[7:5007]
    words = array.array("I", range(1024))  # 4096 bytes, item size 4
    store.write(BLOCK, memoryview(words))
    assert store.read(BLOCK, BLOCK) == words.tobytes()


def test_out_of_range(store: ReplicaStore) -> None:
    bad: list[Any] = [
        lambda: store.read(SIZE - 1, 2),
        lambda: store.read(-1, 1),
        lambda: store.read(0, -1),
        lambda: store.write(SIZE, b"x"),
        lambda: store.write(SIZE - 10, b"x" * 11),
        lambda: store.write(-BLOCK, b"x" * BLOCK),
        lambda: store.unmap(0, SIZE + 1),
        lambda: store.write_zeroes(SIZE - BLOCK, 2 * BLOCK),
        lambda: store.write_zeroes(SIZE - BLOCK, 2 * BLOCK, punch=False),
        lambda: store.block_status(SIZE, 1),
        lambda: store.allocated_extents(SIZE - BLOCK, 2 * BLOCK),
        lambda: store.allocated_extents(-1),
    ]
    for call in bad:
        with pytest.raises(OutOfRange):
            call()
    assert store.read(0, SIZE) == bytes(SIZE)
    assert bytes(store._head) == bytes(SIZE // BLOCK)


def test_no_space_is_reported_and_map_stays_true(
    store: ReplicaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(NoSpace):
        store.write(BLOCK, b"x" * BLOCK)
    with pytest.raises(NoSpace):
        store.write(10, b"x")
    assert bytes(store._head) == bytes(SIZE // BLOCK)
    assert store.read(0, 2 * BLOCK) == bytes(2 * BLOCK)
    assert issubclass(NoSpace, BlockError)


# --- layers and the block map -----------------------------------------------------------------


def test_layers_and_block_map(store: ReplicaStore) -> None:
    a, b, c = rand(4 * BLOCK, 1), rand(4 * BLOCK, 2), rand(100, 3)
    model = bytearray(SIZE)
    store.write(0, a)  # blocks 0-3
    model[0 : 4 * BLOCK] = a
    store.snapshot("s1")
    assert bytes(store._head) == bytes(SIZE // BLOCK)
    assert bytes(store._base) == blocks(0, 1, 2, 3)
    store.write(2 * BLOCK, b)  # blocks 2-5 over s1's 2-3
    model[2 * BLOCK : 6 * BLOCK] = b
    store.snapshot("s2")
    store.write(BLOCK + 50, c)  # unaligned, inside s1's block 1: RMW keeps s1's other bytes
    model[BLOCK + 50 : BLOCK + 150] = c
    assert store.read(0, SIZE) == model
    assert store.read(BLOCK, BLOCK) == a[BLOCK : BLOCK + 50] + c + a[BLOCK + 150 : 2 * BLOCK]
    assert store.snapshots() == ["s1", "s2"]
    assert bytes(store._head) == blocks(1)
    assert bytes(store._base) == bytes([1, 1, 2, 2, 2, 2]) + bytes(58)
    head, base = bytes(store._head), bytes(store._base)
    # The snapshot layers still hold exactly what they held when frozen.
    l1 = (store.directory / "layer-000001.img").read_bytes()
    assert l1[: 4 * BLOCK] == a and l1[4 * BLOCK :] == bytes(SIZE - 4 * BLOCK)
    store = reopen(store)  # the map is rebuilt from SEEK_DATA/SEEK_HOLE
    assert bytes(store._head) == head and bytes(store._base) == base
    assert store.read(0, SIZE) == model
    assert store.snapshots() == ["s1", "s2"]
    assert [x["file"] for x in disk_meta(store)["chain"]] == [
        "layer-000001.img",
        "layer-000002.img",
        "layer-000003.img",
    ]
    store.close()


def test_read_of_mixed_runs(store: ReplicaStore) -> None:
    """A read crossing head, snapshot and hole blocks, starting and ending mid-block."""
    store.write(0, b"A" * 2 * BLOCK)
    store.snapshot("s")
    store.write(BLOCK, b"B" * BLOCK)
    store.write(3 * BLOCK, b"C" * BLOCK)
    got = store.read(100, 4 * BLOCK - 200)
    want = b"A" * (BLOCK - 100) + b"B" * BLOCK + bytes(BLOCK) + b"C" * (BLOCK - 100)
    assert got == want


def test_block_status(store: ReplicaStore) -> None:
    assert store.block_status(0, SIZE) == [Extent(0, SIZE, HOLE)]
    store.write(2 * BLOCK, b"x" * 2 * BLOCK)
    store.snapshot("s")
    store.write(4 * BLOCK, b"y" * BLOCK)  # head block adjacent to snapshot blocks: one extent
    store.write(10 * BLOCK + 1, b"z")
    assert store.block_status(0, SIZE) == [
        Extent(0, 2 * BLOCK, HOLE),
        Extent(2 * BLOCK, 3 * BLOCK, 0),
        Extent(5 * BLOCK, 5 * BLOCK, HOLE),
        Extent(10 * BLOCK, BLOCK, 0),
        Extent(11 * BLOCK, SIZE - 11 * BLOCK, HOLE),
    ]
    # Unaligned request: extents are clipped to exactly the range asked for.
    assert store.block_status(BLOCK + 10, 2 * BLOCK) == [
        Extent(BLOCK + 10, BLOCK - 10, HOLE),
        Extent(2 * BLOCK, BLOCK + 10, 0),
    ]
    assert store.block_status(3 * BLOCK + 1, 5) == [Extent(3 * BLOCK + 1, 5, 0)]
    assert store.block_status(0, 0) == []


def test_allocated_extents(store: ReplicaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(store.allocated_extents()) == []
    store.write(0, b"a" * BLOCK)
    store.write(5 * BLOCK, b"b" * 3 * BLOCK)
    store.snapshot("s")
    store.write(8 * BLOCK, b"c" * BLOCK)  # merges with the snapshot's 5-7
    store.write(20 * BLOCK, b"d")
    want = [(0, BLOCK), (5 * BLOCK, 4 * BLOCK), (20 * BLOCK, BLOCK)]
    assert list(store.allocated_extents()) == want
    monkeypatch.setattr(store_mod, "_SCAN_CHUNK", 3)  # runs straddle chunk boundaries
    assert list(store.allocated_extents()) == want
    assert list(store.allocated_extents(6 * BLOCK + 5, 14 * BLOCK)) == [
        (6 * BLOCK + 5, 3 * BLOCK - 5),
        (20 * BLOCK, 5),
    ]


# --- unmap / write_zeroes ---------------------------------------------------------------------


def test_unmap_head_only_data_frees_space(store: ReplicaStore) -> None:
    store.write(0, rand(32 * BLOCK))
    store.flush()
    head = store.directory / "layer-000001.img"
    assert head.stat().st_blocks * 512 >= 32 * BLOCK
    store.unmap(0, 32 * BLOCK)
    assert head.stat().st_blocks == 0
    assert store.read(0, 32 * BLOCK) == bytes(32 * BLOCK)
    assert store.block_status(0, SIZE) == [Extent(0, SIZE, HOLE)]
    store = reopen(store)
    assert bytes(store._head) == bytes(SIZE // BLOCK)
    store.close()


def test_unmap_unaligned_zeroes_edges_and_frees_interior(store: ReplicaStore) -> None:
    data = rand(8 * BLOCK)
    store.write(0, data)
    store.unmap(BLOCK + 100, 4 * BLOCK)  # partial 1, whole 2-4, partial 5
    model = bytearray(data)
    model[BLOCK + 100 : 5 * BLOCK + 100] = bytes(4 * BLOCK)
    assert store.read(0, 8 * BLOCK) == model
    assert bytes(store._head) == blocks(0, 1, 5, 6, 7)
    store = reopen(store)
    assert bytes(store._head) == blocks(0, 1, 5, 6, 7)
    assert store.read(0, 8 * BLOCK) == model
    store.close()


def test_unmap_of_holes_allocates_nothing(store: ReplicaStore) -> None:
    store.unmap(100, 10 * BLOCK)
    store.write_zeroes(BLOCK + 1, 5)
    assert bytes(store._head) == bytes(SIZE // BLOCK)
    assert (store.directory / "layer-000001.img").stat().st_blocks == 0


def test_unmap_over_snapshot_data_never_exposes_it(store: ReplicaStore) -> None:
    old = rand(4 * BLOCK)
    store.write(0, old)
    store.snapshot("s")
    store.write(0, b"n" * BLOCK)  # head holds block 0 too
    store.unmap(0, 4 * BLOCK)
    assert store.read(0, 4 * BLOCK) == bytes(4 * BLOCK)
    # Holes in the head would show the snapshot: the head must hold zeros instead.
    assert bytes(store._head) == blocks(0, 1, 2, 3)
    assert store.block_status(0, 4 * BLOCK) == [Extent(0, 4 * BLOCK, 0)]
    assert (store.directory / "layer-000001.img").read_bytes()[: 4 * BLOCK] == old
    store = reopen(store)
    assert store.read(0, 4 * BLOCK) == bytes(4 * BLOCK)
    store.close()


def test_write_zeroes_no_hole_stays_allocated(store: ReplicaStore) -> None:
    store.write(0, b"q" * 2 * BLOCK)
    store.write_zeroes(0, 8 * BLOCK, punch=False)
    assert store.read(0, 8 * BLOCK) == bytes(8 * BLOCK)
    assert bytes(store._head) == blocks(*range(8))
    store.flush()
    assert (store.directory / "layer-000001.img").stat().st_blocks * 512 >= 8 * BLOCK
    store = reopen(store)
    assert bytes(store._head) == blocks(*range(8))
    store.write_zeroes(0, 8 * BLOCK)  # punch=True frees them again
    assert bytes(store._head) == bytes(SIZE // BLOCK)
    store.close()


def test_unmap_without_hole_punching_writes_zeros(
    store: ReplicaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def unsupported(fd: int, offset: int, length: int) -> None:
        calls.append(offset)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(store_mod, "_punch_hole", unsupported)
    store.write(0, rand(2 * BLOCK))
    store.write(10 * BLOCK, rand(BLOCK))
    store.unmap(0, 2 * BLOCK)
    store.unmap(0, SIZE)
    assert store.read(0, SIZE) == bytes(SIZE)
    assert bytes(store._head) == blocks(0, 1, 10)  # zeros written where data was, no more
    assert len(calls) == 1  # learned once that punching is unsupported


# --- randomized model check -----------------------------------------------------------------


class Model:
    """What the store must hold: bytes, and which blocks the head / some snapshot allocates."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.head: set[int] = set()
        self.base: set[int] = set()

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.head.update(range(offset // BLOCK, -(-(offset + len(data)) // BLOCK)))

    def zero(self, offset: int, length: int, punch: bool) -> None:
        end = offset + length
        self.data[offset:end] = bytes(length)
        for b in range(offset // BLOCK, -(-end // BLOCK)):
            whole = offset <= b * BLOCK and (b + 1) * BLOCK <= end
            if not punch or b in self.base:
                self.head.add(b)
            elif whole:
                self.head.discard(b)
            # partial edge over a head-only block: rewritten in place, stays allocated

    def snapshot(self) -> None:
        self.base |= self.head
        self.head = set()

    def head_map(self) -> bytes:
        out = bytearray(len(self.data) // BLOCK)
        for b in self.head:
            out[b] = 1
        return bytes(out)

    def extents(self) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for b in sorted(self.head | self.base):
            if runs and runs[-1][0] + runs[-1][1] == b * BLOCK:
                runs[-1] = (runs[-1][0], runs[-1][1] + BLOCK)
            else:
                runs.append((b * BLOCK, BLOCK))
        return runs


def _random_range(rng: random.Random, size: int) -> tuple[int, int]:
    kind = rng.randrange(4)
    if kind == 0:  # whole blocks
        n = rng.randint(1, 6)
        return rng.randrange(size // BLOCK - n + 1) * BLOCK, n * BLOCK
    if kind == 1:  # sub-4K
        n = rng.randint(1, BLOCK - 1)
    elif kind == 2:  # unaligned, a few blocks
        n = rng.randint(1, 5 * BLOCK)
    else:  # tiny, often straddling a block boundary
        n = rng.randint(1, 16)
        b = rng.randint(1, size // BLOCK - 1) * BLOCK
        return max(0, min(size - n, b - rng.randint(0, n))), n
    return rng.randint(0, size - n), n


@pytest.mark.parametrize("seed", range(6))
def test_random_ops_match_model(tmp_path: Path, seed: int) -> None:
    size = 40 * BLOCK
    rng = random.Random(seed)
    s = ReplicaStore.create(tmp_path / "r", size)
    model = Model(size)
    snaps = 0
    try:
        for step in range(250):
            op = rng.choices(
                ["write", "unmap", "zero", "zero_nohole", "snapshot", "reopen", "read"],
                weights=[10, 4, 2, 2, 1, 1, 4],
            )[0]
            offset, length = _random_range(rng, size)
            if op == "write":
                data = rng.randbytes(length)
                s.write(offset, data)
                model.write(offset, data)
            elif op in ("unmap", "zero", "zero_nohole"):
                punch = op != "zero_nohole"
                if op == "unmap":
                    s.unmap(offset, length)
                else:
                    s.write_zeroes(offset, length, punch=punch)
                model.zero(offset, length, punch)
            elif op == "snapshot":
                snaps += 1
                s.snapshot(f"snap{snaps}")
                model.snapshot()
            elif op == "reopen":
                s = reopen(s, clean=rng.random() < 0.5)
            else:
                assert s.read(offset, length) == model.data[offset : offset + length], step
            assert bytes(s._head) == model.head_map(), (step, op)
            assert list(s.allocated_extents()) == model.extents(), (step, op)
        assert s.read(0, size) == model.data
        status = s.block_status(0, size)
        assert sum(e.length for e in status) == size
        assert [(e.offset, e.length) for e in status if e.flags == 0] == model.extents()
        head, base = bytes(s._head), bytes(s._base)
        s = reopen(s)
        assert (bytes(s._head), bytes(s._base)) == (head, base)
        assert s.read(0, size) == model.data
        assert s.snapshots() == [f"snap{i}" for i in range(1, snaps + 1)]
    finally:
        s.close(clean=False)


# --- snapshots -------------------------------------------------------------------------------


def test_snapshot_names_and_limit(store: ReplicaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        store.snapshot("")
    store.snapshot("a")
    with pytest.raises(ValueError, match="already exists"):
        store.snapshot("a")
    monkeypatch.setattr(store_mod, "MAX_LAYERS", 3)
    store.snapshot("b")
    with pytest.raises(StoreError, match="already has 3 layers"):
        store.snapshot("c")
    assert store.snapshots() == ["a", "b"]
    assert layer_files(store.directory) == [f"layer-00000{i}.img" for i in (1, 2, 3)]


def test_layer_limit_fits_the_map() -> None:
    # base[] holds index+1 of a snapshot layer in a byte, and 0xFF marks the head in reads.
    assert store_mod.MAX_LAYERS - 1 < 0xFF


def test_snapshot_syncs_head_then_creates_layer_then_commits(
    store: ReplicaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    head_fd = store._fds[-1]
    real_fdatasync, real_write = os.fdatasync, store_mod.write_json_atomic
    real_create = store_mod._create_layer

    def fdatasync(fd: int) -> None:
        if fd != store.intent._fd:
            events.append("sync head" if fd == head_fd else "sync other")
        real_fdatasync(fd)

    def create(*args: Any) -> int:
        events.append("new layer")
        return real_create(*args)

    def write(path: Path, obj: dict[str, Any]) -> None:
        events.append("meta")
        real_write(path, obj)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(store_mod, "_create_layer", create)
    monkeypatch.setattr(store_mod, "write_json_atomic", write)
    store.write(0, b"x")
    store.snapshot("s")
    assert events == ["sync head", "new layer", "meta"]


def _prepare(store: ReplicaStore) -> bytearray:
    """One snapshot and some head data; returns the expected contents."""
    model = bytearray(SIZE)
    store.write(0, b"A" * 3 * BLOCK)
    model[0 : 3 * BLOCK] = b"A" * 3 * BLOCK
    store.snapshot("s1")
    store.write(2 * BLOCK + 7, b"B" * 5000)
    model[2 * BLOCK + 7 : 2 * BLOCK + 5007] = b"B" * 5000
    return model


OLD_CHAIN = [("layer-000001.img", "s1"), ("layer-000002.img", None)]
NEW_CHAIN = [("layer-000001.img", "s1"), ("layer-000002.img", "s2"), ("layer-000003.img", None)]
SNAPSHOT_POINTS = [
    ("snapshot.after_sync", OLD_CHAIN),
    ("snapshot.after_new_layer", OLD_CHAIN),
    ("meta.after_tmp_write", OLD_CHAIN),
    ("meta.after_rename", NEW_CHAIN),
]


def _check_whole(s: ReplicaStore, chain: list[tuple[str, str | None]], model: bytes) -> None:
    assert [(x["file"], x["name"]) for x in disk_meta(s)["chain"]] == chain
    assert [(x.file, x.name) for x in s.meta.chain] == chain
    assert layer_files(s.directory) == [f for f, _ in chain]  # no orphan left
    assert not (s.directory / "volume.json.tmp").exists()
    assert s.read(0, SIZE) == model
    if chain == NEW_CHAIN:  # the head is new and empty, s2 froze the old head
        assert bytes(s._head) == bytes(SIZE // BLOCK)
        assert bytes(s._base) == bytes([1, 1, 2, 2]) + bytes(60)
    else:
        assert bytes(s._head) == blocks(2, 3)
        assert bytes(s._base) == blocks(0, 1, 2)


@pytest.mark.parametrize(("point", "chain"), SNAPSHOT_POINTS)
def test_snapshot_interrupted_in_process(
    store: ReplicaStore, point: str, chain: list[tuple[str, str | None]]
) -> None:
    model = _prepare(store)
    faults.arm(point, crash)
    with pytest.raises(Crash):
        store.snapshot("s2")
    faults.disarm_all()
    # The store that saw the failure still matches the disk and keeps working.
    assert [(x.file, x.name) for x in store.meta.chain] == chain
    assert store.read(0, SIZE) == model
    store = reopen(store, clean=False)
    _check_whole(store, chain, model)
    if chain == OLD_CHAIN:
        store.snapshot("s2")  # the retry succeeds
        _check_whole(store, NEW_CHAIN, model)
    store.write(0, b"C")
    store.close()


@pytest.mark.parametrize(("point", "chain"), SNAPSHOT_POINTS)
def test_snapshot_killed_at_crash_point(
    store: ReplicaStore, point: str, chain: list[tuple[str, str | None]]
) -> None:
    """A real process death (TANDEM_CRASH_AT, os._exit) at each point, then a reopen."""
    model = _prepare(store)
    pid = os.fork()
    if pid == 0:  # child: must never return into pytest
        try:
            os.environ[faults.ENV] = point
            store.snapshot("s2")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == faults.CRASH_EXIT
    if point == "snapshot.after_new_layer":
        assert "layer-000003.img" in layer_files(store.directory)  # the orphan to clean up
    if point == "meta.after_tmp_write":
        assert (store.directory / "volume.json.tmp").exists()
    store.close(clean=False)  # the parent's copy is stale: drop it without writing anything
    store = ReplicaStore.open(store.directory)
    _check_whole(store, chain, model)
    store.close()


# --- sessions: epoch, generation, dirty ------------------------------------------------------


def test_begin_fences_older_epochs(store: ReplicaStore) -> None:
    store.begin(3)
    assert disk_meta(store)["epoch"] == 3
    with pytest.raises(Fenced) as info:
        store.begin(2)
    assert info.value.errno == errno.ESTALE and isinstance(info.value, BlockError)
    assert disk_meta(store)["epoch"] == 3
    store.check_epoch(3)
    for other in (2, 4):
        with pytest.raises(Fenced):
            store.check_epoch(other)
    store.begin(3)  # the same target reconnecting
    store.begin(5)
    with pytest.raises(Fenced):
        store.check_epoch(3)
    store = reopen(store)
    with pytest.raises(Fenced):
        store.begin(4)
    store.check_epoch(5)
    with pytest.raises(ValueError):
        store.begin(-1)
    store.close()


def test_dirty_flag_lifecycle(store: ReplicaStore) -> None:
    assert disk_meta(store)["dirty"] is False
    store.write(0, b"before begin is allowed")
    store.begin(1)
    assert disk_meta(store)["dirty"] is True and store.meta.dirty
    store.write(0, b"x" * 10)
    store = reopen(store, clean=True)
    assert disk_meta(store)["dirty"] is False and not store.was_dirty
    store.begin(2)
    store.write(BLOCK, b"y" * 10)
    store = reopen(store, clean=False)  # a crash, as far as the disk can tell
    assert store.was_dirty and store.meta.dirty and disk_meta(store)["dirty"] is True
    store = reopen(store, clean=True)
    assert not store.was_dirty and disk_meta(store)["dirty"] is False
    store.close()


def test_end_session_syncs_then_marks_clean(
    store: ReplicaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.begin(1)
    store.write(0, b"data")
    events: list[str] = []
    real_fdatasync, real_write = os.fdatasync, store_mod.write_json_atomic

    def fdatasync(fd: int) -> None:
        events.append("sync intent" if fd == store.intent._fd else "sync")
        real_fdatasync(fd)

    def write(path: Path, obj: dict[str, Any]) -> None:
        events.append(f"meta dirty={obj['dirty']}")
        real_write(path, obj)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(store_mod, "write_json_atomic", write)
    store.end_session()
    # Data synced, then the write-intent marks cleared, then the replica recorded clean.
    assert events == ["sync", "sync intent", "meta dirty=False"]
    assert store.dirty_regions() == []
    assert store.read(0, 4) == b"data"  # still open
    store.close()
    # Clean already: no intent or meta write.
    assert events == ["sync", "sync intent", "meta dirty=False", "sync"]


def test_failed_flush_keeps_replica_dirty(
    store: ReplicaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.begin(1)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(MediumError):
        store.close(clean=True)
    assert disk_meta(store)["dirty"] is True
    monkeypatch.undo()
    store = ReplicaStore.open(store.directory)  # the failed close still released everything
    assert store.was_dirty
    store.close()


def test_begin_interrupted_leaves_old_meta_whole(store: ReplicaStore) -> None:
    store.begin(2)
    store.close()
    store = ReplicaStore.open(store.directory)
    faults.arm("meta.after_tmp_write", crash)
    with pytest.raises(Crash):
        store.begin(7)
    faults.disarm_all()
    # In memory the epoch already moved up (refusing more is the safe direction).
    with pytest.raises(Fenced):
        store.begin(6)
    store = reopen(store, clean=False)
    assert (store.meta.epoch, store.meta.dirty) == (2, False)
    store.begin(6)
    store.close()


def test_generation_is_persisted_and_only_grows(store: ReplicaStore) -> None:
    store.set_generation(4)
    assert disk_meta(store)["generation"] == 4
    with pytest.raises(ValueError, match="lower"):
        store.set_generation(3)
    store.set_generation(4)
    store = reopen(store, clean=False)
    assert store.meta.generation == 4
    with pytest.raises(ValueError):
        store.set_generation(-1)
    store.close()
