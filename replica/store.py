"""The replica store: a chain of sparse layer files and an in-memory map of who holds each block.

Layout of a replica directory:

    volume.json         ReplicaMeta, only ever replaced with meta.write_json_atomic
    layer-000001.img    one sparse file per layer, each exactly the volume size; the chain in
    layer-000002.img    volume.json orders them bottom..top. Snapshots are read-only, the last
    ...                 layer (the head) takes every write.

Block map (4 KiB blocks, rebuilt at open from each file's SEEK_DATA/SEEK_HOLE extents, so it
is never persisted and cannot disagree with the files):
    head[b] = 1 if the head file holds block b
    base[b] = index+1 of the top-most snapshot layer holding b (0 = no snapshot does)
A read takes b from the head if head[b], else from layer base[b]-1, else it is zeros. `base`
is a bytearray, hence at most 255 layers; 0xFF is free for the "head" marker in `_sources`.
Writes only ever touch the head, in whole blocks, so allocation on disk matches the map.
This relies on the filesystem reporting holes at 4 KiB granularity (ext4, xfs, btrfs, tmpfs);
create() refuses a filesystem whose block size is larger or that reports no holes.

Generation, epoch and dirty: how a restarting target proves which replicas are current.
Jiva rewrote a revision counter synchronously after every write, halving write speed; here
nothing beyond the data is written per I/O. Invariants:
  1. `epoch` only grows. begin(e) refuses e < epoch (Fenced) and otherwise persists epoch=e
     and dirty=True: one synchronous metadata write per target session, before its first
     write. check_epoch() refuses any other epoch, so a superseded target cannot write here.
  2. `generation` only grows. The target raises it on the replicas that stay (set_generation,
     synchronous) whenever the set of replicas receiving writes shrinks, before acknowledging
     any write the dropped replica misses. So a replica that missed an acknowledged write
     always has a lower generation than the survivors, and is never a rebuild source.
  3. dirty=False on disk only after a clean close/end_session that fdatasync'ed all data of the
     session. A replica found dirty at open (`was_dirty`) ended its session without that: it
     may hold writes that were never acknowledged, or lack acknowledged-but-unflushed writes
     its peers have, so dirty replicas of the same generation must not be assumed identical.
  4. In-memory metadata is updated before it is persisted: if the write fails, memory is
     ahead of disk (a higher epoch refuses more, dirty=True claims less), never behind.
Writes on a store without begin() are allowed: sessions are enforced by the server through
check_epoch, not here.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from replica.block import (
    STATE_HOLE,
    STATE_ZERO,
    BlockError,
    Extent,
    MediumError,
    NoSpace,
    check_range,
)
from replica.faults import crash_point
from replica.intent import WriteIntent
from replica.meta import Layer, MetaError, ReplicaMeta, read_json, write_json_atomic

log = logging.getLogger("tandem.replica.store")

BLOCK = 4096
META_FILE = "volume.json"
INTENT_FILE = "intent.bin"
ATTRS_FILE = "attrs.json"
MAX_ATTRS_BYTES = 1 << 20
MAX_LAYERS = 255  # base[] is a bytearray of index+1 values; 0xFF must stay free (see _sources)
_LAYER_RE = re.compile(r"layer-(\d{6,})\.img")
_HEAD_MARK = 0xFF
_HEAD_TO_MARK = bytes([0, _HEAD_MARK]) + bytes(254)  # translate table: head 1 -> 0xFF
_NONZERO_TO_ONE = b"\x00" + b"\x01" * 255  # translate table: any layer -> 1
_ZEROS = bytes(1 << 20)
_SCAN_CHUNK = 1 << 20  # blocks per step of allocated_extents (bounds temporary memory)


class StoreError(Exception):
    """The replica cannot be created or opened (the message says why)."""


class SizeMismatch(StoreError):
    """An existing replica has a different size from the one asked for."""


class Fenced(BlockError):
    """The request carries an older (or unopened) target epoch than the replica's."""

    errno = errno.ESTALE


# --- small helpers ------------------------------------------------------------------------


def _layer_file(n: int) -> str:
    return f"layer-{n:06d}.img"


@functools.cache
def _other_than(value: int) -> re.Pattern[bytes]:
    return re.compile(b"[^\\x%02x]" % value)


def _runs(arr: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Maximal runs (i, j, value) of equal bytes in arr[start:end]; C-speed per run."""
    i = start
    while i < end:
        v = arr[i]
        m = _other_than(v).search(arr, i, end)
        j = m.start() if m else end
        yield i, j, v
        i = j


def _data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of [start, end) that hold data in the file, per SEEK_DATA/SEEK_HOLE."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def _load_fallocate() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for name in ("fallocate64", "fallocate"):  # fallocate64: 64-bit off_t on 32-bit glibc
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            return fn
    return None


_fallocate = _load_fallocate()
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_PUNCH_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of the file; OSError(EOPNOTSUPP) where unsupported."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# Large writes go to the file in pieces of at most this, cut at multiples of it: the page
# cache sizes a folio by the write that creates it, and ext4 walks the whole folio on every
# later write into it. Measured here: a 4 KiB write into a file filled with 1 MiB writes
# costs 16.8 us of CPU, with 256 KiB writes 6-8 us, 128 KiB 5.5 us, 64 KiB 3.6 us (filling
# costs 4% more at 128 KiB, 15% at 64 KiB). native/replica_server.c does the same, except
# over pages all in the page cache (no folio is made: one call, see its all_cached).
WRITE_PIECE = 64 << 10


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, pos: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view[: WRITE_PIECE - pos % WRITE_PIECE], pos)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view, pos = view[n:], pos + n


def _pwritev_all(fd: int, pieces: list[bytearray | memoryview], pos: int) -> None:
    total = sum(len(p) for p in pieces)
    if total > WRITE_PIECE - pos % WRITE_PIECE:
        _pwrite_all(fd, b"".join(pieces), pos)  # large: in pieces (the copy is cheap beside it)
        return
    n = os.pwritev(fd, pieces, pos)
    if n < total:  # rare (signal, nearly full disk): finish the rest the slow way
        _pwrite_all(fd, memoryview(b"".join(pieces))[n:], pos + n)


def _pread_into(fd: int, view: memoryview, pos: int) -> None:
    while view:
        n = os.preadv(fd, [view], pos)
        if n <= 0:  # past EOF: the rest stays zero, as a sparse file would read
            return
        view, pos = view[n:], pos + n


def io_error(e: OSError, what: str) -> BlockError:
    """The BlockError for a failed store syscall (full disk or quota: NoSpace)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: {e.strerror}")
    return MediumError(f"{what}: {e.strerror or e}")


def split_pieces(
    ranges: list[tuple[int, int]], data: bytes
) -> Iterator[tuple[int, int, int, bool]]:
    """(offset, length, position in data, all zeros) of pieces whose data is back to back:
    an all-zero piece is stored as a hole, which reads the same and keeps the replica thin."""
    pos = 0
    for off, n in ranges:
        yield off, n, pos, data.count(0, pos, pos + n) == n
        pos += n


def _lock_dir(directory: Path) -> int:
    """Open and exclusively lock the directory: two stores on one replica would corrupt it."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise StoreError(f"no replica at {directory}: the directory does not exist") from None
    except OSError as e:
        raise StoreError(f"cannot open replica directory {directory}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(f"replica at {directory} is already open (locked)") from None
    return fd


def _create_layer(directory: Path, dirfd: int, name: str, size: int) -> int:
    """Create an empty sparse layer file of `size` bytes, durably; returns it open O_RDWR."""
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.fsync(dirfd)
        # The block map is rebuilt from SEEK_DATA: a filesystem reporting a fresh sparse file
        # as data would make every block of every layer look allocated.
        if next(_data_ranges(fd, 0, size), None) is not None:
            raise StoreError(f"the filesystem at {directory} does not report holes (SEEK_DATA)")
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def current_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _remove_orphans(directory: Path, keep: set[str]) -> None:
    for entry in os.listdir(directory):
        if _LAYER_RE.fullmatch(entry) and entry not in keep:
            log.warning("removing orphan layer %s (interrupted snapshot or create)", entry)
            (directory / entry).unlink(missing_ok=True)


# --- the store ------------------------------------------------------------------------------


class ReplicaStore:
    """One replica's data: use create(), open() or open_or_create(), not the constructor."""

    def __init__(self, directory: Path, dirfd: int) -> None:
        """Load an existing replica whose directory is already locked through `dirfd`."""
        self.directory = directory
        self._dirfd = dirfd
        self._meta_path = directory / META_FILE
        self._fds: list[int] = []
        self._closed = False
        self._can_punch = True
        try:
            raw = read_json(self._meta_path)
        except FileNotFoundError:
            raise StoreError(f"no replica at {directory}: {META_FILE} is missing") from None
        except MetaError as e:
            raise StoreError(f"corrupt replica metadata: {e}") from None
        except OSError as e:
            raise StoreError(f"cannot read {self._meta_path}: {e.strerror}") from e
        try:
            self.meta = ReplicaMeta.from_dict(raw)
        except MetaError as e:
            raise StoreError(f"corrupt replica metadata in {self._meta_path}: {e}") from None
        self.was_dirty = self.meta.dirty
        # Dirty and opened under another kernel boot: unflushed writes may be gone.
        self.lost_cache = self.meta.dirty and self.meta.boot_id != current_boot_id()
        if self.meta.block_size != BLOCK:
            raise StoreError(f"{self._meta_path}: block_size {self.meta.block_size} != {BLOCK}")
        if len(self.meta.chain) > MAX_LAYERS:
            raise StoreError(f"{self._meta_path}: {len(self.meta.chain)} layers > {MAX_LAYERS}")
        try:
            _remove_orphans(directory, {layer.file for layer in self.meta.chain})
            self._open_layers()
            self.intent = WriteIntent(directory / INTENT_FILE, self.meta.size)
        except BaseException as e:
            for fd in self._fds:  # the caller owns (and closes) dirfd
                os.close(fd)
            if isinstance(e, OSError):
                raise StoreError(f"cannot open replica at {directory}: {e}") from e
            raise

    def _open_layers(self) -> None:
        size, nblocks = self.meta.size, self.meta.size // BLOCK
        self._head = bytearray(nblocks)
        self._base = bytearray(nblocks)
        top = len(self.meta.chain) - 1
        for i, layer in enumerate(self.meta.chain):
            path = self.directory / layer.file
            try:
                fd = os.open(path, os.O_RDWR if i == top else os.O_RDONLY)
            except FileNotFoundError:
                raise StoreError(
                    f"replica at {self.directory}: layer file {layer.file} is missing"
                ) from None
            except OSError as e:
                raise StoreError(f"cannot open layer {path}: {e.strerror}") from e
            self._fds.append(fd)
            actual = os.fstat(fd).st_size
            if actual > size:
                # An interrupted resize grew the files but never recorded the new size: the
                # recorded size is the truth (resize() grows files before the metadata).
                log.warning(
                    "layer %s: undoing an interrupted resize (%d -> %d)", path, actual, size
                )
                os.truncate(path, size)
            elif actual != size:
                raise StoreError(f"layer {path} is {actual} bytes, the volume is {size}")
            # Bottom to top, so each block ends up with the top-most snapshot holding it.
            block_map, value = (self._head, 1) if i == top else (self._base, i + 1)
            for start, end in _data_ranges(fd, 0, size):
                b0, b1 = start // BLOCK, -(-end // BLOCK)  # round outward to whole blocks
                block_map[b0:b1] = bytes([value]) * (b1 - b0)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, size: int, volume: str = "") -> ReplicaStore:
        """A new empty replica in `directory` (which may exist but must hold no replica)."""
        directory = Path(directory)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % BLOCK:
            raise StoreError(f"replica size must be a positive multiple of {BLOCK}, not {size!r}")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            bsize = os.statvfs(directory).f_bsize
        except OSError as e:
            raise StoreError(f"cannot create replica directory {directory}: {e.strerror}") from e
        if bsize > BLOCK:
            # Holes would be reported in units larger than a block: the map would be wrong.
            raise StoreError(f"filesystem block size {bsize} at {directory} exceeds {BLOCK}")
        dirfd = _lock_dir(directory)
        try:
            if (directory / META_FILE).exists():
                raise StoreError(f"a replica already exists at {directory}")
            _remove_orphans(directory, set())  # left by a create that crashed before its meta
            first = _layer_file(1)
            try:
                os.close(_create_layer(directory, dirfd, first, size))
                meta = ReplicaMeta(
                    volume=volume,
                    size=size,
                    uuid=str(uuid.uuid4()),
                    chain=[Layer(file=first, name=None, created=time.time())],
                )
                write_json_atomic(directory / META_FILE, meta.to_dict())
            except OSError as e:
                raise StoreError(f"cannot create replica at {directory}: {e.strerror}") from e
            return cls(directory, dirfd)
        except BaseException:
            os.close(dirfd)
            raise

    @classmethod
    def open(cls, directory: Path) -> ReplicaStore:
        """The replica in `directory`; StoreError if missing, corrupt or incomplete."""
        directory = Path(directory)
        dirfd = _lock_dir(directory)
        try:
            return cls(directory, dirfd)
        except BaseException:
            os.close(dirfd)
            raise

    @classmethod
    def open_or_create(cls, directory: Path, size: int, volume: str = "") -> ReplicaStore:
        directory = Path(directory)
        if not (directory / META_FILE).exists():
            return cls.create(directory, size, volume)
        store = cls.open(directory)
        if store.size != size:
            store.close(clean=False)  # nothing changed: leave the metadata as found
            raise SizeMismatch(f"replica at {directory} has size {store.size}, not {size}")
        return store

    # --- data path --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.meta.size

    def _check_open(self) -> None:
        if self._closed:
            raise MediumError(f"replica store at {self.directory} is closed")

    def _sources(self, b0: int, b1: int) -> bytes:
        """Per block of [b0, b1): 0xFF = head, k = layer k-1, 0 = hole (no Python loop)."""
        n = b1 - b0
        head = int.from_bytes(self._head[b0:b1].translate(_HEAD_TO_MARK), "little")
        return (head | int.from_bytes(self._base[b0:b1], "little")).to_bytes(n, "little")

    def _read_range(self, offset: int, length: int) -> bytes:
        """Read through the chain; raises OSError (callers map it)."""
        end = offset + length
        b0, b1 = offset // BLOCK, -(-end // BLOCK)
        src = self._sources(b0, b1)
        runs = list(_runs(src, 0, b1 - b0))
        if len(runs) == 1:  # uniform range: one syscall (or none), no copy
            v = runs[0][2]
            if v == 0:
                return bytes(length)
            data = os.pread(self._fds[-1] if v == _HEAD_MARK else self._fds[v - 1], length, offset)
            return data if len(data) == length else data.ljust(length, b"\0")
        out = bytearray(length)
        view = memoryview(out)
        for i, j, v in runs:
            if v == 0:
                continue  # a hole: already zeros
            start, stop = max((b0 + i) * BLOCK, offset), min((b0 + j) * BLOCK, end)
            fd = self._fds[-1] if v == _HEAD_MARK else self._fds[v - 1]
            _pread_into(fd, view[start - offset : stop - offset], start)
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        check_range(self.size, offset, length)
        if not length:
            return b""
        try:
            return self._read_range(offset, length)
        except OSError as e:
            raise io_error(e, f"read {offset}+{length}") from e

    @contextlib.contextmanager
    def _head_io(self, what: str, b0: int, b1: int) -> Iterator[None]:
        """Map OSError to a BlockError; after a failed write, re-learn the head map of the range
        from the file, so memory agrees with what a reopen would see."""
        try:
            yield
        except OSError as e:
            with contextlib.suppress(OSError):
                self._head[b0:b1] = bytes(b1 - b0)
                for start, end in _data_ranges(self._fds[-1], b0 * BLOCK, b1 * BLOCK):
                    s, t = start // BLOCK, -(-end // BLOCK)
                    self._head[s:t] = b"\x01" * (t - s)
            raise io_error(e, what) from e

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        mv = memoryview(data).cast("B")
        length = len(mv)
        check_range(self.size, offset, length)
        if not length:
            return
        self._intend(offset, length)
        end = offset + length
        b0, b1 = offset // BLOCK, -(-end // BLOCK)
        lead = offset - b0 * BLOCK
        with self._head_io(f"write {offset}+{length}", b0, b1):
            if not lead and not end % BLOCK:
                _pwrite_all(self._fds[-1], mv, offset)
            else:
                # Edge blocks are read through the chain and patched (keeping the bytes of
                # lower layers); interior blocks go straight from the caller's buffer.
                pieces: list[bytearray | memoryview] = []
                rest = mv
                if lead:
                    blk = bytearray(self._read_range(b0 * BLOCK, BLOCK))
                    take = min(BLOCK - lead, length)
                    blk[lead : lead + take] = mv[:take]
                    pieces.append(blk)
                    rest = mv[take:]
                whole = len(rest) // BLOCK * BLOCK
                if whole:
                    pieces.append(rest[:whole])
                if len(rest) > whole:
                    blk = bytearray(self._read_range((b1 - 1) * BLOCK, BLOCK))
                    blk[: len(rest) - whole] = rest[whole:]
                    pieces.append(blk)
                _pwritev_all(self._fds[-1], pieces, b0 * BLOCK)
        self._head[b0:b1] = b"\x01" * (b1 - b0)

    def _write_zero_blocks(self, b0: int, b1: int) -> None:
        fd, pos, end = self._fds[-1], b0 * BLOCK, b1 * BLOCK
        while pos < end:
            n = min(len(_ZEROS), end - pos)
            _pwrite_all(fd, memoryview(_ZEROS)[:n], pos)
            pos += n
        self._head[b0:b1] = b"\x01" * (b1 - b0)

    def _discard_head_blocks(self, b0: int, b1: int) -> None:
        """Make head-only blocks [b0, b1) read as zeros, freeing their space if possible."""
        if self._can_punch:
            try:
                _punch_hole(self._fds[-1], b0 * BLOCK, (b1 - b0) * BLOCK)
                self._head[b0:b1] = bytes(b1 - b0)
                return
            except OSError as e:
                if e.errno not in _PUNCH_UNSUPPORTED:
                    raise
                log.info("%s: hole punching unsupported, unmap writes zeros", self.directory)
                self._can_punch = False
        for i, j, v in list(_runs(self._head, b0, b1)):
            if v:
                self._write_zero_blocks(i, j)

    def _zero(self, offset: int, length: int, punch: bool) -> None:
        self._check_open()
        check_range(self.size, offset, length)
        if not length:
            return
        self._intend(offset, length)
        end = offset + length
        c0, c1 = -(-offset // BLOCK), end // BLOCK  # the whole blocks inside the range
        if c0 > c1:
            edges = [(offset, end)]  # inside one block
        else:
            edges = [(s, e) for s, e in ((offset, c0 * BLOCK), (c1 * BLOCK, end)) if s < e]
        for s, e in edges:
            b = s // BLOCK
            if punch and not self._head[b] and not self._base[b]:
                continue  # already reads as zeros; don't allocate
            self.write(s, bytes(e - s))
        if c0 >= c1:
            return
        with self._head_io(f"zero {offset}+{length}", c0, c1):
            if not punch:
                self._write_zero_blocks(c0, c1)  # NO_HOLE: must stay allocated
                return
            below = self._base[c0:c1].translate(_NONZERO_TO_ONE)
            for i, j, v in list(_runs(below, 0, c1 - c0)):
                if v:
                    # A snapshot holds these: a hole in the head would expose its old data.
                    self._write_zero_blocks(c0 + i, c0 + j)
                elif self._head.find(1, c0 + i, c0 + j) != -1:
                    self._discard_head_blocks(c0 + i, c0 + j)

    def unmap(self, offset: int, length: int) -> None:
        """The range reads as zeros afterwards; space is freed where no snapshot holds data."""
        self._zero(offset, length, punch=True)

    def write_zeroes(self, offset: int, length: int, punch: bool = True) -> None:
        """Zero the range; punch=False keeps it allocated (NBD NO_HOLE)."""
        self._zero(offset, length, punch)

    def put_pieces(self, ranges: list[tuple[int, int]], data: bytes) -> int:
        """Write many pieces (a rebuild's), their data back to back in `data`, except that
        a piece of all zeros is unmapped instead (see `split_pieces`). Returns the bytes
        unmapped."""
        unmapped = 0
        with memoryview(data) as view:
            for off, n, pos, zero in split_pieces(ranges, data):
                if zero:
                    self.unmap(off, n)
                    unmapped += n
                else:
                    self.write(off, view[pos : pos + n])
        return unmapped

    def read_pieces(self, ranges: list[tuple[int, int]]) -> bytes:
        """The data of the pieces, back to back."""
        return b"".join(self.read(off, n) for off, n in ranges)

    def prepare_writes(self, ranges: list[tuple[int, int]]) -> None:
        """Record the write intent of many coming mutations with one sync (see
        WriteIntent.before_writes); the mutations themselves then find their regions marked."""
        try:
            self.intent.before_writes(ranges)
        except OSError as e:
            raise io_error(e, "record write intent") from e

    def _intend(self, offset: int, length: int) -> None:
        try:
            self.intent.before_write(offset, length)
        except OSError as e:
            raise io_error(e, "record write intent") from e

    def flushed(self, flush_started: float) -> None:
        """A flush that began at monotonic time `flush_started` completed: let the write-intent
        log forget regions idle since well before it. Call from the thread that writes."""
        with contextlib.suppress(OSError):
            self.intent.flushed(flush_started)

    def dirty_regions(self) -> list[tuple[int, int]]:
        """Byte ranges that may hold writes not yet durable here (see replica/intent.py)."""
        return self.intent.ranges()

    def flush(self) -> None:
        """fdatasync the head; lower layers are read-only and were synced when frozen.

        May run in a worker thread while the event loop continues with other requests.
        """
        self._check_open()
        fd = self._fds[-1]
        try:
            os.fdatasync(fd)
        except OSError as e:
            if e.errno == errno.EBADF and not self._closed and self._fds[-1] != fd:
                return  # raced with snapshot(), which synced that head before retiring it
            raise io_error(e, "flush") from e

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Consecutive extents covering exactly the range: allocated on some layer (flags 0)
        or on none (HOLE|ZERO)."""
        self._check_open()
        check_range(self.size, offset, length)
        if not length:
            return []
        end = offset + length
        b0, b1 = offset // BLOCK, -(-end // BLOCK)
        alloc = self._sources(b0, b1).translate(_NONZERO_TO_ONE)
        out = []
        for i, j, v in _runs(alloc, 0, b1 - b0):
            start, stop = max((b0 + i) * BLOCK, offset), min((b0 + j) * BLOCK, end)
            out.append(Extent(start, stop - start, 0 if v else STATE_HOLE | STATE_ZERO))
        return out

    def allocated_extents(
        self, offset: int = 0, length: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """(offset, length) runs allocated on any layer, merged and clipped to the range (for
        rebuild streaming). Bounds are checked now; the map is read lazily, chunk by chunk."""
        self._check_open()
        if length is None:
            length = self.size - offset
        check_range(self.size, offset, length)
        return self._allocated(offset, offset + length)

    def _allocated(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        b0, b1 = offset // BLOCK, -(-end // BLOCK)
        pending: tuple[int, int] | None = None
        for c0 in range(b0, b1, _SCAN_CHUNK):
            c1 = min(c0 + _SCAN_CHUNK, b1)
            alloc = self._sources(c0, c1).translate(_NONZERO_TO_ONE)
            for i, j, v in _runs(alloc, 0, c1 - c0):
                if not v:
                    continue
                start, stop = max((c0 + i) * BLOCK, offset), min((c0 + j) * BLOCK, end)
                if pending and pending[1] == start:  # continues across a chunk boundary
                    pending = (pending[0], stop)
                    continue
                if pending:
                    yield pending[0], pending[1] - pending[0]
                pending = (start, stop)
        if pending:
            yield pending[0], pending[1] - pending[0]

    # --- online growth -----------------------------------------------------------------------

    def resize(self, size: int) -> None:
        """Grow the volume to `size` bytes (never shrinks). Crash-safe: the layer files grow
        first (crash point resize.after_files) and the metadata records the size last; an
        interrupted resize is undone at the next open."""
        self._check_open()
        if not isinstance(size, int) or size <= 0 or size % BLOCK:
            raise ValueError(f"size must be a positive multiple of {BLOCK}, not {size!r}")
        if size < self.size:
            raise ValueError(f"cannot shrink the volume from {self.size} to {size} bytes")
        if size == self.size:
            return
        try:
            for layer in self.meta.chain:
                os.truncate(self.directory / layer.file, size)
            for fd in self._fds:
                os.fsync(fd)
        except OSError as e:
            raise io_error(e, "grow layer files") from e
        crash_point("resize.after_files")
        grow = size // BLOCK - len(self._head)
        self._persist(size=size)
        self._head.extend(bytes(grow))
        self._base.extend(bytes(grow))
        marks = self.intent.ranges()
        self.intent.close()
        self.intent = WriteIntent(self.directory / INTENT_FILE, size)
        for off, n in marks:  # keep what was marked (region sizes may differ now)
            self.intent.before_write(off, n)

    # --- volume attributes -------------------------------------------------------------------

    def attrs(self) -> dict[str, Any]:
        """Small durable key-value state kept with the volume's data (e.g. SCSI persistent
        reservations), replicated by the target like the data itself."""
        try:
            return read_json(self.directory / ATTRS_FILE)
        except FileNotFoundError:
            return {}
        except (OSError, MetaError) as e:
            raise MediumError(f"cannot read {ATTRS_FILE}: {e}") from e

    def set_attrs(self, changes: dict[str, Any]) -> None:
        """Set keys (a value of None deletes the key); crash-safe like the metadata."""
        self._check_open()
        current = self.attrs()
        for key, value in changes.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        try:
            write_json_atomic(self.directory / ATTRS_FILE, current)
        except OSError as e:
            raise io_error(e, "write volume attributes") from e

    # --- snapshots ----------------------------------------------------------------------------

    def snapshots(self) -> list[str]:
        return [layer.name for layer in self.meta.chain[:-1] if layer.name is not None]

    def snapshot(self, name: str) -> None:
        """Freeze the head as snapshot `name` and put a new empty head on top. Crash-safe: the
        metadata rename is the commit point; a new layer file without it is an orphan that the
        next open removes."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError("a snapshot needs a non-empty name")
        if name in self.snapshots():
            raise ValueError(f"snapshot {name!r} already exists")
        chain = self.meta.chain
        if len(chain) >= MAX_LAYERS:
            raise StoreError(f"cannot snapshot {name!r}: the chain already has {MAX_LAYERS} layers")
        old_fd = self._fds[-1]
        try:
            os.fdatasync(old_fd)  # 1) the frozen layer never changes again: make it durable
        except OSError as e:
            raise io_error(e, "snapshot sync") from e
        crash_point("snapshot.after_sync")

        numbers = [
            int(m.group(1)) for f in os.listdir(self.directory) if (m := _LAYER_RE.fullmatch(f))
        ]
        new_file = _layer_file(max(numbers, default=0) + 1)
        now = time.time()
        new_meta = dataclasses.replace(
            self.meta,
            chain=[
                *chain[:-1],
                Layer(file=chain[-1].file, name=name, created=now),
                Layer(file=new_file, name=None, created=now),
            ],
        )
        new_fd = ro_fd = -1
        meta_attempted = False
        try:
            new_fd = _create_layer(self.directory, self._dirfd, new_file, self.size)  # 2)
            crash_point("snapshot.after_new_layer")
            ro_fd = os.open(self.directory / chain[-1].file, os.O_RDONLY)
            meta_attempted = True
            write_json_atomic(self._meta_path, new_meta.to_dict())  # 3) the commit point
        except BaseException as exc:
            committed = self._committed_on_disk(new_file) if meta_attempted else False
            if committed:
                self._switch_head(new_meta, new_fd, ro_fd)  # memory follows the disk
            else:
                for fd in (new_fd, ro_fd):
                    if fd >= 0:
                        os.close(fd)
                if new_fd >= 0 and committed is False:
                    (self.directory / new_file).unlink(missing_ok=True)
                # committed is None: unknown; keep the file, the next open drops it if orphaned
            if isinstance(exc, OSError):
                raise io_error(exc, f"snapshot {name!r}") from exc
            raise
        self._switch_head(new_meta, new_fd, ro_fd)

    def _committed_on_disk(self, new_file: str) -> bool | None:
        """Did the metadata write that failed reach its rename? None if it cannot be told."""
        try:
            meta = ReplicaMeta.from_dict(read_json(self._meta_path))
        except (OSError, ValueError):
            return None
        return any(layer.file == new_file for layer in meta.chain)

    def _switch_head(self, meta: ReplicaMeta, new_fd: int, ro_fd: int) -> None:
        old_fd = self._fds[-1]
        # One assignment, so a flush thread sees either the old or the new list.
        self._fds = [*self._fds[:-1], ro_fd, new_fd]
        os.close(old_fd)
        frozen = len(meta.chain) - 1  # index+1 of the frozen head in the new chain
        mark = bytes([frozen])
        for i, j, v in list(_runs(self._head, 0, len(self._head))):
            if v:
                self._base[i:j] = mark * (j - i)
        self._head = bytearray(len(self._head))
        self.meta = meta

    def engine_view(self) -> tuple[list[int], bytearray, bytearray]:
        """The layer fds (bottom..head) and block maps (head, base) that the native engine
        (native/replica_server.c) reads and updates in place. Valid until the next snapshot(),
        which replaces them (the engine is paused around it)."""
        return self._fds, self._head, self._base

    # --- sessions: epoch, generation, dirty (see the module docstring) -----------------------

    def _persist(self, **changes: object) -> None:
        self.meta = dataclasses.replace(self.meta, **changes)  # memory first (invariant 4)
        try:
            write_json_atomic(self._meta_path, self.meta.to_dict())
        except OSError as e:
            raise io_error(e, "write replica metadata") from e

    def begin(self, epoch: int) -> None:
        """A target (epoch `epoch`) opens the replica for writing: fence older targets."""
        self._check_open()
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, not {epoch!r}")
        if epoch < self.meta.epoch:
            raise Fenced(f"epoch {epoch} is older than the replica's epoch {self.meta.epoch}")
        self._persist(epoch=epoch, dirty=True, boot_id=current_boot_id())

    def check_epoch(self, epoch: int) -> None:
        if epoch != self.meta.epoch:
            raise Fenced(f"epoch {epoch} is not the replica's current epoch {self.meta.epoch}")

    def set_generation(self, generation: int) -> None:
        self._check_open()
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise ValueError(f"generation must be a non-negative integer, not {generation!r}")
        if generation < self.meta.generation:
            raise ValueError(
                f"generation {generation} is lower than the replica's {self.meta.generation}"
            )
        crash_point("generation.before_persist")
        self._persist(generation=generation)
        crash_point("generation.after_persist")

    def end_session(self) -> None:
        """The target is done writing: sync all data, then record the replica as clean."""
        self.flush()
        try:
            self.intent.clear_all()
        except OSError as e:
            raise io_error(e, "clear write intent") from e
        if self.meta.dirty:
            self._persist(dirty=False)

    def close(self, clean: bool = True) -> None:
        """clean: end_session() first. Either way close the files and release the lock."""
        if self._closed:
            return
        try:
            if clean:
                self.end_session()
        finally:
            self._closed = True
            self.intent.close()
            self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in [*fds, self._dirfd]:  # dirfd last: it holds the lock
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dirfd = -1
