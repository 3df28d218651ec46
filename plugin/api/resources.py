"""REST blueprints of the agent's state: status, endpoints, networks, identities, bpf, ipam.

Each route parses its request (plugin.api.messages), calls public use-case methods of the
Agent, and renders with plugin.api.views.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response

from datapath.errors import NotFound
from datapath.identity import FIRST_ALLOCATED
from plugin.api import views
from plugin.api.context import ctx
from plugin.api.messages import IpamCheck
from plugin.api.wire import read_body, reply

status = Blueprint("status", __name__)
endpoints = Blueprint("endpoints", __name__)
networks = Blueprint("networks", __name__)
identities = Blueprint("identities", __name__)
bpf = Blueprint("bpf", __name__)
ipam = Blueprint("ipam", __name__)


@status.get("/v1/healthz")
def healthz() -> Response:
    return reply({"ok": True})


@status.get("/v1/status")
def show_status() -> Response:
    c = ctx()
    body = c.agent.status()
    body.update(c.info())
    body["counters"] = views.counters(c.agent.counters())
    body["monitor"] = {"subscribers": c.hub.subscribers, "events": c.hub.published, "lost": c.hub.lost}
    totals = c.flows.totals()
    body["flows"] = {"followers": c.flows.followers, "kept": len(c.flows), "ring_size": c.flows.size,
                     "seen": totals.seen, "lost": totals.lost}
    body["kvstore"] = c.cluster.status() if c.cluster is not None else None
    return reply(body)


@endpoints.get("/v1/endpoints")
def list_endpoints() -> Response:
    return reply([views.endpoint(e) for e in ctx().agent.list_endpoints()])


@endpoints.get("/v1/endpoints/<ident>")
def show_endpoint(ident: str) -> Response:
    agent = ctx().agent
    ep = agent.find_endpoint(ident)
    return reply(views.endpoint(ep, agent.realized_policy(ep)))


@networks.get("/v1/networks")
def list_networks() -> Response:
    return reply([views.network(n, count) for n, count in ctx().agent.list_networks()])


@networks.delete("/v1/networks/<ident>")
def remove_network(ident: str) -> Response:
    """Remove a CNI network with no attachments (`cellgate network rm`)."""
    cni = ctx().cni
    if cni is None:
        raise NotFound("this agent serves no CNI networks")
    return reply(views.network(cni.remove_network(ident), 0))


@identities.get("/v1/identities")
def list_identities() -> Response:
    c = ctx()
    users = c.cluster.users() if c.cluster is not None else {}
    return reply([views.identity(number, labels, owners, number < FIRST_ALLOCATED, users.get(number))
                  for number, labels, owners in c.agent.identity_list()])


@identities.get("/v1/identities/<int:number>")
def show_identity(number: int) -> Response:
    c = ctx()
    labels, owners = c.agent.identity(number)
    users = c.cluster.users() if c.cluster is not None else {}
    return reply(views.identity(number, labels, owners, number < FIRST_ALLOCATED, users.get(number)))


@bpf.get("/v1/bpf/policy/<ident>")
def bpf_policy(ident: str) -> Response:
    agent = ctx().agent
    ep = agent.find_endpoint(ident)
    entries = [views.policy_entry(k, v, peer) for k, v, peer in agent.policy_entries(ep)]
    return reply({"endpoint": ep.id, "identity": ep.identity, "entries": entries})


@bpf.get("/v1/bpf/ct")
def bpf_ct() -> Response:
    now = time.monotonic_ns()
    entries = [views.ct_entry(k, v, now) for k, v in ctx().agent.ct_entries()]
    entries.sort(key=lambda e: (e["protocol"], e["src"], e["sport"], e["dst"], e["dport"]))
    return reply(entries)


@ipam.get("/v1/ipam")
def show_ipam() -> Response:
    ranges, pools = ctx().agent.ipam_pools()
    return reply({"ranges": ranges, "pools": [views.pool(p) for p in pools]})


@ipam.post("/v1/ipam/check")
def ipam_check() -> Response:
    req = IpamCheck.parse(read_body())
    return reply(views.check_report(*ctx().agent.ipam_check(release=req.release, grace=req.grace)))


BLUEPRINTS = (status, endpoints, networks, identities, bpf, ipam)
