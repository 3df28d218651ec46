"""The agent's REST API (the one the CLI uses; there is no other way in).

Errors are JSON problems: {"error": "...", "status": N} with a matching HTTP status.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from datapath.errors import CellgateError, InvalidRequest
from plugin.api import views
from plugin.monitor import EventHub
from plugin.service import Agent

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
EVENT_TYPES = {"drop"}


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, indent=None), status=status, mimetype="application/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _body() -> dict[str, Any]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def create_app(agent: Agent, hub: EventHub, info: Callable[[], dict[str, Any]]) -> Flask:
    app = Flask("cellgate.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.errorhandler(CellgateError)
    def cellgate_error(exc: CellgateError) -> Response:
        return _json({"error": str(exc), "status": exc.status}, exc.status)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        text = f"no such API path {request.path}" if code == 404 else (exc.description or "error")
        return _json({"error": text, "status": code}, code)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("API %s crashed", request.path)
        return _json({"error": f"internal error: {type(exc).__name__}", "status": 500}, 500)

    @app.get("/v1/healthz")
    def healthz() -> Response:
        return _json({"ok": True})

    @app.get("/v1/status")
    def status() -> Response:
        body = agent.status()
        body.update(info())
        body["counters"] = views.counters(agent.kernel.counters())
        body["monitor"] = {"subscribers": hub.subscribers, "events": hub.published, "lost": hub.lost}
        return _json(body)

    @app.get("/v1/endpoints")
    def endpoints() -> Response:
        eps = sorted(agent.endpoints.values(), key=lambda e: e.created)
        return _json([views.endpoint(e) for e in eps])

    @app.get("/v1/endpoints/<ident>")
    def endpoint(ident: str) -> Response:
        return _json(views.endpoint(agent.find_endpoint(ident)))

    @app.get("/v1/networks")
    def networks() -> Response:
        counts: dict[str, int] = {}
        for ep in list(agent.endpoints.values()):
            counts[ep.network_id] = counts.get(ep.network_id, 0) + 1
        return _json([views.network(n, counts.get(n.id, 0)) for n in agent.networks.values()])

    @app.get("/v1/ipam")
    def ipam() -> Response:
        return _json({
            "ranges": {"ipv4": str(agent.ipam.ranges.ipv4), "ipv6": str(agent.ipam.ranges.ipv6)},
            "pools": [views.pool(p) for p in agent.ipam.pools()],
        })

    @app.post("/v1/ipam/check")
    def ipam_check() -> Response:
        body = _body()
        unknown = set(body) - {"release", "grace"}
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        release = body.get("release", False)
        grace = body.get("grace", 60.0)
        if not isinstance(release, bool):
            raise InvalidRequest("release must be true or false")
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace) or grace < 0:
            raise InvalidRequest("grace must be a number of seconds >= 0")
        return _json(views.check_report(agent.ipam_check(release=release, grace=float(grace))))

    @app.get("/v1/monitor")
    def monitor() -> Response:
        wanted = request.args.get("type", "")
        if wanted and wanted not in EVENT_TYPES:
            raise InvalidRequest(f"unknown event type {wanted!r} (known: {', '.join(sorted(EVENT_TYPES))})")
        endpoint = request.args.get("endpoint", "")

        def accept(ev: dict[str, Any]) -> bool:
            if wanted and ev.get("type") != wanted:
                return False
            return not endpoint or str(ev.get("endpoint", "")).startswith(endpoint)

        def generate() -> Iterator[str]:
            yield json.dumps({"type": "hello", "time": time.time()}) + "\n"
            for ev in hub.stream(accept):
                yield "\n" if ev is None else json.dumps(ev) + "\n"

        return Response(generate(), mimetype="application/x-ndjson")

    return app
