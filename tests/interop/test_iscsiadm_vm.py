"""The Linux kernel initiator (open-iscsi iscsiadm/iscsid) in a QEMU guest against a real
3-replica Tandem volume: discovery, login, mkfs.ext4, mount, write, fsck, verify, logout;
and, in reconnect mode, the target process killed and restarted while the guest writes,
after which the session recovers and no write is lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.procs import Cluster

HERE = Path(__file__).resolve().parent
RUN = HERE / "vm-iscsiadm" / "run.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None and os.geteuid() != 0,
        reason="needs qemu-system-x86 (installed by the harness as root)",
    ),
]


def run_guest(port: int, iqn: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["bash", str(RUN), str(port), iqn],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "ITEST_TIMEOUT": "400", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return proc.stdout


def test_iscsiadm_login_mkfs_mount_verify(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = make_cluster(size=256 << 20).start()
    out = run_guest(c.iscsi_port, c.iqn)
    assert "15 passed, 0 failed" in out, out


def test_iscsiadm_session_survives_target_restart(  # type: ignore[no-untyped-def]
    make_cluster, tmp_path: Path
) -> None:
    c: Cluster = make_cluster(size=256 << 20).start()
    flag = tmp_path / "restart"
    # When the guest is writing, the harness touches the flag; the test's helper script
    # kills the target (kill -9) and starts it again on the same ports.
    helper = tmp_path / "restart.sh"
    helper.write_text(f"touch {flag}\n")
    done = threading.Event()

    def restart_when_asked() -> None:
        while not done.is_set():
            if flag.exists():
                assert c.target is not None
                c.target.kill9()
                time.sleep(1)
                c.start_target()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=restart_when_asked, daemon=True)
    watcher.start()
    try:
        out = run_guest(
            c.iscsi_port, c.iqn, {"ITEST_MODE": "reconnect", "ITEST_ON_READY": f"bash {helper}"}
        )
    finally:
        done.set()
        watcher.join(30)
    assert flag.exists(), "the guest never asked for the restart"
    assert "18 passed, 0 failed" in out, out
