"""The replica process over its data protocol: fencing, errors, garbage, restart checks."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from replica import protocol as p
from replica.client import ReplicaClient, ReplicaError
from tests.procs import HOST, Proc, free_port, http_json, wait_port


@pytest.fixture
def replica(tmp_path: Path):  # type: ignore[no-untyped-def]
    data, api = free_port(), free_port()
    proc = Proc(
        "replica",
        [
            "replica",
            "serve",
            "--dir",
            str(tmp_path / "r"),
            "--size",
            "16M",
            "--volume",
            "v",
            "--listen",
            f"{HOST}:{data}",
            "--api",
            f"{HOST}:{api}",
        ],
        tmp_path,
    )
    proc.start()
    wait_port(data, proc.proc)
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
