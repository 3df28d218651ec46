"""datapath.events decodes struct cg_event; datapath.reasons mirrors the verdict codes of common.h.

Both contracts are checked against the C headers themselves, parsed here, so a change on
either side without the other fails.
"""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from datapath import events, reasons

BPF_LIB = Path(__file__).resolve().parents[2] / "bpf" / "lib"
C_TYPES = {"__u8": 1, "__u16": 2, "__be16": 2, "__u32": 4, "__be32": 4, "__u64": 8}


def c_struct_layout(header: str, name: str) -> list[tuple[str, int, int]]:
    """(field, offset, size) of a struct of fixed-size integer fields and arrays, with C alignment."""
    body = re.search(rf"struct {name} \{{(.*?)\n\}};", header, re.S)
    assert body, f"struct {name} not found"
    layout, offset, widest = [], 0, 1
    for ctype, field, count in re.findall(r"^\s*(\w+)\s+(\w+)(?:\[(\d+)\])?;", body.group(1), re.M):
        size = C_TYPES[ctype]
        offset = (offset + size - 1) // size * size  # align to the element type
        layout.append((field, offset, size * int(count or 1)))
        offset += size * int(count or 1)
        widest = max(widest, size)
    total = (offset + widest - 1) // widest * widest
    layout.append(("<end>", total, 0))
    return layout


def py_struct_layout(fmt: struct.Struct, names: list[str]) -> list[tuple[str, int, int]]:
    order, codes = fmt.format[0], re.findall(r"\d*[a-zA-Z]", fmt.format[1:])
    assert len(codes) == len(names)
    layout, offset = [], 0
    for name, code in zip(names, codes, strict=True):
        size = struct.calcsize(order + code)
        layout.append((name, offset, size))
        offset += size
    layout.append(("<end>", fmt.size, 0))
    return layout


EVENT_FIELDS = [
    "ts_ns",
    "type",
    "reason",
    "dir",
    "l4proto",
    "ifindex",
    "src_identity",
    "dst_identity",
    "ethertype",
    "sport",
    "dport",
    "arp_op",
    "len",
    "smac",
    "dmac",
    "saddr",
    "daddr",
    "rule",
    "ct_state",
    "side",
    "pad",
]
PACKED = [f for f in EVENT_FIELDS if f != "pad"]  # padding takes no value in struct.pack


def test_event_struct_matches_maps_h() -> None:
    c_layout = c_struct_layout((BPF_LIB / "maps.h").read_text(), "cg_event")
    assert [f for f, _, _ in c_layout[:-1]] == EVENT_FIELDS
    assert py_struct_layout(events.EVENT, EVENT_FIELDS) == c_layout
    assert events.EVENT_SIZE == 88


def test_layout_parser_applies_c_alignment() -> None:
    header = "struct t {\n\t__u8 a;\n\t__u32 b;\n\t__u16 c[3];\n};\n"
    assert c_struct_layout(header, "t") == [("a", 0, 1), ("b", 4, 4), ("c", 8, 6), ("<end>", 16, 0)]


def record(**fields: Any) -> bytes:
    """An 88-byte struct cg_event, little-endian as the kernel writes it on x86 and arm64."""
    values = {
        "ts_ns": 0,
        "type": 1,
        "reason": 130,
        "dir": 0,
        "l4proto": 0,
        "ifindex": 7,
        "src_identity": 0,
        "dst_identity": 0,
        "ethertype": 0x0800,
        "sport": 0,
        "dport": 0,
        "arp_op": 0,
        "len": 98,
        "smac": b"\x02\x00\x00\x00\x00\x01",
        "dmac": b"\x02\x00\x00\x00\x00\x02",
        "saddr": bytes(16),
        "daddr": bytes(16),
        "rule": 0,
        "ct_state": 0,
        "side": 0,
    }
    values.update(fields)
    return events.EVENT.pack(*(values[name] for name in PACKED))


def v4(text: str) -> bytes:
    return bytes(map(int, text.split("."))) + bytes(12)


def test_decode_tcp_over_ipv4() -> None:
    raw = record(
        ts_ns=1_500_000_000,
        reason=132,
        dir=0,
        l4proto=6,
        ifindex=12,
        src_identity=5,
        dst_identity=9,
        sport=40000,
        dport=80,
        len=60,
        saddr=v4("10.1.0.2"),
        daddr=v4("10.1.0.3"),
    )
    assert len(raw) == 88
    assert events.decode(raw, boot_offset=100.0) == {
        "time": 101.5,
        "type": "drop",
        "reason": "invalid source IP",
        "code": 132,
        "direction": "from-endpoint",
        "ifindex": 12,
        "src_identity": 5,
        "dst_identity": 9,
        "ethertype": "ipv4",
        "length": 60,
        "src_mac": "02:00:00:00:00:01",
        "dst_mac": "02:00:00:00:00:02",
        "src": "10.1.0.2",
        "dst": "10.1.0.3",
        "protocol": "tcp",
        "sport": 40000,
        "dport": 80,
    }


def test_decode_icmpv6() -> None:
    src = bytes.fromhex("fd000000000000000000000000000002")
    dst = bytes.fromhex("ff020000000000000000000000000001")
    ev = events.decode(
        record(reason=152, dir=1, ethertype=0x86DD, l4proto=58, sport=134, dport=0, saddr=src, daddr=dst)
    )
    assert (ev["src"], ev["dst"], ev["protocol"]) == ("fd00::2", "ff02::1", "icmpv6")
    assert (ev["icmp_type"], ev["icmp_code"]) == (134, 0)
    assert ev["direction"] == "to-endpoint" and "sport" not in ev
    assert events.summary(ev) == "fd00::2 -> ff02::1 icmpv6 type 134 code 0"


def test_decode_arp() -> None:
    ev = events.decode(record(reason=151, ethertype=0x0806, arp_op=2, saddr=v4("10.1.0.9"), daddr=v4("10.1.0.1")))
    assert (ev["ethertype"], ev["arp_op"], ev["src"]) == ("arp", "reply", "10.1.0.9")
    assert "protocol" not in ev
    assert events.summary(ev) == "10.1.0.9 -> 10.1.0.1 arp reply"


def test_decode_unknown_values_still_prints_something() -> None:
    ev = events.decode(record(type=9, reason=200, dir=5, ethertype=0x88CC) + b"trailing bytes are ignored")
    assert (ev["type"], ev["reason"], ev["direction"], ev["ethertype"]) == (
        "type-9",
        "unknown verdict 200",
        "5",
        "0x88cc",
    )
    assert "src" not in ev
    assert events.summary(ev) == "02:00:00:00:00:01 -> 02:00:00:00:00:02 0x88cc"


def test_udp_over_ipv6_summary_brackets_addresses() -> None:
    ev = events.decode(
        record(
            ethertype=0x86DD,
            l4proto=17,
            sport=5353,
            dport=53,
            saddr=bytes.fromhex("fd000000000000000000000000000002"),
            daddr=bytes.fromhex("fd000000000000000000000000000001"),
        )
    )
    assert events.summary(ev) == "[fd00::2]:5353 -> [fd00::1]:53 udp"


@pytest.mark.parametrize("size", [0, 40, 80, 87])
def test_short_records_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="expected 88"):
        events.decode(record()[:size])


def test_format_line() -> None:
    ev = events.decode(record(l4proto=1, sport=8, dport=0, saddr=v4("10.1.0.2"), daddr=v4("8.8.8.8")))
    ev["time"] = 1_700_000_000.25
    line = events.format_line(ev)
    assert line == (time.strftime("%H:%M:%S", time.localtime(ev["time"])) + ".250 drop    if7          from-endpoint "
                    + "invalid source MAC".ljust(36) + " 10.1.0.2 -> 8.8.8.8 icmp type 8 code 0")
    assert "identity" not in line  # a non-policy drop of unidentified traffic: no identity part
    ev["endpoint"] = "abcdef0123456789"
    assert " abcdef012345 from-endpoint " in events.format_line(ev)


def test_non_policy_drops_carry_no_policy_fields() -> None:
    ev = events.decode(record(reason=132, rule=9, ct_state=1, side=1))
    assert not {"rule", "ct_state", "side", "verdict"} & set(ev)


def test_policy_drop_carries_rule_state_and_side() -> None:
    ev = events.decode(record(reason=181, rule=7, ct_state=0, side=1, src_identity=256, dst_identity=257,
                              l4proto=6, sport=40000, dport=80, saddr=v4("10.1.0.2"), daddr=v4("10.1.0.3")))
    assert (ev["type"], ev["reason"], ev["rule"], ev["ct_state"], ev["side"]) == (
        "drop", "policy denied by a deny rule", 7, "new", "egress")
    assert "verdict" not in ev
    line = events.format_line(ev)
    assert "policy denied by a deny rule (rule 7)" in line
    assert line.endswith("10.1.0.2:40000 -> 10.1.0.3:80 tcp  identity 256 -> 257")
    ev["src_labels"] = ["container:app=a"]
    assert events.format_line(ev).endswith("identity 256 [container:app=a] -> 257")


@pytest.mark.parametrize(
    ("reason", "rule", "side", "verdict", "what"),
    [
        (7, 3, 0, "allowed", "allowed by ingress rule 3"),
        (7, 0, 1, "allowed", "allowed by egress default"),
        (133, 0, 0, "denied", "denied by ingress default"),
        (181, 4, 1, "denied", "denied by egress rule 4"),
    ],
)
def test_verdict_events(reason: int, rule: int, side: int, verdict: str, what: str) -> None:
    ev = events.decode(record(type=2, reason=reason, rule=rule, side=side, ct_state=0, src_identity=5,
                              dst_identity=300))
    assert (ev["type"], ev["verdict"], ev["rule"]) == ("verdict", verdict, rule)
    line = events.format_line(ev)
    assert f" {what} " in line and line.endswith("identity 5 -> 300")


@pytest.mark.parametrize(("state", "name"), [(0, "new"), (1, "established"), (2, "reply"), (3, "related"), (9, "9")])
def test_trace_events_name_the_conntrack_state(state: int, name: str) -> None:
    ev = events.decode(record(type=3, reason=1, ct_state=state))
    assert (ev["type"], ev["ct_state"]) == ("trace", name)
    assert "verdict" not in ev
    assert f"delivered to a local endpoint ({name})" in events.format_line(ev)
    assert "identity 0 -> 0" in events.format_line(ev)  # traces always name the parties


# -- verdict codes ------------------------------------------------------------------------------


def header_verdicts() -> dict[int, str]:
    text = (BPF_LIB / "common.h").read_text()
    found = re.findall(r"^#define\s+((?:CG_OK|DROP)_\w+)\s+(\d+)\b", text, re.M)
    assert len(found) >= 10, "common.h no longer defines verdicts the way this test expects"
    codes = {int(code): name for name, code in found}
    assert len(codes) == len(found), "two verdicts share a code"
    return codes


def test_reasons_mirror_common_h_exactly() -> None:
    assert {code: entry[0] for code, entry in reasons.VERDICTS.items()} == header_verdicts()


@pytest.mark.parametrize(("code", "name"), sorted(header_verdicts().items()))
def test_each_verdict_has_a_constant_a_text_and_the_right_class(code: int, name: str) -> None:
    assert reasons.constant(code) == name
    assert reasons.name(code) and reasons.name(code) != f"unknown verdict {code}"
    assert reasons.is_drop(code) == name.startswith("DROP_")


def test_unknown_codes() -> None:
    assert reasons.name(77) == "unknown verdict 77"
    assert reasons.constant(77) == "CODE_77"
    assert reasons.is_drop(255) and not reasons.is_drop(0)
