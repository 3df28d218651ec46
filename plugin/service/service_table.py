"""The services a node balances (ServiceTable): its own specs, its peers', their reverse-NAT
numbers and resolved backends, and their kernel objects. The use cases that change it are in
plugin.service.services; this module imports no use case.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from datapath import naming, plan
from datapath import services as svc
from datapath.errors import CellgateError, Conflict
from datapath.plan import LbService, VipRoute
from datapath.store import DocumentStore, MemoryStore

log = logging.getLogger(__name__)
ID_PREFIX = "_id-"  # documents numbering the frontends this node balances (its reverse-NAT indexes)
PEER_PREFIX = "_peer-"  # the peers' services as last heard: balanced on a restart until the kvstore answers


def _id_key(frontend: svc.Frontend) -> str:
    return f"{ID_PREFIX}{frontend.address.packed.hex()}-{frontend.port}-{frontend.proto}"


class ServiceTable:
    """The services a node balances: its own specs (persisted), its peers' (from the kvstore),
    this node's reverse-NAT index of each frontend (persisted), and the backends each resolved
    to. Every change costs O(the frontends it touches), never O(all services): the winner of a
    frontend (own before remote; then the earlier owner and name) is kept per frontend."""

    def __init__(self, store: DocumentStore | None = None, instance: str = "cellgate") -> None:
        self.store = store or MemoryStore()
        self.instance = instance
        self.metric = naming.vip_metric(instance)
        self.own: dict[str, svc.ServiceSpec] = {}
        self.remote: dict[str, svc.ServiceSpec] = {}
        self.ids: dict[svc.Frontend, int] = {}
        self._used_ids: set[int] = set()
        self._free_hint = 1
        self.resolved: dict[svc.Frontend, tuple[svc.Backend, ...]] = {}
        self._names_at: dict[svc.Frontend, set[str]] = {}  # every spec's name by frontend
        self._winner: dict[svc.Frontend, svc.ServiceSpec] = {}
        self._active: dict[str, svc.ServiceSpec] = {}
        self._targets: dict[str, svc.ServiceTarget] = {}  # what toServices sees of each active one
        self._backend_refs: Counter[svc.Backend] = Counter()  # balanced services per backend
        self._vips: dict[svc.IPAddress, int] = {}  # VIP -> how many balanced frontends use it
        self._total = 0  # backends of every balanced service
        self._changes = 0  # bumped by every change of what is balanced
        self._by_address: tuple[int, dict[tuple[str, int, int], str]] = (-1, {})
        own, peers = {}, {}
        for key, doc in self.store.load():
            try:
                if key.startswith(ID_PREFIX):
                    number = int(doc["id"])
                    self.ids[svc.Frontend.parse(str(doc["frontend"]))] = number
                    self._used_ids.add(number)
                    continue
                spec = svc.ServiceSpec.from_json(doc, f"service {key}")
            except (CellgateError, KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring the stored service document %s: %s", key, exc)
                continue
            (peers if key.startswith(PEER_PREFIX) else own)[spec.name] = spec
        for spec in own.values():
            self.put(spec)
        for spec in peers.values():
            self.put(spec, remote=True, persist=False)

    # -- what is balanced ----------------------------------------------------------------------

    def spec(self, name: str) -> svc.ServiceSpec | None:
        return self.own.get(name) or self.remote.get(name)

    def put(self, spec: svc.ServiceSpec, remote: bool = False, persist: bool = True) -> set[svc.Frontend]:
        """Add or replace a spec (a peer's is kept in the store too); returns the frontends whose
        service may have changed. The caller persists its own specs once the kernel has them."""
        table = self.remote if remote else self.own
        if remote and persist:
            self.store.put(PEER_PREFIX + spec.name, spec.to_json())
        old = table.get(spec.name)
        touched = {spec.frontend}
        shadow = (self.own if remote else self.remote).get(spec.name)
        if shadow is not None:
            touched.add(shadow.frontend)  # an own spec hides a remote one of its name
        if old is not None:
            touched.add(old.frontend)
            self._names_at.get(old.frontend, set()).discard(spec.name)
        table[spec.name] = spec
        self._names_at.setdefault(spec.frontend, set()).add(spec.name)
        if old is not None and old.name in (self.own if remote else self.remote):
            self._names_at[old.frontend].add(old.name)  # the other table still names it there
        self._elect(touched)
        return touched

    def drop(self, name: str, remote: bool = False) -> set[svc.Frontend]:
        table = self.remote if remote else self.own
        old = table.pop(name, None)
        if old is None:
            return set()
        if remote:
            self.store.delete(PEER_PREFIX + name)
        other = (self.own if remote else self.remote).get(name)
        if other is None or other.frontend != old.frontend:
            self._names_at.get(old.frontend, set()).discard(name)
        touched = {old.frontend} | ({other.frontend} if other is not None else set())
        self._elect(touched)
        return touched

    def _elect(self, frontends: Iterable[svc.Frontend]) -> None:
        for fe in frontends:
            candidates = []
            for name in self._names_at.get(fe, set()):
                spec = self.own.get(name) or self.remote.get(name)
                if spec is not None and spec.frontend == fe:
                    candidates.append(spec)
            before = self._winner.pop(fe, None)
            if before is not None:
                if self._active.get(before.name) is before:  # not the same name's new frontend
                    del self._active[before.name]
                    del self._targets[before.name]
                self._count(self.backends(before), -1)
                self._vips[fe.address] -= 1
                if not self._vips[fe.address]:
                    del self._vips[fe.address]
            if not candidates:
                self._names_at.pop(fe, None)
                self.resolved.pop(fe, None)
                continue
            best = min(candidates, key=lambda s: (s.name not in self.own, s.node, s.name))
            self._winner[fe] = best
            self._active[best.name] = best
            self._targets[best.name] = svc.ServiceTarget.of(best)
            self._count(self.backends(best), +1)
            self._vips[fe.address] = self._vips.get(fe.address, 0) + 1

    def active(self) -> dict[str, svc.ServiceSpec]:
        """Every service balanced here, by name."""
        return self._active

    def targets(self) -> tuple[svc.ServiceTarget, ...]:
        """What toServices sees of every active service (kept per change, not rebuilt)."""
        return tuple(self._targets.values())

    def balanced(self, backend: svc.Backend) -> bool:
        """Whether any balanced service has this backend now."""
        return self._backend_refs[backend] > 0

    def _count(self, backends: tuple[svc.Backend, ...], delta: int) -> None:
        self._changes += 1
        self._total += delta * len(backends)
        for b in backends:
            self._backend_refs[b] += delta
            if self._backend_refs[b] <= 0:
                del self._backend_refs[b]

    def names_by_address(self) -> dict[tuple[str, int, int], str]:
        """(address, port, protocol number) of every frontend and backend → its service, for naming
        flows' destinations. Rebuilt on the first call after a change (O(balanced backends)), so
        changes stay O(touched); the caller must not change it."""
        if self._by_address[0] != self._changes:
            index: dict[tuple[str, int, int], str] = {}
            for name in sorted(self._active):
                spec = self._active[name]
                index.setdefault((str(spec.frontend.address), spec.frontend.port, spec.frontend.proto), name)
                for b in self.backends(spec):
                    index.setdefault((str(b.address), b.port, spec.frontend.proto), name)
            self._by_address = (self._changes, index)
        return self._by_address[1]

    def at(self, frontend: svc.Frontend) -> svc.ServiceSpec | None:
        return self._winner.get(frontend)

    def backends(self, spec: svc.ServiceSpec) -> tuple[svc.Backend, ...]:
        return self.resolved.get(spec.frontend, spec.backends)

    def set_resolved(self, frontend: svc.Frontend, backends: tuple[svc.Backend, ...]) -> None:
        winner = self._winner.get(frontend)
        if winner is not None:
            self._count(self.backends(winner), -1)
        self.resolved[frontend] = backends
        if winner is not None:
            self._count(backends, +1)

    @property
    def total_backends(self) -> int:
        return self._total

    # -- numbering -----------------------------------------------------------------------------

    def number(self, frontend: svc.Frontend) -> int:
        if frontend not in self.ids:
            if len(self._used_ids) >= svc.MAX_SERVICES:
                raise Conflict(f"{svc.MAX_SERVICES} services exist; delete one first")
            number = self._free_hint
            while number in self._used_ids:
                number = number % svc.MAX_SERVICES + 1
            self._free_hint = number % svc.MAX_SERVICES + 1
            self.store.put(_id_key(frontend), {"frontend": str(frontend), "id": number})
            self.ids[frontend] = number
            self._used_ids.add(number)
        return self.ids[frontend]

    def forget_numbers(self, frontends: Iterable[svc.Frontend]) -> None:
        for fe in frontends:
            if fe in self.ids and fe not in self._winner:
                self._used_ids.discard(self.ids.pop(fe))
                self.store.delete(_id_key(fe))

    # -- kernel objects ------------------------------------------------------------------------

    def objects_for(self, frontends: Iterable[svc.Frontend], vips: Iterable[svc.IPAddress] = ()) -> set[
            plan.KernelObject]:
        """The kernel objects of these frontends (and of these VIPs' routes) as they should be."""
        out: set[plan.KernelObject] = set()
        addresses = set(vips)
        for fe in frontends:
            addresses.add(fe.address)
            spec = self._winner.get(fe)
            if spec is not None:
                out.add(LbService(fe, self.number(fe), self.backends(spec)))
        out |= {VipRoute(a, self.metric) for a in addresses if self._vips.get(a)}
        return out

    def objects(self, scope: Iterable[plan.Key] | None = None) -> set[plan.KernelObject]:
        """Every service object, or those whose key is in `scope` (looked up by key)."""
        if scope is None:
            return self.objects_for(list(self._winner))
        frontends, vips = [], []
        for key in scope:
            if key[0] == LbService.kind:
                frontends.append(svc.Frontend.parse(key[1]))
            elif key[0] == VipRoute.kind:
                vips.append(ipaddress.ip_address(key[1]))
        return self.objects_for(frontends, vips) if frontends or vips else set()

    def state(self, spec: svc.ServiceSpec) -> svc.ServiceState:
        """The spec as balanced here: with this node's number for it and its resolved backends."""
        return svc.ServiceState(replace(spec, id=self.ids.get(spec.frontend, 0)), self.backends(spec))
