"""Names and sizes as the control plane accepts them (shared by the API and the CLI)."""

from __future__ import annotations

import re

BLOCK = 4096
MIN_SIZE = 1 << 20
MAX_SIZE = 1 << 50

# A DNS-1123 label: usable as an NBD export name, in an IQN and as a Kubernetes name
# (`pvc-<uid>` fits).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)
# Node names are DNS-1123 subdomains, as Kubernetes node names (host.example.com).
NODE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_NODE = re.compile(NODE_PATTERN)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# 10G, 10GiB, 10Gi (Kubernetes), 10GB, 4096; units are binary everywhere in Tandem.
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B|i)?\s*$", re.IGNORECASE)


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_node_name(name: str) -> str:
    if len(name) > 253 or not _NODE.match(name):
        raise ValueError(
            f"invalid node name {name!r}: use lower-case letters, digits, '-' and '.' "
            "(a DNS name, at most 253 characters)"
        )
    return name


def parse_size(value: int | str) -> int:
    """Bytes from 10G / 10Gi / 10GiB / 1048576, checked to be usable as a volume size."""
    if isinstance(value, bool):
        raise ValueError("invalid size: give bytes or a number with K/M/G/T")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"invalid size {value!r}: use bytes or a number with K/M/G/T/P")
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n < MIN_SIZE:
        raise ValueError(f"invalid size {value!r}: must be at least 1MiB")
    if n > MAX_SIZE:
        raise ValueError(f"invalid size {value!r}: must be at most 1PiB")
    if n % BLOCK:
        raise ValueError(f"invalid size {value!r}: must be a multiple of {BLOCK} bytes")
    return n


def parse_rate(value: int | str) -> int:
    """Bytes per second from 100M / 104857600 (0 = unlimited)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"invalid rate {value!r}: use bytes/s or a number with K/M/G")
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n < 0:
        raise ValueError(f"invalid rate {value!r}: must be >= 0")
    return n


def format_size(n: int) -> str:
    """10GiB when exact, else 9.8GiB (the largest unit that fits)."""
    for unit in ("P", "T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            whole, rest = divmod(n, _UNITS[unit])
            return f"{whole}{unit}iB" if not rest else f"{n / _UNITS[unit]:.1f}{unit}iB"
    return f"{n}B"
