"""What an iSCSI target is: its name, its SCSI logical units, and who may log in to it."""

from __future__ import annotations

from dataclasses import dataclass

from target.frontends.iscsi.chap import Credentials
from target.frontends.iscsi.scsi.types import ScsiTarget

MAX_NAME_LEN = 223  # RFC 7143 4.2.7.1


def normalize_name(name: str) -> str:
    """iSCSI names compare case-insensitively (RFC 3722 folds them to lower case)."""
    return name.strip().lower()


@dataclass
class TargetConfig:
    """One target served by the portal. `chap` is the (user, secret) initiators must prove;
    `mutual_chap` the (user, secret) the target proves when an initiator asks;
    `allowed_initiators` None lets every initiator in."""

    iqn: str
    scsi: ScsiTarget
    alias: str = ""
    chap: tuple[str, str] | None = None
    mutual_chap: tuple[str, str] | None = None
    allowed_initiators: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.iqn or len(self.iqn.encode()) > MAX_NAME_LEN:
            raise ValueError(f"bad iSCSI target name {self.iqn!r}")
        if self.mutual_chap is not None and self.chap is None:
            raise ValueError("mutual CHAP needs one-way CHAP configured too")
        self._allowed = (
            None
            if self.allowed_initiators is None
            else {normalize_name(n) for n in self.allowed_initiators}
        )

    @property
    def name(self) -> str:
        return normalize_name(self.iqn)

    def allows(self, initiator: str) -> bool:
        return self._allowed is None or normalize_name(initiator) in self._allowed

    @property
    def credentials(self) -> Credentials | None:
        return Credentials(*self.chap) if self.chap else None

    @property
    def mutual_credentials(self) -> Credentials | None:
        return Credentials(*self.mutual_chap) if self.mutual_chap else None
