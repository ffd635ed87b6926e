"""iSCSI on a real 3-replica volume (target and replica processes), with real clients."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procs import Cluster

pytestmark = pytest.mark.skipif(
    shutil.which("iscsi-test-cu") is None, reason="libiscsi-bin is not installed"
)


def run(*args: str, timeout: float = 120) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_iscsi_ls_inq_readcapacity(cluster: Cluster) -> None:
    out = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{cluster.iscsi_port}")
    assert cluster.iqn in out and f"127.0.0.1:{cluster.iscsi_port}" in out
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS", out), out
    inq = run("iscsi-inq", cluster.iscsi_url)
    assert "TANDEM" in inq
    cap = run("iscsi-readcapacity16", cluster.iscsi_url)
    assert f"Total size:{cluster.size}" in cap, cap
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in cap
    assert "LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:3" in cap  # 4 KiB physical
    assert "LBPME:1" in cap  # thin provisioned


def test_qemu_io_over_iscsi_matches_nbd(cluster: Cluster, tmp_path: Path) -> None:
    """Both frontends see the same replicated data."""
    run(
        "qemu-io",
        "-f",
        "raw",
        cluster.iscsi_url,
        "-c",
        "write -P 0x6b 1M 3M",
        "-c",
        "write -P 0x11 4100 1000",
    )
    run(
        "qemu-io",
        "-f",
        "raw",
        cluster.uri,
        "-c",
        "read -P 0x6b 1M 3M",
        "-c",
        "read -P 0x11 4100 1000",
        "-c",
        "read -P 0 0 4100",
    )
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(8 << 20))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), cluster.iscsi_url)
    back = tmp_path / "back.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", cluster.uri, str(back))
    assert back.read_bytes()[: 8 << 20] == img.read_bytes()


@pytest.mark.slow
def test_iscsi_test_cu_all_on_replicated_volume(cluster: Cluster) -> None:
    """libiscsi's conformance suite against the real 3-replica stack: no failures."""
    url = cluster.iscsi_url
    res = subprocess.run(
        ["stdbuf", "-oL", "-eL", "iscsi-test-cu", "-d", "-t", "ALL", url, url],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = res.stdout + res.stderr
    m = re.search(r"Run Summary.*?tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.S)
    assert m, out[-3000:]
    total, _ran, passed, failed = map(int, m.groups())
    failures = re.findall(r"Test: (\S+) \.\.\.\s*FAILED", out)
    skipped = len(re.findall(r"\[SKIPPED\]", out))
    print(f"iscsi-test-cu: {total} tests, {passed} passed, {failed} failed, {skipped} skips")
    # GetLBAStatus.UnmapSingle asks for the status at LBA i+1 and expects the first
    # descriptor to start at i+lbppb: with 4096-byte physical blocks (lbppb 8, which the
    # design asks for) no SBC-conformant answer passes it. A known bug of the test.
    known = {"UnmapSingle"}
    assert set(failures) <= known, failures
    assert failed <= len(known)
    assert skipped < 62  # tgtd skips 62 here


def test_below_quorum_iscsi_writes_fail_and_reads_go_on(cluster: Cluster) -> None:
    # A session open when the quorum goes: its next write fails (DATA PROTECT), never
    # acknowledged; a new session is told the LUN is write protected; reads go on.
    qio = subprocess.Popen(
        ["qemu-io", "-f", "raw", cluster.iscsi_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert qio.stdin is not None and qio.stdout is not None
        qio.stdin.write("write -P 0x77 0 64k\n")
        qio.stdin.flush()
        assert "wrote" in qio.stdout.readline()
        cluster.replicas[0].kill9()
        cluster.replicas[1].kill9()
        qio.stdin.write("write -P 0x78 0 64k\nquit\n")
        qio.stdin.flush()
        out = qio.communicate(timeout=120)[0]
    finally:
        if qio.poll() is None:
            qio.kill()
            qio.wait()
    assert "write failed" in out, out
    assert cluster.status()["readonly"] is True
    res = subprocess.run(
        ["qemu-io", "-f", "raw", cluster.iscsi_url, "-c", "write -P 0x78 0 64k"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "write protected" in res.stdout + res.stderr
    # The failed write may have reached the surviving replica (it was never acknowledged,
    # so either content is right), block by block; the volume still serves reads.
    import nbd

    h = nbd.NBD()
    h.connect_uri(cluster.uri)
    data = h.pread(64 << 10, 0)
    for off in range(0, len(data), 4096):
        assert data[off : off + 4096] in (b"\x77" * 4096, b"\x78" * 4096), off
