"""Rebuild benchmark: how fast a replica is rebuilt, against a plain sparse copy.

A 3-replica volume (default 1 GiB) is filled half full (every other MiB). Then:
  copy         `cp --sparse=always` of a replica's layer file on the same disk (the yardstick)
  full         a replica's directory is wiped and it returns empty: a full rebuild
  incremental  a replica is killed, 1% of the fill's number of 4 KiB writes happen while it
               is away, it returns: it catches up on what it missed
Goals (issue 5): full rebuild at least half the speed of the sparse copy; the incremental
catch-up in at most 5% of the full rebuild's time.

    .venv/bin/python -m perf.rebuild [--size 1G] [--engine native|python]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from perf.servers import HOST, TANDEM, Child, free_port

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"


def api_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Volume:
    def __init__(self, base: Path, size: int, engine: list[str]) -> None:
        self.base, self.size, self.engine = base, size, engine
        self.ports = [(free_port(), free_port()) for _ in range(3)]
        self.replicas: list[Child | None] = [None, None, None]
        self.target: Child | None = None
        self.nbd, self.api = free_port(), free_port()

    def start_replica(self, i: int) -> None:
        data, api = self.ports[i]
        argv = [
            *TANDEM,
            "replica",
            "serve",
            "--dir",
            str(self.base / f"r{i}"),
            "--size",
            str(self.size),
            "--volume",
            "bench",
            "--listen",
            f"{HOST}:{data}",
            "--api",
            f"{HOST}:{api}",
            *self.engine,
        ]
        self.replicas[i] = Child(f"replica-{i}", argv, self.base).start()
        self.replicas[i].wait_listening(data)  # type: ignore[union-attr]

    def start(self) -> None:
        for i in range(3):
            self.start_replica(i)
        argv = [
            *TANDEM,
            "target",
            "serve",
            "--volume",
            "bench",
            "--size",
            str(self.size),
            "--nbd",
            f"{HOST}:{self.nbd}",
            "--api",
            f"{HOST}:{self.api}",
            *self.engine,
        ]
        for d, _ in self.ports:
            argv += ["--replica", f"{HOST}:{d}"]
        self.target = Child("target", argv, self.base).start()
        self.target.wait_listening(self.nbd)

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.nbd}/bench"

    def status(self) -> dict[str, Any]:
        return api_json(f"http://{HOST}:{self.api}/v1/volume")

    def wait_rebuilt(self, i: int, rebuilds: int, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.status()["replicas"][i]
            if r["mode"] == "RW" and r["rebuilds"] >= rebuilds:
                return r["last_rebuild"]
            time.sleep(0.05)
        raise TimeoutError(f"replica {i} not rebuilt after {timeout}s: {self.status()}")

    def stop(self) -> None:
        for c in [self.target, *self.replicas]:
            if c is not None:
                c.stop()


def fill_half(v: Volume, work: Path) -> int:
    """Random data in every other MiB; returns the bytes of data written."""
    src = work / "fill.img"
    with open(src, "wb") as f:
        f.truncate(v.size)
        for off in range(0, v.size, 2 * MiB):
            f.seek(off)
            f.write(os.urandom(MiB))
    subprocess.run(["nbdcopy", str(src), v.uri], check=True, timeout=600)
    src.unlink()
    return v.size // 2


def drop_caches() -> bool:
    """Start from a cold page cache, as a rebuild after a node loss does (root only)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sparse_copy_seconds(v: Volume, work: Path) -> float:
    info = api_json(f"http://{HOST}:{v.ports[0][1]}/v1/replica")
    layer = v.base / "r0" / info["chain"][-1]
    dst = work / "copy.img"
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["cp", "--sparse=always", str(layer), str(dst)], check=True)
    seconds = time.monotonic() - t0
    dst.unlink()
    return seconds


def random_writes(v: Volume, count: int) -> None:
    subprocess.run(
        [
            "fio",
            "--name=miss",
            "--ioengine=nbd",
            f"--uri={v.uri}",
            "--rw=randwrite",
            "--bs=4k",
            f"--number_ios={count}",
            f"--size={v.size}",
            "--iodepth=16",
            "--output=/dev/null",
        ],
        check=True,
        timeout=600,
    )


def main() -> int:
    p = argparse.ArgumentParser(prog="perf.rebuild", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1G", help="volume size (default 1G)")
    p.add_argument("--engine", choices=["native", "python"], help="engine for all processes")
    args = p.parse_args()
    from replica.sizes import parse_size

    size = parse_size(args.size)
    engine = ["--engine", args.engine] if args.engine else []
    work = Path(tempfile.mkdtemp(prefix="tandem-rebuild-", dir="/var/tmp"))
    v = Volume(work, size, engine)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        v.start()
        data = fill_half(v, work)
        copy_s = sparse_copy_seconds(v, work)
        # Full: replica 2 comes back empty.
        assert v.replicas[2] is not None
        v.replicas[2].stop()
        shutil.rmtree(v.base / "r2")
        cold = drop_caches()
        v.start_replica(2)
        full = v.wait_rebuilt(2, rebuilds=1)
        # Incremental: replica 2 misses 1% of the fill's 4 KiB writes.
        v.replicas[2]._signal(signal.SIGKILL)
        v.replicas[2].wait_gone(10)
        misses = data // 4096 // 100
        random_writes(v, misses)
        v.start_replica(2)
        inc = v.wait_rebuilt(2, rebuilds=2)
    finally:
        v.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    copy_rate = data / copy_s
    full_rate = data / full["seconds"]
    result = {
        "size": size,
        "data_bytes": data,
        "cold_cache": cold,
        "sparse_copy_seconds": round(copy_s, 3),
        "full_rebuild": full,
        "incremental_rebuild": {**inc, "missed_writes": misses},
        "full_vs_copy_speed": round(full_rate / copy_rate, 3),
        "incremental_vs_full_time": round(inc["seconds"] / full["seconds"], 4),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"rebuild-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(
        f"data {data / MiB:.0f} MiB of a {size / MiB:.0f} MiB volume; "
        f"{'cold' if cold else 'warm (not root: caches not dropped)'} page cache"
    )
    print(f"sparse copy          {copy_s:7.3f} s  {copy_rate / MiB:8.1f} MiB/s")
    print(
        f"full rebuild         {full['seconds']:7.3f} s  {full_rate / MiB:8.1f} MiB/s  "
        f"= {result['full_vs_copy_speed']:.2f}x the copy's speed (goal >= 0.5)"
    )
    print(
        f"incremental ({misses} missed 4k writes) {inc['seconds']:7.3f} s "
        f"= {100 * result['incremental_vs_full_time']:.1f}% of the full rebuild (goal <= 5%)"
    )
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
