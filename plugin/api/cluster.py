"""REST blueprint of the cluster: nodes, the kvstore's health, and the kernel's ipcache.

Routes parse nothing but the path; the ipcache view reads the kernel through the Agent.
Without a kvstore, /v1/nodes lists this node alone and /v1/kvstore says it is not configured.
"""

from __future__ import annotations

from flask import Blueprint, Response

from plugin.api.context import ctx
from plugin.api.wire import reply

cluster = Blueprint("cluster", __name__)


@cluster.get("/v1/nodes")
def list_nodes() -> Response:
    c = ctx()
    if c.cluster is None:
        st = c.agent.status()
        return reply([{"name": st["instance"], "address": "", "ipv4_range": st["ranges"]["ipv4"],
                       "ipv6_range": st["ranges"]["ipv6"], "tunnel": "", "local": True,
                       "endpoints": st["endpoints"], "clash": ""}])
    return reply(c.cluster.node_list())


@cluster.get("/v1/kvstore")
def kvstore() -> Response:
    c = ctx()
    return reply(c.cluster.status() if c.cluster is not None else {"backend": "", "connected": False})


@cluster.get("/v1/bpf/ipcache")
def bpf_ipcache() -> Response:
    agent = ctx().agent
    rows = []
    for entry in agent.ipcache_entries():
        rows.append({
            "prefix": str(entry.prefix),
            "identity": entry.identity,
            "labels": agent.labels_of(entry.identity),
            "tunnel_endpoint": str(getattr(entry, "tunnel_endpoint", None) or ""),
        })
    rows.sort(key=lambda r: (":" in r["prefix"], r["prefix"]))
    return reply(rows)
