"""L7 policy with a real dockerd: HTTP rules enforced by the transparent proxy that the eBPF
datapath steers to (bpf_sk_assign), with busybox httpd and wget in containers and the host's curl
inside a container's network namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import CELLGATE, Agent, Scene, run, wait_until

pytestmark = pytest.mark.e2e

POLICIES = Path(__file__).resolve().parents[2] / "examples" / "policies"
DENIED_BODY = "Access denied\n"  # Cilium's "Access denied\r\n", newline-folded by text mode
FILES = ("public/x", "public/a/b", "public/index.html", "private", "api/v1/items", "api/v2/x")


class Web:
    """backend (busybox httpd on 80), frontend and other (clients) on one network."""

    def __init__(self, scene: Scene, agent: Agent) -> None:
        self.scene, self.agent = scene, agent
        self.net = scene.network()
        setup = " && ".join(f"mkdir -p /www/{os.path.dirname(f) or '.'} && echo served:{f} > /www/{f}" for f in FILES)
        self.names = {
            "backend": scene.run(self.net, "-l", "app=backend", name=f"cgweb{scene.tag}",
                                 cmd=("sh", "-c", f"{setup} && exec httpd -f -p 80 -h /www")),
            "frontend": scene.run(self.net, "-l", "app=frontend", name=f"cgfro{scene.tag}"),
            "other": scene.run(self.net, "-l", "app=other", name=f"cgoth{scene.tag}"),
        }
        self.ip = {k: scene.ip(n, self.net) for k, n in self.names.items()}
        self.endpoint = {k: scene.d.inspect(n)["NetworkSettings"]["Networks"][self.net]["EndpointID"]
                         for k, n in self.names.items()}
        for key in self.names:
            wait_until(lambda key=key: agent.json("endpoint", "get", self.endpoint[key])["labels"], 20,
                       f"labels of {key}")
        wait_until(lambda: self.curl("frontend", "/public/x")[0] == 200, 20, "the backend to serve")
        # L7 rules send flows to the proxy at once: it must listen (a fresh agent starts it beside itself)
        wait_until(lambda: agent.json("status")["proxy"]["listening"], 30, "the L7 proxy to listen")

    def pid(self, key: str) -> int:
        return int(self.scene.d.inspect(self.names[key])["State"]["Pid"])

    def curl(self, src: str, path: str, method: str = "GET", headers: tuple[str, ...] = (),
             timeout: float = 3) -> tuple[int, str]:
        """(status, body) of one request by the host's curl inside `src`'s network namespace; (0, "")
        when no HTTP answer came (connection refused, reset or timed out)."""
        args = ["nsenter", "-t", str(self.pid(src)), "-n", "curl", "-s", "--path-as-is", "-m", str(timeout),
                *(["-I"] if method == "HEAD" else ["-X", method]),
                "-o", "-", "-w", "\n%{http_code}", *(x for h in headers for x in ("-H", h)),
                f"http://{self.ip['backend']}{path}"]
        out = run(*args, check=False, timeout=timeout + 5)
        body, _, code = out.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def wget(self, src: str, path: str) -> subprocess.CompletedProcess[str]:
        # (busybox 1.35's wget crashes with -T: the exec's own timeout bounds it)
        return self.scene.exec(self.names[src], "wget", "-q", "-O", "-", f"http://{self.ip['backend']}{path}",
                               check=False)

    def trace(self, src: str, path: str, method: str = "GET", headers: tuple[str, ...] = ()) -> dict[str, Any]:
        args = ["policy", "trace", "--src-endpoint", self.endpoint[src], "--dst-endpoint", self.endpoint["backend"],
                "--dport", "80/tcp", "--http-method", method, "--http-path", path]
        for h in headers:
            args += ["--header", h]
        return self.agent.json(*args)


@pytest.fixture
def web(scene: Scene, agent: Agent) -> Iterator[Web]:
    w = Web(scene, agent)
    yield w
    agent.cli("policy", "delete", "--all", check=False)


def load(agent: Agent, *names: str) -> None:
    for name in names:
        out = json.loads(agent.cli("policy", "import", str(POLICIES / name), "-o", "json").stdout)
        agent.cli("policy", "wait", str(out["revision"]))


def proxy_denied(status: int, body: str) -> bool:
    return status == 403 and (body == DENIED_BODY or body.startswith("HTTP/1.1 403 Forbidden"))  # HEAD: no body


def test_only_get_on_public_paths(web: Web, agent: Agent) -> None:
    load(agent, "l7-http.yaml")
    assert web.curl("frontend", "/public/x") == (200, "served:public/x\n")
    assert web.wget("frontend", "/public/a/b").stdout == "served:public/a/b\n"
    status, body = web.curl("frontend", "/private")
    assert proxy_denied(status, body), (status, body)
    assert "403" in web.wget("frontend", "/private").stderr  # busybox wget reports the refusal
    assert proxy_denied(*web.curl("frontend", "/public/x", method="POST"))
    assert proxy_denied(*web.curl("frontend", "/public"))  # anchored: /public is not /public/.*
    assert web.curl("other", "/public/x", timeout=1) == (0, "")  # no L4 allow at all: dropped
    # The denial is the proxy's, not httpd's: the request never reached the backend's files.
    conntrack = agent.json("bpf", "ct", "list")
    assert any("proxy" in e["flags"] and e["dst"] == web.ip["backend"] for e in conntrack), conntrack


def test_header_rule_and_merged_rules(web: Web, agent: Agent) -> None:
    load(agent, "l7-header.yaml")
    assert proxy_denied(*web.curl("frontend", "/api/v1/items"))
    assert web.curl("frontend", "/api/v1/items", headers=("X-Token: 12345",)) == (200, "served:api/v1/items\n")
    assert proxy_denied(*web.curl("frontend", "/api/v1/items", headers=("X-Token: 12a45",)))
    assert proxy_denied(*web.curl("frontend", "/api/v1/items", headers=("X-Other: 1",)))


def test_trace_equals_the_proxy_on_a_table(web: Web, agent: Agent) -> None:
    """Two rules on one port (GET /public/.* or a numeric X-Token): their requests ORed, as Cilium."""
    load(agent, "l7-http.yaml", "l7-header.yaml")
    cases: list[tuple[str, str, tuple[str, ...]]] = [
        ("GET", "/public/x", ()), ("GET", "/public/a/b", ()), ("GET", "/public/", ()), ("GET", "/public", ()),
        ("GET", "/private", ()), ("POST", "/public/x", ()), ("PUT", "/public/x", ()), ("DELETE", "/private", ()),
        ("HEAD", "/public/x", ()), ("GET", "/private", ("X-Token: 1",)), ("POST", "/api/v1/items", ("X-Token: 42",)),
        ("POST", "/api/v1/items", ("X-Token: 4x2",)), ("GET", "/api/v2/x", ("X-Token:",)),
        ("GET", "/api/v2/x", ("x-token: 777",)), ("GET", "/public/x?q=1", ()), ("GET", "/publicx", ()),
        ("PATCH", "/api/v2/x", ("X-Token: 0", "X-Other: a")), ("GET", "/api/v2/x", ("X-Other: 5",)),
        ("OPTIONS", "/public/x", ()), ("GET", "/PUBLIC/x", ()), ("GET", "/public/x/../../private", ()),
        ("DELETE", "/api/v1/items", ("X-Token: 99999999999",)),
    ]
    mismatches = []
    for method, path, headers in cases:
        traced = web.trace("frontend", path, method, headers)["verdict"] == "ALLOWED"
        status, body = web.curl("frontend", path, method, headers)
        assert status, f"no answer for {method} {path}"
        if traced == proxy_denied(status, body):
            mismatches.append((method, path, headers, traced, status, body))
    assert not mismatches, mismatches
    assert len(cases) >= 20


def test_events_name_the_request_the_verdict_and_the_rule(web: Web, agent: Agent) -> None:
    load(agent, "l7-http.yaml")
    mon = subprocess.Popen([CELLGATE, "monitor", "--type", "l7", "-o", "json", "--socket", str(agent.api),
                            "--count", "2", "--timeout", "30"], stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: agent.json("status")["monitor"]["subscribers"] >= 1, 10, "the monitor to subscribe")
        assert web.curl("frontend", "/public/x")[0] == 200
        assert web.curl("frontend", "/private")[0] == 403
        out, _ = mon.communicate(timeout=30)
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["verdict"], e["http"]["method"], e["http"]["path"], e["http"]["status"]) for e in events] == [
        ("forwarded", "GET", "/public/x", 200), ("denied", "GET", "/private", 403)]
    assert all("app=frontend" in " ".join(e["src_labels"]) and "app=backend" in " ".join(e["dst_labels"])
               for e in events), events
    assert events[0]["rule"] and events[0]["side"] == "ingress"


def test_proxy_killed_under_load_fails_closed_and_comes_back(web: Web, agent: Agent) -> None:
    load(agent, "l7-http.yaml")
    pid_file = agent.state / "proxy" / "proxy.pid"
    old = int(pid_file.read_text())
    seen: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def load_loop() -> None:  # allowed and denied requests, back to back, while the proxy dies
        while not stop.is_set():
            for path in ("/public/x", "/private"):
                seen.append((path, *web.curl("frontend", path, timeout=1)))

    worker = threading.Thread(target=load_loop)
    worker.start()
    try:
        wait_until(lambda: len(seen) >= 4, 20, "requests under way")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: pid_file.exists() and int(pid_file.read_text() or 0) != old, 10, "a new proxy")
        mark = len(seen)
        wait_until(lambda: any(p == "/public/x" and s == 200 for p, s, _ in seen[mark:]), 15,
                   "allowed requests to resume")
    finally:
        stop.set()
        worker.join()
    private = [(s, b) for p, s, b in seen if p == "/private"]
    assert private and all(s == 0 or proxy_denied(s, b) for s, b in private), private  # never served
    assert proxy_denied(*web.curl("frontend", "/private"))


def test_agent_sigkill_leaves_the_proxy_serving_and_the_next_agent_adopts_it(web: Web, agent: Agent) -> None:
    load(agent, "l7-http.yaml")
    pid = int((agent.state / "proxy" / "proxy.pid").read_text())
    agent.signal(signal.SIGKILL)
    try:
        assert web.curl("frontend", "/public/x") == (200, "served:public/x\n")  # no agent: still decided
        assert proxy_denied(*web.curl("frontend", "/private"))
    finally:
        agent.start()
    assert int((agent.state / "proxy" / "proxy.pid").read_text()) == pid  # adopted, not replaced
    assert proxy_denied(*web.curl("frontend", "/private"))
    assert web.curl("frontend", "/public/x")[0] == 200


def test_agent_restart_keeps_l7_enforcement(web: Web, agent: Agent) -> None:
    load(agent, "l7-http.yaml")
    agent.stop()
    try:
        status, body = web.curl("frontend", "/private", timeout=1)  # agent down: never unfiltered
        assert status == 0 or proxy_denied(status, body), (status, body)
    finally:
        agent.start()
    wait_until(lambda: web.curl("frontend", "/public/x", timeout=1)[0] == 200, 10, "allowed requests to resume")
    assert proxy_denied(*web.curl("frontend", "/private"))


def egress_http(peer_allowed_at_l4: str) -> list[dict[str, Any]]:
    """frontend's egress HTTP rules to the backend, and the backend's own L4 ingress rule."""
    return [
        {"labels": [{"key": "name", "value": "cg-l7-egress"}], "endpointSelector": {"matchLabels": {"app": "frontend"}},
         "egress": [{"toEndpoints": [{"matchLabels": {"app": "backend"}}],
                     "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                  "rules": {"http": [{"method": "GET", "path": "/public/.*"}]}}]}]},
        {"labels": [{"key": "name", "value": "cg-l4-ingress"}], "endpointSelector": {"matchLabels": {"app": "backend"}},
         "ingress": [{"fromEndpoints": [{"matchLabels": {"app": peer_allowed_at_l4}}],
                      "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]},
    ]


def import_rules(agent: Agent, rules: list[dict[str, Any]], tmp: Path) -> None:
    path = tmp / "rules.json"
    path.write_text(json.dumps(rules))
    out = json.loads(agent.cli("policy", "import", str(path), "-o", "json").stdout)
    agent.cli("policy", "wait", str(out["revision"]))


def test_egress_rules_and_the_receivers_l4_policy_still_apply(web: Web, agent: Agent, tmp_path: Path) -> None:
    """The sender's egress proxy forwards with a mark carrying the sender's identity: the receiver's
    L3/L4 ingress policy judges the upstream leg as the frontend (not as the host), and is not skipped."""
    import_rules(agent, egress_http("frontend"), tmp_path)
    assert web.curl("frontend", "/public/x") == (200, "served:public/x\n")
    assert proxy_denied(*web.curl("frontend", "/private"))
    agent.cli("policy", "delete", "--all")
    import_rules(agent, egress_http("other"), tmp_path)  # the backend admits only app=other at L4
    status, body = web.curl("frontend", "/public/x")
    assert status != 200 and body != "served:public/x\n", (status, body)  # allowed at L7, dropped at L4
    assert web.curl("other", "/public/x") == (200, "served:public/x\n")


def test_trace_equals_the_proxy_with_l7_rules_on_both_sides(web: Web, agent: Agent, tmp_path: Path) -> None:
    """The sender's egress L7 rules (GET /public/.* or /api/v1/.*) and the receiver's ingress L7 rules
    (GET anything but /api/v1/...: GET /public/.* or /private) both judge each request: the trace
    names both sides' verdicts and its final word is the proxy's, request by request."""
    rules = egress_http("frontend")
    rules[0]["egress"][0]["toPorts"][0]["rules"]["http"].append({"method": "GET", "path": "/api/v1/.*"})
    rules[1]["ingress"][0]["toPorts"][0]["rules"] = {"http": [{"method": "GET", "path": "/public/.*"},
                                                             {"method": "GET", "path": "/private"}]}
    import_rules(agent, rules, tmp_path)
    cases = [("GET", "/public/x"), ("GET", "/public/a/b"), ("GET", "/private"), ("GET", "/api/v1/items"),
             ("POST", "/public/x"), ("GET", "/api/v2/x"), ("HEAD", "/public/x"), ("GET", "/public/index.html")]
    mismatches, sides = [], set()
    for method, path in cases:
        traced = web.trace("frontend", path, method)
        status, body = web.curl("frontend", path, method)
        assert status, f"no answer for {method} {path}"
        allowed = traced["verdict"] == "ALLOWED"
        if allowed == proxy_denied(status, body):
            mismatches.append((method, path, traced["l7"], status))
        sides.add((traced["l7"]["egress"]["allowed"], traced["l7"]["ingress"]["allowed"]))
    assert not mismatches, mismatches
    # each side decided on its own somewhere: egress denies /private, ingress denies /api/v1/items
    assert {(True, True), (False, True), (True, False)} <= sides, sides
