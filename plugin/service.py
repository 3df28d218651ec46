"""Use cases of the agent: networks, endpoints, restore and reconciliation.

Edges (Docker, REST, CLI) call these with parsed values; this module decides what the
kernel should hold (datapath.plan), persists first, then applies through the Kernel
port. It never calls Docker or any other runtime.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from datapath import identity as ids
from datapath import naming, plan
from datapath.errors import CellgateError, Conflict, InvalidRequest, KernelError, NotFound
from datapath.identity import Identities
from datapath.labels import Label, LabelSet, from_runtime
from datapath.model import Endpoint, IPAddress, IPInterface, Network
from datapath.plan import KernelObject, Settings
from datapath.policy import Repository, Rule
from datapath.ports import Kernel
from datapath.trace import Party, TraceResult, parse_dport
from ipam.allocator import CheckReport, Ipam, PoolRequest
from ipam.pool import Address, Allocation, Pool, check_routable, host_address_problem
from ipam.store import DocumentStore, MemoryStore
from plugin.policy import PolicyState

log = logging.getLogger(__name__)

HYPOTHETICAL = 0x7FFF0000  # identity of labels no endpoint has yet, for traces only


@dataclass(frozen=True)
class JoinInfo:
    interface: str  # name of the container-side veth in the host namespace
    gateway4: ipaddress.IPv4Address | None
    gateway6: ipaddress.IPv6Address | None


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
    changes: int = 0
    seconds: float = 0.0


class Agent:
    """Everything the agent does, behind one lock."""

    def __init__(
        self,
        networks: DocumentStore,
        endpoints: DocumentStore,
        ipam: Ipam,
        kernel: Kernel,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        policy: PolicyState | None = None,
    ) -> None:
        self._net_store = networks
        self._ep_store = endpoints
        self.ipam = ipam
        self.kernel = kernel
        self.settings = settings
        self._clock = clock
        self._lock = threading.RLock()
        self.networks: dict[str, Network] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.host_addresses: list[IPAddress] = []
        self.policy = policy or PolicyState(Identities(MemoryStore()), Repository(), kernel)
        self.timeouts: dict[str, float] = {}  # conntrack timeouts in seconds; empty = datapath defaults
        self._trace = False  # trace events of forwarded packets (while a trace monitor runs)
        self._verdicts = False  # events of allowed new flows (while a verdict monitor runs)
        self.started = clock()
        # Reconciliation with the runtimes: how old state must be before a runtime's silence
        # about it means it is gone (Docker retries a lost call for 30 s), and where Docker's
        # view comes from (the composition root wires the Docker watcher in; None: not judged).
        self.reconcile_grace = 60.0
        self.runtime_view: Callable[[], RuntimeView] | None = None
        for _, doc in networks.load():
            try:
                net = Network.from_doc(doc)
                self.networks[net.id] = net
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable network document: %s", exc)
        for _, doc in endpoints.load():
            try:
                ep = Endpoint.from_doc(doc)
                self.endpoints[ep.id] = ep
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable endpoint document: %s", exc)

    # -- kernel helpers ---------------------------------------------------------------------

    def _desired(self, scope: set[plan.Key] | None = None) -> set[KernelObject]:
        return plan.desired_state(self.networks.values(), self.endpoints.values(), self.settings,
                                  self.host_addresses, scope)

    def _converge(self, scope: Iterable[plan.Key]) -> None:
        """Make the kernel match the desired state for the keys in `scope`."""
        scope = set(scope)
        desired = {o for o in self._desired(scope) if o.key in scope}
        actual = self.kernel.observe(scope)
        change = plan.diff(desired, actual, scope)
        if change:
            self.kernel.apply(change)

    # -- networks ---------------------------------------------------------------------------

    def create_network(self, network_id: str, gateways: Sequence[IPInterface], name: str = "") -> Network:
        if not gateways:
            raise InvalidRequest("a network needs at least one subnet with a gateway")
        for gw in gateways:  # whoever allocated them (our IPAM or another driver)
            check_routable(gw.network)
            problem = host_address_problem(gw.ip, gw.network)
            if problem:
                raise InvalidRequest(f"gateway {gw} {problem}")
        with self._lock:
            net = Network(network_id, tuple(gateways), self._clock(), name)
            existing = self.networks.get(network_id)
            if existing is not None:
                if existing.gateways != net.gateways:
                    raise Conflict(f"network {network_id[:12]} exists with other subnets")
                return existing
            for other in self.networks.values():
                for gw in gateways:
                    for ogw in other.gateways:
                        if gw.version == ogw.version and gw.network.overlaps(ogw.network):  # type: ignore[arg-type]
                            raise Conflict(f"subnet {gw.network} overlaps network {other.id[:12]} ({ogw.network})")
            self.ipam.bind_network(network_id, [g.network for g in gateways])
            try:
                self._net_store.put(net.id, net.to_doc())
            except CellgateError:
                self.ipam.unbind_network(network_id)
                raise
            self.networks[net.id] = net
            try:
                self._converge(plan.keys(plan.network_objects(net, self.settings)))
            except CellgateError:
                del self.networks[net.id]
                self._net_store.delete(net.id)
                self.ipam.unbind_network(net.id)
                self._converge(plan.keys(plan.network_objects(net, self.settings)))
                raise
            log.info("network %s created (%s)", network_id[:12], ", ".join(str(g.network) for g in gateways))
            return net

    def delete_network(self, network_id: str) -> None:
        with self._lock:
            net = self.networks.get(network_id)
            if net is None:
                return
            for ep in [e for e in self.endpoints.values() if e.network_id == network_id]:
                log.warning("network %s deleted with endpoint %s still present; removing it",
                            network_id[:12], ep.id[:12])
                self._remove_endpoint(ep)
            del self.networks[network_id]
            self._converge(plan.keys(plan.network_objects(net, self.settings)))
            self._net_store.delete(network_id)
            self.ipam.unbind_network(network_id)
            log.info("network %s deleted", network_id[:12])

    def drop_network(self, network_id: str) -> list[str]:
        """Remove a network for good with the pools it was given (no ReleasePool will come:
        a CNI network, or one Docker forgot); returns the pools removed."""
        with self._lock:
            pools = [p.id for p in self.ipam.pools() if p.network_id == network_id]
            self.delete_network(network_id)
            for pid in pools:
                self.ipam.remove_pool(pid)
            return pools

    def network(self, network_id: str) -> Network:
        net = self.networks.get(network_id)
        if net is None:
            raise NotFound(f"unknown network {network_id[:12]}")
        return net

    # -- endpoints --------------------------------------------------------------------------

    def create_endpoint(
        self,
        network_id: str,
        endpoint_id: str,
        ipv4: ipaddress.IPv4Interface | None,
        ipv6: ipaddress.IPv6Interface | None,
        mac: str = "",
        origin: str = "docker",
        labels: dict[str, str] | None = None,
        label_source: str = "container",
        attachment: tuple[str, str] = ("", ""),
        sandbox: str = "",
    ) -> Endpoint:
        """Create (or return the identical existing) endpoint with its veth and datapath state.

        `attachment` (CNI container ID and interface) and `sandbox` are known up front on the
        CNI path, so the endpoint is written once, complete.
        """
        if ipv4 is None and ipv6 is None:
            raise InvalidRequest("an endpoint needs an IPv4 or IPv6 address")
        with self._lock:
            net = self.network(network_id)
            gw4 = gw6 = None
            for addr in (ipv4, ipv6):
                if addr is None:
                    continue
                gw = net.gateway_for(addr)
                if gw is None:
                    raise InvalidRequest(f"address {addr} is not in a subnet of network {network_id[:12]}")
                if addr.network != gw.network:
                    raise InvalidRequest(f"endpoint address {addr} has prefix length /{addr.network.prefixlen}, "
                                         f"but network {network_id[:12]} is {gw.network}")
                problem = host_address_problem(addr.ip, gw.network)
                if problem:
                    raise InvalidRequest(f"endpoint address {addr} {problem}")
                if gw.ip == addr.ip:
                    raise Conflict(f"address {addr.ip} is the gateway of network {network_id[:12]}")
                if addr.version == 4:
                    gw4 = gw.ip
                else:
                    gw6 = gw.ip
            ep = Endpoint(
                id=endpoint_id,
                network_id=network_id,
                host_ifname=naming.host_ifname(endpoint_id),
                peer_ifname=naming.peer_ifname(endpoint_id),
                mac=(mac or naming.container_mac(endpoint_id)).lower(),
                host_mac=naming.host_mac(endpoint_id),
                ipv4=ipv4,
                ipv6=ipv6,
                gateway4=gw4,  # type: ignore[arg-type]
                gateway6=gw6,  # type: ignore[arg-type]
                created=self._clock(),
                origin=origin,
                container_id=attachment[0],
                ifname=attachment[1],
                sandbox=sandbox,
            )
            existing = self.endpoints.get(endpoint_id)
            if existing is not None:
                same = replace(ep, sandbox="", labels=existing.labels, identity=existing.identity,
                               labels_known=existing.labels_known, created=existing.created,
                               container_id=existing.container_id, ifname=existing.ifname)
                if replace(existing, sandbox="") != same:
                    raise Conflict(f"endpoint {endpoint_id[:12]} exists with other settings")
                self._converge(plan.keys(plan.endpoint_objects(existing, self.settings)))
                return existing
            for other in self.endpoints.values():
                if other.host_ifname == ep.host_ifname:
                    raise Conflict(f"endpoint {endpoint_id[:12]} clashes with {other.id[:12]} on {ep.host_ifname}")
                clash = {a.ip for a in other.addresses} & {a.ip for a in ep.addresses}
                if clash:
                    raise Conflict(f"address {clash.pop()} is in use by endpoint {other.id[:12]}")
            for addr in ep.addresses:
                # An address the ledger does not hold (Docker released it meanwhile, or a direct
                # caller) is reserved now: an address a live endpoint uses is never handed out.
                self.ipam.ensure_allocated(addr.ip, endpoint_id)
                self.ipam.bind_endpoint(addr.ip, endpoint_id)
            if labels is not None:
                ep = self._with_identity(ep, labels, label_source)
            try:
                self._ep_store.put(ep.id, ep.to_doc())
            except CellgateError:
                if self.policy.identities.release(ep.id):
                    self.policy.sync(self.endpoints.values())
                raise
            self.endpoints[ep.id] = ep
            try:
                self._converge(plan.keys(plan.endpoint_objects(ep, self.settings)))
            except CellgateError:
                self._remove_endpoint(ep)
                raise
            log.info("endpoint %s created on %s (%s)", endpoint_id[:12], ep.host_ifname,
                     ", ".join(str(a) for a in ep.addresses))
            return ep

    def join(self, network_id: str, endpoint_id: str, sandbox: str) -> JoinInfo:
        with self._lock:
            ep = self.endpoint(endpoint_id)
            if ep.network_id != network_id:
                raise InvalidRequest(f"endpoint {endpoint_id[:12]} is not on network {network_id[:12]}")
            if ep.sandbox != sandbox:
                ep = self._update(replace(ep, sandbox=sandbox))
                log.info("endpoint %s joined %s", endpoint_id[:12], sandbox)
            return JoinInfo(ep.peer_ifname, ep.gateway4, ep.gateway6)

    def leave(self, network_id: str, endpoint_id: str) -> None:
        with self._lock:
            ep = self.endpoints.get(endpoint_id)
            if ep is None or not ep.sandbox:
                return
            self._update(replace(ep, sandbox=""))
            log.info("endpoint %s left its sandbox", endpoint_id[:12])

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        with self._lock:
            ep = self.endpoints.get(endpoint_id)
            if ep is None:
                return
            self._remove_endpoint(ep)
            log.info("endpoint %s deleted", endpoint_id[:12])

    def _with_identity(self, ep: Endpoint, raw: dict[str, str], source: str) -> Endpoint:
        """The endpoint with its labels and identity, whose policy is already in force."""
        labels = from_runtime(raw, source)
        number = self.policy.identities.acquire(labels, ep.id)
        # The new identity's policy (as subject and as peer) goes in before anything uses it.
        self.policy.sync(self.endpoints.values(), extra={number: labels}, delete=False)
        return replace(ep, labels=tuple(sorted(str(x) for x in labels)), identity=number, labels_known=True)

    def set_labels(self, endpoint_id: str, labels: dict[str, str], source: str = "container") -> Endpoint:
        """Labels learned from the runtime: give the endpoint its identity (fail-closed until now)."""
        with self._lock:
            ep = self.endpoint(endpoint_id)
            rendered = tuple(sorted(str(x) for x in from_runtime(labels, source)))
            if ep.labels_known and ep.labels == rendered:
                return ep
            old = ep.identity
            try:
                ep = self._update(self._with_identity(ep, labels, source))
            except CellgateError:
                self._drop_new_identity(ep.id, from_runtime(labels, source), old)
                raise
            if old not in (ep.identity, ids.INIT):
                self.policy.identities.release_one(ep.id, old)
            self.policy.sync(self.endpoints.values())
            log.info("endpoint %s has identity %d (%s)", ep.id[:12], ep.identity, ", ".join(ep.labels) or "no labels")
            return ep

    def check_endpoint(self, ep: Endpoint) -> list[str]:
        """What is missing or wrong in the kernel for an endpoint (empty when all is well)."""
        with self._lock:
            want = plan.endpoint_objects(ep, self.settings)
            have = self.kernel.observe(plan.keys(want))
            change = plan.diff(want, have)
            return [f"missing {o.key[0]} {o.key[-1]}" for o in change.add] + \
                   [f"wrong {new.key[0]} {new.key[-1]}" for _, new in change.change]

    def _drop_new_identity(self, owner: str, labels: LabelSet, old: int) -> None:
        """Undo the hold a failed set_labels took (the endpoint keeps `old`), and its entries."""
        number = self.policy.identities.number_of(labels)
        if number is None or number == old or not self.policy.identities.release_one(owner, number):
            return
        try:
            self.policy.sync(self.endpoints.values())
        except CellgateError as exc:
            log.error("cannot remove the policy of identity %d: %s", number, exc)

    def endpoint(self, endpoint_id: str) -> Endpoint:
        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            raise NotFound(f"unknown endpoint {endpoint_id[:12]}")
        return ep

    def find_endpoint(self, prefix: str) -> Endpoint:
        """An endpoint by ID, ID prefix, host interface name or address."""
        with self._lock:
            if prefix in self.endpoints:
                return self.endpoints[prefix]
            matches = [
                e for e in self.endpoints.values()
                if e.id.startswith(prefix) or e.host_ifname == prefix or prefix in {str(a.ip) for a in e.addresses}
            ]
        if not matches:
            raise NotFound(f"no endpoint matches {prefix!r}")
        if len(matches) > 1:
            raise InvalidRequest(f"{prefix!r} matches {len(matches)} endpoints; give more of the ID")
        return matches[0]

    def _update(self, ep: Endpoint) -> Endpoint:
        """Persist a changed endpoint and apply only the kernel objects that differ."""
        old = self.endpoints[ep.id]
        before = plan.endpoint_objects(old, self.settings)
        after = plan.endpoint_objects(ep, self.settings)
        self._ep_store.put(ep.id, ep.to_doc())
        self.endpoints[ep.id] = ep
        try:
            self._converge(plan.keys(before ^ after))
        except CellgateError:
            self._ep_store.put(old.id, old.to_doc())
            self.endpoints[old.id] = old
            raise
        return ep

    def _remove_endpoint(self, ep: Endpoint) -> None:
        """Tear down the kernel side first, then forget the endpoint."""
        scope = plan.keys(plan.endpoint_objects(ep, self.settings))
        self.endpoints.pop(ep.id, None)
        try:
            self._converge(scope)
        except KernelError:
            self.endpoints[ep.id] = ep
            raise
        self._ep_store.delete(ep.id)
        if self.policy.identities.release(ep.id):
            self.policy.sync(self.endpoints.values())

    # -- IPAM -------------------------------------------------------------------------------

    def request_pool(self, req: PoolRequest) -> Pool:
        avoid = [] if req.pool is not None else self._foreign_routes()
        return self.ipam.request_pool(req, avoid)

    def _foreign_routes(self) -> list[Any]:
        mine = {g.network for n in self.networks.values() for g in n.gateways}
        return [r for r in self.kernel.host_routes() if r not in mine]

    def request_address(
        self, pool_id: str, address: Address | None, options: dict[str, str]
    ) -> tuple[Pool, Allocation]:
        return self.ipam.request_address(pool_id, address, options)

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
            return self.ipam.check(live, grace=grace, release=release), stale

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
        del self.endpoints[ep.id]
        self._ep_store.delete(ep.id)
        self.policy.identities.release(ep.id)
        freed = self.ipam.release_owner(ep.id)
        report.removed_endpoints.append(ep.id)
        report.released.extend(str(a) for a in freed)
        log.warning("endpoint %s is gone (its interface %s disappeared); released %s", ep.id[:12],
                    ep.host_ifname, ", ".join(str(a) for a in freed) or "nothing")

    def sweep(self) -> RestoreReport:
        """Periodic check: endpoints whose container vanished without telling us."""
        report = RestoreReport()
        with self._lock:
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
                            if not alloc.owner and alloc.address not in used and not young(alloc.created):
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
                if found is None or found[0].id != pid or found[1].owner or held:
                    continue  # claimed meanwhile
                self.ipam.release_address(pid, address)
                log.warning("address %s of %s released: %s", address, pid, reason)
        report.removed = True

    # -- policy -----------------------------------------------------------------------------

    def policy_import(self, rules: list[Rule]) -> int:
        with self._lock:
            return self.policy.import_rules(rules, list(self.endpoints.values()))

    def policy_delete(self, labels: list[Label] | None) -> tuple[int, int]:
        with self._lock:
            return self.policy.delete_rules(labels, list(self.endpoints.values()))

    def party(self, kind: str, value: str) -> Party:
        """A side of a trace: an endpoint (ID prefix, interface, address), an identity, or labels."""
        with self._lock:
            if kind == "endpoint":
                ep = self.find_endpoint(value)
                return Party(ep.identity, self._labels_for(ep.identity) or ep.label_set, True)
            if kind == "identity":
                try:
                    number = int(value)
                except ValueError:
                    raise InvalidRequest(f"identity must be a number, got {value!r}") from None
                labels = self.policy.identities.labels_of(number)
                if labels is None:
                    raise NotFound(f"unknown identity {number}")
                return Party(number, labels, self._is_local(number))
            if kind == "labels":
                try:
                    labels = frozenset(Label.parse(t.strip(), "container") for t in value.split(",") if t.strip())
                except ValueError as exc:
                    raise InvalidRequest(str(exc)) from None
                if not labels:
                    raise InvalidRequest("give at least one label, e.g. app=frontend")
                number = self.policy.identities.number_of(labels)
                if number is None:
                    return Party(HYPOTHETICAL, labels, True)  # as an endpoint with these labels would be
                return Party(number, labels, number >= ids.FIRST_ALLOCATED or self._is_local(number))
            raise InvalidRequest(f"unknown trace party kind {kind!r}")

    def _labels_for(self, number: int) -> LabelSet | None:
        return self.policy.identities.labels_of(number)

    def _is_local(self, number: int) -> bool:
        return any(e.identity == number for e in self.endpoints.values())

    def trace(self, src: Party, dst: Party, dport: str) -> TraceResult:
        try:
            proto, port = parse_dport(dport) if dport else (6, 0)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        with self._lock:
            if src.identity == dst.identity == HYPOTHETICAL:
                dst = Party(HYPOTHETICAL + 1, dst.labels, dst.local)
            return self.policy.trace(src, dst, proto, port)

    def set_trace(self, on: bool) -> None:
        with self._lock:
            self._trace = on
            self.kernel.set_config(on, self.timeouts, self._verdicts)

    def set_verdicts(self, on: bool) -> None:
        """Events for allowed new flows: only while a monitor listens for them (each costs a decode)."""
        with self._lock:
            self._verdicts = on
            self.kernel.set_config(self._trace, self.timeouts, on)

    # -- views ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "instance": self.settings.instance,
                "uptime": round(self._clock() - self.started, 3),
                "networks": len(self.networks),
                "endpoints": len(self.endpoints),
                "datapath": self.settings.program_revision,
                "ranges": {"ipv4": str(self.ipam.ranges.ipv4), "ipv6": str(self.ipam.ranges.ipv6)},
                "masquerade": self.settings.masquerade,
                "policy": {
                    "enforcement": self.policy.mode,
                    "revision": self.policy.repository.revision,
                    "realized": self.policy.realized_revision,
                    "rules": len(self.policy.repository.rules),
                    "entries": len(self.policy.applied),
                    "identities": len(self.policy.identities.allocated()),
                },
            }
