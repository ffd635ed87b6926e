"""What a claim asks for: StorageClass parameters and the PVC's spec, checked (pure).

Every refusal is a `ProvisioningError` whose message says which field is wrong and why, so
it can be shown as-is in the event on the claim. Nothing is created before these checks.

StorageClass parameters (all strings, as Kubernetes stores them):

  replicaCount   1-9 (default 3)
  fsType         ext4 (default), ext3, ext2, xfs, btrfs; ignored for volumeMode: Block
  iopsLimit      total IOPS (0 = unlimited); readIopsLimit, writeIopsLimit per direction
  bpsLimit       total bytes/s, binary units (100M = 100Mi); readBpsLimit, writeBpsLimit
  chap           Secret with the CHAP credentials, NAME (in the claim's namespace) or
                 NAMESPACE/NAME; keys as the kubelet's iSCSI plugin reads them:
                 node.session.auth.username/password (+ username_in/password_in: mutual)
  frontend       iscsi (default) or iscsi,nbd; the PV is an iSCSI volume, so iscsi is needed
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from maya.provisioner.quantity import format_bytes, parse_bytes
from maya.validation import BLOCK, MAX_SIZE, MIN_SIZE, parse_rate

FS_TYPES = ("ext4", "ext3", "ext2", "xfs", "btrfs")
DEFAULT_FS = "ext4"
DEFAULT_REPLICAS = 3
MAX_REPLICAS = 9
ACCESS_MODES = ("ReadWriteOnce",)
IOPS_PARAMS = {
    "iopsLimit": "total_iops",
    "readIopsLimit": "read_iops",
    "writeIopsLimit": "write_iops",
}
BPS_PARAMS = {"bpsLimit": "total_bps", "readBpsLimit": "read_bps", "writeBpsLimit": "write_bps"}
KNOWN = ("replicaCount", "fsType", *IOPS_PARAMS, *BPS_PARAMS, "chap", "frontend")
# The Secret keys the kubelet's iSCSI plugin logs in with (chapAuthSession).
CHAP_USER = "node.session.auth.username"
CHAP_SECRET = "node.session.auth.password"
CHAP_MUTUAL_USER = "node.session.auth.username_in"
CHAP_MUTUAL_SECRET = "node.session.auth.password_in"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class ProvisioningError(Exception):
    """Why a claim cannot be provisioned (or expanded); `permanent` when retrying cannot
    help until the claim or its class change."""

    def __init__(self, message: str, permanent: bool = True, reason: str = "InvalidRequest"):
        super().__init__(message)
        self.permanent = permanent
        self.reason = reason  # a short code for metrics


@dataclass
class ClassParameters:
    replica_count: int = DEFAULT_REPLICAS
    fs_type: str = DEFAULT_FS
    qos: dict[str, int] = field(default_factory=dict)
    chap_secret: tuple[str, str] | None = None  # (namespace, name)
    frontends: list[str] = field(default_factory=lambda: ["iscsi"])


@dataclass
class ClaimRequest:
    size: int  # bytes, rounded up to Tandem's block size
    block: bool  # volumeMode: Block
    access_modes: list[str]


def class_parameters(params: dict[str, str] | None, claim_namespace: str) -> ClassParameters:
    params = dict(params or {})
    unknown = sorted(set(params) - set(KNOWN))
    if unknown:
        raise ProvisioningError(
            f"unknown StorageClass parameter {unknown[0]!r} (known: {', '.join(KNOWN)})"
        )
    out = ClassParameters()
    if "replicaCount" in params:
        out.replica_count = _int(params, "replicaCount")
        if not 1 <= out.replica_count <= MAX_REPLICAS:
            raise ProvisioningError(
                f"invalid StorageClass parameter replicaCount {params['replicaCount']!r}: "
                f"must be 1 to {MAX_REPLICAS}"
            )
    if "fsType" in params:
        out.fs_type = params["fsType"].strip()
        if out.fs_type not in FS_TYPES:
            raise ProvisioningError(
                f"invalid StorageClass parameter fsType {params['fsType']!r}: "
                f"one of {', '.join(FS_TYPES)}"
            )
    for key, name in IOPS_PARAMS.items():
        if key in params:
            out.qos[name] = _int(params, key)
    for key, name in BPS_PARAMS.items():
        if key in params:
            try:
                out.qos[name] = parse_rate(params[key])
            except ValueError:
                raise ProvisioningError(
                    f"invalid StorageClass parameter {key} {params[key]!r}: use bytes per "
                    "second or a number with K/M/G (binary units, e.g. 100M)"
                ) from None
    if "chap" in params:
        out.chap_secret = _secret_ref(params["chap"], claim_namespace)
    if "frontend" in params:
        frontends = [f.strip() for f in params["frontend"].split(",") if f.strip()]
        if not frontends or any(f not in ("iscsi", "nbd") for f in frontends):
            raise ProvisioningError(
                f"invalid StorageClass parameter frontend {params['frontend']!r}: "
                "iscsi or iscsi,nbd"
            )
        if "iscsi" not in frontends:
            raise ProvisioningError(
                f"invalid StorageClass parameter frontend {params['frontend']!r}: the "
                "PersistentVolume is an iSCSI volume, so the frontends must include iscsi"
            )
        out.frontends = list(dict.fromkeys(frontends))
    return out


def _int(params: dict[str, str], key: str) -> int:
    text = params[key].strip()
    if not re.fullmatch(r"\d{1,13}", text):
        raise ProvisioningError(
            f"invalid StorageClass parameter {key} {params[key]!r}: must be a whole number >= 0"
        )
    return int(text)


def _secret_ref(text: str, claim_namespace: str) -> tuple[str, str]:
    namespace, _, name = text.strip().rpartition("/")
    namespace = namespace or claim_namespace
    if not _NAME.match(name) or not _NAME.match(namespace):
        raise ProvisioningError(
            f"invalid StorageClass parameter chap {text!r}: a Secret name, or NAMESPACE/NAME"
        )
    return namespace, name


def claim_request(pvc: dict[str, Any]) -> ClaimRequest:
    spec = pvc.get("spec") or {}
    modes = list(spec.get("accessModes") or [])
    refused = [m for m in modes if m not in ACCESS_MODES]
    if refused or not modes:
        raise ProvisioningError(
            f"access mode {', '.join(refused) or '(none)'} is not supported: a Tandem volume is "
            "attached to one node at a time, use ReadWriteOnce",
            reason="AccessModeNotSupported",
        )
    if spec.get("selector"):
        raise ProvisioningError("claims with a selector are not supported by dynamic provisioning")
    if spec.get("dataSource"):
        kind = spec["dataSource"].get("kind", "?")
        raise ProvisioningError(f"a dataSource ({kind}) is not supported: volumes start empty")
    mode = spec.get("volumeMode") or "Filesystem"
    if mode not in ("Filesystem", "Block"):
        raise ProvisioningError(f"volumeMode {mode!r} is not supported: Filesystem or Block")
    requested = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    if requested is None:
        raise ProvisioningError("the claim requests no storage (spec.resources.requests.storage)")
    return ClaimRequest(volume_size(str(requested)), mode == "Block", modes)


def volume_size(requested: str) -> int:
    """Bytes for a requested quantity: rounded up to whole 4 KiB blocks, within Tandem's
    limits."""
    try:
        n = parse_bytes(requested)
    except ValueError as e:
        raise ProvisioningError(f"invalid requested storage: {e}", reason="InvalidSize") from None
    n = -(-n // BLOCK) * BLOCK
    if n < MIN_SIZE:
        raise ProvisioningError(
            f"requested storage {requested} is below the smallest Tandem volume "
            f"({format_bytes(MIN_SIZE)})",
            reason="InvalidSize",
        )
    if n > MAX_SIZE:
        raise ProvisioningError(
            f"requested storage {requested} is above the largest Tandem volume "
            f"({format_bytes(MAX_SIZE)})",
            reason="InvalidSize",
        )
    return n


def chap_credentials(secret: dict[str, Any], ref: tuple[str, str]) -> dict[str, str]:
    """The `chap` document of a volume request from the Secret's data."""
    data = secret.get("data") or {}

    def value(key: str) -> str | None:
        raw = data.get(key)
        if raw is None:
            return None
        try:
            return base64.b64decode(raw).decode().strip()
        except (ValueError, UnicodeDecodeError):
            raise ProvisioningError(
                f"CHAP Secret {ref[0]}/{ref[1]}: key {key} is not valid text"
            ) from None

    user, password = value(CHAP_USER), value(CHAP_SECRET)
    if not user or not password:
        raise ProvisioningError(
            f"CHAP Secret {ref[0]}/{ref[1]} needs the keys {CHAP_USER} and {CHAP_SECRET}",
            permanent=False,
        )
    chap = {"user": user, "secret": password}
    mutual_user, mutual_secret = value(CHAP_MUTUAL_USER), value(CHAP_MUTUAL_SECRET)
    if mutual_user or mutual_secret:
        if not (mutual_user and mutual_secret):
            raise ProvisioningError(
                f"CHAP Secret {ref[0]}/{ref[1]}: {CHAP_MUTUAL_USER} and "
                f"{CHAP_MUTUAL_SECRET} go together",
                permanent=False,
            )
        chap.update(mutual_user=mutual_user, mutual_secret=mutual_secret)
    return chap
