"""REST routes of CNI: the ones the `cellgate-cni` binary calls (errors carry the CNI error code
for it), and the removal of a CNI network (`cellgate network rm`)."""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, request

from datapath.errors import InvalidRequest
from plugin.api import views
from plugin.cni.service import AddRequest, Attachment, CniService


def _body() -> dict[str, Any]:
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _ok(payload: Any) -> Response:
    return Response(json.dumps(payload), mimetype="application/json")


def register(app: Flask, cni: CniService) -> None:
    @app.post("/v1/cni/add")
    def cni_add() -> Response:
        return _ok(cni.add(AddRequest.parse(_body())))

    @app.post("/v1/cni/del")
    def cni_del() -> Response:
        return _ok({"removed": cni.delete(Attachment.parse(_body(), netns_required=False))})

    @app.post("/v1/cni/check")
    def cni_check() -> Response:
        cni.check(Attachment.parse(_body(), netns_required=True))
        return _ok({"ok": True})

    @app.post("/v1/cni/gc")
    def cni_gc() -> Response:
        body = _body()
        network = body.get("network")
        valid = body.get("valid") or []
        if not isinstance(network, str) or not network or not isinstance(valid, list):
            raise InvalidRequest("send {network, valid: [{container_id, ifname}]}")
        pairs = [(str(v.get("container_id", "")), str(v.get("ifname", ""))) for v in valid if isinstance(v, dict)]
        return _ok({"removed": cni.gc(network, pairs)})

    @app.delete("/v1/networks/<ident>")
    def network_rm(ident: str) -> Response:
        return _ok(views.network(cni.remove_network(ident), 0))

    @app.post("/v1/cni/status")
    def cni_status() -> Response:
        return _ok({"ok": True, "endpoints": len(cni.agent.endpoints)})
