"""Differential test of the two target engines over NBD: the same random sequence of
requests (unaligned writes of many sizes, FUA, trims, write-zeroes with and without
NO_HOLE, flushes, reads, block status, requests out of range or unaligned where NBD
forbids them) goes to a python-engine stack and a native-engine stack (target and 3
replicas each); every answer (data or error) must be the same on both and match a model,
and so must the final bytes.

The seed is printed; TANDEM_DIFF_SEED=<n> replays one sequence."""

from __future__ import annotations

import os
import random
from typing import Any

import nbd
import pytest

import native
from tests.procs import Cluster

pytestmark = pytest.mark.skipif(
    native.engine_unavailable() is not None, reason=str(native.engine_unavailable())
)

SIZE = 8 << 20
BLOCK = 4096
STEPS = 400


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_strict_mode(0)  # let bad requests reach the server: its answer is under test
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def run(h: nbd.NBD, op: tuple[Any, ...]) -> Any:
    """One request; its result, or the errno it failed with."""
    kind, *args = op
    try:
        if kind == "read":
            return h.pread(*args)
        if kind == "write":
            data, offset, fua = args
            h.pwrite(data, offset, nbd.CMD_FLAG_FUA if fua else 0)
        elif kind == "trim":
            h.trim(*args)
        elif kind == "zero":
            length, offset, no_hole = args
            h.zero(length, offset, nbd.CMD_FLAG_NO_HOLE if no_hole else 0)
        elif kind == "flush":
            h.flush()
        elif kind == "status":
            length, offset = args
            seen: list[int] = []

            def extent(meta: str, off: int, entries: list[int], err: Any) -> int:
                seen.extend(entries)
                return 0

            h.block_status(length, offset, extent)
            return ("status", len(seen) > 0)
        return "ok"
    except nbd.Error as e:
        return ("error", e.errno)


def random_ops(rng: random.Random) -> list[tuple[Any, ...]]:
    ops: list[tuple[Any, ...]] = []
    for i in range(STEPS):
        r = rng.random()
        length = rng.choice([1, 511, 512, 4095, 4096, 4097, 8192, 65536 + 7, 300_000])
        offset = rng.randrange(0, SIZE - length)
        if rng.random() < 0.5:
            offset -= offset % 512
        if r < 0.35:
            fill = bytes([i % 251 + 1]) * length
            ops.append(("write", fill, offset, rng.random() < 0.2))
        elif r < 0.6:
            ops.append(("read", length, offset))
        elif r < 0.68:
            ops.append(("trim", length, offset))
        elif r < 0.76:
            ops.append(("zero", length, offset, rng.random() < 0.5))
        elif r < 0.82:
            ops.append(("flush",))
        elif r < 0.88:
            ops.append(("status", length, offset))
        elif r < 0.94:  # past the end: EINVAL (or ENOSPC for writes) on both
            bad = SIZE - rng.choice([0, 1, 4096])
            kind = rng.choice(["read", "write", "trim", "zero"])
            if kind == "read":
                ops.append(("read", 8192, bad))
            elif kind == "write":
                ops.append(("write", b"x" * 8192, bad, False))
            elif kind == "trim":
                ops.append(("trim", 8192, bad))
            else:
                ops.append(("zero", 8192, bad, False))
        else:  # a zero-length request
            ops.append((rng.choice(["read", "trim"]), 0, offset))
    return ops


def model_answer(model: bytearray, op: tuple[Any, ...]) -> Any:
    """What a correct target answers (None: not checked against the model)."""
    kind, *args = op
    if kind == "read":
        length, offset = args
        if offset + length > SIZE:
            return None
        return bytes(model[offset : offset + length])
    if kind == "write":
        data, offset, _ = args
        if offset + len(data) > SIZE:
            return None
        model[offset : offset + len(data)] = data
        return "ok"
    if kind in ("trim", "zero"):
        length, offset = args[0], args[1]
        if offset + length > SIZE:
            return None
        model[offset : offset + length] = bytes(length)  # a trimmed range reads as zeros
        return "ok"
    return None


def test_same_requests_same_answers_on_both_engines(make_cluster: Any) -> None:
    seed = int(os.environ.get("TANDEM_DIFF_SEED", random.randrange(1 << 30)))
    print(f"TANDEM_DIFF_SEED={seed}")
    ops = random_ops(random.Random(seed))
    # The native stack reaches two replicas through their unix sockets, in shared memory.
    sockets = {"python": frozenset[int](), "native": frozenset({0, 1})}
    stacks: dict[str, Cluster] = {
        engine: make_cluster(
            size=SIZE, env={"TANDEM_ENGINE": engine}, sockets=sockets[engine]
        ).start()
        for engine in ("python", "native")
    }
    handles = {engine: connect(c.uri) for engine, c in stacks.items()}
    model = bytearray(SIZE)
    try:
        for step, op in enumerate(ops):
            answers = {engine: run(h, op) for engine, h in handles.items()}
            shown = [a for a in op[1:] if not isinstance(a, bytes)]
            what = f"step {step} (seed {seed}): {op[0]} {shown}"
            assert answers["python"] == answers["native"], what
            expected = model_answer(model, op)
            if expected is not None:
                assert answers["native"] == expected, what
        for engine, h in handles.items():
            for offset in range(0, SIZE, 1 << 20):
                assert h.pread(1 << 20, offset) == model[offset : offset + (1 << 20)], engine
        assert stacks["native"].status()["engine_counters"]["members"]["shared"] > 0
    finally:
        for h in handles.values():
            h.shutdown()
