"""Medians, ratios to the references, the issue's goals, and the table, JSON and PNG of a run."""

from __future__ import annotations

import importlib
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from perf.fio import WORKLOADS, Sample, Workload

METRICS = ("iops", "mib_s", "lat_mean_us", "lat_p99_us", "server_us_per_io", "total_us_per_io")
# The references a Tandem column is compared with: same protocol only.
REFERENCES = {"iscsi": ("tgtd",), "nbd": ("nbdkit", "qemu-nbd")}

Medians = dict[str, dict[str, dict[str, float]]]  # workload -> column -> metric -> median


def medians(results: dict[str, dict[str, list[Sample]]]) -> Medians:
    """Each metric's median over the rounds, taken separately per metric."""
    out: Medians = {}
    for wl, cols in results.items():
        out[wl] = {}
        for col, samples in cols.items():
            rows = [s.as_dict() for s in samples]
            out[wl][col] = {m: statistics.median(r[m] for r in rows) for m in METRICS}
    return out


def spreads(results: dict[str, dict[str, list[Sample]]]) -> dict[str, dict[str, float]]:
    """workload -> column -> how far its rounds' IOPS lie apart: (max - min) / median, in %.
    A ratio between two columns whose spreads exceed their difference is within the noise."""
    out: dict[str, dict[str, float]] = {}
    for wl, cols in results.items():
        for col, samples in cols.items():
            iops = [s.iops for s in samples]
            mid = statistics.median(iops)
            out.setdefault(wl, {})[col] = 100 * (max(iops) - min(iops)) / mid if mid else math.nan
    return out


def ratio(med: Medians, wl: str, col: str, ref: str, metric: str = "iops") -> float | None:
    a, b = med.get(wl, {}).get(col), med.get(wl, {}).get(ref)
    if a is None or b is None or not b[metric]:
        return None
    return a[metric] / b[metric]


def ratios(med: Medians, protocols: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> Tandem column -> reference -> IOPS ratio (equal to the MiB/s ratio)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for wl, cols in med.items():
        for col in cols:
            if not col.startswith("tandem-"):
                continue
            for ref in REFERENCES[protocols[col]]:
                r = ratio(med, wl, col, ref)
                if r is not None:
                    out.setdefault(wl, {}).setdefault(col, {})[ref] = r
    return out


# --- goals -------------------------------------------------------------------------------------


@dataclass
class Goal:
    goal: str
    column: str
    workload: str
    value: float | None  # a ratio, or µs for the CPU goal
    limit: float
    at_most: bool  # True: value <= limit passes
    unit: str
    status: str = "skip"  # pass | fail | skip
    note: str = ""


def evaluate_goals(
    med: Medians, engines: Sequence[str | None], not_run: dict[str, str]
) -> list[Goal]:
    """The goals of issue 4, as ratios within this one run."""

    def why_missing(wl: str, *cols: str) -> str:
        if wl not in med:
            return f"{wl} not run"
        for c in cols:
            if c not in med[wl]:
                return not_run.get(c, f"{c} not run")
        return ""

    goals: list[Goal] = []

    def add(
        text: str, col: str, wl: str, refs: tuple[str, ...], metric: str, limit: float, unit: str
    ) -> None:
        at_most = unit == "µs" or metric == "lat_mean_us"
        g = Goal(text, col, wl, None, limit, at_most, unit)
        present = [r for r in refs if r in med.get(wl, {})]
        missing = why_missing(wl, col) or (why_missing(wl, refs[0]) if refs and not present else "")
        if missing:
            g.note = missing
        elif not refs:
            g.value = med[wl][col][metric]
        else:
            best = max(present, key=lambda r: med[wl][r][metric])
            if metric == "lat_mean_us":
                best = min(present, key=lambda r: med[wl][r][metric])
            g.value = ratio(med, wl, col, best, metric)
            g.note = f"vs {best}" if len(refs) > 1 else ""
        if g.value is not None and not math.isnan(g.value):
            ok = g.value <= limit if at_most else g.value >= limit
            g.status = "pass" if ok else "fail"
        goals.append(g)

    for engine in engines:
        sfx = f"-{engine}" if engine else ""
        i1, i3, n1 = f"tandem-iscsi-1{sfx}", f"tandem-iscsi-3{sfx}", f"tandem-nbd-1{sfx}"
        for wl in ("randread-4k-qd32", "randwrite-4k-qd32"):
            add("iSCSI 1 replica IOPS >= 1.5x tgtd", i1, wl, ("tgtd",), "iops", 1.5, "x")
        for wl in ("read-1m-qd8", "write-1m-qd8"):
            add("iSCSI 1 replica MiB/s >= 1.5x tgtd", i1, wl, ("tgtd",), "mib_s", 1.5, "x")
        add(
            "iSCSI 3 replicas IOPS >= 1.0x tgtd",
            i3,
            "randwrite-4k-qd32",
            ("tgtd",),
            "iops",
            1.0,
            "x",
        )
        for w in WORKLOADS:
            add(
                "NBD 1 replica >= 1.0x max(nbdkit, qemu-nbd)",
                n1,
                w.name,
                ("nbdkit", "qemu-nbd"),
                "iops",
                1.0,
                "x",
            )
        for col in (i1, n1):
            for wl in ("randread-4k-qd32", "randwrite-4k-qd32"):
                add("server CPU per 4k I/O <= 15 µs", col, wl, (), "server_us_per_io", 15, "µs")
        for col in (i1, n1):
            text = "4k qd1 read latency <= 1.2x qemu-nbd"
            add(text, col, "randread-4k-qd1", ("qemu-nbd",), "lat_mean_us", 1.2, "x")
    return goals


# --- output ------------------------------------------------------------------------------------


def _num(v: float | None, digits: int = 0) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:,.{digits}f}"


def print_tables(
    console: Console,
    med: Medians,
    rat: dict[str, dict[str, dict[str, float]]],
    columns: Sequence[str],
    rounds: int,
    spread: dict[str, dict[str, float]],
) -> None:
    # Only references some Tandem column was compared with.
    refs = [
        r
        for r in ("tgtd", "nbdkit", "qemu-nbd")
        if any(r in c for w in rat.values() for c in w.values())
    ]
    for wl in med:
        t = Table(
            title=f"{wl}  (median of {rounds} round{'s' * (rounds > 1)})", title_justify="left"
        )
        t.add_column("target")
        heads = (
            "IOPS",
            "spread",
            "MiB/s",
            "lat mean µs",
            "lat p99 µs",
            "srv µs/IO",
            "srv+fio µs/IO",
        )
        for head in heads:
            t.add_column(head, justify="right")
        for r in refs:
            t.add_column(f"x {r}", justify="right")
        for col in columns:
            m = med[wl].get(col)
            if m is None:
                continue
            cells = [
                _num(m["iops"]),
                f"{_num(spread[wl][col])}%" if rounds > 1 else "",
                _num(m["mib_s"], 1),
                _num(m["lat_mean_us"], 1),
                _num(m["lat_p99_us"], 1),
                _num(m["server_us_per_io"], 1),
                _num(m["total_us_per_io"], 1),
            ]
            cells += [_ratio_cell(rat.get(wl, {}).get(col, {}).get(r)) for r in refs]
            t.add_row(col, *cells, style="bold" if col.startswith("tandem-") else None)
        console.print(t)


def print_machine(console: Console, results: dict[str, dict[str, list[Sample]]]) -> None:
    """How disturbed the machine was during the fio runs (see Sample): the median run and
    the worst one, for IO pressure and CPU steal."""
    runs = [
        (s, f"{wl} round {i + 1} {col}")
        for wl, cols in results.items()
        for col, samples in cols.items()
        for i, s in enumerate(samples)
    ]
    parts = []
    for label, key in (("IO pressure", "io_pressure_pct"), ("CPU steal", "steal_pct")):
        seen = [(getattr(s, key), where) for s, where in runs if not math.isnan(getattr(s, key))]
        if not seen:
            continue
        worst = max(seen)
        mid = statistics.median(v for v, _ in seen)
        parts.append(f"{label} median {mid:.0f}%, highest {worst[0]:.0f}% ({worst[1]})")
    if parts:
        console.print("During the fio runs: " + "; ".join(parts), highlight=False)


def _ratio_cell(r: float | None) -> str:
    return "" if r is None else f"{r:.2f}x"


def print_goals(console: Console, goals: Sequence[Goal]) -> None:
    t = Table(title="Goals of issue 4 (ratios within this run)", title_justify="left")
    for head in ("goal", "column", "workload", "measured", "limit", "result"):
        t.add_column(head)
    colour = {"pass": "green", "fail": "red", "skip": "yellow"}
    for g in goals:
        unit = " µs" if g.unit == "µs" else "x"
        value = "-" if g.value is None else f"{g.value:.2f}{unit}"
        if g.note and g.value is not None:
            value += f" ({g.note})"
        limit = f"{'<=' if g.at_most else '>='} {g.limit:g}{unit}"
        result = g.status + (f": {g.note}" if g.status == "skip" and g.note else "")
        t.add_row(g.goal, g.column, g.workload, value, limit, f"[{colour[g.status]}]{result}[/]")
    console.print(t)


def goals_json(goals: Sequence[Goal]) -> list[dict[str, Any]]:
    return [asdict(g) for g in goals]


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _matplotlib(console: Console) -> Any | None:
    """matplotlib is not a Tandem dependency: installed into the venv on first use only."""
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        pass
    if sys.prefix == sys.base_prefix:
        console.print("[yellow]no PNG chart: matplotlib missing and this Python is not a venv[/]")
        return None
    console.print("installing matplotlib into the venv for the chart (once) ...")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "matplotlib"], capture_output=True, text=True
    )
    if r.returncode != 0:
        console.print(f"[yellow]no PNG chart: pip install matplotlib failed:[/] {r.stderr[-500:]}")
        return None
    importlib.invalidate_caches()
    return importlib.import_module("matplotlib")


def write_chart(console: Console, path: Path, med: Medians, columns: Sequence[str]) -> bool:
    """One panel per workload: throughput on top, CPU µs per I/O (server + fio) below."""
    mpl = _matplotlib(console)
    if mpl is None or not med:
        return False
    mpl.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    wls = [w for w in WORKLOADS if w.name in med]
    fig, axes = plt.subplots(2, len(wls), figsize=(3.2 * len(wls), 7), squeeze=False)
    for i, w in enumerate(wls):
        cols = [c for c in columns if c in med[w.name]]
        rows = [med[w.name][c] for c in cols]
        colours = ["tab:blue" if c.startswith("tandem-") else "tab:gray" for c in cols]
        top, bottom = axes[0][i], axes[1][i]
        key, label = _headline(w)
        top.bar(cols, [r[key] for r in rows], color=colours)
        top.set_title(w.name, fontsize=10)
        top.set_ylabel(label, fontsize=8)
        server = [r["server_us_per_io"] for r in rows]
        fio = [r["total_us_per_io"] - r["server_us_per_io"] for r in rows]
        bottom.bar(cols, server, color=colours, label="server")
        bottom.bar(cols, fio, bottom=server, color="tab:orange", alpha=0.6, label="fio")
        bottom.set_ylabel("CPU µs per I/O" if i == 0 else "")
        for ax in (top, bottom):
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
            ax.tick_params(axis="y", labelsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle("Tandem vs reference targets (medians, one run)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _headline(w: Workload) -> tuple[str, str]:
    return ("mib_s", "MiB/s") if w.bs >= 1 << 20 else ("iops", "IOPS")
