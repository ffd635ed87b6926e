"""Mode pages of the logical unit (SPC-4 7.5, SBC-3 6.4): caching (08h), control (0Ah) and
informational exceptions control (1Ch).

Two bits can change: WCE in the caching page (write-back caching; with WCE=0 every write is
done as FUA) and SWP in the control page (software write protect). Both can be saved.
"""

from __future__ import annotations

from dataclasses import dataclass

from target.frontends.iscsi.scsi.sense import invalid_cdb, invalid_param

CACHING = 0x08
CONTROL = 0x0A
INFORMATIONAL_EXCEPTIONS = 0x1C
ALL_PAGES = 0x3F
PAGES = (CACHING, CONTROL, INFORMATIONAL_EXCEPTIONS)

PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3

WCE = 0x04  # caching page byte 2
SWP = 0x08  # control page byte 4

# Which bytes of each page the initiator may change, as a mask per byte.
_CHANGEABLE = {
    CACHING: {2: WCE},
    CONTROL: {4: SWP},
    INFORMATIONAL_EXCEPTIONS: {},
}
_SAVABLE = (CACHING, CONTROL)


@dataclass
class ModeState:
    wce: bool = True
    swp: bool = False

    def to_json(self) -> dict[str, bool]:
        return {"wce": self.wce, "swp": self.swp}

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> ModeState:
        return cls(wce=bool(raw.get("wce", True)), swp=bool(raw.get("swp", False)))


def _caching(state: ModeState) -> bytearray:
    page = bytearray(20)
    page[0], page[1] = CACHING, len(page) - 2
    page[2] = WCE if state.wce else 0
    return page


def _control(state: ModeState) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = CONTROL, len(page) - 2
    page[2] = 0x02  # GLTSD: no log parameters to save
    page[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    page[4] = SWP if state.swp else 0
    page[8:10] = b"\xff\xff"  # BUSY TIMEOUT PERIOD: unlimited
    return page


def _informational_exceptions(state: ModeState) -> bytearray:
    page = bytearray(12)
    page[0], page[1] = INFORMATIONAL_EXCEPTIONS, len(page) - 2
    page[2] = 0x08  # DEXCPT: no informational exception reporting
    return page


_BUILDERS = {
    CACHING: _caching,
    CONTROL: _control,
    INFORMATIONAL_EXCEPTIONS: _informational_exceptions,
}


def page(code: int, pc: int, current: ModeState, saved: ModeState) -> bytes:
    """One mode page as MODE SENSE returns it for page control `pc`."""
    if pc == PC_CHANGEABLE:
        data = _BUILDERS[code](ModeState(wce=False, swp=False))
        data[2:] = bytes(len(data) - 2)
        for index, mask in _CHANGEABLE[code].items():
            data[index] = mask
    else:
        state = {PC_CURRENT: current, PC_DEFAULT: ModeState(), PC_SAVED: saved}[pc]
        data = _BUILDERS[code](state)
    if code in _SAVABLE:
        data[0] |= 0x80  # PS
    return bytes(data)


def pages(code: int, subpage: int, pc: int, current: ModeState, saved: ModeState) -> bytes:
    """The pages MODE SENSE asked for by PAGE CODE and SUBPAGE CODE (CDB byte 2 and 3)."""
    if code == ALL_PAGES and subpage in (0x00, 0xFF):
        return b"".join(page(c, pc, current, saved) for c in PAGES)
    if code in PAGES and subpage in (0x00, 0xFF):
        return page(code, pc, current, saved)
    if code in PAGES or code == ALL_PAGES:
        raise invalid_cdb(3)
    raise invalid_cdb(2, 5)


def select(params: bytes, offset: int, current: ModeState) -> ModeState:
    """Apply the mode pages of a MODE SELECT parameter list (starting at `offset`) to a copy
    of `current`. Any change to a bit that is not changeable is refused."""
    state = ModeState(current.wce, current.swp)
    at = offset
    while at < len(params):
        code = params[at] & 0x3F
        if params[at] & 0x40:
            raise invalid_param(at, 6)  # SPF: no subpages here
        if at + 2 > len(params):
            raise invalid_param(at)
        if code not in PAGES:
            raise invalid_param(at, 5)
        ours = page(code, PC_CURRENT, state, state)
        length = params[at + 1]
        if length != len(ours) - 2:
            raise invalid_param(at + 1)
        if at + 2 + length > len(params):
            raise invalid_param(at + 1)
        given = params[at : at + 2 + length]
        changeable = _CHANGEABLE[code]
        for i in range(2, len(ours)):
            differs = (given[i] ^ ours[i]) & ~changeable.get(i, 0)
            if differs:
                raise invalid_param(at + i, differs.bit_length() - 1)
        if code == CACHING:
            state.wce = bool(given[2] & WCE)
        elif code == CONTROL:
            state.swp = bool(given[4] & SWP)
        at += 2 + length
    return state
