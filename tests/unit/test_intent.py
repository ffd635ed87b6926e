"""The write-intent log: marks are durable before writes, cleared lazily, conservative."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replica import intent as intent_mod
from replica.intent import MIN_REGION, WriteIntent, region_size
from replica.store import ReplicaStore

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(intent_mod.time, "monotonic", c)
    return c


def test_region_size_bounds_the_bitmap() -> None:
    assert region_size(64 * MiB) == MIN_REGION
    assert region_size(1 << 40) * intent_mod.MAX_REGIONS >= 1 << 40
    assert -(-(1 << 40) // region_size(1 << 40)) <= intent_mod.MAX_REGIONS


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fds fdatasync'ed from here on."""
    done: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (done.append(fd), real(fd)))
    return done


def test_first_write_to_a_region_is_synced_once(
    tmp_path: Path, syncs: list[int], clock: Clock
) -> None:
    wi = WriteIntent(tmp_path / "i", 16 * MiB)
    wi.before_write(100, 10)
    wi.before_write(5000, 4096)  # same region: no new sync
    assert len(syncs) == 1
    wi.before_write(MiB - 1, 2)  # straddles into region 1
    assert len(syncs) == 2
    # A "crash": a new instance on the same file sees the marks.
    again = WriteIntent(tmp_path / "i", 16 * MiB)
    assert again.ranges() == [(0, 2 * MiB)]


def test_many_ranges_are_marked_with_one_sync(
    tmp_path: Path, syncs: list[int], clock: Clock
) -> None:
    wi = WriteIntent(tmp_path / "i", 16 * MiB)
    wi.before_writes([(0, 4096), (3 * MiB + 5, 10), (8 * MiB - 1, 2)])
    assert len(syncs) == 1
    wi.before_write(3 * MiB, 4096)  # already marked: the write needs no sync of its own
    wi.before_writes([(0, 1)])
    assert len(syncs) == 1
    again = WriteIntent(tmp_path / "i", 16 * MiB)  # durable: a restart sees every mark
    assert again.ranges() == [(0, MiB), (3 * MiB, MiB), (7 * MiB, 2 * MiB)]


def test_flush_clears_only_regions_idle_before_it(tmp_path: Path, clock: Clock) -> None:
    wi = WriteIntent(tmp_path / "i", 16 * MiB)
    wi.before_write(0, 10)  # region 0 at t=1000
    clock.t += 20
    wi.before_write(5 * MiB, 10)  # region 5 at t=1020
    started = clock.t
    clock.t += 0.5
    wi.flushed(started)
    assert wi.ranges() == [(5 * MiB, MiB)]  # region 5 was written just before the flush
    clock.t += 20
    wi.flushed(clock.t)
    assert wi.ranges() == []
    assert WriteIntent(tmp_path / "i", 16 * MiB).ranges() == []  # the clear reached the file


def test_write_during_flush_keeps_its_mark(tmp_path: Path, clock: Clock) -> None:
    wi = WriteIntent(tmp_path / "i", 16 * MiB)
    wi.before_write(0, 10)
    clock.t += 30
    started = clock.t
    wi.before_write(0, 10)  # lands while the flush runs: not covered by it
    wi.flushed(started)
    assert wi.ranges() == [(0, MiB)]


def test_foreign_geometry_is_treated_as_all_dirty(tmp_path: Path) -> None:
    WriteIntent(tmp_path / "i", 16 * MiB).before_write(0, 1)
    bigger = WriteIntent(tmp_path / "i", 1 << 40)  # another region size
    assert bigger.ranges() == [(0, 1 << 40)]
    (tmp_path / "j").write_bytes(b"junk")
    assert WriteIntent(tmp_path / "j", 8 * MiB).ranges() == [(0, 8 * MiB)]


def test_ranges_merge_and_clip_to_the_size(tmp_path: Path) -> None:
    wi = WriteIntent(tmp_path / "i", 5 * MiB + 4096)
    wi.before_write(MiB, 2 * MiB)
    wi.before_write(5 * MiB, 4096)
    assert wi.ranges() == [(MiB, 2 * MiB), (5 * MiB, 4096)]


def test_store_marks_writes_unmaps_and_clean_close_clears(tmp_path: Path) -> None:
    s = ReplicaStore.create(tmp_path / "r", 8 * MiB)
    s.begin(1)
    s.write(3 * MiB + 5, b"x")
    s.unmap(6 * MiB, 4096)
    assert s.dirty_regions() == [(3 * MiB, MiB), (6 * MiB, MiB)]
    s.close(clean=False)  # a crash: the marks survive
    s = ReplicaStore.open(tmp_path / "r")
    assert s.dirty_regions() == [(3 * MiB, MiB), (6 * MiB, MiB)]
    s.close(clean=True)
    assert ReplicaStore.open(tmp_path / "r").dirty_regions() == []


def test_a_failed_sync_leaves_the_region_unmarked_so_the_next_write_syncs_again(
    tmp_path: Path, syncs: list[int], clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    wi = WriteIntent(tmp_path / "i", 16 * MiB)
    counting = os.fdatasync  # the syncs fixture's

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        wi.before_writes([(0, 10), (3 * MiB, 10), (0, 2 * MiB)])
    assert wi.marked[:4] == bytes(4)  # rolled back: nothing claims to be durable
    monkeypatch.setattr(os, "fdatasync", counting)
    wi.before_write(100, 10)
    assert len(syncs) == 1  # marked and synced this time
    assert wi.ranges() == [(0, MiB)]
