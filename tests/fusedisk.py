"""An NBD export as a file through nbdfuse, with ext4 on it through a loop mount: how the
tests put a real filesystem on a block device without a kernel NBD client. Every cleanup
step is tried even when one before it fails, and `close()` may be called more than once."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def missing() -> str | None:
    """Why nbdfuse and a loop mount cannot be used here, or None."""
    if lost := [t for t in ("nbdfuse", "mkfs.ext4", "fusermount3") if not shutil.which(t)]:
        return f"needs {', '.join(lost)}"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "needs /dev/fuse and loop devices"
    if os.geteuid() != 0:
        return "needs root (mount -o loop)"
    return None


def sh(*args: str, timeout: float = 120) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout).stdout


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen[bytes], name: str) -> None:
    """Until ready(), failing at once if proc exits and after 20 s."""
    deadline = time.monotonic() + 20
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not come up")
        time.sleep(0.05)


class FuseDisk:
    """The export at `uri` as the file `image` under base; `mount()` puts it at `mnt`."""

    def __init__(self, base: Path, uri: str, mnt: Path) -> None:
        self.uri, self.mnt = uri, mnt
        self.fuse_dir, self.pidfile = base / "fuse", base / "nbdfuse.pid"
        self.image = self.fuse_dir / "disk.img"
        self.fuse: subprocess.Popen[bytes] | None = None
        self.mounted = False

    def start(self) -> FuseDisk:
        self.fuse_dir.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        log = self.fuse_dir.parent / "nbdfuse.log"
        try:
            with open(log, "wb") as out:
                self.fuse = subprocess.Popen(
                    ["nbdfuse", "-P", str(self.pidfile), str(self.image), self.uri],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            wait_for(self.pidfile.exists, self.fuse, f"nbdfuse (its output: {log})")
        except BaseException:
            self.close()
            raise
        return self

    def mkfs(self) -> None:
        sh("mkfs.ext4", "-q", "-F", str(self.image))

    def mount(self) -> None:
        sh("mount", "-o", "loop", str(self.image), str(self.mnt))
        self.mounted = True

    def umount(self) -> None:
        sh("umount", str(self.mnt))
        self.mounted = False

    def close(self) -> None:
        """Unmount (lazily if it is busy) and end nbdfuse."""
        if self.mounted:
            if not _run("umount", str(self.mnt)):
                _run("umount", "-l", str(self.mnt))
            self.mounted = False
        if self.fuse is None:
            return
        if not _run("fusermount3", "-u", str(self.fuse_dir)):
            _run("fusermount3", "-uz", str(self.fuse_dir))
        reap(self.fuse)
        self.fuse = None


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait up to 10 s for proc to end, then kill it."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _run(*args: str) -> bool:
    """A cleanup command: True when it worked, False when it failed or took over a minute."""
    try:
        return subprocess.run(args, capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False
