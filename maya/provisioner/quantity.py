"""Kubernetes resource quantities (`10Gi`, `1G`, `1.5Gi`, `500M`, `1e9`) as exact byte counts.

Kubernetes' decimal suffixes are powers of ten (`1G` = 10^9 bytes) and its binary ones
powers of two (`1Gi`); Tandem's sizes are binary. Parsing is exact (Decimal), and a
fractional byte count rounds up: a volume is never smaller than what was asked for.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$"
)


def parse_bytes(text: str) -> int:
    """Bytes in a quantity, rounded up to a whole byte; ValueError when it is not one."""
    m = _QUANTITY.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 10Gi, 500M, 1073741824)")
    number, exponent, suffix = m.groups()
    try:
        value = Decimal(number)
        if exponent:
            value = value.scaleb(int(exponent[1:]))
        elif suffix in _BINARY:
            value *= _BINARY[suffix]
        else:
            value *= _DECIMAL[suffix or ""]
    except (InvalidOperation, OverflowError) as e:
        raise ValueError(f"{text!r} is not a usable quantity: {e}") from e
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    whole = int(value.to_integral_value(rounding="ROUND_CEILING"))
    return whole


def format_bytes(n: int) -> str:
    """The shortest exact quantity: 64Mi, 1Gi, 1000000000 (no rounding, so sizes compare)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
