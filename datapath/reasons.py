"""Verdict codes of the datapath and their names; mirrors bpf/lib/common.h (a test checks).

Codes below 128 say where a packet went; 128 and above are drop reasons.
"""

from __future__ import annotations

VERDICTS: dict[int, tuple[str, str]] = {
    1: ("CG_OK_LOCAL", "delivered to a local endpoint"),
    2: ("CG_OK_STACK", "passed to the host stack"),
    3: ("CG_OK_TO_EP", "delivered from the host stack"),
    4: ("CG_OK_ARP", "ARP answered"),
    5: ("CG_OK_ND", "neighbour solicitation answered"),
    6: ("CG_OK_QUIET", "link housekeeping consumed"),
    7: ("CG_OK_POLICY", "allowed by policy"),
    8: ("CG_OK_EVENT_LOST", "event lost: the event ring was full"),
    12: ("CG_OK_TUNNEL", "sent through the tunnel to another node"),
    13: ("CG_OK_PROXY", "redirected to the L7 proxy"),
    14: ("CG_OK_LB", "service translated to a local backend"),
    15: ("CG_OK_LB_DSR", "service translated to a remote backend (direct server return)"),
    130: ("DROP_INVALID_SMAC", "invalid source MAC"),
    131: ("DROP_INVALID_DMAC", "invalid destination MAC"),
    132: ("DROP_INVALID_SIP", "invalid source IP"),
    133: ("DROP_POLICY", "policy denied"),
    134: ("DROP_INVALID", "invalid packet"),
    139: ("DROP_UNKNOWN_L3", "unsupported L3 protocol"),
    150: ("DROP_NO_ENDPOINT", "no endpoint for interface"),
    151: ("DROP_INVALID_ARP", "invalid ARP"),
    152: ("DROP_ROUTER_ADV", "router advertisement from endpoint"),
    153: ("DROP_NO_IPV6", "IPv6 not enabled on endpoint"),
    154: ("DROP_NO_IPV4", "IPv4 not enabled on endpoint"),
    155: ("DROP_CT_CREATE", "conntrack entry could not be created"),
    157: ("DROP_FRAG", "fragment without an L3 allow"),
    178: ("DROP_PROXY_LOOKUP", "L7 proxy not listening (fail closed)"),
    179: ("DROP_PROXY_ASSIGN", "L7 proxy socket refused the packet"),
    181: ("DROP_POLICY_DENY", "policy denied by a deny rule"),
    190: ("DROP_NO_TUNNEL_KEY", "no tunnel metadata"),
    191: ("DROP_UNKNOWN_NODE", "encapsulated by an unknown node (forged)"),
    192: ("DROP_NO_CLUSTER_IDENTITY", "identity not cluster-wide yet"),
    193: ("DROP_NOT_LOCAL", "tunnelled to an address that is no local endpoint"),
    194: ("DROP_TUNNEL_SRC", "inner source belongs to another node"),
    195: ("DROP_NO_TUNNEL_ENDPOINT", "no node hosts the tunnelled destination"),
    196: ("DROP_PROXY_REQUIRED", "L7 policy on a path that cannot reach the proxy"),
    197: ("DROP_LB_BACKEND", "packet-level balancing to a backend outside the cluster"),
}
POLICY = {7, 13, 133, 157, 178, 179, 181, 196}

FIRST_DROP = 128


def name(code: int) -> str:
    """Human text for a verdict code; unknown codes still print something useful."""
    entry = VERDICTS.get(code)
    return entry[1] if entry else f"unknown verdict {code}"


def constant(code: int) -> str:
    entry = VERDICTS.get(code)
    return entry[0] if entry else f"CODE_{code}"


def is_drop(code: int) -> bool:
    return code >= FIRST_DROP


def is_policy(code: int) -> bool:
    return code in POLICY
