"""The servers under test, as real processes on 127.0.0.1: Tandem volumes and the references.

Every process is known by the PID this run started (or, for a daemon, the PID in the pidfile it
was told to write) and only those PIDs are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
TANDEM = [sys.executable, "-m", "maya"]  # the `tandem` CLI of this checkout, like tests/procs.py
CLK_TCK = os.sysconf("SC_CLK_TCK")


_given: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this run (its server may not be up yet)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port


# --- /proc: CPU time and port ownership -------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may contain spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    """starttime (field 22) of a live PID, which tells a reused PID apart; None when gone."""
    try:
        f = _stat_fields(pid)
        return None if f[0] in ("Z", "X") else int(f[19])  # a zombie is gone, only unreaped
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """PID and all its live descendants (a server may fork helpers; their CPU counts too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime of the given processes and their descendants, all threads included."""
    total = 0
    for root in pids:
        for p in descendants(root):
            with contextlib.suppress(OSError, ValueError, IndexError):
                f = _stat_fields(p)
                total += int(f[11]) + int(f[12])  # fields 14 and 15: utime, stime
    return total / CLK_TCK


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(cols[9])
    return inodes


def owns_port(pid: int, port: int) -> bool:
    """Whether PID (or a descendant) listens on port: not some other process that got it first."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{p}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return True
    return False


# --- processes ---------------------------------------------------------------------------------


class Child:
    """One process this run started. With pidfile, a daemon: the launcher exits, the PID is read
    from the pidfile. stop() is idempotent and signals only that PID (checked by start time)."""

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, pidfile: Path | None = None
    ) -> None:
        self.name, self.argv, self.pidfile = name, argv, pidfile
        self.log = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._start: int | None = None

    def start(self) -> Child:
        with open(self.log, "ab") as log:
            # Own session: Ctrl-C in the terminal reaches only the runner, which stops us in order.
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
        if self.pidfile is None:
            self._pid = self.popen.pid
        else:
            if self.popen.wait(30) != 0:
                raise RuntimeError(f"{self.name} failed to start:\n{self.tail()}")
            deadline = time.monotonic() + 10
            while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} wrote no pidfile {self.pidfile}")
                time.sleep(0.05)
            self._pid = int(self.pidfile.read_text())
        self._start = _start_time(self._pid)
        return self

    @property
    def pid(self) -> int:
        assert self._pid is not None, f"{self.name} not started"
        return self._pid

    def alive(self) -> bool:
        if self._pid is None:
            return False
        if self.popen is not None and self.pidfile is None:
            return self.popen.poll() is None
        return self._start is not None and _start_time(self._pid) == self._start

    def wait_listening(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not owns_port(self.pid, port):
            if not self.alive():
                raise RuntimeError(f"{self.name} exited before listening on {port}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not listening on {HOST}:{port} after {timeout}s")
            time.sleep(0.05)

    def _signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = 10) -> None:
        if self._pid is None and self.pidfile is not None and self.pidfile.exists():
            # Interrupted between the daemon's fork and our reading its pidfile.
            with contextlib.suppress(ValueError, OSError):
                self._pid = int(self.pidfile.read_text())
                self._start = _start_time(self._pid)
        if self._pid is not None:
            self._signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self._signal(signal.SIGTERM)
            if not self.wait_gone(timeout):
                self._signal(signal.SIGKILL)
                self.wait_gone(5)
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()  # the launcher of a daemon that never forked
        if self.popen is not None:
            self.popen.wait()

    def tail(self, n: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


# --- what Tandem can do: detected in this one place --------------------------------------------


@dataclass(frozen=True)
class TandemFeatures:
    iscsi: bool  # `tandem target serve --iscsi HOST:PORT`
    iqn_option: bool  # `--iqn`; without it the default iqn.2026-11.io.tandem:<volume> applies
    engines: tuple[str | None, ...]  # (None,) while there is no --engine option
    replica_engine: bool  # `tandem replica serve --engine` too
    replica_socket: bool  # `tandem replica serve --socket PATH`: the target on this host uses it

    @classmethod
    def detect(cls) -> TandemFeatures:
        def helptext(*cmd: str) -> str:
            r = subprocess.run(
                [*TANDEM, *cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
            )
            if r.returncode != 0:
                raise RuntimeError(f"tandem {' '.join(cmd)} --help failed:\n{r.stderr}")
            return r.stdout

        target, replica = helptext("target", "serve"), helptext("replica", "serve")
        engines: tuple[str | None, ...] = (None,)
        if re.search(r"--engine\b", target):
            m = re.search(r"--engine\s+\[([\w|]+)\]", target)
            engines = tuple(m.group(1).split("|")) if m else ("python", "native")
        return cls(
            iscsi=bool(re.search(r"--iscsi\b", target)),
            iqn_option=bool(re.search(r"--iqn\b", target)),
            engines=engines,
            replica_engine=bool(re.search(r"--engine\b", replica)),
            replica_socket=bool(re.search(r"--socket\b", replica)),
        )


# --- deployments: what gets started, and the columns each one serves --------------------------


@dataclass
class Endpoint:
    """One column of the tables: a protocol endpoint of a deployment."""

    name: str
    protocol: str  # "nbd" | "iscsi"
    kind: str  # "tandem" | "reference"
    url: str = ""
    replicas: int | None = None
    engine: str | None = None
    procs: list[Child] = field(default_factory=list)  # whose CPU is "the server's"

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.procs]


class Deployment:
    """Processes serving one volume or backing file; subclasses fill in start()."""

    def __init__(self, name: str, base: Path, size: int) -> None:
        self.name, self.size = name, size
        self.dir = base / name
        self.dir.mkdir(parents=True)
        self.children: list[Child] = []
        self.endpoints: list[Endpoint] = []

    def child(self, name: str, argv: list[str], pidfile: Path | None = None) -> Child:
        c = Child(name, argv, self.dir, pidfile)
        self.children.append(c)  # before start: a half-started deployment is still stopped
        return c.start()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for c in reversed(self.children):
            c.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ({c.log})\n{c.tail()}" for c in self.children)

    def backing_file(self) -> Path:
        path = self.dir / "disk.img"
        with open(path, "wb") as f:
            f.truncate(self.size)  # filled by the precondition pass through the server
        return path


class TandemVolume(Deployment):
    """One Tandem volume: N replicas and a target serving NBD (and iSCSI when it can)."""

    def __init__(
        self, base: Path, size: int, replicas: int, engine: str | None, feats: TandemFeatures
    ) -> None:
        suffix = f"-{engine}" if engine else ""
        super().__init__(f"tandem-{replicas}{suffix}", base, size)
        self.replicas, self.engine, self.feats = replicas, engine, feats
        self.volume = f"perf{replicas}{engine or ''}"
        self.iqn = f"iqn.2026-11.io.tandem:{self.volume}"
        self.nbd = Endpoint(f"tandem-nbd-{replicas}{suffix}", "nbd", "tandem", replicas=replicas)
        self.endpoints = [self.nbd]
        self.iscsi: Endpoint | None = None
        if feats.iscsi:
            self.iscsi = Endpoint(
                f"tandem-iscsi-{replicas}{suffix}", "iscsi", "tandem", replicas=replicas
            )
            self.endpoints.append(self.iscsi)
        for e in self.endpoints:
            e.engine = engine

    def start(self) -> None:
        engine = ["--engine", self.engine] if self.engine else []
        addrs = []
        for i in range(self.replicas):
            data = free_port()
            argv = [*TANDEM, "replica", "serve", "--dir", str(self.dir / f"r{i}")]
            argv += ["--size", str(self.size), "--volume", self.volume]
            argv += ["--listen", f"{HOST}:{data}", "--api", f"{HOST}:{free_port()}"]
            if self.feats.replica_socket:  # replicas on this host, as a co-located replica is
                argv += ["--socket", str(self.dir / f"r{i}.sock")]
            r = self.child(f"replica-{i}", argv + (engine if self.feats.replica_engine else []))
            r.wait_listening(data)
            addrs.append(f"{HOST}:{data}")
        nbd = free_port()
        argv = [*TANDEM, "target", "serve", "--volume", self.volume, "--size", str(self.size)]
        argv += ["--nbd", f"{HOST}:{nbd}", "--api", f"{HOST}:{free_port()}", *engine]
        for a in addrs:
            argv += ["--replica", a]
        iscsi = free_port() if self.iscsi else None
        if iscsi:
            argv += ["--iscsi", f"{HOST}:{iscsi}"]
            if self.feats.iqn_option:
                argv += ["--iqn", self.iqn]
        target = self.child("target", argv)
        target.wait_listening(nbd)
        self.nbd.url = f"nbd://{HOST}:{nbd}/{self.volume}"
        if self.iscsi and iscsi:
            target.wait_listening(iscsi)
            self.iscsi.url = f"iscsi://{HOST}:{iscsi}/{self.iqn}/0"
        for e in self.endpoints:
            e.procs = list(self.children)  # target and every replica


class Reference(Deployment):
    """A reference target: one file-backed export, one column named NAME."""

    NAME: ClassVar[str]
    PROTOCOL: ClassVar[str]
    TOOLS: ClassVar[tuple[str, ...]]

    def __init__(self, base: Path, size: int) -> None:
        super().__init__(self.NAME, base, size)
        self.endpoints = [Endpoint(self.NAME, self.PROTOCOL, "reference")]

    @classmethod
    def missing_tools(cls) -> list[str]:
        return [t for t in cls.TOOLS if shutil.which(t) is None]


class Nbdkit(Reference):
    NAME, PROTOCOL, TOOLS = "nbdkit", "nbd", ("nbdkit",)

    def start(self) -> None:
        port, disk = free_port(), self.backing_file()
        # As a daemon with a pidfile: in the foreground it may exit with its launching shell.
        pidfile = self.dir / "nbdkit.pid"
        argv = ["nbdkit", "-P", str(pidfile), "-i", HOST, "-p", str(port), "file", str(disk)]
        c = self.child("nbdkit", argv, pidfile=pidfile)
        c.wait_listening(port)
        self.endpoints[0].url = f"nbd://{HOST}:{port}/"
        self.endpoints[0].procs = [c]


class QemuNbd(Reference):
    NAME, PROTOCOL, TOOLS = "qemu-nbd", "nbd", ("qemu-nbd",)

    def start(self) -> None:
        port, disk = free_port(), self.backing_file()
        # -t --shared: without them qemu-nbd serves one client and exits.
        argv = ["qemu-nbd", "-f", "raw", "-b", HOST, "-p", str(port), "-t", "--shared=16"]
        argv += ["--cache=writeback", "--aio=io_uring", str(disk)]
        c = self.child("qemu-nbd", argv)
        c.wait_listening(port)
        self.endpoints[0].url = f"nbd://{HOST}:{port}/"
        self.endpoints[0].procs = [c]


TGTD_SOCKETS = Path("/var/run/tgtd")


class Tgtd(Reference):
    """tgtd with an rdwr LUN on a file, on its own control port so it never meets another tgtd."""

    NAME, PROTOCOL, TOOLS = "tgtd", "iscsi", ("tgtd", "tgtadm")
    IQN = "iqn.2026-11.io.tandem:perf-tgtd"

    def __init__(self, base: Path, size: int) -> None:
        super().__init__(base, size)
        self.ctl: int | None = None

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["tgtadm", "-C", str(self.ctl), *args], capture_output=True, text=True, timeout=30
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def start(self) -> None:
        port, disk = free_port(), self.backing_file()
        # The control port is a unix socket /var/run/tgtd/socket.N: pick an N nobody uses.
        while True:
            self.ctl = random.randrange(20000, 32768)  # tgtd accepts 0-32767
            if not any(TGTD_SOCKETS.glob(f"socket.{self.ctl}*")):
                break
        c = self.child(
            "tgtd", ["tgtd", "-f", "-C", str(self.ctl), "--iscsi", f"portal={HOST}:{port}"]
        )
        deadline = time.monotonic() + 15
        while self.tgtadm("--op", "show", "--mode", "sys", check=False).returncode != 0:
            if not c.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"tgtd did not come up:\n{c.tail()}")
            time.sleep(0.1)
        # tgtd keeps running when it cannot bind its portal: make sure it is ours.
        c.wait_listening(port, timeout=10)
        lld = ["--lld", "iscsi", "--tid", "1"]
        self.tgtadm(*lld, "--op", "new", "--mode", "target", "-T", self.IQN)
        lun = ["--lun", "1", "-E", "rdwr", "-b", str(disk)]
        self.tgtadm(*lld, "--op", "new", "--mode", "logicalunit", *lun)
        self.tgtadm(*lld, "--op", "bind", "--mode", "target", "-I", "ALL")
        self.endpoints[0].url = f"iscsi://{HOST}:{port}/{self.IQN}/1"  # LUN 0 is the controller
        self.endpoints[0].procs = [c]

    def stop(self) -> None:
        for c in self.children:
            # tgtd ignores SIGTERM while it has targets, and refuses "delete system" while a
            # target exists: delete the target (with its sessions), then the system.
            if c.alive():
                lld = ["--lld", "iscsi", "--tid", "1"]
                self.tgtadm(*lld, "--op", "delete", "--mode", "target", "--force", check=False)
                self.tgtadm("--op", "delete", "--mode", "system", check=False)
                c.wait_gone(10)
            c.stop()
            if self.ctl is not None and not c.alive():
                for stale in TGTD_SOCKETS.glob(f"socket.{self.ctl}*"):
                    stale.unlink(missing_ok=True)
