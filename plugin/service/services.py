"""Use cases of load-balanced services: create, update, delete, list; label-selected backends
kept current as endpoints come and go, here and on the cluster's other nodes.

The specs are the node's own documents (state/services) plus what its peers publish through
the kvstore (plugin.service.cluster); each node numbers the services it balances itself
(reverse-NAT index, persisted) and resolves their selectors against what it knows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from datapath import plan
from datapath import services as svc
from datapath.errors import CellgateError, Conflict, NotFound
from datapath.plan import LbService, VipRoute
from plugin.service.restore import AgentRestore
from plugin.service.service_table import ServiceTable

log = logging.getLogger(__name__)
__all__ = ["AgentServices", "ServiceTable"]


class AgentServices(AgentRestore):
    """The service use cases of the Agent (its lock, its kernel, its endpoints)."""

    # -- requests ---------------------------------------------------------------------------

    def service_create(self, body: Mapping[str, Any]) -> svc.ServiceState:
        spec = svc.parse_request(body)
        with self._lock:
            if self.services.spec(spec.name) is not None:
                raise Conflict(f"service {spec.name} exists; use `service update`")
            self._check_service(spec)
            return self._store_service(replace(spec, node=self._node_name()), None)

    def service_update(self, name: str, body: Mapping[str, Any]) -> svc.ServiceState:
        with self._lock:
            old = self.services.own.get(name)
            if old is None:
                if name in self.services.remote:
                    owner = self.services.remote[name].node
                    raise Conflict(f"service {name} belongs to node {owner}; update it there")
                raise NotFound(f"no service {name}")
            merged = {"name": name, "frontend": body.get("frontend") or str(old.frontend)}
            if body.get("selector") or body.get("backends") is not None:
                merged.update({k: body[k] for k in ("backends", "selector", "target_port") if k in body})
            else:
                merged.update({"backends": [str(b) for b in old.backends],
                               "selector": ",".join(t.removeprefix("any:") for t in old.selector),
                               "target_port": body.get("target_port") or old.target_port})
            spec = replace(svc.parse_request(merged), node=old.node)
            self._check_service(spec, replacing=old)
            return self._store_service(spec, old)

    def service_delete(self, name: str) -> svc.ServiceSpec:
        with self._lock:
            old = self.services.own.get(name)
            if old is None:
                if name in self.services.remote:
                    raise Conflict(f"service {name} belongs to node {self.services.remote[name].node}; "
                                   "delete it there")
                raise NotFound(f"no service {name}")
            before = self.services.objects_for([old.frontend])
            touched = self.services.drop(name)
            self._resolve_services(touched)
            try:
                self._apply_services(touched, before)
            except CellgateError:
                self._resolve_services(self.services.put(old))
                self._undo_kernel(touched)
                raise
            self.services.store.delete(name)
            self.services.forget_numbers(touched)
            log.info("service %s (%s) deleted", name, old.frontend)
            self._services_changed()
            return old

    def service_list(self) -> list[svc.ServiceState]:
        with self._lock:
            return [self.services.state(s) for s in sorted(self.services.active().values(), key=lambda s: s.name)]

    def service_get(self, name: str) -> svc.ServiceState:
        with self._lock:
            spec = self.services.active().get(name)
            if spec is None:
                raise NotFound(f"no service {name}")
            return self.services.state(spec)

    def own_services(self) -> list[svc.ServiceSpec]:
        with self._lock:
            return list(self.services.own.values())

    def set_remote_services(self, specs: Iterable[svc.ServiceSpec]) -> bool:
        """What the peers publish (plugin.service.cluster); True if anything changed."""
        with self._lock:
            new = {}
            for spec in specs:
                try:
                    svc.check_frontend(spec.frontend, self._reserved_ranges(), self.host_addresses)
                except CellgateError as exc:
                    log.warning("ignoring service %s of node %s: %s", spec.name, spec.node, exc)
                    continue
                new[spec.name] = spec
            old = dict(self.services.remote)
            names = {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
            if not names:
                return False
            affected = {s.frontend for n in names for s in (old.get(n), new.get(n)) if s is not None}
            before = self.services.objects_for(affected)
            for name in names:
                if name in new:
                    self.services.put(new[name], remote=True)
                else:
                    self.services.drop(name, remote=True)
            self._resolve_services(affected)
            try:
                self._apply_services(affected, before)
            except CellgateError:
                for name in names:
                    if name in old:
                        self.services.put(old[name], remote=True)
                    else:
                        self.services.drop(name, remote=True)
                self._resolve_services(affected)
                self.services.forget_numbers(affected)
                self._undo_kernel(affected)
                raise
            self.services.forget_numbers(affected)
            self._services_changed()  # toServices follows peers' services too
            return True

    # -- inside -----------------------------------------------------------------------------

    def _node_name(self) -> str:
        return self.cluster_view.local.name if self.cluster_view is not None else self.settings.instance

    def _reserved_ranges(self) -> list[svc.IPNetwork]:
        """Where a VIP may not be: every endpoint range known here."""
        reserved: list[svc.IPNetwork] = list(self.settings.cluster_cidrs)
        reserved += [gw.network for net in self.networks.values() for gw in net.gateways]
        reserved += [self.ipam.ranges.ipv4, self.ipam.ranges.ipv6]
        if self.cluster_view is not None:
            reserved += [r for n in (self.cluster_view.local, *self.cluster_view.peers) for r in n.ranges]
        return reserved

    def _check_service(self, spec: svc.ServiceSpec, replacing: svc.ServiceSpec | None = None) -> None:
        svc.check_frontend(spec.frontend, self._reserved_ranges(), self.host_addresses)
        other = self.services.at(spec.frontend)
        if other is not None and (replacing is None or other.name != replacing.name):
            raise Conflict(f"frontend {spec.frontend} is service {other.name}'s already")
        if replacing is None and len(self.services.active()) >= svc.MAX_SERVICES:
            raise Conflict(f"{svc.MAX_SERVICES} services exist; delete one first")
        total = self.services.total_backends - (len(self.services.backends(replacing)) if replacing else 0)
        if total + len(spec.backends) > svc.MAX_BACKENDS:
            raise Conflict(f"the node balances {total} backends; {len(spec.backends)} more exceed "
                           f"{svc.MAX_BACKENDS}")

    def _store_service(self, spec: svc.ServiceSpec, old: svc.ServiceSpec | None) -> svc.ServiceState:
        affected = {spec.frontend} | ({old.frontend} if old is not None else set())
        before = self.services.objects_for(affected)
        self.services.put(spec)
        self._resolve_services(affected)
        try:
            self._apply_services(affected, before)
        except CellgateError:
            if old is None:
                self.services.drop(spec.name)
            else:
                self.services.put(old)
            self._resolve_services(affected)
            self.services.forget_numbers(affected)  # a number given to a frontend that did not come
            self._undo_kernel(affected)
            raise
        self.services.store.put(spec.name, spec.to_json())
        self.services.forget_numbers(affected)
        log.info("service %s %s: %s -> %s", spec.name, "updated" if old else "created", spec.frontend,
                 ", ".join(map(str, self.services.backends(spec))) or "no backends")
        self._services_changed()
        return self.services.state(spec)

    def _services_changed(self) -> None:
        # toServices follows the services (after the balancer took the change: a new backend is
        # allowed only once it is one); a failed write keeps the old targets, retried next change.
        try:
            self.policy.set_services(self.services.targets(), list(self.endpoints.values()), self._converge)
        except CellgateError as exc:
            log.error("toServices policy not updated after a service change: %s", exc)
        for listener in self.service_listeners:
            try:
                listener()
            except Exception:
                log.exception("service change listener")

    def _candidates(self) -> list[svc.Candidate]:
        out = [svc.Candidate(a.ip, ep.label_set) for ep in self.endpoints.values() if ep.labels_known
               for a in ep.addresses]
        if self.cluster_view is not None:
            labels_of: dict[int, Any] = {}
            for entry in self.cluster_view.entries:
                if entry.prefix.prefixlen != entry.prefix.max_prefixlen:
                    continue
                if entry.identity not in labels_of:
                    labels_of[entry.identity] = self.policy.identity_labels(entry.identity)
                labels = labels_of[entry.identity]
                if labels:
                    out.append(svc.Candidate(entry.prefix.network_address, labels, str(entry.node)))
        return out

    def _resolve_services(self, frontends: Iterable[svc.Frontend]) -> None:
        """Resolve the selectors of the services balanced at these frontends."""
        specs = [s for fe in frontends if (s := self.services.at(fe)) is not None]
        candidates = self._candidates() if any(s.by_labels for s in specs) else []
        for spec in specs:
            self.services.set_resolved(spec.frontend, svc.resolve(spec, candidates))

    def _apply_services(self, frontends: set[svc.Frontend], before: set[plan.KernelObject]) -> None:
        """Converge the objects of these frontends that differ from `before` (nothing else is
        touched), and reset the connections to backends that left their service."""
        after = self.services.objects_for(frontends)
        changed = before ^ after
        if not changed:
            return
        self._converge(plan.keys(changed))
        old_backends = {o.key: set(o.backends) for o in before if isinstance(o, LbService)}
        new_backends = {o.key: set(o.backends) for o in after if isinstance(o, LbService)}
        gone: set[svc.Backend] = set()
        for key, backends in old_backends.items():
            gone |= backends - new_backends.get(key, set())
        gone = {b for b in gone if not self.services.balanced(b)}  # still another service's (or this one's)
        if gone:
            paths = sorted({ep.sandbox for ep in self.endpoints.values() if ep.sandbox})
            self.kernel.reset_connections(sorted(gone, key=svc.Backend.sort_key), paths)

    def _undo_kernel(self, frontends: Iterable[svc.Frontend]) -> None:
        """After a failed write: what the kernel got of it is taken back (best effort: the
        next change or restore converges whatever this cannot)."""
        scope = {k for fe in frontends for k in ((LbService.kind, str(fe)), (VipRoute.kind, str(fe.address)))}
        try:
            self._converge(scope)
        except CellgateError as exc:
            log.warning("cannot take back a failed service change: %s", exc)

    def resolve_all_services(self) -> None:
        """At restore: every label-selected service's backends from the endpoints known now."""
        with self._lock:
            self._resolve_services([s.frontend for s in self.services.active().values() if s.by_labels])

    def refresh_services(self) -> None:
        """Endpoints (or the cluster's) changed: re-resolve the label-selected services."""
        with self._lock:
            selected = {s.frontend for s in self.services.active().values() if s.by_labels}
            if not selected:
                return
            before = self.services.objects_for(selected)
            self._resolve_services(selected)
            self._apply_services(selected, before)
