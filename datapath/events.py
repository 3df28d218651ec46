"""Decode datapath event records (struct cg_event) and render them for people and machines.

Pure: bytes in, dicts and strings out. The kernel adapter reads the ring buffer and the
agent adds the endpoint ID for the interface before anything is shown.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from typing import Any

from datapath import reasons

# struct cg_event, see bpf/lib/maps.h
EVENT = struct.Struct("<QBBBBIIIHHHHI6s6s16s16sIBB2x")
EVENT_SIZE = EVENT.size  # 88

TYPE_NAMES = {1: "drop", 2: "verdict", 3: "trace"}
TRANSLATED = {14, 15}  # CG_OK_LB, CG_OK_LB_DSR: a service's packet-level translation (a new flow)
CT_STATES = {0: "new", 1: "established", 2: "reply", 3: "related"}
DIRECTIONS = {0: "from-endpoint", 1: "to-endpoint"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 0: "hopopts"}
ETHERTYPES = {0x0800: "ipv4", 0x86DD: "ipv6", 0x0806: "arp"}


def _mac(raw: bytes) -> str:
    return raw.hex(":")


def decode(raw: bytes, boot_offset: float = 0.0) -> dict[str, Any]:
    """Turn one ring-buffer record into a plain dict (`boot_offset` maps ktime to wall time)."""
    if len(raw) < EVENT_SIZE:
        raise ValueError(f"event record is {len(raw)} bytes, expected {EVENT_SIZE}")
    (ts, etype, reason, direction, l4, ifindex, src_id, dst_id, ethertype, sport, dport, arp_op,
     length, smac, dmac, saddr, daddr, rule, ct_state, side) = EVENT.unpack_from(raw)
    ev: dict[str, Any] = {
        "time": ts / 1e9 + boot_offset,
        "type": TYPE_NAMES.get(etype, f"type-{etype}"),
        "reason": reasons.name(reason),
        "code": reason,
        "direction": DIRECTIONS.get(direction, str(direction)),
        "ifindex": ifindex,
        "src_identity": src_id,
        "dst_identity": dst_id,
        "ethertype": ETHERTYPES.get(ethertype, f"0x{ethertype:04x}"),
        "length": length,
        "src_mac": _mac(smac),
        "dst_mac": _mac(dmac),
    }
    if etype in (2, 3) or reasons.is_policy(reason):
        ev["ct_state"] = CT_STATES.get(ct_state, str(ct_state))
        ev["rule"] = rule
        ev["side"] = "egress" if side else "ingress"
    if etype == 2:
        ev["verdict"] = "denied" if reasons.is_drop(reason) else "translated" if reason in TRANSLATED else "allowed"
    if ethertype in (0x0800, 0x0806):
        ev["src"] = socket.inet_ntop(socket.AF_INET, saddr[:4])
        ev["dst"] = socket.inet_ntop(socket.AF_INET, daddr[:4])
    elif ethertype == 0x86DD:
        ev["src"] = str(ipaddress.IPv6Address(saddr))  # compressed as ipaddress writes it
        ev["dst"] = str(ipaddress.IPv6Address(daddr))
    if ethertype == 0x0806:
        ev["arp_op"] = {1: "request", 2: "reply"}.get(arp_op, str(arp_op))
    elif ethertype in (0x0800, 0x86DD):
        ev["protocol"] = PROTOCOLS.get(l4, str(l4))
        if l4 in (6, 17):
            ev["sport"], ev["dport"] = sport, dport
        elif l4 in (1, 58):
            ev["icmp_type"], ev["icmp_code"] = sport, dport
    return ev


def boot_offset() -> float:
    """Seconds to add to CLOCK_MONOTONIC readings (bpf_ktime_get_ns) to get wall time."""
    return time.time() - time.monotonic()


def summary(ev: dict[str, Any]) -> str:
    """`src -> dst proto` part of a monitor line."""
    src, dst = ev.get("src", ev.get("src_mac", "?")), ev.get("dst", ev.get("dst_mac", "?"))
    if "sport" in ev:
        src, dst = _hostport(src, ev["sport"]), _hostport(dst, ev["dport"])
    proto = ev.get("protocol") or ev.get("ethertype", "")
    if "icmp_type" in ev:
        proto += f" type {ev['icmp_type']} code {ev['icmp_code']}"
    if "arp_op" in ev:
        proto = f"arp {ev['arp_op']}"
    return f"{src} -> {dst} {proto}".rstrip()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _party(ev: dict[str, Any], side: str) -> str:
    number = ev.get(f"{side}_identity", 0)
    labels = ev.get(f"{side}_labels")
    if labels:
        return f"{number} [{', '.join(labels)}]"
    return str(number)


def format_l7(ev: dict[str, Any], stamp: str) -> str:
    """An L7 request and its verdict, as Cilium's access log line."""
    if ev.get("l7") == "kafka":
        k = ev.get("kafka", {})
        topics = ",".join(k.get("topics") or []) or "-"
        key = k.get("api_key_name", k.get("api_key"))
        what = f"kafka {key} v{k.get('api_version')} topic {topics} => {k.get('error_code', 0)}"
    else:
        h = ev.get("http", {})
        status = h.get("status", h.get("grpc_status", "-"))
        what = f"{h.get('protocol', 'http')} {h.get('method', '?')} {h.get('host', '')}{h.get('path', '')} => {status}"
    rule = f" rule {ev['rule']}" if ev.get("rule") else ""
    side = f" by {ev['side']}" if ev.get("side") else ""
    return (f"{stamp} l7      {ev.get('src', '')} -> {ev.get('dst', '')}  {ev.get('verdict')}{side}{rule}  {what}"
            f"  identity {_party(ev, 'src')} -> {_party(ev, 'dst')}" + (f"  ({ev['info']})" if ev.get("info") else ""))


def format_line(ev: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev["time"])) + f".{int(ev['time'] % 1 * 1000):03d}"
    if ev.get("type") == "l7":
        return format_l7(ev, stamp)
    endpoint = (ev.get("endpoint") or f"if{ev['ifindex']}")[:12]
    kind = ev["type"]
    if kind == "verdict" and ev.get("verdict") == "translated":
        what = ev["reason"]
    elif kind == "verdict":
        what = f"{ev['verdict']} by {ev['side']}" + (f" rule {ev['rule']}" if ev.get("rule") else " default")
    elif kind == "trace":
        what = f"{ev['reason']} ({ev.get('ct_state', '?')})"
    else:
        what = ev["reason"] + (f" (rule {ev['rule']})" if ev.get("rule") else "")
    line = f"{stamp} {kind:<7} {endpoint:<12} {ev['direction']:<13} {what:<36} {summary(ev)}"
    if kind != "drop" or "src_labels" in ev or ev.get("src_identity") or ev.get("dst_identity"):
        line += f"  identity {_party(ev, 'src')} -> {_party(ev, 'dst')}"
    return line
