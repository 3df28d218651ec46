"""Helpers of the CNI tiers: an agent without dockerd, throwaway namespaces, the plugin run as runtimes run it.

Everything is real (the `cellgate-cni` binary in a clean environment, `ip netns`, the agent's
eBPF datapath); nothing here needs dockerd. Names are `cg`-prefixed and unique per run, and
whatever a test creates is removed by the object that created it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import CELLGATE, Agent, run, unique_ranges, wait_until

PLUGIN = Path(sys.executable).with_name("cellgate-cni")  # the launcher `make setup` installs
VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
ERROR_KEYS = {"cniVersion", "code", "msg", "details"}
_ranges_taken: set[int] = set()


def vt(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def endpoint_id(container_id: str, ifname: str) -> str:
    """The agent's endpoint ID of a CNI attachment: sha256(containerID NUL ifname)."""
    return hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()


def host_ifname(container_id: str, ifname: str) -> str:
    return "cg" + endpoint_id(container_id, ifname)[:13]


# -- the agent --------------------------------------------------------------------------------


class CniAgent(Agent):
    """The harness agent without dockerd: no Docker socket, no plugin install, no periodic sweep.

    The sweep would forget endpoints whose veth vanished; with it out of the way, whatever
    cleans up after a DEL is that DEL.
    """

    def __init__(self, base: Path, name: str, failpoints: str = "") -> None:
        while True:
            v4, v6, n = unique_ranges()
            if n not in _ranges_taken:  # two agents of this run never share a range
                _ranges_taken.add(n)
                break
        super().__init__(base, name, v4, v6, docker_host="unix:///nonexistent")
        self.args[self.args.index("--sweep-interval") + 1] = "3600"
        self.args += ["--cni-bin-dir", ""]
        self.failpoints = failpoints

    def start(self, failpoints: str = "") -> None:
        super().start(failpoints or self.failpoints)

    def bpf_addresses(self) -> set[str]:
        """Addresses in the datapath's local-endpoint map (cg_ips)."""
        out = run("bpftool", "-j", "map", "dump", "pinned", str(self.bpf / "cg_ips")).stdout
        found = set()
        for entry in json.loads(out):
            key = entry["formatted"]["key"]
            raw = bytes(key["addr"][: 4 if key["family"] == 4 else 16])
            found.add(str(ipaddress.ip_address(raw)))
        return found

    def bpf_endpoint_count(self) -> int:
        return len(json.loads(run("bpftool", "-j", "map", "dump", "pinned", str(self.bpf / "cg_endpoints")).stdout))

    def pool(self, subnet: str) -> list[tuple[str, str]]:
        """(address, kind) of every allocation in the pool of `subnet`."""
        pools = self.json("ipam", "list")["pools"]
        return sorted((a["address"], a["kind"]) for p in pools if p["subnet"] == subnet for a in p["allocations"])

    def snapshot(self) -> dict[str, Any]:
        """What a failed or idempotent operation must leave exactly as it was."""
        return {
            "endpoints": sorted((e["id"], e["ipv4"], e["ipv6"], e["sandbox"], e["identity"], tuple(e["labels"]))
                                for e in self.endpoints()),
            "allocations": sorted(self.allocations()),
            "links": self.links(),
            "bpf": sorted(self.bpf_addresses()),
        }


@contextlib.contextmanager
def running_agent(factory: pytest.TempPathFactory, prefix: str, failpoints: str = "") -> Iterator[CniAgent]:
    name = prefix + secrets.token_hex(3)
    agent = CniAgent(factory.mktemp(name), name, failpoints)
    try:
        agent.start()
        yield agent
    finally:
        with contextlib.suppress(Exception):
            agent.stop()
        agent.cleanup()


# -- namespaces and processes ---------------------------------------------------------------


@dataclass(frozen=True)
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "-n", self.name, *args, check=check)

    def exec(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout)

    def links(self) -> list[str]:
        return sorted(x["ifname"] for x in json.loads(self.ip("-j", "link").stdout))

    def interface(self, ifname: str) -> dict[str, Any] | None:
        """{'mac', 'addresses': {ip/prefix}, 'up'} of `ifname` here, None if it is missing."""
        proc = self.ip("-j", "addr", "show", "dev", ifname, check=False)
        if proc.returncode != 0:
            return None
        (link,) = json.loads(proc.stdout)
        addrs = {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("scope") != "link"}
        return {"mac": link["address"], "addresses": addrs, "up": "UP" in link["flags"]}

    def ping(self, address: str) -> bool:
        return self.exec("ping", "-c", "1", "-W", "1", address, check=False).returncode == 0

    def reaches(self, address: str, timeout: float = 10) -> bool:
        return bool(wait_until(lambda: self.ping(address), timeout, f"ping {address} from {self.name}"))


class Namespaces:
    """Network namespaces of one test (`ip netns add cg…`), deleted at the end; also deletes on request."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.made: list[Netns] = []

    def new(self) -> Netns:
        ns = Netns(f"cg{self.tag}n{len(self.made)}")
        run("ip", "netns", "add", ns.name)
        self.made.append(ns)
        return ns

    @staticmethod
    def delete(ns: Netns) -> None:
        run("ip", "netns", "del", ns.name)

    def close(self) -> None:
        for ns in self.made:
            if os.path.exists(ns.path):
                run("ip", "netns", "del", ns.name, check=False)


class Processes:
    """Processes a test starts; each is killed by its own PID at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *cmd: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc)


# -- running the plugin -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    rc: int
    stdout: str
    stderr: str

    def result(self) -> dict[str, Any]:
        assert self.rc == 0, f"plugin failed ({self.rc}): {self.stdout} {self.stderr}"
        out = json.loads(self.stdout)
        assert isinstance(out, dict)
        return out

    def empty(self) -> None:
        """Success with nothing on stdout (DEL, CHECK, GC, STATUS)."""
        assert self.rc == 0, f"plugin failed ({self.rc}): {self.stdout} {self.stderr}"
        assert self.stdout.strip() == "", self.stdout

    def error(self, code: int | None = None) -> dict[str, Any]:
        """The CNI error object: on stdout, with a non-zero exit, and only a message on stderr."""
        assert self.rc != 0, f"plugin succeeded: {self.stdout}"
        err = json.loads(self.stdout)
        assert set(err) <= ERROR_KEYS and {"cniVersion", "code", "msg"} <= set(err), err
        assert isinstance(err["code"], int) and isinstance(err["msg"], str) and err["msg"], err
        assert err["cniVersion"] in VERSIONS, err
        assert self.stderr.startswith("cellgate-cni: ") and "Traceback" not in self.stderr, self.stderr
        if code is not None:
            assert err["code"] == code, err
        return err


def invoke(env: Mapping[str, str | None], stdin: str | bytes | Mapping[str, Any], plugin: Path = PLUGIN,
           path: str = HOST_PATH) -> Outcome:
    """Run the plugin with exactly `env` (None values left out) plus PATH, and `stdin`."""
    full = {"PATH": path, **{k: v for k, v in env.items() if v is not None}}
    data = stdin if isinstance(stdin, (str, bytes)) else json.dumps(stdin)
    proc = subprocess.run([str(plugin)], input=data.encode() if isinstance(data, str) else data, env=full,
                          capture_output=True, timeout=60, check=False)
    return Outcome(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


class Cni:
    """One test's CNI runtime: runs the plugin like libcni, DELs every attachment it tried at the end."""

    def __init__(self, agent: CniAgent, namespaces: Namespaces) -> None:
        self.agent = agent
        self.ns = namespaces
        self.tag = namespaces.tag
        self.tried: dict[tuple[str, str], dict[str, Any]] = {}
        self._n = 0

    def cid(self) -> str:
        self._n += 1
        return f"cg{self.tag}-{self._n}"

    def conf(self, network: str, version: str | None = "1.0.0", **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {"name": network, "type": "cellgate-cni", "socket": str(self.agent.api)}
        if version is not None:
            conf["cniVersion"] = version
        conf.update(extra)
        return conf

    @staticmethod
    def env(command: str, cid: str | None, ifname: str | None = "eth0", netns: str | None = None,
            args: str | None = None) -> dict[str, str | None]:
        return {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_NETNS": netns,
                "CNI_ARGS": args, "CNI_PATH": str(PLUGIN.parent)}

    def add(self, conf: Mapping[str, Any], cid: str, netns: str, ifname: str = "eth0",
            args: str | None = None) -> Outcome:
        self.tried[(cid, ifname)] = dict(conf)
        return invoke(self.env("ADD", cid, ifname, netns, args), conf)

    def delete(self, conf: Mapping[str, Any], cid: str, netns: str | None, ifname: str = "eth0",
               args: str | None = None) -> Outcome:
        return invoke(self.env("DEL", cid, ifname, netns, args), conf)

    def check(self, conf: Mapping[str, Any], cid: str, netns: str, ifname: str = "eth0") -> Outcome:
        return invoke(self.env("CHECK", cid, ifname, netns), conf)

    def close(self) -> None:
        for (cid, ifname), conf in self.tried.items():
            self.delete({k: v for k, v in conf.items() if k != "prevResult"}, cid, None, ifname)


# -- result validation ------------------------------------------------------------------------

IFACE_KEYS = {"name", "mac", "sandbox"}
IFACE_KEYS_11 = IFACE_KEYS | {"mtu", "socketPath", "pciID"}
ROUTE_KEYS = {"dst", "gw"}
ROUTE_KEYS_11 = ROUTE_KEYS | {"mtu", "advmss", "priority", "table", "scope"}


def check_result(result: Mapping[str, Any], version: str, ifname: str, sandbox: str, families: tuple[int, ...] = (4,),
                 prev: Mapping[str, Any] | None = None) -> dict[int, Any]:
    """Validate an ADD result strictly against the shape of `version`; our address per family."""
    assert result["cniVersion"] == version, result
    if vt(version) < (0, 3, 0):
        assert set(result) <= {"cniVersion", "ip4", "ip6", "dns"}, result
        assert isinstance(result.get("dns", {}), dict)
        ours = {}
        for family, key in ((4, "ip4"), (6, "ip6")):
            if family not in families:
                assert key not in result, result
                continue
            entry = result[key]
            assert set(entry) <= {"ip", "gateway", "routes"} and "ip" in entry, entry
            ip = ipaddress.ip_interface(entry["ip"])
            gateway = ipaddress.ip_address(entry["gateway"])
            assert ip.version == family == gateway.version and gateway in ip.network and gateway != ip.ip, entry
            for route in entry["routes"]:
                assert set(route) <= ROUTE_KEYS and ipaddress.ip_network(route["dst"]).version == family, route
            assert {"dst": "0.0.0.0/0" if family == 4 else "::/0", "gw": str(gateway)} in entry["routes"], entry
            ours[family] = ip
        return ours
    assert set(result) <= {"cniVersion", "interfaces", "ips", "routes", "dns"}, result
    new = vt(version) >= (1, 1, 0)
    ifaces, ips, routes = result["interfaces"], result["ips"], result["routes"]
    for iface in ifaces:
        assert set(iface) <= (IFACE_KEYS_11 if new else IFACE_KEYS) and isinstance(iface["name"], str), iface
        if "sandbox" in iface:
            assert MAC.match(iface.get("mac", "")), iface  # podman rejects a sandbox interface without a MAC
    mine = [i for i, x in enumerate(ifaces) if x["name"] == ifname and x.get("sandbox") == sandbox]
    assert len(mine) == 1, ifaces
    for ip in ips:
        keys = {"address", "gateway", "interface"} | ({"version"} if vt(version) < (1, 0, 0) else set())
        assert set(ip) == keys, (version, ip)
        address = ipaddress.ip_interface(ip["address"])
        if "version" in ip:
            assert ip["version"] == str(address.version), ip
        assert isinstance(ip["interface"], int) and 0 <= ip["interface"] < len(ifaces), ip
        assert ipaddress.ip_address(ip["gateway"]) in address.network, ip
    for route in routes:
        assert set(route) <= (ROUTE_KEYS_11 if new else ROUTE_KEYS), route
        ipaddress.ip_network(route["dst"])
    ours = {}
    for ip in ips:
        if ip["interface"] == mine[0]:
            address = ipaddress.ip_interface(ip["address"])
            assert address.version not in ours, ips
            ours[address.version] = address
    assert sorted(ours) == sorted(families), (families, ips)
    if prev is not None:  # chained: what came before is passed through, ours follows
        n = len(prev["interfaces"])
        assert ifaces[:n] == prev["interfaces"] and mine[0] >= n, ifaces
        assert ips[: len(prev["ips"])] == [
            {k: v for k, v in ip.items() if k != "version" or vt(version) < (1, 0, 0)} for ip in prev["ips"]]
        assert routes[: len(prev["routes"])] == prev["routes"]
        assert result["dns"] == prev["dns"]
    return ours


def installed_plugin(directory: Path) -> Path:
    """`cellgate install-cni --dir DIR` writes the plugin where a runtime looks for it."""
    run(CELLGATE, "install-cni", "--dir", str(directory))
    plugin = directory / "cellgate-cni"
    assert os.access(plugin, os.X_OK) and plugin.read_text().startswith("#!")
    return plugin
