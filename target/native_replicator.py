"""The replicator with its data path in the native engine (native/target.c).

Same rules as target/replicator.py (its docstring is the rulebook), split between Python and
the engine:

- Python keeps membership: it selects the current replicas, opens them (fencing key
  epoch << 32 | session), bumps generations, heals and rebuilds, over its own control
  connection to each member (`m.client`, as in the Python replicator).
- Each member also has a data connection, OPENed with the same key right after the control
  connection (the replica accepts an equal key) and handed to the engine when the member
  turns RW or WO. The engine fans writes out, reads round robin, enforces the deadlines
  and the quorum, and drops failing members at once.
- A member's region map (`m.missed`) is a buffer shared with the engine, allocated up front:
  the engine clears it and starts marking when it drops an RW member, and keeps marking
  every write the member misses while it is ERR. `m.missed` is the map while the engine
  tracks (None otherwise); setting it to None stops the tracking.
- Every drop the engine makes (or is told to make) comes back as an event with a sequence
  number when the member was current. Writes completing after such a drop are held in the
  engine until Python bumped the generation of the survivors; the bump first takes in every
  event (so its RW set excludes every dropped member), then tells the engine which drops it
  covered (`_settled`, `_bumped`).
- Exclusive range locks (rebuild copies, resize, snapshots) are the engine's.
- Shared memory: the volume owns a memfd (SHM_SIZE) the engine cuts into payload buffers.
  A replica on this host reached through its unix socket is asked to SHARE it on the data
  connection; then the engine sends it the place of the data instead of the data (READ and
  WRITE payloads cross no socket: they are copied once between the initiator's socket and
  this memory, once between this memory and the replica's files). A replica that cannot
  (the pure-Python server, an older release) answers ENOTSUP and gets the data as before.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from native import engine as ne
from replica import protocol as p
from replica.client import ReplicaDown, parse_address
from replica.transport import tune
from target.blockdev import BlockError, MediumError, check_range
from target.native_device import engine_io
from target.regions import RegionMap
from target.replicator import Member, Mode, Replicator

log = logging.getLogger("tandem.replicator")

_MODES = {Mode.RW: ne.MODE_RW, Mode.WO: ne.MODE_WO, Mode.ERR: ne.MODE_ERR}
INTERNAL = ne.FRONTENDS.index("internal")
# Room for the payloads in flight: 1024 slots of 64 KiB (one per payload up to 64 KiB, e.g.
# 16 reads and 16 writes of 1 MiB at once); what does not fit goes through the socket. Only
# the pages written are ever allocated (a 4 KiB payload takes one page of its slot).
SHM_SIZE = 64 << 20


class NativeMember(Member):
    """A member with an engine slot, a shared region map and a data connection."""

    def __init__(self, address: str, replicator: NativeReplicator, slot: int) -> None:
        self._r: NativeReplicator | None = None
        self._map: RegionMap | None = None
        self.slot = slot
        self.data_sock: socket.socket | None = None  # opened, not handed over yet
        self.data_shared = False  # data_sock's replica SHAREd the volume's memory
        self.data_offer: ne.LocalOffer | None = None  # ... on this host: its pid and offer
        self.attaching: asyncio.Future[None] | None = None  # the last hand-over
        self.gen = 0  # data connections handed over (the engine's count too)
        super().__init__(address)
        self._r = replicator

    @property  # type: ignore[override]
    def missed(self) -> RegionMap | None:
        r = self._r
        if r is None or self._map is None or not r.engine.member_tracking(self.slot):
            return None
        return self._map

    @missed.setter
    def missed(self, value: RegionMap | None) -> None:
        # The engine starts tracking by itself when it drops an RW member (on a cleared map);
        # Python only ever stops it.
        r = self._r
        if value is None and r is not None and self._map is not None:
            r._track(self, False)

    def close_data(self) -> None:
        if self.data_sock is not None:
            self.data_sock.close()
            self.data_sock = None

    def status(self) -> dict[str, Any]:
        # the data goes through the memory shared with the replica (None: not connected)
        shared = self.data_shared if self.client is not None else None
        return {**super().status(), "shared_memory": shared}


class EngineRangeLock:
    """Exclusive range locks held in the engine (its writes wait for them)."""

    def __init__(self, engine: ne.Engine) -> None:
        self.engine = engine

    def exclusive(self, start: int, end: int):  # type: ignore[no-untyped-def]
        return self.exclusive_many([(start, end)])

    @asynccontextmanager
    async def exclusive_many(self, ranges: list[tuple[int, int]]) -> AsyncIterator[None]:
        rid, granted = self.engine.lock(ranges)
        try:
            await granted
            yield
        finally:
            self.engine.unlock(rid)


async def open_data_socket(
    address: str,
    key: int,
    uuid: str | None,
    timeout: float,
    route: str | None = None,
    share_fd: int | None = None,
) -> tuple[socket.socket, bool, ne.LocalOffer | None]:
    """A data connection to a replica (through the unix socket `route` when given):
    connected, INFO'd (the same replica as the control connection), OPENed with the
    member's fencing key; in blocking mode for the engine. Over a unix socket the replica is
    also asked to SHARE the memfd `share_fd` (SHM_SIZE bytes); the flag says it did, and
    the last item, when it did, is its pid and its offer of local reads, else None."""
    loop = asyncio.get_running_loop()
    host, port = parse_address(address)
    addr: Any = route
    try:
        if route:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ReplicaDown(f"replica {address}: cannot connect: {e}") from e
    share = bool(route) and share_fd is not None
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
        tune(sock)
        out = p.encode_request(p.Op.INFO, 1) + p.encode_json_request(p.Op.OPEN, 2, {"epoch": key})
        if share:
            out += p.encode_request(
                p.Op.SHARE, 3, length=SHM_SIZE, payload=struct.pack("<I", share_fd)
            )
        await loop.sock_sendall(sock, out)
        decoder = p.ResponseDecoder()
        answers: dict[int, p.Response] = {}
        while len(answers) < 2 + share:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
            if not data:
                raise ReplicaDown(f"replica {address}: connection lost")
            decoder.feed(data)
            while (resp := decoder.next()) is not None:
                answers[resp.tag] = resp
        for tag in (1, 2):
            if answers[tag].status:
                raise ReplicaDown(f"replica {address}: {answers[tag].message}")
        info = json.loads(answers[1].payload)
        if uuid is not None and info.get("uuid") != uuid:
            raise ReplicaDown(f"replica {address}: another replica answered the data connection")
        shared = share and answers[3].status == 0
        if share and not shared:
            log.info("replica %s: data through its socket (%s)", address, answers[3].message)
        offer = None
        if shared:
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            offer = ne.LocalOffer(pid)
            if len(answers[3].payload) == 16:  # head file fd, page fd, generation, 0
                offer = ne.LocalOffer(pid, *struct.unpack("<3I", answers[3].payload[:12]))
        sock.setblocking(True)  # io_uring polls for it; O_NONBLOCK would return EAGAIN
        return sock, shared, offer
    except BaseException as e:
        sock.close()
        if isinstance(e, (OSError, TimeoutError, p.ProtocolError)) and not isinstance(
            e, BlockError
        ):
            raise ReplicaDown(f"replica {address}: data connection: {e}") from e
        raise


class NativeReplicator(Replicator):
    def __init__(self, engine: ne.Engine, *args: Any, **kw: Any) -> None:
        self.engine = engine
        self._slots: set[int] = set()
        self._pending: set[asyncio.Future[Any]] = set()
        self._seen_seq = 0  # the highest drop sequence heard of
        self._stable_sent = 0  # the highest one a bump covered
        self._bump_seq = 0
        self._bump_queued = False
        self._capturing = False
        super().__init__(*args, **kw)
        self._ranges = EngineRangeLock(engine)  # type: ignore[assignment]
        self._shm_fd: int | None = None
        try:
            self._shm_fd = os.memfd_create(
                f"tandem-{self.volume}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            )
            os.ftruncate(self._shm_fd, SHM_SIZE)
            # Its size is fixed for good: a process holding it cannot shrink it under a mapping
            # (every access past the end would be a SIGBUS); replicas map only sealed memory.
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            fcntl.fcntl(self._shm_fd, fcntl.F_ADD_SEALS, seals)
        except OSError as e:  # no memfd here: every payload goes through sockets
            log.info("volume %s: no shared memory with local replicas: %s", self.volume, e)
            if self._shm_fd is not None:
                os.close(self._shm_fd)
                self._shm_fd = None
        self._setup_engine()
        for m in self.members:
            self._push_map(m)  # type: ignore[arg-type]

    # --- the engine's view of the volume -------------------------------------------------------

    @property  # type: ignore[override]
    def _size(self) -> int:
        return self.__size

    @_size.setter
    def _size(self, size: int) -> None:
        """The volume's size changes (start, selection, resize): the engine learns it, and
        every member gets a map of the new geometry (marks carry over when they can)."""
        old = getattr(self, "_NativeReplicator__size", None)
        self.__size = size
        if old is not None and old != size and hasattr(self, "members"):
            self._setup_engine()
            for m in self.members:
                self._push_map(m)  # type: ignore[arg-type]

    def _setup_engine(self) -> None:
        self.engine.vol_setup(
            self._size,
            self.replica_count,
            self.quorum,
            self.timeout,
            self.timeout_last,
            self.volume,
            -1 if self._shm_fd is None else self._shm_fd,
            SHM_SIZE,
        )

    def _cmd(self, fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Track an engine command; a bump waits for the ones in flight (_settled)."""
        self._pending.add(fut)
        fut.add_done_callback(self._command_done)
        return fut

    def _command_done(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: the waiter (if any) handles it

    def _push_map(self, m: NativeMember) -> None:
        m._map = RegionMap(self._size)
        self._cmd(self.engine.member_map(m.slot, m._map._bits, m._map.region))

    def _track(self, m: NativeMember, on: bool) -> None:
        if m._map is not None and self.engine.running:
            self._cmd(self.engine.member_map(m.slot, m._map._bits, m._map.region, on))

    # --- hooks of the Python replicator ----------------------------------------------------------

    def _new_member(self, address: str) -> Member:
        slot = next(i for i in range(ne.MAX_MEMBERS) if i not in self._slots)
        self._slots.add(slot)
        m = NativeMember(address, self, slot)
        if hasattr(self, "members"):  # added later (add_replica)
            self._push_map(m)
        return m

    def _set_mode(self, m: Member, mode: Mode, error: str | None = None) -> None:
        assert isinstance(m, NativeMember)
        prev = m.mode
        super()._set_mode(m, mode, error)
        if not self.engine.running:
            m.close_data()
            return
        if mode == Mode.ERR:
            m.close_data()
            if prev != Mode.ERR:
                self._cmd(self.engine.member_mode(m.slot, ne.MODE_ERR, False, error or ""))
        elif prev == Mode.ERR:
            sock, m.data_sock = m.data_sock, None
            if sock is None:  # nothing to hand over: it cannot take writes
                super()._set_mode(m, Mode.ERR, "no data connection")
                return
            m.gen += 1
            m.attaching = self._cmd(
                self.engine.member_attach(
                    m.slot,
                    sock.detach(),
                    _MODES[mode],
                    mode == Mode.RW,
                    m.data_shared,
                    m.address,
                    m.data_offer,
                )
            )
        else:
            self._cmd(self.engine.member_mode(m.slot, _MODES[mode], mode == Mode.RW))

    async def _open(self, m: Member) -> None:
        assert isinstance(m, NativeMember)
        await super()._open(m)
        m.close_data()
        route = m.client.route if m.client is not None else None
        m.data_sock, m.data_shared, m.data_offer = await open_data_socket(
            m.address, m.key, m.uuid, self.timeout, route, self._shm_fd
        )

    async def _probe(self, m: Member, selecting: bool = False) -> dict[str, Any]:
        assert isinstance(m, NativeMember)
        m.close_data()
        return await super()._probe(m, selecting)

    async def _receiving(self, m: Member) -> None:
        assert isinstance(m, NativeMember)
        fut = m.attaching
        try:
            if fut is not None:
                await fut
        except OSError as e:
            self._set_mode(m, Mode.ERR, f"data connection: {e.strerror}")
            raise MediumError(f"replica {m.address}: data connection: {e.strerror}") from e

    async def _promoting(self, m: Member) -> None:
        assert isinstance(m, NativeMember)
        try:
            await self._cmd(self.engine.member_mode(m.slot, ne.MODE_WO, True))
        except OSError as e:
            raise MediumError(f"replica {m.address} went away") from e

    async def _settled(self) -> None:
        self._capturing = True
        self._bump_queued = False
        try:
            while self._pending:
                await asyncio.wait(list(self._pending))
            self.engine.drain()  # every drop so far is known (and its member ERR) from here
            self._bump_seq = self._seen_seq
        finally:
            self._capturing = False

    def _bumped(self) -> None:
        if self._bump_seq > self._stable_sent:
            self._stable_sent = self._bump_seq
        self.engine.vol_stable(self._bump_seq)

    # --- engine events ---------------------------------------------------------------------------

    def member_down(self, slot: int, seq: int, was: int, gen: int, why: str) -> None:
        """The engine dropped a member (on a failure, or because Python said so)."""
        if seq > self._seen_seq:
            self._seen_seq = seq
        m = next((x for x in self.members if getattr(x, "slot", -1) == slot), None)
        if isinstance(m, NativeMember) and m.mode != Mode.ERR and gen == m.gen:
            # What Replicator._drop does; the engine already marks what it misses.
            if m.mode == Mode.RW:
                m.missed_since = m.generation
            Replicator._set_mode(self, m, Mode.ERR, why)
            m.close_data()
            m.next_try = time.monotonic() + m.backoff
            log.warning("replica %s dropped: %s", m.address, why)
            if self.readonly and not self._closing:
                log.error("%s", self._quorum_message())
        if seq > self._stable_sent and not self._capturing and not self._bump_queued:
            self._bump_queued = True
            self._spawn(self._bump_generation())

    # --- BlockDevice: through the engine (the frontends use EngineDevice) -------------------------

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self._size, offset, length)
        return await engine_io(self.engine, INTERNAL, ne.VIO_READ, offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        check_range(self._size, offset, len(data))
        flags = ne.VIO_FUA if fua else 0
        await engine_io(self.engine, INTERNAL, ne.VIO_WRITE, offset, len(data), data, flags)

    async def unmap(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        await engine_io(self.engine, INTERNAL, ne.VIO_UNMAP, offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        check_range(self._size, offset, length)
        flags = 0 if may_unmap else ne.VIO_NO_HOLE
        await engine_io(self.engine, INTERNAL, ne.VIO_WRITE_ZEROES, offset, length, None, flags)

    async def flush(self) -> None:
        await engine_io(self.engine, INTERNAL, ne.VIO_FLUSH, 0, 0)

    # --- membership changes and shutdown ---------------------------------------------------------

    async def remove_replica(self, address: str) -> None:
        m = self.find(address)
        await super().remove_replica(address)
        if isinstance(m, NativeMember) and self.engine.running:
            await self._cmd(self.engine.member_map(m.slot, None, 0))
            self._slots.discard(m.slot)
            m._map = None

    async def close(self) -> None:
        """Drain the engine's writes, close the data connections, then as the Python
        replicator: replicas flush and record a clean close (control connections)."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.engine.running:
            try:
                async with asyncio.timeout(10):
                    async with self._ranges.exclusive(0, self._size):
                        pass  # every write in flight is over
            except (TimeoutError, OSError):
                pass
            for m in self.members:
                if isinstance(m, NativeMember):
                    m.close_data()
                    if self.engine.running:
                        self._cmd(self.engine.member_map(m.slot, None, 0))
        await super().close()
        if self._shm_fd is not None:  # the engine keeps its mapping as long as it needs it
            os.close(self._shm_fd)
            self._shm_fd = None
