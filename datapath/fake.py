"""An in-memory Kernel that behaves like datapath.kernel for the objects it is given.

Used by unit tests of the agent and the plan. The contract tests in tests/ run the same
checks against this fake and against the real kernel adapter, which keeps it honest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from datapath import failpoints
from datapath.errors import InvalidRequest, KernelError
from datapath.model import IPAddress, IPInterface
from datapath.plan import (
    AddressEntry,
    EndpointEntry,
    HostAddress,
    HostDevice,
    IpcacheEntry,
    IPNetwork,
    KernelObject,
    Key,
    LbService,
    Masquerade,
    Neighbour,
    NetdevProgram,
    Plan,
    Programs,
    ProxyRoute,
    Route,
    ServedNetns,
    SockPrograms,
    TunnelDevice,
    Veth,
    VipRoute,
)
from datapath.policy.compile import PolicyKey, PolicyValue
from datapath.services import Backend


class _Stored:
    """A kind held as plain values by key: map entries, iptables rules."""

    goes_with_link = False  # deleting a link takes its addresses, routes, neighbours and filters

    def __init__(self, fake: FakeKernel) -> None:
        self.fake = fake

    def add(self, obj: KernelObject) -> None:
        if obj.key in self.fake.objects:
            raise KernelError(f"{obj.key} exists")
        self.fake.store(obj)

    def change(self, old: KernelObject, new: KernelObject) -> None:
        self.fake.store(new)

    def remove(self, obj: KernelObject) -> None:
        self.fake.objects.pop(obj.key, None)


class _AddressEntries(_Stored):
    def remove(self, obj: KernelObject) -> None:
        assert isinstance(obj, AddressEntry)
        have = self.fake.objects.pop(obj.key, None)
        if isinstance(have, AddressEntry) and have.dev.startswith("@"):
            # Its link vanished: the endpoint entry, keyed by the dead link, goes with it.
            self.fake.objects.pop((EndpointEntry.kind, have.dev), None)


class _OnLink(_Stored):
    """Addresses, routes, neighbours and tc programs: they live on a link and die with it."""

    goes_with_link = True

    def add(self, obj: KernelObject) -> None:
        dev = getattr(obj, "dev", "")
        if dev in self.fake.foreign:
            raise KernelError(f"link {dev} is missing or not owned by cellgate instance")
        super().add(obj)


class _Links(_Stored):
    """Host devices and veths: created untagged, then tagged; deleting one drops what is on it."""

    def add(self, obj: KernelObject) -> None:
        assert isinstance(obj, (HostDevice, Veth))
        if obj.name in self.fake.foreign:
            raise KernelError(f"link {obj.name} exists and is not owned by cellgate instance")
        have = self.fake.objects.get(obj.key)
        if have is not None and have not in (obj, replace(obj, tag="")):
            raise KernelError(f"{obj.key} exists")
        if isinstance(obj, Veth) and have is None:
            self.fake.store(replace(obj, tag=""))  # the kernel makes a link in one request, tags it in the next
            failpoints.hit("kernel.veth.created")
        self.fake.store(obj)

    def remove(self, obj: KernelObject) -> None:
        assert isinstance(obj, (HostDevice, Veth))
        self.fake.objects.pop(obj.key, None)
        self.fake.drop_link(obj.name)


class _Tunnels(_Stored):
    """The VXLAN device: one link of ours; the routes into it go when it goes. While it exists,
    encapsulation is on (`FakeKernel.tunnel`, as cg_config.tunnel_ifindex in the kernel)."""

    def add(self, obj: KernelObject) -> None:
        assert isinstance(obj, TunnelDevice)
        if obj.name in self.fake.foreign:
            raise KernelError(f"link {obj.name} exists and is not owned by cellgate instance")
        super().add(obj)
        self.fake.tunnel = obj.name

    def remove(self, obj: KernelObject) -> None:
        assert isinstance(obj, TunnelDevice)
        self.fake.objects.pop(obj.key, None)
        if self.fake.tunnel == obj.name:
            self.fake.tunnel = ""
        self.fake.drop_link(obj.name)


# One in-memory handler per plan kind, as datapath.kernel.executor has one real handler per kind.
HANDLERS: dict[str, type[_Stored]] = {
    HostDevice.kind: _Links,
    Veth.kind: _Links,
    HostAddress.kind: _OnLink,
    Programs.kind: _OnLink,
    Neighbour.kind: _OnLink,
    Route.kind: _OnLink,
    EndpointEntry.kind: _Stored,
    AddressEntry.kind: _AddressEntries,
    IpcacheEntry.kind: _Stored,
    Masquerade.kind: _Stored,
    ProxyRoute.kind: _Stored,
    VipRoute.kind: _Stored,
    LbService.kind: _Stored,
    ServedNetns.kind: _Stored,
    SockPrograms.kind: _Stored,
    NetdevProgram.kind: _Stored,
    TunnelDevice.kind: _Tunnels,
}


class FakeKernel:
    def __init__(self) -> None:
        self.objects: dict[Key, KernelObject] = {}
        self.handlers = {kind: cls(self) for kind, cls in HANDLERS.items()}
        self.foreign: set[str] = set()  # links someone else made: never observed, changed or removed
        self.routes: list[IPNetwork] = []
        self.applied: list[Plan] = []
        self.resets: list[tuple[tuple[Backend, ...], tuple[str, ...]]] = []
        self.pending_netns: set[str] = set()  # sandbox paths that are no network namespace yet
        self.fail: Callable[[KernelObject], bool] | None = None  # make matching adds fail
        self.fail_remove: Callable[[KernelObject], bool] | None = None  # make matching removals fail
        self.policy: dict[PolicyKey, PolicyValue] = {}
        self.fail_policy = False  # make the next policy_update fail
        self.addresses: list[IPAddress] = []
        self.config: tuple[bool, dict[str, float]] = (False, {})
        self.tunnel = ""  # the tunnel device encapsulation uses; "" = off
        self.verdict_counts: dict[tuple[int, int], tuple[int, int]] = {}  # what the datapath counted

    def observe(self, keys: Iterable[Key] | None = None) -> set[KernelObject]:
        if keys is None:
            return set(self.objects.values())
        for key in keys:
            if key[0] not in self.handlers:
                raise KernelError(f"unknown kernel object kind {key[0]!r}")
        return {self.objects[k] for k in keys if k in self.objects}

    def apply(self, plan: Plan) -> None:
        self.applied.append(plan)
        for obj in plan.remove:
            if self.fail_remove is not None and self.fail_remove(obj):
                raise KernelError(f"injected failure removing {obj.key}")
            self.handlers[obj.kind].remove(obj)
        for old, new in plan.change:
            self.handlers[new.kind].change(old, new)
        for obj in plan.add:
            self.handlers[obj.kind].add(obj)

    def store(self, obj: KernelObject) -> None:
        if self.fail is not None and self.fail(obj):
            raise KernelError(f"injected failure adding {obj.key}")
        self.objects[obj.key] = obj

    def drop_link(self, dev: str) -> None:
        """What the kernel does when a link goes: whatever lives on it goes too."""
        for key, obj in list(self.objects.items()):
            if getattr(obj, "dev", None) == dev and self.handlers[key[0]].goes_with_link:
                del self.objects[key]

    def vanish(self, dev: str) -> None:
        """Simulate a link disappearing behind our back (container netns destroyed)."""
        for kind in (HostDevice.kind, Veth.kind):
            self.objects.pop((kind, dev), None)
        self.drop_link(dev)
        for key, obj in list(self.objects.items()):  # map entries now name a dead link index
            if isinstance(obj, (EndpointEntry, AddressEntry)) and obj.dev == dev:
                del self.objects[key]
                self.store(replace(obj, dev=f"@{dev}"))

    def add_foreign_link(self, name: str) -> None:
        """A link with our naming made by someone else (no tag): it is never ours."""
        self.foreign.add(name)

    def host_routes(self) -> list[IPNetwork]:
        return list(self.routes)

    def counters(self) -> dict[int, tuple[int, int]]:
        return {}

    def directed_counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        return dict(self.verdict_counts)

    def map_pressure(self) -> dict[str, float]:
        return {}

    def host_addresses(self) -> list[IPAddress]:
        return list(self.addresses)

    def policy_entries(self) -> dict[PolicyKey, PolicyValue]:
        return dict(self.policy)

    def policy_update(self, upserts: dict[PolicyKey, PolicyValue], deletes: Iterable[PolicyKey]) -> None:
        if self.fail_policy:
            self.fail_policy = False
            raise KernelError("injected policy map failure")
        self.policy.update(upserts)
        for key in deletes:
            self.policy.pop(key, None)

    def ct_entries(self) -> list[tuple[Any, Any]]:
        return []

    def ct_gc(self, now_ns: int) -> int:
        return 0

    def reset_connections(self, backends: Sequence[Backend], netns_paths: Sequence[str]) -> int:
        self.resets.append((tuple(backends), tuple(netns_paths)))
        return 0

    def netns_ready(self, path: str) -> bool:
        return path not in self.pending_netns

    def set_config(self, trace: bool, timeouts: dict[str, float], verdicts: bool = True) -> None:
        self.config = (trace, dict(timeouts))
        self.verdicts = verdicts

    def repin(self, cgroup: str = "") -> list[str]:
        return []  # nothing pinned in memory


class FakeNetns:
    """Namespaces as dicts of interfaces; a path is a namespace once `create` made it one."""

    def __init__(self) -> None:
        self.spaces: dict[str, dict[str, dict[str, Any]]] = {}
        self.fail_attach = False

    def create(self, path: str) -> None:
        self.spaces.setdefault(path, {})

    def check(self, path: str) -> None:
        if path not in self.spaces:
            raise InvalidRequest(f"{path!r} is not a network namespace")

    def interface(self, path: str, ifname: str) -> Any:
        self.check(path)
        return self.spaces[path].get(ifname)

    def attach(self, path: str, peer: str, ifname: str, addresses: Sequence[IPInterface],
               gateways: Sequence[IPAddress]) -> list[IPAddress]:
        self.check(path)
        if self.fail_attach:
            raise KernelError("injected attach failure")
        taken = {g.version for iface in self.spaces[path].values() for g in iface["routed"]}
        routed = [g for g in gateways if g.version not in taken]
        self.spaces[path][ifname] = {"peer": peer, "addresses": tuple(addresses), "gateways": tuple(gateways),
                                     "routed": tuple(routed)}
        return routed

    def detach(self, path: str, ifname: str) -> None:
        if path in self.spaces:
            self.spaces[path].pop(ifname, None)
