"""datapath.nodes: the kernel objects of a cluster view, their scoped lookup in desired_state, and
the fake kernel's tunnel kind."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from datapath import naming, plan
from datapath.fake import FakeKernel
from datapath.model import Network
from datapath.nodes import REMOTE_NODE, WORLD, ClusterView, Node, RemoteEntry, cluster_objects

A = Node("a", ipaddress.IPv4Address("10.254.0.1"), ipaddress.IPv4Network("10.192.1.0/24"),
         ipaddress.IPv6Network("fd63:6767:1::/64"))
B = Node("b", ipaddress.IPv4Address("10.254.0.2"), ipaddress.IPv4Network("10.192.2.0/24"),
         ipaddress.IPv6Network("fd63:6767:2::/64"))
REMOTE = (RemoteEntry(ipaddress.ip_network("10.192.2.5/32"), 4242, B.address),
          RemoteEntry(ipaddress.ip_network("fd63:6767:2::5/128"), 4242, B.address))


def view(tunnel: str = "vxlan", entries: tuple[RemoteEntry, ...] = REMOTE) -> ClusterView:
    return ClusterView(A, (B,), entries, tunnel)


def test_vxlan_objects() -> None:
    objs = cluster_objects(view(), "cg1")
    dev = naming.tunnel_device("cg1")
    assert objs == {
        plan.TunnelDevice(dev, naming.link_tag("cg1") + "tunnel", 8472),
        plan.IpcacheEntry(ipaddress.ip_network("10.254.0.2/32"), REMOTE_NODE),
        plan.IpcacheEntry(B.ipv4_range, WORLD, B.address),  # type: ignore[arg-type]
        plan.IpcacheEntry(B.ipv6_range, WORLD, B.address),  # type: ignore[arg-type]
        plan.IpcacheEntry(ipaddress.ip_network("10.192.2.5/32"), 4242, B.address),
        plan.IpcacheEntry(ipaddress.ip_network("fd63:6767:2::5/128"), 4242, B.address),
        plan.Route(B.ipv4_range, dev, A.address),  # type: ignore[arg-type]
        plan.Route(B.ipv6_range, dev),  # type: ignore[arg-type]
    }
    assert len(dev) <= naming.IFNAMSIZ and not dev.startswith((naming.PEER_PREFIX,))


def test_native_objects_route_ipv4_via_the_peer_and_no_tunnel() -> None:
    objs = cluster_objects(view("disabled"), "cg1")
    assert not any(isinstance(o, plan.TunnelDevice) for o in objs)
    assert {o for o in objs if isinstance(o, plan.Route)} == {plan.Route(B.ipv4_range, "", via=B.address)}  # type: ignore[arg-type]
    assert all(o.tunnel_endpoint is None for o in objs if isinstance(o, plan.IpcacheEntry))
    assert plan.IpcacheEntry(ipaddress.ip_network("10.192.2.5/32"), 4242) in objs


def test_local_node_and_own_entries_are_skipped() -> None:
    v = ClusterView(A, (A, B), (*REMOTE, RemoteEntry(ipaddress.ip_network("10.192.1.9/32"), 7, A.address)))
    prefixes = {o.prefix for o in cluster_objects(v, "cg1") if isinstance(o, plan.IpcacheEntry)}
    assert ipaddress.ip_network("10.192.1.9/32") not in prefixes
    assert ipaddress.ip_network("10.254.0.1/32") not in prefixes


def test_unknown_tunnel_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="geneve"):
        ClusterView(A, (B,), (), "geneve")


def test_cache_is_per_view_and_replace_starts_fresh() -> None:
    v = view()
    assert v.by_key("cg1") is v.by_key("cg1")
    emptied = replace(v, entries=())
    assert len(emptied.objects("cg1")) == len(v.objects("cg1")) - 2


def test_desired_state_with_cluster_and_scope() -> None:
    settings = plan.Settings("cg1")
    net = Network("n", (ipaddress.ip_interface("10.192.1.1/24"),))
    v = view()
    full = plan.desired_state([net], [], settings, cluster=v)
    assert cluster_objects(v, "cg1") <= full
    key = ("ipcache", "10.192.2.5/32")
    scoped = plan.desired_state([net], [], settings, scope={key, ("ipcache", "10.9.9.9/32")}, cluster=v)
    assert {o for o in scoped if o.key == key} == {v.by_key("cg1")[key]}
    assert not any(isinstance(o, plan.TunnelDevice) for o in scoped)
    assert plan.desired_state([net], [], settings) == full - cluster_objects(v, "cg1")


def test_masquerade_exempts_cluster_ranges() -> None:
    cidrs = (ipaddress.ip_network("10.192.0.0/10"), ipaddress.ip_network("fd63:6767::/48"))
    net = Network("n", (ipaddress.ip_interface("10.192.1.1/24"),))
    masq = {o for o in plan.network_objects(net, plan.Settings("cg1", cluster_cidrs=cidrs))
            if isinstance(o, plan.Masquerade)}
    assert masq == {plan.Masquerade(ipaddress.IPv4Network("10.192.1.0/24"), (ipaddress.IPv4Network("10.192.0.0/10"),))}
    default = {o for o in plan.network_objects(net, plan.Settings("cg1")) if isinstance(o, plan.Masquerade)}
    assert default == {plan.Masquerade(ipaddress.IPv4Network("10.192.1.0/24"))}


def test_fake_applies_cluster_objects_idempotently_and_cleans_up() -> None:
    fake = FakeKernel()
    objs = set(cluster_objects(view(), "cg1"))
    fake.apply(plan.diff(objs, fake.observe()))
    assert fake.tunnel == naming.tunnel_device("cg1")
    assert not plan.diff(objs, fake.observe())
    native = set(cluster_objects(view("disabled"), "cg1"))
    fake.apply(plan.diff(native, fake.observe()))
    assert fake.tunnel == "" and fake.observe() == native
    fake.apply(plan.diff(set(), fake.observe()))
    assert fake.observe() == set()
