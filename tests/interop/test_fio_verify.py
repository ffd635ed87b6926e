"""fio with verify=crc32c through both frontends of a 3-replica volume: every block written
reads back with its checksum (fio's libiscsi engine for iSCSI, its nbd engine for NBD)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procs import Cluster

FIO_ISCSI = Path("/opt/fio-libiscsi/bin/fio")


def fio(binary: str, *args: str) -> dict:  # type: ignore[type-arg]
    res = subprocess.run(
        [
            binary,
            "--output-format=json",
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--randrepeat=0",
            "--verify_state_save=0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout[res.stdout.index("{") :]  # the nbd engine prints a line first
    return json.loads(out)


@pytest.mark.skipif(not FIO_ISCSI.exists(), reason="make test builds fio with libiscsi")
def test_fio_libiscsi_verify_crc32c(cluster: Cluster) -> None:
    url = cluster.iscsi_url.replace(":", "\\:")
    report = fio(str(FIO_ISCSI), "--ioengine=libiscsi", f"--filename={url}")
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 << 20
    assert job["read"]["io_bytes"] == 32 << 20  # the verify pass read everything back


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio_nbd_verify_crc32c(cluster: Cluster) -> None:
    report = fio("fio", "--ioengine=nbd", f"--uri={cluster.uri}")
    job = report["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 32 << 20
