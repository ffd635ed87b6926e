"""A 3-replica volume served over NBD, driven by real third-party clients."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from tests.procs import Cluster, http_json


def run(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nbdinfo_size_flags_and_map(cluster: Cluster) -> None:
    info = json.loads(run("nbdinfo", "--json", cluster.uri).stdout)
    export = info["exports"][0]
    assert export["export-size"] == cluster.size
    assert export["export-name"] == "vol"
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    # Freshly created: all hole. Write 1 MiB at 8 MiB and the map shows it as data.
    run("qemu-io", "-f", "raw", cluster.uri, "-c", "write -P 0x5a 8M 1M")
    lines = run("nbdinfo", "--map", cluster.uri).stdout.splitlines()
    extents = [(int(a), int(b), int(c)) for a, b, c, *_ in (ln.split() for ln in lines)]
    assert (8 << 20, 1 << 20, 0) in extents
    assert extents[0] == (0, 8 << 20, 3)  # hole + zero


def test_nbdcopy_round_trip(cluster: Cluster, tmp_path: Path) -> None:
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(cluster.size))
    run("nbdcopy", str(src), cluster.uri)
    run("nbdcopy", cluster.uri, str(back))
    assert sha(src) == sha(back)


def test_nbdcopy_multi_connection(cluster: Cluster, tmp_path: Path) -> None:
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(cluster.size))
    run("nbdcopy", "--connections=4", "--requests=64", str(src), cluster.uri)
    run("nbdcopy", "--connections=4", "--requests=64", cluster.uri, str(back))
    assert sha(src) == sha(back)


def test_qemu_io_patterns_unaligned_and_last_block(cluster: Cluster) -> None:
    last = cluster.size - 4096
    cmds = [
        "write -P 0x11 0 64k",
        "write -P 0x22 1000 3000",  # sub-4K, unaligned, inside the first block
        "write -P 0x33 65535 70001",  # unaligned, crossing block boundaries
        f"write -P 0x44 {last} 4096",
        f"write -P 0x55 {cluster.size - 1} 1",
    ]
    run("qemu-io", "-f", "raw", cluster.uri, *[a for c in cmds for a in ("-c", c)])
    checks = [
        "read -P 0x11 0 1000",
        "read -P 0x22 1000 3000",
        "read -P 0x11 4000 61535",
        "read -P 0x33 65535 70001",
        "read -P 0 135536 1000",
        f"read -P 0x44 {last} 4095",
        f"read -P 0x55 {cluster.size - 1} 1",
    ]
    out = run("qemu-io", "-f", "raw", cluster.uri, *[a for c in checks for a in ("-c", c)])
    assert "Pattern verification failed" not in out.stdout + out.stderr


def test_qemu_img_convert_and_compare(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with open(src, "wb") as f:  # sparse image with scattered data
        f.truncate(cluster.size)
        for off in range(0, cluster.size, 5 << 20):
            f.seek(off)
            f.write(os.urandom(300_000))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), cluster.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), cluster.uri)
    src.write_bytes(b"x" + src.read_bytes()[1:])
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), cluster.uri],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stdout + res.stderr  # and it does notice a difference


def test_replica_and_target_apis(cluster: Cluster) -> None:
    vol = cluster.status()
    assert vol["name"] == "vol" and vol["size"] == cluster.size and vol["readonly"] is False
    assert [r["mode"] for r in vol["replicas"]] == ["RW"] * 3
    gens = set()
    for _data, api in cluster.replica_ports:
        rep = http_json(f"http://127.0.0.1:{api}/v1/replica")
        assert rep["size"] == cluster.size and rep["dirty"] is True and rep["state"] == "open"
        gens.add(rep["generation"])
    assert len(gens) == 1 and vol["generation"] in gens
    run("qemu-io", "-f", "raw", cluster.uri, "-c", "write 0 64k")
    import urllib.request

    metrics = urllib.request.urlopen(f"{cluster.api}/metrics").read().decode()
    assert 'tandem_volume_replicas{mode="RW",volume="vol"} 3.0' in metrics
    assert 'tandem_volume_ops_total{frontend="nbd",op="write",volume="vol"}' in metrics
    assert "tandem_volume_latency_seconds_bucket" in metrics
    rmetrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{cluster.replica_ports[0][1]}/metrics")
        .read()
        .decode()
    )
    assert 'tandem_replica_ops_total{op="write",volume="vol"}' in rmetrics
