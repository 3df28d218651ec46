"""A simulated cluster (tests/simcluster.py) with real etcd, real agents in node namespaces and real
CNI endpoints: cross-node traffic in both tunnel modes, identities shared by etcd, policy by identity
across nodes, entities, and policy trace agreeing with the traffic."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Dockerd
from tests.simcluster import CELLGATE, Cluster, SimEndpoint, SimNode, wait_until

SERVER = r"""
import socket, sys, threading
def tcp(port, family, addr):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.sendall(b"hello %d" % port); c.close()
def udp(port, family, addr):
    s = socket.socket(family, socket.SOCK_DGRAM); s.bind((addr, port))
    while True:
        data, peer = s.recvfrom(2048); s.sendto(b"echo " + data, peer)
for port in (80, 81):
    threading.Thread(target=tcp, args=(port, socket.AF_INET, "0.0.0.0"), daemon=True).start()
    threading.Thread(target=tcp, args=(port, socket.AF_INET6, "::"), daemon=True).start()
threading.Thread(target=udp, args=(53, socket.AF_INET, "0.0.0.0"), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = r"""
import socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=1.5); print(s.recv(100).decode())
    else:
        s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(1.5); s.sendto(b"x", (host, port))
        print(s.recv(100).decode())
except OSError as exc:
    print("failed", exc); sys.exit(1)
"""


class Scene:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.servers: list[subprocess.Popen[bytes]] = []

    def endpoint(self, node: SimNode, name: str, app: str) -> SimEndpoint:
        ep = self.c.endpoint(node, name, {"app": app})
        proc = subprocess.Popen(["ip", "netns", "exec", ep.netns, "python3", "-c", SERVER],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        self.servers.append(proc)
        return ep

    def connect(self, src: SimEndpoint, address: str, port: int = 80, proto: str = "tcp") -> bool:
        out = self.c.run(src, "python3", "-c", CLIENT, address, str(port), proto)
        return out.returncode == 0 and (f"hello {port}" in out.stdout or "echo x" in out.stdout)

    def close(self) -> None:
        for p in self.servers:
            p.kill()
            p.wait()


# The backend accepts TCP/80 from the frontend only.
BACKEND_TCP80_FROM_FRONTEND: list[dict[str, object]] = [
    {"labels": [{"key": "name", "value": "cg-l4"}], "endpointSelector": {"matchLabels": {"app": "backend"}},
     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                  "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}]


def policy(c: Cluster, node: SimNode, rules: list[dict[str, object]], tmp: Path) -> None:
    path = tmp / "policy.json"
    path.write_text(json.dumps(rules))
    c.cli(node, "policy", "import", str(path))


def clear_policy(c: Cluster) -> None:
    for n in c.nodes:
        c.cli(n, "policy", "delete", "--all")


def visible_everywhere(c: Cluster, *eps: SimEndpoint) -> None:
    """Every endpoint's address is in every other node's kernel ipcache."""
    for ep in eps:
        for n in c.nodes:
            if n.name != ep.node:
                wait_until(lambda n=n, ep=ep: f"{ep.ipv4}/32" in c.ipcache(n), 15, f"{ep.ipv4} on {n.name}")


@pytest.fixture(scope="module")
def vx() -> Iterator[tuple[Cluster, Scene, dict[str, SimEndpoint]]]:
    c = Cluster(3, "vxlan", lease_ttl=10)
    c.up()
    scene = Scene(c)
    try:
        eps = {
            "fe1": scene.endpoint(c.node(1), "fe1", "frontend"),
            "be2": scene.endpoint(c.node(2), "be2", "backend"),
            "ot3": scene.endpoint(c.node(3), "ot3", "other"),
            "fe3": scene.endpoint(c.node(3), "fe3", "frontend"),
        }
        visible_everywhere(c, *eps.values())
        yield c, scene, eps
    finally:
        scene.close()
        c.down()


def test_nodes_see_each_other_and_share_identities(vx: tuple[Cluster, Scene, dict[str, SimEndpoint]]) -> None:
    c, _, eps = vx
    for n in c.nodes:
        nodes = c.cli(n, "node", "list")
        assert sorted(x["name"] for x in nodes) == sorted(m.name for m in c.nodes)
        assert [x["name"] for x in nodes if x["local"]] == [n.name]
        st = c.cli(n, "status")["kvstore"]
        assert st["connected"] and st["synced"] and st["peers"] == 2 and 0 < st["lease_ttl_left"] <= 10
    numbers = {}
    for n in c.nodes:
        for ident in c.cli(n, "identity", "list"):
            if not ident["reserved"]:
                numbers.setdefault(tuple(ident["labels"]), set()).add(ident["id"])
    assert numbers[("cni:app=frontend",)] and len(numbers[("cni:app=frontend",)]) == 1  # one number everywhere
    assert len({next(iter(v)) for v in numbers.values()}) == len(numbers)  # distinct label sets, distinct numbers
    fe = next(i for i in c.cli(c.node(2), "identity", "list") if i["labels"] == ["cni:app=frontend"])
    assert fe["nodes"] == sorted([c.node(1).name, c.node(3).name])  # where it is used
    cache = c.ipcache(c.node(2))
    assert cache[f"{eps['fe1'].ipv4}/32"]["identity"] == fe["id"]
    assert cache[f"{eps['fe1'].ipv4}/32"]["tunnel_endpoint"] == c.node(1).address
    assert cache[f"{c.node(1).address}/32"]["labels"] == ["reserved:remote-node"]


def test_cross_node_traffic_over_vxlan(vx: tuple[Cluster, Scene, dict[str, SimEndpoint]]) -> None:
    c, scene, eps = vx
    fe1, be2 = eps["fe1"], eps["be2"]
    assert c.ping(fe1, be2.ipv4) and c.ping(be2, fe1.ipv4)
    assert c.ping(fe1, be2.ipv6)
    assert scene.connect(fe1, be2.ipv4, 80) and scene.connect(be2, fe1.ipv4, 81)
    assert scene.connect(fe1, be2.ipv6, 80)
    assert scene.connect(fe1, be2.ipv4, 53, "udp")


def test_policy_by_identity_across_nodes(vx: tuple[Cluster, Scene, dict[str, SimEndpoint]], tmp_path: Path) -> None:
    c, scene, eps = vx
    fe1, be2, ot3, fe3 = eps["fe1"], eps["be2"], eps["ot3"], eps["fe3"]
    rules = BACKEND_TCP80_FROM_FRONTEND
    try:
        for n in c.nodes:
            policy(c, n, rules, tmp_path)
        cases = [(fe1, be2, 80, True), (fe3, be2, 80, True), (fe1, be2, 81, False), (ot3, be2, 80, False)]
        for src, dst, port, allowed in cases:
            assert scene.connect(src, dst.ipv4, port) == allowed, (src.name, dst.name, port)
            # policy trace on the receiving node agrees with the traffic
            dst_node = next(n for n in c.nodes if n.name == dst.node)
            labels = [f"app={src.labels['app']}"]
            out = c.cli(dst_node, "policy", "trace", "--src", *labels, "--dst", "app=backend",
                        "--dport", f"{port}/tcp")
            assert out["verdict"] == ("ALLOWED" if allowed else "DENIED"), out
        # the reply direction of an allowed flow passes; a new flow backend -> frontend still works
        # (frontend has no policy), and a deny rule across nodes wins over an allow
        assert scene.connect(be2, fe1.ipv4, 80)
        deny = [{"labels": [{"key": "name", "value": "cg-deny"}],
                 "endpointSelector": {"matchLabels": {"app": "frontend"}},
                 "ingress": [{"fromEntities": ["all"]}],
                 "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "backend"}}]}]}]
        for n in c.nodes:
            policy(c, n, deny, tmp_path)
        assert not scene.connect(be2, fe1.ipv4, 80)
        assert scene.connect(ot3, fe1.ipv4, 80)
        assert scene.connect(fe1, be2.ipv4, 80)  # fe1's egress is not affected; be2's reply is a reply
    finally:
        clear_policy(c)


def test_flows_of_every_node_merged_by_one_observe(vx: tuple[Cluster, Scene, dict[str, SimEndpoint]],
                                                   tmp_path: Path) -> None:
    """Each agent serves its own flows; `observe --node` reads the others and merges them by time, each
    flow naming the node that saw it, with the cluster-wide identities' labels on both sides."""
    c, scene, eps = vx
    be2, ot3 = eps["be2"], eps["ot3"]
    rules = BACKEND_TCP80_FROM_FRONTEND
    try:
        for n in c.nodes:
            policy(c, n, rules, tmp_path)
        assert not scene.connect(ot3, be2.ipv4, 80)  # dropped on node 2, the receiver
        n1, n2, n3 = c.node(1), c.node(2), c.node(3)
        cmd = [CELLGATE, "observe", "--socket", n1.api_socket, "--node", n2.api_socket, "--node", n3.api_socket,
               "--last", "500", "-o", "json", "--verdict", "DROPPED", "--from-label", "app=other"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
        merged = [json.loads(line) for line in out.stdout.splitlines()]
        assert merged and [m["time"] for m in merged] == sorted(m["time"] for m in merged)
        assert {m["node_name"] for m in merged} == {n2.name}  # only the receiver's policy dropped it
        drop = merged[-1]["flow"]
        assert drop["IP"] == {"source": ot3.ipv4, "destination": be2.ipv4, "ipVersion": "IPv4"}
        assert "cni:app=other" in drop["source"]["labels"] and "cni:app=backend" in drop["destination"]["labels"]
        # node 1 alone has none of them; the merge is what shows them
        alone = subprocess.run(cmd[:4] + cmd[8:], capture_output=True, text=True, check=True, timeout=60)
        assert alone.stdout.strip() == ""
        table = subprocess.run([*cmd[:8], "-o", "table", "--verdict", "DROPPED"], capture_output=True, text=True,
                               check=True, timeout=60).stdout.splitlines()
        assert table[0].split()[:2] == ["TIMESTAMP", "NODE"] and any(n2.name in row for row in table[1:])
    finally:
        clear_policy(c)


def test_egress_policy_and_trace_by_address_across_nodes(vx: tuple[Cluster, Scene, dict[str, SimEndpoint]],
                                                         tmp_path: Path) -> None:
    """Egress is judged on the sender's node, ingress on the receiver's; `policy trace` given the
    two addresses resolves the remote one through the ipcache (its cluster identity) and agrees."""
    c, scene, eps = vx
    fe1, be2, ot3, fe3 = eps["fe1"], eps["be2"], eps["ot3"], eps["fe3"]
    rules = [{"labels": [{"key": "name", "value": "cg-egr"}], "endpointSelector": {"matchLabels": {"app": "frontend"}},
              "egress": [{"toEndpoints": [{"matchLabels": {"app": "backend"}}],
                          "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]},
             {"labels": [{"key": "name", "value": "cg-ing"}], "endpointSelector": {"matchLabels": {"app": "backend"}},
              "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}]}],
              "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "other"}}],
                               "toPorts": [{"ports": [{"port": "81", "protocol": "TCP"}]}]}]}]
    try:
        for n in c.nodes:
            policy(c, n, rules, tmp_path)
        node = {n.name: n for n in c.nodes}
        cases = [(fe1, be2, 80, True), (fe1, be2, 81, False), (fe1, ot3, 80, False), (fe3, be2, 80, True),
                 (ot3, be2, 80, False), (ot3, be2, 81, False), (be2, fe1, 80, True), (be2, ot3, 81, True)]
        for src, dst, port, allowed in cases:
            assert scene.connect(src, dst.ipv4, port) == allowed, (src.name, dst.name, port)
            # both nodes' traces: the sender's judges egress, the receiver's ingress; a flow passes
            # when neither denies
            verdicts = []
            for where in {src.node, dst.node}:
                out = c.cli(node[where], "policy", "trace", "--src-ip", src.ipv4, "--dst-ip", dst.ipv4,
                            "--dport", f"{port}/tcp")
                assert out["verdict"] in ("ALLOWED", "DENIED"), out
                verdicts.append(out["verdict"] == "ALLOWED")
            assert all(verdicts) == allowed, (src.name, dst.name, port, verdicts)
    finally:
        clear_policy(c)


def test_cidr_rules_never_select_cluster_endpoints(vx: tuple[Cluster, Scene, dict[str, SimEndpoint]],
                                                   tmp_path: Path) -> None:
    """A CIDR that spans the cluster's ranges selects no endpoint of the cluster (as Cilium): they
    keep their own identity; the CIDR has its own (node-local) one in the ipcache next to them."""
    c, scene, eps = vx
    fe1, be2 = eps["fe1"], eps["be2"]
    wide = str(ipaddress.ip_network(f"{be2.ipv4}/8", strict=False))
    rules = [{"labels": [{"key": "name", "value": "cg-cidr"}], "endpointSelector": {"matchLabels": {"app": "frontend"}},
              "egress": [{"toEntities": ["cluster"]}],
              "egressDeny": [{"toCIDR": [wide]}]}]
    try:
        for n in c.nodes:
            policy(c, n, rules, tmp_path)
        node1 = c.node(1)
        cache = c.ipcache(node1)
        assert cache[wide]["identity"] >= (1 << 24) + 1  # the CIDR's own, node-local identity
        assert cache[f"{be2.ipv4}/32"]["identity"] < 1 << 24  # be2 keeps its cluster identity
        assert scene.connect(fe1, be2.ipv4, 80)
        out = c.cli(node1, "policy", "trace", "--src-ip", fe1.ipv4, "--dst-ip", be2.ipv4, "--dport", "80/tcp")
        assert out["verdict"] == "ALLOWED", out
    finally:
        clear_policy(c)


def test_entities_remote_node_and_cluster(vx: tuple[Cluster, Scene, dict[str, SimEndpoint]],
                                          tmp_path: Path) -> None:
    c, scene, eps = vx
    be2 = eps["be2"]
    node1 = c.node(1)

    def from_node1() -> bool:
        out = subprocess.run(["ip", "netns", "exec", node1.netns, "python3", "-c", CLIENT, be2.ipv4, "80", "tcp"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.returncode == 0

    try:
        assert from_node1()  # no policy yet
        only_cluster = [{"labels": [{"key": "name", "value": "cg-ent"}],
                         "endpointSelector": {"matchLabels": {"app": "backend"}},
                         "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}]}]}]
        for n in c.nodes:
            policy(c, n, only_cluster, tmp_path)
        assert not from_node1()  # a remote node is not a frontend
        assert scene.connect(eps["fe1"], be2.ipv4, 80)
        remote = [{"labels": [{"key": "name", "value": "cg-ent2"}],
                   "endpointSelector": {"matchLabels": {"app": "backend"}},
                   "ingress": [{"fromEntities": ["remote-node"]}]}]
        for n in c.nodes:
            policy(c, n, remote, tmp_path)
        assert from_node1()
        clear_policy(c)
        cluster = [{"labels": [{"key": "name", "value": "cg-ent3"}],
                    "endpointSelector": {"matchLabels": {"app": "backend"}},
                    "ingress": [{"fromEntities": ["cluster"]}]}]
        for n in c.nodes:
            policy(c, n, cluster, tmp_path)
        assert scene.connect(eps["ot3"], be2.ipv4, 80) and from_node1()
    finally:
        clear_policy(c)


def test_native_routing(tmp_path: Path) -> None:
    c = Cluster(2, "disabled", lease_ttl=10)
    c.up()
    scene = Scene(c)
    try:
        a = scene.endpoint(c.node(1), "na", "frontend")
        b = scene.endpoint(c.node(2), "nb", "backend")
        visible_everywhere(c, a, b)
        assert c.ping(a, b.ipv4) and c.ping(b, a.ipv4)
        assert scene.connect(a, b.ipv4, 80) and scene.connect(a, b.ipv4, 53, "udp")
        rules = [{"labels": [{"key": "name", "value": "cg-nat"}],
                  "endpointSelector": {"matchLabels": {"app": "backend"}},
                  "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "other"}}]}]}]
        policy(c, c.node(2), rules, tmp_path)
        assert not scene.connect(a, b.ipv4, 80)  # identity from the ipcache: frontend is not other
        routes = subprocess.run(["ip", "-n", c.node(1).netns, "route"], capture_output=True, text=True,
                                check=True).stdout
        assert f"{c.node(2).ipv4_range} via {c.node(2).address}" in routes
    finally:
        scene.close()
        c.down()


def test_the_hosts_docker_joins_as_a_node(dockerd: Dockerd, image: str) -> None:
    c = Cluster(1, "vxlan", lease_ttl=10, docker_node=True, docker_host=f"unix://{dockerd.sock}", image=image)
    c.up()
    try:
        ep = c.endpoint(c.node(1), "dk", {"app": "client"})
        host = c.node(0)
        wait_until(lambda: f"{ep.ipv4}/32" in c.ipcache(host), 15, "the CNI endpoint on the host node")
        container = c.docker_container_ip()
        wait_until(lambda: f"{container}/32" in c.ipcache(c.node(1)), 15, "the Docker container on node 1")
        assert c.ping(ep, container)
        out = c.docker("exec", f"cg{c.tag}d1", "ping", "-c", "1", "-W", "2", ep.ipv4, check=False)
        assert out.returncode == 0, out.stdout
        labels = {tuple(i["labels"]) for i in c.cli(c.node(1), "identity", "list")}
        assert ("container:app=docker",) in labels  # Docker's labels, known on a CNI node
    finally:
        c.down()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"cgxcg{c.tag}" not in links  # the host node's tunnel device went with it
