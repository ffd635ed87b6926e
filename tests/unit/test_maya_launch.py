"""The command lines an agent runs: a replica's unix socket (replica/transport.py)."""

from __future__ import annotations

from maya.agent import launch
from maya.agent.records import ProcRecord


def replica(data_dir: str) -> ProcRecord:
    return ProcRecord(
        id="r1",
        volume="vol",
        role="replica",
        cluster_id="c",
        spec={"size": 1 << 30},
        ports={"data": 9502, "api": 9503},
        log="/tmp/r1.log",
        data_dir=data_dir,
    )


def test_replica_serves_a_socket_beside_its_directory() -> None:
    argv, _ = launch.command(replica("/srv/pool/vol-r1/"), "10.0.0.5")
    assert argv[argv.index("--socket") + 1] == "/srv/pool/vol-r1.sock"
    assert argv[argv.index("--listen") + 1] == "10.0.0.5:9502"


def test_no_socket_when_turned_off_or_the_path_is_too_long() -> None:
    argv, _ = launch.command(replica("/srv/pool/vol-r1"), "10.0.0.5", sockets=False)
    assert "--socket" not in argv
    long_dir = "/srv/" + "p" * launch.MAX_SOCKET_PATH
    argv, _ = launch.command(replica(long_dir), "10.0.0.5")
    assert "--socket" not in argv  # bind() would refuse it: TCP only
    assert launch.replica_socket(replica(long_dir)) is None
