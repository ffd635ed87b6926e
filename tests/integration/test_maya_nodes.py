"""Acceptance: a 3-replica volume across nodes in their own network namespaces.

Create through the API (the CLI), write through NBD, take a node away (its processes
killed, its link down), see the volume Degraded and then Healthy again with a replica on
a fourth node and every byte intact; the lost node comes back and its agent removes the
stale replica; delete the volume and find every process and file of it gone.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mayalab import Lab, marked_pids

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.timeout(240),
]

MiB = 1 << 20


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(tmp_path, nodes=3, netns=True)
    try:
        lab.start()
        yield lab
    finally:
        call = getattr(request.node, "rep_call", None)
        if call is not None and call.failed:
            print(lab.logs())
        lab.close()
        # Nothing of the lab may survive it: processes, namespaces, links.
        assert not marked_pids(lab.tag)
        assert not list(Path("/var/run/netns").glob(f"tandem-lab-{lab.tag}-*"))
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert lab.tag not in links


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    return r.stdout


# (offset, length, pattern): written before the node is lost, and while it is gone.
BEFORE = [(0, 4 * MiB, 0x5A), (40 * MiB, 1 * MiB, 0xC3)]
DURING = [(8 * MiB, 2 * MiB, 0x7E), (40 * MiB + 512 * 1024, 64 * 1024, 0x11)]


def expected_reads() -> list[str]:
    # Later writes win where they overlap; read each piece several times so that the
    # target's round robin reads it from every RW replica, the rebuilt one included.
    pieces = [
        (0, 4 * MiB, 0x5A),
        (8 * MiB, 2 * MiB, 0x7E),
        (40 * MiB, 512 * 1024, 0xC3),
        (40 * MiB + 512 * 1024, 64 * 1024, 0x11),
        (40 * MiB + 576 * 1024, 448 * 1024, 0xC3),
        (20 * MiB, 1 * MiB, 0x00),
    ]
    return [f"read -P {p:#x} {off} {n}" for off, n, p in pieces for _ in range(4)]


def test_node_loss_replacement_and_delete(lab: Lab) -> None:
    out = lab.cli("volume", "create", "vol", "--size", "64M", "--replicas", "3", "--json")
    vol = json.loads(out.stdout)
    assert vol["phase"] == "Healthy", vol
    assert sorted(r["node"] for r in vol["replicas"]) == ["node0", "node1", "node2"]
    assert all(r["mode"] == "RW" for r in vol["replicas"])
    ips = {r["address"].split(":")[0] for r in vol["replicas"]}
    assert len(ips) == 3 and all(ip.startswith(lab.net.subnet) for ip in ips)  # type: ignore[union-attr]
    uri = vol["nbd_uri"]
    assert vol["target_portal"] and vol["iqn"] == "iqn.2026-11.io.tandem:vol"

    qemu_io(uri, *(f"write -P {p:#x} {off} {n}" for off, n, p in BEFORE))
    lab.add_node(3)  # the replacement node, registered only now
    lab.wait(lambda: lab.get("/v1/nodes/node3")["ready"], 20, "node3 ready")

    target_node = vol["target"]["node"]
    lost = next(i for i in range(3) if lab.node_name(i) != target_node)
    lab.take_node_away(lost)
    degraded = lab.wait_phase("vol", "Degraded", timeout=20)
    assert lab.node_name(lost) in degraded["message"]
    qemu_io(uri, *(f"write -P {p:#x} {off} {n}" for off, n, p in DURING))

    def healthy_on_node3() -> dict | None:  # type: ignore[type-arg]
        v = lab.volume("vol")
        nodes = sorted(r["node"] for r in v["replicas"])
        return v if v["phase"] == "Healthy" and "node3" in nodes else None

    vol = lab.wait(healthy_on_node3, 60, "Healthy with the replica on node3")
    # Healthy counts only placed replicas: the target has taken the new one by now (it
    # still counted the lost one RW until its deadline; that is not Healthy).
    assert "ReplicaAdded" in [e["type"] for e in vol["events"]]
    assert lab.node_name(lost) not in [r["node"] for r in vol["replicas"]]
    assert "ReplicaReplaced" in [e["type"] for e in vol["events"]]
    qemu_io(uri, *expected_reads())
    described = lab.cli("volume", "describe", "vol").stdout
    assert "node3" in described and "Healthy" in described

    # The lost node returns: its agent removes the replica it no longer has.
    lost_pool = lab.base / lab.node_name(lost) / "pool"
    assert list(lost_pool.iterdir())
    lab.bring_node_back(lost)
    lab.wait(lambda: not list(lost_pool.iterdir()), 30, "the stale replica removed")
    assert lab.volume("vol")["phase"] == "Healthy"

    out = lab.cli("volume", "delete", "vol", "--json")
    assert json.loads(out.stdout)["deleted"] is True
    assert lab.cli("volume", "describe", "vol", check=False).returncode == 1
    # Every process and file of the volume is gone, on every node.
    for pid in marked_pids(lab.tag):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"vol" not in f.read().split(b"\0"), f"process {pid} of the volume survived"
    for i in range(4):
        node_dir = lab.base / lab.node_name(i)
        assert not list((node_dir / "pool").iterdir()), f"data left on node{i}"
        assert not list((node_dir / "state" / "procs").iterdir()), f"records left on node{i}"
        assert not list((node_dir / "state" / "logs").iterdir()), f"logs left on node{i}"
    nodes = lab.get("/v1/nodes")
    assert all(n["ready"] and n["processes"] == [] for n in nodes)
    assert all(p["free"] == p["capacity"] for n in nodes for p in n["pools"])


def _leftovers(tag: str) -> list[str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [
        *(f"pid {p}" for p in marked_pids(tag)),
        *(str(p) for p in Path("/var/run/netns").glob(f"tandem-lab-{tag}-*")),
        *(f"link {ln.split(':')[1].strip()}" for ln in links.splitlines() if tag in ln),
    ]


def test_a_failing_test_leaves_nothing_behind(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab", nodes=2, netns=True, apiserver_args=("--colocate-replicas",))
    try:
        lab.start()
        lab.cli("volume", "create", "v", "--size", "16M", "--replicas", "2")
        assert _leftovers(lab.tag)
        raise RuntimeError("the test fails here")
    except RuntimeError:
        pass
    finally:
        lab.close()
    assert _leftovers(lab.tag) == []
    assert not (tmp_path / "lab").exists()


def test_a_lab_of_a_killed_run_is_swept(tmp_path: Path) -> None:
    from tests.mayalab import RUN_DIR, Network, sweep_stale_labs

    dead = subprocess.Popen(["true"])
    dead.wait()
    net = Network("dead1")
    try:
        net.add_node(0)
        doc = json.loads((RUN_DIR / "dead1.json").read_text())
        (RUN_DIR / "dead1.json").write_text(json.dumps({**doc, "pid": dead.pid}))
        assert _leftovers("dead1")
        sweep_stale_labs()
        assert _leftovers("dead1") == []
        assert not (RUN_DIR / "dead1.json").exists()
    finally:
        net.close()
