"""REST blueprint of the event monitor: an NDJSON stream of datapath events."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

from flask import Blueprint, Response, request

from plugin.api.context import ctx
from plugin.api.messages import MonitorQuery

monitor = Blueprint("monitor", __name__)


@monitor.get("/v1/monitor")
def stream_events() -> Response:
    query = MonitorQuery.parse(request.args)
    c = ctx()
    release = c.streams.take()  # 503 past the bound

    def generate() -> Iterator[str]:
        with contextlib.ExitStack() as stack:
            stack.callback(release)  # however the stream ends (werkzeug may not close it: GC does)
            if query.type == "trace":
                c.tracers.start()
                stack.callback(c.tracers.stop)
            if query.type in ("", "verdict"):
                c.verdicts.start()
                stack.callback(c.verdicts.stop)
            yield json.dumps({"type": "hello", "time": time.time()}) + "\n"
            for ev in c.hub.stream(query.accepts):
                yield "\n" if ev is None else json.dumps(ev) + "\n"

    response = Response(generate(), mimetype="application/x-ndjson")
    response.call_on_close(release)  # a stream closed before it started
    return response
