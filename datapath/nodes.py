"""The nodes of a cluster and the kernel objects that reach them: tunnel device, ipcache, routes.

Pure: imports only the standard library and datapath. A ClusterView is what the kvstore
says now (this node, its peers, the remote endpoints); cluster_objects() turns it into plan
objects, which datapath.plan.desired_state() merges with the local ones.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from datapath import naming
from datapath.plan import IpcacheEntry, IPNetwork, KernelObject, Key, Route, TunnelDevice

REMOTE_NODE = 6  # datapath.identity: the identity of another node's own addresses
WORLD = 2
HOST = 1
MAX_CLUSTER_IDENTITY = (1 << 24) - 1  # the VNI carries 24 bits
VXLAN_PORT = 8472

TunnelMode = Literal["vxlan", "disabled"]
TUNNEL_MODES: tuple[str, ...] = ("vxlan", "disabled")


@dataclass(frozen=True)
class Node:
    """A peer (or this) node as registered in the kvstore."""

    name: str
    address: ipaddress.IPv4Address  # underlay address: VXLAN outer destination, native next hop
    ipv4_range: ipaddress.IPv4Network | None = None
    ipv6_range: ipaddress.IPv6Network | None = None

    @property
    def ranges(self) -> tuple[IPNetwork, ...]:
        return tuple(r for r in (self.ipv4_range, self.ipv6_range) if r is not None)


@dataclass(frozen=True)
class RemoteEntry:
    """A remote endpoint address (or prefix) and its identity, living on `node` (node address)."""

    prefix: IPNetwork
    identity: int
    node: ipaddress.IPv4Address

    # Made once per entry: a view of 50k entries reuses its unchanged entries' kernel objects (and
    # their keys) instead of making them anew on every change.
    @functools.cached_property
    def tunnelled(self) -> IpcacheEntry:
        return IpcacheEntry(self.prefix, self.identity, self.node)

    @functools.cached_property
    def routed(self) -> IpcacheEntry:
        return IpcacheEntry(self.prefix, self.identity, None)

    @functools.cached_property
    def order(self) -> tuple[int, int, int]:
        """IPv4 first, then by address: integers sort 50k entries far faster than ipaddress objects."""
        return self.prefix.version, int(self.prefix.network_address), self.prefix.prefixlen

    @functools.cached_property
    def row(self) -> tuple[str, int, str]:
        """(prefix, identity, node address) as text, as the agent's cached view file holds it."""
        return str(self.prefix), self.identity, str(self.node)


@dataclass(frozen=True)
class ClusterView:
    """This node, its peers and the remote endpoints, with the tunnel mode.

    The kernel objects are computed once per view and per instance name and cached on it, so
    a scoped desired_state() costs O(len(scope)).
    """

    local: Node
    peers: tuple[Node, ...] = ()
    entries: tuple[RemoteEntry, ...] = ()
    tunnel: str = "vxlan"  # "vxlan" | "disabled" (native routing)
    port: int = VXLAN_PORT
    # Not an init field: dataclasses.replace() makes a new view with an empty cache.
    _cache: dict[str, dict[Key, KernelObject]] = field(init=False, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cache", {})
        if self.tunnel not in TUNNEL_MODES:
            raise ValueError(f"tunnel mode {self.tunnel!r} is not one of {', '.join(TUNNEL_MODES)}")

    def by_key(self, instance: str) -> dict[Key, KernelObject]:
        index = self._cache.get(instance)
        if index is None:
            index = {o.key: o for o in _objects(self, instance)}
            self._cache[instance] = index
        return index

    def objects(self, instance: str) -> frozenset[KernelObject]:
        return frozenset(self.by_key(instance).values())


def cluster_objects(view: ClusterView, instance: str) -> frozenset[KernelObject]:
    """The kernel objects of the cluster for the agent instance `instance`."""
    return view.objects(instance)


def _objects(view: ClusterView, instance: str) -> list[KernelObject]:
    vxlan = view.tunnel == "vxlan"
    dev = naming.tunnel_device(instance)
    out: list[KernelObject] = []
    if vxlan:
        out.append(TunnelDevice(dev, naming.link_tag(instance) + "tunnel", view.port))
    peers = [p for p in view.peers if p.address != view.local.address]
    for peer in peers:
        out.append(IpcacheEntry(ipaddress.IPv4Network(peer.address), REMOTE_NODE))
        for rng in peer.ranges:
            out.append(IpcacheEntry(rng, WORLD, peer.address if vxlan else None))
            if vxlan:
                # Host processes reach remote endpoints through the tunnel, from the node's own
                # address (for IPv4), to which the answers come back over the underlay.
                out.append(Route(rng, dev, view.local.address if rng.version == 4 else None))
            elif rng.version == 4:
                # Native routing needs an underlay of the range's family; only IPv4 underlays
                # are supported, so IPv6 ranges of peers are not routed in this mode.
                out.append(Route(rng, "", via=peer.address))
    for entry in view.entries:
        if entry.node == view.local.address:
            continue
        out.append(entry.tunnelled if vxlan else entry.routed)
    return out
