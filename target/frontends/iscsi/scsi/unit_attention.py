"""Unit attention conditions of one logical unit, per I_T nexus (SAM-5 5.14, SPC-4 5.14).

An I_T nexus the logical unit has not seen yet starts with POWER ON, RESET, OR BUS DEVICE
RESET OCCURRED (29h/00h), which is also what initiators expect right after a login.
Conditions are reported one per command, oldest first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from target.frontends.iscsi.scsi.sense import POWER_ON_RESET
from target.frontends.iscsi.scsi.types import Nexus


def target_port_name(nexus: Nexus) -> str:
    """The iSCSI target port name (RFC 7143 section 4.2.7.2)."""
    return f"{nexus.target},t,0x{nexus.tpgt:04x}"


@functools.lru_cache(maxsize=4096)  # called for every command; a nexus lives long
def nexus_key(nexus: Nexus) -> str:
    return f"{nexus.initiator_port}|{target_port_name(nexus)}"


class UnitAttentions:
    def __init__(self) -> None:
        self._pending: dict[str, list[tuple[int, int]]] = {}

    def see(self, key: str) -> None:
        """Note a command from `key`; a new nexus gets the power-on/reset condition."""
        if key not in self._pending:
            self._pending[key] = [POWER_ON_RESET]

    def forget(self, key: str) -> None:
        """The nexus is gone; if it comes back it is new again."""
        self._pending.pop(key, None)

    def pop(self, key: str) -> tuple[int, int] | None:
        queue = self._pending.get(key)
        return queue.pop(0) if queue else None

    def establish(
        self,
        code: tuple[int, int],
        keys: Iterable[str] | None = None,
        *,
        where: Callable[[str], bool] | None = None,
        exclude: str | None = None,
    ) -> None:
        """Queue `code` for the given known nexuses (all known ones when `keys` is None)."""
        targets = self._pending.keys() if keys is None else keys
        for key in list(targets):
            if key == exclude or key not in self._pending:
                continue
            if where is not None and not where(key):
                continue
            queue = self._pending[key]
            if code[0] == POWER_ON_RESET[0]:
                # A reset supersedes whatever was pending before it (SAM-5 5.14).
                queue.clear()
            if code not in queue:
                queue.append(code)
