"""A minimal iSCSI initiator over asyncio streams, built on the target's own PDU codec, for
tests that need to say exactly what goes on the wire (and to break the rules on purpose).
Also the harness that runs an IscsiServer in the test's event loop and fails the test on
any asyncio error it reports ("Task exception was never retrieved" and the like)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from target.frontends.iscsi import pdu as p
from target.frontends.iscsi.config import TargetConfig
from target.frontends.iscsi.negotiation import encode_text, parse_text
from target.frontends.iscsi.server import IscsiServer
from tests.unit.test_iscsi_fake_scsi import FakeScsiTarget

TARGET = "iqn.2026-11.io.tandem:vol"
INITIATOR = "iqn.1994-05.com.example:host1"
ISID = bytes.fromhex("400001370000")
DEFAULT_KEYS = {
    "HeaderDigest": "None",
    "DataDigest": "None",
    "MaxRecvDataSegmentLength": "65536",
    "MaxBurstLength": "262144",
    "FirstBurstLength": "65536",
    "InitialR2T": "No",
    "ImmediateData": "Yes",
    "MaxOutstandingR2T": "1",
    "ErrorRecoveryLevel": "0",
}


@dataclass
class Reply:
    status: int
    data: bytes = b""
    sense: bytes = b""
    overflow: bool = False
    underflow: bool = False
    residual: int = 0
    pdus: list[p.Pdu] = field(default_factory=list)


class RawInitiator:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = p.Decoder(p.MAX_DATA_SEGMENT)
        self.digests = (False, False)
        self.itt = 0x100
        self.cmdsn = 1000
        self.keys: dict[str, str] = {}  # what the target answered at login
        self.login_response: p.LoginResponse | None = None

    @classmethod
    async def connect(cls, port: int) -> RawInitiator:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def next_cmdsn(self) -> int:
        self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        return (self.cmdsn - 1) & 0xFFFFFFFF

    async def send(self, pdu: p.Pdu) -> None:
        self.writer.write(p.encode_bytes(pdu, *self.digests))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> p.Pdu:
        async def read() -> p.Pdu:
            while True:
                pdu = self.decoder.next_pdu()
                if pdu is not None:
                    return pdu
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("target closed the connection")
                self.decoder.feed(data)

        return await asyncio.wait_for(read(), timeout)

    async def nothing(self, timeout: float = 0.3) -> None:
        """Assert the target sends nothing for a while."""
        try:
            pdu = await self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {pdu}")

    async def closed(self, timeout: float = 5.0) -> bool:
        try:
            while True:
                await self.recv(timeout)
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.transport.abort()

    async def login(
        self,
        target: str | None = TARGET,
        initiator: str = INITIATOR,
        isid: bytes = ISID,
        tsih: int = 0,
        **keys: str,
    ) -> p.LoginResponse:
        pairs = [("InitiatorName", initiator)]
        if target is None:
            pairs.append(("SessionType", "Discovery"))
        else:
            pairs += [("SessionType", "Normal"), ("TargetName", target)]
        pairs += list({**DEFAULT_KEYS, **keys}.items())
        req = p.LoginRequest(
            transit=True,
            csg=1,
            nsg=3,
            isid=isid,
            tsih=tsih,
            itt=self.next_itt(),
            cmdsn=self.cmdsn,
            data=encode_text(pairs),
        )
        await self.send(req)
        rsp = await self.recv()
        assert isinstance(rsp, p.LoginResponse)
        self.login_response = rsp
        self.keys = dict(parse_text(rsp.data))
        if rsp.status_class == 0 and rsp.transit:
            self.digests = (
                self.keys.get("HeaderDigest") == "CRC32C",
                self.keys.get("DataDigest") == "CRC32C",
            )
            self.decoder.header_digest, self.decoder.data_digest = self.digests
        return rsp

    @property
    def segment(self) -> int:
        """What the target accepts in one data segment."""
        return int(self.keys.get("MaxRecvDataSegmentLength", "8192"))

    async def start(
        self,
        cdb: bytes,
        *,
        read: int = 0,
        data: bytes = b"",
        immediate: bool = False,
        edtl: int | None = None,
        lun: int = 0,
        unsolicited: bool = True,
    ) -> p.ScsiCommand:
        """Send a SCSI command with its immediate and unsolicited data."""
        immediate_data = self.keys.get("ImmediateData") == "Yes"
        first_burst = int(self.keys.get("FirstBurstLength", "65536"))
        unsolicited = unsolicited and self.keys.get("InitialR2T") == "No"
        length = len(data) if edtl is None else edtl
        imm = data[: min(first_burst, self.segment)] if immediate_data else b""
        end = min(first_burst, len(data)) if unsolicited else len(imm)
        cmd = p.ScsiCommand(
            immediate=immediate,
            itt=self.next_itt(),
            lun=p.encode_lun(lun),
            read=bool(read),
            write=bool(data) or (edtl is not None and not read),
            edtl=read if read else length,
            cdb=cdb.ljust(16, b"\0"),
            cmdsn=self.cmdsn if immediate else self.next_cmdsn(),
            data=imm,
            final=end <= len(imm),
        )
        await self.send(cmd)
        if end > len(imm):
            await self.send_data(cmd, p.RESERVED_TAG, data, len(imm), end)
        return cmd

    async def send_data(
        self, cmd: p.ScsiCommand, ttt: int, data: bytes, start: int, end: int
    ) -> None:
        for datasn, offset in enumerate(range(start, end, self.segment)):
            chunk = data[offset : min(offset + self.segment, end)]
            await self.send(
                p.DataOut(
                    itt=cmd.itt,
                    lun=cmd.lun,
                    ttt=ttt,
                    datasn=datasn,
                    offset=offset,
                    data=chunk,
                    final=offset + len(chunk) >= end,
                )
            )

    async def finish(self, cmd: p.ScsiCommand, data: bytes = b"") -> Reply:
        """Serve R2Ts and collect Data-In until the command's status arrives."""
        got = bytearray()
        pdus: list[p.Pdu] = []
        while True:
            pdu = await self.recv()
            if isinstance(pdu, p.NopIn) and pdu.itt == p.RESERVED_TAG:  # the target's ping
                await self.send(p.NopOut(immediate=True, ttt=pdu.ttt, cmdsn=self.cmdsn))
                continue
            pdus.append(pdu)
            if pdu.itt != cmd.itt:
                raise AssertionError(f"PDU for another task: {pdu}")
            if isinstance(pdu, p.R2T):
                await self.send_data(cmd, pdu.ttt, data, pdu.offset, pdu.offset + pdu.length)
            elif isinstance(pdu, p.DataIn):
                assert pdu.offset == len(got)
                got += pdu.data
                if pdu.has_status:
                    return Reply(
                        pdu.status, bytes(got), b"", pdu.overflow, pdu.underflow, pdu.residual, pdus
                    )
            elif isinstance(pdu, p.ScsiResponse):
                sense = pdu.data[2 : 2 + int.from_bytes(pdu.data[:2], "big")] if pdu.data else b""
                return Reply(
                    pdu.status,
                    bytes(got),
                    bytes(sense),
                    pdu.overflow,
                    pdu.underflow,
                    pdu.residual,
                    pdus,
                )
            else:
                raise AssertionError(f"unexpected {pdu}")

    async def command(self, cdb: bytes, **kw: Any) -> Reply:
        cmd = await self.start(cdb, **kw)
        return await self.finish(cmd, kw.get("data", b""))


def read10(lba: int, blocks: int) -> bytes:
    return bytes((0x28, 0)) + lba.to_bytes(4, "big") + bytes((0,)) + blocks.to_bytes(2, "big")


def write10(lba: int, blocks: int) -> bytes:
    return bytes((0x2A, 0)) + lba.to_bytes(4, "big") + bytes((0,)) + blocks.to_bytes(2, "big")


TUR = bytes(6)


class Harness:
    """An IscsiServer with a fake SCSI disk, in the running loop."""

    def __init__(self, **kw: Any) -> None:
        self.scsi = FakeScsiTarget(size=kw.pop("size", 4 << 20))
        target_kw = {k: kw.pop(k) for k in ("chap", "mutual_chap", "allowed_initiators") if k in kw}
        self.config = TargetConfig(TARGET, self.scsi, alias="vol", **target_kw)
        extra = kw.pop("targets", [])
        kw.setdefault("nop_interval", None)
        self.server = IscsiServer([self.config, *extra], **kw)
        self.errors: list[logging.LogRecord] = []

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    async def initiator(self, login: bool = True, **kw: str) -> RawInitiator:
        ini = await RawInitiator.connect(self.port)
        if login:
            rsp = await ini.login(**kw)
            assert rsp.status_class == 0, rsp
        return ini


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_with_server(
    test: Callable[[Harness], Coroutine[Any, Any, None]], timeout: float = 20, **kw: Any
) -> Harness:
    """Run `test(harness)` on a fresh loop; fail on loop errors or logged errors."""
    loop_errors: list[dict[str, Any]] = []
    handler = _Errors()
    logging.getLogger("target.frontends.iscsi").addHandler(handler)

    async def main() -> Harness:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
        harness = Harness(**kw)
        await harness.server.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(test(harness), timeout)
        finally:
            await harness.server.close()
        return harness

    try:
        harness = asyncio.run(main())
        gc.collect()
    finally:
        logging.getLogger("target.frontends.iscsi").removeHandler(handler)
    assert not loop_errors, loop_errors
    assert not handler.records, [r.getMessage() for r in handler.records]
    return harness


def test_login_and_test_unit_ready() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator()
        assert ini.login_response is not None and ini.login_response.tsih != 0
        assert (await ini.command(TUR)).status == 0
        ini.close()

    run_with_server(test)
