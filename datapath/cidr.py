"""CIDR policy: the CIDR selectors of rules (toCIDR, toCIDRSet with except, ...) and the node-local
CIDR identities their prefixes get, as Cilium's. Pure: the standard library and datapath only.

Every prefix a rule names (each cidr and each except) gets an identity in the local scope (2^24 + n,
never sent to another node), persisted so numbers survive restarts, released when no rule names it.
Its labels are `cidr:<prefix>` for the prefix and every enclosing prefix, plus `reserved:world`, so a
selector for 10.0.0.0/8 matches the identity of 10.1.0.0/16, and the `world` entity matches them all.
The ipcache (an LPM trie) maps each prefix to its identity; endpoints and host addresses keep their
own, longer (or earlier looked-up) entries. As long as every prefix named by the rules in force has
its entry, the longest-prefix identity of an address decides exactly as the CIDRs read: see
`CidrSelector.matches`.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from datapath import identity as ids
from datapath.errors import AddressExhausted, InvalidRequest
from datapath.labels import RESERVED, Label, LabelSet
from datapath.store import DocumentStore

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SOURCE = "cidr"
FIRST = ids.LOCAL_SCOPE + 1  # as Cilium's local identities: 2^24 + 1 upward
LAST = ids.PENDING_FIRST - 1  # the pending scope of cluster endpoints starts at 2^25
WORLD_LABEL = Label(RESERVED, "world")


def is_cidr_identity(number: int) -> bool:
    """A number of the CIDR scope (node-local, never an endpoint's)."""
    return FIRST <= number <= LAST


def parse_prefix(raw: Any, where: str, address_ok: bool = True) -> IPNetwork:
    """A CIDR as Cilium reads it: `a.b.c.d/n` or `x::/n`, host bits masked off (as Go's
    netip.ParsePrefix + Masked); a bare address is its /32 or /128 where `address_ok`."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidRequest(f"{where}: must be a CIDR string such as 10.0.0.0/8 or 2001:db8::/32")
    text = raw.strip()
    if "/" not in text:
        if not address_ok:
            raise InvalidRequest(f"{where}: {text!r} must be a prefix with a length (e.g. {text}/32)")
        try:
            return ipaddress.ip_network(ipaddress.ip_address(text))
        except ValueError:
            raise InvalidRequest(f"{where}: {text!r} is not an IP address or CIDR") from None
    address, _, length = text.partition("/")
    if not (length.isascii() and length.isdigit()):
        raise InvalidRequest(f"{where}: {text!r} has a bad prefix length")
    try:
        return ipaddress.ip_network(f"{address}/{int(length)}", strict=False)
    except ValueError:
        raise InvalidRequest(f"{where}: {text!r} is not a CIDR (address/length)") from None


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    """inner ⊆ outer (of one family)."""
    return inner.version == outer.version and inner.prefixlen >= outer.prefixlen \
        and inner.supernet(new_prefix=outer.prefixlen) == outer


def supernets(prefix: IPNetwork) -> list[IPNetwork]:
    """The prefix and every prefix enclosing it, down to /0."""
    return [prefix.supernet(new_prefix=n) for n in range(prefix.prefixlen, -1, -1)]


@functools.lru_cache(maxsize=1 << 14)
def labels_of(prefix: IPNetwork) -> LabelSet:
    """The labels of a prefix's identity (Cilium's GetCIDRLabels, plus reserved:world); kept, as
    every policy sync asks for every CIDR identity's."""
    return frozenset({Label(SOURCE, str(p)) for p in supernets(prefix)} | {WORLD_LABEL})


def prefix_of(labels: LabelSet) -> IPNetwork | None:
    """The prefix whose identity has these labels (its longest `cidr:` label), if any."""
    best: IPNetwork | None = None
    for lb in labels:
        if lb.source != SOURCE:
            continue
        try:
            net = ipaddress.ip_network(lb.key)
        except ValueError:
            continue
        if best is None or net.prefixlen > best.prefixlen:
            best = net
    return best


@dataclass(frozen=True)
class CidrSelector:
    """One CIDR peer: `cidr` minus its `excepts` (fromCIDR/toCIDR have no excepts)."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    @property
    def prefixes(self) -> tuple[IPNetwork, ...]:
        """The prefixes that need an identity for this selector to be enforced exactly."""
        return (self.cidr, *self.excepts)

    def matches_prefix(self, prefix: IPNetwork) -> bool:
        """Whether the identity of `prefix` is selected: inside cidr and inside no except."""
        return _inside(prefix, self.cidr) and not any(_inside(prefix, e) for e in self.excepts)

    def matches(self, labels: LabelSet) -> bool:
        """The same on an identity's labels: it carries `cidr:C` and no `cidr:E` of an except
        (labels name every enclosing prefix). Only CIDR identities carry cidr: labels."""
        if Label(SOURCE, str(self.cidr)) not in labels:
            return False
        return not any(Label(SOURCE, str(e)) in labels for e in self.excepts)

    def contains(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return address.version == self.cidr.version and address in self.cidr \
            and not any(address in e for e in self.excepts)

    def __str__(self) -> str:
        return str(self.cidr) + (f" except {', '.join(str(e) for e in self.excepts)}" if self.excepts else "")


# -- identities ---------------------------------------------------------------------------------


class CidrIdentities:
    """The node-local identities of CIDR prefixes, persisted one document per prefix."""

    def __init__(self, store: DocumentStore) -> None:
        self._store = store
        self._lock = threading.RLock()
        self._by_prefix: dict[IPNetwork, int] = {}
        self._by_number: dict[int, IPNetwork] = {}
        for key, doc in store.load():
            try:
                prefix = ipaddress.ip_network(str(doc["prefix"]))
                number = int(doc["id"])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("skipping unreadable CIDR identity document %s: %s", key, exc)
                continue
            if not is_cidr_identity(number) or number in self._by_number or prefix in self._by_prefix:
                log.warning("skipping CIDR identity document %s: number %d out of range or in use", key, number)
                continue
            self._by_prefix[prefix] = number
            self._by_number[number] = prefix

    @staticmethod
    def _key(prefix: IPNetwork) -> str:
        return str(prefix).replace("/", "_").replace(":", "-")

    # -- queries ------------------------------------------------------------------------------

    def prefixes(self) -> dict[IPNetwork, int]:
        with self._lock:
            return dict(self._by_prefix)

    def number_of(self, prefix: IPNetwork) -> int | None:
        with self._lock:
            return self._by_prefix.get(prefix)

    def prefix_of(self, number: int) -> IPNetwork | None:
        with self._lock:
            return self._by_number.get(number)

    def labels_of(self, number: int) -> LabelSet | None:
        prefix = self.prefix_of(number)
        return labels_of(prefix) if prefix is not None else None

    def all(self) -> dict[int, LabelSet]:
        """Every CIDR identity with its labels."""
        with self._lock:
            return {n: labels_of(p) for n, p in self._by_number.items()}

    # -- changes ------------------------------------------------------------------------------

    def acquire(self, prefixes: Iterable[IPNetwork]) -> list[IPNetwork]:
        """Identities for every prefix (persisted first); returns the prefixes that are new."""
        added: list[IPNetwork] = []
        with self._lock:
            try:
                for prefix in dict.fromkeys(prefixes):
                    if prefix in self._by_prefix:
                        continue
                    number = self._next_number()
                    self._store.put(self._key(prefix), {"version": 1, "prefix": str(prefix), "id": number})
                    self._by_prefix[prefix] = number
                    self._by_number[number] = prefix
                    added.append(prefix)
            except Exception:
                self.release(added)  # all or nothing
                raise
        for prefix in added:
            log.info("CIDR identity %d allocated for %s", self._by_prefix[prefix], prefix)
        return added

    def release(self, prefixes: Iterable[IPNetwork]) -> list[int]:
        """Forget the identities of `prefixes`; returns the numbers freed."""
        freed = []
        with self._lock:
            for prefix in prefixes:
                number = self._by_prefix.get(prefix)
                if number is None:
                    continue
                self._store.delete(self._key(prefix))
                del self._by_prefix[prefix]
                del self._by_number[number]
                freed.append(number)
                log.info("CIDR identity %d released (%s)", number, prefix)
        return freed

    def _next_number(self) -> int:
        start = max(self._by_number, default=FIRST - 1) + 1
        span = LAST - FIRST + 1
        for step in range(span):
            number = FIRST + (start - FIRST + step) % span
            if number not in self._by_number:
                return number
        raise AddressExhausted("no free CIDR identity number left")


def prefixes_named(selectors: Iterable[CidrSelector]) -> set[IPNetwork]:
    return {p for sel in selectors for p in sel.prefixes}


def resolve(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
            entries: Mapping[IPNetwork, int]) -> tuple[IPNetwork | None, int]:
    """The identity the datapath gives a non-endpoint address: the longest prefix holding it in
    `entries` (an ipcache: prefix -> identity), else world."""
    best: IPNetwork | None = None
    for prefix in entries:
        if prefix.version == address.version and address in prefix \
                and (best is None or prefix.prefixlen > best.prefixlen):
            best = prefix
    return (best, entries[best]) if best is not None else (None, ids.WORLD)
