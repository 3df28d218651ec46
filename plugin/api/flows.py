"""REST blueprint of the flow log: GET /v1/flows (history, then NDJSON streaming with follow) and
GET /v1/flows/totals (exact counts by type, verdict and drop reason)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator

from flask import Blueprint, Response, jsonify, request

from plugin.api.context import ctx
from plugin.api.messages import FlowsQuery

flows = Blueprint("flows", __name__)


@flows.get("/v1/flows")
def get_flows() -> Response:
    q = FlowsQuery.parse(request.args, time.time())
    c = ctx()
    release = c.streams.take()  # 503 past the bound
    stop = threading.Event()

    def generate() -> Iterator[str]:
        with contextlib.ExitStack() as stack:
            stack.callback(release)  # however the stream ends (werkzeug may not close it: GC does)
            stack.callback(stop.set)
            if not q.follow:
                for line in c.flows.history(q.query, q.last, q.first, q.since, q.until):
                    yield json.dumps(line) + "\n"
                return
            c.verdicts.start()  # allowed flows are reported by the datapath only while someone follows
            stack.callback(c.verdicts.stop)
            for item in c.flows.observe(q.query, stop, q.last, q.since, q.until):
                yield "\n" if item is None else json.dumps(item) + "\n"

    response = Response(generate(), mimetype="application/x-ndjson")
    response.call_on_close(release)  # a stream closed before it started
    return response


@flows.get("/v1/flows/totals")
def get_totals() -> Response:
    t = ctx().flows.totals()
    return jsonify({
        "seen": t.seen, "lost": t.lost, "kept": len(ctx().flows), "ring_size": ctx().flows.size,
        "flows": [{"type": k[0], "verdict": k[1], "count": n} for k, n in sorted(t.flows.items())],
        "drops": [{"code": k[0], "direction": k[1], "count": n} for k, n in sorted(t.drops.items())],
    })
