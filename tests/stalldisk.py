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
from pathlib import Path

from tests import fusedisk


def missing() -> str | None:
    """Why a stall disk cannot be made here, or None."""
    if not shutil.which("nbdkit"):
        return "needs nbdkit"
    if why := fusedisk.missing():
        return why
    probe = ["nbdkit", "--filter=pause", "memory", "1M", "--dump-plugin"]
    if subprocess.run(probe, capture_output=True, timeout=30).returncode:
        return "needs nbdkit's memory plugin and pause filter"
    return None


class StallDisk:
    """Mounted at `mnt` once started; `pause()` and `resume()` hang and free its reads."""

    def __init__(self, base: Path, mnt: Path, size: int) -> None:
        self.base, self.size = base, size
        self.sock, self.control = base / "nbdkit.sock", base / "pause.sock"
        self.disk = fusedisk.FuseDisk(base, f"nbd+unix:///?socket={self.sock}", mnt)
        self.image = self.disk.image
        self.nbdkit: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> StallDisk:
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self.nbdkit = subprocess.Popen(
                ["nbdkit", "-f", "-U", str(self.sock), "--filter=pause", "memory",
                 str(self.size), f"pause-control={self.control}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            ready = lambda: self.sock.exists() and self.control.exists()  # noqa: E731
            fusedisk.wait_for(ready, self.nbdkit, "nbdkit")
            self.disk.start()
            self.disk.mkfs()
            self.disk.mount()
        except BaseException:
            self.close()
            raise
        return self

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
        self.disk.close()
        if self.nbdkit is None:
            return
        if self.nbdkit.poll() is None:
            self.nbdkit.terminate()  # it outlives its clients
        fusedisk.reap(self.nbdkit)
        self.nbdkit = None
