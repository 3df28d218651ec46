"""Flows and metrics against real traffic: busybox httpd behind L4 and L7 policy on a real dockerd,
requests from containers; `cellgate observe` and GET /v1/flows in Hubble's JSON with Hubble's
filters, a live follower, totals that count every drop the kernel counted; /metrics scraped by a
real Prometheus server and read back through its HTTP API."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import CELLGATE, Agent, Dockerd, Scene, docker_agent, run, wait_until
from tests.e2e.test_l7 import Web, load, proxy_denied
from tests.etcd_server import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def agent(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory, metrics_port: int) -> Iterator[Agent]:
    """This module's agent, with the opt-in HTTP listener on loopback."""
    with docker_agent(dockerd, tmp_path_factory, "cgo", ("--http-serve-addr", f"127.0.0.1:{metrics_port}")) as a:
        yield a


@pytest.fixture(scope="module")
def scene(dockerd: Dockerd, agent: Agent, image: str) -> Iterator[Scene]:
    with Scene(dockerd, agent, image) as s:  # module-wide: the traffic fixture's containers live as long
        yield s


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
    denied = [f for f in got if f["verdict"] == "DROPPED" and f["IP"]["source"] == traffic.ip["other"]]
    assert {f["event_type"]["type"] for f in denied} == {1, 5}  # the policy verdict and the drop, as Cilium
    drop = next(f for f in denied if f["event_type"] == {"type": 1})
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


# -- metrics ---------------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """`name{a="1",b="2"}` (labels sorted) -> value, for one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def test_metrics_carry_ciliums_and_hubbles_names(traffic: Web, agent: Agent, metrics_port: int) -> None:
    m = scrape(metrics_port)
    assert m["cilium_endpoint"] == 3.0
    assert m["cilium_policy"] == len(agent.json("policy", "get")["rules"]) >= 1
    assert m["cilium_policy_max_revision"] == agent.json("status")["policy"]["revision"]
    assert m['cilium_drop_count_total{direction="INGRESS",reason="policy denied"}'] >= 1
    assert m['cilium_forward_count_total{direction="EGRESS"}'] > 0
    assert m['cilium_endpoint_regenerations_total{outcome="success"}'] >= 3
    assert m['cilium_endpoint_regeneration_time_stats_seconds_count{scope="total"}'] >= 3
    assert m['cilium_policy_change_total{outcome="success"}'] >= 1
    assert m['cilium_identity{type="local"}'] >= 3 and m['cilium_identity{type="reserved"}'] >= 5
    assert m['cilium_proxy_redirects{protocol="http"}'] >= 1
    assert 0 < m['cilium_bpf_map_pressure{map_name="cg_policy"}'] < 1
    assert m['hubble_flows_processed_total{subtype="",type="L7",verdict="DROPPED"}'] >= 1
    assert m['hubble_http_requests_total{method="GET",protocol="HTTP/1.1",reporter="server",status="403"}'] >= 1
    assert m['hubble_policy_verdicts_total{action="dropped",direction="ingress",match="l7/http"}'] >= 1
    assert any(k.startswith("cilium_ipcache_events_total") for k in m)


def test_a_refused_import_counts_as_a_failed_policy_change(agent: Agent, metrics_port: int) -> None:
    before = scrape(metrics_port)
    out = run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(agent.api), "-X", "POST",
              "-H", "Content-Type: application/json", "-d", '{"rules": [{"endpointSelector": {}, "egres": []}]}',
              "http://cellgate/v1/policy")
    assert out.stdout == "400"
    after = scrape(metrics_port)
    fail = 'cilium_policy_change_total{outcome="fail"}'
    assert after.get(fail, 0.0) - before.get(fail, 0.0) == 1.0
    success = 'cilium_policy_change_total{outcome="success"}'
    assert after[success] == before[success]
    assert after["cilium_policy_max_revision"] == before["cilium_policy_max_revision"]  # nothing changed


def test_the_listener_is_read_only_and_bound_to_loopback(agent: Agent, metrics_port: int) -> None:
    listening = [line.split()[3] for line in run("ss", "-Hltn", f"sport = :{metrics_port}").stdout.splitlines()]
    assert listening == [f"127.0.0.1:{metrics_port}"]  # loopback only, one socket
    req = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=10)
    assert caught.value.code == 405


def test_a_non_loopback_listener_needs_the_explicit_flag(tmp_path: Path) -> None:
    out = run(CELLGATE, "agent", "--name", "cgx" + tmp_path.name[-6:].replace("_", ""), "--state-dir",
              str(tmp_path / "state"), "--http-serve-addr", "0.0.0.0:9962", check=False, timeout=30)
    assert out.returncode == 2 and "not a loopback address" in out.stderr and "--http-serve-public" in out.stderr
    assert not (tmp_path / "state").exists()


@pytest.fixture(scope="module")
def prometheus(metrics_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus server (Debian's) scraping the agent every second; its API's base URL."""
    base = tmp_path_factory.mktemp("cgprom")
    port = free_port()
    (base / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: cellgate, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n")
    log = open(base / "prometheus.log", "wb")  # noqa: SIM115 (the child holds it)
    proc = subprocess.Popen(["prometheus", f"--config.file={base / 'prometheus.yml'}",
                             f"--storage.tsdb.path={base / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=log)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (base / "prometheus.log").read_text()[-2000:]
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        wait_until(ready, 60, "prometheus to be ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def prom_query(url: str, expr: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_a_real_prometheus_scrapes_the_agent_and_answers_queries(traffic: Web, agent: Agent, metrics_port: int,
                                                                  prometheus: str) -> None:
    def target_up() -> bool:
        with urllib.request.urlopen(f"{prometheus}/api/v1/targets", timeout=10) as resp:
            targets = json.loads(resp.read())["data"]["activeTargets"]
        return bool(targets) and targets[0]["health"] == "up"

    wait_until(target_up, 30, "prometheus to scrape the agent")
    assert traffic.curl("other", "/public/x", timeout=1) == (0, "")  # one more denied connection
    expected = scrape(metrics_port)['cilium_drop_count_total{direction="INGRESS",reason="policy denied"}']

    def drops_seen() -> float:
        result = prom_query(prometheus, 'cilium_drop_count_total{reason="policy denied",direction="INGRESS"}')
        return float(result[0]["value"][1]) if result else -1.0

    wait_until(lambda: drops_seen() >= expected, 30, f"prometheus to see {expected} drops")
    endpoints = prom_query(prometheus, "cilium_endpoint")
    assert float(endpoints[0]["value"][1]) == 3.0 and endpoints[0]["metric"]["job"] == "cellgate"
    forbidden = prom_query(prometheus, 'sum(hubble_http_requests_total{status="403"})')
    assert float(forbidden[0]["value"][1]) >= 1
    verdicts = prom_query(prometheus, "sum by (action) (hubble_policy_verdicts_total)")
    assert {r["metric"]["action"] for r in verdicts} >= {"dropped"}


# -- the service map -------------------------------------------------------------------------------


def web_get(port: int, path: str) -> tuple[int, Any, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            body = resp.read()
            kind = resp.headers.get("Content-Type", "")
            return resp.status, json.loads(body) if "json" in kind else body.decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def chromium(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Debian's chromium, headless, as root (no sandbox), with the page's console on stderr."""
    return run("chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
               "--window-size=1400,1000", *args, url, timeout=120)


def test_the_map_draws_identities_and_flows_in_a_real_browser(traffic: Web, agent: Agent, metrics_port: int,
                                                               tmp_path_factory: pytest.TempPathFactory,
                                                               record_property: Any) -> None:
    code, _, _ = web_get(metrics_port, "/map/data")  # a page is open: allowed flows are reported now
    assert code == 200
    assert traffic.curl("frontend", "/public/x")[0] == 200
    assert proxy_denied(*traffic.curl("frontend", "/private"))
    assert traffic.curl("other", "/public/x", timeout=1) == (0, "")
    code, graph, _ = web_get(metrics_port, "/map/data")
    labels = {n["id"]: n["label"] for n in graph["nodes"]}
    by_app = {app: next(i for i, text in labels.items() if f"app={app}" in text) for app in ("frontend", "backend",
                                                                                           "other")}
    edges = {(e["source"], e["target"], e["port"]): e for e in graph["edges"]}
    web_edge = edges[(by_app["frontend"], by_app["backend"], 80)]
    assert web_edge["l7"].get("GET /public/x", 0) >= 1 and web_edge["l7"].get("GET /private", 0) >= 1
    assert web_edge["state"] in ("mixed", "redirected") and "DROPPED" in web_edge["verdicts"]
    assert edges[(by_app["other"], by_app["backend"], 80)]["state"] == "dropped"
    code, rows, _ = web_get(metrics_port, f"/map/flows?edge={urllib.parse.quote(web_edge['id'])}")
    # by identity: the proxy's upstream leg carries frontend's identity from the proxy's address
    assert code == 200 and rows and all("app=frontend" in r["source"] and "app=backend" in r["destination"]
                                        for r in rows), rows

    shots = tmp_path_factory.mktemp("cgmap")
    shot = shots / "service-map.png"
    page = chromium(f"http://127.0.0.1:{metrics_port}/map/", f"--screenshot={shot}")
    dom = chromium(f"http://127.0.0.1:{metrics_port}/map/", "--dump-dom")
    record_property("screenshot", str(shot))
    print(f"service map screenshot: {shot}")
    assert shot.stat().st_size > 20_000, page.stderr[-2000:]  # a drawn graph, not a blank page
    console = [line for line in (page.stderr + dom.stderr).splitlines() if "CONSOLE" in line]
    assert not console, console  # the page logged nothing: no error, no warning
    status = dom.stdout.split('id="status"', 1)[1].split(">", 1)[0]
    assert 'data-errors="0"' in status and 'data-updates="0"' not in status, status
    nodes_drawn = int(status.split('data-nodes="', 1)[1].split('"', 1)[0])
    assert nodes_drawn >= 3 and int(status.split('data-edges="', 1)[1].split('"', 1)[0]) >= 2
    assert traffic.ip["other"] in dom.stdout and "DROPPED" in dom.stdout  # the flow table below the graph


def test_the_map_is_read_only_and_strict(metrics_port: int) -> None:
    code, body, headers = web_get(metrics_port, "/map/")
    assert code == 200 and "cytoscape" in body and "<script src=" in body and "<script>" not in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert web_get(metrics_port, "/map")[0] == 200  # redirected to /map/
    assert web_get(metrics_port, "/map/static/../../etc/passwd")[0] == 404
    code, body, _ = web_get(metrics_port, "/map/data?since=yesterday")
    assert code == 400 and "give a duration" in body["error"]
    code, body, _ = web_get(metrics_port, "/map/data?limit=5")
    assert code == 400 and "unknown argument" in body["error"]


# -- policy previewed and suggested from real flows ---------------------------------------------------


class Following:
    """`cellgate observe -f` running: the datapath reports allowed new flows meanwhile."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.proc = subprocess.Popen([CELLGATE, "observe", "--socket", str(agent.api), "-f", "-o", "json"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> Following:
        wait_until(lambda: self.agent.json("status")["flows"]["followers"] >= 1, 10, "the follower")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def now_rfc3339() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat()


def reset(agent: Agent, *policies: str) -> None:
    agent.cli("policy", "delete", "--all", check=False)
    if policies:
        load(agent, *policies)


def test_a_dry_run_predicts_what_the_import_then_does(traffic: Web, agent: Agent) -> None:
    from tests.e2e.test_l7 import POLICIES

    reset(agent)
    try:
        since = now_rfc3339()
        with Following(agent):
            assert traffic.curl("frontend", "/public/x")[0] == 200
            assert traffic.curl("other", "/public/x")[0] == 200  # open: no policy yet
            assert traffic.curl("backend", "/public/x", timeout=1)[0] in (0, 200)  # the backend to itself
        revision = agent.json("status")["policy"]["revision"]
        out = agent.json("policy", "import", "--dry-run", "--since", since, str(POLICIES / "l4.yaml"))
        assert agent.json("status")["policy"]["revision"] == revision and agent.json("policy", "get")["rules"] == []
        denied = {(g["from"], g["port"]) for g in out["newly_denied"]}
        assert any("app=other" in src and port == "80/TCP" for src, port in denied), out
        assert not any("app=frontend" in src for src, _ in denied), out  # l4.yaml allows frontend -> backend:80
        assert out["newly_allowed"] == [] and out["unchanged"] >= 1
        text = agent.cli("policy", "check", "--against-flows", "--since", since, str(POLICIES / "l4.yaml")).stdout
        assert "Would be DENIED" in text and "app=other" in text and "Nothing was imported" in text
        # the prediction, proved: import it and replay the same traffic
        load(agent, "l4.yaml")
        assert traffic.curl("frontend", "/public/x")[0] == 200
        assert traffic.curl("other", "/public/x", timeout=1) == (0, "")
    finally:
        reset(agent, "l7-http.yaml")


def test_a_suggested_policy_keeps_what_was_seen_and_denies_the_rest(traffic: Web, agent: Agent,
                                                                      tmp_path: Path) -> None:
    reset(agent, "l7-http.yaml")  # the proxy sees frontend's requests: the suggestion can name paths
    try:
        since = now_rfc3339()
        with Following(agent):
            assert traffic.curl("frontend", "/public/x")[0] == 200
            assert traffic.curl("frontend", "/public/a/b")[0] == 200
        out = agent.cli("policy", "suggest", "--selector", "app=backend", "--since", since)
        suggested = tmp_path / "suggested.yaml"
        suggested.write_text(out.stdout)
        assert "^/public/x$" in out.stdout and "^/public/a/b$" in out.stdout and "app: frontend" in out.stdout
        assert "app: other" not in out.stdout
        assert agent.cli("policy", "check", str(suggested)).returncode == 0
        reset(agent)
        imported = json.loads(agent.cli("policy", "import", str(suggested), "-o", "json").stdout)
        agent.cli("policy", "wait", str(imported["revision"]))
        assert traffic.curl("frontend", "/public/x") == (200, "served:public/x\n")  # replayed: allowed
        assert traffic.curl("frontend", "/public/a/b") == (200, "served:public/a/b\n")
        assert proxy_denied(*traffic.curl("frontend", "/public/index.html"))  # a new kind of request
        assert traffic.curl("other", "/public/x", timeout=1) == (0, "")  # a new peer
        nothing = agent.cli("policy", "suggest", "--selector", "app=nobody", "--since", since, check=False)
        assert nothing.returncode == 1 and "no allowed flow" in nothing.stderr
    finally:
        reset(agent, "l7-http.yaml")
