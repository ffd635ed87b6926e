"""SendTargets (RFC 7143 13.3 and appendix C): which targets an initiator may see, and at
which address it can reach them.

The address is the one the initiator connected to (the socket's local address), so an
initiator behind NAT or port forwarding gets an address that worked for it, unless the
operator configured a public portal to advertise instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from target.frontends.iscsi.config import TargetConfig, normalize_name
from target.frontends.iscsi.negotiation import REJECT


def portal_address(host: str, port: int, tpgt: int) -> str:
    """TargetAddress value: host:port,tpgt, an IPv6 address in brackets."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return f"{host}:{port},{tpgt}"  # a DNS name
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"{ip.ipv4_mapped}:{port},{tpgt}"
        return f"[{host}]:{port},{tpgt}"
    return f"{ip}:{port},{tpgt}"


def send_targets(
    value: str,
    targets: Iterable[TargetConfig],
    initiator: str,
    address: str,
    *,
    discovery: bool,
    session_target: TargetConfig | None = None,
) -> list[tuple[str, str]]:
    """The answer to SendTargets=<value>: TargetName/TargetAddress pairs, or a Reject.

    In a discovery session `All` lists every target the initiator may log in to and a
    name lists that one target. In a normal session only the session's own target can be
    asked about (empty value or its name)."""
    visible = [t for t in targets if t.allows(initiator)]
    if value == "All":
        if not discovery:
            return [("SendTargets", REJECT)]
        chosen = visible
    elif value == "":
        if session_target is None:
            return [("SendTargets", REJECT)]
        chosen = [session_target]
    else:
        wanted = normalize_name(value)
        pool = visible if session_target is None else [session_target]
        chosen = [t for t in pool if t.name == wanted]
    pairs: list[tuple[str, str]] = []
    for target in chosen:
        pairs.append(("TargetName", target.iqn))
        pairs.append(("TargetAddress", address))
    return pairs
