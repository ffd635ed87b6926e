"""iSCSI text keys (RFC 7143 sections 6 and 13): the key=value codec and the target's side
of operational parameter negotiation.

The target only answers: it never offers a negotiable key of its own (so it never has to
wait for an answer before transiting), it only declares the keys that are declarations
(MaxRecvDataSegmentLength, TargetAlias, TargetPortalGroupTag). Each answer follows the
key's result function: list keys take the first value of the initiator's list we support,
numbers take the min or max of both sides, booleans AND or OR.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field, replace
from typing import Literal

MAX_KEY_LEN = 63
MAX_VALUE_LEN = 8192  # binary values (CHAP challenges) may be long; names stay far below
NOT_UNDERSTOOD = "NotUnderstood"
IRRELEVANT = "Irrelevant"
REJECT = "Reject"
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-+@_")
_DEC_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class TextError(ValueError):
    """Text data that is not a well-formed list of key=value pairs."""


def parse_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """key=value pairs, each ended by a NUL, in order. Empty entries (NUL padding) are skipped."""
    raw = bytes(data)
    if raw and not raw.endswith(b"\0"):
        raise TextError("text does not end with a NUL")
    pairs: list[tuple[str, str]] = []
    for item in raw.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep:
            raise TextError(f"no '=' in {item[:40]!r}")
        try:
            k, v = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError:
            raise TextError(f"text is not UTF-8: {item[:40]!r}") from None
        if not k or len(key) > MAX_KEY_LEN or not _KEY_CHARS.issuperset(k):
            raise TextError(f"bad key name {k[:70]!r}")
        if len(value) > MAX_VALUE_LEN:
            raise TextError(f"value of {k} is {len(value)} bytes long")
        pairs.append((k, v))
    return pairs


def encode_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def parse_number(value: str) -> int:
    """A numerical value: decimal or 0x hexadecimal (RFC 7143 6.1)."""
    if value[:2] in ("0x", "0X"):
        digits, base, allowed = value[2:], 16, _HEX_DIGITS
    else:
        digits, base, allowed = value, 10, _DEC_DIGITS
    if not digits or len(digits) > 20 or not allowed.issuperset(digits):
        raise ValueError(f"not a number: {value[:40]!r}")
    n = int(digits, base)
    if n >= 1 << 64:
        raise ValueError(f"number out of range: {value!r}")
    return n


def parse_binary(value: str) -> bytes:
    """A binary value: 0x hexadecimal or 0b base64 (RFC 7143 6.1)."""
    prefix, body = value[:2].lower(), value[2:]
    try:
        if prefix == "0x":
            return bytes.fromhex(body if len(body) % 2 == 0 else "0" + body)
        if prefix == "0b":
            return base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        pass
    raise ValueError(f"not a binary value: {value[:40]!r}")


# ---------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class Params:
    """The operational parameters of one connection and its session. RFC defaults unless
    negotiated. `initiator_recv_length` bounds what we send, `target_recv_length` what we
    accept."""

    header_digest: bool = False
    data_digest: bool = False
    initiator_recv_length: int = 8192
    target_recv_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    max_connections: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """What this target offers in answers and declares. Values are the target's side of each
    result function (min/max/AND/OR)."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = (1 << 24) - 1
    first_burst_length: int = 262144  # unsolicited data per command, taken before any check
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 16
    default_time2wait: int = 2
    default_time2retain: int = 20
    digests: frozenset[str] = field(default_factory=lambda: frozenset({"CRC32C", "None"}))
    # Not negotiated: the largest write a command may announce (buffered whole before the
    # SCSI target sees it); beyond it the command fails before anything is allocated.
    max_data_transfer: int = 16 << 20


Result = Literal["min", "max", "and", "or"]


@dataclass(frozen=True, slots=True)
class NumericKey:
    attr: str  # Params field
    lo: int
    hi: int
    result: Result
    limit: str | None  # TargetLimits field with the target's value, None: a fixed value
    fixed: int = 0


@dataclass(frozen=True, slots=True)
class BoolKey:
    attr: str
    result: Result
    limit: str | None
    fixed: bool = True


_MAX_LEN = (1 << 24) - 1

NEGOTIATED: dict[str, NumericKey | BoolKey] = {
    "MaxBurstLength": NumericKey("max_burst_length", 512, _MAX_LEN, "min", "max_burst_length"),
    "FirstBurstLength": NumericKey(
        "first_burst_length", 512, _MAX_LEN, "min", "first_burst_length"
    ),
    "MaxOutstandingR2T": NumericKey("max_outstanding_r2t", 1, 65535, "min", "max_outstanding_r2t"),
    "MaxConnections": NumericKey("max_connections", 1, 65535, "min", None, 1),
    "DefaultTime2Wait": NumericKey("default_time2wait", 0, 3600, "max", "default_time2wait"),
    "DefaultTime2Retain": NumericKey("default_time2retain", 0, 3600, "min", "default_time2retain"),
    "ErrorRecoveryLevel": NumericKey("error_recovery_level", 0, 2, "min", None, 0),
    "InitialR2T": BoolKey("initial_r2t", "or", "initial_r2t"),
    "ImmediateData": BoolKey("immediate_data", "and", "immediate_data"),
    "DataPDUInOrder": BoolKey("data_pdu_in_order", "or", None, True),
    "DataSequenceInOrder": BoolKey("data_sequence_in_order", "or", None, True),
}

# Session-wide keys that mean nothing without SCSI traffic (answered Irrelevant there).
NOT_IN_DISCOVERY = frozenset({
    "MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T", "MaxConnections", "InitialR2T",
    "ImmediateData", "DataPDUInOrder", "DataSequenceInOrder",
})  # fmt: skip

# Keys the login state machine handles itself.
LOGIN_IDENTITY = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType"})
SECURITY_KEYS = frozenset({"AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})
# Keys only a target sends.
TARGET_ONLY = frozenset({"TargetAlias", "TargetAddress", "TargetPortalGroupTag"})


class Negotiation:
    """Answers the initiator's operational keys, accumulating the result in `params`.
    `answer` returns the response value for one key, or None when the key needs no answer
    (a declaration)."""

    def __init__(self, limits: TargetLimits, discovery: bool = False) -> None:
        self.limits = limits
        self.discovery = discovery
        self.params = Params()

    def answer(self, key: str, value: str) -> str | None:
        if value in (NOT_UNDERSTOOD, IRRELEVANT, REJECT):
            return None  # an answer to an offer we never made: nothing to say
        if key in ("HeaderDigest", "DataDigest"):
            return self._digest(key, value)
        if key == "MaxRecvDataSegmentLength":
            try:
                n = parse_number(value)
            except ValueError:
                return REJECT
            if not 512 <= n <= _MAX_LEN:
                return REJECT
            self.params = replace(self.params, initiator_recv_length=n)
            return None
        if key in ("IFMarker", "OFMarker"):
            return "No" if value in ("Yes", "No") else REJECT  # markers: AND with our No
        if key in ("IFMarkInt", "OFMarkInt"):
            return IRRELEVANT  # markers are off
        spec = NEGOTIATED.get(key)
        if spec is None:
            return NOT_UNDERSTOOD
        if self.discovery and key in NOT_IN_DISCOVERY:
            return IRRELEVANT
        if isinstance(spec, BoolKey):
            return self._boolean(spec, value)
        return self._numeric(spec, value)

    def _digest(self, key: str, value: str) -> str:
        for choice in value.split(","):
            if choice in self.limits.digests:
                attr = "header_digest" if key == "HeaderDigest" else "data_digest"
                self.params = replace(self.params, **{attr: choice == "CRC32C"})
                return choice
        return REJECT

    def _boolean(self, spec: BoolKey, value: str) -> str:
        if value not in ("Yes", "No"):
            return REJECT
        theirs = value == "Yes"
        ours = getattr(self.limits, spec.limit) if spec.limit else spec.fixed
        result = (theirs or ours) if spec.result == "or" else (theirs and ours)
        self.params = replace(self.params, **{spec.attr: result})
        return "Yes" if result else "No"

    def _numeric(self, spec: NumericKey, value: str) -> str:
        try:
            theirs = parse_number(value)
        except ValueError:
            return REJECT
        if not spec.lo <= theirs <= spec.hi:
            return REJECT
        ours = getattr(self.limits, spec.limit) if spec.limit else spec.fixed
        result = min(theirs, ours) if spec.result == "min" else max(theirs, ours)
        self.params = replace(self.params, **{spec.attr: result})
        return str(result)

    def declare_recv_length(self) -> tuple[str, str]:
        """Our MaxRecvDataSegmentLength declaration (it applies once the initiator has it)."""
        n = self.limits.max_recv_data_segment_length
        self.params = replace(self.params, target_recv_length=n)
        return "MaxRecvDataSegmentLength", str(n)

    def finish(self) -> Params:
        """Parameters in force after login: FirstBurstLength never above MaxBurstLength."""
        p = self.params
        if p.first_burst_length > p.max_burst_length:
            p = replace(p, first_burst_length=p.max_burst_length)
        return p
