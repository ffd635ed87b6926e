"""`tandem up` (what `make run` starts) as a user runs it: a volume that nbdinfo and
iscsi-ls see, a clean stop on Ctrl-C, and the same volume and data at the next start."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mayalab import LAB_ENV, ROOT, free_port, kill_all, marked_pids

pytestmark = pytest.mark.timeout(150)

HOST = "127.0.0.1"


class Up:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.tag = f"up{random.randrange(16**5):05x}"
        self.ports = {k: free_port(HOST) for k in ("nbd", "iscsi", "api", "agent")}
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = base / "up.out"

    def start(self) -> str:
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "maya",
                    "up",
                    "--data-dir",
                    str(self.data),
                    "--size",
                    "64M",
                    "--nbd-port",
                    str(self.ports["nbd"]),
                    "--iscsi-port",
                    str(self.ports["iscsi"]),
                    "--apiserver-port",
                    str(self.ports["api"]),
                    "--agent-port",
                    str(self.ports["agent"]),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, LAB_ENV: self.tag},
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.out.read_text()
            if "Ctrl-C stops everything" in text:
                return text
            assert self.proc.poll() is None, text
            time.sleep(0.1)
        raise AssertionError(self.out.read_text())

    def stop(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(30)
        deadline = time.monotonic() + 5
        while marked_pids(self.tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        return code

    def cli(self, *args: str) -> str:
        env = {
            **os.environ,
            "TANDEM_HOME": str(self.data),
            "TANDEM_APISERVER": f"http://{HOST}:{self.ports['api']}",
        }
        return subprocess.run(
            [sys.executable, "-m", "maya", *args],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            cwd=ROOT,
        ).stdout

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        kill_all(marked_pids(self.tag))
        shutil.rmtree(self.data, ignore_errors=True)


def run(*args: str) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_up_twice_serves_the_same_volume(tmp_path: Path) -> None:
    up = Up(tmp_path)
    try:
        text = up.start()
        uri = f"nbd://{HOST}:{up.ports['nbd']}/demo"
        portal = f"{HOST}:{up.ports['iscsi']}"
        assert "anti-affinity is relaxed" in text
        assert f"NBD URI   {uri}" in text
        assert f"portal {portal}  IQN iqn.2026-11.io.tandem:demo  LUN 0" in text
        assert run("nbdinfo", "--size", uri).strip() == str(64 << 20)
        listing = run("iscsi-ls", "-s", f"iscsi://{portal}")
        assert "iqn.2026-11.io.tandem:demo" in listing and "Lun:0" in listing
        run("qemu-io", "-f", "raw", uri, "-c", "write -P 0x3c 1M 1M")
        vols = json.loads(up.cli("volume", "list", "--json"))
        assert [(v["name"], v["phase"], v["replica_count"]) for v in vols] == [
            ("demo", "Healthy", 3)
        ]
        assert len({r["node"] for r in vols[0]["replicas"]}) == 1

        assert up.stop(signal.SIGINT) == 0
        assert not marked_pids(up.tag), "a process outlived tandem up"
        assert "stopping Tandem" in up.out.read_text()

        text = up.start()
        assert "reusing volume 'demo'" in text and f"NBD URI   {uri}" in text
        run("qemu-io", "-f", "raw", uri, "-c", "read -P 0x3c 1M 1M")
        assert up.stop(signal.SIGTERM) == 0
        assert not marked_pids(up.tag)
    except BaseException:
        print(up.out.read_text())
        for log in sorted(up.data.glob("agent/logs/*/*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        up.cleanup()
