"""A real Kubernetes 1.20 control plane for the tests (etcd, kube-apiserver,
kube-controller-manager with the PV controller; no kubelet), from the scripts in
`tests/kube/testenv/` (see their README).

`build()` runs build.sh into a cache directory: $TANDEM_KUBE_TESTENV_CACHE, else
$XDG_CACHE_HOME/tandem/kube-testenv (~/.cache/...). Cold that is apt + a Go build of
several minutes; afterwards a second. `ControlPlane.up()` starts a cluster on free loopback
ports with its state under /tmp/tandem-kube/<owner pid>-<n>; `down()` stops it and removes
the state. A cluster a killed test run left behind is stopped by the next run.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "testenv"
STATE_ROOT = Path("/tmp/tandem-kube")
BUILD_TIMEOUT = 3600  # a cold build on a slow, busy machine


def cache_dir() -> Path:
    if os.environ.get("TANDEM_KUBE_TESTENV_CACHE"):
        return Path(os.environ["TANDEM_KUBE_TESTENV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tandem" / "kube-testenv"


def built(cache: Path) -> bool:
    """Whether a build is there already (build.sh then only checks it, in a second)."""
    return (cache / "bin" / ".stamp").exists() and (cache / "bin" / "kube-apiserver").exists()


def build(cache: Path, show_progress: bool = False) -> Path:
    """Build (or find built) the binaries; their directory. With `show_progress` the
    script's progress lines go to our stderr (a cold build takes minutes)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(SCRIPTS / "build.sh"), str(cache)],
        stdout=subprocess.PIPE,
        stderr=None if show_progress else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=BUILD_TIMEOUT)
    except BaseException:
        # SIGTERM: the script's trap stops the Go build it runs in a session of its own.
        proc.terminate()
        proc.wait(30)
        raise
    if proc.returncode != 0:
        raise RuntimeError(
            f"kube-testenv build.sh failed ({proc.returncode}):\n{(err or '')[-4000:]}"
        )
    if show_progress:
        print(f"kube-testenv built in {time.monotonic() - t0:.0f}s into {cache}", file=sys.stderr)
    return Path(out.strip().splitlines()[-1])


def _ports_free(base: int) -> bool:
    for port in range(base, base + 4):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def sweep_stale() -> None:
    """Stop clusters whose test run is gone (its pid is the state directory's prefix)."""
    if not STATE_ROOT.is_dir():
        return
    for state in STATE_ROOT.iterdir():
        owner = state.name.partition("-")[0]
        if owner.isdigit() and not _alive(int(owner)):
            subprocess.run(["bash", str(SCRIPTS / "down.sh"), str(state)], capture_output=True)
            shutil.rmtree(state, ignore_errors=True)


class ControlPlane:
    """One running control plane."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.kubectl_bin = cache / "bin" / "kubectl"
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        self.state = STATE_ROOT / f"{os.getpid()}-{random.randrange(16**6):06x}"
        self.kubeconfig = self.state / "kubeconfig"
        self.server = ""
        self.token = ""

    def up(self) -> ControlPlane:
        sweep_stale()
        for _ in range(10):
            base = random.randrange(20000, 30000, 4)
            if not _ports_free(base):
                continue
            r = subprocess.run(
                ["bash", str(SCRIPTS / "up.sh"), str(self.cache), str(self.state), str(base)],
                capture_output=True,
                text=True,
                timeout=180,
            )
            if r.returncode == 0:
                env = dict(
                    line.removeprefix("export ").split("=", 1)
                    for line in (self.state / "env").read_text().splitlines()
                    if "=" in line
                )
                self.server = env["KUBE_TESTENV_APISERVER"]
                self.token = env["KUBE_TESTENV_TOKEN"]
                return self
            if "already in use" not in r.stderr:  # a port taken meanwhile: another try
                raise RuntimeError(
                    f"kube-testenv up.sh failed ({r.returncode}):\n{r.stderr[-4000:]}"
                )
        raise RuntimeError("kube-testenv: no free ports found")

    def down(self) -> None:
        subprocess.run(["bash", str(SCRIPTS / "down.sh"), str(self.state)], capture_output=True)
        shutil.rmtree(self.state, ignore_errors=True)
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()  # when no other cluster is running

    def logs(self) -> str:
        out = []
        for path in sorted((self.state / "logs").glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [str(self.kubectl_bin), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """A kubeconfig that authenticates with `token` (e.g. a service account's)."""
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: t, cluster: {{server: '{self.server}', "
            "insecure-skip-tls-verify: true}}]\n"
            f"users: [{{name: t, user: {{token: '{token}'}}}}]\n"
            "contexts: [{name: t, context: {cluster: t, user: t}}]\n"
            "current-context: t\n"
        )
        path.chmod(0o600)
        return path
