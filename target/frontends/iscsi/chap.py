"""CHAP for iSCSI login (RFC 1994, RFC 7143 section 12.1.3): algorithm 5 (MD5), one-way
(the target checks the initiator) and mutual (the initiator also checks the target).

Exchange, initiator -> target:
  AuthMethod=CHAP,...            -> AuthMethod=CHAP
  CHAP_A=<list>                  -> CHAP_A=5 CHAP_I=<id> CHAP_C=<challenge>
  CHAP_N=<name> CHAP_R=<resp> [CHAP_I=<id> CHAP_C=<challenge>]
                                 -> [CHAP_N=<target name> CHAP_R=<resp>]
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from target.frontends.iscsi.negotiation import parse_binary, parse_number

CHAP_MD5 = 5
CHALLENGE_LEN = 16


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    secret: str


def response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994: MD5 over the identifier octet, the secret and the challenge."""
    return hashlib.md5(bytes((identifier,)) + secret + challenge).digest()


class ChapError(Exception):
    """The initiator failed (or broke) the CHAP exchange: an authentication failure."""


class ChapExchange:
    """The target side of one CHAP exchange. `expected` is who the initiator must prove to
    be; `mutual` is who we prove to be when the initiator asks."""

    def __init__(
        self,
        expected: Credentials,
        mutual: Credentials | None,
        random: Callable[[int], bytes],
    ) -> None:
        self.expected = expected
        self.mutual = mutual
        self.random = random
        self.identifier: int | None = None
        self.challenge = b""
        self.done = False

    def algorithms(self, value: str) -> list[tuple[str, str]]:
        """Answer CHAP_A: pick MD5 and send our challenge."""
        if self.identifier is not None:
            raise ChapError("CHAP_A sent twice")
        try:
            offered = [parse_number(v) for v in value.split(",")]
        except ValueError:
            raise ChapError(f"bad CHAP_A {value[:40]!r}") from None
        if CHAP_MD5 not in offered:
            raise ChapError(f"no supported CHAP algorithm in {value[:40]!r}")
        self.identifier = self.random(1)[0]
        self.challenge = self.random(CHALLENGE_LEN)
        return [
            ("CHAP_A", str(CHAP_MD5)),
            ("CHAP_I", str(self.identifier)),
            ("CHAP_C", "0x" + self.challenge.hex()),
        ]

    def verify(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """Check CHAP_N/CHAP_R; answer a mutual challenge (CHAP_I/CHAP_C) if there is one."""
        if self.identifier is None or self.done:
            raise ChapError("CHAP response out of sequence")
        name, resp = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or resp is None:
            raise ChapError("CHAP_N and CHAP_R are both required")
        try:
            got = parse_binary(resp)
        except ValueError:
            raise ChapError("CHAP_R is not a binary value") from None
        want = response(self.identifier, self.expected.secret.encode(), self.challenge)
        # Compare both, always, so timing says nothing about which one was wrong.
        name_ok = hmac.compare_digest(name.encode(), self.expected.user.encode())
        if not (hmac.compare_digest(got, want) and name_ok):
            raise ChapError(f"CHAP authentication of {name[:64]!r} failed")
        self.done = True
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        return self._answer_mutual(keys.get("CHAP_I"), keys.get("CHAP_C"))

    def _answer_mutual(self, ident: str | None, chal: str | None) -> list[tuple[str, str]]:
        if ident is None or chal is None:
            raise ChapError("mutual CHAP needs both CHAP_I and CHAP_C")
        if self.mutual is None:
            raise ChapError("initiator asked for mutual CHAP but none is configured")
        try:
            identifier = parse_number(ident)
            challenge = parse_binary(chal)
        except ValueError:
            raise ChapError("bad CHAP_I or CHAP_C") from None
        if identifier > 255 or not challenge:
            raise ChapError("bad CHAP_I or CHAP_C")
        if challenge == self.challenge:
            raise ChapError("initiator reflected our challenge")
        answer = response(identifier, self.mutual.secret.encode(), challenge)
        return [("CHAP_N", self.mutual.user), ("CHAP_R", "0x" + answer.hex())]
