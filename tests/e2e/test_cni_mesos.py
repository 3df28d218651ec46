"""Mesos: `cellgate-cni` called exactly as the Mesos network/cni isolator calls it (no Mesos needed).

The isolator (reference/cni.md §2) finds the plugin by the config's `type` in its plugins
dir, runs it with CNI_COMMAND, CNI_CONTAINERID (a UUID, `parent.child` when nested),
CNI_PATH, CNI_IFNAME=eth0, CNI_NETNS=<root>/<containerId>/ns (a bind-mounted namespace
handle) and its own PATH; no CNI_ARGS, no runtimeConfig, no cniVersion. Stdin is the
`.conf` plus `args.org.apache.mesos.network_info`, checkpointed and replayed for DEL, which
leaves out CNI_NETNS once the handle is no longer a namespace (after a reboot). The config
is examples/cni/mesos.conf with only the socket path filled in. No dockerd is involved.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cni_support import (
    CniAgent,
    Namespaces,
    Netns,
    Outcome,
    Processes,
    check_result,
    endpoint_id,
    host_ifname,
    installed_plugin,
    invoke,
    running_agent,
)
from tests.e2e.harness import run, wait_until

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cni" / "mesos.conf"
NETWORK = "cellgate"  # the example's name; NetworkInfo.name must match it
NETWORK6 = "cellgate6"  # the same file at "cniVersion": "0.2.0" with IPv6 on

SERVER = """
import socket, sys, threading
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        c, _ = s.accept()
        c.sendall(b"hello %d from %s" % (port, sys.argv[1].encode()))
        c.close()
for port in (80, 81):
    threading.Thread(target=serve, args=(port,)).start()
"""
CLIENT = ("import socket, sys\n"
          "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
          "print(s.recv(100).decode())")


class Isolator:
    """The network/cni isolator of one Mesos agent: plugins dir, config dir, state root."""

    def __init__(self, base: Path, agent: CniAgent) -> None:
        self.agent = agent
        self.plugins = base / "plugins"  # --network_cni_plugins_dir
        self.config_dir = base / "net.d"  # --network_cni_config_dir
        self.root = base / "isolators" / "network" / "cni"  # <runtime_dir>/isolators/network/cni
        installed_plugin(self.plugins)
        self.config_dir.mkdir()
        conf = json.loads(EXAMPLE.read_text())
        conf["socket"] = str(agent.api)  # the only thing templated
        (self.config_dir / "mesos.conf").write_text(json.dumps(conf, indent=2))
        conf6 = {**conf, "name": NETWORK6, "cniVersion": "0.2.0", "ipv6": True}
        (self.config_dir / "mesos6.conf").write_text(json.dumps(conf6, indent=2))
        self.handles: list[Path] = []

    def config(self, network: str) -> dict[str, Any]:
        """Mesos re-reads the file of the network on every attach."""
        for path in sorted(self.config_dir.iterdir()):
            conf = json.loads(path.read_text())
            if conf.get("name") == network:
                return dict(conf)
        raise AssertionError(f"no config for {network}")

    def env(self, command: str, cid: str, netns: str | None) -> dict[str, str | None]:
        return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_PATH": str(self.plugins),
                "CNI_IFNAME": "eth0", "CNI_NETNS": netns}

    def plugin(self, conf: dict[str, Any]) -> Path:
        return self.plugins / conf["type"]

    def handle(self, cid: str) -> Path:
        return self.root / cid / "ns"

    def attach(self, cid: str, ns: Netns, labels: dict[str, str], network: str = NETWORK) -> Outcome:
        handle = self.handle(cid)
        handle.parent.mkdir(parents=True, exist_ok=True)
        handle.touch()
        run("mount", "--bind", ns.path, str(handle))
        self.handles.append(handle)
        conf = self.config(network)
        assert "org.apache.mesos" not in conf.get("args", {})  # Mesos refuses a file that sets it
        conf["args"] = {"org.apache.mesos": {"network_info": {
            "name": network,
            "labels": {"labels": [{"key": k, "value": v} for k, v in labels.items()]},
            "port_mappings": [{"host_port": 31080, "container_port": 80, "protocol": "tcp"}],
            "ip_addresses": [{"protocol": "IPv4"}],
        }}}
        checkpoint = self.root / cid / network / "network.conf"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(json.dumps(conf))
        return invoke(self.env("ADD", cid, str(handle)), checkpoint.read_text(), self.plugin(conf),
                      path=os.environ.get("PATH", ""))

    def is_namespace(self, handle: Path) -> bool:
        return run("stat", "-f", "-c", "%T", str(handle), check=False).stdout.strip() == "nsfs"

    def detach(self, cid: str, network: str = NETWORK) -> Outcome:
        checkpoint = self.root / cid / network / "network.conf"
        conf = json.loads(checkpoint.read_text())
        handle = self.handle(cid)
        netns = str(handle) if self.is_namespace(handle) else None  # omitted after a reboot
        return invoke(self.env("DEL", cid, netns), checkpoint.read_text(), self.plugin(conf),
                      path=os.environ.get("PATH", ""))

    def unmount(self, cid: str) -> None:
        """The handle stops being a namespace (a reboot, or the container is destroyed)."""
        run("umount", str(self.handle(cid)))

    def close(self) -> None:
        for handle in self.handles:
            if self.is_namespace(handle):
                run("umount", str(handle), check=False)


@pytest.fixture(scope="module")
def cni_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CniAgent]:
    with running_agent(tmp_path_factory, "cgm") as agent:
        yield agent


@pytest.fixture
def mesos(cni_agent: CniAgent, tmp_path: Path) -> Iterator[tuple[Isolator, Namespaces]]:
    isolator = Isolator(tmp_path, cni_agent)
    namespaces = Namespaces()
    try:
        yield isolator, namespaces
    finally:
        try:
            for checkpoint in isolator.root.glob("*/*/network.conf"):
                isolator.detach(checkpoint.parent.parent.name, checkpoint.parent.name)
        finally:
            isolator.close()
            namespaces.close()


def ip4_of(result: dict[str, Any]) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(result["ip4"]["ip"])


# -- the configuration ------------------------------------------------------------------------


def test_example_is_a_single_plugin_conf_mesos_loads() -> None:
    conf = json.loads(EXAMPLE.read_text())
    assert conf["name"] == NETWORK and conf["type"] == "cellgate-cni"  # the NetworkConfig proto requires both
    assert "cniVersion" not in conf and "plugins" not in conf and "ipam" not in conf and "args" not in conf


# -- ADD: the ip4 result Mesos reads ----------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["container", "nested-container"])
def test_add_gives_the_ip4_result_mesos_reads(mesos: tuple[Isolator, Namespaces], nested: bool) -> None:
    isolator, namespaces = mesos
    ns = namespaces.new()
    cid = f"{uuid.uuid4()}.{uuid.uuid4()}" if nested else str(uuid.uuid4())
    result = isolator.attach(cid, ns, {"app": "web"}).result()
    assert set(result) == {"cniVersion", "ip4", "dns"} and result["cniVersion"] == "0.1.0", result
    check_result(result, "0.1.0", "eth0", str(isolator.handle(cid)), (4,))
    ep = isolator.agent.json("endpoint", "get", endpoint_id(cid, "eth0"))
    assert result["ip4"] == {"ip": ep["ipv4"], "gateway": ep["gateway4"],
                             "routes": [{"dst": "0.0.0.0/0", "gw": ep["gateway4"]}]}
    assert ep["sandbox"] == str(isolator.handle(cid))
    inside = ns.interface("eth0")
    assert inside is not None and result["ip4"]["ip"] in inside["addresses"] and inside["mac"] == ep["mac"]
    assert ns.reaches(ep["gateway4"])


def test_a_020_config_gives_ip4_and_ip6(mesos: tuple[Isolator, Namespaces]) -> None:
    isolator, namespaces = mesos
    ns = namespaces.new()
    cid = str(uuid.uuid4())
    result = isolator.attach(cid, ns, {"app": "web"}, network=NETWORK6).result()
    assert set(result) == {"cniVersion", "ip4", "ip6", "dns"} and result["cniVersion"] == "0.2.0", result
    ours = check_result(result, "0.2.0", "eth0", str(isolator.handle(cid)), (4, 6))
    inside = ns.interface("eth0")
    assert inside is not None and {str(ours[4]), str(ours[6])} <= inside["addresses"]
    assert ns.reaches(result["ip6"]["gateway"])


# -- labels and policy ------------------------------------------------------------------------


def test_network_info_labels_become_mesos_labels_and_an_identity(mesos: tuple[Isolator, Namespaces]) -> None:
    isolator, namespaces = mesos
    agent = isolator.agent
    team = f"cg{namespaces.tag}"
    cids = [str(uuid.uuid4()) for _ in range(3)]
    wanted = [{"app": "backend", "team": team}, {"app": "backend", "team": team}, {"app": "frontend", "team": team}]
    for cid, labels in zip(cids, wanted, strict=True):
        isolator.attach(cid, namespaces.new(), labels).result()
    eps = [agent.json("endpoint", "get", endpoint_id(cid, "eth0")) for cid in cids]
    assert eps[0]["labels"] == ["mesos:app=backend", f"mesos:team={team}"]
    assert eps[2]["labels"] == ["mesos:app=frontend", f"mesos:team={team}"]
    assert eps[0]["identity"] == eps[1]["identity"] != eps[2]["identity"]  # one label set, one identity
    identities = {i["id"]: i for i in agent.json("identity", "list")}
    for ep in eps:
        assert identities[ep["identity"]]["labels"] == ep["labels"] and not identities[ep["identity"]]["reserved"]


class Cluster:
    """Three Mesos containers with TCP servers on 80 and 81."""

    def __init__(self, isolator: Isolator, namespaces: Namespaces, procs: Processes) -> None:
        self.ns: dict[str, Netns] = {}
        self.ip: dict[str, str] = {}
        for app in ("frontend", "backend", "other"):
            ns = namespaces.new()
            result = isolator.attach(str(uuid.uuid4()), ns, {"app": app}).result()
            self.ns[app], self.ip[app] = ns, ip4_of(result).ip.compressed
            procs.start("ip", "netns", "exec", ns.name, "/usr/bin/python3", "-c", SERVER, app)
        for app, ns in self.ns.items():
            wait_until(lambda ns=ns: all(f":{p} " in ns.exec("ss", "-Hltn").stdout for p in (80, 81)), 10,
                       f"the servers of {app} to listen")

    def tcp(self, src: str, dst: str, port: int, timeout: float = 1.0) -> bool:
        out = self.ns[src].exec("/usr/bin/python3", "-c", CLIENT, self.ip[dst], str(port), str(timeout), check=False)
        return f"hello {port} from {dst}" in out.stdout


def test_policy_on_mesos_labels_is_enforced(mesos: tuple[Isolator, Namespaces], tmp_path: Path) -> None:
    isolator, namespaces = mesos
    agent = isolator.agent
    procs = Processes()
    try:
        c = Cluster(isolator, namespaces, procs)
        assert wait_until(lambda: c.tcp("other", "backend", 80), 10, "other -> backend:80 before any policy")
        policy = tmp_path / "mesos-policy.json"
        policy.write_text(json.dumps([{
            "labels": [{"key": "name", "value": "mesos-backend-80"}],
            "endpointSelector": {"matchLabels": {"mesos:app": "backend"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"mesos:app": "frontend"}}],
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
        }]))
        revision = json.loads(agent.cli("policy", "import", str(policy), "-o", "json").stdout)["revision"]
        agent.cli("policy", "wait", str(revision))
        assert c.tcp("frontend", "backend", 80)  # allowed
        assert not c.tcp("other", "backend", 80)  # denied: wrong peer
        assert not c.tcp("frontend", "backend", 81)  # denied: wrong port
        assert c.tcp("backend", "frontend", 81) and c.tcp("other", "frontend", 80)  # frontend is not selected
        agent.cli("policy", "delete", "--all")
        assert wait_until(lambda: c.tcp("other", "backend", 80), 10, "other -> backend:80 once the rule is gone")
    finally:
        with contextlib.suppress(AssertionError):
            agent.cli("policy", "delete", "--all")
        procs.close()


# -- DEL from the checkpoint ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["container-destroyed", "after-reboot", "netns-deleted"])
def test_del_from_the_checkpoint_cleans_everything(mesos: tuple[Isolator, Namespaces], how: str) -> None:
    isolator, namespaces = mesos
    agent = isolator.agent
    before = agent.snapshot()
    ns = namespaces.new()
    cid = str(uuid.uuid4())
    team = f"cg{namespaces.tag}"
    result = isolator.attach(cid, ns, {"app": "db", "team": team}).result()
    address = ip4_of(result).ip.compressed
    host = host_ifname(cid, "eth0")
    assert host in agent.links() and address in agent.bpf_addresses()
    if how == "after-reboot":  # the handle is no nsfs any more; the namespace (and the veth) still exist
        isolator.unmount(cid)
    elif how == "netns-deleted":
        isolator.unmount(cid)
        namespaces.delete(ns)
    out = isolator.detach(cid)
    out.empty()
    assert agent.snapshot() == before
    assert run("ip", "link", "show", "dev", host, check=False).returncode != 0
    assert not run("ip", "route", "show", address).stdout.strip()
    assert not [i for i in agent.json("identity", "list") if f"mesos:team={team}" in i["labels"]]
    if os.path.exists(ns.path):
        assert ns.links() == ["lo"]  # eth0 went with its host end, even without CNI_NETNS
    isolator.detach(cid).empty()  # and again: nothing left to do is still success
