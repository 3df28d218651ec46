"""What the kernel should hold, computed from networks and endpoints, and the diff to get there.

Pure: the objects below are plain values. datapath.kernel observes which of them exist
and applies a Plan; datapath.fake does the same in memory for tests. Applying the diff
of a desired state and then diffing again must give an empty plan.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from datapath import naming
from datapath.model import Endpoint, IPAddress, Network
from datapath.services import Backend, Frontend

if TYPE_CHECKING:
    from datapath.nodes import ClusterView

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FLAG_IPV4 = 0x1
FLAG_IPV6 = 0x2


@dataclass(frozen=True)
class Settings:
    """Agent-wide facts the plan depends on."""

    instance: str = "cellgate"
    masquerade: bool = True
    program_revision: str = ""  # identity of the compiled programs every endpoint must run
    # Destinations inside the cluster (every node's endpoint ranges): never masqueraded, so the
    # receiving node sees the sender's own address (and the ipcache its identity).
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    proxy: bool = False  # the L7 proxy runs: its routing (ProxyRoute) is in place
    cgroup: str = ""  # the cgroup2 directory the socket balancer attaches to; "" = no socket balancing
    lb_devices: tuple[str, ...] = ()  # the node's devices where packets for VIPs are balanced (cg_netdev)


@dataclass(frozen=True)
class EndpointValue:
    """Mirror of struct cg_endpoint minus the ifindex, which only the kernel knows."""

    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    mac: str
    host_mac: str
    sandbox: int = 0
    identity: int = 0

    @property
    def flags(self) -> int:
        return (FLAG_IPV4 if self.ipv4 else 0) | (FLAG_IPV6 if self.ipv6 else 0)


# -- kernel objects ------------------------------------------------------------------------
# Each has a `kind` (which handler in datapath.kernel and datapath.fake owns it), a `key`
# (what it is, starting with the kind) and compares by value (how it should be). Applying
# adds in ORDER and removes in reverse, so dependencies come first. An endpoint's objects
# also say how a scoped desired_state() finds their owner (`scoped_by`): "dev" when key[1]
# is the endpoint's host device, "ip" when it is its address, "host-route" when it is its
# /32 or /128. A new kind is a class here, a place in ORDER, and a handler in each adapter.


@dataclass(frozen=True)
class HostDevice:
    kind: ClassVar[str] = "device"
    name: str
    tag: str

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.name)


@dataclass(frozen=True)
class HostAddress:
    kind: ClassVar[str] = "address"
    dev: str
    address: IPAddress

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.dev, str(self.address))


@dataclass(frozen=True)
class IpcacheEntry:
    """An address (or prefix) that is not a local endpoint, with its identity."""

    kind: ClassVar[str] = "ipcache"
    prefix: IPNetwork
    identity: int
    # The node that hosts the address (VXLAN mode: where packets to it are tunnelled); None for
    # host addresses, other prefixes, and every entry in native-routing mode's routes' sense.
    tunnel_endpoint: ipaddress.IPv4Address | None = None

    @functools.cached_property  # computed once: the cluster's entries are many and long-lived
    def key(self) -> tuple[str, ...]:
        return (self.kind, str(self.prefix))


@dataclass(frozen=True)
class TunnelDevice:
    """The instance's collect-metadata ("external") VXLAN device, with cg_overlay on it: one per
    node; the identity of the sender travels as the VNI, the peer node is chosen per packet."""

    kind: ClassVar[str] = "tunnel"
    name: str
    tag: str
    port: int = 8472

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.name)


@dataclass(frozen=True)
class Veth:
    kind: ClassVar[str] = "veth"
    scoped_by: ClassVar[str] = "dev"
    name: str
    mac: str
    tag: str
    peer: str = field(compare=False, default="")  # set at creation, not observable after Join
    peer_mac: str = field(compare=False, default="")
    # Where the peer goes when that is known up front (CNI): created there under its final
    # name, which spares moving it across namespaces later (about 14 ms of RCU waits each).
    netns: str = field(compare=False, default="")
    netns_ifname: str = field(compare=False, default="")

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.name)


@dataclass(frozen=True)
class EndpointEntry:
    kind: ClassVar[str] = "endpoint-entry"
    scoped_by: ClassVar[str] = "dev"
    dev: str
    value: EndpointValue

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.dev)


@dataclass(frozen=True)
class AddressEntry:
    kind: ClassVar[str] = "address-entry"
    scoped_by: ClassVar[str] = "ip"
    address: IPAddress
    dev: str
    value: EndpointValue

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, str(self.address))


@dataclass(frozen=True)
class Programs:
    kind: ClassVar[str] = "programs"
    scoped_by: ClassVar[str] = "dev"
    dev: str
    revision: str

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.dev)


@dataclass(frozen=True)
class Neighbour:
    kind: ClassVar[str] = "neighbour"
    scoped_by: ClassVar[str] = "dev"
    dev: str
    address: IPAddress
    mac: str

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.dev, str(self.address))


@dataclass(frozen=True)
class Route:
    kind: ClassVar[str] = "route"
    scoped_by: ClassVar[str] = "host-route"
    dst: IPNetwork
    dev: str  # "" for a route through a gateway (`via`) whose device the kernel picks
    src: IPAddress | None = None
    via: IPAddress | None = None  # native routing: the peer node that hosts `dst`

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, str(self.dst))


@dataclass(frozen=True)
class ProxyRoute:
    """The L7 proxy's routing, per family: what the datapath assigned to the proxy's socket
    (skb mark 0x200/0xf00) is delivered locally (`ip rule fwmark 0x200/0xf00 lookup T`, table T
    holding `local default dev lo`), whatever its destination address. T is the instance's own
    (naming.proxy_table): every instance's rule delivers alike, and each removes only its own."""

    kind: ClassVar[str] = "proxy-route"
    family: int  # 4 or 6
    table: int

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, str(self.family))


@dataclass(frozen=True)
class LbService:
    """A load-balanced service in cg_lb_services/cg_lb_revnat (bpf/lib/lb.h): the frontend, its
    reverse-NAT index and the backends, slot i+1 holding backends[i]."""

    kind: ClassVar[str] = "lb-service"
    frontend: Frontend
    rev_nat: int
    backends: tuple[Backend, ...] = ()
    flags: int = 0

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, str(self.frontend))


@dataclass(frozen=True)
class VipRoute:
    """`unreachable VIP` at the instance's own metric: a VIP packet that no balancer translated
    (no backends, or traffic the hooks do not see) is refused with ICMP, never routed on."""

    kind: ClassVar[str] = "vip-route"
    address: IPAddress
    metric: int

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, str(self.address))


@dataclass(frozen=True)
class ServedNetns:
    """A network namespace whose sockets the socket balancer translates (cg_lb_netns): the
    agent's own (`path` "") and each joined endpoint's sandbox."""

    kind: ClassVar[str] = "served-netns"
    scoped_by: ClassVar[str] = "sandbox"
    tag: int  # the endpoints' sandbox hash; 0 = the agent's own namespace
    path: str = field(compare=False, default="")  # where to find it ("" = our own); not observable

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, str(self.tag))


@dataclass(frozen=True)
class SockPrograms:
    """bpf/cg_sock.c attached to the cgroup2 root (BPF_F_ALLOW_MULTI, so instances coexist) and
    pinned, at the datapath's revision; they stay attached when the agent stops."""

    kind: ClassVar[str] = "sock-programs"
    cgroup: str
    revision: str

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.cgroup)


@dataclass(frozen=True)
class NetdevProgram:
    """cg_from_netdev (bpf/cg_netdev.c) on the ingress of one of the node's own devices, which
    the agent does not own: only its filter is ours (packet-level balancing, DSR)."""

    kind: ClassVar[str] = "netdev-program"
    dev: str
    revision: str

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.dev)


@dataclass(frozen=True)
class Masquerade:
    kind: ClassVar[str] = "masquerade"
    subnet: ipaddress.IPv4Network
    exempt: tuple[ipaddress.IPv4Network, ...] = ()  # destinations left alone (the cluster's ranges)

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, str(self.subnet))


KernelObject = (
    HostDevice | HostAddress | TunnelDevice | IpcacheEntry | Veth | EndpointEntry | AddressEntry | Programs
    | Neighbour | Route | Masquerade | ProxyRoute | VipRoute | LbService | ServedNetns | SockPrograms | NetdevProgram
)
Key = tuple[str, ...]

ORDER = (
    HostDevice, HostAddress, TunnelDevice, IpcacheEntry, Veth, EndpointEntry, AddressEntry, Programs, Neighbour,
    Route, Masquerade, ProxyRoute, VipRoute, LbService, ServedNetns, SockPrograms, NetdevProgram,
)


KINDS: Mapping[str, type[KernelObject]] = {cls.kind: cls for cls in ORDER}
_RANK = {cls: rank for rank, cls in enumerate(ORDER)}


def _rank(obj: KernelObject) -> int:
    return _RANK[type(obj)]


@dataclass(frozen=True)
class Plan:
    """Removals run first (dependents before what they depend on), then changes, then adds.

    A change keeps the key and swaps the value; the executor does it in one step where
    the kernel allows (map update, tc filter replace, route/neighbour replace), so a
    program or a map entry is never absent in between.
    """

    remove: tuple[KernelObject, ...] = ()
    change: tuple[tuple[KernelObject, KernelObject], ...] = ()
    add: tuple[KernelObject, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.change or self.add)

    def describe(self) -> list[str]:
        return (
            [f"- {o}" for o in self.remove]
            + [f"~ {new}" for _, new in self.change]
            + [f"+ {o}" for o in self.add]
        )


def diff(
    desired: Iterable[KernelObject], actual: Iterable[KernelObject], scope: Iterable[Key] | None = None
) -> Plan:
    """Changes that turn `actual` into `desired`, limited to `scope` keys when given."""
    want: Mapping[Key, KernelObject] = {o.key: o for o in desired}
    have: Mapping[Key, KernelObject] = {o.key: o for o in actual}
    keys = set(scope) if scope is not None else set(want) | set(have)
    remove = [have[k] for k in keys if k in have and k not in want]
    add = [want[k] for k in keys if k in want and k not in have]
    change = [(have[k], want[k]) for k in keys if k in have and k in want and have[k] != want[k]]
    remove.sort(key=_rank, reverse=True)
    add.sort(key=_rank)
    change.sort(key=lambda pair: _rank(pair[1]))
    return Plan(tuple(remove), tuple(change), tuple(add))


# -- desired state -------------------------------------------------------------------------


def network_objects(net: Network, settings: Settings) -> set[KernelObject]:
    dev = naming.host_device(settings.instance)
    objs: set[KernelObject] = {HostDevice(dev, naming.link_tag(settings.instance) + "host")}
    for gw in net.gateways:
        objs.add(HostAddress(dev, gw.ip))
        objs.add(Route(gw.network, dev))  # unknown addresses of the subnet end here
        if settings.masquerade and isinstance(gw.network, ipaddress.IPv4Network):
            exempt = tuple(sorted(c for c in settings.cluster_cidrs if isinstance(c, ipaddress.IPv4Network)))
            objs.add(Masquerade(gw.network, exempt))
    return objs


def endpoint_value(ep: Endpoint) -> EndpointValue:
    return EndpointValue(
        ipv4=ep.ipv4.ip if ep.ipv4 else None,
        ipv6=ep.ipv6.ip if ep.ipv6 else None,
        mac=ep.mac,
        host_mac=ep.host_mac,
        sandbox=ep.sandbox_hash,
        identity=ep.identity,
    )


def endpoint_objects(ep: Endpoint, settings: Settings) -> set[KernelObject]:
    dev = ep.host_ifname
    value = endpoint_value(ep)
    inside = (ep.sandbox, ep.ifname) if ep.origin == "cni" and ep.sandbox and ep.ifname else ("", "")
    objs: set[KernelObject] = {
        Veth(dev, ep.host_mac, naming.link_tag(settings.instance) + ep.id, ep.peer_ifname, ep.mac, *inside),
        EndpointEntry(dev, value),
        Programs(dev, settings.program_revision),
    }
    if ep.sandbox and settings.cgroup:
        objs.add(ServedNetns(ep.sandbox_hash, ep.sandbox))
    for addr, gw in ((ep.ipv4, ep.gateway4), (ep.ipv6, ep.gateway6)):
        if addr is None:
            continue
        objs.add(AddressEntry(addr.ip, dev, value))
        objs.add(Neighbour(dev, addr.ip, ep.mac))
        objs.add(Route(ipaddress.ip_network(addr.ip), dev, gw))
    return objs


HOST_IDENTITY = 1  # datapath.identity.HOST


def host_objects(addresses: Iterable[IPAddress]) -> set[KernelObject]:
    """The host's own addresses carry the host identity in the ipcache."""
    return {IpcacheEntry(ipaddress.ip_network(a), HOST_IDENTITY) for a in addresses}


def desired_state(
    networks: Iterable[Network],
    endpoints: Iterable[Endpoint],
    settings: Settings,
    host_addresses: Iterable[IPAddress] = (),
    scope: set[Key] | None = None,
    cluster: ClusterView | None = None,
) -> set[KernelObject]:
    """Every object the kernel should hold; with `scope`, at least those whose key is in it.

    A scope skips the endpoints that cannot own a key in it, so converging one endpoint
    costs the same with 1 or 1,000 others (the caller still filters by key). The cluster's
    objects (datapath.nodes) are looked up by key under a scope, in O(len(scope)).
    """
    objs: set[KernelObject] = host_objects(host_addresses)
    if settings.cgroup:
        objs |= {ServedNetns(0), SockPrograms(settings.cgroup, settings.program_revision)}
    objs |= {NetdevProgram(dev, settings.program_revision) for dev in settings.lb_devices}
    if settings.proxy:
        table = naming.proxy_table(settings.instance)
        objs |= {ProxyRoute(4, table), ProxyRoute(6, table)}
    if cluster is not None:
        if scope is None:
            objs |= cluster.objects(settings.instance)
        else:
            index = cluster.by_key(settings.instance)
            objs.update(index[k] for k in scope if k in index)
    for net in networks:
        objs |= network_objects(net, settings)
    if scope is not None:
        devices, ips, sandboxes = _scope_owners(scope)
        endpoints = [ep for ep in endpoints
                     if ep.host_ifname in devices or any(a.ip in ips for a in ep.addresses)
                     or (ep.sandbox and ep.sandbox_hash in sandboxes)]
    for ep in endpoints:
        objs |= endpoint_objects(ep, settings)
    return objs


def _scope_owners(scope: set[Key]) -> tuple[set[str], set[IPAddress], set[int]]:
    """Host devices and addresses named by the keys in `scope`: an endpoint whose host device
    or address is not among them owns none of the keys (each key endpoint_objects makes names
    its device, its address, or its /32 or /128 route). Worked out once per scope, so that
    checking each of 1,000 endpoints is two set lookups."""
    devices: set[str] = set()
    ips: set[IPAddress] = set()
    sandboxes: set[int] = set()
    for key in scope:
        cls = KINDS.get(key[0])
        owner = getattr(cls, "scoped_by", "")
        if owner == "dev":
            devices.add(key[1])
        elif owner == "ip":
            ips.add(ipaddress.ip_address(key[1]))
        elif owner == "host-route":
            net = ipaddress.ip_network(key[1])
            if net.prefixlen == net.max_prefixlen:
                ips.add(net.network_address)
        elif owner == "sandbox":
            sandboxes.add(int(key[1]))
    return devices, ips, sandboxes


def service_objects(services: Iterable[tuple[Frontend, int, tuple[Backend, ...]]], instance: str) -> set[KernelObject]:
    """The kernel form of the services a node balances: the maps' entries and each VIP's route."""
    metric = naming.vip_metric(instance)
    objs: set[KernelObject] = set()
    for frontend, rev_nat, backends in services:
        objs.add(LbService(frontend, rev_nat, backends))
        objs.add(VipRoute(frontend.address, metric))
    return objs


def keys(objs: Iterable[KernelObject]) -> set[Key]:
    return {o.key for o in objs}


def removal_keys(objs: Iterable[KernelObject]) -> set[Key]:
    """The keys to converge when every object of `objs` goes (an endpoint removed): those but the
    routes, neighbours and tc programs on a veth among them, which the kernel drops with the link,
    so observing and removing each one would only cost netlink round trips."""
    objs = list(objs)
    links = {o.name for o in objs if isinstance(o, Veth)}
    return {o.key for o in objs if not (isinstance(o, (Route, Neighbour, Programs)) and o.dev in links)}
