"""The agent's REST API through Flask's test client: views, problems, and /v1/ipam/check validation."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from ipam.allocator import LOCAL_SPACE, PoolRequest
from plugin.monitor import EventHub
from plugin.service import Agent
from tests.unit.helpers import FakeClock, hexid, snapshot

NET = hexid("api-net")
EP1 = "abcd1111" + "0" * 56
EP2 = "abcd2222" + "0" * 56


@pytest.fixture
def populated(agent: Agent) -> dict[str, Any]:
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.1.0.0/24"), None, False))
    agent.create_network(NET, [pool.prefixed(pool.gateway)])  # type: ignore[arg-type]
    eps = {}
    for n, eid in enumerate((EP1, EP2), start=2):
        alloc = agent.request_address(pool.id, None, {})[1]
        eps[eid] = agent.create_endpoint(NET, eid, pool.prefixed(alloc.address), None)  # type: ignore[arg-type]
        assert str(alloc.address) == f"10.1.0.{n}"
    agent.join(NET, EP1, "/var/run/docker/netns/abc")
    return {"pool": agent.ipam.pool(pool.id), "endpoints": eps}


def get(api: FlaskClient, path: str) -> tuple[int, Any]:
    resp = api.get(path)
    assert resp.mimetype == "application/json"
    return resp.status_code, json.loads(resp.data)


def post(api: FlaskClient, path: str, data: bytes) -> tuple[int, Any]:
    resp = api.post(path, data=data)
    assert resp.mimetype == "application/json"
    return resp.status_code, json.loads(resp.data)


def test_healthz(api: FlaskClient) -> None:
    assert get(api, "/v1/healthz") == (200, {"ok": True})


def test_status_merges_agent_info_counters_and_monitor(
    api: FlaskClient, hub: EventHub, populated: Any, clock: FakeClock
) -> None:
    hub.publish({"type": "drop"})
    clock.advance(2.5)
    status, body = get(api, "/v1/status")
    assert status == 200
    assert body["instance"] == "cgtest" and body["networks"] == 1 and body["endpoints"] == 2
    assert body["uptime"] == 2.5
    assert body["pid"] == 4242 and body["state_dir"] == "/nonexistent"  # from the info callable
    assert body["counters"] == []  # the fake kernel counts nothing
    assert body["monitor"] == {"subscribers": 0, "events": 1, "lost": 0}


def test_endpoints_list(api: FlaskClient, populated: Any) -> None:
    status, body = get(api, "/v1/endpoints")
    assert status == 200
    assert [e["id"] for e in body] == [EP1, EP2]
    first = body[0]
    assert first["interface"] == "cg" + EP1[:13] and first["container_interface"] == "cgp" + EP1[:12]
    assert (first["ipv4"], first["gateway4"], first["ipv6"]) == ("10.1.0.2/24", "10.1.0.1", "")
    assert (first["state"], body[1]["state"]) == ("joined", "created")


def test_endpoints_list_empty(api: FlaskClient) -> None:
    assert get(api, "/v1/endpoints") == (200, [])


@pytest.mark.parametrize("ident", [EP1, "abcd1", "cg" + EP1[:13], "10.1.0.2"])
def test_endpoint_by_id_prefix_interface_or_address(api: FlaskClient, populated: Any, ident: str) -> None:
    status, body = get(api, f"/v1/endpoints/{ident}")
    assert status == 200 and body["id"] == EP1


def test_endpoint_not_found_is_a_404_problem(api: FlaskClient, populated: Any) -> None:
    status, body = get(api, "/v1/endpoints/ffff")
    assert status == 404
    assert body["status"] == 404 and "no endpoint matches" in body["error"]


def test_ambiguous_endpoint_prefix_is_a_400_problem(api: FlaskClient, populated: Any) -> None:
    status, body = get(api, "/v1/endpoints/abcd")
    assert status == 400
    assert body["status"] == 400 and "matches 2 endpoints" in body["error"]


def test_networks(api: FlaskClient, populated: Any) -> None:
    status, body = get(api, "/v1/networks")
    assert status == 200
    assert body == [
        {
            "id": NET,
            "name": "",
            "subnets": ["10.1.0.0/24"],
            "gateways": ["10.1.0.1"],
            "endpoints": 2,
            "created": body[0]["created"],
        }
    ]


def test_ipam_view(api: FlaskClient, populated: Any) -> None:
    status, body = get(api, "/v1/ipam")
    assert status == 200
    assert body["ranges"] == {"ipv4": "10.200.0.0/20", "ipv6": "fd00:cafe::/64"}
    [pool] = body["pools"]
    assert (pool["id"], pool["subnet"], pool["gateway"], pool["network_id"]) == (
        "CellgateLocal/10.1.0.0/24",
        "10.1.0.0/24",
        "10.1.0.1",
        NET,
    )
    assert [(a["address"], a["kind"], a["owner"]) for a in pool["allocations"]] == [
        ("10.1.0.1", "gateway", ""),
        ("10.1.0.2", "endpoint", EP1),
        ("10.1.0.3", "endpoint", EP2),
    ]


def test_ipam_check_reports_and_releases(api: FlaskClient, agent: Agent, populated: Any, clock: FakeClock) -> None:
    pool = populated["pool"]
    stray = agent.request_address(pool.id, None, {})[1].address
    assert post(api, "/v1/ipam/check", b"")[1]["ok"] is True  # inside the default 60 s grace
    status, body = post(api, "/v1/ipam/check", json.dumps({"grace": 0}).encode())
    assert status == 200 and body["ok"] is False
    assert body["leaked"] == [
        {"pool": pool.id, "address": str(stray), "owner": "", "reason": "never used by an endpoint"}
    ]
    assert body["released"] == [] and agent.ipam.lookup(stray) is not None
    status, body = post(api, "/v1/ipam/check", json.dumps({"grace": 0, "release": True}).encode())
    assert status == 200 and [x["address"] for x in body["released"]] == [str(stray)]
    assert agent.ipam.lookup(stray) is None
    clock.advance(3600)
    assert post(api, "/v1/ipam/check", b"{}")[1]["ok"] is True


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b'{"relase": true}', "unknown field(s): relase"),
        (b'{"grace": 1, "force": 1, "all": 2}', "unknown field(s): all, force"),
        (b'{"release": "yes"}', "release must be true or false"),
        (b'{"release": 1}', "release must be true or false"),
        (b'{"grace": "60"}', "grace must be a number"),
        (b'{"grace": true}', "grace must be a number"),
        (b'{"grace": -1}', "grace must be a number"),
        (b'{"grace": null}', "grace must be a number"),
        (b"[]", "must be a JSON object"),
        (b"{", "malformed JSON"),
        (b"\xff", "malformed JSON"),
    ],
)
def test_ipam_check_validates_its_body(
    api: FlaskClient, agent: Agent, populated: Any, clock: FakeClock, body: bytes, text: str
) -> None:
    agent.request_address(populated["pool"].id, None, {})
    clock.advance(3600)  # a leak exists, so a check that ran with release=true would change state
    before = snapshot(agent)
    status, problem = post(api, "/v1/ipam/check", body)
    assert status == 400 and problem["status"] == 400
    assert text in problem["error"]
    assert snapshot(agent) == before


def test_ipam_check_refuses_a_nan_grace(api: FlaskClient, agent: Agent, populated: Any) -> None:
    fresh = agent.request_address(populated["pool"].id, None, {})[1].address  # a create in flight
    status, problem = post(api, "/v1/ipam/check", b'{"release": true, "grace": NaN}')
    assert agent.ipam.lookup(fresh) is not None, "an allocation inside its grace period was released"
    assert status == 400 and ("grace" in problem["error"] or "NaN" in problem["error"])


def test_deeply_nested_body_is_a_400_problem(api: FlaskClient) -> None:
    status, problem = post(api, "/v1/ipam/check", b"[" * 100_000)
    assert (status, problem["status"]) == (400, 400)


@pytest.mark.parametrize("path", ["/v1/nope", "/v2/status", "/", "/v1/endpoints/a/b"])
def test_unknown_path_is_a_404_problem(api: FlaskClient, path: str) -> None:
    status, body = get(api, path)
    assert status == 404 and body == {"error": f"no such API path {path}", "status": 404}


def test_wrong_method_is_a_405_problem(api: FlaskClient) -> None:
    status, body = post(api, "/v1/status", b"")
    assert status == 405 and body["status"] == 405


def test_oversized_body_is_a_413_problem(api: FlaskClient) -> None:
    status, body = post(api, "/v1/ipam/check", b'{"grace": 1, "pad": "' + b"x" * (1 << 20) + b'"}')
    assert status == 413 and body["status"] == 413


def test_unknown_monitor_type_is_a_400_problem(api: FlaskClient) -> None:
    status, body = get(api, "/v1/monitor?type=bogus")
    assert status == 400 and "unknown event type" in body["error"]
