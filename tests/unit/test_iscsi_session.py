"""The full feature phase over real sockets: data transfer in every mode, residuals, the
CmdSN window and 128 commands in flight, NOP, task management, logout, reinstatement,
text/SendTargets, and bad PDUs that get a Reject or a dropped connection without
disturbing other sessions."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from target.frontends.iscsi import pdu as p
from target.frontends.iscsi.config import TargetConfig
from target.frontends.iscsi.negotiation import TargetLimits, encode_text, parse_text
from tests.unit.test_iscsi_fake_scsi import FakeScsiTarget
from tests.unit.test_iscsi_initiator import (
    INITIATOR,
    ISID,
    TARGET,
    TUR,
    Harness,
    RawInitiator,
    read10,
    run_with_server,
    write10,
)

MODES = {
    "immediate+unsolicited": {"InitialR2T": "No", "ImmediateData": "Yes"},
    "unsolicited only": {"InitialR2T": "No", "ImmediateData": "No"},
    "immediate+r2t": {"InitialR2T": "Yes", "ImmediateData": "Yes"},
    "r2t only": {"InitialR2T": "Yes", "ImmediateData": "No"},
    "small bursts": {
        "InitialR2T": "Yes",
        "ImmediateData": "No",
        "MaxBurstLength": "8192",
        "MaxOutstandingR2T": "4",
        "MaxRecvDataSegmentLength": "4096",
    },
    "digests": {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C", "FirstBurstLength": "8192"},
}


@pytest.mark.parametrize("mode", MODES)
def test_write_then_read_back(mode: str) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB

    async def test(h: Harness) -> None:
        ini = await h.initiator(**MODES[mode])
        rsp = await ini.command(write10(8, len(payload) // 512), data=payload)
        assert (rsp.status, rsp.overflow, rsp.underflow) == (0, False, False)
        assert h.scsi.disk[4096 : 4096 + len(payload)] == payload
        got = await ini.command(read10(8, len(payload) // 512), read=len(payload))
        assert got.status == 0 and got.data == payload and not got.sense
        datains = [x for x in got.pdus if isinstance(x, p.DataIn)]
        max_seg = int(MODES[mode].get("MaxRecvDataSegmentLength", "65536"))
        assert all(len(x.data) <= max_seg for x in datains)
        assert [x.datasn for x in datains] == list(range(len(datains)))
        assert datains[-1].has_status and datains[-1].final  # status collapsed (S bit)
        burst = int(MODES[mode].get("MaxBurstLength", "262144"))
        assert [x.offset + len(x.data) for x in datains if x.final][:-1] == list(
            range(burst, len(payload), burst)
        )
        ini.close()

    run_with_server(test)


def test_residuals_and_sense() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator()
        under = await ini.command(read10(0, 1), read=10000)
        assert (under.underflow, under.residual, len(under.data)) == (True, 10000 - 512, 512)
        over = await ini.command(read10(0, 2), read=512)
        assert (over.overflow, over.residual, len(over.data)) == (True, 512, 512)
        zero = await ini.command(read10(0, 1), read=0)  # EDTL 0: no Data-In at all
        assert (zero.status, zero.overflow, zero.residual, zero.data) == (0, True, 512, b"")
        # Writes: residual against what the CDB transfers.
        h.scsi.disk[:1024] = b"\xee" * 1024
        w = await ini.command(write10(0, 2), data=b"a" * 512)
        assert (w.status, w.overflow, w.residual) == (0, True, 512)
        assert h.scsi.disk[:1024] == b"a" * 512 + b"\xee" * 512  # only what was sent
        w = await ini.command(write10(0, 1), data=b"b" * 1024, edtl=1024)
        assert (w.status, w.underflow, w.residual) == (0, True, 512)
        bad = await ini.command(read10(1 << 30, 1), read=512)  # beyond the end
        assert bad.status == 2 and bad.sense[2] == 0x05 and bad.sense[12] == 0x21
        assert isinstance(bad.pdus[-1], p.ScsiResponse)
        ini.close()

    run_with_server(test)


def test_read_with_sense_sends_data_then_response() -> None:
    async def test(h: Harness) -> None:
        from target.frontends.iscsi.scsi.types import CHECK_CONDITION, ScsiResult

        async def partial(lun: int, cdb: bytes, nexus: object, data_out: bytes = b"") -> object:
            return ScsiResult(CHECK_CONDITION, data=b"d" * 100, sense=b"\x70" + bytes(17))

        h.scsi.execute = partial  # type: ignore[method-assign]
        ini = await h.initiator()
        rsp = await ini.command(read10(0, 1), read=512)
        assert rsp.status == 2 and rsp.data == b"d" * 100 and rsp.sense == b"\x70" + bytes(17)
        last = rsp.pdus[-1]
        assert isinstance(last, p.ScsiResponse) and last.expdatasn == 1
        assert not any(x.has_status for x in rsp.pdus if isinstance(x, p.DataIn))
        ini.close()

    run_with_server(test)


def test_128_commands_in_flight_and_window() -> None:
    async def test(h: Harness) -> None:
        h.scsi.gate = asyncio.Event()
        ini = await h.initiator()
        max_cmdsn = ini.login_response.maxcmdsn  # type: ignore[union-attr]
        assert (max_cmdsn - ini.cmdsn + 1) & 0xFFFFFFFF == 128
        cmds = [await ini.start(read10(i, 1), read=512) for i in range(128)]
        for _ in range(100):
            if h.scsi.active == 128:
                break
            await asyncio.sleep(0.01)
        assert h.scsi.active == 128  # all executing at once
        late = await ini.start(TUR)  # CmdSN beyond MaxCmdSN: silently dropped
        await ini.nothing()
        h.scsi.gate.set()
        seen = set()
        for _ in cmds:
            pdu = await ini.recv()
            assert isinstance(pdu, p.DataIn) and pdu.has_status
            seen.add(pdu.itt)
        assert seen == {c.itt for c in cmds}
        assert pdu.maxcmdsn == (max_cmdsn + 128) & 0xFFFFFFFF and late.itt not in seen
        ini.cmdsn = late.cmdsn  # the dropped command's CmdSN is still free
        assert (await ini.command(TUR)).status == 0
        ini.close()

    run_with_server(test)


def test_commands_are_delivered_in_cmdsn_order_and_immediate_at_once() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator()
        base = ini.cmdsn
        cmds = []
        for i, sn in enumerate((base + 2, base + 1)):
            cmds.append(
                p.ScsiCommand(
                    itt=500 + i,
                    cmdsn=sn,
                    read=True,
                    edtl=512,
                    cdb=read10(sn - base, 1).ljust(16, b"\0"),
                )
            )
            await ini.send(cmds[-1])
        imm = await ini.start(read10(77, 1), read=512, immediate=True)  # runs although held
        assert (await ini.finish(imm)).status == 0
        await ini.nothing()
        first = p.ScsiCommand(
            itt=499, cmdsn=base, read=True, edtl=512, cdb=read10(0, 1).ljust(16, b"\0")
        )
        await ini.send(first)
        got = {(await ini.recv()).itt for _ in range(3)}
        assert got == {499, 500, 501}
        lbas = [int.from_bytes(c[2:6], "big") for c in h.scsi.executed if c[0] == 0x28]
        assert lbas == [77, 0, 1, 2]
        ini.close()

    run_with_server(test)


def test_nop_out_ping_and_target_keepalive() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator()
        await ini.send(p.NopOut(immediate=True, itt=ini.next_itt(), cmdsn=ini.cmdsn, data=b"hi"))
        pong = await ini.recv()
        assert isinstance(pong, p.NopIn) and pong.data == b"hi" and pong.ttt == p.RESERVED_TAG
        await ini.send(p.NopOut(itt=ini.next_itt(), cmdsn=ini.next_cmdsn()))  # non-immediate
        pong2 = await ini.recv()
        assert isinstance(pong2, p.NopIn) and pong2.statsn == (pong.statsn + 1) & 0xFFFFFFFF
        # The target pings an idle initiator; answering keeps the connection.
        for _ in range(2):
            ping = await ini.recv(timeout=2)
            assert isinstance(ping, p.NopIn) and ping.itt == p.RESERVED_TAG
            assert ping.ttt != p.RESERVED_TAG and ping.statsn == pong2.statsn + 1
            await ini.send(
                p.NopOut(immediate=True, itt=p.RESERVED_TAG, ttt=ping.ttt, cmdsn=ini.cmdsn)
            )
        # An initiator that stops answering is dropped; another session is unaffected.
        other = await h.initiator(isid=bytes.fromhex("400001370001"))

        async def busy() -> None:  # answers pings while it works
            for _ in range(15):
                assert (await other.command(TUR)).status == 0
                await asyncio.sleep(0.1)

        worker = asyncio.ensure_future(busy())
        assert await ini.closed(timeout=3)
        await worker
        other.close()

    run_with_server(test, nop_interval=0.2, nop_timeout=0.6)


def test_abort_task_lun_reset_and_unsupported_functions() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator(InitialR2T="Yes", ImmediateData="No")
        waiting = await ini.start(write10(0, 8), data=b"x" * 4096)  # target sends an R2T
        r2t = await ini.recv()
        assert isinstance(r2t, p.R2T) and r2t.itt == waiting.itt and r2t.length == 4096
        tmf = p.TaskManagementRequest(
            immediate=True,
            function=p.TmfFunction.ABORT_TASK,
            itt=ini.next_itt(),
            rtt=waiting.itt,
            refcmdsn=waiting.cmdsn,
            cmdsn=ini.cmdsn,
        )
        await ini.send(tmf)
        rsp = await ini.recv()
        assert isinstance(rsp, p.TaskManagementResponse) and rsp.itt == tmf.itt
        assert rsp.response == p.TmfResponse.COMPLETE
        await ini.send_data(waiting, r2t.ttt, b"x" * 4096, 0, 4096)  # dropped quietly
        await ini.nothing()
        tmf.itt = ini.next_itt()
        await ini.send(tmf)  # the task is gone now
        assert (await ini.recv()).response == p.TmfResponse.NO_TASK  # type: ignore[attr-defined]

        async def tmf_call(fn: int, lun: int = 0) -> int:
            await ini.send(
                p.TaskManagementRequest(
                    immediate=True,
                    function=fn,
                    itt=ini.next_itt(),
                    lun=p.encode_lun(lun),
                    cmdsn=ini.cmdsn,
                )
            )
            answer = await ini.recv()
            assert isinstance(answer, p.TaskManagementResponse)
            return answer.response

        h.scsi.gate = asyncio.Event()
        running = await ini.start(read10(0, 1), read=512)  # reaches the SCSI target, waits
        while not h.scsi.active:
            await asyncio.sleep(0.01)
        reset = asyncio.ensure_future(tmf_call(p.TmfFunction.LOGICAL_UNIT_RESET))
        await asyncio.sleep(0.1)
        assert not reset.done()  # waits for the command already executing
        h.scsi.gate.set()
        assert await reset == p.TmfResponse.COMPLETE  # and its status is never sent
        assert h.scsi.resets == [("lun", 0)] and running.itt not in [None]
        assert await tmf_call(p.TmfFunction.TARGET_WARM_RESET) == p.TmfResponse.COMPLETE
        assert h.scsi.resets[-1] == ("target", None)
        assert await tmf_call(p.TmfFunction.ABORT_TASK_SET, lun=3) == p.TmfResponse.NO_LUN
        assert await tmf_call(p.TmfFunction.CLEAR_TASK_SET) == p.TmfResponse.COMPLETE
        assert await tmf_call(p.TmfFunction.CLEAR_ACA) == p.TmfResponse.NOT_SUPPORTED
        assert await tmf_call(p.TmfFunction.TASK_REASSIGN) == p.TmfResponse.REASSIGN_UNSUPPORTED
        assert await tmf_call(11) == p.TmfResponse.NOT_SUPPORTED
        assert (await ini.command(TUR)).status == 0  # the window is intact
        ini.close()

    run_with_server(test)


def test_lun_reset_clears_other_sessions_tasks() -> None:
    async def test(h: Harness) -> None:
        a = await h.initiator()
        b = await h.initiator(
            initiator="iqn.1994-05.com.example:host2", InitialR2T="Yes", ImmediateData="No"
        )
        victim = await b.start(write10(0, 8), data=b"y" * 4096, unsolicited=False)
        b_r2t = await b.recv()
        assert isinstance(b_r2t, p.R2T)
        await a.send(
            p.TaskManagementRequest(
                immediate=True,
                itt=a.next_itt(),
                cmdsn=a.cmdsn,
                function=p.TmfFunction.LOGICAL_UNIT_RESET,
            )
        )
        assert (await a.recv()).response == 0  # type: ignore[attr-defined]
        aborted = await b.recv()
        assert isinstance(aborted, p.ScsiResponse) and aborted.itt == victim.itt
        assert aborted.status == 0x40  # TASK ABORTED
        a.close()
        b.close()

    run_with_server(test)


def test_logout_and_nexus_loss() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator()
        await ini.send(
            p.LogoutRequest(immediate=True, reason=2, itt=ini.next_itt(), cmdsn=ini.cmdsn)
        )
        assert (await ini.recv()).response == 2  # type: ignore[attr-defined]
        await ini.send(
            p.LogoutRequest(immediate=True, reason=1, cid=9, itt=ini.next_itt(), cmdsn=ini.cmdsn)
        )
        assert (await ini.recv()).response == 1  # type: ignore[attr-defined]
        await ini.send(
            p.LogoutRequest(immediate=True, reason=0, itt=ini.next_itt(), cmdsn=ini.cmdsn)
        )
        rsp = await ini.recv()
        assert isinstance(rsp, p.LogoutResponse) and rsp.response == 0
        assert await ini.closed()
        for _ in range(50):
            if h.scsi.lost:
                break
            await asyncio.sleep(0.01)
        assert [n.initiator for n in h.scsi.lost] == [INITIATOR]
        assert h.server.sessions == []

    run_with_server(test)


def test_session_reinstatement() -> None:
    async def test(h: Harness) -> None:
        h.scsi.gate = asyncio.Event()
        old = await h.initiator()
        old_tsih = old.login_response.tsih  # type: ignore[union-attr]
        await old.start(read10(0, 1), read=512)
        while not h.scsi.active:
            await asyncio.sleep(0.01)
        new = await RawInitiator.connect(h.port)
        login = asyncio.ensure_future(new.login())  # same initiator and ISID, TSIH 0
        await asyncio.sleep(0.1)
        assert not login.done()  # waits for the old session's running command
        h.scsi.gate.set()
        rsp = await login
        assert rsp.status_class == 0 and rsp.tsih != old_tsih
        assert await old.closed()
        assert [n.isid for n in h.scsi.lost] == [ISID]
        assert (await new.command(TUR)).status == 0
        # Connection reinstatement: the old TSIH, and the nexus lives on.
        again = await RawInitiator.connect(h.port)
        assert (await again.login(tsih=rsp.tsih)).tsih == rsp.tsih
        assert await new.closed() and len(h.scsi.lost) == 1
        assert (await again.command(TUR)).status == 0
        bogus = await RawInitiator.connect(h.port)
        assert (await bogus.login(tsih=999, isid=bytes(6))).status_detail == 0x0A
        again.close()

    run_with_server(test)


def test_discovery_send_targets_and_text_continuation() -> None:
    many = [
        TargetConfig(f"iqn.2026-11.io.tandem:vol{i:03}", FakeScsiTarget(4096)) for i in range(300)
    ]

    async def test(h: Harness) -> None:
        ini = await h.initiator(target=None, MaxRecvDataSegmentLength="4096")
        assert "TargetAlias" not in ini.keys
        text = b""
        req = p.TextRequest(
            itt=ini.next_itt(), cmdsn=ini.next_cmdsn(), data=encode_text([("SendTargets", "All")])
        )
        while True:
            await ini.send(req)
            rsp = await ini.recv()
            assert isinstance(rsp, p.TextResponse) and len(rsp.data) <= 4096
            text += rsp.data
            if rsp.final:
                assert rsp.ttt == p.RESERVED_TAG
                break
            assert rsp.cont and rsp.ttt != p.RESERVED_TAG
            req = p.TextRequest(itt=req.itt, ttt=rsp.ttt, cmdsn=ini.next_cmdsn())
        pairs = parse_text(text)
        names = [v for k, v in pairs if k == "TargetName"]
        assert len(names) == 301 and names[0] == TARGET
        port = h.port
        assert ("TargetAddress", f"127.0.0.1:{port},1") in pairs
        # Unknown keys and SCSI commands in a discovery session.
        await ini.send(
            p.TextRequest(
                itt=ini.next_itt(), cmdsn=ini.next_cmdsn(), data=encode_text([("X-foo", "1")])
            )
        )
        assert parse_text((await ini.recv()).data) == [("X-foo", "NotUnderstood")]
        await ini.send(p.ScsiCommand(itt=ini.next_itt(), cmdsn=ini.cmdsn, cdb=bytes(16)))
        assert isinstance(await ini.recv(), p.Reject)
        normal = await h.initiator()
        await normal.send(
            p.TextRequest(
                itt=normal.next_itt(),
                cmdsn=normal.next_cmdsn(),
                data=encode_text([("SendTargets", "")]),
            )
        )
        assert parse_text((await normal.recv()).data) == [
            ("TargetName", TARGET),
            ("TargetAddress", f"127.0.0.1:{port},1"),
        ]
        ini.close()
        normal.close()

    run_with_server(test, targets=many)


def test_public_portal_is_advertised() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator(target=None)
        await ini.send(
            p.TextRequest(
                itt=ini.next_itt(),
                cmdsn=ini.next_cmdsn(),
                data=encode_text([("SendTargets", "All")]),
            )
        )
        assert ("TargetAddress", "192.0.2.7:3260,5") in parse_text((await ini.recv()).data)
        ini.close()

    run_with_server(test, public_portal=("192.0.2.7", 3260), portal_group_tag=5)


def test_bad_pdus_get_rejects_and_the_session_goes_on() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator(DataDigest="CRC32C", MaxRecvDataSegmentLength="8192")
        tsih = ini.login_response.tsih  # type: ignore[union-attr]
        await ini.send(p.Snack(itt=1))
        rej = await ini.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.PROTOCOL_ERROR
        assert rej.data[0] & 0x3F == p.Op.SNACK
        unknown = bytearray(p.encode_bytes(p.NopOut(itt=1)))
        unknown[0] = 0x1E
        await ini.send_raw(bytes(unknown))
        assert (await ini.recv()).reason == p.RejectReason.COMMAND_NOT_SUPPORTED  # type: ignore[attr-defined]
        # A Data-Out with a bad data digest: Reject, and its command ends in CHECK CONDITION.
        cmd = await ini.start(write10(0, 1), data=b"z" * 512, unsolicited=False, edtl=512)
        if ini.keys["ImmediateData"] == "Yes" and cmd.data:
            assert (await ini.finish(cmd)).status == 0
        # Oversize segment beyond what we declared: Reject, the stream goes on.
        big = p.encode_bytes(
            p.NopOut(itt=ini.next_itt(), immediate=True, data=b"q" * 300000), data_digest=True
        )
        await ini.send_raw(big)
        rej = await ini.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.PROTOCOL_ERROR
        bad = bytearray(
            p.encode_bytes(
                p.NopOut(itt=ini.next_itt(), immediate=True, data=b"abcd"), data_digest=True
            )
        )
        bad[-1] ^= 0xFF
        await ini.send_raw(bytes(bad))
        rej = await ini.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.DATA_DIGEST
        # A duplicate ITT is rejected while the first command runs.
        h.scsi.gate = asyncio.Event()
        first = await ini.start(read10(0, 1), read=512)
        dup = p.ScsiCommand(
            itt=first.itt,
            cmdsn=ini.next_cmdsn(),
            read=True,
            edtl=512,
            cdb=read10(0, 1).ljust(16, b"\0"),
        )
        await ini.send(dup)
        rej = await ini.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.TASK_IN_PROGRESS
        h.scsi.gate.set()
        assert (await ini.finish(first)).status == 0
        ini.cmdsn = dup.cmdsn  # the rejected command did not consume its CmdSN
        assert (await ini.command(TUR)).status == 0
        assert h.server.sessions[0].tsih == tsih
        ini.close()

    run_with_server(test)


def test_data_out_failures_end_the_command_with_check_condition() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator(InitialR2T="Yes", ImmediateData="No", DataDigest="CRC32C")
        cmd = await ini.start(write10(0, 2), data=b"w" * 1024)
        r2t = await ini.recv()
        assert isinstance(r2t, p.R2T)
        wire = bytearray(
            p.encode_bytes(
                p.DataOut(itt=cmd.itt, ttt=r2t.ttt, final=True, data=b"w" * 1024), data_digest=True
            )
        )
        wire[60] ^= 1
        await ini.send_raw(bytes(wire))
        rej = await ini.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.DATA_DIGEST
        rsp = await ini.recv()
        assert isinstance(rsp, p.ScsiResponse) and rsp.status == 2
        assert rsp.data[2 + 2] == 0x0B and rsp.data[2 + 12 : 2 + 14] == b"\x47\x05"
        # Wrong DataSN (libiscsi's iSCSIDataSnInvalid): CHECK CONDITION, session lives on.
        cmd = await ini.start(write10(0, 1), data=b"v" * 512)
        r2t = await ini.recv()
        await ini.send(
            p.DataOut(
                itt=cmd.itt,
                ttt=r2t.ttt,
                datasn=27,
                final=True,  # type: ignore[attr-defined]
                data=b"v" * 512,
            )
        )
        rsp = await ini.recv()
        assert isinstance(rsp, p.ScsiResponse) and rsp.status == 2
        assert (await ini.command(TUR)).status == 0
        ini.close()

    run_with_server(test)


def test_garbage_and_header_digest_errors_drop_only_that_connection() -> None:
    async def test(h: Harness) -> None:
        healthy = await h.initiator(isid=bytes.fromhex("400001370009"))
        garbage = await h.initiator(login=False)
        await garbage.send_raw(b"GET / HTTP/1.1\r\n\r\n" * 10)
        assert await garbage.closed()
        digest = await h.initiator(HeaderDigest="CRC32C")
        wire = bytearray(p.encode_bytes(p.NopOut(itt=5, immediate=True), header_digest=True))
        wire[20] ^= 1
        await digest.send_raw(bytes(wire))
        assert await digest.closed()
        notlogin = await h.initiator(login=False)
        await notlogin.send(p.NopOut(itt=1))
        rsp = await notlogin.recv()
        assert isinstance(rsp, p.LoginResponse) and (rsp.status_class, rsp.status_detail) == (
            2,
            0x0B,
        )
        assert await notlogin.closed()
        half = await h.initiator(login=False)
        await half.send_raw(p.encode_bytes(p.LoginRequest(csg=1, nsg=3, transit=True))[:30])
        half.close()
        assert (await healthy.command(TUR)).status == 0
        healthy.close()

    run_with_server(test)


def test_login_failures_over_the_wire() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator(login=False)
        rsp = await ini.login(target="iqn.2026-11.io.tandem:missing")
        assert (rsp.status_class, rsp.status_detail) == (2, 3)
        assert await ini.closed()
        ini = await h.initiator(login=False)
        rsp = await ini.login(initiator="iqn.1994-05.com.example:intruder")
        assert (rsp.status_class, rsp.status_detail) == (2, 2)
        ini = await h.initiator(login=False)
        huge = p.LoginRequest(csg=1, nsg=3, transit=True, data=b"A=" + b"b" * 9000 + b"\0")
        await ini.send(huge)
        rsp = await ini.recv()
        assert isinstance(rsp, p.LoginResponse) and rsp.status_class == 2
        assert await ini.closed()

    run_with_server(test, allowed_initiators=[INITIATOR, "iqn.1994-05.com.example:host2"])


def test_server_close_waits_for_running_commands() -> None:
    async def test(h: Harness) -> None:
        h.scsi.delay = 0.2
        ini = await h.initiator()
        await ini.start(write10(0, 1), data=b"c" * 512)
        while not h.scsi.active:
            await asyncio.sleep(0.01)
        await h.server.close()
        assert h.scsi.active == 0 and h.scsi.disk[:512] == b"c" * 512
        assert await ini.closed()

    run_with_server(test)


def test_target_cold_reset_ends_every_session() -> None:
    async def test(h: Harness) -> None:
        a = await h.initiator()
        b = await h.initiator(initiator="iqn.1994-05.com.example:host2")
        tmf = p.TaskManagementRequest(
            immediate=True,
            function=p.TmfFunction.TARGET_COLD_RESET,
            itt=a.next_itt(),
            cmdsn=a.cmdsn,
        )
        await a.send(tmf)
        rsp = await a.recv()
        assert isinstance(rsp, p.TaskManagementResponse) and rsp.response == 0
        assert await a.closed() and await b.closed()
        for _ in range(50):
            if len(h.scsi.lost) == 2:
                break
            await asyncio.sleep(0.01)
        assert h.scsi.resets == [("target", None)] and len(h.scsi.lost) == 2
        fresh = await h.initiator()
        assert (await fresh.command(TUR)).status == 0
        fresh.close()

    run_with_server(test)


def test_write_beyond_max_data_transfer_is_refused() -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator()
        cmd = await ini.start(write10(0, 4096), data=b"", edtl=2 << 20)
        rsp = await ini.finish(cmd)
        assert rsp.status == 2 and rsp.sense[2] == 0x05 and rsp.sense[12:14] == b"\x0e\x03"
        assert (await ini.command(write10(0, 2048), data=b"s" * (1 << 20))).status == 0
        ini.close()

    run_with_server(test, limits=TargetLimits(max_data_transfer=1 << 20))


INITIATOR_PDUS = [
    p.ScsiCommand(itt=7, cmdsn=1000, read=True, edtl=512, cdb=read10(0, 1).ljust(16, b"\0")),
    p.ScsiCommand(itt=8, cmdsn=1001, write=True, edtl=1024, final=False, data=b"w" * 512,
                  cdb=write10(0, 2).ljust(16, b"\0")),
    p.DataOut(itt=8, ttt=p.RESERVED_TAG, offset=512, data=b"w" * 512, final=True),
    p.NopOut(immediate=True, itt=9, cmdsn=1002, data=b"ping"),
    p.TaskManagementRequest(immediate=True, function=p.TmfFunction.ABORT_TASK, itt=10, rtt=7,
                            refcmdsn=1000, cmdsn=1002),
    p.TextRequest(itt=11, cmdsn=1002, data=b"SendTargets=All\0"),
    p.LogoutRequest(immediate=True, itt=12, cmdsn=1003),
    p.Snack(itt=13),
    p.LoginRequest(csg=1, nsg=3, transit=True),
]  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(INITIATOR_PDUS),
            st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=3),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_fuzzed_pdus_on_a_live_session(items: list[tuple[p.Pdu, list[tuple[int, int]]]]) -> None:
    async def test(h: Harness) -> None:
        ini = await h.initiator()
        for pdu, edits in items:
            wire = bytearray(p.encode_bytes(pdu))
            for pos, value in edits:
                if pos < len(wire):
                    wire[pos] = value
            try:
                await ini.send_raw(bytes(wire))
            except ConnectionError:
                break
        await asyncio.sleep(0.05)
        ini.close()
        fresh = await h.initiator(isid=bytes.fromhex("400001370077"))
        assert (await fresh.command(TUR)).status == 0
        fresh.close()

    run_with_server(test)
