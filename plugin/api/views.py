"""JSON shapes of the REST API, shared by the server (to render) and the CLI (to print)."""

from __future__ import annotations

from typing import Any

from datapath import reasons
from datapath.model import Endpoint, Network
from ipam.allocator import CheckReport
from ipam.pool import Pool


def endpoint(ep: Endpoint) -> dict[str, Any]:
    return {
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
        "labels": dict(ep.labels),
        "created": ep.created,
    }


def network(net: Network, endpoints: int) -> dict[str, Any]:
    return {
        "id": net.id,
        "name": net.name,
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


def check_report(r: CheckReport) -> dict[str, Any]:
    def leak(x: Any) -> dict[str, Any]:
        return {"pool": x.pool_id, "address": str(x.address), "owner": x.owner, "reason": x.reason}

    return {
        "ok": r.ok,
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
