"""Host-scope IPAM: pools carved from this host's ranges, persisted before every reply.

Thread-safe. Each host owns its ranges outright, so nothing here talks to other hosts.
Every mutation builds the new Pool value, writes it durably, and only then makes it
current: a failed write (disk full) raises StateError and changes nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from datapath.errors import Conflict, InvalidRequest, NotFound
from datapath.store import DocumentStore
from ipam.pool import (
    KIND_AUX,
    KIND_ENDPOINT,
    KIND_GATEWAY,
    Address,
    Allocation,
    Network,
    Pool,
    check_routable,
    check_subnet,
    pool_id,
)

log = logging.getLogger(__name__)

LOCAL_SPACE = "CellgateLocal"
GLOBAL_SPACE = "CellgateGlobal"



@dataclass(frozen=True)
class HostRanges:
    """The address ranges this host owns and how big a network drawn from them is."""

    ipv4: ipaddress.IPv4Network
    ipv6: ipaddress.IPv6Network
    ipv4_prefix: int = 24
    ipv6_prefix: int = 80

    def __post_init__(self) -> None:
        for net, prefix in ((self.ipv4, self.ipv4_prefix), (self.ipv6, self.ipv6_prefix)):
            check_routable(net, "host range")
            if prefix < net.prefixlen:
                raise InvalidRequest(f"network size /{prefix} is larger than the host range {net}")
            check_subnet(ipaddress.ip_network(f"{net.network_address}/{prefix}"), "network size")

    def for_version(self, v6: bool) -> tuple[Network, int]:
        return (self.ipv6, self.ipv6_prefix) if v6 else (self.ipv4, self.ipv4_prefix)


@dataclass(frozen=True)
class PoolRequest:
    space: str
    pool: Network | None
    subpool: Network | None
    v6: bool
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Leak:
    pool_id: str
    address: Address
    owner: str
    reason: str


@dataclass(frozen=True)
class CheckReport:
    leaked: tuple[Leak, ...]  # allocated, but no live endpoint uses it
    missing: tuple[tuple[str, Address], ...]  # live endpoint whose address is not allocated
    duplicates: tuple[tuple[Address, tuple[str, ...]], ...]  # address used by several endpoints
    unbound_pools: tuple[str, ...]  # pools no cellgate network uses (informational)
    released: tuple[Leak, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.leaked or self.missing or self.duplicates)


class Ipam:
    """Pools and allocations of one host."""

    def __init__(
        self,
        store: DocumentStore,
        ranges: HostRanges,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.ranges = ranges
        self._clock = clock
        self._lock = threading.RLock()
        self._pools: dict[str, Pool] = {}
        # Whether the endpoint that owns an address still exists: the ledger's user (the agent) says.
        # An address bound to one is never released, whoever asks (a release names only the address).
        self.in_use: Callable[[str], bool] = lambda owner: False
        for _, doc in store.load():
            try:
                pool = Pool.from_doc(doc)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable pool document %s: %s", doc.get("id", "?"), exc)
                continue
            self._pools[pool.id] = pool

    # -- queries ----------------------------------------------------------------------------

    def pools(self) -> list[Pool]:
        with self._lock:
            return sorted(self._pools.values(), key=lambda p: (p.version, int(p.subnet.network_address)))

    def pool(self, pid: str) -> Pool:
        with self._lock:
            try:
                return self._pools[pid]
            except KeyError:
                raise NotFound(f"unknown pool {pid!r}") from None

    def find_by_subnet(self, subnet: Network) -> Pool | None:
        with self._lock:
            for pool in self._pools.values():
                if pool.subnet == subnet:
                    return pool
        return None

    def lookup(self, address: Address) -> tuple[Pool, Allocation] | None:
        with self._lock:
            for pool in self._pools.values():
                alloc = pool.allocations.get(address)
                if alloc is not None:
                    return pool, alloc
        return None

    # -- pools ------------------------------------------------------------------------------

    def request_pool(self, req: PoolRequest, avoid: Sequence[Network] = ()) -> Pool:
        if req.space not in (LOCAL_SPACE, GLOBAL_SPACE):
            raise InvalidRequest(
                f"unknown address space {req.space[:80]!r} (cellgate's are {LOCAL_SPACE} and {GLOBAL_SPACE})"
            )
        if req.options:
            raise InvalidRequest(
                "unsupported IPAM option(s): " + ", ".join(sorted(req.options)) + " (cellgate takes none)"
            )
        with self._lock:
            now = self._clock()
            if req.pool is None:
                if req.subpool is not None:
                    raise InvalidRequest("an IP range needs a subnet")
                pool = self._dynamic_pool(req, avoid, now)
            else:
                existing = self._explicit_existing(req)
                if existing is not None:
                    return existing
                pool = self._explicit_pool(req, now)
            if pool.gateway is not None:
                pool, _ = pool.allocate(pool.gateway, KIND_GATEWAY, now=now)
            self._save(pool)
            log.info("pool %s created (%s)", pool.id, "from the host range" if pool.dynamic else "requested")
            return pool

    def _explicit_existing(self, req: PoolRequest) -> Pool | None:
        assert req.pool is not None
        pid = pool_id(req.space, req.pool, req.subpool)
        existing = self._pools.get(pid)
        if existing is None:
            return None
        if existing.network_id:
            raise Conflict(f"subnet {req.pool} is already used by network {existing.network_id[:12]}")
        # An unbound pool with the same request: a retry, or a racing create that
        # CreateNetwork will refuse. Count the reference so each ReleasePool balances.
        pool = dataclasses.replace(existing, refs=existing.refs + 1)
        self._save(pool)
        return pool

    def _explicit_pool(self, req: PoolRequest, now: float) -> Pool:
        subnet = req.pool
        assert subnet is not None
        check_subnet(subnet)  # first: Docker takes ::ffff:a.b.c.d/N for IPv4, and the reason to refuse is this
        if subnet.version != (6 if req.v6 else 4):
            raise InvalidRequest(f"subnet {subnet} is not IPv{6 if req.v6 else 4}")
        subpool = req.subpool
        if subpool is not None and (
            subpool.version != subnet.version or not subpool.subnet_of(subnet)  # type: ignore[arg-type]
        ):
            raise InvalidRequest(f"IP range {subpool} is not inside subnet {subnet}")
        for other in self._pools.values():
            if other.subnet.version == subnet.version and other.subnet.overlaps(subnet):
                owner = f" of network {other.network_id[:12]}" if other.network_id else ""
                raise Conflict(f"subnet {subnet} overlaps {other.subnet}{owner}")
        return Pool(
            id=pool_id(req.space, subnet, subpool),
            space=req.space,
            subnet=subnet,
            subpool=subpool,
            gateway=_first_host(subnet),
            created=now,
        )

    def _dynamic_pool(self, req: PoolRequest, avoid: Sequence[Network], now: float) -> Pool:
        host_range, prefix = self.ranges.for_version(req.v6)
        taken = [p.subnet for p in self._pools.values()] + list(avoid)
        for candidate in host_range.subnets(new_prefix=prefix):
            if any(candidate.version == t.version and candidate.overlaps(t) for t in taken):
                continue
            return Pool(
                id=pool_id(req.space, candidate, None),
                space=req.space,
                subnet=candidate,
                gateway=_first_host(candidate),
                dynamic=True,
                created=now,
            )
        raise Conflict(f"the host range {host_range} has no free /{prefix} left")

    def release_pool(self, pid: str) -> None:
        with self._lock:
            pool = self._pools.get(pid)
            if pool is None:
                return
            if pool.refs > 1:
                self._save(dataclasses.replace(pool, refs=pool.refs - 1))
                return
            self._store.delete(pool.id)
            del self._pools[pid]
            log.info("pool %s released", pid)

    def remove_pool(self, pid: str) -> bool:
        """Drop a pool whatever its references and allocations (its network is gone for good:
        the ReleasePool that would have balanced them was lost); True if there was one."""
        with self._lock:
            if pid not in self._pools:
                return False
            self._store.delete(pid)
            del self._pools[pid]
            log.info("pool %s removed", pid)
            return True

    def bind_network(self, network_id: str, subnets: Iterable[Network]) -> list[Pool]:
        """CreateNetwork: mark our pools as used by this network (refusing a second network)."""
        with self._lock:
            pools = [p for s in subnets if (p := self.find_by_subnet(s)) is not None]
            for pool in pools:
                if pool.network_id and pool.network_id != network_id:
                    raise Conflict(f"subnet {pool.subnet} is already used by network {pool.network_id[:12]}")
            bound = []
            for pool in pools:
                current = pool
                if pool.network_id != network_id:
                    current = dataclasses.replace(pool, network_id=network_id)
                    self._save(current)
                bound.append(current)
            return bound

    def unbind_network(self, network_id: str) -> None:
        with self._lock:
            for pool in list(self._pools.values()):
                if pool.network_id == network_id:
                    self._save(dataclasses.replace(pool, network_id=""))

    # -- addresses --------------------------------------------------------------------------

    def request_address(
        self, pid: str, address: Address | None, kind: str = KIND_ENDPOINT, mac: str = "", owner: str = ""
    ) -> tuple[Pool, Allocation]:
        """Reserve an address of `kind`: the pool's gateway, an aux address (reserved with the
        network, so only while the pool has no network yet and with an address given; otherwise
        it is an endpoint's), or an endpoint's (`mac` makes a retried request idempotent).
        `owner` binds an endpoint's address to its endpoint in the same write (CNI knows it up front)."""
        with self._lock:
            pool = self.pool(pid)
            now = self._clock()
            if kind == KIND_GATEWAY:
                if address is None and pool.gateway is not None:
                    return pool, pool.allocations[pool.gateway]
                if address is None:
                    new, alloc = pool.allocate(None, KIND_GATEWAY, now=now)
                    new = dataclasses.replace(new, gateway=alloc.address)
                else:
                    new = pool.set_gateway(address, now)
                    alloc = new.allocations[address]
            elif kind == KIND_AUX and address is not None and not pool.network_id:
                if address in pool.allocations and pool.allocations[address].kind == KIND_AUX:
                    return pool, pool.allocations[address]
                new, alloc = pool.allocate(address, KIND_AUX, now=now)
            else:
                mac = mac.lower()
                retry = pool.pending_for(mac)
                if retry is not None and address in (None, retry.address):
                    return pool, retry
                new, alloc = pool.allocate(address, KIND_ENDPOINT, mac, now)
                if owner:
                    new = new.bind(alloc.address, owner)
                    alloc = new.allocations[alloc.address]
            self._save(new)
            log.info("address %s allocated in %s (%s)", alloc.address, pid, alloc.kind)
            return new, alloc

    def release_address(self, pid: str, address: Address) -> None:
        with self._lock:
            pool = self._pools.get(pid)
            if pool is None or address not in pool.allocations:
                return
            alloc = pool.allocations[address]
            kind = alloc.kind
            if kind == KIND_ENDPOINT and alloc.owner and self.in_use(alloc.owner):
                raise Conflict(f"address {address} is in use by endpoint {alloc.owner[:12]}: "
                               "it is released once that endpoint is deleted")
            if kind in (KIND_GATEWAY, KIND_AUX) and pool.refs > 1:
                # Network-level reservations of a shared pool belong to every holder. Docker
                # releases them when it rolls back a racing CreateNetwork; the winner keeps them.
                log.info("%s %s of %s kept: %d holders remain", kind, address, pid, pool.refs - 1)
                return
            self._save(pool.release(address))
            log.info("address %s released from %s", address, pid)

    def bind_endpoint(self, address: Address, endpoint_id: str) -> None:
        """The endpoint that now uses `address`; makes leaks detectable later."""
        with self._lock:
            found = self.lookup(address)
            if found is None:
                return
            pool, alloc = found
            if alloc.kind == KIND_ENDPOINT and alloc.owner not in ("", endpoint_id):
                raise Conflict(f"address {address} already belongs to endpoint {alloc.owner[:12]}")
            if alloc.kind != KIND_ENDPOINT:
                raise Conflict(f"address {address} is reserved as {alloc.kind}")
            if alloc.owner != endpoint_id:
                self._save(pool.bind(address, endpoint_id))

    def release_owner(self, endpoint_id: str, network_id: str | None = None) -> list[Address]:
        """Free every address an endpoint holds (the endpoint is gone for good); with `network_id`,
        only those in the pools of that network."""
        freed = []
        with self._lock:
            if self.in_use(endpoint_id):
                raise Conflict(f"endpoint {endpoint_id[:12]} still exists: its addresses are released once "
                               "it is deleted")
            for pool in list(self._pools.values()):
                if network_id is not None and pool.network_id != network_id:
                    continue
                mine = [a.address for a in pool.endpoint_allocations() if a.owner == endpoint_id]
                if not mine:
                    continue
                new = pool
                for address in mine:
                    new = new.release(address)
                self._save(new)
                freed.extend(mine)
        for address in freed:
            log.info("address %s released with endpoint %s", address, endpoint_id[:12])
        return freed

    def unbind_owner(self, endpoint_id: str) -> list[Address]:
        """Keep every address an endpoint holds, bound to no endpoint any more (the endpoint is gone,
        but its runtime may still hold the address: Docker releases it when the container goes)."""
        kept = []
        with self._lock:
            for pool in list(self._pools.values()):
                mine = [a.address for a in pool.endpoint_allocations() if a.owner == endpoint_id]
                if not mine:
                    continue
                new = pool
                for address in mine:
                    new = new.bind(address, "", kept=True)
                self._save(new)
                kept.extend(mine)
        for address in kept:
            log.info("address %s kept for its runtime, no longer bound to endpoint %s", address, endpoint_id[:12])
        return kept

    def kept(self) -> list[Address]:
        """Addresses kept for a runtime after their endpoint went (Allocation.kept)."""
        with self._lock:
            return [a.address for p in self._pools.values() for a in p.endpoint_allocations() if a.kept]

    def allocation(self, address: Address) -> Allocation | None:
        """The allocation of `address`, wherever it is (None: not reserved)."""
        found = self.lookup(address)
        return found[1] if found is not None else None

    def put_back(self, address: Address, before: Allocation | None) -> None:
        """Undo what a failed use case did to one address: its allocation as `before` (from
        `allocation()`), or none. A pool that changed nothing else keeps its value."""
        with self._lock:
            if self.allocation(address) == before:
                return
            pool = next((p for p in self._pools.values() if address in p.subnet), None)
            if pool is None:
                return
            allocations = dict(pool.allocations)
            if before is None:
                allocations.pop(address, None)
            else:
                allocations[address] = before
            self._save(dataclasses.replace(pool, allocations=allocations))
            log.info("address %s put back as it was (%s)", address,
                     "not reserved" if before is None else before.owner[:12] or "pending")

    def ensure_allocated(self, address: Address, endpoint_id: str) -> bool:
        """Re-reserve an address a live endpoint uses but the ledger lost; True if it did."""
        with self._lock:
            if self.lookup(address) is not None:
                return False
            for pool in self._pools.values():
                if address in pool.subnet:
                    new, _ = pool.allocate(address, KIND_ENDPOINT, now=self._clock())
                    self._save(new.bind(address, endpoint_id))
                    log.warning("address %s was in use by endpoint %s but not allocated; reserved it",
                                address, endpoint_id[:12])
                    return True
        return False

    # -- reconciliation ---------------------------------------------------------------------

    def check(
        self,
        live: Mapping[str, Sequence[Address]],
        grace: float = 60.0,
        release: bool = False,
        held: Collection[Address] = (),
    ) -> CheckReport:
        """Compare allocations with the endpoints that exist (`live`: endpoint ID -> addresses).

        Only pools bound to a cellgate network are judged: for those, every endpoint
        allocation must belong to a live endpoint, or hold an address a runtime still has
        (`held`: Docker's containers'), which is no leak. Allocations younger than `grace`
        seconds are skipped so that a create in flight is never mistaken for a leak.
        """
        with self._lock:
            now = self._clock()
            users: dict[Address, list[str]] = {}
            for eid, addresses in live.items():
                for address in addresses:
                    users.setdefault(address, []).append(eid)
            leaked: list[Leak] = []
            for pool in self._pools.values():
                if not pool.network_id:
                    continue
                for alloc in pool.endpoint_allocations():
                    if now - alloc.created < grace or alloc.address in held:
                        continue
                    if not alloc.owner:
                        if alloc.address not in users:
                            leaked.append(Leak(pool.id, alloc.address, "", "never used by an endpoint"))
                    elif alloc.owner not in live:
                        leaked.append(Leak(pool.id, alloc.address, alloc.owner, "its endpoint is gone"))
            missing = []
            for eid, addresses in live.items():
                for address in addresses:
                    found = self.lookup(address)
                    if found is None and self._owns(address):
                        missing.append((eid, address))
            duplicates = [(a, tuple(sorted(e))) for a, e in users.items() if len(e) > 1]
            unbound = [p.id for p in self._pools.values() if not p.network_id]
            released: list[Leak] = []
            if release:
                for leak in leaked:
                    self.release_address(leak.pool_id, leak.address)
                    released.append(leak)
            return CheckReport(
                tuple(sorted(leaked, key=lambda x: (x.pool_id, int(x.address)))),
                tuple(sorted(missing, key=lambda x: (x[0], int(x[1])))),
                tuple(sorted(duplicates, key=lambda x: int(x[0]))),
                tuple(sorted(unbound)),
                tuple(released),
            )

    def _owns(self, address: Address) -> bool:
        return any(address in p.subnet for p in self._pools.values())

    # -- internals --------------------------------------------------------------------------

    def _save(self, pool: Pool) -> None:
        self._store.put(pool.id, pool.to_doc())
        self._pools[pool.id] = pool


def _first_host(subnet: Network) -> Address:
    return subnet.network_address + 1
