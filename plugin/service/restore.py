"""Use cases of restart and reconciliation: restore, sweep, what the runtimes forgot, IPAM.

After a start the kernel is brought in line with persisted state; periodically (and when
Docker is followed) state no runtime can use any more is found (`stale`) and removed
(`reconcile`). Decides in pure code, acts through the Agent's own methods.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from datapath import identity as ids
from datapath import plan
from datapath.errors import CellgateError, Conflict, StateError
from datapath.model import Endpoint, IPAddress
from ipam.allocator import CheckReport, PoolRequest
from ipam.pool import KIND_ENDPOINT, Address, Allocation, Pool
from plugin.service.endpoints import AgentBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeView:
    """One snapshot of what Docker holds, which reconciliation judges our state against.

    `taken` is our clock when the query was sent: anything we created after
    `taken - grace` may be a call in flight that Docker has not recorded yet.
    """

    taken: float
    networks: frozenset[str]  # IDs of Docker networks whose driver is this agent
    endpoints: frozenset[str]  # endpoint IDs of every container, in any state
    addresses: frozenset[IPAddress]  # addresses every container holds, on any network
    ipam_subnets: frozenset[Any]  # subnets of Docker networks whose IPAM driver is this agent


@dataclass
class StaleReport:
    """State that nothing can use any more: what Docker (or a CNI runtime) forgot while we
    were away, and addresses no request can still claim."""

    docker: str = "not asked"  # "reachable", "unreachable: …": Docker state is judged only when reachable
    networks: list[tuple[str, str]] = field(default_factory=list)  # (network ID, reason)
    endpoints: list[tuple[str, str]] = field(default_factory=list)  # (endpoint ID, reason)
    pools: list[tuple[str, str]] = field(default_factory=list)  # (pool ID, reason)
    addresses: list[tuple[str, Any, str]] = field(default_factory=list)  # (pool ID, address, reason)
    removed: bool = False
    recheck_at: float | None = None  # when a young suspect becomes old enough to judge

    @property
    def empty(self) -> bool:
        return not (self.networks or self.endpoints or self.pools or self.addresses)


@dataclass
class RestoreReport:
    endpoints: int = 0
    networks: int = 0
    removed_endpoints: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # addresses of removed Docker endpoints their containers hold
    changes: int = 0
    seconds: float = 0.0


class AgentRestore(AgentBase):
    """IPAM, restore and reconciliation use cases of the Agent."""

    # -- IPAM -------------------------------------------------------------------------------

    def request_pool(self, req: PoolRequest) -> Pool:
        avoid = [] if req.pool is not None else self._foreign_routes()
        return self.ipam.request_pool(req, avoid)

    def _foreign_routes(self) -> list[Any]:
        mine = {g.network for n in self.networks.values() for g in n.gateways}
        return [r for r in self.kernel.host_routes() if r not in mine]

    def request_address(
        self, pool_id: str, address: Address | None, kind: str = KIND_ENDPOINT, mac: str = ""
    ) -> tuple[Pool, Allocation]:
        return self.ipam.request_address(pool_id, address, kind, mac)

    def release_pool(self, pool_id: str) -> None:
        self.ipam.release_pool(pool_id)

    def release_address(self, pool_id: str, address: Address) -> None:
        """Docker's ReleaseAddress. Docker releases an address only when it is done with it, so
        an endpoint still holding it is one whose DeleteEndpoint never came (the agent died in
        CreateEndpoint and Docker's retry arrived with an empty body, or the agent was down):
        that endpoint goes first, with everything it holds, and the address is free for good."""
        with self._lock:
            holder = next((e for e in self.endpoints.values() if any(a.ip == address for a in e.addresses)), None)
            if holder is not None:
                if holder.origin != "docker":
                    raise Conflict(f"address {address} belongs to CNI attachment "
                                   f"{holder.container_id[:12]}/{holder.ifname}, not to Docker")
                log.warning("Docker released %s of endpoint %s (%s), which it never deleted; removing the endpoint",
                            address, holder.id[:12], "joined" if holder.sandbox else "never joined")
                self._remove_endpoint(holder)
                self.ipam.release_owner(holder.id)
            self.ipam.release_address(pool_id, address)

    def ipam_check(self, release: bool = False, grace: float = 60.0) -> tuple[CheckReport, StaleReport]:
        """Allocations against live endpoints, and state the runtimes no longer have; `release`
        removes both (stale CNI attachments included: the operator asked)."""
        view, docker = self._docker_view()
        with self._lock:
            stale = self.stale(view, grace)
            stale.docker = docker
            stale.addresses.clear()  # leaks are the ledger's check's to report and release, below
            if release:
                self._remove_stale(stale)
            live = {e.id: [a.ip for a in e.addresses] for e in self.endpoints.values()}
            held = view.addresses if view is not None else frozenset()  # Docker's containers still have these
            return self.ipam.check(live, grace=grace, release=release, held=held), stale

    # -- restore and reconciliation ---------------------------------------------------------

    def restore(self) -> RestoreReport:
        """Bring the kernel in line with persisted state after a start or a crash.

        Endpoints whose veth vanished while we were away (the container's namespace was
        destroyed) are dropped and their addresses released; everything else is repaired
        in place. Programs are replaced atomically, never detached, so traffic and
        enforcement continue throughout.
        """
        started = time.monotonic()
        report = RestoreReport()
        with self._lock:
            self.host_addresses = self.kernel.host_addresses()
            actual = self.kernel.observe()
            present = {o.key for o in actual}
            for ep in list(self.endpoints.values()):
                if ("veth", ep.host_ifname) not in present:
                    self._forget_dead(ep, report)
            for ep in self.endpoints.values():
                for addr in ep.addresses:
                    try:
                        self.ipam.ensure_allocated(addr.ip, ep.id)
                    except CellgateError as exc:
                        log.error("cannot reserve %s for endpoint %s: %s", addr.ip, ep.id[:12], exc)
            self._restore_identities()
            self.policy.load()
            self.resolve_all_services()  # label-selected backends, and what toServices names
            self.policy.adopt_services(self.services.targets())
            self.policy.sync(self.endpoints.values(), delete=False)  # close before anything opens
            change = plan.diff(self._desired(), actual)
            if change:
                log.info("restore: %d removals, %d changes, %d additions",
                         len(change.remove), len(change.change), len(change.add))
                self.kernel.apply(change)
            self.policy.sync(self.endpoints.values())
            self.policy.realized_revision = self.policy.repository.revision  # the map enforces it now
            report.changes = len(change.remove) + len(change.change) + len(change.add)
            report.endpoints = len(self.endpoints)
            report.networks = len(self.networks)
        report.seconds = time.monotonic() - started
        log.info("restored %d networks and %d endpoints in %.0f ms", report.networks, report.endpoints,
                 report.seconds * 1000)
        return report

    def _restore_identities(self) -> None:
        """Every endpoint holds exactly the identity its labels give, and nothing else is held."""
        holders = {e.id: e.label_set for e in self.endpoints.values() if e.labels_known}
        self.policy.identities.sync_owners(holders)
        for ep in list(self.endpoints.values()):
            number = self.policy.identities.number_of(ep.label_set) if ep.labels_known else ids.INIT
            if number is not None and number != ep.identity:
                log.warning("endpoint %s: identity %d restored as %d", ep.id[:12], ep.identity, number)
                fixed = replace(ep, identity=number)
                self._ep_store.put(fixed.id, fixed.to_doc())
                self.endpoints[fixed.id] = fixed

    def _forget_dead(self, ep: Endpoint, report: RestoreReport) -> None:
        """An endpoint whose veth vanished goes at once (nothing may make its veth again); its
        document, identity and addresses follow, or the sweep does it once the state dir takes writes."""
        del self.endpoints[ep.id]
        report.removed_endpoints.append(ep.id)
        try:
            freed, kept = self._drop_traces(ep, addresses=True)
        except StateError as exc:
            self.leftovers[ep.id] = (ep, True)
            log.error("endpoint %s is gone (its interface %s disappeared); its state goes later: %s", ep.id[:12],
                      ep.host_ifname, exc)
            return
        report.released.extend(str(a) for a in freed)
        report.kept.extend(str(a) for a in kept)
        log.warning("endpoint %s is gone (its interface %s disappeared); released %s%s", ep.id[:12],
                    ep.host_ifname, ", ".join(str(a) for a in freed) or "nothing",
                    f"; kept {', '.join(str(a) for a in kept)} while Docker holds it" if kept else "")

    def _drop_traces(self, ep: Endpoint, addresses: bool) -> tuple[list[Address], list[Address]]:
        """The document and identity hold of a gone endpoint, and with `addresses` its addresses:
        released (CNI), or kept unbound for Docker, which still holds them for the container (its
        ReleaseAddress frees them, or reconciliation once no container has them). (freed, kept)."""
        self._ep_store.delete(ep.id)
        self.policy.identities.release(ep.id)
        if not addresses:
            return [], []
        if ep.origin == "docker":
            return [], self.ipam.unbind_owner(ep.id)
        return self.ipam.release_owner(ep.id), []

    def _finish_leftovers(self) -> bool:
        """Drop what a state dir that refused writes left of removed endpoints; True if any was done."""
        done = False
        for eid, (ep, addresses) in list(self.leftovers.items()):
            if eid in self.endpoints:  # made again meanwhile: nothing of it is left over
                del self.leftovers[eid]
                continue
            try:
                self._drop_traces(ep, addresses)
            except StateError:
                continue
            del self.leftovers[eid]
            done = True
            log.info("endpoint %s: its state is removed now", eid[:12])
        return done

    def sweep(self) -> RestoreReport:
        """Periodic check: endpoints whose container vanished without telling us."""
        report = RestoreReport()
        with self._lock:
            if self.leftovers and self._finish_leftovers():
                self.policy.sync(self.endpoints.values())
            if self.unconverged:
                keys, self.unconverged = self.unconverged, set()
                self._converge_later(keys)
            keys = {("veth", e.host_ifname) for e in self.endpoints.values()}
            present = {o.key for o in self.kernel.observe(keys)}
            for ep in list(self.endpoints.values()):
                if ("veth", ep.host_ifname) not in present:
                    self._forget_dead(ep, report)
                    self._converge(plan.keys(plan.endpoint_objects(ep, self.settings)))
            if report.removed_endpoints:
                self.policy.sync(self.endpoints.values())
            addresses = self.kernel.host_addresses()
            if addresses != self.host_addresses:
                before = plan.keys(plan.host_objects(self.host_addresses))
                self.host_addresses = addresses
                self._converge(before | plan.keys(plan.host_objects(addresses)))
            self.kernel.ct_gc(time.monotonic_ns())
            pinned = self.kernel.repin(self.settings.cgroup)
            if pinned:
                log.warning("pins removed behind our back are pinned again: %s", ", ".join(pinned))
        return report

    # -- reconciliation with the runtimes ---------------------------------------------------

    def _docker_view(self) -> tuple[RuntimeView | None, str]:
        if self.runtime_view is None:
            return None, "not followed"
        try:
            return self.runtime_view(), "reachable"
        except Exception as exc:  # any failure to ask means: judge nothing of Docker's
            return None, f"unreachable ({exc})"

    def stale(self, view: RuntimeView | None, grace: float | None = None, cni: bool = True,
              sandbox_exists: Callable[[str], bool] = os.path.exists) -> StaleReport:
        """What no runtime can use any more; decides only (`reconcile` removes).

        Of Docker's state only what is older than `grace` at the time of the snapshot is
        judged, and nothing at all without a snapshot (Docker unreachable). With `cni`, CNI
        attachments whose network namespace is gone too (runtimes remove those through CNI
        GC, the operator through `ipam check --release`; reconciliation never guesses).
        """
        grace = self.reconcile_grace if grace is None else grace
        report = StaleReport(docker="reachable" if view is not None else "not asked")
        with self._lock:
            gone: set[str] = set()
            if view is not None:
                cutoff = view.taken - grace

                def young(created: float) -> bool:
                    if created <= cutoff:
                        return False
                    due = created + grace
                    report.recheck_at = due if report.recheck_at is None else min(report.recheck_at, due)
                    return True

                for net in self.networks.values():
                    if net.origin == "docker" and net.id not in view.networks and not young(net.created):
                        gone.add(net.id)
                        report.networks.append((net.id, "Docker no longer has this network"))
                for ep in self.endpoints.values():
                    if ep.origin != "docker":
                        continue
                    if ep.network_id in gone:
                        report.endpoints.append((ep.id, "its network is gone from Docker"))
                    elif ep.id not in view.endpoints and not young(ep.created):
                        report.endpoints.append((ep.id, "no Docker container has this endpoint"))
                docker_nets = {n.id for n in self.networks.values() if n.origin == "docker"} - gone
                used = {a.ip for e in self.endpoints.values() for a in e.addresses} | set(view.addresses)
                for pool in self.ipam.pools():
                    if pool.network_id in gone:
                        report.pools.append((pool.id, "its network is gone from Docker"))
                    elif not pool.network_id and pool.subnet not in view.ipam_subnets and not young(pool.created):
                        report.pools.append((pool.id, "no Docker network uses this pool"))
                    elif pool.network_id in docker_nets:
                        for alloc in pool.endpoint_allocations():
                            orphan = not alloc.owner or alloc.owner not in self.endpoints  # no endpoint has it
                            # a kept address had an endpoint: no request for it can be in flight
                            if orphan and alloc.address not in used and (alloc.kept or not young(alloc.created)):
                                report.addresses.append((pool.id, alloc.address,
                                                         "no endpoint and no Docker container holds it"))
            for ep in self.endpoints.values() if cni else ():
                if ep.origin == "cni" and ep.sandbox and not sandbox_exists(ep.sandbox):
                    report.endpoints.append((ep.id, f"its network namespace {ep.sandbox} is gone"))
        return report

    def reconcile(self, view: RuntimeView | None, grace: float | None = None) -> StaleReport:
        """Remove what Docker forgot while we were away (networks, endpoints, pools, addresses
        with everything they hold). Called off the request path; without a view, nothing."""
        if view is None:
            return StaleReport()
        report = self.stale(view, grace, cni=False)
        if not report.empty:
            self._remove_stale(report)
        return report

    def _remove_stale(self, report: StaleReport) -> None:
        """Remove what `report` found, one item per hold of the lock (Docker's calls interleave),
        each checked again first: what changed since the decision is left alone."""
        for eid, reason in report.endpoints:
            with self._lock:
                ep = self.endpoints.get(eid)
                if ep is None:
                    continue
                try:
                    self._remove_endpoint(ep)
                except CellgateError as exc:
                    log.error("cannot remove stale endpoint %s: %s", eid[:12], exc)
                    continue
                freed = self.ipam.release_owner(eid)
                log.warning("endpoint %s removed: %s; released %s", eid[:12], reason,
                            ", ".join(str(a) for a in freed) or "nothing")
        for nid, reason in report.networks:
            with self._lock:
                if nid not in self.networks:
                    continue
                try:
                    self.drop_network(nid)
                except CellgateError as exc:
                    log.error("cannot remove stale network %s: %s", nid[:12], exc)
                    continue
                log.warning("network %s removed: %s", nid[:12], reason)
        for pid, reason in report.pools:
            with self._lock:
                pool = next((p for p in self.ipam.pools() if p.id == pid), None)
                if pool is not None and (not pool.network_id or pool.network_id not in self.networks):
                    self.ipam.remove_pool(pid)
                    log.warning("pool %s removed: %s", pid, reason)
        for pid, address, reason in report.addresses:
            with self._lock:
                found = self.ipam.lookup(address)
                held = any(a.ip == address for e in self.endpoints.values() for a in e.addresses)
                owned = found is not None and found[1].owner in self.endpoints
                if found is None or found[0].id != pid or owned or held:
                    continue  # claimed meanwhile
                self.ipam.release_address(pid, address)
                log.warning("address %s of %s released: %s", address, pid, reason)
        report.removed = True

