"""CNI conformance of `cellgate-cni`: the binary run as runtimes run it, against a real agent.

Each test drives the plugin in a clean environment with the configuration on stdin, in
throwaway `ip netns` namespaces, and observes the result through the agent's CLI, the
kernel (`ip`, `bpftool`) and real packets. The numbers refer to the conformance behaviours
of reference/cni.md §7. No dockerd is involved.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cni_support import (
    PLUGIN,
    VERSIONS,
    Cni,
    CniAgent,
    Namespaces,
    Netns,
    Outcome,
    Processes,
    check_result,
    endpoint_id,
    host_ifname,
    invoke,
    running_agent,
    vt,
)
from tests.e2e.harness import run, wait_until

pytestmark = pytest.mark.e2e

NET = "cgconf"  # IPv4 network most tests share with the resident attachment
DUAL = "cgdual"  # IPv4 + IPv6
OTHER = "cgother"  # a second network for second interfaces


@pytest.fixture(scope="module")
def cni_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CniAgent]:
    with running_agent(tmp_path_factory, "cgc") as agent:
        yield agent


@pytest.fixture
def cni(cni_agent: CniAgent) -> Iterator[Cni]:
    namespaces = Namespaces()
    runtime = Cni(cni_agent, namespaces)
    try:
        yield runtime
    finally:
        try:
            runtime.close()
        finally:
            namespaces.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    try:
        yield p
    finally:
        p.close()


@dataclass(frozen=True)
class Resident:
    """An attachment on NET that lives for the whole module: a peer to ping, a network that exists."""

    ns: Netns
    cid: str
    ip: ipaddress.IPv4Interface
    gateway: str


@pytest.fixture(scope="module")
def resident(cni_agent: CniAgent) -> Iterator[Resident]:
    namespaces = Namespaces()
    runtime = Cni(cni_agent, namespaces)
    try:
        ns = namespaces.new()
        cid = runtime.cid()
        result = runtime.add(runtime.conf(NET), cid, ns.path).result()
        yield Resident(ns, cid, ipaddress.IPv4Interface(result["ips"][0]["address"]), result["ips"][0]["gateway"])
    finally:
        try:
            runtime.close()
        finally:
            namespaces.close()


def host_has_link(name: str) -> bool:
    return run("ip", "link", "show", "dev", name, check=False).returncode == 0


def counter(agent: CniAgent, name: str) -> int:
    return next((c["packets"] for c in agent.json("status")["counters"] if c["name"] == name), 0)


def state_files(agent: CniAgent) -> list[str]:
    return sorted(str(p.relative_to(agent.state)) for p in agent.state.rglob("*"))


def identities_with(agent: CniAgent, label: str) -> list[dict[str, Any]]:
    return [i for i in agent.json("identity", "list") if label in i["labels"]]


# -- 1, 23: VERSION ---------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [*VERSIONS, None])
def test_version_answers_without_agent_netns_or_path(asked: str | None) -> None:
    # What libcni sends: dummy netns/ifname/path, empty container ID; no agent is asked at all.
    env = {"CNI_COMMAND": "VERSION", "CNI_CONTAINERID": "", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy",
           "CNI_PATH": "dummy", "CELLGATE_SOCK": "/nonexistent/cellgate.sock"}
    out = invoke(env, {"cniVersion": asked} if asked else {}).result()
    assert out == {"cniVersion": asked or "1.0.0", "supportedVersions": list(VERSIONS)}


# -- 2, 3, 4, 22: versions and result shapes --------------------------------------------------


@pytest.mark.parametrize("version", ["9.9.9", "0.5.0", "1.2.0", "v1.0.0", 1])
def test_unsupported_version_is_error_1_listing_the_supported_ones(cni: Cni, version: Any) -> None:
    ns = cni.ns.new()
    before = cni.agent.snapshot()
    err = cni.add(cni.conf(NET, version), cni.cid(), ns.path).error(1)
    assert all(v in err["details"] for v in VERSIONS), err
    assert cni.agent.snapshot() == before and ns.links() == ["lo"]


@pytest.mark.parametrize("version", VERSIONS)
def test_add_result_has_the_shape_of_the_requested_version(cni: Cni, version: str) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    result = cni.add(cni.conf(DUAL, version, ipv6=True), cid, ns.path).result()
    ours = check_result(result, version, "eth0", ns.path, (4, 6))
    ep = cni.agent.json("endpoint", "get", endpoint_id(cid, "eth0"))
    assert (ep["ipv4"], ep["ipv6"], ep["sandbox"], ep["origin"]) == (str(ours[4]), str(ours[6]), ns.path, "cni")
    inside = ns.interface("eth0")
    assert inside is not None and inside["up"] and inside["mac"] == ep["mac"]
    assert {str(ours[4]), str(ours[6])} <= inside["addresses"]
    if vt(version) >= (0, 3, 0):
        (iface,) = result["interfaces"]
        assert iface == {"name": "eth0", "mac": ep["mac"], "sandbox": ns.path}
        assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": ep["gateway4"]}, {"dst": "::/0", "gw": ep["gateway6"]}]
    else:
        assert (result["ip4"]["gateway"], result["ip6"]["gateway"]) == (ep["gateway4"], ep["gateway6"])
    assert f"default via {ep['gateway4']} dev eth0" in ns.ip("-4", "route").stdout
    assert f"default via {ep['gateway6']} dev eth0" in ns.ip("-6", "route").stdout


def test_config_without_cni_version_is_010_and_gets_ip4(cni: Cni, resident: Resident) -> None:
    ns = cni.ns.new()
    result = cni.add(cni.conf(NET, None), cni.cid(), ns.path).result()
    ours = check_result(result, "0.1.0", "eth0", ns.path, (4,))
    assert ours[4] in resident.ip.network and result["ip4"]["gateway"] == resident.gateway
    # Errors speak the configuration's version too.
    assert cni.add(cni.conf(NET, None, bogus=1), cni.cid(), ns.path).error(2)["cniVersion"] == "0.1.0"


def test_sandbox_is_cni_netns_verbatim(cni: Cni) -> None:
    ns = cni.ns.new()
    path = f"/run/netns/{ns.name}"  # the same namespace as /var/run/netns/..., spelt differently
    result = cni.add(cni.conf(NET), cni.cid(), path).result()
    check_result(result, "1.0.0", "eth0", path)
    assert result["interfaces"][0]["sandbox"] == path


# -- 5: the interface name is taken -----------------------------------------------------------


def test_add_fails_when_ifname_exists_and_changes_nothing(cni: Cni, resident: Resident) -> None:
    ns = cni.ns.new()
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "cgpeer0")  # made by someone else
    before, links = cni.agent.snapshot(), ns.links()
    cid = cni.cid()
    err = cni.add(cni.conf(NET), cid, ns.path).error()
    assert "eth0" in err["msg"] and "exists" in err["msg"]
    assert cni.agent.snapshot() == before and ns.links() == links
    assert not host_has_link(host_ifname(cid, "eth0"))
    assert "eth0@cgpeer0" in ns.ip("link", "show", "eth0").stdout  # not "fixed" by deleting it (old cilium-cni)


def test_second_add_of_the_same_attachment_fails_and_keeps_the_first(cni: Cni) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    conf = cni.conf(NET, "0.4.0")
    result = cni.add(conf, cid, ns.path).result()
    before = cni.agent.snapshot()
    cni.add(conf, cid, ns.path).error()
    assert cni.agent.snapshot() == before
    cni.check({**conf, "prevResult": result}, cid, ns.path).empty()


# -- 6, 7, 12, B6: bad input is refused and changes nothing ----------------------------------


@pytest.mark.parametrize(("command", "missing"), [
    ("ADD", "CNI_CONTAINERID"), ("ADD", "CNI_IFNAME"), ("ADD", "CNI_NETNS"),
    ("CHECK", "CNI_CONTAINERID"), ("CHECK", "CNI_IFNAME"), ("CHECK", "CNI_NETNS"),
    ("DEL", "CNI_CONTAINERID"), ("DEL", "CNI_IFNAME"), ("ADD", "CNI_COMMAND"),
])
def test_missing_environment_is_error_4_naming_it(cni: Cni, command: str, missing: str) -> None:
    ns = cni.ns.new()
    before = cni.agent.snapshot()
    env = {**cni.env(command, cni.cid(), "eth0", ns.path), missing: None}
    err = invoke(env, cni.conf(NET)).error(4)
    assert missing in err["msg"], err
    assert cni.agent.snapshot() == before and ns.links() == ["lo"]


def test_unknown_command_is_error_4(cni: Cni) -> None:
    err = invoke(cni.env("REBOOT", cni.cid(), "eth0", "/var/run/netns/x"), cni.conf(NET)).error(4)
    assert "REBOOT" in err["msg"]


DROP = object()

BAD_INPUT = [
    pytest.param({"CNI_IFNAME": "a" * 16}, {}, 4, "CNI_IFNAME", id="ifname-16-chars"),
    pytest.param({"CNI_IFNAME": "eth/0"}, {}, 4, "CNI_IFNAME", id="ifname-slash"),
    pytest.param({"CNI_IFNAME": "eth:0"}, {}, 4, "CNI_IFNAME", id="ifname-colon"),
    pytest.param({"CNI_IFNAME": ".."}, {}, 4, "CNI_IFNAME", id="ifname-dotdot"),
    pytest.param({"CNI_CONTAINERID": "../x"}, {}, 4, "CNI_CONTAINERID", id="container-dotdot"),
    pytest.param({"CNI_CONTAINERID": "-x"}, {}, 4, "CNI_CONTAINERID", id="container-dash"),
    pytest.param({"CNI_NETNS": "/etc/passwd"}, {}, 4, "not a network namespace", id="netns-regular-file"),
    pytest.param({"CNI_NETNS": "/var/run/netns"}, {}, 4, "not a network namespace", id="netns-directory"),
    pytest.param({"CNI_NETNS": "/var/run/netns/cg-none-such"}, {}, 4, "No such file", id="netns-missing"),
    pytest.param({"CNI_NETNS": "run/netns/x"}, {}, 4, "absolute", id="netns-relative"),
    pytest.param({"CNI_ARGS": "garbage"}, {}, 4, "CNI_ARGS", id="args-garbage"),
    pytest.param({"CNI_ARGS": ";=;;"}, {}, 4, "CNI_ARGS", id="args-empty-key"),
    pytest.param({"CNI_ARGS": "IgnoreUnknown=1;A=b=c"}, {}, 4, "CNI_ARGS", id="args-equals-in-value"),
    pytest.param({"CNI_ARGS": "K8S_POD_NAME=web;CG_UNKNOWN=1"}, {}, 4, "CG_UNKNOWN", id="args-unknown-key"),
    pytest.param({"CNI_ARGS": "CELLGATE_LABELS=app"}, {}, 4, "CELLGATE_LABELS", id="args-label-without-colon"),
    pytest.param({"CNI_ARGS": "IP=garbage"}, {}, 4, "garbage", id="args-ip-garbage"),
    pytest.param({"CNI_ARGS": "IP=192.0.2.7"}, {}, 7, "192.0.2.7", id="args-ip-outside-subnet"),
    pytest.param({"CNI_ARGS": "MAC=01:00:5e:00:00:01"}, {}, 4, "MAC", id="args-multicast-mac"),
    pytest.param({}, {"cniVersion": "9.9.9"}, 1, "9.9.9", id="unknown-version"),
    pytest.param({}, '{"cniVersion": "1.0.0", "name": ', 6, "decode", id="malformed-json"),
    pytest.param({}, "[]", 6, "object", id="json-not-an-object"),
    pytest.param({}, {"name": DROP}, 7, "name", id="missing-name"),
    pytest.param({}, {"name": "../etc"}, 7, "name", id="bad-name"),
    pytest.param({}, {"bridge": "cg0"}, 2, "'bridge' = \"cg0\"", id="unknown-field"),
    pytest.param({}, {"subnet": "10.0.0.0/33"}, 2, "subnet = \"10.0.0.0/33\"", id="bad-subnet"),
    pytest.param({}, {"subnet": "fd00::/64"}, 2, "subnet = \"fd00::/64\"", id="subnet-wrong-family"),
    pytest.param({}, {"ipv6": "yes"}, 2, "ipv6 = \"yes\"", id="bad-ipv6-flag"),
    pytest.param({}, {"args": {"cni": {"labels": "app=web"}}}, 7, "args.cni.labels", id="labels-not-a-list"),
]


@pytest.mark.parametrize(("env", "stdin", "code", "needle"), BAD_INPUT)
def test_bad_input_is_refused_and_changes_nothing(cni: Cni, resident: Resident, env: dict[str, str],
                                                  stdin: dict[str, Any] | str, code: int, needle: str) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    if isinstance(stdin, str):
        conf: Any = stdin
    else:
        conf = {k: v for k, v in {**cni.conf(NET), **stdin}.items() if v is not DROP}
    full = {**cni.env("ADD", cid, "eth0", ns.path), **env}
    before, files = cni.agent.snapshot(), state_files(cni.agent)
    err = invoke(full, conf).error(code)
    assert needle in err["msg"], err
    assert cni.agent.snapshot() == before and state_files(cni.agent) == files
    assert ns.links() == ["lo"] and not host_has_link(host_ifname(full["CNI_CONTAINERID"] or "", full["CNI_IFNAME"]))


def test_ipam_key_is_refused_with_a_pointer_to_subnet(cni: Cni) -> None:
    ns = cni.ns.new()
    before = cni.agent.snapshot()
    conf = cni.conf(NET, ipam={"type": "host-local", "ranges": [[{"subnet": "10.0.0.0/24"}]]})
    err = cni.add(conf, cni.cid(), ns.path).error(2)
    assert "'ipam'" in err["msg"] and "host-local" in err["msg"] and "subnet" in err["details"], err
    assert cni.agent.snapshot() == before and ns.links() == ["lo"]


PREV_OK = {"cniVersion": "1.0.0", "interfaces": [{"name": "cgbr0", "mac": "02:00:00:00:00:01"}],
           "ips": [{"address": "192.168.77.5/24", "gateway": "192.168.77.1", "interface": 0}], "routes": [], "dns": {}}

# (extra configuration, CNI error code, text the message must contain): wrong types and shapes anywhere
# in the configuration, each refused before the agent is asked (prevResult ones used to be noticed only
# after the attachment had been made). Subnets go to a network of their own, which must not appear.
MALFORMED = [
    pytest.param({"runtimeConfig": []}, 7, "runtimeConfig", id="runtime-config-list"),
    pytest.param({"runtimeConfig": "ips"}, 7, "runtimeConfig", id="runtime-config-string"),
    pytest.param({"runtimeConfig": {"ips": "10.0.0.1"}}, 7, "runtimeConfig.ips", id="ips-string"),
    pytest.param({"runtimeConfig": {"ips": 5}}, 7, "runtimeConfig.ips", id="ips-number"),
    pytest.param({"runtimeConfig": {"ips": [1]}}, 7, "runtimeConfig.ips[0]", id="ips-number-item"),
    pytest.param({"runtimeConfig": {"ips": [None]}}, 7, "runtimeConfig.ips[0]", id="ips-null-item"),
    pytest.param({"runtimeConfig": {"ips": ["garbage"]}}, 7, "runtimeConfig.ips[0]", id="ips-garbage"),
    pytest.param({"runtimeConfig": {"ips": {"a": "10.0.0.1"}}}, 7, "runtimeConfig.ips", id="ips-object"),
    pytest.param({"runtimeConfig": {"mac": 5}}, 7, "runtimeConfig.mac", id="mac-number"),
    pytest.param({"runtimeConfig": {"mac": "zz"}}, 7, "runtimeConfig.mac", id="mac-garbage"),
    pytest.param({"runtimeConfig": {"mac": "01:00:5e:00:00:01"}}, 7, "runtimeConfig.mac", id="mac-multicast"),
    pytest.param({"runtimeConfig": {"portMappings": {"hostPort": 80}}}, 7, "runtimeConfig.portMappings",
                 id="ports-object"),
    pytest.param({"runtimeConfig": {"portMappings": [80]}}, 7, "runtimeConfig.portMappings[0]", id="ports-number"),
    pytest.param({"runtimeConfig": {"portMappings": [{"hostPort": "80", "containerPort": 80}]}}, 7,
                 "runtimeConfig.portMappings[0].hostPort", id="ports-string-port"),
    pytest.param({"runtimeConfig": {"portMappings": [{"hostPort": 70000, "containerPort": 80}]}}, 7,
                 "runtimeConfig.portMappings[0].hostPort", id="ports-out-of-range"),
    pytest.param({"runtimeConfig": {"portMappings": [{"containerPort": 80}]}}, 7,
                 "runtimeConfig.portMappings[0].hostPort", id="ports-missing-host-port"),
    pytest.param({"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": 6}]}}, 7,
                 "runtimeConfig.portMappings[0].protocol", id="ports-numeric-protocol"),
    pytest.param({"runtimeConfig": {"aliases": ["web"]}}, 7, "runtimeConfig.aliases", id="aliases-list"),
    pytest.param({"runtimeConfig": {"aliases": {"net": "web"}}}, 7, "runtimeConfig.aliases.net", id="aliases-str"),
    pytest.param({"runtimeConfig": {"dns": []}}, 7, "runtimeConfig.dns", id="runtime-dns-list"),
    pytest.param({"prevResult": []}, 7, "prevResult", id="prev-list"),
    pytest.param({"prevResult": {"interfaces": 5}}, 7, "prevResult.interfaces", id="prev-interfaces-number"),
    pytest.param({"prevResult": {"interfaces": ["eth0"]}}, 7, "prevResult.interfaces[0]", id="prev-iface-string"),
    pytest.param({"prevResult": {"interfaces": [{"name": 5}]}}, 7, "prevResult.interfaces[0].name",
                 id="prev-iface-name-number"),
    pytest.param({"prevResult": {"ips": [{"address": 7}]}}, 7, "prevResult.ips[0].address", id="prev-address-number"),
    pytest.param({"prevResult": {"ips": [{"interface": "x"}]}}, 7, "prevResult.ips[0]", id="prev-ip-no-address"),
    pytest.param({"prevResult": {"ips": [{"address": "garbage"}]}}, 7, "prevResult.ips[0].address",
                 id="prev-address-garbage"),
    pytest.param({"prevResult": {**PREV_OK, "ips": [{"address": "192.168.77.5/24", "interface": 3}]}}, 7,
                 "prevResult.ips[0].interface", id="prev-interface-out-of-range"),
    pytest.param({"prevResult": {**PREV_OK, "ips": [{"address": "192.168.77.5/24", "interface": True}]}}, 7,
                 "prevResult.ips[0].interface", id="prev-interface-bool"),
    pytest.param({"prevResult": {**PREV_OK, "ips": [{"address": "192.168.77.5/24", "gateway": 1}]}}, 7,
                 "prevResult.ips[0].gateway", id="prev-gateway-number"),
    pytest.param({"prevResult": {"routes": "x"}}, 7, "prevResult.routes", id="prev-routes-string"),
    pytest.param({"prevResult": {"routes": [{"dst": 5}]}}, 7, "prevResult.routes[0].dst", id="prev-route-dst"),
    pytest.param({"prevResult": {"routes": [{"gw": "192.168.77.1"}]}}, 7, "prevResult.routes[0].dst",
                 id="prev-route-no-dst"),
    pytest.param({"prevResult": {"dns": "x"}}, 7, "prevResult.dns", id="prev-dns-string"),
    pytest.param({"prevResult": {"dns": {"nameservers": "1.1.1.1"}}}, 7, "prevResult.dns.nameservers",
                 id="prev-dns-nameservers"),
    pytest.param({"args": []}, 7, "args", id="args-list"),
    pytest.param({"args": {"cni": []}}, 7, "args.cni", id="args-cni-list"),
    pytest.param({"args": {"cni": {"labels": [{"key": 5}]}}}, 7, "args.cni.labels", id="args-label-key-number"),
    pytest.param({"args": {"cni": {"labels": [{"key": "app", "value": {"x": 1}}]}}}, 7, "args.cni.labels",
                 id="args-label-value-object"),
    pytest.param({"args": {"org.apache.mesos": []}}, 7, "org.apache.mesos", id="mesos-list"),
    pytest.param({"args": {"org.apache.mesos": {"network_info": 5}}}, 7, "network_info", id="mesos-info-number"),
    pytest.param({"args": {"org.apache.mesos": {"network_info": {"labels": {"labels": "x"}}}}}, 7,
                 "network_info.labels.labels", id="mesos-labels-string"),
    pytest.param({"cni.dev/attachments": "x"}, 7, "cni.dev/attachments", id="attachments-string"),
    pytest.param({"cni.dev/valid-attachments": [5]}, 7, "cni.dev/valid-attachments[0]", id="valid-attachment-number"),
    pytest.param({"cni.dev/attachments": [{"containerID": 5, "ifname": "eth0"}]}, 7,
                 "cni.dev/attachments[0].containerID", id="attachment-id-number"),
    pytest.param({"dns": []}, 7, "dns", id="dns-list"),
    pytest.param({"dns": {"nameservers": "1.1.1.1"}}, 7, "dns.nameservers", id="dns-nameservers-string"),
    pytest.param({"dns": {"nameservers": [1]}}, 7, "dns.nameservers[0]", id="dns-nameserver-number"),
    pytest.param({"dns": {"domain": 5}}, 7, "dns.domain", id="dns-domain-number"),
    pytest.param({"capabilities": []}, 7, "capabilities", id="capabilities-list"),
    pytest.param({"capabilities": {"ips": "yes"}}, 7, "capabilities.ips", id="capability-string"),
    pytest.param({"socket": 5}, 7, "socket", id="socket-number"),
    pytest.param({"type": 5}, 7, "type", id="type-number"),
    pytest.param({"cniVersions": "1.0.0"}, 7, "cniVersions", id="cni-versions-string"),
    pytest.param({"disableCheck": "yes"}, 7, "disableCheck", id="disable-check-string"),
    pytest.param({"subnet": 5}, 2, "subnet = 5", id="subnet-number"),
    pytest.param({"ipv6Subnet": ["fd00::/64"]}, 2, "ipv6Subnet", id="ipv6-subnet-list"),
    pytest.param({"subnet": "127.0.0.0/24"}, 7, "loopback", id="subnet-loopback"),
    pytest.param({"subnet": "224.0.0.0/24"}, 7, "multicast", id="subnet-multicast"),
    pytest.param({"subnet": "169.254.0.0/24"}, 7, "link-local", id="subnet-link-local"),
    pytest.param({"ipv6Subnet": "fe80::/64"}, 7, "link-local", id="ipv6-subnet-link-local"),
    pytest.param({"ipv6Subnet": "ff05::/64"}, 7, "multicast", id="ipv6-subnet-multicast"),
    pytest.param({"ipv6Subnet": "::ffff:0:0/104"}, 7, "IPv4-mapped", id="ipv6-subnet-v4-mapped"),
]


@pytest.mark.parametrize(("extra", "code", "needle"), MALFORMED)
def test_malformed_configuration_is_a_cni_error_and_leaves_nothing(
        cni: Cni, resident: Resident, extra: dict[str, Any], code: int, needle: str) -> None:
    agent = cni.agent
    ns = cni.ns.new()
    cid = cni.cid()
    before, networks, files = agent.snapshot(), agent.json("network", "list"), state_files(agent)
    network = f"cgm{cni.tag}" if {"subnet", "ipv6Subnet"} & set(extra) else NET
    out = cni.add(cni.conf(network, "1.0.0", **extra), cid, ns.path)
    assert out.rc == 1 and out.stdout.count("\n") == 1, out
    err = out.error(code)
    assert needle in err["msg"], err
    assert agent.snapshot() == before and agent.json("network", "list") == networks
    assert state_files(agent) == files
    assert ns.links() == ["lo"] and not host_has_link(host_ifname(cid, "eth0"))


def test_a_failed_first_add_leaves_no_network_so_the_corrected_configuration_works(cni: Cni) -> None:
    agent = cni.agent
    *_, right, wrong = ipaddress.ip_network(agent.v4).subnets(new_prefix=24)  # last /24s: no test draws them
    name, ns = f"cgfix{cni.tag}", cni.ns.new()
    wanted = right.network_address + 9
    before, networks = agent.snapshot(), agent.json("network", "list")
    err = cni.add(cni.conf(name, subnet=str(wrong)), cni.cid(), ns.path, args=f"IP={wanted}").error(7)
    assert str(wanted) in err["msg"], err
    assert agent.snapshot() == before and agent.json("network", "list") == networks
    assert not any(p["subnet"] == str(wrong) for p in agent.json("ipam", "list")["pools"])
    assert not run("ip", "route", "show", str(wrong)).stdout.strip()
    result = cni.add(cni.conf(name, subnet=str(right)), cni.cid(), ns.path, args=f"IP={wanted}").result()
    assert result["ips"][0]["address"] == f"{wanted}/24"
    (net,) = [n for n in agent.json("network", "list") if n["name"] == name]
    assert net["subnets"] == [str(right)]


# -- 8: errors when the agent is down ---------------------------------------------------------


def test_agent_down_add_is_error_11_on_stdout(cni: Cni, tmp_path: Path) -> None:
    ns = cni.ns.new()
    dead = tmp_path / "dead.sock"  # a socket nobody listens on: connection refused
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))
    for sock in (tmp_path / "missing.sock", dead):
        conf = {**cni.conf(NET, "1.0.0"), "socket": str(sock)}
        err = cni.add(conf, cni.cid(), ns.path).error(11)
        assert err["cniVersion"] == "1.0.0" and str(sock) in err["details"], err
        assert ns.links() == ["lo"]


# -- 9, 10: DEL always succeeds and cleans up ------------------------------------------------


@pytest.mark.parametrize("how", ["twice", "without-netns", "empty-netns", "after-netns-deleted",
                                 "with-then-without-prevresult", "dead-netns-path"])
def test_del_succeeds_and_cleans_host_state(cni: Cni, resident: Resident, how: str) -> None:
    agent = cni.agent
    ns = cni.ns.new()
    cid = cni.cid()
    label = f"cgdel{cni.tag}"
    conf = cni.conf(NET, "0.4.0", args={"cni": {"labels": [{"key": label, "value": how}]}})
    before = agent.snapshot()
    result = cni.add(conf, cid, ns.path).result()
    address = result["ips"][0]["address"].split("/")[0]
    host = host_ifname(cid, "eth0")
    assert host in agent.links() and address in agent.bpf_addresses() and identities_with(agent, f"cni:{label}={how}")
    assert run("ip", "route", "show", address).stdout.strip()
    if how == "twice":
        cni.delete(conf, cid, ns.path).empty()
        cni.delete(conf, cid, ns.path).empty()
    elif how == "without-netns":  # Mesos after a reboot
        cni.delete(conf, cid, None).empty()
    elif how == "empty-netns":  # ctr
        cni.delete(conf, cid, "").empty()
    elif how == "after-netns-deleted":
        cni.ns.delete(ns)
        cni.delete(conf, cid, ns.path).empty()
    elif how == "dead-netns-path":  # the path exists but is no namespace any more
        run("umount", ns.path)
        cni.delete(conf, cid, ns.path).empty()
        run("ip", "netns", "del", ns.name)
    else:  # libcni: the cached result on the first DEL, nothing on the second
        cni.delete({**conf, "prevResult": result}, cid, ns.path).empty()
        cni.delete(conf, cid, ns.path).empty()
    assert agent.snapshot() == before
    assert not host_has_link(host)
    assert not run("ip", "route", "show", address).stdout.strip()
    assert not run("ip", "neigh", "show", "to", address).stdout.strip()
    assert not identities_with(agent, f"cni:{label}={how}")
    if os.path.exists(ns.path):
        assert ns.links() == ["lo"]


def test_del_of_an_unknown_container_succeeds_and_changes_nothing(cni: Cni, resident: Resident) -> None:
    ns = cni.ns.new()
    before = cni.agent.snapshot()
    for netns in (ns.path, None, ""):
        cni.delete(cni.conf(NET), "cg-never-added", netns).empty()
    cni.delete(cni.conf("cgnosuchnet", "0.2.0"), "cg-never-added", None).empty()
    assert cni.agent.snapshot() == before


# -- 11: a failed ADD rolls back --------------------------------------------------------------


def test_failed_add_rolls_back_and_del_succeeds(tmp_path_factory: pytest.TempPathFactory) -> None:
    with running_agent(tmp_path_factory, "cgf", "cni.add.after_attach=error") as agent:
        namespaces = Namespaces()
        runtime = Cni(agent, namespaces)
        try:
            conf = runtime.conf("cgfail", "1.0.0")
            snapshots = []
            for _ in range(2):  # the ADD that created the network takes it away again, pools and host device too
                ns = namespaces.new()
                cid = runtime.cid()
                err = runtime.add(conf, cid, ns.path).error()
                assert "failpoint" in err["msg"]
                assert ns.links() == ["lo"]  # the interface had moved in; it is gone again
                assert not host_has_link(host_ifname(cid, "eth0"))
                assert agent.endpoints() == [] and agent.json("network", "list") == []
                assert agent.allocations() == [] and agent.json("ipam", "list")["pools"] == []
                assert agent.links() == [] and agent.bpf_addresses() == set()
                snapshots.append(agent.snapshot())
                runtime.delete(conf, cid, ns.path).empty()  # the runtime's DEL after the failure
                runtime.delete(conf, cid, None).empty()
                assert agent.snapshot() == snapshots[-1]
            assert snapshots[0] == snapshots[1]
        finally:
            try:
                runtime.close()
            finally:
                namespaces.close()


def test_del_while_the_agent_is_down_is_retried_and_completes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """F2: the agent dies (SIGKILL) with attachments in place. DEL fails with 11 while it is down (the
    runtime retries); after the restart the survivors work and the retried DEL leaves no trace."""
    with running_agent(tmp_path_factory, "cgk") as agent:
        namespaces = Namespaces()
        runtime = Cni(agent, namespaces)
        try:
            conf = runtime.conf("cgcrash", "1.0.0")
            before = agent.snapshot()
            keep_ns, gone_ns = namespaces.new(), namespaces.new()
            keep, gone = runtime.cid(), runtime.cid()
            kept = runtime.add(conf, keep, keep_ns.path).result()
            runtime.add(conf, gone, gone_ns.path).result()
            crashed = agent.snapshot()
            agent.signal(signal.SIGKILL)
            runtime.delete(conf, gone, gone_ns.path).error(11)
            agent.start()
            assert agent.snapshot() == crashed  # restored exactly
            runtime.check({**conf, "prevResult": kept}, keep, keep_ns.path).empty()
            assert keep_ns.reaches(kept["ips"][0]["gateway"])
            runtime.delete(conf, gone, gone_ns.path).empty()
            runtime.delete(conf, gone, None).empty()
            assert gone_ns.links() == ["lo"] and not host_has_link(host_ifname(gone, "eth0"))
            assert [e["id"] for e in agent.endpoints()] == [endpoint_id(keep, "eth0")]
            assert agent.json("ipam", "check", "--grace", "0")["ok"]
            runtime.delete(conf, keep, keep_ns.path).empty()
            after = agent.snapshot()  # only the network itself remains: its host device and gateway
            assert after["endpoints"] == before["endpoints"] == [] and after["bpf"] == []
            assert after["links"] == [f"cg_{agent.name}"] and [a[1] for a in after["allocations"]] == ["gateway"]
        finally:
            try:
                runtime.close()
            finally:
                namespaces.close()


# -- 13: prevResult is passed through --------------------------------------------------------


def bridge_result(version: str) -> dict[str, Any]:
    """What a bridge plugin before us in the chain would have returned, in `version`."""
    ip: dict[str, Any] = {"address": "192.168.77.5/24", "gateway": "192.168.77.1", "interface": 2}
    if vt(version) < (1, 0, 0):
        ip = {"version": "4", **ip}
    return {
        "cniVersion": version,
        "interfaces": [{"name": "cgbr0", "mac": "02:00:00:00:00:01"},
                       {"name": "vethcg1", "mac": "02:00:00:00:00:02"},
                       {"name": "net1", "mac": "02:00:00:00:00:03", "sandbox": "/var/run/netns/elsewhere"}],
        "ips": [ip],
        "routes": [{"dst": "192.168.0.0/16", "gw": "192.168.77.1"}],
        "dns": {"nameservers": ["192.168.77.1"], "search": ["cg.example"]},
    }


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_prev_result_is_passed_through_and_ours_appended(cni: Cni, version: str) -> None:
    ns = cni.ns.new()
    prev = bridge_result(version)
    result = cni.add({**cni.conf(NET, version), "prevResult": prev}, cni.cid(), ns.path).result()
    check_result(result, version, "eth0", ns.path, (4,), prev=prev)
    assert result["interfaces"][3]["name"] == "eth0" and result["ips"][1]["interface"] == 3


# -- 14: CHECK --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_passes_right_after_add(cni: Cni, version: str) -> None:
    conf = cni.conf(NET, version)
    for _ in range(3):
        ns = cni.ns.new()
        cid = cni.cid()
        result = cni.add(conf, cid, ns.path).result()
        cni.check({**conf, "prevResult": result}, cid, ns.path).empty()


def test_check_tolerates_routes_added_by_later_plugins(cni: Cni) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    conf = cni.conf(NET)
    result = cni.add(conf, cid, ns.path).result()
    ns.ip("route", "add", "192.0.2.0/24", "via", result["ips"][0]["gateway"])
    ns.ip("link", "add", "cgx0", "type", "veth", "peer", "name", "cgx1")
    cni.check({**conf, "prevResult": result}, cid, ns.path).empty()


def test_check_fails_when_the_host_veth_is_deleted(cni: Cni) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    conf = cni.conf(NET)
    result = cni.add(conf, cid, ns.path).result()
    cni.check({**conf, "prevResult": result}, cid, ns.path).empty()
    run("ip", "link", "del", host_ifname(cid, "eth0"))
    err = cni.check({**conf, "prevResult": result}, cid, ns.path).error()
    assert host_ifname(cid, "eth0") in err["msg"] or "eth0" in err["msg"], err
    cni.delete(conf, cid, ns.path).empty()
    assert all(e["id"] != endpoint_id(cid, "eth0") for e in cni.agent.endpoints())


def test_check_fails_when_the_address_is_gone(cni: Cni) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    conf = cni.conf(NET)
    result = cni.add(conf, cid, ns.path).result()
    address = result["ips"][0]["address"]
    ns.ip("addr", "del", address, "dev", "eth0")
    err = cni.check({**conf, "prevResult": result}, cid, ns.path).error()
    assert address in err["msg"], err


def test_check_of_an_unknown_container_is_error_3(cni: Cni) -> None:
    ns = cni.ns.new()
    cni.check(cni.conf(NET), "cg-never-added", ns.path).error(3)


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "0.3.1", None])
def test_check_is_refused_below_040(cni: Cni, resident: Resident, version: str | None) -> None:
    err = cni.check(cni.conf(NET, version), resident.cid, resident.ns.path).error(1)
    assert "CHECK" in err["msg"]


# -- 15: labels from every runtime ------------------------------------------------------------


def mesos_args(*pairs: tuple[str, str]) -> dict[str, Any]:
    labels = [{"key": k, "value": v} for k, v in pairs]
    return {"org.apache.mesos": {"network_info": {"name": NET, "labels": {"labels": labels}}}}


LABELS = [
    pytest.param({"args": mesos_args(("app", "db"), ("tier", "2"))}, None, ["mesos:app=db", "mesos:tier=2"],
                 id="mesos-network-info"),
    pytest.param({"args": {"cni": {"labels": [{"key": "app", "value": "db"}]}}}, None, ["cni:app=db"],
                 id="args-cni-labels"),
    pytest.param({}, "IgnoreUnknown=1;K8S_POD_NAME=web-1;K8S_POD_NAMESPACE=shop",
                 ["cni:io.kubernetes.pod.namespace=shop"], id="k8s-namespace"),
    pytest.param({}, "CELLGATE_LABELS=app:db,tier:2", ["cni:app=db", "cni:tier=2"], id="cellgate-labels"),
    pytest.param({"args": {"cni": {"labels": [{"key": "team", "value": "x"}]}}},
                 "IgnoreUnknown=1;CG_FROM_PODMAN=1;K8S_POD_NAMESPACE=shop;CELLGATE_LABELS=app:db",
                 ["cni:app=db", "cni:io.kubernetes.pod.namespace=shop", "cni:team=x"], id="all-forms-together"),
    pytest.param({"args": {"cni": {"labels": [{"key": "reserved:host", "value": ""}, {"key": "k8s:app", "value": "x"},
                                              {"key": "app", "value": "ok"}]}}},
                 None, ["cni:app=ok"], id="no-source-spoofing"),
]


@pytest.mark.parametrize(("extra", "args", "want"), LABELS)
def test_labels_become_the_endpoint_identity(cni: Cni, extra: dict[str, Any], args: str | None,
                                             want: list[str]) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    cni.add(cni.conf(NET, **extra), cid, ns.path, args=args).result()
    ep = cni.agent.json("endpoint", "get", endpoint_id(cid, "eth0"))
    assert ep["labels"] == want
    (identity,) = [i for i in cni.agent.json("identity", "list") if i["id"] == ep["identity"]]
    assert identity["labels"] == want and identity["id"] >= 256 and not identity["reserved"]


# -- 16: capabilities and runtimeConfig -------------------------------------------------------


def test_runtime_config_ips_honoured_unknown_keys_ignored(cni: Cni, resident: Resident) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    wanted = resident.ip.network[200]
    conf = cni.conf(NET, "0.4.0",  # as podman 4.3 sends it, capabilities left in
                    capabilities={"aliases": True, "portMappings": True, "ips": True, "mac": True, "dns": True},
                    runtimeConfig={"ips": [f"{wanted}/{resident.ip.network.prefixlen}"],
                                   "aliases": {NET: ["web", "f970f9d622ea"]},
                                   "portMappings": [{"containerPort": 80, "hostPort": 18080, "protocol": "tcp"}],
                                   "cgSomethingNew": {"x": 1}})
    result = cni.add(conf, cid, ns.path, args="IgnoreUnknown=1;K8S_POD_NAME=cgweb").result()
    assert check_result(result, "0.4.0", "eth0", ns.path)[4] == ipaddress.ip_interface(
        f"{wanted}/{resident.ip.network.prefixlen}")
    assert f"{wanted}/" in str(ns.interface("eth0"))


# -- 17: concurrency --------------------------------------------------------------------------


def test_twenty_parallel_adds_then_dels(cni: Cni) -> None:
    agent = cni.agent
    conf = cni.conf("cgpar", "1.0.0")
    namespaces = [cni.ns.new() for _ in range(30)]
    cids = [cni.cid() for _ in namespaces]

    def add(i: int) -> Outcome:
        return cni.add(conf, cids[i], namespaces[i].path)

    def delete(i: int) -> Outcome:
        return cni.delete(conf, cids[i], namespaces[i].path)

    def live_addresses(indexes: range) -> list[str]:
        out = []
        for i in indexes:
            inside = namespaces[i].interface("eth0")
            assert inside is not None, i
            out.extend(inside["addresses"])
        return out

    with ThreadPoolExecutor(20) as pool:
        results = [o.result() for o in pool.map(add, range(20))]
        addresses = [r["ips"][0]["address"] for r in results]
        assert len(set(addresses)) == 20
        assert sorted(live_addresses(range(20))) == sorted(addresses)
        subnet = str(ipaddress.ip_interface(addresses[0]).network)
        gateway = results[0]["ips"][0]["gateway"]
        assert len(agent.pool(subnet)) == 21
        # L2: DELs racing ADDs of other containers
        racing = [pool.submit(delete, i) for i in range(10)] + [pool.submit(add, i) for i in range(20, 30)]
        outcomes = [f.result() for f in racing]
        for outcome in outcomes[:10]:
            outcome.empty()
        live = live_addresses(range(10, 30))
        assert len(set(live)) == 20 and [o.result()["ips"][0]["address"] for o in outcomes[10:]] == live[10:]
        assert all(namespaces[i].links() == ["lo"] for i in range(10))
        assert len(agent.pool(subnet)) == 21
        for outcome in pool.map(delete, range(10, 30)):
            outcome.empty()
    assert agent.pool(subnet) == [(gateway, "gateway")]
    assert not set(agent.links()) & {host_ifname(cid, "eth0") for cid in cids}
    assert all(ns.links() == ["lo"] for ns in namespaces)
    assert agent.json("ipam", "check", "--grace", "0")["ok"]


def test_descriptors_grow_only_with_the_request_pool(cni: Cni) -> None:
    """Each request thread that touched pyroute2 used to leave a netlink socket behind: two
    descriptors per endpoint, until the agent ran out. Now they are bounded by the pool."""
    agent = cni.agent
    assert agent.proc is not None
    proc = Path(f"/proc/{agent.proc.pid}")

    def fds_and_threads() -> tuple[int, int]:
        return len(list((proc / "fd").iterdir())), len(list((proc / "task").iterdir()))

    conf = cni.conf("cgfds", "1.0.0")
    ns = cni.ns.new()
    cni.add(conf, cni.cid(), ns.path).result()  # the network exists before counting
    fds, threads = fds_and_threads()
    for _ in range(30):
        cid = cni.cid()
        cni.add(conf, cid, ns.path, ifname="eth1").result()
        cni.delete(conf, cid, ns.path, ifname="eth1").empty()
    fds_after, threads_after = fds_and_threads()
    assert fds_after - fds <= 2 * max(0, threads_after - threads) + 4, (fds, fds_after, threads, threads_after)


# -- 18: a second interface -------------------------------------------------------------------


def test_second_interface_on_another_network_leaves_eth0_working(cni: Cni, resident: Resident) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    conf0, conf1 = cni.conf(NET), cni.conf(OTHER)
    r0 = cni.add(conf0, cid, ns.path, "eth0").result()
    r1 = cni.add(conf1, cid, ns.path, "eth1").result()
    a0, a1 = (ipaddress.ip_interface(r["ips"][0]["address"]) for r in (r0, r1))
    g0, g1 = r0["ips"][0]["gateway"], r1["ips"][0]["gateway"]
    assert a0.network != a1.network and endpoint_id(cid, "eth0") != endpoint_id(cid, "eth1")
    assert ns.reaches(g0) and ns.reaches(g1) and ns.reaches(str(resident.ip.ip))
    assert f"default via {g0} dev eth0" in ns.ip("-4", "route").stdout
    cni.check({**conf1, "prevResult": r1}, cid, ns.path, "eth1").empty()
    cni.delete(conf1, cid, ns.path, "eth1").empty()
    assert "eth1" not in ns.links()
    inside = ns.interface("eth0")
    assert inside is not None and str(a0) in inside["addresses"]
    cni.check({**conf0, "prevResult": r0}, cid, ns.path, "eth0").empty()
    assert ns.reaches(g0) and ns.reaches(str(resident.ip.ip))
    assert f"default via {g0} dev eth0" in ns.ip("-4", "route").stdout


# -- 19: IP= and MAC= in CNI_ARGS -------------------------------------------------------------


def test_network_reload_keeps_address_and_mac(cni: Cni) -> None:
    ns = cni.ns.new()
    cid = cni.cid()
    conf = cni.conf(NET, "1.0.0")
    args = "IgnoreUnknown=1;K8S_POD_NAME=cgweb"
    first = cni.add(conf, cid, ns.path, args=args).result()
    address, mac = first["ips"][0]["address"], first["interfaces"][0]["mac"]
    cni.delete({**conf, "prevResult": first}, cid, ns.path, args=args).empty()
    ip = address.split("/")[0]
    again = cni.add(conf, cid, ns.path, args=f"{args};MAC={mac};IP={ip}").result()  # what `podman network reload` sends
    assert (again["ips"][0]["address"], again["interfaces"][0]["mac"]) == (address, mac)
    assert ns.interface("eth0") == {"mac": mac, "addresses": {address}, "up": True}


def test_ip_and_mac_from_cni_args_are_honoured_and_exclusive(cni: Cni, resident: Resident) -> None:
    ns, ns2 = cni.ns.new(), cni.ns.new()
    ip, mac = str(resident.ip.network[201]), "02:c9:00:00:00:01"
    result = cni.add(cni.conf(NET), cni.cid(), ns.path, args=f"IP={ip};MAC={mac}").result()
    assert result["ips"][0]["address"] == f"{ip}/{resident.ip.network.prefixlen}"
    assert result["interfaces"][0]["mac"] == mac and ns.interface("eth0")["mac"] == mac  # type: ignore[index]
    before = cni.agent.snapshot()
    err = cni.add(cni.conf(NET), cni.cid(), ns2.path, args=f"IP={ip}").error()
    assert ip in err["msg"]
    assert cni.agent.snapshot() == before and ns2.links() == ["lo"]


# -- 21: GC and STATUS ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_removes_the_attachments_not_listed(cni: Cni, resident: Resident, key: str) -> None:
    agent = cni.agent
    network = "cggc" + ("v" if "valid" in key else "a")
    conf = cni.conf(network, "1.1.0")
    namespaces = [cni.ns.new() for _ in range(3)]
    cids = [cni.cid() for _ in namespaces]
    results = [cni.add(conf, cid, ns.path).result() for cid, ns in zip(cids, namespaces, strict=True)]
    subnet = str(ipaddress.ip_interface(results[0]["ips"][0]["address"]).network)
    other = agent.json("endpoint", "get", endpoint_id(resident.cid, "eth0"))
    gc = {**conf, key: [{"containerID": cids[0], "ifname": "eth0"}]}
    invoke({"CNI_COMMAND": "GC", "CNI_PATH": str(PLUGIN.parent)}, gc).empty()
    ids = {e["id"] for e in agent.endpoints()}
    assert endpoint_id(cids[0], "eth0") in ids
    assert not {endpoint_id(c, "eth0") for c in cids[1:]} & ids
    assert [a for a, _ in agent.pool(subnet)] == sorted([results[0]["ips"][0]["gateway"],
                                                        results[0]["ips"][0]["address"].split("/")[0]])
    assert [ns.links() for ns in namespaces] == [["eth0", "lo"], ["lo"], ["lo"]]
    assert not {host_ifname(c, "eth0") for c in cids[1:]} & set(agent.links())
    cni.check({**conf, "prevResult": results[0]}, cids[0], namespaces[0].path).empty()
    assert agent.json("endpoint", "get", other["id"]) == other  # another network's attachment is not touched


@pytest.mark.parametrize("command", ["GC", "STATUS"])
@pytest.mark.parametrize("version", VERSIONS[:-1])
def test_gc_and_status_are_refused_below_110(cni: Cni, command: str, version: str) -> None:
    before = cni.agent.snapshot()
    err = invoke({"CNI_COMMAND": command, "CNI_PATH": str(PLUGIN.parent)}, cni.conf(NET, version)).error(1)
    assert command in err["msg"] and err["cniVersion"] == version
    assert cni.agent.snapshot() == before


def test_status_is_ok_with_the_agent_up_and_50_without(cni: Cni, tmp_path: Path) -> None:
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": str(PLUGIN.parent)}
    invoke(env, cni.conf(NET, "1.1.0")).empty()
    err = invoke(env, {**cni.conf(NET, "1.1.0"), "socket": str(tmp_path / "gone.sock")}).error(50)
    assert err["cniVersion"] == "1.1.0"


# -- CNI networks: listed, and removed once nothing is attached -------------------------------


def test_cni_networks_are_listed_and_removed_once_nothing_is_attached(cni: Cni) -> None:
    agent = cni.agent
    name, ns = f"cgrm{cni.tag}", cni.ns.new()
    subnet = str(list(ipaddress.ip_network(agent.v4).subnets(new_prefix=24))[-3])
    cid = cni.cid()
    conf = cni.conf(name, "1.0.0", subnet=subnet)
    cni.add(conf, cid, ns.path).result()
    (net,) = [n for n in agent.json("network", "list") if n["name"] == name]
    assert (net["origin"], net["subnets"], net["endpoints"]) == ("cni", [subnet], 1)
    table = agent.cli("network", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["NETWORK", "NAME", "ORIGIN"]
    assert [net["id"][:12], name, "cni", subnet] == next(r.split()[:4] for r in table if name in r)
    refused = agent.cli("network", "rm", name, check=False)
    assert refused.returncode == 2 and "1 attachment(s)" in refused.stderr and f"{cid}/eth0" in refused.stderr
    assert [n["id"] for n in agent.json("network", "list") if n["name"] == name] == [net["id"]]
    cni.delete(conf, cid, ns.path).empty()
    removed = agent.json("network", "rm", net["id"][:12])  # by ID prefix; by name works too
    assert (removed["id"], removed["name"], removed["origin"], removed["subnets"]) == (net["id"], name, "cni",
                                                                                        [subnet])
    assert all(n["id"] != net["id"] for n in agent.json("network", "list"))
    assert not any(p["subnet"] == subnet for p in agent.json("ipam", "list")["pools"])
    assert not run("ip", "route", "show", subnet).stdout.strip()
    assert subnet not in run("iptables-save").stdout
    gone = agent.cli("network", "rm", name, check=False)
    assert gone.returncode == 2 and "no network matches" in gone.stderr
    again = cni.add(cni.conf(name, "1.0.0"), cni.cid(), ns.path).result()  # the name is free for a new network
    assert ipaddress.ip_interface(again["ips"][0]["address"]).network != ipaddress.ip_network(subnet)


# -- 24: the runtime's namespace, in /proc form ----------------------------------------------


def test_proc_pid_netns_works_and_is_left_alone(cni: Cni, procs: Processes) -> None:
    holder = procs.start("unshare", "-n", "sleep", "300")
    mine = os.readlink("/proc/self/ns/net")
    wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != mine, 10, "unshare to enter its namespace")
    path = f"/proc/{holder.pid}/ns/net"
    cid = cni.cid()
    conf = cni.conf(NET, "1.0.0")
    result = cni.add(conf, cid, path).result()
    check_result(result, "1.0.0", "eth0", path)
    enter = ("nsenter", "-t", str(holder.pid), "-n")
    assert result["ips"][0]["address"] in run(*enter, "ip", "-o", "addr", "show", "eth0").stdout
    gateway = result["ips"][0]["gateway"]
    wait_until(lambda: run(*enter, "ping", "-c", "1", "-W", "1", gateway, check=False).returncode == 0, 10,
               "ping from the /proc namespace")
    cni.check({**conf, "prevResult": result}, cid, path).empty()
    cni.delete(conf, cid, path).empty()
    assert holder.poll() is None  # the namespace and its process are the runtime's: untouched
    assert "eth0" not in run(*enter, "ip", "-o", "link").stdout
    procs.stop(holder)


@pytest.mark.parametrize("path", ["/proc/{pid}/ns/net", "/proc/self/ns/net"], ids=["test-process", "proc-self"])
def test_the_hosts_own_namespace_is_refused(cni: Cni, path: str) -> None:
    # libcni's skel refuses a CNI_NETNS that is the plugin's own namespace; plumbing a container
    # interface, address and routes into the host would be a disaster.
    path = path.format(pid=os.getpid())  # the tests run in the host namespace, like the agent
    ifname = f"cg{cni.tag}h"
    cid = cni.cid()
    before = cni.agent.snapshot()
    err = cni.add(cni.conf(NET), cid, path, ifname).error(4)
    assert "host" in err["msg"], err
    assert cni.agent.snapshot() == before
    assert not host_has_link(ifname) and not host_has_link(host_ifname(cid, ifname))


# -- connectivity through the datapath --------------------------------------------------------


def test_attachments_reach_their_gateway_and_each_other(cni: Cni, resident: Resident) -> None:
    agent = cni.agent
    ns = cni.ns.new()
    result = cni.add(cni.conf(NET), cni.cid(), ns.path).result()
    mine = result["ips"][0]["address"].split("/")[0]
    assert ns.reaches(resident.gateway)
    local = counter(agent, "CG_OK_LOCAL")
    assert ns.reaches(str(resident.ip.ip)) and resident.ns.reaches(mine)
    assert counter(agent, "CG_OK_LOCAL") >= local + 2  # endpoint to endpoint, delivered by the eBPF datapath
    a, b = cni.ns.new(), cni.ns.new()
    ra, rb = (cni.add(cni.conf(DUAL, ipv6=True), cni.cid(), n.path).result() for n in (a, b))
    six = [ip["address"].split("/")[0] for r in (ra, rb) for ip in r["ips"] if ":" in ip["address"]]
    assert a.reaches(six[1]) and b.reaches(six[0]) and a.reaches(ra["ips"][1]["gateway"])


def test_results_are_valid_json_for_runtimes(cni: Cni) -> None:
    # A successful ADD prints exactly one JSON document and nothing else on stdout.
    ns = cni.ns.new()
    out = cni.add(cni.conf(NET, "1.0.0"), cni.cid(), ns.path)
    assert out.rc == 0 and out.stdout.count("\n") == 1 and json.loads(out.stdout)["cniVersion"] == "1.0.0"
    assert out.stderr == ""
