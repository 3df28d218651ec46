"""`cellgate observe` and GET /v1/flows against real traffic: busybox httpd behind L4 and L7 policy
on a real dockerd, requests from containers, flows in Hubble's JSON with Hubble's filters, a live
follower, and totals that count every drop the kernel counted."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.harness import CELLGATE, Agent, Scene, run, wait_until
from tests.e2e.test_l7 import Web, load, proxy_denied

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def traffic(scene: Scene, agent: Agent) -> Iterator[Web]:
    """l7-http.yaml (frontend may GET /public/.* from the backend; nobody else reaches it), then
    one allowed request, one denied by the proxy, and one connection the datapath drops."""
    web = Web(scene, agent)
    load(agent, "l7-http.yaml")
    assert web.curl("frontend", "/public/x")[0] == 200
    assert proxy_denied(*web.curl("frontend", "/private"))
    assert web.curl("other", "/public/x", timeout=1) == (0, "")
    yield web
    agent.cli("policy", "delete", "--all", check=False)


def observe(agent: Agent, *args: str, check: bool = True) -> list[dict[str, Any]]:
    out = run(CELLGATE, "observe", "--socket", str(agent.api), "-o", "json", *args, check=check)
    return [json.loads(line) for line in out.stdout.splitlines()]


def flows(agent: Agent, *args: str) -> list[dict[str, Any]]:
    return [line["flow"] for line in observe(agent, "--last", "1000", *args)]


def test_flows_have_hubbles_shape_with_labels_and_verdicts(traffic: Web, agent: Agent) -> None:
    lines = observe(agent, "--last", "1000")
    assert lines and all(set(line) == {"flow", "node_name", "time"} for line in lines)
    got = [line["flow"] for line in lines]
    assert [f["time"] for f in got] == sorted(f["time"] for f in got)  # in time order
    drop = next(f for f in got if f["verdict"] == "DROPPED" and f["IP"]["source"] == traffic.ip["other"])
    assert drop["drop_reason_desc"] == "POLICY_DENIED" and drop["Type"] == "L3_L4"
    assert drop["event_type"] == {"type": 1} and drop["traffic_direction"] == "INGRESS"
    assert "container:app=other" in drop["source"]["labels"]
    assert "container:app=backend" in drop["destination"]["labels"]
    assert drop["destination"]["pod_name"] == traffic.endpoint["backend"][:12]
    assert drop["l4"]["TCP"]["destination_port"] == 80 and drop["IP"]["destination"] == traffic.ip["backend"]
    assert drop["node_name"] == lines[0]["node_name"] != "" and len(drop["uuid"]) == 36
    l7 = {(f["l7"]["http"]["url"].rsplit("/", 1)[-1], f["verdict"], f["l7"]["http"]["code"])
          for f in got if f["Type"] == "L7"}
    assert {("x", "FORWARDED", 200), ("private", "DROPPED", 403)} <= l7
    http = next(f for f in got if f["Type"] == "L7")
    assert http["event_type"] == {"type": 129} and http["l7"]["http"]["method"] == "GET"
    assert "container:app=frontend" in http["source"]["labels"]


def test_filters_select_as_hubbles_do(traffic: Web, agent: Agent) -> None:
    other, backend = traffic.ip["other"], traffic.ip["backend"]
    every = flows(agent)
    assert {f["verdict"] for f in flows(agent, "--verdict", "DROPPED")} == {"DROPPED"}
    assert {f["verdict"] for f in flows(agent, "--not", "--verdict", "DROPPED")} <= {"FORWARDED", "REDIRECTED"}
    from_other = flows(agent, "--from-label", "app=other")
    assert from_other and all(f["IP"]["source"] == other for f in from_other)
    assert flows(agent, "--from-ip", other) == from_other
    assert flows(agent, "--from-ip", other.rsplit(".", 1)[0] + ".0/24", "--from-label", "app=other") == from_other
    assert flows(agent, "--to-ip", other) == []  # nothing was sent to it
    either = flows(agent, "--ip", backend)
    assert either and len(either) == len([f for f in every if backend in (f["IP"]["source"], f["IP"]["destination"])])
    denied = flows(agent, "--http-status", "403")
    assert [f["l7"]["http"]["url"].rsplit("/", 1)[-1] for f in denied] == ["private"]
    assert flows(agent, "--http-status", "4+", "--http-method", "GET", "--http-path", "^/priv") == denied
    assert flows(agent, "--type", "l7", "--not", "--http-status", "4+")[0]["l7"]["http"]["code"] == 200
    assert {f["Type"] for f in flows(agent, "--protocol", "http")} == {"L7"}
    assert all(f["l4"]["TCP"]["destination_port"] == 80 for f in flows(agent, "--to-port", "80"))
    labelled = flows(agent, "--from-identity", str(drop_identity(every, other)))
    assert labelled == from_other


def drop_identity(every: list[dict[str, Any]], source: str) -> int:
    return int(next(f["source"]["identity"] for f in every if f["IP"]["source"] == source))


def test_people_read_compact_and_table(traffic: Web, agent: Agent) -> None:
    compact = run(CELLGATE, "observe", "--socket", str(agent.api), "--verdict", "DROPPED", "--last", "1").stdout
    assert f"{traffic.ip['other']}:" in compact and "app=other" in compact and "DROPPED (POLICY_DENIED)" in compact
    table = run(CELLGATE, "observe", "--socket", str(agent.api), "-o", "table", "--type", "l7").stdout.splitlines()
    assert table[0].split()[:3] == ["TIMESTAMP", "SOURCE", "DESTINATION"] and len(table) >= 3
    refused = run(CELLGATE, "observe", "--socket", str(agent.api), "-o", "table", "-f", check=False)
    assert refused.returncode == 2 and "cannot follow" in refused.stderr


@pytest.mark.parametrize(("args", "text"), [
    (("--from-ip", "10.0.0.300"), "not an address or CIDR"),
    (("--verdict", "ALLOWED"), "verdict: 'ALLOWED'"),
    (("--to-port", "0"), "not a port"),
    (("--http-status", "9+"), "give a code (404) or a class (5+)"),
    (("--from-identity", "web"), "is not an identity number"),
    (("--since", "yesterday"), "give a duration"),
    (("--type", "capture"), "type: 'capture'"),
])
def test_bad_filters_get_a_clear_error(agent: Agent, args: tuple[str, ...], text: str) -> None:
    out = run(CELLGATE, "observe", "--socket", str(agent.api), *args, check=False)
    assert out.returncode == 2 and text in out.stderr, out.stderr


def api_get(agent: Agent, path: str) -> tuple[int, Any]:
    out = run("curl", "-s", "-g", "-w", "\n%{http_code}", "--unix-socket", str(agent.api), f"http://cellgate{path}")
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body) if body.strip().startswith(("{", "[")) else body


def test_the_rest_door_refuses_bad_queries_by_name(agent: Agent) -> None:
    code, body = api_get(agent, '/v1/flows?allowlist=[{"sourceIp":["10.0.0.1"]}]')
    assert code == 400 and "unknown flow filter field 'sourceIp'" in body["error"]
    code, body = api_get(agent, "/v1/flows?last=0")
    assert code == 400 and "not a count" in body["error"]
    code, body = api_get(agent, "/v1/flows?tail=5")
    assert code == 400 and "unknown flow query argument(s): tail" in body["error"]


def test_a_follower_sees_allowed_flows_that_nobody_asked_for_before(traffic: Web, agent: Agent) -> None:
    """Allowed new flows cost the datapath an event only while someone follows: before the
    follower, frontend's accepted connections left no policy-verdict flow; with it, they do."""
    assert agent.json("status")["flows"]["followers"] == 0
    before = flows(agent, "--type", "policy-verdict", "--from-label", "app=frontend", "--verdict", "FORWARDED")
    follower = subprocess.Popen([CELLGATE, "observe", "--socket", str(agent.api), "-o", "json", "-f",
                                 "--from-label", "app=frontend", "--type", "policy-verdict"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: agent.json("status")["flows"]["followers"] == 1, 10, "the follower")
        assert traffic.curl("frontend", "/public/x")[0] == 200
        assert follower.stdout is not None
        line = json.loads(follower.stdout.readline())
    finally:
        follower.kill()
        follower.wait()
    flow = line["flow"]
    assert flow["verdict"] in ("FORWARDED", "REDIRECTED") and flow["event_type"] == {"type": 5}
    assert flow["IP"]["source"] == traffic.ip["frontend"] and "container:app=frontend" in flow["source"]["labels"]
    assert flow["uuid"] not in {f["uuid"] for f in before}
    wait_until(lambda: agent.json("status")["flows"]["followers"] == 0, 10, "the follower to be gone")


def test_totals_count_every_drop_the_kernel_counted(traffic: Web, agent: Agent) -> None:
    def kernel_drops() -> int:
        return sum(c["packets"] for c in agent.json("status")["counters"] if c["name"] == "DROP_POLICY")

    def flow_drops() -> int:
        code, totals = api_get(agent, "/v1/flows/totals")
        assert code == 200
        return sum(d["count"] for d in totals["drops"] if d["code"] == 133)

    wait_until(lambda: kernel_drops() == flow_drops(), 10, "the flow log to catch up")
    k0, f0 = kernel_drops(), flow_drops()
    for _ in range(3):
        assert traffic.curl("other", "/public/x", timeout=1) == (0, "")
    wait_until(lambda: kernel_drops() - k0 == flow_drops() - f0 > 0, 10, "every drop counted in both")
    assert kernel_drops() - k0 >= 3  # at least one SYN per attempt
