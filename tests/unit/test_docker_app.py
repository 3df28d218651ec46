"""The libnetwork remote driver through Flask's test client, in the call orders dockerd uses.

Bodies are raw bytes from json.dumps with no Content-Type, as dockerd sends them
(reference/libnetwork.md §1.0); sequences follow §2.1 (network create), §2.2 (run),
§2.3 (stop) and the network rm order of §2.1.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from datapath.fake import FakeKernel
from datapath.plan import Programs
from plugin.service import Agent
from tests.unit.helpers import DockerPlugin, hexid, snapshot

NET = hexid("docker-net")
NET2 = hexid("docker-net-2")
EP = hexid("docker-ep")
SANDBOX = "/var/run/docker/netns/0123456789ab"
MAC_KEY = "com.docker.network.endpoint.macaddress"


def handshake(docker: DockerPlugin) -> None:
    """First use of a v1 plugin (§1.1): Activate, then both GetCapabilities, all with empty bodies."""
    assert docker.ok("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert docker.ok("NetworkDriver.GetCapabilities") == {"Scope": "local", "ConnectivityScope": "local"}
    assert docker.ok("IpamDriver.GetCapabilities") == {"RequiresMACAddress": True, "RequiresRequestReplay": False}


def request_pool(
    docker: DockerPlugin, pool: str = "", subpool: str = "", v6: bool = False, options: Any = None
) -> dict[str, Any]:
    spaces = docker.ok("IpamDriver.GetDefaultAddressSpaces")
    assert spaces == {"LocalDefaultAddressSpace": "CellgateLocal", "GlobalDefaultAddressSpace": "CellgateGlobal"}
    return docker.ok(
        "IpamDriver.RequestPool",
        {
            "AddressSpace": spaces["LocalDefaultAddressSpace"],
            "Pool": pool,
            "SubPool": subpool,
            "Options": options,
            "V6": v6,
        },
    )


def ipam_data(reply: dict[str, Any], gateway: str | None = None, aux: Any = None) -> dict[str, Any]:
    return {
        "AddressSpace": "CellgateLocal",
        "Pool": reply["Pool"],
        "Gateway": gateway or reply["Data"]["com.docker.network.gateway"],
        "AuxAddresses": aux,
    }


def create_network(
    docker: DockerPlugin, v4: list[Any], v6: list[Any] | None = None, options: Any = "default", network_id: str = NET
) -> tuple[int, Any]:
    if options == "default":
        options = {
            "com.docker.network.enable_ipv4": True,
            "com.docker.network.enable_ipv6": bool(v6),
            "com.docker.network.generic": {},
        }
    return docker.call(
        "NetworkDriver.CreateNetwork", {"NetworkID": network_id, "Options": options, "IPv4Data": v4, "IPv6Data": v6}
    )


def network_create(docker: DockerPlugin, subnet: str = "", **kw: Any) -> dict[str, Any]:
    """§2.1 for `docker network create -d cellgate --ipam-driver cellgate [--subnet S] net1`."""
    handshake(docker)
    pool = request_pool(docker, subnet, **kw)
    status, reply = create_network(docker, [ipam_data(pool)])
    assert (status, reply) == (200, {})
    return pool


def run(
    docker: DockerPlugin, pool: dict[str, Any], endpoint: str = EP, mac: str = "02:42:0a:01:00:02", address: str = ""
) -> dict[str, Any]:
    """§2.2 for `docker run --network net1 [--ip A] img`."""
    addr = docker.ok(
        "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": address, "Options": {MAC_KEY: mac}}
    )
    assert addr["Data"] == {}
    created = docker.ok(
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": NET,
            "EndpointID": endpoint,
            "Interface": {"Address": addr["Address"], "AddressIPv6": "", "MacAddress": mac},
            "Options": {"com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": []},
        },
    )
    assert created == {"Interface": {}}  # Docker set the MAC: we must not echo anything it set
    joined = docker.ok(
        "NetworkDriver.Join",
        {
            "NetworkID": NET,
            "EndpointID": endpoint,
            "SandboxKey": SANDBOX,
            "Options": {"com.docker.network.portmap": None},
        },
    )
    ref = {"NetworkID": NET, "EndpointID": endpoint}
    assert docker.ok("NetworkDriver.ProgramExternalConnectivity", {**ref, "Options": {}}) == {}
    info = docker.ok("NetworkDriver.EndpointOperInfo", ref)
    assert info["Value"]["cellgate.interface"] == "cg" + endpoint[:13]
    return {"address": addr["Address"], "join": joined}


def stop(docker: DockerPlugin, pool: dict[str, Any], address: str, endpoint: str = EP) -> None:
    """§2.3: the disconnect sequence every stop runs."""
    ref = {"NetworkID": NET, "EndpointID": endpoint}
    assert docker.ok("NetworkDriver.RevokeExternalConnectivity", ref) == {}
    assert docker.ok("NetworkDriver.Leave", ref) == {}
    assert docker.ok("NetworkDriver.DeleteEndpoint", ref) == {}
    assert docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": bare(address)}) == {}


def network_rm(docker: DockerPlugin, pools: list[dict[str, Any]], aux: tuple[str, ...] = (), gateway: str = "") -> None:
    """§2.1: ReleaseAddress(gw) → ReleaseAddress(aux…) → ReleasePool → DeleteNetwork."""
    for pool in pools:
        gw = gateway or bare(pool["Data"]["com.docker.network.gateway"])  # --gateway, else the one we gave
        assert docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": gw}) == {}
        for a in aux:
            assert docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": a}) == {}
    for pool in pools:
        assert docker.ok("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]}) == {}
    assert docker.ok("NetworkDriver.DeleteNetwork", {"NetworkID": NET}) == {}


def bare(address: str) -> str:
    """RequestAddress answers with a prefix length; ReleaseAddress sends the plain IP."""
    return address.partition("/")[0]


def assert_empty(agent: Agent) -> None:
    assert agent.networks == {} and agent.endpoints == {}
    assert agent.ipam.pools() == []
    assert isinstance(agent.kernel, FakeKernel) and agent.kernel.objects == {}


# -- whole lifecycles ---------------------------------------------------------------------------


def test_lifecycle_with_a_subnet(docker: DockerPlugin, agent: Agent) -> None:
    pool = network_create(docker, "10.1.0.0/24")
    assert pool == {
        "PoolID": "CellgateLocal/10.1.0.0/24",
        "Pool": "10.1.0.0/24",
        "Data": {"com.docker.network.gateway": "10.1.0.1/24"},
    }
    assert agent.network(NET).gateways == (ipaddress.IPv4Interface("10.1.0.1/24"),)

    started = run(docker, pool)
    assert started["address"] == "10.1.0.2/24"
    assert started["join"] == {
        "InterfaceName": {"SrcName": "cgp" + EP[:12], "DstPrefix": "eth"},
        "DisableGatewayService": True,
        "StaticRoutes": [],
        "Gateway": "10.1.0.1",
    }
    ep = agent.endpoint(EP)
    assert ep.sandbox == SANDBOX and ep.mac == "02:42:0a:01:00:02"

    stop(docker, pool, started["address"])
    assert agent.endpoints == {} and agent.ipam.lookup(ipaddress.ip_address("10.1.0.2")) is None
    network_rm(docker, [pool])
    assert_empty(agent)


def test_lifecycle_dual_stack_without_subnets(docker: DockerPlugin, agent: Agent) -> None:
    handshake(docker)
    p4 = request_pool(docker)
    p6 = request_pool(docker, v6=True)
    assert (p4["Pool"], p6["Pool"]) == ("10.200.0.0/24", "fd00:cafe::/80")
    assert create_network(docker, [ipam_data(p4)], [ipam_data(p6)]) == (200, {})
    options = {MAC_KEY: "02:42:00:00:00:02"}
    a4 = docker.ok("IpamDriver.RequestAddress", {"PoolID": p4["PoolID"], "Address": "", "Options": options})
    a6 = docker.ok("IpamDriver.RequestAddress", {"PoolID": p6["PoolID"], "Address": "", "Options": options})
    assert (a4["Address"], a6["Address"]) == ("10.200.0.2/24", "fd00:cafe::2/80")
    reply = docker.ok(
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": NET,
            "EndpointID": EP,
            "Options": None,
            "Interface": {"Address": a4["Address"], "AddressIPv6": a6["Address"], "MacAddress": ""},
        },
    )
    assert reply == {"Interface": {"MacAddress": agent.endpoint(EP).mac}}  # Docker left it empty: we fill it
    joined = docker.ok(
        "NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX, "Options": None}
    )
    assert (joined["Gateway"], joined["GatewayIPv6"]) == ("10.200.0.1", "fd00:cafe::1")
    stop(docker, p4, a4["Address"])
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": p6["PoolID"], "Address": "fd00:cafe::2"})
    network_rm(docker, [p4, p6])
    assert_empty(agent)


def test_lifecycle_with_ip_range_gateway_aux_and_static_ip(docker: DockerPlugin, agent: Agent) -> None:
    # docker network create --subnet 10.1.0.0/16 --ip-range 10.1.2.0/24 --gateway 10.1.0.254
    #                       --aux-address host1=10.1.2.1 net1
    handshake(docker)
    pool = request_pool(docker, "10.1.0.0/16", "10.1.2.0/24")
    assert pool["PoolID"] == "CellgateLocal/10.1.0.0/16/10.1.2.0/24"
    gw = docker.ok(
        "IpamDriver.RequestAddress",
        {
            "PoolID": pool["PoolID"],
            "Address": "10.1.0.254",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
    assert gw == {"Address": "10.1.0.254/16", "Data": {}}
    aux = docker.ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "10.1.2.1", "Options": None})
    assert aux["Address"] == "10.1.2.1/16"
    status, _ = create_network(docker, [ipam_data(pool, "10.1.0.254/16", {"host1": "10.1.2.1/16"})])
    assert status == 200
    assert agent.network(NET).gateways == (ipaddress.IPv4Interface("10.1.0.254/16"),)

    dynamic = run(docker, pool, hexid("c1"), "02:42:0a:01:02:02")
    assert dynamic["address"] == "10.1.2.0/16"  # inside the range; .1 is the aux address
    assert dynamic["join"]["Gateway"] == "10.1.0.254"
    static = run(docker, pool, hexid("c2"), "02:42:0a:01:02:03", address="10.1.2.77")
    assert static["address"] == "10.1.2.77/16"
    for bad_ip in ("10.1.3.5", "10.1.0.254", "10.1.2.1", "10.1.2.77", "10.1.0.0", "10.1.255.255"):
        status, reply = docker.call(
            "IpamDriver.RequestAddress",
            {"PoolID": pool["PoolID"], "Address": bad_ip, "Options": {MAC_KEY: "02:42:0a:01:02:09"}},
        )
        assert status != 200 and reply["Err"], bad_ip

    stop(docker, pool, dynamic["address"], hexid("c1"))
    stop(docker, pool, static["address"], hexid("c2"))
    network_rm(docker, [pool], aux=("10.1.2.1",), gateway="10.1.0.254")
    assert_empty(agent)


def test_restart_of_a_container_with_a_static_ip(docker: DockerPlugin, agent: Agent) -> None:
    pool = network_create(docker, "10.1.0.0/24")
    first = run(docker, pool, hexid("run1"), "02:42:0a:01:00:32", "10.1.0.50")
    stop(docker, pool, first["address"], hexid("run1"))
    second = run(docker, pool, hexid("run2"), "02:42:0a:01:00:33", "10.1.0.50")
    assert second["address"] == first["address"] == "10.1.0.50/24"


def test_network_create_rolled_back_by_docker_leaves_nothing(docker: DockerPlugin, agent: Agent) -> None:
    handshake(docker)
    pool = request_pool(docker, "10.1.0.0/24")
    status, reply = create_network(docker, [ipam_data(pool)], options={"com.docker.network.generic": {"mtu": "9000"}})
    assert status == 400 and "mtu" in reply["Err"]
    # Docker then undoes its IPAM work (§2.5)
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "10.1.0.1"})
    docker.ok("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
    assert_empty(agent)


def test_create_endpoint_failure_is_rolled_back(docker: DockerPlugin, agent: Agent) -> None:
    pool = network_create(docker, "10.1.0.0/24")
    before = snapshot(agent)
    assert isinstance(agent.kernel, FakeKernel)
    agent.kernel.fail = lambda obj: isinstance(obj, Programs)
    addr = docker.ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": None})
    status, reply = docker.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr["Address"]}, "Options": {}},
    )
    assert status == 500 and "injected failure" in reply["Err"]
    assert docker.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP}) == {}
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": bare(addr["Address"])})
    after = snapshot(agent)
    assert (after[0], after[1], after[3]) == (before[0], before[1], before[3])  # networks, endpoints, kernel
    assert agent.ipam.pool(pool["PoolID"]).allocations == before[2][0].allocations  # only the cursor moved


def test_a_failed_create_endpoint_leaves_the_address_as_docker_requested_it(docker: DockerPlugin, agent: Agent) -> None:
    """The agent bound the address to the endpoint before the kernel failed: the binding goes with
    the endpoint, so the ledger is as RequestAddress left it (a retry with the MAC gets the same
    address) and Docker's rollback ReleaseAddress frees it."""
    pool = network_create(docker, "10.1.0.0/24")
    assert isinstance(agent.kernel, FakeKernel)
    agent.kernel.fail = lambda obj: isinstance(obj, Programs)
    request = {"PoolID": pool["PoolID"], "Address": "", "Options": {MAC_KEY: "02:42:0a:01:00:02"}}
    addr = docker.ok("IpamDriver.RequestAddress", request)
    requested = agent.ipam.pools()
    status, reply = docker.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": addr["Address"]}, "Options": {}},
    )
    assert status == 500 and "injected failure" in reply["Err"]
    assert agent.ipam.pools() == requested
    assert docker.ok("IpamDriver.RequestAddress", request) == addr
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": bare(addr["Address"])})
    assert list(agent.ipam.pool(pool["PoolID"]).endpoint_allocations()) == []


def test_racing_network_creates_for_one_subnet(docker: DockerPlugin, agent: Agent) -> None:
    """Both RequestPool calls arrive before either CreateNetwork; Docker rolls the loser back."""
    handshake(docker)
    winner = request_pool(docker, "10.1.0.0/24")
    loser = request_pool(docker, "10.1.0.0/24")
    assert loser == winner
    assert create_network(docker, [ipam_data(winner)]) == (200, {})
    status, reply = create_network(docker, [ipam_data(loser)], network_id=hexid("loser"))
    assert status != 200 and "overlaps" in reply["Err"]
    docker.ok("IpamDriver.ReleaseAddress", {"PoolID": loser["PoolID"], "Address": "10.1.0.1"})
    docker.ok("IpamDriver.ReleasePool", {"PoolID": loser["PoolID"]})

    assert list(agent.networks) == [NET]
    assert agent.ipam.pool(winner["PoolID"]).gateway == ipaddress.ip_address("10.1.0.1")
    started = run(docker, winner)
    assert started["join"]["Gateway"] == "10.1.0.1"
    stop(docker, winner, started["address"])
    network_rm(docker, [winner])
    assert_empty(agent)


# -- retries and idempotency --------------------------------------------------------------------


def test_repeated_calls_get_the_same_answers(docker: DockerPlugin, agent: Agent) -> None:
    pool = network_create(docker, "10.1.0.0/24")
    assert create_network(docker, [ipam_data(pool)]) == (200, {})
    body = {"PoolID": pool["PoolID"], "Address": "", "Options": {MAC_KEY: "02:42:0a:01:00:07"}}
    first = docker.ok("IpamDriver.RequestAddress", body)
    assert docker.ok("IpamDriver.RequestAddress", body) == first  # a retry after a lost reply
    ep_body = {
        "NetworkID": NET,
        "EndpointID": EP,
        "Interface": {"Address": first["Address"], "AddressIPv6": "", "MacAddress": ""},
        "Options": {},
    }
    created = docker.ok("NetworkDriver.CreateEndpoint", ep_body)
    assert docker.ok("NetworkDriver.CreateEndpoint", ep_body) == created
    join = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX, "Options": {}}
    assert docker.ok("NetworkDriver.Join", join) == docker.ok("NetworkDriver.Join", join)
    assert len(agent.endpoints) == 1
    # the same request for a subnet that is now in use is refused, not silently shared
    status, reply = docker.call(
        "IpamDriver.RequestPool",
        {"AddressSpace": "CellgateLocal", "Pool": "10.1.0.0/24", "SubPool": "", "Options": {}, "V6": False},
    )
    assert status != 200 and "already used" in reply["Err"]


def test_release_and_delete_of_unknown_objects_succeed(docker: DockerPlugin, agent: Agent) -> None:
    other = hexid("unknown")
    ref = {"NetworkID": other, "EndpointID": hexid("unknown-ep")}
    before = snapshot(agent)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("NetworkDriver.DeleteNetwork", {"NetworkID": other}),
        ("NetworkDriver.DeleteEndpoint", ref),
        ("NetworkDriver.Leave", ref),
        ("NetworkDriver.RevokeExternalConnectivity", ref),
        ("NetworkDriver.FreeNetwork", {"NetworkID": other}),
        ("IpamDriver.ReleasePool", {"PoolID": "CellgateLocal/10.77.0.0/24"}),
        ("IpamDriver.ReleaseAddress", {"PoolID": "CellgateLocal/10.77.0.0/24", "Address": "10.77.0.5"}),
        ("NetworkDriver.DiscoverNew", {"DiscoveryType": 1, "DiscoveryData": {"Address": "10.0.0.9", "self": True}}),
        ("NetworkDriver.DiscoverDelete", {"DiscoveryType": 1, "DiscoveryData": None}),
    ]
    for method, body in calls:
        assert docker.ok(method, body) == {}, method
    assert docker.ok("NetworkDriver.EndpointOperInfo", ref) == {"Value": {}}
    assert snapshot(agent) == before


def test_release_of_an_unallocated_address_in_a_known_pool(docker: DockerPlugin, agent: Agent) -> None:
    pool = network_create(docker, "10.1.0.0/24")
    before = snapshot(agent)
    assert docker.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "10.1.0.99"}) == {}
    assert snapshot(agent) == before


# -- transport ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"\n", b"null", b"{}", b"{}\n"])
def test_handshake_accepts_empty_and_null_bodies(docker: DockerPlugin, body: bytes) -> None:
    for method in (
        "Plugin.Activate",
        "NetworkDriver.GetCapabilities",
        "IpamDriver.GetCapabilities",
        "IpamDriver.GetDefaultAddressSpaces",
    ):
        status, reply = docker.raw(method, body)
        assert status == 200 and "Err" not in reply, method


def test_replies_use_the_plugin_media_type(docker: DockerPlugin) -> None:
    resp = docker.client.post("/Plugin.Activate")
    assert resp.mimetype == "application/vnd.docker.plugins.v1.2+json"


def test_unknown_call_is_404_with_err(docker: DockerPlugin) -> None:
    status, reply = docker.call("NetworkDriver.Frobnicate", {})
    assert (status, reply) == (404, {"Err": "unknown plugin call /NetworkDriver.Frobnicate"})
    assert docker.raw("", b"")[0] == 404


def test_get_is_405_with_err(docker: DockerPlugin) -> None:
    resp = docker.client.get("/Plugin.Activate")
    assert resp.status_code == 405 and resp.get_json(force=True)["Err"]


def test_body_larger_than_1_mib_is_413_with_err(docker: DockerPlugin, agent: Agent) -> None:
    before = snapshot(agent)
    big = b'{"AddressSpace": "CellgateLocal", "Pool": "10.1.0.0/24", "V6": false, "Pad": "' + b"x" * (1 << 20) + b'"}'
    status, reply = docker.raw("IpamDriver.RequestPool", big)
    assert status == 413 and "larger than" in reply["Err"]
    assert snapshot(agent) == before


MALFORMED = [b"{", b'{"NetworkID": }', b"[1, 2]", b'"text"', b"42", b"\xff\xfe\xfa", b"{}{}", b"[" * 100_000]


@pytest.mark.parametrize("body", MALFORMED, ids=lambda b: repr(b[:12]))
@pytest.mark.parametrize(
    "method",
    [
        "NetworkDriver.CreateNetwork",
        "NetworkDriver.CreateEndpoint",
        "NetworkDriver.Join",
        "IpamDriver.RequestPool",
        "IpamDriver.RequestAddress",
    ],
)
def test_malformed_json_is_refused_and_changes_nothing(
    docker: DockerPlugin, agent: Agent, method: str, body: bytes
) -> None:
    network_create(docker, "10.1.0.0/24")
    before = snapshot(agent)
    status, reply = docker.raw(method, body)
    assert status == 400 and isinstance(reply["Err"], str) and reply["Err"]
    assert snapshot(agent) == before


# -- field validation ---------------------------------------------------------------------------

POOL = {"AddressSpace": "CellgateLocal", "Pool": "", "SubPool": "", "Options": {}, "V6": False}
V4DATA = [{"AddressSpace": "CellgateLocal", "Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24", "AuxAddresses": None}]
NETWORK = {"NetworkID": NET, "Options": {}, "IPv4Data": V4DATA, "IPv6Data": []}
ENDPOINT = {"NetworkID": NET, "EndpointID": EP, "Interface": {"Address": "10.1.0.9/24"}, "Options": {}}
JOIN = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": SANDBOX, "Options": {}}

BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    # (method, body, expected text in Err)
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": None}, "missing field NetworkID"),
    ("NetworkDriver.CreateNetwork", {k: v for k, v in NETWORK.items() if k != "NetworkID"}, "missing field NetworkID"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": 1234}, "must be a string"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": "net1"}, "hexadecimal ID"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": NET.upper()}, "hexadecimal ID"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": "../" + NET}, "hexadecimal ID"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "Options": ["x"]}, "Options must be an object"),
    (
        "NetworkDriver.CreateNetwork",
        {**NETWORK, "Options": {"com.docker.network.generic": {"mtu": "9000"}}},
        "unsupported driver option(s): mtu",
    ),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "Options": {"com.docker.network.generic": "x"}}, "must be an object"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "Options": {"com.docker.network.internal": True}}, "--internal"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "Options": {"com.docker.network.internal": "true"}}, "--internal"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "Options": {"com.docker.network.internal": "maybe"}}, "boolean"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "IPv4Data": None, "IPv6Data": None}, "no IPv4Data or IPv6Data"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "IPv4Data": {"Pool": "10.1.0.0/24"}}, "must be a list"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "IPv4Data": ["10.1.0.0/24"]}, "IPv4Data[0] must be an object"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "IPv4Data": [{**V4DATA[0], "Pool": None}]}, "CIDR string"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "IPv4Data": [{**V4DATA[0], "Pool": "10.1.0.1/24"}]}, "host bits"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "IPv4Data": [{**V4DATA[0], "Gateway": ""}]}, "Gateway is missing"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "IPv4Data": [{**V4DATA[0], "Gateway": "10.1.0.1"}]}, "prefix length"),
    (
        "NetworkDriver.CreateNetwork",
        {**NETWORK, "IPv4Data": [{**V4DATA[0], "Gateway": "10.2.0.1/24"}]},
        "not inside pool",
    ),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "IPv4Data": [], "IPv6Data": V4DATA}, "must be IPv6"),
    # pools and gateways another IPAM driver (or a client other than Docker) may hand us
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": NET2, "IPv4Data": [{"Pool": "127.0.0.0/24",
     "Gateway": "127.0.0.1/24"}]}, "field IPv4Data[0].Pool 127.0.0.0/24 overlaps 127.0.0.0/8 (loopback)"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": NET2, "IPv4Data": [{"Pool": "224.1.0.0/24",
     "Gateway": "224.1.0.1/24"}]}, "224.0.0.0/4 (multicast)"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": NET2, "IPv4Data": [{"Pool": "169.254.9.0/24",
     "Gateway": "169.254.9.1/24"}]}, "169.254.0.0/16 (link-local)"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": NET2, "IPv4Data": [], "IPv6Data": [{"Pool": "fe80::/64",
     "Gateway": "fe80::1/64"}]}, "field IPv6Data[0].Pool fe80::/64 overlaps fe80::/10 (link-local)"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": NET2, "IPv4Data": [{"Pool": "10.3.0.0/24",
     "Gateway": "10.3.0.0/24"}]}, "field IPv4Data[0].Gateway 10.3.0.0/24 is the network address of 10.3.0.0/24"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": NET2, "IPv4Data": [{"Pool": "10.3.0.0/24",
     "Gateway": "10.3.0.255/24"}]}, "field IPv4Data[0].Gateway 10.3.0.255/24 is the broadcast address of 10.3.0.0/24"),
    ("NetworkDriver.CreateNetwork", {**NETWORK, "NetworkID": NET2, "IPv6Data": [{"Pool": "fd00:3::/64",
     "Gateway": "fd00:3::/64"}]}, "field IPv6Data[0].Gateway fd00:3::/64 is the subnet-router anycast address"),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "EndpointID": "endpoint-1"}, "hexadecimal ID"),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "EndpointID": "abc"}, "hexadecimal ID"),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "Interface": "10.1.0.9/24"}, "Interface must be an object"),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "Interface": None}, "needs an IPv4 or IPv6 address"),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "Interface": {"Address": "10.1.0.9"}}, "prefix length"),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "Interface": {"Address": 10}}, "prefix length"),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "Interface": {"Address": "fd00::9/64"}}, "must be IPv4"),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "Interface": {"AddressIPv6": "10.1.0.9/24"}}, "must be IPv6"),
    (
        "NetworkDriver.CreateEndpoint",
        {**ENDPOINT, "Interface": {"Address": "10.1.0.9/24", "MacAddress": "zz"}},
        "MAC address",
    ),
    (
        "NetworkDriver.CreateEndpoint",
        {**ENDPOINT, "Interface": {"Address": "10.1.0.9/24", "MacAddress": "01:00:5e:00:00:01"}},
        "unicast",
    ),
    ("NetworkDriver.CreateEndpoint", {**ENDPOINT, "Interface": {"Address": "10.7.0.9/24"}}, "not in a subnet"),
    (
        "NetworkDriver.CreateEndpoint",
        {**ENDPOINT, "Interface": {"Address": "10.1.0.9/16"}},
        "endpoint address 10.1.0.9/16 has prefix length /16",
    ),
    (
        "NetworkDriver.CreateEndpoint",
        {**ENDPOINT, "Interface": {"Address": "10.1.0.9/25"}},
        "endpoint address 10.1.0.9/25 has prefix length /25",
    ),
    (
        "NetworkDriver.CreateEndpoint",
        {**ENDPOINT, "Interface": {"Address": "10.1.0.0/24"}},
        "endpoint address 10.1.0.0/24 is the network address of 10.1.0.0/24",
    ),
    (
        "NetworkDriver.CreateEndpoint",
        {**ENDPOINT, "Interface": {"Address": "10.1.0.255/24"}},
        "endpoint address 10.1.0.255/24 is the broadcast address of 10.1.0.0/24",
    ),
    ("NetworkDriver.Join", {**JOIN, "SandboxKey": None}, "missing field SandboxKey"),
    ("NetworkDriver.Join", {**JOIN, "SandboxKey": "netns/abc"}, "absolute path"),
    ("NetworkDriver.Join", {**JOIN, "SandboxKey": "/x" * 3000}, "too long"),
    ("NetworkDriver.DeleteEndpoint", {"NetworkID": NET}, "missing field EndpointID"),
    ("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": ["x"]}, "must be a string"),
    ("NetworkDriver.AllocateNetwork", {"NetworkID": NET, "Options": {}, "IPv4Data": V4DATA}, "swarm"),
    ("IpamDriver.RequestPool", {**POOL, "AddressSpace": None}, "missing field AddressSpace"),
    ("IpamDriver.RequestPool", {**POOL, "AddressSpace": "LocalDefault"}, "unknown address space 'LocalDefault'"),
    ("IpamDriver.RequestPool", {**POOL, "AddressSpace": "x" * 200, "Pool": "10.5.0.0/24"}, "unknown address space"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "127.0.0.0/24"}, "subnet 127.0.0.0/24 overlaps 127.0.0.0/8"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "224.0.0.0/24"}, "(multicast)"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "240.0.0.0/24"}, "240.0.0.0/4 (reserved"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "0.0.0.0/24"}, "0.0.0.0/8 ('this network')"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "fe80::/64", "V6": True}, "fe80::/10 (link-local)"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "ff05::/64", "V6": True}, "ff00::/8 (multicast)"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "::ffff:0:0/96", "V6": True}, "::ffff:0:0/96 (IPv4-mapped)"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "::/64", "V6": True}, "::/128 (the unspecified address)"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "10.1.0.1/24"}, "host bits"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": 10}, "CIDR string"),
    ("IpamDriver.RequestPool", {**POOL, "SubPool": "10.1.0.0/25"}, "needs a subnet"),
    ("IpamDriver.RequestPool", {**POOL, "V6": "maybe"}, "V6 must be a boolean"),
    ("IpamDriver.RequestPool", {**POOL, "Options": {"driver": {"nested": 1}}}, "Options.driver must be a string"),
    ("IpamDriver.RequestPool", {**POOL, "Options": {"com.example.size": "24"}}, "unsupported IPAM option"),
    ("IpamDriver.RequestPool", {**POOL, "Pool": "10.5.0.0/24", "Options": {"x": "y"}}, "unsupported IPAM option"),
    ("IpamDriver.RequestAddress", {"PoolID": None, "Address": "", "Options": {}}, "missing field PoolID"),
    ("IpamDriver.RequestAddress", {"PoolID": "CellgateLocal/10.1.0.0/24", "Address": "ten", "Options": {}}, "Address"),
    (
        "IpamDriver.RequestAddress",
        {"PoolID": "CellgateLocal/10.1.0.0/24", "Address": 7, "Options": {}},
        "must be an IP address",
    ),
    (
        "IpamDriver.RequestAddress",
        {"PoolID": "CellgateLocal/10.1.0.0/24", "Address": "", "Options": []},
        "must be an object",
    ),
    ("IpamDriver.ReleaseAddress", {"PoolID": "CellgateLocal/10.1.0.0/24", "Address": ""}, "missing field Address"),
    ("IpamDriver.ReleaseAddress", {"PoolID": "CellgateLocal/10.1.0.0/24", "Address": None}, "missing field Address"),
    ("IpamDriver.ReleasePool", {"PoolID": 5}, "must be a string"),
]


@pytest.mark.parametrize(("method", "body", "text"), BAD_REQUESTS, ids=[f"{m}-{t}" for m, _, t in BAD_REQUESTS])
def test_bad_fields_are_refused_with_400_and_change_nothing(
    docker: DockerPlugin, agent: Agent, method: str, body: dict[str, Any], text: str
) -> None:
    assert create_network(docker, V4DATA, options=None) == (200, {})  # Options: null is fine
    before = snapshot(agent)
    status, reply = docker.call(method, body)
    assert status == 400, reply
    assert text in reply["Err"]
    assert snapshot(agent) == before


def test_failures_that_are_not_the_callers_fault_are_non_200_with_err(docker: DockerPlugin, agent: Agent) -> None:
    pool = network_create(docker, "10.1.0.0/29")
    for _ in range(5):
        docker.ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}})
    before = snapshot(agent)
    cases = [
        ("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}}, "no free address"),
        (
            "IpamDriver.RequestAddress",
            {"PoolID": "CellgateLocal/10.9.0.0/24", "Address": "", "Options": {}},
            "unknown pool",
        ),
        ("NetworkDriver.Join", JOIN, "unknown endpoint"),
    ]
    for method, body, text in cases:
        status, reply = docker.call(method, body)
        assert status >= 400 and text in reply["Err"], (method, status, reply)
    assert snapshot(agent) == before


@pytest.mark.parametrize(("options", "address", "kind", "mac"), [
    ({"RequestAddressType": "com.docker.network.gateway"}, None, "gateway", ""),
    (None, "10.1.0.5", "aux", ""),
    ({"com.docker.network.endpoint.macaddress": "02:42:AC:11:00:02"}, None, "endpoint", "02:42:ac:11:00:02"),
])
def test_request_address_options_are_decoded_at_the_door(
    options: Any, address: str | None, kind: str, mac: str
) -> None:
    from plugin.docker.messages import RequestAddress

    req = RequestAddress.parse({"PoolID": "CellgateLocal/10.1.0.0/24", "Address": address, "Options": options})
    assert (req.kind, req.mac) == (kind, mac)
