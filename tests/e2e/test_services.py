"""Load-balanced services on one host with a real dockerd: wget through a VIP from containers and
curl from the host (the cgroup socket programs translate the connection), distribution over three
backends, label-selected backends following `docker run`/`docker rm`, policy judging the backend
through the VIP (allow, deny, toServices), a UDP service whose replies read as from the VIP, refusal
without backends, an agent SIGKILL and restart under a running request/response connection, and bad
input refused with nothing changed."""

from __future__ import annotations

import ipaddress
import json
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Agent, Dockerd, Scene, run, wait_until
from tests.e2e.test_services_cluster import UDP_CLIENT  # one unconnected socket: [reply, source, port]

pytestmark = pytest.mark.e2e

# Every backend container serves its hostname over HTTP on 8080 and echoes on 9000 (busybox).
BACKEND = ("sh", "-c", "mkdir -p /www && hostname > /www/index.html && (nc -ll -p 9000 -e cat &) "
                       "&& exec httpd -f -p 8080 -h /www")

# A UDP echo server run in a backend container's network namespace: answers NAME:DATA.
UDP_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5353))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(sys.argv[1].encode() + b":" + data, peer)
"""

def free_vip_range() -> str:
    """A /24 of 10.96.0.0/12 that no route of this host touches."""
    taken = [ipaddress.ip_network(r["dst"], strict=False)
             for r in json.loads(run("ip", "-j", "-4", "route", "show", "table", "all").stdout)
             if r.get("dst", "default") != "default"]
    while True:
        net = ipaddress.ip_network(f"10.{96 + secrets.randbelow(16)}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return str(net)


class World:
    """One cellgate network: backends web1..web3 (app=web), a client (app=client), an `other`
    (app=other, also a server), and a VIP range routed to a blackhole on the host."""

    def __init__(self, d: Dockerd, agent: Agent, image: str) -> None:
        self.d, self.agent = d, agent
        self.scene = Scene(d, agent, image)
        self.vips = free_vip_range()
        self.procs: list[subprocess.Popen[str]] = []
        run("ip", "route", "add", "blackhole", self.vips)
        self.net = self.scene.network()
        self.name: dict[str, str] = {}
        for key in ("web1", "web2", "web3"):
            self.backend(key)
        self.backend("other", app="other")
        self.start("client", app="client")
        for key in ("web1", "web2", "web3", "other"):
            self.ready(key)

    def vip(self, n: int) -> str:
        return str(ipaddress.ip_network(self.vips)[n])

    def start(self, key: str, app: str, cmd: tuple[str, ...] = ("sleep", "3600")) -> str:
        name = f"cg{key}{self.scene.tag}"
        self.scene.run(self.net, "-l", f"app={app}", "--hostname", key, cmd=cmd, name=name)
        self.name[key] = name
        return name

    def backend(self, key: str, app: str = "web") -> str:
        return self.start(key, app, BACKEND)

    def ip(self, key: str) -> str:
        return self.scene.ip(self.name[key], self.net)

    def endpoint_id(self, key: str) -> str:
        return str(self.d.inspect(self.name[key])["NetworkSettings"]["Networks"][self.net]["EndpointID"])

    def ready(self, key: str) -> None:
        """Labels known to the agent and the HTTP server answering straight (not through a VIP)."""
        eid = self.endpoint_id(key)
        wait_until(lambda: self.agent.json("endpoint", "get", eid)["labels"], 20, f"labels of {key}")
        wait_until(lambda: self.host_get(f"http://{self.ip(key)}:8080/")[1] == key, 20, f"{key} to serve")

    def wget(self, key: str, url: str, wait: int = 3) -> tuple[int, str, str]:
        """(exit code, body, stderr) of busybox wget in container `key`, ended after `wait` seconds
        (busybox's own `wget -T` crashes in this version)."""
        out = run("docker", "exec", self.name[key], "timeout", str(wait), "wget", "-q", "-O", "-", url,
                  check=False, env=self.d.env, timeout=wait + 20)
        return out.returncode, out.stdout.strip(), out.stderr.strip()

    def host_get(self, url: str, timeout: float = 3) -> tuple[int, str]:
        out = run("curl", "-s", "-m", str(timeout), "-o", "-", url, check=False, timeout=timeout + 10)
        return out.returncode, out.stdout.strip()

    def pid(self, key: str) -> int:
        return int(self.d.inspect(self.name[key])["State"]["Pid"])

    def in_netns(self, key: str, script: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["nsenter", "-t", str(self.pid(key)), "-n", "python3", "-c", script, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        return proc

    def services(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.agent.json("service", "list")}

    def backends_of(self, name: str) -> list[str]:
        return sorted(self.agent.json("service", "get", name)["active_backends"])

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.scene.close()
        run("ip", "route", "del", "blackhole", self.vips, check=False)


@pytest.fixture(scope="module")
def world(dockerd: Dockerd, agent: Agent, image: str) -> Iterator[World]:
    w = World(dockerd, agent, image)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def web(world: World, agent: Agent) -> Iterator[str]:
    """Service `web`: VIP.10:80 → app=web:8080; deleted afterwards, with every policy."""
    vip = world.vip(10)
    agent.cli("service", "create", "--frontend", f"{vip}:80", "--selector", "app=web", "--target-port", "8080",
              "--name", "web")
    wait_until(lambda: len(world.backends_of("web")) == 3, 20, "web with three backends")
    yield vip
    agent.cli("policy", "delete", "--all", check=False)
    agent.cli("service", "delete", "web", check=False)


def test_containers_and_the_host_reach_every_backend_through_the_vip(world: World, web: str) -> None:
    assert world.backends_of("web") == sorted(f"{world.ip(k)}:8080" for k in ("web1", "web2", "web3"))
    seen: list[str] = []
    for _ in range(60):
        code, body, err = world.wget("client", f"http://{web}/")
        assert code == 0, err
        seen.append(body)
        if set(seen) == {"web1", "web2", "web3"}:
            break
    assert set(seen) == {"web1", "web2", "web3"}, seen
    seen = []
    for _ in range(60):
        code, body = world.host_get(f"http://{web}/")
        assert code == 0, code
        seen.append(body)
        if set(seen) == {"web1", "web2", "web3"}:
            break
    assert set(seen) == {"web1", "web2", "web3"}, seen
    # a port the VIP does not serve is not translated: the host's blackhole answers at once
    assert world.host_get(f"http://{web}:81/")[0] != 0


def test_label_selected_backends_follow_docker_run_and_rm(world: World, agent: Agent, web: str) -> None:
    world.backend("web4")
    world.ready("web4")
    wait_until(lambda: f"{world.ip('web4')}:8080" in world.backends_of("web"), 20, "web4 in the service")
    seen = set()
    for _ in range(80):
        code, body, err = world.wget("client", f"http://{web}/")
        assert code == 0, err
        seen.add(body)
        if "web4" in seen:
            break
    assert "web4" in seen
    address = world.ip("web4")
    world.d("rm", "-f", world.name.pop("web4"))
    wait_until(lambda: f"{address}:8080" not in world.backends_of("web"), 20, "web4 out of the service")
    assert len(world.backends_of("web")) == 3
    for _ in range(20):  # new connections avoid it at once
        code, body, err = world.wget("client", f"http://{web}/")
        assert code == 0 and body in {"web1", "web2", "web3"}, (code, body, err)


def policy(agent: Agent, tmp_path: Path, text: str) -> None:
    """The policy becomes exactly `text` (import adds to what is there)."""
    agent.cli("policy", "delete", "--all")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    out = json.loads(agent.cli("policy", "import", str(path), "-o", "json").stdout)
    agent.cli("policy", "wait", str(out["revision"]))


def test_policy_judges_the_backend_behind_the_vip(world: World, agent: Agent, web: str, tmp_path: Path) -> None:
    # the backends accept 8080 from the client only: through the VIP the client gets in, `other` not
    policy(agent, tmp_path, """\
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")
    for _ in range(6):
        code, body, err = world.wget("client", f"http://{web}/")
        assert code == 0 and body in {"web1", "web2", "web3"}, err
    code, _, _ = world.wget("other", f"http://{web}/")
    assert code != 0  # dropped at the backend's ingress: the rule judged app=other → app=web:8080
    # the client's egress allows app=other only: the VIP (whose backends are app=web) is denied
    policy(agent, tmp_path, """\
- endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: other}}]
""")
    assert world.wget("client", f"http://{world.ip('other')}:8080/")[:2] == (0, "other")
    code, _, _ = world.wget("client", f"http://{web}/")
    assert code != 0
    # egress to the frontend's port on the backends: allowed through the VIP
    policy(agent, tmp_path, """\
- endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")
    assert world.wget("client", f"http://{web}/")[0] == 0
    assert world.wget("client", f"http://{world.ip('other')}:8080/")[0] != 0


def test_to_services_allows_the_named_services_backends_only(world: World, agent: Agent, web: str,
                                                               tmp_path: Path) -> None:
    other_vip = world.vip(11)
    agent.cli("service", "create", "--frontend", f"{other_vip}:80", "--selector", "app=other",
              "--target-port", "8080", "--name", "others")
    try:
        wait_until(lambda: len(world.backends_of("others")) == 1, 20, "others with one backend")
        assert world.wget("client", f"http://{other_vip}/")[:2] == (0, "other")
        policy(agent, tmp_path, """\
- endpointSelector: {matchLabels: {app: client}}
  egress:
  - toServices: [{k8sService: {serviceName: web, namespace: default}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")
        for _ in range(6):
            code, body, err = world.wget("client", f"http://{web}/")
            assert code == 0 and body in {"web1", "web2", "web3"}, err
        assert world.wget("client", f"http://{other_vip}/")[0] != 0  # not named
        assert world.wget("client", f"http://{world.ip('other')}:8080/")[0] != 0
        # the service's backends move: the policy follows (app=other becomes web's only backend)
        agent.cli("service", "update", "web", "--selector", "app=other", "--target-port", "8080")
        wait_until(lambda: world.backends_of("web") == [f"{world.ip('other')}:8080"], 20, "web → other")
        wait_until(lambda: world.wget("client", f"http://{web}/")[:2] == (0, "other"), 10, "web now other")
        assert world.wget("client", f"http://{world.ip('web1')}:8080/")[0] != 0  # no longer a backend
    finally:
        agent.cli("service", "update", "web", "--selector", "app=web", "--target-port", "8080", check=False)
        agent.cli("service", "delete", "others", check=False)


def test_udp_service_replies_read_as_from_the_vip(world: World, agent: Agent) -> None:
    vip = world.vip(12)
    for key in ("web1", "web2", "web3"):
        proc = world.in_netns(key, UDP_SERVER, key)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    agent.cli("service", "create", "--frontend", f"{vip}:53/udp", "--selector", "app=web", "--target-port",
              "5353", "--name", "dns")
    try:
        wait_until(lambda: len(world.backends_of("dns")) == 3, 20, "dns with three backends")
        out = run("nsenter", "-t", str(world.pid("client")), "-n", "python3", "-c", UDP_CLIENT, vip, "53", "30",
                  timeout=60)
        replies = json.loads(out.stdout)
        assert all(peer == vip and port == 53 for _, peer, port in replies), replies
        assert [data.split(":")[1] for data, _, _ in replies] == [f"ping{i}" for i in range(30)]
        assert {data.split(":")[0] for data, _, _ in replies} <= {"web1", "web2", "web3"}
    finally:
        agent.cli("service", "delete", "dns", check=False)


def test_a_service_without_backends_is_refused_at_once(world: World, agent: Agent) -> None:
    vip = world.vip(13)
    agent.cli("service", "create", "--frontend", f"{vip}:80", "--selector", "app=nobody", "--target-port", "80",
              "--name", "empty")
    try:
        assert world.backends_of("empty") == []
        started = time.monotonic()
        code, _, err = world.wget("client", f"http://{vip}/")
        assert code != 0 and "refused" in err.lower(), err
        code, _ = world.host_get(f"http://{vip}/", timeout=5)
        assert code == 7 and time.monotonic() - started < 4  # curl: failed to connect (ECONNREFUSED)
    finally:
        agent.cli("service", "delete", "empty")


class Pinger:
    """A request/response loop on one TCP connection from the host to VIP:9000 (the echo servers)."""

    def __init__(self, vip: str) -> None:
        self.sock = socket.create_connection((vip, 9000), timeout=5)
        self.peer = self.sock.getpeername()
        self.count = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        try:
            while not self.stop.is_set():
                self.sock.sendall(b"x\n")
                got = b""
                while len(got) < 2:
                    chunk = self.sock.recv(2 - len(got))
                    if not chunk:
                        raise ConnectionError("closed by the peer")
                    got += chunk
                assert got == b"x\n", got
                self.count += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


def test_agent_sigkill_and_restart_under_a_running_rr(world: World, agent: Agent) -> None:
    vip = world.vip(14)
    agent.cli("service", "create", "--frontend", f"{vip}:9000", "--selector", "app=web", "--target-port", "9000",
              "--name", "echo")
    pinger = None
    try:
        wait_until(lambda: len(world.backends_of("echo")) == 3, 20, "echo with three backends")
        pinger = Pinger(vip)
        assert pinger.peer == (vip, 9000)  # getpeername reads as the VIP
        wait_until(lambda: pinger.count > 100, 10, "the rr loop running")
        agent.signal(signal.SIGKILL)
        before = pinger.count
        wait_until(lambda: pinger.count > before + 100, 10, "rr while the agent is down")
        # the programs stay attached: new connections are balanced with the agent down
        with socket.create_connection((vip, 9000), timeout=5) as s:
            s.sendall(b"down\n")
            assert s.recv(16) == b"down\n"
        agent.start()
        assert "echo" in world.services()
        before = pinger.count
        wait_until(lambda: pinger.count > before + 100, 10, "rr after the restart")
        assert pinger.error is None, pinger.error
        with socket.create_connection((vip, 9000), timeout=5) as s:
            s.sendall(b"up\n")
            assert s.recv(16) == b"up\n"
    finally:
        if pinger is not None:
            pinger.close()
        if agent.proc is None:
            agent.start()
        agent.cli("service", "delete", "echo", check=False)
    assert pinger.error is None, pinger.error


def rest(agent: Agent, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    args = ["curl", "-s", "--unix-socket", str(agent.api), "-X", method, "-w", "\n%{http_code}",
            f"http://cellgate{path}"]
    data = None
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        data = json.dumps(body)
    out = run(*args, input=data, timeout=60)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(text) if text else None


def test_bad_input_is_refused_and_changes_nothing(world: World, agent: Agent, web: str) -> None:
    pod = str(ipaddress.ip_network(agent.v4)[200])
    backend = f"{world.ip('web1')}:8080"
    before = agent.json("service", "list")
    cases = [
        (["create", "--frontend", f"{pod}:80", "--backends", backend], "range"),
        (["create", "--frontend", f"{world.vip(20)}:0", "--backends", backend], "port"),
        (["create", "--frontend", f"{world.vip(20)}:70000", "--backends", backend], "port"),
        (["create", "--frontend", f"{web}:80", "--backends", backend, "--name", "dup"], "frontend"),
        (["create", "--frontend", f"{world.vip(20)}:80", "--selector", "app in (web)", "--target-port", "80"],
         "selector"),
        (["create", "--frontend", f"{world.vip(20)}:80", "--selector", "app=web"], "target"),
        (["create", "--frontend", f"{world.vip(20)}:80/sctp", "--backends", backend], "tcp"),
        (["create", "--frontend", f"{world.vip(20)}:80", "--backends", f"{backend},{backend}"], "twice"),
        (["create", "--frontend", f"{world.vip(20)}:80", "--backends", backend, "--selector", "app=web",
          "--target-port", "80"], "backends"),
        (["create", "--frontend", "127.0.0.1:80", "--backends", backend], "loopback"),
        (["update", "nosuch", "--backends", backend], "nosuch"),
        (["delete", "nosuch"], "nosuch"),
    ]
    for args, fragment in cases:
        out = agent.cli("service", *args, check=False)
        assert out.returncode == 2 and fragment in out.stderr.lower(), (args, out.returncode, out.stderr)
    many = [f"198.18.{i // 250}.{i % 250 + 1}:80" for i in range(10_000)]
    code, body = rest(agent, "POST", "/v1/services", {"frontend": f"{world.vip(20)}:80", "backends": many})
    assert code == 400 and "4096" in json.dumps(body).replace(",", ""), (code, body)
    code, body = rest(agent, "POST", "/v1/services", {"frontend": f"{world.vip(20)}:80", "backends": "x"})
    assert code == 400, (code, body)
    code, body = rest(agent, "PUT", "/v1/services/web", {"frontend": f"{web}:80", "backends": [backend] * 2})
    assert code == 400, (code, body)
    after = agent.json("service", "list")
    assert after == before
    for _ in range(3):  # and the service still balances as before
        code, body, err = world.wget("client", f"http://{web}/")
        assert code == 0 and body in {"web1", "web2", "web3"}, err
