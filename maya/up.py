"""`tandem up`: the embedded local default that `make run` starts.

N replicas and one target for a default volume, as child processes on this host; stops
them cleanly (target first, so replicas record a clean close) on Ctrl-C or SIGTERM and
leaves the data for the next start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from replica.sizes import format_size, parse_size
from target.volume import default_iqn


def default_data_dir() -> Path:
    if os.environ.get("TANDEM_HOME"):
        return Path(os.environ["TANDEM_HOME"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "tandem"


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"{proc.args[3]} exited with status {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise click.ClickException(f"nothing listening on {host}:{port} after {timeout:g}s")


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where replica data lives [default: $TANDEM_HOME or ~/.local/share/tandem].",
)
@click.option("--volume", default="demo", show_default=True, help="Volume name.")
@click.option("--size", default="1G", show_default=True, help="Volume size.")
@click.option("--replicas", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--nbd-port", type=int, default=10809, show_default=True)
@click.option("--iscsi-port", type=int, default=3260, show_default=True)
@click.option("--api-port", type=int, default=9501, show_default=True)
@click.option(
    "--replica-port",
    type=int,
    default=9502,
    show_default=True,
    help="First replica's data port; replica i uses this + 10*i (API: + 1).",
)
def up(
    data_dir: Path | None,
    volume: str,
    size: str,
    replicas: int,
    host: str,
    nbd_port: int,
    iscsi_port: int,
    api_port: int,
    replica_port: int,
) -> None:
    """Start a local replicated volume (replicas + target) and print how to connect."""
    nbytes = parse_size(size)
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "maya", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        children.append(proc)
        return proc

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        addrs = []
        for i in range(replicas):
            port = replica_port + 10 * i
            proc = spawn(
                f"{volume}-replica-{i}",
                "replica",
                "serve",
                "--dir",
                str(data_dir / volume / f"replica-{i}"),
                "--size",
                str(nbytes),
                "--volume",
                volume,
                "--listen",
                f"{host}:{port}",
                "--api",
                f"{host}:{port + 1}",
            )
            _wait_port(host, port, proc, 30)
            addrs.append(f"{host}:{port}")
        args = [
            "target",
            "serve",
            "--volume",
            volume,
            "--size",
            str(nbytes),
            "--nbd",
            f"{host}:{nbd_port}",
            "--iscsi",
            f"{host}:{iscsi_port}",
            "--api",
            f"{host}:{api_port}",
        ]
        for a in addrs:
            args += ["--replica", a]
        target = spawn(f"{volume}-target", *args)
        _wait_port(host, nbd_port, target, 60)
        _wait_port(host, iscsi_port, target, 30)
        uri = f"nbd://{host}:{nbd_port}/{volume}"
        iqn = default_iqn(volume)
        iscsi_url = f"iscsi://{host}:{iscsi_port}/{iqn}/0"
        click.echo(
            f"""
Tandem is up: volume {volume!r}, {format_size(nbytes)}, {replicas} replica(s), data in {data_dir}

  NBD URI   {uri}
  iSCSI     portal {host}:{iscsi_port}  IQN {iqn}  LUN 0
  REST API  http://{host}:{api_port}/v1/volume   (metrics: /metrics)

Try, from another shell:
  nbdinfo {uri}
  nbdcopy image.raw {uri}          # write an image into the volume
  nbdcopy {uri} copy.raw           # and read it back
  qemu-img info {uri}
  qemu-io -f raw {uri} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  mkdir -p mnt && nbdfuse mnt/disk.img {uri} &   # then mkfs.ext4 + mount -o loop
  iscsi-ls -s iscsi://{host}:{iscsi_port}
  qemu-img info {iscsi_url}
  iscsiadm -m discovery -t st -p {host}:{iscsi_port} && iscsiadm -m node -T {iqn} --login

Logs in {log_dir}. Ctrl-C stops everything; the data stays for the next start.
""",
            nl=False,
        )
        while True:
            for proc in children:
                if proc.poll() is not None:
                    raise click.ClickException(
                        f"{' '.join(proc.args[3:5])} exited with status {proc.returncode}; "
                        f"see {log_dir}"
                    )
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("\nstopping Tandem...")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # The target first: it closes the replicas cleanly before they stop.
        for proc in reversed(children):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
