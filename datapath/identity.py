"""Security identities: a number per distinct label set, plus the reserved ones. Pure.

Same labels, same number, for as long as any endpoint holds it; the mapping is persisted
so a restarted agent gives every label set its old number back. The last owner going
away releases the number. Numbers below FIRST_ALLOCATED are reserved and never handed out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from datapath.errors import AddressExhausted
from datapath.labels import Label, LabelSet, canonical, reserved
from datapath.store import DocumentStore

log = logging.getLogger(__name__)

ANY = 0
HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6

RESERVED = {
    HOST: "host",
    WORLD: "world",
    UNMANAGED: "unmanaged",
    HEALTH: "health",
    INIT: "init",
    REMOTE_NODE: "remote-node",
}
RESERVED_LABELS: dict[int, LabelSet] = {num: reserved(name) for num, name in RESERVED.items()}

FIRST_ALLOCATED = 256
LAST_ALLOCATED = 65535  # a single host numbers its identities up to here
# In a cluster, identities are numbered cluster-wide below 2^24 (they travel in the VXLAN VNI).
CLUSTER_LAST = (1 << 24) - 1
# Node-local scopes above 2^24 never leave the host: CIDR identities, and the temporary numbers
# of endpoints whose cluster identity cannot be allocated yet (kvstore down; fail closed across nodes).
LOCAL_SCOPE = 1 << 24
PENDING_FIRST = 1 << 25
PENDING_LAST = PENDING_FIRST + (1 << 20) - 1


def is_pending(number: int) -> bool:
    return PENDING_FIRST <= number <= PENDING_LAST


@dataclass
class Identity:
    number: int
    labels: LabelSet
    owners: set[str] = field(default_factory=set)

    @property
    def reserved(self) -> bool:
        return self.number < FIRST_ALLOCATED

    def to_doc(self) -> dict[str, object]:
        return {
            "version": 1,
            "id": self.number,
            "labels": [str(label) for label in sorted(self.labels)],
            "owners": sorted(self.owners),
        }


class Identities:
    """Allocator and registry of identities on this host."""

    def __init__(self, store: DocumentStore) -> None:
        self._store = store
        self._lock = threading.RLock()
        self._by_number: dict[int, Identity] = {}
        self._by_labels: dict[str, Identity] = {}
        for _, doc in store.load():
            try:
                number = int(doc["id"])
                labels = frozenset(Label.parse(str(t)) for t in doc["labels"])
                owners = {str(o) for o in doc.get("owners", [])}
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("skipping unreadable identity document: %s", exc)
                continue
            if not self._loadable(number):
                continue
            ident = Identity(number, labels, owners)
            self._by_number[number] = ident
            self._by_labels[canonical(labels)] = ident

    def _loadable(self, number: int) -> bool:
        """Numbers this registry can hold (a cluster also holds cluster-wide and pending ones)."""
        return FIRST_ALLOCATED <= number <= LAST_ALLOCATED

    # -- queries ----------------------------------------------------------------------------

    def labels_of(self, number: int) -> LabelSet | None:
        if number in RESERVED_LABELS:
            return RESERVED_LABELS[number]
        with self._lock:
            ident = self._by_number.get(number)
            return ident.labels if ident else None

    def number_of(self, labels: LabelSet) -> int | None:
        for number, rl in RESERVED_LABELS.items():
            if rl == labels:
                return number
        with self._lock:
            ident = self._by_labels.get(canonical(labels))
            return ident.number if ident else None

    def all(self) -> dict[int, LabelSet]:
        """Every identity known here, reserved ones included."""
        with self._lock:
            out = dict(RESERVED_LABELS)
            out.update({n: i.labels for n, i in self._by_number.items()})
            return out

    def allocated(self) -> list[Identity]:
        with self._lock:
            return [Identity(i.number, i.labels, set(i.owners)) for i in sorted(self._by_number.values(),
                                                                                key=lambda x: x.number)]

    # -- changes ----------------------------------------------------------------------------

    def acquire(self, labels: LabelSet, owner: str) -> int:
        """The number for `labels`, held by `owner` until released."""
        with self._lock:
            ident = self._by_labels.get(canonical(labels))
            if ident is None:
                ident = Identity(self._allocate(labels), labels, {owner})
                self._store.put(str(ident.number), ident.to_doc())
                self._by_number[ident.number] = ident
                self._by_labels[canonical(labels)] = ident
                log.info("identity %d allocated for %s", ident.number, ", ".join(str(x) for x in sorted(labels)))
            else:
                # Holders are not persisted one by one: a restart rebuilds them from the endpoints
                # (sync_owners). Only the number's birth and death are written.
                ident.owners.add(owner)
            return ident.number

    def release(self, owner: str) -> list[int]:
        """Drop every hold of `owner`; returns the numbers that no one holds any more."""
        freed = []
        with self._lock:
            for ident in list(self._by_number.values()):
                if owner not in ident.owners:
                    continue
                if len(ident.owners) == 1:
                    self._forget(ident)
                    freed.append(ident.number)
                else:
                    ident.owners.discard(owner)  # see acquire: holders are rebuilt on restart
        return freed

    def release_one(self, owner: str, number: int) -> bool:
        """Drop `owner`'s hold on one identity (its labels changed); True if it was freed."""
        with self._lock:
            ident = self._by_number.get(number)
            if ident is None or owner not in ident.owners:
                return False
            if len(ident.owners) == 1:
                self._forget(ident)
                return True
            ident.owners.discard(owner)
            return False

    def sync_owners(self, holders: Mapping[str, LabelSet]) -> list[int]:
        """Make ownership match the live endpoints exactly (after a restart); returns freed numbers."""
        with self._lock:
            for owner, labels in holders.items():
                self.acquire(labels, owner)
            freed: list[int] = []
            for ident in list(self._by_number.values()):
                key = canonical(ident.labels)
                for owner in sorted(ident.owners):
                    # gone, or live but with other labels now (a crash between acquire and release)
                    stale = owner not in holders or canonical(holders[owner]) != key
                    if stale and self.release_one(owner, ident.number):
                        freed.append(ident.number)
            return freed

    def _forget(self, ident: Identity) -> None:
        self._store.delete(str(ident.number))
        del self._by_number[ident.number]
        del self._by_labels[canonical(ident.labels)]
        log.info("identity %d released", ident.number)
        self._freed(ident)

    # -- numbering: a single host numbers locally; a cluster overrides these two ----------

    def _allocate(self, labels: LabelSet) -> int:
        return self._next_number()

    def _freed(self, ident: Identity) -> None:
        """The last holder on this host is gone (called under the lock)."""

    def renumber(self, old: int, new: int) -> Identity | None:
        """Give the label set numbered `old` the number `new` (its cluster number), holders kept."""
        with self._lock:
            ident = self._by_number.get(old)
            if ident is None or old == new:
                return ident
            if new in self._by_number:
                raise ValueError(f"identity {new} is in use here already")
            moved = Identity(new, ident.labels, set(ident.owners))
            self._store.put(str(new), moved.to_doc())
            self._store.delete(str(old))
            del self._by_number[old]
            self._by_number[new] = moved
            self._by_labels[canonical(moved.labels)] = moved
            log.info("identity %d is now %d", old, new)
            return moved

    def _next_number(self) -> int:
        used = self._by_number
        start = max(used, default=FIRST_ALLOCATED - 1) + 1
        span = LAST_ALLOCATED - FIRST_ALLOCATED + 1
        for step in range(span):
            number = FIRST_ALLOCATED + (start - FIRST_ALLOCATED + step) % span
            if number not in used:
                return number
        raise AddressExhausted("no free identity number left")


def reserved_names() -> Iterable[str]:
    return RESERVED.values()
