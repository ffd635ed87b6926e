"""Reservations of one logical unit: SPC-2 RESERVE/RELEASE and SPC-4 persistent reservations.

Persistent reservation state (registrations, the reservation, PRgeneration, APTPL) is written
to the volume's StateStore before a PERSISTENT RESERVE OUT completes, so it survives a target
restart or a move to another node. SPC-2 reservations are per I_T nexus and held in memory
only: nexus loss, LOGICAL UNIT RESET and target reset release them.

Conflicts follow SPC-4 5.12.1 (table 62) and SBC-3 4.17 as three classes of commands: those
allowed in every case, those that read the medium, and those that change it or the logical
unit's state (MODE SENSE is in that class, as the tables have it).
"""

from __future__ import annotations

import asyncio
import copy
import enum
from dataclasses import dataclass, field
from typing import Any

from target.frontends.iscsi.scsi.cdb import be
from target.frontends.iscsi.scsi.sense import (
    ILLEGAL_REQUEST,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    ReservationConflict,
    ScsiError,
    invalid_cdb,
    invalid_param,
    param_list_length_error,
)
from target.frontends.iscsi.scsi.types import Nexus, StateStore
from target.frontends.iscsi.scsi.unit_attention import UnitAttentions, nexus_key, target_port_name


class Access(enum.Enum):
    ANY = "any"  # never conflicts (INQUIRY, REPORT LUNS, TEST UNIT READY, ...)
    PR = "pr"  # PERSISTENT RESERVE IN/OUT: checked by the service action itself
    SPC2 = "spc2"  # RESERVE/RELEASE: checked by the command itself
    READ = "read"
    WRITE = "write"


# Persistent reservation types (SPC-4 table 170).
WRITE_EXCLUSIVE = 1
EXCLUSIVE_ACCESS = 3
WRITE_EXCLUSIVE_RO = 5
EXCLUSIVE_ACCESS_RO = 6
WRITE_EXCLUSIVE_AR = 7
EXCLUSIVE_ACCESS_AR = 8
TYPES = (WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS, WRITE_EXCLUSIVE_RO, EXCLUSIVE_ACCESS_RO)
TYPES += (WRITE_EXCLUSIVE_AR, EXCLUSIVE_ACCESS_AR)
REGISTRANTS_ONLY = (WRITE_EXCLUSIVE_RO, EXCLUSIVE_ACCESS_RO)
ALL_REGISTRANTS = (WRITE_EXCLUSIVE_AR, EXCLUSIVE_ACCESS_AR)

# PERSISTENT RESERVE OUT service actions.
REGISTER = 0
RESERVE = 1
RELEASE = 2
CLEAR = 3
PREEMPT = 4
PREEMPT_AND_ABORT = 5
REGISTER_AND_IGNORE = 6
REGISTER_AND_MOVE = 7
PR_OUT_ACTIONS = range(8)

# PERSISTENT RESERVE IN service actions.
READ_KEYS = 0
READ_RESERVATION = 1
REPORT_CAPABILITIES = 2
READ_FULL_STATUS = 3
PR_IN_ACTIONS = range(4)

ALL_PORTS = "*"  # target port of a registration made with ALL_TG_PT=1
RELATIVE_TARGET_PORT = 1  # the one target port every portal group of this target shares
ISCSI_PROTOCOL = 0x5


@dataclass
class Registration:
    initiator_port: str  # "iqn...,i,0x<isid>"
    target_port: str  # "iqn...,t,0x<tpgt>" or ALL_PORTS
    key: int

    @property
    def port(self) -> tuple[str, str]:
        return self.initiator_port, self.target_port

    def matches(self, initiator_port: str, target_port: str) -> bool:
        return self.initiator_port == initiator_port and self.target_port in (
            target_port,
            ALL_PORTS,
        )


@dataclass
class PrState:
    generation: int = 0
    aptpl: bool = False
    registrations: list[Registration] = field(default_factory=list)
    res_type: int = 0  # 0: no persistent reservation
    holder: tuple[str, str] | None = None  # (initiator port, target port) that reserved

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "aptpl": self.aptpl,
            "registrations": [[r.initiator_port, r.target_port, r.key] for r in self.registrations],
            "type": self.res_type,
            "holder": list(self.holder) if self.holder else None,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PrState:
        holder = raw.get("holder")
        regs = [Registration(str(i), str(t), int(k)) for i, t, k in raw["registrations"]]
        return cls(
            generation=int(raw.get("generation", 0)) & 0xFFFFFFFF,
            aptpl=bool(raw.get("aptpl", False)),
            registrations=regs,
            res_type=int(raw.get("type", 0)),
            holder=(str(holder[0]), str(holder[1])) if holder else None,
        )


def _iscsi_transport_id(initiator_port: str) -> bytes:
    """TransportID format 01b (initiator port name), padded to a multiple of 4, >= 20 bytes."""
    name = initiator_port.encode() + b"\0"
    padded = max(20, (len(name) + 3) // 4 * 4)
    name = name.ljust(padded, b"\0")
    return bytes([0x40 | ISCSI_PROTOCOL, 0]) + len(name).to_bytes(2, "big") + name


def _parse_transport_id(data: bytes, at: int) -> str:
    """The initiator port named by an iSCSI TransportID (format 01b) in REGISTER AND MOVE."""
    if len(data) < 4 or data[0] & 0x0F != ISCSI_PROTOCOL:
        raise invalid_param(at)
    if data[0] >> 6 != 1:
        # Format 00b names an initiator device, not the one I_T nexus a move needs.
        raise invalid_param(at, 7)
    length = be(data, 2, 2)
    if length < 1 or 4 + length > len(data):
        raise invalid_param(at + 2)
    name = data[4 : 4 + length].split(b"\0", 1)[0].decode("utf-8", "replace")
    device, sep, isid = name.partition(",i,0x")
    if not sep or not device or len(isid) != 12:
        raise invalid_param(at + 4)
    try:
        int(isid, 16)
    except ValueError:
        raise invalid_param(at + 4) from None
    return f"{device.lower()},i,0x{isid.lower()}"


class Reservations:
    def __init__(
        self,
        store: StateStore,
        key: str,
        uas: UnitAttentions,
        *,
        persist_always: bool = True,
    ) -> None:
        self._store = store
        self._key = key
        self._uas = uas
        self._persist_always = persist_always
        self._lock = asyncio.Lock()
        self.pr = PrState()
        self.spc2_holder: str | None = None  # nexus key holding an SPC-2 reservation

    async def load(self) -> None:
        raw = await self._store.get(self._key)
        if raw is None:
            return
        state = PrState.from_json(raw)
        # APTPL=1 asks for the state to survive power loss. A target restart moves the logical
        # unit rather than powering it off, so by default the state survives it either way.
        if state.aptpl or self._persist_always:
            self.pr = state

    # -- lookups -------------------------------------------------------------------------

    @staticmethod
    def _ports(nexus: Nexus) -> tuple[str, str]:
        return nexus.initiator_port.lower(), target_port_name(nexus)

    def _find(self, state: PrState, nexus: Nexus) -> Registration | None:
        iport, tport = self._ports(nexus)
        for reg in state.registrations:
            if reg.matches(iport, tport):
                return reg
        return None

    @staticmethod
    def _holds(state: PrState, reg: Registration | None) -> bool:
        if not state.res_type or reg is None:
            return False
        if state.res_type in ALL_REGISTRANTS:
            return True
        return state.holder == reg.port

    # -- conflicts -----------------------------------------------------------------------

    def check(self, nexus: Nexus, access: Access) -> None:
        """Raise ReservationConflict if `access` from `nexus` conflicts with a reservation."""
        if access is Access.ANY or access is Access.SPC2:
            return
        if self.spc2_holder is not None and self.spc2_holder != nexus_key(nexus):
            raise ReservationConflict()
        state = self.pr
        if access is Access.PR or not state.res_type:
            return
        reg = self._find(state, nexus)
        if self._holds(state, reg):
            return
        rtype = state.res_type
        if access is Access.READ:
            if rtype in (WRITE_EXCLUSIVE, WRITE_EXCLUSIVE_RO, WRITE_EXCLUSIVE_AR):
                return
            if rtype in (EXCLUSIVE_ACCESS_RO, EXCLUSIVE_ACCESS_AR) and reg is not None:
                return
        elif rtype in REGISTRANTS_ONLY + ALL_REGISTRANTS and reg is not None:
            return
        raise ReservationConflict()

    # -- SPC-2 RESERVE / RELEASE ----------------------------------------------------------

    def _compatible_holder(self, nexus: Nexus) -> bool:
        """SPC-4 5.12.3 (CRH=1): RESERVE/RELEASE from a persistent reservation holder, or a
        registrant of a registrants-only/all-registrants reservation, succeed doing nothing."""
        state = self.pr
        reg = self._find(state, nexus)
        if self._holds(state, reg):
            return True
        return reg is not None and state.res_type in REGISTRANTS_ONLY + ALL_REGISTRANTS

    def reserve(self, nexus: Nexus) -> None:
        if self.pr.registrations or self.pr.res_type:
            if self._compatible_holder(nexus):
                return
            raise ReservationConflict()
        key = nexus_key(nexus)
        if self.spc2_holder is not None and self.spc2_holder != key:
            raise ReservationConflict()
        self.spc2_holder = key

    def release(self, nexus: Nexus) -> None:
        if self.pr.registrations or self.pr.res_type:
            if self._compatible_holder(nexus):
                return
            raise ReservationConflict()
        if self.spc2_holder == nexus_key(nexus):
            self.spc2_holder = None
        # RELEASE from another I_T nexus is not an error and changes nothing (SPC-2 7.17).

    def nexus_lost(self, key: str) -> None:
        if self.spc2_holder == key:
            self.spc2_holder = None

    def reset(self) -> None:
        """LOGICAL UNIT RESET releases SPC-2 reservations; persistent ones stay (SAM-5)."""
        self.spc2_holder = None

    # -- PERSISTENT RESERVE IN -------------------------------------------------------------

    def persistent_reserve_in(self, cdb: bytes) -> bytes:
        action = cdb[1] & 0x1F
        state = self.pr
        gen = state.generation.to_bytes(4, "big")
        if action == READ_KEYS:
            keys = b"".join(r.key.to_bytes(8, "big") for r in state.registrations)
            return gen + len(keys).to_bytes(4, "big") + keys
        if action == READ_RESERVATION:
            if not state.res_type:
                return gen + bytes(4)
            key = 0
            if state.res_type not in ALL_REGISTRANTS:
                for reg in state.registrations:
                    if reg.port == state.holder:
                        key = reg.key
            desc = key.to_bytes(8, "big") + bytes(5) + bytes([state.res_type & 0x0F]) + bytes(2)
            return gen + len(desc).to_bytes(4, "big") + desc
        if action == REPORT_CAPABILITIES:
            # CRH, ATP_C, PTPL_C; TMV with the six supported types.
            caps = 0x10 | 0x04 | 0x01
            ptpl_a = 0x01 if state.aptpl else 0x00
            return bytes([0, 8, caps, 0x80 | ptpl_a, 0xEA, 0x01, 0, 0])
        if action == READ_FULL_STATUS:
            body = bytearray()
            for reg in state.registrations:
                holds = self._holds(state, reg)
                tid = _iscsi_transport_id(reg.initiator_port)
                desc = bytearray(24)
                desc[0:8] = reg.key.to_bytes(8, "big")
                desc[12] = (0x02 if reg.target_port == ALL_PORTS else 0) | (0x01 if holds else 0)
                desc[13] = state.res_type & 0x0F if holds else 0
                desc[18:20] = RELATIVE_TARGET_PORT.to_bytes(2, "big")
                desc[20:24] = len(tid).to_bytes(4, "big")
                body += desc + tid
            return gen + len(body).to_bytes(4, "big") + bytes(body)
        raise invalid_cdb(1, 4)

    # -- PERSISTENT RESERVE OUT ------------------------------------------------------------

    async def persistent_reserve_out(self, nexus: Nexus, cdb: bytes, data_out: bytes) -> None:
        action = cdb[1] & 0x1F
        scope, rtype = cdb[2] >> 4, cdb[2] & 0x0F
        plen = be(cdb, 5, 4)
        if action in (RESERVE, RELEASE, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_MOVE):
            if scope != 0:
                raise invalid_cdb(2, 7)
            if rtype not in TYPES:
                raise invalid_cdb(2, 3)
        if action == REGISTER_AND_MOVE:
            if plen < 24:
                raise param_list_length_error()
        elif plen != 24:
            raise param_list_length_error()
        if len(data_out) < plen:
            raise param_list_length_error()
        params = data_out[:plen]
        async with self._lock:
            state = copy.deepcopy(self.pr)
            notices = self._apply(state, nexus, action, rtype, params)
            if notices is None:
                return  # nothing changed
            await self._store.put(self._key, state.to_json())
            self.pr = state
            for code, regs in notices:
                self._notify(code, regs, exclude=nexus_key(nexus))

    def _notify(self, code: tuple[int, int], regs: list[Registration], *, exclude: str) -> None:
        def affected(key: str) -> bool:
            iport, _, tport = key.partition("|")
            return any(r.matches(iport.lower(), tport) for r in regs)

        self._uas.establish(code, where=affected, exclude=exclude)

    def _apply(
        self, state: PrState, nexus: Nexus, action: int, rtype: int, params: bytes
    ) -> list[tuple[tuple[int, int], list[Registration]]] | None:
        """Change `state` per the service action; return the unit attentions to raise, or
        None if the command changes nothing."""
        if action == REGISTER_AND_MOVE:
            return self._register_and_move(state, nexus, rtype, params)
        rkey, sakey = be(params, 0, 8), be(params, 8, 8)
        flags = params[20]
        if flags & 0xF2:
            raise invalid_param(20, (flags & 0xF2).bit_length() - 1)
        if flags & 0x08:
            raise invalid_param(20, 3)  # SPEC_I_PT: not supported (SIP_C=0)
        all_tg_pt, aptpl = bool(flags & 0x04), bool(flags & 0x01)
        reg = self._find(state, nexus)
        if action in (REGISTER, REGISTER_AND_IGNORE):
            return self._register(state, nexus, reg, action, rkey, sakey, all_tg_pt, aptpl)
        if reg is None or reg.key != rkey:
            raise ReservationConflict()
        if action == RESERVE:
            if state.res_type:
                if self._holds(state, reg) and state.res_type == rtype:
                    return None
                raise ReservationConflict()
            state.res_type, state.holder = rtype, reg.port
            return []
        if action == RELEASE:
            if not self._holds(state, reg):
                return None  # no reservation, or another I_T nexus holds it: nothing to do
            if rtype != state.res_type:
                raise ScsiError(ILLEGAL_REQUEST, INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
            released = state.res_type
            state.res_type, state.holder = 0, None
            if released in REGISTRANTS_ONLY + ALL_REGISTRANTS:
                return [(RESERVATIONS_RELEASED, list(state.registrations))]
            return []
        if action == CLEAR:
            others = [r for r in state.registrations if r is not reg]
            state.registrations, state.res_type, state.holder = [], 0, None
            state.generation = (state.generation + 1) & 0xFFFFFFFF
            return [(RESERVATIONS_PREEMPTED, others)]
        # PREEMPT and PREEMPT AND ABORT; aborting the victims' tasks is the transport's part.
        return self._preempt(state, reg, rtype, sakey)

    def _register(
        self,
        state: PrState,
        nexus: Nexus,
        reg: Registration | None,
        action: int,
        rkey: int,
        sakey: int,
        all_tg_pt: bool,
        aptpl: bool,
    ) -> list[tuple[tuple[int, int], list[Registration]]] | None:
        if reg is None:
            if action == REGISTER and rkey != 0:
                raise ReservationConflict()
            if sakey == 0:
                return None
            iport, tport = self._ports(nexus)
            port = ALL_PORTS if all_tg_pt else tport
            state.registrations.append(Registration(iport, port, sakey))
        else:
            if action == REGISTER and rkey != reg.key:
                raise ReservationConflict()
            if sakey == 0:
                return self._unregister(state, reg, aptpl)
            reg.key = sakey
        state.generation = (state.generation + 1) & 0xFFFFFFFF
        state.aptpl = aptpl
        return []

    def _unregister(
        self, state: PrState, reg: Registration, aptpl: bool
    ) -> list[tuple[tuple[int, int], list[Registration]]]:
        holds = self._holds(state, reg)
        state.registrations.remove(reg)
        state.generation = (state.generation + 1) & 0xFFFFFFFF
        state.aptpl = aptpl
        notices: list[tuple[tuple[int, int], list[Registration]]] = []
        if state.res_type in ALL_REGISTRANTS:
            if not state.registrations:
                state.res_type, state.holder = 0, None
        elif holds:
            # The holder left: the reservation goes with it (SPC-4 5.12.11.2.2).
            released = state.res_type
            state.res_type, state.holder = 0, None
            if released in REGISTRANTS_ONLY:
                notices.append((RESERVATIONS_RELEASED, list(state.registrations)))
        return notices

    def _preempt(
        self, state: PrState, reg: Registration, rtype: int, sakey: int
    ) -> list[tuple[tuple[int, int], list[Registration]]]:
        def remove(victims: list[Registration]) -> None:
            state.registrations = [r for r in state.registrations if r not in victims]
            state.generation = (state.generation + 1) & 0xFFFFFFFF

        def keyed(key: int) -> list[Registration]:
            # The preempting I_T nexus keeps its own registration even if its key matches.
            return [r for r in state.registrations if r.key == key and r is not reg]

        mine = reg.port
        if not state.res_type or (state.res_type in ALL_REGISTRANTS and sakey != 0):
            if sakey == 0:
                raise invalid_param(8)
            victims = keyed(sakey)
            if not victims:
                raise ReservationConflict()
            remove(victims)
            return [(REGISTRATIONS_PREEMPTED, victims)]
        if state.res_type in ALL_REGISTRANTS:  # and SERVICE ACTION RESERVATION KEY zero
            victims = [r for r in state.registrations if r is not reg]
            remove(victims)
            state.res_type, state.holder = rtype, mine
            return [(REGISTRATIONS_PREEMPTED, victims)]
        holder_key = next((r.key for r in state.registrations if r.port == state.holder), None)
        if sakey != holder_key:
            if sakey == 0:
                raise invalid_param(8)
            victims = keyed(sakey)
            if not victims:
                raise ReservationConflict()
            remove(victims)
            return [(REGISTRATIONS_PREEMPTED, victims)]
        victims = keyed(sakey)
        changed = state.res_type != rtype
        remove(victims)
        state.res_type, state.holder = rtype, mine
        notices = [(REGISTRATIONS_PREEMPTED, victims)]
        if changed:
            others = [r for r in state.registrations if r is not reg]
            notices.append((RESERVATIONS_RELEASED, others))
        return notices

    def _register_and_move(
        self, state: PrState, nexus: Nexus, rtype: int, params: bytes
    ) -> list[tuple[tuple[int, int], list[Registration]]]:
        rkey, sakey = be(params, 0, 8), be(params, 8, 8)
        flags = params[17]
        if flags & 0xFC:
            raise invalid_param(17, (flags & 0xFC).bit_length() - 1)
        unreg, aptpl = bool(flags & 0x02), bool(flags & 0x01)
        tid_len = be(params, 20, 4)
        if 24 + tid_len != len(params):
            raise param_list_length_error()
        reg = self._find(state, nexus)
        if reg is None or reg.key != rkey:
            raise ReservationConflict()
        if not self._holds(state, reg) or state.res_type in ALL_REGISTRANTS:
            raise ReservationConflict()
        if sakey == 0:
            raise invalid_param(8)
        if be(params, 18, 2) != RELATIVE_TARGET_PORT:
            raise invalid_param(18)
        dest_port = _parse_transport_id(params[24:], 24)
        _, tport = self._ports(nexus)
        if dest_port == reg.initiator_port:
            raise invalid_param(24)
        dest = next((r for r in state.registrations if r.matches(dest_port, tport)), None)
        if dest is None:
            dest = Registration(dest_port, tport, sakey)
            state.registrations.append(dest)
        state.res_type, state.holder = rtype, dest.port
        if unreg:
            state.registrations.remove(reg)
        state.generation = (state.generation + 1) & 0xFFFFFFFF
        state.aptpl = aptpl
        return []
