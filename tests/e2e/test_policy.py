"""Identity policy with a real dockerd: labels become identities, rules are enforced in eBPF."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import CELLGATE, Agent, Scene, run, wait_until

pytestmark = pytest.mark.e2e

POLICIES = Path(__file__).resolve().parents[2] / "examples" / "policies"
PORTS = (80, 81)


class World:
    """frontend, backend and other containers on one network, servers on 80 and 81 everywhere."""

    def __init__(self, scene: Scene, agent: Agent) -> None:
        self.scene, self.agent = scene, agent
        self.net = scene.network()
        script = " ".join(f'(while true; do echo "hello {p} from $(hostname)" | nc -l -p {p}; done) &'
                           for p in PORTS) + " wait"
        self.names = {}
        for app in ("frontend", "backend", "other"):
            name = f"cg{app[:3]}{scene.tag}"
            scene.run(self.net, "-l", f"app={app}", cmd=("sh", "-c", script), name=name)
            self.names[app] = name
        self.ip = {app: scene.ip(name, self.net) for app, name in self.names.items()}
        self.endpoint = {app: scene.d.inspect(name)["NetworkSettings"]["Networks"][self.net]["EndpointID"]
                         for app, name in self.names.items()}
        for app, eid in self.endpoint.items():
            wait_until(lambda eid=eid: agent.json("endpoint", "get", eid)["labels"], 20, f"labels of {app}")
        for app in self.names:  # every server listens before anything is judged
            wait_until(lambda app=app: self.tcp("other" if app != "other" else "frontend", app, 80, 2), 20,
                       f"{app} to serve")

    def tcp(self, src: str, dst: str, port: int, wait: int = 1) -> bool:
        out = self.scene.exec(self.names[src], "nc", "-w", str(wait), self.ip[dst], str(port), check=False)
        return f"hello {port} from" in out.stdout

    def ping(self, src: str, dst: str) -> bool:
        return self.scene.exec(self.names[src], "ping", "-c", "1", "-W", "1", self.ip[dst],
                               check=False).returncode == 0

    def host_tcp(self, dst: str, port: int) -> bool:
        return f"hello {port} from" in run("nc", "-w", "1", self.ip[dst], str(port), check=False, input="").stdout

    def host_ping(self, dst: str) -> bool:
        return run("ping", "-c", "1", "-W", "1", self.ip[dst], check=False).returncode == 0

    def trace(self, src: str, dst: str, dport: str) -> dict[str, Any]:
        source = ["--src-identity", "1"] if src == "host" else ["--src-endpoint", self.endpoint[src]]
        return self.agent.json("policy", "trace", *source, "--dst-endpoint", self.endpoint[dst], "--dport", dport)

    def attempt(self, src: str, dst: str, dport: str) -> bool:
        port, proto = dport.split("/")
        if src == "host":
            return self.host_ping(dst) if proto == "icmp" else self.host_tcp(dst, int(port))
        return self.ping(src, dst) if proto == "icmp" else self.tcp(src, dst, int(port))


@pytest.fixture
def world(scene: Scene, agent: Agent) -> Any:
    w = World(scene, agent)
    yield w
    agent.cli("policy", "delete", "--all", check=False)


def load(agent: Agent, name: str) -> int:
    out = json.loads(agent.cli("policy", "import", str(POLICIES / name), "-o", "json").stdout)
    agent.cli("policy", "wait", str(out["revision"]))
    return int(out["revision"])


def test_labels_become_identities(world: World, agent: Agent) -> None:
    eps = {app: agent.json("endpoint", "get", eid) for app, eid in world.endpoint.items()}
    assert eps["frontend"]["labels"] == sorted(["container:app=frontend", f"container:cgtest={agent.name}"])
    numbers = {e["identity"] for e in eps.values()}
    assert len(numbers) == 3 and all(n >= 256 for n in numbers)
    listed = {i["id"]: i for i in agent.json("identity", "list")}
    assert "container:app=backend" in listed[eps["backend"]["identity"]]["labels"]
    assert {1, 2, 3, 5} <= set(listed)  # host, world, unmanaged, init
    # the same labels on a new container share the number
    twin = world.scene.run(world.net, "-l", "app=frontend")
    twin_ep = world.scene.d.inspect(twin)["NetworkSettings"]["Networks"][world.net]["EndpointID"]
    wait_until(lambda: agent.json("endpoint", "get", twin_ep)["identity"] == eps["frontend"]["identity"], 20,
               "twin identity")


def test_backend_accepts_tcp80_only_from_frontend(world: World, agent: Agent) -> None:
    assert world.tcp("other", "backend", 80)  # open before any rule
    load(agent, "l4.yaml")
    assert world.tcp("frontend", "backend", 80)
    assert not world.tcp("other", "backend", 80)
    assert not world.tcp("frontend", "backend", 81)
    assert world.tcp("backend", "frontend", 80)  # the backend's own egress is not restricted
    assert not world.ping("frontend", "backend")  # ICMP is not TCP/80
    agent.cli("policy", "delete", "--labels", "name=l4-backend-80")
    assert world.tcp("other", "backend", 80) and world.tcp("frontend", "backend", 81)


def test_egress_rule_limits_the_sender(world: World, agent: Agent) -> None:
    load(agent, "egress.yaml")
    assert world.tcp("frontend", "backend", 80)
    assert world.ping("frontend", "backend")
    assert not world.tcp("frontend", "backend", 81)
    assert not world.tcp("frontend", "other", 80)
    assert world.tcp("other", "frontend", 80)  # replies to connections the frontend accepts still flow


def test_deny_overrides_allow(world: World, agent: Agent) -> None:
    load(agent, "deny.json")
    assert world.tcp("frontend", "backend", 80)
    assert not world.tcp("frontend", "backend", 81)
    assert world.tcp("other", "backend", 81)
    entries = agent.json("bpf", "policy", "get", world.endpoint["backend"])["entries"]
    assert any(e["verdict"] == "deny" and e["ports"] == "81" for e in entries)


def test_entities_and_port_ranges(world: World, agent: Agent) -> None:
    load(agent, "entities.yaml")
    assert world.host_tcp("backend", 81) and world.host_tcp("backend", 80)
    assert world.tcp("frontend", "backend", 80) and world.tcp("frontend", "backend", 81)
    assert not world.tcp("other", "backend", 80)


def test_l3_rule_allows_every_port_from_the_peer(world: World, agent: Agent) -> None:
    load(agent, "l3.yaml")
    assert world.tcp("frontend", "backend", 81) and world.ping("frontend", "backend")
    assert not world.ping("other", "backend")
    assert not world.host_tcp("backend", 80)  # the host is a peer like any other


def test_monitor_shows_the_drop_with_both_label_sets(world: World, agent: Agent) -> None:
    load(agent, "l4.yaml")
    monitor = subprocess.Popen([CELLGATE, "monitor", "--type", "drop", "-o", "json", "--count", "1",
                                "--timeout", "30", "--socket", str(agent.api)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: agent.json("status")["monitor"]["subscribers"] >= 1, 10, "monitor to subscribe")
        assert not world.tcp("other", "backend", 80)
        out, err = monitor.communicate(timeout=40)
    finally:
        monitor.kill()
    event = json.loads(out.splitlines()[0])
    assert event["reason"] == "policy denied"
    assert "container:app=other" in event["src_labels"]
    assert "container:app=backend" in event["dst_labels"]
    assert (event["src"], event["dst"], event["dport"]) == (world.ip["other"], world.ip["backend"], 80)
    assert not err


def test_verdict_events_name_the_rule(world: World, agent: Agent) -> None:
    load(agent, "l4.yaml")
    rule_id = agent.json("policy", "get")["rules"][0]["id"]
    monitor = subprocess.Popen([CELLGATE, "monitor", "--type", "verdict", "-o", "json", "--count", "1",
                                "--timeout", "30", "--socket", str(agent.api)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: agent.json("status")["monitor"]["subscribers"] >= 1, 10, "monitor to subscribe")
        assert world.tcp("frontend", "backend", 80)
        out, _ = monitor.communicate(timeout=40)
    finally:
        monitor.kill()
    event = json.loads(out.splitlines()[0])
    assert event["verdict"] == "allowed" and event["rule"] == rule_id and event["ct_state"] == "new"


# (src, dst, dport) with l4.yaml and egress.yaml both in force; "host" is the host itself
TRACE_CASES = [
    (src, dst, port) for src in ("frontend", "backend", "other", "host") for dst in ("frontend", "backend", "other")
    if src != dst for port in ("80/tcp", "81/tcp", "8/icmp")
]


def test_policy_trace_agrees_with_the_datapath(world: World, agent: Agent) -> None:
    load(agent, "l4.yaml")
    load(agent, "egress.yaml")
    assert len(TRACE_CASES) >= 20
    disagreements = []
    for src, dst, dport in TRACE_CASES:
        traced = world.trace(src, dst, dport)
        real = world.attempt(src, dst, dport)
        if (traced["verdict"] == "ALLOWED") != real:
            disagreements.append((src, dst, dport, traced["verdict"], real, traced["lines"]))
    assert not disagreements, json.dumps(disagreements, indent=1)
    lines = world.trace("other", "backend", "80/tcp")["lines"]
    assert lines[-1] == "Final verdict: DENIED" and any("name=l4-backend-80" in x for x in lines)


def test_enforcement_survives_agent_sigkill_and_restart(world: World, agent: Agent) -> None:
    load(agent, "l4.yaml")
    results: dict[str, list[bool]] = {"allowed": [], "denied": []}
    stop = threading.Event()

    def probe(kind: str, src: str) -> None:
        while not stop.is_set():
            results[kind].append(world.tcp(src, "backend", 80))

    threads = [threading.Thread(target=probe, args=("allowed", "frontend")),
               threading.Thread(target=probe, args=("denied", "other"))]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results["allowed"]) >= 2 and len(results["denied"]) >= 1, 30, "probes running")
        agent.signal(signal.SIGKILL)
        down = (len(results["allowed"]), len(results["denied"]))
        wait_until(lambda: len(results["allowed"]) >= down[0] + 2 and len(results["denied"]) >= down[1] + 1,
                   30, "probes while the agent is down")
        agent.start()
        restarted = (len(results["allowed"]), len(results["denied"]))
        wait_until(lambda: len(results["allowed"]) >= restarted[0] + 2 and len(results["denied"]) >= restarted[1] + 1,
                   30, "probes after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert all(results["allowed"]), results
    assert not any(results["denied"]), results
    after = agent.json("endpoint", "get", world.endpoint["backend"])
    assert after["policy"]["enforcement"]["ingress"] is True


def test_policy_errors_change_nothing(world: World, agent: Agent, tmp_path: Path) -> None:
    load(agent, "l4.yaml")
    before = agent.json("policy", "get")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- endpointSelector: {matchLabels: {app: backend}}\n  ingres: []\n")
    proc = agent.cli("policy", "import", str(bad), check=False)
    assert proc.returncode == 2 and "rule 0: unknown field 'ingres'" in proc.stderr
    bad.write_text('[{"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], '
                   '"rules": {"http": [{"method": "GET"}]}}]}]}]')
    proc = agent.cli("policy", "import", str(bad), check=False)
    assert "L7 rules" in proc.stderr
    assert agent.json("policy", "get") == before
    assert not world.tcp("other", "backend", 80)
    assert agent.cli("policy", "check", str(bad), check=False).returncode == 1


def test_a_container_cannot_claim_a_reserved_or_foreign_source(world: World, agent: Agent,
                                                                tmp_path: Path) -> None:
    rule = tmp_path / "host-only.yaml"
    rule.write_text("- labels: [{key: name, value: host-only}]\n"
                    "  endpointSelector: {matchLabels: {app: backend}}\n"
                    "  ingress: [{fromEndpoints: [{matchLabels: {'reserved:host': ''}}]}]\n")
    agent.cli("policy", "import", str(rule))
    forger = world.scene.run(world.net, "-l", "reserved:host=", "-l", "k8s:app=backend", "-l", "app=forger")
    eid = world.scene.d.inspect(forger)["NetworkSettings"]["Networks"][world.net]["EndpointID"]
    ep = wait_until(lambda: (e := agent.json("endpoint", "get", eid))["labels"] and e, 20, "labels")
    assert "container:app=forger" in ep["labels"]
    assert not any(x.startswith(("reserved:", "k8s:", "container:reserved", "container:k8s")) for x in ep["labels"])
    assert ep["identity"] >= 256
    out = world.scene.exec(forger, "nc", "-w", "1", world.ip["backend"], "80", check=False)
    assert "hello" not in out.stdout  # not the host, whatever its labels say
    assert world.host_tcp("backend", 80)  # the real host is
