"""Cluster identities: one number per label set on every node, allocated by compare-and-swap in the
kvstore, referenced per node under its lease, and collected when no node uses it any more.

Layout and parsing: plugin.service.cluster_keys. The local registry (datapath.identity) still counts
the holders on this host; only the numbering comes from here. When the store cannot be reached, a
new label set gets a temporary node-local number (datapath.identity.PENDING_FIRST…): it works on this
host and fails closed across nodes (the datapath never sends it, no peer knows it) until the
cluster number is allocated and the endpoints are renumbered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from datapath import identity as ids
from datapath.errors import Conflict
from datapath.identity import Identities, Identity
from datapath.labels import LabelSet, canonical
from datapath.store import DocumentStore
from plugin.kvstore.port import Compare, Delete, KVStore, KvstoreError, Put
from plugin.service import cluster_keys as keys

log = logging.getLogger(__name__)


class IdentityCache:
    """What the store says about identities, as the watch last saw it (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.masters: dict[int, LabelSet] = {}
        self.refs: dict[int, set[str]] = {}
        self._raw: dict[str, tuple[str, object]] = {}  # key -> (kind, parsed) to undo on delete
        self.version = 0  # bumped on every change that matters to policy

    def upsert(self, key: str, value: bytes) -> None:
        with self._lock:
            self._drop(key)
            if key.startswith(keys.ID):
                number, labels = keys.parse_identity(key, value)
                self.masters[number] = labels
                self._raw[key] = ("id", number)
                self.version += 1
            elif key.startswith(keys.REFS):
                number, node = keys.parse_ref(key)
                self.refs.setdefault(number, set()).add(node)
                self._raw[key] = ("ref", (number, node))
            elif key.startswith(keys.LABELS):
                keys.parse_number(value, key)  # checked, not kept: the store's txns use it
            else:
                raise keys.BadData(f"key {key} is not an identity key")

    def delete(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        old = self._raw.pop(key, None)
        if old is None:
            return
        kind, what = old
        if kind == "id":
            assert isinstance(what, int)
            self.masters.pop(what, None)
            self.version += 1
        else:
            number, node = what  # type: ignore[misc]
            users = self.refs.get(number)
            if users is not None:
                users.discard(node)
                if not users:
                    del self.refs[number]

    def snapshot(self) -> tuple[dict[int, LabelSet], dict[int, set[str]]]:
        with self._lock:
            return dict(self.masters), {n: set(u) for n, u in self.refs.items()}

    def labels(self, number: int) -> LabelSet | None:
        with self._lock:
            return self.masters.get(number)

    def number(self, labels: LabelSet) -> int | None:
        with self._lock:
            for number, have in self.masters.items():
                if have == labels:
                    return number
        return None


class IdentityAllocator:
    """Numbers by compare-and-swap: a guard key per label set makes the number unique."""

    ATTEMPTS = 16

    def __init__(self, store: KVStore, node: str, lease: Callable[[], int], cache: IdentityCache) -> None:
        self.store = store
        self.node = node
        self.lease = lease
        self.cache = cache

    def claim(self, labels: LabelSet, preferred: int | None = None) -> int:
        """The cluster number of `labels`, referenced by this node; `preferred` when it is free."""
        guard = keys.labels_key(labels)
        tried: set[int] = set()
        for _ in range(self.ATTEMPTS):
            lease = self.lease()
            kv = self.store.get(guard)
            if kv is not None:
                number = self._guarded(kv.value, guard)
                master = self.store.get(keys.id_key(number)) if number else None
                if number is None or master is None or not self._same(master.key, master.value, labels):
                    # A guard whose identity is gone or other: remove it unless it changed meanwhile.
                    self.store.txn([Compare(guard, "mod", "==", kv.mod_revision)], [Delete(guard)])
                    continue
                if self.store.txn(
                    [Compare(guard, "mod", "==", kv.mod_revision),
                     Compare(master.key, "mod", "==", master.mod_revision)],
                    [Put(keys.ref_key(number, self.node), b"", lease), Put(guard, kv.value)],
                ):
                    return number
                continue
            number = self._candidate(preferred, tried)
            tried.add(number)
            master = self.store.get(keys.id_key(number))
            if master is not None:
                if not self._same(master.key, master.value, labels):
                    continue  # taken by other labels; the next candidate
                # The identity exists but lost its guard (a crash between writes cannot do that; a
                # partial restore can): put the guard back and reference it.
                ok = self.store.txn(
                    [Compare(guard, "create", "==", 0), Compare(master.key, "mod", "==", master.mod_revision)],
                    [Put(guard, keys.encode_number(number)), Put(keys.ref_key(number, self.node), b"", lease)],
                )
            else:
                ok = self.store.txn(
                    [Compare(guard, "create", "==", 0), Compare(keys.id_key(number), "create", "==", 0)],
                    [Put(keys.id_key(number), keys.encode_identity(labels)),
                     Put(guard, keys.encode_number(number)),
                     Put(keys.ref_key(number, self.node), b"", lease)],
                )
            if ok:
                log.info("cluster identity %d for %s", number, ", ".join(str(x) for x in sorted(labels)))
                return number
        raise Conflict(f"no cluster identity for {canonical(labels)} after {self.ATTEMPTS} attempts")

    def unclaim(self, number: int) -> None:
        """This node no longer uses `number`; collect it if no node does."""
        self.store.delete(keys.ref_key(number, self.node))
        self.collect(number)

    def collect(self, number: int) -> bool:
        """Delete the identity if no node references it: read the guard, then the references, then
        delete both only if the guard did not change (every claim rewrites it)."""
        master = self.store.get(keys.id_key(number))
        if master is None:
            return False
        try:
            _, labels = keys.parse_identity(master.key, master.value)
        except keys.BadData:
            labels = None
        guard = keys.labels_key(labels) if labels is not None else ""
        kv = self.store.get(guard) if guard else None
        refs, _ = self.store.list(f"{keys.REFS}{number}/")
        if refs:
            return False
        compares = [Compare(master.key, "mod", "==", master.mod_revision)]
        ops: list[Put | Delete] = [Delete(master.key)]
        if guard:
            if kv is None:
                compares.append(Compare(guard, "create", "==", 0))
            else:
                compares.append(Compare(guard, "mod", "==", kv.mod_revision))
                if self._guarded(kv.value, guard) == number:
                    ops.append(Delete(guard))
        done = self.store.txn(compares, ops)
        if done:
            log.info("cluster identity %d collected (no node uses it)", number)
        return done

    def _candidate(self, preferred: int | None, tried: set[int]) -> int:
        known = set(self.cache.snapshot()[0])
        if preferred is not None and keys.cluster_number(preferred) and preferred not in tried \
                and preferred not in known:
            return preferred
        number = max(known | tried | {ids.FIRST_ALLOCATED - 1}) + 1
        if number > ids.CLUSTER_LAST:  # wrapped: the lowest free one
            number = next(n for n in range(ids.FIRST_ALLOCATED, ids.CLUSTER_LAST + 1) if n not in known | tried)
        return number

    @staticmethod
    def _guarded(value: bytes, where: str) -> int | None:
        try:
            return keys.parse_number(value, where)
        except keys.BadData:
            return None

    @staticmethod
    def _same(key: str, value: bytes, labels: LabelSet) -> bool:
        try:
            return keys.parse_identity(key, value)[1] == labels
        except keys.BadData:
            return False


class ClusterIdentities(Identities):
    """The local registry of holders, numbered cluster-wide while the store answers."""

    def __init__(self, store: DocumentStore, cache: IdentityCache) -> None:
        self.cache = cache
        self.allocator: IdentityAllocator | None = None
        self.online: Callable[[], bool] = lambda: False
        self.unclaim_later: set[int] = set()  # numbers released while the store was away
        super().__init__(store)

    def _loadable(self, number: int) -> bool:
        return keys.cluster_number(number) or ids.is_pending(number)

    def _allocate(self, labels: LabelSet) -> int:
        if self.allocator is not None and self.online():
            try:
                number = self.allocator.claim(labels)
                if number not in self._by_number:
                    self.unclaim_later.discard(number)
                    return number
                log.error("cluster identity %d is held here by other labels; numbering %s locally until "
                          "reconciled", number, canonical(labels))
            except (KvstoreError, Conflict) as exc:
                log.warning("cannot allocate a cluster identity now (%s): a local number until then", exc)
        return self._pending_number()

    def _pending_number(self) -> int:
        for number in range(ids.PENDING_FIRST, ids.PENDING_LAST + 1):
            if number not in self._by_number:
                return number
        raise Conflict("no pending identity number left")

    def _freed(self, ident: Identity) -> None:
        if not keys.cluster_number(ident.number):
            return
        if self.allocator is not None and self.online():
            try:
                self.allocator.unclaim(ident.number)
                return
            except KvstoreError as exc:
                log.warning("cannot release cluster identity %d now: %s", ident.number, exc)
        self.unclaim_later.add(ident.number)

    def local(self) -> dict[int, LabelSet]:
        with self._lock:
            return {n: i.labels for n, i in self._by_number.items()}

    def all(self) -> dict[int, LabelSet]:
        masters, _ = self.cache.snapshot()
        out = dict(ids.RESERVED_LABELS)
        out.update(masters)
        with self._lock:
            out.update({n: i.labels for n, i in self._by_number.items()})
        return out

    def labels_of(self, number: int) -> LabelSet | None:
        return super().labels_of(number) or self.cache.labels(number)

    def number_of(self, labels: LabelSet) -> int | None:
        local = super().number_of(labels)
        return local if local is not None else self.cache.number(labels)
