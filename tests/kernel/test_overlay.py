"""Two nodes in two network namespaces, joined by a veth underlay: VXLAN overlay with the sender's
identity in the VNI, native routing with identities from the ipcache, and the drops that keep the
overlay closed (unknown outer source, identities that do not fit the VNI).

Each node runs its own KernelExecutor, with its own instance name and pin directory, inside its
namespace (the test thread enters it around every netlink call); its endpoints live in their
own namespaces behind it. Nothing here is routed out of the node namespaces.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from datapath import identity as ids
from datapath import naming, plan
from datapath.model import Endpoint, Network
from datapath.nodes import ClusterView, Node, RemoteEntry, cluster_objects
from datapath.policy.compile import PolicyKey, PolicyValue

from .conftest import BPF_ROOT, instance_name
from .helpers import TcpServer, counter_delta, in_ns, ping, ping_fails, run, tcp_try, udp_ask

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

DROP_POLICY, DROP_POLICY_DENY = 133, 181
CG_OK_TUNNEL, DROP_UNKNOWN_NODE, DROP_NO_CLUSTER_IDENTITY = 12, 191, 192


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """The calling thread in network namespace `ns` (netlink sockets opened here stay there)."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(target)
        os.close(back)


def allow_all(subject: int) -> dict[PolicyKey, PolicyValue]:
    return {PolicyKey(subject, egress, 0, 0, 0, any_proto=True): PolicyValue(False, 1) for egress in (True, False)}


def egress_only(subject: int) -> dict[PolicyKey, PolicyValue]:
    return {PolicyKey(subject, True, 0, 0, 0, any_proto=True): PolicyValue(False, 1)}


def ingress_from(subject: int, peer: int, deny: bool = False) -> dict[PolicyKey, PolicyValue]:
    return {PolicyKey(subject, False, peer, 0, 0, any_proto=True): PolicyValue(deny, 2)}


@dataclass
class Guest:
    ep: Endpoint
    ns: str

    @property
    def ip4(self) -> ipaddress.IPv4Address:
        assert self.ep.ipv4 is not None
        return self.ep.ipv4.ip

    @property
    def ip6(self) -> ipaddress.IPv6Address:
        assert self.ep.ipv6 is not None
        return self.ep.ipv6.ip


@dataclass
class NodeNs:
    """One node: its namespace, underlay address, datapath, executor, network and guests."""

    ns: str
    instance: str
    address: ipaddress.IPv4Address
    network: Network
    dp: Any
    kernel: Any = None
    guests: list[Guest] = field(default_factory=list)
    cluster: frozenset[plan.KernelObject] = frozenset()
    _host: int = 2

    @property
    def settings(self) -> plan.Settings:
        return plan.Settings(self.instance, masquerade=False, program_revision=self.dp.revision)

    @property
    def ranges(self) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
        v4 = next(g.network for g in self.network.gateways if g.version == 4)
        v6 = next(g.network for g in self.network.gateways if g.version == 6)
        assert isinstance(v4, ipaddress.IPv4Network) and isinstance(v6, ipaddress.IPv6Network)
        return v4, v6

    def node(self) -> Node:
        v4, v6 = self.ranges
        return Node(self.ns, self.address, v4, v6)

    def converge(self, objs: set[plan.KernelObject], scope: set[plan.Key]) -> plan.Plan:
        with inside(self.ns):
            change = plan.diff({o for o in objs if o.key in scope}, self.kernel.observe(scope), scope)
            self.kernel.apply(change)
            return change

    def pending(self, objs: set[plan.KernelObject]) -> plan.Plan:
        scope = plan.keys(objs)
        with inside(self.ns):
            return plan.diff(objs, self.kernel.observe(scope), scope)

    def set_cluster(self, view: ClusterView) -> None:
        """Converge the cluster objects to `view`'s (those of the last view go if gone)."""
        new = cluster_objects(view, self.instance)
        scope = plan.keys(new) | plan.keys(self.cluster)
        self.converge(set(new), scope)
        self.cluster = new

    def new_guest(self, identity: int) -> Guest:
        eid = secrets.token_hex(32)
        host, self._host = self._host, self._host + 1
        v4, v6 = self.ranges
        ep = Endpoint(
            id=eid, network_id=self.network.id, host_ifname=naming.host_ifname(eid),
            peer_ifname=naming.peer_ifname(eid), mac=naming.container_mac(eid), host_mac=naming.host_mac(eid),
            ipv4=ipaddress.IPv4Interface(f"{v4[host]}/{v4.prefixlen}"),
            ipv6=ipaddress.IPv6Interface(f"{v6[host]}/{v6.prefixlen}"),
            gateway4=v4[1], gateway6=v6[1], sandbox=f"/var/run/netns/cgov{eid[:10]}", identity=identity,
        )
        guest = Guest(ep, "cgov" + eid[:10])
        self.guests.append(guest)
        objs = plan.endpoint_objects(ep, self.settings)
        self.converge(objs, plan.keys(objs))
        run("ip", "netns", "add", guest.ns)
        run("ip", "-n", self.ns, "link", "set", "dev", ep.peer_ifname, "netns", guest.ns)
        script = ["link set dev lo up", f"link set dev {ep.peer_ifname} name eth0", f"addr add {ep.ipv4} dev eth0",
                  f"addr add {ep.ipv6} dev eth0 nodad", "link set dev eth0 up",
                  f"route add default via {ep.gateway4} dev eth0", f"route add default via {ep.gateway6} dev eth0"]
        run("ip", "-n", guest.ns, "-batch", "-", stdin="\n".join(script) + "\n")
        return guest

    def set_identity(self, guest: Guest, identity: int) -> None:
        guest.ep = replace(guest.ep, identity=identity)
        objs = plan.endpoint_objects(guest.ep, self.settings)
        self.converge(objs, plan.keys(objs))

    def policy(self, entries: dict[PolicyKey, PolicyValue]) -> None:
        have = self.kernel.policy_entries()
        self.kernel.policy_update(entries, [k for k in have if k not in entries])

    def counters(self) -> dict[int, tuple[int, int]]:
        return dict(self.kernel.counters())


@dataclass
class Pair:
    a: NodeNs
    b: NodeNs

    def views(self, tunnel: str) -> tuple[ClusterView, ClusterView]:
        """Each node's view: the other as peer, the other's guests as remote entries."""
        def view(local: NodeNs, peer: NodeNs) -> ClusterView:
            entries = tuple(
                RemoteEntry(ipaddress.ip_network(addr), g.ep.identity, peer.address)
                for g in peer.guests for addr in (g.ip4, g.ip6)
            )
            return ClusterView(local.node(), (peer.node(),), entries, tunnel)

        return view(self.a, self.b), view(self.b, self.a)

    def connect(self, tunnel: str) -> tuple[ClusterView, ClusterView]:
        va, vb = self.views(tunnel)
        self.a.set_cluster(va)
        self.b.set_cluster(vb)
        return va, vb


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    from datapath.kernel.executor import KernelExecutor
    from datapath.kernel.loader import Datapath, remove_pins

    tag = secrets.token_hex(2)
    octet = int(tag[:2], 16) % 250 + 2
    nodes: list[NodeNs] = []
    try:
        for side, host in (("a", 1), ("b", 2)):
            ns = f"cgnode{tag}{side}"
            run("ip", "netns", "add", ns)
            name = instance_name(side)
            net4 = ipaddress.IPv4Network(f"10.{240 + host}.{octet}.0/24")
            net6 = ipaddress.IPv6Network(f"fd63:6868:{octet:x}:{host}::/64")
            network = Network(f"cgnet-{name}", (ipaddress.ip_interface(f"{net4[1]}/24"),
                                                ipaddress.ip_interface(f"{net6[1]}/64")))
            node = NodeNs(ns, name, ipaddress.IPv4Address(f"10.254.{octet}.{host}"), network,
                          Datapath(BPF_ROOT / name))
            nodes.append(node)
            with inside(ns):
                node.kernel = KernelExecutor(name, node.dp)
            run("ip", "-n", ns, "link", "set", "dev", "lo", "up")
            in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        a, b = nodes
        run("ip", "-n", a.ns, "link", "add", f"cgu{tag}a", "type", "veth", "peer", "name", f"cgu{tag}b",
            "netns", b.ns)
        for node, side in ((a, "a"), (b, "b")):
            run("ip", "-n", node.ns, "addr", "add", f"{node.address}/24", "dev", f"cgu{tag}{side}")
            run("ip", "-n", node.ns, "link", "set", "dev", f"cgu{tag}{side}", "up")
            objs = plan.network_objects(node.network, node.settings)
            node.converge(objs, plan.keys(objs))
        yield Pair(a, b)
    finally:
        for node in nodes:
            for guest in node.guests:
                run("ip", "netns", "del", guest.ns, check=False)
            if node.kernel is not None:
                try:
                    with inside(node.ns):
                        node.kernel.apply(plan.diff(set(), node.kernel.observe()))
                finally:
                    node.kernel.close()
            node.dp.close()
            remove_pins(Path(BPF_ROOT / node.instance))
            run("ip", "netns", "del", node.ns, check=False)


X, Y, Z = 3001, 3002, 3003  # cluster-wide identities of the guests


@pytest.fixture(scope="module")
def guests(pair: Pair) -> tuple[Guest, Guest]:
    return pair.a.new_guest(X), pair.b.new_guest(Y)


def test_vxlan_identity_travels_and_conntrack_answers(pair: Pair, guests: tuple[Guest, Guest]) -> None:
    ga, gb = guests
    va, vb = pair.connect("vxlan")
    assert not pair.a.pending(set(va.objects(pair.a.instance)))  # idempotent: tunnel, ipcache, routes
    assert not pair.b.pending(set(vb.objects(pair.b.instance)))
    # A's guest may send anywhere and accepts nothing new; B's accepts only X.
    pair.a.policy(egress_only(X))
    pair.b.policy({**egress_only(Y), **ingress_from(Y, X)})
    before = pair.a.counters()
    ping(ga.ns, gb.ip4, count=3)
    ping(ga.ns, gb.ip6, count=3)
    assert counter_delta(before, pair.a.counters(), CG_OK_TUNNEL)[0] >= 6
    assert udp_ask(ga.ns, gb.ip4, 9) == "refused"  # the ICMP error is related: it comes back
    with TcpServer(gb.ns, (gb.ip4, gb.ip6), (8080,)):
        assert tcp_try(ga.ns, gb.ip4, 8080, 3.0) == "ok"
        assert tcp_try(ga.ns, gb.ip6, 8080, 3.0) == "ok"
    # B → A is new at A, whose guest accepts nothing: dropped by A's ingress policy.
    before = pair.a.counters()
    assert ping_fails(gb.ns, ga.ip4)
    assert counter_delta(before, pair.a.counters(), DROP_POLICY)[0] >= 1
    # Only another identity allowed: X is refused. An explicit deny of X: refused by the deny.
    pair.b.policy({**egress_only(Y), **ingress_from(Y, Z)})
    before = pair.b.counters()
    assert ping_fails(ga.ns, gb.ip4)
    assert counter_delta(before, pair.b.counters(), DROP_POLICY)[0] >= 1
    pair.b.policy({**allow_all(Y), **ingress_from(Y, X, deny=True)})
    before = pair.b.counters()
    assert ping_fails(ga.ns, gb.ip6)
    assert counter_delta(before, pair.b.counters(), DROP_POLICY_DENY)[0] >= 1
    pair.b.policy({**egress_only(Y), **ingress_from(Y, X)})
    ping(ga.ns, gb.ip4)


def test_host_reaches_remote_endpoint_as_remote_node(pair: Pair, guests: tuple[Guest, Guest]) -> None:
    _ga, gb = guests
    pair.connect("vxlan")
    pair.b.policy({**egress_only(Y), **ingress_from(Y, ids.REMOTE_NODE)})
    ping(pair.a.ns, gb.ip4)
    pair.b.policy({**egress_only(Y), **ingress_from(Y, X)})
    assert ping_fails(pair.a.ns, gb.ip4)


def test_unknown_outer_source_is_dropped(pair: Pair, guests: tuple[Guest, Guest]) -> None:
    ga, gb = guests
    va, _vb = pair.connect("vxlan")
    pair.a.policy(egress_only(X))
    pair.b.policy({**egress_only(Y), **ingress_from(Y, X)})
    ping(ga.ns, gb.ip4)
    # B forgets that A is a node (keeps its tunnel): A's encapsulation is now forged to B.
    pair.b.set_cluster(ClusterView(pair.b.node(), (), (), "vxlan"))
    before = pair.b.counters()
    assert ping_fails(ga.ns, gb.ip4)
    assert counter_delta(before, pair.b.counters(), DROP_UNKNOWN_NODE)[0] >= 1
    pair.connect("vxlan")
    ping(ga.ns, gb.ip4)
    assert va.objects(pair.a.instance)


def test_identity_beyond_the_vni_is_dropped(pair: Pair, guests: tuple[Guest, Guest]) -> None:
    ga, gb = guests
    pair.connect("vxlan")
    local = 1 << 24 | 7  # a node-local identity: it cannot travel
    pair.a.set_identity(ga, local)
    try:
        pair.a.policy({**egress_only(X), **egress_only(local)})
        pair.b.policy(allow_all(Y))
        before = pair.a.counters()
        assert ping_fails(ga.ns, gb.ip4)
        assert counter_delta(before, pair.a.counters(), DROP_NO_CLUSTER_IDENTITY)[0] >= 1
    finally:
        pair.a.set_identity(ga, X)


def test_native_routing_identity_from_ipcache(pair: Pair, guests: tuple[Guest, Guest]) -> None:
    ga, gb = guests
    va, vb = pair.connect("disabled")
    try:
        assert not any(isinstance(o, plan.TunnelDevice) for o in va.objects(pair.a.instance))
        routes = [o for o in va.objects(pair.a.instance) if isinstance(o, plan.Route)]
        assert routes and all(r.via == pair.b.address for r in routes)
        assert not pair.a.pending(set(va.objects(pair.a.instance)))  # via routes observed back
        assert not pair.b.pending(set(vb.objects(pair.b.instance)))
        with inside(pair.a.ns):
            assert not any(isinstance(o, plan.TunnelDevice) for o in pair.a.kernel.observe())
        pair.a.policy(egress_only(X))
        pair.b.policy({**egress_only(Y), **ingress_from(Y, X)})
        ping(ga.ns, gb.ip4, count=2)
        with TcpServer(gb.ns, (gb.ip4,), (8081,)):
            assert tcp_try(ga.ns, gb.ip4, 8081, 3.0) == "ok"
        # The receiver knows the sender from its ipcache entry: without it, the sender is world.
        pair.b.set_cluster(replace(vb, entries=()))
        assert ping_fails(ga.ns, gb.ip4)
    finally:
        pair.connect("vxlan")


def test_masquerade_exempts_cluster_ranges_in_iptables(pair: Pair) -> None:
    node = pair.a
    subnet = node.ranges[0]
    cluster = ipaddress.IPv4Network("10.192.0.0/10")
    scope = {("masquerade", str(subnet))}
    try:
        for exempt in ((cluster,), (cluster, ipaddress.IPv4Network("10.241.0.0/16")), ()):
            want: set[plan.KernelObject] = {plan.Masquerade(subnet, tuple(sorted(exempt)))}
            node.converge(want, scope)
            assert not node.pending(want)  # observed back as written
            rules = in_ns(node.ns, "iptables", "-w", "-t", "nat", "-S", naming.nat_chain(node.instance)).stdout
            returns = [line for line in rules.splitlines() if "RETURN" in line]
            assert len(returns) == len(exempt)
            if exempt:  # the exemptions come before the MASQUERADE they exempt from
                lines = rules.splitlines()
                assert max(lines.index(r) for r in returns) < next(
                    i for i, line in enumerate(lines) if "MASQUERADE" in line)
    finally:
        node.converge(set(), scope)
        with inside(node.ns):
            node.kernel.iptables.teardown()
