"""The ports the agent drives the datapath through; datapath.kernel and datapath.fake implement them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from datapath.model import IPAddress, IPInterface
from datapath.plan import IPNetwork, KernelObject, Key, Plan
from datapath.policy.compile import PolicyKey, PolicyValue
from datapath.services import Backend


class Kernel(Protocol):
    """Observe and change the kernel objects cellgate owns."""

    def observe(self, keys: Iterable[Key] | None = None) -> set[KernelObject]:
        """The owned objects with these keys as they are now (None: every owned object)."""
        ...

    def apply(self, plan: Plan) -> None:
        """Carry out a plan; raise KernelError on the first failure."""
        ...

    def host_routes(self) -> list[IPNetwork]:
        """Destinations the host routes today (new pools must not overlap them)."""
        ...

    def counters(self) -> dict[int, tuple[int, int]]:
        """Packets and bytes per verdict code, summed over CPUs."""
        ...

    def map_pressure(self) -> dict[str, float]:
        """Map name -> how full it is (0..1), for the maps that can fill up."""
        ...

    def directed_counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Likewise per (verdict code, direction): 0 from the endpoint (egress), 1 towards it (ingress)."""
        ...

    def host_addresses(self) -> list[IPAddress]:
        """Addresses configured on the host (they carry the host identity)."""
        ...

    def policy_entries(self) -> dict[PolicyKey, PolicyValue]:
        """The policy map as it is now."""
        ...

    def policy_update(self, upserts: dict[PolicyKey, PolicyValue], deletes: Iterable[PolicyKey]) -> None:
        """Write `upserts`, then remove `deletes`."""
        ...

    def ct_entries(self) -> list[tuple[Any, Any]]:
        """Conntrack entries as (key, value) mirrors of struct cg_ct_key / cg_ct_value."""
        ...

    def reset_connections(self, backends: Sequence[Backend], netns_paths: Sequence[str]) -> int:
        """Reset the TCP connections to `backends` (gone from their services) of the sockets in
        this network namespace and in `netns_paths`; how many were reset."""
        ...

    def netns_ready(self, path: str) -> bool:
        """Whether `path` is a network namespace (a Docker sandbox key becomes one after Join)."""
        ...

    def ct_gc(self, now_ns: int) -> int:
        """Remove conntrack entries that expired before `now_ns` (monotonic clock)."""
        ...

    def set_config(self, trace: bool, timeouts: dict[str, float], verdicts: bool = True) -> None:
        """Runtime switches of the datapath: trace events, events of allowed new flows, and
        conntrack timeouts (seconds)."""
        ...

    def repin(self, cgroup: str = "") -> list[str]:
        """Pin again the maps and programs whose pins vanished while they run (with `cgroup`, the
        socket programs too); what was pinned."""
        ...


class EventSource(Protocol):
    """Datapath events, decoded; `poll` calls `sink` for each and returns after `timeout` ms."""

    def poll(self, sink: Callable[[dict[str, Any]], None], timeout_ms: int) -> None: ...


class Netns(Protocol):
    """Inside a container's network namespace (the CNI path)."""

    def check(self, path: str) -> None:
        """InvalidRequest unless `path` is a network namespace."""
        ...

    def interface(self, path: str, ifname: str) -> Any:
        """The interface's state (mac, addresses, up) or None."""
        ...

    def attach(self, path: str, peer: str, ifname: str, addresses: Sequence[IPInterface],
               gateways: Sequence[IPAddress]) -> list[IPAddress]:
        """Move `peer` into the namespace as `ifname` with its addresses and default routes;
        returns the gateways a default route was installed for."""
        ...

    def detach(self, path: str, ifname: str) -> None:
        """Remove `ifname` from the namespace, if both still exist."""
        ...
