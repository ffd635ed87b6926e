"""The control plane on one loopback node (relaxed anti-affinity): the agent's
supervision and re-adoption, QoS through the CLI under fio, CHAP, stats, the target
operations that pass through (resize, snapshots), deletion, and the CLI's manners."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.mayalab import Lab

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(
        tmp_path_factory.mktemp("lab"),
        nodes=1,
        netns=False,
        apiserver_args=("--colocate-replicas",),
    )
    failed_before = request.session.testsfailed
    try:
        lab.start()
        yield lab
    finally:
        if request.session.testsfailed > failed_before:
            print(lab.logs())
        lab.close()


def create(lab: Lab, name: str, *extra: str) -> dict[str, Any]:
    out = lab.cli("volume", "create", name, "--size", "64M", "--replicas", "3", "--json", *extra)
    vol = json.loads(out.stdout)
    assert vol["phase"] in ("Healthy", "Degraded", "Rebuilding"), vol  # serving
    return lab.wait_phase(name, "Healthy", 30)


def processes(lab: Lab, volume: str) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in lab.get("/v1/nodes/node0")["processes"] if p["volume"] == volume}


def test_health_says_anti_affinity_is_relaxed(lab: Lab) -> None:
    assert lab.get("/v1/health")["colocate_replicas"] is True
    out = lab.cli("node", "list")
    assert "node0" in out.stdout and "yes" in out.stdout
    nodes = json.loads(lab.cli("node", "list", "--json").stdout)
    assert nodes[0]["pools"][0]["name"] == "pool"


def test_agent_restart_adopts_running_processes(lab: Lab) -> None:
    vol = create(lab, "adopt")
    subprocess.run(
        ["qemu-io", "-f", "raw", vol["nbd_uri"], "-c", "write -P 0x42 0 1M"],
        check=True,
        capture_output=True,
    )
    before = {i: p["pid"] for i, p in processes(lab, "adopt").items()}
    assert len(before) == 4 and all(before.values())
    for sig in (signal.SIGKILL, signal.SIGTERM):  # crashed, and stopped on purpose
        lab.stop_agent(0, sig)
        assert all(os.path.exists(f"/proc/{pid}") for pid in before.values())
        lab.start_agent(0)
        lab.wait(
            lambda: (
                {i: p["pid"] for i, p in processes(lab, "adopt").items()} == before
                and all(p["state"] == "running" for p in processes(lab, "adopt").values())
            ),
            20,
            "the same processes, adopted",
        )
    assert all(p["restarts"] == 0 for p in processes(lab, "adopt").values())
    assert lab.volume("adopt")["phase"] == "Healthy"
    subprocess.run(
        ["qemu-io", "-f", "raw", vol["nbd_uri"], "-c", "read -P 0x42 0 1M"],
        check=True,
        capture_output=True,
    )


def test_crashed_replica_is_restarted_on_its_address_and_rebuilt(lab: Lab) -> None:
    vol = create(lab, "crash")
    victim = next(r for r in vol["replicas"])
    pid = processes(lab, "crash")[victim["id"]]["pid"]
    os.kill(pid, signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        p = processes(lab, "crash")[victim["id"]]
        return p if p["restarts"] == 1 and p["state"] == "running" and p["pid"] != pid else None

    p = lab.wait(restarted, 20, "the replica restarted")
    assert p["addresses"]["data"] == victim["address"]
    # Writes while it restarts make the target notice; it rebuilds it by itself.
    subprocess.run(
        ["qemu-io", "-f", "raw", vol["nbd_uri"], "-c", "write 0 64k"],
        check=True,
        capture_output=True,
    )
    lab.wait_phase("crash", "Healthy", 20)
    # The replicas are on the target's host: it reaches them through their unix sockets
    # (the restarted one replaced the socket file its killed predecessor left).
    target = next(p for p in processes(lab, "crash").values() if p["role"] == "target")
    status = httpx.get(f"http://{target['addresses']['api']}/v1/volume").json()
    assert [r["transport"] for r in status["replicas"]] == ["unix"] * 3
    if status["engine"] == "native":  # and shares its payload memory with them
        assert [r["shared_memory"] for r in status["replicas"]] == [True] * 3
    agent = lab.get("/v1/nodes/node0")["agent_url"]
    metrics = httpx.get(f"{agent}/metrics").text
    line = (
        f'tandem_agent_process_restarts_total{{id="{victim["id"]}",role="replica",volume="crash"}}'
    )
    assert f"{line} 1.0" in metrics


def fio_iops_log(log: Path) -> list[tuple[float, float]]:
    """(seconds, IOPS) per logging window, reads and writes summed."""
    per_time: dict[int, float] = {}
    for line in log.read_text().splitlines():
        ms, iops, *_ = (x.strip() for x in line.split(","))
        # Each direction logs its own line; lines of one window are within a few ms.
        key = round(int(ms) / 250)
        per_time[key] = per_time.get(key, 0.0) + float(iops)
    return sorted((k * 0.25, v) for k, v in per_time.items())


def mean(points: list[tuple[float, float]], start: float, end: float) -> float:
    vals = [v for t, v in points if start <= t <= end]
    assert len(vals) >= 3, points
    return sum(vals) / len(vals)


def test_iops_limit_holds_under_fio_and_changes_within_a_second(lab: Lab, tmp_path: Path) -> None:
    vol = create(lab, "qos", "--iops-limit", "1000")
    prefix = tmp_path / "fio"
    t0 = time.monotonic()
    fio = subprocess.Popen(
        [
            "fio",
            "--name=qos",
            "--ioengine=nbd",
            f"--uri={vol['nbd_uri']}",
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--time_based",
            "--runtime=8",
            "--size=32M",
            f"--write_iops_log={prefix}",
            "--log_avg_msec=250",
            "--output-format=json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(4.0)
        t_asked = time.monotonic() - t0
        out = lab.cli("qos", "set", "qos", "--iops-limit", "400", "--json")
        t_applied = time.monotonic() - t0
        assert json.loads(out.stdout)["applied"] is True
        _, stderr = fio.communicate(timeout=30)
    finally:
        fio.kill()
    assert fio.returncode == 0, stderr
    points = fio_iops_log(Path(f"{prefix}_iops.1.log"))
    # Log time runs a little behind ours (fio connects first): the windows are safe.
    before = mean(points, 1.5, t_asked - 0.25)  # after the first second's burst
    after = mean(points, t_applied + 1.0, 8.0)
    print(f"fio: {before:.0f} IOPS under a 1000 limit, {after:.0f} 1 s after the change to 400")
    assert 900 <= before <= 1100, points
    assert 360 <= after <= 440, points
    target_qos = lab.volume("qos")["qos"]
    assert target_qos["total_iops"] == 400
    stats = json.loads(lab.cli("volume", "stats", "qos", "--json").stdout)
    assert stats["totals"]["read_ops"] + stats["totals"]["write_ops"] > 4000
    show = lab.cli("qos", "show", "qos").stdout
    assert "total_iops=400" in show


def test_chap_volume_over_iscsi_only(lab: Lab) -> None:
    vol = create(
        lab,
        "secure",
        "--frontend",
        "iscsi",
        "--chap-user",
        "alice",
        "--chap-secret",
        "alice-secret-1",
    )
    assert vol["nbd_uri"] is None and vol["chap"] == {"user": "alice", "mutual_user": None}
    portal = vol["target_portal"]
    bad = subprocess.run(["iscsi-ls", "-s", f"iscsi://{portal}"], capture_output=True, text=True)
    assert "Authentication failure" in bad.stdout + bad.stderr and "Lun:0" not in bad.stdout
    good = subprocess.run(
        ["iscsi-ls", "-s", f"iscsi://alice%alice-secret-1@{portal}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Lun:0" in good.stdout, good.stdout + good.stderr
    # The secret is nowhere in the answers, nor on any command line.
    assert "alice-secret-1" not in lab.cli("volume", "describe", "secure", "--json").stdout
    for p in processes(lab, "secure").values():
        with open(f"/proc/{p['pid']}/cmdline", "rb") as f:
            assert b"alice-secret-1" not in f.read()


def test_resize_and_snapshots_pass_through_to_the_target(lab: Lab) -> None:
    """Online resize and snapshots go to the volume's target; what it refuses reaches the
    user in one line and nothing is recorded (each answer's mapping:
    tests/unit/test_maya_reconciler.py)."""
    vol = create(lab, "grow")
    out = lab.cli("volume", "resize", "grow", "--size", "128M", "--json")
    assert json.loads(out.stdout)["size"] == 128 << 20
    size = subprocess.run(["nbdinfo", "--size", vol["nbd_uri"]], capture_output=True, text=True)
    assert int(size.stdout) == 128 << 20  # a new connection sees the new size
    assert lab.volume("grow")["phase"] == "Healthy"
    r = lab.cli("volume", "resize", "grow", "--size", "32M", check=False)
    assert r.returncode == 1 and "only growing" in r.stderr
    lab.cli("snapshot", "create", "grow", "snap1")
    listed = json.loads(lab.cli("snapshot", "list", "grow", "--json").stdout)
    assert "snap1" in json.dumps(listed)
    r = lab.cli("snapshot", "create", "grow", "snap1", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    for args in (("revert", "grow", "snap1"), ("delete", "grow", "snap1")):
        r = lab.cli("snapshot", *args, check=False)
        if r.returncode:  # not implemented in the target yet: its 501, in one line
            assert len(r.stderr.strip().splitlines()) == 1 and "not supported" in r.stderr


def test_cli_errors_are_one_line_and_nonzero(lab: Lab) -> None:
    for args, message in (
        (("volume", "create", "x", "--size", "12Q"), "invalid size '12Q'"),
        (("volume", "create", "Bad_Name", "--size", "1G"), "name"),
        (("volume", "describe", "nope"), "no volume 'nope'"),
        (("volume", "create", "big", "--size", "900T"), "too little capacity"),
        (("qos", "set", "nope", "--iops-limit", "5"), "no volume 'nope'"),
        (("snapshot", "list", "nope"), "no volume 'nope'"),
    ):
        r = lab.cli(*args, check=False)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    r = lab.cli("volume", "list", "--apiserver", "http://127.0.0.1:9", check=False)
    assert r.returncode == 1 and "cannot reach the apiserver" in r.stderr
    assert json.loads(lab.cli("volume", "list", "--json").stdout)


def test_delete_stops_everything_and_removes_every_file(lab: Lab) -> None:
    vol = create(lab, "gone")
    pids = [p["pid"] for p in processes(lab, "gone").values()]
    dirs = [Path(lab.base / "node0" / "pool" / f"gone-{r['id']}") for r in vol["replicas"]]
    assert all(d.is_dir() for d in dirs)
    sockets = [d.with_name(d.name + ".sock") for d in dirs]
    assert all(s.is_socket() for s in sockets)
    assert json.loads(lab.cli("volume", "delete", "gone", "--json").stdout)["deleted"] is True
    assert not any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in pids)
    assert not any(d.exists() for d in dirs)
    assert not any(s.exists() for s in sockets)
    state = lab.base / "node0" / "state"
    assert not list(state.glob("procs/*")) or all(
        "gone" not in p.read_text() for p in state.glob("procs/*.json")
    )
    assert not (state / "logs" / "gone").exists()
    assert processes(lab, "gone") == {}


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
