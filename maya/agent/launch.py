"""Command lines for the processes an agent runs (`tandem replica serve`, `target serve`).

Secrets go in the environment, not on the command line (which any local user can read).
"""

from __future__ import annotations

import sys

from maya.agent.records import ProcRecord

PREFIX = [sys.executable, "-m", "maya"]


def addresses(rec: ProcRecord, host: str) -> dict[str, str]:
    return {kind: f"{host}:{port}" for kind, port in rec.ports.items()}


# The longest unix socket path bind() takes is 107 bytes; a longer one means TCP only.
MAX_SOCKET_PATH = 100


def replica_socket(rec: ProcRecord) -> str | None:
    """Where a replica serves its unix socket: beside its directory (not in it: the store
    owns what is inside)."""
    assert rec.data_dir is not None
    path = rec.data_dir.rstrip("/") + ".sock"
    return path if len(path.encode()) <= MAX_SOCKET_PATH else None


def command(rec: ProcRecord, host: str, sockets: bool = True) -> tuple[list[str], dict[str, str]]:
    """(argv after PREFIX, extra environment) for the record's current assignment; with
    sockets, a replica also serves a unix socket (replica/transport.py)."""
    spec, ports = rec.spec, rec.ports
    if rec.role == "replica":
        assert rec.data_dir is not None
        path = replica_socket(rec) if sockets else None
        return [
            "replica",
            "serve",
            "--dir",
            rec.data_dir,
            "--size",
            str(spec["size"]),
            "--volume",
            rec.volume,
            "--listen",
            f"{host}:{ports['data']}",
            "--api",
            f"{host}:{ports['api']}",
            *(["--socket", path] if path else []),
        ], {}
    argv = [
        "target",
        "serve",
        "--volume",
        rec.volume,
        "--size",
        str(spec["size"]),
        "--replica-count",
        str(spec["replica_count"]),
        "--api",
        f"{host}:{ports['api']}",
        "--iqn",
        spec["iqn"],
        "--rebuild-rate",
        str(spec.get("rebuild_bps", 0)),
    ]
    for address in spec["replicas"]:
        argv += ["--replica", address]
    argv += ["--nbd", f"{host}:{ports['nbd']}"] if "nbd" in ports else ["--no-nbd"]
    if "iscsi" in ports:
        argv += ["--iscsi", f"{host}:{ports['iscsi']}"]
    env: dict[str, str] = {}
    chap = spec.get("chap")
    if chap:
        argv += ["--chap-user", chap["user"]]
        env["TANDEM_CHAP_SECRET"] = chap["secret"]
        if chap.get("mutual_user"):
            argv += ["--mutual-chap-user", chap["mutual_user"]]
            env["TANDEM_MUTUAL_CHAP_SECRET"] = chap["mutual_secret"]
    for iqn in spec.get("allowed_initiators", []):
        argv += ["--allow-initiator", iqn]
    qos = spec.get("qos", {})
    for flag, key in (
        ("--iops-limit", "total_iops"),
        ("--read-iops-limit", "read_iops"),
        ("--write-iops-limit", "write_iops"),
        ("--bps-limit", "total_bps"),
        ("--read-bps-limit", "read_bps"),
        ("--write-bps-limit", "write_bps"),
    ):
        if qos.get(key):
            argv += [flag, str(qos[key])]
    if "burst_seconds" in qos:
        argv += ["--qos-burst", str(qos["burst_seconds"])]
    return argv, env


def main_port(rec: ProcRecord) -> int:
    """The port that answers once the process is up (a target's API comes first)."""
    return rec.ports["data"] if rec.role == "replica" else rec.ports["api"]
