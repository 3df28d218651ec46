"""The agent's REST API (the one the CLI uses; there is no other way in): the app factory.

One blueprint per resource (plugin.api.resources, policy, monitor, cni); errors are JSON
problems: {"error": "...", "status": N} with a matching HTTP status, translated here once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from datapath.errors import CellgateError
from plugin.api import context
from plugin.api.cluster import cluster as cluster_routes
from plugin.api.cni import cni as cni_routes
from plugin.api.context import MAX_STREAMS, MAX_WAITS, ApiContext
from plugin.api.flows import flows as flows_routes
from plugin.api.monitor import monitor
from plugin.api.policy import policy
from plugin.api.resources import BLUEPRINTS
from plugin.api.services import services
from plugin.api.wire import problem
from plugin.monitor import EventHub
from plugin.observe.flowlog import FlowLog
from plugin.service import Agent
from plugin.service.cni import CniService
from plugin.timing import add_server_timing

if TYPE_CHECKING:
    from plugin.service.cluster import ClusterService

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
__all__ = ["MAX_BODY", "MAX_STREAMS", "MAX_WAITS", "create_app"]


def create_app(agent: Agent, hub: EventHub, info: Callable[[], dict[str, Any]],
               cni: CniService | None = None, cluster: ClusterService | None = None,
               flows: FlowLog | None = None, verdicts: context.Tracers | None = None) -> Flask:
    app = Flask("cellgate.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.url_map.merge_slashes = False  # /v1//endpoints is no path of ours: 404, not a redirect
    app.extensions[context.KEY] = ApiContext.build(agent, hub, info, cni, cluster, flows, verdicts)
    add_server_timing(app)
    for blueprint in (*BLUEPRINTS, policy, monitor, flows_routes, cluster_routes, services):
        app.register_blueprint(blueprint)
    if cni is not None:
        app.register_blueprint(cni_routes)
    app.register_error_handler(CellgateError, cellgate_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
    return app


def cellgate_error(exc: CellgateError) -> Response:
    return problem(str(exc), exc.status)


def http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    text = f"no such API path {request.path}" if code == 404 else (exc.description or "error")
    return problem(text, code)


def unexpected(exc: Exception) -> Response:
    log.exception("API %s crashed", request.path)
    return problem(f"internal error: {type(exc).__name__}", 500)
