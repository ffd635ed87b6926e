"""The Linux kernel initiator (open-iscsi's iscsiadm/iscsid) in a QEMU guest: discovery,
login, mkfs.ext4, mount, write, fsck, verify, logout; and, in reconnect mode, a target
restart while the guest writes, after which the session recovers with no write lost.

The guest harness is the shared tool ../shared/tools/vm-iscsiadm (it builds its image on
first use); the test is skipped where it is absent. The guest reaches the host's
127.0.0.1:PORT as 10.0.2.2:PORT and logs in there directly.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_iscsi_clients import IQN, MiB, ServerThread

ROOT = Path(__file__).resolve().parents[2]
RUN = Path(os.environ.get("VM_ISCSIADM", ROOT.parent / "shared/tools/vm-iscsiadm/run.sh"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not RUN.exists(), reason=f"{RUN} is not available"),
]


@pytest.fixture
def server() -> Iterator[ServerThread]:
    started = ServerThread(size=256 * MiB).start()
    yield started
    started.stop()
    started.check()


def run_guest(port: int, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(RUN), str(port), IQN],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def test_kernel_initiator_basic(server: ServerThread) -> None:
    out = run_guest(server.port)
    assert "15 passed, 0 failed" in out, out


def test_kernel_initiator_survives_a_target_restart(server: ServerThread, tmp_path: Path) -> None:
    port = server.port
    flag = tmp_path / "restart"
    done = threading.Event()

    def restart_when_asked() -> None:
        # The guest says when it is writing; the target then goes away for a moment and
        # comes back on the same port over the same device (its state survives, as a
        # volume's does on its replicas).
        while not done.is_set():
            if flag.exists():
                server.call(server.server.close())  # type: ignore[union-attr]
                time.sleep(1)
                server.call(server.restart(port))
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=restart_when_asked, daemon=True)
    watcher.start()
    try:
        out = run_guest(port, {"ITEST_MODE": "reconnect", "ITEST_ON_READY": f"touch {flag}"})
    finally:
        done.set()
        watcher.join(10)
    assert flag.exists()
    assert "18 passed, 0 failed" in out, out
