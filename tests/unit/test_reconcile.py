"""Reconciliation with the runtimes on fakes: what Docker forgot while the agent was away goes,
with everything it holds; what Docker still has, what is too young to judge, and everything
while Docker cannot be asked, stays. Docker's ReleaseAddress of a held address."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from datapath.errors import Conflict, StateError
from datapath.fake import FakeKernel
from datapath.model import Endpoint
from ipam.allocator import LOCAL_SPACE, PoolRequest
from ipam.pool import Allocation, Pool
from plugin.service import Agent, RuntimeView
from tests.unit.helpers import FakeClock, hexid
from tests.unit.test_service import make_endpoint, make_network

NET_A, NET_B = hexid("net-a"), hexid("net-b")
EP1, EP2, EP3 = hexid("ep-1"), hexid("ep-2"), hexid("ep-3")
GRACE = 60.0


def view(agent: Agent, networks: tuple[str, ...] = (), endpoints: tuple[str, ...] = (),
         addresses: tuple[str, ...] = (), subnets: tuple[str, ...] = ()) -> RuntimeView:
    return RuntimeView(agent._clock(), frozenset(networks), frozenset(endpoints),
                       frozenset(ipaddress.ip_address(a) for a in addresses),
                       frozenset(ipaddress.ip_network(s) for s in subnets))


def owned_objects(kernel: FakeKernel) -> set[Any]:
    return {o.key for o in kernel.observe()}


@pytest.fixture
def scene(agent: Agent, clock: FakeClock) -> tuple[Pool, Endpoint, Endpoint]:
    agent.reconcile_grace = GRACE
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    e1 = make_endpoint(agent, NET_A, pool, EP1, 1)
    e2 = make_endpoint(agent, NET_A, pool, EP2, 2)
    clock.advance(GRACE + 1)
    return pool, e1, e2


def test_a_network_docker_forgot_goes_with_its_endpoints_pools_and_kernel_objects(
    agent: Agent, kernel: FakeKernel, scene: Any, clock: FakeClock
) -> None:
    pool, _, _ = scene
    report = agent.reconcile(view(agent))
    assert [n for n, _ in report.networks] == [NET_A]
    assert sorted(e for e, _ in report.endpoints) == sorted([EP1, EP2])
    assert not agent.networks and not agent.endpoints
    assert agent.ipam.pools() == []
    assert owned_objects(kernel) == set()  # veths, routes, gateway device: all gone
    # the subnet is free again: the same `docker network create --subnet` works
    again = make_network(agent, NET_B, "10.1.0.0/24")
    assert again.subnet == pool.subnet


def test_what_docker_has_stays_and_only_forgotten_endpoints_go(agent: Agent, scene: Any) -> None:
    pool, e1, _ = scene
    report = agent.reconcile(view(agent, networks=(NET_A,), endpoints=(EP1,), addresses=(str(e1.ipv4.ip),)))
    assert report.networks == [] and [e for e, _ in report.endpoints] == [EP2]
    assert set(agent.endpoints) == {EP1}
    held = {a.address for a in agent.ipam.pool(pool.id).endpoint_allocations()}
    assert held == {e1.ipv4.ip}  # e2's address is free again
    assert agent.ipam_check(grace=0)[0].ok


def test_nothing_is_judged_without_a_view_or_before_the_grace(agent: Agent, clock: FakeClock) -> None:
    agent.reconcile_grace = GRACE
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    make_endpoint(agent, NET_A, pool, EP1, 1)
    assert agent.reconcile(None).empty  # Docker unreachable: nothing removed
    clock.advance(GRACE - 5)
    report = agent.reconcile(view(agent))
    assert report.empty and report.recheck_at is not None  # too young: judged again later
    assert set(agent.endpoints) == {EP1} and set(agent.networks) == {NET_A}
    clock.advance(10)
    assert not agent.reconcile(view(agent)).empty
    assert not agent.endpoints and not agent.networks


def test_a_snapshot_taken_before_an_endpoint_was_created_never_removes_it(agent: Agent, clock: FakeClock) -> None:
    agent.reconcile_grace = GRACE
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    old = view(agent, networks=(NET_A,))  # Docker asked, then a `docker run` lands
    clock.advance(GRACE * 3)
    make_endpoint(agent, NET_A, pool, EP1, 1)
    assert agent.reconcile(old).empty
    assert set(agent.endpoints) == {EP1}


def test_owner_less_addresses_go_once_no_request_can_claim_them(agent: Agent, scene: Any, clock: FakeClock) -> None:
    pool, e1, e2 = scene
    # `docker run --ip6 <gateway>` on a dual-stack network: the IPv4 address was allocated, the
    # run failed, and Docker never released it
    _, stray = agent.request_address(pool.id, None, mac="02:42:0a:00:00:99")
    _, kept = agent.request_address(pool.id, None, mac="02:42:0a:00:00:98")
    alive = view(agent, networks=(NET_A,), endpoints=(EP1, EP2), addresses=(str(kept.address),))
    assert agent.reconcile(alive).empty  # both are young: a request may still claim them
    clock.advance(GRACE + 1)
    report = agent.reconcile(view(agent, networks=(NET_A,), endpoints=(EP1, EP2), addresses=(str(kept.address),)))
    assert [a for _, a, _ in report.addresses] == [stray.address]
    held = {a.address for a in agent.ipam.pool(pool.id).endpoint_allocations()}
    assert held == {e1.ipv4.ip, e2.ipv4.ip, kept.address}  # a container of Docker's holds `kept`


def test_pools_without_a_docker_network_go_unless_docker_uses_them(agent: Agent, clock: FakeClock) -> None:
    agent.reconcile_grace = GRACE
    # --ipam-driver cellgate with another network driver: the pool is never bound by CreateNetwork
    used = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.5.0.0/24"), None, False))
    lost = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.6.0.0/24"), None, False))
    clock.advance(GRACE + 1)
    report = agent.reconcile(view(agent, subnets=("10.5.0.0/24",)))
    assert [p for p, _ in report.pools] == [lost.id]
    assert [p.id for p in agent.ipam.pools()] == [used.id]


def test_cni_attachments_are_reported_when_their_namespace_is_gone_and_removed_only_on_request(
    agent: Agent, clock: FakeClock
) -> None:
    agent.reconcile_grace = GRACE
    from datapath.naming import cni_network_id

    nid = cni_network_id("cgnet")
    pool = agent.request_pool(PoolRequest(LOCAL_SPACE, ipaddress.ip_network("10.7.0.0/24"), None, False))
    assert pool.gateway is not None
    agent.create_network(nid, [pool.prefixed(pool.gateway)], name="cgnet")
    _, alloc = agent.ipam.request_address(pool.id, None, owner=EP3)
    agent.create_endpoint(nid, EP3, pool.prefixed(alloc.address), None, origin="cni",  # type: ignore[arg-type]
                          attachment=("cgcontainer", "eth0"), sandbox="/nonexistent/cgnetns")
    clock.advance(GRACE + 1)
    assert agent.reconcile(view(agent)).empty  # Docker knows nothing of CNI: never judged by it
    assert EP3 in agent.endpoints
    _, stale = agent.ipam_check()
    assert [(e, why) for e, why in stale.endpoints] == [(EP3, "its network namespace /nonexistent/cgnetns is gone")]
    assert EP3 in agent.endpoints
    _, stale = agent.ipam_check(release=True)
    assert stale.removed and EP3 not in agent.endpoints
    assert agent.ipam.lookup(alloc.address) is None


def test_docker_releasing_a_held_address_removes_the_endpoint_it_never_deleted(
    agent: Agent, kernel: FakeKernel, clock: FakeClock
) -> None:
    # SIGKILL during CreateEndpoint: Docker's retry arrives with an empty body and fails, and
    # Docker then releases the address without ever sending DeleteEndpoint
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    ep = make_endpoint(agent, NET_A, pool, EP1, 1)
    assert ep.ipv4 is not None
    agent.release_address(pool.id, ep.ipv4.ip)
    assert EP1 not in agent.endpoints
    assert ("veth", ep.host_ifname) not in owned_objects(kernel)
    assert agent.ipam.lookup(ep.ipv4.ip) is None
    assert agent.ipam_check(grace=0)[0].ok


def test_an_endpoint_whose_address_the_ledger_lost_reserves_it(agent: Agent, clock: FakeClock) -> None:
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    _, alloc = agent.request_address(pool.id, None, mac="02:42:0a:00:00:01")
    agent.ipam.release_address(pool.id, alloc.address)  # released before the (retried) CreateEndpoint
    agent.create_endpoint(NET_A, EP1, pool.prefixed(alloc.address), None, "02:42:0a:00:00:01")  # type: ignore[arg-type]
    found = agent.ipam.lookup(alloc.address)
    assert found is not None and found[1].owner == EP1
    with pytest.raises(Conflict):
        agent.request_address(pool.id, alloc.address, mac="02:42:0a:00:00:02")


def test_an_address_whose_endpoint_is_gone_goes_unless_a_container_holds_it(
    agent: Agent, kernel: FakeKernel, stores: Any, scene: Any, clock: FakeClock
) -> None:
    """Docker deleted both endpoints but its ReleaseAddress never landed (the state dir refused it):
    the addresses are bound to endpoints that are gone. One that a container still holds stays (and
    `ipam check` calls it no leak); the other goes. With a second network, pools of both are judged."""
    pool, e1, e2 = scene
    make_network(agent, NET_B, "10.2.0.0/24")
    for ep in (e1, e2):
        agent.delete_endpoint(NET_A, ep.id)
    stores.ipam.fail_next = StateError("read-only file system")
    with pytest.raises(StateError):
        agent.release_address(pool.id, e1.ipv4.ip)  # type: ignore[union-attr]
    docker = view(agent, networks=(NET_A, NET_B), addresses=(str(e2.ipv4.ip),))  # type: ignore[union-attr]
    check, _ = agent.ipam_check(grace=0)
    assert [leak.address for leak in check.leaked] == [e1.ipv4.ip, e2.ipv4.ip]  # type: ignore[union-attr]
    agent.runtime_view = lambda: docker
    assert [leak.address for leak in agent.ipam_check(grace=0)[0].leaked] == [e1.ipv4.ip]  # type: ignore[union-attr]
    report = agent.reconcile(docker)
    assert [a for _, a, _ in report.addresses] == [e1.ipv4.ip]  # type: ignore[union-attr]
    assert {a.address for a in agent.ipam.pool(pool.id).endpoint_allocations()} == {e2.ipv4.ip}  # type: ignore[union-attr]


def test_the_address_of_a_vanished_docker_endpoint_goes_once_no_container_holds_it(
    agent: Agent, kernel: FakeKernel, clock: FakeClock
) -> None:
    """A Docker endpoint whose veth vanished keeps its address, unbound, while a container holds it;
    once none does (dockerd restarted: the container died unseen) it is released at once, not after
    the grace that protects requests in flight: no request for it can be in flight."""
    agent.reconcile_grace = GRACE
    pool = make_network(agent, NET_A, "10.1.0.0/24")
    e1, e2 = make_endpoint(agent, NET_A, pool, EP1, 1), make_endpoint(agent, NET_A, pool, EP2, 2)
    clock.advance(5)  # both far younger than the grace
    for ep in (e1, e2):
        kernel.vanish(ep.host_ifname)
    report = agent.sweep()
    assert sorted(report.kept) == sorted(str(e.ipv4.ip) for e in (e1, e2))  # type: ignore[union-attr]
    allocations = {a.address: a for a in agent.ipam.pool(pool.id).endpoint_allocations()}
    assert all(a.kept and not a.owner for a in allocations.values()) and len(allocations) == 2
    docker = view(agent, networks=(NET_A,), addresses=(str(e2.ipv4.ip),))  # e2's container still runs
    report = agent.reconcile(docker)
    assert [a for _, a, _ in report.addresses] == [e1.ipv4.ip]  # type: ignore[union-attr]
    left = agent.ipam.pool(pool.id).allocations
    assert e2.ipv4.ip in left and e1.ipv4.ip not in left  # type: ignore[union-attr]
    assert Allocation.from_doc(left[e2.ipv4.ip].to_doc()) == left[e2.ipv4.ip]  # type: ignore[union-attr]  # kept, persisted
    # a new endpoint bound to a kept address (Docker's container came back with it) is no longer kept
    agent.create_endpoint(NET_A, EP3, e2.ipv4, None)
    (again,) = [a for a in agent.ipam.pool(pool.id).endpoint_allocations() if a.address == e2.ipv4.ip]  # type: ignore[union-attr]
    assert again.owner == EP3 and not again.kept
    assert agent.ipam_check(grace=0)[0].ok
