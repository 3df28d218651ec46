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
from datapath.plan import HostDevice, IPNetwork, KernelObject, Key, Plan, Veth
from datapath.policymap import PolicyKey, PolicyValue


class FakeKernel:
    def __init__(self) -> None:
        self.objects: dict[Key, KernelObject] = {}
        self.routes: list[IPNetwork] = []
        self.applied: list[Plan] = []
        self.fail: Callable[[KernelObject], bool] | None = None  # make matching adds fail
        self.policy: dict[PolicyKey, PolicyValue] = {}
        self.fail_policy = False  # make the next policy_update fail
        self.addresses: list[IPAddress] = []
        self.config: tuple[bool, dict[str, float]] = (False, {})

    def observe(self, keys: Iterable[Key] | None = None) -> set[KernelObject]:
        if keys is None:
            return set(self.objects.values())
        return {self.objects[k] for k in keys if k in self.objects}

    def apply(self, plan: Plan) -> None:
        self.applied.append(plan)
        for obj in plan.remove:
            self.objects.pop(obj.key, None)
            if isinstance(obj, (Veth, HostDevice)):
                self._drop_dependents(obj.name)
        for _, new in plan.change:
            self._add(new)
        for obj in plan.add:
            have = self.objects.get(obj.key)
            if have is not None and not (isinstance(obj, (Veth, HostDevice)) and have in (obj, replace(obj, tag=""))):
                raise KernelError(f"{obj.key} exists")
            if isinstance(obj, Veth) and have is None:
                self._add(replace(obj, tag=""))  # the kernel makes a link in one request, tags it in the next
                failpoints.hit("kernel.veth.created")
            self._add(obj)

    def _add(self, obj: KernelObject) -> None:
        if self.fail is not None and self.fail(obj):
            raise KernelError(f"injected failure adding {obj.key}")
        self.objects[obj.key] = obj

    def _drop_dependents(self, dev: str) -> None:
        """Deleting a link takes its addresses, routes, neighbours and filters with it."""
        for key, obj in list(self.objects.items()):
            if getattr(obj, "dev", None) == dev and key[0] in ("address", "route", "neighbour", "programs"):
                del self.objects[key]

    def vanish(self, dev: str) -> None:
        """Simulate a link disappearing behind our back (container netns destroyed)."""
        for key, obj in list(self.objects.items()):
            owned_by_dev = getattr(obj, "name", None) == dev or getattr(obj, "dev", None) == dev
            if owned_by_dev and key[0] not in ("endpoint-entry", "address-entry"):
                del self.objects[key]

    def host_routes(self) -> list[IPNetwork]:
        return list(self.routes)

    def counters(self) -> dict[int, tuple[int, int]]:
        return {}

    def ifname(self, ifindex: int) -> str | None:
        return None

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

    def set_config(self, trace: bool, timeouts: dict[str, float], verdicts: bool = True) -> None:
        self.config = (trace, dict(timeouts))
        self.verdicts = verdicts


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
