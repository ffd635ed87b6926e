"""A disk that can be made to hang: ext4 on a loop device over nbdfuse over nbdkit's memory
plugin behind its pause filter. While paused, any read that misses the page cache waits in
the kernel until resumed, as on a stuck disk: what a replica's directory on it sees, and
what a target reading a replica's file sees, with nothing injected into Tandem itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def missing() -> str | None:
    """Why a stall disk cannot be made here, or None."""
    tools = ["nbdkit", "nbdfuse", "mkfs.ext4", "fusermount3"]
    if lost := [t for t in tools if not shutil.which(t)]:
        return f"needs {', '.join(lost)}"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "needs /dev/fuse and loop devices"
    if os.geteuid() != 0:
        return "needs root (mount -o loop)"
    probe = ["nbdkit", "--filter=pause", "memory", "1M", "--dump-plugin"]
    if subprocess.run(probe, capture_output=True, timeout=30).returncode:
        return "needs nbdkit's memory plugin and pause filter"
    return None


def sh(*args: str, timeout: float = 60) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=timeout)


class StallDisk:
    """Mounted at `mnt` once started; `pause()` and `resume()` hang and free its reads."""

    def __init__(self, base: Path, mnt: Path, size: int) -> None:
        self.base, self.mnt, self.size = base, mnt, size
        self.sock, self.control = base / "nbdkit.sock", base / "pause.sock"
        self.fuse_dir, self.pidfile = base / "fuse", base / "nbdfuse.pid"
        self.image = self.fuse_dir / "disk.img"
        self.nbdkit: subprocess.Popen[bytes] | None = None
        self.fuse: subprocess.Popen[bytes] | None = None
        self.mounted = False
        self.paused = False

    def start(self) -> StallDisk:
        self.base.mkdir(parents=True, exist_ok=True)
        self.fuse_dir.mkdir(exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.nbdkit = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(self.sock), "--filter=pause", "memory",
             str(self.size), f"pause-control={self.control}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait(lambda: self.sock.exists() and self.control.exists(), self.nbdkit, "nbdkit")
        self.fuse = subprocess.Popen(
            ["nbdfuse", "-P", str(self.pidfile), str(self.image), f"nbd+unix:///?socket={self.sock}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait(self.pidfile.exists, self.fuse, "nbdfuse")
        sh("mkfs.ext4", "-q", "-F", str(self.image))
        sh("mount", "-o", "loop", str(self.image), str(self.mnt))
        self.mounted = True

    @staticmethod
    def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], name: str) -> None:
        deadline = time.monotonic() + 20
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come up")
            time.sleep(0.05)

    def _command(self, c: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.control))
            s.sendall(c.encode())
            assert s.recv(1) == c.upper().encode(), f"pause filter did not take {c!r}"

    def pause(self) -> None:
        """Reads that reach the disk from now on hang (after the ones in flight finish)."""
        self._command("p")
        self.paused = True

    def resume(self) -> None:
        self._command("r")
        self.paused = False

    def drop_cache(self, path: Path) -> None:
        """Forget a file's pages here and the disk image's below it, so that its next read
        goes to the disk."""
        for p in (path, self.image):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Resume, unmount and end both processes; every step is tried, and it is safe to
        call more than once."""
        if self.paused and self.nbdkit is not None and self.nbdkit.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                self.resume()
        if self.mounted:
            if not _run("umount", str(self.mnt)):
                _run("umount", "-l", str(self.mnt))
            self.mounted = False
        if self.fuse is not None and not _run("fusermount3", "-u", str(self.fuse_dir)):
            _run("fusermount3", "-uz", str(self.fuse_dir))
        if self.nbdkit is not None and self.nbdkit.poll() is None:
            self.nbdkit.terminate()  # it outlives its clients
        for proc in (self.fuse, self.nbdkit):
            if proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.fuse = self.nbdkit = None


def _run(*args: str) -> bool:
    """A cleanup command: True when it worked, False when it failed or took over a minute."""
    try:
        return subprocess.run(args, capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False
