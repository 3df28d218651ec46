"""datapath.plan: desired kernel objects, the diff, and the re-plan-is-a-no-op property."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from datapath import identity, naming, plan
from datapath.fake import FakeKernel
from datapath.model import Endpoint, Network
from datapath.plan import (
    ORDER,
    AddressEntry,
    EndpointEntry,
    HostAddress,
    HostDevice,
    IpcacheEntry,
    Masquerade,
    Neighbour,
    Plan,
    Programs,
    Route,
    Settings,
    Veth,
    diff,
)
from tests.unit.helpers import hexid

SETTINGS = Settings(instance="cgtest", masquerade=True, program_revision="rev1")
HOST_ADDRESSES = [ipaddress.ip_address(a) for a in ("192.168.1.10", "172.17.0.1", "fd00:1::10", "10.0.2.15")]


def network(i: int, v6: bool = False) -> Network:
    gws: list[Any] = [ipaddress.IPv4Interface(f"10.{i}.0.1/24")]
    if v6:
        gws.append(ipaddress.IPv6Interface(f"fd00:{i}::1/64"))
    return Network(hexid(f"net{i}"), tuple(gws))


def endpoint(net: Network, host: int, v4: bool = True, v6: bool = False, sandbox: str = "") -> Endpoint:
    eid = hexid(f"{net.id}-{host}")
    gw4 = next((g for g in net.gateways if g.version == 4), None)
    gw6 = next((g for g in net.gateways if g.version == 6), None)
    ipv4 = ipaddress.IPv4Interface(f"{gw4.network.network_address + host}/24") if v4 and gw4 else None
    ipv6 = ipaddress.IPv6Interface(f"{gw6.network.network_address + host}/64") if v6 and gw6 else None
    return Endpoint(
        id=eid,
        network_id=net.id,
        host_ifname=naming.host_ifname(eid),
        peer_ifname=naming.peer_ifname(eid),
        mac=naming.container_mac(eid),
        host_mac=naming.host_mac(eid),
        ipv4=ipv4,
        ipv6=ipv6,
        gateway4=gw4.ip if ipv4 and gw4 else None,
        gateway6=gw6.ip if ipv6 and gw6 else None,
        sandbox=sandbox,
    )


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[Network], list[Endpoint], Settings, list[Any]]:
    """Networks with distinct subnets and endpoints with distinct IDs and addresses, as the Agent keeps them."""
    nets = [network(i, v6=draw(st.booleans())) for i in sorted(draw(st.sets(st.integers(0, 3), max_size=3)))]
    eps = []
    for net in nets:
        for host in sorted(draw(st.sets(st.integers(2, 12), max_size=4))):
            v4 = draw(st.booleans())
            eps.append(
                endpoint(
                    net,
                    host,
                    v4=v4,
                    v6=not v4 or draw(st.booleans()),
                    sandbox=draw(st.sampled_from(["", "/var/run/docker/netns/0123456789ab"])),
                )
            )
    eps = [e for e in eps if e.addresses]
    cfg = Settings("cgtest", draw(st.booleans()), draw(st.sampled_from(["rev1", "rev2"])))
    hosts = draw(st.sets(st.sampled_from(HOST_ADDRESSES), max_size=3))
    return nets, eps, cfg, sorted(hosts, key=str)


def desired(world: tuple[list[Network], list[Endpoint], Settings, list[Any]]) -> set[Any]:
    return plan.desired_state(*world)


def as_map(objs: set[Any]) -> dict[Any, Any]:
    return {o.key: o for o in objs}


@settings(max_examples=200, deadline=None)
@given(before=worlds(), after=worlds())
def test_applying_the_diff_converges_and_replanning_is_a_no_op(before: Any, after: Any) -> None:
    fake = FakeKernel()
    fake.apply(diff(desired(before), fake.observe()))
    assert as_map(fake.observe()) == as_map(desired(before))

    step = diff(desired(after), fake.observe())
    fake.apply(step)
    assert not diff(desired(after), fake.observe()), diff(desired(after), fake.observe()).describe()
    assert as_map(fake.observe()) == as_map(desired(after))


@settings(max_examples=100, deadline=None)
@given(before=worlds(), after=worlds(), data=st.data())
def test_a_scoped_diff_touches_only_its_scope(before: Any, after: Any, data: st.DataObject) -> None:
    want, have = desired(after), desired(before)
    all_keys = sorted(plan.keys(want) | plan.keys(have))
    scope = set(data.draw(st.lists(st.sampled_from(all_keys), unique=True))) if all_keys else set()
    step = diff(want, have, scope)
    touched = {o.key for o in step.remove} | {o.key for o in step.add} | {new.key for _, new in step.change}
    assert touched <= scope
    full = diff(want, have)
    assert {o.key for o in full.add if o.key in scope} == {o.key for o in step.add}
    assert {o.key for o in full.remove if o.key in scope} == {o.key for o in step.remove}


def test_adds_follow_order_and_removals_run_in_reverse() -> None:
    net = network(1, v6=True)
    objs = plan.desired_state([net], [endpoint(net, 5, v4=True, v6=True)], SETTINGS, HOST_ADDRESSES[:2])
    add = diff(objs, set()).add
    ranks = [ORDER.index(type(o)) for o in add]
    assert ranks == sorted(ranks) and len(add) == len(objs)
    assert isinstance(add[0], HostDevice) and isinstance(add[-1], Masquerade)
    remove = diff(set(), objs).remove
    ranks = [ORDER.index(type(o)) for o in remove]
    assert ranks == sorted(ranks, reverse=True)
    assert isinstance(remove[0], Masquerade) and isinstance(remove[-1], HostDevice)
    # cluster: test_nodes.py; services and socket balancing: test_services.py
    assert {type(o) for o in objs} == set(ORDER) - {plan.TunnelDevice, plan.ProxyRoute, plan.VipRoute, plan.LbService,
                                                    plan.ServedNetns, plan.SockPrograms, plan.NetdevProgram}


def test_a_different_value_under_the_same_key_is_a_change() -> None:
    net = network(1)
    ep = endpoint(net, 5)
    old = plan.desired_state([net], [ep], SETTINGS)
    new = plan.desired_state([net], [ep], Settings("cgtest", True, "rev2"))
    step = diff(new, old)
    assert step.add == () and step.remove == ()
    assert step.change == ((Programs(ep.host_ifname, "rev1"), Programs(ep.host_ifname, "rev2")),)
    assert step.describe() == [f"~ {Programs(ep.host_ifname, 'rev2')}"]


def test_joining_a_sandbox_changes_only_the_map_entries() -> None:
    net = network(1)
    ep = endpoint(net, 5)
    joined = endpoint(net, 5, sandbox="/var/run/docker/netns/0123456789ab")
    step = diff(plan.endpoint_objects(joined, SETTINGS), plan.endpoint_objects(ep, SETTINGS))
    assert [type(new) for _, new in step.change] == [EndpointEntry, AddressEntry]
    assert all(new.value.sandbox == joined.sandbox_hash != 0 for _, new in step.change)
    assert not step.add and not step.remove


def test_veth_peer_fields_are_not_compared() -> None:
    a = Veth("cg0123", "02:00:00:00:00:01", "tag", peer="cgp1", peer_mac="02:00:00:00:00:02")
    b = Veth("cg0123", "02:00:00:00:00:01", "tag")
    assert not diff({a}, {b})


def test_empty_plan_is_falsy() -> None:
    assert not Plan()
    assert Plan(add=(HostDevice("cg_x", "t"),))
    assert diff(set(), set()) == Plan()


def test_network_objects() -> None:
    net = network(3, v6=True)
    dev = naming.host_device("cgtest")
    assert plan.network_objects(net, SETTINGS) == {
        HostDevice(dev, "cellgate:cgtest:host"),
        HostAddress(dev, ipaddress.ip_address("10.3.0.1")),
        HostAddress(dev, ipaddress.ip_address("fd00:3::1")),
        Route(ipaddress.ip_network("10.3.0.0/24"), dev),
        Route(ipaddress.ip_network("fd00:3::/64"), dev),
        Masquerade(ipaddress.IPv4Network("10.3.0.0/24")),  # IPv4 only
    }
    quiet = plan.network_objects(net, Settings("cgtest", masquerade=False))
    assert not any(isinstance(o, Masquerade) for o in quiet)


def test_endpoint_objects() -> None:
    net = network(3, v6=True)
    ep = endpoint(net, 7, v4=True, v6=True)
    objs = plan.endpoint_objects(ep, SETTINGS)
    dev = ep.host_ifname
    value = plan.endpoint_value(ep)
    assert value.flags == plan.FLAG_IPV4 | plan.FLAG_IPV6
    assert objs == {
        Veth(dev, ep.host_mac, "cellgate:cgtest:" + ep.id),
        EndpointEntry(dev, value),
        Programs(dev, "rev1"),
        AddressEntry(ipaddress.ip_address("10.3.0.7"), dev, value),
        AddressEntry(ipaddress.ip_address("fd00:3::7"), dev, value),
        Neighbour(dev, ipaddress.ip_address("10.3.0.7"), ep.mac),
        Neighbour(dev, ipaddress.ip_address("fd00:3::7"), ep.mac),
        Route(ipaddress.ip_network("10.3.0.7/32"), dev, ipaddress.ip_address("10.3.0.1")),
        Route(ipaddress.ip_network("fd00:3::7/128"), dev, ipaddress.ip_address("fd00:3::1")),
    }


def test_host_addresses_carry_the_host_identity_in_the_ipcache() -> None:
    objs = plan.host_objects([ipaddress.ip_address("192.168.1.10"), ipaddress.ip_address("fd00:1::10")])
    assert objs == {
        IpcacheEntry(ipaddress.ip_network("192.168.1.10/32"), identity.HOST),
        IpcacheEntry(ipaddress.ip_network("fd00:1::10/128"), identity.HOST),
    }
    assert plan.HOST_IDENTITY == identity.HOST
    net = network(1)
    both = plan.desired_state([net], [], SETTINGS, HOST_ADDRESSES[:1])
    assert both == plan.network_objects(net, SETTINGS) | plan.host_objects(HOST_ADDRESSES[:1])
    assert plan.desired_state([net], [], SETTINGS) == plan.network_objects(net, SETTINGS)


def test_endpoint_identity_is_in_its_map_values() -> None:
    ep = replace(endpoint(network(1), 5), identity=300)
    objs = plan.endpoint_objects(ep, SETTINGS)
    values = [o.value for o in objs if isinstance(o, (EndpointEntry, AddressEntry))]
    assert len(values) == 2 and all(v.identity == 300 for v in values)
    assert plan.endpoint_value(endpoint(network(1), 5)).identity == identity.INIT  # not known yet: init


def test_fake_kernel_deleting_a_link_takes_its_dependents() -> None:
    net = network(1)
    ep = endpoint(net, 5)
    fake = FakeKernel()
    fake.apply(diff(plan.desired_state([net], [ep], SETTINGS), set()))
    veth = next(o for o in fake.observe() if isinstance(o, Veth))
    fake.apply(Plan(remove=(veth,)))
    left = {type(o) for o in fake.observe() if getattr(o, "dev", None) == ep.host_ifname}
    assert left == {EndpointEntry, AddressEntry}  # map entries outlive the link, as in the kernel


def test_the_proxy_brings_its_routing_for_both_families() -> None:
    net = network(1)
    without = plan.desired_state([net], [], SETTINGS)
    with_proxy = plan.desired_state([net], [], dataclasses.replace(SETTINGS, proxy=True))
    table = naming.proxy_table(SETTINGS.instance)
    assert with_proxy - without == {plan.ProxyRoute(4, table), plan.ProxyRoute(6, table)}
    assert not diff(with_proxy, with_proxy)


def test_removal_keys_leave_out_what_goes_with_the_veth() -> None:
    """Routes, neighbours and programs on the endpoint's own veth go with it; map entries (keyed by
    ifindex or address) and the veth itself are removed one by one."""
    ep = endpoint(network(1, v6=True), 7, v6=True)
    objs = plan.endpoint_objects(ep, SETTINGS)
    kept = plan.removal_keys(objs)
    assert {k[0] for k in kept} == {"veth", "endpoint-entry", "address-entry"}
    assert kept == {o.key for o in objs if o.kind not in ("route", "neighbour", "programs")}
    # what lives on another link stays in: only the endpoint's own veth takes its objects along
    other = Route(ipaddress.ip_network("10.9.0.7/32"), "cgother")
    assert other.key in plan.removal_keys([*objs, other])
    # the plan that the trimmed scope yields leaves nothing behind once the link is gone
    fake = FakeKernel()
    fake.apply(plan.diff(objs, set()))
    fake.apply(plan.diff(set(), fake.observe(kept), kept))
    assert fake.observe(plan.keys(objs)) == set()
