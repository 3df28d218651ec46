"""The agent's REST API through Flask's test client: views, problems, validation, policy and identities."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from datapath.policy.compile import PolicyKey, PolicyValue
from ipam.allocator import LOCAL_SPACE, PoolRequest
from plugin.api import policy as api_policy
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
        alloc = agent.request_address(pool.id, None)[1]
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
            "origin": "docker",
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
    stray = agent.request_address(pool.id, None)[1].address
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
    agent.request_address(populated["pool"].id, None)
    clock.advance(3600)  # a leak exists, so a check that ran with release=true would change state
    before = snapshot(agent)
    status, problem = post(api, "/v1/ipam/check", body)
    assert status == 400 and problem["status"] == 400
    assert text in problem["error"]
    assert snapshot(agent) == before


def test_ipam_check_refuses_a_nan_grace(api: FlaskClient, agent: Agent, populated: Any) -> None:
    fresh = agent.request_address(populated["pool"].id, None)[1].address  # a create in flight
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


# -- policy, trace, identities, datapath state --------------------------------------------------

WEB_FROM_DB = {"labels": ["name=web"], "endpointSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "db"}}],
                            "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}
DB_OUT = {"labels": ["name=db", "team=x"], "endpointSelector": {"matchLabels": {"app": "db"}}, "egress": [{}]}


def call(api: FlaskClient, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    resp = api.open(path, method=method, data=data)
    assert resp.mimetype == "application/json"
    return resp.status_code, json.loads(resp.data)


@pytest.fixture
def labelled(agent: Agent, populated: Any) -> dict[str, int]:
    web = agent.set_labels(EP1, {"app": "web"}).identity
    db = agent.set_labels(EP2, {"app": "db"}).identity
    return {"web": web, "db": db}


def policy_state(agent: Agent) -> tuple[Any, ...]:
    fake = agent.kernel
    return agent.policy.repository.snapshot(), dict(fake.policy), agent.policy.realized_revision  # type: ignore[attr-defined]


def test_policy_import_get_and_delete(api: FlaskClient, agent: Agent, labelled: dict[str, int]) -> None:
    assert call(api, "POST", "/v1/policy", {"rules": [WEB_FROM_DB, DB_OUT]}) == (200, {"revision": 1})
    key = PolicyKey(labelled["web"], False, labelled["db"], 6, 80, 16)
    assert agent.kernel.policy[key] == PolicyValue(False, 1)  # type: ignore[attr-defined]
    status, body = call(api, "GET", "/v1/policy")
    assert status == 200 and body["revision"] == 1
    assert [(r["id"], r["labels"], r["rule"]) for r in body["rules"]] == [
        (1, ["unspec:name=web"], WEB_FROM_DB), (2, ["unspec:name=db", "unspec:team=x"], DB_OUT)]
    status, body = call(api, "GET", "/v1/policy?labels=team=x")
    assert status == 200 and [r["id"] for r in body["rules"]] == [2]
    status, body = call(api, "GET", "/v1/policy?labels=team=y")
    assert status == 404 and "team=y" in body["error"]

    assert call(api, "DELETE", "/v1/policy", {"labels": ["name=web"]}) == (200, {"revision": 2, "deleted": 1})
    assert key not in agent.kernel.policy  # type: ignore[attr-defined]
    assert call(api, "DELETE", "/v1/policy", {"all": True}) == (200, {"revision": 3, "deleted": 1})
    assert agent.policy.repository.rules == []


def test_policy_import_accepts_a_crd(api: FlaskClient, agent: Agent) -> None:
    crd = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"},
           "spec": {"endpointSelector": {}, "egress": [{}]}}
    assert call(api, "POST", "/v1/policy", {"rules": crd})[0] == 200
    [shown] = call(api, "GET", "/v1/policy?labels=name=p")[1]["rules"]
    assert shown["labels"] == ["unspec:name=p", "unspec:namespace=default"]
    assert shown["rule"]["kind"] == "CiliumNetworkPolicy"  # the rule in its CRD: imported again, it means the same
    assert shown["rule"]["metadata"] == {"namespace": "default"}


DEEP = 50_000  # past the JSON decoder's recursion limit


def test_the_cli_bounds_a_policy_as_the_agent_bounds_its_body() -> None:
    """`policy check` refuses what the agent would refuse (413), so check and import agree."""
    from datapath.policy import MAX_BYTES
    from plugin.api.app import MAX_BODY

    assert MAX_BYTES == MAX_BODY


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{", "malformed JSON"),
        (b'{"rules": [{"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": NaN}]}]}]}]}',
         "NaN is not valid JSON"),
        (b'{"rules": [{"endpointSelector": {"matchLabels": {"a": Infinity}}}]}', "Infinity is not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"", 'send {"rules": [...]}'),
        (b'{"rule": []}', 'send {"rules": [...]}'),
        (b'{"rules": [], "force": true}', 'send {"rules": [...]}'),
        (b'{"rules": []}', "the policy holds no rules"),
        (b'{"rules": [{"endpointSelector": {}, "ingres": []}]}', "rule 0: unknown field 'ingres'"),
        (b'{"rules": [{"endpointSelector": {}, "egress": [{}]}, {"endpointSelector": {}, "ingress": [{"toPorts": '
         b'[{"ports": [{"port": "99999"}]}]}]}]}', "rule 1: ingress[0].toPorts[0].ports[0].port"),
        (b'{"rules": [{"endpointSelector": {}}]}', "rule 0: rule must have at least one of Ingress, IngressDeny"),
        (b'{"rules": [{"nodeSelector": {}, "ingress": [{}]}]}', "host policies (nodeSelector) are not supported"),
        (b'{"rules": [{"endpointSelector": {"matchLabels": {"reserved:host": ""}}, "ingress": [{}]}]}',
         "selects reserved:host"),
        (b'{"rules": [{"endpointSelector": {}, "ingress": [{}], "description": ' + b"[" * 100 + b"]" * 100 + b"}]}",
         "the policy is nested too deeply: more than 32 levels"),
        (b'{"rules": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
        (b'{"rules": {"a": ' * 10_000 + b"1" + b"}" * 10_000, "nested too deeply"),
        (b'{"rules": [{"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchName": "a.b"}]}]}]}',
         "not supported yet"),
        (b'{"rules": [{"endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", '
         b'"except": ["10.0.0.0/7"]}]}]}]}', "is not inside the cidr"),
        (b'{"rules": {"kind": "CiliumNetworkPolicy", "metadata": "p", "spec": {"endpointSelector": {}}}}',
         "metadata must be an object"),
    ],
)
def test_policy_import_errors_change_nothing(api: FlaskClient, agent: Agent, labelled: Any, raw: bytes,
                                             fragment: str) -> None:
    call(api, "POST", "/v1/policy", {"rules": [DB_OUT]})
    before = policy_state(agent)
    status, problem = call(api, "POST", "/v1/policy", raw=raw)
    assert (status, problem["status"]) == (400, 400)
    assert fragment in problem["error"]
    assert policy_state(agent) == before


def test_a_kernel_failure_during_import_is_a_problem_and_changes_nothing(
    api: FlaskClient, agent: Agent, labelled: Any
) -> None:
    before = policy_state(agent)
    agent.kernel.fail_policy = True  # type: ignore[attr-defined]
    status, problem = call(api, "POST", "/v1/policy", {"rules": [WEB_FROM_DB]})
    assert status >= 500 and problem["status"] == status
    assert policy_state(agent) == before


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"labels": [""]}, 400, "non-empty list"),  # must not mean "every rule"
        ({"labels": [",", " "]}, 400, "non-empty list"),
        ({"labels": []}, 400, "non-empty list"),
        ({"labels": "name=db"}, 400, "non-empty list"),
        ({"labels": [1]}, 400, "non-empty list"),
        ({}, 400, "non-empty list"),
        ({"all": "yes"}, 400, "all must be true or false"),
        ({"labels": ["=x"]}, 400, "empty key"),
        ({"lables": ["name=db"]}, 400, 'send {"labels"'),
        ({"labels": ["name=nope"]}, 404, "no rule has labels name=nope"),
    ],
)
def test_policy_delete_errors_change_nothing(api: FlaskClient, agent: Agent, body: Any, status: int,
                                             fragment: str) -> None:
    call(api, "POST", "/v1/policy", {"rules": [WEB_FROM_DB, DB_OUT]})
    before = policy_state(agent)
    got, problem = call(api, "DELETE", "/v1/policy", body)
    assert (got, problem["status"]) == (status, status)
    assert fragment in problem["error"]
    assert policy_state(agent) == before


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1/policy/wait must answer these without sleeping: a sleep fails the request (500) instead of hanging."""

    def sleep(seconds: float) -> None:
        raise AssertionError(f"the handler slept {seconds} s")

    monkeypatch.setattr(api_policy.time, "sleep", sleep)


@pytest.mark.usefixtures("no_waiting")
def test_policy_wait(api: FlaskClient, agent: Agent) -> None:
    assert call(api, "GET", "/v1/policy/wait?revision=0") == (200, {"revision": 0, "endpoints": 0})
    call(api, "POST", "/v1/policy", {"rules": [DB_OUT]})
    assert call(api, "GET", "/v1/policy/wait?revision=1") == (200, {"revision": 1, "endpoints": 0})
    status, problem = call(api, "GET", "/v1/policy/wait?revision=2&timeout=0")
    assert status == 400 and "revision 2 does not exist yet (latest is 1)" in problem["error"]


@pytest.mark.usefixtures("no_waiting")
def test_policy_wait_times_out_for_a_revision_not_enforced_yet(api: FlaskClient, agent: Agent) -> None:
    call(api, "POST", "/v1/policy", {"rules": [DB_OUT]})
    agent.policy.realized_revision = 0  # as if it were still being written
    status, problem = call(api, "GET", "/v1/policy/wait?revision=1&timeout=0")
    assert (status, problem["status"]) == (504, 504) and "not enforced yet" in problem["error"]


@pytest.mark.parametrize("query", ["", "revision=abc", "revision=1.5", "revision=1&timeout=x",
                                   "revision=1&timeout=nan", "revision=1&timeout=inf"])
@pytest.mark.usefixtures("no_waiting")
def test_policy_wait_validates_its_query(api: FlaskClient, agent: Agent, query: str) -> None:
    call(api, "POST", "/v1/policy", {"rules": [DB_OUT]})
    agent.policy.realized_revision = 0  # a bad timeout must not turn into an endless wait
    status, problem = call(api, "GET", f"/v1/policy/wait?{query}")
    assert (status, problem["status"]) == (400, 400)


def test_trace(api: FlaskClient, agent: Agent, labelled: dict[str, int]) -> None:
    call(api, "POST", "/v1/policy", {"rules": [WEB_FROM_DB]})
    status, body = call(api, "POST", "/v1/policy/trace",
                        {"src": {"endpoint": EP2}, "dst": {"labels": "app=web"}, "dport": "80/tcp"})
    assert status == 200 and body["verdict"] == "ALLOWED"
    assert body["ingress"] == {"allowed": True, "rule": 1, "entry": f"ingress {labelled['db']} 80/tcp"}
    assert body["egress"] == {"allowed": True, "rule": 0, "entry": "egress any any"}
    assert body["lines"][-1] == "Final verdict: ALLOWED"
    status, body = call(api, "POST", "/v1/policy/trace",
                        {"src": {"identity": 1}, "dst": {"endpoint": "10.1.0.2"}, "dport": "81/tcp"})
    assert status == 200 and body["verdict"] == "DENIED" and body["egress"] is None
    assert body["ingress"] == {"allowed": False, "rule": 0, "entry": None}


@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"{", 400, "malformed JSON"),
        (b'{"src": {"identity": NaN}, "dst": {"identity": 1}}', 400, "NaN is not valid JSON"),
        (b'{"src": {"identity": 1}}', 400, "send {"),
        (b'{"src": "app=web", "dst": {"identity": 1}}', 400, "send {"),
        (b'{"src": {"identity": 1}, "dst": {"identity": 1}, "port": "80"}', 400, "send {"),
        (b'{"src": {}, "dst": {"identity": 1}}', 400, "src: give exactly one of"),
        (b'{"src": {"identity": 1, "labels": "a=b"}, "dst": {"identity": 1}}', 400, "src: give exactly one"),
        (b'{"src": {"identity": 1}, "dst": {"identity": true}}', 400, "dst.identity: must be a string"),
        (b'{"src": {"identity": 1}, "dst": {"identity": 1.5}}', 400, "dst.identity: must be a string"),
        (b'{"src": {"identity": "abc"}, "dst": {"identity": 1}}', 400, "identity must be a number"),
        (b'{"src": {"pod": "x"}, "dst": {"identity": 1}}', 400, "unknown trace party kind 'pod'"),
        (b'{"src": {"identity": 1}, "dst": {"identity": 4242}}', 404, "unknown identity 4242"),
        (b'{"src": {"endpoint": "ffff"}, "dst": {"identity": 1}}', 404, "no endpoint matches"),
        (b'{"src": {"endpoint": "abcd"}, "dst": {"identity": 1}}', 400, "matches 2 endpoints"),
        (b'{"src": {"labels": ""}, "dst": {"identity": 1}}', 400, "at least one label"),
        (b'{"src": {"identity": 1}, "dst": {"identity": 2}, "dport": 80}', 400, "dport must be a string"),
        (b'{"src": {"identity": 1}, "dst": {"identity": 2}, "dport": "80/xtp"}', 400, "unknown protocol"),
        (b'{"src": {"identity": 1}, "dst": {"identity": 2}, "dport": "http"}', 400, "bad port"),
    ],
)
def test_trace_errors(api: FlaskClient, labelled: Any, raw: bytes, status: int, fragment: str) -> None:
    got, problem = call(api, "POST", "/v1/policy/trace", raw=raw)
    assert (got, problem["status"]) == (status, status)
    assert fragment in problem["error"]


def test_identities(api: FlaskClient, agent: Agent, labelled: dict[str, int]) -> None:
    agent.join(NET, EP2, "/var/run/docker/netns/def")
    status, body = call(api, "GET", "/v1/identities")
    assert status == 200
    by_id = {i["id"]: i for i in body}
    assert by_id[1] == {"id": 1, "labels": ["reserved:host"], "endpoints": 0, "reserved": True}
    assert by_id[5]["labels"] == ["reserved:init"] and by_id[5]["endpoints"] == 0
    assert by_id[labelled["web"]] == {"id": labelled["web"], "labels": ["container:app=web"], "endpoints": 1,
                                      "reserved": False}
    assert [i["id"] for i in body] == sorted(by_id)
    assert call(api, "GET", f"/v1/identities/{labelled['db']}") == (
        200, {"id": labelled["db"], "labels": ["container:app=db"], "endpoints": 1, "reserved": False})
    assert call(api, "GET", "/v1/identities/2")[1]["labels"] == ["reserved:world"]
    status, problem = call(api, "GET", "/v1/identities/4242")
    assert status == 404 and problem["error"] == "unknown identity 4242"
    for path in ("/v1/identities/abc", "/v1/identities/-1", "/v1/identities/0"):
        assert call(api, "GET", path)[0] == 404


def test_endpoint_view_has_its_policy(api: FlaskClient, labelled: dict[str, int]) -> None:
    call(api, "POST", "/v1/policy", {"rules": [WEB_FROM_DB]})
    status, body = call(api, "GET", f"/v1/endpoints/{EP1}")
    assert status == 200 and body["identity"] == labelled["web"] and body["labels"] == ["container:app=web"]
    assert body["policy"] == {"enforcement": {"ingress": True, "egress": False}, "revision": 1, "entries": 2,
                              "identity_labels": ["container:app=web"]}


def test_bpf_policy(api: FlaskClient, labelled: dict[str, int]) -> None:
    call(api, "POST", "/v1/policy", {"rules": [WEB_FROM_DB]})
    status, body = call(api, "GET", "/v1/bpf/policy/abcd1")
    assert status == 200 and (body["endpoint"], body["identity"]) == (EP1, labelled["web"])
    assert sorted(body["entries"], key=lambda e: e["direction"]) == [
        {"direction": "egress", "peer": 0, "peer_labels": ["any"], "protocol": "any", "ports": "any",
         "verdict": "allow", "rule": 0},
        {"direction": "ingress", "peer": labelled["db"], "peer_labels": ["container:app=db"], "protocol": "tcp",
         "ports": "80", "verdict": "allow", "rule": 1},
    ]
    assert call(api, "GET", "/v1/bpf/policy/ffff")[0] == 404


def test_bpf_ct_of_the_fake_is_empty(api: FlaskClient) -> None:
    assert call(api, "GET", "/v1/bpf/ct") == (200, [])


EVENTS = [{"type": "drop", "endpoint": EP1}, {"type": "verdict", "endpoint": EP1},
          {"type": "trace", "endpoint": EP2}, {"type": "drop", "endpoint": EP2}]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", [EVENTS[0], EVENTS[1], EVENTS[3]]),  # traces only when asked for
        ("?type=drop", [EVENTS[0], EVENTS[3]]),
        ("?type=verdict", [EVENTS[1]]),
        ("?type=trace", [EVENTS[2]]),
        ("?type=drop&endpoint=abcd2", [EVENTS[3]]),
    ],
)
def test_monitor_filters_and_turns_traces_on_only_while_watched(
    api: FlaskClient, agent: Agent, hub: EventHub, monkeypatch: pytest.MonkeyPatch, query: str, expected: list[Any]
) -> None:
    def stream(accept: Any, heartbeat: float = 2.0) -> Any:
        assert agent.kernel.config[0] is (query == "?type=trace")  # type: ignore[attr-defined]
        yield None  # a heartbeat
        yield from (ev for ev in EVENTS if accept(ev))

    monkeypatch.setattr(hub, "stream", stream)
    resp = api.get(f"/v1/monitor{query}")
    assert resp.status_code == 200 and resp.mimetype == "application/x-ndjson"
    lines = resp.get_data(as_text=True).split("\n")
    assert json.loads(lines[0])["type"] == "hello" and lines[1] == ""
    assert [json.loads(x) for x in lines[2:] if x] == expected
    assert agent.kernel.config[0] is False  # type: ignore[attr-defined]
