"""Writes the seed corpora of the engine's fuzz harnesses (native/fuzz/README.md):
native/fuzz/corpus/replica/*.bin (replica protocol streams, encoded with replica/protocol.py),
native/fuzz/corpus/nbd/*.bin (2 bytes of harness options, then NBD transmission-phase
requests) and native/fuzz/corpus/iscsi/*.bin (24 bytes of negotiated parameters, then
full-feature-phase PDUs encoded with target/frontends/iscsi/pdu.py). The files are checked
in; run this again after changing it:

    python3 native/fuzz/gen_corpus.py
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from replica import protocol as rp  # noqa: E402
from replica.protocol import Op  # noqa: E402
from target.frontends.iscsi import pdu as ip  # noqa: E402

SIZE = 2 << 20  # FZ_STORE_SIZE in fuzz_common.h
BLOCK = 4096


# --- the replica protocol -----------------------------------------------------------------


def req(op: int, tag: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""):
    return rp.encode_request(op, tag, offset, length, flags, payload)


def open_(tag: int, epoch: int = 1) -> bytes:
    return rp.encode_json_request(Op.OPEN, tag, {"epoch": epoch})


def write(tag: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return req(Op.WRITE, tag, offset, len(data), flags, data)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


REPLICA = {
    "ping": req(Op.PING, 1, payload=b"hello") + req(Op.PING, 2),
    "reads": b"".join(
        [
            req(Op.READ, 1, 0, 2 * BLOCK),
            req(Op.READ, 2, 60 * BLOCK, 250 * BLOCK),  # snapshot 0, snapshot 1, head, holes
            req(Op.READ, 3, 1000, 5000),  # unaligned
            req(Op.READ, 4, SIZE - BLOCK, BLOCK),
            req(Op.READ, 5, 0, 0),
            req(Op.CHECKSUM, 6, 0, SIZE),
            req(Op.BLOCK_STATUS, 7, 0, SIZE),
            req(Op.BLOCK_STATUS, 8, 190 * BLOCK + 17, 20 * BLOCK),
        ]
    ),
    "write_flush": b"".join(
        [
            open_(1),
            write(2, 8 * BLOCK, pattern(BLOCK, 1)),
            write(3, 4000, pattern(100, 2), rp.FLAG_FUA),  # read-modify-write of two blocks
            write(4, 256 * BLOCK - 10, pattern(BLOCK + 20, 3)),  # over base and head
            req(Op.FLUSH, 5),
            req(Op.READ, 6, 0, 16 * BLOCK),
            req(Op.CHECKSUM, 7, 4000, 100),
        ]
    ),
    "unmap_zeroes": b"".join(
        [
            open_(1),
            req(Op.UNMAP, 2, 0, 4 * BLOCK),  # snapshot blocks: zeros written
            req(Op.UNMAP, 3, 100, 9000),  # partial edges
            req(Op.WRITE_ZEROES, 4, 210 * BLOCK, 20 * BLOCK),  # head only: punched
            req(Op.WRITE_ZEROES, 5, 230 * BLOCK, 5 * BLOCK, rp.FLAG_NO_HOLE),
            req(Op.WRITE_ZEROES, 6, 299 * BLOCK + 5, 3 * BLOCK),
            req(Op.FLUSH, 7, flags=rp.FLAG_FUA),
            req(Op.BLOCK_STATUS, 8, 0, SIZE),
        ]
    ),
    "overlapping": b"".join(
        [open_(1)]
        + [
            write(10 + i, (i % 5) * 700, pattern(1200, i)) + req(Op.READ, 100 + i, 0, 3 * BLOCK)
            for i in range(10)
        ]
        + [req(Op.FLUSH, 200), req(Op.UNMAP, 201, 0, BLOCK), req(Op.READ, 202, 0, BLOCK)]
    ),
    "refusals": b"".join(
        [
            write(1, 0, pattern(10, 1)),  # not opened: EPERM
            req(Op.READ, 2, SIZE - 10, 20),  # beyond the size
            req(Op.READ, 3, 0, 10, flags=0x80),  # unknown flags
            req(Op.WRITE, 4, 0, 20, payload=b"short"),  # length != payload
            req(Op.CHECKSUM, 5, 2**64 - 1, 2),  # offset overflow
            open_(6, 0),  # older epoch: refused
            open_(7, 5),  # a newer epoch than the store's: writes are stale
            write(8, 0, pattern(10, 2)),
            req(Op.FLUSH, 9),
        ]
    ),
    "control": b"".join(
        [
            req(Op.INFO, 1),
            req(Op.ATTRS, 2),
            open_(3),
            req(Op.READ, 4, 0, BLOCK),
            rp.encode_json_request(Op.SET_ATTRS, 5, {"k": "v"}),
            rp.encode_json_request(Op.SNAPSHOT, 6, {"name": "s"}),  # runs paused
            write(7, 0, pattern(BLOCK, 7)),
            req(Op.CLOSE, 8),  # paused, clears the epoch
            write(9, 0, pattern(10, 9)),  # EPERM now
            req(99, 10, payload=b"?"),  # unknown op: up to Python
            rp.encode_json_request(Op.RESIZE, 11, {"size": SIZE}),
        ]
    ),
    "readv": b"".join(
        [
            open_(1),
            write(2, 5 * BLOCK, pattern(2 * BLOCK, 3)),
            req(
                Op.READV,
                3,
                0,
                3 * BLOCK + 10,
                payload=rp.encode_ranges(
                    [(5 * BLOCK, BLOCK), (0, BLOCK), (6 * BLOCK - 5, 10), (5 * BLOCK, BLOCK)]
                ),
            ),
            write(4, 5 * BLOCK, pattern(100, 4)),  # waits for the READV's span
            req(Op.READV, 5, 0, 1, payload=rp.READV_ENTRY.pack(0, 1, 9)),  # reserved bits
            req(Op.READV, 6, 0, 10, payload=rp.encode_ranges([(SIZE - 5, 10)])),  # beyond
            req(Op.READV, 7, 0, 2, payload=rp.encode_ranges([(0, 1)])),  # length != sum
            req(Op.READV, 8, 0, 0),  # no entries
        ]
    ),
    # Shared memory: the harness's peer is itself and its fd 3 is no sealed memfd, so SHARE
    # is refused, and requests that would use shared memory are refused too.
    "shared_memory": b"".join(
        [
            open_(1),
            req(Op.SHARE, 2, 0, 1 << 20, payload=struct.pack("<I", 3)),
            req(Op.WRITE, 3, 0, BLOCK, flags=rp.FLAG_SHM, payload=bytes(8)),
            req(Op.READ, 4, 0, BLOCK, flags=rp.FLAG_SHM, payload=bytes(8)),
            req(Op.FLUSH, 5, flags=rp.FLAG_SHM, payload=bytes(8)),
            req(Op.SHARE, 6, 0, 0, payload=b"\0" * 9),
        ]
    ),
    "bad_magic": req(Op.PING, 1) + b"XXXX" + bytes(28) + req(Op.PING, 2),
    "oversize": req(Op.PING, 1)
    + struct.pack("<IBBHQQII", rp.REQ_MAGIC, Op.WRITE, 0, 0, 2, 0, 0, 2**32 - 1),
    # A payload larger than the receive buffer (received straight into its own buffer),
    # cut off by EOF.
    "big_cut": req(Op.PING, 1)
    + struct.pack("<IBBHQQII", rp.REQ_MAGIC, Op.WRITE, 0, 0, 2, 0, 300000, 300000)
    + pattern(5000, 1),
    "partial_header": req(Op.PING, 1) + req(Op.READ, 2, 0, 10)[:20],
}


# --- NBD ------------------------------------------------------------------------------------

NBD_MAGIC = 0x25609513
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def nbd(
    type_: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
):
    return struct.pack(">IHHQQI", NBD_MAGIC, flags, type_, handle, offset, length) + data


def nwrite(handle: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return nbd(WRITE, handle, offset, len(data), flags, data)


def opts(
    structured: bool = False,
    meta: bool = False,
    readonly: bool = False,
    degraded: bool = False,
    pre: int = 0,
):
    return bytes([structured | meta << 1 | readonly << 2 | degraded << 3, pre])


NBD = {
    "simple": opts()
    + b"".join(
        [
            nbd(READ, 1, 0, BLOCK),
            nwrite(2, 8 * BLOCK, pattern(BLOCK, 1)),
            nwrite(3, 100, pattern(300, 2), FUA),
            nbd(FLUSH, 4),
            nbd(READ, 5, 0, 16 * BLOCK),
            nbd(TRIM, 6, 0, 2 * BLOCK),
            nbd(WRITE_ZEROES, 7, 50 * BLOCK, 3 * BLOCK),
            nbd(CACHE, 8, 0, BLOCK),
            nbd(READ, 9, 0, 0),
            nbd(DISC, 10),
        ]
    ),
    "structured": opts(structured=True, meta=True, pre=28)
    + b"".join(
        [
            nbd(READ, 1, 0, BLOCK, DF),
            nbd(READ, 2, 0, 0),
            nbd(BLOCK_STATUS, 3, 0, SIZE, REQ_ONE),  # up to Python
            nbd(99, 4, 0, 0),  # unknown: up to Python
            nbd(WRITE_ZEROES, 5, 0, BLOCK, FAST_ZERO | NO_HOLE | FUA),
            nbd(TRIM, 6, BLOCK, BLOCK, FUA),
            nwrite(7, SIZE - 512, pattern(512, 3), FUA),
            nbd(FLUSH, 8),
            nbd(READ, 9, SIZE - BLOCK, BLOCK),
        ]
    ),
    "readonly": opts(readonly=True)
    + nwrite(1, 0, pattern(64, 1))
    + nbd(TRIM, 2, 0, BLOCK)
    + nbd(READ, 3, 0, 64),
    "refusals": opts(structured=True)
    + b"".join(
        [
            nbd(READ, 1, 0, 10, 0x40),  # unknown flag
            nbd(FLUSH, 2, 0, 0, NO_HOLE),  # not valid for the command
            nbd(FLUSH, 3, 1, 0),  # flush with an offset
            nbd(READ, 4, 0, 33 << 20),  # beyond the maximum block size
            nbd(READ, 5, SIZE, 1),  # beyond the size
            nbd(WRITE_ZEROES, 6, 2**64 - 1, 2),  # overflow: ENOSPC
            nwrite(7, SIZE - 1, b"ab"),  # beyond the size: ENOSPC
            nbd(WRITE, 8, 0, 40 << 20),  # oversize write: its payload is skipped...
        ]
    )
    + pattern(1000, 4),  # ...and EOF comes first
    "degraded": opts(structured=True, degraded=True)
    + nwrite(1, 0, pattern(64, 1))
    + nbd(WRITE_ZEROES, 2, 0, BLOCK, FAST_ZERO)
    + nbd(READ, 3, 0, 64)
    + nbd(FLUSH, 4),
    "degraded_simple": opts(degraded=True) + nbd(READ, 1, 0, 64) + nbd(TRIM, 2, 0, BLOCK),
    "simple_df": opts() + nbd(READ, 1, 0, 10, DF) + nbd(READ, 2, 0, 10),
    "bad_magic": opts() + nbd(READ, 1, 0, 512) + b"\0" * 28 + nbd(READ, 2, 0, 512),
    "pre_split": opts(structured=True, pre=40)
    + nwrite(1, 0, pattern(100, 5))
    + nbd(READ, 2, 0, 100),
    "pipelined": opts()
    + b"".join(
        nwrite(i, (i % 4) * 1000, pattern(1500, i))
        + nbd(READ, 100 + i, 0, 4 * BLOCK)
        + (nbd(FLUSH, 200 + i) if i % 3 == 0 else b"")
        for i in range(12)
    ),
    "big_cut": opts() + nbd(WRITE, 1, 0, 300000) + pattern(3000, 6),
}


# --- iSCSI ----------------------------------------------------------------------------------

NONE = ip.RESERVED_TAG
LUN1 = bytes([0, 1]) + bytes(6)
RECV_LENGTHS = (8192, 262144, 65536, 4096)  # fuzz_iscsi.c byte 1 bits 4-5
DEPTHS = (128, 1, 2, 3, 8, 32, 256, 512)  # byte 2


def iopts(
    *,
    hd: bool = False,
    dd: bool = False,
    immediate: bool = True,
    initial_r2t: bool = False,
    fast: bool = True,
    degraded: bool = False,
    nop: bool = False,
    defer: bool = False,
    r2ts: int = 1,
    recv: int = 8192,
    depth: int = 128,
    mrdsl: int = 8192,
    mbl: int = 262144,
    fbl: int = 65536,
    cmdsn: int = 1,
    statsn: int = 1,
    pre: int = 0,
    cid: int = 1,
    zeros_kib: int = 0,
) -> bytes:
    """fuzz_iscsi.c's 24 bytes of negotiated parameters."""
    flags = hd | dd << 1 | immediate << 2 | initial_r2t << 3 | fast << 4 | degraded << 5
    flags |= nop << 6 | defer << 7
    b1 = (r2ts - 1) | RECV_LENGTHS.index(recv) << 4
    return (
        bytes([flags, b1, DEPTHS.index(depth)])
        + b"".join(n.to_bytes(3, "big") for n in (mrdsl, mbl, fbl))
        + struct.pack(">IIBHB", cmdsn, statsn, pre, cid, zeros_kib)
    )


def cdb10(op: int, lba: int = 0, blocks: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def cdb16(op: int, lba: int = 0, blocks: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


READ6, READ10, WRITE10, READ16, WRITE16 = 0x08, 0x28, 0x2A, 0x88, 0x8A
SYNC10, SYNC16 = 0x35, 0x91
INQUIRY = bytes([0x12, 0, 0, 0, 36, 0])
TUR = bytes(6)
SECTOR = 512


def cmd(itt: int, cmdsn: int, cdb: bytes, *, rd=False, wr=False, edtl=0, data=b"", **kw):
    return ip.ScsiCommand(
        itt=itt, cmdsn=cmdsn, cdb=cdb, read=rd, write=wr, edtl=edtl, data=data, **kw
    )


def dout(itt: int, offset: int, data: bytes, *, ttt: int = NONE, datasn: int = 0, final=True):
    return ip.DataOut(itt=itt, ttt=ttt, datasn=datasn, offset=offset, data=data, final=final)


def pdus(*items: ip.Pdu | bytes, hd: bool = False, dd: bool = False) -> bytes:
    return b"".join(x if isinstance(x, bytes) else ip.encode_bytes(x, hd, dd) for x in items)


def tmf(itt: int, cmdsn: int, function: int, rtt: int = NONE, refcmdsn: int = 0, **kw):
    return ip.TaskManagementRequest(
        itt=itt, cmdsn=cmdsn, function=function, rtt=rtt, refcmdsn=refcmdsn, **kw
    )


W8 = pattern(8 * SECTOR, 11)
# Hand-made PDUs pdu.py would not encode: a SCSI command (INQUIRY, ITT 4, CmdSN 4) with an
# AHS of an unknown type, an opcode nobody uses, a NOP-Out with an AHS.
UNKNOWN_AHS = (
    bytes([0x01, 0xC0, 0, 0, 1, 0, 0, 0])
    + struct.pack(">8xIIII16s", 4, 36, 4, 0, INQUIRY)
    + bytes([0, 1, 9, 0])
)
UNKNOWN_OPCODE = bytes([0x1F, 0x80]) + bytes(46)
NOP_WITH_AHS = bytes([0x00, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + bytes([0, 0, 0, 7])
NOP_WITH_AHS += bytes(28) + bytes([0, 2, 1, 0])
# SCSI up-call answers are chosen by the ITT's top bits (fuzz_iscsi.c): 0 GOOD, 1 CHECK
# CONDITION, 2 GOOD with overflowing data, 3 CHECK CONDITION with data (TMF/Text/Logout: refuse)
GOOD, CHECK, OVER, ODD = 0, 1 << 24, 2 << 24, 3 << 24

ISCSI = {
    "nop": iopts(mrdsl=1024)
    + pdus(
        ip.NopOut(itt=1, cmdsn=1, data=b"ping"),
        ip.NopOut(itt=2, cmdsn=2, immediate=True),
        ip.NopOut(itt=NONE, ttt=NONE, cmdsn=2, immediate=True),  # wants no answer
        ip.NopOut(itt=3, cmdsn=2, data=pattern(4000, 1)),  # echoed up to the MRDSL, 1024
        ip.NopOut(itt=4, cmdsn=3, data=pattern(9000, 1)),  # above ours (8192): Reject
    ),
    "rw10_immediate": iopts(initial_r2t=False)
    + pdus(
        cmd(1, 1, cdb10(WRITE10, 8, 8), wr=True, edtl=len(W8), data=W8),
        cmd(2, 2, cdb10(READ10, 8, 8), rd=True, edtl=len(W8)),
        cmd(3, 3, cdb10(WRITE10, 100, 1, 0x08), wr=True, edtl=SECTOR, data=W8[:SECTOR]),
        cmd(4, 4, cdb10(SYNC10)),
        cmd(5, 5, bytes([READ6, 0, 0, 0, 4, 0]), rd=True, edtl=4 * SECTOR),
        cmd(6, 6, cdb10(READ10, 4095, 1), rd=True, edtl=100),  # underflow: EDTL < length
    ),
    "rw10_r2t": iopts(immediate=False, initial_r2t=True, r2ts=2, mbl=1024, fbl=1024)
    + pdus(
        cmd(1, 1, cdb10(WRITE10, 0, 8), wr=True, edtl=len(W8)),  # R2Ts TTT 1 and 2 (1 KiB)
        dout(1, 0, W8[:512], ttt=1, final=False),
        dout(1, 512, W8[512:1024], ttt=1, datasn=1),
        dout(1, 1024, W8[1024:2048], ttt=2),
        dout(1, 2048, W8[2048:3072], ttt=3),  # TTT 3: sent once burst 1 closed
        dout(1, 3072, W8[3072:], ttt=4),
        cmd(2, 2, cdb10(READ10, 0, 8), rd=True, edtl=len(W8)),
    ),
    "rw16_unsolicited": iopts(initial_r2t=False, fbl=1024, mbl=4096, mrdsl=1024)
    + pdus(
        cmd(1, 1, cdb16(WRITE16, 16, 8), wr=True, edtl=len(W8), data=W8[:512], final=False),
        dout(1, 512, W8[512:1024]),  # the rest of the unsolicited burst, then R2T TTT 1
        dout(1, 1024, W8[1024:], ttt=1),
        cmd(2, 2, cdb16(READ16, 16, 8), rd=True, edtl=len(W8)),  # Data-In of 1 KiB PDUs
        cmd(3, 3, cdb16(SYNC16, 0, 0)),
        cmd(4, 4, cdb16(READ16, 2**40, 1), rd=True, edtl=SECTOR),  # out of range: up
    ),
    "slow_upcalls": iopts(fast=False)
    + pdus(
        cmd(GOOD | 1, 1, INQUIRY, rd=True, edtl=36),
        cmd(CHECK | 2, 2, TUR),
        cmd(GOOD | 3, 3, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),
        cmd(OVER | 4, 4, cdb10(WRITE10, 0, 1), wr=True, edtl=SECTOR, data=W8[:SECTOR]),
        cmd(ODD | 5, 5, INQUIRY, rd=True, edtl=36),  # slow mode off afterwards
        cmd(GOOD | 6, 6, cdb10(WRITE10, 0, 1), wr=True, edtl=SECTOR, data=W8[:SECTOR]),
        cmd(OVER | 7, 7, bytes([0x1A, 0, 0x3F, 0, 0xFF, 0]), rd=True, edtl=255),
        cmd(GOOD | 8, 8, INQUIRY, rd=True, edtl=36, lun=LUN1),
    ),
    "ahs": iopts()
    + pdus(
        cmd(1, 1, cdb10(READ10, 0, 1) + bytes(6) + b"extended cdb", rd=True, edtl=SECTOR),
        cmd(2, 2, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR, bidi_read_length=SECTOR),
        cmd(3, 3, cdb10(WRITE10, 0, 1), rd=True, wr=True, edtl=SECTOR, bidi_read_length=64),
    )
    + UNKNOWN_AHS,
    "tmf": iopts(immediate=False, initial_r2t=True)
    + pdus(
        cmd(1, 1, cdb10(WRITE10, 0, 8), wr=True, edtl=len(W8)),  # waits for its Data-Out
        cmd(2, 3, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),  # held: CmdSN 2 missing
        tmf(10, 2, 1, rtt=1),  # ABORT TASK of the first: found
        tmf(11, 4, 1, rtt=99, refcmdsn=6),  # not arrived yet: a hole
        cmd(3, 5, cdb10(WRITE10, 0, 1), wr=True, edtl=SECTOR),
        tmf(12, 7, 2),  # ABORT TASK SET
        tmf(13, 8, 5, lun=LUN1),  # LUN RESET of another LUN: NO LUN
        tmf(14, 9, 8),  # TASK REASSIGN
        tmf(CHECK | 15, 10, 6),  # TARGET WARM RESET
        cmd(4, 11, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),
        tmf(16, 12, 7),  # TARGET COLD RESET: the connection closes
        ip.NopOut(itt=5, cmdsn=13),
    ),
    "logout": iopts()
    + pdus(
        ip.LogoutRequest(itt=1, reason=1, cid=7, cmdsn=1),  # another CID: NO CID
        ip.LogoutRequest(itt=2, reason=2, cid=1, cmdsn=2),  # recovery: not supported
        ip.LogoutRequest(itt=3, reason=9, cmdsn=3),  # Reject
        cmd(1, 4, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),
        ip.LogoutRequest(itt=4, reason=0, cmdsn=5),  # closes the session
        cmd(2, 6, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),  # ignored
    ),
    "logout_refused": iopts(defer=True)
    + pdus(
        cmd(1, 1, INQUIRY, rd=True, edtl=36, immediate=True),
        ip.LogoutRequest(itt=ODD | 1, reason=0, cmdsn=1),
    ),
    "text": iopts()
    + pdus(
        ip.TextRequest(itt=1, cmdsn=1, data=b"SendTargets=All\0"),
        ip.TextRequest(itt=OVER | 2, cmdsn=2, data=b"MaxRecvDataSegmentLength=512\0"),
        cmd(1, 3, cdb10(READ10, 0, 8), rd=True, edtl=len(W8)),  # Data-In of 512 bytes now
        ip.TextRequest(itt=ODD | 3, cmdsn=4, data=b"X=Y\0"),  # refused: closes
    ),
    "digests": iopts(hd=True, dd=True, initial_r2t=False, mbl=4096, fbl=4096)
    + pdus(
        ip.NopOut(itt=1, cmdsn=1, data=b"digests"),
        cmd(1, 2, cdb10(WRITE10, 0, 8), wr=True, edtl=len(W8), data=W8[:1000], final=False),
        dout(1, 1000, W8[1000:4096]),
        dout(1, 4096, W8[4096:], ttt=1),
        cmd(2, 3, cdb10(READ10, 0, 8), rd=True, edtl=len(W8)),
        hd=True,
        dd=True,
    ),
    "digest_errors": iopts(hd=True, dd=True, immediate=False, initial_r2t=True)
    + pdus(cmd(1, 1, cdb10(WRITE10, 0, 1), wr=True, edtl=SECTOR), hd=True, dd=True)
    + pdus(dout(1, 0, W8[:SECTOR], ttt=1), hd=True, dd=True)[:-1]
    + b"\xff"  # a bad data digest: Reject, the command fails
    + pdus(ip.NopOut(itt=2, cmdsn=2), hd=True, dd=True)
    + pdus(ip.NopOut(itt=3, cmdsn=3)),  # no header digest: dropped
    "window": iopts(depth=3, cmdsn=0xFFFFFFFE, statsn=0xFFFFFFFF)
    + pdus(
        ip.NopOut(itt=1, cmdsn=0),  # arrives early: held
        ip.NopOut(itt=2, cmdsn=0xFFFFFFFF),
        ip.NopOut(itt=3, cmdsn=0xFFFFFFFE),  # fills the gap: all three run
        ip.NopOut(itt=4, cmdsn=0xFFFFFFFE),  # duplicate: dropped
        ip.NopOut(itt=5, cmdsn=50),  # out of the window: dropped
        cmd(1, 7, INQUIRY, rd=True, edtl=36, immediate=True),
        cmd(2, 1, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),
        cmd(2, 2, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),  # ITT in use: Reject
        cmd(NONE, 3, TUR),  # reserved ITT: Reject
    ),
    "transfer_errors": iopts(initial_r2t=False, immediate=True, fbl=1024, mbl=1024)
    + pdus(
        cmd(1, 1, cdb10(WRITE10, 0, 8), wr=True, edtl=len(W8), data=W8[:2048]),  # > FBL
        cmd(2, 2, cdb10(WRITE10, 0, 2), wr=True, edtl=1024, final=False),
        dout(2, 0, W8[:512], datasn=1),  # wrong DataSN
        dout(2, 512, W8[:512], datasn=1, final=True),
        cmd(3, 3, cdb10(WRITE10, 0, 2), wr=True, edtl=1024, final=False),
        dout(3, 100, W8[:512]),  # wrong offset
        cmd(4, 4, cdb10(WRITE10, 0, 2), wr=True, edtl=1024),
        dout(4, 0, W8[:1024], ttt=77),  # no such TTT
        cmd(5, 5, cdb10(WRITE10, 0, 2), wr=True, edtl=1000, data=W8[:1000]),  # not whole blocks
        cmd(6, 6, cdb10(WRITE10, 0, 1), wr=True, edtl=32 << 20),  # above max_data_transfer
        dout(9, 0, W8[:512]),  # no such task
    ),
    "bad_pdus": iopts()
    + pdus(
        ip.NopOut(itt=1, cmdsn=1),
        ip.Snack(itt=2),
        ip.LoginRequest(itt=3),
        ip.NopIn(itt=4),  # a target's PDU
    )
    + UNKNOWN_OPCODE
    + NOP_WITH_AHS
    + pdus(ip.NopOut(itt=5, cmdsn=2, data=bytes(9000)))[:48]  # beyond our MRDSL: skipped
    + bytes(9000)
    + pdus(ip.NopOut(itt=6, cmdsn=2)),
    "truncated": iopts()
    + pdus(ip.NopOut(itt=1, cmdsn=1))
    + pdus(cmd(2, 2, cdb10(WRITE10, 0, 8), wr=True, edtl=len(W8), data=W8))[:1000],
    "truncated_bhs": iopts() + pdus(cmd(1, 1, INQUIRY, rd=True, edtl=36))[:30],
    "degraded": iopts(degraded=True)
    + pdus(
        cmd(1, 1, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),  # no RW member: fails
        cmd(2, 2, cdb10(WRITE10, 0, 1), wr=True, edtl=SECTOR, data=W8[:SECTOR]),  # up
        cmd(3, 3, cdb10(SYNC10)),
    ),
    "pre": iopts(pre=100)
    + pdus(
        ip.NopOut(itt=1, cmdsn=1, data=b"read by Python"),
        cmd(2, 2, cdb10(WRITE10, 0, 1), wr=True, edtl=SECTOR, data=W8[:SECTOR]),
    ),
    "nop_probe_defer": iopts(nop=True, defer=True, fast=False)
    + pdus(
        cmd(1, 1, INQUIRY, rd=True, edtl=36),
        ip.NopOut(itt=NONE, ttt=1, cmdsn=2, immediate=True),  # answers probe 1
        cmd(2, 2, cdb10(READ10, 0, 1), rd=True, edtl=SECTOR),
        tmf(3, 3, 1, rtt=1),  # ABORT TASK of one up in Python
        tmf(4, 4, 2),
    ),
    # A Data-Out segment above 64 KiB goes straight into its command's buffer; the input's
    # zero tail (fuzz_iscsi.c byte 23) completes it.
    "direct": iopts(immediate=False, initial_r2t=True, recv=262144, zeros_kib=130)
    + pdus(cmd(1, 1, cdb10(WRITE10, 64, 256), wr=True, edtl=256 * SECTOR))
    + pdus(dout(1, 0, bytes(128 << 10), ttt=1))[:4096],
    "direct_digest": iopts(dd=True, initial_r2t=False, recv=262144, fbl=262144, zeros_kib=80)
    + pdus(cmd(1, 1, cdb10(WRITE10, 0, 160), wr=True, edtl=160 * SECTOR, final=False))
    + pdus(dout(1, 0, bytes(80 << 10)), dd=True)[:2000],
}


def main() -> None:
    for name, seeds in (("replica", REPLICA), ("nbd", NBD), ("iscsi", ISCSI)):
        d = HERE / "corpus" / name
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.bin"):
            old.unlink()
        for seed, data in seeds.items():
            (d / f"{seed}.bin").write_bytes(data)
        print(f"{d}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
