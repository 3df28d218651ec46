"""An address pool and its allocations: immutable values and the allocation rule. No I/O.

Every change returns a new Pool, so the caller can persist the new value first and only
then make it current; a failed write leaves the old value untouched.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from datapath.errors import AddressExhausted, Conflict, InvalidRequest

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

KIND_ENDPOINT = "endpoint"
KIND_GATEWAY = "gateway"
KIND_AUX = "aux"

# Smallest and largest subnets we accept, by prefix length.
PREFIX_LIMITS = {4: (8, 30), 6: (32, 126)}

# Ranges no container network may use or overlap: the host would route (and masquerade) them to
# a container, but they mean something else on every host. Private and shared (100.64.0.0/10)
# space, documentation and benchmark ranges are ordinary unicast and stay allowed.
SPECIAL: tuple[tuple[Network, str], ...] = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "'this network'"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved, with the limited broadcast address"),
    (ipaddress.IPv6Network("::/128"), "the unspecified address"),
    (ipaddress.IPv6Network("::1/128"), "loopback"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast"),
)


def check_subnet(subnet: Network, what: str = "subnet") -> None:
    low, high = PREFIX_LIMITS[subnet.version]
    if not low <= subnet.prefixlen <= high:
        raise InvalidRequest(
            f"{what} {subnet}: IPv{subnet.version} prefix length must be between /{low} and /{high}"
        )
    check_routable(subnet, what)


def check_routable(subnet: Network, what: str = "subnet") -> None:
    """Refuse a subnet that overlaps a special-purpose range (loopback, multicast, ...)."""
    for special, meaning in SPECIAL:
        if special.version == subnet.version and special.overlaps(subnet):
            raise InvalidRequest(
                f"{what} {subnet} overlaps {special} ({meaning}), which cannot be a container network"
            )


def host_address_problem(address: Address, subnet: Network) -> str:
    """Why `address` cannot be an interface's address in `subnet`, or "" when it can."""
    if address.version != subnet.version or address not in subnet:
        return f"is not inside {subnet}"
    if address == subnet.network_address:
        kind = "subnet-router anycast" if subnet.version == 6 else "network"
        return f"is the {kind} address of {subnet}"
    if subnet.version == 4 and address == subnet.broadcast_address:
        return f"is the broadcast address of {subnet}"
    return ""


@dataclass(frozen=True)
class Allocation:
    address: Address
    kind: str  # KIND_*
    owner: str = ""  # endpoint ID once the endpoint exists; "" while pending
    mac: str = ""  # MAC the runtime asked with, which makes retried requests idempotent
    created: float = 0.0
    # Its endpoint is gone but its runtime may still hold it (Docker, for a container whose veth
    # vanished): no request is in flight for it, so reconciliation judges it at once.
    kept: bool = False

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "address": str(self.address),
            "kind": self.kind,
            "owner": self.owner,
            "mac": self.mac,
            "created": self.created,
        }
        if self.kept:
            doc["kept"] = True
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Allocation:
        return cls(
            ipaddress.ip_address(doc["address"]),
            str(doc["kind"]),
            str(doc.get("owner", "")),
            str(doc.get("mac", "")),
            float(doc.get("created", 0.0)),
            doc.get("kept") is True,
        )


@dataclass(frozen=True)
class Pool:
    id: str
    space: str
    subnet: Network
    subpool: Network | None = None
    gateway: Address | None = None
    dynamic: bool = False  # carved from the host range rather than asked for
    network_id: str = ""  # bound by CreateNetwork; "" until then
    refs: int = 1
    created: float = 0.0
    cursor: int = 0  # next-fit position inside the allocatable range
    allocations: Mapping[Address, Allocation] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.subnet.version

    def prefixed(self, address: Address) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(f"{address}/{self.subnet.prefixlen}")

    # -- allocation -------------------------------------------------------------------------

    def _range(self) -> Network:
        return self.subpool if self.subpool is not None else self.subnet

    def _usable(self, address: Address) -> bool:
        """Inside the pool and not the subnet's own (IPv6: subnet-router anycast) or broadcast address."""
        return not host_address_problem(address, self.subnet)

    def allocate(
        self, requested: Address | None, kind: str, mac: str = "", now: float = 0.0
    ) -> tuple[Pool, Allocation]:
        """Reserve `requested` or the next free address; returns the new pool and the allocation."""
        if requested is not None:
            self.check_requested(requested, kind)
            return self._with(Allocation(requested, kind, "", mac, now), cursor=self.cursor)

        rng = self._range()
        size = rng.num_addresses
        used = sum(1 for a in self.allocations if a in rng)
        if used >= size:
            raise AddressExhausted(f"no free address left in {rng}")
        base = int(rng.network_address)
        start = self.cursor % size
        for step in range(size):
            offset = (start + step) % size
            candidate = ipaddress.ip_address(base + offset)
            if candidate in self.allocations or not self._usable(candidate):
                continue
            return self._with(Allocation(candidate, kind, "", mac, now), cursor=offset + 1)
        raise AddressExhausted(f"no free address left in {rng}")

    def check_requested(self, requested: Address, kind: str = KIND_ENDPOINT) -> None:
        """Why `requested` cannot be reserved as `kind` now (InvalidRequest, Conflict); None if it can."""
        if requested.version != self.version:
            raise InvalidRequest(f"address {requested} is not IPv{self.version}")
        if not self._usable(requested):
            raise InvalidRequest(f"address {requested} is not a usable address of pool {self.subnet}: "
                                 f"it {host_address_problem(requested, self.subnet)}")
        if kind == KIND_ENDPOINT and requested == self.gateway:
            raise Conflict(f"address {requested} is the gateway of {self.subnet}")
        if kind == KIND_ENDPOINT and self.subpool is not None and requested not in self.subpool:
            raise InvalidRequest(f"address {requested} is outside the range {self.subpool}")
        existing = self.allocations.get(requested)
        if existing is not None:
            raise Conflict(f"address {requested} is already in use ({existing.kind})")

    def _with(self, alloc: Allocation, cursor: int) -> tuple[Pool, Allocation]:
        allocations = dict(self.allocations)
        allocations[alloc.address] = alloc
        return dataclasses.replace(self, allocations=allocations, cursor=cursor), alloc

    def pending_for(self, mac: str) -> Allocation | None:
        """The not-yet-bound endpoint allocation made for `mac`, if a retry asks again."""
        if not mac:
            return None
        for alloc in self.allocations.values():
            if alloc.kind == KIND_ENDPOINT and not alloc.owner and alloc.mac == mac:
                return alloc
        return None

    def release(self, address: Address) -> Pool:
        if address not in self.allocations:
            return self
        allocations = dict(self.allocations)
        del allocations[address]
        gateway = None if address == self.gateway else self.gateway
        return dataclasses.replace(self, allocations=allocations, gateway=gateway)

    def set_gateway(self, address: Address, now: float) -> Pool:
        """Make `address` the gateway, dropping an automatically chosen one it replaces."""
        pool = self
        if self.gateway is not None and self.gateway != address:
            pool = pool.release(self.gateway)
        current = pool.allocations.get(address)
        if current is not None and current.kind != KIND_GATEWAY:
            raise Conflict(f"address {address} is already in use ({current.kind})")
        if current is None:
            if not pool._usable(address):
                raise InvalidRequest(f"gateway {address} is not a usable address of {self.subnet}: "
                                     f"it {host_address_problem(address, self.subnet)}")
            pool, _ = pool._with(Allocation(address, KIND_GATEWAY, "", "", now), cursor=pool.cursor)
        return dataclasses.replace(pool, gateway=address)

    def bind(self, address: Address, owner: str, kept: bool = False) -> Pool:
        """The pool with `address` bound to endpoint `owner` ("" : none; `kept`: see Allocation)."""
        alloc = self.allocations.get(address)
        if alloc is None or (alloc.owner == owner and alloc.kept == kept):
            return self
        allocations = dict(self.allocations)
        allocations[address] = dataclasses.replace(alloc, owner=owner, kept=kept)
        return dataclasses.replace(self, allocations=allocations)

    def endpoint_allocations(self) -> Iterable[Allocation]:
        return (a for a in self.allocations.values() if a.kind == KIND_ENDPOINT)

    # -- persistence ------------------------------------------------------------------------

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": 1,
            "id": self.id,
            "space": self.space,
            "subnet": str(self.subnet),
            "subpool": str(self.subpool) if self.subpool else "",
            "gateway": str(self.gateway) if self.gateway else "",
            "dynamic": self.dynamic,
            "network_id": self.network_id,
            "refs": self.refs,
            "created": self.created,
            "cursor": self.cursor,
            "allocations": [a.to_doc() for a in sorted(self.allocations.values(), key=_addr_key)],
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Pool:
        allocs = [Allocation.from_doc(a) for a in doc.get("allocations", [])]
        return cls(
            id=str(doc["id"]),
            space=str(doc["space"]),
            subnet=ipaddress.ip_network(doc["subnet"]),
            subpool=ipaddress.ip_network(doc["subpool"]) if doc.get("subpool") else None,
            gateway=ipaddress.ip_address(doc["gateway"]) if doc.get("gateway") else None,
            dynamic=bool(doc.get("dynamic", False)),
            network_id=str(doc.get("network_id", "")),
            refs=int(doc.get("refs", 1)),
            created=float(doc.get("created", 0.0)),
            cursor=int(doc.get("cursor", 0)),
            allocations={a.address: a for a in allocs},
        )


def _addr_key(alloc: Allocation) -> tuple[int, int]:
    return (alloc.address.version, int(alloc.address))


def pool_id(space: str, subnet: Network, subpool: Network | None) -> str:
    """Docker's own format: <space>/<subnet>[/<range>]."""
    return f"{space}/{subnet}" + (f"/{subpool}" if subpool is not None else "")
