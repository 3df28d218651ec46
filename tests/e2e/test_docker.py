"""Docker drives cellgate: networks, containers, addresses and connectivity, for real."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.harness import Agent, Dockerd, Scene, run, wait_until

pytestmark = pytest.mark.e2e


def subnets(d: Dockerd, net: str) -> list[dict[str, str]]:
    return d.inspect(net)["IPAM"]["Config"]


def test_network_without_subnet_draws_from_the_host_range(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    (cfg,) = subnets(scene.d, net)
    subnet = ipaddress.ip_network(cfg["Subnet"])
    assert subnet.subnet_of(ipaddress.ip_network(agent.v4))
    assert cfg["Gateway"] == str(subnet.network_address + 1)
    # the gateway is a host address, reserved in IPAM, and the network is known to the agent
    assert (cfg["Gateway"], "gateway", "") in agent.allocations()
    assert any(n["subnets"] == [cfg["Subnet"]] for n in agent.json("network", "list"))
    out = run("ip", "-o", "addr", "show", "dev", f"cg_{agent.name}").stdout
    assert f"{cfg['Gateway']}/32" in out


def test_three_containers_talk_pairwise_and_with_the_host(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    names = [scene.server(net) for _ in range(3)]
    ips = {c: scene.ip(c, net) for c in names}
    assert len(set(ips.values())) == 3
    for src in names:
        for dst in names:
            if src == dst:
                continue
            ping = scene.exec(src, "ping", "-c", "1", "-W", "2", ips[dst])
            assert "ttl=63" in ping.stdout  # one routed hop: the eBPF redirect, not a bridge
            assert f"hello from {scene.d.inspect(dst)['Config']['Hostname']}" in scene.tcp(src, ips[dst])
    for c, ip in ips.items():
        run("ping", "-c", "1", "-W", "2", ip)  # host -> container
        answer = wait_until(lambda ip=ip: run("nc", "-w", "2", ip, "8080", check=False, input="").stdout, 10, "tcp")
        assert "hello from" in answer
        gw = subnets(scene.d, net)[0]["Gateway"]
        scene.exec(c, "ping", "-c", "1", "-W", "2", gw)  # container -> host (its gateway)
    eps = agent.endpoints()
    assert sorted(e["ipv4"].split("/")[0] for e in eps) == sorted(ips.values())
    assert all(e["state"] == "joined" for e in eps)
    counters = {c["name"]: c["packets"] for c in agent.json("status")["counters"]}
    assert counters.get("CG_OK_LOCAL", 0) > 0 and counters.get("CG_OK_ARP", 0) > 0


def test_dual_stack_network(scene: Scene, agent: Agent) -> None:
    net = scene.network("--ipv6")
    cfgs = {ipaddress.ip_network(c["Subnet"]).version: c for c in subnets(scene.d, net)}
    assert ipaddress.ip_network(cfgs[6]["Subnet"]).subnet_of(ipaddress.ip_network(agent.v6))
    a, b = scene.server(net), scene.run(net)
    a6, b6 = scene.ip(a, net, v6=True), scene.ip(b, net, v6=True)
    assert a6 and b6 and a6 != b6
    assert "ttl=63" in scene.exec(b, "ping", "-6", "-c", "1", "-W", "2", a6).stdout
    run("ping", "-6", "-c", "1", "-W", "2", a6)
    gateway6 = cfgs[6]["Gateway"].split("/")[0]  # Docker 20.10 shows the IPv6 gateway with its prefix
    scene.exec(b, "ping", "-6", "-c", "1", "-W", "2", gateway6)
    assert f"default via {gateway6}" in scene.exec(b, "ip", "-6", "route").stdout
    assert "hello from" in scene.tcp(b, a6)
    ep = next(e for e in agent.endpoints() if e["ipv6"].startswith(a6 + "/"))
    assert ep["ipv4"].split("/")[0] == scene.ip(a, net)


def test_explicit_subnet_range_gateway_and_aux_address(scene: Scene, agent: Agent) -> None:
    base = ipaddress.ip_network(agent.v4)
    subnet = list(base.subnets(new_prefix=24))[7]
    hosts = list(subnet.hosts())
    iprange = ipaddress.ip_network(f"{hosts[63]}/28", strict=False)
    gateway, aux = hosts[9], next(iter(iprange.hosts()))
    net = scene.network("--subnet", str(subnet), "--ip-range", str(iprange), "--gateway", str(gateway),
                        "--aux-address", f"router={aux}")
    (cfg,) = subnets(scene.d, net)
    assert cfg["Gateway"] == str(gateway)
    got = [ipaddress.ip_address(scene.ip(scene.run(net), net)) for _ in range(3)]
    assert all(ip in iprange for ip in got)
    assert aux not in got and gateway not in got
    kinds = {a: k for a, k, _ in agent.allocations()}
    assert kinds[str(gateway)] == "gateway" and kinds[str(aux)] == "aux"
    assert str(subnet.network_address + 1) not in kinds  # the automatic gateway gave way to --gateway


def test_static_ip_is_honoured_and_bad_ones_refused(scene: Scene, agent: Agent) -> None:
    subnet = list(ipaddress.ip_network(agent.v4).subnets(new_prefix=24))[11]
    net = scene.network("--subnet", str(subnet))  # Docker allows --ip only on user-configured subnets
    wanted = str(subnet.network_address + 77)
    c = scene.run(net, "--ip", wanted)
    assert scene.ip(c, net) == wanted
    before = agent.allocations()
    for bad in (str(subnet.network_address + 1), str(subnet.broadcast_address + 300), wanted):
        proc = scene.d.attempt("run", "-d", "--network", net, "--ip", bad, scene.image, "true")
        assert proc.returncode != 0, bad
        assert proc.stderr.strip(), "Docker must show the plugin's error"
    assert agent.allocations() == before  # nothing half-made


def test_stop_and_rm_release_the_address_and_the_veth(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    c = scene.run(net)
    ip = scene.ip(c, net)
    (ep,) = [e for e in agent.endpoints() if e["ipv4"].startswith(ip + "/")]
    assert ep["interface"] in agent.links()
    scene.d("stop", "-t", "0", c)
    wait_until(lambda: ep["interface"] not in agent.links(), 10, "the veth to go after DeleteEndpoint's reply")
    assert all(e["id"] != ep["id"] for e in agent.endpoints())
    assert all(a != ip for a, _, _ in agent.allocations())
    scene.d("start", c)
    assert scene.ip(c, net)
    scene.d("rm", "-f", c)
    assert agent.endpoints() == []
    assert [k for _, k, _ in agent.allocations() if k == "endpoint"] == []


def test_network_rm_removes_pool_and_host_state(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    (cfg,) = subnets(scene.d, net)
    scene.d("network", "rm", net)
    scene.networks.remove(net)
    assert all(a != cfg["Gateway"] for a, _, _ in agent.allocations())
    assert not any(n["subnets"] == [cfg["Subnet"]] for n in agent.json("network", "list"))
    routes = run("ip", "route", "show", cfg["Subnet"]).stdout
    assert routes.strip() == ""


def test_overlapping_subnet_is_refused_and_nothing_changes(scene: Scene, agent: Agent) -> None:
    base = ipaddress.ip_network(agent.v4)
    subnet = list(base.subnets(new_prefix=24))[9]
    scene.network("--subnet", str(subnet))
    pools = agent.json("ipam", "list")["pools"]
    proc = scene.d.attempt("network", "create", "-d", agent.name, "--ipam-driver", agent.name,
                           "--subnet", str(subnet.supernet()), "cgovl" + scene.tag)
    assert proc.returncode != 0
    assert "overlaps" in proc.stderr
    assert agent.json("ipam", "list")["pools"] == pools


def host_state(agent: Agent, subnet: str) -> dict[str, list[str]]:
    """What a network of `subnet` would put on the host: routes, iptables rules, our pools and networks."""
    routes = run("ip", "-4", "route", "show", "table", "all").stdout + run("ip", "-6", "route", "show", "table",
                                                                            "all").stdout
    rules = run("iptables-save").stdout + run("ip6tables-save").stdout
    return {
        "routes": [r for r in routes.splitlines() if subnet in r or f"cg_{agent.name}" in r],
        "rules": [r for r in rules.splitlines() if subnet in r or agent.name in r],
        "pools": [p["id"] for p in agent.json("ipam", "list")["pools"]],
        "networks": [n["id"] for n in agent.json("network", "list")],
    }


SPECIAL_SUBNETS = [
    ("127.0.0.0/24", "127.0.0.0/8 (loopback)", "loopback"),
    ("127.200.0.0/16", "127.0.0.0/8 (loopback)", "loopback-16"),
    ("224.0.0.0/24", "224.0.0.0/4 (multicast)", "multicast"),
    ("169.254.0.0/24", "169.254.0.0/16 (link-local)", "link-local"),
    ("0.0.0.0/24", "0.0.0.0/8 ('this network')", "this-network"),
    ("240.0.0.0/24", "240.0.0.0/4 (reserved", "class-e"),
    ("255.255.255.0/24", "240.0.0.0/4 (reserved", "limited-broadcast"),
    ("fe80::/64", "fe80::/10 (link-local)", "v6-link-local"),
    ("ff05::/64", "ff00::/8 (multicast)", "v6-multicast"),
]
SPECIAL_CASES = [
    *(pytest.param(ipam, subnet, text, id=f"{ipam}-ipam-{name}") for ipam in ("cellgate", "docker")
      for subnet, text, name in SPECIAL_SUBNETS),
    # Docker reads this as IPv4 (its own IPAM passes it on as 10.9.0.0/24), so only ours sees it as it is
    pytest.param("cellgate", "::ffff:10.9.0.0/120", "::ffff:0:0/96 (IPv4-mapped)", id="cellgate-ipam-v4-mapped"),
]


@pytest.mark.parametrize(("ipam", "subnet", "text"), SPECIAL_CASES)
def test_special_purpose_subnets_are_refused_and_leave_nothing(
        scene: Scene, agent: Agent, ipam: str, subnet: str, text: str) -> None:
    """Refused at RequestPool (our IPAM) or at CreateNetwork (Docker's IPAM): no route, rule or pool."""
    name = f"cgsp{scene.tag}"
    opts = ["--ipv6"] if ":" in subnet and not subnet.startswith("::ffff:") else []
    if ipam == "cellgate":
        opts += ["--ipam-driver", agent.name]
    before = host_state(agent, subnet)
    proc = scene.d.attempt("network", "create", "-d", agent.name, *opts, "--subnet", subnet, name)
    if proc.returncode == 0:
        scene.networks.append(name)
    assert proc.returncode != 0, f"{subnet} was accepted"
    assert text in proc.stderr and "which cannot be a container network" in proc.stderr, proc.stderr
    assert host_state(agent, subnet) == before
    assert name not in scene.d("network", "ls", "--format", "{{.Name}}").split()


def test_connect_and_disconnect_a_second_network(scene: Scene, agent: Agent) -> None:
    net1, net2 = scene.network(), scene.network()
    c = scene.server(net1)
    other = scene.run(net2)
    scene.d("network", "connect", net2, c)
    ip2 = scene.ip(c, net2)
    routes = scene.exec(c, "ip", "route").stdout
    assert routes.count("default") == 1  # one gateway, no clash
    assert "ttl=63" in scene.exec(other, "ping", "-c", "1", "-W", "2", ip2).stdout
    assert "hello from" in scene.tcp(other, ip2)
    assert len([e for e in agent.endpoints() if e["sandbox"]]) == 3
    scene.d("network", "disconnect", net2, c)
    assert all(not e["ipv4"].startswith(ip2 + "/") for e in agent.endpoints())
    assert all(a != ip2 for a, _, _ in agent.allocations())
    assert scene.exec(other, "ping", "-c", "1", "-W", "1", ip2, check=False).returncode != 0


def test_twenty_parallel_runs_get_unique_addresses_and_release_them(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    names = [f"cgp{scene.tag}{i}" for i in range(20)]
    scene.containers.extend(names)

    def start(name: str) -> None:
        scene.d("run", "-d", "--name", name, "--label", f"cgtest={agent.name}", "--network", net,
                scene.image, "sleep", "3600")

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(start, names))
    ips = [scene.ip(n, net) for n in names]
    assert len(set(ips)) == 20
    mine = sorted(a for a, k, _ in agent.allocations() if k == "endpoint")
    assert mine == sorted(ips)
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda n: scene.d("rm", "-f", n), names))
    assert [k for _, k, _ in agent.allocations() if k == "endpoint"] == []
    assert agent.endpoints() == []
    # the veths go right after DeleteEndpoint's reply (docs/architecture.md, Docker driver)
    wait_until(lambda: agent.links() == [f"cg_{agent.name}"], 10, "the veths to go after the replies")
    assert agent.json("ipam", "check", "--grace", "0")["ok"]


def test_containers_reach_outside_through_masquerade(scene: Scene, agent: Agent) -> None:
    """An 'outside' namespace behind a host route sees the host's address, not the container's."""
    ns, host_if = f"cgo{scene.tag}", f"cgo{scene.tag}h"
    outside_host, outside_peer = "198.18.231.1", "198.18.231.2"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "addr", "add", f"{outside_host}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "-n", ns, "addr", "add", f"{outside_peer}/30", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        net = scene.network()
        c = scene.run(net)
        listener = subprocess.Popen(["ip", "netns", "exec", ns, "nc", "-l", "-n", "-v", "-w", "10", "9999"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: "9999" in run("ip", "netns", "exec", ns, "ss", "-ltn").stdout, 10, "listener")
            scene.exec(c, "sh", "-c", f"echo hi | nc -w 2 {outside_peer} 9999")
            out, _ = listener.communicate(timeout=15)
        finally:
            listener.kill()
        assert f"from {outside_host}" in out or f"received on {outside_host}" in out, out
        assert scene.ip(c, net) not in out
    finally:
        run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", host_if, check=False)


def test_cellgate_network_rm_leaves_docker_networks_to_docker(scene: Scene, agent: Agent) -> None:
    net = scene.network()
    nid = scene.d.inspect(net)["Id"]
    (listed,) = [n for n in agent.json("network", "list") if n["id"] == nid]
    assert (listed["origin"], listed["name"]) == ("docker", "")
    for ident in (nid, nid[:12]):
        proc = agent.cli("network", "rm", ident, check=False)
        assert proc.returncode == 2 and "is a Docker network: remove it with `docker network rm`" in proc.stderr
    assert [n for n in agent.json("network", "list") if n["id"] == nid] == [listed]
    assert scene.d.inspect(net)["Id"] == nid


def test_sockets_are_root_only(agent: Agent) -> None:
    for path in (agent.plugin, agent.api):
        st = os.stat(path)
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600, path
        probe = run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "python3", "-c",
                    f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({str(path)!r})", check=False)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr


def test_static_ipv6_is_honoured(scene: Scene, agent: Agent) -> None:
    v6 = list(ipaddress.ip_network(agent.v6).subnets(new_prefix=80))[5]
    net = scene.network("--ipv6", "--subnet", str(v6))
    wanted = str(v6.network_address + 0x42)
    c = scene.run(net, "--ip6", wanted)
    assert scene.ip(c, net, v6=True) == wanted
    assert wanted + "/80" in scene.exec(c, "ip", "-6", "addr", "show", "dev", "eth0").stdout


def test_pool_exhaustion_is_a_clear_error_and_leaves_nothing(scene: Scene, agent: Agent) -> None:
    subnet = list(ipaddress.ip_network(agent.v4).subnets(new_prefix=28))[200]  # 14 hosts, 1 gateway
    net = scene.network("--subnet", str(subnet))
    for _ in range(13):
        scene.run(net)
    links, before = agent.links(), agent.allocations()
    proc = scene.d.attempt("run", "-d", "--name", f"cgx{scene.tag}", "--network", net, scene.image, "true")
    scene.containers.append(f"cgx{scene.tag}")
    assert proc.returncode != 0
    assert "no free address" in proc.stderr
    assert agent.links() == links and agent.allocations() == before
    scene.d("rm", "-f", scene.containers[0])
    assert scene.ip(scene.run(net), net)  # room again after a removal


def test_ipam_check_finds_and_releases_a_leak(scene: Scene, agent: Agent) -> None:
    """An address handed out whose reply Docker never saw (lost reply) is a leak until released."""
    net = scene.network()
    scene.run(net)
    pool = next(p for p in agent.json("ipam", "list")["pools"] if p["network_id"] == scene.d.inspect(net)["Id"])
    conn = http.client.HTTPConnection("plugin")
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(agent.plugin))
    body = {"PoolID": pool["id"], "Address": "",
            "Options": {"com.docker.network.endpoint.macaddress": "02:42:de:ad:be:ef"}}
    conn.request("POST", "/IpamDriver.RequestAddress", body=json.dumps(body).encode())
    leaked = json.loads(conn.getresponse().read())["Address"].split("/")[0]
    assert agent.json("ipam", "check")["ok"]  # younger than the grace period: not judged yet
    report = agent.cli("ipam", "check", "--grace", "0", check=False)
    assert report.returncode == 1 and leaked in report.stdout
    released = agent.json("ipam", "check", "--grace", "0", "--release")
    assert [x["address"] for x in released["released"]] == [leaked]
    assert all(a != leaked for a, _, _ in agent.allocations())
    assert agent.json("ipam", "check", "--grace", "0")["ok"]
