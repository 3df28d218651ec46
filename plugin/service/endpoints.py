"""Use cases of networks and endpoints: the Agent's state, behind one lock.

Edges (Docker, REST, CLI) call these with parsed values; this module decides what the
kernel should hold (datapath.plan), persists first, then applies through the Kernel
port. It never calls Docker or any other runtime, and imports no door (plugin/docker, api, cni).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from datapath import identity as ids
from datapath import naming, plan
from datapath.errors import CellgateError, Conflict, InvalidRequest, KernelError, NotFound, StateError
from datapath.identity import Identities
from datapath.labels import LabelSet, from_runtime
from datapath.model import Endpoint, IPAddress, IPInterface, Network
from datapath.plan import KernelObject, Settings
from datapath.policy import Repository
from datapath.ports import Kernel
from datapath.store import DocumentStore, MemoryStore
from ipam.allocator import Ipam
from ipam.pool import Allocation, check_routable, host_address_problem
from plugin import failpoints
from plugin.service.policy import PolicyState
from plugin.service.service_table import ServiceTable
from plugin.telemetry import Telemetry

if TYPE_CHECKING:
    from datapath.nodes import ClusterView
    from plugin.service.restore import RuntimeView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinInfo:
    interface: str  # name of the container-side veth in the host namespace
    gateway4: ipaddress.IPv4Address | None
    gateway6: ipaddress.IPv6Address | None


class AgentBase:
    """The agent's state (networks, endpoints) and the use cases that change it, behind one lock."""

    def __init__(
        self,
        networks: DocumentStore,
        endpoints: DocumentStore,
        ipam: Ipam,
        kernel: Kernel,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        policy: PolicyState | None = None,
        services: DocumentStore | None = None,
    ) -> None:

        self.telemetry = Telemetry()
        self._net_store = networks
        self._ep_store = endpoints
        self.ipam = ipam
        ipam.in_use = lambda owner: owner in self.endpoints  # the ledger keeps what a live endpoint uses
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
        # Multi-host: what the cluster service last learned (peers, their endpoints), and who
        # wants to hear that local endpoints changed (the cluster service publishes them).
        self.cluster_view: ClusterView | None = None
        self.listeners: list[Callable[[], None]] = []
        self.services = ServiceTable(services, settings.instance)
        self.service_listeners: list[Callable[[], None]] = []  # the cluster service publishes our services
        self.networks.update(_load(networks, Network.from_doc, "network"))
        self.endpoints.update(_load(endpoints, Endpoint.from_doc, "endpoint"))
        # Endpoints gone from memory and the kernel whose document, identity hold or addresses (True:
        # those too) a state dir that refused writes still holds: the sweep drops them once it takes writes.
        self.leftovers: dict[str, tuple[Endpoint, bool]] = {}
        # Where work that may follow a reply runs (plugin.service.later.Later in the agent; None: at
        # once), and the keys such work could not converge, which the sweep tries again.
        self.run_later: Callable[[Callable[[], None]], None] | None = None
        self.unconverged: set[plan.Key] = set()

    # -- kernel helpers ---------------------------------------------------------------------

    def _desired(self, scope: set[plan.Key] | None = None) -> set[KernelObject]:
        objs = self.policy.with_cidr_entries(plan.desired_state(  # + the CIDR identities' ipcache entries
            self.networks.values(), self.endpoints.values(), self.settings, self.host_addresses, scope,
            cluster=self.cluster_view))
        return objs | self.services.objects(scope)

    def _changed(self) -> None:
        """Tell the listeners (outside nothing: they only take note and return), after the
        label-selected services followed the endpoints."""
        try:
            self.refresh_services()
        except CellgateError as exc:
            log.warning("services not updated after an endpoint change: %s", exc)
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not fail an endpoint call
                log.exception("endpoint change listener")

    def _converge(self, scope: Iterable[plan.Key]) -> None:
        """Make the kernel match the desired state for the keys in `scope`."""
        scope = set(scope)
        desired = {o for o in self._desired(scope) if o.key in scope}
        actual = self.kernel.observe(scope)
        change = plan.diff(desired, actual, scope)
        if change:
            self.kernel.apply(change)
            for op, objs in (("upsert", change.add), ("upsert", tuple(new for _, new in change.change)),
                             ("delete", change.remove)):
                n = sum(1 for o in objs if o.kind == "ipcache")
                if n:
                    self.telemetry.count("ipcache_events", n, type=op)

    def _regenerate(self, ep: Endpoint, scope: Iterable[plan.Key]) -> None:
        """Program an endpoint's datapath state (Cilium's endpoint regeneration), counted and timed."""
        started = time.monotonic()
        try:
            self._converge(scope)
        except CellgateError:
            self.telemetry.count("endpoint_regenerations", outcome="fail")
            raise
        self.telemetry.count("endpoint_regenerations", outcome="success")
        self.telemetry.observe("endpoint_regeneration_seconds", time.monotonic() - started, scope="total")

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
            ledger = [(addr.ip, self.ipam.allocation(addr.ip)) for addr in ep.addresses]
            try:
                ep = self._create(ep, labels, label_source)
            except CellgateError:
                if endpoint_id not in self.endpoints:  # else its removal failed: it keeps what it holds
                    self._put_back(ledger)
                raise
            log.info("endpoint %s created on %s (%s)", endpoint_id[:12], ep.host_ifname,
                     ", ".join(str(a) for a in ep.addresses))
            self._changed()
            return ep

    def _put_back(self, ledger: Sequence[tuple[IPAddress, Allocation | None]]) -> None:
        """The ledger's allocations of a failed create's addresses as they were before it."""
        for address, before in ledger:
            try:
                self.ipam.put_back(address, before)
            except CellgateError as exc:  # the create's own error is the one to report
                log.error("address %s is left as the failed create made it: %s", address, exc)

    def _create(self, ep: Endpoint, labels: dict[str, str] | None, label_source: str) -> Endpoint:
        """create_endpoint's steps that change state, in order: addresses, identity, document, kernel."""
        for addr in ep.addresses:
            # An address the ledger does not hold (Docker released it meanwhile, or a direct
            # caller) is reserved now: an address a live endpoint uses is never handed out.
            self.ipam.ensure_allocated(addr.ip, ep.id)
            self.ipam.bind_endpoint(addr.ip, ep.id)
        failpoints.hit("endpoint.create.address_bound")
        self.leftovers.pop(ep.id, None)  # made again: what an earlier one left is this one's now
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
            failpoints.hit("endpoint.create.persisted")
            self._regenerate(ep, plan.keys(plan.endpoint_objects(ep, self.settings)))
            failpoints.hit("endpoint.create.maps_written")
        except CellgateError:
            self._remove_endpoint(ep)
            raise
        return ep

    def _named(self, network_id: str, endpoint_id: str, origin: str, sandbox: str = "") -> Endpoint | None:
        """The endpoint a door's call names, or None when it is gone (deleting what is gone succeeds).
        Refused when the call names it with another network, when it is another door's (`origin`:
        Docker never acts on a CNI attachment, nor CNI on Docker's endpoints), or (Join) when it is
        in another sandbox than `sandbox`: the runtime never does that, and the steps act on the
        endpoint alone."""
        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            return None
        if ep.network_id != network_id:
            raise InvalidRequest(f"endpoint {endpoint_id[:12]} is not on network {network_id[:12]}")
        if ep.origin != origin and ep.origin == "cni":
            raise Conflict(f"endpoint {endpoint_id[:12]} is the CNI attachment {ep.container_id[:12]}/{ep.ifname}, "
                           "not Docker's")
        if ep.origin != origin:
            raise Conflict(f"endpoint {endpoint_id[:12]} is Docker's, not a CNI attachment")
        if sandbox and ep.sandbox and ep.sandbox != sandbox:
            raise Conflict(f"endpoint {endpoint_id[:12]} is joined to {ep.sandbox}: Leave comes first")
        return ep

    def join(self, network_id: str, endpoint_id: str, sandbox: str, origin: str = "docker") -> JoinInfo:
        with self._lock:
            ep = self._named(network_id, endpoint_id, origin, sandbox)
            if ep is None:
                raise NotFound(f"unknown endpoint {endpoint_id[:12]}")
            if ep.sandbox != sandbox:
                ep = self._update(replace(ep, sandbox=sandbox))
                log.info("endpoint %s joined %s", endpoint_id[:12], sandbox)
                if self.settings.cgroup and sandbox and not self.kernel.netns_ready(sandbox):
                    threading.Thread(target=self._serve_when_ready, args=(ep.id, sandbox), daemon=True,
                                     name="netns-wait").start()
            return JoinInfo(ep.peer_ifname, ep.gateway4, ep.gateway6)

    NETNS_WAIT = 60.0  # how long a joined sandbox may take to become a namespace

    def _serve_when_ready(self, endpoint_id: str, sandbox: str) -> None:
        """Docker mounts a sandbox's namespace only after Join (its runtime hook, before the
        container's process runs): the socket balancer serves it as soon as it exists."""
        deadline = time.monotonic() + self.NETNS_WAIT
        while not self.kernel.netns_ready(sandbox):
            if time.monotonic() > deadline:
                log.warning("sandbox %s of endpoint %s never became a network namespace", sandbox, endpoint_id[:12])
                return
            time.sleep(0.001)  # the namespace appears without any event this could wait on
        with self._lock:
            ep = self.endpoints.get(endpoint_id)
            if ep is None or ep.sandbox != sandbox:
                return
            try:
                self._converge({(plan.ServedNetns.kind, str(ep.sandbox_hash))})
            except CellgateError as exc:
                log.warning("cannot serve the sockets of %s: %s", sandbox, exc)

    def leave(self, network_id: str, endpoint_id: str, origin: str = "docker") -> None:
        with self._lock:
            ep = self._named(network_id, endpoint_id, origin)
            if ep is None or not ep.sandbox:
                return
            self._update(replace(ep, sandbox=""))
            log.info("endpoint %s left its sandbox", endpoint_id[:12])

    def delete_endpoint(self, network_id: str, endpoint_id: str, origin: str = "docker") -> None:
        with self._lock:
            ep = self._named(network_id, endpoint_id, origin)
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
            failpoints.hit("endpoint.labels.updated")  # persisted and in force; the old identity still held
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
            failpoints.hit("endpoint.update.persisted")
            self._regenerate(ep, plan.keys(before ^ after))
        except CellgateError:
            self._ep_store.put(old.id, old.to_doc())
            self.endpoints[old.id] = old
            raise
        self._changed()
        return ep

    def _remove_endpoint(self, ep: Endpoint) -> None:
        """Forget the endpoint on disk first (a state dir that refuses the write fails the call
        before anything changed), then tear down its kernel side (an error there puts it back),
        then release its identity (left to the sweep if the state dir refuses that write).

        A Docker endpoint's veth goes after the reply (`run_later`): deleting a veth waits for the
        kernel's RCU grace periods, the longest step of a `docker rm`, and nothing can reach it
        once its map entries are gone. Its routes, neighbours and programs go with it. A create
        that wants the name meanwhile finds the link in the desired state again, and the removal
        then leaves it alone (it removes only what no endpoint wants); a crash before it runs
        leaves an owned veth that no endpoint wants, which the next start removes."""
        objs = plan.endpoint_objects(ep, self.settings)
        scope = plan.removal_keys(objs)
        later = {(plan.Veth.kind, ep.host_ifname)} if ep.origin == "docker" and self.run_later is not None else set()
        self._ep_store.delete(ep.id)
        failpoints.hit("endpoint.delete.persisted")
        self.endpoints.pop(ep.id, None)
        try:
            self._converge(scope - later)
        except KernelError:
            self.endpoints[ep.id] = ep
            try:
                self._ep_store.put(ep.id, ep.to_doc())
            except StateError as exc:
                log.error("endpoint %s is kept without its document: %s", ep.id[:12], exc)
            raise
        failpoints.hit("endpoint.delete.kernel_removed")
        try:
            freed = self.policy.identities.release(ep.id)
        except StateError as exc:
            log.error("the identity of removed endpoint %s is released later: %s", ep.id[:12], exc)
            self.leftovers[ep.id] = (ep, False)
            freed = []
        if freed:
            self.policy.sync(self.endpoints.values())
        self._changed()
        if later and self.run_later is not None:
            self.run_later(lambda: self._remove_link_later(ep.host_ifname, plan.keys(objs)))

    def kept_addresses(self) -> list[IPAddress]:
        """Addresses kept for a runtime after their endpoint went (ipam.pool.Allocation.kept)."""
        return self.ipam.kept()

    def _remove_link_later(self, dev: str, keys: set[plan.Key]) -> None:
        """The veth `dev` of a removed endpoint, whose other objects were `keys`: it goes with what
        lives on it; or, made again meanwhile, it stays and loses only what no endpoint wants."""
        with self._lock:
            again = any(e.host_ifname == dev for e in self.endpoints.values())
            self._converge_later(keys if again else {(plan.Veth.kind, dev)})

    def _converge_later(self, keys: set[plan.Key]) -> None:
        """Converge `keys` after a reply; what fails is tried again by the sweep."""
        with self._lock:
            try:
                self._converge(keys)
            except CellgateError as exc:
                log.warning("%s not converged after the reply (the sweep tries again): %s",
                            ", ".join("/".join(k) for k in sorted(keys)), exc)
                self.unconverged |= keys

    # -- the cluster -------------------------------------------------------------------------

    def set_cluster_view(self, view: ClusterView | None) -> int:
        """Mirror what the cluster says (peers, their endpoints) into the kernel: the policy of
        new identities first, then the ipcache and routes, then the policy of gone ones."""
        with self._lock:
            old = self.cluster_view.by_key(self.settings.instance) if self.cluster_view is not None else {}
            new = view.by_key(self.settings.instance) if view is not None else {}
            scope = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            if not scope:
                self.cluster_view = view
                return 0
            self.policy.sync(self.endpoints.values(), delete=False)
            previous = self.cluster_view
            self.cluster_view = view
            try:
                self._converge(scope)
            except CellgateError:
                self.cluster_view = previous
                raise
            self.policy.sync(self.endpoints.values())
            self.refresh_services()  # remote endpoints came or went: selectors may pick them
            return len(scope)

    def refresh_services(self) -> None:
        """Overridden by the service use cases (plugin.service.services)."""

    def resolve_all_services(self) -> None:
        """Overridden by the service use cases (plugin.service.services)."""

    def policy_resync(self) -> None:
        """The set of known identities changed (a peer's identity came or went)."""
        with self._lock:
            self.policy.sync(self.endpoints.values())

    def renumber_identity(self, old: int, new: int) -> list[str]:
        """The label set numbered `old` here is `new` cluster-wide: move every endpoint holding it,
        the new number's policy in force first. Returns the endpoints moved."""
        with self._lock:
            ident = self.policy.identities.renumber(old, new)
            if ident is None:
                return []
            self.policy.sync(self.endpoints.values(), extra={new: ident.labels}, delete=False)
            moved = []
            for ep in list(self.endpoints.values()):
                if ep.identity == old:
                    self._update(replace(ep, identity=new))
                    moved.append(ep.id)
            self.policy.sync(self.endpoints.values())
            log.info("identity %d renumbered %d (%d endpoints)", old, new, len(moved))
            return moved


def _load(store: DocumentStore, parse: Callable[[Mapping[str, Any]], Any], what: str) -> dict[str, Any]:
    """Every readable document of `store` by ID; an unreadable one is logged and skipped."""
    out = {}
    for _, doc in store.load():
        try:
            value = parse(doc)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable %s document: %s", what, exc)
            continue
        out[value.id] = value
    return out
