"""Load-balanced services across the nodes of a simulated cluster (real etcd, agents in node
namespaces, VXLAN): a service created on one node is balanced by every node to local and remote
backends at the socket level, label-selected backends follow endpoints on any node, a client
outside the cluster is balanced by packet with direct server return (the backend's node answers
it straight, which a packet capture at the client proves by the replies' source MACs), UDP both
ways, refusal without backends, and the service living under its owner's lease."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.test_cluster import visible_everywhere
from tests.simcluster import CELLGATE, UNDERLAY, Cluster, SimEndpoint, SimNode, sh, wait_until

pytestmark = pytest.mark.e2e

VIPS = "10.96.215.0/24"  # routed to a blackhole in every namespace here before anything is balanced
CLIENT = str(UNDERLAY[200])

SERVER = r"""
import http.server, socket, sys, threading
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = name.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 53))
def echo():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(name.encode() + b":" + data, peer)
threading.Thread(target=echo, daemon=True).start()
class Dual(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
s = Dual(("::", 80), H)
print("ready", flush=True)
s.serve_forever()
"""

UDP_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
out = []
for i in range(int(sys.argv[3])):
    s.sendto(b"ping%d" % i, (sys.argv[1], int(sys.argv[2])))
    data, peer = s.recvfrom(2048)
    out.append([data.decode(), peer[0], peer[1]])
print(json.dumps(out))
"""

# Every IPv4 frame with source `vip` that reaches the client's interface: (source MAC, TCP/UDP
# destination port). Prints "ready" once bound, then one JSON line per frame.
SNIFFER = r"""
import json, socket, struct, sys
vip = socket.inet_aton(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((sys.argv[2], 0))
print("ready", flush=True)
while True:
    frame = s.recv(65535)
    ip = frame[14:]
    if ip[12:16] != vip:
        continue
    l4 = ip[(ip[0] & 0xF) * 4:]
    print(json.dumps([frame[6:12].hex(":"), struct.unpack("!H", l4[2:4])[0]]), flush=True)
"""


class Scene:
    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client_ns = f"cg{c.tag}x"

    def backend(self, node: SimNode, name: str, app: str = "web", ipv6: bool = True) -> SimEndpoint:
        ep = self.c.endpoint(node, name, {"app": app}, ipv6=ipv6)
        proc = subprocess.Popen(["ip", "netns", "exec", ep.netns, "python3", "-c", SERVER, name],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        self.procs.append(proc)
        return ep

    def external_client(self) -> None:
        """A host outside the cluster on the underlay, routing the VIPs via node 1."""
        ns, inner, outer = self.client_ns, f"cg{self.c.tag}xa", f"cg{self.c.tag}xb"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.c.ul)
        sh("ip", "-n", ns, "addr", "add", f"{CLIENT}/24", "dev", inner)
        sh("ip", "-n", ns, "link", "set", inner, "up")
        sh("ip", "-n", self.c.ul, "link", "set", outer, "master", self.c.bridge)
        sh("ip", "-n", self.c.ul, "link", "set", outer, "up")
        sh("ip", "-n", ns, "route", "add", "blackhole", VIPS)
        sh("ip", "-n", ns, "route", "replace", VIPS, "via", self.c.node(1).address)

    def get(self, ns: str, url: str, local_port: int = 0, timeout: float = 3) -> tuple[int, str]:
        """(curl exit code, body) of one GET from namespace `ns`."""
        args = ["ip", "netns", "exec", ns, "curl", "-s", "-m", str(timeout), "-o", "-"]
        if local_port:
            args += ["--local-port", str(local_port)]
        out = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout + 5, check=False)
        return out.returncode, out.stdout

    def udp(self, ns: str, vip: str, count: int = 6) -> list[list[object]]:
        out = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", UDP_CLIENT, vip, "53", str(count)],
                             capture_output=True, text=True, timeout=20, check=True)
        return list(json.loads(out.stdout))

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        sh("ip", "netns", "del", self.client_ns, check=False)


def mac(c: Cluster, node: SimNode) -> str:
    out = sh("ip", "-n", node.netns, "-j", "link", "show", "eth0").stdout
    return str(json.loads(out)[0]["address"])


@pytest.fixture(scope="module")
def lbc() -> Iterator[tuple[Cluster, Scene, dict[str, SimEndpoint]]]:
    c = Cluster(3, "vxlan", lease_ttl=6)
    c.up()
    scene = Scene(c)
    try:
        for n in c.nodes:
            sh("ip", "-n", n.netns, "route", "add", "blackhole", VIPS)
        scene.external_client()
        eps = {"w1": scene.backend(c.node(1), "w1"), "w2": scene.backend(c.node(2), "w2"),
               "w3": scene.backend(c.node(3), "w3"),
               "c3": c.endpoint(c.node(3), "c3", {"app": "client"})}
        visible_everywhere(c, *eps.values())
        yield c, scene, eps
    finally:
        scene.close()
        c.down()


def services(c: Cluster, node: SimNode) -> dict[str, dict[str, object]]:
    return {s["name"]: s for s in c.cli(node, "service", "list")}


def shared(c: Cluster, name: str, backends: int) -> None:
    for n in c.nodes:
        wait_until(lambda n=n: len(services(c, n).get(name, {}).get("active_backends", [])) == backends, 15,
                   f"{name} with {backends} backends on {n.name}")


@pytest.fixture
def web(lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]]) -> Iterator[str]:
    c, _, _ = lbc
    c.cli(c.node(1), "service", "create", "--frontend", "10.96.215.10:80", "--selector", "app=web",
          "--target-port", "80", "--name", "web")
    c.cli(c.node(1), "service", "create", "--frontend", "10.96.215.10:53/udp", "--selector", "app=web",
          "--target-port", "53", "--name", "web-dns")
    shared(c, "web", 3)
    shared(c, "web-dns", 3)
    yield "10.96.215.10"
    for name in ("web", "web-dns"):
        c.cli(c.node(1), "service", "delete", name, check=False)


def test_every_node_balances_to_local_and_remote_backends(lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]],
                                                          web: str) -> None:
    c, scene, eps = lbc
    for n in c.nodes:
        svc = services(c, n)["web"]
        assert svc["node"] == c.node(1).name and sorted(svc["active_backends"]) == sorted(
            f"{eps[k].ipv4}:80" for k in ("w1", "w2", "w3"))
    seen = set()
    for _ in range(60):
        code, body = scene.get(eps["c3"].netns, f"http://{web}/")
        assert code == 0, code
        seen.add(body)
        if seen == {"w1", "w2", "w3"}:
            break
    assert seen == {"w1", "w2", "w3"}
    # a node's own processes are served too (its network namespace is the agent's)
    code, body = scene.get(c.node(2).netns, f"http://{web}/")
    assert code == 0 and body in {"w1", "w2", "w3"}


def test_label_selected_backends_follow_endpoints_on_other_nodes(
        lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]], web: str) -> None:
    c, scene, eps = lbc
    extra = scene.backend(c.node(3), "w4")
    shared(c, "web", 4)
    assert f"{extra.ipv4}:80" in services(c, c.node(1))["web"]["active_backends"]
    c.remove_endpoint(extra)
    shared(c, "web", 3)
    for _ in range(20):
        code, body = scene.get(eps["c3"].netns, f"http://{web}/")
        assert code == 0 and body != "w4"


def test_external_client_gets_direct_server_return(lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]],
                                                   web: str) -> None:
    c, scene, _ = lbc
    sniffer = subprocess.Popen(["ip", "netns", "exec", scene.client_ns, "python3", "-c", SNIFFER, web,
                                f"cg{c.tag}xa"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
        answered: dict[int, str] = {}
        for i in range(30):
            port = 41000 + i
            code, body = scene.get(scene.client_ns, f"http://{web}/", local_port=port)
            assert code == 0, f"request {i}: curl {code}"
            answered[port] = body
            if len(set(answered.values())) == 3 and i >= 8:
                break
        assert set(answered.values()) == {"w1", "w2", "w3"}
    finally:
        sniffer.kill()
        lines = sniffer.communicate()[0].splitlines()
    macs: dict[int, set[str]] = {}
    for line in lines:
        src_mac, dport = json.loads(line)
        macs.setdefault(dport, set()).add(src_mac)
    node_of = {"w1": c.node(1), "w2": c.node(2), "w3": c.node(3)}
    for port, body in answered.items():
        # every reply came from the backend's own node: the balancing node 1 never carried one back
        assert macs.get(port) == {mac(c, node_of[body])}, (port, body, macs.get(port))
    counters = {x["name"]: x["packets"] for x in c.cli(c.node(1), "status")["counters"]}
    assert counters.get("CG_OK_LB_DSR", 0) > 0 and counters.get("CG_OK_LB", 0) > 0


def test_packet_level_translations_are_flows(lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]], web: str) -> None:
    """While someone follows, each new flow node 1 translates for an outside client is a TRANSLATED
    flow (Hubble's verdict 7) to the backend it chose, named by the service."""
    c, scene, eps = lbc
    node = c.node(1)
    follower = subprocess.Popen([CELLGATE, "observe", "--socket", node.api_socket, "-f", "-o", "json",
                                 "--verdict", "TRANSLATED"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
    try:
        wait_until(lambda: c.cli(node, "status")["flows"]["followers"] >= 1, 10, "the follower")
        code, body = scene.get(scene.client_ns, f"http://{web}/", local_port=42000)
        assert code == 0 and body in ("w1", "w2", "w3")
        assert follower.stdout is not None
        flow = json.loads(follower.stdout.readline())["flow"]
    finally:
        follower.kill()
        follower.wait()
    assert flow["verdict"] == "TRANSLATED" and flow["event_type"] == {"type": 5}
    assert flow["IP"]["destination"] == eps[body].ipv4 and flow["l4"]["TCP"]["source_port"] == 42000
    assert flow["node_name"] == node.name and flow["destination_service"]["name"]


def test_udp_service_replies_from_the_vip(lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]], web: str) -> None:
    _, scene, eps = lbc
    for ns in (eps["c3"].netns, scene.client_ns):  # the socket path, and the packet path with DSR
        replies = scene.udp(ns, web, 12)
        assert all(peer == web and port == 53 for _, peer, port in replies), replies
        assert all(str(data).split(":")[1] == f"ping{i}" for i, (data, _, _) in enumerate(replies))
        assert {str(data).split(":")[0] for data, _, _ in replies} <= {"w1", "w2", "w3"}


def test_no_backends_is_refused_at_once(lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]]) -> None:
    c, scene, eps = lbc
    c.cli(c.node(1), "service", "create", "--frontend", "10.96.215.20:80", "--selector", "app=nobody",
          "--target-port", "80", "--name", "empty")
    try:
        shared(c, "empty", 0)
        for ns, exit_code in ((eps["c3"].netns, 7), (scene.client_ns, 7)):  # refused / no route (ICMP)
            started = time.monotonic()
            code, _ = scene.get(ns, "http://10.96.215.20/", timeout=5)
            assert code == exit_code and time.monotonic() - started < 2, (ns, code)
    finally:
        c.cli(c.node(1), "service", "delete", "empty")


def test_a_service_lives_under_its_owners_lease(lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]]) -> None:
    c, scene, eps = lbc
    n1 = c.node(1)
    c.cli(n1, "service", "create", "--frontend", "10.96.215.30:80", "--backends",
          f"{eps['w2'].ipv4}:80", "--name", "owned")
    shared(c, "owned", 1)
    c.kill_agent(n1, signal.SIGKILL)
    try:
        for n in (c.node(2), c.node(3)):  # the lease expires: the peers stop balancing it
            wait_until(lambda n=n: "owned" not in services(c, n), 30, f"owned gone from {n.name}")
        code, _ = scene.get(eps["c3"].netns, "http://10.96.215.30/", timeout=3)
        assert code != 0
    finally:
        c.start_agent(n1)
    shared(c, "owned", 1)  # the owner kept it in its state and publishes it again
    code, body = scene.get(eps["c3"].netns, "http://10.96.215.30/")
    assert code == 0 and body == "w2"
    c.cli(n1, "service", "delete", "owned")
    for n in c.nodes:
        wait_until(lambda n=n: "owned" not in services(c, n), 15, f"owned deleted on {n.name}")


def test_ipv6_service_across_nodes(lbc: tuple[Cluster, Scene, dict[str, SimEndpoint]]) -> None:
    c, scene, _ = lbc
    for n in c.nodes:
        sh("ip", "-n", n.netns, "-6", "route", "add", "blackhole", "fd96:215::/64")
    b2 = scene.backend(c.node(2), "v62", "web6", ipv6=True)
    b1 = scene.backend(c.node(1), "v61", "web6", ipv6=True)
    client = c.endpoint(c.node(3), "v6c", {"app": "client"}, ipv6=True)
    sh("ip", "-n", client.netns, "-6", "route", "add", "blackhole", "fd96:215::/64", "metric", "4000")
    try:
        c.cli(c.node(3), "service", "create", "--frontend", "[fd96:215::10]:80", "--selector", "app=web6",
              "--target-port", "80", "--name", "web6")
        shared(c, "web6", 2)
        assert sorted(services(c, c.node(1))["web6"]["active_backends"]) == sorted(
            f"[{b.ipv6}]:80" for b in (b1, b2))
        seen = set()
        for _ in range(40):
            code, body = scene.get(client.netns, "http://[fd96:215::10]/")
            assert code == 0, code
            seen.add(body)
            if seen == {"v61", "v62"}:
                break
        assert seen == {"v61", "v62"}
    finally:
        c.cli(c.node(3), "service", "delete", "web6", check=False)
        for ep in (b1, b2, client):
            c.remove_endpoint(ep)
