"""REST blueprint of load-balanced services: /v1/services (list, create) and /v1/services/<name>
(get, update with PUT, delete). Bodies: {"frontend": "VIP:PORT[/tcp|udp]", "backends": [...]}
or {"frontend": ..., "selector": "app=web", "target_port": 80}, with an optional "name"."""

from __future__ import annotations

from flask import Blueprint, Response

from plugin.api.context import ctx
from plugin.api.messages import service_body
from plugin.api.wire import read_body, reply

services = Blueprint("services", __name__)


@services.get("/v1/services")
def list_services() -> Response:
    return reply([s.to_json() for s in ctx().agent.service_list()])


@services.post("/v1/services")
def create_service() -> Response:
    return reply(ctx().agent.service_create(service_body(read_body())).to_json(), 201)


@services.get("/v1/services/<name>")
def show_service(name: str) -> Response:
    return reply(ctx().agent.service_get(name).to_json())


@services.put("/v1/services/<name>")
def update_service(name: str) -> Response:
    return reply(ctx().agent.service_update(name, service_body(read_body(), name)).to_json())


@services.delete("/v1/services/<name>")
def delete_service(name: str) -> Response:
    return reply(ctx().agent.service_delete(name).to_json())
