"""QoS on a real target process: command-line limits, the REST endpoints that change them
online, the rebuild-rate endpoint and the metrics. (The fio measurement of a limit and of
a change runs through the whole control plane: test_maya_agent.py.)"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import pytest

from tests.procs import Cluster, http_json


def test_qos_and_rebuild_rate_endpoints(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = make_cluster()
    for i in range(3):
        c.start_replica(i)
    c.start_target(["--iops-limit", "50", "--qos-burst", "0", "--rebuild-rate", "1M"])
    qos = http_json(f"{c.api}/v1/volume/qos")
    assert qos["total_iops"] == 50 and qos["burst_seconds"] == 0
    status = c.status()
    assert status["qos"]["total_iops"] == 50 and status["rebuild_rate"] == 1 << 20

    # 20 requests at 50 IOPS take about 0.4 s; the throttle shows in the metrics.
    r = subprocess.run(
        ["qemu-io", "-f", "raw", c.uri, "-c", "aio_write -P 1 0 4k", *(["-c", "read 0 4k"] * 20)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    metrics = urllib.request.urlopen(f"{c.api}/metrics").read().decode()
    assert 'tandem_volume_qos_limit{limit="total_iops",volume="vol"} 50.0' in metrics
    throttled = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith('tandem_volume_qos_throttled_seconds_total{direction="read"')
    ]
    assert throttled and float(throttled[0].split()[-1]) > 0.1

    new = http_json(f"{c.api}/v1/volume/qos", "PUT", {"read_iops": 7, "write_bps": 1 << 20})
    assert (new["read_iops"], new["total_iops"], new["write_bps"]) == (7, 0, 1 << 20)
    for bad in ({"read_iops": -1}, {"burst_seconds": 100}, {"read_iops": "many"}):
        with pytest.raises(urllib.error.HTTPError) as e:
            http_json(f"{c.api}/v1/volume/qos", "PUT", bad)
        assert e.value.code == 422
    assert http_json(f"{c.api}/v1/volume/rebuild-rate", "PUT", {"bytes_per_second": 0}) == {
        "bytes_per_second": 0
    }
    assert c.status()["rebuild_rate"] == 0
