"""fio: the workloads, the binary (rebuilt with libiscsi when needed), one run and its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from perf.servers import Endpoint, cpu_seconds

PERF = Path(__file__).resolve().parent
FIO_LIBISCSI = Path(os.environ.get("FIO", "/opt/fio-libiscsi/bin/fio"))
FIO_DEBIAN = Path("/usr/bin/fio")  # has the nbd engine, not libiscsi


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: int
    iodepth: int


WORKLOADS = (
    Workload("randread-4k-qd1", "randread", 4096, 1),
    Workload("randwrite-4k-qd1", "randwrite", 4096, 1),
    Workload("randread-4k-qd32", "randread", 4096, 32),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32),
    Workload("read-1m-qd8", "read", 1 << 20, 8),
    Workload("write-1m-qd8", "write", 1 << 20, 8),
)


def engines_of(fio: Path) -> set[str]:
    if not fio.exists():
        return set()
    r = subprocess.run([str(fio), "--enghelp"], capture_output=True, text=True, timeout=30)
    return set(r.stdout.split())


def ensure_fio_libiscsi(log: Path) -> tuple[Path | None, str]:
    """The fio with libiscsi (and nbd), built by perf/build-fio-libiscsi.sh when missing.
    Returns (path or None, why not)."""
    if "libiscsi" in engines_of(FIO_LIBISCSI):
        return FIO_LIBISCSI, ""
    if os.geteuid() != 0:
        return None, f"{FIO_LIBISCSI} is missing and building it needs root (apt-get)"
    print(f"building fio with libiscsi into {FIO_LIBISCSI.parent.parent} (about a minute) ...")
    env = {**os.environ, "PREFIX": str(FIO_LIBISCSI.parent.parent)}
    with open(log, "ab") as out:
        r = subprocess.run(
            ["bash", str(PERF / "build-fio-libiscsi.sh")], stdout=out, stderr=out, env=env
        )
    if r.returncode != 0 or "libiscsi" not in engines_of(FIO_LIBISCSI):
        return None, f"building fio with libiscsi failed (rc {r.returncode}), see {log}"
    return FIO_LIBISCSI, ""


def target_args(ep: Endpoint) -> list[str]:
    if ep.protocol == "nbd":
        return ["--ioengine=nbd", f"--uri={ep.url}"]
    # libiscsi takes the URL as a file name, where ':' separates file names unless escaped.
    return ["--ioengine=libiscsi", "--filename=" + ep.url.replace(":", "\\:")]


@dataclass
class Sample:
    """One fio run against one endpoint, with the CPU that the server and fio spent on it."""

    iops: float
    mib_s: float
    lat_mean_us: float
    lat_p99_us: float
    ios: int
    runtime_s: float
    fio_cpu_s: float
    server_cpu_s: float
    # The machine around the run (Machine.since): share of the run's time in which some
    # task waited for the disk, and share of CPU time the hypervisor took. High values mean
    # the disk (writeback of earlier runs, or a server's own syncs) or the host set the pace,
    # not the CPU paths this benchmark compares.
    io_pressure_pct: float = float("nan")
    steal_pct: float = float("nan")

    @property
    def server_us_per_io(self) -> float:
        return self.server_cpu_s * 1e6 / self.ios if self.ios else float("nan")

    @property
    def total_us_per_io(self) -> float:
        return (self.server_cpu_s + self.fio_cpu_s) * 1e6 / self.ios if self.ios else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "server_us_per_io": self.server_us_per_io,
            "total_us_per_io": self.total_us_per_io,
        }


class FioError(RuntimeError):
    pass


@dataclass(frozen=True)
class Machine:
    """A snapshot of machine-wide counters: IO pressure (PSI "some", s), CPU steal and
    all CPU time (clock ticks), and the wall clock."""

    io_some_s: float
    steal: int
    cpu_total: int
    wall: float

    @classmethod
    def now(cls) -> Machine:
        io = float("nan")
        try:  # "some avg10=0.00 avg60=0.00 avg300=0.00 total=N" (us); absent without PSI
            line = Path("/proc/pressure/io").read_text().splitlines()[0]
            io = int(line.rsplit("total=", 1)[1]) / 1e6
        except (OSError, IndexError, ValueError):
            pass
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        return cls(io, ticks[7] if len(ticks) > 7 else 0, sum(ticks[:8]), time.monotonic())

    def since(self, before: Machine) -> tuple[float, float]:
        """(IO pressure %, steal %) between before and this snapshot."""
        wall = self.wall - before.wall
        io = 100 * (self.io_some_s - before.io_some_s) / wall if wall > 0 else float("nan")
        cpu = self.cpu_total - before.cpu_total
        steal = 100 * (self.steal - before.steal) / cpu if cpu > 0 else float("nan")
        return io, steal


def run_fio(fio: Path, args: list[str], out: Path, timeout: float) -> dict:
    # Its own session and --output: libnbd's "connected" chatter goes to stdout, not the JSON.
    argv = [str(fio), "--name=perf", "--output-format=json", f"--output={out}", *args]
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )
    text = out.read_text(errors="replace") if out.exists() else ""
    start = text.find("{")
    # With --output, fio's own error messages land in the file ahead of the JSON.
    parts = (text[:start] if start >= 0 else text, r.stderr, r.stdout)
    said = " ".join(p.strip() for p in parts if p.strip())
    try:
        job = json.loads(text[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise FioError(f"fio failed (rc {r.returncode}): {said[-1500:]}") from e
    if r.returncode != 0 or job.get("error"):
        raise FioError(f"fio rc {r.returncode}, job error {job.get('error')}: {said[-1500:]}")
    return job


def measure(fio: Path, ep: Endpoint, wl: Workload, runtime: float, out: Path) -> Sample:
    """Run wl against ep for runtime seconds, with the server's CPU from /proc around it."""
    args = [
        *target_args(ep),
        f"--rw={wl.rw}",
        f"--bs={wl.bs}",
        f"--iodepth={wl.iodepth}",
        "--direct=1",
        "--time_based",
        f"--runtime={runtime:g}",
        "--norandommap",  # no per-block map: fio's own CPU stays per I/O, not per block
        "--lat_percentiles=1",  # percentiles of total latency (submit to completion)
    ]
    pids = ep.server_pids()
    machine, before = Machine.now(), cpu_seconds(pids)
    job = run_fio(fio, args, out, timeout=runtime + 120)
    server = cpu_seconds(pids) - before
    io_pressure, steal = Machine.now().since(machine)
    dirs = [job[d] for d in ("read", "write") if job[d]["total_ios"]]
    ios = sum(d["total_ios"] for d in dirs)
    if not ios:
        raise FioError(f"fio did no I/O against {ep.name}")
    lat = max(dirs, key=lambda d: d["total_ios"])["lat_ns"]
    runtime_s = job["job_runtime"] / 1000
    return Sample(
        iops=sum(d["iops"] for d in dirs),
        mib_s=sum(d["bw_bytes"] for d in dirs) / (1 << 20),
        lat_mean_us=lat["mean"] / 1000,
        lat_p99_us=lat.get("percentile", {}).get("99.000000", float("nan")) / 1000,
        ios=ios,
        runtime_s=runtime_s,
        # usr_cpu/sys_cpu are percentages of one CPU over the job's runtime.
        fio_cpu_s=(job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime_s,
        server_cpu_s=server,
        io_pressure_pct=io_pressure,
        steal_pct=steal,
    )


def precondition(fio: Path, ep: Endpoint, size: int, out: Path) -> None:
    """Write the whole device once, so that reads hit data and not holes."""
    args = [*target_args(ep), "--rw=write", "--bs=1M", "--iodepth=8", "--direct=1"]
    run_fio(fio, [*args, f"--size={size}"], out, timeout=3600)
