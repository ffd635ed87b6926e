"""The `tandem` umbrella command."""

from __future__ import annotations

import click

from maya.up import up
from replica.cli import replica
from target.cli import target


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tandem")
def main() -> None:
    """Tandem: replicated block storage for containers and VMs (iSCSI and NBD)."""


main.add_command(up)
main.add_command(replica)
main.add_command(target)

if __name__ == "__main__":
    main()
