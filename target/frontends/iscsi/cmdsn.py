"""Command numbering (RFC 7143 4.2.2.1): the CmdSN window of a session, sans-IO.

Non-immediate commands carry consecutive CmdSNs. The target accepts those in
[ExpCmdSN, MaxCmdSN], delivers them in CmdSN order (holding early arrivals until the gap
before them fills) and silently drops the rest and duplicates. MaxCmdSN is tied to how
many delivered commands are still running, so the window bounds the commands in flight:
MaxCmdSN = ExpCmdSN - 1 + depth - running. It never decreases.
"""

from __future__ import annotations

from typing import Generic, TypeVar

MASK = 0xFFFFFFFF

T = TypeVar("T")


def sn_add(a: int, n: int) -> int:
    return (a + n) & MASK


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32 bits: a comes before b."""
    return a != b and ((b - a) & MASK) < (1 << 31)


_HOLE = object()  # a CmdSN taken by a command that was aborted before it arrived


class CommandWindow(Generic[T]):
    def __init__(self, cmdsn: int, depth: int) -> None:
        if depth < 1:
            raise ValueError("window depth must be at least 1")
        self.expcmdsn = cmdsn & MASK
        self.depth = depth
        self.running = 0  # delivered, not yet completed
        self._held: dict[int, object] = {}  # CmdSN -> item that arrived early (or _HOLE)

    @property
    def maxcmdsn(self) -> int:
        return (self.expcmdsn - 1 + self.depth - self.running) & MASK

    @property
    def held(self) -> int:
        return len(self._held)

    def _offset(self, cmdsn: int) -> int | None:
        """Position of cmdsn in the open window, None if outside."""
        offset = (cmdsn - self.expcmdsn) & MASK
        return offset if offset < self.depth - self.running else None

    def receive(self, cmdsn: int, item: T) -> list[T] | None:
        """Accept a non-immediate command. Returns the items now deliverable, in order (this
        one and any held ones it unblocked; empty if it must wait for a gap), or None when
        the command is outside the window or a duplicate: drop it."""
        offset = self._offset(cmdsn)
        if offset is None or cmdsn in self._held:
            return None
        if offset:
            self._held[cmdsn] = item
            return []
        return self._advance([item])

    def _advance(self, out: list[T]) -> list[T]:
        self.expcmdsn = sn_add(self.expcmdsn, 1)
        self.running += len(out)
        while self.expcmdsn in self._held:
            item = self._held.pop(self.expcmdsn)
            self.expcmdsn = sn_add(self.expcmdsn, 1)
            if item is not _HOLE:
                out.append(item)  # type: ignore[arg-type]
                self.running += 1
        return out

    def complete(self) -> None:
        """A delivered command finished: its slot opens at the top of the window."""
        if self.running <= 0:
            raise RuntimeError("complete() without a running command")
        self.running -= 1

    def is_pending(self, cmdsn: int) -> bool:
        """cmdsn is inside the window and has not been delivered (it may be held)."""
        return self._offset(cmdsn) is not None

    def abort_pending(self, cmdsn: int) -> tuple[T | None, list[T]]:
        """ABORT TASK for a command not yet delivered (RFC 7143 11.5.1): consider it received
        and aborted. Returns the held item it removes (if it had arrived) and the items its
        slot unblocks."""
        if self._offset(cmdsn) is None:
            return None, []
        item = self._held.pop(cmdsn, None)
        removed = None if item is None or item is _HOLE else item
        if cmdsn == self.expcmdsn:
            out = self._advance([])
            return removed, out  # type: ignore[return-value]
        self._held[cmdsn] = _HOLE
        return removed, []  # type: ignore[return-value]
