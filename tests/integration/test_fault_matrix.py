"""The fault matrix: randomized trials of replica and target faults under a verifying write
workload. After each: every acknowledged write reads back, the volume returns to full
redundancy by itself, and the replicas hold identical data (so none could serve a stale
read). The seed is logged; TANDEM_FAULT_SEED=N reproduces a run, TANDEM_FAULT_TRIALS=N
changes how many trials run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from replica.client import ReplicaClient
from tests.conftest import engine_choice
from tests.procs import HOST, Cluster
from tests.workload import VerifyingWriter

SEED = int(os.environ.get("TANDEM_FAULT_SEED", "20261122"))
TRIALS = int(os.environ.get("TANDEM_FAULT_TRIALS", "50"))
SIZE = 32 << 20
FAULTS = ["kill9", "sigstop", "netcut", "diskfull", "target_kill9", "restart_all"]


def replica_checksums(c: Cluster) -> list[list[int]]:
    """CRC32C per MiB of every replica, read from each replica directly."""

    async def one(port: int) -> list[int]:
        client = ReplicaClient(f"{HOST}:{port}", timeout=30)
        await client.connect()
        try:
            return [await client.checksum(off, 1 << 20) for off in range(0, SIZE, 1 << 20)]
        finally:
            client.close()

    async def run() -> list[list[int]]:
        return list(await asyncio.gather(*(one(d) for d, _ in c.replica_ports)))

    return asyncio.run(run())


def inject(c: Cluster, fault: str, victim: int, rng: random.Random) -> dict[str, Any]:
    """Apply a fault and undo it; returns what happened (for the log)."""
    hold = rng.uniform(0.5, 2.5)
    if fault == "kill9":
        c.replicas[victim].kill9()
        time.sleep(hold)
        c.start_replica(victim)
    elif fault == "sigstop":
        c.replicas[victim].signal(signal.SIGSTOP)
        time.sleep(hold + c.timeout)  # long enough to miss its deadline
        c.replicas[victim].signal(signal.SIGCONT)
    elif fault == "netcut":
        c.proxies[victim].cut()
        time.sleep(hold + c.timeout)
        c.proxies[victim].restore()
    elif fault == "diskfull":
        filler = c.base / f"r{victim}" / "filler"
        with open(filler, "wb") as f:  # take every free byte of the replica's tmpfs
            try:
                while True:
                    f.write(bytes(1 << 20))
                    f.flush()
            except OSError:
                pass
        time.sleep(hold)
        filler.unlink()
    elif fault == "target_kill9":
        assert c.target is not None
        c.target.kill9()
        time.sleep(hold / 4)
        c.start_target()
    elif fault == "restart_all":
        assert c.target is not None
        c.target.kill9()
        for r in c.replicas:
            r.kill9()
        time.sleep(hold / 4)
        for i in range(len(c.replicas)):
            c.start_replica(i)
        c.start_target()
    return {"fault": fault, "victim": victim, "hold": round(hold, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_fault_trial(make_cluster: Any, trial: int, tmp_path: Path) -> None:
    rng = random.Random(SEED * 1000 + trial)
    # The first trials take every fault once on each engine, the rest are random.
    fault = FAULTS[trial // 2] if trial < 2 * len(FAULTS) else rng.choice(FAULTS)
    victim = rng.randrange(3)
    # Both engines (target and replicas) share the trials unless TANDEM_ENGINE picks one.
    engine = ("native", "python")[trial % 2] if engine_choice() == "both" else None
    print(f"fault trial {trial}: seed {SEED} fault {fault} replica {victim} engine {engine}")
    env = {"TANDEM_ENGINE": engine} if engine else None
    c: Cluster = make_cluster(size=SIZE, timeout=1.0, env=env)
    if fault == "netcut":
        c.add_proxy(victim)
    if fault == "diskfull":
        c.mount_tmpfs(victim, SIZE + (6 << 20))
    c.start()
    writer = VerifyingWriter(c.uri, SIZE, seed=rng.randrange(1 << 30)).start()
    try:
        time.sleep(rng.uniform(0.3, 1.0))
        what = inject(c, fault, victim, rng)
        time.sleep(rng.uniform(0.3, 1.0))
    finally:
        writer.stop()
    print(f"  {what}: {writer.acks} acked, {writer.errors} failed, {writer.reconnects} reconnects")
    assert writer.acks > 0
    if fault not in ("target_kill9", "restart_all"):
        assert writer.errors == 0, "a quorum stayed healthy: no write may fail"
    c.wait_modes(["RW", "RW", "RW"], timeout=60)  # full redundancy, by itself
    checked = writer.verify()
    sums = replica_checksums(c)
    assert sums[0] == sums[1] == sums[2], "replicas differ after healing"
    print(f"  verified {checked} blocks; replicas identical; {c.status()['replicas']}")


@pytest.mark.slow
def test_sigstop_for_30_seconds(make_cluster: Any) -> None:
    """The issue's long stall: a replica frozen for 30 s never stalls the volume."""
    c: Cluster = make_cluster(size=SIZE, timeout=2.0).start()
    writer = VerifyingWriter(c.uri, SIZE, seed=SEED).start()
    try:
        time.sleep(0.5)
        c.replicas[1].signal(signal.SIGSTOP)
        acks = writer.acks
        time.sleep(30)
        assert writer.acks - acks > 1000, "writes stalled while a replica was frozen"
        c.replicas[1].signal(signal.SIGCONT)
        time.sleep(0.5)
    finally:
        c.replicas[1].signal(signal.SIGCONT)
        writer.stop()
    assert writer.errors == 0
    c.wait_modes(["RW", "RW", "RW"], timeout=60)
    writer.verify()
    sums = replica_checksums(c)
    assert sums[0] == sums[1] == sums[2]
