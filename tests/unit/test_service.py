"""plugin.service.Agent on fakes: networks, endpoints, rollback, restore and sweep."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from datapath import plan
from datapath.errors import Conflict, InvalidRequest, KernelError, NotFound, StateError
from datapath.fake import FakeKernel
from datapath.model import Endpoint
from datapath.plan import HostAddress, HostDevice, Neighbour, Programs, Route, Settings, Veth
from ipam.allocator import LOCAL_SPACE, MAC_KEY, Ipam, PoolRequest
from ipam.pool import Pool
from plugin.service import Agent
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
    _, alloc = agent.request_address(pool.id, None, {MAC_KEY: mac})
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


def test_dual_stack_endpoint(agent: Agent, kernel: FakeKernel) -> None:
    p4 = agent.request_pool(PoolRequest(LOCAL_SPACE, None, None, False))
    p6 = agent.request_pool(PoolRequest(LOCAL_SPACE, None, None, True))
    agent.create_network(NET_A, [p4.prefixed(p4.gateway), p6.prefixed(p6.gateway)])  # type: ignore[arg-type]
    a4 = agent.request_address(p4.id, None, {})[1].address
    a6 = agent.request_address(p6.id, None, {})[1].address
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
    assert ("endpoint-entry", gone.host_ifname) in kernel.objects  # map entries stay behind
    report = agent.restore()
    assert report.removed_endpoints == [EP1]
    assert report.released == [str(gone.ipv4.ip)]  # type: ignore[union-attr]
    assert list(agent.endpoints) == [EP2] and list(stores.endpoints.docs) == [EP2]
    assert agent.ipam.lookup(gone.ipv4.ip) is None  # type: ignore[union-attr]
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
    agent.ipam.release_address(pool_a.id, ep.ipv4.ip)  # type: ignore[union-attr]
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
    assert report.removed_endpoints == [EP1] and report.released == [str(gone.ipv4.ip)]  # type: ignore[union-attr]
    assert list(agent.endpoints) == [EP2] and list(stores.endpoints.docs) == [EP2]
    assert agent.ipam.lookup(gone.ipv4.ip) is None  # type: ignore[union-attr]
    assert objects(kernel) == expected(agent)  # the map entries left behind are gone too


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
    stray = agent.request_address(pool_a.id, None, {})[1].address
    assert agent.ipam_check().ok
    clock.advance(120)
    report = agent.ipam_check(release=True)
    assert [x.address for x in report.released] == [stray]
    assert agent.ipam_check().ok


def test_status(agent: Agent, clock: FakeClock, two_endpoints: tuple[Endpoint, Endpoint]) -> None:
    clock.advance(5)
    status = agent.status()
    assert status["networks"] == 1 and status["endpoints"] == 2
    assert status["uptime"] == 5 and status["instance"] == "cgtest" and status["datapath"] == "rev1"
    assert status["ranges"] == {"ipv4": "10.200.0.0/20", "ipv6": "fd00:cafe::/64"}
