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
NS = "io.kubernetes.pod.namespace"


class World:
    """frontend, backend and other containers on one network, servers on 80 and 81 everywhere."""

    def __init__(self, scene: Scene, agent: Agent) -> None:
        self.scene, self.agent = scene, agent
        self.net = scene.network()
        self.names: dict[str, str] = {}
        self.ip: dict[str, str] = {}
        self.endpoint: dict[str, str] = {}
        for app in ("frontend", "backend", "other"):
            self._start(app, f"cg{app[:3]}{scene.tag}", f"app={app}")
        for app in list(self.names):
            self._ready(app)

    def add(self, key: str, *labels: str) -> None:
        """One more server container, e.g. add("backend-prod", "app=backend", f"{NS}=prod")."""
        self._start(key, f"cgx{len(self.names)}{self.scene.tag}", *labels)
        self._ready(key)

    def _start(self, key: str, name: str, *labels: str) -> None:
        script = " ".join(f'(while true; do echo "hello {p} from $(hostname)" | nc -l -p {p}; done) &'
                          for p in PORTS) + " wait"
        self.scene.run(self.net, *(x for label in labels for x in ("-l", label)), cmd=("sh", "-c", script),
                       name=name)
        self.names[key] = name
        self.ip[key] = self.scene.ip(name, self.net)
        self.endpoint[key] = self.scene.d.inspect(name)["NetworkSettings"]["Networks"][self.net]["EndpointID"]

    def _ready(self, key: str) -> None:
        eid = self.endpoint[key]
        wait_until(lambda: self.agent.json("endpoint", "get", eid)["labels"], 20, f"labels of {key}")
        client = "other" if key != "other" else "frontend"
        wait_until(lambda: self.tcp(client, key, 80, 2), 20, f"{key} to serve")  # before anything is judged

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


def host_path(world: World, agent: Agent, dst: str) -> str:
    """What decides host → dst: the source address the host picks, the ipcache, the last log lines."""
    route = run("ip", "route", "get", world.ip[dst], check=False).stdout
    ipcache = agent.cli("bpf", "ipcache", "list", check=False).stdout
    return f"{route}\n{ipcache}\n{agent.log.read_text()[-2000:]}"


def test_entities_and_port_ranges(world: World, agent: Agent) -> None:
    load(agent, "entities.yaml")
    assert world.host_tcp("backend", 81), host_path(world, agent, "backend")
    assert world.host_tcp("backend", 80), host_path(world, agent, "backend")
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


# -- never fail open (issue 9): each test names traffic that flowed before the fix ------------------


def load_text(agent: Agent, tmp_path: Path, text: str, name: str = "p.yaml") -> int:
    path = tmp_path / name
    path.write_text(text)
    out = json.loads(agent.cli("policy", "import", str(path), "-o", "json").stdout)
    agent.cli("policy", "wait", str(out["revision"]))
    return int(out["revision"])


def judge(world: World, expected: dict[tuple[str, str, str], bool]) -> None:
    """Real traffic and `policy trace` both give the expected verdict for every (src, dst, dport)."""
    wrong = []
    for (src, dst, dport), allowed in expected.items():
        real = world.attempt(src, dst, dport)
        traced = world.trace(src, dst, dport)
        if real != allowed or (traced["verdict"] == "ALLOWED") != allowed:
            wrong.append((src, dst, dport, "expected", allowed, "real", real, traced["verdict"], traced["lines"]))
    assert not wrong, json.dumps(wrong, indent=1)


BOTH = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cg-both}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
specs:
- endpointSelector: {matchLabels: {app: frontend}}
  egress:
  - toEndpoints: [{matchLabels: {app: backend}}]
"""


def test_a_crd_with_spec_and_specs_enforces_both(world: World, agent: Agent, tmp_path: Path) -> None:
    load_text(agent, tmp_path, BOTH)
    assert len(agent.json("policy", "get", "--labels", "name=cg-both")["rules"]) == 2
    judge(world, {
        ("frontend", "backend", "80/tcp"): True,
        ("frontend", "backend", "81/tcp"): False,  # spec
        ("other", "backend", "80/tcp"): False,  # spec
        ("frontend", "other", "80/tcp"): False,  # specs[0]: the frontend may only reach the backend
        ("other", "frontend", "80/tcp"): True,
    })


DEFAULT_NS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cg-backend}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{}]
"""
PROD_NS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cg-backend, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: default, app: frontend}}]
"""


def test_a_namespaced_policy_selects_only_endpoints_of_its_namespace(world: World, agent: Agent,
                                                                     tmp_path: Path) -> None:
    """Plain containers are in namespace default; `-l io.kubernetes.pod.namespace=prod` puts one in prod."""
    world.add("backend-prod", "app=backend", f"{NS}=prod")
    world.add("frontend-prod", "app=frontend", f"{NS}=prod")
    load_text(agent, tmp_path, DEFAULT_NS)
    assert agent.json("endpoint", "get", world.endpoint["backend"])["policy"]["enforcement"]["ingress"] is True
    assert agent.json("endpoint", "get", world.endpoint["backend-prod"])["policy"]["enforcement"]["ingress"] is False
    judge(world, {
        ("frontend", "backend", "80/tcp"): True,  # `{}`: every endpoint of namespace default
        ("other", "backend", "81/tcp"): True,
        ("frontend-prod", "backend", "80/tcp"): False,  # another namespace
        ("host", "backend", "80/tcp"): False,  # `{}` is never the host
        ("frontend-prod", "backend-prod", "80/tcp"): True,  # the policy of default does not select prod
        ("host", "backend-prod", "80/tcp"): True,
    })
    load_text(agent, tmp_path, PROD_NS, "prod.yaml")
    assert len(agent.json("policy", "get", "--labels", "name=cg-backend")["rules"]) == 2  # one per namespace
    judge(world, {
        ("frontend", "backend-prod", "80/tcp"): True,  # the peer names namespace default
        ("frontend-prod", "backend-prod", "80/tcp"): False,
        ("other", "backend-prod", "80/tcp"): False,
        ("host", "backend-prod", "80/tcp"): False,
        ("frontend", "backend", "80/tcp"): True,  # the policy of default is still in force
        ("frontend-prod", "backend", "80/tcp"): False,
    })


def test_a_wildcard_peer_admits_endpoints_but_never_the_host(world: World, agent: Agent, tmp_path: Path) -> None:
    load_text(agent, tmp_path, "- labels: [{key: name, value: cg-any-endpoint}]\n"
                               "  endpointSelector: {matchLabels: {app: backend}}\n"
                               "  ingress: [{fromEndpoints: [{}]}]\n")
    judge(world, {
        ("frontend", "backend", "80/tcp"): True,
        ("other", "backend", "81/tcp"): True,
        ("other", "backend", "8/icmp"): True,
        ("host", "backend", "80/tcp"): False,  # fromEntities: [host] (or all) admits the host
    })


def test_empty_peer_lists_select_nobody_and_still_enforce(world: World, agent: Agent, tmp_path: Path) -> None:
    load_text(agent, tmp_path, "- endpointSelector: {matchLabels: {app: backend}}\n"
                               "  ingress: [{fromEndpoints: [], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]\n"
                               "- endpointSelector: {matchLabels: {app: frontend}}\n"
                               "  egress: [{toEntities: []}]\n")
    assert agent.json("endpoint", "get", world.endpoint["backend"])["policy"]["enforcement"]["ingress"] is True
    judge(world, {
        ("other", "backend", "80/tcp"): False,  # not "port 80 from anyone"
        ("host", "backend", "80/tcp"): False,
        ("frontend", "other", "80/tcp"): False,  # not "anywhere"
        ("other", "frontend", "80/tcp"): True,
    })


UNENFORCEABLE = [
    ("- endpointSelector: {matchLabels: {'reserved:host': ''}}\n  ingress: [{fromEntities: [world]}]\n",
     "host policies) is not supported yet"),
    ("- nodeSelector: {}\n  ingress: [{fromEntities: [world]}]\n",
     "host policies (nodeSelector) are not supported yet"),
    ("- endpointSelector: {matchLabels: {app: backend}}\n", "rule must have at least one of Ingress, IngressDeny"),
    ("- endpointSelector: {matchLabels: {app: backend}}\n  ingress: []\n", "ingress: an empty list enforces nothing"),
    ("kind: CiliumNetworkPolicy\nmetadata: {name: cg-x}\nspec:\n  endpointSelector: {matchLabels: {app: backend}}\n"
     "  ingress: [{fromEndpoints: [{matchLabels: {'reserved:host': ''}}]}]\n", "name reserved identities with"),
]


def test_what_cannot_be_enforced_is_refused_alike_by_check_and_import(world: World, agent: Agent,
                                                                      tmp_path: Path) -> None:
    load(agent, "l4.yaml")
    before = agent.json("policy", "get")
    bad = tmp_path / "bad.yaml"
    for text, fragment in UNENFORCEABLE:
        bad.write_text(text)
        imported = agent.cli("policy", "import", str(bad), check=False)
        checked = agent.cli("policy", "check", "-o", "json", str(bad), check=False)
        assert imported.returncode == 2 and fragment in imported.stderr, (text, imported.stderr)
        assert checked.returncode == 1, (text, checked.stdout)
        assert imported.stderr.strip() == f"cellgate: {json.loads(checked.stdout)['error']}"
    assert agent.json("policy", "get") == before
    assert not world.tcp("other", "backend", 80) and world.tcp("frontend", "backend", 80)


def test_hostile_policy_files_are_refused_quickly_and_change_nothing(world: World, agent: Agent,
                                                                     tmp_path: Path) -> None:
    import time

    load(agent, "l4.yaml")
    before = agent.json("policy", "get")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(5))
    for name, text, fragment in (("deep.json", "[" * 200_000 + "]" * 200_000, "nested too deeply"),
                                 ("deep.yaml", "- " + "[" * 200_000 + "]" * 200_000 + "\n", "nested too deeply"),
                                 ("bomb.yaml", bomb, "too large: more than 200000 values")):
        path = tmp_path / name
        path.write_text(text)
        started = time.monotonic()
        imported = agent.cli("policy", "import", str(path), check=False)
        assert imported.returncode == 2 and fragment in imported.stderr and "Traceback" not in imported.stderr, \
            (name, imported.stderr[-2000:])
        assert time.monotonic() - started < 10, name
        checked = agent.cli("policy", "check", str(path), check=False)
        assert checked.returncode == 1 and fragment in checked.stdout and "Traceback" not in checked.stderr
    assert agent.json("policy", "get") == before
    assert not world.tcp("other", "backend", 80)
