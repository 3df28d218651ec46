"""The ports the agent drives the datapath through; datapath.kernel and datapath.fake implement them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from datapath.plan import IPNetwork, KernelObject, Key, Plan


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

    def ifname(self, ifindex: int) -> str | None: ...


class EventSource(Protocol):
    """Datapath events, decoded; `poll` calls `sink` for each and returns after `timeout` ms."""

    def poll(self, sink: Callable[[dict[str, Any]], None], timeout_ms: int) -> None: ...
