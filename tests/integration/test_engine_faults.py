"""Fault injection (replica/faults.py) behaves the same on both replica engines: delay and
hang hold a request and everything behind it on its connection, fail answers with the
errno, counted faults wear off, drop closes the connection, crash exits like SIGKILL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import native
from replica import protocol as p
from replica.client import ReplicaClient, ReplicaDown, ReplicaError
from replica.protocol import Op
from tests.procs import HOST, Proc, free_port, http_json, wait_port

ENGINES = ["python", "native"]
SIZE = 8 << 20
BLOCK = 4096


def _skip_unavailable(engine: str) -> None:
    if engine == "native" and (why := native.engine_unavailable()) is not None:
        pytest.skip(why)


class Replica:
    def __init__(self, base: Path, engine: str, env: dict[str, str] | None = None) -> None:
        self.data, self.api = free_port(), free_port()
        self.proc = Proc(
            f"replica-{engine}",
            [
                "replica",
                "serve",
                "--dir",
                str(base / "r"),
                "--size",
                str(SIZE),
                "--listen",
                f"{HOST}:{self.data}",
                "--api",
                f"{HOST}:{self.api}",
                "--engine",
                engine,
                "--debug-api",
            ],
            base,
            env,
        ).start()
        wait_port(self.data, self.proc.proc)

    def fault(self, name: str, action: str, arg: float = 0.0, count: int | None = None) -> Any:
        body = {"name": name, "action": action, "arg": arg, "count": count}
        return http_json(f"http://{HOST}:{self.api}/v1/debug/faults", "PUT", body)

    def faults(self) -> Any:
        return http_json(f"http://{HOST}:{self.api}/v1/debug/faults")

    def clear(self) -> None:
        http_json(f"http://{HOST}:{self.api}/v1/debug/faults", "DELETE")

    async def client(self) -> ReplicaClient:
        c = ReplicaClient(f"{HOST}:{self.data}", timeout=30)
        await c.connect()
        await c.open(1)
        return c


@pytest.fixture(params=ENGINES)
def replica(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    _skip_unavailable(request.param)
    r = Replica(tmp_path, request.param)
    yield r
    r.proc.stop()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_fail_answers_the_errno_and_wears_off(replica: Replica) -> None:
    async def scenario() -> None:
        c = await replica.client()
        replica.fault("replica.write", "fail", 28, count=2)
        for _ in range(2):
            with pytest.raises(Exception, match="injected fault on write") as e:
                await c.write(0, b"a" * BLOCK)
            assert getattr(e.value, "errno", None) == 28
        await c.write(0, b"b" * BLOCK)  # used up
        assert await c.read(0, BLOCK) == b"b" * BLOCK
        assert replica.faults() == {}
        replica.fault("replica.*", "fail", 5)
        for op in (c.read(0, 1), c.flush(), c.unmap(0, 1), c.checksum(0, 1)):
            with pytest.raises(ReplicaError, match="injected fault"):
                await op
        await c.ping()  # not a data op
        replica.clear()
        await c.flush()
        c.close()

    run(scenario())


def test_delay_holds_the_request_and_everything_behind_it(replica: Replica) -> None:
    async def scenario() -> None:
        c = await replica.client()
        replica.fault("replica.read", "delay", 0.5, count=1)
        t0 = time.monotonic()
        read = c._submit(Op.READ, 0, BLOCK)
        ping = c._submit(Op.PING)
        r, pg = await asyncio.gather(read, ping)
        elapsed = time.monotonic() - t0
        assert r.status == 0 and pg.status == 0
        assert elapsed >= 0.45, elapsed
        other = await replica.client()  # another connection is not held
        t0 = time.monotonic()
        await other.read(0, BLOCK)
        assert time.monotonic() - t0 < 0.4
        c.close()
        other.close()

    run(scenario())


def test_hang_until_cleared(replica: Replica) -> None:
    async def scenario() -> None:
        c = await replica.client()
        replica.fault("replica.flush", "hang")
        flush = asyncio.ensure_future(c.flush())
        await asyncio.sleep(0.5)
        assert not flush.done()
        await (await replica.client()).read(0, 1)  # others go on
        replica.clear()
        await asyncio.wait_for(flush, 3)
        c.close()

    run(scenario())


def test_drop_closes_the_connection_not_the_replica(replica: Replica) -> None:
    async def scenario() -> None:
        c = await replica.client()
        replica.fault("replica.write_zeroes", "drop", count=1)
        with pytest.raises(ReplicaDown):
            await c.write_zeroes(0, BLOCK)
        c2 = await replica.client()
        await c2.write_zeroes(0, BLOCK)
        await c2.ping()
        c2.close()

    run(scenario())
    assert replica.proc.alive()
    assert "fault: dropping connection" in replica.proc.output()


@pytest.mark.parametrize("engine", ENGINES)
def test_env_faults_and_crash(tmp_path: Path, engine: str) -> None:
    _skip_unavailable(engine)
    r = Replica(tmp_path, engine, {"TANDEM_FAULTS": "replica.checksum=fail:22,replica.write=crash"})
    try:

        async def scenario() -> None:
            c = await r.client()
            resp = await c._submit(Op.CHECKSUM, 0, BLOCK)
            assert resp.status == p.Status.EINVAL and b"injected" in resp.payload
            with pytest.raises(ReplicaDown):
                await c.write(0, b"x" * BLOCK)

        run(scenario())
        assert r.proc.proc is not None
        assert r.proc.proc.wait(10) == 137
    finally:
        r.proc.stop()
