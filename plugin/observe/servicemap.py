"""The service dependency map: flows (Hubble's shape) aggregated into a graph whose nodes are
identities (by their labels) and services, and whose edges are (source, destination, port,
protocol) with counts per verdict and the L7 requests seen on them. Pure; imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

RESERVED_NAMES = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init", 6: "remote-node",
                  7: "kube-apiserver", 8: "ingress"}


def node_of(party: Mapping[str, Any], address: str) -> tuple[str, str]:
    """(node ID, label to show) of one side of a flow: its identity, else its address."""
    identity = int(party.get("identity") or 0)
    labels = [str(x) for x in party.get("labels") or []]
    if identity:
        shown = [x.split(":", 1)[-1] for x in labels] or [RESERVED_NAMES.get(identity, f"identity {identity}")]
        return f"id:{identity}", ", ".join(shown)
    return f"ip:{address}", address or "?"


def edge_key(flow: Mapping[str, Any]) -> tuple[str, str, str, int]:
    ip = flow.get("IP") or {}
    l4: Mapping[str, Any] = next(iter((flow.get("l4") or {}).values()), {})
    src, _ = node_of(flow.get("source") or {}, str(ip.get("source", "")))
    dst, _ = node_of(flow.get("destination") or {}, str(ip.get("destination", "")))
    proto = next(iter(flow.get("l4") or {}), "").lower()
    return src, dst, proto, int(l4.get("destination_port", 0))


def build(flows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """{"nodes": [...], "edges": [...]} for the page (Cytoscape's element data)."""
    nodes: dict[str, dict[str, Any]] = {}
    edges: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for flow in flows:
        if flow.get("is_reply"):
            continue  # a reply belongs to the edge of its request
        ip = flow.get("IP") or {}
        for side, address in (("source", ip.get("source", "")), ("destination", ip.get("destination", ""))):
            node_id, label = node_of(flow.get(side) or {}, str(address))
            node = nodes.setdefault(node_id, {"id": node_id, "label": label, "kind": "identity",
                                              "identity": int((flow.get(side) or {}).get("identity") or 0),
                                              "flows": 0, "dropped": 0})
            node["flows"] += 1
            node["dropped"] += flow.get("verdict") == "DROPPED"
        service = (flow.get("destination_service") or {}).get("name")
        key = edge_key(flow)
        edge = edges.setdefault(key, {"id": "|".join(map(str, key)), "source": key[0], "target": key[1],
                                      "protocol": key[2], "port": key[3], "verdicts": {}, "l7": {},
                                      "service": service or ""})
        verdict = str(flow.get("verdict", ""))
        edge["verdicts"][verdict] = edge["verdicts"].get(verdict, 0) + 1
        http = (flow.get("l7") or {}).get("http")
        if http:
            path = "/" + str(http.get("url", "")).split("://", 1)[-1].partition("/")[2]
            what = f"{http.get('method', '')} {path}"
            edge["l7"][what] = edge["l7"].get(what, 0) + 1
        kafka = (flow.get("l7") or {}).get("kafka")
        if kafka:
            what = f"{kafka.get('api_key', '')} {kafka.get('topic', '')}".strip()
            edge["l7"][what] = edge["l7"].get(what, 0) + 1
        if service:
            sid = f"svc:{service}"
            nodes.setdefault(sid, {"id": sid, "label": service, "kind": "service", "identity": 0, "flows": 0,
                                   "dropped": 0})["flows"] += 1
    out_edges = []
    for edge in edges.values():
        total = sum(edge["verdicts"].values())
        dropped = edge["verdicts"].get("DROPPED", 0)
        edge["count"] = total
        edge["state"] = "dropped" if dropped == total else "mixed" if dropped else \
            "redirected" if edge["verdicts"].get("REDIRECTED") or edge["l7"] else "forwarded"
        port = f"{edge['port']}/{edge['protocol']}" if edge["port"] else edge["protocol"] or "ip"
        l7 = "; ".join(f"{k} x{n}" for k, n in sorted(edge["l7"].items()))
        edge["label"] = f"{port} x{total}" + (f" ({dropped} dropped)" if dropped else "") + (f"\n{l7}" if l7 else "")
        out_edges.append(edge)
    return {"nodes": sorted(nodes.values(), key=lambda n: n["id"]), "edges": sorted(out_edges, key=lambda e: e["id"])}


def matches(flow: Mapping[str, Any], node: str = "", edge: str = "") -> bool:
    """Whether a flow belongs to a node or an edge of the map (the page's table filter)."""
    key = edge_key(flow)
    if edge:
        return "|".join(map(str, key)) == edge
    if node:
        return node in (key[0], key[1]) or node == f"svc:{(flow.get('destination_service') or {}).get('name', '')}"
    return True
