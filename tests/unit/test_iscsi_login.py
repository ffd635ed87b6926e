"""The login state machine: stages and transitions, CHAP one-way and mutual, the allow-list,
failures with their status class/detail, and fuzzed logins that only ever fail cleanly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from target.frontends.iscsi import login as lg
from target.frontends.iscsi.chap import response
from target.frontends.iscsi.config import TargetConfig
from target.frontends.iscsi.negotiation import encode_text, parse_binary, parse_text
from target.frontends.iscsi.pdu import LoginRequest, LoginResponse
from tests.unit.test_iscsi_fake_scsi import FakeScsiTarget

TARGET = "iqn.2026-11.io.tandem:vol"
INITIATOR = "iqn.1994-05.com.example:host1"
ISID = bytes.fromhex("400001370000")
OPERATIONAL = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxBurstLength", "65536"),
    ("FirstBurstLength", "65536"),
    ("ImmediateData", "Yes"),
    ("InitialR2T", "No"),
    ("MaxRecvDataSegmentLength", "65536"),
    ("ErrorRecoveryLevel", "0"),
]
SCSI = FakeScsiTarget(size=1 << 20)


def target(**kw: object) -> TargetConfig:
    return TargetConfig(TARGET, SCSI, alias="vol", **kw)  # type: ignore[arg-type]


def machine(*targets: TargetConfig, **kw: object) -> lg.LoginMachine:
    configs = targets or (target(),)
    return lg.LoginMachine({t.name: t for t in configs}, portal_group_tag=7, **kw)  # type: ignore[arg-type]


def req(
    pairs: list[tuple[str, str]],
    *,
    csg: int = 1,
    nsg: int = 3,
    transit: bool = True,
    cont: bool = False,
    data: bytes | None = None,
    **kw: object,
) -> LoginRequest:
    fields = {"isid": ISID, "itt": 1, "cmdsn": 100, **kw}
    return LoginRequest(
        transit=transit,
        cont=cont,
        csg=csg,
        nsg=nsg,
        data=encode_text(pairs) if data is None else data,
        **fields,
    )  # type: ignore[arg-type]


def hello(session: str = "Normal") -> list[tuple[str, str]]:
    pairs = [("InitiatorName", INITIATOR), ("SessionType", session)]
    return pairs + ([("TargetName", TARGET)] if session == "Normal" else [])


def keys(rsp: LoginResponse) -> dict[str, str]:
    return dict(parse_text(rsp.data))


def status(rsp: LoginResponse) -> tuple[int, int]:
    return rsp.status_class, rsp.status_detail


# ---------------------------------------------------------------------------- success


def test_operational_only_login() -> None:
    m = machine()
    rsp = m.receive(req(hello() + OPERATIONAL))
    assert status(rsp) == lg.SUCCESS and m.done
    assert (rsp.transit, rsp.csg, rsp.nsg, rsp.version_active) == (True, 1, 3, 0)
    assert (rsp.isid, rsp.itt, rsp.expcmdsn, rsp.maxcmdsn) == (ISID, 1, 100, 100 + 127)
    answer = keys(rsp)
    assert answer["TargetPortalGroupTag"] == "7" and answer["TargetAlias"] == "vol"
    assert answer["MaxRecvDataSegmentLength"] == "262144"  # our declaration
    assert answer["InitialR2T"] == "No" and answer["MaxBurstLength"] == "65536"
    assert "InitiatorName" not in answer and "TargetName" not in answer
    result = m.result
    assert result is not None and result.target is not None
    assert (result.initiator_name, result.session_type, result.cmdsn) == (INITIATOR, "Normal", 100)
    assert result.params.initiator_recv_length == 65536
    assert result.params.target_recv_length == 262144
    assert result.params.initial_r2t is False


def test_security_then_operational_then_full_feature() -> None:
    m = machine()
    r1 = m.receive(req([*hello(), ("AuthMethod", "None")], csg=0, nsg=1))
    assert status(r1) == lg.SUCCESS and (r1.transit, r1.csg, r1.nsg) == (True, 0, 1)
    assert keys(r1)["AuthMethod"] == "None" and "TargetPortalGroupTag" in keys(r1)
    r2 = m.receive(req(OPERATIONAL, transit=False))  # operational stage, no transit yet
    assert status(r2) == lg.SUCCESS and not r2.transit and not m.done
    assert "TargetPortalGroupTag" not in keys(r2)  # only in the first response
    assert r2.statsn == (r1.statsn + 1) & 0xFFFFFFFF
    r3 = m.receive(req([]))
    assert r3.transit and r3.nsg == 3 and m.done


def test_discovery_goes_from_security_straight_to_full_feature() -> None:
    m = machine()
    rsp = m.receive(req([*hello("Discovery"), ("AuthMethod", "None")], csg=0, nsg=3))
    assert status(rsp) == lg.SUCCESS and m.done
    assert m.result is not None and m.result.target is None
    assert m.result.params.target_recv_length == 8192  # nothing declared: the default


def test_libiscsi_repeats_identity_keys() -> None:
    m = machine()
    m.receive(req([*hello(), ("AuthMethod", "None")], csg=0, nsg=1))
    rsp = m.receive(req(hello() + OPERATIONAL))  # the same values again: fine
    assert status(rsp) == lg.SUCCESS and m.done


def test_text_continued_over_c_bit() -> None:
    m = machine()
    text = encode_text(hello() + OPERATIONAL)
    r1 = m.receive(req([], data=text[:30], cont=True, transit=False))
    assert status(r1) == lg.SUCCESS and not r1.transit and r1.data == b"" and not m.done
    r2 = m.receive(req([], data=text[30:]))
    assert status(r2) == lg.SUCCESS and m.done


# ---------------------------------------------------------------------------- CHAP


def chap_login(
    m: lg.LoginMachine, user: str, secret: str, mutual: tuple[int, bytes] | None = None
) -> LoginResponse:
    r1 = m.receive(req([*hello(), ("AuthMethod", "CHAP,None")], csg=0, nsg=1))
    assert status(r1) == lg.SUCCESS and keys(r1)["AuthMethod"] == "CHAP" and not r1.transit
    r2 = m.receive(req([("CHAP_A", "7,5")], csg=0, nsg=1, transit=False))
    k = keys(r2)
    assert status(r2) == lg.SUCCESS and k["CHAP_A"] == "5" and not r2.transit
    ident, challenge = int(k["CHAP_I"]), parse_binary(k["CHAP_C"])
    assert len(challenge) >= 16
    answer = [
        ("CHAP_N", user),
        ("CHAP_R", "0x" + response(ident, secret.encode(), challenge).hex()),
    ]
    if mutual:
        answer += [("CHAP_I", str(mutual[0])), ("CHAP_C", "0x" + mutual[1].hex())]
    return m.receive(req(answer, csg=0, nsg=1))


def test_chap_one_way() -> None:
    m = machine(target(chap=("alice", "s3cret-s3cret")))
    rsp = chap_login(m, "alice", "s3cret-s3cret")
    assert status(rsp) == lg.SUCCESS and rsp.transit and rsp.nsg == 1
    assert "CHAP_N" not in keys(rsp)
    assert m.receive(req(OPERATIONAL)).transit and m.done


def test_chap_wrong_secret_or_user() -> None:
    for user, secret in (("alice", "wrong"), ("bob", "s3cret-s3cret")):
        m = machine(target(chap=("alice", "s3cret-s3cret")))
        assert status(chap_login(m, user, secret)) == lg.AUTHENTICATION_FAILED
        assert m.failed


def test_chap_mutual() -> None:
    m = machine(target(chap=("alice", "s3cret-s3cret"), mutual_chap=("tgt", "t4rget-secret")))
    challenge = bytes(range(1, 33))
    rsp = chap_login(m, "alice", "s3cret-s3cret", mutual=(9, challenge))
    assert status(rsp) == lg.SUCCESS and rsp.transit
    k = keys(rsp)
    assert k["CHAP_N"] == "tgt"
    assert parse_binary(k["CHAP_R"]) == response(9, b"t4rget-secret", challenge)


def test_chap_mutual_without_target_credentials_fails() -> None:
    m = machine(target(chap=("alice", "s3cret-s3cret")))
    rsp = chap_login(m, "alice", "s3cret-s3cret", mutual=(1, b"x" * 16))
    assert status(rsp) == lg.AUTHENTICATION_FAILED


def test_chap_reflected_challenge_fails() -> None:
    m = machine(target(chap=("alice", "s3cret-s3cret"), mutual_chap=("tgt", "t4rget-secret")))
    m.receive(req([*hello(), ("AuthMethod", "CHAP")], csg=0, nsg=1))
    k = keys(m.receive(req([("CHAP_A", "5")], csg=0, nsg=1, transit=False)))
    ident, challenge = int(k["CHAP_I"]), parse_binary(k["CHAP_C"])
    good = "0x" + response(ident, b"s3cret-s3cret", challenge).hex()
    rsp = m.receive(
        req(
            [("CHAP_N", "alice"), ("CHAP_R", good), ("CHAP_I", "1"), ("CHAP_C", k["CHAP_C"])],
            csg=0,
            nsg=1,
        )
    )
    assert status(rsp) == lg.AUTHENTICATION_FAILED


def test_chap_required_but_not_offered() -> None:
    m = machine(target(chap=("alice", "s3cret-s3cret")))
    assert status(m.receive(req([*hello(), ("AuthMethod", "None")], csg=0, nsg=1))) == (2, 1)
    m = machine(target(chap=("alice", "s3cret-s3cret")))
    assert status(m.receive(req(hello() + OPERATIONAL))) == (2, 1)  # skipped security
    m = machine(target(chap=("alice", "s3cret-s3cret")))
    assert status(m.receive(req(hello(), csg=0, nsg=1))) == (2, 1)  # no AuthMethod at all


def test_chap_offered_but_not_configured() -> None:
    m = machine()
    assert (
        keys(m.receive(req([*hello(), ("AuthMethod", "CHAP,None")], csg=0, nsg=1)))["AuthMethod"]
        == "None"
    )
    m = machine()
    assert status(m.receive(req([*hello(), ("AuthMethod", "CHAP")], csg=0, nsg=1))) == (2, 1)


def test_chap_unsupported_algorithm_and_out_of_order_keys() -> None:
    m = machine(target(chap=("alice", "s3cret-s3cret")))
    m.receive(req([*hello(), ("AuthMethod", "CHAP")], csg=0, nsg=1))
    assert status(m.receive(req([("CHAP_A", "6,7")], csg=0, nsg=1, transit=False))) == (2, 1)
    m = machine(target(chap=("alice", "s3cret-s3cret")))
    m.receive(req([*hello(), ("AuthMethod", "CHAP")], csg=0, nsg=1))
    assert status(m.receive(req([("CHAP_N", "alice"), ("CHAP_R", "0x00")], csg=0, nsg=1))) == (
        2,
        1,
    )


def test_discovery_chap() -> None:
    from target.frontends.iscsi.chap import Credentials

    m = machine(discovery_chap=Credentials("disc", "d1scovery-secret"))
    r1 = m.receive(req([*hello("Discovery"), ("AuthMethod", "CHAP")], csg=0, nsg=3))
    assert keys(r1)["AuthMethod"] == "CHAP"
    m2 = machine()
    assert status(m2.receive(req(hello("Discovery") + OPERATIONAL))) == lg.SUCCESS


# ---------------------------------------------------------------------------- failures


def test_allow_list() -> None:
    allowed = target(allowed_initiators=["IQN.1994-05.com.example:HOST1"])  # case-insensitive
    assert status(machine(allowed).receive(req(hello() + OPERATIONAL))) == lg.SUCCESS
    other = target(allowed_initiators=["iqn.1994-05.com.example:host2"])
    assert status(machine(other).receive(req(hello() + OPERATIONAL))) == (2, 2)


def test_login_failures() -> None:
    cases = [
        (req([("SessionType", "Normal"), ("TargetName", TARGET)]), lg.MISSING_PARAMETER),
        (req([("InitiatorName", INITIATOR)]), lg.MISSING_PARAMETER),
        (req([("InitiatorName", INITIATOR), ("TargetName", "iqn.nope")]), lg.NOT_FOUND),
        (req(hello(), version_min=1, version_max=2), lg.UNSUPPORTED_VERSION),
        (
            req([("InitiatorName", INITIATOR), ("SessionType", "Weird")]),
            lg.SESSION_TYPE_UNSUPPORTED,
        ),
        (
            req([*hello(), ("MaxBurstLength", "512"), ("MaxBurstLength", "1024")]),
            lg.INITIATOR_ERROR,
        ),
        (req(hello(), nsg=2), lg.INITIATOR_ERROR),
        (req(hello(), csg=3), lg.INITIATOR_ERROR),
        (req(hello(), transit=True, cont=True), lg.INITIATOR_ERROR),
        (req([], data=b"garbage"), lg.INITIATOR_ERROR),
        (req(hello(), tsih=5), lg.NO_SESSION),
        (req([("InitiatorName", "x" * 300), ("TargetName", TARGET)]), lg.INITIATOR_ERROR),
        (req([*hello(), ("AuthMethod", "None")]), lg.INITIATOR_ERROR),  # security key in op
    ]
    for request, expected in cases:
        m = machine()
        rsp = m.receive(request)
        assert status(rsp) == expected, (request, m.failure)
        assert m.failed and not m.done and rsp.data == b"" and not rsp.transit
        assert status(m.receive(req(hello() + OPERATIONAL))) == lg.INITIATOR_ERROR  # over


def test_renegotiation_and_identity_change_fail() -> None:
    m = machine()
    m.receive(req([*hello(), ("MaxBurstLength", "8192")], transit=False))
    assert status(m.receive(req([("MaxBurstLength", "16384")]))) == lg.INITIATOR_ERROR
    m = machine()
    m.receive(req(hello(), transit=False))
    assert status(m.receive(req([("InitiatorName", "iqn.other")]))) == lg.INITIATOR_ERROR
    m = machine()
    m.receive(req(hello(), transit=False))
    assert status(m.receive(req([], isid=bytes(6)))) == lg.INITIATOR_ERROR


def test_connection_reinstatement_needs_a_known_session() -> None:
    m = machine(session_exists=lambda name, isid, tsih: tsih == 5 and isid == ISID)
    assert status(m.receive(req(hello() + OPERATIONAL, tsih=5))) == lg.SUCCESS
    assert m.result is not None and m.result.tsih == 5


# ---------------------------------------------------------------------------- fuzzing

KEY_NAMES = [
    "InitiatorName",
    "TargetName",
    "SessionType",
    "AuthMethod",
    "CHAP_A",
    "CHAP_N",
    "CHAP_R",
    "CHAP_I",
    "CHAP_C",
    "HeaderDigest",
    "MaxBurstLength",
    "InitialR2T",
    "MaxRecvDataSegmentLength",
    "TargetAlias",
    "SendTargets",
    "X-y",
    "ErrorRecoveryLevel",
]
VALUES = [
    "",
    "None",
    "CHAP",
    "CHAP,None",
    "5",
    "0x10",
    "Yes",
    "No",
    TARGET,
    INITIATOR,
    "Normal",
    "Discovery",
    "0xzz",
    "0b" + "A" * 8,
    "999999999999999999999",
    "Reject",
]


@settings(max_examples=250, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.tuples(st.sampled_from(KEY_NAMES), st.sampled_from(VALUES)), max_size=6),
            st.integers(0, 3),
            st.integers(0, 3),
            st.booleans(),
            st.booleans(),
            st.one_of(st.none(), st.binary(max_size=40)),
        ),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
)
def test_fuzzed_logins_fail_cleanly(steps: list, chap: bool) -> None:  # type: ignore[type-arg]
    m = machine(target(chap=("alice", "s3cret-s3cret")) if chap else target())
    for pairs, csg, nsg, transit, cont, raw in steps:
        rsp = m.receive(req(pairs, csg=csg, nsg=nsg, transit=transit, cont=cont, data=raw))
        assert isinstance(rsp, LoginResponse)
        assert rsp.status_class in (0, 2)
        if rsp.status_class:
            assert m.failed
        if m.done:
            assert rsp.transit and rsp.nsg == 3 and m.result is not None
