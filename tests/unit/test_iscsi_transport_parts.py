"""Sans-IO parts of the full feature phase: the CmdSN window, Data-Out collection and
Data-In splitting, and SendTargets."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from target.frontends.iscsi import transfer as tr
from target.frontends.iscsi.cmdsn import MASK, CommandWindow, sn_lt
from target.frontends.iscsi.config import TargetConfig
from target.frontends.iscsi.discovery import portal_address, send_targets
from target.frontends.iscsi.negotiation import Params
from target.frontends.iscsi.pdu import RESERVED_TAG, DataOut
from tests.unit.test_iscsi_fake_scsi import FakeScsiTarget

# ---------------------------------------------------------------------------- CmdSN window


def test_window_in_order_delivery_and_closing() -> None:
    w: CommandWindow[str] = CommandWindow(10, depth=3)
    assert (w.expcmdsn, w.maxcmdsn) == (10, 12)
    assert w.receive(10, "a") == ["a"]
    assert w.receive(11, "b") == ["b"]
    assert w.receive(12, "c") == ["c"]
    assert (w.expcmdsn, w.maxcmdsn) == (13, 12)  # closed: all three running
    assert w.receive(13, "d") is None  # beyond MaxCmdSN: dropped
    w.complete()
    assert w.maxcmdsn == 13 and w.receive(13, "d") == ["d"]


def test_window_holds_early_commands_and_drops_duplicates() -> None:
    w: CommandWindow[str] = CommandWindow(0, depth=8)
    assert w.receive(2, "c") == []
    assert w.receive(1, "b") == []
    assert w.receive(2, "c again") is None  # duplicate of a held one
    assert w.receive(0, "a") == ["a", "b", "c"]
    assert w.receive(1, "old") is None  # below ExpCmdSN
    assert w.maxcmdsn == 3 - 1 + 8 - 3


def test_window_wraps_around() -> None:
    w: CommandWindow[int] = CommandWindow(MASK - 1, depth=4)
    assert w.receive(MASK - 1, 1) == [1]
    assert w.receive(MASK, 2) == [2]
    assert w.receive(0, 3) == [3]
    assert w.expcmdsn == 1 and w.maxcmdsn == 1
    assert sn_lt(MASK, 0) and not sn_lt(0, MASK)


def test_abort_of_a_command_not_yet_arrived() -> None:
    w: CommandWindow[str] = CommandWindow(5, depth=8)
    assert w.receive(7, "c") == []
    removed, ready = w.abort_pending(6)  # counts as received and aborted
    assert (removed, ready) == (None, [])
    removed, ready = w.abort_pending(5)
    assert ready == ["c"] and w.expcmdsn == 8 and w.running == 1
    assert w.receive(6, "late b") is None
    assert w.abort_pending(100) == (None, [])  # outside the window
    w.receive(9, "e")
    assert w.abort_pending(9) == ("e", [])  # a held command is taken out


# ---------------------------------------------------------------------------- Data-Out


def params(**kw: object) -> Params:
    base = {
        "first_burst_length": 2048,
        "max_burst_length": 4096,
        "max_outstanding_r2t": 2,
        "initial_r2t": False,
        "immediate_data": True,
    }
    return Params(**{**base, **kw})  # type: ignore[arg-type]


def ttts() -> Callable[[], int]:
    counter = iter(range(100, 1000))
    return lambda: next(counter)


def out(ttt: int, datasn: int, offset: int, data: bytes, final: bool = False) -> DataOut:
    return DataOut(itt=1, ttt=ttt, datasn=datasn, offset=offset, data=data, final=final)


def test_immediate_unsolicited_and_solicited_data() -> None:
    payload = bytes(range(256)) * 48  # 12 KiB
    x = tr.WriteTransfer(len(payload), payload[:512], True, params())
    new_ttt = ttts()
    assert not x.complete and x.r2ts(new_ttt) == []  # unsolicited burst first
    assert not x.data_out(out(RESERVED_TAG, 0, 512, payload[512:1024]))
    assert x.data_out(out(RESERVED_TAG, 1, 1024, payload[1024:2048], final=True))
    r2ts = x.r2ts(new_ttt)
    assert [(r.r2tsn, r.offset, r.length) for r in r2ts] == [(0, 2048, 4096), (1, 6144, 4096)]
    assert x.r2ts(new_ttt) == []  # MaxOutstandingR2T reached
    a, b = r2ts
    assert x.data_out(out(b.ttt, 0, 6144, payload[6144:10240], final=True))
    (c,) = x.r2ts(new_ttt)
    assert (c.r2tsn, c.offset, c.length) == (2, 10240, 2048)
    x.data_out(out(a.ttt, 0, 2048, payload[2048:4096]))
    x.data_out(out(a.ttt, 1, 4096, payload[4096:6144], final=True))
    assert not x.complete
    x.data_out(out(c.ttt, 0, 10240, payload[10240:], final=True))
    assert x.complete and x.error is None and x.data() == payload


def test_initial_r2t_and_no_immediate_data() -> None:
    x = tr.WriteTransfer(1000, b"", False, params(initial_r2t=True, immediate_data=False))
    (r,) = x.r2ts(ttts())
    assert (r.offset, r.length) == (0, 1000)
    assert x.data_out(out(r.ttt, 0, 0, b"k" * 1000, final=True))
    assert x.complete and x.data() == b"k" * 1000


@pytest.mark.parametrize(
    ("pdu", "sense"),
    [
        (out(RESERVED_TAG, 1, 0, b"a" * 100, final=True), tr.DATA_PHASE_ERROR),  # DataSN
        (out(RESERVED_TAG, 0, 8, b"a" * 100, final=True), tr.DATA_OFFSET_ERROR),
        (out(RESERVED_TAG, 0, 0, b"a" * 3000, final=True), tr.TOO_MUCH_WRITE_DATA),
        (out(12345, 0, 0, b"a", final=True), tr.INVALID_TRANSFER_TAG),
    ],
)
def test_broken_data_out_fails_the_command(pdu: DataOut, sense: tuple[int, int, int]) -> None:
    x = tr.WriteTransfer(4000, b"", True, params())
    assert x.data_out(pdu)
    assert x.error == sense
    if pdu.ttt == RESERVED_TAG:
        assert x.complete and x.r2ts(ttts()) == []  # nothing more is asked for
    tr.fixed_sense(*sense)


def test_bad_digest_and_unsolicited_data_nobody_allowed() -> None:
    x = tr.WriteTransfer(100, b"", True, params())
    x.data_out(out(RESERVED_TAG, 0, 0, b"a" * 100, final=True), digest_ok=False)
    assert x.complete and x.error == tr.PROTOCOL_CRC_ERROR
    y = tr.WriteTransfer(100, b"", False, params(initial_r2t=True))
    assert y.data_out(out(RESERVED_TAG, 0, 0, b"a"))
    assert y.error == tr.TOO_MUCH_WRITE_DATA
    z = tr.WriteTransfer(100, b"b" * 200, False, params())  # more immediate data than EDTL
    assert z.error == tr.TOO_MUCH_WRITE_DATA and z.complete


def test_short_burst_waits_for_final_then_fails() -> None:
    x = tr.WriteTransfer(1000, b"", False, params(initial_r2t=True))
    (r,) = x.r2ts(ttts())
    assert x.data_out(out(r.ttt, 0, 0, b"a" * 10, final=True))
    assert x.complete and x.error == tr.DATA_PHASE_ERROR


def test_data_in_split_by_segment_and_burst() -> None:
    data = memoryview(bytes(range(256)) * 40)  # 10240 bytes
    pdus = tr.data_in(data, itt=7, lun=bytes(8), max_segment=3000, max_burst=4096)
    assert [(p.offset, len(p.data), p.final, p.datasn) for p in pdus] == [
        (0, 3000, False, 0),
        (3000, 1096, True, 1),
        (4096, 3000, False, 2),
        (7096, 1096, True, 3),
        (8192, 2048, True, 4),
    ]
    assert b"".join(bytes(p.data) for p in pdus) == data.tobytes()


# ---------------------------------------------------------------------------- discovery


def test_portal_addresses() -> None:
    assert portal_address("10.0.0.1", 3260, 1) == "10.0.0.1:3260,1"
    assert portal_address("::1", 3260, 2) == "[::1]:3260,2"
    assert portal_address("::ffff:10.0.0.1", 3261, 1) == "10.0.0.1:3261,1"
    assert portal_address("storage.example", 3260, 1) == "storage.example:3260,1"


def test_send_targets() -> None:
    scsi = FakeScsiTarget(size=4096)
    a = TargetConfig("iqn.2026-11.io.tandem:a", scsi)
    b = TargetConfig("iqn.2026-11.io.tandem:b", scsi, allowed_initiators=["iqn.other"])
    addr = "127.0.0.1:3260,1"
    every = send_targets("All", [a, b], "iqn.me", addr, discovery=True)
    assert every == [("TargetName", a.iqn), ("TargetAddress", addr)]  # b is not for us
    assert len(send_targets("All", [a, b], "iqn.other", addr, discovery=True)) == 4
    assert send_targets(a.iqn.upper(), [a, b], "iqn.me", addr, discovery=True) == every
    assert send_targets(b.iqn, [a, b], "iqn.me", addr, discovery=True) == []
    assert send_targets("All", [a], "iqn.me", addr, discovery=False, session_target=a) == [
        ("SendTargets", "Reject")
    ]
    assert send_targets("", [a, b], "iqn.me", addr, discovery=False, session_target=a) == every


def test_oversize_write_is_refused_before_allocation() -> None:
    x = tr.WriteTransfer(1 << 40, b"", True, params(), max_length=1 << 20)
    assert x.error == tr.INVALID_FIELD_IN_IU and len(x.buffer) == 0
    assert not x.complete  # the unsolicited burst is still owed
    x.data_out(out(RESERVED_TAG, 0, 0, b"a" * 100, final=True))
    assert x.complete and x.r2ts(ttts()) == []
