"""The `tandem` umbrella command."""

from __future__ import annotations

import click

from maya.agent.cli import agent
from maya.apiserver.cli import apiserver
from maya.commands.node import node
from maya.commands.qos import qos
from maya.commands.snapshot import snapshot
from maya.commands.volume import volume
from maya.provisioner.cli import provisioner
from maya.up import up
from replica.cli import replica
from target.cli import target


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tandem")
def main() -> None:
    """Tandem: replicated block storage for containers and VMs (iSCSI and NBD)."""


for command in (up, volume, snapshot, node, qos, apiserver, agent, provisioner, replica, target):
    main.add_command(command)

if __name__ == "__main__":
    main()
