"""The Docker plugin endpoint: libnetwork NetworkDriver and IpamDriver on one socket.

Every route parses its body with plugin.docker.messages, calls the Agent, and answers
JSON. Errors become a non-200 status with {"Err": "..."} (Docker reads Err for both
drivers); unknown routes get 404 with {"Err"}. Nothing here ever calls Docker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from datapath.errors import CellgateError, InvalidRequest, NotFound
from ipam.allocator import GLOBAL_SPACE, LOCAL_SPACE, PoolRequest
from plugin import failpoints
from plugin.docker import messages as m
from plugin.service import Agent
from plugin.timing import add_server_timing

log = logging.getLogger(__name__)

MIME = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 1 << 20


def _reply(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, mimetype=MIME)


def docker_status(exc: CellgateError) -> int:
    """The error's status as libnetwork may see it. The caller's mistakes keep their 4xx status
    (400 malformed, 409 conflicting), but an unknown object answers 400: 404 means "method not
    implemented" to libnetwork (an optional call would then count as done). 500 else."""
    if exc.status == NotFound.status:
        return InvalidRequest.status
    return exc.status if 400 <= exc.status < 500 else 500


def create_app(agent: Agent) -> Flask:
    app = Flask("cellgate.docker")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    add_server_timing(app)

    def route(path: str) -> Callable[[Callable[[dict[str, Any]], Any]], Callable[[], Response]]:
        def register(handler: Callable[[dict[str, Any]], Any]) -> Callable[[], Response]:
            def view() -> Response:
                raw = request.get_data(cache=False)
                log.debug("<- %s %s", path, raw.decode(errors="replace"))
                body = m.parse_body(raw)
                result = handler(body)
                payload = {} if result is None else result
                log.debug("-> %s %s", path, json.dumps(payload))
                return _reply(payload)

            view.__name__ = handler.__name__
            app.add_url_rule(path, path, view, methods=["POST"])
            return view

        return register

    @app.errorhandler(CellgateError)
    def cellgate_error(exc: CellgateError) -> Response:
        log.warning("%s failed: %s", request.path, exc)
        return _reply({"Err": str(exc)}, docker_status(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        reasons = {404: f"unknown plugin call {request.path}", 405: "plugin calls use POST",
                   413: f"request body is larger than {MAX_BODY} bytes"}
        return _reply({"Err": reasons.get(exc.code or 500, exc.description or "error")}, exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("%s crashed", request.path)
        return _reply({"Err": f"internal error: {type(exc).__name__}"}, 500)

    # -- handshake --------------------------------------------------------------------------

    @route("/Plugin.Activate")
    def activate(_: dict[str, Any]) -> Any:
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    # -- NetworkDriver ----------------------------------------------------------------------

    @route("/NetworkDriver.GetCapabilities")
    def net_capabilities(_: dict[str, Any]) -> Any:
        return {"Scope": "local", "ConnectivityScope": "local"}

    @route("/NetworkDriver.CreateNetwork")
    def create_network(body: dict[str, Any]) -> Any:
        req = m.CreateNetwork.parse(body)
        agent.create_network(req.network_id, req.gateways)

    @route("/NetworkDriver.DeleteNetwork")
    def delete_network(body: dict[str, Any]) -> Any:
        agent.delete_network(m.NetworkRef.parse(body).network_id)

    @route("/NetworkDriver.AllocateNetwork")
    def allocate_network(body: dict[str, Any]) -> Any:
        raise InvalidRequest("cellgate is a local-scope driver; swarm network allocation is not supported")

    @route("/NetworkDriver.FreeNetwork")
    def free_network(body: dict[str, Any]) -> Any:
        return {}

    @route("/NetworkDriver.CreateEndpoint")
    def create_endpoint(body: dict[str, Any]) -> Any:
        req = m.CreateEndpoint.parse(body)
        ep = agent.create_endpoint(req.network_id, req.endpoint_id, req.ipv4, req.ipv6, req.mac)
        failpoints.hit("docker.create_endpoint.before_reply")  # persisted, Docker not told yet
        # Docker refuses answers that overwrite what it set; only fill the MAC it left empty.
        return {"Interface": {"MacAddress": ep.mac} if not req.mac else {}}

    @route("/NetworkDriver.EndpointOperInfo")
    def endpoint_info(body: dict[str, Any]) -> Any:
        ref = m.EndpointRef.parse(body)
        ep = agent.get_endpoint(ref.endpoint_id)
        if ep is None or ep.network_id != ref.network_id:
            return {"Value": {}}
        return {"Value": {"cellgate.interface": ep.host_ifname, "cellgate.mac": ep.mac}}

    @route("/NetworkDriver.DeleteEndpoint")
    def delete_endpoint(body: dict[str, Any]) -> Any:
        ref = m.EndpointRef.parse(body)
        agent.delete_endpoint(ref.network_id, ref.endpoint_id)
        failpoints.hit("docker.delete_endpoint.before_reply")

    @route("/NetworkDriver.Join")
    def join(body: dict[str, Any]) -> Any:
        req = m.Join.parse(body)
        info = agent.join(req.network_id, req.endpoint_id, req.sandbox_key)
        failpoints.hit("docker.join.before_reply")
        reply: dict[str, Any] = {
            "InterfaceName": {"SrcName": info.interface, "DstPrefix": "eth"},
            "DisableGatewayService": True,
            "StaticRoutes": [],
        }
        if info.gateway4 is not None:
            reply["Gateway"] = str(info.gateway4)
        if info.gateway6 is not None:
            reply["GatewayIPv6"] = str(info.gateway6)
        return reply

    @route("/NetworkDriver.Leave")
    def leave(body: dict[str, Any]) -> Any:
        ref = m.EndpointRef.parse(body)
        agent.leave(ref.network_id, ref.endpoint_id)
        failpoints.hit("docker.leave.before_reply")

    @route("/NetworkDriver.ProgramExternalConnectivity")
    def program_external(body: dict[str, Any]) -> Any:
        m.EndpointRef.parse(body)  # reachability of the outside is the host's routing + masquerade

    @route("/NetworkDriver.RevokeExternalConnectivity")
    def revoke_external(body: dict[str, Any]) -> Any:
        m.EndpointRef.parse(body)

    @route("/NetworkDriver.DiscoverNew")
    def discover_new(_: dict[str, Any]) -> Any:
        return {}

    @route("/NetworkDriver.DiscoverDelete")
    def discover_delete(_: dict[str, Any]) -> Any:
        return {}

    # -- IpamDriver -------------------------------------------------------------------------

    @route("/IpamDriver.GetCapabilities")
    def ipam_capabilities(_: dict[str, Any]) -> Any:
        # The MAC makes a retried RequestAddress idempotent; we persist, so no replay.
        return {"RequiresMACAddress": True, "RequiresRequestReplay": False}

    @route("/IpamDriver.GetDefaultAddressSpaces")
    def address_spaces(_: dict[str, Any]) -> Any:
        return {"LocalDefaultAddressSpace": LOCAL_SPACE, "GlobalDefaultAddressSpace": GLOBAL_SPACE}

    @route("/IpamDriver.RequestPool")
    def request_pool(body: dict[str, Any]) -> Any:
        req = m.RequestPool.parse(body)
        pool = agent.request_pool(PoolRequest(req.space, req.pool, req.subpool, req.v6, req.options))
        data = {m.GATEWAY_KEY: str(pool.prefixed(pool.gateway))} if pool.gateway is not None else {}
        return {"PoolID": pool.id, "Pool": str(pool.subnet), "Data": data}

    @route("/IpamDriver.ReleasePool")
    def release_pool(body: dict[str, Any]) -> Any:
        agent.release_pool(m.PoolRef.parse(body).pool_id)

    @route("/IpamDriver.RequestAddress")
    def request_address(body: dict[str, Any]) -> Any:
        req = m.RequestAddress.parse(body)
        pool, alloc = agent.request_address(req.pool_id, req.address, req.kind, req.mac)
        failpoints.hit("docker.request_address.before_reply")  # reserved and persisted, Docker not told yet
        return {"Address": str(pool.prefixed(alloc.address)), "Data": {}}

    @route("/IpamDriver.ReleaseAddress")
    def release_address(body: dict[str, Any]) -> Any:
        req = m.ReleaseAddress.parse(body)
        agent.release_address(req.pool_id, req.address)
        failpoints.hit("docker.release_address.before_reply")

    return app
