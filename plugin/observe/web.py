"""The opt-in HTTP listener's app (--http-serve-addr): Prometheus metrics at /metrics and the live
service dependency map at /map/ (a static page, Cytoscape vendored from npm, and two JSON
resources it polls). Read-only: GET only; nothing here changes the agent."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask, Response, redirect, request, send_file

from datapath.errors import InvalidRequest
from datapath.flows import FlowQuery, event_name, parse_time, parties, stamp
from plugin.api.wire import problem, reply
from plugin.observe import servicemap
from plugin.observe.flowlog import FlowLog

STATIC = Path(__file__).with_name("static")
FILES = {"cytoscape.min.js": "cytoscape-3.35.0.min.js", "map.js": "map.js"}
MAP_FLOWS = 10000  # flows aggregated per refresh, at most
TABLE_ROWS = 200
# No inline script, nothing from elsewhere: the page runs only its own two files.
CSP = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'"


def create_web(metrics: Callable[[], tuple[bytes, str]], flows: FlowLog | None = None,
               watching: Callable[[], None] = lambda: None) -> Flask:
    """`watching` is called on every map refresh: the agent keeps allowed flows reported while a
    page is open (the datapath reports them only on demand)."""
    app = Flask("cellgate.web")
    log = flows if flows is not None else FlowLog()

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/metrics")
    def scrape() -> Response:
        body, content_type = metrics()
        return Response(body, content_type=content_type)

    @app.get("/map")
    def map_redirect() -> Response:
        return redirect("/map/", 308)  # type: ignore[return-value]

    @app.get("/map/")
    def map_page() -> Response:
        return send_file(STATIC / "map.html", mimetype="text/html")

    @app.get("/map/static/<name>")
    def map_static(name: str) -> Response:
        if name not in FILES:
            return problem(f"no such file {name!r}", 404)
        return send_file(STATIC / FILES[name], mimetype="text/javascript")

    def window() -> tuple[float, str]:
        text = request.args.get("since", "")
        unknown = set(request.args) - {"since", "node", "edge"}
        if unknown:
            raise InvalidRequest(f"unknown argument(s): {', '.join(sorted(unknown))} (known: since, node, edge)")
        try:
            return (parse_time(text, time.time()) if text else 0.0), text
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    @app.get("/map/data")
    def map_data() -> Response:
        since, text = window()
        watching()
        lines = log.history(FlowQuery(), last=0 if since else MAP_FLOWS, since=since)[-MAP_FLOWS:]
        graph = servicemap.build(line["flow"] for line in lines)
        graph["flows"] = len(lines)
        graph["since"] = text
        return reply(graph)

    @app.get("/map/flows")
    def map_flows() -> Response:
        since, _ = window()
        node, edge = request.args.get("node", ""), request.args.get("edge", "")
        lines = log.history(FlowQuery(), last=0 if since else MAP_FLOWS, since=since)
        rows = []
        for line in reversed(lines):
            flow = line["flow"]
            if servicemap.matches(flow, node, edge):
                src, dst = parties(flow)
                rows.append({"time": stamp(flow), "source": src, "destination": dst, "type": event_name(flow),
                             "verdict": flow.get("verdict", ""), "summary": flow.get("Summary", "")})
                if len(rows) >= TABLE_ROWS:
                    break
        return reply(rows)

    @app.errorhandler(InvalidRequest)
    def bad(exc: InvalidRequest) -> Response:
        return problem(str(exc), 400)

    @app.errorhandler(404)
    def not_found(_: Exception) -> Response:
        return problem("no such path (this listener serves /metrics and /map/)", 404)

    @app.errorhandler(405)
    def not_allowed(_: Exception) -> Response:
        return problem("read-only: GET only", 405)

    return app
