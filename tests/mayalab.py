"""Several Tandem nodes on one machine, for the control plane's integration tests.

An apiserver process and agent processes, each agent with its own pool and state. With
`netns=True` (needs root) every agent runs in its own network namespace, made with
pyroute2: a bridge in the root namespace holds the apiserver's address (.1 of a /24 of
10.77.0.0/16 chosen free), and a veth pair per node puts the node at .10+i, so volumes
are placed, lost and replaced across real addresses. Without namespaces all agents share
127.0.0.1 (one node, or several with relaxed anti-affinity in tests that only need one).

Everything made here is removed by close(), also when a test fails: processes (found by
the TANDEM_LAB marker in their environment, so the agents' children too), namespaces,
links and files (print `logs()` first). A lab left behind by a killed test run is swept
when the next starts (its owner pid is in /run/tandem-lab/<tag>.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
LAB_ENV = "TANDEM_LAB"
RUN_DIR = Path("/run/tandem-lab")
NETNS_DIR = Path("/var/run/netns")


# --- processes ---------------------------------------------------------------------------


def marked_pids(tag: str) -> list[int]:
    """Processes whose environment carries TANDEM_LAB=tag (agents' children inherit it)."""
    needle = f"{LAB_ENV}={tag}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                out.append(int(entry.name))
    return out


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


# --- the network -------------------------------------------------------------------------


class Network:
    """A bridge and one network namespace per node (pyroute2), removed by close()."""

    def __init__(self, tag: str) -> None:
        from pyroute2 import IPRoute

        self.tag = tag
        self.bridge = f"tlb{tag}"
        self.subnet = self._free_subnet()
        self.host_ip = f"{self.subnet}.1"
        self.namespaces: list[str] = []
        self.veths: list[str] = []
        self._record()
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            idx = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=idx, address=self.host_ip, prefixlen=24)
            ipr.link("set", index=idx, state="up")

    @staticmethod
    def _free_subnet() -> str:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            used = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}
        taken = {".".join(a.split(".")[:3]) for a in used if a}
        for _ in range(200):
            subnet = f"10.77.{random.randrange(1, 255)}"
            if subnet not in taken:
                return subnet
        raise RuntimeError("no free 10.77.x.0/24 subnet")

    def _record(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        doc = {"pid": os.getpid(), "bridge": self.bridge, "namespaces": self.namespaces}
        (RUN_DIR / f"{self.tag}.json").write_text(json.dumps(doc))

    def add_node(self, i: int) -> tuple[str, str]:
        """Namespace and address of node i (created now)."""
        from pyroute2 import IPRoute, NetNS, netns

        name = f"tandem-lab-{self.tag}-{i}"
        host_end, peer = f"tlv{self.tag}{i}", f"tlp{self.tag}{i}"
        netns.create(name)
        self.namespaces.append(name)
        self.veths.append(host_end)
        self._record()
        ip = f"{self.subnet}.{10 + i}"
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_end, kind="veth", peer={"ifname": peer, "net_ns_fd": name})
            idx = ipr.link_lookup(ifname=host_end)[0]
            bridge = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link("set", index=idx, master=bridge, state="up")
        with NetNS(name) as ns:
            idx = ns.link_lookup(ifname=peer)[0]
            ns.link("set", index=idx, ifname="eth0")
            ns.addr("add", index=idx, address=ip, prefixlen=24)
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        return name, ip

    def set_link(self, i: int, up: bool) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.veths[i])[0]
            ipr.link("set", index=idx, state="up" if up else "down")

    def close(self) -> None:
        remove_network(self.bridge, self.namespaces)
        with contextlib.suppress(FileNotFoundError):
            (RUN_DIR / f"{self.tag}.json").unlink()
        with contextlib.suppress(OSError):
            RUN_DIR.rmdir()  # when no other lab is running


def pids_in_netns(name: str) -> list[int]:
    try:
        ino = (NETNS_DIR / name).stat().st_ino
    except OSError:
        return []
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "ns" / "net").stat().st_ino == ino:
                    out.append(int(entry.name))
    return out


def remove_network(bridge: str, namespaces: list[str]) -> None:
    from pyroute2 import IPRoute, netns

    for name in namespaces:
        kill_all(pids_in_netns(name))
    prefix = "tlv" + bridge.removeprefix("tlb")
    with IPRoute() as ipr:
        # Delete the veths here: a namespace's own links go only when the kernel gets to it.
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if name.startswith(prefix) or name == bridge:
                with contextlib.suppress(Exception):
                    ipr.link("del", index=link["index"])
    for name in namespaces:
        with contextlib.suppress(OSError):
            netns.remove(name)


def sweep_stale_labs() -> None:
    """Remove what a killed earlier test run left behind."""
    if not RUN_DIR.is_dir():
        return
    for path in RUN_DIR.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if _alive(doc["pid"]):
                continue
            kill_all(marked_pids(path.stem))
            remove_network(doc["bridge"], doc["namespaces"])
            path.unlink()


# --- the lab -----------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Lab:
    """An apiserver and `nodes` agents; see the module docstring."""

    def __init__(
        self,
        base: Path,
        nodes: int,
        netns: bool = True,
        apiserver_args: tuple[str, ...] = (),
        labels: Callable[[int], dict[str, str]] | None = None,
    ) -> None:
        self.base = base
        self.tag = f"{random.randrange(16**5):05x}"
        self.env = {**os.environ, LAB_ENV: self.tag, "PYTHONUNBUFFERED": "1"}
        self.env.pop("TANDEM_TOKEN", None)
        self.net: Network | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ips: list[str] = []
        self.namespaces: list[str | None] = []
        self.labels = labels or (lambda i: {})
        self.apiserver_args = apiserver_args
        self.count = nodes
        self.home = base / "apiserver"
        try:
            if netns:
                sweep_stale_labs()
                self.net = Network(self.tag)
                self.host = self.net.host_ip
            else:
                self.host = "127.0.0.1"
            self.port = free_port(self.host)
            self.url = f"http://{self.host}:{self.port}"
        except BaseException:
            self.close()
            raise

    # processes

    def _spawn(self, name: str, args: list[str], netns: str | None = None) -> None:
        log = self.base / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        prefix = ["nsenter", f"--net={NETNS_DIR / netns}"] if netns else []
        with open(log, "ab") as f:
            self.procs[name] = subprocess.Popen(
                [*prefix, sys.executable, "-m", "maya", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env,
                start_new_session=True,
            )

    def start(self) -> Lab:
        try:
            self.start_apiserver()
            for i in range(self.count):
                self.add_node(i)
            self.wait(
                lambda: len([n for n in self.get("/v1/nodes") if n["ready"]]) == self.count,
                30,
                "every node registered",
            )
        except BaseException:
            self.close()
            raise
        return self

    def start_apiserver(self) -> None:
        self._spawn(
            "apiserver",
            [
                "apiserver",
                "--listen",
                f"{self.host}:{self.port}",
                "--data-dir",
                str(self.home),
                "--node-timeout",
                "1.5",
                "--replace-after",
                "3",
                "--poll-interval",
                "0.3",
                *self.apiserver_args,
            ],
        )
        self.wait(lambda: self._health(), 20, "the apiserver answering")
        self.token = (self.home / "apiserver.token").read_text().strip()
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def _health(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200
        return False

    def node_name(self, i: int) -> str:
        return f"node{i}"

    def add_node(self, i: int) -> None:
        if i >= len(self.node_ips):
            if self.net is not None:
                ns, ip = self.net.add_node(i)
            else:
                ns, ip = None, "127.0.0.1"
            self.namespaces.append(ns)
            self.node_ips.append(ip)
        self.start_agent(i)

    def start_agent(self, i: int) -> None:
        ip = self.node_ips[i]
        node_dir = self.base / self.node_name(i)
        label_args = [x for k, v in self.labels(i).items() for x in ("--label", f"{k}={v}")]
        self._spawn(
            self.node_name(i),
            [
                "agent",
                "--apiserver",
                self.url,
                "--node",
                self.node_name(i),
                "--pool",
                f"pool={node_dir / 'pool'}",
                "--listen",
                f"{ip}:{free_port(ip) if self.net is None else 5657}",
                "--state-dir",
                str(node_dir / "state"),
                "--token-file",
                str(self.home / "apiserver.token"),
                "--heartbeat",
                "0.3",
                # Nodes in network namespaces share one kernel: a socket would go around
                # the network whose faults these tests make.
                *(["--no-replica-sockets"] if self.net is not None else []),
                *label_args,
            ],
            self.namespaces[i],
        )

    def stop_agent(self, i: int, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(self.node_name(i))
        proc.send_signal(sig)
        proc.wait(15)

    def take_node_away(self, i: int) -> None:
        """The node is gone: everything running in it is killed, its link is down."""
        assert self.net is not None and self.namespaces[i] is not None
        self.procs.pop(self.node_name(i), None)
        kill_all(pids_in_netns(self.namespaces[i]))  # type: ignore[arg-type]
        self.net.set_link(i, up=False)

    def bring_node_back(self, i: int) -> None:
        assert self.net is not None
        self.net.set_link(i, up=True)
        self.start_agent(i)

    # the API

    def get(self, path: str) -> Any:
        r = self.http.get(path)
        r.raise_for_status()
        return r.json()

    def volume(self, name: str) -> dict[str, Any]:
        return self.get(f"/v1/volumes/{name}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`tandem ARGS` as a user on the apiserver's host runs it (token from the file)."""
        env = {**self.env, "TANDEM_HOME": str(self.home), "TANDEM_APISERVER": self.url}
        r = subprocess.run(
            [sys.executable, "-m", "maya", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"tandem {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError):
                last = cond()
                if last:
                    return last
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")

    def wait_phase(self, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            v = self.volume(name)
            return v if v["phase"] == phase else None

        return self.wait(check, timeout, f"{name} {phase}")

    # cleanup

    def logs(self) -> str:
        out = []
        for path in sorted((self.base / "logs").glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        for path in sorted(self.base.glob("node*/state/logs/*/*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kill_all(marked_pids(self.tag))  # the agents' children live in their own sessions
        if self.net is not None:
            self.net.close()
        with contextlib.suppress(AttributeError):
            self.http.close()
        shutil.rmtree(self.base, ignore_errors=True)  # pools, records, logs (printed on failure)
