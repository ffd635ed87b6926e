"""Real Tandem processes on 127.0.0.1 for the integration tests, always cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout}s")


def http_json(url: str, method: str = "GET", body: Any = None, timeout: float = 10) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Proc:
    """A child process with its output in a log file; stop() is idempotent."""

    def __init__(
        self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.args = name, args
        self.log = log_dir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0  # where this run's output starts in the (appended) log

    def start(self) -> Proc:
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maya", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_output(self, text: str, timeout: float = 30) -> None:
        """Wait until this run printed `text` (its banner, printed once it listens). Not
        wait_port: a port that answers may be another process's that took the free port
        first, while this one exits with "Address already in use"."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                f.seek(self._log_from)
                if text in f.read().decode(errors="replace"):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"process {self.proc.args} exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not print {text!r} in {timeout}s")


class Cluster:
    """N replicas and one target for a volume, all real processes on loopback."""

    def __init__(
        self,
        base: Path,
        size: int = 64 << 20,
        replicas: int = 3,
        volume: str = "vol",
        timeout: float = 2.0,
        env: dict[str, str] | None = None,
        sockets: frozenset[int] = frozenset(),
        replica_args: tuple[str, ...] = (),
    ) -> None:
        self.base, self.size, self.volume, self.timeout = base, size, volume, timeout
        self.env = env
        self.replica_args = replica_args
        self.sockets = sockets  # replicas that also serve a unix socket (the target uses it)
        self.log_dir = base / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.replica_ports = [(free_port(), free_port()) for _ in range(replicas)]
        self.replicas: list[Proc] = [self._replica(i) for i in range(replicas)]
        self.nbd_port, self.api_port, self.iscsi_port = free_port(), free_port(), free_port()
        self.target: Proc | None = None
        self.proxies: dict[int, Any] = {}
        self.mounts: list[Path] = []

    def _replica(self, i: int) -> Proc:
        data, api = self.replica_ports[i]
        return Proc(
            f"replica-{i}",
            [
                "replica",
                "serve",
                "--dir",
                str(self.base / f"r{i}"),
                "--size",
                str(self.size),
                "--volume",
                self.volume,
                "--listen",
                f"{HOST}:{data}",
                "--api",
                f"{HOST}:{api}",
                *(["--socket", str(self.socket_path(i))] if i in self.sockets else []),
                *self.replica_args,
            ],
            self.log_dir,
            self.env,
        )

    def socket_path(self, i: int) -> Path:
        return self.base / f"r{i}.sock"

    @property
    def replica_addresses(self) -> list[str]:
        """What the target is told: a fault proxy's address where one sits in between."""
        return [
            self.proxies[i].address if i in self.proxies else f"{HOST}:{d}"
            for i, (d, _) in enumerate(self.replica_ports)
        ]

    def add_proxy(self, i: int) -> Any:
        """Put a fault proxy between the target and replica i (before start_target)."""
        from tests.faultproxy import FaultProxy

        assert i not in self.sockets, "the target would go around the proxy (unix socket)"
        self.proxies[i] = FaultProxy(self.replica_ports[i][0]).start()
        return self.proxies[i]

    def mount_tmpfs(self, i: int, size: int) -> Path:
        """Replica i's directory on a small tmpfs of its own (to fill its disk)."""
        d = self.base / f"r{i}"
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
        self.mounts.append(d)
        return d

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.nbd_port}/{self.volume}"

    @property
    def iqn(self) -> str:
        return f"iqn.2026-11.io.tandem:{self.volume}"

    @property
    def iscsi_url(self) -> str:
        return f"iscsi://{HOST}:{self.iscsi_port}/{self.iqn}/0"

    @property
    def api(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    def start_replica(self, i: int) -> None:
        self.replicas[i] = self._replica(i)
        self.replicas[i].start()
        self.replicas[i].wait_output(f"data {HOST}:{self.replica_ports[i][0]} ")

    def start_target(self, extra: list[str] | None = None, only: list[int] | None = None) -> None:
        args = [
            "target",
            "serve",
            "--volume",
            self.volume,
            "--size",
            str(self.size),
            "--nbd",
            f"{HOST}:{self.nbd_port}",
            "--api",
            f"{HOST}:{self.api_port}",
            "--iscsi",
            f"{HOST}:{self.iscsi_port}",
            "--replica-timeout",
            str(self.timeout),
            *(extra or []),
        ]
        for i, a in enumerate(self.replica_addresses):
            if only is None or i in only:
                args += ["--replica", a]
        self.target = Proc("target", args, self.log_dir, self.env).start()
        self.target.wait_output(f"nbd://{HOST}:{self.nbd_port}/", timeout=30)

    def start(self) -> Cluster:
        """First start. Free ports are picked before the processes bind them, so another
        process can take one in between: then pick new ones and try again."""
        for i in range(len(self.replicas)):
            self._first_start(lambda i=i: self.start_replica(i), self.replicas, i)
        self._first_start(self.start_target, None, 0)
        return self

    def _first_start(self, start: Any, procs: list[Proc] | None, i: int) -> None:
        for attempt in range(3):
            try:
                start()
                return
            except RuntimeError:
                proc = procs[i] if procs is not None else self.target
                if attempt == 2 or proc is None or "already in use" not in proc.output():
                    raise
            if procs is not None:
                self.replica_ports[i] = (free_port(), free_port())
            else:
                self.nbd_port, self.api_port, self.iscsi_port = (
                    free_port(),
                    free_port(),
                    free_port(),
                )

    def status(self) -> dict[str, Any]:
        return http_json(f"{self.api}/v1/volume")

    def modes(self) -> list[str]:
        by_addr = {r["address"]: r["mode"] for r in self.status()["replicas"]}
        return [by_addr.get(a, "-") for a in self.replica_addresses]

    def wait_modes(self, want: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.modes() == want:
                return
            time.sleep(0.1)
        raise AssertionError(f"replica modes {self.modes()} != {want} after {timeout}s")

    def stop(self) -> None:
        if self.target is not None:
            self.target.stop()
        for r in self.replicas:
            r.stop()
        for proxy in self.proxies.values():
            proxy.stop()
        for d in self.mounts:
            subprocess.run(["umount", "-l", str(d)], check=False)
        self.mounts.clear()

    def logs(self) -> str:
        procs = [*self.replicas, *([self.target] if self.target else [])]
        return "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in procs)
