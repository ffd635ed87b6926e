"""iSCSI's full feature phase in the native engine (native/iscsi_server.c), on a real
3-replica volume: the raw initiator of tests/unit/test_iscsi_initiator.py says exactly what
goes on the wire. What the engine path must get right: steady-state READ/WRITE without
up-calls, slow mode keeping Python's SPC rules, digests, task management, and broken input
handled by C. Every test also runs on the Python engine (the reference): same answers."""

from __future__ import annotations

import asyncio
import json
import os
import random
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import native
from target.frontends.iscsi import pdu as p
from tests.procs import Cluster
from tests.unit.test_iscsi_initiator import TUR, RawInitiator, read10, write10

IQN = "iqn.2026-11.io.tandem:vol"
ISIDS = iter(bytes.fromhex(f"4000013700{i:02x}") for i in range(1, 255))
CHECK_CONDITION, RESERVATION_CONFLICT, TASK_ABORTED = 0x02, 0x18, 0x40


@pytest.fixture(scope="module", params=["native", "python"])
def vol(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if request.param == "native" and (why := native.engine_unavailable()) is not None:
        pytest.skip(f"native engine: {why}")
    env = {**os.environ, "TANDEM_ENGINE": request.param}
    # Two replicas through their unix sockets: the native engine's large payloads then go
    # through the memory it shares with them.
    c = Cluster(
        Path(tmp_path_factory.mktemp(f"iscsi-{request.param}")), env=env, sockets=frozenset({0, 1})
    ).start()
    c.engine = request.param  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.stop()


def counters(c: Cluster) -> dict[str, int] | None:
    """The engine's iSCSI request and up-call counters (None on the Python engine)."""
    with urllib.request.urlopen(c.api + "/v1/volume", timeout=10) as r:
        st = json.load(r)
    assert st["engine"] == c.engine  # type: ignore[attr-defined]
    if c.engine == "python":  # type: ignore[attr-defined]
        return None
    return st["engine_counters"]["iscsi"]  # type: ignore[no-any-return]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def session(c: Cluster, **keys: str) -> RawInitiator:
    ini = await RawInitiator.connect(c.iscsi_port)
    rsp = await ini.login(target=IQN, isid=next(ISIDS), **keys)
    assert rsp.status_class == 0, rsp
    for _ in range(50):
        first = await ini.command(TUR)  # the power-on unit attention of a new nexus
        if first.status != TASK_ABORTED:
            break
        # A reset an earlier test's junk PDUs asked for (test_random_pdus_...) may still be
        # finishing under ASan, aborting every nexus's tasks (TAS): ask again.
        await asyncio.sleep(0.05)
    assert first.status == CHECK_CONDITION and first.sense[12] == 0x29, first
    return ini


async def statuses(ini: RawInitiator, cmds: list[p.ScsiCommand]) -> dict[int, int]:
    """The status of each of these commands (no Data-In, no R2T), in any order."""
    out: dict[int, int] = {}
    while len(out) < len(cmds):
        pdu = await ini.recv()
        assert isinstance(pdu, p.ScsiResponse), pdu
        out[pdu.itt] = pdu.status
    assert set(out) == {c.itt for c in cmds}
    return out


def sense_code(reply: Any) -> tuple[int, int, int]:
    return reply.sense[2] & 0x0F, reply.sense[12], reply.sense[13]


def test_steady_state_read_write_runs_no_python(vol: Cluster) -> None:
    async def scenario() -> None:
        ini = await session(vol)
        before = counters(vol)
        # immediate + unsolicited data, R2T-solicited bursts, reads split over Data-Ins
        for lba, blocks in ((0, 1), (8, 8), (64, 256), (1024, 2048)):
            data = os.urandom(blocks * 512)
            assert (await ini.command(write10(lba, blocks), data=data)).status == 0
            back = await ini.command(read10(lba, blocks), read=blocks * 512)
            assert back.status == 0 and back.data == data
            assert len(back.pdus) == -(-blocks * 512 // 65536)  # the initiator's segment size
            assert back.pdus[-1].has_status  # status collapsed into the last Data-In
        fua = bytes((0x2A, 0x08)) + (4).to_bytes(4, "big") + bytes((0, 0, 1, 0))
        assert (await ini.command(fua, data=bytes(512))).status == 0
        sync16 = bytes((0x91, 0)) + bytes(14)
        assert (await ini.command(sync16)).status == 0
        # 128 commands in flight at once, answered concurrently
        cmds = [await ini.start(read10(i * 8, 8), read=4096) for i in range(128)]
        seen = set()
        while len(seen) < len(cmds):
            pdu = await ini.recv()
            if isinstance(pdu, p.DataIn) and pdu.has_status:
                assert pdu.status == 0
                seen.add(pdu.itt)
        assert seen == {c.itt for c in cmds}
        after = counters(vol)
        if before is not None and after is not None:
            assert after["upcalls"] == before["upcalls"], (before, after)
            assert after["requests"] - before["requests"] == 8 + 2 + 128
            with urllib.request.urlopen(vol.api + "/v1/volume", timeout=10) as r:
                assert json.load(r)["engine_counters"]["members"]["shared"] > 0
        # an unusual command still goes up and works
        inq = await ini.command(bytes((0x12, 0, 0, 0, 96, 0)), read=96)
        assert inq.status == 0 and b"TANDEM" in inq.data
        if after is not None:
            assert counters(vol) == {**after, "upcalls": after["upcalls"] + 1,
                                     "requests": after["requests"] + 1}  # fmt: skip
            with urllib.request.urlopen(vol.api + "/metrics", timeout=10) as r:
                metrics = r.read().decode()
            line = 'tandem_engine_frontend_upcalls_total{frontend="iscsi",volume="vol"} '
            assert line + f"{after['upcalls'] + 1}.0" in metrics, metrics[-2000:]
        ini.close()

    run(scenario())


def test_residuals_and_bad_cdbs_match_python(vol: Cluster) -> None:
    async def scenario() -> None:
        ini = await session(vol)
        # READ with a smaller expected length: overflow residual, data cut
        r = await ini.command(read10(0, 8), read=2048)
        assert r.status == 0 and len(r.data) == 2048 and r.overflow and r.residual == 2048
        # WRITE with more data than the CDB asks for: underflow residual
        w = await ini.command(write10(0, 1), data=bytes(1024))
        assert w.status == 0 and w.underflow and w.residual == 512
        # beyond the end: Python's LBA OUT OF RANGE
        blocks = vol.size // 512
        r = await ini.command(read10(blocks - 1, 2), read=1024)
        assert r.status == CHECK_CONDITION and sense_code(r) == (0x05, 0x21, 0x00)
        # a reserved bit set: INVALID FIELD IN CDB with the field pointer
        bad = bytearray(read10(0, 1))
        bad[1] = 0x01
        r = await ini.command(bytes(bad), read=512)
        assert r.status == CHECK_CONDITION and sense_code(r) == (0x05, 0x24, 0x00)
        # COMPARE AND WRITE (in Python, under an engine range lock) next to C's writes
        old, new = os.urandom(512), os.urandom(512)
        assert (await ini.command(write10(40, 1), data=old)).status == 0
        caw = bytes((0x89, 0)) + (40).to_bytes(8, "big") + bytes((0, 0, 0, 1, 0, 0))
        cmds = [await ini.start(write10(41 + i, 1), data=new) for i in range(16)]
        cmds.insert(8, await ini.start(caw, data=old + new))
        assert set((await statuses(ini, cmds)).values()) == {0}
        miss = await ini.command(caw, data=old + new)
        assert miss.status == CHECK_CONDITION and sense_code(miss) == (0x0E, 0x1D, 0x00)
        assert (await ini.command(read10(40, 1), read=512)).data == new
        ini.close()

    run(scenario())


def test_slow_mode_keeps_unit_attentions_and_reservations(vol: Cluster) -> None:
    async def scenario() -> None:
        a, b = await session(vol), await session(vol)
        assert (await a.command(write10(16, 1), data=bytes(512))).status == 0
        # b's LOGICAL UNIT RESET: a's next command reports it (29h/03h), through the engine
        tmf = p.TaskManagementRequest(
            immediate=True, function=p.TmfFunction.LOGICAL_UNIT_RESET, itt=b.next_itt(),
            cmdsn=b.cmdsn, rtt=p.RESERVED_TAG,
        )  # fmt: skip
        await b.send(tmf)
        rsp = await b.recv()
        assert isinstance(rsp, p.TaskManagementResponse) and rsp.response == 0
        r = await a.command(read10(16, 1), read=512)
        assert r.status == CHECK_CONDITION and sense_code(r) == (0x06, 0x29, 0x03), r
        assert (await a.command(read10(16, 1), read=512)).status == 0
        assert (await b.command(TUR)).status == CHECK_CONDITION  # b's own reset UA too
        # b RESERVEs: a's READ and WRITE conflict; after RELEASE they run again
        assert (await b.command(bytes((0x16, 0, 0, 0, 0, 0)))).status == 0
        w = await a.command(write10(16, 1), data=bytes(512))
        assert w.status == RESERVATION_CONFLICT
        assert (await a.command(read10(16, 1), read=512)).status == RESERVATION_CONFLICT
        assert (await b.command(read10(16, 1), read=512)).status == 0
        assert (await b.command(bytes((0x17, 0, 0, 0, 0, 0)))).status == 0
        assert (await a.command(write10(16, 1), data=bytes(512))).status == 0
        # and fast again: a's I/O adds no up-calls
        before = counters(vol)
        for _ in range(5):
            assert (await a.command(read10(16, 1), read=512)).status == 0
        if before is not None:
            assert counters(vol) == {**before, "requests": before["requests"] + 5}
        a.close()
        b.close()

    run(scenario())


def test_digests_r2t_and_nop_through_the_engine(vol: Cluster) -> None:
    async def scenario() -> None:
        ini = await session(
            vol, HeaderDigest="CRC32C", DataDigest="CRC32C", InitialR2T="Yes",
            ImmediateData="No", MaxOutstandingR2T="2", MaxBurstLength="65536",
            MaxRecvDataSegmentLength="8192",
        )  # fmt: skip
        assert ini.digests == (True, True)
        data = os.urandom(512 * 1024)
        w = await ini.command(write10(2048, 1024), data=data)
        assert w.status == 0
        assert sum(isinstance(x, p.R2T) for x in w.pdus) == 8  # 64 KiB bursts
        r = await ini.command(read10(2048, 1024), read=len(data))
        assert r.status == 0 and r.data == data
        assert all(len(x.data) <= 8192 for x in r.pdus)
        # a ping with data comes back (NOP-In, same data)
        nop = p.NopOut(itt=ini.next_itt(), cmdsn=ini.next_cmdsn(), data=b"ping" * 10)
        await ini.send(nop)
        rsp = await ini.recv()
        assert isinstance(rsp, p.NopIn) and rsp.itt == nop.itt and rsp.data == nop.data
        # a Data-Out with a bad data digest: Reject, and the command fails with a CRC error
        # (64 KiB: large enough to be received straight into the command's buffer)
        cmd = await ini.start(write10(0, 128), data=bytes(65536))
        r2t = await ini.recv()
        assert isinstance(r2t, p.R2T)
        raw = bytearray(
            p.encode_bytes(
                p.DataOut(itt=cmd.itt, ttt=r2t.ttt, offset=0, final=True, data=bytes(65536)),
                True,
                True,
            )
        )
        raw[-1] ^= 0xFF
        await ini.send_raw(bytes(raw))
        rej = await ini.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.DATA_DIGEST
        res = await ini.finish(cmd)
        assert res.status == CHECK_CONDITION and sense_code(res) == (0x0B, 0x47, 0x05)
        # still in business
        assert (await ini.command(read10(0, 1), read=512)).status == 0
        # a bad header digest drops the connection; other sessions go on
        other = await session(vol)
        raw = bytearray(p.encode_bytes(p.NopOut(itt=ini.next_itt(), cmdsn=ini.cmdsn), True, True))
        raw[48] ^= 0xFF
        await ini.send_raw(bytes(raw))
        assert await ini.closed()
        assert (await other.command(read10(2048, 8), read=4096)).data == data[:4096]
        other.close()

    run(scenario())


def test_broken_input_rejected_or_closed_target_stays_up(vol: Cluster) -> None:
    async def scenario() -> None:
        healthy = await session(vol)
        rude = await session(vol, MaxRecvDataSegmentLength="8192")
        # a data segment beyond what we declared: Reject, thrown away, the session goes on
        limit = int(rude.keys["MaxRecvDataSegmentLength"])
        big = p.NopOut(itt=rude.next_itt(), cmdsn=rude.next_cmdsn(), data=bytes(limit + 4))
        await rude.send(big)
        rej = await rude.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.PROTOCOL_ERROR
        rude.cmdsn -= 1  # that CmdSN was never received
        assert (await rude.command(read10(0, 1), read=512)).status == 0
        # an unknown opcode and a target's own PDU: Rejects
        await rude.send_raw(bytes([0x1C]) + bytes(47))
        rej = await rude.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.COMMAND_NOT_SUPPORTED
        await rude.send(p.NopIn(itt=5))
        rej = await rude.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.COMMAND_NOT_SUPPORTED
        # a duplicate task tag while the first is waiting for its data
        cmd = await rude.start(write10(0, 512), data=bytes(512 * 512), unsolicited=False)
        dup = p.ScsiCommand(itt=cmd.itt, cmdsn=rude.next_cmdsn(), read=True, edtl=512,
                            cdb=read10(0, 1).ljust(16, b"\0"))  # fmt: skip
        await rude.send(dup)
        got = [await rude.recv(), await rude.recv()]
        rej = next(x for x in got if isinstance(x, p.Reject))
        assert rej.reason == p.RejectReason.TASK_IN_PROGRESS
        # half a PDU, then garbage, then gone
        await rude.send_raw(p.encode_bytes(p.NopOut(itt=9, cmdsn=rude.cmdsn))[:30])
        await rude.send_raw(bytes(range(256)) * 64)
        rude.close()
        # truncated logins and junk on new connections
        for blob in (b"\x00" * 48, b"GET / HTTP/1.0\r\n\r\n", b"\x43" * 47):
            _, w = await asyncio.open_connection("127.0.0.1", vol.iscsi_port)
            w.write(blob)
            w.close()
        assert (await healthy.command(read10(8, 8), read=4096)).status == 0
        healthy.close()

    run(scenario())


def test_too_many_immediate_commands_are_rejected(vol: Cluster) -> None:
    """Immediate commands bypass the CmdSN window, so their number in flight is bounded
    (32): one more is Rejected (too many immediate commands); once one finishes, another is
    taken again. A data segment far beyond the receive buffer (2 MiB) is refused and skipped
    like any oversized one."""

    async def scenario() -> None:
        ini = await session(vol, InitialR2T="Yes", ImmediateData="No")
        data = bytes(range(256)) * 2
        held = []
        for i in range(32):  # each waits for its Data-Out (R2T), so stays in flight
            held.append(await ini.start(write10(i, 1), data=data, immediate=True))
        r2ts = {}
        for _ in held:
            r2t = await ini.recv()
            assert isinstance(r2t, p.R2T), r2t
            r2ts[r2t.itt] = r2t
        extra = await ini.start(write10(40, 1), data=data, immediate=True)
        rej = await ini.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.IMMEDIATE_REJECT
        assert rej.data[16:20] == extra.itt.to_bytes(4, "big")  # the rejected PDU's header
        first = held.pop(0)
        await ini.send_data(first, r2ts[first.itt].ttt, data, 0, len(data))
        res = await ini.recv()
        assert isinstance(res, p.ScsiResponse) and res.itt == first.itt and res.status == 0
        again = await ini.command(read10(0, 1), read=512, immediate=True)  # room again
        assert again.status == 0 and again.data == data
        # 2 MiB of data on a NOP-Out: Reject, all of it skipped, the session goes on
        big = p.NopOut(itt=ini.next_itt(), cmdsn=ini.next_cmdsn(), data=bytes(2 << 20))
        await ini.send(big)
        rej = await ini.recv()
        assert isinstance(rej, p.Reject) and rej.reason == p.RejectReason.PROTOCOL_ERROR
        ini.cmdsn -= 1  # that CmdSN was never received
        for cmd in held:
            await ini.send_data(cmd, r2ts[cmd.itt].ttt, data, 0, len(data))
        assert set((await statuses(ini, held)).values()) == {0}
        assert (await ini.command(read10(31, 1), read=512)).data == data
        ini.close()

    run(scenario())


def test_random_pdus_never_disturb_other_sessions(vol: Cluster) -> None:
    """Framed PDUs with random fields (opcodes, flags, tags, CmdSNs, lengths, AHSs, CDBs,
    Data-Out offsets), a few sessions' worth: the target answers or drops them, and a
    healthy session is served throughout (under `make asan`, without a memory error)."""
    rng = random.Random(int(os.environ.get("TANDEM_ISCSI_FUZZ_SEED", "7")))
    ops = [0x00, 0x01, 0x01, 0x01, 0x02, 0x04, 0x05, 0x05, 0x06, 0x10, 0x20, 0x3F, 0x1C]
    cdbs = [0x08, 0x0A, 0x28, 0x2A, 0x88, 0x8A, 0x35, 0x91, 0x00, 0x12, 0x25, 0x89, 0x41]

    def junk_pdu(ini: RawInitiator, itts: list[int]) -> bytes:
        bhs = bytearray(rng.randbytes(48))
        bhs[0] = rng.choice(ops) | rng.choice((0, 0x40))
        ahs = b""
        if rng.random() < 0.1:
            ahs = rng.randbytes(4 * rng.randint(1, 3))
        bhs[4] = len(ahs) // 4
        data = rng.randbytes(rng.choice((0, 0, 1, 7, 512, 4096, 9000)))
        bhs[5:8] = len(data).to_bytes(3, "big")
        if rng.random() < 0.7:  # mostly plausible tags and numbers
            itt = rng.choice(itts) if itts and rng.random() < 0.5 else ini.next_itt()
            itts.append(itt)
            bhs[16:20] = itt.to_bytes(4, "big")
            bhs[24:28] = ini.next_cmdsn().to_bytes(4, "big")
            bhs[8:16] = bytes(8)
            bhs[20:24] = rng.choice((0, 512, 4096, 65536, 1 << 20)).to_bytes(4, "big")
            bhs[40:44] = rng.choice((0, 512, 4096, 70000)).to_bytes(4, "big")
        if bhs[0] & 0x3F == 0x01:  # commands that change no state beyond the test's reach
            bhs[32] = rng.choice(cdbs)
        if bhs[0] & 0x3F == 0x02:  # no TARGET COLD RESET: it ends every session, rightly
            bhs[1] = 0x80 | rng.choice((1, 2, 3, 4, 5, 6, 8, 0x55))
        return bytes(bhs) + ahs + data + bytes(p.pad4(len(data)))

    async def scenario() -> None:
        healthy = await session(vol)
        for _ in range(4):
            rude = await RawInitiator.connect(vol.iscsi_port)
            await rude.login(target=IQN, isid=next(ISIDS), MaxRecvDataSegmentLength="8192")
            itts: list[int] = []
            try:
                for _ in range(150):
                    await rude.send_raw(junk_pdu(rude, itts))
            except ConnectionError:
                pass  # e.g. a logout that closed the session
            rude.close()
            for _ in range(50):  # resets the junk asked for: aborted tasks, unit attentions
                r = await healthy.command(read10(0, 8), read=4096)
                ua = r.status == CHECK_CONDITION and sense_code(r)[0] == 0x06
                if not ua and r.status != TASK_ABORTED:
                    break
                await asyncio.sleep(0.02)
            assert r.status == 0, r
        healthy.close()

    run(scenario())


def test_abort_task_waits_for_data_then_held_cmdsn(vol: Cluster) -> None:
    async def scenario() -> None:
        ini = await session(vol, InitialR2T="Yes", ImmediateData="No")

        async def abort(rtt: int, refcmdsn: int, others: list[p.Pdu] | None = None) -> int:
            """The TMF's response; what else arrives meanwhile goes to `others`."""
            tmf = p.TaskManagementRequest(
                immediate=True, function=p.TmfFunction.ABORT_TASK, itt=ini.next_itt(),
                cmdsn=ini.cmdsn, rtt=rtt, refcmdsn=refcmdsn,
            )  # fmt: skip
            await ini.send(tmf)
            while not isinstance(rsp := await ini.recv(), p.TaskManagementResponse):
                assert others is not None, rsp
                others.append(rsp)
            assert rsp.itt == tmf.itt, rsp
            return rsp.response

        # a write waiting for its R2T'd data is aborted at once, and answers nothing
        cmd = await ini.start(write10(0, 8), data=bytes(4096))
        assert isinstance(await ini.recv(), p.R2T)
        assert await abort(cmd.itt, cmd.cmdsn) == p.TmfResponse.COMPLETE
        await ini.nothing()
        # a task that does not exist, and a CmdSN the target has not seen yet
        assert await abort(0x7777, 5) == p.TmfResponse.NO_TASK
        ini.cmdsn += 1  # skip one CmdSN: the next command waits for the gap
        gap = ini.cmdsn - 1
        late = await ini.start(read10(0, 1), read=512)
        await ini.nothing()
        # filling the gap releases the held read: its data may come before the TMF's answer
        early: list[p.Pdu] = []
        assert await abort(0x8888, gap, early) == p.TmfResponse.COMPLETE
        if not any(isinstance(x, p.DataIn) and x.has_status for x in early):
            assert (await ini.finish(late)).status == 0
        else:
            assert early[-1].itt == late.itt and early[-1].status == 0
        assert (await ini.command(read10(0, 1), read=512)).status == 0
        ini.close()

    run(scenario())


def test_idle_initiator_is_probed_with_nop_in(vol: Cluster) -> None:
    """The target's keepalive (5 s of silence): a NOP-In that wants an answer."""

    async def scenario() -> None:
        ini = await session(vol)
        ping = await ini.recv(timeout=10)
        assert isinstance(ping, p.NopIn) and ping.itt == p.RESERVED_TAG, ping
        assert ping.ttt != p.RESERVED_TAG
        await ini.send(p.NopOut(immediate=True, ttt=ping.ttt, cmdsn=ini.cmdsn))
        assert (await ini.command(read10(0, 1), read=512)).status == 0
        ini.close()

    run(scenario())


def test_text_logout_and_reinstatement(vol: Cluster) -> None:
    async def scenario() -> None:
        isid = next(ISIDS)
        first = await RawInitiator.connect(vol.iscsi_port)
        assert (await first.login(target=IQN, isid=isid)).status_class == 0
        # SendTargets inside a normal session
        text = p.TextRequest(itt=first.next_itt(), cmdsn=first.next_cmdsn(), final=True,
                             data=f"SendTargets={IQN}\0".encode())  # fmt: skip
        await first.send(text)
        rsp = await first.recv()
        assert isinstance(rsp, p.TextResponse) and IQN.encode() in rsp.data
        # the same initiator and ISID again: the old connection goes
        second = await RawInitiator.connect(vol.iscsi_port)
        assert (await second.login(target=IQN, isid=isid)).status_class == 0
        assert await first.closed()
        await second.command(TUR)
        assert (await second.command(read10(0, 1), read=512)).status == 0
        out = p.LogoutRequest(itt=second.next_itt(), cmdsn=second.next_cmdsn(), reason=0)
        await second.send(out)
        rsp = await second.recv()
        assert isinstance(rsp, p.LogoutResponse) and rsp.response == 0
        assert await second.closed()

    run(scenario())
