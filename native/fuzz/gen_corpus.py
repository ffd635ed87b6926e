"""Writes the seed corpora of the engine's fuzz harnesses (native/fuzz/README.md):
native/fuzz/corpus/replica/*.bin (replica protocol streams, encoded with replica/protocol.py)
and native/fuzz/corpus/nbd/*.bin (2 bytes of harness options, then NBD transmission-phase
requests). The files are checked in; run this again after changing it:

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


def main() -> None:
    for name, seeds in (("replica", REPLICA), ("nbd", NBD)):
        d = HERE / "corpus" / name
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.bin"):
            old.unlink()
        for seed, data in seeds.items():
            (d / f"{seed}.bin").write_bytes(data)
        print(f"{d}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
