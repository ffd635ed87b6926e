"""Benchmark the replica data path of both engines over the replica protocol itself.

    .venv/bin/python -m native.bench_replica [--seconds 5] [--qd 32] [--span 256M] [--rounds 2]

Starts one replica process per engine (python, native) on a scratch directory, fills the
span with data (so reads touch the page cache, not holes), then runs pipelined 4 KiB
random reads and writes at the given queue depth from a small C client (no Python per
request on the client side: native/bench_client.c), alternating the engines round by round.
Reports IOPS, mean latency and the replica process's CPU time per request (user + system
of all its threads, io_uring workers included, from /proc/PID/stat).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from native import ffi, lib

HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime (all threads)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


class Replica:
    def __init__(self, directory: Path, engine: str, span: int) -> None:
        self.engine = engine
        self.port, api = _free_port(), _free_port()
        self.log = open(directory / f"{engine}.log", "wb")  # noqa: SIM115
        args = ["replica", "serve", "--dir", str(directory / engine), "--size", str(span)]
        args += ["--listen", f"{HOST}:{self.port}", "--api", f"{HOST}:{api}", "--engine", engine]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "maya", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{engine} replica exited: see {self.log.name}")
            time.sleep(0.05)
        raise TimeoutError(f"{engine} replica did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def _fill(port: int, span: int, bs: int) -> None:
    """Write the whole span in bs-sized requests (qd 16)."""
    from replica.client import ReplicaClient

    c = ReplicaClient(f"{HOST}:{port}", timeout=60)
    await c.connect()
    await c.open(1)
    chunk = os.urandom(bs)
    offsets = list(range(0, span, bs))
    for i in range(0, len(offsets), 16):
        await asyncio.gather(*(c.write(off, chunk) for off in offsets[i : i + 16]))
    await c.flush()
    c.close()


def _run(port: int, write: bool, bs: int, qd: int, seconds: float, span: int, jobs: int) -> Any:
    """`jobs` client connections (threads; the C client releases the GIL), qd each."""
    results: list[Any] = [None] * jobs

    def one(i: int) -> None:
        res = ffi.new("struct tandem_bench_result *")
        rc = lib.tandem_bench_run(
            HOST.encode(), port, int(write), bs, qd, seconds, span, 1, 12345 + i, res
        )
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        results[i] = (res.ops, res.errors, res.seconds, res.lat_us_sum)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    secs = max(r[2] for r in results)
    lat = sum(r[3] for r in results) / max(ops, 1)
    return ops, errors, secs, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--bs", default="4K")
    ap.add_argument("--jobs", type=int, default=1, help="client connections")
    ap.add_argument("--span", default="256M")
    ap.add_argument(
        "--fill-bs",
        default="1M",
        help="request size that fills the span first: the page cache keeps folios of about "
        "that size, and 4 KiB writes into large folios cost several times more in ext4",
    )
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the engines")
    ap.add_argument("--engines", default="python,native")
    ap.add_argument("--dir", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    span, bs, fill_bs = _size(args.span), _size(args.bs), _size(args.fill_bs)
    engines = args.engines.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        replicas = {e: Replica(Path(tmp), e, span) for e in engines}
        try:
            for r in replicas.values():
                asyncio.run(_fill(r.port, span, fill_bs))
            for rnd in range(args.rounds):
                for workload in ("randread", "randwrite"):
                    for e in engines:  # A B A B: drift hits both alike
                        r = replicas[e]
                        cpu0 = _cpu_seconds(r.proc.pid)
                        ops, errors, secs, lat = _run(
                            r.port,
                            workload == "randwrite",
                            bs,
                            args.qd,
                            args.seconds,
                            span,
                            args.jobs,
                        )
                        cpu = _cpu_seconds(r.proc.pid) - cpu0
                        rows.append(
                            {
                                "round": rnd,
                                "engine": e,
                                "workload": workload,
                                "iops": ops / secs,
                                "lat_us": lat,
                                "cpu_us_per_op": cpu * 1e6 / max(ops, 1),
                                "errors": errors,
                            }
                        )
                        row = rows[-1]
                        print(
                            f"round {rnd} {workload:9} {e:6} {row['iops']:9.0f} IOPS "
                            f"lat {lat:7.1f} us  server CPU {row['cpu_us_per_op']:6.2f} us/op"
                            + (f"  ERRORS {errors}" if errors else ""),
                            flush=True,
                        )
        finally:
            for r in replicas.values():
                r.stop()
    print(
        f"\n{args.bs} at qd{args.qd} x {args.jobs} connection(s), span {args.span} filled in "
        f"{args.fill_bs} writes, best of {args.rounds} rounds:"
    )
    print(f"{'workload':10} {'engine':7} {'IOPS':>9} {'lat us':>8} {'CPU us/op':>10}")
    for workload in ("randread", "randwrite"):
        for e in engines:
            mine = [r for r in rows if r["engine"] == e and r["workload"] == workload]
            best = max(mine, key=lambda r: r["iops"])
            print(
                f"{workload:10} {e:7} {best['iops']:9.0f} {best['lat_us']:8.1f} "
                f"{min(r['cpu_us_per_op'] for r in mine):10.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
