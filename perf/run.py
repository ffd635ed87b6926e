"""Side-by-side benchmark: Tandem (1 and 3 replicas) against tgtd, nbdkit and qemu-nbd, with fio.

    .venv/bin/python -m perf.run [--quick] [--only tandem-nbd-1,nbdkit] [--workloads ...]

Everything it starts runs on 127.0.0.1 from one temp dir under /var/tmp and is stopped (by PID)
and removed on exit, on failure and on Ctrl-C. See perf/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

if not __package__:  # run as a script (python perf/run.py): make `perf` importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from rich.console import Console

from perf import fio as fio_mod
from perf import report
from perf.fio import WORKLOADS, FioError, Sample, Workload
from perf.servers import (
    ROOT,
    Deployment,
    Endpoint,
    Nbdkit,
    QemuNbd,
    Reference,
    TandemFeatures,
    TandemVolume,
    Tgtd,
)

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_TYPES: tuple[type[Reference], ...] = (Tgtd, Nbdkit, QemuNbd)
REPLICA_COUNTS = (1, 3)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 1G, 512M")
    n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n < 64 << 20 or n % (1 << 20):
        raise argparse.ArgumentTypeError("size must be a whole number of MiB, at least 64M")
    return n


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="perf.run", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=1 << 30, help="per volume (default 1G)")
    p.add_argument("--runtime", type=float, help="seconds per fio run (default 7, --quick 3)")
    # Three rounds: the median then ignores one round the shared machine disturbed (with two
    # it is their mean); 7 s keeps the default run as long as 2 x 10 s did.
    p.add_argument("--rounds", type=int, default=3, help="A B A B ... rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="3 s per fio run")
    p.add_argument("--only", type=csv, help="columns, e.g. tandem-nbd-1,nbdkit ('tandem': all)")
    p.add_argument("--workloads", type=csv, help=", ".join(w.name for w in WORKLOADS))
    p.add_argument("--json", type=Path, help="results file (default perf/results/<time>.json)")
    p.add_argument(
        "--tcp-replicas",
        action="store_true",
        help="the target reaches its replicas over loopback TCP, not their unix sockets",
    )
    a = p.parse_args(argv)
    a.runtime = a.runtime or (3.0 if a.quick else 7.0)
    if a.rounds < 1 or a.runtime <= 0:
        p.error("--rounds and --runtime must be positive")
    known = {w.name for w in WORKLOADS}
    if a.workloads and not set(a.workloads) <= known:
        p.error(f"unknown workload(s) {sorted(set(a.workloads) - known)}; known: {sorted(known)}")
    return a


def column_names(feats_engines: tuple[str | None, ...]) -> list[str]:
    """Every column this harness knows, including Tandem iSCSI ones not available yet."""
    names = []
    for engine in feats_engines:
        sfx = f"-{engine}" if engine else ""
        names += [f"tandem-{p}-{n}{sfx}" for n in REPLICA_COUNTS for p in ("nbd", "iscsi")]
    return [*names, *(r.NAME for r in REFERENCE_TYPES)]


def selected(name: str, only: list[str] | None) -> bool:
    # A prefix picks its variants: "tandem" all Tandem columns, "tandem-nbd-1" both engines.
    return only is None or any(name == o or name.startswith(o + "-") for o in only)


@dataclass
class Run:
    """The state of one benchmark run, and what cleanup needs to find."""

    args: argparse.Namespace
    console: Console
    tmp: Path
    deployments: list[Deployment] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # column -> why it has no results
    errors: dict[str, str] = field(default_factory=dict)
    settle_s: float = 0.0  # spent writing back dirty pages between runs (settle)
    unsettled: bool = False

    def plan(self, feats: TandemFeatures) -> list[Endpoint]:
        """Create (not start) the deployments the selection needs; say why others are out."""
        only = self.args.only
        names = column_names(feats.engines)
        if only:
            unknown = [o for o in only if not any(selected(n, [o]) for n in names)]
            if unknown:
                raise SystemExit(f"unknown column(s) {unknown}; known: {', '.join(names)}")
        if not feats.iscsi:
            for n in names:
                if n.startswith("tandem-iscsi-"):
                    self.not_run[n] = "Tandem has no iSCSI frontend yet (no --iscsi option)"
        base, size = self.tmp / "servers", self.args.size
        candidates: list[Deployment] = [
            TandemVolume(base, size, n, engine, feats)
            for engine in feats.engines
            for n in REPLICA_COUNTS
        ]
        for kind in REFERENCE_TYPES:
            if not selected(kind.NAME, only):
                continue
            missing = kind.missing_tools()
            if missing:
                self.not_run[kind.NAME] = f"not installed: {', '.join(missing)}"
                continue
            candidates.append(kind(base, size))
        endpoints = []
        for d in candidates:
            wanted = [e for e in d.endpoints if selected(e.name, only)]
            if wanted:
                self.deployments.append(d)
                endpoints += wanted
            else:
                shutil.rmtree(d.dir)
        return endpoints

    def fio_binaries(self, endpoints: list[Endpoint]) -> dict[str, Path]:
        """One fio per protocol; the libiscsi build serves NBD too, so all columns share it."""
        fios: dict[str, Path] = {}
        if any(e.protocol == "iscsi" for e in endpoints):
            path, why = fio_mod.ensure_fio_libiscsi(self.tmp / "build-fio.log")
            if path is None:
                self.console.print(f"[yellow]skipping iSCSI columns: {why}[/]")
                for e in endpoints:
                    if e.protocol == "iscsi":
                        self.not_run[e.name] = why
            else:
                fios["iscsi"] = path
        if "nbd" in fio_mod.engines_of(fios.get("iscsi", Path("/nonexistent"))):
            fios["nbd"] = fios["iscsi"]
        elif "nbd" in fio_mod.engines_of(fio_mod.FIO_DEBIAN):
            fios["nbd"] = fio_mod.FIO_DEBIAN
        else:
            for e in endpoints:
                if e.protocol == "nbd":
                    self.not_run[e.name] = "no fio with the nbd engine (apt-get install fio)"
        return fios

    def start(self, endpoints: list[Endpoint], fios: dict[str, Path]) -> list[Endpoint]:
        live = [e for e in endpoints if e.name not in self.not_run]
        for d in list(self.deployments):
            if not any(e in live for e in d.endpoints):
                self.deployments.remove(d)
                continue
            t0 = time.monotonic()
            self.console.print(f"starting {d.name} ...", end=" ")
            try:
                d.start()
                # Through any endpoint: they serve the same volume.
                pre = next(e for e in d.endpoints if e.protocol in fios)
                out = self.tmp / f"precondition-{d.name}.json"
                fio_mod.precondition(fios[pre.protocol], pre, self.args.size, out)
            except (RuntimeError, OSError) as e:  # FioError, TimeoutError included
                # One broken target must not cost the others their run.
                self.console.print(f"[red]failed: {e}[/]\n{d.logs()}", highlight=False)
                d.stop()
                for ep in d.endpoints:
                    self.errors[ep.name] = f"failed to start or precondition: {e}"
                continue
            self.console.print(f"up and preconditioned in {time.monotonic() - t0:.0f} s")
        return [e for e in live if e.name not in self.errors]

    def measure(
        self, endpoints: list[Endpoint], fios: dict[str, Path], workloads: list[Workload]
    ) -> dict[str, dict[str, list[Sample]]]:
        """Per workload, rounds of A B C ...: every target sees the same drift."""
        results: dict[str, dict[str, list[Sample]]] = {}
        rounds, runtime = self.args.rounds, self.args.runtime
        total = len(workloads) * rounds * len(endpoints)
        eta = total * (runtime + 1.5)
        self.console.print(f"{total} fio runs of {runtime:g} s, about {eta / 60:.0f} min")
        done = 0
        for wl in workloads:
            results[wl.name] = {}
            for rnd in range(rounds):
                for ep in endpoints:
                    done += 1
                    if ep.name in self.errors:
                        continue
                    out = self.tmp / f"fio-{wl.name}-{ep.name}-{rnd}.json"
                    self.settle()
                    try:
                        s = fio_mod.measure(fios[ep.protocol], ep, wl, runtime, out)
                    except FioError as e:
                        # A target that fails (or died) is out for the rest of the run.
                        self.errors[ep.name] = f"{wl.name} round {rnd + 1}: {e}"
                        self.console.print(f"[red]{ep.name} failed on {wl.name}: {e}[/]")
                        for d in self.deployments:
                            if ep in d.endpoints:
                                self.console.print(d.logs())
                        continue
                    results[wl.name].setdefault(ep.name, []).append(s)
                    self.console.print(
                        f"[{done:>3}/{total}] {wl.name:<18} round {rnd + 1}/{rounds} "
                        f"{ep.name:<18} {s.iops:>9,.0f} IOPS {s.mib_s:>8.1f} MiB/s "
                        f"lat {s.lat_mean_us:>8.1f} µs  CPU srv {s.server_us_per_io:>6.1f} "
                        f"+ fio {s.total_us_per_io - s.server_us_per_io:>5.1f} µs/IO  "
                        f"io-psi {s.io_pressure_pct:>3.0f}% steal {s.steal_pct:>2.0f}%",
                        highlight=False,
                    )
        for name, err in self.errors.items():
            self.not_run.setdefault(name, f"failed: {err[:200]}")
        self.console.print(f"writing back dirty pages between runs took {self.settle_s:.0f} s")
        return results

    def settle(self) -> None:
        """Write back the dirty pages on the servers' filesystem before a run, so that every
        run starts from none: the writeback of the preconditioning or of earlier write runs
        would otherwise land on whichever target runs next (on a slow disk it held IO
        pressure at 60-90% through whole runs). The wait is not measured."""
        t0 = time.monotonic()
        r = subprocess.run(["sync", "-f", str(self.tmp)], capture_output=True, timeout=600)
        if r.returncode:  # say so once; the runs go on unsettled
            if not self.unsettled:
                self.console.print(f"[yellow]sync -f failed: {r.stderr.decode().strip()}[/]")
            self.unsettled = True
        self.settle_s += time.monotonic() - t0

    def stop(self) -> None:
        for d in reversed(self.deployments):
            try:
                d.stop()
            except Exception as e:  # keep stopping the others
                self.console.print(f"[red]stopping {d.name}: {e}[/]")


def _git_rev() -> str:
    r = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    )
    return r.stdout.strip()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def run_io_suite(run: Run) -> tuple[dict[str, Any], report.Medians, list[str]]:
    """The I/O suite: start, precondition, measure, report. Returns its part of the JSON, and the
    medians and columns for the chart."""
    args, console = run.args, run.console
    feats = TandemFeatures.detect()
    if args.tcp_replicas:
        feats = dataclasses.replace(feats, replica_socket=False)
    console.print(
        f"Tandem: iSCSI frontend {'yes' if feats.iscsi else 'no'}, "
        f"engines {', '.join(e or 'default' for e in feats.engines)}, replicas over "
        f"{'unix sockets' if feats.replica_socket else 'TCP'}"
    )
    endpoints = run.plan(feats)
    fios = run.fio_binaries(endpoints)
    for name, why in run.not_run.items():
        if selected(name, args.only):
            console.print(f"[yellow]skipping {name}: {why}[/]")
    endpoints = run.start(endpoints, fios)
    if not endpoints:
        raise SystemExit("nothing to measure")
    workloads = [w for w in WORKLOADS if not args.workloads or w.name in args.workloads]
    results = run.measure(endpoints, fios, workloads)

    med = report.medians(results)
    protocols = {e.name: e.protocol for e in endpoints}
    rat = report.ratios(med, protocols)
    goals = report.evaluate_goals(med, feats.engines, run.not_run)
    columns = [e.name for e in endpoints]
    spread = report.spreads(results)
    report.print_tables(console, med, rat, columns, args.rounds, spread)
    report.print_goals(console, goals)
    report.print_machine(console, results)
    doc = {
        "columns": {
            e.name: {
                "protocol": e.protocol,
                "kind": e.kind,
                "replicas": e.replicas,
                "engine": e.engine,
                "url": e.url,
                "server_processes": {c.name: shlex.join(c.argv) for c in e.procs},
            }
            for e in endpoints
        },
        "not_run": {k: v for k, v in run.not_run.items() if selected(k, args.only)},
        "fio": {proto: str(path) for proto, path in fios.items()},
        "workload_definitions": {w.name: asdict(w) for w in workloads},
        "workloads": {
            wl: {
                col: {
                    "median": med[wl][col],
                    "spread_pct": spread[wl][col],
                    "rounds": [s.as_dict() for s in samples],
                }
                for col, samples in cols.items()
            }
            for wl, cols in results.items()
        },
        "ratios": rat,
        "goals": report.goals_json(goals),
    }
    return doc, med, columns


def _on_signal(signum: int, _frame: Any) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)  # so that cleanup runs as for Ctrl-C
    started = datetime.now()
    tmp = Path(tempfile.mkdtemp(prefix="tandem-perf-", dir="/var/tmp"))
    run = Run(args, console, tmp)
    ok = False
    try:
        suite, med, columns = run_io_suite(run)
        ok = True
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything[/]")
        return 130
    except Exception:
        console.print_exception()
        for d in run.deployments:
            console.print(d.logs())
        return 1
    finally:
        # A second Ctrl-C must not leave servers behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if not ok:
            console.print("stopping servers and removing", tmp)
        run.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    doc = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now().isoformat(timespec="seconds"),
        "git": _git_rev(),
        "host": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "kernel": platform.release()},
        "config": {
            "size": args.size,
            "runtime_s": args.runtime,
            "rounds": args.rounds,
            "only": args.only,
        },
        # One key per suite: a rebuild benchmark adds its own beside "io".
        "io": suite,
    }
    path = args.json or RESULTS / f"{started:%Y%m%d-%H%M%S}.json"
    report.write_json(path, doc)
    png = path.with_suffix(".png")
    console.print(f"results: {path}")
    if report.write_chart(console, png, med, columns):
        console.print(f"chart:   {png}")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
