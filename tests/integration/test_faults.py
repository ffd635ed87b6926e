"""Faults with real processes: replicas and the target killed mid-stream."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import nbd
import pytest

from replica.client import ReplicaClient
from tests.procs import HOST, Cluster, http_json

BLOCK = 4096


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


class Writer:
    """Writes random blocks with up to `depth` requests in flight; records acknowledged ones."""

    def __init__(self, h: nbd.NBD, size: int, seed: int, depth: int = 16) -> None:
        self.h, self.size, self.depth = h, size, depth
        self.rng = random.Random(seed)
        self.acked: dict[int, bytes] = {}  # offset -> data last acknowledged there
        self.failed: dict[int, bytes] = {}  # offset -> data whose write returned an error
        self.in_flight: dict[int, bytes] = {}
        self.errors = 0

    def _done(self, off: int, data: bytes, err: object) -> int:
        self.in_flight.pop(off, None)
        if err.value == 0:  # type: ignore[attr-defined]
            self.acked[off] = data
            self.failed.pop(off, None)
        else:
            self.errors += 1
            self.failed[off] = data
        return 1

    def run(self, count: int, on_progress: object = None) -> None:
        issued = 0
        while issued < count or self.h.aio_in_flight() > 0:
            while issued < count and self.h.aio_in_flight() < self.depth:
                off = self.rng.randrange(self.size // BLOCK) * BLOCK
                if off in self.in_flight:
                    continue  # one write per block at a time keeps "last acked" well defined
                data = os.urandom(BLOCK)
                self.in_flight[off] = data
                self.h.aio_pwrite(
                    data, off, completion=lambda e, o=off, d=data: self._done(o, d, e)
                )
                issued += 1
                if on_progress is not None:
                    on_progress(issued)  # type: ignore[operator]
            self.h.poll(-1)

    def verify(self, h: nbd.NBD) -> None:
        for off, data in self.acked.items():
            got = h.pread(BLOCK, off)
            if got != data:
                # An acked block may later have been overwritten by an unacknowledged write.
                assert off in self.failed and got == self.failed[off], f"block at {off} lost"


def test_kill_one_of_three_replicas_mid_stream(cluster: Cluster) -> None:
    h = connect(cluster.uri)
    w = Writer(h, cluster.size, seed=1)
    killed = threading.Event()

    def progress(n: int) -> None:
        if n == 1500 and not killed.is_set():
            cluster.replicas[1].kill9()
            killed.set()

    w.run(4000, progress)
    assert killed.is_set()
    assert w.errors == 0, "a quorum was healthy: every write must succeed"
    assert cluster.modes() == ["RW", "ERR", "RW"]
    w.verify(h)
    h2 = connect(cluster.uri)  # a fresh connection sees the same data
    w.verify(h2)


def test_kill_two_of_three_refuses_writes_and_serves_reads(cluster: Cluster) -> None:
    h = connect(cluster.uri)
    w = Writer(h, cluster.size, seed=2)
    w.run(500)
    assert w.errors == 0
    cluster.replicas[0].kill9()
    cluster.replicas[2].kill9()
    w2 = Writer(h, cluster.size, seed=3, depth=8)
    w2.run(200)
    assert w2.errors == 200, "below quorum, no write may be acknowledged"
    assert not w2.acked
    assert cluster.status()["readonly"] is True
    # Reads still served from the surviving replica, with every acknowledged write.
    for off, data in w.acked.items():
        got = h.pread(BLOCK, off)
        assert got == data or got == w2.failed.get(off), f"block at {off}"
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * BLOCK, 0)
    assert e.value.errno is not None


def test_kill9_target_and_restart_keeps_data(cluster: Cluster) -> None:
    h = connect(cluster.uri)
    w = Writer(h, cluster.size, seed=4)
    w.run(2000)
    assert w.errors == 0
    h.flush()
    h.close() if hasattr(h, "close") else None
    assert cluster.target is not None
    cluster.target.kill9()
    cluster.start_target()
    h2 = connect(cluster.uri)
    w.verify(h2)
    assert cluster.modes() == ["RW", "RW", "RW"]
    status = cluster.status()
    assert status["epoch"] >= 2  # the restarted target fenced the old one with a new epoch


def test_stale_replica_is_never_read_after_target_restart(cluster: Cluster) -> None:
    """A replica that missed writes must not serve reads after the target restarts; it is
    rebuilt by itself and only then holds the data."""
    h = connect(cluster.uri)
    h.pwrite(b"A" * BLOCK, 0)
    cluster.replicas[2].kill9()
    h.pwrite(b"B" * BLOCK, 0)  # replica 2 misses this one
    h.flush()
    # The target goes before replica 2 returns: the old target would catch it up at once
    # (a few milliseconds), and the new one must find it stale by itself.
    assert cluster.target is not None
    cluster.target.kill9()
    cluster.start_replica(2)
    cluster.start_target()
    h2 = connect(cluster.uri)
    for _ in range(30):  # reads spread across replicas: none may come from replica 2
        assert h2.pread(BLOCK, 0) == b"B" * BLOCK
    cluster.wait_modes(["RW", "RW", "RW"])
    # A new target knows nothing of what it missed: the rebuild was a full one.
    assert cluster.status()["replicas"][2]["last_rebuild"]["kind"] == "full"
    cluster.replicas[0].kill9()
    cluster.replicas[1].kill9()
    assert connect(cluster.uri).pread(BLOCK, 0) == b"B" * BLOCK


def test_returning_replica_catches_up_by_itself(cluster: Cluster) -> None:
    h = connect(cluster.uri)
    w = Writer(h, cluster.size, seed=5)
    w.run(1000)
    cluster.replicas[0].kill9()
    w.run(1000)  # replica 0 misses these
    assert cluster.modes()[0] == "ERR"
    cluster.start_replica(0)
    done = threading.Event()

    def background() -> None:  # writes go on while it rebuilds
        h3 = connect(cluster.uri)
        w3 = Writer(h3, cluster.size, seed=6, depth=4)
        w3.run(500)
        assert w3.errors == 0
        w.acked.update(w3.acked)  # later acked writes win (disjoint in time)
        done.set()

    t = threading.Thread(target=background)
    t.start()
    cluster.wait_modes(["RW", "RW", "RW"], timeout=60)
    t.join(60)
    assert done.is_set()
    last = cluster.status()["replicas"][0]["last_rebuild"]
    assert last["kind"] == "incremental", last
    # Now stop the other two: the rebuilt replica alone must hold everything.
    cluster.replicas[1].kill9()
    cluster.replicas[2].kill9()
    w.verify(connect(cluster.uri))


def test_api_adds_a_new_replica(make_cluster) -> None:  # type: ignore[no-untyped-def]
    from tests.procs import http_json

    c: Cluster = make_cluster(replicas=3)
    for i in (0, 1):
        c.start_replica(i)
    c.start_target(extra=["--replica-count", "3"], only=[0, 1])
    # The target knows only two of its three replicas: add the third after data was written.
    h = connect(c.uri)
    w = Writer(h, c.size, seed=8)
    w.run(800)
    c.start_replica(2)
    res = http_json(f"{c.api}/v1/volume/replicas", "POST", {"address": c.replica_addresses[2]})
    assert res["mode"] in ("WO", "RW")
    c.wait_modes(["RW", "RW", "RW"])
    c.replicas[0].kill9()
    c.replicas[1].kill9()
    w.verify(connect(c.uri))


def test_api_and_healing_never_rejoin_one_replica_at_once(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """A replica added through the API while the heal loop runs: one rejoin, not two racing
    (the second probe closed the first's connection: the API answered 502, and a second
    rebuild started on a replica already WO)."""
    import asyncio

    from target.replicator import Mode, Replicator

    c: Cluster = make_cluster(replicas=3)
    for i in range(3):
        c.start_replica(i)

    async def scenario() -> tuple[int, str, int]:
        rep = Replicator("vol", c.size, c.replica_addresses[:2], replica_count=3)
        await rep.start(wait=10)
        running = peak = 0
        rejoin = rep._rejoin

        async def slow_rejoin(m):  # type: ignore[no-untyped-def]
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                await asyncio.sleep(0.6)  # spans several heal-loop passes (every 0.2 s)
                await rejoin(m)
            finally:
                running -= 1

        rep._rejoin = slow_rejoin  # type: ignore[method-assign]
        try:
            m = await rep.add_replica(c.replica_addresses[2])
            for _ in range(100):
                if m.mode == Mode.RW:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # time for a second, racing rejoin to show itself
            return peak, m.mode.value, m.rebuilds
        finally:
            await rep.close()

    peak, mode, rebuilds = asyncio.run(scenario())
    assert (peak, mode, rebuilds) == (1, "RW", 1)


def test_hung_replica_is_dropped_after_its_deadline(cluster: Cluster) -> None:
    """SIGSTOP: the replica neither fails nor answers; its deadline (2 s here) drops it."""
    import signal

    h = connect(cluster.uri)
    w = Writer(h, cluster.size, seed=7)
    w.run(200)
    cluster.replicas[0].signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        w.run(300)
        elapsed = time.monotonic() - t0
        assert w.errors == 0
        assert elapsed < cluster.timeout + 3, f"volume stalled {elapsed:.1f}s"
        assert cluster.modes() == ["ERR", "RW", "RW"]
    finally:
        cluster.replicas[0].signal(signal.SIGCONT)
    w.verify(h)


def read_replica(c: Cluster, i: int, offset: int, length: int) -> bytes:
    """What replica i itself holds, read over its own data port."""

    async def run() -> bytes:
        client = ReplicaClient(f"{HOST}:{c.replica_ports[i][0]}", timeout=10)
        await client.connect()
        try:
            return await client.read(offset, length)
        finally:
            client.close()

    return asyncio.run(run())


def fault(c: Cluster, i: int, action: str, arg: float = 0, count: int | None = 1) -> str:
    """Arm a fault on replica i's writes (its --debug-api); returns the faults URL."""
    url = f"http://{HOST}:{c.replica_ports[i][1]}/v1/debug/faults"
    http_json(url, "PUT", {"name": "replica.write", "action": action, "arg": arg, "count": count})
    return url


def test_a_write_in_flight_at_a_drop_is_rebuilt_on_a_quick_rejoin(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """A write fails on replica 0 and waits 3 s for replica 2. Replica 0 is dropped at once
    (the native engine) and rejoins within a second; the write's miss is known only when
    it ends. Its rebuild must still copy that write before replica 0 is RW again."""
    c = make_cluster(replicas=3, timeout=5.0, replica_args=("--debug-api",)).start()
    c.wait_modes(["RW", "RW", "RW"])
    h = connect(c.uri)
    off, n = 1 << 20, 64 << 10
    old, new = os.urandom(n), os.urandom(n)
    h.pwrite(old, off)
    fault(c, 0, "fail", 5)  # EIO: replica 0 is dropped
    fault(c, 2, "delay", 3.0)  # the write waits for replica 2 (its deadline is 5 s)
    t0 = time.monotonic()
    h.pwrite(new, off)  # acknowledged by replicas 1 and 2
    assert time.monotonic() - t0 >= 2.9  # the delay took effect
    c.wait_modes(["RW", "RW", "RW"], timeout=60)
    r0 = next(r for r in c.status()["replicas"] if r["address"] == c.replica_addresses[0])
    assert r0["rebuilds"] >= 1
    assert read_replica(c, 0, off, n) == new
    assert h.pread(n, off) == new


def test_a_deadline_shortened_while_idle_holds_for_the_next_request(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """A write while replica 0 is out gives replicas 1 and 2 the long deadline of the bare
    quorum (10 s here); once replica 0 is back, the short one (1 s) holds again, also for the
    first request after an idle spell: replica 1's writes hang (its pings do not, so the
    target's keepalive does not catch it) and it is dropped after about 1 s."""
    c = make_cluster(replicas=3, timeout=1.0, replica_args=("--debug-api",))
    for i in range(3):
        c.start_replica(i)
    c.start_target(extra=["--replica-timeout-last", "10"])
    c.wait_modes(["RW", "RW", "RW"])
    h = connect(c.uri)
    data = os.urandom(BLOCK)
    c.replicas[0].kill9()
    h.pwrite(data, 0)  # replica 0 is dropped
    c.wait_modes(["ERR", "RW", "RW"])
    time.sleep(1.5)  # nothing in flight on replica 1 for longer than its old deadline
    h.pwrite(data, BLOCK)  # replicas 1 and 2 are the bare quorum: 10 s
    c.start_replica(0)
    c.wait_modes(["RW", "RW", "RW"], timeout=30)
    faults = fault(c, 1, "hang", count=None)
    try:
        t0 = time.monotonic()
        h.pwrite(data, 2 * BLOCK)
        elapsed = time.monotonic() - t0
        assert c.modes()[1] == "ERR"
        assert elapsed < c.timeout + 2, f"the hung replica was dropped after {elapsed:.1f}s"
    finally:
        http_json(faults, "DELETE")
    assert h.pread(3 * BLOCK, 0) == data * 3


def test_a_rebuild_cut_short_by_a_drop_never_promotes_the_rejoined_replica(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """Replica 0 rebuilds 160 MiB at 16 MiB/s in three COPY_FROMs (64, 64, 32 MiB): the
    first at once, the next after 4 s, the last after 6 s or more, its worker asleep in the
    rate limiter. It is dropped at 5 s and rejoins; meanwhile a write lands at the volume's end,
    which only the new rebuild copies (last). The old rebuild, woken, must not promote the
    replica when its own ranges are done: it is RW only once it holds that write too."""
    c = make_cluster(size=256 << 20, replicas=3, replica_args=("--debug-api",))
    for i in range(3):
        c.start_replica(i)
    c.start_target(extra=["--rebuild-rate", "16M"])
    c.wait_modes(["RW", "RW", "RW"])
    h = connect(c.uri)
    piece = 1 << 20
    c.replicas[0].kill9()
    blob = os.urandom(piece)
    for off in range(0, 160 << 20, piece):  # replica 0 misses these
        h.pwrite(blob, off)
    c.start_replica(0)
    c.wait_modes(["WO", "RW", "RW"])
    time.sleep(5.0)
    fault(c, 0, "fail", 5)
    h.pwrite(os.urandom(BLOCK), 0)  # replica 0 fails it and is dropped (it was WO)
    assert c.modes()[0] == "ERR"
    late_off, late = c.size - BLOCK, os.urandom(BLOCK)
    h.pwrite(late, late_off)  # while it is out: only the next rebuild copies this
    c.wait_modes(["RW", "RW", "RW"], timeout=60)
    assert read_replica(c, 0, late_off, BLOCK) == late


def test_cli_status_shows_modes(cluster: Cluster) -> None:
    import subprocess
    import sys

    cluster.replicas[1].kill9()
    connect(cluster.uri).pwrite(b"x" * BLOCK, 0)  # the write notices the loss
    out = subprocess.run(
        [sys.executable, "-m", "maya", "target", "status", "--api", cluster.api],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    # Each replica's row starts on the first line naming it (an error message may name it
    # again on a wrapped line further down).
    lines: dict[str, str] = {}
    for ln in out.splitlines():
        for a in cluster.replica_addresses:
            if a in ln:
                lines.setdefault(a, ln)
    assert "ERR" in lines[cluster.replica_addresses[1]]
    assert "RW" in lines[cluster.replica_addresses[0]]
