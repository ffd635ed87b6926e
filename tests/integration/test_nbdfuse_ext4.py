"""ext4 on a Tandem volume through nbdfuse and a loop mount: the filesystem survives."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests import fusedisk
from tests.procs import Cluster

pytestmark = pytest.mark.skipif(fusedisk.missing() is not None, reason=str(fusedisk.missing()))


def test_ext4_on_nbdfuse(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = make_cluster(size=128 << 20).start()
    disk = fusedisk.FuseDisk(tmp_path, cluster.uri, tmp_path / "mnt")
    try:
        disk.start()
        disk.mkfs()
        disk.mount()
        files = {f"f{i}.bin": os.urandom(1 << 20 if i % 2 else 12345) for i in range(12)}
        (disk.mnt / "dir").mkdir()
        for name, data in files.items():
            (disk.mnt / "dir" / name).write_bytes(data)
        disk.umount()
        fsck = subprocess.run(
            ["e2fsck", "-f", "-n", str(disk.image)], capture_output=True, text=True
        )
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        disk.mount()
        for name, data in files.items():
            got = (disk.mnt / "dir" / name).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
    finally:
        disk.close()
