"""REST blueprint of policy: import, show, delete, wait for enforcement, trace."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request

from datapath.errors import CellgateError, InvalidRequest, NotFound
from datapath.flows import FlowQuery
from datapath.policy import fromflows, parse_rules
from plugin import failpoints
from plugin.api import views
from plugin.api.context import ctx
from plugin.api.messages import (
    PolicyDelete,
    PolicyImport,
    PolicyPreview,
    PolicyQuery,
    PolicySuggest,
    PolicyWait,
    TraceRequest,
)
from plugin.api.wire import problem, read_body, reply

policy = Blueprint("policy", __name__)


@contextlib.contextmanager
def _policy_change() -> Iterator[None]:
    """cilium_policy_change_total: every import or deletion asked for, refused ones included."""
    telemetry = ctx().agent.telemetry
    try:
        yield
    except CellgateError:
        telemetry.count("policy_changes", outcome="fail")
        raise
    telemetry.count("policy_changes", outcome="success")


@policy.post("/v1/policy")
def policy_import() -> Response:
    with _policy_change():
        req = PolicyImport.parse(read_body())
        failpoints.hit("policy.import.parsed")
        return reply({"revision": ctx().agent.policy_import(req.rules)})


@policy.post("/v1/policy/preview")
def policy_preview() -> Response:
    """Which flows seen since `since` the rules would deny, and which they would newly allow."""
    c = ctx()
    req = PolicyPreview.parse(read_body(), time.time())
    asked = fromflows.cases(line["flow"] for line in c.flows.history(FlowQuery(), since=req.since))
    verdicts = c.agent.policy_preview(req.rules, list(asked))
    return reply(fromflows.report(asked, verdicts) | {"rules": len(req.rules)})


@policy.post("/v1/policy/suggest")
def policy_suggest() -> Response:
    c = ctx()
    req = PolicySuggest.parse(read_body(), time.time())
    flows = [line["flow"] for line in c.flows.history(FlowQuery(), since=req.since)]
    rules = fromflows.suggest(flows, c.agent.is_local_identity,
                              req.selector.matches if req.selector else (lambda labels: True))
    if rules:
        parse_rules(rules)  # what we suggest is a policy the agent accepts
    return reply({"rules": rules, "flows": len(flows)})


@policy.get("/v1/policy")
def policy_get() -> Response:
    req = PolicyQuery.parse(request.args)
    revision, rules = ctx().agent.policy_rules(req.labels)
    if req.labels and not rules:
        raise NotFound("no rule has labels " + req.text)
    return reply({"revision": revision, "rules": [views.rule(r) for r in rules]})


@policy.delete("/v1/policy")
def policy_delete() -> Response:
    with _policy_change():
        req = PolicyDelete.parse(read_body())
        revision, count = ctx().agent.policy_delete(req.labels)
        return reply({"revision": revision, "deleted": count})


@policy.get("/v1/policy/wait")
def policy_wait() -> Response:
    req = PolicyWait.parse(request.args)
    c = ctx()
    deadline = time.monotonic() + req.timeout
    with c.waits.held():
        while True:
            realized, latest = c.agent.policy_revisions()
            if realized >= req.revision:
                break
            if req.revision > latest:
                raise InvalidRequest(f"revision {req.revision} does not exist yet (latest is {latest})")
            if time.monotonic() >= deadline:
                return problem(f"revision {req.revision} not enforced yet", 504)
            time.sleep(0.05)
    return reply({"revision": c.agent.policy_revisions()[0], "endpoints": c.agent.endpoint_count()})


@policy.post("/v1/policy/trace")
def policy_trace() -> Response:
    req = TraceRequest.parse(read_body())
    agent = ctx().agent
    src, dst = (agent.party(side.kind, side.value) for side in (req.src, req.dst))
    result = agent.trace(src, dst, req.dport, req.request)
    return reply({
        "lines": result.lines,
        "verdict": "ALLOWED" if result.allowed else "DENIED",
        "egress": _decision(result.egress),
        "ingress": _decision(result.ingress),
        "l7": {side: {"allowed": v.allowed, "rule": v.rule} if v is not None else None
               for side, v in (("egress", result.l7_egress), ("ingress", result.l7_ingress))},
    })


def _decision(decision: Any) -> Any:
    if decision is None:
        return None
    return {"allowed": decision.allowed, "rule": decision.rule,
            "entry": decision.key.describe() if decision.key else None}
