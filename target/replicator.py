"""The replicator: the block interface over N replicas, in tandem.

Rules (DESIGN.md, principle 4):
- A write goes to every RW and WO replica in parallel. It is acknowledged once every one of
  them has answered or been dropped, and only if a quorum (RF//2+1 of the configured
  replica count) of RW replicas wrote it. Otherwise the caller gets an error: a write is
  never acknowledged below quorum.
- Slow is failed: a replica that fails a request or misses the per-request deadline is
  marked ERR and dropped. While the RW replicas are down to the bare quorum, they get a
  longer deadline, so one hiccup shared by all does not fail the volume.
- Before any further write is acknowledged after a drop, the generation of the remaining
  RW replicas is bumped (one synchronous metadata write each), so a dropped replica can
  never later pass for current: it holds an older generation than every replica that took
  writes it missed. From the drop on, the target records which regions it missed.
- Reads go to one RW replica (round robin); on error that replica is dropped and another
  tried. Below quorum the volume is read-only but keeps serving reads.
- Selection, at start and whenever no RW replica is left: wait until a quorum of replicas
  answers (fewer could all be stale); those with the highest generation are current, the
  rest stale (ERR: never read from, never a rebuild source). Open the current ones with a
  new epoch (fencing out any older target), resynchronise the regions their write-intent
  logs mark (they may differ after a crash; see replica/intent.py), bump the generation.
- Healing: ERR replicas are retried with backoff. One that answers joins as WO (takes
  writes, serves no reads) and is rebuilt from a current replica: incrementally (the
  regions missed while it was away plus its own marked regions) when this target tracked
  it since it was current, else fully (allocated extents only). Chunks are copied under
  an exclusive range lock and verified by checksum; only then does it get the current
  generation and turn RW. The volume becomes writable again by itself at quorum.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from replica.client import ReplicaClient, ReplicaDown
from replica.faults import crash_point
from replica.store import current_boot_id
from target.blockdev import (
    BlockError,
    Extent,
    MediumError,
    NoSpace,
    OutOfRange,
    ReadOnlyError,
    check_range,
)
from target.rangelock import RangeLock
from target.rebuild import Progress, RateLimiter, batches, copy_deadline, run_workers, windows
from target.regions import RegionMap, merge_ranges

log = logging.getLogger("tandem.replicator")

BLOCK = 4096
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
SESSION_BITS = 32  # a replica's stored epoch = target epoch << 32 | session


class Mode(StrEnum):
    RW = "RW"
    WO = "WO"
    ERR = "ERR"


@dataclass
class Member:
    address: str
    mode: Mode = Mode.ERR
    client: ReplicaClient | None = None
    error: str | None = "not connected"
    generation: int | None = None
    uuid: str | None = None
    key: int = 0  # the fencing key of its last OPEN (epoch << SESSION_BITS | session)
    # Regions written while this replica was away; None = unknown (a full rebuild needed).
    missed: RegionMap | None = None
    missed_since: int | None = None  # its generation when the tracking began
    rebuild: Progress | None = None
    last_rebuild: dict[str, Any] | None = None
    backoff: float = BACKOFF_FIRST
    next_try: float = 0.0
    rebuilds: int = 0
    # Its promotion is storing the current generation on it: a drop now needs a bump, as
    # for an RW member (it may hold that generation without the write it missed).
    promoting: bool = False
    # Held while a rejoin runs: the heal loop and the API must not both probe and open it
    # (the second probe closed the first's connection under it).
    joining: asyncio.Lock = field(default_factory=asyncio.Lock)

    def status(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "mode": self.mode.value,
            "error": self.error,
            "generation": self.generation,
            # how it is reached: "unix" (replica/transport.py), "tcp", None while not connected
            "transport": None if self.client is None else ("unix" if self.client.route else "tcp"),
            "rebuild": self.rebuild.as_dict() if self.rebuild else None,
            "rebuilds": self.rebuilds,
            "last_rebuild": self.last_rebuild,
        }


def _refused(r: object) -> bool:
    """A replica's answer that rejects the request as invalid (not a failure of the replica)."""
    return isinstance(r, BlockError) and not isinstance(r, ReplicaDown) and r.errno == errno.EINVAL


class QuorumError(ReadOnlyError):
    """Not enough current replicas to accept writes."""


class Replicator:
    def __init__(
        self,
        volume: str,
        size: int,
        addresses: list[str],
        replica_count: int | None = None,
        timeout: float = 5.0,
        timeout_last: float | None = None,
        rebuild_rate: int = 0,
        heal: bool = True,
    ) -> None:
        if size <= 0 or size % BLOCK:
            raise ValueError(f"volume size must be a positive multiple of {BLOCK}")
        if len(set(addresses)) != len(addresses):
            raise ValueError("a replica address is listed twice")
        self.volume = volume
        self._size = size
        self.timeout = timeout
        self.timeout_last = max(timeout, timeout_last if timeout_last is not None else 6 * timeout)
        self.members = [self._new_member(a) for a in addresses]
        self.replica_count = replica_count or len(addresses)
        self.quorum = self.replica_count // 2 + 1
        self.epoch = 0
        self._session = 0
        self.generation = 0
        self.limiter = RateLimiter(rebuild_rate)
        self.resynced_bytes = 0
        self._heal_enabled = heal
        self._rr = 0
        self._membership = asyncio.Lock()
        self._stable = asyncio.Event()  # clear while a generation bump is in progress
        self._stable.set()
        self._ranges = RangeLock()
        self._attr_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.started = False  # the current replicas are selected (start() returned)
        self.on_resize: list[Any] = []  # callbacks(new_size), e.g. SCSI capacity changed

    # --- BlockDevice ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self.count(Mode.RW) < self.quorum

    def count(self, mode: Mode) -> int:
        return sum(1 for m in self.members if m.mode == mode)

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        return await self._read_any(lambda c: c.read(offset, length))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        check_range(self._size, offset, length)
        return await self._read_any(lambda c: c.block_status(offset, length))

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        check_range(self._size, offset, len(data))
        await self._mutate(offset, len(data), lambda c: c.write(offset, data, fua))

    async def unmap(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        await self._mutate(offset, length, lambda c: c.unmap(offset, length))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        check_range(self._size, offset, length)
        await self._mutate(offset, length, lambda c: c.write_zeroes(offset, length, may_unmap))

    async def flush(self) -> None:
        await self._mutate(0, 0, lambda c: c.flush(), locked=False)

    # --- volume attributes (small durable state, e.g. SCSI reservations) -----------------

    async def get_attr(self, key: str) -> Any | None:
        attrs = await self._read_any(lambda c: c.attrs())
        return attrs.get(key)

    async def put_attr(self, key: str, value: Any) -> None:
        """Durable on a quorum like a write; None deletes the key."""
        async with self._attr_lock:
            await self._mutate(0, 0, lambda c: c.set_attrs({key: value}), locked=False)

    async def _copy_attrs(self, src: ReplicaClient, dst: ReplicaClient) -> None:
        async with self._attr_lock:  # no update may slip between the read and the copy
            want, have = await asyncio.gather(src.attrs(), dst.attrs())
            if want != have:
                await dst.set_attrs({**dict.fromkeys(have), **want})

    # --- the write rule ---------------------------------------------------------------

    async def _mutate(self, offset: int, length: int, op: Any, locked: bool = True) -> None:
        if self.readonly:
            raise QuorumError(self._quorum_message())
        if locked:
            start, end = offset // BLOCK * BLOCK, -(-(offset + length) // BLOCK) * BLOCK
            async with self._ranges.shared(start, end):
                await self._fan_out(op, offset, length)
        else:
            await self._fan_out(op, offset, length)
        # A generation bump in progress means some replica just missed writes: no write is
        # acknowledged until the survivors carry the new generation.
        if not self._stable.is_set():
            await self._stable.wait()
        if self.readonly:
            raise QuorumError(self._quorum_message())

    async def _fan_out(self, op: Any, offset: int, length: int) -> None:
        targets = []
        for m in self.members:
            if m.mode != Mode.ERR and m.client is not None:
                targets.append(m)
            elif m.missed is not None and length:
                m.missed.mark(offset, length)
        results = await asyncio.gather(*(op(m.client) for m in targets), return_exceptions=True)
        for r in results:
            if isinstance(r, asyncio.CancelledError):
                raise r
        refused = [r for r in results if _refused(r)]
        if refused and len(refused) == len(results):
            # Every replica refused the request itself (e.g. a snapshot name that exists):
            # a bad request, not a failing replica.
            raise OutOfRange(str(refused[0]), errno.EINVAL)
        ok = 0
        errors: list[BaseException] = []
        for m, r in zip(targets, results, strict=True):
            if isinstance(r, BaseException):
                errors.append(r)  # failed, or refused what its peers accepted: diverged
                bump = self._drop_now(m, r)
                # Marked before any wait: m may rejoin (and read its map) during the bump.
                if m.missed is not None and length:
                    m.missed.mark(offset, length)
                await self._dropped(bump)
            elif m.mode == Mode.RW:
                ok += 1
        if ok < self.quorum:
            if errors and all(getattr(e, "errno", 0) == errno.ENOSPC for e in errors):
                raise NoSpace(f"no space left on replicas: {errors[0]}")
            detail = f": {errors[0]}" if errors else ""
            raise MediumError(
                f"write reached {ok} of {self.replica_count} replicas, quorum is "
                f"{self.quorum}{detail}"
            )

    def _reader(self) -> Member | None:
        readers = [m for m in self.members if m.mode == Mode.RW and m.client]
        if not readers:
            return None
        self._rr = (self._rr + 1) % len(readers)
        return readers[self._rr]

    async def _read_any(self, op: Any) -> Any:
        last: BaseException | None = None
        for _ in range(len(self.members)):
            m = self._reader()
            if m is None:
                break
            try:
                return await op(m.client)
            except BlockError as e:
                if e.errno == errno.EINVAL and not isinstance(e, ReplicaDown):
                    raise
                last = e
                await self._drop(m, e)
        raise MediumError(f"no replica could serve the read{': ' + str(last) if last else ''}")

    def _quorum_message(self) -> str:
        return (
            f"volume {self.volume} is read-only: {self.count(Mode.RW)} of "
            f"{self.replica_count} replicas are current, {self.quorum} needed for writes"
        )

    # --- membership -------------------------------------------------------------------

    def _set_mode(self, m: Member, mode: Mode, error: str | None = None) -> None:
        m.mode, m.error = mode, error
        if mode == Mode.ERR and m.client is not None:
            m.client.close()
            m.client = None
        self._update_deadlines()

    def _update_deadlines(self) -> None:
        """The bare quorum gets the long deadline: losing one of them fails the volume."""
        last = self.count(Mode.RW) <= self.quorum
        for m in self.members:
            if m.client is not None:
                m.client.timeout = self.timeout_last if last and m.mode == Mode.RW else self.timeout

    # Hooks for the native engine's replicator (target/native_replicator.py); no-ops here.

    def _new_member(self, address: str) -> Member:
        return Member(address)

    async def _receiving(self, m: Member) -> None:
        """m was set WO: return once it receives every write."""

    async def _promoting(self, m: Member) -> None:
        """m is about to get the current generation (its drop needs a bump from now on)."""
        m.promoting = True

    async def _settled(self) -> None:
        """Before a generation bump reads the RW set: every drop so far is known."""

    def _bumped(self) -> None:
        """The RW replicas carry the new generation."""

    async def _drop(self, m: Member, why: BaseException | str) -> None:
        """Mark m ERR, start recording what it misses, bump the survivors' generation."""
        await self._dropped(self._drop_now(m, why))

    def _drop_now(self, m: Member, why: BaseException | str) -> bool | None:
        """_drop's first half, with no wait: m is ERR and records what it misses from here
        on. Returns for _dropped: whether the survivors need a generation bump, or None
        when m was ERR already."""
        if m.mode == Mode.ERR:
            return None
        was_rw = m.mode == Mode.RW or m.promoting
        if was_rw:  # it was complete: from now on we know exactly what it misses
            m.missed, m.missed_since = RegionMap(self._size), m.generation
        self._set_mode(m, Mode.ERR, str(why))
        m.next_try = time.monotonic() + m.backoff
        log.warning("replica %s dropped: %s", m.address, why)
        return was_rw

    async def _dropped(self, bump: bool | None) -> None:
        """_drop's second half: bump the survivors' generation, or wait for the bump of an
        earlier drop of the same member."""
        if bump is None:
            if not self._stable.is_set():
                await self._stable.wait()
            return
        if bump:
            await self._bump_generation()
        if self.readonly and not self._closing:
            log.error("%s", self._quorum_message())

    async def _bump_generation(self) -> None:
        self._stable.clear()
        try:
            async with self._membership:
                while True:
                    await self._settled()
                    self.generation += 1
                    gen = self.generation
                    rw = [m for m in self.members if m.mode == Mode.RW and m.client]
                    results = await asyncio.gather(
                        *(m.client.set_generation(gen) for m in rw if m.client),
                        return_exceptions=True,
                    )
                    failed = False
                    for m, r in zip(rw, results, strict=True):
                        if r is None:
                            m.generation = gen
                        elif m.mode == Mode.RW:
                            failed = True
                            m.missed, m.missed_since = RegionMap(self._size), m.generation
                            self._set_mode(m, Mode.ERR, f"generation update failed: {r}")
                    if not failed:
                        break
                self._bumped()
        finally:
            self._stable.set()

    # --- selection of the current replicas --------------------------------------------

    async def start(self, wait: float | None = None) -> None:
        """Select the current replicas (see the module docstring) and start healing.

        `wait=None` waits for a quorum of replicas forever; otherwise raises QuorumError
        after `wait` seconds."""
        await self._select(wait)
        self.started = True
        if self._heal_enabled:
            self._spawn(self._heal_loop())

    async def _select(self, wait: float | None) -> None:
        deadline = None if wait is None else time.monotonic() + wait
        infos: dict[str, dict[str, Any]] = {}
        while True:
            await self._probe_all(infos)
            if len(infos) >= self.quorum:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise QuorumError(
                    f"only {len(infos)} of {self.replica_count} replicas reachable; "
                    f"{self.quorum} needed to tell current replicas from stale ones"
                )
            log.warning(
                "waiting for replicas: %d of %d reachable, need %d",
                len(infos),
                self.replica_count,
                self.quorum,
            )
            await asyncio.sleep(0.5)
        top = max(info["generation"] for info in infos.values())
        # A new target outranks every older one: its epoch is above all the replicas hold.
        self.epoch = max(
            self.epoch, max(info["epoch"] >> SESSION_BITS for info in infos.values()) + 1
        )
        self.generation = max(self.generation, top)
        current: list[Member] = []
        for m in self.members:
            info = infos.get(m.address)
            if info is None:
                continue
            if info["generation"] < top:
                self._set_mode(m, Mode.ERR, f"stale: generation {info['generation']} < {top}")
            else:
                current.append(m)
        # An online resize reached the current replicas even if this target was started with
        # the old size: the volume is as large as the largest of them (grow the rest).
        self._size = max(self._size, *(infos[m.address]["size"] for m in current))
        opened = await asyncio.gather(*(self._open(m) for m in current), return_exceptions=True)
        for m, r in zip(current, opened, strict=True):
            if r is None and infos[m.address]["size"] < self._size and m.client is not None:
                try:
                    await m.client.resize(self._size)
                except BlockError as e:
                    r = e
            if r is not None:
                self._set_mode(m, Mode.ERR, f"open failed: {r}")
        current = [m for m in current if m.client is not None]
        marked = merge_ranges(
            [tuple(r) for m in current for r in infos[m.address].get("dirty_regions", [])]
        )
        if len(current) > 1:
            lost = {m.address: bool(infos[m.address].get("lost_cache")) for m in current}
            await self._resync(current, marked, lost)
        for m in current:
            if m.client is not None:  # not failed during the resync
                self._set_mode(m, Mode.RW)
        # Replicas not opened now miss every write from here on.
        await self._bump_generation()
        log.info(
            "volume %s: epoch %d, generation %d, %d of %d replicas current%s",
            self.volume,
            self.epoch,
            self.generation,
            self.count(Mode.RW),
            self.replica_count,
            " (read-only)" if self.readonly else "",
        )

    async def _resync(
        self, current: list[Member], ranges: list[tuple[int, int]], lost: dict[str, bool]
    ) -> None:
        """After a crash, current replicas may differ where their write-intent logs say:
        copy those regions from one of them to the others before serving any I/O."""
        # The primary's copy wins where they differ: prefer one that kept its page cache
        # (a replica back from a power loss may lack writes its peers acknowledged).
        current = sorted(current, key=lambda m: bool(lost.get(m.address)))
        primary, others = current[0], current[1:]
        total = sum(n for _, n in ranges)
        t0 = time.monotonic()
        if total:
            log.info("resynchronising %d bytes of marked regions from %s", total, primary.address)

        try:
            assert primary.client is not None
            for m in others:
                if m.client is not None:
                    await self._copy_attrs(primary.client, m.client)
            # Mostly identical already: each compares first and pulls only what differs.
            await asyncio.gather(
                *(
                    m.client.copy_from(
                        primary.address, ranges, compare_first=True, deadline=copy_deadline(total)
                    )
                    for m in others
                    if m.client is not None
                )
            )
        except BlockError as e:
            # Whoever failed is not trustworthy here; the primary's copy stays authoritative.
            for m in others:
                self._set_mode(m, Mode.ERR, f"resync failed: {e}")
            if primary.client is None:
                raise
        self.resynced_bytes += total
        if total:
            log.info("resync done in %.2fs", time.monotonic() - t0)

    async def _probe_all(self, infos: dict[str, dict[str, Any]]) -> None:
        """Connect to and INFO every replica not reached yet; adds to infos."""
        targets = [m for m in self.members if m.address not in infos]
        results = await asyncio.gather(
            *(self._probe(m, selecting=True) for m in targets), return_exceptions=True
        )
        for m, r in zip(targets, results, strict=True):
            if isinstance(r, BaseException):
                m.error = str(r)
            else:
                infos[m.address] = r

    async def _probe(self, m: Member, selecting: bool = False) -> dict[str, Any]:
        """Connect and INFO. Outside a selection a replica larger than the volume is not
        ours; a smaller one missed a resize and is grown when it rejoins."""
        client = ReplicaClient(m.address, self.timeout)
        await client.connect()
        try:
            info = await client.info()
            if info["size"] > self._size and not selecting:
                raise BlockError(
                    f"replica {m.address} has size {info['size']}, volume has {self._size}"
                )
            if info.get("volume") and info["volume"] != self.volume:
                raise BlockError(f"replica {m.address} belongs to volume {info['volume']!r}")
            client, info = await self._local(client, info)
        except BaseException:
            client.close()
            raise
        if m.client is not None:
            m.client.close()
        m.client, m.generation = client, info["generation"]
        client.on_lost = lambda why: self._lost(m, client, why)
        if m.uuid is not None and info["uuid"] != m.uuid:
            m.missed = None  # another replica at that address: nothing known about it
        m.uuid = info["uuid"]
        return info

    async def _local(
        self, client: ReplicaClient, info: dict[str, Any]
    ) -> tuple[ReplicaClient, dict[str, Any]]:
        """A replica on this host (same boot id) that serves a unix socket is reached through
        it instead of TCP (replica/transport.py); TCP stays when the socket does not answer
        or another replica answers it."""
        path = info.get("socket")
        if not path or info.get("boot_id") != current_boot_id():
            return client, info
        local = ReplicaClient(client.address, self.timeout, route=path)
        try:
            await local.connect()
            local_info = await local.info()
        except BlockError as e:
            local.close()
            log.info("replica %s: its socket is not usable (%s): TCP", client.address, e)
            return client, info
        except BaseException:
            local.close()
            raise
        if local_info.get("uuid") != info.get("uuid"):
            local.close()
            log.warning("replica %s: another replica answers at %s: TCP", client.address, path)
            return client, info
        client.close()
        return local, local_info

    async def _open(self, m: Member) -> None:
        """OPEN with a fencing key never used before: the target's epoch in the high bits (an
        older target can never outbid a newer one) and a session number in the low bits, so
        that reopening a replica fences this target's own earlier connections to it: a
        write stuck in a frozen replica's socket buffer or on a cut link cannot land after
        the replica rejoined."""
        assert m.client is not None
        self._session += 1
        m.key = (self.epoch << SESSION_BITS) | self._session
        await m.client.open(m.key)

    # --- healing ------------------------------------------------------------------------

    def _lost(self, m: Member, client: ReplicaClient, why: str) -> None:
        """A member's connection broke by itself: drop it now, not at the next I/O."""
        if m.client is client and m.mode != Mode.ERR and not self._closing:
            self._spawn(self._drop(m, f"replica {m.address}: {why}"))

    def _keepalive(self) -> None:
        """Ping members idle for a second: a hung replica then misses its deadline even
        when the volume is idle, and is dropped before the next write has to wait for it."""
        now = time.monotonic()
        for m in self.members:
            c = m.client
            if m.mode != Mode.ERR and c is not None and c.connected and now - c.last_reply > 1:
                c.last_reply = now  # one ping in flight at a time
                self._spawn(self._ping(m, c))

    async def _ping(self, m: Member, client: ReplicaClient) -> None:
        try:
            await client.ping()
        except BlockError as e:
            if m.client is client:
                await self._drop(m, e)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _heal_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(0.2)
            try:
                self._keepalive()
                if not any(m.mode == Mode.RW for m in self.members):
                    await self._select(wait=2.0)  # everyone went away: choose anew
                    continue
                now = time.monotonic()
                for m in self.members:
                    if m.mode == Mode.ERR and now >= m.next_try and not self._closing:
                        await self._try_rejoin(m)
            except QuorumError as e:
                log.debug("healing: %s", e)
            except Exception:
                log.exception("healing pass failed")

    async def _try_rejoin(self, m: Member) -> None:
        if m.joining.locked():
            return  # the API is bringing it back right now
        try:
            await self._join(m)
        except (BlockError, OSError):
            pass  # recorded in m.error; retried after its backoff

    async def _join(self, m: Member) -> None:
        """Rejoin an ERR member, one attempt at a time; a failure is recorded and backs off."""
        async with m.joining:
            if m.mode != Mode.ERR:
                return  # brought back while we waited
            try:
                await self._rejoin(m)
            except (BlockError, OSError) as e:
                if m.client is not None and m.mode == Mode.ERR:
                    m.client.close()
                    m.client = None
                m.error = f"rejoin failed: {e}"
                m.backoff = min(m.backoff * 2, BACKOFF_MAX)
                m.next_try = time.monotonic() + m.backoff
                raise
            m.backoff = BACKOFF_FIRST

    async def _rejoin(self, m: Member) -> None:
        """Bring an ERR replica back as WO and start its rebuild."""
        info = await self._probe(m)
        await self._open(m)
        if info["size"] < self._size:  # it missed a resize: grow it, copy everything
            assert m.client is not None
            await m.client.resize(self._size)
            m.missed = None
        incremental = (
            m.missed is not None
            and m.missed_since is not None
            and info["generation"] == m.missed_since
        )
        # What it may lack: the writes it missed (tracked), and if its kernel lost its page
        # cache too, what it had not flushed (its write-intent regions).
        own = [tuple(r) for r in info.get("dirty_regions", [])] if info.get("lost_cache") else []
        # From here on it receives every write; what it missed until then is in m.missed.
        self._set_mode(m, Mode.WO)
        await self._receiving(m)
        if m.mode != Mode.WO or m.client is None:
            raise MediumError(f"replica {m.address} was dropped while it rejoined")
        ranges = (
            merge_ranges(m.missed.ranges() + own)
            if incremental and m.missed is not None
            else [(0, self._size)]
        )
        kind = "incremental" if incremental else "full"
        m.rebuild = Progress(kind, sum(n for _, n in ranges))
        if m.missed is None:
            m.missed_since = None  # stays unknown until a rebuild completes
        log.info("replica %s rejoins: %s rebuild of %d bytes", m.address, kind, m.rebuild.total)
        self._spawn(self._rebuild(m, ranges))

    async def _rebuild(self, m: Member, ranges: list[tuple[int, int]]) -> None:
        progress, client = m.rebuild, m.client
        if progress is None or client is None:
            return  # dropped before it began (its next rejoin rebuilds it)
        crash_point("rebuild.after_wo")
        half = progress.total // 2
        promoting = False  # this rebuild set m.promoting

        def ours() -> bool:
            """m is still the WO member this rebuild began for. A drop and a rejoin start
            another rebuild (with its own ranges: what m missed meanwhile too); this one,
            its workers asleep in the rate limiter, must then neither copy nor promote."""
            return m.mode == Mode.WO and m.rebuild is progress and m.client is client

        async def work(batch: list[tuple[int, int, list[tuple[int, int]]]]) -> None:
            pieces = [piece for _, _, ps in batch for piece in ps]
            step = sum(b - a for a, b in pieces)
            await self.limiter.take(step)
            if not ours():
                raise MediumError("rebuilding replica went away")
            async with self._ranges.exclusive_many([(a, b) for a, b, _ in batch]):
                await self._copy_to(m, client, pieces, progress)
            progress.done += step
            if progress.done >= half > progress.done - step:
                crash_point("rebuild.mid_copy")

        try:
            await run_workers(batches(windows(ranges)), work)
            copied_at = time.monotonic()
            if not ours():
                return
            src = self._reader()
            if src is None or src.client is None:
                raise MediumError("no current replica to copy attributes from")
            await self._copy_attrs(src.client, client)
            await client.flush()
            crash_point("rebuild.before_generation")
            async with self._membership:
                if not ours():
                    return
                promoting = True
                await self._promoting(m)
                # If this fails, m.promoting stays set until the drop below: it may hold
                # the generation already, so its drop must bump the survivors'.
                await client.set_generation(self.generation)
                m.promoting = False
                crash_point("rebuild.after_generation")
                if not ours():
                    return  # dropped meanwhile: it stays ERR, its rejoin rebuilds it
                m.generation = self.generation
                m.missed = m.missed_since = None
                m.rebuild = None
                m.rebuilds += 1
                m.last_rebuild = {
                    "kind": progress.kind,
                    "total_bytes": progress.total,
                    "copied_bytes": progress.copied,
                    "seconds": round(time.monotonic() - progress.started, 3),
                    "copy_seconds": round(copied_at - progress.started, 3),
                }
                self._set_mode(m, Mode.RW)
            log.info(
                "replica %s rebuilt (%s, %d bytes copied) and RW",
                m.address,
                progress.kind,
                progress.copied,
            )
        except (BlockError, OSError) as e:
            if ours():
                await self._drop(m, f"rebuild failed: {e}")
        finally:
            if promoting:
                m.promoting = False

    async def _copy_to(
        self, m: Member, client: ReplicaClient, pieces: list[tuple[int, int]], progress: Progress
    ) -> None:
        """m (through client, its connection when the rebuild began) pulls the pieces from a
        current replica and verifies them; a failing source is dropped and another tried, a
        failing destination fails the rebuild."""
        while True:
            src = self._reader()
            if src is None or src.client is None:
                raise MediumError("no current replica to rebuild from")
            if m.client is not client:
                raise MediumError("rebuilding replica went away")
            ranges = [(a, b - a) for a, b in pieces]
            try:
                stats = await client.copy_from(
                    src.address, ranges, deadline=copy_deadline(sum(n for _, n in ranges))
                )
                progress.copied += stats["copied"]
                return
            except BlockError as e:
                if e.errno != errno.EREMOTEIO or m.client is not client or not client.connected:
                    raise
                await self._drop(src, e)  # the source failed: try another

    # --- online resize and snapshots ----------------------------------------------------

    async def resize(self, size: int) -> None:
        """Grow the volume: every RW and WO replica first (a quorum must succeed), then the
        volume; replicas away at the time are grown, and fully rebuilt, when they rejoin."""
        if size % BLOCK or size <= 0:
            raise ValueError(f"size must be a positive multiple of {BLOCK}")
        if size < self._size:
            raise ValueError(f"cannot shrink the volume from {self._size} to {size} bytes")
        if size == self._size:
            return
        async with self._ranges.exclusive(0, self._size):  # no write in flight meanwhile
            await self._mutate(0, 0, lambda c: c.resize(size), locked=False)
            self._size = size
            for m in self.members:
                if m.mode == Mode.ERR:
                    m.missed = None  # its map has the old geometry: it needs everything
        log.info("volume %s grown to %d bytes", self.volume, size)
        for callback in self.on_resize:
            callback(size)

    async def snapshot(self, name: str) -> None:
        """A snapshot of every RW and WO replica at one point in the write stream: writes are
        held back and drained first, so all replicas freeze the same data."""
        async with self._ranges.exclusive(0, self._size):
            await self._mutate(0, 0, lambda c: c.snapshot(name), locked=False)

    async def snapshots(self) -> list[str]:
        info = await self._read_any(lambda c: c.info())
        return list(info.get("snapshots", []))

    # --- API ----------------------------------------------------------------------------

    def find(self, address: str) -> Member | None:
        return next((m for m in self.members if m.address == address), None)

    async def add_replica(self, address: str) -> Member:
        """Add a new replica (or retry an ERR one now); it is rebuilt, then turns RW."""
        m = self.find(address)
        if m is not None and m.mode != Mode.ERR:
            raise ValueError(f"replica {address} is already {m.mode.value}")
        if m is None:
            if len(self.members) >= self.replica_count:
                raise ValueError(
                    f"volume already has {self.replica_count} replicas; remove one first"
                )
            m = self._new_member(address)
            self.members.append(m)
            self._update_deadlines()
        await self._join(m)
        return m

    async def remove_replica(self, address: str) -> None:
        m = self.find(address)
        if m is None:
            raise KeyError(address)
        await self._drop(m, "removed by request")
        self.members.remove(m)

    async def close(self) -> None:
        """Clean shutdown: replicas flush and record a clean close. One that does not within
        the replica deadline (its disk is stuck) is not waited for, even as the last one: it
        is left as after a crash, and its intent log is checked when it is opened next."""
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        live = [m.client for m in self.members if m.client and m.mode == Mode.RW]
        await asyncio.gather(
            *(asyncio.wait_for(c.close_session(), self.timeout) for c in live),
            return_exceptions=True,
        )
        for m in self.members:
            if m.client:
                m.client.close()
                m.client = None

    def status(self) -> dict[str, Any]:
        return {
            "replica_count": self.replica_count,
            "quorum": self.quorum,
            "epoch": self.epoch,
            "generation": self.generation,
            "readonly": self.readonly,
            "starting": not self.started,  # still selecting: modes are not settled yet
            "resynced_bytes": self.resynced_bytes,
            "replicas": [m.status() for m in self.members],
        }
