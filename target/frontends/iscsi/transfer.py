"""Moving a command's data (RFC 7143 4.2.5 - 4.2.7), sans-IO.

`WriteTransfer` collects Data-Out for one command: immediate data, the unsolicited burst
(InitialR2T=No, up to FirstBurstLength) and the solicited bursts asked for with R2Ts (each
up to MaxBurstLength, at most MaxOutstandingR2T at a time). Data that breaks the rules
(wrong DataSN, offset, length, transfer tag, bad digest) fails the command: the transfer
then only waits for the initiator to finish its outstanding sequences before the
command ends with CHECK CONDITION.

`data_in` splits a command's read data into Data-In PDUs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from target.frontends.iscsi.negotiation import Params
from target.frontends.iscsi.pdu import RESERVED_TAG, DataIn, DataOut

# Sense (key, ASC, ASCQ) for transport failures, all ABORTED COMMAND (SPC-4 4.5.6).
DATA_PHASE_ERROR = (0x0B, 0x4B, 0x00)
INVALID_TRANSFER_TAG = (0x0B, 0x4B, 0x01)
TOO_MUCH_WRITE_DATA = (0x0B, 0x4B, 0x02)
DATA_OFFSET_ERROR = (0x0B, 0x4B, 0x05)
PROTOCOL_CRC_ERROR = (0x0B, 0x47, 0x05)
INTERNAL_TARGET_FAILURE = (0x04, 0x44, 0x00)  # HARDWARE ERROR
INVALID_FIELD_IN_IU = (0x05, 0x0E, 0x03)  # ILLEGAL REQUEST: EDTL beyond what we take


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    """18 bytes of fixed-format current sense data."""
    return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))


@dataclass(slots=True)
class Burst:
    """One Data-Out sequence: the unsolicited one (ttt RESERVED_TAG) or one R2T's."""

    ttt: int
    start: int
    end: int
    next_offset: int
    next_datasn: int = 0
    done: bool = False


@dataclass(slots=True)
class R2TRequest:
    ttt: int
    r2tsn: int
    offset: int
    length: int


class WriteTransfer:
    def __init__(
        self,
        length: int,
        immediate: bytes | bytearray | memoryview,
        unsolicited_follows: bool,
        params: Params,
        max_length: int = 1 << 32,
    ) -> None:
        self.length = length
        self.params = params
        self.error: tuple[int, int, int] | None = None  # sense of the failure, if any
        if length > max_length:
            # Refuse before allocating: the initiator's word is all we have so far.
            self.error = INVALID_FIELD_IN_IU
            length = 0
        self.buffer = bytearray(length)
        self.bursts: dict[int, Burst] = {}  # outstanding R2T bursts by TTT
        self.r2tsn = 0
        self.next_offset = 0  # where the next R2T starts
        self.unsolicited: Burst | None = None
        n = len(immediate)
        if n and self.error is None:
            if not params.immediate_data or n > min(length, params.first_burst_length):
                self.error = TOO_MUCH_WRITE_DATA
            else:
                self.buffer[:n] = immediate
        self.next_offset = n
        if unsolicited_follows and not params.initial_r2t:
            end = min(params.first_burst_length, self.length)
            self.unsolicited = Burst(RESERVED_TAG, n, end, n)
            if n >= end:
                self.unsolicited.done = True  # nothing left for it; the F bit is still owed

    @property
    def complete(self) -> bool:
        """No more Data-Out to wait for: everything arrived, or a failure and nothing owed."""
        if self.unsolicited is not None and not self.unsolicited.done:
            return False
        if self.bursts:
            return False
        return self.error is not None or self.next_offset >= self.length

    def data(self) -> bytes:
        return bytes(self.buffer)

    def r2ts(self, new_ttt: Callable[[], int]) -> list[R2TRequest]:
        """R2Ts to send now: once the unsolicited burst is over, up to MaxOutstandingR2T
        bursts of MaxBurstLength each."""
        out: list[R2TRequest] = []
        if self.error is not None:
            return out
        if self.unsolicited is not None and not self.unsolicited.done:
            return out
        while self.next_offset < self.length and len(self.bursts) < self.params.max_outstanding_r2t:
            size = min(self.params.max_burst_length, self.length - self.next_offset)
            ttt = new_ttt()
            self.bursts[ttt] = Burst(
                ttt, self.next_offset, self.next_offset + size, self.next_offset
            )
            out.append(R2TRequest(ttt, self.r2tsn, self.next_offset, size))
            self.r2tsn += 1
            self.next_offset += size
        return out

    def data_out(self, pdu: DataOut, digest_ok: bool = True) -> bool:
        """Take one Data-Out. Returns True when the waiting command should look again at
        `complete` and `r2ts`: a burst ended or the transfer just failed."""
        had_error = self.error is not None
        if pdu.ttt == RESERVED_TAG:
            burst = self.unsolicited
            if burst is None or burst.done:
                self._fail(TOO_MUCH_WRITE_DATA)  # unsolicited data nobody allowed
                return not had_error
        else:
            burst = self.bursts.get(pdu.ttt)
            if burst is None:
                self._fail(INVALID_TRANSFER_TAG)
                return not had_error
        length = len(pdu.data)
        if not digest_ok:
            self._fail(PROTOCOL_CRC_ERROR)
        elif pdu.datasn != burst.next_datasn:
            self._fail(DATA_PHASE_ERROR)
        elif pdu.offset != burst.next_offset:
            self._fail(DATA_OFFSET_ERROR)  # DataPDUInOrder=Yes: offsets only go up
        elif pdu.offset + length > burst.end:
            self._fail(TOO_MUCH_WRITE_DATA)
        elif self.error is None:
            self.buffer[pdu.offset : pdu.offset + length] = pdu.data
        burst.next_datasn += 1
        burst.next_offset = pdu.offset + length
        closed = False
        if burst is self.unsolicited:
            if pdu.final:
                burst.done = closed = True
                # R2Ts continue from wherever the unsolicited data stopped.
                self.next_offset = max(self.next_offset, min(burst.next_offset, burst.end))
        elif pdu.final or burst.next_offset >= burst.end:
            if burst.next_offset < burst.end:
                self._fail(DATA_PHASE_ERROR)  # the burst ended short
            del self.bursts[burst.ttt]
            closed = True
        return closed or (self.error is not None and not had_error)

    def _fail(self, sense: tuple[int, int, int]) -> None:
        if self.error is None:
            self.error = sense


def data_in(
    data: memoryview,
    *,
    itt: int,
    lun: bytes,
    max_segment: int,
    max_burst: int,
) -> list[DataIn]:
    """Data-In PDUs carrying `data`: segments up to the initiator's MaxRecvDataSegmentLength,
    the F bit closing each MaxBurstLength sequence. StatSN, window and status fields are
    the sender's to fill in (the last PDU may also carry the status)."""
    pdus: list[DataIn] = []
    total = len(data)
    offset = 0
    datasn = 0
    while offset < total:
        burst_end = min(offset + max_burst, total)
        while offset < burst_end:
            size = min(max_segment, burst_end - offset)
            pdus.append(
                DataIn(
                    itt=itt,
                    lun=lun,
                    datasn=datasn,
                    offset=offset,
                    data=data[offset : offset + size],
                    final=offset + size == burst_end,
                )
            )
            offset += size
            datasn += 1
    return pdus
