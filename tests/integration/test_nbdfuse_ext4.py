"""ext4 on a Tandem volume through nbdfuse and a loop mount: the filesystem survives."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import Cluster

pytestmark = pytest.mark.skipif(
    not (shutil.which("nbdfuse") and os.path.exists("/dev/fuse") and os.geteuid() == 0),
    reason="needs nbdfuse, /dev/fuse and root for mount -o loop",
)


def sh(*args: str, timeout: float = 120) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout).stdout


def test_ext4_on_nbdfuse(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = make_cluster(size=128 << 20).start()
    fuse_dir, mnt = tmp_path / "fuse", tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    pidfile = tmp_path / "nbdfuse.pid"
    disk = fuse_dir / "disk.img"
    fuse = subprocess.Popen(
        ["nbdfuse", "-P", str(pidfile), str(disk), cluster.uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    mounted = False
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert fuse.poll() is None, fuse.stdout.read() if fuse.stdout else ""
            assert time.monotonic() < deadline, "nbdfuse did not come up"
            time.sleep(0.1)
        sh("mkfs.ext4", "-q", "-F", str(disk))
        sh("mount", "-o", "loop", str(disk), str(mnt))
        mounted = True
        files = {f"f{i}.bin": os.urandom(1 << 20 if i % 2 else 12345) for i in range(12)}
        (mnt / "dir").mkdir()
        for name, data in files.items():
            (mnt / "dir" / name).write_bytes(data)
        sh("umount", str(mnt))
        mounted = False
        fsck = subprocess.run(["e2fsck", "-f", "-n", str(disk)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        sh("mount", "-o", "loop", str(disk), str(mnt))
        mounted = True
        for name, data in files.items():
            got = (mnt / "dir" / name).read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], timeout=60)
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], timeout=60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            fuse.wait(10)
        if fuse.poll() is None:
            fuse.kill()
            fuse.wait()
