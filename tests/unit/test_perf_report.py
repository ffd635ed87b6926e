"""The benchmark's own arithmetic (perf/): medians, spreads, ratios, goals and the machine
counters, on made-up samples; the benchmark itself runs with `make perf`."""

from __future__ import annotations

import math

import pytest

from perf import report
from perf.fio import Machine, Sample


def sample(iops: float, server_cpu_s: float = 1.0, **kw: float) -> Sample:
    return Sample(
        iops=iops,
        mib_s=iops / 256,
        lat_mean_us=1e6 / iops,
        lat_p99_us=2e6 / iops,
        ios=int(iops * 10),
        runtime_s=10,
        fio_cpu_s=1.0,
        server_cpu_s=server_cpu_s,
        **kw,
    )


def test_medians_spreads_and_ratios() -> None:
    results = {
        "randread-4k-qd32": {
            "tandem-nbd-1-native": [sample(120), sample(100), sample(80)],
            "nbdkit": [sample(90), sample(100), sample(110)],
            "qemu-nbd": [sample(50), sample(50), sample(50)],
        }
    }
    med = report.medians(results)
    assert med["randread-4k-qd32"]["tandem-nbd-1-native"]["iops"] == 100
    spread = report.spreads(results)["randread-4k-qd32"]
    assert spread["tandem-nbd-1-native"] == pytest.approx(40)  # (120 - 80) / 100
    assert spread["nbdkit"] == pytest.approx(20)
    assert spread["qemu-nbd"] == 0
    rat = report.ratios(med, {"tandem-nbd-1-native": "nbd", "nbdkit": "nbd", "qemu-nbd": "nbd"})
    assert rat["randread-4k-qd32"]["tandem-nbd-1-native"] == {"nbdkit": 1.0, "qemu-nbd": 2.0}


def test_goals_compare_with_the_better_reference_and_say_what_is_missing() -> None:
    results = {
        "randwrite-4k-qd32": {
            "tandem-nbd-1": [sample(95, server_cpu_s=0.019)],  # 20 us per I/O
            "nbdkit": [sample(100)],
            "qemu-nbd": [sample(60)],
        }
    }
    goals = report.evaluate_goals(report.medians(results), (None,), {})
    nbd = [g for g in goals if g.column == "tandem-nbd-1" and g.workload == "randwrite-4k-qd32"]
    vs_refs = next(g for g in nbd if g.unit == "x")
    assert vs_refs.value == pytest.approx(0.95) and vs_refs.note == "vs nbdkit"
    assert vs_refs.status == "fail"
    cpu = next(g for g in nbd if g.unit == "µs")
    assert cpu.value == pytest.approx(20) and cpu.status == "fail"
    not_run = [g for g in goals if g.column == "tandem-iscsi-1"]
    assert not_run and all(g.value is None and g.note for g in not_run)


def test_machine_counters() -> None:
    before = Machine(io_some_s=10.0, steal=100, cpu_total=1000, wall=50.0)
    after = Machine(io_some_s=12.5, steal=110, cpu_total=1400, wall=60.0)
    io, steal = after.since(before)
    assert io == pytest.approx(25)  # 2.5 s of 10 s with some task waiting for the disk
    assert steal == pytest.approx(2.5)  # 10 of 400 ticks
    now = Machine.now()  # this machine's /proc
    assert now.cpu_total > 0 and 0 <= now.steal <= now.cpu_total
    assert math.isnan(now.io_some_s) or now.io_some_s >= 0
    io, steal = Machine.now().since(now)
    assert math.isnan(io) or io >= 0
