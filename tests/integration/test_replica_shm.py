"""Memory shared between a target and a native replica on its host (SHARE and FLAG_SHM in
replica/protocol.py): the replica maps only shared memory its unix-socket peer holds and
refuses everything else with a clear error; data is written from and read into that memory
in place; a target uses it by itself, and never reuses memory a dropped replica might still
write (its reads in flight)."""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from replica import protocol as p
from replica.protocol import Op, Status
from tests.procs import HOST, Cluster

MiB = 1 << 20
SHM = 4 * MiB


pytestmark = pytest.mark.usefixtures("native_only")


class Raw:
    """The replica protocol over a blocking socket, one request at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.dec, self.tag = sock, p.ResponseDecoder(), 0
        sock.settimeout(10)

    def call(
        self, op: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> p.Response:
        self.tag += 1
        self.sock.sendall(p.encode_request(op, self.tag, offset, length, flags, payload))
        while (resp := self.dec.next()) is None:
            data = self.sock.recv(1 << 20)
            assert data, "connection closed"
            self.dec.feed(data)
        assert resp.tag == self.tag
        return resp

    def open(self) -> None:
        assert self.call(Op.OPEN, payload=b'{"epoch": 4294967296}').status == 0

    def share(self, fd: int, length: int = SHM) -> p.Response:
        return self.call(Op.SHARE, length=length, payload=struct.pack("<I", fd))


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, replicas=1, sockets=frozenset({0}))
    try:
        c.start_replica(0)
        yield c
    finally:
        c.stop()


def unix(c: Cluster) -> Raw:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(c.socket_path(0)))
    return Raw(s)


def sealed_memfd(size: int) -> int:
    """As a target makes it: its size sealed (nobody can shrink it under a mapping)."""
    fd = os.memfd_create("test-shm", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.fixture
def memfd() -> Iterator[tuple[int, mmap.mmap]]:
    fd = sealed_memfd(SHM)
    mm = mmap.mmap(fd, SHM)
    try:
        yield fd, mm
    finally:
        mm.close()
        os.close(fd)


def test_data_is_written_and_read_in_place(replica: Cluster, memfd: tuple[int, mmap.mmap]) -> None:
    fd, mm = memfd
    r = unix(replica)
    r.open()
    assert r.share(fd).status == 0
    data = os.urandom(128 << 10)
    mm[64 << 10 : (64 << 10) + len(data)] = data
    w = r.call(Op.WRITE, MiB, len(data), p.FLAG_SHM, struct.pack("<Q", 64 << 10))
    assert (w.status, w.payload) == (0, b"")
    assert r.call(Op.READ, MiB, len(data)).payload == data  # as the replica stored it
    got = r.call(Op.READ, MiB, len(data), p.FLAG_SHM, struct.pack("<Q", 2 * MiB))
    assert (got.status, got.payload) == (0, b"")  # the data went to the memory instead
    assert mm[2 * MiB : 2 * MiB + len(data)] == data
    # The memory's end is the limit; a request beyond it is refused, the connection lives on.
    beyond = r.call(Op.READ, 0, 8192, p.FLAG_SHM, struct.pack("<Q", SHM - 4096))
    assert beyond.status == Status.EINVAL and "beyond the shared memory" in beyond.message
    short = r.call(Op.WRITE, 0, 4096, p.FLAG_SHM, b"\0" * 4)
    assert short.status == Status.EINVAL and "8-byte offset" in short.message
    flush = r.call(Op.FLUSH, flags=p.FLAG_SHM, payload=bytes(8))
    assert flush.status == Status.EINVAL and "READ and WRITE only" in flush.message
    again = r.share(fd)
    assert again.status == Status.EINVAL and "already shared" in again.message
    assert r.call(Op.READ, MiB, len(data)).payload == data


def test_share_refusals(replica: Cluster, memfd: tuple[int, mmap.mmap], tmp_path: Path) -> None:
    fd, _ = memfd
    tcp = Raw(socket.create_connection((HOST, replica.replica_ports[0][0])))
    refused = tcp.share(fd)
    assert refused.status == Status.ENOTSUP and "unix socket" in refused.message
    r = unix(replica)
    r.open()
    early = r.call(Op.READ, 0, 4096, p.FLAG_SHM, bytes(8))
    assert early.status == Status.EINVAL and "send SHARE first" in early.message
    # The peer's own fds, but none of them sealed memory: a pipe, a memfd anyone holding it
    # could shrink under the mapping, a named file on tmpfs.
    rd, wr = os.pipe()
    loose = os.memfd_create("test-unsealed")
    named = Path(f"/dev/shm/tandem-test-{os.getpid()}")
    nfd = os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for bad in (loose, nfd):
            os.ftruncate(bad, SHM)
        for bad in (rd, loose, nfd):
            got = r.share(bad)
            assert got.status == Status.EINVAL and "not shared memory" in got.message
    finally:
        for f in (rd, wr, loose, nfd):
            os.close(f)
        named.unlink()
    closed = r.share(1 << 20)  # no such fd in this process
    assert closed.status == Status.EINVAL and "cannot open the shared memory" in closed.message
    big = r.share(fd, SHM + 4096)
    assert big.status == Status.EINVAL and f"has {SHM} bytes" in big.message
    empty = r.share(fd, 0)
    assert empty.status == Status.EINVAL and "shared memory of 0 bytes" in empty.message
    odd = r.call(Op.SHARE, length=SHM, payload=b"\0" * 8)
    assert odd.status == Status.EINVAL and "4-byte fd number" in odd.message
    assert r.call(Op.PING).status == 0  # every refusal kept the connection
    assert r.share(fd).status == 0  # and a good SHARE still works after them


@pytest.mark.parametrize("end", ["replica exits", "target stops"])
def test_a_dropped_replica_never_gets_reused_memory(tmp_path: Path, end: str) -> None:
    """Reads in flight in shared memory to a replica that hangs: after its deadline it is
    dropped, the reads go to another replica in fresh memory, and what the hung one was given
    is not handed out again while its process lives (it may still write there once it runs).
    Once that process exited, the memory comes back. A target stopped while it still watches
    that process exits at once."""
    c = Cluster(tmp_path, sockets=frozenset({0, 1}), size=32 * MiB)
    try:
        c.start()
        c.wait_modes(["RW", "RW", "RW"])
        assert [r["shared_memory"] for r in c.status()["replicas"]] == [True, True, False]
        pieces = {off: os.urandom(MiB) for off in range(0, 16 * MiB, MiB)}
        h = nbd.NBD()
        h.connect_uri(c.uri)
        for off, d in pieces.items():
            h.pwrite(d, off)
        h.flush()
        h.shutdown()
        bad: list[int] = []
        stop = threading.Event()

        def reader(seed: int) -> None:
            h = nbd.NBD()
            h.connect_uri(c.uri)
            offs = list(pieces)
            i = seed
            while not stop.is_set():
                off = offs[i % len(offs)]
                if h.pread(MiB, off) != pieces[off]:
                    bad.append(off)
                i += 1
            h.shutdown()

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            c.replicas[0].signal(signal.SIGSTOP)
            c.wait_modes(["ERR", "RW", "RW"], timeout=15)
            c.replicas[0].signal(signal.SIGCONT)  # it finishes its old reads now
            time.sleep(2)
        finally:
            c.replicas[0].signal(signal.SIGCONT)
            stop.set()
            for t in threads:
                t.join(30)
        assert bad == []
        counters = c.status()["engine_counters"]["members"]
        assert counters["shared"] > 0
        assert counters["leaked_bytes"] >= MiB  # its reads' memory, set aside

        def metrics() -> str:
            return urllib.request.urlopen(c.api + "/metrics", timeout=10).read().decode()

        def gauge() -> list[float]:
            name = 'tandem_engine_shared_memory_set_aside_bytes{volume="vol"} '
            return [float(ln[len(name) :]) for ln in metrics().splitlines() if ln.startswith(name)]

        assert gauge() == [counters["leaked_bytes"]]
        assert 'tandem_engine_member_shared_requests_total{volume="vol"}' in metrics()
        c.wait_modes(["RW", "RW", "RW"])  # and it came back by itself
        assert c.status()["engine_counters"]["members"]["leaked_bytes"] == counters["leaked_bytes"]
        if end == "target stops":
            assert c.target is not None
            began = time.monotonic()
            assert c.target.stop() == 0  # not killed after the 15 s it is given
            assert time.monotonic() - began < 5
            return
        c.replicas[0].kill9()  # the process that could still use that memory is gone
        until = time.monotonic() + 10
        while (held := c.status()["engine_counters"]["members"]["leaked_bytes"]) and (
            time.monotonic() < until
        ):
            time.sleep(0.1)
        assert held == 0
        assert gauge() == [0]
    finally:
        c.stop()


def test_memory_two_dropped_replicas_hold_comes_back_once_both_exited(tmp_path: Path) -> None:
    """Writes go to every replica, so a write in flight to two replicas that share memory and
    are both dropped is held by both processes: it stays aside after the first of them exited
    and comes back once the second did."""
    c = Cluster(tmp_path, sockets=frozenset({0, 1}), size=32 * MiB)
    try:
        c.start()
        c.wait_modes(["RW", "RW", "RW"])

        def members() -> dict[str, int]:
            return c.status()["engine_counters"]["members"]

        before = members()["requests"]
        h = nbd.NBD()
        h.connect_uri(c.uri)
        c.replicas[0].signal(signal.SIGSTOP)
        c.replicas[1].signal(signal.SIGSTOP)
        for k in range(4):
            h.aio_pwrite(os.urandom(MiB), k * MiB)
        until = time.monotonic() + 5
        while members()["requests"] - before < 12 and time.monotonic() < until:
            h.poll(50)  # libnbd sends queued commands only while polled
        c.wait_modes(["ERR", "ERR", "RW"], timeout=15)  # both missed their deadline
        until = time.monotonic() + 15
        while h.aio_in_flight() and time.monotonic() < until:
            h.poll(100)  # the writes end (without a quorum they fail)
        held = members()["leaked_bytes"]
        assert held >= 4 * MiB
        c.replicas[0].kill9()
        time.sleep(1.5)
        assert members()["leaked_bytes"] == held  # the other process may still read them
        c.replicas[1].kill9()
        until = time.monotonic() + 10
        while (held := members()["leaked_bytes"]) and time.monotonic() < until:
            time.sleep(0.1)
        assert held == 0
        h.shutdown()
    finally:
        c.replicas[0].signal(signal.SIGCONT)
        c.replicas[1].signal(signal.SIGCONT)
        c.stop()


def test_a_replica_that_cannot_share_gets_data_through_its_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memfd: tuple[int, mmap.mmap]
) -> None:
    """The pure-Python replica answers SHARE with ENOTSUP: the target's data connection is
    made all the same, and says the memory is not shared."""
    import asyncio

    from target.native_replicator import open_data_socket

    monkeypatch.setenv("TANDEM_ENGINE", "python")
    c = Cluster(tmp_path, replicas=1, sockets=frozenset({0}))
    try:
        c.start_replica(0)
        sock, shared, offer = asyncio.run(
            open_data_socket(c.replica_addresses[0], 1 << 32, None, 10, str(c.socket_path(0)),
                             memfd[0])
        )  # fmt: skip
        with sock:
            assert shared is False and offer is None
            r = Raw(sock)
            assert r.call(Op.WRITE, 0, 4096, payload=b"x" * 4096).status == 0  # it is OPEN
            assert r.call(Op.READ, 0, 4096).payload == b"x" * 4096
    finally:
        c.stop()


def test_payloads_beyond_the_shared_memory_go_through_the_socket(tmp_path: Path) -> None:
    """More write data in flight than the volume's shared memory holds (64 MiB): the rest goes
    through the replica's socket, every write lands, nothing is set aside."""
    c = Cluster(tmp_path, replicas=1, sockets=frozenset({0}), size=128 * MiB)
    try:
        c.start()
        c.wait_modes(["RW"])
        before = c.status()["engine_counters"]["members"]
        pieces = {off: os.urandom(4 * MiB) for off in range(0, 96 * MiB, 4 * MiB)}
        h = nbd.NBD()
        h.connect_uri(c.uri)
        try:
            # The replica is stopped (well within its deadline) until the target has sent
            # it every write, so all 96 MiB are held at once.
            c.replicas[0].signal(signal.SIGSTOP)
            try:
                cookies = [h.aio_pwrite(d, off) for off, d in pieces.items()]
                until = time.monotonic() + 5
                while time.monotonic() < until:
                    h.poll(50)  # libnbd sends queued commands only while polled
                    sent = c.status()["engine_counters"]["members"]["requests"]
                    if sent - before["requests"] >= len(pieces):
                        break
            finally:
                c.replicas[0].signal(signal.SIGCONT)
            while h.aio_in_flight():
                h.poll(-1)
            for cookie in cookies:
                assert h.aio_command_completed(cookie)  # raises on a failed write
            after = c.status()["engine_counters"]["members"]
            for off, d in pieces.items():
                assert h.pread(len(d), off) == d
        finally:
            h.shutdown()
        requests = after["requests"] - before["requests"]
        shared = after["shared"] - before["shared"]
        assert 0 < shared < requests, (before, after)
        assert after["leaked_bytes"] == 0
        assert c.modes() == ["RW"]
    finally:
        c.replicas[0].signal(signal.SIGCONT)
        c.stop()


def test_a_replica_that_cannot_parse_its_stream_is_dropped(tmp_path: Path) -> None:
    """A replica answers a stream it cannot parse with tag 0 and closes. The target's tags
    start at 1, so that answer completes no request of its: the member is dropped for the
    protocol error, comes back, and the data is intact."""
    c = Cluster(tmp_path, replicas=2, size=16 * MiB)
    proxy = c.add_proxy(0)  # TCP, so a proxy can put bytes into the stream
    try:
        c.start()
        c.wait_modes(["RW", "RW"])
        data = os.urandom(MiB)
        h = nbd.NBD()
        h.connect_uri(c.uri)
        try:
            h.pwrite(data, 0)
            h.flush()
            proxy.garble(b"\xff" * p.REQ.size)  # bad magic, at a message boundary
            log = c.log_dir / "target.log"
            until = time.monotonic() + 15
            while "protocol error answered by the replica" not in log.read_text():
                assert time.monotonic() < until, log.read_text()[-3000:]
                time.sleep(0.1)
            c.wait_modes(["RW", "RW"])
            assert h.pread(MiB, 0) == data
        finally:
            h.shutdown()
    finally:
        c.stop()
