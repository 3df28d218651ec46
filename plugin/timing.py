"""A Server-Timing header on every reply, so clients and benchmarks see the agent's own time."""

from __future__ import annotations

import time

from flask import Flask, Response, g


def add_server_timing(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.cellgate_started = time.perf_counter()

    @app.after_request
    def _stamp(response: Response) -> Response:
        started = getattr(g, "cellgate_started", None)
        if started is not None:
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.3f}"
        return response
