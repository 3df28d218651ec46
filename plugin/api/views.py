"""JSON shapes of the REST API, shared by the server (to render) and the CLI (to print)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from datapath import reasons
from datapath.model import Endpoint, Network
from datapath.policy import Rule
from datapath.policy.compile import PolicyKey, PolicyValue
from ipam.allocator import CheckReport
from ipam.pool import Pool
from plugin.service import StaleReport


def endpoint(ep: Endpoint, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    view = {
        "id": ep.id,
        "network_id": ep.network_id,
        "interface": ep.host_ifname,
        "container_interface": ep.peer_ifname,
        "mac": ep.mac,
        "host_mac": ep.host_mac,
        "ipv4": str(ep.ipv4) if ep.ipv4 else "",
        "ipv6": str(ep.ipv6) if ep.ipv6 else "",
        "gateway4": str(ep.gateway4) if ep.gateway4 else "",
        "gateway6": str(ep.gateway6) if ep.gateway6 else "",
        "sandbox": ep.sandbox,
        "state": "joined" if ep.sandbox else "created",
        "origin": ep.origin,
        "labels": list(ep.labels),
        "identity": ep.identity,
        "created": ep.created,
    }
    if policy is not None:
        view["policy"] = policy
    return view


def network(net: Network, endpoints: int) -> dict[str, Any]:
    return {
        "id": net.id,
        "name": net.name,
        "origin": net.origin,
        "subnets": [str(g.network) for g in net.gateways],
        "gateways": [str(g.ip) for g in net.gateways],
        "endpoints": endpoints,
        "created": net.created,
    }


def pool(p: Pool) -> dict[str, Any]:
    return {
        "id": p.id,
        "subnet": str(p.subnet),
        "range": str(p.subpool) if p.subpool else "",
        "gateway": str(p.gateway) if p.gateway else "",
        "network_id": p.network_id,
        "dynamic": p.dynamic,
        "refs": p.refs,
        "allocations": [
            {"address": str(a.address), "kind": a.kind, "owner": a.owner, "mac": a.mac, "created": a.created}
            for a in sorted(p.allocations.values(), key=lambda a: int(a.address))
        ],
    }


def check_report(r: CheckReport, stale: StaleReport) -> dict[str, Any]:
    def leak(x: Any) -> dict[str, Any]:
        return {"pool": x.pool_id, "address": str(x.address), "owner": x.owner, "reason": x.reason}

    return {
        "ok": r.ok and stale.empty,
        "docker": stale.docker,
        "stale": {
            "networks": [{"network": n, "reason": why} for n, why in stale.networks],
            "endpoints": [{"endpoint": e, "reason": why} for e, why in stale.endpoints],
            "pools": [{"pool": p, "reason": why} for p, why in stale.pools],
            "removed": stale.removed,
        },
        "leaked": [leak(x) for x in r.leaked],
        "released": [leak(x) for x in r.released],
        "missing": [{"endpoint": e, "address": str(a)} for e, a in r.missing],
        "duplicates": [{"address": str(a), "endpoints": list(e)} for a, e in r.duplicates],
        "unbound_pools": list(r.unbound_pools),
    }


def counters(raw: dict[int, tuple[int, int]]) -> list[dict[str, Any]]:
    return [
        {"code": code, "name": reasons.constant(code), "reason": reasons.name(code), "drop": reasons.is_drop(code),
         "packets": packets, "bytes": size}
        for code, (packets, size) in sorted(raw.items())
    ]


def identity(number: int, labels: list[str], owners: int, reserved: bool,
             nodes: list[str] | None = None) -> dict[str, Any]:
    """`endpoints`: local holders; `nodes`: every node using it (cluster identities only)."""
    out: dict[str, Any] = {"id": number, "labels": labels, "endpoints": owners, "reserved": reserved}
    if nodes is not None:
        out["nodes"] = nodes
    return out


def policy_entry(key: PolicyKey, value: PolicyValue, peer_labels: list[str]) -> dict[str, Any]:
    if key.any_proto:
        proto, ports = "any", "any"
    else:
        proto = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}.get(key.proto, str(key.proto))
        if key.port_bits == 0:
            ports = "any"
        else:
            last = key.port | ((1 << (16 - key.port_bits)) - 1)
            ports = str(key.port) if last == key.port else f"{key.port}-{last}"
    return {
        "direction": "egress" if key.egress else "ingress",
        "peer": key.peer,
        "peer_labels": peer_labels,
        "protocol": proto,
        "ports": ports,
        "verdict": "deny" if value.deny else "allow",
        "rule": value.rule,
    }


def rule(r: Rule) -> dict[str, Any]:
    return {
        "id": r.id,
        "labels": [f"{lb.source}:{lb.key}={lb.value}" for lb in r.labels],
        "description": r.description,
        "rule": r.document,  # in its CRD (kind, namespace) if it came from one: imported again, it means the same
    }


def ct_entry(key: Any, value: Any, now_ns: int) -> dict[str, Any]:
    size = 4 if key.family == 4 else 16
    src = ipaddress.ip_address(bytes(key.saddr)[:size])
    dst = ipaddress.ip_address(bytes(key.daddr)[:size])
    proto = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}.get(key.proto, str(key.proto))
    flags = [name for bit, name in ((1, "replied"), (2, "fin-sent"), (4, "fin-received"), (8, "reset"), (16, "proxy"))
             if value.flags & bit]
    return {
        "protocol": proto,
        "src": str(src),
        "dst": str(dst),
        "sport": socket.ntohs(key.sport),
        "dport": socket.ntohs(key.dport),
        "expires_in": round((value.expires - now_ns) / 1e9, 1),
        "packets": value.packets,
        "bytes": value.bytes,
        "src_identity": value.src_identity,
        "dst_identity": value.dst_identity,
        "rule": value.rule,
        "flags": flags,
    }
