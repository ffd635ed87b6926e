"""Online growth and snapshots through the target API, on real processes."""

from __future__ import annotations

import json
import subprocess
import urllib.error

import pytest

from tests.procs import HOST, Cluster, http_json
from tests.workload import VerifyingWriter

MiB = 1 << 20


def nbd_size(uri: str) -> int:
    out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, check=True)
    return int(out.stdout)


def api_error(url: str, method: str, body: object) -> int:
    with pytest.raises(urllib.error.HTTPError) as e:
        http_json(url, method, body)
    return e.value.code


def test_online_resize_keeps_data_and_reaches_every_client(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = make_cluster(size=32 * MiB).start()
    w = VerifyingWriter(c.uri, 32 * MiB, seed=11).start()
    import time

    time.sleep(1)
    c.replicas[2].kill9()  # away during the resize: grown and rebuilt when it returns
    time.sleep(0.3)
    w.stop()
    st = http_json(f"{c.api}/v1/volume/resize", "POST", {"size": 64 * MiB})
    assert st["size"] == 64 * MiB
    assert nbd_size(c.uri) == 64 * MiB  # a new NBD connection sees it
    cap = subprocess.run(
        ["iscsi-readcapacity16", c.iscsi_url], capture_output=True, text=True, check=True
    ).stdout
    assert f"Total size:{64 * MiB}" in cap
    for _, api in c.replica_ports[:2]:
        assert http_json(f"http://{HOST}:{api}/v1/replica")["size"] == 64 * MiB
    # The new space is usable, the old data intact.
    subprocess.run(
        ["qemu-io", "-f", "raw", c.uri, "-c", f"write -P 0x3c {63 * MiB} 1M"],
        check=True,
        capture_output=True,
    )
    w.verify()
    c.start_replica(2)
    c.wait_modes(["RW", "RW", "RW"], timeout=60)
    assert http_json(f"http://{HOST}:{c.replica_ports[2][1]}/v1/replica")["size"] == 64 * MiB
    assert c.status()["replicas"][2]["last_rebuild"]["kind"] == "full"
    # A target restarted with the old --size adopts what the replicas hold.
    assert c.target is not None
    c.target.stop()
    c.start_target()
    assert nbd_size(c.uri) == 64 * MiB
    w.verify()
    # Shrinking and nonsense are refused with a clear 4xx.
    assert api_error(f"{c.api}/v1/volume/resize", "POST", {"size": 16 * MiB}) == 400
    assert api_error(f"{c.api}/v1/volume/resize", "POST", {"size": 12345}) == 400
    assert api_error(f"{c.api}/v1/volume/resize", "POST", {"size": -1}) == 422


def test_snapshots_create_list_and_refusals(cluster: Cluster) -> None:
    subprocess.run(
        ["qemu-io", "-f", "raw", cluster.uri, "-c", "write -P 0x11 0 1M"],
        check=True,
        capture_output=True,
    )
    assert http_json(f"{cluster.api}/v1/volume/snapshots", "POST", {"name": "s1"}) == {"name": "s1"}
    subprocess.run(
        ["qemu-io", "-f", "raw", cluster.uri, "-c", "write -P 0x22 0 1M"],
        check=True,
        capture_output=True,
    )
    assert http_json(f"{cluster.api}/v1/volume/snapshots")["snapshots"] == ["s1"]
    for _, api in cluster.replica_ports:
        assert http_json(f"http://{HOST}:{api}/v1/replica")["snapshots"] == ["s1"]
    # A duplicate name is the caller's mistake: 409, and no replica is dropped for it.
    assert api_error(f"{cluster.api}/v1/volume/snapshots", "POST", {"name": "s1"}) == 409
    assert cluster.modes() == ["RW", "RW", "RW"]
    assert api_error(f"{cluster.api}/v1/volume/snapshots", "POST", {"name": "../x"}) == 422
    assert api_error(f"{cluster.api}/v1/volume/snapshots/s1", "DELETE", None) == 501
    out = subprocess.run(
        ["qemu-io", "-f", "raw", cluster.uri, "-c", "read -P 0x22 0 1M"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Pattern verification failed" not in out.stdout
    json.dumps(cluster.status())
