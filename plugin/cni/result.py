"""The agent's CNI result (1.x shape) written in the configuration's cniVersion.

Standard library only (the `cellgate-cni` binary runs with `python -IS`).
"""

from __future__ import annotations

import ipaddress
from typing import Any


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def format_result(version: str, result: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
    """The agent's result (1.x shape) in the configuration's version, after any prevResult."""
    ifaces = list((prev or {}).get("interfaces") or [])
    ips = [dict(x) for x in (prev or {}).get("ips") or []]
    routes = list((prev or {}).get("routes") or [])
    offset = len(ifaces)
    ifaces.extend(result["interfaces"])
    for ip in result["ips"]:
        ips.append({**ip, "interface": ip["interface"] + offset})
    routes.extend(r for r in result["routes"] if r not in routes)
    dns = (prev or {}).get("dns") or result.get("dns") or {}
    if version_tuple(version) < (0, 3, 0):
        out: dict[str, Any] = {"cniVersion": version, "dns": dns}
        for family, key in ((4, "ip4"), (6, "ip6")):
            mine = [ip for ip in ips if ipaddress.ip_interface(ip["address"]).version == family]
            if mine:
                entry: dict[str, Any] = {"ip": mine[-1]["address"]}
                if mine[-1].get("gateway"):
                    entry["gateway"] = mine[-1]["gateway"]
                fam_routes = [r for r in routes if ipaddress.ip_network(r["dst"], strict=False).version == family]
                if fam_routes:
                    entry["routes"] = fam_routes
                out[key] = entry
        return out
    if version_tuple(version) < (1, 0, 0):
        for ip in ips:
            ip["version"] = str(ipaddress.ip_interface(ip["address"]).version)
    else:
        for ip in ips:
            ip.pop("version", None)
    return {"cniVersion": version, "interfaces": ifaces, "ips": ips, "routes": routes, "dns": dns}
