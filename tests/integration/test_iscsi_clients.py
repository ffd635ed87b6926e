"""The iSCSI target against real initiators on 127.0.0.1: libiscsi's tools (iscsi-ls,
iscsi-inq, iscsi-readcapacity16) and test suite (iscsi-test-cu), qemu-img and qemu-io,
CHAP logins through URLs, and raw sockets playing broken or very busy clients.

The server runs on an asyncio loop in a background thread of the pytest process, over the
SCSI target (target/frontends/iscsi/scsi) and an in-memory BlockDevice. Every test fails
if the loop reports an exception or the server logs an error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from target.frontends.iscsi.scsi.target import ScsiTarget
from target.frontends.iscsi.server import IscsiServer, TargetConfig
from tests.unit.memdev import MemDevice
from tests.unit.test_iscsi_initiator import RawInitiator, read10

IQN = "iqn.2026-11.io.tandem:vol"
MiB = 1 << 20
TEST_INITIATORS = [
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2",
]
TOOLS = ("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "iscsi-test-cu", "qemu-img", "qemu-io")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason="iSCSI client tools are not installed"
)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ServerThread:
    """An IscsiServer over a MemDevice-backed SCSI target, on its own event loop thread."""

    def __init__(self, size: int = 64 * MiB, **kw: Any) -> None:
        self.device = MemDevice(size)
        self.target_kw = {
            k: kw.pop(k) for k in ("chap", "mutual_chap", "allowed_initiators") if k in kw
        }
        self.server_kw = kw
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.errors = _Errors()
        self.server: IscsiServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        logging.getLogger("target.frontends.iscsi").addHandler(self.errors)
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        scsi = ScsiTarget({0: self.device}, volume="vol")
        await scsi.start()
        self.scsi = scsi
        self.config = TargetConfig(IQN, scsi, alias="vol", **self.target_kw)
        await self.restart(0)

    async def restart(self, port: int) -> None:
        """A new server on `port` over the same target (after the old one was closed)."""
        self.server = IscsiServer([self.config], **self.server_kw)
        await self.server.start("127.0.0.1", port)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    def url(self, lun: int = 0, auth: str = "") -> str:
        return f"iscsi://{auth}127.0.0.1:{self.port}/{IQN}/{lun}"

    def stop(self) -> None:
        try:
            if self.server is not None:
                self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            logging.getLogger("target.frontends.iscsi").removeHandler(self.errors)

    def check(self) -> None:
        assert not self.loop_errors, self.loop_errors
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]


@pytest.fixture
def make_server() -> Iterator[Any]:
    started: list[ServerThread] = []

    def make(**kw: Any) -> ServerThread:
        server = ServerThread(**kw).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
    for server in started:
        server.check()


@pytest.fixture
def server(make_server: Any) -> ServerThread:
    return make_server()  # type: ignore[no-any-return]


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_iscsi_ls_discovers_the_target_at_the_address_used(server: ServerThread) -> None:
    out = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{server.port}").stdout
    assert f"Target:{IQN} Portal:127.0.0.1:{server.port},1" in out
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS", out), out


def test_iscsi_inq_and_readcapacity16(server: ServerThread) -> None:
    inq = run("iscsi-inq", server.url()).stdout
    assert "Peripheral Device Type:DIRECT_ACCESS" in inq and "Vendor:TANDEM" in inq
    cap = run("iscsi-readcapacity16", server.url()).stdout
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in cap
    assert f"Total size:{64 * MiB}" in cap
    digest = run("iscsi-readcapacity16", server.url() + "?header_digest=crc32c").stdout
    assert f"Total size:{64 * MiB}" in digest


def test_qemu_img_info_and_qemu_io(server: ServerThread) -> None:
    info = run("qemu-img", "info", server.url()).stdout
    assert "virtual size: 64 MiB" in info
    io = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 1M 3M", "-c", "write -P 0x5a 63M 1M",
        "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 1M 3M", "-c", "read -P 0x5a 63M 1M",
        server.url(),
    )  # fmt: skip
    assert "Pattern verification failed" not in io.stdout + io.stderr
    assert server.device.data[:MiB] == b"\xab" * MiB
    assert server.device.data[MiB : 4 * MiB] == b"\xcd" * (3 * MiB)
    # Header digests through qemu's own option syntax.
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{server.port},target={IQN},lun=0,"
            "header-digest=crc32c")  # fmt: skip
    io = run("qemu-io", "--image-opts", "-c", "read -P 0xab 0 1M", opts)
    assert "Pattern verification failed" not in io.stdout + io.stderr


def test_qemu_io_keeps_128_commands_in_flight(server: ServerThread) -> None:
    server.device.delay["write"] = 0.2
    commands = []
    for i in range(300):
        commands += ["-c", f"aio_write -P {i % 256} {i * 8192} 4k"]
    run("qemu-io", "-f", "raw", *commands, "-c", "aio_flush", server.url(), timeout=120)
    assert server.device.peak_concurrency >= 128
    for i in (0, 150, 299):
        assert server.device.data[i * 8192 : i * 8192 + 4096] == bytes([i % 256]) * 4096


def test_chap_logins_through_urls(make_server: Any) -> None:
    one_way = make_server(chap=("alice", "correct-horse-1"))
    assert run("iscsi-inq", one_way.url(auth="alice%correct-horse-1@")).returncode == 0
    wrong = run("iscsi-inq", one_way.url(auth="alice%wrong-secret@"), check=False)
    assert wrong.returncode != 0 and "Authentication failure" in wrong.stderr + wrong.stdout
    anonymous = run("iscsi-inq", one_way.url(), check=False)
    assert anonymous.returncode != 0
    info = run("qemu-img", "info", one_way.url(auth="alice%correct-horse-1@")).stdout
    assert "virtual size: 64 MiB" in info
    bad_qemu = run("qemu-img", "info", one_way.url(auth="alice%nope@"), check=False)
    assert bad_qemu.returncode != 0

    mutual = make_server(chap=("alice", "correct-horse-1"), mutual_chap=("tgt", "battery-staple"))
    url = mutual.url(auth="alice%correct-horse-1@")
    assert run("iscsi-inq", url + "?target_user=tgt&target_password=battery-staple").returncode == 0
    bad = run("iscsi-inq", url + "?target_user=tgt&target_password=other", check=False)
    assert bad.returncode != 0


def test_allow_list(make_server: Any) -> None:
    server = make_server(allowed_initiators=["iqn.1994-05.com.example:only-me"])
    denied = run("iscsi-inq", server.url(), check=False)
    assert denied.returncode != 0 and "Authorization failure" in denied.stderr + denied.stdout
    listing = run("iscsi-ls", f"iscsi://127.0.0.1:{server.port}", check=False).stdout
    assert IQN not in listing  # SendTargets hides what the initiator may not use


def test_garbage_does_not_disturb_a_healthy_session(server: ServerThread) -> None:
    async def scenario() -> None:
        healthy = await RawInitiator.connect(server.port)
        assert (await healthy.login(target=IQN)).status_class == 0
        await healthy.command(bytes(6))  # TEST UNIT READY takes the power-on unit attention
        assert (await healthy.command(read10(0, 8), read=4096)).status == 0
        junk = [b"\x00" * 48, b"GET / HTTP/1.0\r\n\r\n", bytes(range(256)) * 20, b"\x43" * 47]
        for blob in junk:
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                try:
                    while s.recv(4096):
                        pass
                except (TimeoutError, ConnectionError):
                    pass
        # A logged-in session that starts sending nonsense loses only its own connection.
        rude = await RawInitiator.connect(server.port)
        assert (await rude.login(target=IQN, isid=bytes.fromhex("400001370099"))).status_class == 0
        await rude.send_raw(bytes(range(256)) * 64)
        rude.close()
        assert (await healthy.command(read10(8, 8), read=4096)).status == 0
        healthy.close()

    asyncio.run(scenario())
    assert "Lun:0" in run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{server.port}").stdout


def parse_cunit(output: str) -> dict[str, str]:
    """Per test: "passed", "failed" or "skipped" (CUnit counts skips as passes)."""
    results: dict[str, str] = {}
    suite = test = ""
    for line in output.splitlines():
        if m := re.match(r"Suite: (\S+)", line):
            suite = m.group(1)
        if m := re.match(r"\s+Test: (\S+) \.\.\.", line):
            test = f"{suite}.{m.group(1)}"
            results[test] = "passed"
        if not test:
            continue
        if "[SKIPPED]" in line and results[test] == "passed":
            results[test] = "skipped"
        if re.search(r"\.\.\.FAILED|^FAILED|\d+\. test_\w+\.c:\d+", line):
            results[test] = "failed"
    return results


def iscsi_test_cu(server: ServerThread, tests: str, timeout: float = 600) -> dict[str, str]:
    url = server.url()
    proc = run("stdbuf", "-oL", "-eL", "iscsi-test-cu", "-d", "-t", tests, url, url,
               timeout=timeout, check=False)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert "Failed to connect" not in output, output[-3000:]
    results = parse_cunit(output)
    assert results, output[-3000:]
    return results


def test_iscsi_test_cu_iscsi_families(make_server: Any) -> None:
    server = make_server(allowed_initiators=TEST_INITIATORS)
    for family in ("iSCSIcmdsn", "iSCSIdatasn", "iSCSIResiduals", "iSCSITMF"):
        results = iscsi_test_cu(server, f"ALL.{family}")
        assert all(v != "failed" for v in results.values()), results
