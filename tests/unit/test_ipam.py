"""Host-scope IPAM: pools, gateways, aux and static addresses, idempotency, persistence, reconciliation."""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable
from typing import Any

import pytest

from datapath.errors import AddressExhausted, Conflict, InvalidRequest, NotFound, StateError
from datapath.store import MemoryStore
from ipam.allocator import (
    GLOBAL_SPACE,
    LOCAL_SPACE,
    HostRanges,
    Ipam,
    PoolRequest,
)
from ipam.pool import KIND_AUX, KIND_ENDPOINT, KIND_GATEWAY, Pool, check_subnet, pool_id
from tests.unit.helpers import FakeClock, hexid

GW = KIND_GATEWAY
NET_ID = hexid("net-a")
EP1, EP2 = hexid("ep-1"), hexid("ep-2")


def net(text: str) -> Any:
    return ipaddress.ip_network(text)


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


def mac(n: int) -> str:
    return f"02:42:0a:00:00:{n:02x}"


def req(subnet: str | None = None, subpool: str | None = None, v6: bool = False, **options: str) -> PoolRequest:
    return PoolRequest(
        LOCAL_SPACE, net(subnet) if subnet else None, net(subpool) if subpool else None, v6, dict(options)
    )


def state(ipam: Ipam, store: MemoryStore) -> tuple[Any, Any]:
    return ipam.pools(), copy.deepcopy(store.docs)


@pytest.fixture
def store(stores: Any) -> MemoryStore:
    return stores.ipam


@pytest.fixture
def bound(ipam: Ipam) -> Pool:
    """10.1.0.0/24 bound to a network, so requests are endpoint requests."""
    pool = ipam.request_pool(req("10.1.0.0/24"))
    ipam.bind_network(NET_ID, [pool.subnet])
    return ipam.pool(pool.id)


# -- pools ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "subpool", "v6", "pid", "gateway"),
    [
        ("10.1.0.0/24", None, False, "CellgateLocal/10.1.0.0/24", "10.1.0.1"),
        ("10.1.0.0/16", "10.1.2.0/24", False, "CellgateLocal/10.1.0.0/16/10.1.2.0/24", "10.1.0.1"),
        ("fd00:1::/64", None, True, "CellgateLocal/fd00:1::/64", "fd00:1::1"),
        ("fd00:1::/64", "fd00:1::100/120", True, "CellgateLocal/fd00:1::/64/fd00:1::100/120", "fd00:1::1"),
    ],
)
def test_explicit_pool_has_docker_id_and_a_reserved_gateway(
    ipam: Ipam, subnet: str, subpool: str | None, v6: bool, pid: str, gateway: str
) -> None:
    pool = ipam.request_pool(req(subnet, subpool, v6))
    assert pool.id == pid == pool_id(LOCAL_SPACE, net(subnet), net(subpool) if subpool else None)
    assert pool.subnet == net(subnet)
    assert not pool.dynamic and pool.refs == 1 and pool.network_id == ""
    assert pool.gateway == ip(gateway)
    assert pool.allocations[ip(gateway)].kind == KIND_GATEWAY
    assert ipam.pool(pid) == pool


@pytest.mark.parametrize(("subnet", "subpool"), [("10.1.0.0/16", "10.1.2.0/24"), ("fd00:1::/64", "fd00:1::100/120")])
def test_endpoint_addresses_come_from_the_ip_range(ipam: Ipam, subnet: str, subpool: str) -> None:
    pool = ipam.request_pool(req(subnet, subpool, v6=":" in subnet))
    ipam.bind_network(NET_ID, [pool.subnet])
    got = [ipam.request_address(pool.id, None, mac=mac(i))[1].address for i in range(5)]
    assert len(set(got)) == 5
    assert all(a in net(subpool) for a in got)


def test_dynamic_pools_are_carved_from_the_host_range_in_order(ipam: Ipam) -> None:
    first = ipam.request_pool(req())
    second = ipam.request_pool(req())
    v6 = ipam.request_pool(req(v6=True))
    assert (first.subnet, second.subnet, v6.subnet) == (
        net("10.200.0.0/24"),
        net("10.200.1.0/24"),
        net("fd00:cafe::/80"),
    )
    assert first.dynamic and v6.dynamic
    assert (first.gateway, v6.gateway) == (ip("10.200.0.1"), ip("fd00:cafe::1"))


def test_dynamic_pool_skips_explicit_pools_and_routes_to_avoid(ipam: Ipam) -> None:
    ipam.request_pool(req("10.200.0.0/23"))
    pool = ipam.request_pool(req(), avoid=[net("10.200.2.0/24"), net("fd00:cafe::/80")])
    assert pool.subnet == net("10.200.3.0/24")


def test_dynamic_pools_run_out_with_conflict(clock: FakeClock) -> None:
    ipam = Ipam(MemoryStore(), HostRanges(net("10.9.0.0/23"), net("fd00:9::/64")), clock)
    ipam.request_pool(req())
    ipam.request_pool(req())
    with pytest.raises(Conflict, match="no free /24"):
        ipam.request_pool(req())
    assert len(ipam.pools()) == 2


@pytest.mark.parametrize(
    ("request_", "error", "text"),
    [
        (req(subpool="10.1.0.0/24"), InvalidRequest, "needs a subnet"),
        (req("10.1.0.0/24", "10.2.0.0/25"), InvalidRequest, "not inside subnet"),
        (req("10.1.0.0/24", "fd00::/120"), InvalidRequest, "not inside subnet"),
        (req("10.1.0.0/24", v6=True), InvalidRequest, "not IPv6"),
        (req("fd00:1::/64"), InvalidRequest, "not IPv4"),
        (req("10.1.0.0/31"), InvalidRequest, "prefix length"),
        (req("10.0.0.0/7"), InvalidRequest, "prefix length"),
        (req("fd00::/127", v6=True), InvalidRequest, "prefix length"),
        (req("10.1.0.0/24", foo="bar"), InvalidRequest, "unsupported IPAM option.*foo"),
        (req(foo="bar"), InvalidRequest, "unsupported IPAM option"),
    ],
)
def test_bad_pool_requests_are_rejected_and_change_nothing(
    ipam: Ipam, store: MemoryStore, request_: PoolRequest, error: type[Exception], text: str
) -> None:
    before = state(ipam, store)
    with pytest.raises(error, match=text):
        ipam.request_pool(request_)
    assert state(ipam, store) == before


@pytest.mark.parametrize(
    ("first", "second"),
    [("10.1.0.0/16", "10.1.2.0/24"), ("10.1.2.0/24", "10.1.0.0/16"), ("fd00:1::/64", "fd00:1::/80")],
)
def test_overlapping_subnets_are_rejected(ipam: Ipam, first: str, second: str) -> None:
    ipam.request_pool(req(first, v6=":" in first))
    with pytest.raises(Conflict, match="overlaps"):
        ipam.request_pool(req(second, v6=":" in second))
    assert [p.subnet for p in ipam.pools()] == [net(first)]


def test_same_unbound_subnet_returns_the_same_pool_and_release_balances(ipam: Ipam) -> None:
    a = ipam.request_pool(req("10.1.0.0/24"))
    b = ipam.request_pool(req("10.1.0.0/24"))
    assert a.id == b.id and b.refs == 2
    ipam.release_pool(a.id)
    assert ipam.pool(a.id).refs == 1
    ipam.release_pool(a.id)
    assert ipam.pools() == []
    ipam.release_pool(a.id)  # releasing what is gone succeeds
    assert ipam.pools() == []


def test_subnet_bound_to_a_network_is_refused(ipam: Ipam, bound: Pool) -> None:
    with pytest.raises(Conflict, match="already used by network"):
        ipam.request_pool(req("10.1.0.0/24"))
    assert ipam.pool(bound.id).refs == 1


def test_bind_network_refuses_a_second_network_and_unbind_frees(ipam: Ipam, bound: Pool) -> None:
    with pytest.raises(Conflict):
        ipam.bind_network(hexid("other"), [bound.subnet])
    assert ipam.bind_network(NET_ID, [bound.subnet])[0].network_id == NET_ID  # same network: no-op
    ipam.unbind_network(NET_ID)
    assert ipam.pool(bound.id).network_id == ""


# -- gateway and aux addresses ----------------------------------------------------------------


def test_gateway_request_without_address_returns_the_pool_gateway(ipam: Ipam) -> None:
    pool = ipam.request_pool(req("10.1.0.0/24"))
    _, alloc = ipam.request_address(pool.id, None, GW)
    assert alloc.address == ip("10.1.0.1") and alloc.kind == KIND_GATEWAY
    assert ipam.pool(pool.id) == pool


def test_user_gateway_replaces_the_automatic_one(ipam: Ipam) -> None:
    pool = ipam.request_pool(req("10.1.0.0/24"))
    new, alloc = ipam.request_address(pool.id, ip("10.1.0.254"), GW)
    assert alloc.address == ip("10.1.0.254") and alloc.kind == KIND_GATEWAY
    assert new.gateway == ip("10.1.0.254")
    assert ip("10.1.0.1") not in new.allocations
    assert [a.address for a in new.allocations.values() if a.kind == KIND_GATEWAY] == [ip("10.1.0.254")]
    # the old automatic gateway is an ordinary address again
    ipam.bind_network(NET_ID, [new.subnet])
    assert ipam.request_address(pool.id, ip("10.1.0.1"), mac=mac(1))[1].kind == KIND_ENDPOINT


@pytest.mark.parametrize(
    ("address", "error"),
    [("10.1.0.0", InvalidRequest), ("10.1.0.255", InvalidRequest), ("10.2.0.1", InvalidRequest)],
)
def test_unusable_user_gateway_is_rejected(ipam: Ipam, store: MemoryStore, address: str, error: type) -> None:
    pool = ipam.request_pool(req("10.1.0.0/24"))
    before = state(ipam, store)
    with pytest.raises(error):
        ipam.request_address(pool.id, ip(address), GW)
    assert state(ipam, store) == before


def test_user_gateway_on_an_address_in_use_is_a_conflict(ipam: Ipam) -> None:
    pool = ipam.request_pool(req("10.1.0.0/24"))
    ipam.request_address(pool.id, ip("10.1.0.5"), KIND_AUX)  # aux
    with pytest.raises(Conflict, match="in use"):
        ipam.request_address(pool.id, ip("10.1.0.5"), GW)
    assert ipam.pool(pool.id).gateway == ip("10.1.0.1")


def test_aux_addresses_are_reserved_before_the_network_exists(ipam: Ipam) -> None:
    pool = ipam.request_pool(req("10.1.0.0/24"))
    _, aux = ipam.request_address(pool.id, ip("10.1.0.2"), KIND_AUX)
    assert aux.kind == KIND_AUX
    _, again = ipam.request_address(pool.id, ip("10.1.0.2"), KIND_AUX)  # retried: same answer
    assert again == aux
    ipam.bind_network(NET_ID, [pool.subnet])
    _, ep = ipam.request_address(pool.id, None, mac=mac(1))
    assert ep.address == ip("10.1.0.3")  # neither the gateway nor the aux address
    with pytest.raises(Conflict, match="aux"):
        ipam.request_address(pool.id, ip("10.1.0.2"), mac=mac(2))


def test_aux_address_on_the_gateway_is_a_conflict(ipam: Ipam) -> None:
    pool = ipam.request_pool(req("10.1.0.0/24"))
    with pytest.raises(Conflict, match="gateway"):
        ipam.request_address(pool.id, ip("10.1.0.1"), KIND_AUX)


# -- endpoint addresses -------------------------------------------------------------------------


def test_static_ip_is_honoured(ipam: Ipam, bound: Pool) -> None:
    new, alloc = ipam.request_address(bound.id, ip("10.1.0.77"), mac=mac(1))
    assert (alloc.address, alloc.kind, alloc.mac) == (ip("10.1.0.77"), KIND_ENDPOINT, "02:42:0a:00:00:01")
    assert new.prefixed(alloc.address) == ipaddress.ip_interface("10.1.0.77/24")


@pytest.mark.parametrize(
    ("address", "error", "text"),
    [
        ("10.2.0.5", InvalidRequest, "not a usable address"),
        ("10.1.0.1", Conflict, "is the gateway"),
        ("10.1.0.0", InvalidRequest, "not a usable address"),
        ("10.1.0.255", InvalidRequest, "not a usable address"),
        ("fd00::5", InvalidRequest, "not IPv4"),
        ("10.1.0.9", Conflict, "already in use"),
    ],
)
def test_bad_static_ip_is_rejected_and_changes_nothing(
    ipam: Ipam, store: MemoryStore, bound: Pool, address: str, error: type[Exception], text: str
) -> None:
    ipam.request_address(bound.id, ip("10.1.0.9"), mac=mac(9))
    before = state(ipam, store)
    with pytest.raises(error, match=text):
        ipam.request_address(bound.id, ip(address), mac=mac(1))
    assert state(ipam, store) == before


def test_static_ip_outside_the_ip_range_is_rejected(ipam: Ipam) -> None:
    pool = ipam.request_pool(req("10.1.0.0/16", "10.1.2.0/24"))
    ipam.bind_network(NET_ID, [pool.subnet])
    with pytest.raises(InvalidRequest, match="outside the range"):
        ipam.request_address(pool.id, ip("10.1.3.4"), mac=mac(1))


def test_unknown_pool_is_not_found(ipam: Ipam) -> None:
    with pytest.raises(NotFound):
        ipam.request_address("CellgateLocal/10.9.0.0/24", None)


def test_exhaustion_raises_and_changes_nothing(ipam: Ipam, store: MemoryStore) -> None:
    pool = ipam.request_pool(req("10.1.0.0/29"))  # .1 gateway, .2-.6 for endpoints
    ipam.bind_network(NET_ID, [pool.subnet])
    got = [ipam.request_address(pool.id, None, mac=mac(i))[1].address for i in range(5)]
    assert got == [ip(f"10.1.0.{i}") for i in range(2, 7)]
    before = state(ipam, store)
    with pytest.raises(AddressExhausted):
        ipam.request_address(pool.id, None, mac=mac(99))
    assert state(ipam, store) == before


def test_exhaustion_of_the_ip_range(ipam: Ipam) -> None:
    pool = ipam.request_pool(req("10.1.0.0/24", "10.1.0.0/30"))  # .0 unusable, .1 gateway
    ipam.bind_network(NET_ID, [pool.subnet])
    got = {ipam.request_address(pool.id, None, mac=mac(i))[1].address for i in range(2)}
    assert got == {ip("10.1.0.2"), ip("10.1.0.3")}
    with pytest.raises(AddressExhausted):
        ipam.request_address(pool.id, None, mac=mac(3))


def test_next_fit_does_not_hand_a_released_address_straight_back(ipam: Ipam, bound: Pool) -> None:
    a = ipam.request_address(bound.id, None, mac=mac(1))[1].address
    ipam.request_address(bound.id, None, mac=mac(2))
    ipam.release_address(bound.id, a)
    assert ipam.request_address(bound.id, None, mac=mac(3))[1].address == ip("10.1.0.4")


def test_retry_with_the_same_mac_returns_the_same_address_while_unbound(ipam: Ipam, bound: Pool) -> None:
    first = ipam.request_address(bound.id, None, mac=mac(1))[1]
    assert ipam.request_address(bound.id, None, mac=mac(1))[1] == first
    upper = mac(1).upper()
    assert ipam.request_address(bound.id, None, mac=upper)[1] == first
    assert ipam.request_address(bound.id, first.address, mac=mac(1))[1] == first
    assert ipam.request_address(bound.id, None, mac=mac(2))[1].address != first.address
    assert len(list(ipam.pool(bound.id).endpoint_allocations())) == 2

    ipam.bind_endpoint(first.address, EP1)  # CreateEndpoint happened: a new request is a new container
    again = ipam.request_address(bound.id, None, mac=mac(1))[1]
    assert again.address != first.address


def test_requests_without_a_mac_are_never_merged(ipam: Ipam, bound: Pool) -> None:
    a = ipam.request_address(bound.id, None)[1]
    b = ipam.request_address(bound.id, None)[1]
    assert a.address != b.address


def test_release_address_is_idempotent(ipam: Ipam, store: MemoryStore, bound: Pool) -> None:
    a = ipam.request_address(bound.id, None, mac=mac(1))[1].address
    ipam.release_address(bound.id, a)
    assert a not in ipam.pool(bound.id).allocations
    before = state(ipam, store)
    ipam.release_address(bound.id, a)
    ipam.release_address("CellgateLocal/10.99.0.0/24", a)
    assert state(ipam, store) == before


def test_an_address_an_endpoint_still_uses_is_never_released(ipam: Ipam, store: MemoryStore, bound: Pool) -> None:
    """The ledger's user says which endpoints exist: an address bound to one of them stays reserved
    whoever asks to release it (a release names only the address), until that endpoint is gone."""
    live = {EP1}
    ipam.in_use = live.__contains__
    a = ipam.request_address(bound.id, None, mac=mac(1))[1].address
    ipam.bind_endpoint(a, EP1)
    before = state(ipam, store)
    with pytest.raises(Conflict, match=f"address {a} is in use by endpoint {EP1[:12]}"):
        ipam.release_address(bound.id, a)
    with pytest.raises(Conflict, match=f"endpoint {EP1[:12]}"):
        ipam.release_owner(EP1)
    assert state(ipam, store) == before
    with pytest.raises(Conflict, match="in use"):
        ipam.request_address(bound.id, a, mac=mac(2))
    live.clear()  # the endpoint is deleted: Docker's ReleaseAddress after DeleteEndpoint frees it
    ipam.release_address(bound.id, a)
    assert a not in ipam.pool(bound.id).allocations


def test_bind_endpoint_rules(ipam: Ipam, bound: Pool) -> None:
    a = ipam.request_address(bound.id, None, mac=mac(1))[1].address
    ipam.bind_endpoint(a, EP1)
    ipam.bind_endpoint(a, EP1)  # again: fine
    assert ipam.pool(bound.id).allocations[a].owner == EP1
    with pytest.raises(Conflict, match="belongs to endpoint"):
        ipam.bind_endpoint(a, EP2)
    with pytest.raises(Conflict, match="reserved as gateway"):
        ipam.bind_endpoint(ip("10.1.0.1"), EP2)
    ipam.bind_endpoint(ip("10.1.0.200"), EP2)  # not allocated: nothing to bind
    assert ip("10.1.0.200") not in ipam.pool(bound.id).allocations


def test_release_owner_frees_every_address_of_the_endpoint(ipam: Ipam, bound: Pool) -> None:
    v6 = ipam.request_pool(req("fd00:1::/64", v6=True))
    ipam.bind_network(NET_ID, [v6.subnet])
    a4 = ipam.request_address(bound.id, None, mac=mac(1))[1].address
    a6 = ipam.request_address(v6.id, None, mac=mac(1))[1].address
    other = ipam.request_address(bound.id, None, mac=mac(2))[1].address
    for address, owner in ((a4, EP1), (a6, EP1), (other, EP2)):
        ipam.bind_endpoint(address, owner)
    assert sorted(map(str, ipam.release_owner(EP1))) == sorted([str(a4), str(a6)])
    assert ipam.lookup(a4) is None and ipam.lookup(a6) is None
    assert ipam.lookup(other) is not None
    assert ipam.release_owner(EP1) == []


def test_ensure_allocated_re_reserves_a_lost_address(ipam: Ipam, bound: Pool) -> None:
    assert ipam.ensure_allocated(ip("10.1.0.42"), EP1) is True
    alloc = ipam.pool(bound.id).allocations[ip("10.1.0.42")]
    assert (alloc.kind, alloc.owner) == (KIND_ENDPOINT, EP1)
    assert ipam.ensure_allocated(ip("10.1.0.42"), EP1) is False
    assert ipam.ensure_allocated(ip("192.168.7.7"), EP1) is False  # not ours
    assert ipam.lookup(ip("192.168.7.7")) is None


# -- persistence --------------------------------------------------------------------------------


def test_state_survives_a_restart(ipam: Ipam, store: MemoryStore, ranges: HostRanges, clock: FakeClock) -> None:
    p4 = ipam.request_pool(req("10.1.0.0/24"))
    ipam.request_address(p4.id, ip("10.1.0.100"), GW)
    ipam.request_address(p4.id, ip("10.1.0.5"), KIND_AUX)
    ipam.bind_network(NET_ID, [p4.subnet])
    a = ipam.request_address(p4.id, None, mac=mac(1))[1].address
    ipam.bind_endpoint(a, EP1)
    ipam.request_pool(req("10.2.0.0/24", "10.2.0.128/25"))
    ipam.request_pool(req("10.2.0.0/24", "10.2.0.128/25"))  # refcount 2
    ipam.request_pool(req(v6=True))
    reborn = Ipam(store, ranges, clock)
    assert reborn.pools() == ipam.pools()
    # and it continues where the old one stopped
    assert reborn.request_address(p4.id, None, mac=mac(2)) == ipam.request_address(p4.id, None, mac=mac(2))


def test_unreadable_pool_document_is_skipped(store: MemoryStore, ranges: HostRanges) -> None:
    store.docs["broken"] = {"id": "x", "space": "s", "subnet": "not-a-subnet"}
    store.docs["half"] = {"space": "s"}
    assert Ipam(store, ranges).pools() == []


FAILING_MUTATIONS: list[tuple[str, Callable[[Ipam, Pool], Any]]] = [
    ("new explicit pool", lambda i, p: i.request_pool(req("10.3.0.0/24"))),
    ("new dynamic pool", lambda i, p: i.request_pool(req())),
    ("same pool again", lambda i, p: i.request_pool(req("10.2.0.0/24"))),
    ("release pool with refs", lambda i, p: i.release_pool(i.find_by_subnet(net("10.2.0.0/24")).id)),
    ("dynamic address", lambda i, p: i.request_address(p.id, None, mac=mac(7))),
    ("static address", lambda i, p: i.request_address(p.id, ip("10.1.0.99"), mac=mac(7))),
    ("user gateway", lambda i, p: i.request_address(p.id, ip("10.1.0.254"), GW)),
    ("release address", lambda i, p: i.release_address(p.id, ip("10.1.0.2"))),
    ("bind endpoint", lambda i, p: i.bind_endpoint(ip("10.1.0.3"), EP2)),
    ("bind network", lambda i, p: i.bind_network(hexid("n2"), [net("10.2.0.0/24")])),
    ("unbind network", lambda i, p: i.unbind_network(NET_ID)),
    ("release owner", lambda i, p: i.release_owner(EP1)),
    ("ensure allocated", lambda i, p: i.ensure_allocated(ip("10.1.0.50"), EP2)),
]


@pytest.mark.parametrize("mutation", [m for _, m in FAILING_MUTATIONS], ids=[n for n, _ in FAILING_MUTATIONS])
def test_a_failed_write_changes_nothing(
    ipam: Ipam, store: MemoryStore, bound: Pool, mutation: Callable[[Ipam, Pool], Any]
) -> None:
    ipam.request_pool(req("10.2.0.0/24"))
    ipam.request_pool(req("10.2.0.0/24"))
    a = ipam.request_address(bound.id, None, mac=mac(1))[1].address
    ipam.bind_endpoint(a, EP1)
    ipam.request_address(bound.id, None, mac=mac(2))
    before = state(ipam, store)
    store.fail_next = StateError("disk full")
    with pytest.raises(StateError):
        mutation(ipam, bound)
    assert state(ipam, store) == before
    mutation(ipam, bound)  # and the same call works once the disk is back
    assert state(ipam, store) != before


# -- reconciliation -----------------------------------------------------------------------------


@pytest.fixture
def ledger(ipam: Ipam, bound: Pool) -> dict[str, Any]:
    """used: owned by EP1 (live); unused: never bound; orphan: owned by an endpoint that is gone."""
    used, unused, orphan = (ipam.request_address(bound.id, None, mac=mac(i))[1].address for i in range(3))
    ipam.bind_endpoint(used, EP1)
    ipam.bind_endpoint(orphan, hexid("gone"))
    return {"used": used, "unused": unused, "orphan": orphan}


def test_check_waits_out_the_grace_period(ipam: Ipam, ledger: dict[str, Any], clock: FakeClock) -> None:
    live = {EP1: [ledger["used"]]}
    report = ipam.check(live, grace=60)
    assert report.ok and report.leaked == ()
    clock.advance(61)
    report = ipam.check(live, grace=60)
    assert not report.ok
    assert {(x.address, x.owner, x.reason) for x in report.leaked} == {
        (ledger["unused"], "", "never used by an endpoint"),
        (ledger["orphan"], hexid("gone"), "its endpoint is gone"),
    }
    assert report.released == ()
    assert ipam.lookup(ledger["unused"]) is not None  # only reported


def test_unbound_allocation_in_use_by_a_live_endpoint_is_no_leak(
    ipam: Ipam, ledger: dict[str, Any], clock: FakeClock
) -> None:
    clock.advance(61)
    report = ipam.check({EP1: [ledger["used"]], EP2: [ledger["unused"]]})
    assert [x.address for x in report.leaked] == [ledger["orphan"]]


def test_check_release_frees_leaks(ipam: Ipam, ledger: dict[str, Any], clock: FakeClock) -> None:
    clock.advance(61)
    live = {EP1: [ledger["used"]]}
    report = ipam.check(live, release=True)
    assert report.released == report.leaked and len(report.released) == 2
    assert ipam.lookup(ledger["unused"]) is None and ipam.lookup(ledger["orphan"]) is None
    assert ipam.lookup(ledger["used"]) is not None
    assert ipam.check(live).ok


def test_check_reports_missing_and_duplicate_addresses(ipam: Ipam, ledger: dict[str, Any]) -> None:
    lost, foreign = ip("10.1.0.77"), ip("172.31.0.5")
    report = ipam.check({EP1: [ledger["used"], lost, foreign], EP2: [ledger["used"]]})
    assert report.missing == ((EP1, lost),)  # the foreign address is not ours to judge
    assert report.duplicates == ((ledger["used"], tuple(sorted([EP1, EP2]))),)
    assert not report.ok


def test_check_ignores_pools_without_a_network(ipam: Ipam, clock: FakeClock) -> None:
    pool = ipam.request_pool(req("10.5.0.0/24"))
    ipam.request_address(pool.id, ip("10.5.0.9"), KIND_AUX)
    clock.advance(3600)
    report = ipam.check({})
    assert report.ok and report.unbound_pools == (pool.id,)


# -- pool values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "ok"),
    [
        ("10.0.0.0/8", True),
        ("10.0.0.0/30", True),
        ("10.0.0.0/7", False),
        ("10.0.0.0/31", False),
        ("fd00::/32", True),
        ("fd00::/126", True),
        ("fd00::/31", False),
        ("fd00::/127", False),
    ],
)
def test_subnet_size_limits(subnet: str, ok: bool) -> None:
    if ok:
        check_subnet(net(subnet))
    else:
        with pytest.raises(InvalidRequest):
            check_subnet(net(subnet))


def test_pool_document_round_trip(ipam: Ipam, ledger: dict[str, Any], bound: Pool) -> None:
    pool = ipam.pool(bound.id)
    assert Pool.from_doc(pool.to_doc()) == pool
    assert pool.to_doc()["allocations"][0]["address"] == "10.1.0.1"  # sorted by address


@pytest.mark.parametrize(
    ("v4", "v6", "p4", "p6"),
    [
        ("10.0.0.0/24", "fd00::/64", 16, 80),  # network bigger than the range
        ("10.0.0.0/16", "fd00::/64", 31, 80),  # network too small to hold a gateway and an endpoint
        ("10.0.0.0/16", "fd00::/64", 24, 127),
        ("10.0.0.0/16", "fd00::/80", 24, 64),
    ],
)
def test_host_ranges_refuse_impossible_network_sizes(v4: str, v6: str, p4: int, p6: int) -> None:
    with pytest.raises(InvalidRequest):
        HostRanges(net(v4), net(v6), p4, p6)


def test_rollback_of_a_racing_create_keeps_the_winners_gateway(ipam: Ipam) -> None:
    """Two `docker network create --subnet S` race: both RequestPool before either CreateNetwork.

    The loser's CreateNetwork is refused and Docker rolls it back with ReleaseAddress(gateway)
    and ReleasePool (libnetwork releases the gateway even when the IPAM supplied it in Data).
    """
    winner = ipam.request_pool(req("10.1.0.0/24"))
    ipam.request_pool(req("10.1.0.0/24"))  # the loser shares the pool: refs 2
    ipam.bind_network(NET_ID, [winner.subnet])
    ipam.release_address(winner.id, ip("10.1.0.1"))  # the loser's rollback
    ipam.release_pool(winner.id)
    pool = ipam.pool(winner.id)
    assert pool.refs == 1 and pool.gateway == ip("10.1.0.1")
    assert pool.allocations[ip("10.1.0.1")].kind == KIND_GATEWAY
    handed = {ipam.request_address(winner.id, None, mac=mac(i))[1].address for i in range(253)}
    assert ip("10.1.0.1") not in handed
    # the winner's own `docker network rm` still frees everything
    ipam.release_address(winner.id, ip("10.1.0.1"))
    ipam.release_pool(winner.id)
    assert ipam.pools() == []


# -- special-purpose ranges and address spaces ---------------------------------------------------

SPECIAL_SUBNETS = [
    ("127.0.0.0/24", "127.0.0.0/8 (loopback)"),
    ("127.0.0.0/8", "loopback"),
    ("224.0.0.0/8", "multicast"),
    ("239.1.0.0/16", "multicast"),
    ("169.254.0.0/16", "link-local"),
    ("169.0.0.0/8", "169.254.0.0/16 (link-local)"),  # a supernet overlaps too
    ("0.0.0.0/8", "'this network'"),
    ("240.0.0.0/8", "reserved"),
    ("255.255.255.0/24", "reserved"),  # holds 255.255.255.255
    ("fe80::/32", "link-local"),
    ("fe80::/64", "link-local"),
    ("ff00::/32", "multicast"),
    ("ff02::/64", "multicast"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("::ffff:10.0.0.0/120", "IPv4-mapped"),
    ("::/64", "::/128 (the unspecified address)"),  # also holds ::1 and the IPv4-mapped range
]


@pytest.mark.parametrize(("subnet", "text"), SPECIAL_SUBNETS)
def test_special_purpose_subnets_are_refused_and_change_nothing(
    ipam: Ipam, store: MemoryStore, subnet: str, text: str
) -> None:
    before = state(ipam, store)
    with pytest.raises(InvalidRequest, match=re.escape(f"subnet {net(subnet)} overlaps") + ".*" + re.escape(text)):
        ipam.request_pool(req(subnet, v6=":" in subnet))
    assert state(ipam, store) == before


@pytest.mark.parametrize(
    "subnet",
    ["100.64.0.0/10", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "198.18.0.0/15", "192.0.2.0/24",
     "126.255.255.0/24", "128.0.0.0/8", "223.255.255.0/24", "fd00:1::/64", "64:ff9b::/96", "2001:db8::/32",
     "fe00::/32", "fec0::/64"],
)
def test_private_shared_and_other_unicast_subnets_stay_allowed(ipam: Ipam, subnet: str) -> None:
    assert ipam.request_pool(req(subnet, v6=":" in subnet)).subnet == net(subnet)


@pytest.mark.parametrize("space", ["", "LocalDefault", "GlobalDefault", "cellgatelocal", "CellgateLocal/x"])
def test_unknown_address_spaces_are_refused(ipam: Ipam, store: MemoryStore, space: str) -> None:
    before = state(ipam, store)
    for subnet in ("10.1.0.0/24", None):
        with pytest.raises(InvalidRequest, match="unknown address space"):
            ipam.request_pool(PoolRequest(space, net(subnet) if subnet else None, None, False))
    assert state(ipam, store) == before


def test_both_of_our_address_spaces_are_served(ipam: Ipam) -> None:
    assert ipam.request_pool(PoolRequest(GLOBAL_SPACE, net("10.1.0.0/24"), None, False)).id == \
        "CellgateGlobal/10.1.0.0/24"
    assert ipam.request_pool(PoolRequest(LOCAL_SPACE, None, None, False)).space == LOCAL_SPACE


@pytest.mark.parametrize(
    ("v4", "v6", "text"),
    [
        ("127.0.0.0/16", "fd00::/64", "host range 127.0.0.0/16 overlaps 127.0.0.0/8"),
        ("0.0.0.0/0", "fd00::/64", "host range 0.0.0.0/0 overlaps 0.0.0.0/8"),
        ("224.0.0.0/16", "fd00::/64", "multicast"),
        ("169.254.0.0/16", "fd00::/64", "link-local"),
        ("10.0.0.0/16", "fe80::/64", "host range fe80::/64 overlaps fe80::/10"),
        ("10.0.0.0/16", "ff00::/16", "multicast"),
        ("10.0.0.0/16", "::/0", "host range ::/0 overlaps ::/128"),
    ],
)
def test_host_ranges_refuse_special_purpose_ranges(v4: str, v6: str, text: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(text)):
        HostRanges(net(v4), net(v6), 24, 80)


@pytest.mark.parametrize(
    ("subnet", "address", "text"),
    [
        ("fd00:1::/64", "fd00:1::", "subnet-router anycast address of fd00:1::/64"),
        ("10.1.0.0/24", "10.1.0.0", "network address of 10.1.0.0/24"),
        ("10.1.0.0/24", "10.1.0.255", "broadcast address of 10.1.0.0/24"),
    ],
)
def test_request_address_refuses_the_subnets_own_addresses(
    ipam: Ipam, store: MemoryStore, subnet: str, address: str, text: str
) -> None:
    pool = ipam.request_pool(req(subnet, v6=":" in subnet))
    before = state(ipam, store)
    for options in (KIND_AUX, GW):  # aux (before the network exists) and gateway requests
        with pytest.raises(InvalidRequest, match=text):
            ipam.request_address(pool.id, ip(address), options)
    ipam.bind_network(NET_ID, [pool.subnet])
    before = state(ipam, store)
    with pytest.raises(InvalidRequest, match=text):
        ipam.request_address(pool.id, ip(address), mac=mac(1))
    assert state(ipam, store) == before
    count = 300 if ":" in subnet else 255
    handed = {ipam.request_address(pool.id, None, mac=mac(i))[1].address for i in range(2, count)}
    assert ip(address) not in handed
