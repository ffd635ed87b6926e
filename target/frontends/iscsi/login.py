"""The target side of the iSCSI login phase (RFC 7143 sections 6.3, 11.12-11.13), sans-IO.

Feed each Login Request to `LoginMachine.receive`; send the Login Response it returns.
The login goes through the security stage (CSG 0: AuthMethod, CHAP), the operational
stage (CSG 1: parameter negotiation) and ends when a response carries T=1 NSG=3. It fails
with a status class/detail (the response then says why and the connection is closed).
`result` holds what the session needs once `done` is set; the caller fills in the TSIH of
the final response (it owns the session table).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from target.frontends.iscsi.chap import ChapError, ChapExchange, Credentials
from target.frontends.iscsi.config import MAX_NAME_LEN, TargetConfig, normalize_name
from target.frontends.iscsi.negotiation import (
    LOGIN_IDENTITY,
    REJECT,
    SECURITY_KEYS,
    TARGET_ONLY,
    Negotiation,
    Params,
    TargetLimits,
    TextError,
    encode_text,
    parse_text,
)
from target.frontends.iscsi.pdu import LoginRequest, LoginResponse

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
MAX_LOGIN_TEXT = 64 * 1024  # all the text of one request, over its C-bit continuations

Status = tuple[int, int]  # (status class, status detail)
SUCCESS: Status = (0, 0)
INITIATOR_ERROR: Status = (2, 0)
AUTHENTICATION_FAILED: Status = (2, 1)
AUTHORIZATION_FAILED: Status = (2, 2)
NOT_FOUND: Status = (2, 3)
UNSUPPORTED_VERSION: Status = (2, 5)
TOO_MANY_CONNECTIONS: Status = (2, 6)
MISSING_PARAMETER: Status = (2, 7)
SESSION_TYPE_UNSUPPORTED: Status = (2, 9)
NO_SESSION: Status = (2, 0x0A)
INVALID_DURING_LOGIN: Status = (2, 0x0B)
TARGET_ERROR: Status = (3, 0)
SERVICE_UNAVAILABLE: Status = (3, 1)
OUT_OF_RESOURCES: Status = (3, 2)


class LoginFailure(Exception):
    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class LoginResult:
    session_type: str  # "Normal" or "Discovery"
    initiator_name: str
    initiator_alias: str
    target: TargetConfig | None  # None for discovery sessions
    isid: bytes
    tsih: int  # as requested: 0 for a new session
    cid: int
    cmdsn: int  # the initiator's first CmdSN
    params: Params


class LoginMachine:
    """One connection's login. `targets` maps normalized target names to their config.
    `session_exists(initiator, isid, tsih)` tells whether a nonzero TSIH names a session
    (a connection reinstatement); without it such logins fail."""

    def __init__(
        self,
        targets: Mapping[str, TargetConfig],
        *,
        portal_group_tag: int = 1,
        limits: TargetLimits | None = None,
        discovery_chap: Credentials | None = None,
        discovery_mutual_chap: Credentials | None = None,
        cmd_window: int = 128,
        random: Callable[[int], bytes] = os.urandom,
        session_exists: Callable[[str, bytes, int], bool] | None = None,
    ) -> None:
        self.targets = targets
        self.portal_group_tag = portal_group_tag
        self.limits = limits or TargetLimits()
        self.discovery_chap = discovery_chap
        self.discovery_mutual_chap = discovery_mutual_chap
        self.cmd_window = cmd_window
        self.random = random
        self.session_exists = session_exists
        self.statsn = int.from_bytes(random(4), "big")  # StatSN of the next response
        self.stage: int | None = None
        self.done = False
        self.failure: LoginFailure | None = None
        self.result: LoginResult | None = None
        # Identity of the login, fixed by its first request.
        self.isid = b""
        self.tsih = 0
        self.cid = 0
        self.cmdsn = 0
        self.initiator_name = ""
        self.initiator_alias = ""
        self.session_type = "Normal"
        self.target: TargetConfig | None = None
        self._identity: dict[str, str] = {}
        self._seen: set[str] = set()  # negotiation keys already offered in an earlier request
        self._pending = bytearray()  # text of a request continued with the C bit
        self._negotiation: Negotiation | None = None
        self._creds: Credentials | None = None
        self._mutual: Credentials | None = None
        self._auth_method: str | None = None
        self._auth_done = False
        self._chap: ChapExchange | None = None
        self._declared = False
        self._first_response = True

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def receive(self, req: LoginRequest) -> LoginResponse:
        try:
            return self._receive(req)
        except LoginFailure as e:
            self.failure = e
            return self._response(req, transit=False, nsg=0, answers=[], status=e.status)

    # ------------------------------------------------------------------ request handling

    def _receive(self, req: LoginRequest) -> LoginResponse:
        if self.done or self.failed:
            raise LoginFailure(INITIATOR_ERROR, "login request after the login ended")
        if self.stage is None:
            self._start(req)
        elif (req.isid, req.tsih, req.cid) != (self.isid, self.tsih, self.cid):
            raise LoginFailure(INITIATOR_ERROR, "ISID, TSIH or CID changed during login")
        if req.transit and req.cont:
            raise LoginFailure(INITIATOR_ERROR, "login request with both T and C bits")
        if req.csg != self.stage:
            raise LoginFailure(
                INITIATOR_ERROR, f"request for stage {req.csg} while login is in {self.stage}"
            )
        if req.transit and not (req.nsg > req.csg and req.nsg in (OPERATIONAL, FULL_FEATURE)):
            raise LoginFailure(INITIATOR_ERROR, f"invalid transit {req.csg} -> {req.nsg}")
        self._pending += req.data
        if len(self._pending) > MAX_LOGIN_TEXT:
            raise LoginFailure(INITIATOR_ERROR, "login text too long")
        if req.cont:
            return self._response(req, transit=False, nsg=0, answers=[])  # send the rest
        keys = self._keys()
        if self._negotiation is None:
            self._identify(keys)
        else:
            self._check_identity(keys)
        answers = self._security(keys) if self.stage == SECURITY else self._operational(keys)
        transit = req.transit and (self.stage != SECURITY or self._may_leave_security(keys))
        if self.stage == OPERATIONAL and not self._declared:
            answers.append(self._negotiation_().declare_recv_length())
            self._declared = True
        response = self._response(req, transit, req.nsg, answers)
        if transit:
            self.stage = req.nsg
            if req.nsg == FULL_FEATURE:
                self._finish()
        return response

    def _start(self, req: LoginRequest) -> None:
        self.isid, self.tsih, self.cid, self.cmdsn = req.isid, req.tsih, req.cid, req.cmdsn
        if req.csg not in (SECURITY, OPERATIONAL):
            self.stage = req.csg & 1
            raise LoginFailure(INITIATOR_ERROR, f"login cannot start in stage {req.csg}")
        self.stage = req.csg
        if req.version_min > 0 or req.version_max < req.version_min:
            raise LoginFailure(
                UNSUPPORTED_VERSION, f"versions {req.version_min}-{req.version_max} unsupported"
            )

    def _keys(self) -> dict[str, str]:
        text = bytes(self._pending)
        self._pending.clear()
        try:
            pairs = parse_text(text)
        except TextError as e:
            raise LoginFailure(INITIATOR_ERROR, str(e)) from None
        keys: dict[str, str] = {}
        for key, value in pairs:
            if key in keys:
                raise LoginFailure(INITIATOR_ERROR, f"key {key} sent twice")
            if key not in LOGIN_IDENTITY and key in self._seen:
                raise LoginFailure(INITIATOR_ERROR, f"key {key} negotiated twice")
            keys[key] = value
        self._seen.update(k for k in keys if k not in LOGIN_IDENTITY)
        return keys

    def _identify(self, keys: dict[str, str]) -> None:
        """First request: who is logging in, to what, and what they must prove."""
        name = keys.get("InitiatorName")
        if name is None:
            raise LoginFailure(MISSING_PARAMETER, "no InitiatorName")
        if not name.strip() or len(name.encode()) > MAX_NAME_LEN:
            raise LoginFailure(INITIATOR_ERROR, f"bad InitiatorName {name[:64]!r}")
        self.initiator_name = name
        self.initiator_alias = keys.get("InitiatorAlias", "")
        self.session_type = keys.get("SessionType", "Normal")
        if self.session_type == "Normal":
            target_name = keys.get("TargetName")
            if target_name is None:
                raise LoginFailure(MISSING_PARAMETER, "no TargetName in a normal session")
            target = self.targets.get(normalize_name(target_name))
            if target is None:
                raise LoginFailure(NOT_FOUND, f"no target {target_name[:MAX_NAME_LEN]!r}")
            if not target.allows(name):
                raise LoginFailure(
                    AUTHORIZATION_FAILED, f"{name!r} may not log in to {target.iqn!r}"
                )
            self.target = target
            self._creds, self._mutual = target.credentials, target.mutual_credentials
        elif self.session_type == "Discovery":
            self._creds, self._mutual = self.discovery_chap, self.discovery_mutual_chap
        else:
            raise LoginFailure(SESSION_TYPE_UNSUPPORTED, f"session type {self.session_type[:32]!r}")
        if self.tsih and not (
            self.session_exists and self.session_exists(name, self.isid, self.tsih)
        ):
            raise LoginFailure(NO_SESSION, f"no session with TSIH {self.tsih}")
        self._identity = {k: v for k, v in keys.items() if k in LOGIN_IDENTITY}
        self._negotiation = Negotiation(self.limits, discovery=self.session_type == "Discovery")
        if self.stage == OPERATIONAL and self._creds is not None:
            raise LoginFailure(AUTHENTICATION_FAILED, "authentication required")

    def _check_identity(self, keys: dict[str, str]) -> None:
        # Some initiators (libiscsi) repeat these in their first operational request.
        for key in LOGIN_IDENTITY & keys.keys():
            if self._identity.setdefault(key, keys[key]) != keys[key]:
                raise LoginFailure(INITIATOR_ERROR, f"{key} changed during login")

    def _negotiation_(self) -> Negotiation:
        assert self._negotiation is not None
        return self._negotiation

    def _security(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        if "AuthMethod" in keys:
            offered = keys["AuthMethod"].split(",")
            if self._creds is not None:
                if "CHAP" not in offered:
                    raise LoginFailure(AUTHENTICATION_FAILED, "CHAP is required")
                self._auth_method = "CHAP"
                self._chap = ChapExchange(self._creds, self._mutual, self.random)
            elif "None" in offered:
                self._auth_method = "None"
                self._auth_done = True
            else:
                raise LoginFailure(AUTHENTICATION_FAILED, "no authentication method in common")
            answers.append(("AuthMethod", self._auth_method))
        chap = {k: v for k, v in keys.items() if k.startswith("CHAP_")}
        if chap:
            if self._chap is None:
                raise LoginFailure(AUTHENTICATION_FAILED, "CHAP keys without AuthMethod=CHAP")
            try:
                if "CHAP_A" in chap:
                    if len(chap) > 1:
                        raise ChapError("CHAP_A must come alone")
                    answers += self._chap.algorithms(chap["CHAP_A"])
                else:
                    answers += self._chap.verify(chap)
                    self._auth_done = True
            except ChapError as e:
                raise LoginFailure(AUTHENTICATION_FAILED, str(e)) from None
        answers += self._answer((k, v) for k, v in keys.items() if k not in SECURITY_KEYS)
        return answers

    def _may_leave_security(self, keys: dict[str, str]) -> bool:
        """The initiator asks to transit: may it? (Only once it proved who it is.)"""
        if self._auth_done:
            return True
        if self._auth_method is None:
            if self._creds is not None:
                raise LoginFailure(AUTHENTICATION_FAILED, "authentication required")
            self._auth_done = True  # AuthMethod defaults to None
            return True
        return False  # CHAP still under way: answer with T=0

    def _operational(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if SECURITY_KEYS & keys.keys():
            raise LoginFailure(INITIATOR_ERROR, "security keys in the operational stage")
        return self._answer(iter(keys.items()))

    def _answer(self, items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        negotiation = self._negotiation_()
        answers: list[tuple[str, str]] = []
        for key, value in items:
            if key in LOGIN_IDENTITY:
                continue
            if key in TARGET_ONLY or key == "SendTargets":
                answers.append((key, REJECT))
                continue
            answer = negotiation.answer(key, value)
            if answer is not None:
                answers.append((key, answer))
        return answers

    # ------------------------------------------------------------------ responses

    def _response(
        self,
        req: LoginRequest,
        transit: bool,
        nsg: int,
        answers: list[tuple[str, str]],
        status: Status = SUCCESS,
    ) -> LoginResponse:
        if self._first_response and status == SUCCESS and self._negotiation is not None:
            # Declarations due in the first response that answers keys.
            first: list[tuple[str, str]] = [("TargetPortalGroupTag", str(self.portal_group_tag))]
            if self.target is not None and self.target.alias:
                first.append(("TargetAlias", self.target.alias))
            answers = first + answers
            self._first_response = False
        rsp = LoginResponse(
            transit=transit,
            csg=req.csg & 3,
            nsg=nsg if transit else 0,
            version_max=0,
            version_active=0,
            isid=req.isid,
            tsih=req.tsih,
            itt=req.itt,
            statsn=self.statsn,
            expcmdsn=self.cmdsn,
            maxcmdsn=(self.cmdsn + self.cmd_window - 1) & 0xFFFFFFFF,
            status_class=status[0],
            status_detail=status[1],
            data=encode_text(answers) if status == SUCCESS else b"",
        )
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        return rsp

    def _finish(self) -> None:
        self.done = True
        self.result = LoginResult(
            session_type=self.session_type,
            initiator_name=self.initiator_name,
            initiator_alias=self.initiator_alias,
            target=self.target,
            isid=self.isid,
            tsih=self.tsih,
            cid=self.cid,
            cmdsn=self.cmdsn,
            params=self._negotiation_().finish(),
        )
