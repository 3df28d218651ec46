"""The opt-in HTTP listener's app (--http-serve-addr): Prometheus metrics at /metrics. Read-only;
nothing here changes the agent."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, Response

from plugin.api.wire import problem


def create_web(metrics: Callable[[], tuple[bytes, str]]) -> Flask:
    app = Flask("cellgate.web")

    @app.get("/metrics")
    def scrape() -> Response:
        body, content_type = metrics()
        return Response(body, content_type=content_type)

    @app.errorhandler(404)
    def not_found(_: Exception) -> Response:
        return problem("no such path (this listener serves /metrics)", 404)

    @app.errorhandler(405)
    def not_allowed(_: Exception) -> Response:
        return problem("read-only: GET only", 405)

    return app
