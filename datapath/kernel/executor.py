"""The real Kernel port: orders a plan and dispatches each object to the handler of its kind.

The handlers (datapath.kernel.links, .maps, .iptables) know how one kind is observed, added,
changed and removed; this module only dispatches, holds the lock, scopes the lookup cache to
one call and turns kernel failures into KernelError. A new kind is a handler in HANDLERS.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from datapath import failpoints
from datapath.errors import KernelError
from datapath.kernel import cgroup, iptables, layout, lb, links, maps, netdev, proxyroute, tunnel
from datapath.kernel.context import Handler, KernelContext, attr
from datapath.kernel.loader import Datapath
from datapath.plan import KINDS, ORDER, IPNetwork, KernelObject, Key, Plan
from datapath.policy.compile import PolicyKey, PolicyValue
from datapath.services import Backend

log = logging.getLogger(__name__)
RANK = {cls: rank for rank, cls in enumerate(ORDER)}

class KernelExecutor:
    """Kernel port for one agent instance."""

    def __init__(self, instance: str, datapath: Datapath | None) -> None:
        self.instance = instance
        self.ctx = KernelContext(instance, datapath)
        self.dp = datapath
        self.iptables = iptables.Iptables(instance)
        self.config = maps.Config(self.ctx)
        made: list[Handler] = [cls(self.ctx) for cls in (*links.HANDLERS, *maps.HANDLERS, *lb.HANDLERS,
                                                             *cgroup.HANDLERS, *netdev.HANDLERS)]
        made.append(iptables._Masquerades(self.iptables))
        made.append(tunnel.TunnelDevices(self.ctx, self.config))
        made.append(proxyroute.ProxyRoutes(instance))
        self.handlers: dict[str, Handler] = {h.kind: h for h in made}
        missing = set(KINDS) - set(self.handlers)
        assert not missing, f"plan kinds without a kernel handler: {sorted(missing)}"
        self._lock = threading.Lock()
        self.policy = maps.PolicyMap(self.ctx, self.config)
        self.conntrack = maps.Conntrack(self.ctx)

    def close(self) -> None:
        self.ctx.close()

    def _handler(self, kind: str) -> Handler:
        try:
            return self.handlers[kind]
        except KeyError:
            raise KernelError(f"unknown kernel object kind {kind!r}") from None

    # -- observe ----------------------------------------------------------------------------

    def observe(self, keys: Iterable[Key] | None = None) -> set[KernelObject]:
        with self._lock:
            self.ctx.begin()
            try:
                found: set[KernelObject] = set()
                if keys is None:
                    for handler in self.handlers.values():
                        found.update(handler.observe_all())
                    return found
                for key in set(keys):
                    obj = self._handler(key[0]).observe(key)
                    if obj is not None:
                        found.add(obj)
                return found
            except NetlinkError as exc:
                raise KernelError(f"netlink: {exc}") from exc
            finally:
                self.ctx.end()

    # -- apply ------------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        with self._lock:
            self.ctx.begin()
            try:
                for obj in plan.remove:
                    self._run("remove", self._remove, obj)
                # Changes and adds together in ORDER, a kind's changes before its adds: a change
                # may need what an add of an earlier kind makes (a route moved onto a new
                # tunnel device when the cluster switches from native routing to VXLAN).
                steps = [(RANK[type(new)], 0, i, old, new) for i, (old, new) in enumerate(plan.change)]
                steps += [(RANK[type(obj)], 1, i, None, obj) for i, obj in enumerate(plan.add)]
                for _rank, _phase, _i, old, new in sorted(steps, key=lambda s: s[:3]):
                    if old is not None:
                        log.debug("change %s -> %s", old, new)
                        self._run("change", self._handler(new.kind).change, old, new)
                    else:
                        log.debug("add %s", new)
                        self._run("add", self._handler(new.kind).add, new)
            finally:
                self.ctx.end()

    def _remove(self, obj: KernelObject) -> None:
        log.debug("remove %s", obj)
        self._handler(obj.kind).remove(obj)

    @staticmethod
    def _run(what: str, fn: Callable[..., None], *objs: KernelObject) -> None:
        try:
            fn(*objs)
        except KernelError:
            raise
        except NetlinkError as exc:
            raise KernelError(f"{what} {objs[-1]}: {exc}") from exc
        except (OSError, KeyError, ValueError, subprocess.CalledProcessError) as exc:
            raise KernelError(f"{what} {objs[-1]}: {exc}") from exc
        failpoints.hit(f"kernel.{what}.{objs[-1].kind}")  # e.g. kernel.add.veth: made, the next kind not yet

    # -- host facts -------------------------------------------------------------------------

    def host_routes(self) -> list[IPNetwork]:
        with self._lock:
            return links.host_routes(self.ctx)

    def host_addresses(self) -> list[Any]:
        """Every address configured in the host's network namespace."""
        with self._lock:
            found = {ipaddress.ip_address(attr(a, "IFA_ADDRESS")) for a in self.ctx.ipr.get_addr()}
        return sorted((a for a in found if not a.is_link_local), key=lambda a: (a.version, int(a)))

    def counters(self) -> dict[int, tuple[int, int]]:
        return self.dp.counters() if self.dp is not None else {}

    def directed_counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        return self.dp.directed_counters() if self.dp is not None else {}

    def map_pressure(self) -> dict[str, float]:
        return self.dp.map_pressure() if self.dp is not None else {}

    # -- maps outside plans -----------------------------------------------------------------

    def policy_entries(self) -> dict[PolicyKey, PolicyValue]:
        return self.policy.entries()

    def policy_update(self, upserts: dict[PolicyKey, PolicyValue], deletes: Iterable[PolicyKey]) -> None:
        self.policy.update(upserts, deletes)

    def policy_revision(self) -> int:
        return self.config.policy_revision()

    def ct_entries(self) -> list[tuple[layout.CgCtKey, layout.CgCtValue]]:
        return self.conntrack.entries()

    def ct_gc(self, now_ns: int) -> int:
        return self.conntrack.gc(now_ns)

    def reset_connections(self, backends: Sequence[Backend], netns_paths: Sequence[str]) -> int:
        return lb.reset_connections(backends, netns_paths)

    def netns_ready(self, path: str) -> bool:
        from datapath.kernel.netns import netns_ready

        return netns_ready(path)

    def set_config(self, trace: bool, timeouts: dict[str, float], verdicts: bool = True) -> None:
        self.config.set(trace, timeouts, verdicts)

    def repin(self, cgroup: str = "") -> list[str]:
        """Pin again what was unpinned behind our back (datapath.kernel.repin); what was pinned."""
        if self.dp is None:
            return []
        from datapath.kernel import repin

        with self._lock:
            return repin.repin(self.dp, bool(cgroup))
