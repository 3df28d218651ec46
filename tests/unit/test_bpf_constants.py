"""Every constant of bpf/lib/*.h that Python mirrors, checked against the headers themselves.

The headers are parsed with a small regex (`#define NAME value`), no compiler: a change on
either side without the other fails here, in the unit tier. Verdict codes (CG_OK_*, DROP_*)
and the event layout are checked in test_events_reasons.py; map layouts in tests/kernel.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from datapath import events, identity, plan
from datapath.kernel import layout

BPF = Path(__file__).resolve().parents[2] / "bpf"
_DEFINE = re.compile(r"^#define\s+(\w+)\s+\(?(0x[0-9a-fA-F]+|\d+)\)?(?:\s|$)", re.M)


def c_constants() -> dict[str, int]:
    """NAME -> value of every integer #define in bpf/lib/*.h; a name defined twice must agree."""
    found: dict[str, int] = {}
    for header in sorted((BPF / "lib").glob("*.h")):
        for name, value in _DEFINE.findall(header.read_text()):
            number = int(value, 0)
            assert found.setdefault(name, number) == number, f"{name} defined twice with different values"
    return found


C = c_constants()


def group(prefix: str) -> dict[str, int]:
    return {name: value for name, value in C.items() if name.startswith(prefix)}


def test_the_parser_reads_defines_in_hex_and_decimal() -> None:
    text = "#define CG_A 0x10  /* c */\n#define CG_B\t7\n#define CG_C (3)\n#define CG_D \"s\"\n#ifndef CG_A\n"
    assert dict(_DEFINE.findall(text)) == {"CG_A": "0x10", "CG_B": "7", "CG_C": "3"}
    assert len(C) > 30, "bpf/lib no longer defines constants the way this parser expects"


def test_config_flags() -> None:
    assert group("CG_CFG_") == {"CG_CFG_TRACE": layout.CG_CFG_TRACE, "CG_CFG_QUIET": layout.CG_CFG_QUIET,
                                "CG_CFG_LB_FLOWS": layout.CG_CFG_LB_FLOWS}


def test_endpoint_flags() -> None:
    assert group("CG_EP_F_") == {"CG_EP_F_IPV4": plan.FLAG_IPV4, "CG_EP_F_IPV6": plan.FLAG_IPV6}
    assert (layout.CG_EP_F_IPV4, layout.CG_EP_F_IPV6) == (plan.FLAG_IPV4, plan.FLAG_IPV6)


def test_reserved_identities() -> None:
    assert group("CG_ID_") == {"CG_ID_ANY": identity.ANY, "CG_ID_HOST": identity.HOST, "CG_ID_WORLD": identity.WORLD,
                               "CG_ID_REMOTE_NODE": identity.REMOTE_NODE,
                               "CG_ID_FIRST_ALLOCATED": identity.FIRST_ALLOCATED}
    assert C["CG_ID_HOST"] == plan.HOST_IDENTITY


def test_tunnel_constants() -> None:
    from datapath import nodes

    assert C["CG_TUNNEL_MAX_ID"] == nodes.MAX_CLUSTER_IDENTITY
    assert (nodes.REMOTE_NODE, nodes.WORLD, nodes.HOST) == (identity.REMOTE_NODE, identity.WORLD, identity.HOST)


def test_conntrack_states_are_the_event_decoders() -> None:
    states = {"CG_CT_NEW": "new", "CG_CT_ESTABLISHED": "established", "CG_CT_REPLY": "reply",
              "CG_CT_RELATED": "related"}
    assert {C[name]: text for name, text in states.items()} == events.CT_STATES
    assert not {"CT_NEW", "CT_ESTABLISHED", "CT_REPLY", "CT_RELATED"} & set(C), "states carry the CG_ prefix"


def test_event_types_and_directions() -> None:
    assert {value: name[len("CG_EVENT_"):].lower() for name, value in group("CG_EVENT_").items()
            if name != "CG_EVENT_PAGES"} == events.TYPE_NAMES
    assert {C["CG_DIR_FROM_EP"]: "from-endpoint", C["CG_DIR_TO_EP"]: "to-endpoint"} == events.DIRECTIONS
    assert set(group("CG_DIR_")) == {"CG_DIR_FROM_EP", "CG_DIR_TO_EP"}


def test_conntrack_flags_and_sides() -> None:
    assert group("CG_CT_F_") == {name: getattr(layout, name) for name in
                                 ("CG_CT_F_REPLIED", "CG_CT_F_FIN_FWD", "CG_CT_F_FIN_REV", "CG_CT_F_RST",
                                  "CG_CT_F_PROXY")}
    assert group("CG_CT_SIDE_") == {"CG_CT_SIDE_EGRESS": layout.CG_CT_SIDE_EGRESS,
                                    "CG_CT_SIDE_INGRESS": layout.CG_CT_SIDE_INGRESS}


@pytest.mark.parametrize(("name", "shown"), [("CG_CT_F_REPLIED", "replied"), ("CG_CT_F_FIN_FWD", "fin-sent"),
                                             ("CG_CT_F_FIN_REV", "fin-received"), ("CG_CT_F_RST", "reset"),
                                             ("CG_CT_F_PROXY", "proxy")])
def test_the_conntrack_view_names_each_flag_bit(name: str, shown: str) -> None:
    from plugin.api import views

    addr = bytes(ipaddress.ip_address("10.0.0.1").packed) + bytes(12)
    key = SimpleNamespace(family=4, saddr=addr, daddr=addr, proto=6, sport=0, dport=0)
    value = SimpleNamespace(flags=C[name], expires=0, packets=0, bytes=0, src_identity=0, dst_identity=0, rule=0,
                            policy_sides=0, policy_rev=0)
    assert views.ct_entry(key, value, 0)["flags"] == [shown]


def test_every_constant_carries_the_cg_prefix() -> None:
    """Ours start with CG_; the only others are the kernel's (IPPROTO_*, ARP*) and the verdict
    names the CLI prints (DROP_*, which datapath.reasons mirrors and test_events_reasons checks)."""
    theirs = re.compile(r"^(IPPROTO_|ARPHRD_|ARPOP_|DROP_)")
    assert sorted(name for name in C if not name.startswith("CG_") and not theirs.match(name)) == []


def test_the_metrics_map_holds_every_code_in_both_directions() -> None:
    assert C["CG_METRICS_SIZE"] == layout.FIXED_ENTRIES["cg_metrics"] == 2 * C["CG_METRICS_CODES"] == 512
    assert C["CG_DIR_TO_EP"] == 1 and C["CG_DIR_FROM_EP"] == 0  # the direction bit above the 8-bit code
