"""CIDR policy against real traffic: an agent (single host, masquerade on) in a node namespace of its
own, a CNI endpoint, and a "world" namespace linked to the node by a veth that holds addresses of
198.51.100.0/24 and 2001:db8:c9::/64 (documentation ranges, routed nowhere else). toCIDR allow and
deny, toCIDRSet with except, IPv6, fromCIDR ingress, the world entity next to CIDR identities, a
CIDR deny over an allow, masquerade (the world sees the node's address while egress policy judged
the original destination), and `policy trace --dst-ip/--src-ip` agreeing with every outcome.

Nothing leaves the namespaces this test makes; everything is named cg<tag>… and removed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import CELLGATE, wait_until
from tests.simcluster import sh

pytestmark = pytest.mark.e2e

CNI = str(Path(CELLGATE).with_name("cellgate-cni"))
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
NODE4, NODE6 = "198.51.100.1", "2001:db8:c9::1"  # the node's side of the world link
W10, W20, W200 = "198.51.100.10", "198.51.100.20", "198.51.100.200"  # the world's
W6_10, W6_20 = "2001:db8:c9::10", "2001:db8:c9::20"

SERVER = r"""
import socket, sys, threading
def serve(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(16)
    while True:
        c, peer = s.accept()
        host = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
        c.sendall(f"hello {port} from {host}\n".encode()); c.close()
for p in (80, 443):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = r"""
import socket, sys
host, port, src = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""
try:
    s = socket.create_connection((host, port), timeout=1.5, source_address=(src, 0) if src else None)
    print(s.recv(100).decode().strip())
except OSError as exc:
    print("failed", exc); sys.exit(1)
"""


@dataclass
class Site:
    tag: str
    node: str  # netns of the agent
    world: str  # netns of the outside
    ep_ns: str  # netns of the endpoint
    base: Path
    ep4: str = ""
    ep6: str = ""
    endpoint: str = ""  # its endpoint ID

    @property
    def socket(self) -> str:
        return str(self.base / "api.sock")

    def cli(self, *args: str, check: bool = True) -> Any:
        out = sh(CELLGATE, *args, "--socket", self.socket, "-o", "json", check=check)
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else out

    def connect(self, ns: str, host: str, port: int, src: str = "") -> str:
        """What the server at host:port says (`hello PORT from SOURCE`), or "" if it cannot be reached."""
        out = sh("ip", "netns", "exec", ns, "python3", "-c", CLIENT, host, str(port), *([src] if src else []),
                 check=False, timeout=15)
        return out.stdout.strip() if out.returncode == 0 else ""

    def out(self, host: str, port: int) -> str:
        return self.connect(self.ep_ns, host, port)

    def into(self, src: str, port: int, dst: str = "") -> str:
        return self.connect(self.world, dst or self.ep4, port, src)

    def policy(self, rules: list[dict[str, Any]]) -> None:
        self.cli("policy", "delete", "--all", check=False)
        path = self.base / "policy.json"
        path.write_text(json.dumps(rules))
        self.cli("policy", "import", str(path))

    def trace(self, *args: str) -> str:
        verdict: str = self.cli("policy", "trace", *args)["verdict"]
        return verdict

    def out_trace(self, host: str, port: int) -> bool:
        return self.trace("--src-endpoint", self.endpoint, "--dst-ip", host, "--dport", f"{port}/tcp") == "ALLOWED"

    def in_trace(self, src: str, port: int) -> bool:
        return self.trace("--src-ip", src, "--dst-endpoint", self.endpoint, "--dport", f"{port}/tcp") == "ALLOWED"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not Path(CNI).exists():
        pytest.skip(f"the CNI plugin {CNI} is not installed (make setup)")
    tag = secrets.token_hex(2)
    s = Site(tag, f"cg{tag}cn", f"cg{tag}cw", f"cg{tag}ce", tmp_path_factory.mktemp(f"cg{tag}cidr"))
    name = f"cg{tag}c"
    args = ["--name", name, "--socket", s.socket, "--state-dir", str(s.base / "state"),
            "--bpf-dir", f"/sys/fs/bpf/{name}", "--plugin-socket", str(s.base / "plugin.sock"),
            "--ipv4-range", "10.233.0.0/20", "--ipv6-range", "fd63:cc::/64", "--masquerade", "true",
            "--docker-host", "unix:///nonexistent", "--cni-bin-dir", "", "--sweep-interval", "3600"]
    made: list[str] = []
    proc: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[bytes] | None = None
    ep_server: subprocess.Popen[bytes] | None = None
    cid = f"cg{tag}-cidr"
    conf = {"cniVersion": "1.0.0", "name": f"cg{tag}net", "type": "cellgate-cni", "socket": s.socket, "ipv6": True}
    try:
        for ns in (s.node, s.world, s.ep_ns):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # the world link: node side .1 / ::1, world side the test's outside addresses
        sh("ip", "link", "add", "eth9", "netns", s.node, "type", "veth", "peer", "name", "eth9", "netns", s.world)
        for ns, addrs in ((s.node, (f"{NODE4}/24", f"{NODE6}/64")),
                          (s.world, (f"{W10}/24", f"{W20}/24", f"{W200}/24", f"{W6_10}/64", f"{W6_20}/64"))):
            for a in addrs:
                sh("ip", "-n", ns, "addr", "add", a, "dev", "eth9", *(["nodad"] if ":" in a else []))
            sh("ip", "-n", ns, "link", "set", "eth9", "up")
        # the node forwards IPv6 as a router would (the agent turns on IPv4 forwarding for masquerade)
        sh("ip", "netns", "exec", s.node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        # the world answers the endpoint's ranges through the node (IPv6 is not masqueraded)
        sh("ip", "-n", s.world, "route", "add", "10.233.0.0/20", "via", NODE4)
        sh("ip", "-n", s.world, "-6", "route", "add", "fd63:cc::/64", "via", NODE6)
        log = open(s.base / "agent.log", "ab")  # noqa: SIM115 (the child holds it)
        proc = subprocess.Popen(["ip", "netns", "exec", s.node, CELLGATE, "agent", *args], stdout=log, stderr=log,
                                start_new_session=True)
        log.close()

        def ready() -> bool:
            assert proc is not None
            if proc.poll() is not None:
                raise AssertionError((s.base / "agent.log").read_text()[-3000:])
            return sh(CELLGATE, "status", "--socket", s.socket, check=False).returncode == 0

        wait_until(ready, 60, "the agent")
        env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID=cid, CNI_NETNS=f"/run/netns/{s.ep_ns}",
                   CNI_IFNAME="eth0", CNI_PATH=str(Path(CNI).parent),
                   CNI_ARGS="IgnoreUnknown=1;CELLGATE_LABELS=app:web")
        out = subprocess.run([CNI], input=json.dumps(conf), env=env, capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        result = json.loads(out.stdout)
        s.ep4 = next(ip["address"].split("/")[0] for ip in result["ips"] if ":" not in ip["address"])
        s.ep6 = next(ip["address"].split("/")[0] for ip in result["ips"] if ":" in ip["address"])
        s.endpoint = next(e["id"] for e in s.cli("endpoint", "list") if e["ipv4"].split("/")[0] == s.ep4)
        server = subprocess.Popen(["ip", "netns", "exec", s.world, "python3", "-c", SERVER], stdout=subprocess.PIPE)
        ep_server = subprocess.Popen(["ip", "netns", "exec", s.ep_ns, "python3", "-c", SERVER],
                                     stdout=subprocess.PIPE)
        for p in (server, ep_server):
            assert p.stdout is not None and p.stdout.readline().startswith(b"ready")
        wait_until(lambda: s.out(W10, 80), 20, "the world to answer the endpoint")
        yield s
    finally:
        for p in (server, ep_server):
            if p is not None:
                p.kill()
                p.wait()
        env = dict(os.environ, CNI_COMMAND="DEL", CNI_CONTAINERID=cid, CNI_NETNS=f"/run/netns/{s.ep_ns}",
                   CNI_IFNAME="eth0", CNI_PATH=str(Path(CNI).parent))
        subprocess.run([CNI], input=json.dumps(conf), env=env, capture_output=True, text=True, check=False)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        sh("ip", "netns", "exec", s.node, CELLGATE, "cleanup", *args[:10], check=False)
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def test_without_policy_the_world_is_reached_masqueraded(site: Site) -> None:
    site.cli("policy", "delete", "--all", check=False)
    assert site.out(W10, 80) == f"hello 80 from {NODE4}"  # masqueraded: the node's address
    assert site.out(W6_10, 80) == f"hello 80 from {site.ep6}"  # IPv6 is not
    assert site.out_trace(W10, 80)


def test_to_cidr_set_with_except_judged_before_masquerade(site: Site) -> None:
    site.policy([{"endpointSelector": {"matchLabels": {"app": "web"}}, "labels": ["name=cg-out"],
                  "egress": [{"toCIDRSet": [{"cidr": "198.51.100.0/24", "except": ["198.51.100.128/25"]}]}]}])
    cases = {(W10, 80): True, (W20, 443): True, (W200, 80): False, (W6_10, 80): False}
    for (host, port), ok in cases.items():
        got = site.out(host, port)
        assert bool(got) is ok, (host, port, got)
        assert site.out_trace(host, port) is ok, (host, port)
    # the world saw the node's address; policy judged the original destination (.200 is refused
    # although after masquerade every packet comes from the same source)
    assert site.out(W10, 80) == f"hello 80 from {NODE4}"
    # the identities and the ipcache
    cache = {e["prefix"]: e for e in site.cli("bpf", "ipcache", "list")}
    inside, excepted = cache["198.51.100.0/24"], cache["198.51.100.128/25"]
    assert inside["identity"] > 1 << 24 and excepted["identity"] > 1 << 24
    assert f"{NODE4}/32" in cache and cache[f"{NODE4}/32"]["identity"] == 1  # the host keeps its own
    idents = {i["id"]: i["labels"] for i in site.cli("identity", "list")}
    assert "cidr:198.51.100.0/24" in idents[inside["identity"]] and "reserved:world" in idents[inside["identity"]]
    text = sh(CELLGATE, "identity", "list", "--socket", site.socket).stdout
    assert "cidr:198.51.100.128/25, reserved:world" in text
    # deleting the rule takes the CIDR identities and their entries away
    site.cli("policy", "delete", "--all")
    assert not any(e["identity"] > 1 << 24 for e in site.cli("bpf", "ipcache", "list"))
    assert site.out(W200, 80)


def test_ipv6_to_cidr_set(site: Site) -> None:
    site.policy([{"endpointSelector": {"matchLabels": {"app": "web"}}, "labels": ["name=cg-out6"],
                  "egress": [{"toCIDRSet": [{"cidr": "2001:db8:c9::/64", "except": [f"{W6_20}/128"]}]}]}])
    for host, ok in ((W6_10, True), (W6_20, False), (W10, False)):
        assert bool(site.out(host, 80)) is ok, host
        assert site.out_trace(host, 80) is ok, host


def test_a_cidr_deny_overrides_the_world_entity(site: Site) -> None:
    site.policy([{"endpointSelector": {"matchLabels": {"app": "web"}}, "labels": ["name=cg-world"],
                  "egress": [{"toEntities": ["world"]}],
                  "egressDeny": [{"toCIDR": [W10], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]}])
    # W10 has a CIDR identity now, and `world` still matches it (but for the denied port)
    cases = {(W10, 80): True, (W10, 443): False, (W20, 443): True, (W6_10, 443): True}
    for (host, port), ok in cases.items():
        assert bool(site.out(host, port)) is ok, (host, port)
        assert site.out_trace(host, port) is ok, (host, port)


def test_from_cidr_ingress(site: Site) -> None:
    site.policy([{"endpointSelector": {"matchLabels": {"app": "web"}}, "labels": ["name=cg-in"],
                  "ingress": [{"fromCIDR": [W10, W6_10], "toPorts": [{"ports": [{"port": "80"}]}]}]}])
    assert site.into(W10, 80) == f"hello 80 from {W10}"
    assert site.in_trace(W10, 80)
    for src, port in ((W20, 80), (W10, 443)):
        assert not site.into(src, port), (src, port)
        assert not site.in_trace(src, port), (src, port)
    assert site.into(W6_10, 80, site.ep6) == f"hello 80 from {W6_10}"
    assert not site.into(W6_20, 80, site.ep6)
    assert site.in_trace(W6_10, 80) and not site.in_trace(W6_20, 80)
    site.cli("policy", "delete", "--all")


def test_policy_check_validates_cidr_offline(site: Site, tmp_path: Path) -> None:
    assert sh(CELLGATE, "policy", "check", str(EXAMPLES / "cidr.yaml")).returncode == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"endpointSelector": {}, "egress": [
        {"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}]}]))
    out = sh(CELLGATE, "policy", "check", str(bad), check=False)
    assert out.returncode != 0 and "11.0.0.0/16 is not inside the cidr 10.0.0.0/8" in out.stdout + out.stderr
