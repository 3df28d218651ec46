"""A real libcni client (cnitool, built from Debian's source package) drives cellgate-cni.

libcni brings what direct invocation cannot: config lists, the result cache that feeds
prevResult to CHECK and DEL (and is gone for a second DEL), CAP_ARGS as runtimeConfig,
and chaining with the reference portmap plugin.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Agent, run, unique_ranges, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CNITOOL = REPO / "build" / "cnitool"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cni_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    name = "cgl" + secrets.token_hex(3)
    v4, v6, _ = unique_ranges()
    agent = Agent(tmp_path_factory.mktemp(name), name, v4, v6, docker_host="unix:///nonexistent")
    agent.args += ["--cni-bin-dir", ""]
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
        agent.cleanup()


class Cnitool:
    def __init__(self, base: Path, agent: Agent, network: str) -> None:
        if not CNITOOL.exists():
            pytest.skip("build/cnitool is missing: run make setup (it builds cnitool from Debian's source)")
        self.network = network
        confdir = base / "net.d"
        confdir.mkdir()
        conflist = {"cniVersion": "1.0.0", "name": network, "plugins": [
            {"type": "cellgate-cni", "socket": str(agent.api), "ipv6": True},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}
        (confdir / f"{network}.conflist").write_text(json.dumps(conflist))
        self.env = dict(os.environ, NETCONFPATH=str(confdir), CNI_PATH=f"{BIN}:/usr/lib/cni")
        self.namespaces: list[str] = []

    def netns(self) -> str:
        name = f"cgln{secrets.token_hex(4)}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        return name

    def __call__(self, verb: str, ns: str, check: bool = True, **extra: str) -> str:
        env = dict(self.env, **extra)
        return run(str(CNITOOL), verb, self.network, f"/var/run/netns/{ns}", env=env, check=check).stdout

    def close(self) -> None:
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def cnitool(cni_agent: Agent, tmp_path: Path) -> Iterator[Cnitool]:
    tool = Cnitool(tmp_path, cni_agent, "cgl" + secrets.token_hex(3))
    try:
        yield tool
    finally:
        tool.close()
        results = Path("/var/lib/cni/results")
        for cached in results.glob(f"{tool.network}-*") if results.is_dir() else []:
            cached.unlink()


def test_add_check_del_with_the_libcni_cache(cnitool: Cnitool, cni_agent: Agent) -> None:
    ns = cnitool.netns()
    out = json.loads(cnitool("add", ns, CNI_ARGS="IgnoreUnknown=1;CELLGATE_LABELS=app:web,tier:front"))
    assert out["cniVersion"] == "1.0.0"
    (iface,) = out["interfaces"]
    assert iface["name"] == "eth0" and iface["sandbox"] == f"/var/run/netns/{ns}" and iface["mac"]
    assert {ipaddr["address"].count(":") > 0 for ipaddr in out["ips"]} == {False, True}  # dual stack
    assert all(ipaddr["interface"] == 0 and "version" not in ipaddr for ipaddr in out["ips"])
    ep = next(e for e in cni_agent.endpoints() if e["mac"] == iface["mac"])
    assert {"cni:app=web", "cni:tier=front"} <= set(ep["labels"])
    cnitool("check", ns)  # libcni replays the cached result as prevResult
    gateway = next(ipaddr["gateway"] for ipaddr in out["ips"] if ":" not in ipaddr["address"])
    run("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", gateway)
    cnitool("del", ns)
    assert not any(e["mac"] == iface["mac"] for e in cni_agent.endpoints())
    cnitool("del", ns)  # the cache is gone now: a DEL without prevResult must succeed too
    assert not [a for a, k, _ in cni_agent.allocations() if k == "endpoint"]


def test_del_after_the_namespace_is_gone(cnitool: Cnitool, cni_agent: Agent) -> None:
    ns = cnitool.netns()
    out = json.loads(cnitool("add", ns))
    iface = out["interfaces"][0]
    ep = next(e for e in cni_agent.endpoints() if e["mac"] == iface["mac"])
    run("ip", "netns", "del", ns)
    cnitool.namespaces.remove(ns)
    cnitool("del", ns)
    assert ep["interface"] not in cni_agent.links()
    assert not any(e["id"] == ep["id"] for e in cni_agent.endpoints())
    assert cni_agent.json("ipam", "check", "--grace", "0")["ok"]


def test_chained_portmap_publishes_a_port(cnitool: Cnitool, cni_agent: Agent) -> None:
    ns = cnitool.netns()
    port = 19000 + secrets.randbelow(500)
    caps = json.dumps({"portMappings": [{"hostPort": port, "containerPort": 8080, "protocol": "tcp"}]})
    out = json.loads(cnitool("add", ns, CAP_ARGS=caps))
    ip = next(ipaddr["address"].split("/")[0] for ipaddr in out["ips"] if ":" not in ipaddr["address"])
    serve = ("import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
             "s.bind(('0.0.0.0', 8080)); s.listen(); c, a = s.accept(); c.sendall(b'hello-portmap ' + "
             "a[0].encode()); c.close()")
    server = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", serve])
    try:
        wait_until(lambda: "8080" in run("ip", "netns", "exec", ns, "ss", "-ltn").stdout, 10, "the server")
        answer = run("nc", "-w", "2", "127.0.0.1", str(port), check=False, input="").stdout
        assert answer.startswith("hello-portmap")
        server.wait(timeout=10)
    finally:
        server.kill()
    assert ip
    cnitool("del", ns, CAP_ARGS=caps)
    nat = run("iptables-save", "-t", "nat").stdout
    assert f"--dport {port}" not in nat  # portmap removed its rule on DEL


def test_cnitool_is_what_debian_builds() -> None:
    """The client is the real one: it reports its own usage and links libcni."""
    if not CNITOOL.exists():
        pytest.skip("build/cnitool is missing")
    out = run(str(CNITOOL), check=False)
    assert "cnitool add" in out.stdout + out.stderr
    assert shutil.which("go") is not None


def test_the_containerd_example_through_libcni(cni_agent: Agent, tmp_path: Path) -> None:
    """containerd's CRI and `ctr --cni` load /etc/cni/net.d through libcni, as cnitool does."""
    if not CNITOOL.exists():
        pytest.skip("build/cnitool is missing")
    conf = json.loads((REPO / "examples" / "cni" / "containerd.conflist").read_text())
    conf["name"] = "cglc" + secrets.token_hex(3)
    conf["plugins"][0]["socket"] = str(cni_agent.api)
    subnet = list(ipaddress.ip_network(cni_agent.v4).subnets(new_prefix=24))[-1]  # not one drawn dynamically
    conf["plugins"][0]["subnet"] = str(subnet)
    confdir = tmp_path / "net.d"
    confdir.mkdir()
    (confdir / "10-cellgate.conflist").write_text(json.dumps(conf))
    ns = f"cglc{secrets.token_hex(4)}"
    run("ip", "netns", "add", ns)
    env = dict(os.environ, NETCONFPATH=str(confdir), CNI_PATH=f"{BIN}:/usr/lib/cni")
    try:
        out = json.loads(run(str(CNITOOL), "add", conf["name"], f"/var/run/netns/{ns}", env=env).stdout)
        address = out["ips"][0]["address"]
        assert address.split("/")[0] in [str(h) for h in subnet.hosts()]
        ep = next(e for e in cni_agent.endpoints() if e["ipv4"] == address)
        assert "cni:runtime=containerd" in ep["labels"]
        run(str(CNITOOL), "del", conf["name"], f"/var/run/netns/{ns}", env=env)
        assert not any(e["id"] == ep["id"] for e in cni_agent.endpoints())
    finally:
        run("ip", "netns", "del", ns, check=False)
        for cached in Path("/var/lib/cni/results").glob(f"{conf['name']}-*"):
            cached.unlink()
