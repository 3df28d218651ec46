"""plugin.service.Agent on fakes: networks, endpoints, rollback, restore, sweep, identities and policy."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from typing import Any

import pytest

from datapath import identity as ids
from datapath import plan
from datapath.errors import Conflict, InvalidRequest, KernelError, NotFound, StateError
from datapath.fake import FakeKernel
from datapath.identity import Identities
from datapath.labels import Label
from datapath.model import Endpoint
from datapath.plan import HostAddress, HostDevice, Neighbour, Programs, Route, Settings, Veth
from datapath.policy import Repository, parse_rules
from datapath.policy.compile import PolicyKey, PolicyValue
from datapath.store import MemoryStore
from ipam.allocator import LOCAL_SPACE, Ipam, PoolRequest
from ipam.pool import Pool
from plugin.service import Agent
from plugin.service.policy import PolicyState
from tests.unit.helpers import FakeClock, hexid, snapshot

NET_A, NET_B = hexid("net-a"), hexid("net-b")
EP1, EP2 = hexid("ep-1"), hexid("ep-2")


def make_network(agent: Agent, nid: str, subnet: str) -> Pool:
    """What `docker network create --subnet` does: RequestPool, then CreateNetwork."""
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network(subnet), None, ":" in subnet))
    assert pool.gateway is not None
    agent.create_network(nid, [pool.prefixed(pool.gateway)])
    return agent.ipam.pool(pool.id)


def make_endpoint(agent: Agent, nid: str, pool: Pool, eid: str, n: int = 1) -> Endpoint:
    """What `docker run` does: RequestAddress, then CreateEndpoint."""
    mac = f"02:42:0a:00:00:{n:02x}"
    _, alloc = agent.request_address(pool.id, None, mac=mac)
    address = pool.prefixed(alloc.address)
    v4 = address if address.version == 4 else None
    v6 = address if address.version == 6 else None
    return agent.create_endpoint(nid, eid, v4, v6, mac)  # type: ignore[arg-type]


def objects(kernel: FakeKernel) -> dict[Any, Any]:
    return {o.key: o for o in kernel.observe()}


def expected(agent: Agent) -> dict[Any, Any]:
    return {o.key: o for o in plan.desired_state(agent.networks.values(), agent.endpoints.values(), agent.settings)}


@pytest.fixture
def pool_a(agent: Agent) -> Pool:
    return make_network(agent, NET_A, "10.1.0.0/24")


# -- networks -----------------------------------------------------------------------------------


def test_create_network_installs_its_objects_and_binds_the_pool(agent: Agent, kernel: FakeKernel, stores: Any) -> None:
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    net = agent.network(NET_A)
    assert net.gateways == (ipaddress.IPv4Interface("10.1.0.1/24"),)
    assert objects(kernel) == {o.key: o for o in plan.network_objects(net, agent.settings)}
    assert pool.network_id == NET_A
    assert list(stores.networks.docs) == [NET_A]


def test_create_network_is_idempotent_and_refuses_other_subnets(agent: Agent, pool_a: Pool, kernel: FakeKernel) -> None:
    applied = len(kernel.applied)
    assert agent.create_network(NET_A, [ipaddress.IPv4Interface("10.1.0.1/24")]) == agent.network(NET_A)
    assert len(kernel.applied) == applied
    with pytest.raises(Conflict, match="other subnets"):
        agent.create_network(NET_A, [ipaddress.IPv4Interface("10.9.0.1/24")])


def test_create_network_refuses_overlaps_and_empty_networks(agent: Agent, pool_a: Pool) -> None:
    before = snapshot(agent)
    with pytest.raises(Conflict, match="overlaps"):
        agent.create_network(NET_B, [ipaddress.IPv4Interface("10.1.0.129/25")])
    with pytest.raises(InvalidRequest):
        agent.create_network(NET_B, [])
    assert snapshot(agent) == before


def test_delete_network_removes_its_objects_and_unbinds(
    agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any
) -> None:
    agent.delete_network(NET_A)
    assert objects(kernel) == {}
    assert agent.networks == {} and stores.networks.docs == {}
    assert agent.ipam.pool(pool_a.id).network_id == ""
    agent.delete_network(NET_A)  # deleting what is gone succeeds
    agent.delete_network(hexid("never"))


def test_delete_network_keeps_the_host_device_while_another_network_exists(
    agent: Agent, pool_a: Pool, kernel: FakeKernel
) -> None:
    make_network(agent, NET_B, "fd00:b::/64")
    make_network(agent, hexid("net-c"), "10.3.0.0/24")
    agent.delete_network(NET_A)
    assert objects(kernel) == expected(agent)
    dev = HostDevice("cg_cgtest", "cellgate:cgtest:host")
    assert kernel.objects[dev.key] == dev
    assert ("address", "cg_cgtest", "10.1.0.1") not in kernel.objects
    assert ("route", "10.1.0.0/24") not in kernel.objects
    assert ("masquerade", "10.1.0.0/24") not in kernel.objects
    agent.delete_network(NET_B)
    agent.delete_network(hexid("net-c"))
    assert objects(kernel) == {}


def test_delete_network_removes_endpoints_left_on_it(
    agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any
) -> None:
    make_endpoint(agent, NET_A, pool_a, EP1)
    agent.delete_network(NET_A)
    assert agent.endpoints == {} and stores.endpoints.docs == {}
    assert objects(kernel) == {}


# -- endpoints ----------------------------------------------------------------------------------


def test_create_endpoint(agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any) -> None:
    ep = make_endpoint(agent, NET_A, pool_a, EP1)
    assert ep.ipv4 == ipaddress.IPv4Interface("10.1.0.2/24") and ep.gateway4 == ipaddress.IPv4Address("10.1.0.1")
    assert ep.host_ifname == "cg" + EP1[:13] and ep.mac == "02:42:0a:00:00:01"
    assert objects(kernel) == expected(agent)
    assert set(plan.keys(plan.endpoint_objects(ep, agent.settings))) <= set(kernel.objects)
    assert stores.endpoints.docs[EP1] == ep.to_doc()
    assert agent.ipam.pool(pool_a.id).allocations[ep.ipv4.ip].owner == EP1


def test_create_endpoint_without_a_mac_derives_one(agent: Agent, pool_a: Pool) -> None:
    ep = agent.create_endpoint(NET_A, EP1, ipaddress.IPv4Interface("10.1.0.9/24"), None)
    assert ep.mac == agent.create_endpoint(NET_A, EP1, ipaddress.IPv4Interface("10.1.0.9/24"), None).mac
    assert int(ep.mac[:2], 16) & 0x03 == 0x02


def test_create_endpoint_again_with_the_same_spec_returns_it(agent: Agent, pool_a: Pool, kernel: FakeKernel) -> None:
    ep = make_endpoint(agent, NET_A, pool_a, EP1)
    agent.join(NET_A, EP1, "/var/run/docker/netns/abc")
    before = snapshot(agent)
    again = agent.create_endpoint(NET_A, EP1, ep.ipv4, None, ep.mac)
    assert again == agent.endpoint(EP1)
    assert snapshot(agent) == before


def test_create_endpoint_again_with_another_spec_is_a_conflict(agent: Agent, pool_a: Pool) -> None:
    ep = make_endpoint(agent, NET_A, pool_a, EP1)
    before = snapshot(agent)
    with pytest.raises(Conflict, match="other settings"):
        agent.create_endpoint(NET_A, EP1, ipaddress.IPv4Interface("10.1.0.50/24"), None, ep.mac)
    with pytest.raises(Conflict, match="other settings"):
        agent.create_endpoint(NET_A, EP1, ep.ipv4, None, "02:42:0a:00:00:99")
    assert snapshot(agent) == before


@pytest.mark.parametrize(
    ("network", "address", "error"),
    [
        (hexid("unknown"), "10.1.0.5/24", NotFound),
        (NET_A, "10.7.0.5/24", InvalidRequest),
        (NET_A, "10.1.0.1/24", Conflict),  # the gateway
        (NET_A, "10.1.0.2/24", Conflict),  # EP1's address
        (NET_A, None, InvalidRequest),
    ],
)
def test_bad_endpoints_are_refused_and_change_nothing(
    agent: Agent, pool_a: Pool, network: str, address: str | None, error: type[Exception]
) -> None:
    make_endpoint(agent, NET_A, pool_a, EP1)
    before = snapshot(agent)
    with pytest.raises(error):
        agent.create_endpoint(network, EP2, ipaddress.IPv4Interface(address) if address else None, None)
    assert snapshot(agent) == before


@pytest.mark.parametrize(
    ("gateway", "text"),
    [
        ("127.0.0.1/24", "subnet 127.0.0.0/24 overlaps 127.0.0.0/8 (loopback)"),
        ("224.0.0.1/24", "multicast"),
        ("169.254.1.1/16", "link-local"),
        ("0.0.0.1/24", "'this network'"),
        ("255.255.255.1/24", "reserved"),
        ("fe80::1/64", "link-local"),
        ("ff02::1/64", "multicast"),
        ("::ffff:10.0.0.1/120", "IPv4-mapped"),
        ("10.3.0.0/24", "gateway 10.3.0.0/24 is the network address of 10.3.0.0/24"),
        ("10.3.0.255/24", "gateway 10.3.0.255/24 is the broadcast address of 10.3.0.0/24"),
        ("fd00:3::/64", "gateway fd00:3::/64 is the subnet-router anycast address of fd00:3::/64"),
    ],
)
def test_networks_from_another_ipam_with_impossible_subnets_or_gateways_are_refused(
    agent: Agent, pool_a: Pool, gateway: str, text: str
) -> None:
    before = snapshot(agent)
    with pytest.raises(InvalidRequest, match=re.escape(text)):
        agent.create_network(NET_B, [ipaddress.ip_interface(gateway)])
    assert snapshot(agent) == before


@pytest.mark.parametrize(
    ("v4", "v6", "text"),
    [
        ("10.1.0.9/16", None, "endpoint address 10.1.0.9/16 has prefix length /16, but network"),
        ("10.1.0.9/32", None, "has prefix length /32"),
        ("10.1.0.0/24", None, "endpoint address 10.1.0.0/24 is the network address of 10.1.0.0/24"),
        ("10.1.0.255/24", None, "endpoint address 10.1.0.255/24 is the broadcast address of 10.1.0.0/24"),
        ("10.1.0.9/24", "fd00:a::/80", "endpoint address fd00:a::/80 is the subnet-router anycast address"),
        ("10.1.0.9/24", "fd00:a::9/64", "endpoint address fd00:a::9/64 has prefix length /64"),
    ],
)
def test_endpoint_addresses_an_interface_cannot_have_are_refused(
    agent: Agent, v4: str, v6: str | None, text: str
) -> None:
    agent.create_network(NET_A, [ipaddress.IPv4Interface("10.1.0.1/24"), ipaddress.IPv6Interface("fd00:a::1/80")])
    before = snapshot(agent)
    with pytest.raises(InvalidRequest, match=re.escape(text)):
        agent.create_endpoint(NET_A, EP1, ipaddress.IPv4Interface(v4), ipaddress.IPv6Interface(v6) if v6 else None)
    assert snapshot(agent) == before


def test_join_and_leave(agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any) -> None:
    ep = make_endpoint(agent, NET_A, pool_a, EP1)
    info = agent.join(NET_A, EP1, "/var/run/docker/netns/abc")
    assert (info.interface, info.gateway4, info.gateway6) == (ep.peer_ifname, ipaddress.IPv4Address("10.1.0.1"), None)
    joined = agent.endpoint(EP1)
    assert joined.sandbox == "/var/run/docker/netns/abc"
    assert stores.endpoints.docs[EP1]["sandbox"] == joined.sandbox
    assert kernel.objects[("endpoint-entry", ep.host_ifname)].value.sandbox == joined.sandbox_hash != 0
    assert objects(kernel) == expected(agent)

    applied = len(kernel.applied)
    agent.join(NET_A, EP1, "/var/run/docker/netns/abc")  # again: nothing to do
    assert len(kernel.applied) == applied

    agent.leave(NET_A, EP1)
    assert agent.endpoint(EP1).sandbox == ""
    assert kernel.objects[("endpoint-entry", ep.host_ifname)].value.sandbox == 0
    agent.leave(NET_A, EP1)
    agent.leave(NET_A, hexid("unknown"))


def test_join_checks_the_network_and_the_endpoint(agent: Agent, pool_a: Pool) -> None:
    make_endpoint(agent, NET_A, pool_a, EP1)
    with pytest.raises(InvalidRequest, match="not on network"):
        agent.join(NET_B, EP1, "/var/run/docker/netns/abc")
    with pytest.raises(NotFound):
        agent.join(NET_A, EP2, "/var/run/docker/netns/abc")


def test_leave_delete_and_join_check_what_the_call_names(agent: Agent, pool_a: Pool, stores: Any) -> None:
    """Every door gets the checks: the endpoint is on the network the call names, is the calling
    door's (a Docker call never acts on a CNI attachment, nor CNI on Docker's), and a Join does not
    move it from the sandbox it is in. Each refusal changes nothing."""
    docker_ep = make_endpoint(agent, NET_A, pool_a, EP1)
    _, alloc = agent.ipam.request_address(pool_a.id, None, owner=EP2)
    agent.create_endpoint(NET_A, EP2, pool_a.prefixed(alloc.address), None, origin="cni",  # type: ignore[arg-type]
                          attachment=("cgcontainer", "eth0"), sandbox="/var/run/netns/cgcni")
    agent.join(NET_A, EP1, "/var/run/docker/netns/abc")
    before = snapshot(agent), dict(stores.endpoints.docs)
    for call in (lambda: agent.leave(NET_B, EP1), lambda: agent.delete_endpoint(NET_B, EP1),
                 lambda: agent.join(NET_B, EP1, "/var/run/docker/netns/abc")):
        with pytest.raises(InvalidRequest, match=f"endpoint {EP1[:12]} is not on network {NET_B[:12]}"):
            call()
    for call in (lambda: agent.leave(NET_A, EP2), lambda: agent.delete_endpoint(NET_A, EP2),
                 lambda: agent.join(NET_A, EP2, "/var/run/netns/cgcni")):
        with pytest.raises(Conflict, match=f"endpoint {EP2[:12]} is the CNI attachment cgcontainer/eth0, not Docker's"):
            call()
    with pytest.raises(Conflict, match=f"endpoint {EP1[:12]} is Docker's, not a CNI attachment"):
        agent.delete_endpoint(NET_A, EP1, origin="cni")
    with pytest.raises(Conflict, match="is joined to /var/run/docker/netns/abc: Leave comes first"):
        agent.join(NET_A, EP1, "/var/run/docker/netns/other")
    assert (snapshot(agent), dict(stores.endpoints.docs)) == before
    agent.delete_endpoint(NET_A, EP2, origin="cni")
    agent.delete_endpoint(NET_B, EP2)  # gone: deleting what is gone succeeds, whatever the call names
    agent.leave(NET_B, EP2)
    agent.leave(NET_A, docker_ep.id)
    agent.delete_endpoint(NET_A, docker_ep.id)
    assert agent.endpoints == {}


def test_delete_endpoint_removes_all_its_kernel_objects(
    agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any
) -> None:
    network_only = objects(kernel)
    ep = make_endpoint(agent, NET_A, pool_a, EP1)
    other = make_endpoint(agent, NET_A, pool_a, EP2, n=2)
    agent.join(NET_A, EP1, "/var/run/docker/netns/abc")
    agent.delete_endpoint(NET_A, EP1)
    assert not any(ep.host_ifname in key or str(ep.ipv4.ip) in " ".join(key) for key in kernel.objects)  # type: ignore[union-attr]
    assert objects(kernel) == {**network_only, **{o.key: o for o in plan.endpoint_objects(other, agent.settings)}}
    assert list(stores.endpoints.docs) == [EP2]
    agent.delete_endpoint(NET_A, EP1)  # again: fine
    agent.delete_endpoint(NET_A, hexid("never"))


def test_a_docker_endpoints_veth_goes_after_the_reply(
    agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any
) -> None:
    """DeleteEndpoint removes the map entries at once and leaves the veth (with its routes,
    neighbours and programs) to `run_later`; a removal that fails then is the sweep's to finish."""
    jobs: list[Any] = []
    agent.run_later = jobs.append
    network_only = objects(kernel)
    ep = make_endpoint(agent, NET_A, pool_a, EP1)
    agent.delete_endpoint(NET_A, EP1)
    assert EP1 not in agent.endpoints and list(stores.endpoints.docs) == []
    dev = ep.host_ifname
    left = {k[0] for k, o in kernel.objects.items() if dev in k or dev == getattr(o, "dev", "")}
    assert left == {"veth", "route", "neighbour", "programs"}, left  # no map entry: nothing reaches it
    assert not any(k[0] in ("endpoint-entry", "address-entry") and str(ep.ipv4.ip) in k for k in kernel.objects)  # type: ignore[union-attr]
    assert len(jobs) == 1
    jobs.pop()()
    assert objects(kernel) == network_only
    # made again before its veth went (the same ID: a retried create): the late removal leaves it alone
    ep = make_endpoint(agent, NET_A, pool_a, EP1)
    agent.delete_endpoint(NET_A, EP1)
    ep = make_endpoint(agent, NET_A, pool_a, EP1)
    jobs.pop()()
    assert objects(kernel) == expected(agent) and ("veth", ep.host_ifname) in kernel.objects
    # a removal the kernel refuses after the reply: the sweep removes it
    agent.delete_endpoint(NET_A, EP1)
    kernel.fail_remove = lambda obj: obj.kind == "veth"
    jobs.pop()()
    assert ("veth", ep.host_ifname) in kernel.objects and agent.unconverged == {("veth", ep.host_ifname)}
    kernel.fail_remove = None
    agent.sweep()
    assert objects(kernel) == network_only and agent.unconverged == set()
    # CNI attachments lose their veth within the call (CNI DEL must leave nothing behind)
    _, alloc = agent.ipam.request_address(pool_a.id, None, owner=EP2)
    agent.create_endpoint(NET_A, EP2, pool_a.prefixed(alloc.address), None, origin="cni",  # type: ignore[arg-type]
                          attachment=("cgcid", "eth0"))
    agent.delete_endpoint(NET_A, EP2, origin="cni")
    assert objects(kernel) == network_only and jobs == []


def test_dual_stack_endpoint(agent: Agent, kernel: FakeKernel) -> None:
    p4 = agent.request_pool(PoolRequest(LOCAL_SPACE, None, None, False))
    p6 = agent.request_pool(PoolRequest(LOCAL_SPACE, None, None, True))
    agent.create_network(NET_A, [p4.prefixed(p4.gateway), p6.prefixed(p6.gateway)])  # type: ignore[arg-type]
    a4 = agent.request_address(p4.id, None)[1].address
    a6 = agent.request_address(p6.id, None)[1].address
    ep = agent.create_endpoint(NET_A, EP1, p4.prefixed(a4), p6.prefixed(a6))  # type: ignore[arg-type]
    info = agent.join(NET_A, EP1, "/var/run/docker/netns/abc")
    assert (info.gateway4, info.gateway6) == (p4.gateway, p6.gateway)
    assert ("route", f"{a6}/128") in kernel.objects and ("route", f"{a4}/32") in kernel.objects
    assert plan.endpoint_value(ep).flags == plan.FLAG_IPV4 | plan.FLAG_IPV6


# -- rollback when the kernel fails --------------------------------------------------------------


def test_network_rollback_when_the_kernel_fails(agent: Agent, kernel: FakeKernel, stores: Any) -> None:
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.1.0.0/24"), None, False))
    kernel.fail = lambda obj: isinstance(obj, Route)  # the device and address go in, then this fails
    with pytest.raises(KernelError):
        agent.create_network(NET_A, [pool.prefixed(pool.gateway)])  # type: ignore[arg-type]
    assert agent.networks == {} and stores.networks.docs == {}
    assert objects(kernel) == {}
    assert agent.ipam.pool(pool.id).network_id == ""
    kernel.fail = None
    agent.create_network(NET_A, [pool.prefixed(pool.gateway)])  # type: ignore[arg-type]
    assert objects(kernel) == expected(agent)


def test_network_rollback_keeps_what_other_networks_need(agent: Agent, pool_a: Pool, kernel: FakeKernel) -> None:
    before = snapshot(agent)
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.2.0.0/24"), None, False))
    kernel.fail = lambda obj: isinstance(obj, HostAddress)
    with pytest.raises(KernelError):
        agent.create_network(NET_B, [pool.prefixed(pool.gateway)])  # type: ignore[arg-type]
    agent.ipam.release_pool(pool.id)
    assert snapshot(agent) == before


def test_endpoint_rollback_when_the_kernel_fails(agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any) -> None:
    network_only = objects(kernel)
    kernel.fail = lambda obj: isinstance(obj, Programs)  # veth and map entries are in, programs fail
    with pytest.raises(KernelError):
        make_endpoint(agent, NET_A, pool_a, EP1)
    assert agent.endpoints == {} and stores.endpoints.docs == {}
    assert objects(kernel) == network_only


@pytest.mark.parametrize("where", ["kernel", "state dir", "second address"])
@pytest.mark.parametrize("ledger", ["requested", "lost"])
def test_a_failed_create_endpoint_leaves_the_ledger_as_it_was(
    agent: Agent, kernel: FakeKernel, stores: Any, where: str, ledger: str
) -> None:
    """The agent reserves and binds the endpoint's addresses itself before steps that can fail; a
    failure puts each back: still Docker's pending request (its rollback ReleaseAddress frees it),
    or not reserved at all when the agent reserved it only for this call (the ledger had lost it)."""
    p4, p6 = (agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network(s), None, v6))
              for s, v6 in (("10.2.0.0/24", False), ("fd00:b::/64", True)))
    agent.create_network(NET_B, [p.prefixed(p.gateway) for p in (p4, p6)])  # type: ignore[arg-type]
    _, a4 = agent.request_address(p4.id, None, mac="02:42:0a:00:00:01")
    _, a6 = agent.request_address(p6.id, None, mac="02:42:0a:00:00:01")
    if ledger == "lost":
        agent.ipam.release_address(p4.id, a4.address)
    if where == "second address":
        agent.ipam.bind_endpoint(a6.address, EP2)  # the ledger gives it to another endpoint
    before = agent.ipam.pools(), dict(stores.ipam.docs)
    if where == "kernel":
        kernel.fail = lambda obj: isinstance(obj, Programs)
    elif where == "state dir":
        stores.endpoints.fail_next = StateError("disk full")
    with pytest.raises((KernelError, StateError, Conflict)):
        agent.create_endpoint(NET_B, EP1, p4.prefixed(a4.address), p6.prefixed(a6.address),  # type: ignore[arg-type]
                              "02:42:0a:00:00:01")
    assert EP1 not in agent.endpoints
    assert (agent.ipam.pools(), dict(stores.ipam.docs)) == before


def test_join_rollback_when_the_kernel_fails(agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any) -> None:
    make_endpoint(agent, NET_A, pool_a, EP1)
    before = snapshot(agent), dict(stores.endpoints.docs)
    kernel.fail = lambda obj: isinstance(obj, plan.AddressEntry)
    with pytest.raises(KernelError):
        agent.join(NET_A, EP1, "/var/run/docker/netns/abc")
    assert agent.endpoint(EP1).sandbox == ""
    assert stores.endpoints.docs[EP1] == before[1][EP1]


def test_network_store_failure_changes_nothing(agent: Agent, kernel: FakeKernel, stores: Any) -> None:
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.1.0.0/24"), None, False))
    stores.networks.fail_next = StateError("disk full")
    with pytest.raises(StateError):
        agent.create_network(NET_A, [pool.prefixed(pool.gateway)])  # type: ignore[arg-type]
    assert agent.networks == {} and objects(kernel) == {}


def test_network_store_failure_leaves_the_pool_unbound(agent: Agent, stores: Any) -> None:
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.1.0.0/24"), None, False))
    agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.1.0.0/24"), None, False))  # a retry: refs 2
    stores.networks.fail_next = StateError("disk full")
    with pytest.raises(StateError):
        agent.create_network(NET_A, [pool.prefixed(pool.gateway)])  # type: ignore[arg-type]
    agent.ipam.release_pool(pool.id)  # Docker's rollback after the failed CreateNetwork
    assert agent.ipam.pool(pool.id).network_id == "", "pool stays bound to a network that does not exist"
    # ...which makes the subnet unusable for good:
    agent.ipam.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.1.0.0/24"), None, False))


# -- restore and sweep --------------------------------------------------------------------------


@pytest.fixture
def two_endpoints(agent: Agent, pool_a: Pool) -> tuple[Endpoint, Endpoint]:
    return make_endpoint(agent, NET_A, pool_a, EP1), make_endpoint(agent, NET_A, pool_a, EP2, n=2)


def test_restore_drops_endpoints_whose_veth_vanished(
    agent: Agent, pool_a: Pool, kernel: FakeKernel, stores: Any, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    gone, alive = two_endpoints
    kernel.vanish(gone.host_ifname)
    assert ("endpoint-entry", "@" + gone.host_ifname) in kernel.objects  # map entries stay behind, by dead link
    report = agent.restore()
    assert report.removed_endpoints == [EP1]
    # Docker still holds the address for the container (ReleaseAddress comes when it goes): kept, unbound
    assert report.released == [] and report.kept == [str(gone.ipv4.ip)]  # type: ignore[union-attr]
    assert list(agent.endpoints) == [EP2] and list(stores.endpoints.docs) == [EP2]
    assert agent.ipam.lookup(gone.ipv4.ip)[1].owner == ""  # type: ignore[index,union-attr]
    assert agent.ipam.lookup(alive.ipv4.ip) is not None  # type: ignore[union-attr]
    assert objects(kernel) == expected(agent)
    assert not any(gone.host_ifname in key for key in kernel.objects)


def test_restore_re_adds_missing_objects(
    agent: Agent, kernel: FakeKernel, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    ep = two_endpoints[0]
    route = ("route", f"{ep.ipv4.ip}/32")  # type: ignore[union-attr]
    neigh = ("neighbour", ep.host_ifname, str(ep.ipv4.ip))  # type: ignore[union-attr]
    host_addr = ("address", "cg_cgtest", "10.1.0.1")
    for key in (route, neigh, host_addr):
        del kernel.objects[key]
    report = agent.restore()
    assert report.changes == 3 and report.removed_endpoints == []
    assert objects(kernel) == expected(agent)
    assert isinstance(kernel.objects[neigh], Neighbour)


def test_restore_removes_stale_objects(
    agent: Agent, kernel: FakeKernel, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    stray = Veth("cg0000000000000", "02:00:00:00:00:09", "cellgate:cgtest:" + hexid("old"))
    kernel.objects[stray.key] = stray
    kernel.objects[("route", "10.1.0.99/32")] = Route(ipaddress.ip_network("10.1.0.99/32"), "cg0000000000000")
    agent.restore()
    assert objects(kernel) == expected(agent)


def test_restart_with_the_same_state_changes_nothing(
    agent: Agent,
    stores: Any,
    kernel: FakeKernel,
    ranges: Any,
    settings: Settings,
    clock: FakeClock,
    two_endpoints: tuple[Endpoint, Endpoint],
) -> None:
    agent.join(NET_A, EP1, "/var/run/docker/netns/abc")
    reborn = Agent(stores.networks, stores.endpoints, Ipam(stores.ipam, ranges, clock), kernel, settings, clock)
    report = reborn.restore()
    assert report.changes == 0 and report.removed_endpoints == []
    assert (report.networks, report.endpoints) == (1, 2)
    assert reborn.endpoints == agent.endpoints and reborn.networks == agent.networks
    assert reborn.ipam.pools() == agent.ipam.pools()


def test_restart_with_new_programs_replaces_them_in_place(
    agent: Agent, stores: Any, kernel: FakeKernel, clock: FakeClock, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    reborn = Agent(
        stores.networks, stores.endpoints, agent.ipam, kernel, replace(agent.settings, program_revision="rev2"), clock
    )
    reborn.restore()
    last = kernel.applied[-1]
    assert last.remove == () and last.add == ()
    assert {(old.revision, new.revision) for old, new in last.change} == {("rev1", "rev2")}
    assert len(last.change) == 2


def test_restore_re_reserves_addresses_the_ledger_lost(
    agent: Agent, pool_a: Pool, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    ep = two_endpoints[0]
    agent.ipam.put_back(ep.ipv4.ip, None)  # type: ignore[union-attr]  # the ledger lost it (no release frees it)
    agent.restore()
    alloc = agent.ipam.pool(pool_a.id).allocations[ep.ipv4.ip]  # type: ignore[union-attr]
    assert alloc.owner == EP1


def test_sweep_drops_endpoints_whose_veth_vanished(
    agent: Agent, kernel: FakeKernel, stores: Any, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    assert agent.sweep().removed_endpoints == []
    gone, _ = two_endpoints
    kernel.vanish(gone.host_ifname)
    report = agent.sweep()
    assert report.removed_endpoints == [EP1] and report.kept == [str(gone.ipv4.ip)]  # type: ignore[union-attr]
    assert list(agent.endpoints) == [EP2] and list(stores.endpoints.docs) == [EP2]
    assert agent.ipam.lookup(gone.ipv4.ip)[1].owner == ""  # type: ignore[index,union-attr]
    assert objects(kernel) == expected(agent)  # the map entries left behind are gone too
    # its address is not handed out again while Docker may hold it; Docker's ReleaseAddress frees it
    with pytest.raises(Conflict, match="in use"):
        agent.request_address(agent.ipam.lookup(gone.ipv4.ip)[0].id, gone.ipv4.ip)  # type: ignore[index,union-attr]
    agent.release_address(agent.ipam.lookup(gone.ipv4.ip)[0].id, gone.ipv4.ip)  # type: ignore[index,union-attr]
    assert agent.ipam.lookup(gone.ipv4.ip) is None  # type: ignore[union-attr]


def test_sweep_releases_the_addresses_of_a_vanished_cni_endpoint(
    agent: Agent, kernel: FakeKernel, pool_a: Pool
) -> None:
    _, alloc = agent.ipam.request_address(pool_a.id, None, owner=EP1)
    ep = agent.create_endpoint(NET_A, EP1, pool_a.prefixed(alloc.address), None, origin="cni",  # type: ignore[arg-type]
                               attachment=("cgcid", "eth0"))
    kernel.vanish(ep.host_ifname)
    report = agent.sweep()
    assert report.removed_endpoints == [EP1] and report.released == [str(alloc.address)] and report.kept == []
    assert agent.ipam.lookup(alloc.address) is None


def test_a_removal_the_state_dir_refuses_changes_nothing(
    agent: Agent, kernel: FakeKernel, stores: Any, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    gone, _ = two_endpoints
    before = objects(kernel)
    stores.endpoints.fail_next_delete = StateError("read-only file system")
    with pytest.raises(StateError):
        agent.delete_endpoint(NET_A, gone.id)
    assert gone.id in agent.endpoints and gone.id in stores.endpoints.docs and objects(kernel) == before
    agent.delete_endpoint(NET_A, gone.id)  # once the state dir takes writes again
    assert gone.id not in agent.endpoints and objects(kernel) == expected(agent)


def test_what_a_vanished_endpoint_leaves_is_removed_once_the_state_dir_takes_writes(
    agent: Agent, kernel: FakeKernel, stores: Any, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    gone, _ = two_endpoints
    kernel.vanish(gone.host_ifname)
    stores.endpoints.fail_next_delete = StateError("read-only file system")
    assert agent.sweep().removed_endpoints == [EP1]
    assert gone.id not in agent.endpoints and gone.id in stores.endpoints.docs  # gone, its document left over
    assert objects(kernel) == expected(agent)
    agent.sweep()
    assert gone.id not in stores.endpoints.docs and agent.ipam.lookup(gone.ipv4.ip)[1].owner == ""  # type: ignore[index,union-attr]


# -- queries ------------------------------------------------------------------------------------


def test_find_endpoint(agent: Agent, pool_a: Pool) -> None:
    ep1 = make_endpoint(agent, NET_A, pool_a, "abcd1111" + "0" * 56)
    ep2 = make_endpoint(agent, NET_A, pool_a, "abcd2222" + "0" * 56, n=2)
    assert agent.find_endpoint(ep1.id) == ep1
    assert agent.find_endpoint("abcd1") == ep1
    assert agent.find_endpoint(ep2.host_ifname) == ep2
    assert agent.find_endpoint(str(ep2.ipv4.ip)) == ep2  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        agent.find_endpoint("ffff")
    with pytest.raises(InvalidRequest, match="matches 2 endpoints"):
        agent.find_endpoint("abcd")


def test_request_pool_avoids_foreign_host_routes(agent: Agent, kernel: FakeKernel, pool_a: Pool) -> None:
    kernel.routes = [ipaddress.ip_network("10.200.0.0/24"), ipaddress.ip_network("10.1.0.0/24")]
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, None, None, False))
    assert pool.subnet == ipaddress.ip_network("10.200.1.0/24")


def test_ipam_check_uses_live_endpoints(
    agent: Agent, pool_a: Pool, clock: FakeClock, two_endpoints: tuple[Endpoint, Endpoint]
) -> None:
    stray = agent.request_address(pool_a.id, None)[1].address
    assert agent.ipam_check()[0].ok
    clock.advance(120)
    report, _ = agent.ipam_check(release=True)
    assert [x.address for x in report.released] == [stray]
    assert agent.ipam_check()[0].ok


def test_status(agent: Agent, clock: FakeClock, two_endpoints: tuple[Endpoint, Endpoint]) -> None:
    clock.advance(5)
    status = agent.status()
    assert status["networks"] == 1 and status["endpoints"] == 2
    assert status["uptime"] == 5 and status["instance"] == "cgtest" and status["datapath"] == "rev1"
    assert status["ranges"] == {"ipv4": "10.200.0.0/20", "ipv6": "fd00:cafe::/64"}


# -- identities and policy ----------------------------------------------------------------------

WEB_LABELS = {"app": "web", "env": "prod"}
DB_LABELS = {"app": "db", "env": "prod"}
WEB_FROM_DB = {"labels": ["name=web"], "endpointSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "db"}}],
                            "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}
DB_TO_WEB = {"labels": ["name=db"], "endpointSelector": {"matchLabels": {"app": "db"}},
             "egress": [{"toEndpoints": [{"matchLabels": {"app": "web"}}]}]}


def policy_agent(stores: Any, ipam: Ipam, kernel: FakeKernel, settings: Settings, clock: FakeClock,
                 ident_store: MemoryStore, rule_store: MemoryStore, mode: str = "default") -> Agent:
    state = PolicyState(Identities(ident_store), Repository(rule_store), kernel, mode)
    return Agent(stores.networks, stores.endpoints, ipam, kernel, settings, clock, policy=state)


@pytest.fixture
def ident_store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def rule_store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def pagent(stores: Any, ipam: Ipam, kernel: FakeKernel, settings: Settings, clock: FakeClock,
           ident_store: MemoryStore, rule_store: MemoryStore) -> Agent:
    agent = policy_agent(stores, ipam, kernel, settings, clock, ident_store, rule_store)
    agent.restore()  # as the agent starts: the policy map gets its initial entries
    make_network(agent, NET_A, "10.1.0.0/24")
    return agent


def pool_of(agent: Agent) -> Pool:
    return agent.ipam.pool(f"{LOCAL_SPACE}/10.1.0.0/24")


def import_rules(agent: Agent, *rules: dict[str, Any]) -> int:
    return agent.policy_import(parse_rules(list(rules)))


def subjects(kernel: FakeKernel) -> set[int]:
    return {k.subject for k in kernel.policy}


def peers(kernel: FakeKernel) -> set[int]:
    return {k.peer for k in kernel.policy}


def desired_policy(agent: Agent) -> dict[Any, Any]:
    return agent.policy.desired(agent.endpoints.values())


def record_kernel_calls(kernel: FakeKernel) -> list[tuple[Any, ...]]:
    """Wrap policy_update and apply: every endpoint entry written, with the policy map at that moment."""
    calls: list[tuple[Any, ...]] = []
    update, apply = kernel.policy_update, kernel.apply

    def policy_update(upserts: Any, deletes: Any) -> None:
        update(upserts, deletes)
        calls.append(("policy", dict(kernel.policy)))

    def apply_plan(step: plan.Plan) -> None:
        for obj in list(step.add) + [new for _, new in step.change]:
            if isinstance(obj, (plan.EndpointEntry, plan.AddressEntry)):
                calls.append(("entry", obj.value.identity, dict(kernel.policy)))
        apply(step)

    kernel.policy_update = policy_update  # type: ignore[method-assign]
    kernel.apply = apply_plan  # type: ignore[method-assign]
    return calls


def test_a_new_endpoint_has_the_init_identity_and_init_is_closed_once_rules_exist(
    pagent: Agent, kernel: FakeKernel
) -> None:
    ep = make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    assert (ep.identity, ep.labels_known, ep.labels) == (ids.INIT, False, ())
    assert kernel.objects[("endpoint-entry", ep.host_ifname)].value.identity == ids.INIT
    assert {k for k in kernel.policy if k.subject == ids.INIT} == {
        PolicyKey(ids.INIT, False, 0, 0, 0, 0, True), PolicyKey(ids.INIT, True, 0, 0, 0, 0, True)}  # empty repo: open
    import_rules(pagent, WEB_FROM_DB)
    assert ids.INIT not in subjects(kernel)  # fail-closed until the labels are known


def test_set_labels_gives_an_identity_whose_policy_is_in_before_the_endpoint_uses_it(
    pagent: Agent, kernel: FakeKernel, stores: Any
) -> None:
    pool = pool_of(pagent)
    import_rules(pagent, WEB_FROM_DB, DB_TO_WEB)
    db = pagent.set_labels(make_endpoint(pagent, NET_A, pool, EP2, n=2).id, DB_LABELS)
    ep = make_endpoint(pagent, NET_A, pool, EP1)
    calls = record_kernel_calls(kernel)
    web = pagent.set_labels(EP1, WEB_LABELS)

    assert web.labels == ("container:app=web", "container:env=prod") and web.labels_known
    assert ids.FIRST_ALLOCATED <= web.identity != db.identity
    assert pagent.policy.identities.labels_of(web.identity) == web.label_set
    assert stores.endpoints.docs[EP1]["identity"] == web.identity
    switches = [c for c in calls if c[0] == "entry"]
    assert switches and all(identity == web.identity for _, identity, _ in switches)
    for _, _, policy_then in switches:
        # the new identity's own policy (as subject) ...
        assert PolicyKey(web.identity, False, db.identity, 6, 80, 16) in policy_then
        # ... and the peers' policy naming it (db may send to web) were written first
        assert PolicyKey(db.identity, True, web.identity, 0, 0, 0, True) in policy_then
    assert calls[0][0] == "policy", "the policy map must be written before the endpoint entry"
    assert kernel.objects[("endpoint-entry", ep.host_ifname)].value.identity == web.identity
    assert kernel.policy == desired_policy(pagent) == pagent.policy.applied


def test_set_labels_again_with_the_same_labels_changes_nothing(pagent: Agent, kernel: FakeKernel) -> None:
    make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    ep = pagent.set_labels(EP1, WEB_LABELS)
    applied, policy = len(kernel.applied), dict(kernel.policy)
    assert pagent.set_labels(EP1, dict(WEB_LABELS)) == ep
    assert len(kernel.applied) == applied and kernel.policy == policy


def test_endpoints_with_the_same_labels_share_an_identity(pagent: Agent) -> None:
    pool = pool_of(pagent)
    make_endpoint(pagent, NET_A, pool, EP1)
    make_endpoint(pagent, NET_A, pool, EP2, n=2)
    assert pagent.set_labels(EP1, WEB_LABELS).identity == pagent.set_labels(EP2, WEB_LABELS).identity


def test_forged_reserved_labels_are_ignored(pagent: Agent) -> None:
    make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    ep = pagent.set_labels(EP1, {"reserved:host": "", "k8s:app": "web", "app": "x"})
    assert ep.labels == ("container:app=x",) and ep.identity >= ids.FIRST_ALLOCATED


def test_a_label_change_releases_the_old_identity_and_its_entries(pagent: Agent, kernel: FakeKernel) -> None:
    pool = pool_of(pagent)
    import_rules(pagent, WEB_FROM_DB, DB_TO_WEB)
    make_endpoint(pagent, NET_A, pool, EP2, n=2)
    db = pagent.set_labels(EP2, DB_LABELS)
    make_endpoint(pagent, NET_A, pool, EP1)
    old = pagent.set_labels(EP1, WEB_LABELS).identity
    assert old in subjects(kernel) and old in peers(kernel)
    new = pagent.set_labels(EP1, {"app": "api"}).identity
    assert new != old
    assert pagent.policy.identities.labels_of(old) is None
    assert old not in subjects(kernel) and old not in peers(kernel)
    assert new in subjects(kernel) and db.identity in subjects(kernel)
    assert kernel.policy == desired_policy(pagent)


def test_a_label_change_keeps_a_shared_identity(pagent: Agent, kernel: FakeKernel) -> None:
    pool = pool_of(pagent)
    make_endpoint(pagent, NET_A, pool, EP1)
    make_endpoint(pagent, NET_A, pool, EP2, n=2)
    shared = pagent.set_labels(EP1, WEB_LABELS).identity
    pagent.set_labels(EP2, WEB_LABELS)
    pagent.set_labels(EP1, DB_LABELS)
    assert pagent.policy.identities.labels_of(shared) is not None and shared in subjects(kernel)


def test_a_kernel_failure_during_set_labels_keeps_the_old_identity_and_holds_nothing_new(
    pagent: Agent, kernel: FakeKernel
) -> None:
    make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    before = pagent.endpoint(EP1), dict(kernel.policy)
    kernel.fail = lambda obj: isinstance(obj, plan.EndpointEntry)
    with pytest.raises(KernelError):
        pagent.set_labels(EP1, WEB_LABELS)
    kernel.fail = None
    assert pagent.endpoint(EP1) == before[0]
    assert pagent.policy.identities.allocated() == [], "the new identity leaked"
    assert kernel.policy == before[1] == desired_policy(pagent)


def test_deleting_an_endpoint_frees_its_identity_and_entries(pagent: Agent, kernel: FakeKernel) -> None:
    pool = pool_of(pagent)
    import_rules(pagent, WEB_FROM_DB, DB_TO_WEB)
    make_endpoint(pagent, NET_A, pool, EP1)
    make_endpoint(pagent, NET_A, pool, EP2, n=2)
    web = pagent.set_labels(EP1, WEB_LABELS).identity
    db = pagent.set_labels(EP2, DB_LABELS).identity
    pagent.delete_endpoint(NET_A, EP1)
    assert pagent.policy.identities.labels_of(web) is None
    assert web not in subjects(kernel) and web not in peers(kernel)
    assert db in subjects(kernel)
    pagent.delete_endpoint(NET_A, EP2)
    assert pagent.policy.identities.allocated() == []
    assert subjects(kernel) <= {ids.INIT}
    assert kernel.policy == desired_policy(pagent)


def test_policy_import_writes_entries_and_returns_the_revision(pagent: Agent, kernel: FakeKernel) -> None:
    make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    web = pagent.set_labels(EP1, WEB_LABELS).identity
    assert PolicyKey(web, False, 0, 0, 0, 0, True) in kernel.policy  # open before any rule
    assert import_rules(pagent, WEB_FROM_DB) == 1
    assert pagent.policy.realized_revision == pagent.policy.repository.revision == 1
    ingress = {k: v for k, v in kernel.policy.items() if k.subject == web and not k.egress}
    assert ingress == {PolicyKey(web, False, 0, 6, 80, 16): PolicyValue(False, 1)} or ingress == {}
    # nothing has app=db yet: the rule allows no one at ingress, egress stays open
    assert ingress == {}
    assert kernel.policy[PolicyKey(web, True, 0, 0, 0, 0, True)] == PolicyValue(False, 0)
    make_endpoint(pagent, NET_A, pool_of(pagent), EP2, n=2)
    db = pagent.set_labels(EP2, DB_LABELS).identity
    assert kernel.policy[PolicyKey(web, False, db, 6, 80, 16)] == PolicyValue(False, 1)
    assert pagent.policy_delete([Label("unspec", "name", "web")]) == (2, 1)
    assert PolicyKey(web, False, db, 6, 80, 16) not in kernel.policy
    assert kernel.policy[PolicyKey(web, False, 0, 0, 0, 0, True)] == PolicyValue(False, 0)
    assert kernel.policy == desired_policy(pagent)


def test_a_policy_map_failure_during_import_changes_nothing(
    pagent: Agent, kernel: FakeKernel, rule_store: MemoryStore
) -> None:
    make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    pagent.set_labels(EP1, WEB_LABELS)
    import_rules(pagent, DB_TO_WEB)
    before = (pagent.policy.repository.snapshot(), dict(kernel.policy), dict(rule_store.docs),
              pagent.policy.realized_revision)
    kernel.fail_policy = True
    with pytest.raises(KernelError):
        import_rules(pagent, WEB_FROM_DB)
    assert (pagent.policy.repository.snapshot(), dict(kernel.policy), dict(rule_store.docs),
            pagent.policy.realized_revision) == before
    kernel.fail_policy = True
    with pytest.raises(KernelError):
        pagent.policy_delete(None)
    assert (pagent.policy.repository.snapshot(), dict(kernel.policy)) == before[:2]


class HalfKernel(FakeKernel):
    """Writes half of an update, then fails: what a full map does in the middle of a batch."""

    fail_half = False

    def policy_update(self, upserts: Any, deletes: Any) -> None:
        if self.fail_half:
            self.fail_half = False
            half = dict(list(upserts.items())[: max(1, len(upserts) // 2)])
            self.policy.update(half)
            raise KernelError("map full")
        super().policy_update(upserts, deletes)


def test_a_partly_written_import_is_rolled_back(stores: Any, ipam: Ipam, settings: Settings, clock: FakeClock) -> None:
    kernel = HalfKernel()
    agent = policy_agent(stores, ipam, kernel, settings, clock, MemoryStore(), MemoryStore())
    agent.restore()
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    for n, (eid, labels) in enumerate(((EP1, WEB_LABELS), (EP2, DB_LABELS)), start=1):
        make_endpoint(agent, NET_A, pool, eid, n=n)
        agent.set_labels(eid, labels)
    before = dict(kernel.policy)
    kernel.fail_half = True
    with pytest.raises(KernelError):
        import_rules(agent, WEB_FROM_DB, DB_TO_WEB)
    assert agent.policy.repository.rules == []
    assert kernel.policy == before, "entries of rules that were never imported stay in force"
    assert agent.policy.applied == kernel.policy


def test_a_store_failure_during_import_leaves_the_map_as_the_repository_says(
    pagent: Agent, kernel: FakeKernel, rule_store: MemoryStore
) -> None:
    make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    pagent.set_labels(EP1, WEB_LABELS)
    before = dict(kernel.policy)
    rule_store.fail_next = StateError("disk full")
    with pytest.raises(StateError):
        import_rules(pagent, WEB_FROM_DB)
    assert pagent.policy.repository.rules == []
    assert kernel.policy == before == desired_policy(pagent)


def test_restore_keeps_identities_and_loads_the_policy_map(
    stores: Any, ipam: Ipam, kernel: FakeKernel, settings: Settings, clock: FakeClock,
    ident_store: MemoryStore, rule_store: MemoryStore, pagent: Agent
) -> None:
    pool = pool_of(pagent)
    make_endpoint(pagent, NET_A, pool, EP1)
    make_endpoint(pagent, NET_A, pool, EP2, n=2)
    web, db = pagent.set_labels(EP1, WEB_LABELS).identity, pagent.set_labels(EP2, DB_LABELS).identity
    revision = import_rules(pagent, WEB_FROM_DB, DB_TO_WEB)
    policy = dict(kernel.policy)
    calls = record_kernel_calls(kernel)

    reborn = policy_agent(stores, Ipam(stores.ipam, agent_ranges(pagent), clock), kernel, settings, clock,
                          ident_store, rule_store)
    report = reborn.restore()
    assert report.changes == 0
    assert (reborn.endpoint(EP1).identity, reborn.endpoint(EP2).identity) == (web, db)
    assert reborn.policy.applied == kernel.policy == policy
    assert [c for c in calls if c[0] == "policy"] == []  # nothing to write: the pinned map is right
    assert reborn.policy.repository.revision == revision
    assert reborn.policy.realized_revision == revision, "policy wait would time out after every restart"


def agent_ranges(agent: Agent) -> Any:
    return agent.ipam.ranges


def test_restore_repairs_the_policy_map_and_frees_stale_identities(
    stores: Any, ipam: Ipam, kernel: FakeKernel, settings: Settings, clock: FakeClock,
    ident_store: MemoryStore, rule_store: MemoryStore, pagent: Agent
) -> None:
    make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    web = pagent.set_labels(EP1, WEB_LABELS).identity
    import_rules(pagent, WEB_FROM_DB)
    stale = Identities(ident_store).acquire(frozenset({Label("container", "app", "gone")}), "dead-endpoint")
    want = dict(kernel.policy)
    kernel.policy.pop(next(iter(kernel.policy)))
    kernel.policy[PolicyKey(stale, False, 0, 0, 0, 0, True)] = PolicyValue(False, 0)

    reborn = policy_agent(stores, ipam, kernel, settings, clock, ident_store, rule_store)
    reborn.restore()
    assert reborn.endpoint(EP1).identity == web
    assert reborn.policy.identities.labels_of(stale) is None
    assert kernel.policy == want == reborn.policy.applied


def test_enforcement_mode_never_allows_everything(
    stores: Any, ipam: Ipam, kernel: FakeKernel, settings: Settings, clock: FakeClock
) -> None:
    agent = policy_agent(stores, ipam, kernel, settings, clock, MemoryStore(), MemoryStore(), mode="never")
    make_endpoint(agent, NET_A, make_network(agent, NET_A, "10.1.0.0/24"), EP1)
    web = agent.set_labels(EP1, WEB_LABELS).identity
    import_rules(agent, WEB_FROM_DB, {"endpointSelector": {}, "egress": [{}]})
    assert {k for k in kernel.policy if k.subject == web} == {
        PolicyKey(web, False, 0, 0, 0, 0, True), PolicyKey(web, True, 0, 0, 0, 0, True)}
    with pytest.raises(InvalidRequest, match="enforcement"):
        PolicyState(Identities(MemoryStore()), Repository(), kernel, "sometimes")


# -- trace parties ------------------------------------------------------------------------------


def test_trace_parties_and_verdicts(pagent: Agent) -> None:
    pool = pool_of(pagent)
    make_endpoint(pagent, NET_A, pool, EP1)
    make_endpoint(pagent, NET_A, pool, EP2, n=2)
    web = pagent.set_labels(EP1, WEB_LABELS)
    db = pagent.set_labels(EP2, DB_LABELS)
    import_rules(pagent, WEB_FROM_DB)

    by_ep = pagent.party("endpoint", EP2[:8])
    assert (by_ep.identity, by_ep.labels, by_ep.local) == (db.identity, db.label_set, True)
    by_id = pagent.party("identity", str(web.identity))
    assert (by_id.identity, by_id.local) == (web.identity, True)
    host = pagent.party("identity", "1")
    assert (host.identity, host.local) == (ids.HOST, False)
    by_labels = pagent.party("labels", "app=db, env=prod")
    assert (by_labels.identity, by_labels.local) == (db.identity, True)
    new = pagent.party("labels", "app=db,env=staging")
    assert new.local and new.identity not in pagent.policy.identities.all()

    assert pagent.trace(by_ep, by_id, "80/tcp").allowed
    assert not pagent.trace(by_ep, by_id, "81/tcp").allowed
    assert pagent.trace(new, by_id, "80").allowed  # a would-be db is allowed too
    assert not pagent.trace(host, by_id, "80/tcp").allowed
    both = pagent.trace(pagent.party("labels", "app=x"), pagent.party("labels", "app=x"), "")
    assert both.egress is not None and both.ingress is not None and both.allowed  # not selected: open


@pytest.mark.parametrize(
    ("kind", "value", "error"),
    [
        ("identity", "abc", InvalidRequest),
        ("identity", "9999", NotFound),
        ("identity", "0", NotFound),
        ("endpoint", "ffff", NotFound),
        ("labels", "", InvalidRequest),
        ("labels", " , ", InvalidRequest),
        ("labels", "=web", InvalidRequest),
        ("pod", "x", InvalidRequest),
    ],
)
def test_bad_trace_parties(pagent: Agent, kind: str, value: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        pagent.party(kind, value)


@pytest.mark.parametrize("dport", ["http", "80/xtp", "99999/tcp"])
def test_bad_trace_ports(pagent: Agent, dport: str) -> None:
    party = pagent.party("identity", "1")
    with pytest.raises(InvalidRequest):
        pagent.trace(party, party, dport)


def test_status_reports_policy(pagent: Agent) -> None:
    make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    pagent.set_labels(EP1, WEB_LABELS)
    import_rules(pagent, WEB_FROM_DB)
    policy = pagent.status()["policy"]
    assert policy == {"enforcement": "default", "revision": 1, "realized": 1, "rules": 1,
                      "entries": len(pagent.policy.applied), "identities": 1}


def test_create_endpoint_with_labels_is_identified_from_the_start(pagent: Agent, kernel: FakeKernel) -> None:
    import_rules(pagent, WEB_FROM_DB)
    calls = record_kernel_calls(kernel)
    v4 = ipaddress.IPv4Interface("10.1.0.20/24")
    ep = pagent.create_endpoint(NET_A, EP1, v4, None, origin="cni", labels={"app": "web"}, label_source="mesos")
    assert ep.labels == ("mesos:app=web",) and ep.labels_known and ep.identity >= ids.FIRST_ALLOCATED
    entries = [c for c in calls if c[0] == "entry"]
    assert entries and all(identity == ep.identity for _, identity, _ in entries)
    assert all(any(k.subject == ep.identity for k in policy) for _, _, policy in entries)
    assert kernel.policy == desired_policy(pagent)


def test_a_failed_create_endpoint_with_labels_releases_its_identity(pagent: Agent, kernel: FakeKernel) -> None:
    before = dict(kernel.policy)
    kernel.fail = lambda obj: isinstance(obj, Programs)
    with pytest.raises(KernelError):
        pagent.create_endpoint(NET_A, EP1, ipaddress.IPv4Interface("10.1.0.20/24"), None, labels={"app": "web"})
    assert pagent.policy.identities.allocated() == [] and pagent.endpoints == {}
    assert kernel.policy == before


def test_sweep_frees_the_identity_of_a_vanished_endpoint(pagent: Agent, kernel: FakeKernel) -> None:
    ep = make_endpoint(pagent, NET_A, pool_of(pagent), EP1)
    web = pagent.set_labels(EP1, WEB_LABELS).identity
    assert web in subjects(kernel)
    kernel.vanish(ep.host_ifname)
    assert pagent.sweep().removed_endpoints == [EP1]
    assert pagent.policy.identities.labels_of(web) is None and web not in subjects(kernel)
